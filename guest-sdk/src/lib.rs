//! Write [Cordon](https://github.com/cordon-mcp/cordon) MCP tools in Rust.
//!
//! A Cordon tool is a WebAssembly component (WASI 0.2) that exports the
//! `cordon:tool/tool` interface of `wit/tool.wit`. This crate generates the
//! bindings for that contract so a tool crate never touches `wit-bindgen`: a
//! tool is a plain function over a typed argument struct, its input JSON Schema
//! is derived from that struct with [`schemars`], and [`export_tools!`] exports
//! a list of tools from a `cdylib` crate.
//!
//! ```no_run
//! use cordon_guest::prelude::*;
//!
//! #[derive(Deserialize, JsonSchema)]
//! struct CountArgs {
//!     /// The text to count.
//!     text: String,
//! }
//!
//! fn count(args: CountArgs) -> ToolResult {
//!     Ok(Output::text(format!("{} words", args.text.split_whitespace().count())))
//! }
//!
//! cordon_guest::export_tools!(
//!     Tool::new("count", "Counts words in a text.").read_only().run(count),
//! );
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` file
//! is already a component.
//!
//! What a tool function may return:
//!
//! * `Result<T, E>` where `T:` [`IntoOutput`] (for example [`Output`], `String`
//!   or [`Structured<T>`]) and `E: Into<`[`ToolError`]`>`. An `Err` becomes an
//!   MCP tool error: a result with `is-error` set and the message as text.
//! * A bare `T:` [`IntoOutput`] for tools that cannot fail.
//!
//! Returning [`Structured<T>`] also declares an output schema derived from `T`.
//!
//! Host services: [`log`] (MCP log messages), [`progress()`] (MCP progress
//! notifications), [`config`] (operator-granted configuration values) and
//! [`db`] (operator-granted, read-only database handles).
//!
//! Natively (any target but `wasm32`), the host imports are replaced by
//! stand-ins so tools can be unit-tested with `cargo test`: log messages go to
//! stderr, progress reports are dropped, and configuration values come from
//! [`config::set_for_test`].

#![warn(missing_docs)]

/// The bindings generated from `wit/tool.wit` (world `tool-provider`).
///
/// Most tools never need these: [`export_tools!`] implements the exported
/// interface and the SDK wraps every import. They are public so that an
/// unusual tool can implement `exports::cordon::tool::tool::Guest` itself and
/// export it with `cordon_guest::bindings::export!(MyType)`.
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "tool-provider",
        path: "../wit",
        pub_export_macro: true,
        default_bindings_module: "::cordon_guest::bindings",
        additional_derives: [PartialEq],
    });
}

// Lets `::cordon_guest::...` paths in generated code resolve inside this crate too.
extern crate self as cordon_guest;

pub mod config;
pub mod db;
mod error;
pub mod log;
mod output;
mod tool;

pub use bindings::cordon::tool::types::{
    Annotations, CallError, CallResult, Content, EmbeddedResource, Media, ResourceContents,
    ResourceLink, ToolDefinition,
};
pub use error::{Context, ToolError, ToolResult};
pub use output::{IntoCallResult, IntoOutput, Output, Structured};
pub use tool::{Handler, NoArgs, Tool, ToolBuilder, call_tool, list_tools};

/// Re-exported so tool crates can use `cordon_guest::schemars` without a direct dependency.
pub use schemars;
/// Re-exported so tool crates can use `cordon_guest::serde` without a direct dependency.
pub use serde;
/// Re-exported so tool crates can use `cordon_guest::serde_json` without a direct dependency.
pub use serde_json;
/// Re-exported for building JSON values, e.g. raw schemas: `json!({"type": "object"})`.
pub use serde_json::json;

/// Reports progress on the current call (MCP `notifications/progress`).
///
/// `progress` should increase from one report to the next: the host drops a
/// report whose progress does not increase. `total` is the value progress
/// reaches at the end, if known; `message` describes the current step.
/// Reports reach the client only if it asked for progress on this call, so a
/// tool may report freely.
///
/// ```no_run
/// cordon_guest::progress(50.0, Some(100.0), Some("halfway"));
/// ```
pub fn progress(progress: f64, total: Option<f64>, message: Option<&str>) {
    #[cfg(target_arch = "wasm32")]
    bindings::cordon::tool::progress::report(progress, total, message);
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (progress, total, message);
}

/// Everything a tool crate usually needs: `use cordon_guest::prelude::*;`.
pub mod prelude {
    pub use crate::config;
    pub use crate::db;
    pub use crate::log;
    pub use crate::{
        Content, Context, NoArgs, Output, ResourceLink, Structured, Tool, ToolError, ToolResult,
        bail, progress,
    };
    pub use schemars::JsonSchema;
    pub use serde::{Deserialize, Serialize};
}

/// Returns early from a tool function with a [`ToolError`] built like
/// [`format!`]: the call then ends as an MCP tool error with this message.
///
/// ```
/// use cordon_guest::prelude::*;
///
/// fn check(n: u32) -> ToolResult {
///     if n > 10 {
///         bail!("{n} is more than 10");
///     }
///     Ok(Output::text("ok"))
/// }
/// assert_eq!(check(11).unwrap_err().message(), "11 is more than 10");
/// ```
#[macro_export]
macro_rules! bail {
    ($($arg:tt)+) => {
        return ::core::result::Result::Err(
            ::core::convert::From::from($crate::ToolError::new(::std::format!($($arg)+))),
        )
    };
}

/// Exports tools from a `cdylib` crate as the component's `cordon:tool/tool`
/// interface.
///
/// Takes a comma-separated list of [`Tool`] expressions (built with
/// [`Tool::new`] … [`ToolBuilder::run`]). Use it once per crate, at module
/// level. It also defines `fn cordon_tools() -> Vec<Tool>` in the invoking
/// module, so unit tests can call the tools through [`call_tool`].
///
/// ```no_run
/// use cordon_guest::prelude::*;
///
/// fn hello() -> Output {
///     Output::text("Hello!")
/// }
///
/// cordon_guest::export_tools!(
///     Tool::new("hello", "Says hello.").read_only().idempotent().run(hello),
/// );
/// ```
///
/// Every call runs in a fresh instance, so the list is rebuilt on each call;
/// building it must be cheap and must not depend on grants or the caller.
#[macro_export]
macro_rules! export_tools {
    ($($tool:expr),* $(,)?) => {
        /// The tools this component exports (generated by `cordon_guest::export_tools!`).
        #[allow(dead_code)]
        pub(crate) fn cordon_tools() -> ::std::vec::Vec<$crate::Tool> {
            ::std::vec![$($tool),*]
        }

        #[doc(hidden)]
        pub struct CordonToolProvider;

        impl $crate::bindings::exports::cordon::tool::tool::Guest for CordonToolProvider {
            fn list_tools() -> ::std::vec::Vec<$crate::ToolDefinition> {
                $crate::list_tools(&cordon_tools())
            }

            fn call_tool(
                name: ::std::string::String,
                arguments: ::std::string::String,
            ) -> ::core::result::Result<$crate::CallResult, $crate::CallError> {
                $crate::call_tool(&cordon_tools(), &name, &arguments)
            }
        }

        $crate::bindings::export!(CordonToolProvider with_types_in $crate::bindings);
    };
}

/// Compiles the README's example tool as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
