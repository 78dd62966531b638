//! What a worker thread does when it runs out of work: it tears down the
//! Store of the call it finished last, and prepares a fresh instance for the
//! next call.
//!
//! Both are parts of a call that need not sit between the request and the
//! reply. Dropping a Store frees its instance (the pooling allocator resets
//! the pages the call dirtied); creating a Store and instantiating allocates
//! one. Together they are about half of the sandbox's cost for a small call.
//! On a tokio runtime built with [`use_idle_time`], a worker keeps the Store
//! of its last call and drops it once it has nothing else to do, after the
//! reply has gone out. Then, if its last two calls ran the same component
//! with the same grants and limits, it creates a Store and an instance from
//! them: a *spare*. The next call on that worker with exactly the same
//! component, grants and limits runs in the spare instead of instantiating.
//! (When consecutive calls differ, no spare is made: it would go unused.) Everything stays on
//! the worker's own core: dropping on another thread costs more (cold
//! caches, and a TLB flush on the core that ran the call; see BENCHMARKS.md).
//!
//! What this keeps, and what it does not change:
//! - Every call still runs in an instance no other call has used. A spare is
//!   built from the grants its call would have got; a call whose component,
//!   grants (so tenant) or limits differ in any way never gets it. Grants
//!   with a directory quota get no spare: the quota's usage is counted when
//!   the state is built, and must be counted when the call starts.
//! - Only the instance's memory waits: the event sink, resources, database
//!   handles and WASI context of a finished call are released as it ends. A
//!   spare's event sink is the call's, attached when the call takes it, and
//!   its deadline and fuel are set then.
//! - Instantiating runs a component's start functions, if it has any. A
//!   spare that does not instantiate at once (a start function that waits,
//!   traps or runs past [`SPARE_TICKS`] epoch ticks) is dropped, and after
//!   three such failures a loaded component gets no more spares.
//! - Kept Stores and spares hold pool slots of their own (the [`Headroom`]
//!   the engine adds to `max_instances`), so a running call never waits for
//!   one. When the headroom is used up, or on a thread without the hooks
//!   (e.g. `#[tokio::test]`), calls instantiate and drop inline as before.
//!   A busy worker that never idles drops its kept Store when it finishes
//!   the next call.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use wasmtime::{Engine, Store};

use super::component::{CallToolExport, ToolComponent};
use super::events::EventSink;
use super::grants::Grants;
use super::limits::Limits;
use super::state::{HostState, Stdio};

thread_local! {
    /// Set by the idle hook: this thread is a worker that will run it again.
    static IDLES: Cell<bool> = const { Cell::new(false) };
    static KEPT: RefCell<Option<Kept>> = const { RefCell::new(None) };
    /// What the last call on this thread ran in.
    static LAST: RefCell<Option<Recipe>> = const { RefCell::new(None) };
    /// Set when a call ends, taken when the thread idles: whether that call
    /// ran in what the call before it ran in.
    static FINISHED: Cell<Option<bool>> = const { Cell::new(None) };
    static SPARE: RefCell<Option<Spare>> = const { RefCell::new(None) };
    /// Set by the idle hook, cleared by [`busy`] as each call starts.
    static IDLED: Cell<bool> = const { Cell::new(false) };
}

/// Whether this worker has been busy since the last call on it began: it
/// has not idled since. `None` on a thread without the hooks. (Used to let
/// calls under load start together; see `lane`.)
pub(crate) fn busy() -> Option<bool> {
    IDLES.get().then(|| !IDLED.replace(false))
}

/// Installs the hooks that let this runtime's workers do a call's teardown
/// and the next call's instantiation while idle. Cordon's own runtime has
/// them; without them every call instantiates and tears down inline.
pub fn use_idle_time(builder: &mut tokio::runtime::Builder) -> &mut tokio::runtime::Builder {
    builder
        .on_thread_park(worker_idle)
        .on_thread_stop(worker_stopped)
}

