//! The HTTP listener: one router for every MCP transport, with the edge
//! limits (body size, session cap, Origin and Host checks) applied before any
//! protocol code runs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt as _;
use rmcp::transport::streamable_http_server::session::local::{LocalSessionManager, SessionConfig};
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::ServerConfig;
use crate::dispatch::Dispatcher;
use crate::gate::{self, Gate, METADATA_PATH};
use crate::mcp::McpHandler;
use crate::sse::{SSE_PATH, SseTransport};

/// The Streamable HTTP endpoint (all revisions, sessions and stateless).
pub const MCP_PATH: &str = "/mcp";

/// Builds the router serving every transport for `dispatcher`, behind the
/// authentication gate of `authenticator`.
pub fn router(
    dispatcher: Arc<Dispatcher>,
    authenticator: Arc<Authenticator>,
    config: &ServerConfig,
    shutdown: CancellationToken,
) -> Router {
    let fallback = Arc::new(config.local_principal());
    let factory = {
        let dispatcher = dispatcher.clone();
        let listens = Arc::new(crate::bounded::Bounded::new(config.max_sessions));
        move || {
            Ok(McpHandler::new(dispatcher.clone(), fallback.clone())
                .with_listen_cap(listens.clone()))
        }
    };
    let (http_config, sessions) = streamable_http_settings(config, &shutdown);
    let streamable = StreamableHttpService::new(factory, sessions.clone(), http_config);
    let sse = SseTransport::new(dispatcher.clone(), config, shutdown.child_token());
    let gate = Gate::new(
        authenticator,
        dispatcher.clone(),
        sessions.clone(),
        config.tls.is_some(),
    );
    let session_cap = SessionCap {
        sessions,
        sse: sse.clone(),
        max: config.max_sessions,
        max_body_bytes: config.max_body_bytes,
    };
    let body_limits = BodyLimits {
        max_bytes: config.max_body_bytes,
        timeout: Duration::from_secs(config.body_timeout_secs),
    };

    let metadata = Router::new()
        .route(METADATA_PATH, get(gate::metadata))
        .route(&format!("{METADATA_PATH}{MCP_PATH}"), get(gate::metadata))
        .with_state(gate.clone());
    let session_counter: crate::admin::SessionCounter = {
        let sessions = session_cap.sessions.clone();
        let sse = sse.clone();
        Arc::new(move || {
            let sessions = sessions.clone();
            let sse = sse.clone();
            Box::pin(async move {
                vec![
                    ("streamable-http", sessions.sessions.read().await.len()),
                    ("sse", sse.session_count()),
                ]
            })
        })
    };
    let authenticates = gate.authenticates();
    // Layers wrap the routes added before them: the body limits run first,
    // then the Host and Origin checks, the gate, the session rules and the
    // transport. Health and metadata need no credential.
    // rmcp answers a body it cannot parse with a plain-text 415; clients
    // expect a JSON-RPC error (see `jsonrpc`).
    let mcp = Router::new().route_service(MCP_PATH, streamable).layer(
        axum::middleware::from_fn_with_state(
            config.max_body_bytes,
            crate::jsonrpc::answer_unparsable,
        ),
    );
    let mut routes = mcp
        .merge(sse.router())
        .merge(crate::admin::router(dispatcher.clone(), session_counter))
        .layer(axum::middleware::from_fn_with_state(
            session_cap,
            guard_sessions,
        ));
    // With `auth.mode = "none"` (loopback only) there is nothing to check.
    if authenticates {
        routes = routes.layer(axum::middleware::from_fn_with_state(gate, gate::check));
    }
    // Host and Origin are checked before the gate, so that the 401
    // challenge and the metadata only ever name a Host that passed, and on
    // every route (admin and metrics too) but the probes: orchestrators
    // probe with the pod's IP as Host, which no allow-list names, and the
    // probes reveal nothing and change nothing.
    routes
        .merge(metadata)
        .layer(axum::middleware::from_fn_with_state(
            crate::edge::AllowedPeers::new(config),
            crate::edge::check_host_and_origin,
        ))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz).with_state(dispatcher))
        .layer(axum::middleware::from_fn_with_state(
            body_limits,
            limit_body,
        ))
}

