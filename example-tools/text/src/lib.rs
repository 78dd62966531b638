//! `text`: pure text and JSON utilities as a Cordon tool component.
//!
//! Needs no grants. Tools: `text_stats`, `regex_replace`, `json_query`,
//! `json_pretty`; all are read-only and idempotent.

mod json;

use cordon_guest::prelude::*;
use cordon_guest::serde_json;
use json::Json;

#[derive(Deserialize, JsonSchema)]
struct StatsArgs {
    /// The text to measure.
    text: String,
}

/// Counts for a text.
#[derive(Serialize, JsonSchema)]
struct Stats {
    /// Whitespace-separated words.
    words: usize,
    /// Lines (a final line without a newline counts; an empty text has none).
    lines: usize,
    /// Unicode scalar values.
    chars: usize,
    /// UTF-8 bytes.
    bytes: usize,
}

fn text_stats(args: StatsArgs) -> Structured<Stats> {
    let t = &args.text;
    let stats = Stats {
        words: t.split_whitespace().count(),
        lines: t.lines().count(),
        chars: t.chars().count(),
        bytes: t.len(),
    };
    let summary = format!(
        "{} words, {} lines, {} characters, {} bytes",
        stats.words, stats.lines, stats.chars, stats.bytes
    );
    Structured::new(stats).with_text(summary)
}

#[derive(Deserialize, JsonSchema)]
struct ReplaceArgs {
    /// A regular expression (Rust `regex` syntax, no look-around or backreferences).
    pattern: String,
    /// The replacement; `$1`, `${name}` refer to capture groups, `$$` is a literal `$`.
    replacement: String,
    /// The text to search.
    text: String,
    /// Replace every match instead of only the first.
    #[serde(default)]
    all: bool,
}

fn regex_replace(args: ReplaceArgs) -> ToolResult<String> {
    let re = regex::Regex::new(&args.pattern).context("invalid regular expression")?;
    let limit = if args.all { 0 } else { 1 };
    Ok(re
        .replacen(&args.text, limit, args.replacement.as_str())
        .into_owned())
}

#[derive(Deserialize, JsonSchema)]
struct QueryArgs {
    /// A JSON document, as text.
    json: String,
    /// An RFC 6901 JSON Pointer, e.g. `/items/0/name`; empty selects the whole document.
    pointer: String,
}

fn json_query(args: QueryArgs) -> ToolResult<String> {
    let doc: Json = serde_json::from_str(&args.json).context("invalid JSON")?;
    if !args.pointer.is_empty() && !args.pointer.starts_with('/') {
        bail!(
            "invalid JSON Pointer {:?}: it must be empty or start with '/'",
            args.pointer
        );
    }
    let value = doc
        .pointer(&args.pointer)
        .with_context(|| format!("no value at JSON Pointer {:?}", args.pointer))?;
    Ok(serde_json::to_string_pretty(value)?)
}

#[derive(Deserialize, JsonSchema)]
struct PrettyArgs {
    /// A JSON document, as text.
    json: String,
    /// Spaces per indentation level (0 to 8; 0 prints compactly on one line). Default 2.
    #[schemars(range(max = 8))]
    indent: Option<u8>,
}

fn json_pretty(args: PrettyArgs) -> ToolResult<String> {
    let doc: Json = serde_json::from_str(&args.json).context("invalid JSON")?;
    match args.indent.unwrap_or(2) {
        0 => Ok(serde_json::to_string(&doc)?),
        n @ 1..=8 => {
            let indent = " ".repeat(n.into());
            let mut out = Vec::new();
            let formatter = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
            doc.serialize(&mut ser)?;
            Ok(String::from_utf8(out).expect("serde_json writes UTF-8"))
        }
        n => bail!("indent must be between 0 and 8, not {n}"),
    }
}

cordon_guest::export_tools!(
    Tool::new(
        "text_stats",
        "Counts the words, lines, characters and bytes of a text."
    )
    .title("Text statistics")
    .read_only()
    .idempotent()
    .run(text_stats),
    Tool::new(
        "regex_replace",
        "Replaces the first match (or, with `all`, every match) of a regular expression in a text and returns the new text."
    )
    .title("Regex replace")
    .read_only()
    .idempotent()
    .run(regex_replace),
    Tool::new(
        "json_query",
        "Selects a value from a JSON document with a JSON Pointer (RFC 6901) and returns it pretty-printed."
    )
    .title("JSON query")
    .read_only()
    .idempotent()
    .run(json_query),
    Tool::new("json_pretty", "Pretty-prints a JSON document.")
        .title("JSON pretty-print")
        .read_only()
        .idempotent()
        .run(json_pretty),
);

