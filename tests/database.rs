//! Read-only database handles through the real runtime, with a real guest
//! (`tests/fixtures/dbprobe`, and the `sql` example tool), real SQLite files
//! and a real PostgreSQL server (`common::postgres`).
//!
//! Every write attempt must fail *and* leave the data exactly as it was: the
//! SQLite file is hashed, the PostgreSQL tables digested, before and after.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::postgres::{PASSWORD, Postgres, RO_ROLE, RW_ROLE};
use common::{Sandbox, text};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------- helpers

/// Runs `sql` (one call, statements in order on one open handle) as `tenant`
/// and returns the probe's report.
async fn probe(
    sandbox: &Sandbox,
    tenant: &str,
    handle: &str,
    sql: &[&str],
    params: Value,
) -> Value {
    let outcome = sandbox
        .call_as(
            tenant,
            "db_query",
            json!({ "handle": handle, "sql": sql, "params": params }),
        )
        .await;
    let result = outcome
        .result
        .unwrap_or_else(|e| panic!("db_query failed: {e}"));
    match result.structured_content.clone() {
        Some(report) => report,
        None => panic!("no structured content: {}", text(&result)),
    }
}

/// One statement's result: `Ok(rows)` or `Err((kind, message))`.
async fn one(
    sandbox: &Sandbox,
    tenant: &str,
    handle: &str,
    sql: &str,
    params: Value,
) -> Result<Value, (String, String)> {
    let report = probe(sandbox, tenant, handle, &[sql], params).await;
    if let Some(err) = report.get("open") {
        return Err((
            err["error"].as_str().unwrap().into(),
            err["message"].as_str().unwrap().into(),
        ));
    }
    let r = &report["results"][0];
    match r.get("error") {
        Some(kind) => Err((
            kind.as_str().unwrap().into(),
            r["message"].as_str().unwrap().into(),
        )),
        None => Ok(r.clone()),
    }
}

fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// Creates a SQLite database at `path` from `sql` with `cordon db seed`'s code.
fn seed(path: &Path, sql: &str) {
    let script = path.with_extension("sql");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&script, sql).unwrap();
    cordon::db::seed(&script, path).unwrap();
}

const SHOP: &str = "
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, born TEXT, photo BLOB, score REAL);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id), total REAL);
INSERT INTO customers VALUES (1, 'Ada', '1815-12-10 00:00:00', x'0102', 9.5), (2, 'Grace', NULL, NULL, 8.25);
INSERT INTO orders VALUES (1, 1, 12.5), (2, 1, 3.0), (3, 2, 99.99);
CREATE VIEW big_orders AS SELECT * FROM orders WHERE total > 10;
";

// ----------------------------------------------------------------- SQLite

fn sqlite_config(extra: &str) -> String {
    format!(
        r#"
# `shop` has a timeout far above what its queries need (a loaded CI machine
# can stall a test for seconds); `shop_quick` is the one about the deadline.
[databases.shop]
kind = "sqlite"
path = "shop/{{tenant}}.db"
timeout_ms = 30000
max_rows = 50
max_result_bytes = 65536

[databases.shop_quick]
kind = "sqlite"
path = "shop/{{tenant}}.db"
timeout_ms = 300

[databases.only_t1]
kind = "sqlite"
path = "shop/{{tenant}}.db"
tenants = ["t1"]

[databases.secret]
kind = "sqlite"
path = "secret.db"

[tools.dbprobe]
databases = ["shop", "shop_quick", "only_t1"]
{extra}
"#
    )
}

async fn sqlite_sandbox() -> Sandbox {
    let sandbox = Sandbox::new(&["dbprobe"], &sqlite_config("")).await;
    seed(&sandbox.data().join("shop/t1.db"), SHOP);
    seed(
        &sandbox.data().join("shop/t2.db"),
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO customers VALUES (7, 'Tenant two');",
    );
    seed(
        &sandbox.data().join("secret.db"),
        "CREATE TABLE s (x); INSERT INTO s VALUES ('hidden');",
    );
    sandbox
}

