//! The classic HTTP+SSE transport of MCP revision 2024-11-05, which rmcp
//! lacks, as a thin adapter onto rmcp's server machinery.
//!
//! - `GET /sse` opens a session and its event stream. The first event is
//!   `endpoint`, whose data is the URL to POST to
//!   (`/messages?sessionId=<id>`); every JSON-RPC message from the server then
//!   arrives as a `message` event, with `: keep-alive` comments in between.
//! - `POST /messages?sessionId=<id>` takes one JSON-RPC message (or a batch
//!   of at most [`MAX_BATCH_MESSAGES`](crate::jsonrpc::MAX_BATCH_MESSAGES))
//!   and answers `202 Accepted`; the reply comes on the event stream.
//!
//! Each session runs [`McpHandler`] through `rmcp::ServiceExt::serve` over a
//! pair of bounded channels, so it behaves exactly like a Streamable HTTP
//! session. A session ends when its event stream closes (the client went
//! away: in-flight calls are cancelled through their request tokens), when
//! it is idle for `session_idle_secs` (no POST and nothing sent), or at
//! shutdown.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt as _;
use http::StatusCode;
use rmcp::model::{ClientJsonRpcMessage, GetExtensions as _, ServerJsonRpcMessage};
use rmcp::transport::Transport;
use rmcp::{RoleServer, ServiceExt as _};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::dispatch::{Dispatcher, Principal};
use crate::jsonrpc::{BodyRefused, InvalidMessage, is_json, parse_messages, read_limited};
use crate::mcp::McpHandler;

/// Where a client opens an HTTP+SSE session.
pub const SSE_PATH: &str = "/sse";
/// Where a client POSTs its messages (`?sessionId=<id>`).
pub const MESSAGES_PATH: &str = "/messages";

/// Client messages waiting for the session's service loop (which reads
/// continuously; a full queue holds the POST back).
const INCOMING_CAPACITY: usize = 16;
/// Server messages waiting for the event stream (a slow reader holds the
/// session's sends back rather than growing a buffer).
const OUTGOING_CAPACITY: usize = 32;

/// The HTTP+SSE endpoints and their open sessions. Cheap to clone.
#[derive(Clone)]
pub struct SseTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SseTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseTransport")
            .field("sessions", &self.session_count())
            .finish_non_exhaustive()
    }
}

struct Shared {
    dispatcher: Arc<Dispatcher>,
    /// The principal of requests that carry none (see [`SseTransport::principal_of`]).
    fallback: Arc<Principal>,
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    max_sessions: usize,
    keep_alive: Duration,
    idle: Duration,
    max_body_bytes: usize,
    /// Parent of every session's token: cancelling it ends them all.
    shutdown: CancellationToken,
}

/// One open session, as the POST handler sees it.
struct Session {
    /// Who opened it; only the same principal may post to it.
    principal: Arc<Principal>,
    /// Into the session's service loop.
    incoming: mpsc::Sender<Box<ClientJsonRpcMessage>>,
    /// Ends the session: its service, in-flight calls and event stream.
    ct: CancellationToken,
    born: Instant,
    /// Milliseconds after `born` of the last POST or message sent.
    last_active_ms: AtomicU64,
}

impl Session {
    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    fn last_active(&self) -> Instant {
        self.born + Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed))
    }

    /// Completes once the session has been idle for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.last_active() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl SseTransport {
    /// The transport for `dispatcher`, with the edge limits of `config`.
    /// Cancelling `shutdown` ends every session.
    pub fn new(
        dispatcher: Arc<Dispatcher>,
        config: &ServerConfig,
        shutdown: CancellationToken,
    ) -> Self {
        SseTransport {
            shared: Arc::new(Shared {
                dispatcher,
                fallback: Arc::new(config.local_principal()),
                sessions: Mutex::new(HashMap::new()),
                max_sessions: config.max_sessions,
                keep_alive: Duration::from_secs(config.keep_alive_secs.max(1)),
                idle: Duration::from_secs(config.session_idle_secs.max(1)),
                max_body_bytes: config.max_body_bytes,
                shutdown,
            }),
        }
    }

    /// Open sessions (including ones still shutting down).
    pub fn session_count(&self) -> usize {
        self.sessions().len()
    }

    /// `GET /sse` and `POST /messages`. The server puts them behind
    /// [`crate::edge::check_host_and_origin`], with every other route but
    /// the probes.
    pub fn router(&self) -> Router {
        Router::new()
            .route(SSE_PATH, get(open_session))
            .route(MESSAGES_PATH, post(post_message))
            .with_state(self.clone())
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A live session by id.
    fn session(&self, id: &str) -> Option<Arc<Session>> {
        self.sessions()
            .get(id)
            .filter(|s| !s.ct.is_cancelled())
            .cloned()
    }

    /// The principal a request acts as.
    ///
    /// The authentication gate (`gate.rs`, a middleware in front of these
    /// routes) inserts the caller, an `Arc<Principal>`, into the request
    /// extensions. `GET /sse` stores it with the session (it becomes the
    /// session handler's principal), and `POST /messages` must come from the
    /// same caller or is answered 404, as if the session did not exist.
    /// Without authentication (`auth.mode = "none"`) every request is the
    /// local principal.
    fn principal_of(&self, request: &Request) -> Arc<Principal> {
        crate::gate::caller(request.extensions())
            .cloned()
            .unwrap_or_else(|| self.shared.fallback.clone())
    }
}

