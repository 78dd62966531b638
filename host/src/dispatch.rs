//! One tool call, in one place: authorize it, admit it under the tenant's
//! quotas, check the arguments, compute the caller's grants and limits, run
//! it in the sandbox, and write its audit record.
//!
//! Every transport (Streamable HTTP, HTTP+SSE, stdio) and the CLI come
//! through here, so they all get the same policy and the same record.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use rmcp::model::Tool;

use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::config::Config;
use crate::policy::Policy;
use crate::runtime::{CallFailure, CallOutcome, CallSpec, EventSink, RegistryHandle};

/// Who is calling. Transports fill it from the authenticated request; the
/// CLI and stdio use the operator-named local principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The tenant (a declared, path-safe id).
    pub tenant: String,
    /// The subject (user or service) within the tenant.
    pub subject: String,
    /// The caller's roles.
    pub roles: Vec<String>,
}

impl Principal {
    /// The principal of local, single-user use.
    pub fn local(tenant: &str) -> Self {
        Principal {
            tenant: tenant.to_owned(),
            subject: "local".to_owned(),
            roles: Vec::new(),
        }
    }

    /// True when `other` is the same caller (tenant and subject), whatever
    /// roles a refreshed token now carries. Sessions are bound to this.
    pub fn same_caller(&self, other: &Principal) -> bool {
        self.tenant == other.tenant && self.subject == other.subject
    }
}

/// Where a request came from, for the audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallOrigin {
    /// `streamable-http`, `sse`, `stdio` or `cli`.
    pub transport: &'static str,
    /// The MCP session id, when there is a session.
    pub session: Option<String>,
}

impl Default for CallOrigin {
    /// A call made in-process (tests, embedding), with no session.
    fn default() -> Self {
        CallOrigin {
            transport: "local",
            session: None,
        }
    }
}

/// A call request, as the protocol layer hands it over.
#[derive(Debug)]
pub struct CallRequest {
    /// The tool name.
    pub tool: String,
    /// The arguments (a JSON object; `null` is taken as `{}`).
    pub arguments: serde_json::Value,
    /// Where log/progress events go.
    pub events: EventSink,
    /// Cancels the call.
    pub cancel: tokio_util::sync::CancellationToken,
    /// Transport and session.
    pub origin: CallOrigin,
}

/// A configuration with its compiled policy: swapped as one on reload.
#[derive(Debug)]
pub struct Settings {
    /// The configuration.
    pub config: Config,
    /// Its access policy and quota state.
    pub policy: Policy,
}

impl Settings {
    /// Compiles the policy of `config`.
    pub fn new(config: Config) -> anyhow::Result<Settings> {
        let policy = Policy::new(&config.roles, &config.tenants).map_err(anyhow::Error::msg)?;
        Ok(Settings { config, policy })
    }
}

/// Dispatches calls against the current registry and configuration.
#[derive(Debug)]
pub struct Dispatcher {
    registry: Arc<RegistryHandle>,
    settings: ArcSwap<Settings>,
    audit: AuditLog,
}

impl Dispatcher {
    /// A dispatcher over `registry` with `config`, recording into `audit`.
    pub fn new(
        registry: Arc<RegistryHandle>,
        config: Config,
        audit: AuditLog,
    ) -> anyhow::Result<Self> {
        Ok(Dispatcher {
            registry,
            settings: ArcSwap::from_pointee(Settings::new(config)?),
            audit,
        })
    }

