//! The SQLite backend: read-only files beneath the data root.
//!
//! Read-only is enforced in layers, any one of which would refuse a write:
//! the file is opened `SQLITE_OPEN_READ_ONLY` (no URI parsing, no following
//! a final symlink), `PRAGMA query_only` is on, `SQLITE_DBCONFIG_DEFENSIVE`
//! is on and the schema is not trusted, ATTACH is limited to zero databases,
//! extension loading is never enabled, an authorizer allows only reads, and a
//! prepared statement that SQLite itself does not call read-only is refused
//! before it runs (this catches `VACUUM INTO`, which writes a new file even
//! from a read-only connection).
//!
//! Queries run on tokio's blocking pool. A progress handler stops a query at
//! its deadline; if the caller goes away first (the call timed out or was
//! cancelled), dropping the query's future interrupts it. Either way the
//! connection stays usable and goes back to a small cache of open
//! connections per file.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, config::DbConfig};

use super::{Column, DbError, DbLimits, RowBudget, Rows, Value};

/// Open connections kept per file, and in total.
const IDLE_PER_FILE: usize = 4;
const IDLE_TOTAL: usize = 256;

/// The SQLite virtual machine calls the progress handler every this many
/// instructions: often enough to stop within about a millisecond, rarely
/// enough to cost nothing measurable.
const PROGRESS_OPS: i32 = 1000;

/// Pragmas a query may run: they only read the schema. Any other pragma, and
/// any pragma outside this list with a value, is refused.
const READ_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "collation_list",
];

/// Functions a query may not call: they load code or reach outside the file.
const DENIED_FUNCTIONS: &[&str] = &["load_extension", "fts3_tokenizer", "readfile", "writefile"];

/// Open, idle connections by file, so a query does not pay for opening the
/// file and reading its schema.
#[derive(Default)]
pub(crate) struct SqliteCache {
    idle: Mutex<HashMap<PathBuf, Vec<Idle>>>,
}

struct Idle {
    conn: Connection,
    /// The file's identity when it was opened: a file replaced since
    /// (written beside and renamed over) gets a fresh connection.
    identity: (u64, u64),
}

impl SqliteCache {
    fn take(&self, path: &Path, identity: (u64, u64)) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(path)?;
        while let Some(entry) = list.pop() {
            if entry.identity == identity {
                return Some(entry.conn);
            }
        }
        None
    }

    fn put(&self, path: PathBuf, identity: (u64, u64), conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = idle.values().map(Vec::len).sum();
        if total >= IDLE_TOTAL {
            idle.retain(|_, list| !list.is_empty());
            return;
        }
        let list = idle.entry(path).or_default();
        if list.len() < IDLE_PER_FILE {
            list.push(Idle { conn, identity });
        }
    }
}

/// Checks that the file exists beneath `root` without leaving it (cap-std
/// refuses `..`, absolute paths and symlinks out of the root) and returns
/// its host path and identity.
pub(crate) fn check_file(root: &Path, relative: &Path) -> Result<(PathBuf, (u64, u64)), DbError> {
    let missing = |what: &str| {
        DbError::Unavailable(format!(
            "the database file {} {what}; the operator must provide it",
            relative.display()
        ))
    };
    let dir = cap_std::fs::Dir::open_ambient_dir(root, cap_std::ambient_authority())
        .map_err(|_| missing("is not available (the data root is missing)"))?;
    let file = dir.open(relative).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => missing("does not exist"),
        _ => missing("cannot be opened"),
    })?;
    let meta = file.metadata().map_err(|_| missing("cannot be read"))?;
    if !meta.is_file() {
        return Err(missing("is not a regular file"));
    }
    let host = root.join(relative);
    let identity = std::fs::metadata(&host)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|_| missing("cannot be read"))?;
    Ok((host, identity))
}

/// Opens `path` read-only, hardened as described in the module docs.
fn open(path: &Path) -> Result<Connection, DbError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW
        | OpenFlags::SQLITE_OPEN_EXRESCODE;
    let fail = |e: rusqlite::Error| {
        DbError::Unavailable(format!(
            "the database file cannot be opened: {}",
            message(&e)
        ))
    };
    let mut conn = Connection::open_with_flags(path, flags).map_err(fail)?;
    conn.pragma_update(None, "query_only", true).map_err(fail)?;
    for (setting, on) in [
        (DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true),
        (DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false),
        (DbConfig::SQLITE_DBCONFIG_ENABLE_ATTACH_CREATE, false),
        (DbConfig::SQLITE_DBCONFIG_ENABLE_ATTACH_WRITE, false),
    ] {
        conn.set_db_config(setting, on).map_err(fail)?;
    }
    conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)
        .map_err(fail)?;
    conn.set_limit(
        Limit::SQLITE_LIMIT_SQL_LENGTH,
        super::MAX_STATEMENT_BYTES as i32,
    )
    .map_err(fail)?;
    conn.authorizer(Some(authorize)).map_err(fail)?;
    Ok(conn)
}

