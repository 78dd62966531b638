//! The tamper-evident audit log: one JSON record per line, each chained to
//! the one before it by a SHA-256 hash.
//!
//! Every `tools/call` (allowed or denied), authentication failure, quota
//! rejection, tool reload and refused database handle becomes one
//! [`AuditRecord`]. Callers describe what happened with an [`AuditEvent`] and
//! hand it to [`AuditLog::record`]; a dedicated writer thread numbers it,
//! stamps it into the chain and appends it to the file.
//!
//! # Format
//!
//! The log is JSON Lines (UTF-8, one record per line, `\n` after every
//! record). A record's members, always in this order:
//!
//! | member | type | notes |
//! |---|---|---|
//! | `seq` | integer | 1 for the first record, then +1 |
//! | `time` | string | RFC 3339, UTC, milliseconds: `2025-01-31T12:00:00.123Z` |
//! | `event` | string | `call`, `auth_failure`, `quota`, `reload`, `db_denied`, `admin` |
//! | `tenant`, `subject`, `session`, `transport`, `tool`, `component_sha256`, `args_digest` | string | each omitted when unknown |
//! | `arguments` | any JSON | only when the tenant's policy asks; see [`redact`] |
//! | `outcome`, `reason` | string | omitted when absent |
//! | `duration_ms` | number | milliseconds, rounded to microseconds |
//! | `fuel`, `peak_memory_bytes` | integer | omitted when absent |
//! | `remote` | string | peer address, omitted when absent |
//! | `prev` | string | `hash` of the previous record; 64 `0`s for the first |
//! | `hash` | string | see below; always the last member |
//!
//! **Canonical bytes.** A record's canonical bytes are its compact JSON
//! serialization *without* the `hash` member (but with `prev`): members in
//! the order above, absent optional members left out, no whitespace, strings
//! escaped as `serde_json` does. `hash` is the lowercase hex SHA-256 of those
//! bytes. Because `hash` is always the last member, a verifier never has to
//! re-serialize anything: it takes a line, checks that it ends with
//! `,"hash":"<64 hex>"}`, removes that member (keeping the closing `}`), and
//! hashes what is left. That is the whole algorithm [`verify`] uses, so it is
//! easy to re-implement elsewhere (for example `sed` + `sha256sum`).
//!
//! `args_digest` is the SHA-256 of the arguments serialized as compact JSON
//! with object keys sorted by their bytes ([`args_digest`]), so the same
//! arguments give the same digest whatever order a client sent them in.
//!
//! **Head file.** Beside the log, `<log>.head` holds `{"seq":N,"hash":"…"}`
//! of the last record known to be on disk. It is rewritten atomically (write
//! a temporary file, fsync it, rename it over) after every commit. Without
//! it, cutting records off the end of the log would leave a valid chain; with
//! it, [`verify`] reports a log that ends before the head's `seq`, or whose
//! record at that `seq` has another hash. A head that lags the log (a crash
//! between the log's fsync and the head's rename) is normal and accepted.
//!
//! # What [`verify`] detects
//!
//! Reading line by line, for line `N`:
//! - the line does not parse or lacks the trailing `hash` member: *malformed*;
//! - the canonical bytes do not hash to `hash`: the record was *edited*;
//! - `seq` is not the previous `seq` + 1 (1 on line 1): a record was
//!   *deleted, inserted or moved*;
//! - `prev` is not the previous record's `hash`: the chain was *spliced*;
//! - the last line has no `\n`: a *torn* write (a crash mid-append), reported
//!   as its own [`Problem::TornLine`];
//! - the log ends before the head's `seq`, or the head's hash differs from
//!   the record's: the log was *truncated* or rewritten.
//!
//! # Threat model
//!
//! The chain makes the log tamper-*evident*, not tamper-*proof*. Anyone who
//! can write the files can also rewrite the whole chain from the first
//! edited record on and then rewrite the head to match; nothing in this
//! module can detect that. Deleting the head disables the truncation check
//! ([`VerifyReport`] says the head is missing). To close that gap, ship the
//! head (or periodic `seq`/`hash` pairs) somewhere the host cannot rewrite:
//! a remote log, a WORM bucket, a ticket. Those anchors then pin every
//! record up to them.
//!
//! # Durability
//!
//! [`Durability::Always`]: [`AuditLog::record`] returns only once the record
//! is written and `fdatasync`ed. Concurrent callers share syncs (group
//! commit): the writer thread drains everything queued, writes it in one
//! go, syncs once and then wakes every waiter. [`Durability::Batched`]:
//! `record` returns once the record is queued; the writer syncs every
//! `interval` (sooner when a lot is queued), so a crash can lose up to one
//! interval of records, never the chain's integrity.
//!
//! Records are numbered and chained by the writer thread, so file order is
//! `seq` order. A failed write or sync rolls the chain back to the last
//! record known to be on disk (truncating any partial bytes), fails the
//! records it carried, and the writer goes on with later records.
//!
//! The writer holds an exclusive lock on the log (`flock`): a second writer,
//! in this process or another, is refused rather than interleaving chains.
//! Rotating the log means moving both the log and its head away.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

/// `prev` of the first record: 64 hex zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What [`redact`] puts in place of a redacted value.
pub const REDACTED: &str = "[redacted]";

/// The member every line ends with, up to the hash's hex digits.
const HASH_MEMBER: &[u8] = b",\"hash\":\"";
/// `,"hash":"` + 64 hex digits + `"}`.
const HASH_SUFFIX_LEN: usize = HASH_MEMBER.len() + 64 + 2;
/// Messages the writer takes from the queue before it writes them out.
const MAX_BATCH_MESSAGES: usize = 4096;
/// Under [`Durability::Batched`], bytes pending that trigger a sync before
/// the interval is over.
const MAX_PENDING_BYTES: usize = 1 << 20;

// ---------------------------------------------------------------------------
// Events and records

/// What kind of thing a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A `tools/call`, allowed or denied.
    #[default]
    Call,
    /// A request whose credentials were missing or invalid.
    AuthFailure,
    /// A request refused by a quota or rate limit.
    Quota,
    /// The tool set was reloaded.
    Reload,
    /// A tool asked for a database handle it was not granted.
    DbDenied,
    /// An administrative action.
    Admin,
}

impl EventKind {
    /// Every kind, in declaration order.
    pub const ALL: [EventKind; 6] = [
        EventKind::Call,
        EventKind::AuthFailure,
        EventKind::Quota,
        EventKind::Reload,
        EventKind::DbDenied,
        EventKind::Admin,
    ];

    /// The name written to the log (`"call"`, `"auth_failure"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Call => "call",
            EventKind::AuthFailure => "auth_failure",
            EventKind::Quota => "quota",
            EventKind::Reload => "reload",
            EventKind::DbDenied => "db_denied",
            EventKind::Admin => "admin",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown audit event {s:?}; use one of {}", names.join(", "))
            })
    }
}

/// One thing that happened, as the caller knows it. Fill what you know and
/// leave the rest to `Default`:
///
/// ```
/// use cordon::audit::{AuditEvent, EventKind};
/// let event = AuditEvent {
///     event: EventKind::AuthFailure,
///     transport: Some("streamable-http".into()),
///     reason: Some("expired token".into()),
///     ..AuditEvent::default()
/// };
/// # let _ = event;
/// ```
///
/// Optional members are left out of the record when `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditEvent {
    /// The kind of event.
    pub event: EventKind,
    /// The caller's tenant, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The authenticated subject (user, key id, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The MCP session id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// `"streamable-http"`, `"sse"`, `"stdio"`, `"cli"`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The tool's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// SHA-256 (hex) of the component that provides the tool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub component_sha256: Option<String>,
    /// [`args_digest`] of the call's arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args_digest: Option<String>,
    /// The full arguments, [`redact`]ed; only when the tenant's policy asks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
    /// For calls: `"ok"`, `"tool_error"`, `"denied"` (no role allows the
    /// tool), `"unknown_tool"`, `"invalid_arguments"`, `"invalid_output"`,
    /// `"timeout"`, `"memory_limit"`, `"fuel_exhausted"`, `"output_limit"`,
    /// `"panic"`, `"trap"`, `"cancelled"`, `"unavailable"`; `"rate_limited"`
    /// for quota refusals. Other events: `"ok"`, `"denied"`, `"partial"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Free text: why it was denied, why authentication failed, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Wall time in milliseconds (rounded to microseconds when written;
    /// NaN and infinities are dropped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    /// Fuel consumed, when metered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Largest linear memory the instance reached, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// The peer's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

impl AuditEvent {
    /// An event of `kind` with nothing else filled in.
    pub fn new(kind: EventKind) -> AuditEvent {
        AuditEvent {
            event: kind,
            ..AuditEvent::default()
        }
    }

