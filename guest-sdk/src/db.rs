//! Read-only database handles the operator granted to this tool.
//!
//! The operator declares named handles (a SQLite file, a PostgreSQL database)
//! and grants some of them to a tool; the tool opens them by name and never
//! sees a path, a connection string or a password. Every query is read-only:
//! a statement that would change anything fails with [`DbError::Denied`] and
//! changes nothing. Each handle bounds a query's time (a query past its
//! deadline is stopped with [`DbError::Timeout`]), its rows and its bytes
//! (beyond them the result is cut and [`Rows::truncated`] is set).
//!
//! ```no_run
//! use cordon_guest::db::{self, Value};
//!
//! let shop = db::open("shop")?;
//! let rows = shop.query(
//!     "SELECT name, price FROM products WHERE price < ?1 ORDER BY price",
//!     &[Value::from(20.0)],
//! )?;
//! for row in &rows.rows {
//!     println!("{:?}", row);
//! }
//! let objects = rows.to_json(); // [{"name": ..., "price": ...}, ...]
//! # Ok::<(), db::DbError>(())
//! ```
//!
//! Parameters are positional: `?1`, `?2` (or `?`) in SQLite, `$1`, `$2` in
//! PostgreSQL. Natively (not on `wasm32`) there is no host: [`open`] fails
//! with [`DbError::Unavailable`] and [`granted`] is empty.

use std::fmt;

use serde_json::{Map, Value as Json};

use crate::ToolError;
use crate::bindings::cordon::tool::database as wit;

/// Why a handle could not be opened or a query failed.
pub use wit::Error as DbError;
pub use wit::{Column, Dialect, Rows, Value};

/// An open database handle. Closed when dropped.
#[derive(Debug)]
pub struct Connection {
    inner: wit::Connection,
}

/// Opens the granted handle `name`.
///
/// Fails with [`DbError::NotGranted`] if the operator did not grant this
/// tool a handle of that name for the calling tenant, and with
/// [`DbError::Unavailable`] if the database cannot be reached.
pub fn open(name: &str) -> Result<Connection, DbError> {
    #[cfg(target_arch = "wasm32")]
    {
        wit::open(name).map(|inner| Connection { inner })
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        Err(DbError::Unavailable(format!(
            "cannot open database handle `{name}`: there is no Cordon host when running natively"
        )))
    }
}

/// The names of the handles granted to this tool for the calling tenant,
/// sorted.
pub fn granted() -> Vec<String> {
    #[cfg(target_arch = "wasm32")]
    {
        wit::granted()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        Vec::new()
    }
}

impl Connection {
    /// The SQL dialect this handle speaks.
    pub fn dialect(&self) -> Dialect {
        self.inner.dialect()
    }

    /// Runs one read-only statement with positional parameters and returns
    /// its rows (at most the handle's row and byte limits).
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows, DbError> {
        self.inner.query(sql, params)
    }
}

impl Rows {
    /// The rows as JSON objects keyed by column name (see
    /// [`Value::to_json`]); a later column wins over an earlier one of the
    /// same name.
    pub fn to_json(&self) -> Json {
        Json::Array(
            self.rows
                .iter()
                .map(|row| {
                    let object: Map<String, Json> = self
                        .columns
                        .iter()
                        .zip(row)
                        .map(|(column, value)| (column.name.clone(), value.to_json()))
                        .collect();
                    Json::Object(object)
                })
                .collect(),
        )
    }

    /// The rows as a plain-text table with a header line, cells cut at
    /// `max_cell` characters; notes when the result was truncated.
    pub fn to_text_table(&self, max_cell: usize) -> String {
        let cell = |s: String| -> String {
            let s = s.replace(['\n', '\r', '\t'], " ");
            if s.chars().count() > max_cell {
                let mut cut: String = s.chars().take(max_cell.saturating_sub(1)).collect();
                cut.push('…');
                cut
            } else {
                s
            }
        };
        let header: Vec<String> = self.columns.iter().map(|c| cell(c.name.clone())).collect();
        let body: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| row.iter().map(|v| cell(v.to_string())).collect())
            .collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in &body {
            for (i, c) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let line = |cells: &[String]| -> String {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join(" | ")
                .trim_end()
                .to_owned()
        };
        let mut out = vec![line(&header)];
        out.push(
            widths
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("-+-"),
        );
        out.extend(body.iter().map(|r| line(r)));
        let n = self.rows.len();
        out.push(format!(
            "({n} row{}{})",
            if n == 1 { "" } else { "s" },
            if self.truncated {
                "; truncated at the handle's limit, more rows exist"
            } else {
                ""
            }
        ));
        out.join("\n")
    }
}

