//! A small HTTP client for driving Cordon's endpoints by hand: exact
//! headers, exact bodies, every status code visible.

use std::time::Duration;

use axum::body::Body;
use http::{HeaderMap, Method, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// How long any single expected reply or event may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// An HTTP client of one server.
pub struct Http {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub client: Client<HttpConnector, String>,
}

/// A whole reply.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The JSON body, or the last JSON message of an event-stream body (the
    /// reply to a call that sends progress or log messages).
    pub fn json(&self) -> Value {
        if let Ok(value) = serde_json::from_str(&self.body) {
            return value;
        }
        self.body
            .lines()
            .rev()
            .filter_map(|line| line.strip_prefix("data:"))
            .find_map(|data| serde_json::from_str(data.trim()).ok())
            .unwrap_or_else(|| panic!("no JSON in: {}", self.body))
    }
}

impl Http {
    pub fn new(base: String) -> Http {
        Http {
            base,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn request(&self, method: Method, path: &str) -> http::request::Builder {
        http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
    }

    pub async fn send(&self, request: http::request::Builder, body: impl Into<String>) -> Reply {
        let response = tokio::time::timeout(
            WAIT,
            self.client.request(request.body(body.into()).unwrap()),
        )
        .await
        .expect("the server did not answer in time")
        .unwrap();
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(Body::new(body), usize::MAX)
            .await
            .unwrap();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }

    /// POSTs `body` as JSON to `path`.
    pub async fn post_json(&self, path: &str, body: impl Into<String>) -> Reply {
        self.send(
            self.request(Method::POST, path)
                .header("content-type", "application/json"),
            body,
        )
        .await
    }
}

pub fn initialize_body(version: &str) -> String {
    json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "transports-test", "version": "0"}
        }
    })
    .to_string()
}

/// A POST to `/mcp` with the headers Streamable HTTP requires.
pub fn mcp_post(server: &Http) -> http::request::Builder {
    server
        .request(Method::POST, "/mcp")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
}

/// A stateless (2026-07-28) POST to `/mcp` for `method` (and tool `name`).
pub fn stateless(server: &Http, method: &str, name: Option<&str>) -> http::request::Builder {
    let mut request = mcp_post(server)
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method);
    if let Some(name) = name {
        request = request.header("mcp-name", name);
    }
    request
}

/// A stateless request body with the per-request `_meta` 2026-07-28 needs.
pub fn stateless_body(id: u32, method: &str, mut params: Value) -> String {
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "transports-test", "version": "0"},
        "io.modelcontextprotocol/clientCapabilities": {}
    });
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
}
