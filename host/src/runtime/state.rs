//! The state one Store owns for one call: WASI context, resource table,
//! limiter, event sink and granted config values. It is built fresh for every
//! call and dropped with the Store, so nothing survives between calls (the
//! one exception: a directory quota's budget is shared with the other calls
//! running at the same time, see `host::quota`).

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime_wasi::filesystem::WasiFilesystemCtxView;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, ResourceTable, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::events::EventSink;
use super::grants::{DirMode, Grants};
use super::host::{FsQuota, QuotaFsView};
use super::limits::{CallLimiter, Limits};

pub(crate) struct HostState {
    /// `None` for a component that imports no WASI interface: it cannot
    /// reach one, so none is built (see [`wasi_ctx`]).
    wasi: Option<WasiCtx>,
    pub(crate) table: ResourceTable,
    /// Bookkeeping of the directory quotas; `None` when no grant has one.
    fs_quota: Option<FsQuota>,
    pub(crate) limiter: CallLimiter,
    pub(crate) events: EventSink,
    pub(crate) config: BTreeMap<String, String>,
    pub(crate) databases: DbSession,
}

/// The database handles of one call and the shared backends that serve them.
pub(crate) struct DbSession {
    pub(crate) registry: Arc<crate::db::Databases>,
    pub(crate) grants: BTreeMap<String, crate::db::DbGrant>,
    /// Handle names the guest asked for but was not granted, in order.
    pub(crate) denied: Vec<String>,
}

/// The captured stdout and stderr of a call.
pub(crate) struct Stdio {
    pub(crate) stdout: MemoryOutputPipe,
    pub(crate) stderr: MemoryOutputPipe,
}

impl HostState {
    /// Builds the state for one call: only what `grants` lists is reachable.
    /// `with_wasi`: whether the component imports WASI; if not, the WASI
    /// context (stdio, clocks, random, the granted directories opened) is not
    /// built, which saves a few µs per call and a syscall per directory.
    pub(crate) fn new(
        grants: &Grants,
        limits: &Limits,
        mut events: EventSink,
        databases: Arc<crate::db::Databases>,
        with_wasi: bool,
    ) -> std::io::Result<(Self, Stdio)> {
        let stdio_cap = usize::try_from(limits.max_stdio_bytes).unwrap_or(usize::MAX);
        let stdio = Stdio {
            stdout: MemoryOutputPipe::new(stdio_cap),
            stderr: MemoryOutputPipe::new(stdio_cap),
        };
        let (wasi, fs_quota) = if with_wasi {
            let (wasi, fs_quota) = build_wasi(grants, &stdio)?;
            (Some(wasi), fs_quota)
        } else {
            (None, None)
        };
        let mut table = ResourceTable::new();
        table.set_max_capacity(limits.max_handles as usize);
        events.limit(limits.max_notifications);
        let state = HostState {
            wasi,
            table,
            fs_quota,
            limiter: CallLimiter::new(limits.memory_bytes),
            events,
            config: grants.config.clone(),
            databases: DbSession {
                registry: databases,
                grants: grants.databases.clone(),
                denied: Vec::new(),
            },
        };
        Ok((state, stdio))
    }

    /// Gives a state built ahead of its call (a spare, see `idle`) the
    /// call's event sink, bounded as in [`Self::new`].
    pub(crate) fn attach_events(&mut self, mut events: EventSink, limits: &Limits) {
        events.limit(limits.max_notifications);
        self.events = events;
    }

    /// Drops everything with an effect outside the Store (event sink,
    /// resources, WASI context, database handles, quota bookkeeping), so
    /// that the Store itself can be freed later.
    pub(crate) fn release(&mut self) {
        self.wasi = None;
        self.table = ResourceTable::new();
        self.fs_quota = None;
        self.events = EventSink::discard();
        self.config = BTreeMap::new();
        self.databases.grants = BTreeMap::new();
    }

    /// The `wasi:filesystem` view that enforces the directory quotas.
    pub(crate) fn quota_fs(&mut self) -> QuotaFsView<'_> {
        let inner = WasiFilesystemCtxView {
            ctx: wasi_ctx(&mut self.wasi).filesystem(),
            table: &mut self.table,
        };
        QuotaFsView::new(inner, self.fs_quota.as_mut())
    }
}

/// The call's WASI context. Only a component that imports WASI can call into
/// it, and its calls always have one built from their grants; the empty
/// context (nothing granted, output discarded) made here otherwise only keeps
/// that unreachable case harmless.
fn wasi_ctx(wasi: &mut Option<WasiCtx>) -> &mut WasiCtx {
    wasi.get_or_insert_with(|| locked_down().build())
}

/// A WASI context builder that grants nothing.
fn locked_down() -> WasiCtxBuilder {
    // WasiCtxBuilder::new() already means: no env, no args, stdin closed,
    // stdout and stderr discarded, no preopens, no name lookup, no socket
    // address allowed. We also switch TCP and UDP off so socket creation
    // itself fails.
    let mut wasi = WasiCtxBuilder::new();
    wasi.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    wasi
}

/// The WASI context of a call of a component that imports WASI: stdout and
/// stderr captured, the granted directories preopened, nothing else.
fn build_wasi(grants: &Grants, stdio: &Stdio) -> std::io::Result<(WasiCtx, Option<FsQuota>)> {
    let mut wasi = locked_down();
    wasi.stdout(stdio.stdout.clone())
        .stderr(stdio.stderr.clone());
    for dir in &grants.dirs {
        let perms = match dir.mode {
            DirMode::Ro => FsPerms::ReadOnly,
            DirMode::Rw => FsPerms::ReadWrite,
        };
        wasi.preopened_dir(&dir.host_path, &dir.guest_path, perms)
            .map_err(|e| {
                std::io::Error::other(format!(
                    "cannot open granted directory {}: {e}",
                    dir.host_path.display()
                ))
            })?;
    }
    // After the preopens, which fail on a missing directory. This walks
    // every quota'd tree (bounded), on the calling thread.
    let fs_quota = FsQuota::for_grants(&grants.dirs);
    Ok((wasi.build(), fs_quota))
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: wasi_ctx(&mut self.wasi),
            table: &mut self.table,
        }
    }
}
