//! `notes`: a small note store as a Cordon tool component.
//!
//! The tool keeps notes as `<name>.md` files in the one directory the operator
//! grants it, which the host preopens at the guest path [`NOTES_DIR`]
//! (`/notes`). Grant it read-write for the full tool set, or read-only to
//! allow only `list_notes`, `read_note` and `search_notes` (writes then fail
//! with a tool error naming the OS error).
//!
//! Note names are 1 to 64 characters of `[A-Za-z0-9_-]`; the tool rejects any
//! other name itself, whatever the host checks. If the configuration key
//! [`MAX_BYTES_KEY`] (`notes.max_bytes`) is granted, `write_note` refuses
//! notes larger than that many bytes.

use std::io;
use std::path::PathBuf;

use cordon_guest::prelude::*;

/// The guest path where the host mounts the granted notes directory.
pub const NOTES_DIR: &str = "/notes";

/// Configuration key: the largest note, in bytes, `write_note` accepts.
pub const MAX_BYTES_KEY: &str = "notes.max_bytes";

/// Notes are stored as `<name>` + this extension.
const EXTENSION: &str = ".md";

/// The most matches `search_notes` returns by default.
const DEFAULT_SEARCH_LIMIT: usize = 100;

fn notes_dir() -> PathBuf {
    #[cfg(all(test, not(target_arch = "wasm32")))]
    if let Some(dir) = tests::DIR.with(|d| d.borrow().clone()) {
        return dir;
    }
    PathBuf::from(NOTES_DIR)
}

/// Checks a note name against `[A-Za-z0-9_-]{1,64}`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn note_path(name: &str) -> ToolResult<PathBuf> {
    if !valid_name(name) {
        bail!("invalid note name {name:?}: use 1 to 64 letters, digits, '_' or '-' (no extension)");
    }
    Ok(notes_dir().join(format!("{name}{EXTENSION}")))
}

/// An OS error's text without the trailing " (os error N)".
fn os_text(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_owned(),
        _ => text,
    }
}

/// The error for a failed file operation: if the notes directory itself is
/// missing, says so (the operator granted no directory), else `"{what}: {err}"`.
fn fs_error(what: String, err: &io::Error) -> ToolError {
    if let Err(dir_err) = std::fs::metadata(notes_dir()) {
        return ToolError::new(format!(
            "{what}: the notes directory {NOTES_DIR} is not available ({}); \
             the operator must grant this tool a directory",
            os_text(&dir_err)
        ));
    }
    ToolError::new(format!("{what}: {}", os_text(err)))
}

/// A note name argument.
#[derive(Deserialize, JsonSchema)]
struct NameArgs {
    /// The note's name: 1 to 64 letters, digits, '_' or '-'.
    #[schemars(pattern(r"^[A-Za-z0-9_-]{1,64}$"))]
    name: String,
}

#[derive(Deserialize, JsonSchema)]
struct WriteArgs {
    /// The note's name: 1 to 64 letters, digits, '_' or '-'.
    #[schemars(pattern(r"^[A-Za-z0-9_-]{1,64}$"))]
    name: String,
    /// The note's full new text (Markdown); replaces any existing text.
    content: String,
}

#[derive(Deserialize, JsonSchema)]
struct SearchArgs {
    /// Text to look for, case-insensitively.
    #[schemars(length(min = 1))]
    query: String,
    /// The most matching lines to return (default 100).
    #[schemars(range(min = 1))]
    limit: Option<usize>,
}

/// The notes in the directory.
#[derive(Serialize, JsonSchema)]
struct NoteList {
    /// Every note, sorted by name.
    notes: Vec<NoteInfo>,
}

/// One note.
#[derive(Serialize, JsonSchema)]
struct NoteInfo {
    /// The note's name.
    name: String,
    /// Its size in bytes.
    bytes: u64,
}

