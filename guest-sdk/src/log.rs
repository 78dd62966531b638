//! Log messages to the client (MCP `notifications/message`).
//!
//! ```no_run
//! use cordon_guest::log;
//!
//! log::info("starting");
//! log::warning(format!("{} items skipped", 3));
//! log::Logger::new("parser").debug("token stream ready");
//! log::log_json(log::Level::Info, Some("stats"), &serde_json::json!({"rows": 10}));
//! ```
//!
//! The host forwards a message only if its level is at or above the level the
//! client asked for, and bounds how many messages and bytes one call may
//! send, so logging is cheap to leave in. Text messages are sent as JSON
//! strings, so a message such as `"42"` stays text.

use std::fmt::Display;

use serde::Serialize;

/// Severity, as in RFC 5424 and MCP, from least to most severe.
pub use crate::bindings::cordon::tool::logging::Level;

/// Sends a raw log message: `data` is a JSON value serialised as text, or
/// plain text (which the host sends as a JSON string when it does not parse
/// as JSON). Prefer the level functions, which always send text as text.
pub fn log(level: Level, logger: Option<&str>, data: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::cordon::tool::logging::log(level, logger, data);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!(
        "[{level:?}] {}{data}",
        logger.map(|l| format!("{l}: ")).unwrap_or_default()
    );
}

/// Sends `message` as a text log message at `level`.
pub fn log_text(level: Level, logger: Option<&str>, message: impl Display) {
    let text = message.to_string();
    let data = serde_json::Value::String(text).to_string();
    log(level, logger, &data);
}

/// Sends `value` as a structured (JSON) log message at `level`. A value that
/// cannot be serialised is logged as an error message instead.
pub fn log_json<T: Serialize + ?Sized>(level: Level, logger: Option<&str>, value: &T) {
    match serde_json::to_string(value) {
        Ok(data) => log(level, logger, &data),
        Err(e) => log_text(
            Level::Error,
            logger,
            format!("cannot serialise log data: {e}"),
        ),
    }
}

macro_rules! level_fns {
    ($($(#[$doc:meta])* $name:ident => $level:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(message: impl Display) {
                log_text(Level::$level, None, message);
            }
        )*

        impl Logger {
            $(
                $(#[$doc])*
                pub fn $name(&self, message: impl Display) {
                    log_text(Level::$level, Some(&self.name), message);
                }
            )*
        }
    };
}

/// A named logger: its messages carry `logger` = its name, which tells the
/// client which part of the tool logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logger {
    name: String,
}

impl Logger {
    /// A logger called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    /// The logger's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends a text message at `level`.
    pub fn log(&self, level: Level, message: impl Display) {
        log_text(level, Some(&self.name), message);
    }

    /// Sends a structured (JSON) message at `level`.
    pub fn json<T: Serialize + ?Sized>(&self, level: Level, value: &T) {
        log_json(level, Some(&self.name), value);
    }
}

level_fns! {
    /// Logs a text message at level `debug`: detailed debugging information.
    debug => Debug;
    /// Logs a text message at level `info`: general information.
    info => Info;
    /// Logs a text message at level `notice`: normal but significant events.
    notice => Notice;
    /// Logs a text message at level `warning`: warning conditions.
    warning => Warning;
    /// Logs a text message at level `error`: error conditions.
    error => Error;
    /// Logs a text message at level `critical`: critical conditions.
    critical => Critical;
    /// Logs a text message at level `alert`: action must be taken immediately.
    alert => Alert;
    /// Logs a text message at level `emergency`: the system is unusable.
    emergency => Emergency;
}