/// `GET /sse`: opens a session and streams its messages.
async fn open_session(State(sse): State<SseTransport>, request: Request) -> Response {
    let shared = &sse.shared;
    let principal = sse.principal_of(&request);
    let id: Arc<str> = rmcp::transport::common::server_side_http::session_id();
    let ct = shared.shutdown.child_token();
    let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_CAPACITY);
    let (outgoing_tx, mut outgoing_rx) = mpsc::channel::<String>(OUTGOING_CAPACITY);
    let session = Arc::new(Session {
        principal: principal.clone(),
        incoming: incoming_tx,
        ct: ct.clone(),
        born: Instant::now(),
        last_active_ms: AtomicU64::new(0),
    });
    {
        let mut sessions = sse.sessions();
        if sessions.len() >= shared.max_sessions {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many open sessions; try again later",
            )
                .into_response();
        }
        sessions.insert(id.clone(), session.clone());
    }
    tracing::debug!(session = %id, tenant = %principal.tenant, "SSE session opened");

    let handler = McpHandler::new(shared.dispatcher.clone(), principal)
        .with_transport("sse")
        .with_session(id.clone());
    let transport = SessionTransport {
        incoming: incoming_rx,
        outgoing: outgoing_tx,
        session: session.clone(),
    };
    tokio::spawn(run_session(
        sse.clone(),
        id.clone(),
        session,
        handler,
        transport,
    ));

    let endpoint = Event::default()
        .event("endpoint")
        .data(format!("{MESSAGES_PATH}?sessionId={id}"));
    let messages = futures::stream::poll_fn(move |cx| outgoing_rx.poll_recv(cx))
        .map(|json| Event::default().event("message").data(json));
    // Dropping the stream (the client disconnected) ends the session.
    let on_drop = ct.clone().drop_guard();
    let stream = futures::stream::once(std::future::ready(endpoint))
        .chain(messages)
        .take_until(ct.cancelled_owned())
        .map(move |event| {
            let _ = &on_drop;
            Ok::<_, Infallible>(event)
        });
    let sse_response = Sse::new(stream).keep_alive(
        KeepAlive::new()
            .interval(shared.keep_alive)
            .text("keep-alive"),
    );
    // Ask reverse proxies not to buffer the stream.
    ([("x-accel-buffering", "no")], sse_response).into_response()
}

/// Runs one session's MCP service until it ends, then forgets the session.
async fn run_session(
    sse: SseTransport,
    id: Arc<str>,
    session: Arc<Session>,
    handler: McpHandler,
    transport: SessionTransport,
) {
    struct Forget(SseTransport, Arc<str>);
    impl Drop for Forget {
        fn drop(&mut self) {
            self.0.sessions().remove(&self.1);
        }
    }
    let _forget = Forget(sse.clone(), id.clone());

    let ct = session.ct.clone();
    let serve = async {
        // Waits for `initialize` (or a request with inline metadata), then
        // runs the service loop until `ct` is cancelled. Cancelling it
        // cancels every in-flight request's token, which the handler passes
        // on to the tool call.
        //
        // Boxed: the handshake future is large and short-lived; left inline
        // it would stay allocated with this task for the session's life.
        let initialized = Box::pin(handler.serve_with_ct(transport, ct.clone())).await;
        match initialized {
            Ok(running) => {
                let _ = running.waiting().await;
            }
            Err(e) => {
                tracing::debug!(session = %id, "SSE session ended before initialization: {e}")
            }
        }
    };
    let mut serve = std::pin::pin!(serve);
    tokio::select! {
        _ = &mut serve => {}
        _ = session.idle_for(sse.shared.idle) => {
            tracing::debug!(session = %id, "SSE session idle; closing it");
            ct.cancel();
            serve.await;
        }
    }
    // The service may have stopped on its own: close the event stream too.
    ct.cancel();
    tracing::debug!(session = %id, "SSE session closed");
}

