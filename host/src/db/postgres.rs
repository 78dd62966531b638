//! The PostgreSQL backend: a pool per handle, every query in a read-only
//! transaction that is always rolled back.
//!
//! One query is: `START TRANSACTION READ ONLY`, `SET LOCAL statement_timeout`
//! (and `search_path` when the handle has a schema), prepare, bind to a
//! portal, fetch rows in batches until the row or byte limit, `ROLLBACK`,
//! then `SELECT pg_advisory_unlock_all()`. So:
//!
//! * writes of any kind (DML, DDL, `nextval`, `setval`, writing functions,
//!   `COPY FROM`) fail with "read-only transaction" before changing anything;
//! * `set_config(..., false)` and other session settings are undone by the
//!   rollback, and transaction-level locks (`LOCK TABLE`,
//!   `pg_advisory_xact_lock`) end with it;
//! * session-level advisory locks, which survive a rollback, are released
//!   before the connection goes back to the pool;
//! * only statements that read are sent at all (a first-keyword check, see
//!   `statement_allowed` in the parent module): `COPY`, `LOCK`, `SET`, transaction control,
//!   `LISTEN` and the like never reach the server, so a guest cannot end the
//!   transaction the host opened;
//! * the server stops a query at `statement_timeout`; if it does not answer
//!   shortly after the deadline, or the call goes away mid-query, the host
//!   sends a cancel request and closes that connection instead of reusing it.
//!
//! The role in the connection string must be one the operator created with
//! read permissions only: that, not this module, is what keeps a guest from
//! reading what it must not.

use std::path::Path;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, IsNull, Kind, ToSql, Type, to_sql_checked};
use tokio_postgres::{CancelToken, NoTls};

use super::{Column, DatabaseConfig, DbError, DbLimits, DbSetupError, RowBudget, Rows, Value};

/// Rows fetched per round trip from the portal.
const BATCH_ROWS: i32 = 256;

/// How long after the deadline the host waits for the server's own
/// `statement_timeout` before it cancels the query itself.
const GRACE: Duration = Duration::from_millis(500);

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A pool of connections for one handle.
pub(crate) struct PgBackend {
    pool: Pool,
}

impl PgBackend {
    /// Reads the handle's secrets and builds its (lazy) pool.
    pub(crate) fn open(
        name: &str,
        config: &DatabaseConfig,
        base_dir: &Path,
    ) -> Result<PgBackend, DbSetupError> {
        let secret = |env: &Option<String>, file: &Option<std::path::PathBuf>, what: &str| {
            let err = |message: String| DbSetupError::Secret {
                handle: name.to_owned(),
                message,
            };
            match (env, file) {
                (Some(var), _) => std::env::var(var).map(Some).map_err(|_| {
                    err(format!(
                        "the environment variable {var} ({what}_env) is not set"
                    ))
                }),
                (None, Some(file)) => {
                    let path = base_dir.join(file);
                    std::fs::read_to_string(&path)
                        .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_owned()))
                        .map_err(|e| {
                            err(format!("cannot read {} ({what}_file): {e}", path.display()))
                        })
                }
                (None, None) => Ok(None),
            }
        };
        let dsn = secret(&config.dsn_env, &config.dsn_file, "dsn")?.unwrap_or_default();
        let mut pg: tokio_postgres::Config = dsn.parse().map_err(|source| DbSetupError::Dsn {
            handle: name.to_owned(),
            source,
        })?;
        if let Some(password) = secret(&config.password_env, &config.password_file, "password")? {
            pg.password(password);
        }
        pg.application_name("cordon")
            .connect_timeout(Duration::from_secs(5));
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                // Every query already leaves its connection clean (rolled
                // back, advisory locks released); a broken one is closed.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.unwrap_or(8))
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| DbSetupError::Pool {
                handle: name.to_owned(),
                message: e.to_string(),
            })?;
        Ok(PgBackend { pool })
    }

    /// Whether a connection can be had (and answers) within 2 s.
    pub(crate) async fn ping(&self) -> Result<(), String> {
        let attempt = async {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            client
                .simple_query("SELECT 1")
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(Duration::from_secs(2), attempt)
            .await
            .map_err(|_| "no answer within 2 s".to_owned())?
    }

    /// Runs one read-only statement; see the module docs.
    pub(crate) async fn query(
        &self,
        schema: Option<&str>,
        limits: &DbLimits,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<Rows, DbError> {
        super::statement_allowed(super::Dialect::Postgres, sql)?;
        let deadline = tokio::time::Instant::now() + limits.timeout;
        let object = tokio::time::timeout_at(deadline, self.pool.get())
            .await
            .map_err(|_| {
                DbError::Unavailable(
                    "no database connection became free before the query's deadline".into(),
                )
            })?
            .map_err(|e| DbError::Unavailable(format!("cannot connect to the database: {e}")))?;
        let mut checkout = Checkout::new(object);
        let run = run(checkout.client(), schema, limits, sql, &params);
        let result = match tokio::time::timeout_at(deadline + GRACE, run).await {
            Ok(result) => result,
            // The server did not stop it: `checkout` cancels and closes.
            Err(_) => return Err(DbError::timeout(limits)),
        };
        if result.is_err() && checkout.client().is_closed() {
            return result;
        }
        // Session-level advisory locks survive the rollback: never hand a
        // connection that holds one to the next query.
        match checkout
            .client()
            .batch_execute("SELECT pg_advisory_unlock_all()")
            .await
        {
            Ok(()) => checkout.keep(),
            Err(e) => tracing::warn!("closing a database connection that failed clean-up: {e}"),
        }
        result
    }
}

/// A pooled connection that goes back to the pool only when [`keep`] was
/// called: a query that timed out, failed to clean up or whose future was
/// dropped mid-way has its connection cancelled and closed instead.
///
/// [`keep`]: Checkout::keep
struct Checkout {
    object: Option<Object>,
    cancel: CancelToken,
    keep: bool,
}

impl Checkout {
    fn new(object: Object) -> Self {
        let cancel = object.cancel_token();
        Checkout {
            object: Some(object),
            cancel,
            keep: false,
        }
    }

    fn client(&mut self) -> &mut tokio_postgres::Client {
        // Some until drop.
        self.object
            .as_mut()
            .map(|o| &mut ***o)
            .expect("checked out")
    }

    fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Some(object) = self.object.take() {
            // Detached from the pool and dropped: the connection closes.
            drop(Object::take(object));
            let cancel = self.cancel.clone();
            // A statement still running on the server would otherwise go on
            // until its statement_timeout although nobody waits for it.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = cancel.cancel_query(NoTls).await;
                });
            }
        }
    }
}

