//! The sandbox runtime: one wasmtime `Engine`, a tool component compiled once
//! and pre-linked, and a fresh `Store` + instance for every call.
//!
//! This module knows nothing of HTTP, sessions or tenants: a caller hands it
//! the tool, the arguments, the grants and limits computed for this call and a
//! sink for events, and gets back an MCP result or a [`CallFailure`].

mod bindings;
mod cache;
mod component;
mod events;
mod grants;
mod host;
mod idle;
mod inspect;
mod lane;
mod limits;
mod output;
mod registry;
mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

pub use cache::{CacheStatus, CompileCache};
pub use component::{LoadError, ToolComponent, ToolInfo, valid_tool_name};
pub use events::{CallEvent, EventSink, LogLevel};
pub use grants::{DirGrant, DirMode, Grants};
pub use idle::use_idle_time;
pub use inspect::inspect;
pub use limits::Limits;
pub use output::CallFailure;
pub(crate) use output::cut_to;
pub use registry::{
    LoadProblem, Registry, RegistryHandle, ToolEntry, ToolSource, ToolsChanged, WatchGuard,
};

use bindings::ToolProvider;
use state::HostState;

/// Engine-wide settings: fixed for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSettings {
    /// Calls that may run at once, each in an instance of its own. Calls
    /// beyond it fail fast with "unavailable". The pooling allocator has a
    /// few slots more (two per CPU, at most 32) for finished instances whose
    /// teardown waits for their worker to idle, and for spare instances
    /// prepared for a next call (see [`use_idle_time`]).
    pub max_instances: u32,
    /// The most memory any one call may be given, in bytes (the ceiling of
    /// every per-tool `memory_bytes`).
    pub max_memory_bytes: u64,
    /// Meter fuel. Needed for per-tool `fuel` budgets; costs some speed.
    pub fuel: bool,
    /// Interval of the epoch ticker that interrupts running guests, in ms.
    /// Deadlines and cancellation act within about one tick.
    pub epoch_tick_ms: u64,
    /// Dirty pages of each memory slot, in bytes, that are reset in place
    /// (copied back from the module's image or zeroed) when an instance ends,
    /// instead of being handed back to the kernel. Pages past it are
    /// decommitted. 0 hands every page back.
    pub keep_resident_bytes: u64,
    /// Start calls that arrive while their worker thread is busy back to
    /// back, so that all but the first find the CPU's caches warm (see
    /// `lane`). Off: each call starts when its request reaches it.
    pub batch_calls: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            max_instances: 256,
            max_memory_bytes: 512 << 20,
            fuel: false,
            epoch_tick_ms: 5,
            keep_resident_bytes: 1 << 20,
            batch_calls: true,
        }
    }
}

/// Everything a call needs besides the tool and its arguments.
#[derive(Debug)]
pub struct CallSpec {
    /// The capabilities granted for this call.
    pub grants: Grants,
    /// The bounds of this call.
    pub limits: Limits,
    /// Where log and progress events go.
    pub events: EventSink,
    /// Cancelled by the caller to stop the call promptly.
    pub cancel: CancellationToken,
}

impl CallSpec {
    /// No grants, default limits, events discarded, never cancelled.
    pub fn bare() -> Self {
        CallSpec {
            grants: Grants::default(),
            limits: Limits::default(),
            events: EventSink::discard(),
            cancel: CancellationToken::new(),
        }
    }
}

/// Measurements of one call, for logs, metrics and audit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallStats {
    /// Store creation and instantiation.
    pub instantiate: Duration,
    /// The guest's `call-tool`, until it returned or was stopped.
    pub execute: Duration,
    /// Fuel consumed, when metered.
    pub fuel_consumed: Option<u64>,
    /// Highest linear memory held by the guest, in bytes.
    pub peak_memory: u64,
    /// Log/progress events dropped over the call's budget.
    pub events_dropped: u32,
    /// Database handles the guest tried to open without a grant (not
    /// granted to the tool, or not for this tenant), each once, in order.
    pub denied_databases: Vec<String>,
}

/// The result of one call.
#[derive(Debug)]
pub struct CallOutcome {
    /// The MCP result, or why there is none.
    pub result: Result<rmcp::model::CallToolResult, CallFailure>,
    /// What the call cost.
    pub stats: CallStats,
}

