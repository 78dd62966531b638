//! Capabilities one call receives. Nothing is granted unless it is listed
//! here, and a `Grants` is computed for every call by the caller (the operator's
//! config resolved for the calling tenant), never chosen by the tool.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Whether a granted directory may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirMode {
    /// Read-only: every write, create, rename or delete fails.
    Ro,
    /// Read and write beneath the directory.
    Rw,
}

/// A host directory made visible to the guest at `guest_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    /// The directory on the host; it must exist.
    pub host_path: PathBuf,
    /// Where the guest sees it, e.g. `/notes`.
    pub guest_path: String,
    /// Read-only or read-write.
    pub mode: DirMode,
    /// For read-write grants: the most bytes the directory tree may hold.
    /// Writes that would exceed it fail with "no space" (see
    /// `runtime::host::quota`). `None` = unbounded.
    pub quota_bytes: Option<u64>,
}

/// Everything one call may reach besides its own memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Preopened directories.
    pub dirs: Vec<DirGrant>,
    /// Named config values the guest reads through `cordon:tool/config`.
    pub config: BTreeMap<String, String>,
    /// Database handles the guest opens by name through
    /// `cordon:tool/database`, resolved for the caller (its file or schema).
    /// A name missing here is "not granted", whoever asks.
    pub databases: BTreeMap<String, crate::db::DbGrant>,
}
