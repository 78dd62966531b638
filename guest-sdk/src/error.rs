//! Tool errors.

use std::fmt;

use crate::CallError;

/// The result type of a tool function: [`Output`](crate::Output) by default.
pub type ToolResult<T = crate::Output> = Result<T, ToolError>;

/// Why a tool call failed.
///
/// By default ([`ToolError::new`] and every `From` conversion) this is an MCP
/// *tool error*: the call still produces a result, with `is-error` set and the
/// message as its text content, so the model can read what went wrong and try
/// again. [`ToolError::invalid_arguments`] and [`ToolError::failed`] instead
/// end the call with a `call-error` (an MCP protocol error).
///
/// Convert other errors with `?` (from `String`, `&str`, [`std::io::Error`],
/// [`serde_json::Error`]) or add context with [`Context`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    kind: Kind,
    message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tool,
    InvalidArguments,
    Failed,
}

impl ToolError {
    /// A tool error: the call returns a result with `is-error` set and
    /// `message` as its text.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            kind: Kind::Tool,
            message: message.into(),
        }
    }

    /// The arguments are unacceptable (beyond what the input schema can say):
    /// ends the call with `call-error::invalid-arguments`.
    pub fn invalid_arguments(message: impl Into<String>) -> Self {
        Self {
            kind: Kind::InvalidArguments,
            message: message.into(),
        }
    }

    /// The tool cannot run at all: ends the call with `call-error::failed`.
    /// Prefer [`ToolError::new`] for failures the model should see and react to.
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            kind: Kind::Failed,
            message: message.into(),
        }
    }

    /// The message shown to the caller.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// True for an MCP tool error (a result with `is-error` set), false for
    /// errors that end the call with a `call-error`.
    pub fn is_tool_error(&self) -> bool {
        self.kind == Kind::Tool
    }

    /// Converts this error into what `call-tool` returns.
    pub(crate) fn into_call(self) -> Result<crate::CallResult, CallError> {
        match self.kind {
            Kind::Tool => Ok(crate::CallResult {
                content: vec![crate::Content::Text(self.message)],
                structured_content: None,
                is_error: true,
            }),
            Kind::InvalidArguments => Err(CallError::InvalidArguments(self.message)),
            Kind::Failed => Err(CallError::Failed(self.message)),
        }
    }
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ToolError {}

impl From<String> for ToolError {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for ToolError {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl From<std::io::Error> for ToolError {
    fn from(err: std::io::Error) -> Self {
        Self::new(err.to_string())
    }
}

impl From<serde_json::Error> for ToolError {
    fn from(err: serde_json::Error) -> Self {
        Self::new(err.to_string())
    }
}

/// Adds context to an error or a missing value, turning it into a [`ToolError`].
///
/// ```
/// use cordon_guest::prelude::*;
///
/// fn parse(n: &str) -> ToolResult<u32> {
///     n.parse::<u32>().context(format!("'{n}' is not a count"))
/// }
/// assert_eq!(
///     parse("x").unwrap_err().message(),
///     "'x' is not a count: invalid digit found in string"
/// );
/// ```
pub trait Context<T> {
    /// On failure, a tool error `"{context}: {error}"` (or just `context` for
    /// a missing [`Option`] value).
    fn context(self, context: impl fmt::Display) -> Result<T, ToolError>;

    /// Like [`Context::context`], building the context only on failure.
    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T, ToolError>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    fn context(self, context: impl fmt::Display) -> Result<T, ToolError> {
        self.map_err(|e| ToolError::new(format!("{context}: {e}")))
    }

    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T, ToolError> {
        self.map_err(|e| ToolError::new(format!("{}: {e}", context())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl fmt::Display) -> Result<T, ToolError> {
        self.ok_or_else(|| ToolError::new(context.to_string()))
    }

    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T, ToolError> {
        self.ok_or_else(|| ToolError::new(context().to_string()))
    }
}
