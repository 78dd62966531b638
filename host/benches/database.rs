//! Host-side overhead of a small read-only query through the
//! `cordon:tool/database` interface, against the same query through rusqlite
//! directly, in one run on the demo shop database (`example-tools/sql/shop.sql`):
//!
//! - rusqlite directly: prepare + bind + step on an open connection (the
//!   floor), and with opening the file each time;
//! - the host's backend (`Databases::query`): statement check, file check,
//!   cached hardened connection, blocking-pool hop, row conversion;
//! - a guest call: one `db_query` call of the `dbprobe` fixture running the
//!   query once, against the same call listing its grants (no query), and
//!   the marginal cost of each further query in one call (100 per call).
//!
//! Run: `cargo bench -p cordon --bench database` (prints the figures that
//! BENCHMARKS.md records).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cordon::db::{DbGrant, DbLimits, DbTarget, Value};
use cordon::runtime::{CallSpec, Grants};

const WARMUP: usize = 500;
const ITERATIONS: usize = 5_000;
const QUERY: &str = "SELECT name, price FROM products WHERE id = ?1";
const PER_CALL: usize = 100;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn report(label: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let p50 = percentile(&samples, 0.50);
    println!(
        "{label:<58} p50 {:>7.1} µs   p99 {:>7.1} µs   (n = {})",
        p50.as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        samples.len()
    );
    p50
}

fn measure(mut f: impl FnMut(usize)) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(ITERATIONS);
    for i in 0..WARMUP + ITERATIONS {
        let started = Instant::now();
        f(i);
        if i >= WARMUP {
            samples.push(started.elapsed());
        }
    }
    samples
}

async fn measure_async<F: std::future::Future<Output = ()>>(
    mut f: impl FnMut(usize) -> F,
) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(ITERATIONS);
    for i in 0..WARMUP + ITERATIONS {
        let started = Instant::now();
        f(i).await;
        if i >= WARMUP {
            samples.push(started.elapsed());
        }
    }
    samples
}

fn direct_query(conn: &rusqlite::Connection, id: i64) -> (String, f64) {
    let mut stmt = conn.prepare(QUERY).unwrap();
    stmt.query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
}

#[tokio::main]
async fn main() {
    let sandbox = common::Sandbox::new(
        &["dbprobe"],
        "[databases.shop]\nkind = \"sqlite\"\npath = \"shop.db\"\n[tools.dbprobe]\ndatabases = [\"shop\"]\n",
    )
    .await;
    let db_path = sandbox.data().join("shop.db");
    let seed = common::workspace_root().join("example-tools/sql/shop.sql");
    cordon::db::seed(&seed, &db_path).unwrap();
    println!("query: {QUERY}  (one row; ids 1..=15 in turn)\n");

    let flags =
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = rusqlite::Connection::open_with_flags(&db_path, flags).unwrap();
    let floor = report(
        "rusqlite directly, open connection",
        measure(|i| {
            direct_query(&conn, 1 + (i % 15) as i64);
        }),
    );
    report(
        "rusqlite directly, opening the file each time",
        measure(|i| {
            let conn = rusqlite::Connection::open_with_flags(&db_path, flags).unwrap();
            direct_query(&conn, 1 + (i % 15) as i64);
        }),
    );

    let grant = DbGrant {
        target: DbTarget::Sqlite {
            root: sandbox.data(),
            relative: "shop.db".into(),
        },
        limits: DbLimits::default(),
    };
    let databases = cordon::db::Databases::default();
    let backend = report(
        "host backend (Databases::query), no guest",
        measure_async(|i| {
            let (databases, grant) = (&databases, &grant);
            async move {
                let rows = databases
                    .query(grant, QUERY, vec![Value::Integer(1 + (i % 15) as i64)])
                    .await
                    .unwrap();
                assert_eq!(rows.rows.len(), 1);
            }
        })
        .await,
    );

    let registry = sandbox.app.dispatcher.registry().snapshot();
    let entry = registry
        .tool("db_query")
        .expect("dbprobe is loaded")
        .clone();
    let runtime = sandbox.app.dispatcher.registry().runtime().clone();
    let spec = || CallSpec {
        grants: Grants {
            databases: BTreeMap::from([("shop".to_owned(), grant.clone())]),
            ..Grants::default()
        },
        ..CallSpec::bare()
    };
    let call = |tool: &'static str, args: String| {
        let (runtime, entry, spec) = (&runtime, &entry, spec());
        async move {
            let outcome = runtime.call(&entry.component, tool, &args, spec).await;
            let result = outcome.result.expect("the call succeeds");
            assert_ne!(result.is_error, Some(true));
        }
    };
    let one_query = |i: usize| {
        serde_json::json!({
            "handle": "shop",
            "sql": [QUERY],
            "params": [{"integer": 1 + (i % 15) as i64}],
        })
        .to_string()
    };
    let without = report(
        "guest call without a query (db_granted)",
        measure_async(|_| call("db_granted", "{}".into())).await,
    );
    let with_one = report(
        "guest call with one query (db_query)",
        measure_async(|i| call("db_query", one_query(i))).await,
    );
    let many = serde_json::json!({
        "handle": "shop",
        "sql": vec![QUERY; PER_CALL],
        "params": [{"integer": 3}],
    })
    .to_string();
    let with_many = report(
        &format!("guest call with {PER_CALL} queries (db_query)"),
        measure_async(|_| call("db_query", many.clone())).await,
    );

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let marginal = (us(with_many) - us(with_one)) / (PER_CALL - 1) as f64;
    println!();
    println!(
        "rusqlite floor (p50)                                       {:>7.1} µs",
        us(floor)
    );
    println!(
        "host backend over the floor                                {:>7.1} µs",
        us(backend) - us(floor)
    );
    println!(
        "one query in a call, over the same call without it         {:>7.1} µs",
        us(with_one) - us(without)
    );
    println!("each further query in a call (marginal)                    {marginal:>7.1} µs");
    println!(
        "  of which over the rusqlite floor                         {:>7.1} µs",
        marginal - us(floor)
    );
}