#[tokio::test]
async fn sqlite_reads_with_typed_parameters_and_columns() {
    let sandbox = sqlite_sandbox().await;
    let rows = one(
        &sandbox,
        "t1",
        "shop",
        "SELECT id, name, born, photo, score, ?1 AS flag, ?2 AS at, ?3 AS doc, ?4 AS nil
         FROM customers WHERE id = ?5",
        json!([{"boolean": true}, {"timestamp": 1_700_000_000_000_000i64}, {"json": "{\"a\":1}"}, null, {"integer": 1}]),
    )
    .await
    .unwrap();
    assert_eq!(
        rows["rows"],
        json!([[
            {"integer": 1}, {"text": "Ada"}, {"text": "1815-12-10 00:00:00"}, {"blob": [1, 2]},
            {"real": 9.5}, {"integer": 1}, {"text": "2023-11-14 22:13:20"}, {"text": "{\"a\":1}"}, null
        ]])
    );
    assert_eq!(rows["columns"][0], json!({"name": "id", "type": "INTEGER"}));
    assert_eq!(rows["columns"][5], json!({"name": "flag", "type": ""}));
    assert_eq!(rows["truncated"], json!(false));

    // Views, joins, schema pragmas: all reads.
    let rows = one(
        &sandbox,
        "t1",
        "shop",
        "SELECT count(*) FROM big_orders",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["rows"], json!([[{"integer": 2}]]));
    let rows = one(
        &sandbox,
        "t1",
        "shop",
        "SELECT name FROM pragma_table_info('orders')",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["rows"].as_array().unwrap().len(), 3);

    // Wrong parameters and bad SQL get their own kinds.
    let (kind, _) = one(&sandbox, "t1", "shop", "SELECT ?1, ?2", json!([null]))
        .await
        .unwrap_err();
    assert_eq!(kind, "invalid-parameter");
    let (kind, message) = one(&sandbox, "t1", "shop", "SELECT FROM", json!([]))
        .await
        .unwrap_err();
    assert_eq!(kind, "syntax", "{message}");
    let (kind, message) = one(&sandbox, "t1", "shop", "SELEKT 1", json!([]))
        .await
        .unwrap_err();
    assert_eq!(kind, "denied", "{message}");
    let (kind, message) = one(&sandbox, "t1", "shop", "SELECT * FROM nope", json!([]))
        .await
        .unwrap_err();
    assert_eq!(kind, "syntax", "{message}");
    assert!(message.contains("no such table"), "{message}");
}

#[tokio::test]
async fn sqlite_writes_are_refused_and_the_file_is_unchanged() {
    let sandbox = sqlite_sandbox().await;
    let db = sandbox.data().join("shop/t1.db");
    let before = sha256(&db);
    let outside = sandbox.dir.path().join("stolen.db");
    let attempts = [
        "INSERT INTO customers (name) VALUES ('Mallory')".to_owned(),
        "UPDATE customers SET name = 'Mallory'".into(),
        "DELETE FROM orders".into(),
        "CREATE TABLE evil (x)".into(),
        "CREATE TEMP TABLE evil (x)".into(),
        "DROP TABLE orders".into(),
        "DROP VIEW big_orders".into(),
        "ALTER TABLE customers ADD COLUMN x".into(),
        "CREATE INDEX evil ON customers(name)".into(),
        format!("ATTACH DATABASE '{}' AS other", outside.display()),
        "PRAGMA writable_schema = 1".into(),
        "PRAGMA writable_schema = ON".into(),
        "PRAGMA query_only = 0".into(),
        "PRAGMA journal_mode = WAL".into(),
        "PRAGMA user_version = 7".into(),
        format!("VACUUM INTO '{}'", outside.display()),
        "VACUUM".into(),
        "REINDEX".into(),
        "ANALYZE".into(),
        "SELECT load_extension('/usr/lib/x86_64-linux-gnu/libsqlite3.so.0')".into(),
        "WITH doomed AS (SELECT id FROM orders) DELETE FROM orders WHERE id IN (SELECT id FROM doomed)".into(),
        "WITH x AS (SELECT 1) INSERT INTO customers (name) SELECT 'Mallory' FROM x".into(),
        "INSERT INTO customers (name) VALUES ('Mallory') RETURNING id".into(),
        "SELECT 1; DELETE FROM orders".into(),
        "SELECT 1; SELECT 2".into(),
        "BEGIN; DELETE FROM orders; COMMIT".into(),
        "BEGIN IMMEDIATE".into(),
        "SAVEPOINT s".into(),
        "REPLACE INTO customers (id, name) VALUES (1, 'Mallory')".into(),
    ];
    let sqls: Vec<&str> = attempts.iter().map(String::as_str).collect();
    let report = probe(&sandbox, "t1", "shop", &sqls, json!([])).await;
    for (sql, result) in sqls.iter().zip(report["results"].as_array().unwrap()) {
        let kind = result["error"]
            .as_str()
            .unwrap_or_else(|| panic!("`{sql}` was not refused: {result}"));
        assert!(
            kind == "denied" || kind == "syntax",
            "`{sql}` failed with {kind}, expected denied: {result}"
        );
    }
    // The same attempts, each in a call of its own (a fresh instance, a
    // cached connection): still refused.
    for sql in &sqls[..6] {
        let err = one(&sandbox, "t1", "shop", sql, json!([]))
            .await
            .unwrap_err();
        assert_eq!(err.0, "denied", "{sql}: {err:?}");
    }
    assert_eq!(sha256(&db), before, "the database file changed");
    assert!(
        !outside.exists(),
        "a write attempt created {}",
        outside.display()
    );
    let names: Vec<_> = std::fs::read_dir(db.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.contains("-journal") && !n.contains("-wal") && !n.contains("-shm")),
        "journal files appeared: {names:?}"
    );
    // And reading still works.
    let rows = one(
        &sandbox,
        "t1",
        "shop",
        "SELECT count(*) FROM orders",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["rows"], json!([[{"integer": 3}]]));
}

