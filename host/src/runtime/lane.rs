//! Calls that arrive together start together.
//!
//! A fresh instance costs two to three times as much when the CPU's caches
//! no longer hold what the last instance touched (the engine's and the
//! component's data, pool slots, page tables) as when they do, and under
//! load a worker thread runs a request's worth of HTTP, JSON and audit work
//! between any two calls. Started one after the other, the second and later
//! calls of a group find them warm (BENCHMARKS.md, "Calls that arrive
//! together start together").
//!
//! Each worker thread has a lane: a queue and a task that drains it. A call
//! that arrives while its worker is busy (it has not idled since its last
//! call began) is queued in its thread's lane. The lane's task lets the
//! tasks ready on its worker run first ([`ROUNDS`] turns of the run queue),
//! so that the requests among them reach the queue too, then gives each
//! queued call its first poll, one after the other. A call that finishes on
//! that poll (most do: instantiate, run, tear down) is done. One that has
//! to wait (an epoch tick, a host future, a timer) continues as a task of
//! its own, as it would have without the lane, so a long call never holds
//! the lane: it holds it for at most its first epoch tick, as it would have
//! held its worker.
//!
//! Hand-written: tokio has no way to ask for tasks to be run back to back.

use std::cell::RefCell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;

use tokio::sync::{Notify, oneshot};

/// Turns of the run queue the lane's task lets pass before it starts what
/// is queued: the worker's ready requests reach the queue in the first, and
/// the ones they woke in the second.
const ROUNDS: usize = 2;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One thread's queue of calls waiting for their first poll.
#[derive(Default)]
pub(crate) struct Lane {
    queue: Mutex<Vec<Job>>,
    queued: Notify,
}

thread_local! {
    /// This thread's lane. Only the lane's task holds it strongly, so a lane
    /// ends with the tokio runtime that runs its task, and the thread's
    /// next call starts a new one on its own runtime.
    static LANE: RefCell<Weak<Lane>> = const { RefCell::new(Weak::new()) };
}

/// This thread's lane, started on the current tokio runtime if there is
/// none. `None` outside a tokio runtime, or while the thread is ending.
pub(crate) fn this_thread() -> Option<Arc<Lane>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    LANE.try_with(|slot| {
        if let Some(lane) = slot.borrow().upgrade() {
            return lane;
        }
        let lane = Arc::new(Lane::default());
        *slot.borrow_mut() = Arc::downgrade(&lane);
        drop(runtime.spawn(drain(lane.clone())));
        lane
    })
    .ok()
}

impl Lane {
    /// Queues `call` and returns its output once it has run, or `None` if
    /// the lane ended first (its runtime shut down) or the call panicked.
    /// Dropping the returned future stops the call at its next poll, as
    /// dropping the call itself would.
    pub(crate) fn run<T: Send + 'static>(
        self: Arc<Self>,
        call: impl Future<Output = T> + Send + 'static,
    ) -> impl Future<Output = Option<T>> {
        let (reply, output) = oneshot::channel();
        let job = Box::pin(async move {
            let mut reply = reply;
            let finished = tokio::select! {
                biased;
                out = call => Some(out),
                () = reply.closed() => None,
            };
            if let Some(out) = finished {
                let _ = reply.send(out);
            }
        });
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(job);
        self.queued.notify_one();
        // The caller must not keep the lane alive: only its task does.
        drop(self);
        async move { output.await.ok() }
    }
}

