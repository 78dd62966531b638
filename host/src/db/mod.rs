//! Read-only database handles: the backends behind the `cordon:tool/database`
//! interface.
//!
//! The operator declares named handles in `[databases.NAME]` (see [`config`])
//! and grants them to components (`tools.NAME.databases`). For every call the
//! configuration resolves the granted handles for the caller's tenant into
//! [`DbGrant`]s (a file path, a schema), which the runtime hands to the guest
//! by name. The connections themselves live here, in [`Databases`]: built once
//! when Cordon starts and shared by every call, so a call never pays for a new
//! PostgreSQL connection and SQLite files are not reopened per query.
//!
//! Every query is read-only by construction, not by inspection alone:
//! SQLite files are opened `SQLITE_OPEN_READ_ONLY` with `query_only`, an
//! authorizer that allows only reads and a progress handler that stops the
//! query at its deadline ([`sqlite`]); PostgreSQL queries run inside a
//! `READ ONLY` transaction with a `statement_timeout` that is always rolled
//! back, as a role the operator gave read permissions only ([`postgres`]).

pub mod config;
mod postgres;
mod sqlite;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use config::{DatabaseConfig, DbKind};
pub use sqlite::seed;

/// The most bytes of SQL text plus parameters one query may carry.
pub const MAX_STATEMENT_BYTES: usize = 1 << 20;

/// A query parameter or a value in a result row (the WIT `value`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit signed integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Raw bytes.
    Blob(Vec<u8>),
    /// A boolean.
    Boolean(bool),
    /// Microseconds since the Unix epoch, UTC.
    Timestamp(i64),
    /// A JSON document as text.
    Json(String),
}

impl Value {
    /// The bytes this value counts against `max_result_bytes`: its payload,
    /// 8 for numbers, 1 for null and booleans.
    pub fn cost(&self) -> usize {
        match self {
            Value::Null | Value::Boolean(_) => 1,
            Value::Integer(_) | Value::Real(_) | Value::Timestamp(_) => 8,
            Value::Text(s) | Value::Json(s) => s.len(),
            Value::Blob(b) => b.len(),
        }
    }

    /// The value's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Integer(_) => "integer",
            Value::Real(_) => "real",
            Value::Text(_) => "text",
            Value::Blob(_) => "blob",
            Value::Boolean(_) => "boolean",
            Value::Timestamp(_) => "timestamp",
            Value::Json(_) => "json",
        }
    }
}

/// One result column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// Its declared type; empty when it has none.
    pub type_name: String,
}

/// The rows of a query.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rows {
    /// The columns.
    pub columns: Vec<Column>,
    /// The rows, one value per column.
    pub rows: Vec<Vec<Value>>,
    /// True when the rows were cut at the row or byte limit.
    pub truncated: bool,
}

/// Collects rows up to the handle's limits.
pub(crate) struct RowBudget {
    max_rows: usize,
    max_bytes: usize,
    bytes: usize,
}

impl RowBudget {
    pub(crate) fn new(limits: &DbLimits) -> Self {
        RowBudget {
            max_rows: usize::try_from(limits.max_rows).unwrap_or(usize::MAX),
            max_bytes: usize::try_from(limits.max_result_bytes).unwrap_or(usize::MAX),
            bytes: 0,
        }
    }

    /// Adds `row` to `rows` if it fits. `Ok(false)` when it does not (the
    /// result is then truncated); an error when not even the first row fits.
    pub(crate) fn push(&mut self, rows: &mut Rows, row: Vec<Value>) -> Result<bool, DbError> {
        let cost = row.iter().map(Value::cost).sum::<usize>();
        if rows.rows.len() >= self.max_rows || self.bytes + cost > self.max_bytes {
            if rows.rows.is_empty() && self.max_rows > 0 {
                return Err(DbError::TooLarge(format!(
                    "the first row alone is {cost} bytes, more than this handle's max_result_bytes ({})",
                    self.max_bytes
                )));
            }
            rows.truncated = true;
            return Ok(false);
        }
        self.bytes += cost;
        rows.rows.push(row);
        Ok(true)
    }
}

/// Which engine serves a handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite 3.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// Bounds of every query on one handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbLimits {
    /// A query still running after this long is stopped.
    pub timeout: Duration,
    /// The most rows returned; more set `truncated`.
    pub max_rows: u64,
    /// The most value bytes returned (see [`Value::cost`]); more set
    /// `truncated`. Also SQLite's largest string or blob.
    pub max_result_bytes: u64,
}