async fn run(
    client: &mut tokio_postgres::Client,
    schema: Option<&str>,
    limits: &DbLimits,
    sql: &str,
    params: &[Value],
) -> Result<Rows, DbError> {
    let tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(|e| classify(e, limits))?;
    let mut setup = format!(
        "SET LOCAL statement_timeout = {}",
        limits.timeout.as_millis().max(1)
    );
    if let Some(schema) = schema {
        setup.push_str(&format!(
            "; SET LOCAL search_path TO {}",
            quote_ident(schema)
        ));
    }
    tx.batch_execute(&setup)
        .await
        .map_err(|e| classify(e, limits))?;
    let stmt = tx.prepare(sql).await.map_err(|e| classify(e, limits))?;
    if stmt.params().len() != params.len() {
        return Err(DbError::InvalidParameter(format!(
            "the statement has {} parameter(s) but {} were given",
            stmt.params().len(),
            params.len()
        )));
    }
    for (i, (value, ty)) in params.iter().zip(stmt.params()).enumerate() {
        if let Err(e) = Param(value).check(ty) {
            return Err(DbError::InvalidParameter(format!(
                "parameter ${}: {e}",
                i + 1
            )));
        }
    }
    let columns: Vec<Column> = stmt
        .columns()
        .iter()
        .map(|c| Column {
            name: c.name().to_owned(),
            type_name: c.type_().name().to_owned(),
        })
        .collect();
    let bound: Vec<Param<'_>> = params.iter().map(Param).collect();
    let portal = tx
        .bind_raw(&stmt, bound.iter().map(|p| p as &(dyn ToSql + Sync)))
        .await
        .map_err(|e| classify(e, limits))?;
    let mut out = Rows {
        columns,
        ..Rows::default()
    };
    let mut budget = RowBudget::new(limits);
    'fetch: loop {
        let batch = tx
            .query_portal(&portal, BATCH_ROWS)
            .await
            .map_err(|e| classify(e, limits))?;
        let done = batch.len() < BATCH_ROWS as usize;
        for row in batch {
            let mut values = Vec::with_capacity(row.len());
            for (i, column) in row.columns().iter().enumerate() {
                let cell: Cell = row.try_get(i).map_err(|e| {
                    DbError::Failed(format!(
                        "column {:?} of type {} cannot be returned ({e}); cast it, e.g. {}::text",
                        column.name(),
                        column.type_().name(),
                        column.name()
                    ))
                })?;
                values.push(cell.0);
            }
            if !budget.push(&mut out, values)? {
                break 'fetch;
            }
        }
        if done {
            break;
        }
    }
    tx.rollback().await.map_err(|e| classify(e, limits))?;
    Ok(out)
}

