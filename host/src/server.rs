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

use crate::config::ServerConfig;
use crate::dispatch::{Dispatcher, Principal};
use crate::mcp::McpHandler;
use crate::sse::{SSE_PATH, SseTransport};

/// The Streamable HTTP endpoint (all revisions, sessions and stateless).
pub const MCP_PATH: &str = "/mcp";

/// Builds the router serving every transport for `dispatcher`.
pub fn router(
    dispatcher: Arc<Dispatcher>,
    config: &ServerConfig,
    shutdown: CancellationToken,
) -> Router {
    let fallback = Principal::local(&config.local_tenant);
    let factory = {
        let dispatcher = dispatcher.clone();
        move || Ok(McpHandler::new(dispatcher.clone(), fallback.clone()))
    };
    let (http_config, sessions) = streamable_http_settings(config, &shutdown);
    let streamable = StreamableHttpService::new(factory, sessions.clone(), http_config);
    let sse = SseTransport::new(dispatcher, config, shutdown.child_token());
    let session_cap = SessionCap {
        sessions,
        sse: sse.clone(),
        max: config.max_sessions,
    };

    Router::new()
        .route_service(MCP_PATH, streamable)
        .merge(sse.router())
        .layer(axum::middleware::from_fn_with_state(
            session_cap,
            limit_sessions,
        ))
        .route("/healthz", get(|| async { "ok" }))
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
/// cap of its own): new sessions start with a POST that carries no session id.
#[derive(Clone)]
struct SessionCap {
    sessions: Arc<LocalSessionManager>,
    /// HTTP+SSE sessions count against the same cap.
    sse: SseTransport,
    max: usize,
}

async fn limit_sessions(State(cap): State<SessionCap>, request: Request, next: Next) -> Response {
    let opens_session = match request.uri().path() {
        MCP_PATH => {
            request.method() == http::Method::POST
                && !request.headers().contains_key("mcp-session-id")
        }
        SSE_PATH => request.method() == http::Method::GET,
        _ => false,
    };
    if opens_session
        && cap.sessions.sessions.read().await.len() + cap.sse.session_count() >= cap.max
    {
        return (
            http::StatusCode::SERVICE_UNAVAILABLE,
            "too many open sessions; try again later",
        )
            .into_response();
    }
    next.run(request).await
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
    serve_on(listener, router, shutdown).await
}

/// Serves `router` on an already bound listener (tests bind port 0).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Without TCP_NODELAY, replies written in several small pieces wait for
    // the client's delayed ACK: ~40 ms per call on loopback.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("the HTTP server failed")
}
