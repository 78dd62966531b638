//! Request bodies that are not a JSON-RPC message, and the error reply
//! JSON-RPC 2.0 asks for, on both HTTP transports:
//!
//! - not JSON: -32700 (parse error), `id` null;
//! - JSON, but not a request, notification or response: -32600 (invalid
//!   request), with the `id` when one can be read.
//!
//! (A request for a known method whose params do not fit it still parses:
//! rmcp keeps it as a custom request, and the handler answers -32602.)
//!
//! rmcp's Streamable HTTP server answers such a body with a plain-text
//! `415 Unsupported Media Type` (its `expect_json`, rmcp 3.11), which a client
//! cannot match to the request it sent. [`answer_unparsable`] puts the
//! JSON-RPC reply in its place on `/mcp`, without parsing any body that rmcp
//! accepts a second time.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use rmcp::model::{ClientJsonRpcMessage, ErrorCode};
use serde_json::{Value, json};

const PARSE_ERROR: i32 = ErrorCode::PARSE_ERROR.0;
const INVALID_REQUEST: i32 = ErrorCode::INVALID_REQUEST.0;

/// Why a body is not a JSON-RPC message; answered with status 400 and a
/// JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidMessage {
    /// The request's id, when the body has a usable one.
    pub id: Option<Value>,
    /// The JSON-RPC error code.
    pub code: i32,
    /// What is wrong, for the client's developer.
    pub message: String,
}

impl IntoResponse for InvalidMessage {
    // Written out rather than as rmcp's `ServerJsonRpcMessage`: rmcp's error
    // message needs an id, and JSON-RPC wants `"id": null` when there is none.
    fn into_response(self) -> Response {
        let body = json!({
            "jsonrpc": "2.0",
            "id": self.id,
            "error": { "code": self.code, "message": self.message },
        });
        (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
    }
}

/// A body that could not be read whole: too large (413), or broken off.
#[derive(Debug)]
pub struct BodyRefused(pub StatusCode, pub String);

impl IntoResponse for BodyRefused {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

/// Whether the request says its body is JSON (`application/json`, any
/// parameters).
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let essence = v.split_once(';').map_or(v, |(essence, _)| essence);
            essence.trim().eq_ignore_ascii_case("application/json")
        })
}

/// The whole body, or 413 beyond `max` bytes.
pub async fn read_limited(body: Body, max: usize) -> Result<Bytes, BodyRefused> {
    axum::body::to_bytes(body, max).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if too_large {
            BodyRefused(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Payload Too Large: request body exceeds {max} bytes"),
            )
        } else {
            BodyRefused(
                StatusCode::BAD_REQUEST,
                format!("Bad Request: cannot read the body: {e}"),
            )
        }
    })
}

/// The most messages one JSON-RPC batch may hold. Each request in a batch is
/// served at once, so the body size alone would let one POST start tens of
/// thousands.
pub const MAX_BATCH_MESSAGES: usize = 64;

/// One message or a batch (JSON-RPC 2.0 batches, which MCP allowed until
/// 2025-06-18) of at most [`MAX_BATCH_MESSAGES`].
pub fn parse_messages(body: &[u8]) -> Result<Vec<ClientJsonRpcMessage>, InvalidMessage> {
    let value: Value = serde_json::from_slice(body).map_err(|e| InvalidMessage {
        id: None,
        code: PARSE_ERROR,
        message: format!("Parse error: {e}"),
    })?;
    match value {
        Value::Array(items) if items.is_empty() => Err(InvalidMessage {
            id: None,
            code: INVALID_REQUEST,
            message: "Invalid Request: empty batch".into(),
        }),
        Value::Array(items) if items.len() > MAX_BATCH_MESSAGES => Err(InvalidMessage {
            id: None,
            code: INVALID_REQUEST,
            message: format!(
                "Invalid Request: a batch holds at most {MAX_BATCH_MESSAGES} messages, this one {}",
                items.len()
            ),
        }),
        Value::Array(items) => items.into_iter().map(parse_message).collect(),
        single => Ok(vec![parse_message(single)?]),
    }
}

fn parse_message(item: Value) -> Result<ClientJsonRpcMessage, InvalidMessage> {
    let id = item
        .get("id")
        .filter(|id| id.is_string() || id.is_number())
        .cloned();
    serde_json::from_value(item).map_err(|e| InvalidMessage {
        id,
        code: INVALID_REQUEST,
        message: format!(
            "Invalid Request: not a JSON-RPC 2.0 request, notification or response \
             (\"jsonrpc\": \"2.0\" and a \"method\" with object params, or a \
             \"result\" or \"error\"): {e}"
        ),
    })
}

