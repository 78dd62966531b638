//! One tool call, in one place: authorize it, admit it under the tenant's
//! quotas, check the arguments, compute the caller's grants and limits, run
//! it in the sandbox, and write its audit record.
//!
//! Every transport (Streamable HTTP, HTTP+SSE, stdio) and the CLI come
//! through here, so they all get the same policy and the same record.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rmcp::model::Tool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::config::Config;
use crate::policy::Policy;
use crate::runtime::{
    CallFailure, CallOutcome, CallSpec, EventSink, RegistryHandle, ToolComponent,
};

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

/// The audit record of `principal` using a session another caller opened
/// (every transport answers it as an unknown session).
pub fn foreign_session_event(principal: &Principal, transport: &str) -> AuditEvent {
    AuditEvent {
        event: EventKind::AuthFailure,
        tenant: Some(principal.tenant.clone()),
        subject: Some(principal.subject.clone()),
        transport: Some(transport.to_owned()),
        outcome: Some("denied".into()),
        reason: Some("session_of_another_caller".into()),
        ..AuditEvent::default()
    }
}

/// Where a request came from, for the audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallOrigin {
    /// `streamable-http`, `sse`, `stdio` or `cli`.
    pub transport: &'static str,
    /// The MCP session id, when there is a session.
    pub session: Option<String>,
    /// The client's W3C `traceparent` (from `_meta`, validated), if any.
    pub traceparent: Option<String>,
}

impl Default for CallOrigin {
    /// A call made in-process (tests, embedding), with no session.
    fn default() -> Self {
        CallOrigin {
            transport: "local",
            session: None,
            traceparent: None,
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
    /// Calls running now (for draining at shutdown).
    in_flight: AtomicUsize,
    /// Wakes `drain` when a call finishes.
    finished: tokio::sync::Notify,
    /// Cancels every running call (the end of the shutdown grace period).
    hard_stop: CancellationToken,
    /// Numbers calls for logs and traces.
    next_call_id: AtomicU64,
    #[cfg(feature = "bench-native-tool")]
    native: native::NativeTools,
}

/// Counts a running call until dropped.
struct InFlight<'a>(&'a Dispatcher);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(crate::metrics::ACTIVE_INSTANCES).decrement(1.0);
        self.0.finished.notify_waiters();
    }
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
            in_flight: AtomicUsize::new(0),
            finished: tokio::sync::Notify::new(),
            hard_stop: CancellationToken::new(),
            next_call_id: AtomicU64::new(1),
            #[cfg(feature = "bench-native-tool")]
            native: Default::default(),
        })
    }

    /// Benchmark only: calls to `tool` are answered by `answer`, in this
    /// process, instead of by a sandboxed instance. Everything else about the
    /// call (transport, policy, quotas, argument checks, grants, metrics,
    /// audit) stays as it is, so the difference is what the sandbox costs.
    #[cfg(feature = "bench-native-tool")]
    pub fn answer_natively(mut self, tool: &str, answer: native::NativeTool) -> Self {
        self.native.0.insert(tool.to_owned(), answer);
        self
    }

    /// What keeps this instance from serving (empty when ready): no tool
    /// loaded, the audit log not writable, a database handle unreachable.
    pub async fn readiness_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let registry = self.registry.snapshot();
        if registry.tools().next().is_none() {
            problems.push(format!(
                "no tool is loaded ({} load problem(s))",
                registry.problems().len()
            ));
        }
        if self.audit.is_enabled() {
            match tokio::time::timeout(Duration::from_secs(2), self.audit.try_flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => problems.push(format!("the audit log is not writable: {e}")),
                Err(_) => problems.push("the audit log did not sync within 2 s".into()),
            }
        }
        for (handle, why) in self.registry.runtime().databases().unreachable().await {
            problems.push(format!("database handle {handle:?} is unreachable: {why}"));
        }
        problems
    }

    /// Calls running now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Waits up to `grace` for running calls to finish, then cancels the
    /// rest (they end as `cancelled`, with their audit records). Returns the
    /// number cancelled. New calls are the transports' to refuse.
    pub async fn drain(&self, grace: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let finished = self.finished.notified();
            if self.in_flight() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                break;
            }
        }
        let left = self.in_flight();
        self.hard_stop.cancel();
        while self.in_flight() > 0 {
            let finished = self.finished.notified();
            if self.in_flight() == 0 {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), finished).await;
        }
        left
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
    pub async fn call(&self, principal: &Principal, mut request: CallRequest) -> CallOutcome {
        let call_id = self.next_call_id.fetch_add(1, Ordering::Relaxed);
        if !crate::runtime::valid_tool_name(&request.tool) {
            // No loaded tool has such a name, so the call fails as unknown
            // whatever it says; what it says is bounded and escaped before it
            // reaches the log, the audit record and the error message.
            request.tool = printable_tool_name(&request.tool);
        }
        let span = tracing::info_span!(
            "tool_call",
            call_id,
            tenant = %principal.tenant,
            subject = %principal.subject,
            session = request.origin.session.as_deref().unwrap_or(""),
            transport = request.origin.transport,
            tool = %request.tool,
            trace_id = request
                .origin
                .traceparent
                .as_deref()
                .and_then(|tp| tp.split('-').nth(1))
                .unwrap_or(""),
        );
        if let Some(traceparent) = &request.origin.traceparent {
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            // Without an exporter there is no OpenTelemetry layer: nothing to do.
            let _ = span.set_parent(crate::telemetry::parent_context(traceparent));
        }
        self.call_inner(principal, request).instrument(span).await
    }

    async fn call_inner(&self, principal: &Principal, request: CallRequest) -> CallOutcome {
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
        // Serialized once: the digest for the record, and (for an object)
        // exactly what the guest receives.
        let serialized = serde_json::to_string(&request.arguments).unwrap_or_default();
        let (include, redact) = match settings.policy.tenant(&principal.tenant) {
            Some(tenant) => (tenant.audit.log_arguments, tenant.audit.redact.as_slice()),
            None => (false, &[][..]),
        };
        event = event.with_serialized_arguments(
            &request.arguments,
            serialized.as_bytes(),
            include,
            redact,
        );
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
                metrics::counter!(crate::metrics::QUOTA_REJECTIONS, "tenant" => principal.tenant.clone())
                    .increment(1);
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
        let arguments = if serialized.starts_with('{') {
            serialized
        } else {
            arguments.to_string()
        };
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        metrics::gauge!(crate::metrics::ACTIVE_INSTANCES).increment(1.0);
        let _in_flight = InFlight(self);
        // At the end of the shutdown grace period the call is dropped, which
        // stops the guest like a deadline does.
        let outcome = tokio::select! {
            outcome = self.run(&entry.component, &request.tool, &arguments, spec) => outcome,
            _ = self.hard_stop.cancelled() => CallOutcome {
                result: Err(CallFailure::Cancelled),
                stats: Default::default(),
            },
        };
        metrics::histogram!(crate::metrics::CALL_SECONDS, "phase" => "instantiate")
            .record(outcome.stats.instantiate.as_secs_f64());
        metrics::histogram!(crate::metrics::CALL_SECONDS, "phase" => "execute")
            .record(outcome.stats.execute.as_secs_f64());
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

    /// Runs the tool in a fresh sandboxed instance.
    async fn run(
        &self,
        component: &Arc<ToolComponent>,
        tool: &str,
        arguments: &str,
        spec: CallSpec,
    ) -> CallOutcome {
        #[cfg(feature = "bench-native-tool")]
        if let Some(answer) = self.native.0.get(tool) {
            return CallOutcome {
                result: answer(arguments),
                stats: Default::default(),
            };
        }
        self.registry
            .runtime()
            .call(component, tool, arguments, spec)
            .await
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
        let elapsed = started.elapsed();
        event.duration_ms = Some(elapsed.as_secs_f64() * 1000.0);
        let outcome_label = event.outcome.clone().unwrap_or_default();
        let limit = match outcome_label.as_str() {
            "timeout" => Some("timeout"),
            "memory_limit" => Some("memory"),
            "fuel_exhausted" => Some("fuel"),
            "output_limit" => Some("output"),
            _ => None,
        };
        if let Some(limit) = limit {
            metrics::counter!(crate::metrics::LIMIT_HITS, "limit" => limit).increment(1);
        }
        // Only loaded tools' names become labels: a caller cannot mint series.
        let tool = if outcome_label == "unknown_tool" || outcome_label == "denied" {
            "unknown".to_owned()
        } else {
            event.tool.clone().unwrap_or_default()
        };
        metrics::counter!(
            crate::metrics::CALLS,
            "tenant" => event.tenant.clone().unwrap_or_default(),
            "tool" => tool,
            "outcome" => outcome_label,
        )
        .increment(1);
        metrics::histogram!(crate::metrics::CALL_SECONDS, "phase" => "total")
            .record(elapsed.as_secs_f64());
        let audit_started = Instant::now();
        let recorded = self.audit.record(event).await;
        metrics::histogram!(crate::metrics::AUDIT_WRITE_SECONDS)
            .record(audit_started.elapsed().as_secs_f64());
        if let Err(e) = recorded {
            tracing::error!("cannot write the audit record of a call: {e}");
            outcome.result = Err(CallFailure::Unavailable(
                "the call's audit record could not be written; its result is withheld".into(),
            ));
        }
        outcome
    }
}

