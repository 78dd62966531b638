//! Cordon runs untrusted MCP tools as WebAssembly components.
//!
//! A request flows one way through these modules:
//! transport → authentication → session → protocol dispatch → authorization →
//! [`runtime`] (the sandbox) → audit → response.
//!
//! - [`config`]: the operator's TOML file, checked before anything starts.
//! - [`runtime`]: engine, tools directory, compile cache and per-call sandbox.
//! - [`db`]: read-only database handles (SQLite, PostgreSQL) tools may open.
//! - [`dispatch`]: one tool call through policy, the runtime and the record.

#![deny(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod auth;
pub mod bounded;
pub mod config;
pub mod db;
pub mod dispatch;
pub mod edge;
pub mod gate;
pub mod jsonrpc;
pub mod mcp;
pub mod metrics;
pub mod policy;
pub mod runtime;
pub mod server;
pub mod sse;
pub mod telemetry;
pub mod tls;
