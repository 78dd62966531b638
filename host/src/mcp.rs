//! The MCP protocol handler: one per session (or per stateless request),
//! shared by every transport. It turns MCP requests into dispatcher calls and
//! guest events into MCP notifications; policy lives in the dispatcher.

// MCP logging is deprecated for future revisions (SEP-2577) but part of every
// revision Cordon serves today, and the conformance suite checks it.
#![allow(deprecated)]

use std::sync::{Arc, Mutex};

use rmcp::handler::server::SubscriptionPermit;
use rmcp::model::{
    CacheScope, CallToolRequestParams, CallToolResponse, CustomRequest, CustomResult,
    GetExtensions as _, Implementation, ListToolsResult, LoggingLevel,
    LoggingMessageNotificationParam, Notification, PaginatedRequestParams,
    ProgressNotificationParam, ServerCapabilities, ServerConfig, ServerNotification,
    SetLevelRequestParams, SubscriptionFilter,
};
use rmcp::service::{
    NotificationContext, OriginatingRequestId, RequestContext, SubscriptionContext,
};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bounded::Bounded;
use crate::dispatch::{CallOrigin, CallRequest, Dispatcher, Principal};
use crate::runtime::{CallEvent, CallFailure, EventSink, LogLevel};

/// JSON-RPC error code of a call refused by the tenant's quotas (an
/// implementation-defined server error; HTTP transports also answer 429).
pub const QUOTA_EXCEEDED: rmcp::model::ErrorCode = rmcp::model::ErrorCode(-32029);

/// Tools per `tools/list` page.
const PAGE_SIZE: usize = 100;
/// How long a client may cache `tools/list` (2026-07-28 `ttlMs`); changes
/// are also pushed as `notifications/tools/list_changed`.
const LIST_TTL_MS: u64 = 10_000;

/// Serves MCP for one session.
#[derive(Clone)]
pub struct McpHandler {
    dispatcher: Arc<Dispatcher>,
    /// Used when the transport attached no authenticated principal (local
    /// use: stdio, or a loopback listener with authentication off).
    fallback: Arc<Principal>,
    /// The transport, for audit records.
    transport: &'static str,
    /// The session id, when the transport knows it up front (HTTP+SSE).
    session: Option<Arc<str>>,
    /// The level set by `logging/setLevel` for this session.
    log_level: Arc<Mutex<Option<LogLevel>>>,
    /// Bounds open `subscriptions/listen` streams (none: unbounded, e.g.
    /// stdio). Each holds a connection and a task for as long as its client
    /// keeps it open, as a session does, but it is a stateless request: the
    /// session cap does not see it.
    listen_cap: Option<Arc<Bounded>>,
    /// Cancelled when the last clone of this handler is dropped, i.e. when
    /// the session ends: it stops the session's background tasks.
    session_end: CancellationToken,
    _session_guard: Arc<tokio_util::sync::DropGuard>,
}

impl McpHandler {
    /// A handler calling through `dispatcher`, as `fallback` unless the
    /// transport attached an `Arc<Principal>` to the request.
    pub fn new(dispatcher: Arc<Dispatcher>, fallback: impl Into<Arc<Principal>>) -> Self {
        let fallback = fallback.into();
        let session_end = CancellationToken::new();
        McpHandler {
            dispatcher,
            fallback,
            transport: "streamable-http",
            session: None,
            log_level: Arc::new(Mutex::new(None)),
            listen_cap: None,
            _session_guard: Arc::new(session_end.clone().drop_guard()),
            session_end,
        }
    }

    /// Names the transport in audit records (default `streamable-http`).
    pub fn with_transport(mut self, transport: &'static str) -> Self {
        self.transport = transport;
        self
    }

    /// Bounds the `subscriptions/listen` streams open at once, counted in
    /// `cap` across every handler given it.
    pub fn with_listen_cap(mut self, cap: Arc<Bounded>) -> Self {
        self.listen_cap = Some(cap);
        self
    }

    /// The session id of every request of this handler (HTTP+SSE, where the
    /// id is not in the request's headers).
    pub fn with_session(mut self, session: Arc<str>) -> Self {
        self.session = Some(session);
        self
    }

