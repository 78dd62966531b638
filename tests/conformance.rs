//! The official MCP conformance suite (npm `@modelcontextprotocol/conformance`,
//! pinned in tests/conformance/package.json) in server mode against the real
//! `cordon serve`, serving the `conformance` example tool that provides the
//! suite's fixture tools.
//!
//! Every scenario of the suite runs (`--suite all`); the ones Cordon is
//! expected to fail are listed, each with its reason, in
//! tests/conformance/expected-failures.yaml. The suite itself fails the run
//! on an unexpected failure (or warning) and on a listed scenario that now
//! passes. `scripts/install-node-deps` installs the suite into
//! .ci/cache/node.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Sandbox, ServeProcess, guest, shared_cache_dir, workspace_root};

/// Long calls must not hit the default timeout while the suite runs.
const CONFIG_EXTRA: &str = "[tools.conformance.limits]\ntimeout_ms = 60000\n";
/// How long the server may take to start (it may compile the component).
/// How long the whole suite may run (it takes a few seconds).
const SUITE_DEADLINE: Duration = Duration::from_secs(300);
/// How much of the server's stderr a failure shows.
const LOG_TAIL_LINES: usize = 60;
/// Where `scripts/install-node-deps` installs the pinned npm packages.
const NODE_PREFIX: &str = ".ci/cache/node";
const SUITE_PACKAGE: &str = "@modelcontextprotocol/conformance";
/// The scenarios Cordon serves the features for: each must run, and unless
/// expected-failures.yaml lists it (a known bug), pass without warnings.
const REQUIRED: &[&str] = &[
    "server-initialize",
    "ping",
    "logging-set-level",
    "tools-list",
    "tools-call-simple-text",
    "tools-call-image",
    "tools-call-audio",
    "tools-call-embedded-resource",
    "tools-call-mixed-content",
    "tools-call-error",
    "tools-call-with-logging",
    "tools-call-with-progress",
    "json-schema-2020-12",
    "server-sse-multiple-streams",
    "dns-rebinding-protection",
];

fn expected_failures_file() -> PathBuf {
    workspace_root().join("tests/conformance/expected-failures.yaml")
}

/// The installed suite's entry point; fails (never skips) when it is
/// missing or is not the pinned version.
fn suite_bin() -> PathBuf {
    let root = workspace_root();
    let fix = "run `scripts/install-node-deps` (it installs the pinned conformance suite into .ci/cache/node)";
    let bin = root.join(NODE_PREFIX).join("node_modules/.bin/conformance");
    assert!(
        bin.exists(),
        "the MCP conformance suite is not installed ({} is missing): {fix}",
        bin.display()
    );
    let pinned = read_json(&root.join("tests/conformance/package.json"))["dependencies"]
        [SUITE_PACKAGE]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("tests/conformance/package.json does not pin {SUITE_PACKAGE}"));
    let installed = read_json(
        &root
            .join(NODE_PREFIX)
            .join("node_modules")
            .join(SUITE_PACKAGE)
            .join("package.json"),
    )["version"]
        .as_str()
        .map(str::to_owned);
    assert_eq!(
        installed.as_deref(),
        Some(pinned.as_str()),
        "the installed conformance suite is not the pinned version: {fix}"
    );
    bin
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The scenario names listed under `server:` in the expected-failures file
/// (a YAML list of plain names, with comments).
fn expected_failures() -> BTreeSet<String> {
    let text = std::fs::read_to_string(expected_failures_file()).unwrap();
    let mut names = BTreeSet::new();
    let mut in_server = false;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim_end();
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') && !line.starts_with('-') {
            in_server = line.trim() == "server:";
        } else if in_server && let Some(name) = line.trim().strip_prefix("- ") {
            names.insert(name.trim().to_owned());
        }
    }
    names
}

/// A running `cordon serve` on the conformance tool, killed when dropped.
struct Server {
    process: ServeProcess,
    dir: tempfile::TempDir,
}

impl std::ops::Deref for Server {
    type Target = ServeProcess;
    fn deref(&self) -> &ServeProcess {
        &self.process
    }
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(&tools).unwrap();
        std::fs::copy(guest("conformance"), tools.join("conformance.wasm")).unwrap();
        let config = dir.path().join("cordon.toml");
        std::fs::write(
            &config,
            Sandbox::config_text(&shared_cache_dir(), CONFIG_EXTRA),
        )
        .unwrap();
        // Warnings are what explains a failure (e.g. a rejected Origin).
        let process = ServeProcess::start(&config, &[("RUST_LOG", "warn"), ("NO_COLOR", "1")]);
        Server { process, dir }
    }

    /// The last lines the server wrote to stderr.
    fn log(&self) -> String {
        let log = self.process.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        strip_ansi(&tail.join("\n"))
    }
}

