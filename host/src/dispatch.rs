//! One tool call, in one place: find the tool, check the arguments, compute
//! the caller's grants and limits, run it in the sandbox.
//!
//! Authorization and audit hook in here (in that order around the runtime)
//! so that every transport gets the same policy and the same record.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rmcp::model::Tool;

use crate::config::Config;
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
}

/// Dispatches calls against the current registry and configuration.
#[derive(Debug)]
pub struct Dispatcher {
    registry: Arc<RegistryHandle>,
    config: ArcSwap<Config>,
}

impl Dispatcher {
    /// A dispatcher over `registry` with `config`.
    pub fn new(registry: Arc<RegistryHandle>, config: Config) -> Self {
        Dispatcher {
            registry,
            config: ArcSwap::from_pointee(config),
        }
    }

    /// The tool registry.
    pub fn registry(&self) -> &Arc<RegistryHandle> {
        &self.registry
    }

    /// The tools `principal` may see, sorted by name.
    pub fn list_tools(&self, _principal: &Principal) -> Vec<Tool> {
        self.registry
            .snapshot()
            .tools()
            .map(|entry| entry.info.tool.clone())
            .collect()
    }

    /// Runs one call for `principal`.
    pub async fn call(&self, principal: &Principal, request: CallRequest) -> CallOutcome {
        let registry = self.registry.snapshot();
        let fail = |failure| CallOutcome {
            result: Err(failure),
            stats: Default::default(),
        };
        let Some(entry) = registry.tool(&request.tool) else {
            return fail(CallFailure::UnknownTool(request.tool));
        };
        let arguments = match request.arguments {
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            args @ serde_json::Value::Object(_) => args,
            other => {
                return fail(CallFailure::InvalidArguments(format!(
                    "arguments must be a JSON object, not {}",
                    json_kind(&other)
                )));
            }
        };
        if let Err(failure) = entry.info.check_arguments(&arguments) {
            return fail(failure);
        }
        let config = self.config.load();
        let component = entry.component.name();
        let grants = match config.grants_for(component, &principal.tenant) {
            Ok(grants) => grants,
            Err(e) => return fail(CallFailure::Unavailable(e.to_string())),
        };
        let spec = CallSpec {
            grants,
            limits: config.limits_for(component),
            events: request.events,
            cancel: request.cancel,
        };
        let arguments = arguments.to_string();
        self.registry
            .runtime()
            .call(&entry.component, &request.tool, &arguments, spec)
            .await
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