    /// The tool registry.
    pub fn registry(&self) -> &Arc<RegistryHandle> {
        &self.registry
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The configuration and policy in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// Puts `settings` in force for every call that starts from now on
    /// (calls running keep theirs). Quota state starts afresh.
    pub fn replace_settings(&self, settings: Settings) {
        self.settings.store(Arc::new(settings));
    }

    /// The tools `principal` may see, sorted by name.
    pub fn list_tools(&self, principal: &Principal) -> Vec<Tool> {
        let settings = self.settings.load();
        self.registry
            .snapshot()
            .tools()
            .filter(|entry| settings.policy.allows(principal, &entry.info.tool.name))
            .map(|entry| entry.info.tool.clone())
            .collect()
    }

    /// Runs one call for `principal`, and records it.
    pub async fn call(&self, principal: &Principal, request: CallRequest) -> CallOutcome {
        let started = Instant::now();
        let settings = self.settings.load_full();
        let mut event = AuditEvent {
            event: EventKind::Call,
            tenant: Some(principal.tenant.clone()),
            subject: Some(principal.subject.clone()),
            session: request.origin.session.clone(),
            transport: Some(request.origin.transport.to_owned()),
            tool: Some(request.tool.clone()),
            ..AuditEvent::default()
        };
        if let Some(tenant) = settings.policy.tenant(&principal.tenant) {
            event = event.with_arguments(
                &request.arguments,
                tenant.audit.log_arguments,
                &tenant.audit.redact,
            );
        } else {
            event = event.with_arguments(&request.arguments, false, &[]);
        }
        let fail = |failure| CallOutcome {
            result: Err(failure),
            stats: Default::default(),
        };

        // A tool the caller may not use looks exactly like one that does not
        // exist; only the audit record tells them apart.
        let registry = self.registry.snapshot();
        let entry = registry.tool(&request.tool);
        if !settings.policy.allows(principal, &request.tool) {
            event.outcome = Some("denied".into());
            event.reason = Some(if entry.is_some() {
                "no role of the caller allows this tool".into()
            } else {
                "unknown tool".into()
            });
            return self
                .finish(event, started, fail(CallFailure::UnknownTool(request.tool)))
                .await;
        }
        let Some(entry) = entry else {
            event.outcome = Some("unknown_tool".into());
            return self
                .finish(event, started, fail(CallFailure::UnknownTool(request.tool)))
                .await;
        };
        event.component_sha256 = Some(entry.component.sha256().to_owned());

        let tenant = settings.policy.tenant(&principal.tenant);
        let _permit = match tenant.map(|t| t.admit(&principal.tenant)).transpose() {
            Ok(permit) => permit,
            Err(refusal) => {
                event.event = EventKind::Quota;
                event.outcome = Some("rate_limited".into());
                event.reason = Some(refusal.to_string());
                return self
                    .finish(
                        event,
                        started,
                        fail(CallFailure::Refused(refusal.to_string())),
                    )
                    .await;
            }
        };

        let arguments = match request.arguments {
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            args @ serde_json::Value::Object(_) => args,
            other => {
                let failure = CallFailure::InvalidArguments(format!(
                    "arguments must be a JSON object, not {}",
                    json_kind(&other)
                ));
                return self.finish(event, started, fail(failure)).await;
            }
        };
        if let Err(failure) = entry.info.check_arguments(&arguments) {
            return self.finish(event, started, fail(failure)).await;
        }
        let config = &settings.config;
        let component = entry.component.name();
        let mut grants = match config.grants_for(component, &principal.tenant) {
            Ok(grants) => grants,
            Err(e) => {
                return self
                    .finish(
                        event,
                        started,
                        fail(CallFailure::Unavailable(e.to_string())),
                    )
                    .await;
            }
        };
        let mut limits = config.limits_for(component);
        if let Some(tenant) = tenant {
            if let Some(values) = tenant.config.get(component) {
                grants
                    .config
                    .extend(values.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            limits = tenant.limits.as_limits().apply(&limits);
        }
        let spec = CallSpec {
            grants,
            limits,
            events: request.events,
            cancel: request.cancel,
        };
        let arguments = arguments.to_string();
        let outcome = self
            .registry
            .runtime()
            .call(&entry.component, &request.tool, &arguments, spec)
            .await;
        for handle in &outcome.stats.denied_databases {
            self.audit.record_detached(AuditEvent {
                event: EventKind::DbDenied,
                outcome: Some("denied".into()),
                reason: Some(format!("database handle {handle:?} is not granted")),
                ..event.clone()
            });
        }
        event.fuel = outcome.stats.fuel_consumed;
        event.peak_memory_bytes = Some(outcome.stats.peak_memory);
        self.finish(event, started, outcome).await
    }

    /// Writes the call's record, then hands the outcome back. Under
    /// `durability = "always"` this returns only once the record is on disk;
    /// if it cannot be written, the caller gets an error instead of a result
    /// nobody could audit.
    async fn finish(
        &self,
        mut event: AuditEvent,
        started: Instant,
        mut outcome: CallOutcome,
    ) -> CallOutcome {
        if event.outcome.is_none() {
            event.outcome = Some(
                match &outcome.result {
                    Ok(result) if result.is_error == Some(true) => "tool_error",
                    Ok(_) => "ok",
                    Err(failure) => failure.kind(),
                }
                .to_owned(),
            );
        }
        event.duration_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        if let Err(e) = self.audit.record(event).await {
            tracing::error!("cannot write the audit record of a call: {e}");
            outcome.result = Err(CallFailure::Unavailable(
                "the call's audit record could not be written; its result is withheld".into(),
            ));
        }
        outcome
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