    /// Sets `args_digest` from `args` and, when `include` is true (the
    /// tenant's policy asks for full arguments), `arguments` to `args` with
    /// `redact_keys` redacted.
    pub fn with_arguments(self, args: &Value, include: bool, redact_keys: &[String]) -> Self {
        let serialized = serde_json::to_vec(args).unwrap_or_default();
        self.with_serialized_arguments(args, &serialized, include, redact_keys)
    }

    /// [`AuditEvent::with_arguments`], with `serialized` = `args` as serde_json
    /// wrote it.
    pub fn with_serialized_arguments(
        mut self,
        args: &Value,
        serialized: &[u8],
        include: bool,
        redact_keys: &[String],
    ) -> Self {
        self.args_digest = Some(digest_serialized(serialized));
        self.arguments = include.then(|| redact(args, redact_keys));
        self
    }
}

/// One line of the log, as read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// RFC 3339 UTC time with milliseconds.
    pub time: String,
    /// What happened.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// `hash` of the previous record ([`GENESIS_HASH`] for the first).
    pub prev: String,
    /// SHA-256 (hex) of this record's canonical bytes.
    pub hash: String,
}

impl AuditRecord {
    /// `time` as a [`SystemTime`], when it parses.
    pub fn system_time(&self) -> Option<SystemTime> {
        parse_time(&self.time).ok()
    }
}

/// An event serialized by the thread that records it: `{"event":…}` with
/// its members in the format's order. The writer thread, which every
/// record passes through one at a time, then only numbers, chains and
/// hashes; the serialization (and the freeing of the event's strings) stays
/// on the caller's thread.
struct EncodedEvent(Vec<u8>);

impl EncodedEvent {
    fn new(mut event: AuditEvent, buffers: &BufferPool) -> Result<EncodedEvent, AuditError> {
        event.duration_ms = event
            .duration_ms
            .map(|ms| (ms * 1000.0).round() / 1000.0)
            .filter(|ms| ms.is_finite());
        let mut bytes = buffers.take();
        if let Err(e) = serde_json::to_writer(&mut bytes, &event) {
            return Err(AuditError::Serialize(Arc::new(e)));
        }
        // `event` is never skipped, so the object has at least one member.
        debug_assert!(bytes.starts_with(b"{\"event\":") && bytes.ends_with(b"}"));
        Ok(EncodedEvent(bytes))
    }

    /// The members, without the object's braces.
    fn members(&self) -> &[u8] {
        &self.0[1..self.0.len() - 1]
    }
}

/// Buffers for [`EncodedEvent`]s, which the writer hands back once it has
/// copied them into its batch. In the steady state recording a call then
/// allocates nothing, and no buffer is freed on the writer thread: glibc
/// returns a chunk freed by another thread to the arena it came from, under
/// that arena's lock, which the request threads allocating from it would
/// wait for.
#[derive(Default)]
struct BufferPool(std::sync::Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    /// Buffers kept at most (a batch holds up to [`MAX_BATCH_MESSAGES`]).
    const MAX_BUFFERS: usize = 1024;
    /// Larger buffers (full arguments recorded) are freed, not kept.
    const MAX_BUFFER_BYTES: usize = 4096;

    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(512))
    }

    /// Sets `buffer` aside in `spare` for [`give_back`](Self::give_back),
    /// emptied, unless it is too large or `spare` is full (then it is freed).
    fn set_aside(spare: &mut Vec<Vec<u8>>, mut buffer: Vec<u8>) {
        if buffer.capacity() <= Self::MAX_BUFFER_BYTES && spare.len() < Self::MAX_BUFFERS {
            buffer.clear();
            spare.push(buffer);
        }
    }

    /// Takes back the buffers in `spare` (emptied), up to the pool's size.
    fn give_back(&self, spare: &mut Vec<Vec<u8>>) {
        if spare.is_empty() {
            return;
        }
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let room = Self::MAX_BUFFERS.saturating_sub(pool.len());
        // Drained whole: the buffers beyond `room` are freed here.
        pool.extend(spare.drain(..).take(room));
    }
}

/// The sidecar `<log>.head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

/// SHA-256 (lowercase hex) of `args` serialized as compact JSON with object
/// keys sorted by their bytes, at every depth.
pub fn args_digest(args: &Value) -> String {
    // serde_json's `Map` is a `BTreeMap` here (the `preserve_order` feature
    // is off), so its compact serialization already has its keys sorted by
    // their bytes; `args_digest_ignores_key_order` guards that.
    digest_serialized(&serde_json::to_vec(args).unwrap_or_default())
}

/// [`args_digest`] of arguments the caller has already serialized with
/// `serde_json` (saves serializing them twice on the call path).
pub fn digest_serialized(json: &[u8]) -> String {
    sha256_hex(json)
}

/// The definition of the digest's input, written out: compact JSON with
/// object keys sorted by their bytes. Tests check [`args_digest`] against it.
#[cfg(test)]
fn write_sorted_json(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(key.clone()).to_string().as_bytes());
                out.push(b':');
                write_sorted_json(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_sorted_json(item, out);
            }
            out.push(b']');
        }
        // Scalars: `Display` of a `Value` is its compact JSON.
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

/// `args` with the value of every object member whose key matches one of
/// `keys` (ASCII case-insensitively), at any depth, replaced by
/// [`REDACTED`]. Arrays are searched too.
pub fn redact(args: &Value, keys: &[String]) -> Value {
    match args {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, value)| {
                    let value = if keys.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                        Value::String(REDACTED.to_owned())
                    } else {
                        redact(value, keys)
                    };
                    (key.clone(), value)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| redact(v, keys)).collect()),
        scalar => scalar.clone(),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The head file of the log at `log`: `<log>.head`.
pub fn head_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
}

// ---------------------------------------------------------------------------
// Errors and reports

/// Why a log failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The line is not a JSON audit record ending with its `hash` member.
    Malformed(String),
    /// The record's content does not hash to its `hash`: it was edited.
    HashMismatch {
        /// The `hash` the line carries.
        recorded: String,
        /// What its canonical bytes hash to.
        computed: String,
    },
    /// `seq` is not the one expected here.
    SeqMismatch {
        /// The previous record's `seq` + 1.
        expected: u64,
        /// The line's `seq`.
        found: u64,
    },
    /// `prev` is not the previous record's hash.
    PrevMismatch {
        /// The previous record's `hash`.
        expected: String,
        /// The line's `prev`.
        found: String,
    },
    /// The log ends before the record the head file names.
    Truncated {
        /// The head's `seq`.
        head_seq: u64,
        /// The last `seq` in the log (0 when empty).
        last_seq: u64,
    },
    /// The record at the head's `seq` has another hash than the head says.
    HeadMismatch {
        /// The head's `hash`.
        head_hash: String,
        /// The record's `hash`.
        record_hash: String,
    },
    /// The last line has no trailing newline: a write interrupted by a crash.
    TornLine {
        /// Byte offset where the torn line starts.
        offset: u64,
        /// Its length in bytes.
        bytes: u64,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Malformed(why) => write!(f, "not a valid audit record: {why}"),
            Problem::HashMismatch { recorded, computed } => write!(
                f,
                "hash mismatch, the record was edited: it carries hash {recorded} \
                 but its content hashes to {computed}"
            ),
            Problem::SeqMismatch { expected, found } => write!(
                f,
                "sequence gap: expected seq {expected}, found seq {found} \
                 (a record was deleted, inserted or moved)"
            ),
            Problem::PrevMismatch { expected, found } => write!(
                f,
                "chain broken: prev is {found} but the previous record's hash is {expected} \
                 (a record before this one was replaced, deleted or moved)"
            ),
            Problem::Truncated { head_seq, last_seq } => write!(
                f,
                "log truncated: it ends at seq {last_seq} but the head file records seq \
                 {head_seq}; records were cut off the end"
            ),
            Problem::HeadMismatch {
                head_hash,
                record_hash,
            } => write!(
                f,
                "head mismatch: the head file says this record's hash is {head_hash} but it is \
                 {record_hash}; the log was rewritten from here on (or the head was edited)"
            ),
            Problem::TornLine { offset, bytes } => write!(
                f,
                "torn final line: {bytes} bytes at offset {offset} without a trailing newline \
                 (a write interrupted by a crash); opening the log for writing removes them"
            ),
        }
    }
}

