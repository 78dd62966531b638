//! Shared test harness: builds the guest components once per test process
//! (for real, with cargo, for wasm32-wasip2) and opens Cordon on a private
//! tools directory, data root and config.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

pub mod http;
pub mod postgres;
pub mod tenants;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cordon::app::App;
use cordon::config::Config;
use cordon::dispatch::{CallRequest, Principal};
use cordon::runtime::{CallEvent, CallFailure, CallOutcome, EventSink, LogLevel};
use rmcp::model::CallToolResult;
use tokio::sync::mpsc;

/// Every guest the tests use: the example tools and the test fixtures.
pub const GUESTS: &[&str] = &["text", "notes", "conformance", "hostile", "sql", "dbprobe"];

/// Guests built without `std`, each in a cargo run of its own: cargo unifies
/// a dependency's features across the packages of one build, and
/// `wit-bindgen`'s `std` feature (which the other guests use) would give
/// these a second panic handler.
pub const NO_STD_GUESTS: &[&str] = &["trivial"];

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds every guest (once per process) and returns the directory holding
/// the `.wasm` files. Panics with the fix when the target is missing.
pub fn guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let builds = std::iter::once(GUESTS).chain(NO_STD_GUESTS.iter().map(std::slice::from_ref));
        for guests in builds {
            let mut cmd = Command::new(&cargo);
            cmd.current_dir(workspace_root())
                .args(["build", "--profile", "guest", "--target", "wasm32-wasip2"]);
            for guest in guests {
                cmd.args(["-p", guest]);
            }
            let out = cmd.output().expect("running cargo to build the guests");
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                if stderr.contains("wasm32-wasip2") && stderr.contains("target may not be installed") {
                    panic!("the wasm32-wasip2 target is missing: run `rustup target add wasm32-wasip2`\n{stderr}");
                }
                panic!("building the guest components failed:\n{stderr}");
            }
        }
        target_dir().join("wasm32-wasip2/guest")
    })
}

/// The path of a built guest.
pub fn guest(name: &str) -> PathBuf {
    guest_dir().join(format!("{name}.wasm"))
}

/// A compile cache shared by all tests (compiling is the slow part).
pub fn shared_cache_dir() -> PathBuf {
    target_dir().join("cordon-test-cache")
}

/// A private Cordon: its own tools directory (holding copies of `guests`),
/// data root and config. `extra` is appended to the generated config.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub app: App,
}