/// The engine, the linker with every host interface, and the epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    settings: EngineSettings,
    in_place_reset_bytes: u64,
    databases: Arc<crate::db::Databases>,
    /// Calls between their start and their end; at most `max_instances`.
    running: Arc<crate::bounded::Bounded>,
    /// Calls queued in a lane (see [`Self::calls_started_together`]).
    started_together: AtomicU64,
    /// Pool slots beyond `max_instances` for finished Stores whose teardown
    /// waits for their worker to idle, and for spare instances (see `idle`).
    headroom: Arc<idle::Headroom>,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Creates the engine (pooling allocator, epoch interruption) and links
    /// WASI 0.2 and the `cordon:tool` host interfaces.
    pub fn new(settings: EngineSettings) -> anyhow::Result<Self> {
        let in_place_reset_bytes = in_place_reset_bytes(&settings);
        let headroom = idle::Headroom::for_this_machine();
        let slots = settings
            .max_instances
            .max(1)
            .saturating_add(headroom.capacity());
        let engine = Engine::new(&engine_config(&settings, slots, in_place_reset_bytes))
            .map_err(|e| anyhow::anyhow!("cannot create the wasm engine: {e}"))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| anyhow::anyhow!("cannot link WASI: {e}"))?;
        host::add_quota_to_linker(&mut linker)
            .map_err(|e| anyhow::anyhow!("cannot link the directory quotas: {e}"))?;
        ToolProvider::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| anyhow::anyhow!("cannot link the cordon:tool interfaces: {e}"))?;
        let ticker = EpochTicker::start(
            engine.clone(),
            Duration::from_millis(settings.epoch_tick_ms.max(1)),
        )
        .map_err(|e| anyhow::anyhow!("cannot start the epoch thread: {e}"))?;
        Ok(Runtime {
            engine,
            linker,
            started_together: AtomicU64::new(0),
            running: Arc::new(crate::bounded::Bounded::new(
                settings.max_instances as usize,
            )),
            settings,
            in_place_reset_bytes,
            databases: Arc::default(),
            headroom,
            _ticker: ticker,
        })
    }

    /// Dirty memory per instance slot that is reset in place when a call
    /// ends: `keep_resident_bytes` where the kernel has PAGEMAP_SCAN, else 0.
    pub fn in_place_reset_bytes(&self) -> u64 {
        self.in_place_reset_bytes
    }

    /// Instances that are not running a call: finished ones waiting for
    /// their worker thread to idle to be torn down, and spares prepared for
    /// a next call (see [`use_idle_time`]).
    pub fn idle_instances(&self) -> IdleInstances {
        IdleInstances {
            awaiting_teardown: self.headroom.kept(),
            spares: self.headroom.spares(),
        }
    }

    /// Calls so far that arrived while their worker was busy and were
    /// started together with others (`batch_calls`).
    pub fn calls_started_together(&self) -> u64 {
        self.started_together.load(Ordering::Relaxed)
    }

    /// The database backends calls use.
    pub fn databases(&self) -> &Arc<crate::db::Databases> {
        &self.databases
    }

    /// Serves database grants from `databases` (none are served without:
    /// opening a PostgreSQL handle then fails with "unavailable").
    pub fn with_databases(mut self, databases: Arc<crate::db::Databases>) -> Self {
        self.databases = databases;
        self
    }

    /// The engine, e.g. for a [`CompileCache`].
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine-wide settings.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Runs tool `name` of `component` with `arguments` (already validated
    /// against its input schema by the caller, see [`ToolEntry::check_arguments`])
    /// in a fresh instance, within `spec`'s limits.
    pub async fn call(
        self: &Arc<Self>,
        component: &Arc<ToolComponent>,
        name: &str,
        arguments: &str,
        spec: CallSpec,
    ) -> CallOutcome {
        // Held from the call's start, queued or running, until `call`
        // returns or its future is dropped.
        let Some(running) = self.running.enter() else {
            return CallOutcome {
                result: Err(CallFailure::Unavailable(format!(
                    "all {} instance slots are in use (runtime.engine.max_instances)",
                    self.settings.max_instances
                ))),
                stats: CallStats::default(),
            };
        };
        // A call whose worker is busy (it has not idled since its last call
        // began; on a runtime without the idle hooks: another call is in
        // progress) waits in the lane for others to start with. A call alone
        // starts at once: the lane would only add a turn of the scheduler to
        // its latency.
        if self.settings.batch_calls
            && idle::busy().unwrap_or_else(|| self.running.held() > 1)
            && let Some(lane) = lane::this_thread()
        {
            let runtime = self.clone();
            let component = component.clone();
            let name = name.to_owned();
            let arguments = arguments.to_owned();
            self.started_together.fetch_add(1, Ordering::Relaxed);
            let call = async move {
                let _running = running;
                runtime
                    .call_in_place(&component, &name, &arguments, spec)
                    .await
            };
            return lane
                .run(tracing::Instrument::in_current_span(call))
                .await
                .unwrap_or_else(|| CallOutcome {
                    result: Err(CallFailure::Unavailable(
                        "the call ended without an outcome (its runtime is shutting down, or it panicked)"
                            .into(),
                    )),
                    stats: CallStats::default(),
                });
        }
        let _running = running;
        self.call_in_place(component, name, arguments, spec).await
    }

    /// [`Self::call`], on the caller's task.
    async fn call_in_place(
        &self,
        component: &Arc<ToolComponent>,
        name: &str,
        arguments: &str,
        spec: CallSpec,
    ) -> CallOutcome {
        let CallSpec {
            grants,
            limits,
            events,
            cancel,
        } = spec;
        let mut stats = CallStats::default();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + limits.timeout;

        let CallStore {
            mut store,
            stdio,
            ready,
            prepared_in,
        } = match self.store_for_call(component, &grants, &limits, events) {
            Ok(parts) => parts,
            Err(e) => {
                return CallOutcome {
                    result: Err(CallFailure::Unavailable(e)),
                    stats,
                };
            }
        };

        let run = async {
            // Instantiation errors are the outer error, the guest's own
            // failures the inner one.
            let call_tool = match ready {
                Some(call_tool) => call_tool,
                None => component.instantiate(&mut store).await?,
            };
            let instantiated = Instant::now();
            let result = call_tool
                .typed()
                .call_async(&mut store, (name, arguments))
                .await
                .map(|(result,)| result);
            Ok::<_, wasmtime::Error>((instantiated, result))
        };

        // The deadline's timer is polled (and so registered) only once the
        // call has had to wait: registering a tokio timer wakes the worker
        // thread parked on the timer driver, which cost a thread wake-up per
        // call when most calls finish on their first poll. A call that waits
        // (guest yield at an epoch tick, or a host future) is bounded as
        // before; a deadline already past is seen at its first wait, within
        // one epoch tick.
        let finished = tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(CallFailure::Cancelled),
            finished = run => Ok(finished),
            _ = tokio::time::sleep_until(deadline) => Err(CallFailure::Timeout(limits.timeout)),
        };
        let ended = Instant::now();

        let result = match finished {
            Err(failure) => {
                stats.execute = ended - started;
                Err(failure)
            }
            Ok(Err(e)) => {
                stats.instantiate = prepared_in + (ended - started);
                Err(self.classify_trap(&store, &limits, &stdio, e, true))
            }
            Ok(Ok((instantiated, result))) => {
                stats.instantiate = prepared_in + (instantiated - started);
                stats.execute = ended - instantiated;
                match result {
                    Err(e) => Err(self.classify_trap(&store, &limits, &stdio, e, false)),
                    Ok(Ok(result)) => output::check_size(&result, limits.max_output_bytes)
                        .and_then(|()| output::to_mcp(result))
                        .and_then(|r| component.check_output(name, r)),
                    Ok(Err(bindings::types::CallError::UnknownTool(n))) => {
                        Err(CallFailure::UnknownTool(n))
                    }
                    Ok(Err(bindings::types::CallError::InvalidArguments(m))) => {
                        Err(CallFailure::InvalidArguments(m))
                    }
                    Ok(Err(bindings::types::CallError::Failed(m))) => {
                        Err(CallFailure::ToolFailed(m))
                    }
                }
            }
        };

        stats.peak_memory = store.data().limiter.peak_memory as u64;
        stats.events_dropped = store.data().events.dropped();
        stats.denied_databases = std::mem::take(&mut store.data_mut().databases.denied);
        if let Some(budget) = limits.fuel.filter(|_| self.settings.fuel) {
            stats.fuel_consumed = store.get_fuel().ok().map(|left| budget - left.min(budget));
        }
        log_stdio(name, &stdio);
        idle::finish(store, || idle::Recipe {
            component: component.clone(),
            grants,
            limits,
            databases: self.databases.clone(),
            engine: self.engine.clone(),
            fuel: self.settings.fuel,
            headroom: self.headroom.clone(),
        });
        CallOutcome { result, stats }
    }

    /// The Store a call runs in: this worker's spare if it was made for
    /// exactly this call (already instantiated, given the call's events,
    /// deadline and fuel), else a new one.
    fn store_for_call(
        &self,
        component: &Arc<ToolComponent>,
        grants: &Grants,
        limits: &Limits,
        events: EventSink,
    ) -> Result<CallStore, String> {
        if let Some(spare) =
            idle::take_spare(component, grants, limits, &self.databases, &self.engine)
        {
            let idle::Spare {
                mut store,
                stdio,
                call_tool,
                prepared_in,
                ..
            } = spare;
            store.data_mut().attach_events(events, limits);
            start_budgets(&mut store, self.settings.fuel, limits).map_err(|e| e.to_string())?;
            return Ok(CallStore {
                store,
                stdio,
                ready: Some(call_tool),
                prepared_in,
            });
        }
        let (state, stdio) = HostState::new(
            grants,
            limits,
            events,
            self.databases.clone(),
            component.imports_wasi(),
        )
        .map_err(|e| e.to_string())?;
        let store = self.new_store(state, limits).map_err(|e| e.to_string())?;
        Ok(CallStore {
            store,
            stdio,
            ready: None,
            prepared_in: Duration::ZERO,
        })
    }

    /// A Store for one call of this runtime (see [`new_store`]).
    fn new_store(&self, state: HostState, limits: &Limits) -> wasmtime::Result<Store<HostState>> {
        new_store(&self.engine, self.settings.fuel, state, limits)
    }

    /// Turns a wasmtime error into the failure the caller should see.
    fn classify_trap(
        &self,
        store: &Store<HostState>,
        limits: &Limits,
        stdio: &state::Stdio,
        error: wasmtime::Error,
        instantiating: bool,
    ) -> CallFailure {
        if store.data().limiter.memory_limit_hit {
            return CallFailure::MemoryLimit(limits.memory_bytes);
        }
        let trap = error.downcast_ref::<wasmtime::Trap>().copied();
        if trap == Some(wasmtime::Trap::OutOfFuel) {
            return CallFailure::FuelExhausted(limits.fuel.unwrap_or(0));
        }
        let stderr = stdio.stderr.contents();
        let stderr = String::from_utf8_lossy(&stderr);
        if let Some(panic) = panic_message(&stderr) {
            return CallFailure::Panicked(panic);
        }
        if instantiating && trap.is_none() {
            // Not a guest fault: e.g. the pool is full or a limit is too small.
            return CallFailure::Unavailable(format!("{error:#}"));
        }
        let what = match trap {
            Some(trap) => trap.to_string(),
            None => format!("{error:#}"),
        };
        CallFailure::Trap(what)
    }
}

