//! Cordon runs untrusted MCP tools as WebAssembly components.
//!
//! A request flows one way through these modules:
//! transport → authentication → session → protocol dispatch → authorization →
//! [`runtime`] (the sandbox) → audit → response.
//!
//! - [`config`]: the operator's TOML file, checked before anything starts.
//! - [`runtime`]: engine, tools directory, compile cache and per-call sandbox.
//! - [`dispatch`]: one tool call through policy, the runtime and the record.

#![deny(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod app;
pub mod config;
pub mod dispatch;
pub mod mcp;
pub mod runtime;
pub mod server;
pub mod sse;
