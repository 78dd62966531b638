//! Prometheus metrics: the `metrics` facade records from wherever things
//! happen (dispatcher, gate, audit, registry); this module installs the
//! Prometheus recorder once per process and renders the text format for
//! `GET /metrics` (admin role only, see `admin.rs`).
//!
//! Label values are tenants, tool names, outcomes and reasons: never tokens,
//! subjects, arguments or anything a caller can make unbounded except
//! through the operator's config (tenants are declared; tool names are the
//! loaded tools; an unknown tool's name is recorded as `unknown`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Calls, by `tenant`, `tool` and `outcome`.
pub const CALLS: &str = "cordon_tool_calls_total";
/// Call latency in seconds, by `phase` (`total`, `instantiate`, `execute`).
pub const CALL_SECONDS: &str = "cordon_tool_call_duration_seconds";
/// Instances running now.
pub const ACTIVE_INSTANCES: &str = "cordon_active_instances";
/// Open sessions, by `transport`.
pub const SESSIONS: &str = "cordon_sessions";
/// Sandbox limits hit, by `limit` (`timeout`, `memory`, `fuel`, `output`).
pub const LIMIT_HITS: &str = "cordon_sandbox_limit_hits_total";
/// Failed authentications, by `reason`.
pub const AUTH_FAILURES: &str = "cordon_auth_failures_total";
/// Calls refused by a tenant's quota, by `tenant`.
pub const QUOTA_REJECTIONS: &str = "cordon_quota_rejections_total";
/// Time to get a call's audit record accepted (on disk under `always`).
pub const AUDIT_WRITE_SECONDS: &str = "cordon_audit_write_seconds";
/// Components loaded, by `cache` (`hit`, `miss`, `disabled`).
pub const COMPILE_CACHE: &str = "cordon_compile_cache_total";
/// Tool-set reloads.
pub const RELOADS: &str = "cordon_reloads_total";

/// The process's Prometheus recorder (installed on first use).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".into()),
                &[
                    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ],
            )
            .expect("the bucket list is not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding program):
        // then ours renders nothing, but nothing breaks.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        handle
    })
}

/// Makes sure the recorder is installed before anything records.
pub fn init() {
    let _ = handle();
}
