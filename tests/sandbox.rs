//! The hostile fixture against the real runtime: every misbehaviour is
//! contained within its limit with a clear error, and the next call works.

mod common;

use std::time::{Duration, Instant};

use common::{Sandbox, text};
use cordon::runtime::CallFailure;
use serde_json::json;

const TIMEOUT_MS: u64 = 1000;

fn hostile_config() -> String {
    format!(
        r#"
[tools.hostile]
dirs = [
  {{ path = "rw/{{tenant}}", guest = "/data", mode = "rw", quota_mib = 4 }},
  {{ path = "ro", guest = "/ro", mode = "ro" }},
]
config = {{ greeting = "hello" }}
[tools.hostile.limits]
timeout_ms = {TIMEOUT_MS}
memory_mib = 32
max_handles = 64
max_output_bytes = 1048576
max_notifications = 100
"#
    )
}

async fn hostile() -> Sandbox {
    let sandbox = Sandbox::new(&["hostile"], &hostile_config()).await;
    std::fs::create_dir_all(sandbox.data().join("ro")).unwrap();
    std::fs::write(sandbox.data().join("ro/existing.txt"), "keep me").unwrap();
    sandbox
}

/// The host keeps serving: a plain call right after succeeds.
async fn next_call_works(sandbox: &Sandbox) {
    let ok = sandbox.ok("ok", json!({})).await;
    assert_eq!(text(&ok), "ok");
}

/// A denied attempt: the tool reports it as an error result.
async fn denied(sandbox: &Sandbox, tool: &str, args: serde_json::Value) -> String {
    let result = sandbox
        .call(tool, args)
        .await
        .result
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let out = text(&result);
    assert!(
        !out.contains("succeeded"),
        "{tool} must be denied, got: {out}"
    );
    out
}

#[tokio::test]
async fn a_spinning_guest_is_stopped_at_its_deadline() {
    let sandbox = hostile().await;
    let started = Instant::now();
    let failure = sandbox.failure("spin", json!({})).await;
    let elapsed = started.elapsed();
    assert!(matches!(failure, CallFailure::Timeout(_)), "{failure:?}");
    assert!(elapsed >= Duration::from_millis(TIMEOUT_MS), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(TIMEOUT_MS + 400),
        "stopped late: {elapsed:?}"
    );
    next_call_works(&sandbox).await;
}

#[tokio::test]
async fn a_guest_sleeping_in_a_host_call_is_stopped_at_its_deadline() {
    let sandbox = hostile().await;
    let started = Instant::now();
    let failure = sandbox.failure("sleep_forever", json!({})).await;
    let elapsed = started.elapsed();
    assert!(matches!(failure, CallFailure::Timeout(_)), "{failure:?}");
    assert!(
        elapsed < Duration::from_millis(TIMEOUT_MS + 400),
        "stopped late: {elapsed:?}"
    );
    next_call_works(&sandbox).await;
}

#[tokio::test]
async fn a_spinning_guest_does_not_starve_other_calls() {
    // Two runaway guests on a runtime with two workers: a third call still
    // completes quickly because runaway guests yield at every epoch tick.
    let sandbox = hostile().await;
    let spin1 = sandbox.call("spin", json!({}));
    let spin2 = sandbox.call("spin", json!({}));
    let quick = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        next_call_works(&sandbox).await;
        started.elapsed()
    };
    let (_, _, quick) = tokio::join!(spin1, spin2, quick);
    assert!(
        quick < Duration::from_millis(500),
        "a plain call waited {quick:?} behind spinning guests"
    );
}

#[tokio::test]
async fn unbounded_allocation_hits_the_memory_limit() {
    let sandbox = hostile().await;
    let failure = sandbox.failure("alloc_unbounded", json!({})).await;
    assert_eq!(failure, CallFailure::MemoryLimit(32 << 20));
    next_call_works(&sandbox).await;
}