impl Value {
    /// The value as JSON: numbers, strings, booleans and null as such; a
    /// blob as `{"base64": "..."}`; a timestamp as an RFC 3339 UTC string;
    /// JSON text parsed (kept as a string if it does not parse).
    pub fn to_json(&self) -> Json {
        match self {
            Value::Null => Json::Null,
            Value::Integer(n) => Json::from(*n),
            Value::Real(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
            Value::Text(s) => Json::String(s.clone()),
            Value::Blob(b) => serde_json::json!({ "base64": base64(b) }),
            Value::Boolean(b) => Json::Bool(*b),
            Value::Timestamp(micros) => Json::String(rfc3339(*micros)),
            Value::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| Json::String(s.clone())),
        }
    }
}

impl fmt::Display for Value {
    /// Text for a table cell: `NULL`, numbers, text as is, a blob as its
    /// size, a timestamp in RFC 3339.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Integer(n) => write!(f, "{n}"),
            Value::Real(x) => write!(f, "{x}"),
            Value::Text(s) | Value::Json(s) => f.write_str(s),
            Value::Blob(b) => write!(f, "<{} bytes>", b.len()),
            Value::Boolean(b) => write!(f, "{b}"),
            Value::Timestamp(micros) => f.write_str(&rfc3339(*micros)),
        }
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Integer(n)
    }
}

impl From<i32> for Value {
    fn from(n: i32) -> Self {
        Value::Integer(n.into())
    }
}

impl From<f64> for Value {
    fn from(x: f64) -> Self {
        Value::Real(x)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Boolean(b)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}

impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Self {
        Value::Blob(b)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

impl DbError {
    /// A short name of the kind of error: `not-granted`, `syntax`, `denied`,
    /// `timeout`, `too-large`, `invalid-parameter`, `unavailable`, `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            DbError::NotGranted(_) => "not-granted",
            DbError::Syntax(_) => "syntax",
            DbError::Denied(_) => "denied",
            DbError::Timeout(_) => "timeout",
            DbError::TooLarge(_) => "too-large",
            DbError::InvalidParameter(_) => "invalid-parameter",
            DbError::Unavailable(_) => "unavailable",
            DbError::Failed(_) => "failed",
        }
    }

    /// The message and the kind, e.g. `"cannot execute INSERT in a
    /// read-only transaction (denied)"`. (`Display` shows the variant.)
    pub fn describe(&self) -> String {
        format!("{} ({})", self.message(), self.kind())
    }

    /// The host's explanation.
    pub fn message(&self) -> &str {
        match self {
            DbError::NotGranted(m)
            | DbError::Syntax(m)
            | DbError::Denied(m)
            | DbError::Timeout(m)
            | DbError::TooLarge(m)
            | DbError::InvalidParameter(m)
            | DbError::Unavailable(m)
            | DbError::Failed(m) => m,
        }
    }
}

impl From<DbError> for ToolError {
    /// A tool error (the model sees the message and may fix its query).
    fn from(err: DbError) -> Self {
        ToolError::new(err.describe())
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `micros` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`.
fn rfc3339(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if frac != 0 {
        text.push_str(&format!(".{frac:06}"));
    }
    text.push('Z');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_blobs() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(1_700_000_000_123_456),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(rfc3339(-1_000_000), "1969-12-31T23:59:59Z");
        assert_eq!(base64(b"Man"), "TWFu");
        assert_eq!(base64(b"Ma"), "TWE=");
        assert_eq!(base64(b"M"), "TQ==");
    }

    #[test]
    fn rows_render() {
        let rows = Rows {
            columns: vec![
                Column {
                    name: "id".into(),
                    type_name: "INTEGER".into(),
                },
                Column {
                    name: "name".into(),
                    type_name: "TEXT".into(),
                },
            ],
            rows: vec![
                vec![Value::Integer(1), Value::Text("Ada".into())],
                vec![Value::Integer(2), Value::Null],
            ],
            truncated: true,
        };
        assert_eq!(
            rows.to_json(),
            serde_json::json!([{"id": 1, "name": "Ada"}, {"id": 2, "name": null}])
        );
        assert_eq!(
            rows.to_text_table(40),
            "id | name\n---+-----\n1  | Ada\n2  | NULL\n(2 rows; truncated at the handle's limit, more rows exist)"
        );
    }

    #[test]
    fn natively_nothing_is_granted() {
        assert!(granted().is_empty());
        assert_eq!(open("x").unwrap_err().kind(), "unavailable");
    }
}
