//! Per-call resource limits and the limiter that enforces them inside a Store.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bounds on one tool call. Every field has a safe default; the operator may
/// override them per tool (within the runtime's ceilings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Linear memory the guest may hold, in bytes, across all its memories.
    pub memory_bytes: u64,
    /// Wall-clock deadline for the whole call (instantiation included).
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Fuel budget (roughly, wasm instructions). `None` = not metered.
    /// Needs `runtime.fuel = true`, which costs some speed on every call.
    pub fuel: Option<u64>,
    /// Largest result payload in bytes: text, binary data as base64, URIs
    /// and names, structured output as JSON (JSON escaping not counted).
    pub max_output_bytes: u64,
    /// Bytes of stdout and of stderr kept per call; writes beyond fail.
    pub max_stdio_bytes: u64,
    /// Host resources (open files, directory streams, pollables, ...) the
    /// call may hold at once. Each open file is a host file descriptor.
    pub max_handles: u32,
    /// Log and progress notifications one call may send; the rest is dropped.
    pub max_notifications: u32,
}

impl Default for Limits {
    /// 64 MiB memory, 10 s, no fuel metering, 1 MiB output, 64 KiB of each
    /// stdio stream, 256 handles, 1000 notifications.
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            timeout: Duration::from_secs(10),
            fuel: None,
            max_output_bytes: 1 << 20,
            max_stdio_bytes: 64 << 10,
            max_handles: 256,
            max_notifications: 1000,
        }
    }
}

/// Serialises a `Duration` as whole milliseconds.
mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Enforces the memory and table bounds of one Store and remembers whether a
/// bound was hit, so a trap that follows can be reported as "memory limit"
/// rather than as an anonymous `unreachable`.
#[derive(Debug)]
pub(crate) struct CallLimiter {
    memory_limit: usize,
    memory_in_use: usize,
    /// Highest total linear memory seen during the call.
    pub(crate) peak_memory: usize,
    pub(crate) memory_limit_hit: bool,
}

/// Table elements per table; generous for real code, small enough that a
/// guest cannot use tables to dodge the memory limit.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl CallLimiter {
    pub(crate) fn new(memory_limit: u64) -> Self {
        CallLimiter {
            memory_limit: usize::try_from(memory_limit).unwrap_or(usize::MAX),
            memory_in_use: 0,
            peak_memory: 0,
            memory_limit_hit: false,
        }
    }
}

impl wasmtime::ResourceLimiter for CallLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Memories are summed: a component may hold several.
        let total = self.memory_in_use - current.min(self.memory_in_use) + desired;
        if total > self.memory_limit {
            self.memory_limit_hit = true;
            return Ok(false);
        }
        self.memory_in_use = total;
        self.peak_memory = self.peak_memory.max(total);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