#[tokio::test]
async fn unbounded_recursion_traps() {
    let sandbox = hostile().await;
    let failure = sandbox.failure("recurse", json!({})).await;
    assert!(matches!(failure, CallFailure::Trap(_)), "{failure:?}");
    assert!(failure.to_string().contains("stack"), "{failure}");
    next_call_works(&sandbox).await;
}

#[tokio::test]
async fn a_panic_becomes_a_clear_error() {
    let sandbox = hostile().await;
    let failure = sandbox.failure("panic", json!({})).await;
    assert_eq!(
        failure,
        CallFailure::Panicked("hostile guest panicked on purpose".into())
    );
    let failure = sandbox.failure("trap", json!({})).await;
    assert!(
        matches!(failure, CallFailure::Trap(_) | CallFailure::Panicked(_)),
        "{failure:?}"
    );
    next_call_works(&sandbox).await;
}

#[tokio::test]
async fn output_floods_are_capped() {
    let sandbox = hostile().await;
    // stdout/stderr are capped pipes: writes fail once the cap is reached.
    let result = sandbox.call("print_flood", json!({})).await.result;
    match result {
        Ok(r) => assert_eq!(r.is_error, Some(true), "{}", text(&r)),
        Err(e) => assert!(
            matches!(e, CallFailure::Timeout(_) | CallFailure::Trap(_)),
            "{e:?}"
        ),
    }
    next_call_works(&sandbox).await;

    let failure = sandbox.failure("big_output", json!({})).await;
    assert!(
        matches!(failure, CallFailure::OutputTooLarge { limit: 1048576, .. }),
        "{failure:?}"
    );
    let failure = sandbox.failure("huge_output", json!({})).await;
    assert!(
        matches!(
            failure,
            CallFailure::MemoryLimit(_) | CallFailure::OutputTooLarge { .. }
        ),
        "{failure:?}"
    );
    next_call_works(&sandbox).await;
}

#[tokio::test]
async fn log_floods_are_capped() {
    let sandbox = hostile().await;
    let (outcome, events) = sandbox
        .call_with_events("many_log_messages", json!({}))
        .await;
    outcome.result.unwrap();
    assert_eq!(events.len(), 100, "max_notifications = 100");
    assert_eq!(outcome.stats.events_dropped, 100_000 - 100);
}