/// Everything that can go wrong with the audit log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// A file operation failed.
    #[error("audit log {}: cannot {action}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done ("open", "read", ...).
        action: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The log does not verify.
    #[error("audit log {}, line {line} (seq {seq}): {problem}", .path.display())]
    Chain {
        /// The log.
        path: PathBuf,
        /// 1-based line number (one past the last line for truncation).
        line: u64,
        /// The record's `seq`, or the one expected there when the line
        /// cannot be read or is missing.
        seq: u64,
        /// What is wrong.
        problem: Problem,
    },
    /// The head file exists but cannot be used.
    #[error("audit head file {}: {message}", .path.display())]
    Head {
        /// The head file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Another writer holds the log.
    #[error(
        "audit log {} is locked by another writer (another cordon process, or another \
         AuditLog opened on the same file)",
        .path.display()
    )]
    Locked {
        /// The log.
        path: PathBuf,
    },
    /// A record could not be written or synced; it is not in the log.
    #[error("audit log {}: record not written: {source}", .path.display())]
    Write {
        /// The log.
        path: PathBuf,
        /// The OS error (shared by every record of the failed batch).
        #[source]
        source: Arc<io::Error>,
    },
    /// A record could not be serialized; it is not in the log.
    #[error("audit record could not be serialized: {0}")]
    Serialize(#[source] Arc<serde_json::Error>),
    /// A line of the log is not an audit record (readers).
    #[error("audit log {}, line {line}: not an audit record: {source}", .path.display())]
    Record {
        /// The log.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The writer thread is gone; nothing more can be recorded.
    #[error("the audit log's writer has stopped; the record was not written")]
    Closed,
    /// A time given on the command line or in a record does not parse.
    #[error(
        "invalid time {input:?}: {message} (use RFC 3339 like 2025-01-31T12:00:00Z, \
         or a duration before now like 15m, 2h, 1d)"
    )]
    Time {
        /// What was given.
        input: String,
        /// Why it does not parse.
        message: String,
    },
}

impl AuditError {
    fn io(path: &Path, action: &'static str, source: io::Error) -> AuditError {
        AuditError::Io {
            path: path.to_owned(),
            action,
            source,
        }
    }

    /// The [`Problem`] when this is a verification failure.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            AuditError::Chain { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

/// What the head file says about a verified log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadStatus {
    /// No head file: truncation at the end cannot be detected.
    Missing,
    /// The head names the last record.
    Current,
    /// The head names an earlier record (normal after a crash between the
    /// log's sync and the head's rename, or while a writer is running).
    Lagging {
        /// The head's `seq`.
        seq: u64,
    },
}

/// A log that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The log.
    pub path: PathBuf,
    /// Records in the log (also the last `seq`).
    pub records: u64,
    /// `hash` of the last record ([`GENESIS_HASH`] when empty).
    pub last_hash: String,
    /// What the head file says.
    pub head: HeadStatus,
    /// Bytes of complete records.
    bytes: u64,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: OK, {} record(s), chain intact, last hash {}",
            self.path.display(),
            self.records,
            self.last_hash
        )?;
        match &self.head {
            HeadStatus::Current => write!(f, "; head file matches the last record"),
            HeadStatus::Lagging { seq } => write!(
                f,
                "; head file matches seq {seq} (it lags the log, which is normal after a crash \
                 or while a writer is running)"
            ),
            HeadStatus::Missing => write!(
                f,
                "; WARNING: no head file ({}), so records cut off the end would not be noticed",
                head_path(&self.path).display()
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// Verification

/// Checks the whole chain of the log at `path` against itself and its head
/// file; see the module documentation for what is detected.
///
/// Run it on a log no writer is appending to, or expect the last line to be
/// reported torn while it is being written.
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    let file = File::open(path).map_err(|e| AuditError::io(path, "open", e))?;
    verify_file(path, file)
}

fn read_head(log: &Path) -> Result<Option<Head>, AuditError> {
    let path = head_path(log);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AuditError::io(&path, "read", e)),
    };
    let head: Head = serde_json::from_slice(&text).map_err(|e| AuditError::Head {
        path: path.clone(),
        message: format!(
            "not a head record ({e}); check the log with `verify`, then delete the head file \
             to accept the log as it is"
        ),
    })?;
    if !is_hex_hash(head.hash.as_bytes()) {
        return Err(AuditError::Head {
            path,
            message: "its hash is not 64 lowercase hex digits".into(),
        });
    }
    Ok(Some(head))
}

fn is_hex_hash(bytes: &[u8]) -> bool {
    bytes.len() == 64 && bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The fields verification needs; everything else is only hashed.
#[derive(Deserialize)]
struct ChainFields {
    seq: u64,
    prev: String,
}

fn verify_file(path: &Path, file: File) -> Result<VerifyReport, AuditError> {
    // The head first: a writer only moves it forward after the log is on
    // disk, so a head read before the log never names a record we miss.
    let head = read_head(path)?;
    let chain_err = |line: u64, seq: u64, problem: Problem| AuditError::Chain {
        path: path.to_owned(),
        line,
        seq,
        problem,
    };

    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    let mut offset = 0u64;
    let mut last_seq = 0u64;
    let mut last_hash = GENESIS_HASH.to_owned();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| AuditError::io(path, "read", e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.last() != Some(&b'\n') {
            let problem = Problem::TornLine {
                offset,
                bytes: n as u64,
            };
            return Err(chain_err(line_no, last_seq + 1, problem));
        }
        buf.pop();
        let (seq, hash) = check_line(&buf, last_seq + 1, &last_hash)
            .map_err(|(seq, problem)| chain_err(line_no, seq, problem))?;
        if let Some(head) = &head
            && head.seq == seq
            && head.hash != hash
        {
            let problem = Problem::HeadMismatch {
                head_hash: head.hash.clone(),
                record_hash: hash,
            };
            return Err(chain_err(line_no, seq, problem));
        }
        last_seq = seq;
        last_hash = hash;
        offset += n as u64;
    }

    let head = match head {
        None => HeadStatus::Missing,
        Some(head) if head.seq > last_seq => {
            let problem = Problem::Truncated {
                head_seq: head.seq,
                last_seq,
            };
            return Err(chain_err(line_no + 1, last_seq + 1, problem));
        }
        Some(head) if head.seq == last_seq => HeadStatus::Current,
        // Every seq up to `last_seq` was checked against the head above.
        Some(head) => HeadStatus::Lagging { seq: head.seq },
    };
    Ok(VerifyReport {
        path: path.to_owned(),
        records: last_seq,
        last_hash,
        head,
        bytes: offset,
    })
}

/// Checks one line (without its newline); returns its `seq` and `hash`, or
/// the `seq` to report and the problem.
fn check_line(line: &[u8], expected_seq: u64, prev: &str) -> Result<(u64, String), (u64, Problem)> {
    let malformed = |why: String| (expected_seq, Problem::Malformed(why));
    let len = line.len();
    if len < HASH_SUFFIX_LEN + 2
        || !line.ends_with(b"\"}")
        || &line[len - HASH_SUFFIX_LEN..len - HASH_SUFFIX_LEN + HASH_MEMBER.len()] != HASH_MEMBER
        || !is_hex_hash(&line[len - 66..len - 2])
    {
        return Err(malformed(
            "it does not end with its \"hash\" member (64 lowercase hex digits)".into(),
        ));
    }
    let fields: ChainFields =
        serde_json::from_slice(line).map_err(|e| malformed(format!("invalid JSON: {e}")))?;
    let recorded = String::from_utf8_lossy(&line[len - 66..len - 2]).into_owned();

    let mut canonical = Vec::with_capacity(len - HASH_SUFFIX_LEN + 1);
    canonical.extend_from_slice(&line[..len - HASH_SUFFIX_LEN]);
    canonical.push(b'}');
    let computed = sha256_hex(&canonical);
    if computed != recorded {
        return Err((fields.seq, Problem::HashMismatch { recorded, computed }));
    }
    if fields.seq != expected_seq {
        let problem = Problem::SeqMismatch {
            expected: expected_seq,
            found: fields.seq,
        };
        return Err((fields.seq, problem));
    }
    if fields.prev != prev {
        let problem = Problem::PrevMismatch {
            expected: prev.to_owned(),
            found: fields.prev,
        };
        return Err((fields.seq, problem));
    }
    Ok((fields.seq, recorded))
}

// ---------------------------------------------------------------------------
// Configuration

/// How durable a record is when [`AuditLog::record`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Written and `fdatasync`ed (group commit shares syncs between callers).
    Always,
    /// Queued; the writer syncs at least every `interval`.
    Batched {
        /// Longest time a queued record waits for its sync.
        interval: Duration,
    },
}

/// Where and how [`AuditLog::open`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// The log file; its head is `<path>.head`.
    pub path: PathBuf,
    /// When `record` returns.
    pub durability: Durability,
}

/// `durability` in `[audit]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    /// Every record is synced before the request goes on.
    Always,
    /// Records are synced every `batch_ms`.
    #[default]
    Batched,
}

/// The `[audit]` table of the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Write the audit log at all. Default true.
    pub enabled: bool,
    /// The log file, relative to the config file's directory. Default
    /// `.cordon/audit/audit.jsonl`.
    pub path: PathBuf,
    /// `"always"`: a call returns only after its record is on disk;
    /// `"batched"` (default): records are synced every `batch_ms`.
    pub durability: DurabilityMode,
    /// Sync interval under `"batched"`, 1 to 10000 ms. Default 50.
    pub batch_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            path: ".cordon/audit/audit.jsonl".into(),
            durability: DurabilityMode::Batched,
            batch_ms: 50,
        }
    }
}

