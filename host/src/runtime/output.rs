//! What a call produced, in MCP's terms, and the ways a call can fail.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rmcp::model::{CallToolResult, ContentBlock, ResourceContents};

use super::bindings::types;

/// `s` cut to at most `max_bytes` (on a character boundary), marked when
/// cut: text a caller or a guest chose, bounded before it reaches a reply,
/// the log or the audit record.
pub(crate) fn cut_to(mut s: String, max_bytes: usize) -> String {
    if s.len() > max_bytes {
        let mut cut = max_bytes;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("…[truncated]");
    }
    s
}

/// Why a call produced no tool result. Each variant is something the caller
/// can act on; none of them leaves the host or the next call affected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallFailure {
    /// No tool of that name (or the caller may not see it).
    #[error("unknown tool: {0}")]
    UnknownTool(String),
    /// The arguments do not match the tool's input schema.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The tool reported a failure of its own (`call-error::failed`).
    #[error("tool failed: {0}")]
    ToolFailed(String),
    /// The call ran past its wall-clock deadline and was stopped.
    #[error("tool call exceeded its time limit of {} ms and was stopped", .0.as_millis())]
    Timeout(Duration),
    /// The guest tried to grow its memory past the limit.
    #[error("tool call exceeded its memory limit of {} MiB", .0 >> 20)]
    MemoryLimit(u64),
    /// The guest used up its fuel budget.
    #[error("tool call used up its fuel budget of {0}")]
    FuelExhausted(u64),
    /// The result was larger than the output limit.
    #[error("tool result of {size} bytes exceeds the output limit of {limit} bytes")]
    OutputTooLarge {
        /// Size of the result's payload (see `max_output_bytes`).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The structured output did not match the tool's output schema.
    #[error("tool returned structured content that does not match its output schema: {0}")]
    InvalidOutput(String),
    /// The guest panicked (message from its stderr, when it printed one).
    #[error("tool panicked: {0}")]
    Panicked(String),
    /// The guest trapped (e.g. stack overflow, unreachable).
    #[error("tool crashed: {0}")]
    Trap(String),
    /// The caller cancelled the call.
    #[error("tool call was cancelled")]
    Cancelled,
    /// The sandbox could not be set up (e.g. a granted directory is missing,
    /// or the host is at its instance capacity).
    #[error("tool could not be started: {0}")]
    Unavailable(String),
    /// The caller is over a quota (concurrent calls, call rate); the call
    /// did not run.
    #[error("{0}")]
    Refused(String),
}

impl CallFailure {
    /// A short, stable name for logs, metrics and audit records.
    pub fn kind(&self) -> &'static str {
        match self {
            CallFailure::UnknownTool(_) => "unknown_tool",
            CallFailure::InvalidArguments(_) => "invalid_arguments",
            CallFailure::ToolFailed(_) => "tool_error",
            CallFailure::Timeout(_) => "timeout",
            CallFailure::MemoryLimit(_) => "memory_limit",
            CallFailure::FuelExhausted(_) => "fuel_exhausted",
            CallFailure::OutputTooLarge { .. } => "output_limit",
            CallFailure::InvalidOutput(_) => "invalid_output",
            CallFailure::Panicked(_) => "panic",
            CallFailure::Trap(_) => "trap",
            CallFailure::Cancelled => "cancelled",
            CallFailure::Unavailable(_) => "unavailable",
            CallFailure::Refused(_) => "quota",
        }
    }

    /// True when the failure is the caller's request (a protocol error in
    /// MCP), false when it is the tool's execution (`isError` result).
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            CallFailure::UnknownTool(_)
                | CallFailure::InvalidArguments(_)
                | CallFailure::Refused(_)
        )
    }

    /// The failure as an MCP tool result with `isError: true`.
    pub fn to_tool_result(&self) -> CallToolResult {
        CallToolResult::error(vec![ContentBlock::text(self.to_string())])
    }
}

/// Refuses a result whose payload exceeds `limit` bytes, before any of it is
/// converted or encoded. The payload is what the client receives: text,
/// binary data as base64, URIs and names, structured content as JSON. JSON
/// escaping and framing are not counted, so the check costs nothing per call
/// instead of a second serialisation of every result.
pub(crate) fn check_size(result: &types::CallResult, limit: u64) -> Result<(), CallFailure> {
    let base64 = |bytes: usize| bytes.div_ceil(3) * 4;
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let content: usize = result
        .content
        .iter()
        .map(|c| match c {
            types::Content::Text(text) => text.len(),
            types::Content::Image(m) | types::Content::Audio(m) => {
                base64(m.data.len()) + m.mime_type.len()
            }
            types::Content::Resource(r) => {
                r.uri.len()
                    + opt(&r.mime_type)
                    + match &r.contents {
                        types::ResourceContents::Text(text) => text.len(),
                        types::ResourceContents::Blob(bytes) => base64(bytes.len()),
                    }
            }
            types::Content::ResourceLink(l) => {
                l.uri.len() + l.name.len() + opt(&l.title) + opt(&l.description) + opt(&l.mime_type)
            }
        })
        .sum();
    let size = (content + opt(&result.structured_content)) as u64;
    if size > limit {
        return Err(CallFailure::OutputTooLarge { size, limit });
    }
    Ok(())
}

/// Converts the guest's result into MCP's model (binary data base64-encoded).
pub(crate) fn to_mcp(result: types::CallResult) -> Result<CallToolResult, CallFailure> {
    let content = result.content.into_iter().map(content_to_mcp).collect();
    let structured = match result.structured_content {
        None => None,
        Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
            CallFailure::InvalidOutput(format!("structured content is not JSON: {e}"))
        })?),
    };
    let mut out = if result.is_error {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    };
    out.structured_content = structured;
    Ok(out)
}

fn content_to_mcp(content: types::Content) -> ContentBlock {
    match content {
        types::Content::Text(text) => ContentBlock::text(text),
        types::Content::Image(m) => ContentBlock::image(BASE64.encode(&m.data), m.mime_type),
        types::Content::Audio(m) => ContentBlock::audio(BASE64.encode(&m.data), m.mime_type),
        types::Content::Resource(r) => ContentBlock::resource(match r.contents {
            types::ResourceContents::Text(text) => ResourceContents::TextResourceContents {
                uri: r.uri,
                mime_type: r.mime_type,
                text,
                meta: None,
            },
            types::ResourceContents::Blob(bytes) => ResourceContents::BlobResourceContents {
                uri: r.uri,
                mime_type: r.mime_type,
                blob: BASE64.encode(&bytes),
                meta: None,
            },
        }),
        types::Content::ResourceLink(link) => {
            // rmcp's `Resource` is non-exhaustive: build it from its wire form.
            let wire = serde_json::json!({
                "uri": link.uri,
                "name": link.name,
                "title": link.title,
                "description": link.description,
                "mimeType": link.mime_type,
                "size": link.size,
            });
            match serde_json::from_value(strip_nulls(wire)) {
                Ok(resource) => ContentBlock::resource_link(resource),
                Err(e) => ContentBlock::text(format!("[invalid resource link: {e}]")),
            }
        }
    }
}

fn strip_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            serde_json::Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).collect())
        }
        other => other,
    }
}