#[tokio::test]
async fn opening_files_in_a_loop_hits_the_handle_cap() {
    let sandbox = hostile().await;
    let result = sandbox.call("open_files", json!({})).await;
    match result.result {
        Ok(r) => {
            let out = text(&r);
            let opened: u32 = out
                .strip_prefix("opened ")
                .and_then(|s| s.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unexpected report: {out}"));
            assert!(
                opened < 64,
                "opened {opened} files with max_handles = 64: {out}"
            );
        }
        // Running out of table space inside a host call traps the guest.
        Err(e) => assert!(matches!(e, CallFailure::Trap(_)), "{e:?}"),
    }
    next_call_works(&sandbox).await;
}

#[tokio::test]
async fn filling_the_disk_stops_at_the_quota() {
    let sandbox = hostile().await;
    let result = sandbox.call("fill_disk", json!({})).await.result.unwrap();
    let out = text(&result);
    assert_eq!(result.is_error, Some(true), "{out}");
    let written = std::fs::metadata(sandbox.data().join("rw/t1/fill.bin"))
        .unwrap()
        .len();
    assert!(
        written <= 4 << 20,
        "wrote {written} bytes past a 4 MiB quota: {out}"
    );
    next_call_works(&sandbox).await;
}

#[tokio::test]
async fn filesystem_grants_hold() {
    let sandbox = hostile().await;
    // Outside every grant.
    denied(&sandbox, "escape_absolute", json!({})).await;
    denied(&sandbox, "escape_dotdot", json!({})).await;
    // A symlink inside the grant that points outside it.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "top secret").unwrap();
    std::os::unix::fs::symlink(outside.path(), sandbox.data().join("rw/t1/escape")).unwrap();
    let out = denied(&sandbox, "escape_symlink", json!({})).await;
    assert!(!out.contains("top secret"), "{out}");
    // Read-only grant.
    denied(&sandbox, "write_readonly", json!({})).await;
    assert!(!sandbox.data().join("ro/written.txt").exists());
    assert_eq!(
        std::fs::read_to_string(sandbox.data().join("ro/existing.txt")).unwrap(),
        "keep me"
    );
    let read = sandbox
        .ok("read_file", json!({"path": "/ro/existing.txt"}))
        .await;
    assert_eq!(text(&read), "keep me");
    // Read-write grant: visible on the host.
    sandbox
        .ok(
            "write_file",
            json!({"path": "/data/hello.txt", "content": "from the guest"}),
        )
        .await;
    assert_eq!(
        std::fs::read_to_string(sandbox.data().join("rw/t1/hello.txt")).unwrap(),
        "from the guest"
    );
    next_call_works(&sandbox).await;
}

#[tokio::test]
async fn no_environment_arguments_or_sockets() {
    // SAFETY of the check: a secret in the host's environment must not leak.
    let sandbox = hostile().await;
    let out = text(&sandbox.ok("read_env", json!({})).await);
    assert!(out.contains("env: 0 vars"), "{out}");
    assert!(out.contains("args: 0"), "{out}");
    assert!(!out.contains("/usr/bin"), "{out}");
    let out = denied(&sandbox, "open_socket", json!({})).await;
    assert!(!out.contains("succeeded"), "{out}");
}

#[tokio::test]
async fn cancellation_stops_a_running_guest_promptly() {
    let sandbox = hostile().await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let principal = cordon::dispatch::Principal::local("t1");
    let call = sandbox.app.dispatcher.call(
        &principal,
        cordon::dispatch::CallRequest {
            tool: "spin".into(),
            arguments: json!({}),
            events: cordon::runtime::EventSink::discard(),
            cancel: cancel.clone(),
            origin: Default::default(),
        },
    );
    let canceller = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        cancel.cancel();
        Instant::now()
    };
    let (outcome, cancelled_at) = tokio::join!(call, canceller);
    let latency = cancelled_at.elapsed();
    assert_eq!(outcome.result.unwrap_err(), CallFailure::Cancelled);
    assert!(
        latency < Duration::from_millis(100),
        "cancellation took {latency:?}"
    );
    next_call_works(&sandbox).await;
}

#[tokio::test]
async fn a_fuel_budget_stops_a_spinning_guest() {
    let extra = "[runtime.engine]\nfuel = true\n\n[tools.hostile.limits]\nfuel = 50000000\ntimeout_ms = 10000\n";
    let sandbox = Sandbox::new(&["hostile"], extra).await;
    let started = Instant::now();
    let outcome = sandbox.call("spin", json!({})).await;
    assert_eq!(
        outcome.result.unwrap_err(),
        CallFailure::FuelExhausted(50_000_000)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fuel, not the deadline, must stop it"
    );
    assert_eq!(outcome.stats.fuel_consumed, Some(50_000_000));
    // A cheap call fits in the budget and reports what it used.
    let ok = sandbox.call("ok", json!({})).await;
    assert!(ok.result.is_ok());
    assert!(
        ok.stats
            .fuel_consumed
            .is_some_and(|f| f > 0 && f < 50_000_000),
        "{:?}",
        ok.stats
    );
}

/// Instance slots are reused, and the pages a call dirtied are reset in place
/// (`runtime.engine.keep_resident_kib`) or handed back to the kernel: either
/// way no call may see what an earlier one left in memory, one after another
/// (the same slot again) or side by side (several slots).
#[tokio::test]
async fn no_call_sees_the_memory_of_an_earlier_one() {
    let sandbox = hostile().await;
    for _ in 0..20 {
        assert_eq!(
            text(&sandbox.ok("leave_traces", json!({})).await),
            "fresh memory"
        );
    }
    for _ in 0..3 {
        let calls = (0..8).map(|_| sandbox.call("leave_traces", json!({})));
        for outcome in futures::future::join_all(calls).await {
            let result = outcome.result.expect("leave_traces");
            assert_eq!(text(&result), "fresh memory");
        }
    }
}