/// A Store for one call, with its limiter, epoch deadline and fuel set.
fn new_store(
    engine: &Engine,
    fuel: bool,
    state: HostState,
    limits: &Limits,
) -> wasmtime::Result<Store<HostState>> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    // Yield to the executor at every epoch tick: a guest that never calls
    // the host still gives its tokio worker back, and the deadline and
    // cancellation branches of `call` get polled.
    store.epoch_deadline_async_yield_and_update(1);
    start_budgets(&mut store, fuel, limits)?;
    Ok(store)
}

/// Starts a call's epoch deadline and fuel afresh: at the Store's creation,
/// and again when a call takes a spare made earlier.
fn start_budgets(
    store: &mut Store<HostState>,
    fuel: bool,
    limits: &Limits,
) -> wasmtime::Result<()> {
    store.set_epoch_deadline(1);
    if fuel {
        store.set_fuel(limits.fuel.unwrap_or(u64::MAX))?;
    }
    Ok(())
}

/// The Store a call runs in, and what was done ahead of the call.
struct CallStore {
    store: Store<HostState>,
    stdio: state::Stdio,
    /// The instance's `call-tool`, when a spare was already instantiated.
    ready: Option<component::CallToolExport>,
    /// What creating the spare's Store and instantiating took.
    prepared_in: Duration,
}