impl AuditConfig {
    /// Everything wrong with this table, as (full key, message) pairs, e.g.
    /// `("audit.batch_ms", "...")`. Empty when usable.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if !(1..=10_000).contains(&self.batch_ms) {
            problems.push((
                "audit.batch_ms".to_owned(),
                format!("must be 1 to 10000 (milliseconds), not {}", self.batch_ms),
            ));
        }
        if self.enabled && self.path.as_os_str().is_empty() {
            problems.push((
                "audit.path".to_owned(),
                "must name a file (set audit.enabled = false to turn the audit log off)".to_owned(),
            ));
        }
        if self.enabled && self.path.file_name().is_none() && !self.path.as_os_str().is_empty() {
            problems.push((
                "audit.path".to_owned(),
                format!("{} does not name a file", self.path.display()),
            ));
        }
        problems
    }

    /// The writer settings, with a relative `path` resolved against
    /// `base_dir` (the config file's directory).
    pub fn settings(&self, base_dir: &Path) -> AuditSettings {
        AuditSettings {
            path: base_dir.join(&self.path),
            durability: match self.durability {
                DurabilityMode::Always => Durability::Always,
                DurabilityMode::Batched => Durability::Batched {
                    interval: Duration::from_millis(self.batch_ms),
                },
            },
        }
    }

    /// Opens the log this table describes, or [`AuditLog::disabled`] when
    /// `enabled = false`.
    pub fn open(&self, base_dir: &Path) -> Result<AuditLog, AuditError> {
        if self.enabled {
            AuditLog::open(self.settings(base_dir))
        } else {
            Ok(AuditLog::disabled())
        }
    }
}

// ---------------------------------------------------------------------------
// The writer

type Done = oneshot::Sender<Result<(), AuditError>>;

enum Msg {
    Record {
        event: EncodedEvent,
        time: SystemTime,
        done: Option<Done>,
    },
    Flush(Done),
}

/// The append-only audit log. Cheap to clone (all clones share one writer
/// thread); dropping the last clone flushes and stops the writer, waiting
/// for it.
#[derive(Clone)]
pub struct AuditLog {
    /// `None`: the disabled log.
    inner: Option<Arc<Inner>>,
}

struct Inner {
    path: PathBuf,
    durability: Durability,
    buffers: Arc<BufferPool>,
    tx: Option<mpsc::Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
}

/// A handle that does not keep the log open: background tasks that outlive
/// their owner (e.g. the reload recorder) hold this, so that dropping the
/// last [`AuditLog`] still closes the file at once.
#[derive(Clone, Default)]
pub struct WeakAuditLog {
    inner: Option<std::sync::Weak<Inner>>,
}

impl WeakAuditLog {
    /// The log, while some [`AuditLog`] keeps it open.
    pub fn upgrade(&self) -> Option<AuditLog> {
        let inner = self.inner.as_ref()?.upgrade()?;
        Some(AuditLog { inner: Some(inner) })
    }
}

impl AuditLog {
    /// A handle that does not keep the log open.
    pub fn downgrade(&self) -> WeakAuditLog {
        WeakAuditLog {
            inner: self.inner.as_ref().map(Arc::downgrade),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel tells the writer to flush and stop.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "the audit writer thread panicked");
        }
    }
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            None => f.write_str("AuditLog(disabled)"),
            Some(inner) => f
                .debug_struct("AuditLog")
                .field("path", &inner.path)
                .field("durability", &inner.durability)
                .finish(),
        }
    }
}

impl AuditLog {
    /// Opens (creating it and its parent directories if needed) the log at
    /// `settings.path` and starts its writer thread.
    ///
    /// An existing log must verify, and the new records continue its chain.
    /// If the only problem is a torn final line (a crash mid-append), that
    /// partial line is cut off with a warning. Any other problem refuses to
    /// open with the [`AuditError::Chain`] that names it.
    pub fn open(settings: AuditSettings) -> Result<AuditLog, AuditError> {
        let path = settings.path;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)
                .map_err(|e| AuditError::io(parent, "create directory", e))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| AuditError::io(&path, "open", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(AuditError::Locked { path }),
            Err(fs::TryLockError::Error(e)) => return Err(AuditError::io(&path, "lock", e)),
        }

        let report = match verify(&path) {
            Ok(report) => report,
            Err(AuditError::Chain {
                line,
                problem: Problem::TornLine { offset, bytes },
                ..
            }) => {
                tracing::warn!(
                    path = %path.display(),
                    line,
                    bytes,
                    "audit log ends with a torn line (a write interrupted by a crash); removing it"
                );
                file.set_len(offset)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| AuditError::io(&path, "truncate the torn line", e))?;
                verify(&path)?
            }
            Err(e) => return Err(e),
        };
        if report.head == HeadStatus::Missing && report.records > 0 {
            tracing::warn!(
                path = %path.display(),
                records = report.records,
                "audit log has no head file; it will be written with the next record"
            );
        }
        tracing::info!(
            path = %path.display(),
            records = report.records,
            "audit log opened"
        );

        let buffers = Arc::new(BufferPool::default());
        let writer = Writer {
            head_path: head_path(&path),
            path: path.clone(),
            file,
            durability: settings.durability,
            next_seq: report.records + 1,
            last_hash: report.last_hash.clone(),
            durable_len: report.bytes,
            durable_seq: report.records,
            durable_hash: report.last_hash,
            needs_repair: false,
            head_failing: false,
            pending: Vec::new(),
            buffers: Arc::clone(&buffers),
            spare: Vec::new(),
            waiters: Vec::new(),
            flushers: Vec::new(),
            head_seq: (report.head == HeadStatus::Current).then_some(report.records),
            dirty_since: None,
            flush_requested: false,
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("cordon-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::io(&path, "start the writer thread for", e))?;
        Ok(AuditLog {
            inner: Some(Arc::new(Inner {
                path,
                durability: settings.durability,
                buffers,
                tx: Some(tx),
                thread: Some(thread),
            })),
        })
    }

    /// A log that records nothing (for tests and `enabled = false`).
    pub fn disabled() -> AuditLog {
        AuditLog { inner: None }
    }

    /// False for [`AuditLog::disabled`].
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The log file, unless disabled.
    pub fn path(&self) -> Option<&Path> {
        self.inner.as_deref().map(|inner| inner.path.as_path())
    }

    /// Appends `event`. Under [`Durability::Always`] this returns once the
    /// record is on disk, and an error means it is not in the log (fail the
    /// request). Under [`Durability::Batched`] it returns once queued; write
    /// errors are then logged by the writer. Cancelling the future does not
    /// withdraw a record already queued.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        match inner.durability {
            Durability::Always => {
                let (done, wait) = oneshot::channel();
                inner.send(event, Some(done))?;
                wait.await.map_err(|_| AuditError::Closed)?
            }
            Durability::Batched { .. } => inner.send(event, None),
        }
    }

    /// Queues `event` without waiting, for code that cannot await. Errors
    /// (writer gone, write failed) are logged.
    pub fn record_detached(&self, event: AuditEvent) {
        if let Some(inner) = &self.inner
            && let Err(e) = inner.send(event, None)
        {
            tracing::error!(error = %e, "audit record dropped");
        }
    }

    /// Waits until everything queued before this call is written and
    /// synced; failures are logged. Use at shutdown.
    pub async fn flush(&self) {
        if let Err(e) = self.try_flush().await {
            tracing::error!(error = %e, "audit log flush failed");
        }
    }

    /// Like [`AuditLog::flush`], returning the failure of the final sync.
    pub async fn try_flush(&self) -> Result<(), AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let (done, wait) = oneshot::channel();
        let tx = inner.tx.as_ref().ok_or(AuditError::Closed)?;
        tx.send(Msg::Flush(done)).map_err(|_| AuditError::Closed)?;
        wait.await.map_err(|_| AuditError::Closed)?
    }
}

impl Inner {
    fn send(&self, event: AuditEvent, done: Option<Done>) -> Result<(), AuditError> {
        let tx = self.tx.as_ref().ok_or(AuditError::Closed)?;
        let msg = Msg::Record {
            event: EncodedEvent::new(event, &self.buffers)?,
            time: SystemTime::now(),
            done,
        };
        tx.send(msg).map_err(|_| AuditError::Closed)
    }
}

