//! The HTTP gate: a middleware in front of every MCP route that
//! authenticates each request, binds sessions to the caller who opened them,
//! and serves the RFC 9728 protected-resource metadata.
//!
//! - Every request except health checks and the metadata must carry
//!   `Authorization: Bearer …`; a credential in the query string is refused
//!   without being read. Failures are 401 with `WWW-Authenticate` pointing
//!   at the metadata (RFC 6750 / RFC 9728), and an audit record.
//! - A verified caller whose tenant is not declared is refused (401); one
//!   with no role its tenant defines gets 403 `insufficient_scope`.
//! - Sessions are not credentials: a Streamable HTTP session is bound to the
//!   caller whose request created it, and a request by anyone else naming its
//!   id is answered 404, exactly like an unknown session. (HTTP+SSE sessions
//!   are bound in `sse.rs`, which owns them.)
//! - A call refused by the tenant's quotas is answered 429 where the reply is
//!   a plain JSON response.
//! - The caller goes on in the request extensions as an `Arc<Principal>`
//!   (shared with the token cache, not copied per request): [`attach_caller`]
//!   puts it there and [`caller`] is how the MCP handler, the SSE transport
//!   and the admin routes read it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use serde_json::json;

use crate::audit::{AuditEvent, EventKind};
use crate::auth::{AuthFailure, AuthMode, Authenticator};
use crate::dispatch::{Dispatcher, Principal};
use crate::server::MCP_PATH;
use crate::sse::{MESSAGES_PATH, SSE_PATH};

/// RFC 9728 protected-resource metadata.
pub const METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

/// Audit records of refused requests, per second, and in a burst.
const FAILURE_RECORDS_PER_SECOND: std::num::NonZeroU32 = std::num::NonZeroU32::new(50).unwrap();
const FAILURE_RECORDS_BURST: std::num::NonZeroU32 = std::num::NonZeroU32::new(500).unwrap();

/// Query parameters that would carry a credential. They are refused, never read.
const CREDENTIAL_PARAMS: &[&str] = &[
    "access_token",
    "token",
    "api_key",
    "apikey",
    "jwt",
    "auth",
    "authorization",
    "bearer",
];

/// Set by the protocol handler when the tenant's quota refused a call, so
/// that the gate can answer 429. Lives in the request's extensions.
#[derive(Debug, Clone, Default)]
pub struct QuotaRefusal(Arc<AtomicBool>);

impl QuotaRefusal {
    /// Marks the request as refused by a quota.
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The gate's state. Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    shared: Arc<Shared>,
}

struct Shared {
    authenticator: Arc<Authenticator>,
    dispatcher: Arc<Dispatcher>,
    /// rmcp's sessions, to forget bindings of sessions that have ended.
    sessions: Arc<LocalSessionManager>,
    /// Streamable HTTP session id → the caller who created it.
    bindings: Mutex<HashMap<String, Arc<Principal>>>,
    /// `https` when serving TLS, for URLs in the metadata.
    scheme: &'static str,
    /// Paces the audit records of refused requests.
    failure_records: governor::DefaultDirectRateLimiter,
    /// Refusal records not written since the last one that was.
    suppressed: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate checking credentials with `authenticator` against the policy
    /// of `dispatcher`, for the sessions of `sessions`.
    pub fn new(
        authenticator: Arc<Authenticator>,
        dispatcher: Arc<Dispatcher>,
        sessions: Arc<LocalSessionManager>,
        tls: bool,
    ) -> Gate {
        Gate {
            shared: Arc::new(Shared {
                authenticator,
                dispatcher,
                sessions,
                bindings: Mutex::new(HashMap::new()),
                scheme: if tls { "https" } else { "http" },
                failure_records: governor::RateLimiter::direct(
                    governor::Quota::per_second(FAILURE_RECORDS_PER_SECOND)
                        .allow_burst(FAILURE_RECORDS_BURST),
                ),
                suppressed: Default::default(),
            }),
        }
    }

    /// False when authentication is off (`auth.mode = "none"`).
    pub fn authenticates(&self) -> bool {
        self.shared.authenticator.mode() != AuthMode::None
    }

