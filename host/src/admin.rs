//! The management surface, for the operators' admin role only
//! (`[admin] tenant` + `role`): list tenants and their effective tools,
//! reload the tools, tail and verify the audit log, and the Prometheus
//! metrics at `/metrics` (on the main listener, behind the same role).
//!
//! It sits behind the same authentication gate as the MCP routes. Anyone
//! else gets 403; nothing here can change a grant (grants change only
//! through the operator's config).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde_json::json;

use crate::audit::{AuditEvent, EventKind};
use crate::dispatch::{Dispatcher, Principal};

/// Counts open sessions per transport, at scrape time.
pub type SessionCounter =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Vec<(&'static str, usize)>> + Send + Sync>;

/// The admin routes (and `/metrics`), for `dispatcher`.
pub fn router(dispatcher: Arc<Dispatcher>, sessions: SessionCounter) -> Router {
    crate::metrics::init();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let sessions = sessions.clone();
                async move {
                    for (transport, open) in sessions().await {
                        metrics::gauge!(crate::metrics::SESSIONS, "transport" => transport)
                            .set(open as f64);
                    }
                    (
                        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        crate::metrics::handle().render(),
                    )
                }
            }),
        )
        .route("/admin/tenants", get(tenants))
        .route("/admin/reload", post(reload))
        .route("/admin/audit/tail", get(audit_tail))
        .route("/admin/audit/verify", get(audit_verify))
        .layer(axum::middleware::from_fn_with_state(
            dispatcher.clone(),
            require_admin,
        ))
        .with_state(dispatcher)
}

/// The caller, as the gate authenticated it (or the local principal when
/// authentication is off).
fn caller(dispatcher: &Dispatcher, request: &Request) -> Arc<Principal> {
    crate::gate::caller(request.extensions())
        .cloned()
        .unwrap_or_else(|| Arc::new(dispatcher.settings().config.server.local_principal()))
}

async fn require_admin(
    State(dispatcher): State<Arc<Dispatcher>>,
    mut request: Request,
    next: Next,
) -> Response {
    let principal = caller(&dispatcher, &request);
    let settings = dispatcher.settings();
    let admin = &settings.config.admin;
    let allowed = admin.tenant.as_deref() == Some(principal.tenant.as_str())
        && principal.roles.contains(&admin.role);
    if !allowed {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(json!({
                "error": "insufficient_scope",
                "error_description": "the management surface needs the operators' admin role",
            })),
        )
            .into_response();
    }
    crate::gate::attach_caller(request.extensions_mut(), principal);
    next.run(request).await
}

fn admin_event(request: &Request, reason: &str) -> AuditEvent {
    let principal = crate::gate::caller(request.extensions());
    AuditEvent {
        event: EventKind::Admin,
        tenant: principal.map(|p| p.tenant.clone()),
        subject: principal.map(|p| p.subject.clone()),
        transport: Some("http".into()),
        outcome: Some("ok".into()),
        reason: Some(reason.into()),
        ..AuditEvent::default()
    }
}

/// `GET /admin/tenants`: every tenant, its roles and the tools each may use.
async fn tenants(State(dispatcher): State<Arc<Dispatcher>>) -> Response {
    let settings = dispatcher.settings();
    let registry = dispatcher.registry().snapshot();
    let mut tenants = serde_json::Map::new();
    for (id, tenant) in &settings.config.tenants {
        let mut role_names: Vec<&String> = tenant
            .roles
            .keys()
            .chain(settings.config.roles.keys())
            .collect();
        role_names.sort();
        role_names.dedup();
        let mut roles = serde_json::Map::new();
        for role in role_names {
            let principal = Principal {
                tenant: id.clone(),
                subject: String::new(),
                roles: vec![role.clone()],
            };
            let tools: Vec<_> = registry
                .tools()
                .filter(|e| settings.policy.allows(&principal, &e.info.tool.name))
                .map(|e| e.info.tool.name.to_string())
                .collect();
            roles.insert(role.clone(), json!(tools));
        }
        tenants.insert(
            id.clone(),
            json!({ "roles": roles, "limits": {
                "max_concurrent_calls": tenant.limits.max_concurrent_calls,
                "calls_per_minute": tenant.limits.calls_per_minute,
                "memory_mib": tenant.limits.memory_mib,
                "timeout_ms": tenant.limits.timeout_ms,
            }}),
        );
    }
    axum::Json(json!({ "tenants": tenants })).into_response()
}

/// `POST /admin/reload`: re-reads the tools directory now.
async fn reload(State(dispatcher): State<Arc<Dispatcher>>, request: Request) -> Response {
    let registry = dispatcher.registry().reload().await;
    let tools = registry.tools().count();
    let problems: Vec<String> = registry.problems().iter().map(|p| p.to_string()).collect();
    let _ = dispatcher
        .audit()
        .record(admin_event(&request, &format!("reload: {tools} tool(s)")))
        .await;
    axum::Json(json!({ "tools": tools, "problems": problems })).into_response()
}

#[derive(serde::Deserialize)]
struct TailQuery {
    n: Option<usize>,
}

/// `GET /admin/audit/tail?n=50`: the last records.
async fn audit_tail(
    State(dispatcher): State<Arc<Dispatcher>>,
    Query(query): Query<TailQuery>,
) -> Response {
    let Some(path) = dispatcher.audit().path().map(ToOwned::to_owned) else {
        return (StatusCode::NOT_FOUND, "the audit log is disabled").into_response();
    };
    dispatcher.audit().flush().await;
    let n = query.n.unwrap_or(50).min(10_000);
    match tokio::task::spawn_blocking(move || crate::audit::tail(&path, n)).await {
        Ok(Ok(records)) => axum::Json(json!({ "records": records })).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `GET /admin/audit/verify`: checks the whole chain.
async fn audit_verify(State(dispatcher): State<Arc<Dispatcher>>, request: Request) -> Response {
    let Some(path) = dispatcher.audit().path().map(ToOwned::to_owned) else {
        return (StatusCode::NOT_FOUND, "the audit log is disabled").into_response();
    };
    dispatcher.audit().flush().await;
    let verified = tokio::task::spawn_blocking(move || crate::audit::verify(&path)).await;
    // Recorded after the check, which must not see this record half-written.
    dispatcher
        .audit()
        .record_detached(admin_event(&request, "audit verify"));
    match verified {
        Ok(Ok(report)) => {
            axum::Json(json!({ "ok": true, "report": report.to_string() })).into_response()
        }
        Ok(Err(e)) => (
            StatusCode::CONFLICT,
            axum::Json(json!({ "ok": false, "problem": e.to_string() })),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
