//! A count of things held at once, with a bound, and the guard that holds
//! one of them: the sandbox's running calls, the open subscription streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// At most `max` held at once.
#[derive(Debug)]
pub struct Bounded {
    held: AtomicUsize,
    max: usize,
}

impl Bounded {
    /// Nothing held yet; at most `max` at once.
    pub const fn new(max: usize) -> Self {
        Bounded {
            held: AtomicUsize::new(0),
            max,
        }
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// How many are held right now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// One more, held until the guard is dropped; `None` at the bound.
    pub fn enter(&self) -> Option<Held<'_>> {
        // Lazily: a guard made and dropped at the bound would give back a
        // place it never took.
        self.take_place().then(|| Held(self))
    }

    /// [`Self::enter`], with a guard that owns its share of the count (for
    /// a holder that must be `'static`).
    pub fn enter_owned(self: &Arc<Self>) -> Option<HeldOwned> {
        self.take_place().then(|| HeldOwned(self.clone()))
    }

    fn take_place(&self) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One of a [`Bounded`] count, given back on drop.
#[derive(Debug)]
pub struct Held<'a>(&'a Bounded);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

/// [`Held`], owning its [`Bounded`].
#[derive(Debug)]
pub struct HeldOwned(Arc<Bounded>);

impl Drop for HeldOwned {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_holds_and_a_dropped_guard_frees_its_place() {
        let bounded = Bounded::new(2);
        let a = bounded.enter().unwrap();
        let _b = bounded.enter().unwrap();
        assert!(bounded.enter().is_none());
        // A refused attempt takes no place and gives none back.
        assert!(bounded.enter().is_none());
        drop(a);
        assert!(bounded.enter().is_some());
    }

    #[test]
    fn owned_guards_share_the_same_bound() {
        let bounded = Arc::new(Bounded::new(2));
        let a = bounded.enter_owned().unwrap();
        let _b = bounded.enter().unwrap();
        assert!(bounded.enter_owned().is_none());
        assert!(bounded.enter().is_none());
        assert!(bounded.enter_owned().is_none());
        drop(a);
        assert!(bounded.enter_owned().is_some());
    }
}