/// Runs `cmd` to completion, killing it after `deadline`.
fn run_with_deadline(cmd: &mut Command, deadline: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run the conformance suite ({e}); is Node.js 20+ installed and on PATH?")
        });
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let out = String::from_utf8_lossy(&stdout.join().unwrap()).into_owned();
            panic!(
                "the conformance suite did not finish within {deadline:?}; its output so far:\n{}",
                strip_ansi(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The suite colours its output unconditionally.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One scenario's outcome, from the `checks.json` the suite saved.
#[derive(Default)]
struct Outcome {
    success: usize,
    failure: usize,
    warning: usize,
    /// `STATUS id: message` for every failure and warning.
    problems: Vec<String>,
}

impl Outcome {
    fn clean(&self) -> bool {
        self.success > 0 && self.failure == 0 && self.warning == 0
    }
}

/// Reads the results the suite saved under `dir`: one folder per scenario,
/// named `server-<scenario>-<timestamp>`.
fn read_results(dir: &Path) -> BTreeMap<String, Outcome> {
    let mut results = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return results;
    };
    for entry in entries {
        let entry = entry.unwrap();
        let folder = entry.file_name().to_string_lossy().into_owned();
        // The timestamp is `2026-01-01T00-00-00-000Z`: 24 characters.
        let Some(name) = folder
            .strip_prefix("server-")
            .and_then(|rest| rest.len().checked_sub(25).map(|end| &rest[..end]))
        else {
            continue;
        };
        let checks = read_json(&entry.path().join("checks.json"));
        let mut outcome = Outcome::default();
        for check in checks.as_array().into_iter().flatten() {
            let status = check["status"].as_str().unwrap_or("?");
            match status {
                "SUCCESS" => outcome.success += 1,
                "FAILURE" => outcome.failure += 1,
                "WARNING" => outcome.warning += 1,
                _ => continue,
            }
            if status != "SUCCESS" {
                let message = check["errorMessage"]
                    .as_str()
                    .or_else(|| check["description"].as_str())
                    .unwrap_or("");
                outcome
                    .problems
                    .push(format!("{status} {}: {message}", check["id"]));
            }
        }
        results.insert(name.to_owned(), outcome);
    }
    results
}

#[test]
fn official_conformance_suite() {
    let suite = suite_bin();
    let expected = expected_failures();
    let server = Server::start();
    let results_dir = server.dir.path().join("results");

    let out = run_with_deadline(
        Command::new(&suite)
            .current_dir(server.dir.path())
            .args(["server", "--url", &server.url, "--suite", "all"])
            .arg("--expected-failures")
            .arg(expected_failures_file())
            .arg("--output-dir")
            .arg(&results_dir),
        SUITE_DEADLINE,
    );
    let suite_output = strip_ansi(&format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ));
    // Past the per-scenario progress lines (the table below has the details)
    // when the suite got as far as its summary.
    let suite_output = match suite_output.find("=== SUMMARY ===") {
        Some(at) => &suite_output[at..],
        None => &suite_output[..],
    };
    let results = read_results(&results_dir);

    // A readable table (shown with --nocapture, and with any failure).
    let mut table = String::new();
    for (name, outcome) in &results {
        let verdict = match (outcome.clean(), expected.contains(name)) {
            (true, false) => "pass",
            (false, true) => "expected failure",
            (true, true) => "PASSES BUT LISTED AS EXPECTED FAILURE",
            (false, false) => "FAIL",
        };
        let _ = writeln!(
            table,
            "  {name:<32} {verdict:<18} ({} passed, {} failed, {} warnings)",
            outcome.success, outcome.failure, outcome.warning
        );
        if !outcome.clean() && !expected.contains(name) {
            for problem in &outcome.problems {
                let _ = writeln!(table, "      {problem}");
            }
        }
    }
    println!("conformance suite against {}:\n{table}", server.url);

    let mut problems = Vec::new();
    if !out.status.success() {
        problems.push(format!(
            "the suite failed ({}): a scenario not in tests/conformance/expected-failures.yaml \
             failed or warned, or a listed one now passes (remove it from the file)",
            out.status
        ));
    }
    for name in REQUIRED {
        if !results.contains_key(*name) {
            problems.push(format!("required scenario {name} did not run"));
        } else if !expected.contains(*name) && !results[*name].clean() {
            problems.push(format!("required scenario {name} did not pass cleanly"));
        }
    }
    for name in &expected {
        if !results.contains_key(name) {
            problems.push(format!(
                "expected-failures.yaml lists {name}, which the suite does not have"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n\nscenarios:\n{table}\n--- suite output ---\n{suite_output}\n--- cordon stderr ---\n{}",
        problems.join("\n"),
        server.log()
    );
}