/// A one-thread runtime with the idle hooks `cordon serve` installs: the
/// thread idles whenever the test awaits something that is not ready, and
/// every call, kept Store and spare is on that one thread.
fn idling_runtime() -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    cordon::runtime::use_idle_time(&mut builder);
    builder.build().unwrap()
}

/// Two workers with the idle hooks, as `cordon serve` runs: calls that
/// arrive while a worker is busy start together in its lane.
fn busy_runtime() -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    cordon::runtime::use_idle_time(&mut builder);
    builder.build().unwrap()
}

/// Lets the runtime's thread run out of work, so its idle hook runs.
async fn idle() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

fn idle_instances(sandbox: &Sandbox) -> (u32, u32) {
    let idle = sandbox.app.dispatcher.registry().runtime().idle_instances();
    (idle.awaiting_teardown, idle.spares)
}

/// One call, whose Store waits until the thread idles; then the idle
/// instances once it has.
async fn call_then_idle(sandbox: &Sandbox) -> (u32, u32) {
    next_call_works(sandbox).await;
    assert_eq!(idle_instances(sandbox), (1, 0), "the Store waits for idle");
    idle().await;
    idle_instances(sandbox)
}

/// What `tenant` reads from `/data/whose.txt` in its own directory.
async fn whose_as(sandbox: &Sandbox, tenant: &str) -> String {
    let result = sandbox
        .call_as(tenant, "read_file", json!({"path": "/data/whose.txt"}))
        .await
        .result
        .unwrap_or_else(|e| panic!("read_file as {tenant}: {e}"));
    text(&result)
}

/// The hostile tool with a per-tenant directory and no quota (a quota'd
/// grant gets no spare).
fn spare_friendly_config(extra: &str) -> String {
    format!(
        r#"
[tools.hostile]
dirs = [{{ path = "rw/{{tenant}}", guest = "/data", mode = "rw" }}]
[tools.hostile.limits]
timeout_ms = {TIMEOUT_MS}
memory_mib = 32
max_notifications = 100
{extra}
"#
    )
}

/// The sandbox, once the runtime's thread has idled (it keeps Stores and
/// makes spares from then on).
async fn spare_friendly(extra: &str) -> Sandbox {
    let sandbox = Sandbox::new(&["hostile"], &spare_friendly_config(extra)).await;
    for tenant in ["t1", "t2"] {
        std::fs::create_dir_all(sandbox.data().join("rw").join(tenant)).unwrap();
    }
    idle().await;
    sandbox
}

