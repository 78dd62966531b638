//! Assembles a running Cordon from a checked configuration: runtime, compile
//! cache, tool registry (optionally watched) and dispatcher.

use std::sync::Arc;

use anyhow::Context as _;

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
        let runtime = Arc::new(Runtime::new(config.engine_settings())?);
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
        Ok(App {
            dispatcher: Arc::new(Dispatcher::new(registry, config)),
            _watch: watch,
        })
    }
}