/// `ident` as a quoted SQL identifier.
fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn classify(e: tokio_postgres::Error, limits: &DbLimits) -> DbError {
    let Some(db) = e.as_db_error() else {
        if e.is_closed() {
            return DbError::Unavailable("the database connection was closed".into());
        }
        return DbError::Failed(e.to_string());
    };
    let message = db.message().to_owned();
    let code = db.code();
    // "current transaction is aborted" can only follow an error this query
    // never saw: every reply is read up to its `ReadyForQuery`, and a guest
    // cannot run transaction control. PostgreSQL leaves one error unsent: a
    // statement timeout that expires as a batch ends (after `PortalSuspended`,
    // before the `Sync` stops the timer) aborts the transaction, and only the
    // next batch learns of it, as this error: that is the timeout. Seen with
    // PostgreSQL 15 in 3 of 400 batched fetches whose timeout (0.5-4.4 ms)
    // was close to a batch's time.
    if *code == SqlState::QUERY_CANCELED || *code == SqlState::IN_FAILED_SQL_TRANSACTION {
        DbError::timeout(limits)
    } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION
        || *code == SqlState::INSUFFICIENT_PRIVILEGE
    {
        DbError::Denied(message)
    } else if *code == SqlState::PROGRAM_LIMIT_EXCEEDED {
        DbError::TooLarge(message)
    } else if code.code().starts_with("42") {
        // Class 42: syntax error or access rule violation (undefined table,
        // column, function, ...).
        DbError::Syntax(message)
    } else if code.code().starts_with("08") || code.code().starts_with("57") {
        DbError::Unavailable(message)
    } else {
        DbError::Failed(message)
    }
}

/// A parameter bound to whatever type the server inferred, if it fits.
#[derive(Debug)]
struct Param<'a>(&'a Value);

impl Param<'_> {
    fn check(&self, ty: &Type) -> Result<(), String> {
        let fits = match self.0 {
            Value::Null => true,
            Value::Boolean(_) => *ty == Type::BOOL,
            Value::Integer(n) => match *ty {
                Type::INT2 => i16::try_from(*n).is_ok(),
                Type::INT4 => i32::try_from(*n).is_ok(),
                Type::OID => u32::try_from(*n).is_ok(),
                Type::INT8 | Type::FLOAT4 | Type::FLOAT8 => true,
                _ => false,
            },
            Value::Real(_) => matches!(*ty, Type::FLOAT4 | Type::FLOAT8),
            Value::Text(_) => is_text(ty) || matches!(*ty, Type::JSON | Type::JSONB),
            Value::Json(_) => matches!(*ty, Type::JSON | Type::JSONB) || is_text(ty),
            Value::Blob(_) => *ty == Type::BYTEA,
            Value::Timestamp(_) => matches!(*ty, Type::TIMESTAMP | Type::TIMESTAMPTZ | Type::DATE),
        };
        if fits {
            Ok(())
        } else {
            Err(format!(
                "a {} value cannot be passed where {} is expected (or is out of range); cast the parameter in SQL, e.g. $1::text",
                self.0.kind(),
                ty.name()
            ))
        }
    }
}

fn is_text(ty: &Type) -> bool {
    matches!(
        *ty,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN
    ) || matches!(ty.kind(), Kind::Enum(_))
}

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.check(ty)?;
        match self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Boolean(b) => b.to_sql(ty, out),
            Value::Integer(n) => match *ty {
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                Type::OID => u32::try_from(*n)?.to_sql(ty, out),
                Type::FLOAT4 => (*n as f32).to_sql(ty, out),
                Type::FLOAT8 => (*n as f64).to_sql(ty, out),
                _ => n.to_sql(ty, out),
            },
            Value::Real(f) => match *ty {
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                _ => f.to_sql(ty, out),
            },
            Value::Text(s) | Value::Json(s) => {
                if *ty == Type::JSONB {
                    // jsonb's binary form: a version byte, then the text.
                    out.extend_from_slice(&[1]);
                }
                out.extend_from_slice(s.as_bytes());
                Ok(IsNull::No)
            }
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
            Value::Timestamp(micros) => {
                let since_pg_epoch = micros.saturating_sub(PG_EPOCH_MICROS);
                if *ty == Type::DATE {
                    let days = i32::try_from(since_pg_epoch.div_euclid(86_400_000_000))?;
                    days.to_sql(&Type::INT4, out)
                } else {
                    since_pg_epoch.to_sql(&Type::INT8, out)
                }
            }
        }
    }

    fn accepts(_: &Type) -> bool {
        // `check` decides, per value, with a message that says what to do.
        true
    }

    to_sql_checked!();
}