impl Default for DbLimits {
    fn default() -> Self {
        DbLimits {
            timeout: Duration::from_secs(5),
            max_rows: 1000,
            max_result_bytes: 1 << 20,
        }
    }
}

/// Where a granted handle's data is, resolved for the caller's tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbTarget {
    /// A SQLite file beneath `root` (the data root). It is opened through a
    /// capability on `root`, so `relative` cannot leave it.
    Sqlite {
        /// The data root.
        root: PathBuf,
        /// The file, relative to `root` (the `{tenant}` template filled in).
        relative: PathBuf,
    },
    /// A PostgreSQL handle: the pool of the configured handle `handle`, with
    /// the tenant's schema as `search_path` if one is configured.
    Postgres {
        /// The `[databases.NAME]` whose pool serves it.
        handle: String,
        /// The schema set as `search_path` for every query.
        schema: Option<String>,
    },
}

/// A database handle granted to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbGrant {
    /// Where the data is.
    pub target: DbTarget,
    /// The handle's limits.
    pub limits: DbLimits,
}

impl DbGrant {
    /// The SQL dialect the handle speaks.
    pub fn dialect(&self) -> Dialect {
        match self.target {
            DbTarget::Sqlite { .. } => Dialect::Sqlite,
            DbTarget::Postgres { .. } => Dialect::Postgres,
        }
    }
}

/// Why a query failed (the WIT `error`). Messages never carry host paths,
/// connection strings or credentials: they go to the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    /// The handle is not granted to this tool for this caller.
    #[error("database handle `{0}` is not granted to this tool")]
    NotGranted(String),
    /// The statement does not parse or names something that does not exist.
    #[error("{0}")]
    Syntax(String),
    /// The statement would write or uses something forbidden.
    #[error("{0}")]
    Denied(String),
    /// The query ran past its deadline and was stopped.
    #[error("{0}")]
    Timeout(String),
    /// The statement, its parameters or a value exceed the limits.
    #[error("{0}")]
    TooLarge(String),
    /// A parameter does not fit the type the statement expects.
    #[error("{0}")]
    InvalidParameter(String),
    /// The database cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// Any other failure.
    #[error("{0}")]
    Failed(String),
}

impl DbError {
    fn timeout(limits: &DbLimits) -> DbError {
        DbError::Timeout(format!(
            "the query ran longer than this handle's limit of {} ms and was stopped",
            limits.timeout.as_millis()
        ))
    }
}

/// Only statements that read are run at all, whatever the backend would
/// make of the rest: SQLite `SELECT`, `WITH`, `VALUES`, `EXPLAIN`, `PRAGMA`
/// (the authorizer then allows only schema-reading pragmas); PostgreSQL
/// `SELECT`, `WITH`, `VALUES`, `TABLE`, `EXPLAIN`, `SHOW`. The first word is
/// taken after comments and opening parentheses. The backends refuse writes
/// anyway; this also keeps out statements that act on the connection rather
/// than on data (transaction control, `SET`, `COPY`, `LOCK`, `VACUUM`, ...)
/// and gives every such attempt the same clear error.
pub(crate) fn statement_allowed(dialect: Dialect, sql: &str) -> Result<(), DbError> {
    let reads: &[&str] = match dialect {
        Dialect::Sqlite => &["select", "with", "values", "explain", "pragma"],
        Dialect::Postgres => &["select", "with", "values", "table", "explain", "show"],
    };
    let word = first_keyword(sql);
    if reads.iter().any(|r| r.eq_ignore_ascii_case(word)) {
        Ok(())
    } else if word.is_empty() {
        Err(DbError::Syntax("the statement is empty".into()))
    } else {
        Err(DbError::Denied(format!(
            "{} statements are not allowed: this handle runs only {}",
            word.to_ascii_uppercase(),
            reads.join(", ").to_ascii_uppercase()
        )))
    }
}