/// `GET /readyz`: 200 when tools are loaded, the audit log syncs and every
/// PostgreSQL handle answers; 503 otherwise. Unauthenticated, so it names
/// only what is wrong, not the details (those go to the log).
async fn readyz(State(dispatcher): State<Arc<Dispatcher>>) -> Response {
    let problems = dispatcher.readiness_problems().await;
    if problems.is_empty() {
        return (http::StatusCode::OK, "ready").into_response();
    }
    for problem in &problems {
        tracing::warn!("not ready: {problem}");
    }
    (
        http::StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "not ready: {} problem(s); see the server log",
            problems.len()
        ),
    )
        .into_response()
}

/// The Streamable HTTP settings of `/mcp` and its session manager. Public so
/// that a benchmark can serve a native handler over exactly the same transport.
pub fn streamable_http_settings(
    config: &ServerConfig,
    shutdown: &CancellationToken,
) -> (StreamableHttpServerConfig, Arc<LocalSessionManager>) {
    let mut session_config = SessionConfig::default();
    session_config.keep_alive = Some(Duration::from_secs(config.session_idle_secs));
    let mut sessions = LocalSessionManager::default();
    sessions.session_config = session_config;
    let mut http_config = StreamableHttpServerConfig::default()
        .with_sse_keep_alive(Some(Duration::from_secs(config.keep_alive_secs)))
        .with_legacy_session_mode(true)
        .with_json_response(true)
        // A request in a session is answered in JSON too, and as an event
        // stream only once the call sends progress or log messages. rmcp
        // answers session requests only as event streams.
        .with_json_response_in_sessions(true)
        // A call still silent after the keep-alive interval is answered as an
        // event stream, whose keep-alive comments keep proxies from cutting
        // it.
        .with_stream_after_keep_alive(true)
        // A 2025-03-26 session may send JSON-RPC batches, as that revision
        // allows (later ones removed them). These three settings come from
        // Cordon's patch of the vendored rmcp (vendor/README.md).
        .with_max_batch_in_2025_03_26_sessions(crate::jsonrpc::MAX_BATCH_MESSAGES)
        .with_cancellation_token(shutdown.child_token())
        .with_max_request_body_bytes(config.max_body_bytes)
        .with_allowed_hosts(config.allowed_hosts.clone())
        .with_allowed_origins(config.allowed_origins.clone());
    // An empty allow-list means "no browser origin at all", not "any".
    if config.allowed_origins.is_empty() {
        http_config = http_config.enforce_origin_validation();
    }
    (http_config, Arc::new(sessions))
}

/// Refuses to open a session beyond the cap (rmcp's session manager has no
/// cap of its own): a Streamable HTTP session starts with an `initialize`
/// POST that carries no session id, an HTTP+SSE one with `GET /sse`.
#[derive(Clone)]
struct SessionCap {
    sessions: Arc<LocalSessionManager>,
    /// HTTP+SSE sessions count against the same cap.
    sse: SseTransport,
    max: usize,
    /// Bounds the body read to see whether a POST is an `initialize`.
    max_body_bytes: usize,
}