/// One value of a result row, decoded from PostgreSQL's binary format.
struct Cell(Value);

impl<'a> FromSql<'a> for Cell {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let value = match *ty {
            Type::BOOL => Value::Boolean(bool::from_sql(ty, raw)?),
            Type::INT2 => Value::Integer(i16::from_sql(ty, raw)?.into()),
            Type::INT4 => Value::Integer(i32::from_sql(ty, raw)?.into()),
            Type::INT8 => Value::Integer(i64::from_sql(ty, raw)?),
            Type::OID => Value::Integer(u32::from_sql(ty, raw)?.into()),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::BYTEA => Value::Blob(raw.to_vec()),
            Type::JSON => Value::Json(String::from_utf8_lossy(raw).into_owned()),
            Type::JSONB => {
                Value::Json(String::from_utf8_lossy(raw.get(1..).unwrap_or_default()).into_owned())
            }
            Type::TIMESTAMP | Type::TIMESTAMPTZ => {
                let micros = i64::from_sql(&Type::INT8, raw)?;
                Value::Timestamp(micros.saturating_add(PG_EPOCH_MICROS))
            }
            Type::DATE => {
                let days = i64::from(i32::from_sql(&Type::INT4, raw)?);
                Value::Timestamp(
                    days.saturating_mul(86_400_000_000)
                        .saturating_add(PG_EPOCH_MICROS),
                )
            }
            Type::NUMERIC => Value::Text(numeric_text(raw)?),
            Type::UUID => Value::Text(uuid_text(raw)?),
            ref t if is_text(t) || *t == Type::CHAR => {
                Value::Text(String::from_utf8_lossy(raw).into_owned())
            }
            ref t => return Err(format!("type {} is not supported", t.name()).into()),
        };
        Ok(Cell(value))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Cell(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// The text of a `numeric` in binary form: digit count, weight, sign and
/// display scale, then base-10000 digits.
fn numeric_text(raw: &[u8]) -> Result<String, String> {
    let word = |i: usize| -> Result<u16, String> {
        raw.get(i * 2..i * 2 + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated numeric".to_owned())
    };
    let ndigits = usize::from(word(0)?);
    let weight = i32::from(word(1)? as i16);
    let sign = word(2)?;
    let dscale = usize::from(word(3)?);
    match sign {
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        _ => {}
    }
    let digits = (0..ndigits)
        .map(|i| word(4 + i))
        .collect::<Result<Vec<_>, _>>()?;
    let digit = |pos: i32| -> u16 {
        usize::try_from(pos)
            .ok()
            .and_then(|p| digits.get(p).copied())
            .unwrap_or(0)
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for pos in 0..=weight {
            let d = digit(pos);
            if pos == 0 {
                text.push_str(&d.to_string());
            } else {
                text.push_str(&format!("{d:04}"));
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        let mut pos = weight + 1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", digit(pos)));
            pos += 1;
        }
        frac.truncate(dscale);
        text.push('.');
        text.push_str(&frac);
    }
    Ok(text)
}

fn uuid_text(raw: &[u8]) -> Result<String, String> {
    if raw.len() != 16 {
        return Err("a uuid is 16 bytes".into());
    }
    let hex = hex::encode(raw);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::super::{Dialect, statement_allowed};
    use super::*;

    #[test]
    fn only_reading_statements_pass() {
        for ok in [
            "select 1",
            "  -- c\n /* a /* nested */ b */ (SELECT 1)",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "values (1)",
            "EXPLAIN SELECT 1",
        ] {
            assert!(statement_allowed(Dialect::Postgres, ok).is_ok(), "{ok}");
        }
        for bad in [
            "COPY t TO STDOUT",
            "LOCK TABLE t",
            "/* x */ insert into t values (1)",
            "commit",
            "SET ROLE postgres",
            "DISCARD ALL",
        ] {
            assert!(
                matches!(
                    statement_allowed(Dialect::Postgres, bad),
                    Err(DbError::Denied(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn numerics_print_like_postgres() {
        // 12345.678: ndigits 3, weight 1, sign +, dscale 3: 1 2345 6780
        let raw: Vec<u8> = [3u16, 1, 0, 3, 1, 2345, 6780]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect();
        assert_eq!(numeric_text(&raw).unwrap(), "12345.678");
        // -0.05: ndigits 1, weight -1, sign -, dscale 2: 500
        let raw: Vec<u8> = [1u16, 0xFFFF, 0x4000, 2, 500]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect();
        assert_eq!(numeric_text(&raw).unwrap(), "-0.05");
    }
}
