//! Cost of Cordon's MCP transports over loopback HTTP, in release:
//!
//! 1. throughput and latency of `tools/call` in stateless 2026-07-28
//!    JSON-response mode with 1, 16 and 64 concurrent clients, for Cordon's
//!    router serving two real components and for the same server answering
//!    the same tools natively, in process (wasm / native is the price of the
//!    sandbox):
//!    - `null` of the `trivial` fixture, the smallest tool a component can
//!      be (`no_std`, imports nothing), against a native null tool: the
//!      issue's measure of the sandbox itself;
//!    - `echo` of the `conformance` component, a small tool built with the
//!      Rust SDK (`std`, serde), as tools usually are, against a native echo;
//!    - `echo` from the same rmcp Streamable HTTP configuration alone, with a
//!      native tool and none of Cordon ("bare rmcp": wasm / bare is the price
//!      of all of Cordon);
//! 2. out-of-the-box latency of one client through Cordon's router with the
//!    default `[server]` settings;
//! 3. resident memory per idle session: 10,000 sessions, each initialized
//!    with its event stream held open, over Streamable HTTP (`GET /mcp`) and
//!    classic HTTP+SSE (`GET /sse`), against 10,000 bare keep-alive
//!    connections as the floor.
//!
//! 4. the price of tenancy: `tools/call` throughput with authentication (an
//!    HS256 JWT on every request) + RBAC + audit (batched group commit)
//!    against all three off, and with audit durability `always`;
//!    `-- tenancy breakdown` adds authentication alone and audit alone,
//!    `aa` a second "all off" (an A/A check), and `only=I` loads server I
//!    alone and prints the calls it served (for per-call counts under perf).
//!
//! Run: `cargo bench -p cordon --bench transport` (prints the figures that
//! BENCHMARKS.md records); `-- throughput`, `-- out-of-the-box`,
//! `-- idle` and `-- tenancy` run sections 1, 2, 3 and 4 alone;
//! `-- throughput side=NAME[,NAME…]` (`wasm-null`, `native-null`, `wasm`,
//! `native`, `rmcp`) measures only those sides of section 1, and
//! `clients=N` one load, for profiling; `unbatched` serves sections 1 and 2
//! with `runtime.engine.batch_calls = false`. With `marks`, every run of an
//! interleaved section prints `mark SERVER START END` on stderr (CLOCK_MONOTONIC,
//! as `perf record -k CLOCK_MONOTONIC` stamps its samples), and
//! `host/benches/perf-split.py` compares two servers' profiles from one
//! recording, each sample counted for the server loaded when it was taken.
//!
//! In 1 and 2 the servers run on one tokio runtime and the load driver on
//! another, in this process (two worker threads each, like two processes
//! sharing the machine). Each client is a task with its own keep-alive
//! connection (hyper, TCP_NODELAY) calling in a loop. In 3 the server runs in
//! a fresh child process (this binary, re-executed with `CORDON_BENCH_ROLE`)
//! so that its resident memory counts the server alone; this process is the
//! client and reports its own cost separately.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use axum::body::{Bytes, HttpBody};
use futures::StreamExt as _;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::StreamableHttpService;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use tokio_util::sync::CancellationToken;

/// Concurrent clients per throughput run.
const CLIENTS: [usize; 3] = [1, 16, 64];
/// Runs per (clients, server), short and interleaved (see [`interleaved`]).
const ROUNDS: usize = 11;
const WARMUP: Duration = Duration::from_millis(250);
const MEASURE: Duration = Duration::from_secs(1);
/// Sequential calls for the out-of-the-box latency.
const OOB_WARMUP: usize = 500;
const OOB_CALLS: usize = 5_000;
const OOB_ROUNDS: usize = 3;
/// Idle sessions held open at once, and how many are being opened at a time.
const IDLE_SESSIONS: usize = 10_000;
const OPEN_CONCURRENCY: usize = 32;
/// How long a child server may take to start, and to open all sessions.
const CHILD_START: Duration = Duration::from_secs(300);
const OPEN_TIMEOUT: Duration = Duration::from_secs(300);

/// Set on the child process: `server-cordon` or `server-native`.
const ROLE_ENV: &str = "CORDON_BENCH_ROLE";

/// The revision served statelessly, and the last one with sessions.
const STATELESS_VERSION: &str = "2026-07-28";
const SESSION_VERSION: &str = "2025-11-25";

const MESSAGE: &str = "hello from the transport bench";
/// The body of a stateless 2026-07-28 `tools/call` of `$tool` with
/// `$arguments` (JSON). rmcp 3.11 serves a request
/// statelessly when its `_meta` has both `io.modelcontextprotocol/protocolVersion`
/// and `io.modelcontextprotocol/clientCapabilities` (`clientInfo` is
/// optional); it then also requires the `MCP-Protocol-Version` header (equal
/// to the `_meta` version), `Mcp-Method` and, for `tools/call`, `Mcp-Name`,
/// besides `Accept: application/json, text/event-stream` on every POST.
macro_rules! stateless_call_body {
    ($tool:literal, $arguments:literal) => {
        concat!(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":""#,
            $tool,
            r#"","arguments":"#,
            $arguments,
            r#","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"cordon-transport-bench","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{}}}}"#
        )
    };
}

/// A stateless `tools/call` a load makes, and the text its reply must carry.
#[derive(Clone, Copy)]
struct ToolCall {
    tool: &'static str,
    body: &'static str,
    expected_text: &'static str,
}