#[test]
fn an_idle_worker_tears_the_last_instance_down_and_prepares_the_next() {
    idling_runtime().block_on(async {
        let sandbox = spare_friendly("").await;

        assert_eq!(
            call_then_idle(&sandbox).await,
            (0, 0),
            "torn down; one call, no spare"
        );
        assert_eq!(
            call_then_idle(&sandbox).await,
            (0, 1),
            "the same call twice: a spare"
        );

        // The next call of the component takes the spare (any of its tools).
        let result = sandbox.ok("leave_traces", json!({})).await;
        assert_eq!(text(&result), "fresh memory");
        assert_eq!(idle_instances(&sandbox), (1, 0), "the spare was used");

        // No call sees what an earlier one left, spare or not.
        for _ in 0..10 {
            idle().await;
            assert_eq!(idle_instances(&sandbox).1, 1);
            let result = sandbox.ok("leave_traces", json!({})).await;
            assert_eq!(text(&result), "fresh memory");
            let result = sandbox.ok("leave_traces", json!({})).await;
            assert_eq!(text(&result), "fresh memory");
        }

        // A spare gets the call's events and deadline, not its own.
        idle().await;
        let (outcome, events) = sandbox
            .call_with_events("many_log_messages", json!({}))
            .await;
        outcome.result.unwrap();
        assert_eq!(events.len(), 100, "max_notifications = 100");
        assert_eq!(idle_instances(&sandbox), (1, 0), "the spare was used");
        tokio::time::sleep(Duration::from_millis(2 * TIMEOUT_MS)).await;
        assert_eq!(idle_instances(&sandbox), (0, 1));
        let started = Instant::now();
        let failure = sandbox.failure("spin", json!({})).await;
        assert!(matches!(failure, CallFailure::Timeout(_)), "{failure:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(TIMEOUT_MS)
                && took < Duration::from_millis(TIMEOUT_MS + 400),
            "a spare made {:?} ago must time out {TIMEOUT_MS} ms after its call starts: {took:?}",
            Duration::from_millis(2 * TIMEOUT_MS)
        );
    });
}

#[test]
fn a_spare_serves_only_a_call_with_the_same_grants() {
    idling_runtime().block_on(async {
        let sandbox = spare_friendly("").await;
        // t1's calls leave a spare built from t1's grants.
        next_call_works(&sandbox).await;
        next_call_works(&sandbox).await;
        idle().await;
        assert_eq!(idle_instances(&sandbox), (0, 1));

        // t2 does not get it: its directory is another one.
        let result = sandbox
            .call_as(
                "t2",
                "write_file",
                json!({"path": "/data/whose.txt", "content": "t2's"}),
            )
            .await
            .result
            .expect("write_file as t2");
        assert_ne!(result.is_error, Some(true), "{}", text(&result));
        assert_eq!(idle_instances(&sandbox), (1, 1), "t1's spare stays unused");
        assert_eq!(
            std::fs::read_to_string(sandbox.data().join("rw/t2/whose.txt")).unwrap(),
            "t2's"
        );
        assert!(!sandbox.data().join("rw/t1/whose.txt").exists());

        // Idle again: t1's spare is dropped; t2 called once, so no spare yet.
        idle().await;
        assert_eq!(idle_instances(&sandbox), (0, 0));
        assert_eq!(whose_as(&sandbox, "t2").await, "t2's");
        idle().await;
        assert_eq!(idle_instances(&sandbox), (0, 1), "t2 twice: a spare for t2");
        assert_eq!(whose_as(&sandbox, "t2").await, "t2's");
        assert_eq!(idle_instances(&sandbox), (1, 0), "t2's spare was used");
        // And t1, whose spare is gone, reads its own (empty) directory.
        let t1_reads = whose_as(&sandbox, "t1").await;
        assert!(!t1_reads.contains("t2's"), "{t1_reads}");

        // Tenants taking turns: no spare is made, as none would be used.
        for _ in 0..3 {
            for tenant in ["t2", "t1"] {
                idle().await;
                sandbox
                    .call_as(tenant, "ok", json!({}))
                    .await
                    .result
                    .unwrap();
                assert_eq!(idle_instances(&sandbox), (1, 0));
            }
        }
    });
}

#[test]
fn a_quota_d_grant_gets_no_spare() {
    // The quota's usage is counted when a call's state is built.
    idling_runtime().block_on(async {
        let sandbox = hostile().await;
        idle().await;
        next_call_works(&sandbox).await;
        idle().await;
        assert_eq!(idle_instances(&sandbox), (0, 0));
    });
}

