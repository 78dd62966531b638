//! A tool component: compiled once, pre-linked, with the tools it provides.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use rmcp::model::{CallToolResult, JsonObject, Tool, ToolAnnotations};
use sha2::{Digest, Sha256};
use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, Func, TypedFunc};

use super::Runtime;
use super::bindings::{ToolProvider, ToolProviderPre, types};
use super::cache::{CacheStatus, CompileCache};
use super::events::EventSink;
use super::grants::Grants;
use super::limits::Limits;
use super::output::CallFailure;
use super::state::HostState;

/// Why a component could not be loaded. The message names the file and what
/// to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The digest does not match the operator's `sha256` pin.
    #[error("{path}: sha256 is {actual} but the config pins {expected}; refusing to load it")]
    PinMismatch {
        /// The file.
        path: PathBuf,
        /// The pinned digest.
        expected: String,
        /// The file's digest.
        actual: String,
    },
    /// Not a valid component, or it needs imports Cordon does not provide.
    #[error("{path} is not a usable tool component: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// One tool as served: its MCP definition and its compiled schemas.
pub struct ToolInfo {
    /// The MCP tool definition.
    pub tool: Tool,
    input: jsonschema::Validator,
    output: Option<jsonschema::Validator>,
}

impl std::fmt::Debug for ToolInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolInfo")
            .field("tool", &self.tool)
            .finish_non_exhaustive()
    }
}

impl ToolInfo {
    /// Checks `arguments` against the input schema; the error lists the
    /// first few problems with their JSON pointers.
    pub fn check_arguments(&self, arguments: &serde_json::Value) -> Result<(), CallFailure> {
        let problems: Vec<String> = self
            .input
            .iter_errors(arguments)
            .take(5)
            .map(|e| describe_validation_error(&e))
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(CallFailure::InvalidArguments(problems.join("; ")))
        }
    }
}

/// Where the value is and what is wrong with it, without the value itself:
/// it may be a secret, and rmcp, the audit record or a client's own log may
/// keep the message. Bounded, since the path holds the caller's keys.
fn describe_validation_error(e: &jsonschema::ValidationError<'_>) -> String {
    let path = e.instance_path.to_string();
    let problem = e.masked();
    let message = if path.is_empty() {
        problem.to_string()
    } else {
        format!("{path}: {problem}")
    };
    super::output::cut_to(message, MAX_PROBLEM_BYTES)
}

/// The most of one schema problem a message carries.
const MAX_PROBLEM_BYTES: usize = 256;

/// Tool names: what MCP clients accept everywhere.
pub fn valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A loaded tool component, shared by every call of its tools. Calls hold an
/// `Arc` of it, so a reload never pulls it from under a running call.
pub struct ToolComponent {
    name: String,
    path: PathBuf,
    sha256: String,
    pre: ToolProviderPre<HostState>,
    /// Where `cordon:tool/tool.call-tool` is among the component's exports.
    call_tool: ComponentExportIndex,
    /// Whether it imports any WASI interface (most do; a `no_std` tool
    /// need not), i.e. whether its calls need a WASI context.
    imports_wasi: bool,
    tools: Vec<Arc<ToolInfo>>,
    cache: CacheStatus,
    /// Spare instances of it that could not be made in one go (see `idle`).
    failed_spares: AtomicU8,
}

/// The guest's `call-tool(name, arguments)`, typed.
pub(crate) type CallToolFunc<'a> =
    TypedFunc<(&'a str, &'a str), (Result<types::CallResult, types::CallError>,)>;

/// The `call-tool` export of an instance of a loaded component. Only
/// [`ToolComponent::instantiate`] makes one.
#[derive(Clone, Copy)]
pub(crate) struct CallToolExport(Func);

impl CallToolExport {
    /// The export, typed.
    ///
    /// Unlike the generated `ToolProviderPre::instantiate_async`, this does
    /// not type-check the exports again: that costs a few µs on every call,
    /// and every instance of one pre-linked component has the same exports,
    /// which `load` checked once.
    #[allow(unsafe_code)]
    pub(crate) fn typed<'a>(self) -> CallToolFunc<'a> {
        // SAFETY: `list_tools`, run by `load` on an instance of the same
        // `InstancePre` this export's instance came from, checked that the
        // export has exactly this type.
        unsafe { CallToolFunc::new_unchecked(self.0) }
    }
}

/// The exported interface every tool component provides, and its function
/// that runs a tool.
const TOOL_INTERFACE: &str = "cordon:tool/tool@0.1.0";
const CALL_TOOL: &str = "call-tool";

