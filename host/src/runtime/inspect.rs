//! `cordon inspect`: what a component imports, exports and provides.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use wasmtime::component::Component;

use super::{CompileCache, EngineSettings, Limits, Runtime, ToolComponent};

/// A readable report on the component at `path`, without running any tool.
pub async fn inspect(path: &Path) -> anyhow::Result<String> {
    let runtime = Runtime::new(EngineSettings::default())?;
    let wasm = tokio::fs::read(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    let component = Component::new(runtime.engine(), &wasm)
        .map_err(|e| anyhow::anyhow!("{} is not a valid component: {e:#}", path.display()))?;
    let ty = component.component_type();
    let mut out = String::new();
    writeln!(out, "{} ({} bytes)", path.display(), wasm.len())?;
    writeln!(out, "imports:")?;
    for (name, _) in ty.imports(runtime.engine()) {
        writeln!(out, "  {name}")?;
    }
    writeln!(out, "exports:")?;
    for (name, _) in ty.exports(runtime.engine()) {
        writeln!(out, "  {name}")?;
    }
    let cache = CompileCache::new(runtime.engine(), None)?;
    match ToolComponent::load(&runtime, &cache, path, None, &Limits::default()).await {
        Ok(loaded) => {
            writeln!(out, "sha256: {}", loaded.sha256())?;
            writeln!(out, "tools:")?;
            for info in loaded.tools() {
                let tool = &info.tool;
                writeln!(
                    out,
                    "  {} - {}",
                    tool.name,
                    tool.description.as_deref().unwrap_or("")
                )?;
                writeln!(
                    out,
                    "    input: {}",
                    serde_json::to_string(&tool.input_schema)?
                )?;
                if let Some(schema) = &tool.output_schema {
                    writeln!(out, "    output: {}", serde_json::to_string(schema)?)?;
                }
                if let Some(a) = &tool.annotations {
                    writeln!(out, "    annotations: {}", serde_json::to_string(a)?)?;
                }
            }
        }
        Err(e) => writeln!(out, "not servable by Cordon: {e}")?,
    }
    Ok(out)
}
