//! Optional OpenTelemetry export: the `tracing` spans (one per tool call,
//! carrying tenant, subject, session, tool and call id) go to an OTLP/HTTP
//! collector when `[telemetry] otlp_endpoint` is set, and a client's
//! `traceparent` (in a request's `_meta`) becomes the parent of its call's
//! span, so the call shows up inside the client's trace.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};
use serde::Deserialize;

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP (protobuf) traces endpoint, e.g.
    /// `"http://127.0.0.1:4318/v1/traces"`. Unset: no export.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of the exported spans.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "cordon".into(),
        }
    }
}

impl TelemetryConfig {
    /// Everything wrong with this table, as (key, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            problems.push((
                "telemetry.otlp_endpoint".into(),
                format!("{endpoint:?} must be an http:// or https:// URL, e.g. \"http://127.0.0.1:4318/v1/traces\""),
            ));
        }
        if self.service_name.is_empty() {
            problems.push(("telemetry.service_name".into(), "must not be empty".into()));
        }
        problems
    }

    /// The tracer provider and tracer exporting to the collector, when an
    /// endpoint is configured. Spans are batched on a background thread;
    /// shut the provider down at exit to send the last ones.
    pub fn tracer(&self) -> anyhow::Result<Option<(SdkTracerProvider, Tracer)>> {
        let Some(endpoint) = &self.otlp_endpoint else {
            return Ok(None);
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.clone())
            .build()?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(self.service_name.clone())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("cordon");
        Ok(Some((provider, tracer)))
    }
}

/// The remote parent a W3C `traceparent` names.
pub fn parent_context(traceparent: &str) -> opentelemetry::Context {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}