#[cfg(test)]
mod tests {
    use super::*;
    use cordon_guest::serde_json::Value;
    use cordon_guest::{CallError, CallResult, call_tool, json};

    fn call(name: &str, args: Value) -> Result<CallResult, CallError> {
        call_tool(&cordon_tools(), name, &args.to_string())
    }

    fn text_of(r: &CallResult) -> &str {
        match &r.content[..] {
            [Content::Text(t)] => t,
            other => panic!("expected one text block, got {other:?}"),
        }
    }

    #[test]
    fn definitions() {
        let defs = cordon_guest::list_tools(&cordon_tools());
        let names: Vec<_> = defs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            ["text_stats", "regex_replace", "json_query", "json_pretty"]
        );
        for d in &defs {
            assert_eq!(d.annotations.read_only, Some(true));
            assert_eq!(d.annotations.idempotent, Some(true));
            let schema: Value = serde_json::from_str(&d.input_schema).unwrap();
            assert_eq!(schema["type"], "object");
        }
        let out: Value = serde_json::from_str(defs[0].output_schema.as_ref().unwrap()).unwrap();
        assert_eq!(out["required"], json!(["words", "lines", "chars", "bytes"]));
        let replace: Value = serde_json::from_str(&defs[1].input_schema).unwrap();
        assert_eq!(
            replace["required"],
            json!(["pattern", "replacement", "text"])
        );
    }

    #[test]
    fn stats() {
        let r = call("text_stats", json!({"text": "héllo world\nbye"})).unwrap();
        assert_eq!(
            r.structured_content.as_deref(),
            Some(r#"{"words":3,"lines":2,"chars":15,"bytes":16}"#)
        );
        assert_eq!(text_of(&r), "3 words, 2 lines, 15 characters, 16 bytes");
    }

    #[test]
    fn replace() {
        let args = json!({"pattern": "(\\w+)@", "replacement": "<$1>", "text": "a@ b@"});
        assert_eq!(text_of(&call("regex_replace", args).unwrap()), "<a> b@");
        let args =
            json!({"pattern": "(\\w+)@", "replacement": "<$1>", "text": "a@ b@", "all": true});
        assert_eq!(text_of(&call("regex_replace", args).unwrap()), "<a> <b>");
        let bad = call(
            "regex_replace",
            json!({"pattern": "(", "replacement": "", "text": ""}),
        )
        .unwrap();
        assert!(bad.is_error);
        assert!(text_of(&bad).starts_with("invalid regular expression: "));
    }

    #[test]
    fn query() {
        let doc = r#"{"items": [{"name": "a/b", "n": 1}], "x~y": true}"#;
        let r = call("json_query", json!({"json": doc, "pointer": "/items/0"})).unwrap();
        assert_eq!(text_of(&r), "{\n  \"name\": \"a/b\",\n  \"n\": 1\n}");
        let r = call("json_query", json!({"json": doc, "pointer": "/x~0y"})).unwrap();
        assert_eq!(text_of(&r), "true");
        let r = call("json_query", json!({"json": doc, "pointer": ""})).unwrap();
        assert!(text_of(&r).starts_with("{\n"));
        let missing = call("json_query", json!({"json": doc, "pointer": "/nope"})).unwrap();
        assert!(missing.is_error);
        assert_eq!(text_of(&missing), "no value at JSON Pointer \"/nope\"");
        let bad = call("json_query", json!({"json": "{", "pointer": ""})).unwrap();
        assert!(bad.is_error);
        assert!(text_of(&bad).starts_with("invalid JSON: "));
        let bad_ptr = call("json_query", json!({"json": "{}", "pointer": "a"})).unwrap();
        assert!(bad_ptr.is_error);
    }

    #[test]
    fn pretty() {
        let r = call("json_pretty", json!({"json": "[1,{\"a\":null}]"})).unwrap();
        assert_eq!(text_of(&r), "[\n  1,\n  {\n    \"a\": null\n  }\n]");
        let r = call("json_pretty", json!({"json": "[1, 2]", "indent": 0})).unwrap();
        assert_eq!(text_of(&r), "[1,2]");
        let r = call("json_pretty", json!({"json": "[1]", "indent": 4})).unwrap();
        assert_eq!(text_of(&r), "[\n    1\n]");
        assert!(
            call("json_pretty", json!({"json": "nope"}))
                .unwrap()
                .is_error
        );
        assert!(matches!(
            call("json_pretty", json!({"text": "[]"})),
            Err(CallError::InvalidArguments(_))
        ));
    }
}