/// `echo` of the `conformance` component: a small tool built with the Rust
/// SDK (`std`, serde), as tools usually are.
const ECHO: ToolCall = ToolCall {
    tool: "echo",
    body: stateless_call_body!("echo", r#"{"message":"hello from the transport bench"}"#),
    expected_text: MESSAGE,
};

/// `null` of the `trivial` fixture: the smallest tool a component can be
/// (`no_std`, imports nothing, returns `ok`), the issue's "trivial WASM tool".
const NULL: ToolCall = ToolCall {
    tool: "null",
    body: stateless_call_body!("null", "{}"),
    expected_text: "ok",
};

const SESSION_CALL: &str = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hello from the transport bench"}}}"#;
const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"cordon-transport-bench","version":"0.1.0"}}}"#;
const INITIALIZE_2024: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2024-11-05","capabilities":{},"clientInfo":{"name":"cordon-transport-bench","version":"0.1.0"}}}"#;
const INITIALIZED: &str = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;

type HttpClient = Client<HttpConnector, String>;

// ---------------------------------------------------------------------------
// The native baseline: the same rmcp transport, a tool that does nothing.

/// A native MCP server with one tool, `echo`, answered in place.
#[derive(Clone)]
struct NullTool;

fn null_tool() -> Tool {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"message": {"type": "string"}},
        "required": ["message"]
    });
    let serde_json::Value::Object(schema) = schema else {
        unreachable!()
    };
    Tool::new("echo", "Returns its message unchanged.", schema)
}

impl ServerHandler for NullTool {
    fn get_info(&self) -> rmcp::model::ServerConfig {
        rmcp::model::ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(vec![null_tool()]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let message = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("message"))
            .and_then(|m| m.as_str())
            .unwrap_or_default();
        Ok(CallToolResult::success(vec![ContentBlock::text(message)]).into())
    }
}

/// A dispatcher like `wasm`'s (same registry, configuration and audit log)
/// that answers `echo` and `null` natively, in place of the sandbox: the
/// same server with a native tool. `echo` reads its arguments as the guest does.
fn native_dispatcher(
    wasm: &cordon::dispatch::Dispatcher,
) -> anyhow::Result<Arc<cordon::dispatch::Dispatcher>> {
    #[derive(serde::Deserialize)]
    struct Echo {
        message: String,
    }
    let dispatcher = cordon::dispatch::Dispatcher::new(
        wasm.registry().clone(),
        wasm.settings().config.clone(),
        wasm.audit().clone(),
    )?
    .answer_natively(
        "echo",
        Arc::new(|arguments: &str| {
            let echo: Echo = serde_json::from_str(arguments)
                .map_err(|e| cordon::runtime::CallFailure::InvalidArguments(e.to_string()))?;
            Ok(CallToolResult::success(vec![ContentBlock::text(
                echo.message,
            )]))
        }),
    )
    // The native null tool: ignores its arguments, like the `trivial`
    // fixture's `null`.
    .answer_natively(
        "null",
        Arc::new(|_arguments: &str| Ok(CallToolResult::success(vec![ContentBlock::text("ok")]))),
    );
    Ok(Arc::new(dispatcher))
}

/// The Streamable HTTP service exactly as `cordon::server::router` configures
/// it, serving [`NullTool`] (without Cordon's session-cap middleware).
fn native_router(
    config: &cordon::config::ServerConfig,
    shutdown: CancellationToken,
) -> axum::Router {
    let (http_config, sessions) = cordon::server::streamable_http_settings(config, &shutdown);
    let service = StreamableHttpService::new(|| Ok(NullTool), sessions, http_config);
    axum::Router::new().route_service(cordon::server::MCP_PATH, service)
}

/// The `[server]` settings of the throughput and session runs: the defaults,
/// with room for more sessions than the idle-session run opens.
fn bench_config() -> cordon::config::ServerConfig {
    cordon::config::ServerConfig {
        max_sessions: 1_000_000,
        ..Default::default()
    }
}

/// Serves `router` on a fresh loopback port, on the current runtime.
async fn start(router: axum::Router, shutdown: CancellationToken) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let header_timeout = Duration::from_secs(bench_config().header_timeout_secs);
        if let Err(e) = cordon::server::serve_on(listener, router, header_timeout, shutdown).await {
            eprintln!("server on {addr} failed: {e:#}");
        }
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------
// The load driver.

fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

fn mcp_uri(addr: SocketAddr) -> http::Uri {
    format!("http://{addr}{}", cordon::server::MCP_PATH)
        .parse()
        .expect("a valid URI")
}