/// The edge's session rules, before rmcp and the HTTP+SSE transport see the
/// request: no new session beyond the cap, and 404 for a `DELETE` of a
/// session that does not exist. Also opens the request's tracing span.
async fn guard_sessions(State(cap): State<SessionCap>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let session = request
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok());
    // Requests that may open a session. Stateless (2026-07-28) requests
    // and `subscriptions/listen` are POSTs without a session id too, so on
    // /mcp only the body tells (see `at_the_cap`). rmcp answers a body that
    // is not JSON 415 before it reads it.
    let may_open_session = match path {
        MCP_PATH => {
            request.method() == http::Method::POST
                && session.is_none()
                && crate::jsonrpc::is_json(request.headers())
        }
        SSE_PATH => request.method() == http::Method::GET,
        _ => false,
    };
    // A session that was never opened, ended or expired: every other request
    // naming it gets 404 from rmcp, but a DELETE gets 202.
    if request.method() == http::Method::DELETE
        && path == MCP_PATH
        && let Some(id) = session
        && !cap.sessions.sessions.read().await.contains_key(id)
    {
        return (http::StatusCode::NOT_FOUND, "Not Found: Session not found").into_response();
    }
    // Below the cap nothing is read; at it, the body decides.
    let request = if may_open_session
        && cap.sessions.sessions.read().await.len() + cap.sse.session_count() >= cap.max
    {
        match at_the_cap(&cap, request).await {
            Ok(request) => request,
            Err(refused) => return refused,
        }
    } else {
        request
    };
    let path = request.uri().path();
    let session = request
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok());
    // One span per request, named here rather than in a layer of its own
    // (every layer costs each open connection a few hundred bytes). The path,
    // never the query (which could hold a credential), and the session.
    use tracing::Instrument as _;
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %path,
        session = session.unwrap_or(""),
    );
    next.run(request).instrument(span).await
}

fn too_many_sessions() -> Response {
    (
        http::StatusCode::SERVICE_UNAVAILABLE,
        "too many open sessions; try again later",
    )
        .into_response()
}

/// At the session cap, a request that may open a session: `Err` with 503 if
/// it would, or with the answer to an unreadable body; `Ok` with the request
/// (its body read into memory) if it would not.
///
/// On `/mcp` only an `initialize` opens a session, and only its body says
/// so (headers could lie). The body is read, bounded by `max_body_bytes` as
/// rmcp bounds it, and only its top-level `method` is looked at (serde
/// decodes escapes, so `"\u0069nitialize"` counts). A body that does not
/// parse so is counted as opening one: nothing a parser disagreeing with
/// rmcp's accepts gets past the cap.
async fn at_the_cap(cap: &SessionCap, request: Request) -> Result<Request, Response> {
    if request.uri().path() != MCP_PATH {
        return Err(too_many_sessions());
    }
    #[derive(serde::Deserialize)]
    struct Method<'a> {
        #[serde(default, borrow)]
        method: std::borrow::Cow<'a, str>,
    }
    let (parts, body) = request.into_parts();
    let body = crate::jsonrpc::read_limited(body, cap.max_body_bytes)
        .await
        .map_err(IntoResponse::into_response)?;
    match serde_json::from_slice::<Method<'_>>(&body) {
        Ok(Method { method }) if method != "initialize" => {
            Ok(Request::from_parts(parts, axum::body::Body::from(body)))
        }
        _ => Err(too_many_sessions()),
    }
}

/// The body limits of every route: see [`limit_body`].
#[derive(Clone, Copy)]
struct BodyLimits {
    max_bytes: usize,
    timeout: Duration,
}

/// Refuses a declared `Content-Length` above `max_body_bytes` with 413
/// before reading anything, and gives the client `body_timeout_secs` from
/// the end of its headers to send the whole body (a deadline, not an idle
/// timeout: a trickle does not extend it). `header_timeout_secs` covers only
/// the head, so without this a client could hold a connection, and a file
/// descriptor, forever by sending a body slowly or never.
///
/// Past the deadline the body read fails (handlers answer that with 400 or
/// 500); the answer is then replaced with 408 and `Connection: close`. A
/// response is the clean way out in hyper: a service cannot close its
/// connection, but hyper closes it after answering a request whose body was
/// not read to the end, so the client learns why and the socket is freed.
async fn limit_body(State(limits): State<BodyLimits>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limits.max_bytes as u64) {
        return (
            http::StatusCode::PAYLOAD_TOO_LARGE,
            [(http::header::CONNECTION, "close")],
            format!(
                "Payload Too Large: request body exceeds {} bytes",
                limits.max_bytes
            ),
        )
            .into_response();
    }
    // Most requests (every GET) have no body: nothing to time.
    use axum::body::HttpBody as _;
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let Some(deadline) = tokio::time::Instant::now().checked_add(limits.timeout) else {
        return next.run(request).await;
    };
    let expired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let request = request.map(|body| {
        axum::body::Body::new(BodyDeadline {
            body,
            deadline,
            sleep: None,
            expired: expired.clone(),
        })
    });
    let response = next.run(request).await;
    if !expired.load(std::sync::atomic::Ordering::Relaxed) {
        return response;
    }
    tracing::debug!("request body not received within the body timeout");
    (
        http::StatusCode::REQUEST_TIMEOUT,
        [(http::header::CONNECTION, "close")],
        format!(
            "Request Timeout: the body did not arrive within {} s",
            limits.timeout.as_secs()
        ),
    )
        .into_response()
}