/// Lines that matched a search.
#[derive(Serialize, JsonSchema)]
struct SearchResults {
    /// Matching lines, by note name then line number.
    matches: Vec<SearchMatch>,
    /// True if there were more matches than the limit.
    truncated: bool,
}

/// One matching line.
#[derive(Serialize, JsonSchema)]
struct SearchMatch {
    /// The note's name.
    note: String,
    /// The line number, from 1.
    line: usize,
    /// The line's text.
    text: String,
}

fn read_notes() -> ToolResult<Vec<NoteInfo>> {
    let entries = std::fs::read_dir(notes_dir())
        .map_err(|e| fs_error(format!("cannot list notes in {NOTES_DIR}"), &e))?;
    let mut notes = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| fs_error(format!("cannot list notes in {NOTES_DIR}"), &e))?;
        let file_name = entry.file_name();
        let Some(name) = file_name
            .to_str()
            .and_then(|f| f.strip_suffix(EXTENSION))
            .filter(|n| valid_name(n))
        else {
            continue;
        };
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_file() {
            notes.push(NoteInfo {
                name: name.to_owned(),
                bytes: meta.len(),
            });
        }
    }
    notes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(notes)
}

fn list_notes() -> ToolResult<Structured<NoteList>> {
    let notes = read_notes()?;
    let text = if notes.is_empty() {
        "No notes.".to_owned()
    } else {
        notes
            .iter()
            .map(|n| format!("{} ({} bytes)", n.name, n.bytes))
            .collect::<Vec<_>>()
            .join("\n")
    };
    Ok(Structured::new(NoteList { notes }).with_text(text))
}

fn read_note(args: NameArgs) -> ToolResult<String> {
    let path = note_path(&args.name)?;
    std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound if std::fs::metadata(notes_dir()).is_ok() => {
            ToolError::new(format!("note '{}' does not exist", args.name))
        }
        _ => fs_error(format!("cannot read note '{}'", args.name), &e),
    })
}

fn write_note(args: WriteArgs) -> ToolResult<String> {
    let path = note_path(&args.name)?;
    let size = args.content.len();
    let max = cordon_guest::config::parse::<u64>(MAX_BYTES_KEY)?;
    if let Some(max) = max.filter(|&max| size as u64 > max) {
        bail!(
            "cannot write note '{}': it is {size} bytes, more than the limit of {max} bytes ({MAX_BYTES_KEY})",
            args.name
        );
    }
    std::fs::write(&path, &args.content)
        .map_err(|e| fs_error(format!("cannot write note '{}'", args.name), &e))?;
    Ok(format!("Saved note '{}' ({size} bytes).", args.name))
}

fn delete_note(args: NameArgs) -> ToolResult<String> {
    let path = note_path(&args.name)?;
    std::fs::remove_file(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound if std::fs::metadata(notes_dir()).is_ok() => {
            ToolError::new(format!("note '{}' does not exist", args.name))
        }
        _ => fs_error(format!("cannot delete note '{}'", args.name), &e),
    })?;
    Ok(format!("Deleted note '{}'.", args.name))
}

fn search_notes(args: SearchArgs) -> ToolResult<Structured<SearchResults>> {
    if args.query.is_empty() {
        bail!("the search query must not be empty");
    }
    let needle = args.query.to_lowercase();
    let limit = args.limit.unwrap_or(DEFAULT_SEARCH_LIMIT).max(1);
    let mut matches = Vec::new();
    let mut truncated = false;
    'notes: for note in read_notes()? {
        let path = notes_dir().join(format!("{}{EXTENSION}", note.name));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| fs_error(format!("cannot read note '{}'", note.name), &e))?;
        for (i, line) in text.lines().enumerate() {
            if line.to_lowercase().contains(&needle) {
                if matches.len() == limit {
                    truncated = true;
                    break 'notes;
                }
                matches.push(SearchMatch {
                    note: note.name.clone(),
                    line: i + 1,
                    text: line.to_owned(),
                });
            }
        }
    }
    let mut text = if matches.is_empty() {
        format!("No lines match {:?}.", args.query)
    } else {
        matches
            .iter()
            .map(|m| format!("{}:{}: {}", m.note, m.line, m.text))
            .collect::<Vec<_>>()
            .join("\n")
    };
    if truncated {
        text.push_str(&format!("\n(stopped after {limit} matches)"));
    }
    Ok(Structured::new(SearchResults { matches, truncated }).with_text(text))
}