    fn bindings(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Principal>>> {
        self.shared
            .bindings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Base URL of this server as the client addressed it. The `Host` has
    /// passed `server.allowed_hosts` (the server checks it before the gate);
    /// it is rebuilt from its parsed host and port all the same, so that
    /// nothing else in the header (quotes, a user-info part) can reach the
    /// challenge or the metadata.
    fn base_url(&self, headers: &HeaderMap) -> String {
        let authority = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| http::uri::Authority::try_from(h).ok());
        match authority {
            Some(a) => match a.port_u16() {
                Some(port) => format!("{}://{}:{port}", self.shared.scheme, a.host()),
                None => format!("{}://{}", self.shared.scheme, a.host()),
            },
            None => format!("{}://localhost", self.shared.scheme),
        }
    }

    fn resource(&self, headers: &HeaderMap) -> String {
        match &self.shared.authenticator.config().resource {
            Some(resource) => resource.clone(),
            None => format!("{}{MCP_PATH}", self.base_url(headers)),
        }
    }

    fn metadata_url(&self, headers: &HeaderMap) -> String {
        match &self.shared.authenticator.config().resource {
            // RFC 9728 §3.1: the well-known segment goes between the host
            // and the resource's path.
            Some(resource) => match resource.split_once("://") {
                Some((scheme, rest)) => {
                    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                    format!("{scheme}://{host}{METADATA_PATH}{path}")
                }
                None => format!("{}{METADATA_PATH}", self.base_url(headers)),
            },
            None => format!("{}{METADATA_PATH}{MCP_PATH}", self.base_url(headers)),
        }
    }

    /// Audits a refused request. Anyone can send those, so their records
    /// are rate-limited (the log must not be growable at will from outside):
    /// beyond the limit they are counted, and the count is written with the
    /// next record that passes. The metrics count every refusal.
    fn audit_failure(&self, mut event: AuditEvent) {
        let shared = &self.shared;
        if shared.failure_records.check().is_err() {
            shared.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = shared.suppressed.swap(0, Ordering::Relaxed);
        if suppressed > 0 {
            let reason = event.reason.take().unwrap_or_default();
            event.reason = Some(format!(
                "{reason} ({suppressed} earlier refusal record(s) suppressed by the rate limit)"
            ));
        }
        shared.dispatcher.audit().record_detached(event);
    }

    /// The 401 (or 403) answer to a failed authentication, audited.
    fn refuse(&self, request: &Request, failure: Refusal) -> Response {
        let (status, code, description, reason) = match &failure {
            Refusal::Auth(f) => (
                StatusCode::UNAUTHORIZED,
                f.error_code(),
                f.to_string(),
                f.reason(),
            ),
            Refusal::NoRole(_) => (
                StatusCode::FORBIDDEN,
                Some("insufficient_scope"),
                "none of the token's roles is defined for its tenant".to_owned(),
                "insufficient_scope",
            ),
        };
        let mut event = AuditEvent {
            event: EventKind::AuthFailure,
            transport: Some(transport_of(request.uri()).into()),
            outcome: Some("denied".into()),
            reason: Some(reason.into()),
            ..AuditEvent::default()
        };
        if let Refusal::NoRole(p) = &failure {
            event.tenant = Some(p.tenant.clone());
            event.subject = Some(p.subject.clone());
        }
        self.audit_failure(event);
        metrics::counter!(crate::metrics::AUTH_FAILURES, "reason" => reason).increment(1);
        tracing::info!(reason, path = %request.uri().path(), "request refused by authentication");

        let mut challenge = format!(
            "Bearer resource_metadata=\"{}\"",
            self.metadata_url(request.headers())
        );
        if let Some(code) = code {
            challenge.push_str(&format!(
                ", error=\"{code}\", error_description=\"{}\"",
                description.replace('"', "'")
            ));
        }
        let body = json!({
            "error": code.unwrap_or("unauthorized"),
            "error_description": description,
        });
        let mut response = (status, axum::Json(body)).into_response();
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }

    fn authenticate(&self, request: &Request) -> Result<Arc<Principal>, Refusal> {
        if let Some(query) = request.uri().query()
            && query.split('&').any(|pair| {
                // The name as a server would decode it (`access%5Ftoken` is
                // `access_token`); the value is never looked at.
                let raw = pair.split('=').next().unwrap_or_default();
                let name = form_urlencoded::parse(raw.as_bytes())
                    .next()
                    .map(|(name, _)| name)
                    .unwrap_or_default();
                CREDENTIAL_PARAMS
                    .iter()
                    .any(|p| p.eq_ignore_ascii_case(name.trim()))
            })
        {
            return Err(Refusal::Auth(AuthFailure::TokenInQuery));
        }
        let value = request
            .headers()
            .get(header::AUTHORIZATION)
            .ok_or(Refusal::Auth(AuthFailure::Missing))?;
        let value = value
            .to_str()
            .map_err(|_| Refusal::Auth(AuthFailure::NotBearer))?;
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => return Err(Refusal::Auth(AuthFailure::NotBearer)),
        };
        let principal = self
            .shared
            .authenticator
            .verify(token)
            .map_err(Refusal::Auth)?;
        let settings = self.shared.dispatcher.settings();
        if !settings.policy.is_open() && settings.policy.tenant(&principal.tenant).is_none() {
            return Err(Refusal::Auth(AuthFailure::UnknownTenant));
        }
        if !settings.policy.has_known_role(&principal) {
            return Err(Refusal::NoRole(principal));
        }
        Ok(principal)
    }

    /// Forgets bindings of sessions rmcp no longer has, once they outnumber
    /// the live sessions (rmcp ends idle sessions on its own).
    async fn prune(&self) {
        let live = self.shared.sessions.sessions.read().await;
        let mut bindings = self.bindings();
        if bindings.len() > 2 * live.len() + 64 {
            bindings.retain(|id, _| live.contains_key(id.as_str()));
        }
    }
}

enum Refusal {
    Auth(AuthFailure),
    /// Authenticated, but none of its roles is defined for its tenant.
    NoRole(Arc<Principal>),
}

fn transport_of(uri: &Uri) -> &'static str {
    match uri.path() {
        MCP_PATH => "streamable-http",
        SSE_PATH | MESSAGES_PATH => "sse",
        _ => "http",
    }
}

