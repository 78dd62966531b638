//! Tearing down a finished call's Store when its worker thread goes idle.
//!
//! Dropping a Store frees its instance: the pooling allocator resets the
//! pages the call dirtied and returns the slot. That is about a third of the
//! sandbox's cost for a small call, and done inline it sits between the
//! guest's answer and the reply. On a tokio runtime built with
//! [`tear_down_when_idle`], a worker keeps the last finished Store and drops
//! it when it runs out of work, after the reply has gone out. It stays on
//! the same core: dropping it on another thread costs more (cold caches, and
//! a TLB flush on the core that ran the call; see BENCHMARKS.md).
//!
//! What is deferred is only the instance's memory. Everything with an effect
//! outside the Store (event sink, resources and database handles, WASI
//! context) is released when the call ends. A kept Store holds a pool slot
//! of its own (the [`Headroom`] the engine adds to `max_instances`), so
//! running calls never wait for one; when the headroom is used up, or on a
//! thread without the hook (e.g. `#[tokio::test]`), the Store is dropped at
//! once as before. A busy worker that never idles drops its kept Store when
//! it finishes the next call.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use wasmtime::Store;

use super::state::HostState;

thread_local! {
    /// Set by the idle hook: this thread is a worker that will run it again.
    static IDLES: Cell<bool> = const { Cell::new(false) };
    static KEPT: RefCell<Option<Kept>> = const { RefCell::new(None) };
}

/// Installs the hooks that let this runtime's workers tear finished Stores
/// down when idle. Cordon's own runtime has them; without them every Store
/// is dropped as its call ends.
pub fn tear_down_when_idle(builder: &mut tokio::runtime::Builder) -> &mut tokio::runtime::Builder {
    builder
        .on_thread_park(worker_idle)
        .on_thread_stop(worker_idle)
}

fn worker_idle() {
    IDLES.set(true);
    // Taken out before it is dropped: the drop must not run while the
    // thread-local is borrowed.
    let kept = KEPT.with(|k| k.borrow_mut().take());
    drop(kept);
}

/// The pool slots set aside for kept Stores, beyond `max_instances`.
#[derive(Debug)]
pub(crate) struct Headroom {
    capacity: u32,
    used: AtomicU32,
}

impl Headroom {
    /// One slot per CPU (tokio's default worker count), at most 16.
    pub(crate) fn for_this_machine() -> Arc<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Arc::new(Headroom {
            capacity: u32::try_from(cpus.clamp(1, 16)).unwrap_or(16),
            used: AtomicU32::new(0),
        })
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Stores kept right now.
    pub(crate) fn used(&self) -> u32 {
        self.used.load(Ordering::Relaxed)
    }

    fn claim(self: &Arc<Self>) -> Option<HeadroomClaim> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.capacity).then_some(used + 1)
            })
            .ok()
            .map(|_| HeadroomClaim(self.clone()))
    }
}

/// One slot of a [`Headroom`], given back on drop.
struct HeadroomClaim(Arc<Headroom>);

impl Drop for HeadroomClaim {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A finished Store waiting for its worker to idle. Field order matters:
/// the Store (and its slot) goes before the claim on the headroom.
struct Kept {
    _store: Store<HostState>,
    _claim: HeadroomClaim,
}

/// Ends a finished call's Store: later, when this worker idles, if it can;
/// otherwise now.
pub(crate) fn retire(mut store: Store<HostState>, headroom: &Arc<Headroom>) {
    if !IDLES.get() {
        return;
    }
    // A Store kept from an earlier call (this worker has not idled since)
    // goes first, which also frees its claim.
    let earlier = KEPT.with(|k| k.borrow_mut().take());
    drop(earlier);
    let Some(claim) = headroom.claim() else {
        return;
    };
    store.data_mut().release();
    let kept = Kept {
        _store: store,
        _claim: claim,
    };
    KEPT.with(|k| *k.borrow_mut() = Some(kept));
}
