//! The official MCP Python SDK (PyPI `mcp`, pinned in
//! tests/clients/requirements.txt) against the real `cordon` binary, over
//! every transport: Streamable HTTP with a session (initialize handshake),
//! Streamable HTTP stateless 2026-07-28 (`server/discover`), the classic
//! HTTP+SSE transport and stdio.
//!
//! The client is tests/clients/python_sdk_client.py, run with the venv that
//! `scripts/install-python-deps` makes in .ci/cache/python.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Sandbox, ServeProcess, guest, shared_cache_dir, workspace_root};

/// The conformance tool's calls may run long here (`sleep_ms` 30 s).
const CONFIG_EXTRA: &str = "[tools.conformance.limits]\ntimeout_ms = 60000\n";
/// How long `sleep_ms` runs in the long-call test.
const LONG_MS: u64 = 30_000;
/// How long one client run may take before it is killed.
const CLIENT_DEADLINE: Duration = Duration::from_secs(120);

/// The venv's interpreter; fails (never skips) when it is missing.
fn python() -> PathBuf {
    let python = workspace_root().join(".ci/cache/python/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `scripts/install-python-deps` (it installs the pinned MCP Python SDK into .ci/cache/python)",
        python.display()
    );
    python
}

fn client_script() -> PathBuf {
    workspace_root().join("tests/clients/python_sdk_client.py")
}

/// A temp dir holding the example tools and a config that uses them.
fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    for g in ["text", "conformance", "notes"] {
        std::fs::copy(guest(g), tools.join(format!("{g}.wasm"))).unwrap();
    }
    std::fs::write(
        config_path(dir.path()),
        Sandbox::config_text(&shared_cache_dir(), CONFIG_EXTRA),
    )
    .unwrap();
    dir
}

fn config_path(dir: &Path) -> PathBuf {
    dir.join("cordon.toml")
}

/// A running `cordon serve` on the example tools, killed when dropped.
struct Server {
    process: ServeProcess,
    /// `http://127.0.0.1:PORT` (no path).
    base: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = setup();
        let process = ServeProcess::start(&config_path(dir.path()), &[]);
        let base = process
            .url
            .strip_suffix("/mcp")
            .unwrap_or_else(|| panic!("unexpected URL in the banner: {}", process.url))
            .to_owned();
        Server {
            process,
            base,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn log(&self) -> String {
        self.process.log()
    }
}

/// A running Python client, killed when dropped.
struct ClientRun {
    child: Child,
    out: tempfile::NamedTempFile,
    label: String,
}

impl Drop for ClientRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the Python client for `transport` with `args` (options, then the
/// URL or the stdio command). Output goes to a temp file (both streams, in
/// order), so that a chatty run never blocks on a pipe.
fn spawn_client(transport: &str, args: &[String]) -> ClientRun {
    let python = python();
    let out = tempfile::NamedTempFile::new().unwrap();
    // One open file for both streams: they share its offset, so neither
    // overwrites the other.
    let stdout = out.reopen().unwrap();
    let stderr = stdout.try_clone().unwrap();
    let child = Command::new(&python)
        .arg(client_script())
        .args(["--transport", transport])
        .args(args)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    ClientRun {
        child,
        out,
        label: format!("{transport} {}", args.join(" ")),
    }
}

/// Waits for `run` (killing it past the deadline) and returns its output;
/// panics with the output (and the server's log) when a check failed.
fn finish(mut run: ClientRun, server: Option<&Server>) -> String {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = run.child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > CLIENT_DEADLINE {
            let _ = run.child.kill();
            let _ = run.child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(run.out.path()).unwrap_or_default();
    println!("--- python client ({}) ---\n{output}", run.label);
    let server_log = server.map(Server::log).unwrap_or_default();
    match status {
        Some(status) if status.success() => output,
        Some(status) => panic!(
            "the Python SDK client failed ({status}) over {}:\n{output}\n--- cordon serve stderr ---\n{server_log}",
            run.label
        ),
        None => panic!(
            "the Python SDK client did not finish within {CLIENT_DEADLINE:?} over {}:\n{output}\n--- cordon serve stderr ---\n{server_log}",
            run.label
        ),
    }
}

fn run_http(transport: &str, path: &str, extra: &[&str]) -> String {
    let server = Server::start();
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    args.push(server.url(path));
    finish(spawn_client(transport, &args), Some(&server))
}

/// The stdio command line: the client launches Cordon itself.
fn stdio_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    args.push("--".into());
    args.push(env!("CARGO_BIN_EXE_cordon").into());
    args.push("stdio".into());
    args.push("--config".into());
    args.push(config_path(dir).to_string_lossy().into_owned());
    args.extend(["--tenant".into(), "t1".into()]);
    args
}

fn assert_all_passed(output: &str) {
    assert!(output.contains("all checks passed"), "{output}");
    assert!(!output.contains("FAIL:"), "{output}");
}

#[test]
fn streamable_http_with_session() {
    let output = run_http("streamable-legacy", "/mcp", &[]);
    assert_all_passed(&output);
    assert!(output.contains("protocol 2025-11-25"), "{output}");
}

#[test]
fn streamable_http_stateless_2026_07_28() {
    // mode="auto" probes `server/discover`; Cordon offers 2026-07-28, so the
    // client must adopt it rather than fall back to initialize.
    let output = run_http(
        "streamable-auto",
        "/mcp",
        &["--expect-protocol", "2026-07-28"],
    );
    assert_all_passed(&output);
}

#[test]
fn http_sse() {
    let output = run_http("sse", "/sse", &[]);
    assert_all_passed(&output);
}

#[test]
fn stdio() {
    let dir = setup();
    let output = finish(spawn_client("stdio", &stdio_args(dir.path(), &[])), None);
    assert_all_passed(&output);
}

/// A call that runs for 30 s while reporting progress every second is not
/// cut off (no idle timeout on the response stream, the session or the
/// client's read) and every progress notification arrives, in order. The
/// transports run at once, so the whole test takes ~30 s.
#[test]
fn long_call_with_progress_is_not_cut_off() {
    let server = Server::start();
    let dir = setup();
    let long = ["--long-ms".to_string(), LONG_MS.to_string()];
    let long: Vec<&str> = long.iter().map(String::as_str).collect();
    let with_url = |path: &str| {
        let mut args: Vec<String> = long.iter().map(|s| s.to_string()).collect();
        args.push(server.url(path));
        args
    };
    let runs = vec![
        spawn_client("streamable-legacy", &with_url("/mcp")),
        spawn_client("streamable-auto", &with_url("/mcp")),
        spawn_client("sse", &with_url("/sse")),
        spawn_client("stdio", &stdio_args(dir.path(), &long)),
    ];
    let start = Instant::now();
    for run in runs {
        let output = finish(run, Some(&server));
        assert_all_passed(&output);
        assert!(
            output.contains(&format!("sleep_ms progress reached {LONG_MS}")),
            "{output}"
        );
    }
    assert!(
        start.elapsed() >= Duration::from_millis(LONG_MS),
        "the long calls returned early"
    );
}