/// The first word of `sql` after whitespace, `--` and (nested) `/* */`
/// comments and opening parentheses.
fn first_keyword(sql: &str) -> &str {
    let mut rest = sql;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, r)| r);
        } else if rest.starts_with("/*") {
            let mut depth = 0usize;
            let mut end = rest.len();
            let bytes = rest.as_bytes();
            let mut i = 0;
            while i + 1 < bytes.len() {
                match (bytes[i], bytes[i + 1]) {
                    (b'/', b'*') => {
                        depth += 1;
                        i += 2;
                    }
                    (b'*', b'/') => {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            end = i;
                            break;
                        }
                    }
                    _ => i += 1,
                }
            }
            rest = &rest[end..];
        } else {
            break;
        }
    }
    let len = rest
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .unwrap_or(rest.len());
    &rest[..len]
}

/// A backend could not be set up when Cordon started.
#[derive(Debug, thiserror::Error)]
pub enum DbSetupError {
    /// The connection string or password could not be read.
    #[error("databases.{handle}: {message}")]
    Secret {
        /// The handle.
        handle: String,
        /// What is missing, naming the variable or file.
        message: String,
    },
    /// The connection string does not parse.
    #[error("databases.{handle}: the connection string is not valid: {source}")]
    Dsn {
        /// The handle.
        handle: String,
        /// The parser's error (it never echoes the string).
        source: tokio_postgres::Error,
    },
    /// The pool could not be built.
    #[error("databases.{handle}: cannot create the connection pool: {message}")]
    Pool {
        /// The handle.
        handle: String,
        /// Why.
        message: String,
    },
}

/// The long-lived database backends: one PostgreSQL pool per configured
/// handle and a cache of open SQLite connections. Shared by all calls.
#[derive(Default)]
pub struct Databases {
    postgres: BTreeMap<String, postgres::PgBackend>,
    sqlite: Arc<sqlite::SqliteCache>,
}

impl std::fmt::Debug for Databases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Databases")
            .field("postgres", &self.postgres.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Databases {
    /// Builds the backends of every configured handle. PostgreSQL pools
    /// connect lazily (a server that is down at start-up fails queries with
    /// `unavailable`, not the start), but their connection strings and
    /// passwords are read now, so a missing secret stops Cordon at once.
    pub fn open(
        handles: &BTreeMap<String, DatabaseConfig>,
        base_dir: &std::path::Path,
    ) -> Result<Databases, DbSetupError> {
        let mut postgres = BTreeMap::new();
        for (name, handle) in handles {
            if handle.kind == DbKind::Postgres {
                postgres.insert(
                    name.clone(),
                    postgres::PgBackend::open(name, handle, base_dir)?,
                );
            }
        }
        Ok(Databases {
            postgres,
            sqlite: Arc::default(),
        })
    }

    /// PostgreSQL handles that cannot be reached now, with why (for
    /// `/readyz`). SQLite files are per tenant and checked at each call.
    pub async fn unreachable(&self) -> Vec<(String, String)> {
        let mut down = Vec::new();
        for (name, backend) in &self.postgres {
            if let Err(e) = backend.ping().await {
                down.push((name.clone(), e));
            }
        }
        down
    }

    /// Checks that `grant` can be used (the SQLite file exists, the pool is
    /// configured) without running anything.
    pub fn check(&self, grant: &DbGrant) -> Result<(), DbError> {
        match &grant.target {
            DbTarget::Sqlite { root, relative } => sqlite::check_file(root, relative).map(drop),
            DbTarget::Postgres { handle, .. } => self.pg(handle).map(drop),
        }
    }

    /// Runs one read-only query on `grant` within its limits.
    pub async fn query(
        &self,
        grant: &DbGrant,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<Rows, DbError> {
        let size = sql.len() + params.iter().map(Value::cost).sum::<usize>();
        if size > MAX_STATEMENT_BYTES {
            return Err(DbError::TooLarge(format!(
                "the statement and its parameters are {size} bytes, more than the limit of {MAX_STATEMENT_BYTES}"
            )));
        }
        match &grant.target {
            DbTarget::Sqlite { root, relative } => {
                sqlite::query(&self.sqlite, root, relative, &grant.limits, sql, params).await
            }
            DbTarget::Postgres { handle, schema } => {
                self.pg(handle)?
                    .query(schema.as_deref(), &grant.limits, sql, params)
                    .await
            }
        }
    }

    fn pg(&self, handle: &str) -> Result<&postgres::PgBackend, DbError> {
        self.postgres.get(handle).ok_or_else(|| {
            DbError::Unavailable(format!(
                "database handle `{handle}` has no running backend (database changes need a restart)"
            ))
        })
    }
}