fn worker_idle() {
    IDLES.set(true);
    IDLED.set(true);
    // Each is taken out of its thread-local before it is dropped or used:
    // that work must not run while a thread-local is borrowed.
    drop(KEPT.take());
    let Some(repeated) = FINISHED.take() else {
        return;
    };
    // A spare made for another call than the last one is of no use now.
    let stale = SPARE.with(|spare| {
        LAST.with(|last| match (&*spare.borrow(), &*last.borrow()) {
            (Some(spare), Some(last)) => !spare.recipe.same_as(last),
            (Some(_), None) => true,
            (None, _) => false,
        })
    });
    if stale {
        drop(SPARE.take());
    }
    // A spare only after the same call twice in a row: when consecutive
    // calls differ (other tenants, other tools), it would go unused.
    if !repeated || SPARE.with(|spare| spare.borrow().is_some()) {
        return;
    }
    let Some(recipe) = LAST.with(|last| last.borrow().clone()) else {
        return;
    };
    let spare = Spare::prepare(recipe);
    SPARE.set(spare);
}

fn worker_stopped() {
    drop(KEPT.take());
    drop(SPARE.take());
    drop(LAST.take());
}

/// What a call ran in: the component, the grants and limits its state was
/// built from, and the runtime's parts that built its Store.
#[derive(Clone)]
pub(crate) struct Recipe {
    pub(crate) component: Arc<ToolComponent>,
    pub(crate) grants: Grants,
    pub(crate) limits: Limits,
    pub(crate) databases: Arc<crate::db::Databases>,
    pub(crate) engine: Engine,
    pub(crate) fuel: bool,
    pub(crate) headroom: Arc<Headroom>,
}

impl Recipe {
    /// Whether a Store built from this recipe is exactly what a call of
    /// `component` with `grants` and `limits` on `engine` would build.
    fn matches(
        &self,
        component: &Arc<ToolComponent>,
        grants: &Grants,
        limits: &Limits,
        databases: &Arc<crate::db::Databases>,
        engine: &Engine,
    ) -> bool {
        Arc::ptr_eq(&self.component, component)
            && Engine::same(&self.engine, engine)
            && Arc::ptr_eq(&self.databases, databases)
            && self.limits == *limits
            && self.grants == *grants
    }

    fn same_as(&self, other: &Recipe) -> bool {
        other.matches(
            &self.component,
            &self.grants,
            &self.limits,
            &self.databases,
            &self.engine,
        )
    }

    /// Whether a spare may be prepared from it at all.
    fn allows_spares(&self) -> bool {
        self.component.spares_allowed() && self.grants.dirs.iter().all(|d| d.quota_bytes.is_none())
    }
}

/// Epoch ticks a spare's instantiation may run for, at most (the worker is
/// idle, but should not be kept long from its next request).
const SPARE_TICKS: u64 = 3;

/// A fresh instance, prepared for the next call of its recipe.
pub(crate) struct Spare {
    // Field order is drop order: the Store (and its pool slot) goes before
    // the claim on the headroom is given back.
    pub(crate) store: Store<HostState>,
    pub(crate) stdio: Stdio,
    pub(crate) call_tool: CallToolExport,
    /// What creating the Store and instantiating took.
    pub(crate) prepared_in: Duration,
    recipe: Recipe,
    _claim: HeadroomClaim,
}

impl Spare {
    fn prepare(recipe: Recipe) -> Option<Spare> {
        if !recipe.allows_spares() {
            return None;
        }
        let claim = recipe.headroom.claim(Use::Spare)?;
        let started = Instant::now();
        let (state, stdio) = HostState::new(
            &recipe.grants,
            &recipe.limits,
            EventSink::discard(),
            recipe.databases.clone(),
            recipe.component.imports_wasi(),
        )
        .ok()?;
        let mut store =
            super::new_store(&recipe.engine, recipe.fuel, state, &recipe.limits).ok()?;
        // Start functions get a few epoch ticks, not one: an instantiation
        // that merely spans a tick would otherwise yield and be lost. The
        // call that takes the spare starts its own deadline.
        store.set_epoch_deadline(SPARE_TICKS);
        let instantiated = {
            // One poll: an instantiation that has to wait (or yields at an
            // epoch tick) is not finished here but dropped.
            let mut instantiating = std::pin::pin!(recipe.component.instantiate(&mut store));
            match instantiating
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
            {
                Poll::Ready(Ok(call_tool)) => Some(call_tool),
                Poll::Ready(Err(_)) | Poll::Pending => None,
            }
        };
        if instantiated.is_none() {
            recipe.component.spare_failed();
        }
        Some(Spare {
            call_tool: instantiated?,
            prepared_in: started.elapsed(),
            store,
            stdio,
            recipe,
            _claim: claim,
        })
    }
}