impl Sandbox {
    pub async fn new(guests: &[&str], extra: &str) -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(&tools).unwrap();
        for g in guests {
            std::fs::copy(guest(g), tools.join(format!("{g}.wasm"))).unwrap();
        }
        let config = Sandbox::config_text(&shared_cache_dir(), extra);
        std::fs::write(dir.path().join("cordon.toml"), &config).unwrap();
        let config = Config::load(&dir.path().join("cordon.toml")).unwrap();
        let app = App::open(config, false).await.unwrap();
        let problems = app.dispatcher.registry().snapshot().problems().to_vec();
        assert!(problems.is_empty(), "load problems: {problems:?}");
        Sandbox { dir, app }
    }

    /// A config for a test directory. Authentication is off (loopback
    /// only) and the audit log is written to `audit.jsonl`, unless `extra`
    /// has its own `[auth]` / `[audit]` table.
    pub fn config_text(cache: &Path, extra: &str) -> String {
        let auth = if extra.contains("[auth]") {
            ""
        } else {
            "[auth]\nmode = \"none\"\n"
        };
        let audit = if extra.contains("[audit]") {
            ""
        } else {
            "[audit]\npath = \"audit.jsonl\"\n"
        };
        format!(
            "[runtime]\ntools_dir = \"tools\"\ndata_root = \"data\"\ncache_dir = {cache:?}\nwatch = false\n\n{auth}{audit}{extra}\n"
        )
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Calls `tool` as tenant `t1`.
    pub async fn call(&self, tool: &str, arguments: serde_json::Value) -> CallOutcome {
        self.call_as("t1", tool, arguments).await
    }

    pub async fn call_as(
        &self,
        tenant: &str,
        tool: &str,
        arguments: serde_json::Value,
    ) -> CallOutcome {
        self.app
            .dispatcher
            .call(
                &Principal::local(tenant),
                CallRequest {
                    tool: tool.into(),
                    arguments,
                    events: EventSink::discard(),
                    cancel: Default::default(),
                    origin: Default::default(),
                },
            )
            .await
    }

    /// Calls `tool` and collects every event it sent.
    pub async fn call_with_events(
        &self,
        tool: &str,
        arguments: serde_json::Value,
    ) -> (CallOutcome, Vec<CallEvent>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let outcome = self
            .app
            .dispatcher
            .call(
                &Principal::local("t1"),
                CallRequest {
                    tool: tool.into(),
                    arguments,
                    events: EventSink::new(tx, Some(LogLevel::Debug), true),
                    cancel: Default::default(),
                    origin: Default::default(),
                },
            )
            .await;
        let mut events = Vec::new();
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        (outcome, events)
    }

    /// Calls `tool` and expects a successful (not isError) result.
    pub async fn ok(&self, tool: &str, arguments: serde_json::Value) -> CallToolResult {
        let outcome = self.call(tool, arguments).await;
        let result = outcome
            .result
            .unwrap_or_else(|e| panic!("{tool} failed: {e}"));
        assert_ne!(
            result.is_error,
            Some(true),
            "{tool} returned isError: {}",
            text(&result)
        );
        result
    }

    /// Calls `tool` and expects a failure.
    pub async fn failure(&self, tool: &str, arguments: serde_json::Value) -> CallFailure {
        match self.call(tool, arguments).await.result {
            Ok(r) => panic!("{tool} was expected to fail but returned: {}", text(&r)),
            Err(e) => e,
        }
    }
}

/// The text of every text block, joined with newlines.
pub fn text(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `cordon serve --config CONFIG --listen 127.0.0.1:0` as a child process,
/// killed when dropped. Its stderr is collected (so it never blocks on a
/// full pipe) and the URL is read from its start-up banner.
pub struct ServeProcess {
    child: std::process::Child,
    /// The Streamable HTTP endpoint, `http://127.0.0.1:PORT/mcp`.
    pub url: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ServeProcess {
    /// Starts the server with `env` added to its environment; panics with its
    /// stderr if it prints no URL within two minutes.
    pub fn start(config: &Path, env: &[(&str, &str)]) -> ServeProcess {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;

        let mut child = Command::new(env!("CARGO_BIN_EXE_cordon"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(["--listen", "127.0.0.1:0"])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting cordon serve");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some((_, rest)) = line.split_once("Cordon is serving ")
                    && let Some((_, url)) = rest.split_once(" at ")
                {
                    let _ = tx.send(url.trim().to_owned());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut server = ServeProcess {
            child,
            url: String::new(),
            log,
        };
        match rx.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(url) => server.url = url,
            Err(_) => panic!(
                "cordon serve printed no URL (exit: {:?}); its stderr:\n{}",
                server.child.try_wait(),
                server.log()
            ),
        }
        server
    }

    /// Sends `signal` (e.g. `TERM`, `HUP`) to the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `timeout` for the server to exit; its status, if it did.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for the server to exit (after a SIGTERM sent
    /// with [`ServeProcess::signal`]) and checks that it exited with 0.
    pub fn expect_clean_exit(&mut self, timeout: std::time::Duration) {
        let status = self
            .wait_exit(timeout)
            .unwrap_or_else(|| panic!("cordon did not exit within {timeout:?}\n{}", self.log()));
        assert!(status.success(), "exit status {status:?}\n{}", self.log());
    }

    /// Kills the server with SIGKILL (no shutdown, no flush) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