cordon_guest::export_tools!(
    Tool::new("list_notes", "Lists the notes with their sizes in bytes.")
        .title("List notes")
        .read_only()
        .idempotent()
        .closed_world()
        .run(list_notes),
    Tool::new("read_note", "Returns the text of a note.")
        .title("Read note")
        .read_only()
        .idempotent()
        .closed_world()
        .run(read_note),
    Tool::new(
        "write_note",
        "Creates a note or replaces its text. Names are 1 to 64 letters, digits, '_' or '-'."
    )
    .title("Write note")
    .writes()
    .non_destructive()
    .idempotent()
    .closed_world()
    .run(write_note),
    Tool::new(
        "search_notes",
        "Finds the lines of all notes that contain a text (case-insensitive), with note name and line number."
    )
    .title("Search notes")
    .read_only()
    .idempotent()
    .closed_world()
    .run(search_notes),
    Tool::new("delete_note", "Deletes a note.")
        .title("Delete note")
        .writes()
        .destructive()
        .idempotent()
        .closed_world()
        .run(delete_note),
);

// Native only: the tests use a temporary directory instead of `/notes`.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use std::cell::RefCell;
    use std::path::PathBuf;

    use cordon_guest::serde_json::{Value, json};
    use cordon_guest::{CallError, CallResult, Content, call_tool};

    use super::*;

    thread_local! {
        pub static DIR: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
    }

    /// A test's directory, removed when the test ends.
    struct TestDir(PathBuf);

    impl std::ops::Deref for TestDir {
        type Target = PathBuf;
        fn deref(&self) -> &PathBuf {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Points this thread's tools at a fresh directory (or at a missing one).
    fn use_dir(test: &str, create: bool) -> TestDir {
        let dir = std::env::temp_dir().join(format!("cordon-notes-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if create {
            std::fs::create_dir_all(&dir).unwrap();
        }
        DIR.with(|d| *d.borrow_mut() = Some(dir.clone()));
        TestDir(dir)
    }

    fn call(name: &str, args: Value) -> Result<CallResult, CallError> {
        call_tool(&cordon_tools(), name, &args.to_string())
    }

    fn text(r: &CallResult) -> &str {
        match &r.content[..] {
            [Content::Text(t)] => t,
            other => panic!("expected one text block, got {other:?}"),
        }
    }

    #[test]
    fn names() {
        assert!(valid_name("a"));
        assert!(valid_name("Shop-list_2"));
        assert!(valid_name(&"x".repeat(64)));
        for bad in ["", "a.md", "../x", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn round_trip() {
        let dir = use_dir("round_trip", true);
        let r = call(
            "write_note",
            json!({"name": "todo", "content": "Buy milk\nCall Bob"}),
        )
        .unwrap();
        assert!(!r.is_error, "{r:?}");
        assert_eq!(text(&r), "Saved note 'todo' (17 bytes).");
        assert!(dir.join("todo.md").is_file());
        call("write_note", json!({"name": "b", "content": "bob's MILK"})).unwrap();
        std::fs::write(dir.join("ignored.txt"), "milk").unwrap();

        let r = call("read_note", json!({"name": "todo"})).unwrap();
        assert_eq!(text(&r), "Buy milk\nCall Bob");

        let r = call("list_notes", json!({})).unwrap();
        assert_eq!(
            r.structured_content.as_deref(),
            Some(r#"{"notes":[{"name":"b","bytes":10},{"name":"todo","bytes":17}]}"#)
        );

        let r = call("search_notes", json!({"query": "milk"})).unwrap();
        assert_eq!(text(&r), "b:1: bob's MILK\ntodo:1: Buy milk");
        let r = call("search_notes", json!({"query": "BOB", "limit": 1})).unwrap();
        let v: Value = serde_json::from_str(r.structured_content.as_deref().unwrap()).unwrap();
        assert_eq!(
            v,
            json!({"matches": [{"note": "b", "line": 1, "text": "bob's MILK"}], "truncated": true})
        );

        let r = call("delete_note", json!({"name": "todo"})).unwrap();
        assert_eq!(text(&r), "Deleted note 'todo'.");
        let r = call("read_note", json!({"name": "todo"})).unwrap();
        assert!(r.is_error);
        assert_eq!(text(&r), "note 'todo' does not exist");
        let r = call("delete_note", json!({"name": "todo"})).unwrap();
        assert_eq!(text(&r), "note 'todo' does not exist");
    }

    #[test]
    fn rejects_bad_names() {
        let _dir = use_dir("bad_names", true);
        for name in ["../etc/passwd", "a.md", "", "x/y"] {
            let r = call("read_note", json!({ "name": name })).unwrap();
            assert!(r.is_error);
            assert!(text(&r).starts_with("invalid note name"), "{}", text(&r));
            let r = call("write_note", json!({ "name": name, "content": "x" })).unwrap();
            assert!(r.is_error);
        }
    }

    #[test]
    fn max_bytes() {
        let _dir = use_dir("max_bytes", true);
        cordon_guest::config::set_for_test(MAX_BYTES_KEY, Some("4"));
        let ok = call("write_note", json!({"name": "a", "content": "1234"})).unwrap();
        assert!(!ok.is_error);
        let r = call("write_note", json!({"name": "a", "content": "12345"})).unwrap();
        assert!(r.is_error);
        assert_eq!(
            text(&r),
            "cannot write note 'a': it is 5 bytes, more than the limit of 4 bytes (notes.max_bytes)"
        );
        cordon_guest::config::set_for_test(MAX_BYTES_KEY, Some("lots"));
        let r = call("write_note", json!({"name": "a", "content": "1"})).unwrap();
        assert!(r.is_error);
        assert!(text(&r).contains("notes.max_bytes"));
        cordon_guest::config::set_for_test(MAX_BYTES_KEY, None);
    }

    #[test]
    fn missing_directory() {
        let _dir = use_dir("missing", false);
        let r = call("write_note", json!({"name": "a", "content": "x"})).unwrap();
        assert!(r.is_error);
        assert!(
            text(&r).starts_with("cannot write note 'a': the notes directory /notes is not available (No such file or directory)"),
            "{}",
            text(&r)
        );
        let r = call("list_notes", json!({})).unwrap();
        assert!(r.is_error);
        let r = call("read_note", json!({"name": "a"})).unwrap();
        assert!(text(&r).contains("is not available"), "{}", text(&r));
    }

    #[test]
    fn schemas() {
        let defs = cordon_guest::list_tools(&cordon_tools());
        let write = defs.iter().find(|d| d.name == "write_note").unwrap();
        assert_eq!(write.annotations.read_only, Some(false));
        assert_eq!(write.annotations.destructive, Some(false));
        assert_eq!(write.annotations.idempotent, Some(true));
        let delete = defs.iter().find(|d| d.name == "delete_note").unwrap();
        assert_eq!(delete.annotations.destructive, Some(true));
        let schema: Value = serde_json::from_str(&write.input_schema).unwrap();
        assert_eq!(
            schema["properties"]["name"]["pattern"],
            "^[A-Za-z0-9_-]{1,64}$"
        );
        let list = defs.iter().find(|d| d.name == "list_notes").unwrap();
        let out: Value = serde_json::from_str(list.output_schema.as_deref().unwrap()).unwrap();
        assert_eq!(out["type"], "object");
        assert_eq!(out["properties"]["notes"]["type"], "array");
    }
}