#[tokio::test]
async fn a_long_sqlite_query_stops_at_its_deadline_and_the_handle_still_works() {
    let sandbox = sqlite_sandbox().await;
    let forever =
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";
    let started = Instant::now();
    let report = probe(
        &sandbox,
        "t1",
        "shop_quick",
        &[forever, "SELECT count(*) FROM customers"],
        json!([]),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(report["results"][0]["error"], "timeout", "{report}");
    assert!(
        report["results"][0]["message"]
            .as_str()
            .unwrap()
            .contains("300 ms"),
        "{report}"
    );
    // The next query on the same open handle, in the same call.
    assert_eq!(report["results"][1]["rows"], json!([[{"integer": 2}]]));
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    // And in the next call (the interrupted connection was reused).
    let rows = one(
        &sandbox,
        "t1",
        "shop_quick",
        "SELECT name FROM customers WHERE id = 2",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["rows"], json!([[{"text": "Grace"}]]));
}

#[tokio::test]
async fn a_huge_sqlite_result_is_cut_at_the_limits() {
    let sandbox = sqlite_sandbox().await;
    // An endless generator: the row limit (50) stops it, long before the deadline.
    let rows = one(
        &sandbox,
        "t1",
        "shop",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["rows"].as_array().unwrap().len(), 50);
    assert_eq!(rows["truncated"], json!(true));
    // The byte limit (64 KiB): 1000-byte rows stop after 65.
    let rows = one(
        &sandbox,
        "t1",
        "shop",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 40) SELECT randomblob(1000) FROM c",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["rows"].as_array().unwrap().len(), 40, "40 rows fit");
    let rows = one(
        &sandbox,
        "t1",
        "shop",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT randomblob(4000) FROM c",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["rows"].as_array().unwrap().len(), 16);
    assert_eq!(rows["truncated"], json!(true));
    // One value larger than the limit is refused before it is built.
    let (kind, message) = one(
        &sandbox,
        "t1",
        "shop",
        "SELECT zeroblob(1000000000)",
        json!([]),
    )
    .await
    .unwrap_err();
    assert_eq!(kind, "too-large", "{message}");
    let (kind, _) = one(
        &sandbox,
        "t1",
        // An aggregate that grows without end: SQLite's own length limit or
        // the deadline stops it, whichever comes first.
        "shop_quick",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT group_concat('xxxxxxxxxx') FROM c",
        json!([]),
    )
    .await
    .unwrap_err();
    assert!(kind == "too-large" || kind == "timeout", "{kind}");
}

#[tokio::test]
async fn sqlite_handles_are_per_tenant_and_granted_only() {
    let sandbox = sqlite_sandbox().await;
    // Each tenant its own file through the same handle name.
    let rows = one(
        &sandbox,
        "t2",
        "shop",
        "SELECT name FROM customers",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["rows"], json!([[{"text": "Tenant two"}]]));
    let rows = one(
        &sandbox,
        "t1",
        "shop",
        "SELECT count(*) FROM customers",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["rows"], json!([[{"integer": 2}]]));
    // A tenant without a file: unavailable, nothing created.
    let (kind, message) = one(&sandbox, "t3", "shop", "SELECT 1", json!([]))
        .await
        .unwrap_err();
    assert_eq!(kind, "unavailable", "{message}");
    assert!(
        !message.contains(&sandbox.dir.path().display().to_string()),
        "host path leaked: {message}"
    );
    assert!(!sandbox.data().join("shop/t3.db").exists());

    // A handle restricted to t1: t2 gets "not granted", and the call records it.
    assert!(
        one(&sandbox, "t1", "only_t1", "SELECT 1", json!([]))
            .await
            .is_ok()
    );
    let outcome = sandbox
        .call_as(
            "t2",
            "db_query",
            json!({"handle": "only_t1", "sql": ["SELECT 1"]}),
        )
        .await;
    assert_eq!(outcome.stats.denied_databases, vec!["only_t1".to_owned()]);
    let report = outcome.result.unwrap().structured_content.unwrap();
    assert_eq!(report["open"]["error"], "not-granted", "{report}");

    // A handle that exists but is not granted to this tool: not granted.
    let outcome = sandbox
        .call_as(
            "t1",
            "db_query",
            json!({"handle": "secret", "sql": ["SELECT * FROM s"]}),
        )
        .await;
    assert_eq!(outcome.stats.denied_databases, vec!["secret".to_owned()]);
    assert_eq!(
        outcome.result.unwrap().structured_content.unwrap()["open"]["error"],
        "not-granted"
    );
    // Both denials are in the audit log, with tenant and handle.
    sandbox.app.dispatcher.audit().flush().await;
    let audit = std::fs::read_to_string(sandbox.dir.path().join("audit.jsonl")).unwrap();
    let denied: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| {
            r["reason"]
                .as_str()
                .is_some_and(|r| r.contains("database handle"))
        })
        .collect();
    assert_eq!(denied.len(), 2, "{audit}");
    assert_eq!(denied[0]["tenant"], "t2");
    assert!(denied[0]["reason"].as_str().unwrap().contains("only_t1"));
    assert_eq!(denied[1]["tenant"], "t1");
    assert!(denied[1]["reason"].as_str().unwrap().contains("secret"));
    // Nor can a tool name a path or another tenant's file.
    for name in ["../secret.db", "shop/t2.db", "t2", ""] {
        let (kind, _) = one(&sandbox, "t1", name, "SELECT 1", json!([]))
            .await
            .unwrap_err();
        assert_eq!(kind, "not-granted", "{name}");
    }
    // Listing shows what this tenant has.
    let r = sandbox
        .call_as("t2", "db_granted", json!({}))
        .await
        .result
        .unwrap();
    assert_eq!(
        r.structured_content.unwrap(),
        json!({"granted": ["shop", "shop_quick"]})
    );
    let r = sandbox
        .call_as("t1", "db_granted", json!({}))
        .await
        .result
        .unwrap();
    assert_eq!(
        r.structured_content.unwrap(),
        json!({"granted": ["only_t1", "shop", "shop_quick"]})
    );
}

#[tokio::test]
async fn a_symlink_out_of_the_data_root_is_refused() {
    let sandbox = Sandbox::new(&["dbprobe"], &sqlite_config("")).await;
    let outside = tempfile::tempdir().unwrap();
    seed(&outside.path().join("x.db"), SHOP);
    std::fs::create_dir_all(sandbox.data().join("shop")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("x.db"),
        sandbox.data().join("shop/t1.db"),
    )
    .unwrap();
    let (kind, _) = one(
        &sandbox,
        "t1",
        "shop",
        "SELECT count(*) FROM customers",
        json!([]),
    )
    .await
    .unwrap_err();
    assert_eq!(kind, "unavailable");
}

#[tokio::test]
async fn the_sql_example_tool_lists_describes_and_queries() {
    let sandbox = Sandbox::new(
        &["sql"],
        r#"
[databases.shop]
kind = "sqlite"
path = "shop.db"
[tools.sql]
databases = ["shop"]
"#,
    )
    .await;
    let seed_file = common::workspace_root().join("example-tools/sql/shop.sql");
    cordon::db::seed(&seed_file, &sandbox.data().join("shop.db")).unwrap();

    let r = sandbox.ok("sql_list_tables", json!({})).await;
    let tables = &r.structured_content.as_ref().unwrap()["tables"];
    let names: Vec<&str> = tables
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "categories",
            "customers",
            "order_items",
            "order_totals",
            "orders",
            "products"
        ]
    );
    assert!(text(&r).contains("order_totals (view)"), "{}", text(&r));

    let r = sandbox
        .ok("sql_describe_table", json!({"table": "products"}))
        .await;
    let columns = &r.structured_content.as_ref().unwrap()["columns"];
    assert_eq!(
        columns[0],
        json!({"name": "id", "type": "INTEGER", "nullable": true, "primary_key": true})
    );
    assert_eq!(columns[4]["name"], "price");
    assert!(text(&r).contains("sku TEXT NOT NULL"), "{}", text(&r));

    let r = sandbox
        .ok(
            "sql_query",
            json!({
                "sql": "SELECT c.name, COUNT(*) AS products FROM products p JOIN categories c ON c.id = p.category_id \
                        WHERE p.price < ?1 GROUP BY c.name ORDER BY c.name",
                "params": [30]
            }),
        )
        .await;
    let out = r.structured_content.as_ref().unwrap();
    assert_eq!(out["columns"], json!(["name", "products"]));
    assert_eq!(
        out["rows"][0],
        json!({"name": "Accessories", "products": 2})
    );
    assert_eq!(out["truncated"], json!(false));
    let table = text(&r);
    assert!(table.starts_with("name         | products\n"), "{table}");
    assert!(table.ends_with("(4 rows)"), "{table}");

    let r = sandbox
        .call("sql_query", json!({"sql": "DELETE FROM orders"}))
        .await
        .result
        .unwrap();
    assert_eq!(r.is_error, Some(true));
    assert!(text(&r).contains("(denied)"), "{}", text(&r));
}