/// The state of the writer thread. `next_seq`/`last_hash` describe the chain
/// including `pending`; the `durable_*` fields what is synced on disk.
struct Writer {
    path: PathBuf,
    head_path: PathBuf,
    file: File,
    durability: Durability,
    next_seq: u64,
    last_hash: String,
    durable_len: u64,
    durable_seq: u64,
    durable_hash: String,
    /// A failed write left bytes past `durable_len` that could not be cut.
    needs_repair: bool,
    /// The last head write failed (warn once, not per commit).
    head_failing: bool,
    pending: Vec<u8>,
    /// Where encoded events' buffers go back to.
    buffers: Arc<BufferPool>,
    /// Buffers already copied into `pending`, handed back at the next commit.
    spare: Vec<Vec<u8>>,
    /// Waiting for records in `pending`.
    waiters: Vec<Done>,
    /// Waiting for a flush.
    flushers: Vec<Done>,
    /// The `seq` the head file holds, when known.
    head_seq: Option<u64>,
    dirty_since: Option<Instant>,
    flush_requested: bool,
}

enum Next {
    Msg(Msg),
    Timeout,
    Closed,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            let next = match (self.durability, self.dirty_since) {
                (Durability::Batched { interval }, Some(since)) => {
                    // Sleep out the interval instead of waiting on the
                    // channel: a sender wakes a parked receiver, and a wake-up
                    // per record costs the callers more than the write does.
                    // A flush waits at most one interval.
                    let wait = (since + interval).saturating_duration_since(Instant::now());
                    if !self.flush_requested && !wait.is_zero() {
                        std::thread::sleep(wait);
                    }
                    if self.drain(&rx, usize::MAX) {
                        Next::Closed
                    } else {
                        Next::Timeout
                    }
                }
                _ => rx.recv().map_or(Next::Closed, Next::Msg),
            };
            match next {
                Next::Msg(msg) => self.accept(msg),
                Next::Timeout => {
                    self.commit();
                    continue;
                }
                Next::Closed => {
                    self.commit();
                    return;
                }
            }
            // Group commit: take everything already queued into this write.
            if self.drain(&rx, MAX_BATCH_MESSAGES - 1) {
                self.commit();
                return;
            }
            let due = match (self.durability, self.dirty_since) {
                (Durability::Always, _) => true,
                (Durability::Batched { interval }, since) => {
                    self.flush_requested
                        || self.pending.len() >= MAX_PENDING_BYTES
                        || since.is_some_and(|t| t.elapsed() >= interval)
                }
            };
            if due {
                self.commit();
            }
        }
    }

    /// Accepts up to `max` messages already queued, without waiting; true
    /// when every sender is gone.
    fn drain(&mut self, rx: &mpsc::Receiver<Msg>, max: usize) -> bool {
        for _ in 0..max {
            match rx.try_recv() {
                Ok(msg) => self.accept(msg),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => return true,
            }
        }
        false
    }

    fn accept(&mut self, msg: Msg) {
        match msg {
            Msg::Flush(done) => {
                self.flushers.push(done);
                self.flush_requested = true;
            }
            Msg::Record { event, time, done } => {
                self.append(&event, time);
                BufferPool::set_aside(&mut self.spare, event.0);
                self.dirty_since.get_or_insert_with(Instant::now);
                if let Some(done) = done {
                    self.waiters.push(done);
                }
            }
        }
    }

    /// Numbers and chains one record into `pending`: its canonical bytes
    /// are `{"seq":…,"time":…,<event members>,"prev":…}`, and the line ends
    /// with `,"hash":…}` in place of the closing brace.
    fn append(&mut self, event: &EncodedEvent, time: SystemTime) {
        let start = self.pending.len();
        // Writing to a Vec cannot fail; RFC 3339 times need no escaping.
        let _ = write!(
            self.pending,
            "{{\"seq\":{},\"time\":\"{}\",",
            self.next_seq,
            rfc3339(time)
        );
        self.pending.extend_from_slice(event.members());
        self.pending.extend_from_slice(b",\"prev\":\"");
        self.pending.extend_from_slice(self.last_hash.as_bytes());
        self.pending.push(b'"');
        let hash = hex::encode(
            Sha256::new()
                .chain_update(&self.pending[start..])
                .chain_update(b"}")
                .finalize(),
        );
        self.pending.extend_from_slice(HASH_MEMBER);
        self.pending.extend_from_slice(hash.as_bytes());
        self.pending.extend_from_slice(b"\"}\n");
        self.next_seq += 1;
        self.last_hash = hash;
    }

    /// Writes and syncs `pending`, answers the records' waiters, moves the
    /// head forward, then answers the flushes (so a flush also covers the
    /// head).
    fn commit(&mut self) {
        self.buffers.give_back(&mut self.spare);
        self.dirty_since = None;
        self.flush_requested = false;
        let result = if self.pending.is_empty() {
            Ok(())
        } else {
            self.write_pending()
        };
        let answer = |path: &Path, done: Done| {
            // A waiter that gave up (its future was dropped) is fine.
            let _ = done.send(result.as_ref().map(|_| ()).map_err(|e| AuditError::Write {
                path: path.to_owned(),
                source: Arc::clone(e),
            }));
        };
        for done in self.waiters.drain(..) {
            answer(&self.path, done);
        }
        if result.is_ok() && self.head_seq != Some(self.durable_seq) && self.durable_seq > 0 {
            self.write_head();
        }
        for done in self.flushers.drain(..) {
            answer(&self.path, done);
        }
    }

    fn write_pending(&mut self) -> Result<(), Arc<io::Error>> {
        let records = self.next_seq - 1 - self.durable_seq;
        let result = self.repair().and_then(|()| {
            self.file.write_all(&self.pending)?;
            self.file.sync_data()
        });
        match result {
            Ok(()) => {
                self.durable_len += self.pending.len() as u64;
                self.durable_seq = self.next_seq - 1;
                self.durable_hash = self.last_hash.clone();
                self.pending.clear();
                Ok(())
            }
            Err(e) => {
                tracing::error!(
                    path = %self.path.display(),
                    records,
                    error = %e,
                    "audit records could not be written; they are not in the log"
                );
                // Back to the last record known to be on disk, so the next
                // records continue a chain that matches the file.
                self.pending.clear();
                self.next_seq = self.durable_seq + 1;
                self.last_hash = self.durable_hash.clone();
                self.needs_repair = true;
                if let Err(e) = self.repair() {
                    tracing::error!(
                        path = %self.path.display(),
                        error = %e,
                        "cannot cut the partial write off the audit log; retrying with the next record"
                    );
                }
                Err(Arc::new(e))
            }
        }
    }

    /// Cuts anything a failed write left past the last synced record.
    fn repair(&mut self) -> io::Result<()> {
        if self.needs_repair {
            self.file.set_len(self.durable_len)?;
            self.needs_repair = false;
        }
        Ok(())
    }

    /// Rewrites `<log>.head` atomically. A failure only weakens truncation
    /// detection until the next success, so it is logged, not returned.
    fn write_head(&mut self) {
        let head = Head {
            seq: self.durable_seq,
            hash: self.durable_hash.clone(),
        };
        let mut tmp = self.head_path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let result = serde_json::to_vec(&head)
            .map_err(io::Error::other)
            .and_then(|bytes| {
                let mut file = File::create(&tmp)?;
                file.write_all(&bytes)?;
                file.sync_data()
            })
            .and_then(|()| fs::rename(&tmp, &self.head_path));
        if result.is_ok() {
            self.head_seq = Some(head.seq);
        }
        match result {
            Ok(()) if self.head_failing => {
                self.head_failing = false;
                tracing::info!(path = %self.head_path.display(), "audit head file written again");
            }
            Ok(()) => {}
            Err(e) if !self.head_failing => {
                self.head_failing = true;
                tracing::warn!(
                    path = %self.head_path.display(),
                    error = %e,
                    "cannot write the audit head file; truncation of the log's end will not be \
                     detected until it can"
                );
            }
            Err(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Times

/// RFC 3339 UTC with milliseconds, clamped to what RFC 3339 can express
/// (1970 to 9999) so formatting never fails.
fn rfc3339(time: SystemTime) -> humantime::Rfc3339Timestamp {
    const LAST_SECOND_OF_9999: u64 = 253_402_300_799;
    let since_epoch = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .min(Duration::from_secs(LAST_SECOND_OF_9999));
    humantime::format_rfc3339_millis(UNIX_EPOCH + since_epoch)
}

/// Parses an RFC 3339 time (`2025-01-31T12:00:00Z`, fractional seconds and
/// `±HH:MM` offsets allowed; `T` may be a space; no zone means UTC) or a
/// bare date (`2025-01-31`, midnight UTC).
pub fn parse_time(input: &str) -> Result<SystemTime, AuditError> {
    let s = input.trim();
    let err = |message: String| AuditError::Time {
        input: input.to_owned(),
        message,
    };
    let b = s.as_bytes();
    if b.len() == 10 {
        let midnight = format!("{s}T00:00:00Z");
        return humantime::parse_rfc3339_weak(&midnight).map_err(|e| err(e.to_string()));
    }
    // A numeric offset: parse the local time, then move it to UTC.
    let n = b.len();
    if n > 19 && matches!(b[n - 6], b'+' | b'-') && b[n - 3] == b':' {
        let digits = |i: usize| -> Option<u64> {
            let (h, l) = (b[i], b[i + 1]);
            (h.is_ascii_digit() && l.is_ascii_digit())
                .then(|| u64::from((h - b'0') * 10 + l - b'0'))
        };
        let (Some(hours), Some(minutes)) = (digits(n - 5), digits(n - 2)) else {
            return Err(err("bad UTC offset".into()));
        };
        if hours > 23 || minutes > 59 {
            return Err(err("UTC offset out of range".into()));
        }
        let offset = Duration::from_secs(hours * 3600 + minutes * 60);
        let local = humantime::parse_rfc3339_weak(&s[..n - 6]).map_err(|e| err(e.to_string()))?;
        let utc = if b[n - 6] == b'+' {
            local.checked_sub(offset)
        } else {
            local.checked_add(offset)
        };
        return utc.ok_or_else(|| err("out of range".into()));
    }
    humantime::parse_rfc3339_weak(s).map_err(|e| err(e.to_string()))
}

/// Parses a `--since` value: an RFC 3339 time (see [`parse_time`]) or a
/// duration before now such as `15m`, `2h`, `1d`, `1w`, `1h 30m`.
pub fn parse_since(input: &str) -> Result<SystemTime, AuditError> {
    let s = input.trim();
    let looks_like_date = s.len() >= 10 && s.as_bytes()[4] == b'-' && s.as_bytes()[7] == b'-';
    if looks_like_date {
        return parse_time(s);
    }
    let ago = humantime::parse_duration(s).map_err(|e| AuditError::Time {
        input: input.to_owned(),
        message: e.to_string(),
    })?;
    SystemTime::now()
        .checked_sub(ago)
        .ok_or_else(|| AuditError::Time {
            input: input.to_owned(),
            message: "too far in the past".into(),
        })
}

// ---------------------------------------------------------------------------
// Readers

/// Which records a CLI query wants; `None` matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Exact tenant.
    pub tenant: Option<String>,
    /// Exact tool name.
    pub tool: Option<String>,
    /// Exact outcome (`"ok"`, `"denied"`, ...).
    pub outcome: Option<String>,
    /// Event kind name (`"call"`, `"auth_failure"`, ...).
    pub event: Option<String>,
    /// Records at or after this time.
    pub since: Option<SystemTime>,
}

impl Query {
    /// Whether `record` passes every filter set. A record whose time does
    /// not parse fails a `since` filter.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        fn same(want: &Option<String>, have: Option<&str>) -> bool {
            want.as_deref().is_none_or(|w| have == Some(w))
        }
        let e = &record.event;
        same(&self.tenant, e.tenant.as_deref())
            && same(&self.tool, e.tool.as_deref())
            && same(&self.outcome, e.outcome.as_deref())
            && same(&self.event, Some(e.event.as_str()))
            && self
                .since
                .is_none_or(|since| record.system_time().is_some_and(|t| t >= since))
    }
}