fn authorize(ctx: AuthContext<'_>) -> Authorization {
    match ctx.action {
        AuthAction::Select | AuthAction::Read { .. } | AuthAction::Recursive => {
            Authorization::Allow
        }
        AuthAction::Function { function_name } => {
            if DENIED_FUNCTIONS
                .iter()
                .any(|f| f.eq_ignore_ascii_case(function_name))
            {
                Authorization::Deny
            } else {
                Authorization::Allow
            }
        }
        AuthAction::Pragma { pragma_name, .. }
            if READ_PRAGMAS
                .iter()
                .any(|p| p.eq_ignore_ascii_case(pragma_name)) =>
        {
            Authorization::Allow
        }
        _ => Authorization::Deny,
    }
}

/// What the query task and its caller share: the running statement's
/// interrupt handle while the task owns the connection, and whether the
/// caller has gone away.
#[derive(Default)]
struct Running {
    handle: Option<rusqlite::InterruptHandle>,
    abandoned: bool,
}

/// Interrupts the running statement when the caller's future is dropped (the
/// call timed out or was cancelled): the query stops at once instead of
/// running to its deadline. The task clears the handle (under the lock)
/// before it returns the connection to the cache, so a late drop can never
/// interrupt another query that reuses the connection.
struct InterruptOnDrop(Arc<Mutex<Running>>);

impl Drop for InterruptOnDrop {
    fn drop(&mut self) {
        let mut running = self.0.lock().unwrap_or_else(|e| e.into_inner());
        running.abandoned = true;
        if let Some(handle) = running.handle.as_ref() {
            handle.interrupt();
        }
    }
}

/// Runs `sql` read-only on the file `relative` beneath `root`.
///
/// Everything that touches the file system or SQLite runs on tokio's
/// blocking pool. Concurrency needs no limit of its own: a guest is single
/// threaded and waits for its query, so at most one query per running call
/// (`runtime.engine.max_instances`) is in flight.
pub(crate) async fn query(
    cache: &Arc<SqliteCache>,
    root: &Path,
    relative: &Path,
    limits: &DbLimits,
    sql: &str,
    params: Vec<Value>,
) -> Result<Rows, DbError> {
    super::statement_allowed(super::Dialect::Sqlite, sql)?;
    let running = Arc::new(Mutex::new(Running::default()));
    let _guard = InterruptOnDrop(running.clone());
    let deadline = Instant::now() + limits.timeout;
    let (root, relative) = (root.to_owned(), relative.to_owned());
    let (limits, sql, cache) = (*limits, sql.to_owned(), cache.clone());
    tokio::task::spawn_blocking(move || {
        let (path, identity) = check_file(&root, &relative)?;
        let mut conn = match cache.take(&path, identity) {
            Some(conn) => conn,
            None => open(&path)?,
        };
        {
            let mut state = running.lock().unwrap_or_else(|e| e.into_inner());
            if state.abandoned {
                cache.put(path, identity, conn);
                return Err(DbError::timeout(&limits));
            }
            state.handle = Some(conn.get_interrupt_handle());
        }
        let result = run(&mut conn, deadline, &limits, &sql, &params);
        running.lock().unwrap_or_else(|e| e.into_inner()).handle = None;
        // Whatever happened, the connection is fine to reuse: an
        // interrupted statement leaves nothing behind on a read-only file.
        let _ = conn.progress_handler(0, None::<fn() -> bool>);
        cache.put(path, identity, conn);
        result
    })
    .await
    .map_err(|e| DbError::Failed(format!("the query task failed: {e}")))?
}

fn run(
    conn: &mut Connection,
    deadline: Instant,
    limits: &DbLimits,
    sql: &str,
    params: &[Value],
) -> Result<Rows, DbError> {
    // The longest value SQLite may build: a query cannot allocate a giant
    // string or blob (`zeroblob`, `group_concat`, ...) before the row limit
    // sees it.
    let max_length = i32::try_from(limits.max_result_bytes).unwrap_or(i32::MAX);
    conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, max_length)
        .map_err(|e| DbError::Failed(message(&e)))?;
    conn.progress_handler(PROGRESS_OPS, Some(move || Instant::now() >= deadline))
        .map_err(|e| DbError::Failed(message(&e)))?;
    let timeout = || DbError::timeout(limits);

    let mut stmt = conn.prepare(sql).map_err(|e| classify(e, true, limits))?;
    if !stmt.readonly() {
        return Err(DbError::Denied(
            "only statements that read are allowed on this handle".into(),
        ));
    }
    let expected = stmt.parameter_count();
    if params.len() != expected {
        return Err(DbError::InvalidParameter(format!(
            "the statement has {expected} parameter(s) but {} were given",
            params.len()
        )));
    }
    for (i, value) in params.iter().enumerate() {
        bind(&mut stmt, i + 1, value)?;
    }
    let columns: Vec<Column> = stmt
        .columns()
        .map(|c| Column {
            name: c.name().to_owned(),
            type_name: c.decl_type().unwrap_or_default().to_owned(),
        })
        .collect();
    let width = columns.len();
    let mut out = Rows {
        columns,
        ..Rows::default()
    };
    let mut budget = RowBudget::new(limits);
    let mut rows = stmt.raw_query();
    loop {
        let row = match rows.next() {
            Ok(Some(row)) => row,
            Ok(None) => break,
            Err(e) => return Err(classify(e, false, limits)),
        };
        let mut values = Vec::with_capacity(width);
        for i in 0..width {
            let value = row.get_ref(i).map_err(|e| classify(e, false, limits))?;
            values.push(match value {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(n) => Value::Integer(n),
                ValueRef::Real(f) => Value::Real(f),
                ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(b) => Value::Blob(b.to_vec()),
            });
        }
        if !budget.push(&mut out, values)? {
            break;
        }
        if Instant::now() >= deadline {
            return Err(timeout());
        }
    }
    Ok(out)
}