    fn origin(&self, extensions: &rmcp::model::Extensions) -> CallOrigin {
        let session = self.session.as_deref().map(str::to_owned).or_else(|| {
            extensions
                .get::<http::request::Parts>()
                .and_then(|parts| parts.headers.get("mcp-session-id"))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        CallOrigin {
            transport: self.transport,
            session,
            traceparent: None,
        }
    }

    fn principal(&self, extensions: &rmcp::model::Extensions) -> Arc<Principal> {
        extensions
            .get::<http::request::Parts>()
            .and_then(|parts| crate::gate::caller(&parts.extensions))
            .cloned()
            .unwrap_or_else(|| self.fallback.clone())
    }

    fn session_log_level(&self) -> Option<LogLevel> {
        *self.log_level.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether `traceparent` is a well-formed W3C `traceparent`
/// (`00-<32 hex>-<16 hex>-<2 hex>`) with a trace id that is not all zeros.
fn is_traceparent(traceparent: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    match traceparent.split('-').collect::<Vec<_>>()[..] {
        [version, trace_id, parent, flags] => {
            hex(version, 2)
                && hex(trace_id, 32)
                && hex(parent, 16)
                && hex(flags, 2)
                && trace_id.bytes().any(|b| b != b'0')
        }
        _ => false,
    }
}

fn from_mcp_level(level: LoggingLevel) -> LogLevel {
    match level {
        LoggingLevel::Debug => LogLevel::Debug,
        LoggingLevel::Info => LogLevel::Info,
        LoggingLevel::Notice => LogLevel::Notice,
        LoggingLevel::Warning => LogLevel::Warning,
        LoggingLevel::Error => LogLevel::Error,
        LoggingLevel::Critical => LogLevel::Critical,
        LoggingLevel::Alert => LogLevel::Alert,
        LoggingLevel::Emergency => LogLevel::Emergency,
    }
}

fn to_mcp_level(level: LogLevel) -> LoggingLevel {
    match level {
        LogLevel::Debug => LoggingLevel::Debug,
        LogLevel::Info => LoggingLevel::Info,
        LogLevel::Notice => LoggingLevel::Notice,
        LogLevel::Warning => LoggingLevel::Warning,
        LogLevel::Error => LoggingLevel::Error,
        LogLevel::Critical => LoggingLevel::Critical,
        LogLevel::Alert => LoggingLevel::Alert,
        LogLevel::Emergency => LoggingLevel::Emergency,
    }
}

/// Sends a call's guest events to the client as MCP notifications, until the
/// call drops its sink or the client goes away.
///
/// Log messages are marked with the call's request id, so that in a
/// Streamable HTTP session they ride the call's own reply stream, as its
/// progress does, rather than the session's standalone stream: the spec
/// wants messages that relate to a request on that request's stream. (rmcp
/// routes only progress by itself; the marker is read by Cordon's patch of
/// the vendored copy.) Other transports have one stream and ignore it.
async fn forward_events(
    mut events: mpsc::UnboundedReceiver<CallEvent>,
    peer: rmcp::Peer<RoleServer>,
    progress_token: Option<rmcp::model::ProgressToken>,
    request_id: rmcp::model::RequestId,
) {
    while let Some(event) = events.recv().await {
        let sent = match event {
            CallEvent::Progress {
                progress,
                total,
                message,
            } => {
                let Some(token) = progress_token.clone() else {
                    continue;
                };
                let mut param = ProgressNotificationParam::new(token, progress);
                param.total = total;
                param.message = message;
                peer.notify_progress(param).await
            }
            CallEvent::Log {
                level,
                logger,
                data,
            } => {
                let mut param = LoggingMessageNotificationParam::new(to_mcp_level(level), data);
                param.logger = logger;
                let mut notification =
                    ServerNotification::LoggingMessageNotification(Notification::new(param));
                notification
                    .extensions_mut()
                    .insert(OriginatingRequestId(request_id.clone()));
                peer.send_notification(notification).await
            }
        };
        if sent.is_err() {
            // The client is gone; the call will be cancelled with it.
            break;
        }
    }
}

impl ServerHandler for McpHandler {
    fn get_info(&self) -> ServerConfig {
        let capabilities = ServerCapabilities::builder()
            .enable_tools()
            .enable_tool_list_changed()
            .enable_logging()
            .build();
        ServerConfig::new(capabilities)
            .with_server_info(Implementation::new("cordon", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Tools served by Cordon run in a WebAssembly sandbox with only the grants \
                 the operator configured.",
            )
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let principal = self.principal(&context.extensions);
        let tools = self.dispatcher.list_tools(&principal);
        // The cursor is the name of the last tool on the previous page: the
        // list is sorted by name, so pages stay stable across reloads.
        let start = match request.and_then(|r| r.cursor) {
            None => 0,
            Some(after) => {
                // Only a tool name can be a cursor this server gave out.
                if !crate::runtime::valid_tool_name(&after) {
                    return Err(McpError::invalid_params("invalid cursor", None));
                }
                tools.partition_point(|t| t.name.as_ref() <= after.as_str())
            }
        };
        let page: Vec<_> = tools.iter().skip(start).take(PAGE_SIZE).cloned().collect();
        let next_cursor = (start + page.len() < tools.len())
            .then(|| page.last().map(|t| t.name.to_string()))
            .flatten();
        let mut result = ListToolsResult::with_all_items(page);
        result.next_cursor = next_cursor;
        result.ttl_ms = Some(LIST_TTL_MS);
        // The list depends on the caller's roles.
        result.cache_scope = Some(CacheScope::Private);
        Ok(result)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let principal = self.principal(&context.extensions);
        let mut origin = self.origin(&context.extensions);
        origin.traceparent = context
            .meta
            .get("traceparent")
            .and_then(|v| v.as_str())
            .filter(|tp| is_traceparent(tp))
            .map(str::to_ascii_lowercase);
        let progress_token = context.meta.get_progress_token();
        let log_level = context
            .meta
            .log_level()
            .map(from_mcp_level)
            .or_else(|| self.session_log_level());

        // Most calls want no events: then there is no channel and no task.
        let (events, forwarder) = if progress_token.is_some() || log_level.is_some() {
            let (tx, rx) = mpsc::unbounded_channel();
            let sink = EventSink::new(tx, log_level, progress_token.is_some());
            let forwarder = tokio::spawn(forward_events(
                rx,
                context.peer.clone(),
                progress_token,
                context.id.clone(),
            ));
            (sink, Some(forwarder))
        } else {
            (EventSink::discard(), None)
        };

        let arguments = request
            .arguments
            .map(serde_json::Value::Object)
            .unwrap_or(serde_json::Value::Null);
        // Boxed: the call's future is large (sandbox, audit record), and
        // rmcp sizes every session's service task by its handler's futures.
        let outcome = Box::pin(self.dispatcher.call(
            &principal,
            CallRequest {
                tool: request.name.to_string(),
                arguments,
                events,
                cancel: context.ct.clone(),
                origin,
            },
        ))
        .await;
        // Deliver every notification before the response.
        if let Some(forwarder) = forwarder {
            let _ = forwarder.await;
        }

        match outcome.result {
            Ok(result) => Ok(result.into()),
            Err(failure @ CallFailure::Refused(_)) => {
                // Lets the HTTP gate answer 429 (see `gate::QuotaRefusal`).
                if let Some(refusal) = context
                    .extensions
                    .get::<http::request::Parts>()
                    .and_then(|parts| parts.extensions.get::<crate::gate::QuotaRefusal>())
                {
                    refusal.set();
                }
                Err(McpError::new(QUOTA_EXCEEDED, failure.to_string(), None))
            }
            Err(failure) if failure.is_request_error() => {
                Err(McpError::invalid_params(failure.to_string(), None))
            }
            Err(failure) => Ok(failure.to_tool_result().into()),
        }
    }

    /// rmcp hands over, as a "custom" request, any request whose params do
    /// not parse, including `tools/call` with a malformed body; JSON-RPC
    /// says that is -32602 (invalid params), not -32601, for methods we serve.
    async fn on_custom_request(
        &self,
        request: CustomRequest,
        _context: RequestContext<RoleServer>,
    ) -> Result<CustomResult, McpError> {
        const SERVED: &[&str] = &[
            "initialize",
            "ping",
            "tools/list",
            "tools/call",
            "logging/setLevel",
            "server/discover",
            "subscriptions/listen",
        ];
        if SERVED.contains(&request.method.as_str()) {
            Err(McpError::invalid_params(
                format!("invalid params for {}", request.method),
                None,
            ))
        } else {
            Err(McpError::new(
                rmcp::model::ErrorCode::METHOD_NOT_FOUND,
                format!("method not found: {}", request.method),
                None,
            ))
        }
    }

    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        *self.log_level.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(from_mcp_level(request.level));
        Ok(())
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        // Sessions (2025-xx revisions): push list changes for the session's life.
        let mut changes = self.dispatcher.registry().subscribe();
        let peer = context.peer;
        let session_end = self.session_end.clone();
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    _ = session_end.cancelled() => break,
                    change = changes.recv() => change,
                };
                match change {
                    // A lagged receiver still means "changed": tell the client once.
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Boxed: this task lives as long as the session, and
                        // the sending future would otherwise take room in it
                        // for a notification that comes only on a reload.
                        if Box::pin(peer.notify_tool_list_changed()).await.is_err() {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        // 2026-07-28 `subscriptions/listen`: only tool-list changes exist here.
        let mut accepted = SubscriptionFilter::default();
        accepted.tools_list_changed = requested.tools_list_changed;
        Some(accepted)
    }

    /// A stream's place under the cap is taken before rmcp acknowledges the
    /// subscription, so that a refused client gets the error alone.
    fn admit_subscription(&self) -> Result<SubscriptionPermit, McpError> {
        let Some(cap) = &self.listen_cap else {
            return Ok(None);
        };
        let place = cap.enter().ok_or_else(|| {
            McpError::new(
                QUOTA_EXCEEDED,
                format!(
                    "all {} subscription streams are open (server.max_sessions); \
                     try again later",
                    cap.max()
                ),
                None,
            )
        })?;
        Ok(Some(Box::new(place)))
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), McpError> {
        let mut changes = self.dispatcher.registry().subscribe();
        loop {
            tokio::select! {
                _ = context.cancelled() => return Ok(()),
                change = changes.recv() => match change {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if context.sink().notify_tool_list_changed().await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                },
            }
        }
    }
}
