//! The HTTP transports end to end: the real router on a loopback port, real
//! guests, a real HTTP client. Covers the classic HTTP+SSE transport
//! (`GET /sse` + `POST /messages`, revision 2024-11-05), the edge checks
//! shared with Streamable HTTP (`/mcp`), and the session lifecycle of both.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::pin::Pin;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use common::http::{Http, Reply, WAIT, initialize_body, mcp_post, stateless, stateless_body};
use common::{Sandbox, guest, shared_cache_dir};
use cordon::app::App;
use cordon::config::Config;
use futures::{Stream, StreamExt as _};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------
// Harness

/// A running server on 127.0.0.1, with its own tools directory.
struct TestServer {
    http: Http,
    shutdown: CancellationToken,
    dir: tempfile::TempDir,
    _app: App,
}

impl std::ops::Deref for TestServer {
    type Target = Http;
    fn deref(&self) -> &Http {
        &self.http
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts a server serving copies of `guests`; `extra` is appended to the
/// config (e.g. a `[server]` table).
async fn start(guests: &[&str], extra: &str, watch: bool) -> TestServer {
    start_wrapped(guests, extra, watch, |router| router).await
}

/// [`start`], with `wrap` applied to the router (e.g. a stand-in for the
/// authentication layer).
async fn start_wrapped(
    guests: &[&str],
    extra: &str,
    watch: bool,
    wrap: impl FnOnce(axum::Router) -> axum::Router,
) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    for g in guests {
        std::fs::copy(guest(g), tools.join(format!("{g}.wasm"))).unwrap();
    }
    let mut text = Sandbox::config_text(&shared_cache_dir(), extra);
    if watch {
        text = text.replace("watch = false", "watch = true");
    }
    let config = Config::parse(&text, "test", dir.path().to_owned()).unwrap();
    let server_config = config.server.clone();
    let server_auth = config.auth.clone();
    let app = App::open(config, watch).await.unwrap();
    let problems = app.dispatcher.registry().snapshot().problems().to_vec();
    assert!(problems.is_empty(), "load problems: {problems:?}");

    let shutdown = CancellationToken::new();
    let authenticator =
        std::sync::Arc::new(cordon::auth::Authenticator::new(&server_auth, dir.path()).unwrap());
    let router = wrap(cordon::server::router(
        app.dispatcher.clone(),
        authenticator,
        &server_config,
        shutdown.clone(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(cordon::server::serve_on(
        listener,
        router,
        Duration::from_secs(server_config.header_timeout_secs),
        shutdown.clone(),
    ));
    TestServer {
        http: Http::new(format!("http://{addr}")),
        shutdown,
        dir,
        _app: app,
    }
}

impl Http {
    /// Opens `GET /sse` with extra `headers`; returns the status and, on
    /// success, the event stream.
    async fn get_sse(&self, headers: &[(&str, &str)]) -> (StatusCode, Option<EventStream>) {
        self.get_stream("/sse", headers).await
    }

    /// Opens `GET path` as an event stream with extra `headers`.
    async fn get_stream(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Option<EventStream>) {
        let mut request = self
            .request(Method::GET, path)
            .header("accept", "text/event-stream");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = tokio::time::timeout(
            WAIT,
            self.client.request(request.body(String::new()).unwrap()),
        )
        .await
        .expect("the server did not answer in time")
        .unwrap();
        let status = response.status();
        if status != StatusCode::OK {
            return (status, None);
        }
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        let body = Body::new(response.into_body()).into_data_stream();
        (
            status,
            Some(EventStream {
                body: Box::pin(body),
                buf: Vec::new(),
            }),
        )
    }

    /// Opens a 2026-07-28 `subscriptions/listen` stream for tool-list
    /// changes: the event stream, or the JSON-RPC error of a JSON reply.
    async fn listen(&self) -> Result<EventStream, Value> {
        let request = stateless(self, "subscriptions/listen", None)
            .body(stateless_body(
                1,
                "subscriptions/listen",
                json!({"notifications": {"toolsListChanged": true}}),
            ))
            .unwrap();
        let response = tokio::time::timeout(WAIT, self.client.request(request))
            .await
            .expect("the server did not answer in time")
            .unwrap();
        let is_stream = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream");
        let stream = EventStream {
            body: Box::pin(Body::new(response.into_body()).into_data_stream()),
            buf: Vec::new(),
        };
        if !is_stream {
            let body = axum::body::to_bytes(Body::from_stream(stream.body), usize::MAX)
                .await
                .unwrap();
            return Err(serde_json::from_slice(&body).unwrap());
        }
        Ok(stream)
    }

    /// Opens an SSE session (not yet initialized).
    async fn open_sse(&self) -> SseSession<'_> {
        let (status, stream) = self.get_sse(&[]).await;
        assert_eq!(status, StatusCode::OK);
        let mut stream = stream.unwrap();
        let first = stream.next_event().await.expect("the stream ended");
        assert_eq!(first.event, "endpoint", "{first:?}");
        let id = first
            .data
            .strip_prefix("/messages?sessionId=")
            .unwrap_or_else(|| panic!("endpoint: {}", first.data))
            .to_owned();
        assert_eq!(id.len(), 36, "a UUID: {id}");
        SseSession {
            server: self,
            stream,
            endpoint: first.data,
            next_id: 1,
        }
    }

    /// Opens an SSE session and initializes it.
    async fn sse_session(&self) -> SseSession<'_> {
        let mut session = self.open_sse().await;
        session.initialize().await;
        session
    }

    /// Opens a Streamable HTTP session, initializes it (the `initialize`
    /// reply is JSON) and opens its `GET /mcp` event stream.
    async fn streamable_session(&self) -> StreamableSession<'_> {
        const VERSION: &str = "2025-11-25";
        let reply = self.send(mcp_post(self), initialize_body(VERSION)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.headers["content-type"], "application/json");
        let initialized: Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(initialized["result"]["protocolVersion"], VERSION);
        let id = reply.headers["mcp-session-id"].to_str().unwrap().to_owned();
        let session = StreamableSession {
            server: self,
            id,
            events: None,
        };
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let reply = session.post(initialized).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
        let (status, stream) = self
            .get_stream(
                "/mcp",
                &[
                    ("mcp-session-id", &session.id),
                    ("mcp-protocol-version", VERSION),
                ],
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        StreamableSession {
            events: stream,
            ..session
        }
    }
}

/// An initialized Streamable HTTP session and its open notification stream.
struct StreamableSession<'a> {
    server: &'a Http,
    id: String,
    /// The session's notification stream, held open (the server keeps it
    /// while it is).
    events: Option<EventStream>,
}

impl StreamableSession<'_> {
    async fn post(&self, message: Value) -> Reply {
        let request = mcp_post(self.server)
            .header("mcp-session-id", &self.id)
            .header("mcp-protocol-version", "2025-11-25");
        self.server.send(request, message.to_string()).await
    }

    /// A request's result, answered in JSON (panics on a JSON-RPC error).
    async fn result(&self, method: &str, params: Value) -> Value {
        let reply = self
            .post(json!({"jsonrpc": "2.0", "id": 2, "method": method, "params": params}))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply
            .json()
            .get("result")
            .unwrap_or_else(|| panic!("{method} failed: {}", reply.body))
            .clone()
    }
}

