//! The `cordon` binary as a user runs it.

mod common;

use std::process::Command;

use common::{Sandbox, guest};

fn cordon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cordon"))
}

fn setup(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tools")).unwrap();
    for g in ["text", "notes"] {
        std::fs::copy(guest(g), dir.path().join(format!("tools/{g}.wasm"))).unwrap();
    }
    std::fs::write(
        dir.path().join("cordon.toml"),
        Sandbox::config_text(&dir.path().join("cache"), extra),
    )
    .unwrap();
    dir
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tools_list_call_and_inspect() {
    let dir = setup(
        "[tools.notes]\ndirs = [{ path = \"notes/{tenant}\", guest = \"/notes\", mode = \"rw\" }]\n",
    );
    let config = dir.path().join("cordon.toml");

    let (ok, stdout, stderr) = run(cordon().args(["tools", "list", "--config"]).arg(&config));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("text_stats") && stdout.contains("write_note"),
        "{stdout}"
    );

    let (ok, stdout, stderr) = run(cordon()
        .args(["call", "--config"])
        .arg(&config)
        .args(["text_stats", r#"{"text":"three little words"}"#]));
    assert!(ok, "{stderr}");
    let result: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(result["structuredContent"]["words"], 3, "{stdout}");

    let (ok, _, stderr) = run(cordon()
        .args(["call", "--config"])
        .arg(&config)
        .args(["write_note", r#"{"name":"n1","content":"hello"}"#]));
    assert!(ok, "{stderr}");
    assert!(dir.path().join("data/notes/local/n1.md").exists());

    // A second start loads every component from the compile cache.
    let (ok, _, stderr) = run(cordon()
        .args(["tools", "list", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info"));
    assert!(ok, "{stderr}");
    assert!(stderr.contains("loaded from the compile cache"), "{stderr}");
    assert!(!stderr.contains("compiled and cached"), "{stderr}");

    let (ok, stdout, stderr) = run(cordon().arg("inspect").arg(guest("text")));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("cordon:tool/tool@0.1.0"), "{stdout}");
    assert!(stdout.contains("regex_replace"), "{stdout}");
}

#[test]
fn bad_input_gets_a_message_not_a_panic() {
    let dir = setup("");
    let config = dir.path().join("cordon.toml");
    let (ok, _, stderr) = run(cordon()
        .args(["call", "--config"])
        .arg(&config)
        .args(["text_stats", "not json"]));
    assert!(!ok);
    assert!(
        stderr.contains("arguments must be a JSON object"),
        "{stderr}"
    );

    let (ok, _, stderr) = run(cordon()
        .args(["call", "--config"])
        .arg(&config)
        .args(["nope", "{}"]));
    assert!(!ok);
    assert!(stderr.contains("unknown tool"), "{stderr}");

    std::fs::write(
        &config,
        "[runtime]\ntools_dir = \"missing\"\n[limits]\nmemory_mib = 0\n",
    )
    .unwrap();
    let (ok, _, stderr) = run(cordon().args(["config", "check", "--config"]).arg(&config));
    assert!(!ok);
    assert!(
        stderr.contains("runtime.tools_dir") && stderr.contains("limits.memory_mib"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let (ok, _, stderr) = run(cordon().arg("inspect").arg(&config));
    assert!(!ok);
    assert!(stderr.contains("not a valid component"), "{stderr}");
}