/// Native tools for the transport benchmark's baseline (see
/// [`Dispatcher::answer_natively`]). Not in any build of the `cordon` binary:
/// a deployment runs every tool in the sandbox.
#[cfg(feature = "bench-native-tool")]
pub mod native {
    use std::collections::HashMap;
    use std::sync::Arc;

    use crate::runtime::CallFailure;

    /// Answers a call from its serialized arguments.
    pub type NativeTool = Arc<
        dyn Fn(&str) -> Result<rmcp::model::CallToolResult, CallFailure> + Send + Sync + 'static,
    >;

    /// The native tools by name.
    #[derive(Default)]
    pub(super) struct NativeTools(pub(super) HashMap<String, NativeTool>);

    impl std::fmt::Debug for NativeTools {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_set().entries(self.0.keys()).finish()
        }
    }
}

/// A requested tool name that is no valid tool name, as the log and the
/// audit record show it: control characters and quotes escaped, at most 64
/// bytes, marked when cut.
fn printable_tool_name(name: &str) -> String {
    const SHOWN: usize = 64;
    // One character past what is shown, so that a longer name is marked.
    let head: String = name.chars().take(SHOWN + 1).collect();
    crate::runtime::cut_to(head.escape_debug().to_string(), SHOWN)
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

#[cfg(test)]
mod tests {
    use super::printable_tool_name;

    #[test]
    fn a_name_no_tool_can_have_is_shown_escaped_and_bounded() {
        assert_eq!(printable_tool_name("a\"b\n"), "a\\\"b\\n");
        let long = printable_tool_name(&"x".repeat(100_000));
        assert_eq!(long, format!("{}…[truncated]", "x".repeat(64)));
        assert_eq!(printable_tool_name(&"x".repeat(64)), "x".repeat(64));
    }
}