/// The records of the log at `path`, in order, without checking the chain
/// (use [`verify`] for that). A line that is not a record, including a
/// torn last line, yields an error and reading goes on.
pub fn read_records(path: &Path) -> Result<Records, AuditError> {
    let file = File::open(path).map_err(|e| AuditError::io(path, "open", e))?;
    Ok(Records {
        path: path.to_owned(),
        reader: BufReader::new(file),
        line: 0,
        offset: 0,
        buf: Vec::new(),
        done: false,
    })
}

/// Iterator over a log's records; see [`read_records`].
#[derive(Debug)]
pub struct Records {
    path: PathBuf,
    reader: BufReader<File>,
    line: u64,
    offset: u64,
    buf: Vec<u8>,
    done: bool,
}

impl Iterator for Records {
    type Item = Result<AuditRecord, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        self.buf.clear();
        let n = match self.reader.read_until(b'\n', &mut self.buf) {
            Ok(0) => {
                self.done = true;
                return None;
            }
            Ok(n) => n,
            Err(e) => {
                self.done = true;
                return Some(Err(AuditError::io(&self.path, "read", e)));
            }
        };
        self.line += 1;
        let offset = self.offset;
        self.offset += n as u64;
        if self.buf.pop() != Some(b'\n') {
            self.done = true;
            return Some(Err(AuditError::Chain {
                path: self.path.clone(),
                line: self.line,
                seq: 0,
                problem: Problem::TornLine {
                    offset,
                    bytes: n as u64,
                },
            }));
        }
        Some(
            serde_json::from_slice(&self.buf).map_err(|source| AuditError::Record {
                path: self.path.clone(),
                line: self.line,
                source,
            }),
        )
    }
}

