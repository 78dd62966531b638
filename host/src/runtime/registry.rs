//! The tools directory: every `*.wasm` in it loaded, its tools indexed by
//! name, swapped atomically on reload.
//!
//! Naming rule: tools are served under the bare names their components give
//! them (MCP clients and the conformance suite call tools by those names).
//! When two components offer the same name, the component whose file name
//! sorts first keeps it; the other's tool is not served and the clash is
//! reported as a load problem. Rename a file or a tool to resolve it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::Watcher as _;
use tokio::sync::{Mutex, broadcast, mpsc};

use super::Runtime;
use super::cache::{CacheStatus, CompileCache};
use super::component::{ToolComponent, ToolInfo};
use super::limits::Limits;

/// A tool as served, with the component that runs it.
#[derive(Debug, Clone)]
pub struct ToolEntry {
    /// Definition and schemas.
    pub info: Arc<ToolInfo>,
    /// The component providing it.
    pub component: Arc<ToolComponent>,
}

/// A file that could not be (fully) served, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProblem {
    /// The file.
    pub path: PathBuf,
    /// What went wrong, and what to do.
    pub message: String,
}

impl std::fmt::Display for LoadProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

/// One immutable generation of the tool set.
#[derive(Debug, Default)]
pub struct Registry {
    tools: BTreeMap<String, ToolEntry>,
    components: BTreeMap<String, Arc<ToolComponent>>,
    problems: Vec<LoadProblem>,
    generation: u64,
}

impl Registry {
    /// A tool by name.
    pub fn tool(&self, name: &str) -> Option<&ToolEntry> {
        self.tools.get(name)
    }

    /// Every tool, sorted by name (a stable order for pagination).
    pub fn tools(&self) -> impl Iterator<Item = &ToolEntry> {
        self.tools.values()
    }

    /// Every loaded component by name (file stem).
    pub fn components(&self) -> &BTreeMap<String, Arc<ToolComponent>> {
        &self.components
    }

    /// What could not be loaded in this generation.
    pub fn problems(&self) -> &[LoadProblem] {
        &self.problems
    }

    /// Increases by one at every reload that changed something.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The tool-name → component-sha256 map, to tell whether a reload changed anything.
    fn fingerprint(&self) -> Vec<(&str, &str)> {
        self.tools
            .iter()
            .map(|(name, e)| (name.as_str(), e.component.sha256()))
            .collect()
    }
}

/// Where the tools come from and how they are checked.
#[derive(Debug, Clone)]
pub struct ToolSource {
    /// The tools directory.
    pub dir: PathBuf,
    /// sha256 pins by component name: a file whose digest differs is refused.
    pub pins: HashMap<String, String>,
    /// The limits of a component's `list-tools` at load time (its call
    /// limits: a big component needs the memory it was granted to start).
    pub limits: HashMap<String, Limits>,
    /// The limits of components not in `limits`.
    pub default_limits: Limits,
}

/// Sent to subscribers when the set of tools changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolsChanged {
    /// The new generation.
    pub generation: u64,
}

/// The current registry plus what it takes to reload it.
pub struct RegistryHandle {
    current: ArcSwap<Registry>,
    runtime: Arc<Runtime>,
    cache: CompileCache,
    source: std::sync::RwLock<ToolSource>,
    reloading: Mutex<()>,
    changed: broadcast::Sender<ToolsChanged>,
}

impl std::fmt::Debug for RegistryHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryHandle").finish_non_exhaustive()
    }
}

impl RegistryHandle {
    /// Loads every tool in `source.dir`.
    pub async fn load(
        runtime: Arc<Runtime>,
        cache: CompileCache,
        source: ToolSource,
    ) -> Arc<RegistryHandle> {
        let (changed, _) = broadcast::channel(16);
        let handle = Arc::new(RegistryHandle {
            current: ArcSwap::from_pointee(Registry::default()),
            runtime,
            cache,
            source: std::sync::RwLock::new(source),
            reloading: Mutex::new(()),
            changed,
        });
        handle.reload().await;
        handle
    }

    /// The current generation. Calls keep the snapshot they started with.
    pub fn snapshot(&self) -> Arc<Registry> {
        self.current.load_full()
    }

    /// Notified whenever the tool set changes.
    pub fn subscribe(&self) -> broadcast::Receiver<ToolsChanged> {
        self.changed.subscribe()
    }

    /// Replaces the pins (e.g. after a config reload); takes effect at the next reload.
    pub fn set_source(&self, source: ToolSource) {
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = source;
    }