async fn read_body<B>(mut body: B) -> anyhow::Result<Vec<u8>>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if let Ok(data) = frame?.into_data() {
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Checks that a reply carries `expected_text` and no error.
fn check_reply(status: http::StatusCode, body: &[u8], expected_text: &str) -> anyhow::Result<()> {
    let expected = format!(r#""text":"{expected_text}""#);
    if status != http::StatusCode::OK
        || !contains(body, expected.as_bytes())
        || contains(body, br#""isError":true"#)
    {
        bail!(
            "unexpected reply: {status}: {}",
            String::from_utf8_lossy(body)
        );
    }
    Ok(())
}

/// The bearer token every request carries. Servers with authentication off
/// never look at it; the tenancy servers verify it on every request.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn post(uri: &http::Uri) -> http::request::Builder {
    http::Request::post(uri.clone())
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", TOKEN.get().map_or("", String::as_str)),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json, text/event-stream")
}

/// One stateless 2026-07-28 `tools/call`.
async fn stateless_call(
    client: &HttpClient,
    uri: &http::Uri,
    call: ToolCall,
) -> anyhow::Result<()> {
    let request = post(uri)
        .header("MCP-Protocol-Version", STATELESS_VERSION)
        .header("Mcp-Method", "tools/call")
        .header("Mcp-Name", call.tool)
        .body(call.body.to_owned())?;
    let response = client.request(request).await?;
    let status = response.status();
    let body = read_body(response.into_body()).await?;
    check_reply(status, &body, call.expected_text)
}

/// Opens a 2025-11-25 session: `initialize`, then `notifications/initialized`.
async fn open_session(client: &HttpClient, uri: &http::Uri) -> anyhow::Result<String> {
    let request = post(uri).body(INITIALIZE.to_owned())?;
    let response = client.request(request).await?;
    let status = response.status();
    let session = response
        .headers()
        .get("Mcp-Session-Id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = read_body(response.into_body()).await?;
    let Some(session) = session.filter(|_| status == http::StatusCode::OK) else {
        bail!(
            "initialize failed: {status}: {}",
            String::from_utf8_lossy(&body)
        );
    };
    let request = post(uri)
        .header("Mcp-Session-Id", &session)
        .header("MCP-Protocol-Version", SESSION_VERSION)
        .body(INITIALIZED.to_owned())?;
    let response = client.request(request).await?;
    let status = response.status();
    let body = read_body(response.into_body()).await?;
    ensure!(
        status == http::StatusCode::ACCEPTED,
        "notifications/initialized: {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(session)
}

/// One `tools/call` of `echo` in a session (the reply is an SSE stream).
async fn session_call(client: &HttpClient, uri: &http::Uri, session: &str) -> anyhow::Result<()> {
    let request = post(uri)
        .header("Mcp-Session-Id", session)
        .header("MCP-Protocol-Version", SESSION_VERSION)
        .body(SESSION_CALL.to_owned())?;
    let response = client.request(request).await?;
    let status = response.status();
    let body = read_body(response.into_body()).await?;
    check_reply(status, &body, MESSAGE)
}

/// Something held open for the server (an event stream's response body).
type Held = Box<dyn Send>;

/// Opens a Streamable HTTP session and its standalone GET event stream, and
/// returns the stream (unread: dropping it closes the stream).
async fn open_idle_session(client: &HttpClient, uri: &http::Uri) -> anyhow::Result<Held> {
    let session = open_session(client, uri).await?;
    let request = http::Request::get(uri.clone())
        .header(http::header::ACCEPT, "text/event-stream")
        .header("Mcp-Session-Id", &session)
        .header("MCP-Protocol-Version", SESSION_VERSION)
        .body(String::new())?;
    let response = client.request(request).await?;
    ensure!(
        response.status() == http::StatusCode::OK,
        "GET event stream: {}",
        response.status()
    );
    Ok(Box::new(response))
}

/// The next event of an SSE stream (comments skipped) as (event, data);
/// `buf` keeps what was read beyond it.
async fn next_event<B>(body: &mut B, buf: &mut Vec<u8>) -> anyhow::Result<(String, String)>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buf.drain(..end + 2).collect();
            let (mut event, mut data, mut fields) = (String::from("message"), String::new(), 0);
            for line in String::from_utf8_lossy(&block).lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                    fields += 1;
                } else if let Some(v) = line.strip_prefix("data:") {
                    if fields > 0 && !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    fields += 1;
                }
            }
            if fields > 0 {
                return Ok((event, data));
            }
            continue;
        }
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
            .await
            .context("the event stream ended")??;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
    }
}

