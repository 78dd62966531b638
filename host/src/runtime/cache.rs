//! On-disk cache of compiled components, so a restart does not run Cranelift
//! again. Entries are keyed by the wasm's sha256 and the engine's
//! compatibility hash (wasmtime version, target, and every setting that
//! changes the generated code); an entry written by another configuration is
//! simply a different file.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// Where a component came from, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Loaded from the on-disk cache.
    Hit,
    /// Compiled now (and written to the cache if one is configured).
    Miss,
    /// Compiled now; no cache is configured.
    Disabled,
}

/// The on-disk compile cache (a directory the operator owns).
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: Option<PathBuf>,
    engine_key: String,
}

impl CompileCache {
    /// A cache in `dir` (created if missing), or no cache at all.
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> std::io::Result<Self> {
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir)?;
        }
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(CompileCache {
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
        })
    }

    fn entry(&self, sha256: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(dir.join(format!("{sha256}-{}.cwasm", self.engine_key)))
    }

    /// The compiled form of `wasm` (whose digest is `sha256`): from the cache
    /// when present and valid, otherwise compiled and stored.
    pub fn load(
        &self,
        engine: &Engine,
        sha256: &str,
        wasm: &[u8],
    ) -> wasmtime::Result<(Component, CacheStatus)> {
        let Some(entry) = self.entry(sha256) else {
            return Ok((Component::new(engine, wasm)?, CacheStatus::Disabled));
        };
        if entry.is_file() {
            // SAFETY: `deserialize_file` trusts the file to be a component this
            // engine compiled. The cache directory belongs to the operator,
            // like the binary itself; files are named by the digest of their
            // source and written atomically, and wasmtime rejects entries from
            // other versions or configurations (we then recompile below).
            #[allow(unsafe_code)]
            let cached = unsafe { Component::deserialize_file(engine, &entry) };
            match cached {
                Ok(component) => return Ok((component, CacheStatus::Hit)),
                Err(e) => tracing::warn!(
                    entry = %entry.display(),
                    "ignoring unusable compile-cache entry: {e}"
                ),
            }
        }
        let component = Component::new(engine, wasm)?;
        if let Err(e) = component
            .serialize()
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomically(&entry, &bytes))
        {
            tracing::warn!(entry = %entry.display(), "cannot write compile cache: {e}");
        }
        Ok((component, CacheStatus::Miss))
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