fn bind(stmt: &mut rusqlite::Statement<'_>, index: usize, value: &Value) -> Result<(), DbError> {
    let bound = match value {
        Value::Null => stmt.raw_bind_parameter(index, rusqlite::types::Null),
        Value::Integer(n) => stmt.raw_bind_parameter(index, n),
        Value::Real(f) => stmt.raw_bind_parameter(index, f),
        Value::Text(s) | Value::Json(s) => stmt.raw_bind_parameter(index, s),
        Value::Blob(b) => stmt.raw_bind_parameter(index, b),
        Value::Boolean(b) => stmt.raw_bind_parameter(index, i64::from(*b)),
        Value::Timestamp(micros) => stmt.raw_bind_parameter(index, timestamp_text(*micros)?),
    };
    bound.map_err(|e| DbError::InvalidParameter(format!("parameter {index}: {}", message(&e))))
}

/// `micros` since the epoch as SQLite's date functions write UTC times:
/// `YYYY-MM-DD HH:MM:SS`, with `.ffffff` when there are fractional seconds.
fn timestamp_text(micros: i64) -> Result<String, DbError> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .map_err(|e| DbError::InvalidParameter(format!("timestamp {micros} µs: {e}")))?;
    let mut text = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if t.microsecond() != 0 {
        text.push_str(&format!(".{:06}", t.microsecond()));
    }
    Ok(text)
}

/// The guest-facing error for a rusqlite error. `preparing`: SQLite's
/// generic error while preparing means the statement is wrong.
fn classify(e: rusqlite::Error, preparing: bool, limits: &DbLimits) -> DbError {
    match &e {
        rusqlite::Error::MultipleStatement => {
            DbError::Denied("only one statement per query is allowed".into())
        }
        rusqlite::Error::SqliteFailure(err, _) => match err.code {
            ErrorCode::OperationInterrupted => DbError::timeout(limits),
            ErrorCode::AuthorizationForStatementDenied => {
                DbError::Denied(format!("{}: this handle allows reading only", message(&e)))
            }
            ErrorCode::ReadOnly => DbError::Denied(message(&e)),
            ErrorCode::TooBig => DbError::TooLarge(format!(
                "{} (this handle's max_result_bytes is {})",
                message(&e),
                limits.max_result_bytes
            )),
            ErrorCode::Unknown if preparing => DbError::Syntax(message(&e)),
            _ => DbError::Failed(message(&e)),
        },
        rusqlite::Error::SqlInputError { .. } => DbError::Syntax(message(&e)),
        _ => DbError::Failed(message(&e)),
    }
}

/// SQLite's own message (without rusqlite's wrapping, which may name the
/// file's path on open errors).
fn message(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(err, Some(msg)) => format!("{msg} ({:?})", err.code),
        rusqlite::Error::SqliteFailure(err, None) => format!("{err}"),
        other => other.to_string(),
    }
}

/// Creates the SQLite database `out` from the SQL script `sql` (for the demo
/// and tests: databases are generated, never committed). Refuses to replace
/// an existing file; the database is written beside and renamed into place,
/// so a failed script leaves nothing behind.
pub fn seed(sql: &Path, out: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if out.exists() {
        anyhow::bail!("{} already exists; remove it to seed again", out.display());
    }
    let script =
        std::fs::read_to_string(sql).with_context(|| format!("cannot read {}", sql.display()))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = out.with_extension("seeding");
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let conn = Connection::open(&tmp)?;
        // A rollback journal, not WAL: read-only readers then need no
        // writable -shm file beside the database.
        conn.pragma_update(None, "journal_mode", "DELETE")?;
        conn.execute_batch(&script)?;
        conn.close().map_err(|(_, e)| e)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot run {}", sql.display()));
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_like_sqlite() {
        assert_eq!(timestamp_text(0).unwrap(), "1970-01-01 00:00:00");
        assert_eq!(
            timestamp_text(1_700_000_000_123_456).unwrap(),
            "2023-11-14 22:13:20.123456"
        );
        assert!(timestamp_text(i64::MAX).is_err());
    }
}