#[derive(Debug)]
enum SseItem {
    Comment(String),
    Event(SseEvent),
}

#[derive(Debug)]
struct SseEvent {
    event: String,
    data: String,
}

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, axum::Error>> + Send>>;

/// A `text/event-stream` body, parsed.
struct EventStream {
    body: ByteStream,
    buf: Vec<u8>,
}

impl EventStream {
    /// The next event or comment; `None` when the stream ends. Panics after
    /// [`WAIT`].
    async fn next_item(&mut self) -> Option<SseItem> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let block = String::from_utf8(block).unwrap();
                let mut event = String::from("message");
                let mut data = Vec::new();
                let mut comment = None;
                for (field, value) in sse_block_fields(&block) {
                    match field.as_str() {
                        "" => comment = Some(value.trim().to_owned()),
                        "event" => event = value,
                        "data" => data.push(value),
                        _ => {}
                    }
                }
                if data.is_empty() {
                    if let Some(c) = comment {
                        return Some(SseItem::Comment(c));
                    }
                    continue;
                }
                return Some(SseItem::Event(SseEvent {
                    event,
                    data: data.join("\n"),
                }));
            }
            let chunk = tokio::time::timeout(WAIT, self.body.next())
                .await
                .expect("no event in time");
            match chunk {
                Some(Ok(bytes)) => self.buf.extend_from_slice(&bytes),
                Some(Err(e)) => panic!("the event stream failed: {e}"),
                None => return None,
            }
        }
    }

    /// The next event, skipping comments.
    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            match self.next_item().await? {
                SseItem::Comment(_) => continue,
                SseItem::Event(e) => return Some(e),
            }
        }
    }
}

/// An open HTTP+SSE session.
struct SseSession<'a> {
    server: &'a Http,
    stream: EventStream,
    /// `/messages?sessionId=…`
    endpoint: String,
    next_id: u64,
}

impl SseSession<'_> {
    async fn post(&self, body: impl Into<String>) -> Reply {
        self.server.post_json(&self.endpoint, body).await
    }

    /// POSTs a message that must be accepted.
    async fn send(&self, message: Value) {
        let reply = self.post(message.to_string()).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    }

    /// The next `message` event, parsed.
    async fn next_message(&mut self) -> Value {
        let event = self.stream.next_event().await.expect("the stream ended");
        assert_eq!(event.event, "message", "{event:?}");
        serde_json::from_str(&event.data).unwrap()
    }

    /// Sends a request; returns the notifications that came before its
    /// response, and the response.
    async fn call(&mut self, method: &str, params: Value) -> (Vec<Value>, Value) {
        let id = self.next_id;
        self.next_id += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        let mut notifications = Vec::new();
        loop {
            let message = self.next_message().await;
            if message.get("id") == Some(&json!(id)) {
                return (notifications, message);
            }
            notifications.push(message);
        }
    }

    /// A request's result (panics on a JSON-RPC error).
    async fn result(&mut self, method: &str, params: Value) -> Value {
        let (_, response) = self.call(method, params).await;
        response
            .get("result")
            .unwrap_or_else(|| panic!("{method} failed: {response}"))
            .clone()
    }

    async fn initialize(&mut self) -> Value {
        let result = self
            .result(
                "initialize",
                json!({
                    "protocolVersion": "2024-11-05",
                    "capabilities": {},
                    "clientInfo": {"name": "transports-test", "version": "0"}
                }),
            )
            .await;
        self.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        result
    }

    /// Waits until the server forgets this session (POSTs get 404).
    async fn wait_until_gone(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let reply = self
                .post(json!({"jsonrpc": "2.0", "id": 999, "method": "ping"}).to_string())
                .await;
            if reply.status == StatusCode::NOT_FOUND {
                return;
            }
            assert!(Instant::now() < deadline, "the session is still open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP+SSE

#[tokio::test]
async fn sse_serves_initialize_tools_list_and_tools_call() {
    let server = start(&["text", "conformance"], "", false).await;
    let mut session = server.open_sse().await;

    let init = session.initialize().await;
    assert_eq!(init["protocolVersion"], "2024-11-05");
    assert_eq!(init["serverInfo"]["name"], "cordon");
    assert!(init["capabilities"]["tools"].is_object(), "{init}");

    let tools = session.result("tools/list", json!({})).await;
    let names: Vec<&str> = tools["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"text_stats"), "{names:?}");
    assert!(names.contains(&"test_tool_with_progress"), "{names:?}");

    let call = session
        .result(
            "tools/call",
            json!({"name": "text_stats", "arguments": {"text": "hello wide world\nbye"}}),
        )
        .await;
    assert_eq!(call["isError"], json!(false), "{call}");
    assert_eq!(call["structuredContent"]["words"], 4, "{call}");
    assert_eq!(call["structuredContent"]["lines"], 2, "{call}");

    // A batch: each reply arrives as its own event.
    session
        .send(json!([
            {"jsonrpc": "2.0", "id": "a", "method": "ping"},
            {"jsonrpc": "2.0", "id": "b", "method": "ping"}
        ]))
        .await;
    let mut ids = vec![
        session.next_message().await["id"].clone(),
        session.next_message().await["id"].clone(),
    ];
    ids.sort_by_key(|id| id.to_string());
    assert_eq!(ids, vec![json!("a"), json!("b")]);

    // A batch is bounded.
    let many: Vec<Value> = (0..65)
        .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "ping"}))
        .collect();
    let reply = session.post(Value::Array(many).to_string()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], -32600, "{}", reply.body);
    session.result("ping", json!({})).await;
}