#[test]
fn idle_instances_do_not_count_against_max_instances() {
    idling_runtime().block_on(async {
        let sandbox = spare_friendly("[runtime.engine]\nmax_instances = 1\n").await;

        // One call at a time, each while the last one's Store waits and,
        // after an idle moment, a spare is held too.
        next_call_works(&sandbox).await;
        for _ in 0..3 {
            next_call_works(&sandbox).await;
            assert_eq!(idle_instances(&sandbox), (1, 0));
            next_call_works(&sandbox).await;
            idle().await;
            assert_eq!(idle_instances(&sandbox), (0, 1));
        }
        // Two at once: the second finds the one slot taken by a running call.
        let (first, second) = tokio::join!(sandbox.call("spin", json!({})), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            sandbox.call("ok", json!({})).await
        });
        assert!(
            matches!(first.result, Err(CallFailure::Timeout(_))),
            "{:?}",
            first.result
        );
        match second.result {
            Err(CallFailure::Unavailable(message)) => {
                assert!(message.contains("max_instances"), "{message}")
            }
            other => panic!("a second call beyond max_instances ran: {other:?}"),
        }
        next_call_works(&sandbox).await;
    });
}

/// Under load, calls wait in their worker's lane and start together
/// (`runtime.engine.batch_calls`, on by default). Each still gets its own
/// instance and its own answer, a call that waits (here: sleeps) does not
/// hold the ones queued with it, and with the setting off no call waits.
#[test]
fn calls_under_load_start_together_and_each_gets_its_own_answer() {
    for batch_calls in [true, false] {
        busy_runtime().block_on(async {
            let extra = format!("[runtime.engine]\nbatch_calls = {batch_calls}\n");
            let sandbox = std::sync::Arc::new(Sandbox::new(&["conformance"], &extra).await);
            let slow = {
                let sandbox = sandbox.clone();
                tokio::spawn(async move { sandbox.ok("sleep_ms", json!({"ms": 3000})).await })
            };
            let started = Instant::now();
            let clients: Vec<_> = (0..32)
                .map(|client| {
                    let sandbox = sandbox.clone();
                    tokio::spawn(async move {
                        for n in 0..25 {
                            let message = format!("client {client} call {n}");
                            let echoed = sandbox.ok("echo", json!({"message": message})).await;
                            assert_eq!(text(&echoed), message);
                        }
                    })
                })
                .collect();
            for client in clients {
                client.await.unwrap();
            }
            assert!(
                started.elapsed() < Duration::from_millis(2500),
                "800 quick calls took {:?}: the sleeping call held them",
                started.elapsed()
            );
            assert!(!slow.is_finished());
            assert!(text(&slow.await.unwrap()).contains("3000"));
            let together = sandbox
                .app
                .dispatcher
                .registry()
                .runtime()
                .calls_started_together();
            if batch_calls {
                assert!(together > 0, "no call started together with others");
            } else {
                assert_eq!(together, 0);
            }
        });
    }
}

/// A guest that computes without pause, started in a lane with other calls,
/// holds them for at most its first epoch tick: after it, it goes on as a
/// task of its own and the calls queued behind it run.
#[test]
fn a_spinning_guest_does_not_hold_the_calls_queued_with_it() {
    busy_runtime().block_on(async {
        let sandbox = std::sync::Arc::new(hostile().await);
        let calls: Vec<_> = (0..16)
            .map(|client| {
                let sandbox = sandbox.clone();
                tokio::spawn(async move {
                    if client % 8 == 0 {
                        // Two spinning guests among the first calls.
                        let failure = sandbox.failure("spin", json!({})).await;
                        assert!(matches!(failure, CallFailure::Timeout(_)), "{failure:?}");
                        return None;
                    }
                    let started = Instant::now();
                    for _ in 0..10 {
                        next_call_works(&sandbox).await;
                    }
                    Some(started.elapsed())
                })
            })
            .collect();
        for call in calls {
            if let Some(took) = call.await.unwrap() {
                assert!(
                    took < Duration::from_millis(TIMEOUT_MS / 2),
                    "ten plain calls took {took:?} beside spinning guests"
                );
            }
        }
        assert!(
            sandbox
                .app
                .dispatcher
                .registry()
                .runtime()
                .calls_started_together()
                > 0
        );
    });
}