/// Puts this task at the back of its worker's run queue, behind the tasks
/// ready now. Not `tokio::task::yield_now`: that waits until the worker runs
/// out of work or polls its I/O driver, which guests that compute for an
/// epoch tick per poll can put off for 61 polls (measured: 0.9 s).
async fn to_the_back() {
    let mut requeued = false;
    std::future::poll_fn(|cx| {
        if requeued {
            return Poll::Ready(());
        }
        requeued = true;
        // Woken during its own poll, a task is queued as one that yielded.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// The lane's task.
async fn drain(lane: Arc<Lane>) {
    let mut group = Vec::new();
    loop {
        lane.queued.notified().await;
        for _ in 0..ROUNDS {
            to_the_back().await;
        }
        std::mem::swap(
            &mut group,
            &mut *lane.queue.lock().unwrap_or_else(|e| e.into_inner()),
        );
        for mut job in group.drain(..) {
            let first = std::future::poll_fn(|cx| {
                Poll::Ready(std::panic::catch_unwind(AssertUnwindSafe(|| {
                    job.as_mut().poll(cx)
                })))
            })
            .await;
            match first {
                Ok(Poll::Ready(())) => {}
                // Its own task polls it at once, which registers that task's
                // waker with whatever the call waits for.
                Ok(Poll::Pending) => drop(tokio::spawn(job)),
                // Dropping the job drops its reply: the caller gets `None`.
                Err(_) => tracing::error!("a sandboxed call panicked in its lane"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn multi_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn calls_that_arrive_together_start_back_to_back() {
        // One thread, so that the order of events is the scheduler's alone.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        runtime.block_on(async {
            let tasks: Vec<_> = (0..8)
                .map(|n| {
                    let events = events.clone();
                    tokio::spawn(async move {
                        events.lock().unwrap().push(format!("arrive {n}"));
                        let call = {
                            let events = events.clone();
                            async move {
                                events.lock().unwrap().push(format!("call {n}"));
                                n * 10
                            }
                        };
                        let output = this_thread().unwrap().run(call).await;
                        events.lock().unwrap().push(format!("reply {n}"));
                        output
                    })
                })
                .collect();
            for (n, task) in tasks.into_iter().enumerate() {
                assert_eq!(task.await.unwrap(), Some(n * 10));
            }
        });
        // Run inline, each call would sit between its task's arrival and
        // reply. In the lane, all eight arrive, then all eight run.
        let events = events.lock().unwrap().clone();
        let expected: Vec<_> = (0..8)
            .map(|n| format!("arrive {n}"))
            .chain((0..8).map(|n| format!("call {n}")))
            .collect();
        assert_eq!(&events[..16], &expected[..], "{events:?}");
    }

    #[test]
    fn a_call_that_waits_continues_on_its_own_task_and_does_not_hold_the_lane() {
        multi_thread().block_on(async {
            let lane = this_thread().unwrap();
            let slow = lane.clone().run(async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                "slow"
            });
            let quick = lane.run(async { "quick" });
            let started = std::time::Instant::now();
            assert_eq!(quick.await, Some("quick"));
            assert!(started.elapsed() < Duration::from_millis(250));
            assert_eq!(slow.await, Some("slow"));
        });
    }

    #[test]
    fn dropping_the_caller_drops_the_call() {
        multi_thread().block_on(async {
            struct Dropped(Arc<AtomicUsize>);
            impl Drop for Dropped {
                fn drop(&mut self) {
                    self.0.fetch_add(1, Ordering::SeqCst);
                }
            }
            let dropped = Arc::new(AtomicUsize::new(0));
            let held = Dropped(dropped.clone());
            let waiting = this_thread().unwrap().run(async move {
                let _held = held;
                std::future::pending::<()>().await
            });
            // Let it start and go on waiting on its own task.
            assert!(
                tokio::time::timeout(Duration::from_millis(50), waiting)
                    .await
                    .is_err()
            );
            for _ in 0..100 {
                if dropped.load(Ordering::SeqCst) == 1 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the call outlived its caller");
        });
    }

    #[test]
    fn a_panicking_call_answers_none_and_the_lane_goes_on() {
        multi_thread().block_on(async {
            let lane = this_thread().unwrap();
            let panics = lane.clone().run(async { panic!("a guest broke the host") });
            let after = lane.run(async { 7 });
            assert_eq!(panics.await, None::<()>);
            assert_eq!(after.await, Some(7));
            assert_eq!(this_thread().unwrap().run(async { 8 }).await, Some(8));
        });
    }

    #[test]
    fn a_lane_ends_with_its_runtime_and_the_next_runtime_gets_its_own() {
        // Both runtimes run on this thread (`block_on`), so the lane is
        // this thread's both times.
        let first = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        first
            .block_on(async { assert_eq!(this_thread().unwrap().run(async { 1 }).await, Some(1)) });
        drop(first);
        let second = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        second
            .block_on(async { assert_eq!(this_thread().unwrap().run(async { 2 }).await, Some(2)) });
        assert!(this_thread().is_none(), "outside a runtime");
    }
}