/// Middleware for rmcp's `/mcp`: a JSON POST body that rmcp refuses to parse
/// gets the JSON-RPC error reply (status 400) instead of rmcp's plain-text
/// 415. Every other response passes through untouched. The body is read here
/// (bounded by `max_body_bytes`, as rmcp bounds it) and handed on as it came;
/// it is parsed again only when rmcp has refused it.
pub async fn answer_unparsable(
    State(max_body_bytes): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() != http::Method::POST || !is_json(request.headers()) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let body = match read_limited(body, max_body_bytes).await {
        Ok(body) => body,
        Err(refused) => return refused.into_response(),
    };
    let response = next
        .run(Request::from_parts(parts, Body::from(body.clone())))
        .await;
    // With a JSON content type, rmcp answers 415 only when the body does
    // not parse as one message.
    if response.status() != StatusCode::UNSUPPORTED_MEDIA_TYPE {
        return response;
    }
    match parse_messages(&body) {
        Err(invalid) => invalid.into_response(),
        // What parses here but not for rmcp is a batch outside a 2025-03-26
        // session (rmcp serves those).
        Ok(_) if body.trim_ascii_start().starts_with(b"[") => InvalidMessage {
            id: None,
            code: INVALID_REQUEST,
            message: "Invalid Request: a JSON-RPC batch is accepted on /mcp only in a \
                      2025-03-26 session (MCP removed batches in 2025-06-18); send one \
                      message per POST"
                .into(),
        }
        .into_response(),
        // One message that reads as JSON but not as rmcp reads it: a key
        // given twice (a JSON value keeps the last, rmcp refuses), or a shape
        // only rmcp's own types reject.
        Ok(_) => unreadable_message(&body).into_response(),
    }
}

/// Why rmcp cannot read a message that parses as JSON, with its id when
/// the body has a usable one.
fn unreadable_message(body: &[u8]) -> InvalidMessage {
    let id = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|value| value.get("id").cloned())
        .filter(|id| id.is_string() || id.is_number());
    let reason = match serde_json::from_slice::<ClientJsonRpcMessage>(body) {
        Err(e) => e.to_string(),
        Ok(_) => "the server cannot read it".into(),
    };
    InvalidMessage {
        id,
        code: INVALID_REQUEST,
        message: format!("Invalid Request: not one unambiguous JSON-RPC message: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: &str) -> InvalidMessage {
        parse_messages(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn bodies_parse_into_messages() {
        let ping = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
        assert_eq!(parse_messages(ping).unwrap().len(), 1);
        let batch = br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#;
        assert_eq!(parse_messages(batch).unwrap().len(), 2);
        let ping = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
        let batch = |n: usize| format!("[{}]", vec![ping; n].join(","));
        assert_eq!(
            parse_messages(batch(MAX_BATCH_MESSAGES).as_bytes())
                .unwrap()
                .len(),
            MAX_BATCH_MESSAGES
        );
        let e = refused(&batch(MAX_BATCH_MESSAGES + 1));
        assert_eq!((e.code, e.id), (INVALID_REQUEST, None));
        assert!(e.message.contains("at most 64"), "{}", e.message);
    }

    #[test]
    fn each_kind_of_bad_body_gets_its_code() {
        let e = refused("{not json");
        assert_eq!((e.code, e.id), (PARSE_ERROR, None));
        assert_eq!(refused(&"[".repeat(10_000)).code, PARSE_ERROR);
        assert_eq!(refused("[]").code, INVALID_REQUEST);
        assert_eq!(refused("42").code, INVALID_REQUEST);
        let e = refused(r#"{"jsonrpc":"2.0","id":7}"#);
        assert_eq!((e.code, e.id), (INVALID_REQUEST, Some(json!(7))));
        let e = refused(r#"{"jsonrpc":"1.0","id":"a","method":"ping"}"#);
        assert_eq!((e.code, e.id), (INVALID_REQUEST, Some(json!("a"))));
        // Params must be an object (or absent).
        let e = refused(r#"{"jsonrpc":"2.0","id":3,"method":"ping","params":5}"#);
        assert_eq!((e.code, e.id), (INVALID_REQUEST, Some(json!(3))));
        // An id that is neither a string nor a number is not echoed.
        let e = refused(r#"{"jsonrpc":"2.0","id":{"x":1}}"#);
        assert_eq!((e.code, e.id), (INVALID_REQUEST, None));
    }

    #[test]
    fn a_message_rmcp_cannot_read_is_an_invalid_request() {
        let twice = br#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/list"}"#;
        // A JSON value keeps the last key, so the body parses here ...
        assert!(parse_messages(twice).is_ok());
        // ... but rmcp refuses it, and the reply says so with the id.
        let e = unreadable_message(twice);
        assert_eq!((e.code, e.id), (INVALID_REQUEST, Some(json!(1))));
        assert!(e.message.starts_with("Invalid Request"), "{}", e.message);
    }

    #[test]
    fn the_reply_is_a_jsonrpc_error_with_status_400() {
        let response = refused("{").into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            response.headers()[http::header::CONTENT_TYPE],
            "application/json"
        );
    }
}