#[derive(serde::Deserialize)]
struct MessagesQuery {
    #[serde(rename = "sessionId")]
    session_id: Option<String>,
}

/// `POST /messages?sessionId=<id>`: hands a message to its session.
async fn post_message(State(sse): State<SseTransport>, request: Request) -> Response {
    match deliver(&sse, request).await {
        Ok(()) => (StatusCode::ACCEPTED, "Accepted").into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn deliver(sse: &SseTransport, request: Request) -> Result<(), Refusal> {
    let session_id = Query::<MessagesQuery>::try_from_uri(request.uri())
        .ok()
        .and_then(|q| q.0.session_id);
    let Some(session_id) = session_id else {
        return Err(Refusal::text(
            StatusCode::BAD_REQUEST,
            "Bad Request: missing sessionId",
        ));
    };
    let Some(session) = sse.session(&session_id) else {
        return Err(Refusal::session_not_found());
    };
    // Only the caller that opened the session may post to it (see
    // `SseTransport::principal_of`).
    let principal = sse.principal_of(&request);
    if !principal.same_caller(&session.principal) {
        tracing::warn!(session = %session_id, "POST to an SSE session by another principal");
        sse.shared
            .dispatcher
            .audit()
            .record_detached(crate::dispatch::foreign_session_event(&principal, "sse"));
        return Err(Refusal::session_not_found());
    }
    if !is_json(request.headers()) {
        return Err(Refusal::text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported Media Type: Content-Type must be application/json",
        ));
    }

    let (parts, body) = request.into_parts();
    let body = read_limited(body, sse.shared.max_body_bytes).await?;
    let messages = parse_messages(&body)?;
    drop(body);

    session.touch();
    for mut message in messages {
        // The handler reads the caller from the HTTP parts, as on /mcp
        // (without authentication it is the session's principal, which the
        // handler was created with).
        match &mut message {
            ClientJsonRpcMessage::Request(r) => {
                r.request.extensions_mut().insert(parts.clone());
            }
            ClientJsonRpcMessage::Notification(n) => {
                n.notification.extensions_mut().insert(parts.clone());
            }
            ClientJsonRpcMessage::Response(_) | ClientJsonRpcMessage::Error(_) => {}
        }
        let sent = tokio::select! {
            sent = session.incoming.send(Box::new(message)) => sent.is_ok(),
            _ = session.ct.cancelled() => false,
        };
        if !sent {
            return Err(Refusal::session_not_found());
        }
    }
    Ok(())
}

/// Why a request is refused: a plain-text body, or a JSON-RPC error body.
#[derive(Debug)]
enum Refusal {
    Text(StatusCode, String),
    JsonRpc(InvalidMessage),
}

impl Refusal {
    fn text(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal::Text(status, message.into())
    }

    fn session_not_found() -> Self {
        Refusal::text(StatusCode::NOT_FOUND, "Not Found: no such session")
    }
}

impl From<InvalidMessage> for Refusal {
    fn from(invalid: InvalidMessage) -> Self {
        Refusal::JsonRpc(invalid)
    }
}

impl From<BodyRefused> for Refusal {
    fn from(BodyRefused(status, message): BodyRefused) -> Self {
        Refusal::Text(status, message)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Text(status, message) => (status, message).into_response(),
            Refusal::JsonRpc(invalid) => invalid.into_response(),
        }
    }
}

/// Bridges a session's rmcp service to the POST handler and the event stream.
struct SessionTransport {
    incoming: mpsc::Receiver<Box<ClientJsonRpcMessage>>,
    /// Serialized messages (small queue slots; the stream only frames them).
    outgoing: mpsc::Sender<String>,
    session: Arc<Session>,
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("the event stream is closed")]
    Closed,
    #[error("cannot encode a message: {0}")]
    Encode(#[from] serde_json::Error),
}

impl Transport<RoleServer> for SessionTransport {
    type Error = SendError;

    fn send(
        &mut self,
        item: ServerJsonRpcMessage,
    ) -> impl Future<Output = Result<(), SendError>> + Send + 'static {
        let outgoing = self.outgoing.clone();
        let session = self.session.clone();
        let json = serde_json::to_string(&item);
        async move {
            outgoing.send(json?).await.map_err(|_| SendError::Closed)?;
            session.touch();
            Ok(())
        }
    }

    async fn receive(&mut self) -> Option<ClientJsonRpcMessage> {
        self.incoming.recv().await.map(|message| *message)
    }

    async fn close(&mut self) -> Result<(), SendError> {
        self.incoming.close();
        Ok(())
    }
}
