//! Assembles a running Cordon from a checked configuration: runtime, compile
//! cache, tool registry (optionally watched) and dispatcher.

use std::sync::Arc;

use anyhow::Context as _;

use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::runtime::{CompileCache, RegistryHandle, Runtime, WatchGuard};

/// A running Cordon, without any transport.
pub struct App {
    /// Dispatches calls.
    pub dispatcher: Arc<Dispatcher>,
    _watch: Option<WatchGuard>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl App {
    /// Loads every tool; watches the tools directory when the config says so
    /// and `allow_watch` is true (one-shot CLI commands pass false).
    pub async fn open(config: Config, allow_watch: bool) -> anyhow::Result<App> {
        crate::metrics::init();
        let databases = crate::db::Databases::open(&config.databases, &config.base_dir)?;
        let runtime = Runtime::new(config.engine_settings())?;
        if runtime.settings().keep_resident_bytes > 0 && runtime.in_place_reset_bytes() == 0 {
            tracing::info!(
                "this kernel lacks PAGEMAP_SCAN (Linux 6.7+): instance memory goes back to the \
                 kernel after every call and runtime.engine.keep_resident_kib has no effect"
            );
        }
        let runtime = Arc::new(runtime.with_databases(Arc::new(databases)));
        let cache = CompileCache::new(runtime.engine(), config.cache_dir()).with_context(|| {
            format!(
                "cannot create the compile cache directory {:?} (runtime.cache_dir)",
                config.cache_dir()
            )
        })?;
        let registry = RegistryHandle::load(runtime, cache, config.tool_source()).await;
        let watch = if allow_watch && config.runtime.watch {
            Some(registry.watch().with_context(|| {
                format!(
                    "cannot watch the tools directory {}",
                    config.tools_dir().display()
                )
            })?)
        } else {
            None
        };
        let audit = config.audit.open(&config.base_dir).with_context(|| {
            format!(
                "cannot open the audit log {} (audit.path)",
                config.audit.path.display()
            )
        })?;
        record_reloads(&registry, &audit);
        let dispatcher = Dispatcher::new(registry, config, audit)?;
        Ok(App {
            dispatcher: Arc::new(dispatcher),
            _watch: watch,
        })
    }
}

/// Writes an audit record for every change of the tool set (watcher,
/// admin or signal reloads alike), for as long as the registry lives.
fn record_reloads(registry: &Arc<RegistryHandle>, audit: &AuditLog) {
    if !audit.is_enabled() {
        return;
    }
    let mut changes = registry.subscribe();
    let weak = Arc::downgrade(registry);
    let audit = audit.downgrade();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        // A lagged receiver still means "changed".
        while let Ok(_) | Err(RecvError::Lagged(_)) = changes.recv().await {
            let (Some(registry), Some(audit)) = (weak.upgrade(), audit.upgrade()) else {
                break;
            };
            let snapshot = registry.snapshot();
            let outcome = if snapshot.problems().is_empty() {
                "ok"
            } else {
                "partial"
            };
            audit.record_detached(AuditEvent {
                event: EventKind::Reload,
                outcome: Some(outcome.into()),
                reason: Some(format!(
                    "generation {}: {} tool(s), {} problem(s)",
                    snapshot.generation(),
                    snapshot.tools().count(),
                    snapshot.problems().len()
                )),
                ..AuditEvent::default()
            });
        }
    });
}