/// Opens a classic HTTP+SSE (2024-11-05) session: `GET /sse`, then
/// `initialize` and `notifications/initialized` posted to its endpoint, and
/// returns the event stream (dropping it ends the session).
async fn open_idle_sse_session(client: &HttpClient, addr: SocketAddr) -> anyhow::Result<Held> {
    let request = http::Request::get(format!("http://{addr}/sse"))
        .header(http::header::ACCEPT, "text/event-stream")
        .body(String::new())?;
    let response = client.request(request).await?;
    ensure!(
        response.status() == http::StatusCode::OK,
        "GET /sse: {}",
        response.status()
    );
    let mut body = response.into_body();
    let mut buf = Vec::new();
    let (event, endpoint) = next_event(&mut body, &mut buf).await?;
    ensure!(event == "endpoint", "first event {event:?}: {endpoint}");
    let uri: http::Uri = format!("http://{addr}{endpoint}").parse()?;
    for message in [INITIALIZE_2024, INITIALIZED] {
        let response = client.request(post(&uri).body(message.to_owned())?).await?;
        let status = response.status();
        let reply = read_body(response.into_body()).await?;
        ensure!(
            status == http::StatusCode::ACCEPTED,
            "POST {endpoint}: {status}: {}",
            String::from_utf8_lossy(&reply)
        );
        if message == INITIALIZE_2024 {
            let (event, data) = next_event(&mut body, &mut buf).await?;
            ensure!(
                event == "message" && data.contains(r#""result""#),
                "initialize answered {event:?}: {data}"
            );
        }
    }
    Ok(Box::new(body))
}

/// Latencies in nanoseconds, sorted.
struct Samples(Vec<u64>);

impl Samples {
    fn new(mut samples: Vec<u64>) -> Samples {
        samples.sort_unstable();
        Samples(samples)
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let index = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[index] as f64 / 1e6
    }

    fn mean_ms(&self) -> f64 {
        self.0.iter().sum::<u64>() as f64 / self.0.len().max(1) as f64 / 1e6
    }
}

/// `clients` tasks, each with its own connection, making `call` to `uri` in
/// a loop for `warmup` + `measure`; returns the latencies (ns) of the calls
/// started after `warmup`.
async fn load(
    uri: http::Uri,
    call: ToolCall,
    clients: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Vec<u64>> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let until = measure_from + measure;
    let uri = Arc::new(uri);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let uri = uri.clone();
            tokio::spawn(async move {
                let client = http_client();
                let mut samples = Vec::with_capacity(1 << 16);
                loop {
                    let started = Instant::now();
                    if started >= until {
                        break;
                    }
                    stateless_call(&client, &uri, call).await?;
                    if started >= measure_from {
                        samples.push(started.elapsed().as_nanos() as u64);
                    }
                }
                anyhow::Ok(samples)
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}

/// CPU time used so far by the server side of this process: the threads
/// of the servers' runtime and Cordon's own threads (audit writer, epoch
/// ticker), from /proc/self/task/*/stat.
fn server_cpu_time() -> anyhow::Result<Duration> {
    // utime and stime are in clock ticks; Linux reports 100 per second to
    // user space (USER_HZ) on every architecture we run on.
    const TICKS_PER_SECOND: u64 = 100;
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        // "pid (comm) state ..." with comm possibly holding spaces.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let comm = head.split_once(" (").map_or("", |(_, c)| c);
        if !(comm.starts_with("bench-server") || comm.starts_with("cordon-")) {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After "state": utime and stime are fields 14 and 15 of stat(5),
        // i.e. 11 and 12 here (0-based, counting from state).
        let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
        ticks += utime + stime;
    }
    Ok(Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND))
}

/// `instant` in seconds of CLOCK_MONOTONIC, the clock `Instant` reads on
/// Linux. std offers no accessor; its `Debug` shows the raw `timespec`.
fn monotonic(instant: Instant) -> String {
    let debug = format!("{instant:?}");
    let field = |name: &str| -> Option<u64> {
        let rest = &debug[debug.find(name)? + name.len()..];
        rest.trim_start_matches([':', ' '])
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    match (field("tv_sec"), field("tv_nsec")) {
        (Some(secs), Some(nanos)) => format!("{secs}.{nanos:09}"),
        _ => format!("unknown({debug})"),
    }
}

fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Whether `flag` is on the command line (`throughput`, `out-of-the-box`,
/// `idle`, `tenancy`: one section alone; `breakdown`, `aa`: more servers in
/// section 4).
fn arg(flag: &str) -> bool {
    std::env::args().any(|a| a == flag)
}

/// What interleaved runs measured for one server.
#[derive(Default)]
struct Runs {
    /// Calls per second, run by run.
    rates: Vec<f64>,
    /// Every measured call's latency, in ns.
    samples: Vec<u64>,
    /// Server CPU per call, in µs, run by run.
    cpu_per_call: Vec<f64>,
}

impl Runs {
    /// The line the tables print: rates and pooled latencies.
    fn line(&self, label: &str) -> String {
        let min = self.rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.rates.iter().copied().fold(0.0, f64::max);
        let samples = Samples::new(self.samples.clone());
        format!(
            "{label:<14} {:>8} calls/s ({:>6}–{:>6})   p50 {:>6.3} ms   p99 {:>6.3} ms",
            thousands(self.median_rate()),
            thousands(min),
            thousands(max),
            samples.percentile_ms(0.50),
            samples.percentile_ms(0.99),
        )
    }

    fn median_rate(&self) -> f64 {
        median(&self.rates)
    }

    fn median_cpu(&self) -> f64 {
        median(&self.cpu_per_call)
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The median over runs of `cost(a, b)` for the runs of `a` and `b` in the
/// same round. A round's servers run seconds apart, so they see nearly the
/// same machine: pairing cancels most of the drift between rounds, and the
/// median shrugs off the rounds a neighbour disturbed.
fn paired(a: &[f64], b: &[f64], cost: fn(f64, f64) -> f64) -> f64 {
    let costs: Vec<f64> = a.iter().zip(b).map(|(&x, &y)| cost(x, y)).collect();
    median(&costs)
}

/// Loads the `targets` (a server and the call to make) in turn with
/// `clients` clients, `rounds` times, each run `warmup` + `measure` long;
/// the order rotates from round to round so that drift hurts every server
/// alike. With `only`, that server alone is loaded. Returns the runs and the calls served (warm-up
/// calls estimated at the measured rate).
fn interleaved(
    clients_rt: &tokio::runtime::Runtime,
    targets: &[(SocketAddr, ToolCall)],
    clients: usize,
    rounds: usize,
    (warmup, measure): (Duration, Duration),
    only: Option<usize>,
) -> anyhow::Result<(Vec<Runs>, f64)> {
    let n = targets.len();
    let mut runs: Vec<Runs> = (0..n).map(|_| Runs::default()).collect();
    let mut calls_served = 0.0;
    for round in 0..rounds {
        for turn in 0..n {
            let i = (round + turn) % n;
            if only.is_some_and(|only| only != i) {
                continue;
            }
            let cpu_before = server_cpu_time()?;
            let (addr, call) = targets[i];
            let started = Instant::now();
            let run = clients_rt.block_on(load(mcp_uri(addr), call, clients, warmup, measure))?;
            if arg("marks") {
                eprintln!(
                    "mark {i} {} {}",
                    monotonic(started),
                    monotonic(Instant::now())
                );
            }
            let cpu = server_cpu_time()? - cpu_before;
            // Warm-up calls are not in `run` but used CPU too: count them
            // at the measured rate.
            let calls = run.len() as f64 * (warmup + measure).as_secs_f64() / measure.as_secs_f64();
            calls_served += calls;
            runs[i]
                .cpu_per_call
                .push(cpu.as_secs_f64() * 1e6 / calls.max(1.0));
            runs[i].rates.push(run.len() as f64 / measure.as_secs_f64());
            runs[i].samples.extend(run);
        }
    }
    Ok((runs, calls_served))
}

/// One server of section 1.
struct Side {
    /// What the tables call it.
    label: &'static str,
    /// Its name for `side=NAME` (profile one side alone).
    name: &'static str,
    addr: SocketAddr,
    call: ToolCall,
}

/// Section 1's sides, in the order [`throughput`] compares them.
const WASM_NULL: usize = 0;
const NATIVE_NULL: usize = 1;
const WASM_ECHO: usize = 2;
const NATIVE_ECHO: usize = 3;
const BARE_RMCP: usize = 4;

fn throughput(clients_rt: &tokio::runtime::Runtime, sides: &[Side; 5]) -> anyhow::Result<()> {
    println!(
        "\n1. tools/call `null` and `echo`, stateless {STATELESS_VERSION}, JSON responses, keep-alive + TCP_NODELAY;\n   \
         {ROUNDS} rounds, each server in turn (order rotating) for {} ms warm-up + {} ms measured;\n   \
         calls/s and server CPU per call = median of the runs, latencies pooled; ratios: of the \
         medians | median of the per-round ratios",
        WARMUP.as_millis(),
        MEASURE.as_millis()
    );
    // `side=NAME[,NAME…]`: those sides only, interleaved as usual.
    let chosen: Vec<usize> =
        match std::env::args().find_map(|a| a.strip_prefix("side=").map(str::to_owned)) {
            Some(names) => names
                .split(',')
                .map(|name| {
                    sides
                        .iter()
                        .position(|s| s.name == name)
                        .with_context(|| format!("side={name}: no such side"))
                })
                .collect::<anyhow::Result<_>>()?,
            None => (0..sides.len()).collect(),
        };
    let targets: Vec<(SocketAddr, ToolCall)> = chosen
        .iter()
        .map(|&i| (sides[i].addr, sides[i].call))
        .collect();
    // `clients=N`: that many clients only, for a profile of one load.
    let client_counts: Vec<usize> =
        match std::env::args().find_map(|a| a.strip_prefix("clients=")?.parse().ok()) {
            Some(n) => vec![n],
            None => CLIENTS.to_vec(),
        };
    for clients in client_counts {
        let (runs, calls_served) = interleaved(
            clients_rt,
            &targets,
            clients,
            ROUNDS,
            (WARMUP, MEASURE),
            None,
        )?;
        println!("clients = {clients}");
        for (&side, runs) in chosen.iter().zip(&runs) {
            println!(
                "   {}   server CPU {:>6.1} µs/call",
                runs.line(sides[side].label),
                runs.median_cpu()
            );
        }
        if chosen.len() == 1 {
            println!("   calls served (warm-up estimated at the measured rate): {calls_served:.0}");
            continue;
        }
        let runs_of = |side: usize| Some(&runs[chosen.iter().position(|&c| c == side)?]);
        for (a, b, note) in [
            (WASM_NULL, NATIVE_NULL, "   (target: throughput ≥ 0.8)"),
            (WASM_ECHO, NATIVE_ECHO, ""),
            (WASM_ECHO, BARE_RMCP, ""),
        ] {
            let (Some(x), Some(y)) = (runs_of(a), runs_of(b)) else {
                continue;
            };
            println!(
                "   {} / {}: throughput {:.2} | {:.2}, server CPU per call {:.2} | {:.2}{note}",
                sides[a].label,
                sides[b].label,
                x.median_rate() / y.median_rate(),
                paired(&x.rates, &y.rates, |x, y| x / y),
                x.median_cpu() / y.median_cpu(),
                paired(&x.cpu_per_call, &y.cpu_per_call, |x, y| x / y),
            );
        }
    }
    Ok(())
}

async fn out_of_the_box(addr: SocketAddr) -> anyhow::Result<(Samples, Samples)> {
    let uri = mcp_uri(addr);
    let client = http_client();
    let mut stateless = Vec::with_capacity(OOB_CALLS);
    for i in 0..OOB_WARMUP + OOB_CALLS {
        let started = Instant::now();
        stateless_call(&client, &uri, ECHO).await?;
        if i >= OOB_WARMUP {
            stateless.push(started.elapsed().as_nanos() as u64);
        }
    }
    let session = open_session(&client, &uri).await?;
    let mut in_session = Vec::with_capacity(OOB_CALLS);
    for i in 0..OOB_WARMUP + OOB_CALLS {
        let started = Instant::now();
        session_call(&client, &uri, &session).await?;
        if i >= OOB_WARMUP {
            in_session.push(started.elapsed().as_nanos() as u64);
        }
    }
    Ok((Samples::new(stateless), Samples::new(in_session)))
}

// ---------------------------------------------------------------------------
// Idle sessions: the server in a child process.

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

fn open_fds(pid: &str) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The soft limit on open files of this process.
fn nofile_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A server child process; closing its stdin stops it.
struct ServerChild {
    child: Child,
    addr: SocketAddr,
}

impl ServerChild {
    fn spawn(kind: &str) -> anyhow::Result<ServerChild> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(ROLE_ENV, format!("server-{kind}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the server child")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(CHILD_START) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the {kind} server child did not start");
            }
        };
        let Some(addr) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the {kind} server child said {line:?}");
        };
        let addr = addr.parse()?;
        Ok(ServerChild { child, addr })
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Authentication off, as in the sandbox configs: sections 1-3 measure the
/// transports (section 4 measures authentication).
fn no_auth() -> std::sync::Arc<cordon::auth::Authenticator> {
    let config = cordon::auth::AuthConfig {
        mode: cordon::auth::AuthMode::None,
        ..Default::default()
    };
    std::sync::Arc::new(
        cordon::auth::Authenticator::new(&config, std::path::Path::new(".")).unwrap(),
    )
}

/// A runtime for servers, built as `cordon serve` builds its own.
fn server_runtime(thread_name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.thread_name(thread_name).enable_all();
    cordon::runtime::use_idle_time(&mut builder);
    builder.build()
}

/// The child: serves until its stdin closes.
fn server_child(role: &str) -> anyhow::Result<()> {
    let rt = server_runtime("bench-server")?;
    let shutdown = CancellationToken::new();
    let config = bench_config();
    let (addr, _sandbox) = rt.block_on(async {
        let (router, sandbox) = match role {
            "server-cordon" => {
                let sandbox = common::Sandbox::new(&["conformance"], NO_TENANCY).await;
                let router = cordon::server::router(
                    sandbox.app.dispatcher.clone(),
                    no_auth(),
                    &config,
                    shutdown.clone(),
                );
                (router, Some(sandbox))
            }
            "server-native" => (native_router(&config, shutdown.clone()), None),
            other => bail!("unknown {ROLE_ENV} {other:?}"),
        };
        anyhow::Ok((start(router, shutdown.clone()).await?, sandbox))
    })?;
    println!("listening {addr}");
    // Blocks until the parent closes stdin or exits.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    shutdown.cancel();
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

struct IdleFigures {
    before_kib: u64,
    after_kib: u64,
    fds: isize,
    client_kib: i64,
    opened: usize,
    open_time: Duration,
}

/// What each of the idle clients holds open.
#[derive(Clone, Copy)]
enum Idle {
    /// A Streamable HTTP session with its GET event stream.
    Streamable,
    /// A classic HTTP+SSE session.
    Sse,
    /// A keep-alive connection after one stateless call: no session (the
    /// floor: what the HTTP server costs per connection).
    Connection,
}

/// Opens IDLE_SESSIONS idle sessions (or connections) on a fresh `server`
/// child (`cordon` or `native`).
fn idle_sessions(
    clients_rt: &tokio::runtime::Runtime,
    server: &str,
    idle: Idle,
) -> anyhow::Result<IdleFigures> {
    let server = ServerChild::spawn(server)?;
    let pid = server.pid();
    let addr = server.addr;
    let uri = mcp_uri(addr);
    let open = |client: &HttpClient| {
        let (client, uri) = (client.clone(), uri.clone());
        async move {
            match idle {
                Idle::Streamable => open_idle_session(&client, &uri).await,
                Idle::Sse => open_idle_sse_session(&client, addr).await,
                Idle::Connection => {
                    // Its own pool, so the connection stays open with it.
                    let client = http_client();
                    stateless_call(&client, &uri, ECHO).await?;
                    Ok(Box::new(client) as Held)
                }
            }
        }
    };
    clients_rt.block_on(async {
        // Warm the server's code paths: a call and a session.
        let client = http_client();
        stateless_call(&client, &uri, ECHO).await?;
        drop(open(&client).await?);
        drop(client);
        tokio::time::sleep(Duration::from_millis(500)).await;
        anyhow::Ok(())
    })?;
    let before_kib = rss_kib(&pid)?;
    let fds_before = open_fds(&pid)?;
    let client_before = rss_kib("self")?;
    let (client, streams, open_time) = clients_rt.block_on(async {
        let started = Instant::now();
        let client = http_client();
        let opening = futures::stream::iter(0..IDLE_SESSIONS)
            .map(|_| open(&client))
            .buffer_unordered(OPEN_CONCURRENCY)
            .collect::<Vec<_>>();
        let streams = tokio::time::timeout(OPEN_TIMEOUT, opening)
            .await
            .context("opening the sessions timed out")?
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?;
        let open_time = started.elapsed();
        // Let the server settle (every session task parked).
        tokio::time::sleep(Duration::from_secs(2)).await;
        anyhow::Ok((client, streams, open_time))
    })?;
    let after_kib = rss_kib(&pid)?;
    let fds_after = open_fds(&pid)?;
    let client_after = rss_kib("self")?;
    let opened = streams.len();
    drop(streams);
    drop(client);
    drop(server);
    Ok(IdleFigures {
        before_kib,
        after_kib,
        fds: fds_after as isize - fds_before as isize,
        client_kib: client_after as i64 - client_before as i64,
        opened,
        open_time,
    })
}

fn main() -> anyhow::Result<()> {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        return server_child(&role);
    }
    // cargo bench passes `--bench`; nothing else to parse.
    println!(
        "cordon transport benchmark (release host, {} CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let servers_rt = server_runtime("bench-server")?;
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("bench-client")
        .enable_all()
        .build()?;

    if arg("tenancy") {
        return tenancy(&servers_rt, &clients_rt);
    }
    if arg("idle") {
        return idle(&clients_rt);
    }
    let shutdown = CancellationToken::new();
    let config = bench_config();
    let extra = if arg("unbatched") {
        format!("{NO_TENANCY}[runtime.engine]\nbatch_calls = false\n")
    } else {
        NO_TENANCY.to_owned()
    };
    let sandbox = servers_rt.block_on(common::Sandbox::new(&["conformance", "trivial"], &extra));
    let (wasm, native, rmcp, default) = servers_rt.block_on(async {
        let dispatcher = sandbox.app.dispatcher.clone();
        let wasm = start(
            cordon::server::router(dispatcher.clone(), no_auth(), &config, shutdown.clone()),
            shutdown.clone(),
        )
        .await?;
        let native = start(
            cordon::server::router(
                native_dispatcher(&dispatcher)?,
                no_auth(),
                &config,
                shutdown.clone(),
            ),
            shutdown.clone(),
        )
        .await?;
        let rmcp = start(native_router(&config, shutdown.clone()), shutdown.clone()).await?;
        let default = start(
            cordon::server::router(dispatcher, no_auth(), &Default::default(), shutdown.clone()),
            shutdown.clone(),
        )
        .await?;
        anyhow::Ok((wasm, native, rmcp, default))
    })?;

    if !arg("out-of-the-box") {
        let sides = [
            Side {
                label: "wasm null",
                name: "wasm-null",
                addr: wasm,
                call: NULL,
            },
            Side {
                label: "native null",
                name: "native-null",
                addr: native,
                call: NULL,
            },
            Side {
                label: "wasm echo",
                name: "wasm",
                addr: wasm,
                call: ECHO,
            },
            Side {
                label: "native echo",
                name: "native",
                addr: native,
                call: ECHO,
            },
            Side {
                label: "bare rmcp echo",
                name: "rmcp",
                addr: rmcp,
                call: ECHO,
            },
        ];
        throughput(&clients_rt, &sides)?;
        if arg("throughput") {
            return Ok(());
        }
    }

    // Each round is short (~2 s): one burst from a neighbour on a shared
    // machine moves its p50, so the median of several rounds is reported.
    // The client runs as a task on the load driver's runtime, like each
    // client of section 1, so that its connection is driven on the same
    // worker: run on this thread (`block_on`), every call also waited for a
    // wake-up across threads on the client side (~30–50 µs here).
    let mut rounds = Vec::with_capacity(OOB_ROUNDS);
    for _ in 0..OOB_ROUNDS {
        rounds.push(clients_rt.block_on(clients_rt.spawn(out_of_the_box(default)))??);
    }
    println!(
        "\n2. one client, Cordon's router with the default [server] settings, `echo`, \
         {OOB_CALLS} sequential calls after {OOB_WARMUP}, {OOB_ROUNDS} rounds;\n   \
         p50 = median of the rounds' p50s, p99 and mean over all rounds"
    );
    for (label, in_session) in [
        (format!("stateless {STATELESS_VERSION} (JSON)"), false),
        (format!("in a {SESSION_VERSION} session (JSON)"), true),
    ] {
        let pick = |round: &(Samples, Samples)| {
            if in_session {
                round.1.0.clone()
            } else {
                round.0.0.clone()
            }
        };
        let mut p50s: Vec<f64> = rounds
            .iter()
            .map(|r| Samples::new(pick(r)).percentile_ms(0.50))
            .collect();
        let each = p50s
            .iter()
            .map(|p| format!("{p:.3}"))
            .collect::<Vec<_>>()
            .join(" / ");
        p50s.sort_by(f64::total_cmp);
        let pooled = Samples::new(rounds.iter().flat_map(pick).collect());
        println!(
            "   {label:<30} p50 {:>6.3} ms (rounds {each})   p99 {:>6.3} ms   mean {:>6.3} ms",
            p50s[p50s.len() / 2],
            pooled.percentile_ms(0.99),
            pooled.mean_ms()
        );
    }
    println!("   target: p50 ≤ 0.3 ms");
    shutdown.cancel();
    if arg("out-of-the-box") {
        return Ok(());
    }

    idle(&clients_rt)?;
    tenancy(&servers_rt, &clients_rt)
}

/// Section 3: resident memory per idle session, each server in a fresh child
/// process.
fn idle(clients_rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    println!(
        "\n3. {IDLE_SESSIONS} idle sessions, each initialized with its event stream held open \
         (Streamable HTTP {SESSION_VERSION}: GET /mcp; HTTP+SSE 2024-11-05: GET /sse);\n   \
         each server in a fresh child process, RSS from /proc/<pid>/status"
    );
    let needed = IDLE_SESSIONS as u64 + 1_000;
    match nofile_limit() {
        Some(limit) if limit < needed => {
            println!(
                "   skipped: open-files limit {limit} < {needed}; raise it with `ulimit -n {needed}`"
            );
            return Ok(());
        }
        _ => {}
    }
    for (label, server, idle) in [
        ("cordon wasm, Streamable HTTP", "cordon", Idle::Streamable),
        ("cordon wasm, HTTP+SSE", "cordon", Idle::Sse),
        ("native rmcp, Streamable HTTP", "native", Idle::Streamable),
        ("cordon, connection, no session", "cordon", Idle::Connection),
    ] {
        let f = idle_sessions(clients_rt, server, idle)?;
        let per_session = (f.after_kib as f64 - f.before_kib as f64) / f.opened as f64;
        println!(
            "   {label:<31} server RSS {:>6.1} -> {:>6.1} MiB: {per_session:>5.1} KiB per session   \
             (+{} fds; opened in {:.1} s; client side, in this process: {:.1} KiB per session)",
            f.before_kib as f64 / 1024.0,
            f.after_kib as f64 / 1024.0,
            f.fds,
            f.open_time.as_secs_f64(),
            f.client_kib as f64 / f.opened as f64,
        );
    }
    println!("   target: ≤ 64 KiB per session");
    Ok(())
}

/// Authentication off (the sandbox default), no tenants, no audit log.
const NO_TENANCY: &str = "[audit]\nenabled = false\n";

/// Section 4: the same `echo` calls through three servers: no tenancy at
/// all; JWT + RBAC + batched audit; JWT + RBAC + audit with `always`.
fn tenancy(
    servers_rt: &tokio::runtime::Runtime,
    clients_rt: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    const CLIENTS: usize = 16;
    // More rounds than section 1: the costs measured here are small.
    const ROUNDS: usize = 21;
    let secret = tempfile::NamedTempFile::new()?;
    std::fs::write(
        secret.path(),
        "bench-secret-0123456789abcdef0123456789abcdef",
    )?;
    let tenancy = |durability: &str| {
        format!(
            "[auth]\nissuer = \"bench\"\naudience = [\"cordon\"]\n\
             [[auth.jwt_keys]]\nkid = \"bench\"\nalgorithms = [\"HS256\"]\nsecret_file = {:?}\n\
             [roles.caller]\nallow = [\"echo\", \"test_*\"]\ndeny = [\"test_error_*\"]\n\
             [tenants.bench]\n[tenants.other]\n\
             [audit]\npath = \"audit.jsonl\"\ndurability = \"{durability}\"\nbatch_ms = 50\n",
            secret.path()
        )
    };
    let shutdown = CancellationToken::new();
    let config = bench_config();
    // (label, extra config, authenticated). With `breakdown`, two more
    // servers split the cost into its authentication and audit parts.
    let mut setups = vec![
        ("all off", NO_TENANCY.to_owned(), false),
        ("auth+rbac+audit batched", tenancy("batched"), true),
        ("auth+rbac+audit always", tenancy("always"), true),
    ];
    if arg("breakdown") {
        setups.push((
            "auth+rbac, no audit",
            tenancy("batched").replace("[audit]\n", "[audit]\nenabled = false\n"),
            true,
        ));
        setups.push((
            "audit batched, no auth",
            "[audit]\npath = \"audit.jsonl\"\ndurability = \"batched\"\nbatch_ms = 50\n".to_owned(),
            false,
        ));
    }
    if arg("aa") {
        // A/A check: a second "all off", built last.
        setups.push(("all off, again", NO_TENANCY.to_owned(), false));
    }
    let sandboxes: Vec<common::Sandbox> = setups
        .iter()
        .map(|(_, extra, _)| servers_rt.block_on(common::Sandbox::new(&["conformance"], extra)))
        .collect();
    let authenticator = |sandbox: &common::Sandbox| {
        let settings = sandbox.app.dispatcher.settings();
        Arc::new(
            cordon::auth::Authenticator::new(&settings.config.auth, &settings.config.base_dir)
                .expect("bench keys load"),
        )
    };
    let token = authenticator(&sandboxes[1]).issue(
        &cordon::dispatch::Principal {
            tenant: "bench".into(),
            subject: "bench".into(),
            roles: vec!["caller".into()],
        },
        Duration::from_secs(3600),
        None,
    )?;
    let _ = TOKEN.set(token);
    // Each server gets a runtime of its own, its threads named after it
    // (`bench-server-I`): idle ones park, the loaded one works as before,
    // and one `perf record` of the whole section can tell the servers apart.
    let runtimes = (0..setups.len())
        .map(|i| server_runtime(&format!("bench-server-{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut addrs = Vec::new();
    for ((sandbox, (_, _, authenticated)), rt) in sandboxes.iter().zip(&setups).zip(&runtimes) {
        let auth = if *authenticated {
            authenticator(sandbox)
        } else {
            no_auth()
        };
        let router = cordon::server::router(
            sandbox.app.dispatcher.clone(),
            auth,
            &config,
            shutdown.clone(),
        );
        addrs.push(rt.block_on(start(router, shutdown.clone()))?);
    }
    println!(
        "\n4. tenancy: tools/call `echo`, stateless {STATELESS_VERSION}, {CLIENTS} clients, {} s measured per run, median of {ROUNDS} runs",
        MEASURE.as_secs()
    );
    let n = setups.len();
    // `only=I` loads server I alone (the others idle), for a profile of it.
    let only: Option<usize> = std::env::args().find_map(|a| a.strip_prefix("only=")?.parse().ok());
    anyhow::ensure!(only.is_none_or(|i| i < n), "only=I: I must be below {n}");
    let targets: Vec<(SocketAddr, ToolCall)> = addrs.iter().map(|&a| (a, ECHO)).collect();
    let (runs, calls_served) = interleaved(
        clients_rt,
        &targets,
        CLIENTS,
        ROUNDS,
        (WARMUP, MEASURE),
        only,
    )?;
    if let Some(i) = only {
        println!("   {}", runs[i].line(setups[i].0));
        println!("   server CPU per call: {:.1} µs", runs[i].median_cpu());
        println!("   calls served (warm-up estimated at the measured rate): {calls_served:.0}");
        shutdown.cancel();
        return Ok(());
    }
    for ((label, _, _), runs) in setups.iter().zip(&runs) {
        println!("   {}", runs.line(label));
    }
    // Throughput moves with the machine's other tenants from run to run;
    // the CPU the server spends per call hardly does.
    let rate_cost = |v: f64, off: f64| (1.0 - v / off) * 100.0;
    let cpu_cost = |v: f64, off: f64| (v / off - 1.0) * 100.0;
    println!(
        "   server CPU per call: worker threads + audit writer, median of {ROUNDS} runs; \
         cost against \"all off\" (target ≤ 10 % for batched): of the medians | median of the \
         {ROUNDS} per-round costs"
    );
    let base = &runs[0];
    for ((label, _, _), runs) in setups.iter().zip(&runs) {
        println!(
            "   {label:<26} {:>7.1} µs   throughput cost {:>5.1} % | {:>5.1} %   CPU cost {:>5.1} % | {:>5.1} %",
            runs.median_cpu(),
            rate_cost(runs.median_rate(), base.median_rate()),
            paired(&runs.rates, &base.rates, rate_cost),
            cpu_cost(runs.median_cpu(), base.median_cpu()),
            paired(&runs.cpu_per_call, &base.cpu_per_call, cpu_cost),
        );
    }

    shutdown.cancel();
    Ok(())
}