    /// The runtime the tools run in.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Re-reads the tools directory and swaps in the result. Unchanged files
    /// are reused without recompiling. A file that fails to load while an
    /// earlier version of it is being served keeps the earlier version (a
    /// copy in progress must not take a tool away). Returns the new snapshot.
    pub async fn reload(&self) -> Arc<Registry> {
        let _one_at_a_time = self.reloading.lock().await;
        let source = self
            .source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let previous = self.snapshot();
        let mut problems = Vec::new();
        let files = match wasm_files(&source.dir) {
            Ok(files) => files,
            Err(e) => {
                problems.push(LoadProblem {
                    path: source.dir.clone(),
                    message: format!("cannot read the tools directory: {e}"),
                });
                Vec::new()
            }
        };

        let mut components = BTreeMap::new();
        for path in files {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let pin = source.pins.get(&name).map(String::as_str);
            let limits = source.limits.get(&name).unwrap_or(&source.default_limits);
            let old = previous
                .components
                .get(&name)
                .filter(|c| c.path() == path)
                .cloned();
            match self.load_one(&path, pin, limits, old.as_ref()).await {
                Ok(component) => {
                    components.insert(name, component);
                }
                Err(message) => {
                    problems.push(LoadProblem {
                        path: path.clone(),
                        message,
                    });
                    if let Some(old) = old {
                        tracing::warn!(
                            file = %path.display(),
                            "keeping the previously loaded version of this tool component"
                        );
                        components.insert(name, old);
                    }
                }
            }
        }

        let mut tools: BTreeMap<String, ToolEntry> = BTreeMap::new();
        for component in components.values() {
            for info in component.tools() {
                let name = info.tool.name.to_string();
                if let Some(holder) = tools.get(&name) {
                    problems.push(LoadProblem {
                        path: component.path().to_owned(),
                        message: format!(
                            "tool `{name}` is also provided by {}, which sorts first and keeps the name; this one is not served",
                            holder.component.path().display()
                        ),
                    });
                    continue;
                }
                tools.insert(
                    name,
                    ToolEntry {
                        info: info.clone(),
                        component: component.clone(),
                    },
                );
            }
        }

        let mut next = Registry {
            tools,
            components,
            problems,
            generation: previous.generation,
        };
        let changed = next.fingerprint() != previous.fingerprint();
        if changed {
            next.generation += 1;
        }
        for problem in &next.problems {
            tracing::error!("tool not loaded: {problem}");
        }
        let next = Arc::new(next);
        self.current.store(next.clone());
        metrics::counter!(crate::metrics::RELOADS).increment(1);
        if changed {
            tracing::info!(
                generation = next.generation,
                tools = next.tools.len(),
                "tool set changed"
            );
            // No subscribers is fine.
            let _ = self.changed.send(ToolsChanged {
                generation: next.generation,
            });
        }
        next
    }

    async fn load_one(
        &self,
        path: &Path,
        pin: Option<&str>,
        limits: &Limits,
        old: Option<&Arc<ToolComponent>>,
    ) -> Result<Arc<ToolComponent>, String> {
        if let Some(old) = old {
            // Same file, same digest, same pin verdict: reuse it as it is.
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read it: {e}"))?;
            let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            if digest == old.sha256() && pin.is_none_or(|p| p.eq_ignore_ascii_case(&digest)) {
                return Ok(old.clone());
            }
        }
        let component = ToolComponent::load(&self.runtime, &self.cache, path, pin, limits)
            .await
            .map_err(|e| e.to_string())?;
        let (how, cache) = match component.cache_status() {
            CacheStatus::Hit => ("loaded from the compile cache", "hit"),
            CacheStatus::Miss => ("compiled and cached", "miss"),
            CacheStatus::Disabled => ("compiled (no cache)", "disabled"),
        };
        metrics::counter!(crate::metrics::COMPILE_CACHE, "cache" => cache).increment(1);
        tracing::info!(
            component = component.name(),
            sha256 = component.sha256(),
            tools = component.tools().len(),
            "tool component {how}"
        );
        Ok(Arc::new(component))
    }

    /// Watches the tools directory and reloads after changes settle.
    /// The watch ends when the returned guard is dropped.
    pub fn watch(self: &Arc<Self>) -> notify::Result<WatchGuard> {
        let dir = self
            .source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .dir
            .clone();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    let _ = tx.send(());
                }
            })?;
        watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        let weak = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            // Debounce: a copy is many events; reload once it has been quiet.
            const QUIET: Duration = Duration::from_millis(150);
            while rx.recv().await.is_some() {
                loop {
                    match tokio::time::timeout(QUIET, rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let Some(handle) = weak.upgrade() else { return };
                handle.reload().await;
            }
        });
        Ok(WatchGuard {
            _watcher: watcher,
            task,
        })
    }
}

/// Keeps a directory watch alive.
pub struct WatchGuard {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `*.wasm` files directly in `dir`, sorted by name.
fn wasm_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
