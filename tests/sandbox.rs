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

/// A runtime built as `cordon serve` builds its own: workers tear a finished
/// call's instance down when they idle.
fn serving_runtime() -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    cordon::runtime::tear_down_when_idle(&mut builder);
    builder.build().unwrap()
}

/// Polls `done` for up to 5 s.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(5), "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn a_finished_instance_is_torn_down_once_its_worker_idles() {
    let rt = serving_runtime();
    // Spawned: the hooks run on the runtime's workers, not on the thread
    // that blocks on the runtime.
    rt.block_on(rt.spawn(async {
        let sandbox = hostile().await;
        let runtime = sandbox.app.dispatcher.registry().runtime().clone();
        // Let both workers idle once, so both keep Stores from now on.
        tokio::time::sleep(Duration::from_millis(50)).await;

        let ok = sandbox.ok("ok", json!({})).await;
        assert_eq!(text(&ok), "ok");
        // The task has not yielded since: its worker has not idled.
        assert_eq!(runtime.stores_awaiting_teardown(), 1);
        eventually("the kept Store is dropped when its worker idles", || {
            runtime.stores_awaiting_teardown() == 0
        })
        .await;

        // Back to back, without idling in between: the earlier Store goes
        // when the next call ends, so one worker keeps at most one.
        for _ in 0..20 {
            assert_eq!(
                text(&sandbox.ok("leave_traces", json!({})).await),
                "fresh memory"
            );
            assert!(runtime.stores_awaiting_teardown() <= 2);
        }
        let calls = (0..8).map(|_| sandbox.call("leave_traces", json!({})));
        for outcome in futures::future::join_all(calls).await {
            assert_eq!(text(&outcome.result.expect("leave_traces")), "fresh memory");
        }
        eventually("every kept Store is dropped once the workers idle", || {
            runtime.stores_awaiting_teardown() == 0
        })
        .await;
    }))
    .unwrap();
}

#[test]
fn kept_instances_do_not_count_against_max_instances() {
    let rt = serving_runtime();
    rt.block_on(rt.spawn(async {
        let config = format!(
            "{}\n[runtime.engine]\nmax_instances = 1\n",
            hostile_config()
        );
        let sandbox = Sandbox::new(&["hostile"], &config).await;
        let runtime = sandbox.app.dispatcher.registry().runtime().clone();
        tokio::time::sleep(Duration::from_millis(50)).await;

        // One call at a time: each succeeds while the last one's Store waits.
        for _ in 0..5 {
            next_call_works(&sandbox).await;
            assert_eq!(runtime.stores_awaiting_teardown(), 1);
        }
        // Two at once: the second finds the one slot taken by a running call.
        let (first, second) = tokio::join!(sandbox.call("sleep_forever", json!({})), async {
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
    }))
    .unwrap();
}