/// Instances not running a call (see [`Runtime::idle_instances`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleInstances {
    /// Finished calls' instances whose worker has not idled since.
    pub awaiting_teardown: u32,
    /// Instances prepared for a next call.
    pub spares: u32,
}

/// Extracts a Rust panic message ("panicked at ...:\nMESSAGE") from stderr.
fn panic_message(stderr: &str) -> Option<String> {
    let at = stderr.find("panicked at ")?;
    let rest = &stderr[at + "panicked at ".len()..];
    let message = match rest.split_once(":\n") {
        Some((_location, message)) => message.lines().next().unwrap_or_default(),
        None => rest.lines().next().unwrap_or_default(),
    };
    Some(message.trim().chars().take(1024).collect())
}

fn log_stdio(tool: &str, stdio: &state::Stdio) {
    for (stream, pipe) in [("stdout", &stdio.stdout), ("stderr", &stdio.stderr)] {
        let bytes = pipe.contents();
        if !bytes.is_empty() {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]);
            tracing::debug!(tool, stream, bytes = bytes.len(), "guest output: {text}");
        }
    }
}

/// How much dirty memory per slot is reset in place: the configured budget
/// where the kernel has PAGEMAP_SCAN, else none.
fn in_place_reset_bytes(settings: &EngineSettings) -> u64 {
    if settings.keep_resident_bytes > 0 && PoolingAllocationConfig::is_pagemap_scan_available() {
        settings.keep_resident_bytes
    } else {
        0
    }
}