#[tokio::test]
async fn sse_delivers_progress_and_log_notifications_before_the_response() {
    let server = start(&["conformance"], "", false).await;
    let mut session = server.sse_session().await;

    let (notifications, response) = session
        .call(
            "tools/call",
            json!({"name": "test_tool_with_progress", "arguments": {}, "_meta": {"progressToken": "p-1"}}),
        )
        .await;
    assert_eq!(
        response["result"]["content"][0]["text"],
        "Tool with progress executed successfully"
    );
    let progress: Vec<&Value> = notifications
        .iter()
        .filter(|n| n["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), 3, "{notifications:?}");
    for (n, expected) in progress.iter().zip([0.0, 50.0, 100.0]) {
        assert_eq!(n["params"]["progressToken"], "p-1");
        assert_eq!(n["params"]["progress"].as_f64(), Some(expected));
        assert_eq!(n["params"]["total"].as_f64(), Some(100.0));
    }

    session
        .result("logging/setLevel", json!({"level": "info"}))
        .await;
    let (notifications, _) = session
        .call(
            "tools/call",
            json!({"name": "test_tool_with_logging", "arguments": {}}),
        )
        .await;
    let logs: Vec<&Value> = notifications
        .iter()
        .filter(|n| n["method"] == "notifications/message")
        .collect();
    assert_eq!(logs.len(), 3, "{notifications:?}");
    assert_eq!(logs[0]["params"]["data"], "Tool execution started");
}

#[tokio::test]
async fn sse_post_errors_leave_the_session_working() {
    let server = start(&["conformance"], "[server]\nmax_body_bytes = 4096\n", false).await;
    let mut session = server.sse_session().await;
    let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}).to_string();

    let reply = server.post_json("/messages", ping.clone()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "missing sessionId");
    let reply = server
        .post_json(
            "/messages?sessionId=00000000-0000-4000-8000-000000000000",
            ping.clone(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "unknown session");

    let reply = session
        .post("{\"jsonrpc\": \"2.0\", \"id\": 5, \"meth")
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"]["code"], -32700, "{}", reply.body);
    assert_eq!(reply.json()["jsonrpc"], "2.0");

    let reply = session.post(r#"{"jsonrpc": "2.0", "id": 6}"#).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"]["code"], -32600, "{}", reply.body);
    assert_eq!(reply.json()["id"], 6);

    let reply = server
        .send(
            server
                .request(Method::POST, &session.endpoint)
                .header("content-type", "text/plain"),
            ping.clone(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let big =
        json!({"jsonrpc": "2.0", "id": 7, "method": "ping", "params": {"pad": "x".repeat(5000)}});
    let reply = session.post(big.to_string()).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);

    // Still alive.
    let (_, pong) = session.call("ping", json!({})).await;
    assert_eq!(pong["result"], json!({}), "{pong}");
    let tools = session.result("tools/list", json!({})).await;
    assert!(!tools["tools"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn list_changed_reaches_an_open_sse_session() {
    let server = start(&["conformance"], "", true).await;
    let mut session = server.sse_session().await;
    // A round trip, so the `initialized` notification has been handled.
    session.result("tools/list", json!({})).await;

    std::fs::copy(guest("text"), server.dir.path().join("tools/text.wasm")).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no list_changed notification");
        let message = session.next_message().await;
        if message["method"] == "notifications/tools/list_changed" {
            break;
        }
    }
    let tools = session.result("tools/list", json!({})).await;
    assert!(
        tools["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "text_stats"),
        "{tools}"
    );
}

/// The next JSON-RPC message on a `subscriptions/listen` stream, after
/// its acknowledgement (rmcp sends that before `listen` runs; priming
/// events have no data). Panics after [`WAIT`] (keep-alive comments do not
/// extend it).
async fn first_message(stream: &mut EventStream) -> Value {
    let next = async {
        loop {
            let event = stream.next_event().await.expect("the stream ended");
            if event.data.is_empty() {
                continue;
            }
            let message: Value = serde_json::from_str(&event.data).unwrap();
            if message["method"] != "notifications/subscriptions/acknowledged" {
                return message;
            }
        }
    };
    tokio::time::timeout(WAIT, next)
        .await
        .expect("no message on the subscription stream")
}

#[tokio::test]
async fn subscription_streams_get_list_changed_and_are_capped() {
    // Keep-alives every second, so a closed stream is noticed soon.
    let server = start(
        &["conformance"],
        "[server]\nmax_sessions = 2\nkeep_alive_secs = 1\n",
        true,
    )
    .await;
    let mut first = server.listen().await.expect("the first stream opens");
    let second = server.listen().await.expect("the second stream opens");
    // Refused before it is acknowledged: the error is the whole reply.
    let Err(refused) = server.listen().await else {
        panic!("the third stream was opened (or acknowledged before its refusal)");
    };
    assert_eq!(refused["error"]["code"], -32029, "{refused}");

    // An open stream hears of a new tool.
    std::fs::copy(guest("text"), server.dir.path().join("tools/text.wasm")).unwrap();
    let changed = first_message(&mut first).await;
    assert_eq!(
        changed["method"], "notifications/tools/list_changed",
        "{changed}"
    );

    // A stream the client closed frees its place.
    drop(second);
    let deadline = Instant::now() + WAIT;
    loop {
        match server.listen().await {
            Ok(_) => break,
            Err(error) => {
                assert_eq!(error["error"]["code"], -32029, "{error}");
                assert!(Instant::now() < deadline, "the place was never freed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test]
async fn idle_sse_sessions_get_keep_alives_then_expire() {
    let server = start(
        &["conformance"],
        "[server]\nkeep_alive_secs = 1\nsession_idle_secs = 3\n",
        false,
    )
    .await;
    let mut session = server.sse_session().await;
    let mut keep_alives = 0;
    // The stream ends when the session expires.
    while let Some(item) = session.stream.next_item().await {
        match item {
            SseItem::Comment(c) => {
                assert_eq!(c, "keep-alive");
                keep_alives += 1;
            }
            SseItem::Event(e) => panic!("unexpected event {e:?}"),
        }
    }
    assert!(keep_alives >= 1, "no keep-alive comment");
    let reply = session
        .post(json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}).to_string())
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_session_cap_covers_both_transports_and_disconnects_free_slots() {
    let server = start(
        &["conformance"],
        "[server]\nmax_sessions = 1\n[limits]\ntimeout_ms = 60000\n",
        false,
    )
    .await;
    let mut session = server.sse_session().await;

    let (status, _) = server.get_sse(&[]).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "second SSE session"
    );
    let reply = server
        .send(mcp_post(&server), initialize_body("2025-06-18"))
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a /mcp session"
    );

    // Start a long call, then disconnect in the middle of it.
    session
        .send(json!({
            "jsonrpc": "2.0", "id": 42, "method": "tools/call",
            "params": {"name": "sleep_ms", "arguments": {"ms": 60000}, "_meta": {"progressToken": 1}}
        }))
        .await;
    let first = session.next_message().await;
    assert_eq!(first["method"], "notifications/progress", "{first}");
    let endpoint = session.endpoint.clone();
    drop(session);
    let disconnected = Instant::now();

    // The slot frees as soon as the session has wound down. rmcp waits up to
    // 2 s for handlers that ignore cancellation, so freeing well within that
    // shows the in-flight call was cancelled.
    let mut stream = loop {
        let (status, stream) = server.get_sse(&[]).await;
        if status == StatusCode::OK {
            break stream.unwrap();
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(disconnected.elapsed() < WAIT, "the slot never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let freed = disconnected.elapsed();
    eprintln!("the slot freed {freed:?} after the disconnect");
    assert!(freed < Duration::from_millis(1500), "freed after {freed:?}");
    assert_eq!(stream.next_event().await.unwrap().event, "endpoint");
    let reply = server
        .post_json(
            &endpoint,
            json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}).to_string(),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::NOT_FOUND,
        "the old session is gone"
    );
}

#[tokio::test]
async fn a_session_ends_when_its_stream_is_dropped() {
    let server = start(&["conformance"], "", false).await;
    let mut session = server.sse_session().await;
    session.result("tools/list", json!({})).await;
    let endpoint = session.endpoint.clone();
    let stream = std::mem::replace(
        &mut session.stream,
        EventStream {
            body: Box::pin(futures::stream::empty()),
            buf: Vec::new(),
        },
    );
    drop(stream);
    session.wait_until_gone().await;
    let reply = server
        .post_json(
            &endpoint,
            json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}).to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn server_shutdown_ends_open_sse_streams() {
    let server = start(&["conformance"], "", false).await;
    let mut session = server.sse_session().await;
    server.shutdown.cancel();
    while let Some(item) = session.stream.next_item().await {
        assert!(matches!(item, SseItem::Comment(_)), "{item:?}");
    }
}

/// Stands in for the authentication layer: the tenant named by an
/// `x-test-tenant` header becomes the request's principal.
async fn test_principal(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(tenant) = request.headers().get("x-test-tenant") {
        let tenant = tenant.to_str().unwrap().to_owned();
        cordon::gate::attach_caller(
            request.extensions_mut(),
            std::sync::Arc::new(cordon::dispatch::Principal::local(&tenant)),
        );
    }
    next.run(request).await
}

#[tokio::test]
async fn only_the_principal_that_opened_an_sse_session_may_post_to_it() {
    let server = start_wrapped(&["conformance"], "", false, |router| {
        router.layer(axum::middleware::from_fn(test_principal))
    })
    .await;
    let (status, stream) = server.get_sse(&[("x-test-tenant", "alice")]).await;
    assert_eq!(status, StatusCode::OK);
    let mut stream = stream.unwrap();
    let endpoint = stream.next_event().await.unwrap().data;
    let post_as = |tenant: Option<&'static str>| {
        let mut request = server
            .request(Method::POST, &endpoint)
            .header("content-type", "application/json");
        if let Some(tenant) = tenant {
            request = request.header("x-test-tenant", tenant);
        }
        server.send(request, initialize_body("2024-11-05"))
    };
    assert_eq!(post_as(Some("mallory")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(post_as(None).await.status, StatusCode::NOT_FOUND);
    assert_eq!(post_as(Some("alice")).await.status, StatusCode::ACCEPTED);
    let reply = stream.next_event().await.unwrap();
    let reply: Value = serde_json::from_str(&reply.data).unwrap();
    assert_eq!(reply["result"]["serverInfo"]["name"], "cordon", "{reply}");
}

// ---------------------------------------------------------------------------
// Edge checks, both transports

#[tokio::test]
async fn foreign_origins_and_hosts_are_refused() {
    let server = start(
        &["conformance"],
        "[server]\nallowed_origins = [\"http://localhost:*\"]\n",
        false,
    )
    .await;

    let (status, _) = server.get_sse(&[("origin", "http://evil.example")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "foreign Origin on /sse");
    let reply = server
        .send(
            mcp_post(&server).header("origin", "http://evil.example"),
            initialize_body("2025-06-18"),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::FORBIDDEN,
        "foreign Origin on /mcp"
    );

    let (status, _) = server.get_sse(&[("host", "evil.example")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "foreign Host on /sse");
    let reply = server
        .send(
            mcp_post(&server).header("host", "evil.example:8750"),
            initialize_body("2025-06-18"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "foreign Host on /mcp");

    // An allowed origin and a loopback name pass.
    let (status, stream) = server
        .get_sse(&[
            ("origin", "http://localhost:3000"),
            ("host", "localhost:1234"),
        ])
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut stream = stream.unwrap();
    let endpoint = stream.next_event().await.unwrap().data;
    let reply = server
        .send(
            server
                .request(Method::POST, &endpoint)
                .header("content-type", "application/json")
                .header("origin", "http://evil.example"),
            initialize_body("2024-11-05"),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::FORBIDDEN,
        "foreign Origin on /messages"
    );
}

#[tokio::test]
async fn without_allowed_origins_no_browser_origin_passes() {
    let server = start(&["conformance"], "", false).await;
    let (status, _) = server.get_sse(&[("origin", "http://localhost:3000")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let reply = server
        .send(
            mcp_post(&server).header("origin", "http://localhost:3000"),
            initialize_body("2025-06-18"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    // Non-browser clients (no Origin) pass.
    let (status, _) = server.get_sse(&[]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn oversized_bodies_get_413_on_both_transports() {
    let server = start(&["conformance"], "[server]\nmax_body_bytes = 4096\n", false).await;
    let big = json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": "x".repeat(8000)}}
    })
    .to_string();
    let reply = server.send(mcp_post(&server), big.clone()).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "/mcp");
    let session = server.sse_session().await;
    let reply = session.post(big).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "/messages");
}

/// Sends `head` (a request head, then any body bytes in `trickle`, one every
/// 300 ms) on a fresh connection; returns everything the server sent until
/// it closed, and how long that took.
async fn raw_exchange(server: &TestServer, head: &str, trickle: &[u8]) -> (String, Duration) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = server.base.strip_prefix("http://").unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let started = Instant::now();
    writer.write_all(head.as_bytes()).await.unwrap();
    let trickle = trickle.to_vec();
    let writing = tokio::spawn(async move {
        for byte in trickle {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
        }
        // Keep the connection open: the client never finishes.
        std::future::pending::<()>().await;
    });
    let mut reply = Vec::new();
    let read = tokio::time::timeout(WAIT, reader.read_to_end(&mut reply)).await;
    writing.abort();
    let elapsed = started.elapsed();
    // A reset after the reply is fine: the server is done with the client.
    assert!(read.is_ok(), "still open after {WAIT:?}");
    (String::from_utf8_lossy(&reply).into_owned(), elapsed)
}

#[tokio::test]
async fn a_body_that_is_late_or_too_large_is_refused() {
    let server = start(
        &["conformance"],
        "[server]\nbody_timeout_secs = 1\nmax_body_bytes = 4096\n",
        false,
    )
    .await;
    let session = server.sse_session().await;
    let head = |path: &str, length: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Accept: application/json, text/event-stream\r\nContent-Length: {length}\r\n\r\n"
        )
    };

    // Headers, then no body at all, on both transports.
    for path in ["/mcp", session.endpoint.as_str()] {
        let (reply, elapsed) = raw_exchange(&server, &head(path, "100"), b"").await;
        assert!(reply.starts_with("HTTP/1.1 408"), "{path}: {reply}");
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(10),
            "{path}: answered after {elapsed:?}"
        );
    }
    // A byte every 300 ms does not extend the deadline.
    let (reply, elapsed) = raw_exchange(&server, &head("/mcp", "100"), &[b' '; 100]).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "trickle: {reply}");
    assert!(elapsed < Duration::from_secs(10), "trickle: {elapsed:?}");

    // A declared length beyond the limit is refused before any body: a
    // server that waited for it would answer 408 at the body deadline, so
    // the status itself shows it did not wait (the time bound only keeps a
    // hang from passing; a stalled test machine must not fail it).
    let (reply, elapsed) = raw_exchange(&server, &head("/mcp", "99999999999"), b"").await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(elapsed < Duration::from_secs(10), "413 after {elapsed:?}");

    // A body that arrives in time still works.
    let ping = json!({"jsonrpc": "2.0", "id": 9, "method": "ping"}).to_string();
    let reply = server.post_json(&session.endpoint, ping).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
}

#[tokio::test]
async fn stateless_requests_pass_the_session_cap_and_only_initialize_is_held() {
    let server = start(&["conformance"], "[server]\nmax_sessions = 2\n", false).await;
    for _ in 0..2 {
        let reply = server
            .send(mcp_post(&server), initialize_body("2025-06-18"))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }

    // At the cap, stateless requests are still served.
    let reply = server
        .send(
            stateless(&server, "tools/list", None),
            stateless_body(1, "tools/list", json!({})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let call = stateless_body(
        2,
        "tools/call",
        json!({"name": "echo", "arguments": {"message": "hi"}}),
    );
    let reply = server
        .send(stateless(&server, "tools/call", Some("echo")), call)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.json()["result"]["content"][0]["text"], "hi");

    // A new session is not, whatever its headers claim or however its
    // method is spelled.
    let reply = server
        .send(mcp_post(&server), initialize_body("2025-06-18"))
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "initialize");
    let escaped = initialize_body("2025-06-18").replace("\"initialize\"", "\"\\u0069nitialize\"");
    assert!(escaped.contains("u0069"));
    let reply = server
        .send(
            mcp_post(&server).header("mcp-method", "tools/list"),
            escaped,
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "escaped initialize with a fake Mcp-Method: {}",
        reply.body
    );
    let (status, _) = server.get_sse(&[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "an SSE session");
}

#[tokio::test]
async fn a_client_slow_to_send_its_headers_is_disconnected_but_open_streams_stay() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let server = start(
        &["text"],
        "[server]\nheader_timeout_secs = 1\nkeep_alive_secs = 1\n",
        false,
    )
    .await;
    let addr = server.base.strip_prefix("http://").unwrap().to_owned();
    let mut session = server.open_sse().await;
    session.initialize().await;

    // A request head that never ends, and a connection that never sends one.
    let mut partial = tokio::net::TcpStream::connect(&addr).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    for (what, stream) in [("partial head", &mut partial), ("silent", &mut silent)] {
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("{what}: still open after {WAIT:?}"))
            .unwrap();
        let text = String::from_utf8_lossy(&rest);
        assert!(!text.contains("200 OK"), "{what}: {text}");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the timeout: {:?}",
        started.elapsed()
    );

    // The SSE stream, idle for longer than the header timeout, still works.
    let tools = session.result("tools/list", json!({})).await;
    assert!(!tools["tools"].as_array().unwrap().is_empty());
}

// ---------------------------------------------------------------------------
// Streamable HTTP sessions

#[tokio::test]
async fn streamable_http_sessions_open_fail_and_close() {
    let server = start(&["conformance"], "", false).await;

    let reply = server
        .send(mcp_post(&server), initialize_body("2025-06-18"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let session_id = reply.headers["mcp-session-id"].to_str().unwrap().to_owned();
    assert_eq!(reply.json()["result"]["protocolVersion"], "2025-06-18");

    let with_session = |id: &str| {
        mcp_post(&server)
            .header("mcp-session-id", id)
            .header("mcp-protocol-version", "2025-06-18")
    };
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string();
    let reply = server.send(with_session(&session_id), initialized).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);

    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).to_string();
    let reply = server.send(with_session(&session_id), list.clone()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(reply.json()["result"]["tools"].is_array(), "{}", reply.body);

    let reply = server
        .send(
            with_session("00000000-0000-4000-8000-000000000000"),
            list.clone(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "unknown session");

    let reply = server
        .send(
            mcp_post(&server)
                .header("mcp-session-id", &session_id)
                .header("mcp-protocol-version", "1999-01-01"),
            list.clone(),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "unsupported MCP-Protocol-Version"
    );

    let delete = || {
        server
            .request(Method::DELETE, "/mcp")
            .header("mcp-session-id", &session_id)
    };
    let reply = server.send(delete(), "").await;
    assert!(reply.status.is_success(), "DELETE: {}", reply.status);
    let reply = server.send(with_session(&session_id), list).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "after DELETE");
    let reply = server.send(delete(), "").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "DELETE again");
}

/// The fields of one event-stream block, in order, as (name, value). A
/// comment line (`: text`) is a field with an empty name.
fn sse_block_fields(block: &str) -> Vec<(String, String)> {
    block
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            (
                field.to_owned(),
                value.strip_prefix(' ').unwrap_or(value).to_owned(),
            )
        })
        .collect()
}

/// The events of a whole `text/event-stream` body, each as its fields in
/// order (comments left out).
fn sse_fields(body: &str) -> Vec<Vec<(String, String)>> {
    body.split("\n\n")
        .map(|block| {
            let mut fields = sse_block_fields(block);
            fields.retain(|(field, _)| !field.is_empty());
            fields
        })
        .filter(|fields| !fields.is_empty())
        .collect()
}

/// `reply` is an event stream (`what` names it in a failure).
fn assert_event_stream(reply: &Reply, what: &str) {
    let content_type = reply.headers["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{what}: {content_type}: {}",
        reply.body
    );
}

/// A priming event (SEP-1699): an event id to resume from, the reconnection
/// delay, and no data.
fn assert_priming(fields: &[(String, String)]) {
    assert!(
        fields.iter().any(|(f, v)| f == "id" && !v.is_empty()),
        "{fields:?}"
    );
    assert!(
        fields
            .iter()
            .any(|(f, v)| f == "retry" && v.parse::<u64>().is_ok()),
        "{fields:?}"
    );
    assert!(
        fields.iter().all(|(f, v)| f != "data" || v.is_empty()),
        "{fields:?}"
    );
}

#[tokio::test]
async fn session_requests_are_answered_in_json_unless_the_call_streams() {
    let server = start(&["conformance"], "", false).await;
    // `streamable_session` checks that the `initialize` reply is JSON.
    let mut session = server.streamable_session().await;

    // The session's own event stream starts with a priming event as well.
    let events = session.events.as_mut().expect("the GET stream");
    let chunk = tokio::time::timeout(WAIT, events.body.next())
        .await
        .expect("no priming event in time")
        .expect("the stream ended")
        .unwrap();
    assert_priming(&sse_fields(std::str::from_utf8(&chunk).unwrap())[0]);

    let plain = [
        ("ping", json!({})),
        ("tools/list", json!({})),
        (
            "tools/call",
            json!({"name": "echo", "arguments": {"message": "hi"}}),
        ),
        ("resources/list", json!({})),
    ];
    for (method, params) in plain {
        let reply = session
            .post(json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{method}: {}", reply.body);
        assert_eq!(
            reply.headers["content-type"], "application/json",
            "{method}: {}",
            reply.body
        );
        // The whole body is one JSON-RPC message, not an event.
        let message: Value = serde_json::from_str(&reply.body)
            .unwrap_or_else(|e| panic!("{method}: {e}: {}", reply.body));
        assert_eq!(message["jsonrpc"], "2.0", "{method}: {message}");
        assert_eq!(message["id"], 7, "{method}: {message}");
        match method {
            "tools/call" => assert_eq!(message["result"]["content"][0]["text"], "hi"),
            "resources/list" => assert_eq!(message["error"]["code"], -32601, "{message}"),
            _ => assert!(message["result"].is_object(), "{method}: {message}"),
        }
    }

    // A call that reports progress: an event stream, priming event first,
    // then the progress, then the result.
    let reply = session
        .post(json!({
            "jsonrpc": "2.0", "id": 8, "method": "tools/call",
            "params": {"name": "test_tool_with_progress", "arguments": {}, "_meta": {"progressToken": "p-8"}}
        }))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_event_stream(&reply, "progress");
    let events = sse_fields(&reply.body);
    assert_priming(&events[0]);
    let messages: Vec<Value> = events[1..]
        .iter()
        .filter_map(|fields| fields.iter().find(|(f, _)| f == "data"))
        .map(|(_, data)| serde_json::from_str(data).unwrap())
        .collect();
    let (result, progress) = messages.split_last().expect("no messages");
    assert_eq!(progress.len(), 3, "{messages:?}");
    for (n, expected) in progress.iter().zip([0.0, 50.0, 100.0]) {
        assert_eq!(n["method"], "notifications/progress", "{n}");
        assert_eq!(n["params"]["progressToken"], "p-8");
        assert_eq!(n["params"]["progress"].as_f64(), Some(expected));
    }
    assert_eq!(result["id"], 8, "{result}");
    assert_eq!(
        result["result"]["content"][0]["text"],
        "Tool with progress executed successfully"
    );

    // A call that logs, once the client asked for logs: an event stream too.
    session
        .result("logging/setLevel", json!({"level": "info"}))
        .await;
    let reply = session
        .post(json!({
            "jsonrpc": "2.0", "id": 9, "method": "tools/call",
            "params": {"name": "test_tool_with_logging", "arguments": {}}
        }))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let messages: Vec<Value> = sse_fields(&reply.body)
        .iter()
        .filter_map(|fields| fields.iter().find(|(f, v)| f == "data" && !v.is_empty()))
        .map(|(_, data)| serde_json::from_str(data).unwrap())
        .collect();
    let (result, logs) = messages.split_last().expect("no messages");
    assert_eq!(logs.len(), 3, "{messages:?}");
    assert!(
        logs.iter().all(|l| l["method"] == "notifications/message"),
        "{logs:?}"
    );
    assert_eq!(logs[0]["params"]["data"], "Tool execution started");
    assert_eq!(result["id"], 9, "{result}");
}

#[tokio::test]
async fn a_long_call_is_answered_as_a_stream_with_keep_alives() {
    let server = start(&["conformance"], "[server]\nkeep_alive_secs = 1\n", false).await;
    let session = server.streamable_session().await;
    // No progress token, no log level: only its length makes this call a
    // stream, so that proxies see bytes while it runs.
    let call = json!({"name": "sleep_ms", "arguments": {"ms": 2500}});
    let in_session = session
        .post(json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": call}))
        .await;
    let stateless = server
        .send(
            stateless(&server, "tools/call", Some("sleep_ms")),
            stateless_body(5, "tools/call", call),
        )
        .await;
    for (mode, reply) in [("session", &in_session), ("stateless", &stateless)] {
        assert_eq!(reply.status, StatusCode::OK, "{mode}: {}", reply.body);
        assert_event_stream(reply, mode);
        assert!(
            reply.body.lines().any(|line| line.starts_with(':')),
            "{mode}: no keep-alive comment: {}",
            reply.body
        );
        assert_eq!(reply.json()["id"], 5, "{mode}: {}", reply.body);
        assert!(reply.json()["result"].is_object(), "{mode}: {}", reply.body);
    }
    // A session's reply stream starts with a priming event, as every one does.
    assert_priming(&sse_fields(&in_session.body)[0]);
}

// ---------------------------------------------------------------------------
// Memory per idle session

/// Counts the bytes allocated minus freed on the current thread, so a
/// current-thread test can measure what its server and client hold.
struct CountingAlloc;

thread_local! {
    static NET_BYTES: Cell<isize> = const { Cell::new(0) };
}

fn add_net(delta: isize) {
    let _ = NET_BYTES.try_with(|n| n.set(n.get() + delta));
}

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add_net(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add_net(layout.size() as isize);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        add_net(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add_net(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn net_bytes() -> isize {
    NET_BYTES.with(Cell::get)
}

/// The transports whose idle sessions are measured.
#[derive(Clone, Copy, Debug)]
enum Transport {
    Sse,
    Streamable,
}

/// An open session of either transport.
#[allow(dead_code, reason = "held only to keep the session open")]
enum IdleSession<'a> {
    Sse(SseSession<'a>),
    Streamable(StreamableSession<'a>),
}

impl Http {
    /// Opens an initialized session with its event stream, and makes one
    /// round trip (`method`) on it.
    async fn idle_session(&self, transport: Transport, method: &str) -> IdleSession<'_> {
        match transport {
            Transport::Sse => {
                let mut session = self.sse_session().await;
                session.result(method, json!({})).await;
                IdleSession::Sse(session)
            }
            Transport::Streamable => {
                let session = self.streamable_session().await;
                session.result(method, json!({})).await;
                IdleSession::Streamable(session)
            }
        }
    }
}

/// Target: one idle, initialized session with its event stream open costs
/// the server at most 64 KiB of heap. The server runs on this test's thread,
/// the client on another, so the count is the server's alone.
async fn assert_an_idle_session_fits_in_64_kib(transport: Transport) {
    const SESSIONS: usize = 100;
    let server = start(&["conformance"], "[audit]\nenabled = false\n", false).await;

    let (phase_tx, mut phase_rx) = tokio::sync::mpsc::unbounded_channel::<&str>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let base = server.base.clone();
    let client = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let http = Http::new(base);
            // Warm up lazily allocated state on both sides.
            let warm = http.idle_session(transport, "tools/list").await;
            phase_tx.send("warm").unwrap();
            go_rx.await.unwrap();
            let mut sessions = Vec::new();
            for _ in 0..SESSIONS {
                sessions.push(http.idle_session(transport, "ping").await);
            }
            phase_tx.send("open").unwrap();
            let _ = done_rx.await;
            drop(sessions);
            drop(warm);
        });
    });

    assert_eq!(phase_rx.recv().await, Some("warm"));
    let before = net_bytes();
    go_tx.send(()).unwrap();
    assert_eq!(phase_rx.recv().await, Some("open"));
    // Let the server's remaining work for these sessions run.
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    let per_session = (net_bytes() - before) / SESSIONS as isize;
    eprintln!("an idle {transport:?} session costs the server {per_session} bytes");
    done_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || client.join().unwrap())
        .await
        .unwrap();
    assert!(
        per_session <= 64 * 1024,
        "{per_session} bytes per idle {transport:?} session"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_idle_sse_session_costs_the_server_less_than_64_kib() {
    assert_an_idle_session_fits_in_64_kib(Transport::Sse).await;
}

#[tokio::test(flavor = "current_thread")]
async fn an_idle_streamable_http_session_costs_the_server_less_than_64_kib() {
    assert_an_idle_session_fits_in_64_kib(Transport::Streamable).await;
}

// ---------------------------------------------------------------------------
// Protocol behaviour common to every transport

#[tokio::test]
async fn every_supported_revision_is_negotiated_as_asked() {
    let server = start(&["conformance"], "", false).await;
    for version in ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"] {
        let reply = server
            .send(mcp_post(&server), initialize_body(version))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{version}: {}", reply.body);
        assert_eq!(
            reply.json()["result"]["protocolVersion"],
            version,
            "{}",
            reply.body
        );
    }
    // An unknown revision gets the server's own (newest session) revision.
    let reply = server
        .send(mcp_post(&server), initialize_body("2024-01-01"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let offered = reply.json()["result"]["protocolVersion"].clone();
    assert!(
        offered.as_str().is_some_and(|v| v >= "2025-11-25"),
        "{offered}"
    );
}

#[tokio::test]
async fn notifications_cancelled_stops_the_guest_and_frees_its_slot() {
    // One instance slot: while the cancelled call held it, no other call
    // could run, so the next call succeeding proves the slot was freed.
    let server = start(
        &["conformance"],
        "[runtime.engine]\nmax_instances = 1\n[tools.conformance.limits]\ntimeout_ms = 60000\n",
        false,
    )
    .await;
    let mut session = server.open_sse().await;
    session.initialize().await;
    session
        .send(json!({
            "jsonrpc": "2.0", "id": 41, "method": "tools/call",
            "params": {"name": "sleep_ms", "arguments": {"ms": 60000}}
        }))
        .await;
    // Let the call start running in its instance.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cancelled_at = Instant::now();
    session
        .send(json!({
            "jsonrpc": "2.0", "method": "notifications/cancelled",
            "params": {"requestId": 41, "reason": "test"}
        }))
        .await;
    // The slot is free again within the target: poll with a quick call.
    loop {
        let (_, response) = session
            .call(
                "tools/call",
                json!({"name": "echo", "arguments": {"message": "next"}}),
            )
            .await;
        let result = &response["result"];
        if result["isError"] == json!(false) {
            break;
        }
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(2),
            "the slot was not freed: {response}"
        );
    }
    let latency = cancelled_at.elapsed();
    assert!(
        latency < Duration::from_millis(100),
        "cancellation took {latency:?}"
    );
}

#[tokio::test]
async fn bad_requests_get_json_rpc_errors_and_the_session_survives() {
    let server = start(&["text"], "", false).await;
    let mut session = server.open_sse().await;
    session.initialize().await;
    let (_, unknown) = session.call("no/such/method", json!({})).await;
    assert_eq!(unknown["error"]["code"], -32601, "{unknown}");
    let (_, bad_params) = session.call("tools/call", json!({"name": 42})).await;
    assert_eq!(bad_params["error"]["code"], -32602, "{bad_params}");
    let (_, bad_args) = session
        .call(
            "tools/call",
            json!({"name": "text_stats", "arguments": {"text": 5}}),
        )
        .await;
    assert_eq!(bad_args["error"]["code"], -32602, "{bad_args}");
    for bogus in ["", "not a tool name", "../etc"] {
        let (_, cursor) = session.call("tools/list", json!({"cursor": bogus})).await;
        assert_eq!(cursor["error"]["code"], -32602, "{bogus:?}: {cursor}");
    }
    let tools = session.result("tools/list", json!({})).await;
    assert!(!tools["tools"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn streamable_http_bodies_that_are_not_messages_get_json_rpc_errors() {
    let server = start(&["text"], "", false).await;
    let session = server.streamable_session().await;
    let in_session = || {
        mcp_post(&server)
            .header("mcp-session-id", &session.id)
            .header("mcp-protocol-version", "2025-11-25")
    };
    let stateless_discover = || stateless(&server, "server/discover", None);
    let cases: [(&str, i64, Value); 6] = [
        (r#"{"jsonrpc": "2.0", "id": 5, "meth"#, -32700, Value::Null),
        (r#"{"jsonrpc": "2.0", "id": 6}"#, -32600, json!(6)),
        // Which of the two methods? JSON leaves it open; rmcp refuses it.
        (
            r#"{"jsonrpc": "2.0", "id": 7, "method": "ping", "method": "tools/list"}"#,
            -32600,
            json!(7),
        ),
        (
            r#"{"jsonrpc": "1.0", "id": "a", "method": "ping"}"#,
            -32600,
            json!("a"),
        ),
        ("[]", -32600, Value::Null),
        (
            r#"[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]"#,
            -32600,
            Value::Null,
        ),
    ];
    for (body, code, id) in cases {
        for (mode, request) in [
            ("session", in_session()),
            ("stateless", stateless_discover()),
        ] {
            let reply = server.send(request, body.to_owned()).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{mode} {body}");
            assert_eq!(
                reply.headers["content-type"], "application/json",
                "{mode} {body}"
            );
            let error = reply.json();
            assert_eq!(error["jsonrpc"], "2.0", "{mode} {body}: {error}");
            assert_eq!(error["error"]["code"], code, "{mode} {body}: {error}");
            assert_eq!(error["id"], id, "{mode} {body}: {error}");
        }
    }
    // A body that is not JSON by its content type is still refused as such.
    let plain = server
        .request(Method::POST, "/mcp")
        .header("content-type", "text/plain")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &session.id)
        .header("mcp-protocol-version", "2025-11-25");
    let reply = server.send(plain, "{}".to_owned()).await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // The session and the stateless endpoint still work.
    let tools = session.result("tools/list", json!({})).await;
    assert!(!tools["tools"].as_array().unwrap().is_empty());
    let reply = server
        .send(
            stateless_discover(),
            stateless_body(9, "server/discover", json!({})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
}

/// A 2025-03-26 session may send JSON-RPC batches, as that revision allows:
/// requests, notifications and responses mixed, with or without the
/// protocol version header. The replies share one event stream, which ends
/// after the last of them; progress of a call in the batch rides on it too.
/// Later revisions and stateless requests are refused (see above).
#[tokio::test]
async fn a_2025_03_26_session_takes_json_rpc_batches() {
    let server = start(&["text", "conformance"], "", false).await;
    let reply = server
        .send(mcp_post(&server), initialize_body("2025-03-26"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.json()["result"]["protocolVersion"], "2025-03-26");
    let id = reply.headers["mcp-session-id"].to_str().unwrap().to_owned();
    // 2025-03-26 clients send no MCP-Protocol-Version header.
    let post = |version: Option<&str>, body: Value| {
        let mut request = mcp_post(&server).header("mcp-session-id", &id);
        if let Some(version) = version {
            request = request.header("mcp-protocol-version", version);
        }
        server.send(request, body.to_string())
    };
    let messages_of = |reply: &Reply| -> Vec<Value> {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_event_stream(reply, "a batch's replies");
        sse_fields(&reply.body)
            .iter()
            .filter_map(|fields| fields.iter().find(|(f, v)| f == "data" && !v.is_empty()))
            .map(|(_, data)| serde_json::from_str(data).unwrap())
            .collect()
    };

    // Notifications alone: accepted, nothing to answer.
    let reply = post(
        None,
        json!([{"jsonrpc": "2.0", "method": "notifications/initialized"}]),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);

    let reply = post(
        None,
        json!([
            {"jsonrpc": "2.0", "id": "list", "method": "tools/list"},
            {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"},
            {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
             "params": {"name": "text_stats", "arguments": {"text": "two words"}}},
            {"jsonrpc": "2.0", "id": "progress", "method": "tools/call",
             "params": {"name": "test_tool_with_progress", "arguments": {},
                        "_meta": {"progressToken": "p"}}},
            {"jsonrpc": "2.0", "id": "nope", "method": "no/such/method"}
        ]),
    )
    .await;
    let messages = messages_of(&reply);
    let reply_to = |id: Value| {
        let replies: Vec<&Value> = messages.iter().filter(|m| m["id"] == id).collect();
        assert_eq!(replies.len(), 1, "{id}: {messages:?}");
        replies[0].clone()
    };
    let tools = reply_to(json!("list"));
    assert!(
        tools["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "text_stats"),
        "{tools}"
    );
    let stats = reply_to(json!(7));
    assert_eq!(stats["result"]["structuredContent"]["words"], 2, "{stats}");
    let progress_call = reply_to(json!("progress"));
    assert_eq!(
        progress_call["result"]["content"][0]["text"],
        "Tool with progress executed successfully"
    );
    assert_eq!(reply_to(json!("nope"))["error"]["code"], -32601);
    let progress = messages
        .iter()
        .filter(|m| m["method"] == "notifications/progress" && m["params"]["progressToken"] == "p")
        .count();
    assert_eq!(progress, 3, "{messages:?}");
    assert_eq!(messages.len(), 4 + 3, "{messages:?}");

    // The version header may name 2025-03-26 too.
    let reply = post(
        Some("2025-03-26"),
        json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 2, "method": "ping"}]),
    )
    .await;
    let mut ids: Vec<String> = messages_of(&reply)
        .iter()
        .map(|m| m["id"].to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["1", "2"]);

    // Batches are refused where the request speaks a later revision, and a
    // batch with a broken message is refused whole, naming that message.
    for (version, body, id) in [
        (
            Some("2025-06-18"),
            json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"}]),
            Value::Null,
        ),
        (
            None,
            json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 2}]),
            json!(2),
        ),
    ] {
        let reply = post(version, body.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.body
        );
        let error = reply.json();
        assert_eq!(error["error"]["code"], -32600, "{body}: {error}");
        assert_eq!(error["id"], id, "{body}: {error}");
    }

    // A batch is bounded.
    let many: Vec<Value> = (0..65)
        .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "ping"}))
        .collect();
    let reply = post(None, Value::Array(many)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    let error = reply.json();
    assert_eq!(error["error"]["code"], -32600, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 64"),
        "{error}"
    );

    // An unknown session is still 404, batch or not.
    let reply = server
        .send(
            mcp_post(&server).header("mcp-session-id", "no-such-session"),
            json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"}]).to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);

    // The session goes on with single messages.
    let reply = post(None, json!({"jsonrpc": "2.0", "id": 3, "method": "ping"})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.json()["id"], 3);
}

// ---------------------------------------------------------------------------
// Stateless 2026-07-28

#[tokio::test]
async fn stateless_requests_need_no_session_and_headers_must_match() {
    let server = start(&["text", "conformance"], "", false).await;

    let reply = server
        .send(
            stateless(&server, "server/discover", None),
            stateless_body(1, "server/discover", json!({})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let discovered = reply.json()["result"].clone();
    assert!(
        discovered["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("2026-07-28"))
    );
    assert_eq!(discovered["capabilities"]["tools"]["listChanged"], true);

    let reply = server
        .send(
            stateless(&server, "tools/list", None),
            stateless_body(2, "tools/list", json!({})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let listed = reply.json()["result"].clone();
    assert_eq!(listed["resultType"], "complete");
    assert_eq!(listed["cacheScope"], "private");
    assert!(listed["ttlMs"].as_u64().is_some());
    let names: Vec<&str> = listed["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "deterministic order");

    let call = stateless_body(
        3,
        "tools/call",
        json!({"name": "echo", "arguments": {"message": "hi"}}),
    );
    let reply = server
        .send(stateless(&server, "tools/call", Some("echo")), call.clone())
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.headers["content-type"], "application/json");
    let result = reply.json()["result"].clone();
    assert_eq!(result["resultType"], "complete");
    assert_eq!(result["content"][0]["text"], "hi");
    assert!(
        !reply.headers.contains_key("mcp-session-id"),
        "no session in stateless mode"
    );

    let reply = server
        .send(stateless(&server, "tools/call", Some("other")), call)
        .await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "Mcp-Name must match: {}",
        reply.body
    );
}

// ---------------------------------------------------------------------------
// Streamable HTTP session races (fixed in the vendored rmcp, vendor/README.md)

/// A request that races the `DELETE` of its session is answered as one to a
/// live session (200, 202) or to a terminated one (404), never with 500.
#[tokio::test]
async fn a_request_racing_the_delete_of_its_session_never_gets_500() {
    let server = start(&["conformance"], "", false).await;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for _ in 0..40 {
        let session = server.streamable_session().await;
        let (server, session) = (&*server, &session);
        let requests = (0..24u32).map(|i| async move {
            // Spread the requests around the DELETE (number 12).
            tokio::time::sleep(Duration::from_micros(200 * u64::from(i % 8))).await;
            let (what, reply) = if i == 12 {
                let delete = server
                    .request(Method::DELETE, "/mcp")
                    .header("mcp-session-id", &session.id)
                    .header("mcp-protocol-version", "2025-11-25");
                ("DELETE", server.send(delete, "").await)
            } else {
                let (what, message) = match i % 4 {
                    0 => ("ping", json!({"jsonrpc": "2.0", "id": i, "method": "ping"})),
                    1 => (
                        "tools/list",
                        json!({"jsonrpc": "2.0", "id": i, "method": "tools/list"}),
                    ),
                    2 => (
                        "slow tools/call",
                        json!({
                            "jsonrpc": "2.0", "id": i, "method": "tools/call",
                            "params": {"name": "sleep_ms", "arguments": {"ms": 50}}
                        }),
                    ),
                    _ => (
                        "notification",
                        json!({"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}),
                    ),
                };
                (what, session.post(message).await)
            };
            assert!(
                [StatusCode::OK, StatusCode::ACCEPTED, StatusCode::NOT_FOUND]
                    .contains(&reply.status),
                "{what} racing the DELETE: {} {}",
                reply.status,
                reply.body
            );
            reply.status.as_u16()
        });
        for status in futures::future::join_all(requests).await {
            *statuses.entry(status).or_default() += 1;
        }
    }
    // The requests did race the DELETE: some came after it.
    assert!(statuses.get(&404).is_some_and(|&n| n > 0), "{statuses:?}");
}

/// A request whose id is that of a request still in progress in the same
/// session is refused at once with -32600 and not run; the request in
/// progress gets its own reply. Once it has completed, its id may be used
/// again.
#[tokio::test]
async fn a_request_id_in_use_in_the_session_is_refused_at_once() {
    // keep_alive_secs is 15 s by default: the refusal must come well before.
    let server = start(&["conformance"], "", false).await;
    let session = server.streamable_session().await;
    let call = |ms: u64| {
        json!({
            "jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "sleep_ms", "arguments": {"ms": ms}}
        })
    };
    // The first call runs long enough that the second surely overlaps it,
    // even on a machine that stalls for a second or two.
    let running = Duration::from_secs(4);
    let limit = Duration::from_secs(10);
    let first = async {
        tokio::time::timeout(limit, session.post(call(running.as_millis() as u64)))
            .await
            .expect("the first call got no reply")
    };
    let second = async {
        // Let the first call start.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = Instant::now();
        let reply = tokio::time::timeout(limit, session.post(call(0)))
            .await
            .expect("the second call got no reply");
        (reply, sent.elapsed())
    };
    let (first, (second, took)) = tokio::join!(first, second);

    assert_eq!(second.status, StatusCode::OK, "{}", second.body);
    let refused = second.json();
    assert_eq!(refused["id"], 7, "{refused}");
    assert_eq!(refused["error"]["code"], -32600, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("already in use"), "{refused}");
    // Refused while the first was still running, not answered after it.
    assert!(took < running / 2, "refused after {took:?}");

    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let answered = first.json();
    assert_eq!(answered["id"], 7, "{answered}");
    assert_eq!(answered["result"]["isError"], false, "{answered}");

    // The first call has completed: its id is free again.
    let reply = tokio::time::timeout(limit, session.post(call(0)))
        .await
        .expect("the reused id got no reply");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let again = reply.json();
    assert_eq!(again["id"], 7, "{again}");
    assert_eq!(again["result"]["isError"], false, "{again}");
}