/// A request body that fails once its deadline has passed.
struct BodyDeadline {
    body: axum::body::Body,
    deadline: tokio::time::Instant,
    /// Armed the first time the body has nothing to give (a body that
    /// arrives with its headers never needs a timer).
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Set when the deadline failed the read, for [`limit_body`].
    expired: Arc<std::sync::atomic::AtomicBool>,
}

/// The error of a body read past its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;

impl axum::body::HttpBody for BodyDeadline {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = self.get_mut();
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.expired
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves `router` on `config.listen` until `shutdown` is cancelled.
pub async fn serve(
    router: Router,
    config: &ServerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (server.listen)", config.listen))?;
    let header_timeout = Duration::from_secs(config.header_timeout_secs);
    serve_on(listener, router, header_timeout, shutdown).await
}

/// TLS handshakes in progress at once; more connections wait in the backlog.
const MAX_HANDSHAKES: usize = 256;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` over TLS on an already bound listener until `shutdown`
/// is cancelled (`header_timeout`: see [`ServerConfig::header_timeout_secs`]).
///
/// Written by hand on tokio-rustls rather than with axum-server: that crate
/// compiles hyper's HTTP/2 into the connection type, which costs every idle
/// event-stream connection ~20 KiB more (measured by the idle-session test).
/// Handshakes run in their own tasks, so a slow client cannot hold up the
/// accept loop.
pub async fn serve_tls_on(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Arc<rustls::ServerConfig>,
    header_timeout: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let local = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (ready_tx, ready_rx) = tokio::sync::mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => return,
                permit = handshakes.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let ready = ready_tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = ready.send((stream, peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    let listener = TlsListener {
        ready: ready_rx,
        local,
    };
    serve_connections(listener, router, header_timeout, shutdown).await;
    Ok(())
}

/// Connections whose TLS handshake has completed, as an axum listener.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop ended (shutdown): accept nothing more while
            // the server drains.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves `router` on an already bound listener (tests bind port 0);
/// `header_timeout`: see [`ServerConfig::header_timeout_secs`].
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    router: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Without TCP_NODELAY, replies written in several small pieces wait for
    // the client's delayed ACK: ~40 ms per call on loopback.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
    });
    serve_connections(listener, router, header_timeout, shutdown).await;
    Ok(())
}

/// Serves HTTP/1.1 connections from `listener` with `router` until
/// `shutdown` is cancelled, then lets each connection finish the request it
/// is serving and waits for all of them.
///
/// A client gets `header_timeout` to send each request's head (request line
/// and headers). Without it, a client that sends its headers a byte at a
/// time, or never, holds a connection and its memory for as long as it likes.
///
/// Written on hyper directly, as `axum::serve` does, because `axum::serve`
/// (0.8) gives hyper no timer, which turns hyper's header read timeout off.
async fn serve_connections<L>(
    mut listener: L,
    router: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) where
    L: axum::serve::Listener,
{
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        // `accept` retries and backs off on errors by itself.
        let (io, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::trace!("connection ended with an error: {e}");
            }
        });
    }
    connections.close();
    connections.wait().await;
}