/// The most of each table slot kept resident: tables are small next to
/// linear memories (a Rust tool's is a few KiB).
const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// `slots`: the pool's instances, `max_instances` and the teardown headroom.
fn engine_config(settings: &EngineSettings, slots: u32, in_place_reset_bytes: u64) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.consume_fuel(settings.fuel);
    let instances = slots.max(1);
    let mut pool = PoolingAllocationConfig::default();
    // A Rust tool component holds one memory and a handful of core instances
    // and tables; these totals leave room for components built by other
    // toolchains, and a component that needs more fails to instantiate with
    // a clear error rather than starving the pool.
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(10))
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(10))
        .total_stacks(instances)
        .max_memory_size(usize::try_from(settings.max_memory_bytes).unwrap_or(usize::MAX));
    // `max_unused_warm_slots` stays at wasmtime's default (100): at 0 the
    // pool reuses the last slots, but two tools called in turn then keep
    // taking each other's memory slot, and remapping a slot to another
    // module's image costs a page fault per page touched. It did not
    // measurably speed up the single-tool benchmark either.
    // A fresh instance would otherwise start on pages the kernel just took
    // away: a page fault per page it touches (copy-on-write for its data)
    // and a TLB shootdown across CPUs for each release. With PAGEMAP_SCAN
    // only the pages the last call dirtied are reset, in place, before the
    // slot is reused; the next instance sees exactly the module's initial
    // memory, as with madvise. Costs at most this much resident memory per
    // used slot. Without the ioctl (Linux < 6.7) wasmtime would memset the
    // whole budget on every release, which costs more than the faults.
    let keep_resident = usize::try_from(in_place_reset_bytes).unwrap_or(usize::MAX);
    // A slot goes back to the pool's free list only when its decommit batch
    // is flushed, and the pool hands out the slot freed last. Returning
    // pages to the kernel (madvise) makes every CPU running one of our
    // threads flush its TLB, so without the in-place reset, where every
    // call decommits, a large batch turns one interrupt per call into one
    // per batch. With it, each freed memory and table queues one range that
    // is empty unless the call dirtied more than `keep_resident`. A batch of
    // 32 then kept slots out of reach, so the next call ran in a slot last
    // used 32 calls ago, on cold caches (~5 % of server CPU per call at 16
    // clients in the transport benchmark). Any batch above 1 also takes the
    // shared queue's lock and makes one `process_madvise` call per flush
    // over the empty ranges; a batch of 1 is flushed on the spot, and
    // wasmtime skips a lone empty range without a system call (~1.2 µs per
    // call less than batches of 4, in a split profile at 16 clients).
    pool.decommit_batch_size(if keep_resident > 0 { 1 } else { 32 });
    pool.linear_memory_keep_resident(keep_resident)
        .table_keep_resident(keep_resident.min(TABLE_KEEP_RESIDENT))
        .pagemap_scan(if keep_resident > 0 {
            wasmtime::Enabled::Yes
        } else {
            wasmtime::Enabled::No
        });
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

/// A thread that advances the engine's epoch at a fixed interval, so running
/// guests reach their epoch deadline and yield. Stopped on drop.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine, tick: Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cordon-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
