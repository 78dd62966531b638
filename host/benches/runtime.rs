//! Host-side cost of the sandbox, in release:
//!
//! - one call: fresh Store + instantiate + call + drop (p50/p99 over many
//!   calls) of three tools: `null` of the `trivial` fixture (`no_std`,
//!   imports nothing), `ok` of the large `hostile` fixture and the SDK's
//!   `echo`; straight into the runtime, with warm and with cold caches
//!   (16 MiB written between calls), the same cold calls started in groups
//!   of 1, 2, 4 and 8 (as `runtime.engine.batch_calls` starts calls under
//!   load), and `ok` through the dispatcher (argument check, grants, limits);
//! - start-up of a directory of 50 tool components, with a cold and a warm
//!   compile cache.
//!
//! Run: `cargo bench -p cordon --bench runtime` (prints the figures that
//! BENCHMARKS.md records); `-- calls` skips the start-up figures.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use cordon::app::App;
use cordon::config::Config;
use cordon::dispatch::{CallRequest, Principal};
use cordon::runtime::{CallSpec, EventSink};

const WARMUP: usize = 2_000;
const ITERATIONS: usize = 20_000;
const COMPONENTS: usize = 50;
/// Calls, and the buffer written before each, of the cold-cache variant.
const COLD_WARMUP: usize = 200;
const COLD_ITERATIONS: usize = 2_000;
const COLD_BUFFER: usize = 16 << 20;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{label:<44} p50 {:>7.1} µs   p99 {:>7.1} µs   mean {:>7.1} µs   (n = {})",
        percentile(&samples, 0.50).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6,
        samples.len()
    );
}

/// Appends a custom section so each copy has its own digest (and cache entry).
fn distinct_copy(wasm: &[u8], n: usize) -> Vec<u8> {
    let payload = format!("copy-{n}");
    let name = b"cordon-bench";
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name);
    section.extend_from_slice(payload.as_bytes());
    let mut out = wasm.to_vec();
    out.push(0); // custom section id
    out.push(section.len() as u8); // < 128: one LEB128 byte
    out.extend_from_slice(&section);
    out
}

/// Calls `tool` straight into the runtime, many times, and reports the
/// whole call and its two stages.
async fn runtime_calls(sandbox: &common::Sandbox, label: &str, tool: &str, args: &str) {
    runtime_calls_with(sandbox, label, tool, args, (WARMUP, ITERATIONS), || ()).await
}

/// [`runtime_calls`] with `between` run before each call (outside the
/// timing) and its own numbers of calls.
async fn runtime_calls_with(
    sandbox: &common::Sandbox,
    label: &str,
    tool: &str,
    args: &str,
    (warmup, iterations): (usize, usize),
    mut between: impl FnMut(),
) {
    let registry = sandbox.app.dispatcher.registry().snapshot();
    let entry = registry.tool(tool).expect("tool is loaded").clone();
    let runtime = sandbox.app.dispatcher.registry().runtime().clone();
    let mut samples = Vec::with_capacity(iterations);
    let mut instantiate = Vec::with_capacity(iterations);
    let mut execute = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        between();
        let started = Instant::now();
        let outcome = runtime
            .call(&entry.component, tool, args, CallSpec::bare())
            .await;
        let elapsed = started.elapsed();
        assert!(
            outcome.result.is_ok(),
            "{tool}: {:?}",
            outcome.result.as_ref().err()
        );
        if i >= warmup {
            samples.push(elapsed);
            instantiate.push(outcome.stats.instantiate);
            execute.push(outcome.stats.execute);
        }
    }
    report(&format!("{label}: instantiate + call + drop"), samples);
    report("  of which: store + instantiate", instantiate);
    report("  of which: guest call-tool", execute);
}

/// Evicts the instance's lines and TLB entries from the caches, as a
/// server's other work between calls does.
fn write_other_work(buffer: &mut [u8]) {
    for (i, byte) in buffer.iter_mut().enumerate().step_by(64) {
        *byte = byte.wrapping_add(i as u8);
    }
    std::hint::black_box(&buffer);
}