impl std::fmt::Debug for ToolComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolComponent")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl ToolComponent {
    /// Reads, verifies, compiles (or loads from `cache`) and pre-links the
    /// component at `path`, then asks it for its tools within `limits`.
    pub async fn load(
        runtime: &Runtime,
        cache: &CompileCache,
        path: &Path,
        pin: Option<&str>,
        limits: &Limits,
    ) -> Result<Self, LoadError> {
        let invalid = |message: String| LoadError::Invalid {
            path: path.to_owned(),
            message,
        };
        let wasm = tokio::fs::read(path)
            .await
            .map_err(|source| LoadError::Read {
                path: path.to_owned(),
                source,
            })?;
        let sha256 = hex::encode(Sha256::digest(&wasm));
        if let Some(expected) = pin
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(LoadError::PinMismatch {
                path: path.to_owned(),
                expected: expected.to_owned(),
                actual: sha256,
            });
        }
        let engine = runtime.engine().clone();
        let cache = cache.clone();
        let digest = sha256.clone();
        // Compiling is CPU-bound and may take a while: keep it off the
        // async workers.
        let (component, cache_status) =
            tokio::task::spawn_blocking(move || cache.load(&engine, &digest, &wasm))
                .await
                .map_err(|e| invalid(format!("compiler task failed: {e}")))?
                .map_err(|e| invalid(format!("{e:#}")))?;
        let instance_pre = runtime
            .linker
            .instantiate_pre(&component)
            .map_err(|e| invalid(format!("{e:#}")))?;
        let pre = ToolProviderPre::new(instance_pre).map_err(|e| {
            invalid(format!(
                "it does not export the cordon:tool/tool interface of the tool-provider world: {e:#}"
            ))
        })?;
        let call_tool = {
            let component = pre.instance_pre().component();
            component
                .get_export_index(None, TOOL_INTERFACE)
                .and_then(|tool| component.get_export_index(Some(&tool), CALL_TOOL))
                .ok_or_else(|| {
                    invalid(format!("it does not export {TOOL_INTERFACE}#{CALL_TOOL}"))
                })?
        };
        let imports_wasi = component
            .component_type()
            .imports(runtime.engine())
            .any(|(name, _)| name.starts_with("wasi:"));
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut loaded = ToolComponent {
            name,
            path: path.to_owned(),
            sha256,
            pre,
            call_tool,
            imports_wasi,
            tools: Vec::new(),
            cache: cache_status,
            failed_spares: AtomicU8::new(0),
        };
        let definitions = loaded.list_tools(runtime, limits).await.map_err(invalid)?;
        let mut tools = Vec::with_capacity(definitions.len());
        for def in definitions {
            let name = def.name.clone();
            let info = tool_info(def).map_err(|e| invalid(format!("tool `{name}`: {e}")))?;
            if tools
                .iter()
                .any(|t: &Arc<ToolInfo>| t.tool.name == info.tool.name)
            {
                return Err(invalid(format!("it lists the tool `{name}` twice")));
            }
            tools.push(Arc::new(info));
        }
        loaded.tools = tools;
        Ok(loaded)
    }

    async fn list_tools(
        &self,
        runtime: &Runtime,
        limits: &Limits,
    ) -> Result<Vec<types::ToolDefinition>, String> {
        let (state, _stdio) = HostState::new(
            &Grants::default(),
            limits,
            EventSink::discard(),
            Arc::default(),
            self.imports_wasi,
        )
        .map_err(|e| e.to_string())?;
        let mut store: Store<HostState> = runtime
            .new_store(state, limits)
            .map_err(|e| format!("{e:#}"))?;
        let listing = async {
            let instance = self
                .pre
                .instance_pre()
                .instantiate_async(&mut store)
                .await
                .map_err(|e| format!("it cannot be instantiated: {e:#}"))?;
            // The one type check of `call-tool`, which `instantiate` relies on.
            let _checked: CallToolFunc<'_> = instance
                .get_typed_func(&mut store, self.call_tool)
                .map_err(|e| {
                    format!("its {CALL_TOOL} does not match the cordon:tool contract: {e:#}")
                })?;
            let provider = ToolProvider::new(&mut store, &instance)
                .map_err(|e| format!("its exports do not match the cordon:tool contract: {e:#}"))?;
            provider
                .cordon_tool_tool()
                .call_list_tools(&mut store)
                .await
                .map_err(|e| format!("list-tools failed: {e:#}"))
        };
        match tokio::time::timeout(limits.timeout, listing).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "list-tools did not return within {} s",
                limits.timeout.as_secs()
            )),
        }
    }

    /// The name used in config (the file name without `.wasm`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hex sha256 of the wasm file.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Whether it came from the compile cache.
    pub fn cache_status(&self) -> CacheStatus {
        self.cache
    }

    /// The tools it provides, in the order it listed them.
    pub fn tools(&self) -> &[Arc<ToolInfo>] {
        &self.tools
    }

    /// Whether a worker may prepare instances of it while idle: not once
    /// three attempts failed to instantiate at once (a start function that
    /// runs long, say), so a component cannot make Cordon run its code
    /// outside calls again and again. A reload starts the count afresh.
    pub(crate) fn spares_allowed(&self) -> bool {
        self.failed_spares.load(Ordering::Relaxed) < 3
    }

    /// Counts a spare instance that could not be made in one go.
    pub(crate) fn spare_failed(&self) {
        let _ = self
            .failed_spares
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            });
    }

    /// Whether its calls need a WASI context (it imports a `wasi:` interface).
    pub(crate) fn imports_wasi(&self) -> bool {
        self.imports_wasi
    }

    /// A fresh instance in `store`, and its `call-tool`.
    pub(crate) async fn instantiate(
        &self,
        store: &mut Store<HostState>,
    ) -> wasmtime::Result<CallToolExport> {
        let instance = self
            .pre
            .instance_pre()
            .instantiate_async(&mut *store)
            .await?;
        instance
            .get_func(&mut *store, self.call_tool)
            .map(CallToolExport)
            .ok_or_else(|| wasmtime::format_err!("no export {TOOL_INTERFACE}#{CALL_TOOL}"))
    }

    /// Checks a result against the tool's output schema.
    pub(crate) fn check_output(
        &self,
        tool: &str,
        result: CallToolResult,
    ) -> Result<CallToolResult, CallFailure> {
        let Some(info) = self.tools.iter().find(|t| t.tool.name == tool) else {
            return Ok(result);
        };
        if let Some(output) = &info.output
            && result.is_error != Some(true)
        {
            let Some(structured) = &result.structured_content else {
                return Err(CallFailure::InvalidOutput(
                    "the tool declares an output schema but returned no structured content".into(),
                ));
            };
            if let Some(e) = output.iter_errors(structured).next() {
                return Err(CallFailure::InvalidOutput(describe_validation_error(&e)));
            }
        }
        Ok(result)
    }
}

