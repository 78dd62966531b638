//! Log and progress events flowing up from a running guest to whoever made
//! the call (the transports turn them into MCP notifications).

use serde::Serialize;
use tokio::sync::mpsc;

/// Severity of a guest log message, in the order of RFC 5424 / MCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Debug-level messages.
    Debug,
    /// Informational messages.
    Info,
    /// Normal but significant conditions.
    Notice,
    /// Warning conditions.
    Warning,
    /// Error conditions.
    Error,
    /// Critical conditions.
    Critical,
    /// Action must be taken immediately.
    Alert,
    /// System is unusable.
    Emergency,
}

/// Something a guest reported while running.
#[derive(Debug, Clone, PartialEq)]
pub enum CallEvent {
    /// A log message (`cordon:tool/logging`).
    Log {
        /// Its severity.
        level: LogLevel,
        /// The part of the tool that logged, if it said.
        logger: Option<String>,
        /// The message: JSON as the guest sent it, or its text as a JSON string.
        data: serde_json::Value,
    },
    /// A progress report (`cordon:tool/progress`), already made monotonic.
    Progress {
        /// Progress so far.
        progress: f64,
        /// Total, if known.
        total: Option<f64>,
        /// Optional message.
        message: Option<String>,
    },
}

/// Longest single log message or progress message kept, in bytes.
const MAX_EVENT_BYTES: usize = 16 << 10;

/// Where a call's events go, with the caller's filters and the call's bound.
///
/// Filtering happens here, at the source, so a chatty guest costs nothing once
/// it is past the client's log level or its notification budget.
#[derive(Debug)]
pub struct EventSink {
    tx: Option<mpsc::UnboundedSender<CallEvent>>,
    min_level: Option<LogLevel>,
    progress_wanted: bool,
    remaining: u32,
    last_progress: Option<f64>,
    dropped: u32,
}

impl EventSink {
    /// A sink that discards everything.
    pub fn discard() -> Self {
        EventSink {
            tx: None,
            min_level: None,
            progress_wanted: false,
            remaining: 0,
            last_progress: None,
            dropped: 0,
        }
    }

    /// A sink sending to `tx`: log messages at `min_level` or above (none if
    /// `None`), progress only if `progress_wanted`.
    pub fn new(
        tx: mpsc::UnboundedSender<CallEvent>,
        min_level: Option<LogLevel>,
        progress_wanted: bool,
    ) -> Self {
        EventSink {
            tx: Some(tx),
            min_level,
            progress_wanted,
            remaining: u32::MAX,
            last_progress: None,
            dropped: 0,
        }
    }

    /// Caps how many events this sink forwards (set from the call's limits).
    pub(crate) fn limit(&mut self, max: u32) {
        self.remaining = self.remaining.min(max);
    }

    /// Events not forwarded because the budget ran out.
    pub fn dropped(&self) -> u32 {
        self.dropped
    }

    pub(crate) fn log(&mut self, level: LogLevel, logger: Option<String>, data: String) {
        if self.min_level.is_none_or(|min| level < min) {
            return;
        }
        // A message that is JSON goes up as JSON, unless it is over the
        // limit: then it is cut like any other text (and not parsed at all).
        let data = if data.len() > MAX_EVENT_BYTES {
            serde_json::Value::String(truncate(data))
        } else {
            serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data))
        };
        self.send(CallEvent::Log {
            level,
            logger: logger.map(truncate),
            data,
        });
    }

    pub(crate) fn progress(&mut self, progress: f64, total: Option<f64>, message: Option<String>) {
        if !self.progress_wanted || !progress.is_finite() {
            return;
        }
        // MCP requires progress to increase with every notification.
        if self.last_progress.is_some_and(|last| progress <= last) {
            return;
        }
        self.last_progress = Some(progress);
        self.send(CallEvent::Progress {
            progress,
            total: total.filter(|t| t.is_finite()),
            message: message.map(truncate),
        });
    }

    fn send(&mut self, event: CallEvent) {
        let Some(tx) = &self.tx else { return };
        if self.remaining == 0 {
            self.dropped = self.dropped.saturating_add(1);
            return;
        }
        self.remaining -= 1;
        // The receiver may be gone (client disconnected); the call goes on.
        let _ = tx.send(event);
    }
}

fn truncate(s: String) -> String {
    super::output::cut_to(s, MAX_EVENT_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_log_messages_stay_json_and_huge_ones_are_cut() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut sink = EventSink::new(tx, Some(LogLevel::Debug), false);
        sink.log(LogLevel::Info, None, r#"{"a": 1}"#.into());
        let huge = format!("[{}]", "1,".repeat(MAX_EVENT_BYTES) + "1");
        sink.log(LogLevel::Info, None, huge);
        let Some(CallEvent::Log { data, .. }) = rx.try_recv().ok() else {
            panic!("no event")
        };
        assert_eq!(data, serde_json::json!({"a": 1}));
        let Some(CallEvent::Log { data, .. }) = rx.try_recv().ok() else {
            panic!("no event")
        };
        let text = data.as_str().expect("a cut message is text");
        assert!(text.len() <= MAX_EVENT_BYTES + 20 && text.ends_with("[truncated]"));
    }
}