/// The caller the gate attached to a request, if any (none when
/// authentication is off: then each reader uses its local principal).
pub fn caller(extensions: &http::Extensions) -> Option<&Arc<Principal>> {
    extensions.get::<Arc<Principal>>()
}

/// Makes `principal` the request's caller, as [`caller`] reads it.
pub fn attach_caller(extensions: &mut http::Extensions, principal: Arc<Principal>) {
    extensions.insert(principal);
}

/// The middleware: see the module documentation.
pub async fn check(State(gate): State<Gate>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path == "/healthz" || path == "/readyz" || path.starts_with(METADATA_PATH) {
        return next.run(request).await;
    }
    if gate.shared.authenticator.mode() == AuthMode::None {
        return next.run(request).await;
    }
    let principal = match gate.authenticate(&request) {
        Ok(principal) => principal,
        Err(refusal) => return gate.refuse(&request, refusal),
    };
    attach_caller(request.extensions_mut(), principal.clone());

    let is_mcp = request.uri().path() == MCP_PATH;
    let session = request
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if is_mcp && let Some(id) = &session {
        let bound = gate.bindings().get(id).cloned();
        if let Some(owner) = bound
            && !owner.same_caller(&principal)
        {
            tracing::warn!(tenant = %principal.tenant, "request for a session opened by another caller");
            gate.audit_failure(crate::dispatch::foreign_session_event(
                &principal,
                "streamable-http",
            ));
            return (StatusCode::NOT_FOUND, "Not Found: Session not found").into_response();
        }
    }
    let refusal = QuotaRefusal::default();
    request.extensions_mut().insert(refusal.clone());

    let mut response = next.run(request).await;

    if is_mcp
        && session.is_none()
        && let Some(id) = response
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
    {
        gate.bindings().insert(id.to_owned(), principal);
        gate.prune().await;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if refusal.is_set() && is_json && response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// `GET /.well-known/oauth-protected-resource[/…]` (RFC 9728).
pub async fn metadata(State(gate): State<Gate>, headers: HeaderMap) -> Response {
    let config = gate.shared.authenticator.config();
    axum::Json(json!({
        "resource": gate.resource(&headers),
        "authorization_servers": config.authorization_servers,
        "bearer_methods_supported": ["header"],
        "resource_name": "Cordon MCP server",
    }))
    .into_response()
}