async fn single_call() {
    let sandbox = common::Sandbox::new(&["hostile", "conformance", "trivial"], "").await;
    // `null` (the `trivial` fixture: no_std, imports nothing, returns a
    // constant): the sandbox's own cost, with as little guest as possible.
    runtime_calls(&sandbox, "trivial tool `null`", "null", "{}").await;
    // `ok` (raw WIT bindings, returns a constant, in a large component that
    // imports WASI): the host-side cost of a bigger instance.
    runtime_calls(&sandbox, "hostile fixture's `ok`", "ok", "{}").await;
    // `echo` through the Rust SDK (argument parsing, tool table): a typical small tool.
    runtime_calls(&sandbox, "SDK tool `echo`", "echo", r#"{"message":"hi"}"#).await;
    // The same with cold caches: a server does other work between calls
    // (HTTP, JSON, other requests), which a tight loop does not model.
    // Writing a buffer much larger than L2 between calls evicts the
    // instance's lines and TLB entries, as in the transport benchmark.
    let mut other_work = vec![0u8; COLD_BUFFER];
    for (label, tool, args) in [
        ("`null`", "null", "{}"),
        ("`ok`", "ok", "{}"),
        ("`echo`", "echo", r#"{"message":"hi"}"#),
    ] {
        runtime_calls_with(
            &sandbox,
            &format!("{label}, {} MiB written between calls", COLD_BUFFER >> 20),
            tool,
            args,
            (COLD_WARMUP, COLD_ITERATIONS),
            || write_other_work(&mut other_work),
        )
        .await;
    }

    // Calls started back to back after the other work, as a lane starts
    // them under load (`runtime.engine.batch_calls`): all but the first of
    // a group find the caches warm.
    for (label, tool, args) in [
        ("`null`", "null", "{}"),
        ("`echo`", "echo", r#"{"message":"hi"}"#),
    ] {
        let entry = sandbox
            .app
            .dispatcher
            .registry()
            .snapshot()
            .tool(tool)
            .expect("tool is loaded")
            .clone();
        let runtime = sandbox.app.dispatcher.registry().runtime().clone();
        for group in [1usize, 2, 4, 8] {
            let mut samples = Vec::new();
            for i in 0..(COLD_ITERATIONS / group + COLD_WARMUP) {
                write_other_work(&mut other_work);
                let started = Instant::now();
                for _ in 0..group {
                    let outcome = runtime
                        .call(&entry.component, tool, args, CallSpec::bare())
                        .await;
                    assert!(outcome.result.is_ok());
                }
                if i >= COLD_WARMUP {
                    samples.push(started.elapsed() / group as u32);
                }
            }
            report(
                &format!(
                    "{label}, groups of {group} after {} MiB, per call",
                    COLD_BUFFER >> 20
                ),
                samples,
            );
        }
    }

    let principal = Principal::local("bench");
    let mut samples = Vec::with_capacity(ITERATIONS);
    for i in 0..WARMUP + ITERATIONS {
        let request = CallRequest {
            tool: "ok".into(),
            arguments: serde_json::json!({}),
            events: EventSink::discard(),
            cancel: Default::default(),
            origin: Default::default(),
        };
        let started = Instant::now();
        let outcome = sandbox.app.dispatcher.call(&principal, request).await;
        let elapsed = started.elapsed();
        assert!(outcome.result.is_ok());
        if i >= WARMUP {
            samples.push(elapsed);
        }
    }
    report("dispatcher `ok`: check + grants + call + drop", samples);
}

async fn cold_start() {
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let wasm = std::fs::read(common::guest("text")).unwrap();
    for n in 0..COMPONENTS {
        std::fs::write(
            tools.join(format!("tool{n:02}.wasm")),
            distinct_copy(&wasm, n),
        )
        .unwrap();
    }
    let cache = dir.path().join("cache");
    std::fs::write(
        dir.path().join("cordon.toml"),
        common::Sandbox::config_text(&cache, ""),
    )
    .unwrap();
    let config = Config::load(&dir.path().join("cordon.toml")).unwrap();

    for (label, runs) in [("cold compile cache", 1), ("warm compile cache", 5)] {
        let mut times = Vec::new();
        for _ in 0..runs {
            let started = Instant::now();
            let app = App::open(config.clone(), false).await.unwrap();
            times.push(started.elapsed());
            let snapshot = app.dispatcher.registry().snapshot();
            assert_eq!(snapshot.components().len(), COMPONENTS);
        }
        times.sort();
        println!(
            "start-up, {COMPONENTS} components, {label:<20} median {:>8.1} ms   (runs: {runs}, {} KiB each)",
            times[times.len() / 2].as_secs_f64() * 1e3,
            wasm.len() / 1024
        );
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    common::guest_dir();
    println!(
        "cordon runtime benchmark (release host, {} CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    rt.block_on(single_call());
    // `-- calls`: the calls alone (start-up takes a minute).
    if !std::env::args().any(|a| a == "calls") {
        rt.block_on(cold_start());
    }
}