#[test]
fn database_config_problems_name_the_key() {
    let cases = [
        (
            "[tools.x]\ndatabases = [\"nope\"]\n",
            "tools.x.databases[0]",
        ),
        ("[databases.a]\nkind = \"sqlite\"\n", "databases.a.path"),
        (
            "[databases.a]\nkind = \"sqlite\"\npath = \"../x.db\"\n",
            "databases.a.path",
        ),
        (
            "[databases.a]\nkind = \"sqlite\"\npath = \"x.db\"\ndsn_env = \"X\"\n",
            "databases.a.dsn_env",
        ),
        (
            "[databases.a]\nkind = \"postgres\"\n",
            "databases.a.dsn_env",
        ),
        (
            "[databases.a]\nkind = \"postgres\"\ndsn_env = \"X\"\nschema = \"{user}\"\n",
            "databases.a.schema",
        ),
        (
            "[databases.a]\nkind = \"sqlite\"\npath = \"x.db\"\nmax_rows = 0\n",
            "databases.a.max_rows",
        ),
        (
            "[databases.a]\nkind = \"sqlite\"\npath = \"x.db\"\ntenants = [\"Bad/Id\"]\n",
            "databases.a.tenants",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tools")).unwrap();
    for (toml, key) in cases {
        let err = cordon::config::Config::parse(toml, "test", dir.path().to_owned()).unwrap_err();
        assert!(err.to_string().contains(key), "{toml}: {err}");
    }
    // Inline secrets are not even a key.
    let err = cordon::config::Config::parse(
        "[databases.a]\nkind = \"postgres\"\ndsn = \"postgres://u:p@h/d\"\n",
        "test",
        dir.path().to_owned(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("dsn"), "{err}");
}

// ------------------------------------------------------------- PostgreSQL

/// The schema of each test database: two tenants' schemas with the same
/// tables, a sequence, a function that writes, privileges for the two roles.
fn pg_setup() -> String {
    let mut sql = String::new();
    for (tenant, rows) in [
        ("acme", "('anvil', 10.5), ('rocket', 99.95)"),
        ("globex", "('hammock', 20)"),
    ] {
        sql.push_str(&format!(
            "CREATE SCHEMA t_{tenant};
             CREATE TABLE t_{tenant}.items (id serial PRIMARY KEY, name text NOT NULL, price numeric(10,2));
             INSERT INTO t_{tenant}.items (name, price) VALUES {rows};
             CREATE SEQUENCE t_{tenant}.counter;
             CREATE FUNCTION t_{tenant}.add_item() RETURNS int VOLATILE LANGUAGE sql AS
               $$ INSERT INTO t_{tenant}.items (name) VALUES ('sneaky') RETURNING id $$;
             GRANT USAGE ON SCHEMA t_{tenant} TO {RO_ROLE}, {RW_ROLE};
             GRANT SELECT ON ALL TABLES IN SCHEMA t_{tenant} TO {RO_ROLE};
             GRANT ALL ON ALL TABLES IN SCHEMA t_{tenant} TO {RW_ROLE};
             GRANT ALL ON ALL SEQUENCES IN SCHEMA t_{tenant} TO {RW_ROLE};
             GRANT CREATE ON SCHEMA t_{tenant} TO {RW_ROLE};
             GRANT EXECUTE ON FUNCTION t_{tenant}.add_item() TO {RO_ROLE}, {RW_ROLE};"
        ));
    }
    sql
}

/// A sandbox whose `crm` handle (read-only role) and `crm_rw` handle (a role
/// with write permissions) point at a fresh database `name`.
struct PgSandbox {
    sandbox: Sandbox,
    /// The connection strings and password, as the operator would keep them.
    _secrets: tempfile::TempDir,
    server_log: std::path::PathBuf,
}

impl Drop for PgSandbox {
    /// A failing test shows what the server logged (slow statements, lock
    /// waits, errors): a failure seen once in CI can then be explained.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.server_log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- PostgreSQL server log (last {} lines) ---", tail.len());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl std::ops::Deref for PgSandbox {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

async fn pg_sandbox(pg: &Postgres, name: &str, extra: &str) -> PgSandbox {
    pg.create_database(name, &pg_setup());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ro.dsn"), pg.dsn(RO_ROLE, name)).unwrap();
    std::fs::write(dir.path().join("rw.dsn"), pg.dsn(RW_ROLE, name)).unwrap();
    std::fs::write(dir.path().join("password"), format!("{PASSWORD}\n")).unwrap();
    let secrets = dir.path().display();
    let config = format!(
        r#"
# Statement timeouts of 30 s, far above what any of these queries needs:
# fresh-clone CI runs have stalled the server past 500 ms and even 5 s, and
# only `crm_quick` is about the deadline.
[databases.crm]
kind = "postgres"
dsn_file = "{secrets}/ro.dsn"
password_file = "{secrets}/password"
schema = "t_{{tenant}}"
pool_size = 1
timeout_ms = 30000
max_rows = 1000
tenants = ["acme", "globex"]

[databases.crm_quick]
kind = "postgres"
dsn_file = "{secrets}/ro.dsn"
password_file = "{secrets}/password"
schema = "t_{{tenant}}"
pool_size = 1
timeout_ms = 500
tenants = ["acme", "globex"]

[databases.crm_rw]
kind = "postgres"
dsn_file = "{secrets}/rw.dsn"
password_file = "{secrets}/password"
schema = "t_{{tenant}}"
pool_size = 1
timeout_ms = 30000

[databases.acme_only]
kind = "postgres"
dsn_file = "{secrets}/ro.dsn"
password_file = "{secrets}/password"
schema = "t_acme"
tenants = ["acme"]
timeout_ms = 30000

[tools.dbprobe]
databases = ["crm", "crm_quick", "crm_rw", "acme_only"]
{extra}
"#
    );
    PgSandbox {
        sandbox: Sandbox::new(&["dbprobe"], &config).await,
        _secrets: dir,
        server_log: pg.log_path(),
    }
}

/// Everything a write could change in `database`, as one string.
async fn pg_digest(pg: &Postgres, database: &str) -> String {
    let client = pg.superuser(database).await;
    let row = client
        .query_one(
            "SELECT
               (SELECT string_agg(format('%s:%s', n.nspname, c.relname), ',' ORDER BY n.nspname, c.relname)
                  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname LIKE 't\\_%') AS relations,
               (SELECT string_agg(md5(t::text), ',' ORDER BY id) FROM t_acme.items t) AS acme,
               (SELECT string_agg(md5(t::text), ',' ORDER BY id) FROM t_globex.items t) AS globex,
               (SELECT last_value::text || is_called::text FROM t_acme.counter) AS counter,
               (SELECT last_value::text || is_called::text FROM t_acme.items_id_seq) AS items_seq",
            &[],
        )
        .await
        .unwrap();
    (0..5)
        .map(|i| row.get::<_, Option<String>>(i).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" | ")
}

async fn pg_locks(pg: &Postgres, database: &str) -> i64 {
    let client = pg.superuser(database).await;
    client
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE a.datname = $1 AND a.application_name = 'cordon'
               AND (l.locktype = 'advisory' OR l.mode IN ('ExclusiveLock', 'AccessExclusiveLock', 'ShareLock') AND l.locktype = 'relation')",
            &[&database],
        )
        .await
        .unwrap()
        .get(0)
}

/// Cordon's connections to `database` that are still busy (running, or in
/// a transaction left open) with a statement that contains `query_part`.
async fn pg_busy(pg: &Postgres, database: &str, query_part: &str) -> i64 {
    let client = pg.superuser(database).await;
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'cordon' AND state <> 'idle'
               AND strpos(query, $2) > 0",
            &[&database, &query_part],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn postgres_reads_with_typed_parameters_and_columns() {
    let pg = Postgres::shared();
    let sandbox = pg_sandbox(&pg, "typed", "").await;
    let report = probe(
        &sandbox,
        "acme",
        "crm",
        &["SELECT $1::bigint AS i, $2::float8 AS f, $3::text AS t, $4::bytea AS b, $5::bool AS ok,
                  $6::timestamptz AS at, $7::jsonb AS doc, $8::int AS nothing, $9::date AS day"],
        json!([{"integer": 42}, {"real": 1.5}, {"text": "héllo"}, {"blob": [0, 255]}, {"boolean": true},
               {"timestamp": 1_700_000_000_123_456i64}, {"json": "{\"a\": [1, 2]}"}, null,
               {"timestamp": 1_704_153_600_000_000i64}]),
    )
    .await;
    assert_eq!(report["dialect"], "postgres");
    let r = &report["results"][0];
    assert_eq!(
        r["rows"],
        json!([[{"integer": 42}, {"real": 1.5}, {"text": "héllo"}, {"blob": [0, 255]}, {"boolean": true},
                {"timestamp": 1_700_000_000_123_456i64}, {"json": "{\"a\": [1, 2]}"}, null,
                {"timestamp": 1_704_153_600_000_000i64}]]),
        "{report}"
    );
    assert_eq!(
        r["columns"][5],
        json!({"name": "at", "type": "timestamptz"})
    );

    // numeric and uuid come back as text; the tenant's schema is the search path.
    let rows = one(
        &sandbox,
        "acme",
        "crm",
        "SELECT name, price, '6ba7b810-9dad-11d1-80b4-00c04fd430c8'::uuid FROM items ORDER BY id",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(
        rows["rows"],
        json!([[{"text": "anvil"}, {"text": "10.50"}, {"text": "6ba7b810-9dad-11d1-80b4-00c04fd430c8"}],
               [{"text": "rocket"}, {"text": "99.95"}, {"text": "6ba7b810-9dad-11d1-80b4-00c04fd430c8"}]])
    );
    let (kind, message) = one(
        &sandbox,
        "acme",
        "crm",
        "SELECT $1::int",
        json!([{"text": "x"}]),
    )
    .await
    .unwrap_err();
    assert_eq!(kind, "invalid-parameter", "{message}");
    let (kind, _) = one(&sandbox, "acme", "crm", "SELECT FROM WHERE", json!([]))
        .await
        .unwrap_err();
    assert_eq!(kind, "syntax");
    let (kind, _) = one(&sandbox, "acme", "crm", "SELEKT 1", json!([]))
        .await
        .unwrap_err();
    assert_eq!(kind, "denied");
    let (kind, _) = one(&sandbox, "acme", "crm", "SELECT * FROM missing", json!([]))
        .await
        .unwrap_err();
    assert_eq!(kind, "syntax");
}

#[tokio::test]
async fn postgres_writes_are_refused_and_nothing_changes() {
    let pg = Postgres::shared();
    let sandbox = pg_sandbox(&pg, "writes", "").await;
    let before = pg_digest(&pg, "writes").await;
    let attempts = [
        "INSERT INTO items (name) VALUES ('Mallory')",
        "UPDATE items SET name = 'Mallory'",
        "DELETE FROM items",
        "TRUNCATE items",
        "CREATE TABLE evil (x int)",
        "CREATE TEMP TABLE evil (x int)",
        "SELECT 1 INTO evil",
        "DROP TABLE items",
        "ALTER TABLE items ADD COLUMN x int",
        "SELECT nextval('counter')",
        "SELECT setval('counter', 42)",
        "SELECT add_item()",
        "WITH gone AS (DELETE FROM items RETURNING id) SELECT count(*) FROM gone",
        "WITH x AS (INSERT INTO items (name) VALUES ('Mallory') RETURNING id) SELECT * FROM x",
        "COPY items TO '/tmp/cordon-copy-escape'",
        "COPY (SELECT 1) TO STDOUT",
        "COPY items FROM STDIN",
        "LOCK TABLE items IN ACCESS EXCLUSIVE MODE",
        "SELECT 1; DELETE FROM items",
        "DELETE FROM items; SELECT 1",
        "COMMIT",
        "BEGIN",
        "SET ROLE postgres",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "SET TRANSACTION READ WRITE",
        "SELECT set_config('transaction_read_only', 'off', true)",
        "DO $$ BEGIN DELETE FROM t_acme.items; END $$",
        "CALL nothing()",
        "PREPARE p AS SELECT 1",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "LISTEN chan",
        "NOTIFY chan",
        "VACUUM items",
        "REINDEX TABLE items",
        "GRANT SELECT ON items TO PUBLIC",
    ];
    for handle in ["crm", "crm_rw"] {
        let report = probe(&sandbox, "acme", handle, &attempts, json!([])).await;
        for (sql, result) in attempts.iter().zip(report["results"].as_array().unwrap()) {
            let kind = result["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{handle}: `{sql}` was not refused: {result}"));
            assert!(
                ["denied", "syntax", "failed"].contains(&kind),
                "{handle}: `{sql}` failed with {kind}: {result}"
            );
        }
        // Writes specifically say so, even for the role that may write: the
        // ones that look like reads reach the server and are stopped by the
        // read-only transaction itself.
        for sql in [
            "SELECT nextval('counter')",
            "SELECT setval('counter', 42)",
            "SELECT add_item()",
            "WITH x AS (INSERT INTO items (name) VALUES ('m') RETURNING id) SELECT * FROM x",
            "SELECT 1 INTO evil",
        ] {
            let (kind, message) = one(&sandbox, "acme", handle, sql, json!([]))
                .await
                .unwrap_err();
            assert_eq!(kind, "denied", "{handle}: {sql}: {message}");
            if handle == "crm_rw" {
                assert!(
                    message.contains("read-only transaction"),
                    "{sql}: {message}"
                );
            }
        }
        let (kind, _) = one(
            &sandbox,
            "acme",
            handle,
            "INSERT INTO items (name) VALUES ('x')",
            json!([]),
        )
        .await
        .unwrap_err();
        assert_eq!(kind, "denied");
        // The handle still reads.
        let rows = one(
            &sandbox,
            "acme",
            handle,
            "SELECT count(*) FROM items",
            json!([]),
        )
        .await
        .unwrap();
        assert_eq!(rows["rows"], json!([[{"integer": 2}]]));
    }
    assert_eq!(
        pg_digest(&pg, "writes").await,
        before,
        "the database changed"
    );
    assert!(!Path::new("/tmp/cordon-copy-escape").exists());
}

#[tokio::test]
async fn postgres_session_state_does_not_outlive_a_query() {
    let pg = Postgres::shared();
    let sandbox = pg_sandbox(&pg, "session", "").await;
    for handle in ["crm", "crm_rw"] {
        // set_config(.., false) is session-wide, but the rollback undoes it;
        // with a pool of one the next call gets the very same connection.
        let rows = one(
            &sandbox,
            "acme",
            handle,
            "SELECT set_config('cordon.leak', 'yes', false), set_config('search_path', 't_globex', false), \
                    set_config('statement_timeout', '0', false)",
            json!([]),
        )
        .await
        .unwrap();
        assert_eq!(rows["rows"][0][0], json!({"text": "yes"}));
        let rows = one(
            &sandbox,
            "acme",
            handle,
            "SELECT coalesce(current_setting('cordon.leak', true), ''), current_schema()::text, pg_backend_pid()",
            json!([]),
        )
        .await
        .unwrap();
        assert_eq!(rows["rows"][0][0], json!({"text": ""}), "{handle}: {rows}");
        assert_eq!(
            rows["rows"][0][1],
            json!({"text": "t_acme"}),
            "{handle}: {rows}"
        );

        // Locks taken in a query are gone when it returns: session advisory
        // locks (which a rollback keeps), transaction ones, table locks.
        for sql in [
            "SELECT pg_advisory_lock(42), pg_advisory_lock_shared(43), pg_try_advisory_lock(44)",
            "SELECT pg_advisory_xact_lock(45)",
            "SELECT * FROM items FOR UPDATE",
        ] {
            let result = one(&sandbox, "acme", handle, sql, json!([])).await;
            let _ = result; // FOR UPDATE is refused in a read-only transaction; either way:
            assert_eq!(
                pg_locks(&pg, "session").await,
                0,
                "{handle}: `{sql}` left a lock behind"
            );
        }
        // The pool's connection was kept (not closed) and still works.
        let rows = one(
            &sandbox,
            "acme",
            handle,
            "SELECT pg_backend_pid()",
            json!([]),
        )
        .await
        .unwrap();
        assert!(rows["rows"][0][0]["integer"].as_i64().is_some());
    }
}

#[tokio::test]
async fn a_long_postgres_query_is_stopped_at_its_deadline_and_the_handle_still_works() {
    let pg = Postgres::shared();
    let sandbox = pg_sandbox(&pg, "deadline", "").await;
    let started = Instant::now();
    let report = probe(
        &sandbox,
        "acme",
        "crm_quick",
        &["SELECT pg_sleep(30)", "SELECT count(*) FROM items"],
        json!([]),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(report["results"][0]["error"], "timeout", "{report}");
    assert_eq!(
        report["results"][1]["rows"],
        json!([[{"integer": 2}]]),
        "{report}"
    );
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    // The server is not still sleeping on our behalf.
    assert_eq!(pg_busy(&pg, "deadline", "pg_sleep").await, 0);
    // A guest cannot lift its own deadline.
    let (kind, _) = one(
        &sandbox,
        "acme",
        "crm_quick",
        "SELECT set_config('statement_timeout', '0', true), pg_sleep(30)",
        json!([]),
    )
    .await
    .unwrap_err();
    assert_eq!(kind, "timeout");
    let rows = one(&sandbox, "acme", "crm_quick", "SELECT 1", json!([]))
        .await
        .unwrap();
    assert_eq!(rows["rows"], json!([[{"integer": 1}]]));
}

#[tokio::test]
async fn a_huge_postgres_result_is_cut_at_the_limit() {
    let pg = Postgres::shared();
    let sandbox = pg_sandbox(&pg, "huge", "").await;
    // A billion rows: the portal fetches batches until the row limit (1000),
    // so this neither runs to the end (which would outlast the call's 10 s
    // time limit) nor fills memory.
    let rows = one(
        &sandbox,
        "acme",
        "acme_only",
        // In the select list the series streams (in FROM it would be
        // materialised first).
        "SELECT generate_series(1, 1000000000) AS g, repeat('x', 100)",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["rows"].as_array().unwrap().len(), 1000);
    assert_eq!(rows["truncated"], json!(true));
    // The query was stopped, not left running (or open) on the server.
    assert_eq!(pg_busy(&pg, "huge", "generate_series").await, 0);
    let rows = one(
        &sandbox,
        "acme",
        "acme_only",
        "SELECT count(*) FROM items",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["truncated"], json!(false));
}

#[tokio::test]
async fn postgres_tenants_see_their_own_schema_and_nothing_else() {
    let pg = Postgres::shared();
    let sandbox = pg_sandbox(&pg, "tenants", "").await;
    let rows = one(
        &sandbox,
        "globex",
        "crm",
        "SELECT name FROM items",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["rows"], json!([[{"text": "hammock"}]]));
    let rows = one(
        &sandbox,
        "acme",
        "crm",
        "SELECT count(*) FROM items",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["rows"], json!([[{"integer": 2}]]));
    // acme_only is acme's: globex is told it is not granted, and it is recorded.
    let outcome = sandbox
        .call_as(
            "globex",
            "db_query",
            json!({"handle": "acme_only", "sql": ["SELECT 1"]}),
        )
        .await;
    assert_eq!(outcome.stats.denied_databases, vec!["acme_only".to_owned()]);
    assert_eq!(
        outcome.result.unwrap().structured_content.unwrap()["open"]["error"],
        "not-granted"
    );
    assert!(
        one(
            &sandbox,
            "acme",
            "acme_only",
            "SELECT count(*) FROM items",
            json!([])
        )
        .await
        .is_ok()
    );
    // A tenant outside the handle's list gets nothing either.
    let (kind, _) = one(&sandbox, "initech", "crm", "SELECT 1", json!([]))
        .await
        .unwrap_err();
    assert_eq!(kind, "not-granted");
}

#[tokio::test]
async fn a_missing_postgres_secret_stops_cordon_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tools")).unwrap();
    let text = Sandbox::config_text(
        &dir.path().join("cache"),
        "[databases.crm]\nkind = \"postgres\"\ndsn_env = \"CORDON_TEST_SURELY_UNSET_DSN\"\n",
    );
    let config = cordon::config::Config::parse(&text, "test", dir.path().to_owned()).unwrap();
    let err = cordon::app::App::open(config, false).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("databases.crm") && message.contains("CORDON_TEST_SURELY_UNSET_DSN"),
        "{message}"
    );
}

#[tokio::test]
async fn a_postgres_query_outliving_its_call_is_cancelled_on_the_server() {
    let pg = Postgres::shared();
    // The call's deadline (400 ms) comes long before the handle's (30 s).
    let sandbox = pg_sandbox(
        &pg,
        "abandoned",
        "[tools.dbprobe.limits]\ntimeout_ms = 400\n",
    )
    .await;
    let started = Instant::now();
    let outcome = sandbox
        .call_as(
            "acme",
            "db_query",
            json!({"handle": "acme_only", "sql": ["SELECT pg_sleep(20)"]}),
        )
        .await;
    assert!(
        matches!(
            outcome.result,
            Err(cordon::runtime::CallFailure::Timeout(_))
        ),
        "{:?}",
        outcome.result
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The host sent a cancel request: the server stops sleeping for nobody.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if pg_busy(&pg, "abandoned", "pg_sleep(20)").await == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the abandoned query still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = one(
        &sandbox,
        "acme",
        "acme_only",
        "SELECT count(*) FROM items",
        json!([]),
    )
    .await
    .unwrap();
    assert_eq!(rows["rows"], json!([[{"integer": 2}]]));
}