fn parse_schema(what: &str, text: &str) -> Result<JsonObject, String> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(format!("its {what} is not a JSON object")),
        Err(e) => Err(format!("its {what} is not JSON: {e}")),
    }
}

fn compile_schema(what: &str, schema: &JsonObject) -> Result<jsonschema::Validator, String> {
    jsonschema::validator_for(&serde_json::Value::Object(schema.clone()))
        .map_err(|e| format!("its {what} is not a valid JSON Schema: {e}"))
}

fn tool_info(def: types::ToolDefinition) -> Result<ToolInfo, String> {
    if !valid_tool_name(&def.name) {
        return Err("tool names must be 1-64 characters of A-Z a-z 0-9 _ - .".into());
    }
    let input_schema = parse_schema("input schema", &def.input_schema)?;
    if input_schema.get("type").and_then(|t| t.as_str()) != Some("object") {
        return Err("its input schema must have \"type\": \"object\"".into());
    }
    let input = compile_schema("input schema", &input_schema)?;
    let (output_schema, output) = match &def.output_schema {
        Some(text) => {
            let schema = parse_schema("output schema", text)?;
            let validator = compile_schema("output schema", &schema)?;
            (Some(Arc::new(schema)), Some(validator))
        }
        None => (None, None),
    };
    let a = def.annotations;
    let mut tool = Tool::new(def.name, def.description, Arc::new(input_schema));
    if let Some(title) = def.title {
        tool = tool.with_title(title);
    }
    if let Some(schema) = output_schema {
        tool = tool.with_raw_output_schema(schema);
    }
    if a.read_only.is_some()
        || a.destructive.is_some()
        || a.idempotent.is_some()
        || a.open_world.is_some()
    {
        let mut annotations = ToolAnnotations::new();
        annotations.read_only_hint = a.read_only;
        annotations.destructive_hint = a.destructive;
        annotations.idempotent_hint = a.idempotent;
        annotations.open_world_hint = a.open_world;
        tool = tool.with_annotations(annotations);
    }
    Ok(ToolInfo {
        tool,
        input,
        output,
    })
}