/// The last `n` complete records of the log at `path`, oldest first. Reads
/// backwards from the end, so it is quick on a long log; a torn last line
/// is skipped.
pub fn tail(path: &Path, n: usize) -> Result<Vec<AuditRecord>, AuditError> {
    const CHUNK: u64 = 64 * 1024;
    let mut file = File::open(path).map_err(|e| AuditError::io(path, "open", e))?;
    let len = file
        .metadata()
        .map_err(|e| AuditError::io(path, "read", e))?
        .len();
    if n == 0 || len == 0 {
        return Ok(Vec::new());
    }
    // Read chunks from the end until n + 1 newlines are in hand (the
    // extra one marks where the first wanted line starts) or the file
    // start is reached.
    let mut tail_bytes: VecDeque<u8> = VecDeque::new();
    let mut pos = len;
    let mut newlines = 0usize;
    while pos > 0 && newlines <= n {
        let start = pos.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; (pos - start) as usize];
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(&mut chunk))
            .map_err(|e| AuditError::io(path, "read", e))?;
        newlines += chunk.iter().filter(|&&b| b == b'\n').count();
        for &b in chunk.iter().rev() {
            tail_bytes.push_front(b);
        }
        pos = start;
    }
    let bytes: Vec<u8> = tail_bytes.into();
    // Drop a torn last line, then keep whole lines only.
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(i) => &bytes[..=i],
        None => return Ok(Vec::new()),
    };
    let lines: Vec<&[u8]> = complete[..complete.len() - 1]
        .split(|&b| b == b'\n')
        .collect();
    // When we did not reach the file start, the first piece may be partial.
    let skip_first = pos > 0;
    let whole = if skip_first { &lines[1..] } else { &lines[..] };
    let keep = &whole[whole.len().saturating_sub(n)..];
    // Line numbers are unknown when reading backwards; report 0.
    keep.iter()
        .map(|line| {
            serde_json::from_slice(line).map_err(|source| AuditError::Record {
                path: path.to_owned(),
                line: 0,
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_digest_is_the_digest_of_the_sorted_serialization() {
        let args = json!({"zeta": [1, {"b": "x\"y", "a": null}], "alpha": 1.5, "Émile": true});
        let mut sorted = Vec::new();
        write_sorted_json(&args, &mut sorted);
        assert_eq!(args_digest(&args), sha256_hex(&sorted));
        assert_eq!(serde_json::to_vec(&args).unwrap(), sorted);
    }
    use serde_json::json;

    fn call(tenant: &str, tool: &str, i: usize) -> AuditEvent {
        AuditEvent {
            event: EventKind::Call,
            tenant: Some(tenant.into()),
            transport: Some("stdio".into()),
            tool: Some(tool.into()),
            outcome: Some(if i.is_multiple_of(3) { "denied" } else { "ok" }.into()),
            duration_ms: Some(i as f64 / 7.0),
            fuel: Some(i as u64),
            ..AuditEvent::default()
        }
        .with_arguments(&json!({"i": i, "token": "secret"}), true, &["token".into()])
    }

    fn open(path: &Path, durability: Durability) -> AuditLog {
        AuditLog::open(AuditSettings {
            path: path.to_owned(),
            durability,
        })
        .expect("open audit log")
    }

    /// A log with `n` records, closed.
    async fn log_with(path: &Path, n: usize) {
        let log = open(path, Durability::Always);
        for i in 0..n {
            log.record(call("acme", "echo", i)).await.expect("record");
        }
        drop(log);
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .expect("read log")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        fs::write(path, text).expect("write log");
    }

    fn chain_error(path: &Path) -> (u64, u64, Problem) {
        match verify(path) {
            Err(AuditError::Chain {
                line, seq, problem, ..
            }) => (line, seq, problem),
            other => panic!("expected a chain error, got {other:?}"),
        }
    }

    #[test]
    fn audit_log_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<AuditLog>();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_always_records_form_one_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/audit.jsonl");
        let log = open(&path, Durability::Always);
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..200 {
                        log.record(call(&format!("t{t}"), "echo", i))
                            .await
                            .expect("record");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        // Under Always every record is on disk before record() returns.
        // The head may lag by the last group while the writer runs.
        let report = verify(&path).expect("verify while open");
        assert_eq!(report.records, 1600);
        drop(log);
        assert_eq!(verify(&path).expect("verify").head, HeadStatus::Current);

        let records: Vec<AuditRecord> = read_records(&path)
            .expect("read")
            .collect::<Result<_, _>>()
            .expect("records");
        assert_eq!(records.len(), 1600);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1);
            assert_eq!(r.time.len(), "2025-01-31T12:00:00.123Z".len(), "{}", r.time);
        }
        assert_eq!(records[0].prev, GENESIS_HASH);
        // The struct serializes back to the exact line: its field order is
        // the canonical order.
        for (record, line) in records.iter().zip(lines(&path)) {
            assert_eq!(serde_json::to_string(record).expect("serialize"), line);
        }
        let r = &records[0];
        assert_eq!(r.event.arguments, Some(json!({"i": 0, "token": REDACTED})));
        assert_eq!(
            r.event.args_digest.as_deref(),
            Some(args_digest(&json!({"token": "secret", "i": 0})).as_str())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn batched_records_form_one_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = open(
            &path,
            Durability::Batched {
                interval: Duration::from_millis(5),
            },
        );
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..200usize {
                        if i.is_multiple_of(2) {
                            log.record(call(&format!("t{t}"), "echo", i))
                                .await
                                .expect("record");
                        } else {
                            log.record_detached(call(&format!("t{t}"), "echo", i));
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        log.try_flush().await.expect("flush");
        let report = verify(&path).expect("verify");
        assert_eq!(report.records, 1600);
        assert_eq!(report.head, HeadStatus::Current);

        // Dropping the last handle flushes what is queued.
        log.record_detached(call("late", "echo", 1));
        drop(log);
        assert_eq!(verify(&path).expect("verify").records, 1601);
    }

    /// The writer assembles lines from pieces; they must be exactly what
    /// the module documentation defines: serde's compact serialization of
    /// `seq`, `time`, the event's members and `prev`, in that order, then
    /// `hash` over those bytes.
    #[tokio::test]
    async fn lines_are_the_documented_canonical_serialization() {
        #[derive(Serialize)]
        struct Canonical<'a> {
            seq: u64,
            time: &'a str,
            #[serde(flatten)]
            event: &'a AuditEvent,
            prev: &'a str,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = open(&path, Durability::Always);
        let full = AuditEvent {
            session: Some("s-1".into()),
            subject: Some("ann \"quoted\" \u{1F600}\n".into()),
            component_sha256: Some("ab".repeat(32)),
            reason: Some("tab\there".into()),
            peak_memory_bytes: Some(65_536),
            remote: Some("127.0.0.1:9".into()),
            ..call("acme", "echo", 4)
        };
        let events = [full, AuditEvent::new(EventKind::Reload), call("b", "x", 3)];
        for event in &events {
            log.record(event.clone()).await.expect("record");
        }
        drop(log);
        let mut prev = GENESIS_HASH.to_owned();
        for (i, (line, event)) in lines(&path).iter().zip(&events).enumerate() {
            let record: AuditRecord = serde_json::from_str(line).expect("a record");
            let mut expected_event = event.clone();
            expected_event.duration_ms = event.duration_ms.map(|ms| (ms * 1000.0).round() / 1000.0);
            assert_eq!(record.event, expected_event);
            let canonical = serde_json::to_vec(&Canonical {
                seq: i as u64 + 1,
                time: &record.time,
                event: &expected_event,
                prev: &prev,
            })
            .expect("serialize");
            let hash = sha256_hex(&canonical);
            let mut expected_line = canonical[..canonical.len() - 1].to_vec();
            expected_line.extend_from_slice(format!(",\"hash\":\"{hash}\"}}").as_bytes());
            assert_eq!(String::from_utf8(expected_line).unwrap(), *line);
            prev = hash;
        }
        assert_eq!(verify(&path).expect("verify").records, 3);
    }

    /// Written events' buffers go back to the pool (so recording a call
    /// allocates nothing in the steady state), except large ones.
    #[tokio::test]
    async fn event_buffers_are_reused_but_large_ones_are_not_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(&dir.path().join("audit.jsonl"), Durability::Always);
        let pool = || {
            let inner = log.inner.as_ref().expect("enabled");
            let buffers = inner.buffers.0.lock().unwrap();
            buffers.iter().map(Vec::capacity).collect::<Vec<_>>()
        };
        log.record(call("acme", "echo", 1)).await.expect("record");
        assert_eq!(pool().len(), 1, "the buffer came back");
        log.record(call("acme", "echo", 2)).await.expect("record");
        assert_eq!(pool().len(), 1, "and was used again");
        let big = AuditEvent {
            reason: Some("x".repeat(3 * BufferPool::MAX_BUFFER_BYTES)),
            ..call("acme", "echo", 3)
        };
        log.record(big).await.expect("record");
        assert!(
            pool().iter().all(|&c| c <= BufferPool::MAX_BUFFER_BYTES),
            "{:?}",
            pool()
        );
        drop(log);
        assert_eq!(
            verify(&dir.path().join("audit.jsonl"))
                .expect("verify")
                .records,
            3
        );
    }

    #[tokio::test]
    async fn edited_record_is_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        log_with(&path, 10).await;
        let mut l = lines(&path);
        assert!(l[4].contains("\"tenant\":\"acme\""));
        l[4] = l[4].replace("\"tenant\":\"acme\"", "\"tenant\":\"acmf\"");
        write_lines(&path, &l);
        let (line, seq, problem) = chain_error(&path);
        assert_eq!((line, seq), (5, 5));
        assert!(matches!(problem, Problem::HashMismatch { .. }), "{problem}");
        // The writer refuses to continue a broken chain.
        let err = AuditLog::open(AuditSettings {
            path: path.clone(),
            durability: Durability::Always,
        })
        .expect_err("must refuse");
        assert!(
            err.to_string().contains("line 5 (seq 5): hash mismatch"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn edited_record_with_recomputed_hash_breaks_the_next_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        log_with(&path, 10).await;
        let mut l = lines(&path);
        // Re-hash the edited record as an attacker would.
        let edited = l[4].replace("\"tenant\":\"acme\"", "\"tenant\":\"evil\"");
        let body = format!("{}}}", &edited[..edited.len() - HASH_SUFFIX_LEN]);
        l[4] = format!(
            "{},\"hash\":\"{}\"}}",
            &body[..body.len() - 1],
            sha256_hex(body.as_bytes())
        );
        write_lines(&path, &l);
        let (line, seq, problem) = chain_error(&path);
        assert_eq!((line, seq), (6, 6));
        assert!(matches!(problem, Problem::PrevMismatch { .. }), "{problem}");
    }

    #[tokio::test]
    async fn deleted_record_is_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        log_with(&path, 10).await;
        let mut l = lines(&path);
        l.remove(4);
        write_lines(&path, &l);
        let (line, seq, problem) = chain_error(&path);
        assert_eq!((line, seq), (5, 6));
        assert_eq!(
            problem,
            Problem::SeqMismatch {
                expected: 5,
                found: 6
            }
        );
    }

    #[tokio::test]
    async fn swapped_records_are_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        log_with(&path, 10).await;
        let mut l = lines(&path);
        l.swap(3, 4);
        write_lines(&path, &l);
        let (line, seq, problem) = chain_error(&path);
        assert_eq!((line, seq), (4, 5));
        assert!(matches!(problem, Problem::SeqMismatch { .. }), "{problem}");
    }

    #[tokio::test]
    async fn truncated_log_is_found_through_the_head() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        log_with(&path, 10).await;
        let mut l = lines(&path);
        l.pop();
        write_lines(&path, &l);
        let (line, seq, problem) = chain_error(&path);
        assert_eq!((line, seq), (10, 10));
        assert_eq!(
            problem,
            Problem::Truncated {
                head_seq: 10,
                last_seq: 9
            }
        );

        // Without the head, the shortened log verifies, and says so.
        fs::remove_file(head_path(&path)).expect("remove head");
        let report = verify(&path).expect("verify");
        assert_eq!(report.head, HeadStatus::Missing);
        assert!(
            report.to_string().contains("WARNING: no head file"),
            "{report}"
        );
    }

    #[tokio::test]
    async fn lagging_head_is_fine_but_a_rewritten_tail_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        log_with(&path, 5).await;
        let head_after_5 = fs::read(head_path(&path)).expect("head");
        let open_again = || open(&path, Durability::Always);
        let log = open_again();
        for i in 0..3 {
            log.record(call("acme", "echo", i)).await.expect("record");
        }
        drop(log);
        // A crash between the log's sync and the head's rename.
        fs::write(head_path(&path), &head_after_5).expect("old head");
        let report = verify(&path).expect("lagging head verifies");
        assert_eq!(report.records, 8);
        assert_eq!(report.head, HeadStatus::Lagging { seq: 5 });
        assert!(report.to_string().contains("lags"), "{report}");

        // A head whose hash is not the record's: the log was rewritten.
        let head = format!("{{\"seq\":3,\"hash\":\"{}\"}}", "a".repeat(64));
        fs::write(head_path(&path), head).expect("bad head");
        let (line, seq, problem) = chain_error(&path);
        assert_eq!((line, seq), (3, 3));
        assert!(matches!(problem, Problem::HeadMismatch { .. }), "{problem}");
    }

    #[tokio::test]
    async fn torn_last_line_is_reported_and_repaired_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        log_with(&path, 4).await;
        let good_len = fs::metadata(&path).expect("meta").len();
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        const TORN: &[u8] = b"{\"seq\":5,\"time\":\"2025-";
        file.write_all(TORN).expect("tear");
        drop(file);

        let (line, seq, problem) = chain_error(&path);
        assert_eq!((line, seq), (5, 5));
        assert_eq!(
            problem,
            Problem::TornLine {
                offset: good_len,
                bytes: TORN.len() as u64
            }
        );
        assert!(problem.to_string().starts_with("torn final line"));

        let log = open(&path, Durability::Always);
        log.record(call("acme", "echo", 9)).await.expect("record");
        drop(log);
        let report = verify(&path).expect("repaired log verifies");
        assert_eq!(report.records, 5);
        let records = tail(&path, 2).expect("tail");
        assert_eq!(records[1].seq, 5);
        assert_eq!(records[1].prev, records[0].hash);
    }

    #[tokio::test]
    async fn reopening_continues_the_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        log_with(&path, 3).await;
        let before = verify(&path).expect("verify");
        let log = open(
            &path,
            Durability::Batched {
                interval: Duration::from_millis(1000),
            },
        );
        log.record(call("acme", "echo", 1)).await.expect("record");
        log.record(call("acme", "echo", 2)).await.expect("record");
        log.flush().await;
        let records = tail(&path, 10).expect("tail");
        assert_eq!(records.len(), 5);
        assert_eq!(records[3].seq, 4);
        assert_eq!(records[3].prev, before.last_hash);
        assert_eq!(verify(&path).expect("verify").records, 5);

        // One writer at a time.
        let err = AuditLog::open(AuditSettings {
            path: path.clone(),
            durability: Durability::Always,
        })
        .expect_err("second writer");
        assert!(matches!(err, AuditError::Locked { .. }), "{err}");
    }

    #[tokio::test]
    async fn disabled_log_records_nothing() {
        let log = AuditLog::disabled();
        assert!(!log.is_enabled());
        log.record(call("acme", "echo", 1)).await.expect("record");
        log.record_detached(AuditEvent::new(EventKind::Reload));
        log.try_flush().await.expect("flush");
    }

    #[test]
    fn redact_reaches_every_depth() {
        let args = json!({
            "user": "ann",
            "Password": "p1",
            "nested": {"deep": [{"password": {"x": 1}, "keep": "k"}], "api_key": "s"},
        });
        let out = redact(&args, &["password".into(), "api_key".into()]);
        assert_eq!(
            out,
            json!({
                "user": "ann",
                "Password": REDACTED,
                "nested": {"deep": [{"password": REDACTED, "keep": "k"}], "api_key": REDACTED},
            })
        );
        assert_eq!(redact(&json!([1, "a"]), &["a".into()]), json!([1, "a"]));
    }

    #[test]
    fn args_digest_ignores_key_order() {
        let a = json!({"b": 1, "a": {"y": [1, 2], "x": "s"}});
        let b: Value = serde_json::from_str(r#"{"a":{"x":"s","y":[1,2]},"b":1}"#).expect("json");
        assert_eq!(args_digest(&a), args_digest(&b));
        assert_eq!(
            args_digest(&a),
            sha256_hex(br#"{"a":{"x":"s","y":[1,2]},"b":1}"#)
        );
        assert_ne!(args_digest(&a), args_digest(&json!({"b": 2})));
    }

    #[test]
    fn parse_since_accepts_times_and_durations() {
        let now = SystemTime::now();
        let near = |t: SystemTime, ago: u64| {
            let want = now - Duration::from_secs(ago);
            let diff = t.duration_since(want).unwrap_or_else(|e| e.duration());
            diff < Duration::from_secs(5)
        };
        assert!(near(parse_since("15m").expect("15m"), 15 * 60));
        assert!(near(parse_since("2h").expect("2h"), 2 * 3600));
        assert!(near(parse_since("1d").expect("1d"), 86_400));
        assert!(near(parse_since("1h 30m").expect("1h 30m"), 5400));

        let t = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
        // 2024-01-02T03:04:05Z
        assert_eq!(
            parse_since("2024-01-02T03:04:05Z").expect("z"),
            t(1_704_164_645)
        );
        assert_eq!(
            parse_since("2024-01-02T03:04:05.250Z").expect("ms"),
            t(1_704_164_645) + Duration::from_millis(250)
        );
        assert_eq!(
            parse_since("2024-01-02T05:04:05+02:00").expect("+2"),
            t(1_704_164_645)
        );
        assert_eq!(
            parse_since("2024-01-01T22:04:05-05:00").expect("-5"),
            t(1_704_164_645)
        );
        assert_eq!(parse_since("2024-01-02").expect("date"), t(1_704_153_600));
        for bad in [
            "",
            "yesterday",
            "2024-13-01T00:00:00Z",
            "15x",
            "2024-01-02T03:04:05+2:00",
        ] {
            assert!(parse_since(bad).is_err(), "{bad:?}");
        }
        // The writer's format parses back.
        let stamp = rfc3339(t(1_704_164_645) + Duration::from_millis(7)).to_string();
        assert_eq!(stamp, "2024-01-02T03:04:05.007Z");
        assert_eq!(
            parse_time(&stamp).expect("own format"),
            t(1_704_164_645) + Duration::from_millis(7)
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(1)).to_string(),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[tokio::test]
    async fn queries_and_tail_read_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = open(&path, Durability::Always);
        for i in 0..30 {
            log.record(call(if i < 10 { "a" } else { "b" }, "echo", i))
                .await
                .expect("record");
        }
        log.record(AuditEvent {
            event: EventKind::AuthFailure,
            reason: Some("bad token".into()),
            remote: Some("127.0.0.1:5000".into()),
            ..AuditEvent::default()
        })
        .await
        .expect("record");
        drop(log);

        let all: Vec<AuditRecord> = read_records(&path)
            .expect("read")
            .collect::<Result<_, _>>()
            .expect("records");
        let count = |q: &Query| all.iter().filter(|r| q.matches(r)).count();
        assert_eq!(count(&Query::default()), 31);
        let q = Query {
            tenant: Some("a".into()),
            ..Query::default()
        };
        assert_eq!(count(&q), 10);
        let q = Query {
            tenant: Some("b".into()),
            outcome: Some("denied".into()),
            ..Query::default()
        };
        assert_eq!(count(&q), 6); // i in 10..30 with i % 3 == 0
        let q = Query {
            event: Some("auth_failure".into()),
            since: Some(parse_since("1h").expect("since")),
            ..Query::default()
        };
        assert_eq!(count(&q), 1);
        let q = Query {
            since: Some(SystemTime::now() + Duration::from_secs(3600)),
            ..Query::default()
        };
        assert_eq!(count(&q), 0);

        let last = tail(&path, 3).expect("tail");
        assert_eq!(
            last.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![29, 30, 31]
        );
        assert_eq!(last[2].event.event, EventKind::AuthFailure);
        assert_eq!(tail(&path, 100).expect("tail").len(), 31);
        assert!(tail(&path, 0).expect("tail").is_empty());
    }

    #[test]
    fn config_defaults_and_problems() {
        let config: AuditConfig = toml::from_str("").expect("empty table");
        assert_eq!(config, AuditConfig::default());
        assert!(config.problems().is_empty());
        assert_eq!(
            config.settings(Path::new("/etc/cordon")),
            AuditSettings {
                path: "/etc/cordon/.cordon/audit/audit.jsonl".into(),
                durability: Durability::Batched {
                    interval: Duration::from_millis(50)
                },
            }
        );

        let config: AuditConfig =
            toml::from_str("durability = \"always\"\nbatch_ms = 0\npath = \"/var/log/a.jsonl\"")
                .expect("table");
        assert_eq!(config.durability, DurabilityMode::Always);
        assert_eq!(
            config.settings(Path::new("/x")).path,
            Path::new("/var/log/a.jsonl")
        );
        let problems = config.problems();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "audit.batch_ms");

        assert!(toml::from_str::<AuditConfig>("durability = \"sometimes\"").is_err());
        assert!(toml::from_str::<AuditConfig>("batch = 5").is_err());
        let off: AuditConfig = toml::from_str("enabled = false").expect("off");
        assert!(!off.open(Path::new(".")).expect("disabled").is_enabled());
    }
}