/// This worker's spare, if it was made for exactly this call.
pub(crate) fn take_spare(
    component: &Arc<ToolComponent>,
    grants: &Grants,
    limits: &Limits,
    databases: &Arc<crate::db::Databases>,
    engine: &Engine,
) -> Option<Spare> {
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        let fits = spare.as_ref().is_some_and(|s| {
            s.recipe
                .matches(component, grants, limits, databases, engine)
        });
        if fits { spare.take() } else { None }
    })
}

/// Ends a finished call's Store: later, when this worker idles, if it can,
/// and remembers what the call ran in, for the next spare. Otherwise drops
/// the Store now.
pub(crate) fn finish(mut store: Store<HostState>, recipe: impl FnOnce() -> Recipe) {
    if !IDLES.get() {
        return;
    }
    let recipe = recipe();
    // A Store kept from an earlier call (this worker has not idled since)
    // goes first, which also frees its claim.
    drop(KEPT.take());
    let claim = recipe.headroom.claim(Use::Kept);
    let repeated = LAST.with(|last| last.borrow().as_ref().is_some_and(|l| l.same_as(&recipe)));
    FINISHED.set(Some(repeated));
    // The previous recipe is dropped outside the borrow.
    drop(LAST.replace(Some(recipe)));
    let Some(claim) = claim else {
        return;
    };
    store.data_mut().release();
    KEPT.set(Some(Kept {
        _store: store,
        _claim: claim,
    }));
}

/// A finished Store waiting for its worker to idle.
struct Kept {
    // Drop order as in `Spare`.
    _store: Store<HostState>,
    _claim: HeadroomClaim,
}

/// The pool slots set aside for kept Stores and spares, beyond
/// `max_instances`.
#[derive(Debug)]
pub(crate) struct Headroom {
    capacity: u32,
    /// Slots claimed, of either use: never above `capacity`.
    used: AtomicU32,
    kept: AtomicU32,
    spares: AtomicU32,
}

#[derive(Clone, Copy)]
enum Use {
    Kept,
    Spare,
}

impl Headroom {
    /// Two slots per CPU (tokio's default worker count: one kept Store and
    /// one spare each), at most 32.
    pub(crate) fn for_this_machine() -> Arc<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Arc::new(Headroom {
            capacity: u32::try_from(cpus.clamp(1, 16) * 2).unwrap_or(32),
            used: AtomicU32::new(0),
            kept: AtomicU32::new(0),
            spares: AtomicU32::new(0),
        })
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Stores kept for teardown right now.
    pub(crate) fn kept(&self) -> u32 {
        self.kept.load(Ordering::Relaxed)
    }

    /// Spare instances right now.
    pub(crate) fn spares(&self) -> u32 {
        self.spares.load(Ordering::Relaxed)
    }

    fn counter(&self, usage: Use) -> &AtomicU32 {
        match usage {
            Use::Kept => &self.kept,
            Use::Spare => &self.spares,
        }
    }

    fn claim(self: &Arc<Self>, usage: Use) -> Option<HeadroomClaim> {
        // Exact: a running call must always find a pool slot.
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.capacity).then_some(used + 1)
            })
            .ok()?;
        self.counter(usage).fetch_add(1, Ordering::AcqRel);
        Some(HeadroomClaim {
            headroom: self.clone(),
            usage,
        })
    }
}

/// One slot of a [`Headroom`], given back on drop.
struct HeadroomClaim {
    headroom: Arc<Headroom>,
    usage: Use,
}

impl Drop for HeadroomClaim {
    fn drop(&mut self) {
        self.headroom
            .counter(self.usage)
            .fetch_sub(1, Ordering::AcqRel);
        self.headroom.used.fetch_sub(1, Ordering::AcqRel);
    }
}
