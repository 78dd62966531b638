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

    /// One more, held until the guard is dropped; `None` at the bound. The
    /// guard owns its share of the count, so it can live in a `'static`
    /// future (a call queued in a lane, a subscription stream).
    pub fn enter(self: &Arc<Self>) -> Option<Held> {
        // Lazily: a guard made and dropped at the bound would give back a
        // place it never took.
        let taken = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| Held(self.clone()))
    }
}

/// One of a [`Bounded`] count, given back on drop.
#[derive(Debug)]
pub struct Held(Arc<Bounded>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_holds_and_a_dropped_guard_frees_its_place() {
        let bounded = Arc::new(Bounded::new(2));
        let a = bounded.enter().unwrap();
        let _b = bounded.enter().unwrap();
        assert_eq!(bounded.held(), 2);
        assert!(bounded.enter().is_none());
        // A refused attempt takes no place and gives none back.
        assert!(bounded.enter().is_none());
        assert_eq!(bounded.held(), 2);
        drop(a);
        assert_eq!(bounded.held(), 1);
        assert!(bounded.enter().is_some());
    }
}
