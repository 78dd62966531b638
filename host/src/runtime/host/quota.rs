//! Byte quotas on read-write directory grants.
//!
//! wasmtime-wasi has no hook for disk usage, so without this a tool could fill
//! the host's disk through any read-write grant. The enforcement has two parts:
//!
//! * Before a call, [`FsQuota::for_grants`] measures every quota'd grant's
//!   host tree (file sizes, symlinks not followed, at most
//!   [`MAX_TREE_ENTRIES`] entries) and rebases that directory's
//!   [`DirBudget`] on it.
//! * During the call, [`add_to_linker`] shadows `wasi:filesystem/types` and
//!   `wasi:filesystem/preopens` with [`QuotaFsView`], which delegates every
//!   function to wasmtime-wasi's own implementation but first charges the
//!   bytes a guest writes to a file (`write`, the streams of
//!   `write-via-stream` / `append-via-stream`, growing `set-size`) and the
//!   entries it creates. A charge that does not fit fails with
//!   `insufficient-space` (ENOSPC, "No space left on device") where the
//!   function returns an `error-code` (`write`, `set-size`, `open-at`, ...).
//!   A stream write that does not fit fails with `last-operation-failed`
//!   carrying the same code for `filesystem-error-code`; wasi-libc (hence
//!   Rust's std and C guests) does not ask for that code and reports every
//!   failed stream write as EIO, then EPIPE on that descriptor, exactly as it
//!   reports a host disk that is really full.
//!
//! Budgets are per grant, not one per call: the view remembers which grant
//! every descriptor was opened under (preopens are numbered like the grants,
//! and `open-at` passes its directory's grant on), so writing to an unquota'd
//! scratch grant never eats another grant's quota. Grants whose host trees
//! overlap are charged together, see [`GrantCharge`].
//!
//! A budget is shared by all live calls that hold the same directory with the
//! same quota (a process-wide registry of weak references), so concurrent
//! calls of one tenant draw from one pool instead of each getting the whole
//! remainder. It lives as long as some call uses it. Every call start measures
//! again and rebases the shared books on what is on disk, which is also when
//! deleted files are given back. Calls granting the same directory with
//! different quotas do not share (each quota is checked on its own).
//!
//! Imprecisions: overwriting existing bytes is charged as if it grew the tree
//! (conservative); deletes and truncations are not credited until the next
//! measurement; a sparse write at a large offset is charged its length only
//! (the next measurement sees the apparent size); directory and inode
//! metadata are bounded only by the entry count; and a rebase takes what was
//! charged before its walk to be on disk, so a write still in flight in a
//! file stream's background task at that moment (at most one chunk per open
//! stream) can be missed once.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError, Weak};

use bytes::Bytes;
use wasmtime::component::{HasData, Linker, Resource};
use wasmtime_wasi::async_trait;
use wasmtime_wasi::filesystem::WasiFilesystemCtxView;
use wasmtime_wasi::p2::bindings::filesystem::{preopens, types};
use wasmtime_wasi::p2::{
    DynInputStream, DynOutputStream, FsError, FsResult, OutputStream, Pollable, StreamError,
    StreamResult,
};

use super::super::grants::{DirGrant, DirMode};
use super::super::state::HostState;
use types::{Descriptor, ErrorCode};

/// The most entries a measured tree may hold. Hitting it while measuring
/// counts as full, and entries created during a call count against it too:
/// this bounds the inodes and directory blocks a tool can pile up, which the
/// byte count does not see.
pub(crate) const MAX_TREE_ENTRIES: u64 = 100_000;

/// Registers the quota-enforcing `wasi:filesystem` over the ones
/// `wasmtime_wasi::p2::add_to_linker_async` added. Call it right after that.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let linked = types::add_to_linker::<HostState, QuotaFs>(linker, HostState::quota_fs)
        .and_then(|()| preopens::add_to_linker::<HostState, QuotaFs>(linker, HostState::quota_fs));
    // Nothing linked later may silently replace an interface.
    linker.allow_shadowing(false);
    linked
}

/// The `HasData` of the shadowing `wasi:filesystem` interfaces.
pub(crate) struct QuotaFs;

impl HasData for QuotaFs {
    type Data<'a> = QuotaFsView<'a>;
}

/// wasmtime-wasi's filesystem view plus this call's quota bookkeeping, if any
/// grant of the call has a quota. Without one every function goes straight
/// through to `inner`.
pub(crate) struct QuotaFsView<'a> {
    inner: WasiFilesystemCtxView<'a>,
    quota: Option<&'a mut FsQuota>,
}

impl<'a> QuotaFsView<'a> {
    pub(crate) fn new(inner: WasiFilesystemCtxView<'a>, quota: Option<&'a mut FsQuota>) -> Self {
        QuotaFsView { inner, quota }
    }

    /// The charge of the grant `fd` was opened under, if that grant counts
    /// against a quota.
    fn charge_of(&self, fd: &Resource<Descriptor>) -> Option<Arc<GrantCharge>> {
        self.quota.as_ref()?.descriptors.get(&fd.rep()).cloned()
    }

    /// Remembers that descriptor `rep` was opened under a grant with `charge`.
    fn track(&mut self, rep: u32, charge: Option<Arc<GrantCharge>>) {
        if let Some(quota) = self.quota.as_deref_mut() {
            match charge {
                Some(charge) => quota.descriptors.insert(rep, charge),
                // Table indices are reused: never let a stale entry apply.
                None => quota.descriptors.remove(&rep),
            };
        }
    }

    /// Renames and hard links must not carry bytes into a quota'd tree
    /// uncharged: into a grant that counts against a quota they may only stay
    /// inside that same grant, and only if it is charged to its own quota
    /// alone. Anything else fails like a rename across filesystems (EXDEV).
    fn check_move(
        &self,
        from: &Resource<Descriptor>,
        to: &Resource<Descriptor>,
    ) -> Result<(), ErrorCode> {
        let Some(to) = self.charge_of(to) else {
            return Ok(());
        };
        match self.charge_of(from) {
            Some(from) if Arc::ptr_eq(&from, &to) && to.moves_stay_inside => Ok(()),
            _ => Err(ErrorCode::CrossDevice),
        }
    }
}

/// Charges `bytes` and `entries` to `charge`, if there is one.
fn charge(charge: Option<&GrantCharge>, bytes: u64, entries: u64) -> Result<(), ErrorCode> {
    match charge {
        Some(charge) => charge
            .charge(bytes, entries)
            .map_err(|QuotaExceeded| ErrorCode::InsufficientSpace),
        None => Ok(()),
    }
}

/// The quota bookkeeping of one call.
pub(crate) struct FsQuota {
    /// Per preopen, in the order of the grants (`HostState::new` preopens
    /// them in that order and `get-directories` returns them in it).
    preopens: Vec<Option<Arc<GrantCharge>>>,
    /// The open descriptors whose grant counts against a quota, by table
    /// index. Bounded by the call's handle limit.
    descriptors: HashMap<u32, Arc<GrantCharge>>,
}

impl FsQuota {
    /// Measures the quota'd grants among `dirs` and sets up their budgets.
    /// `None` if no grant has a quota. Blocking: walks up to
    /// [`MAX_TREE_ENTRIES`] entries per quota'd grant.
    pub(crate) fn for_grants(dirs: &[DirGrant]) -> Option<FsQuota> {
        if !dirs
            .iter()
            .any(|d| d.mode == DirMode::Rw && d.quota_bytes.is_some())
        {
            return None;
        }
        let roots: Vec<PathBuf> = dirs
            .iter()
            .map(|d| std::fs::canonicalize(&d.host_path).unwrap_or_else(|_| d.host_path.clone()))
            .collect();
        let budgets: Vec<Option<Arc<DirBudget>>> = dirs
            .iter()
            .zip(&roots)
            .map(|(dir, root)| match (dir.mode, dir.quota_bytes) {
                (DirMode::Rw, Some(quota)) => {
                    let budget = DirBudget::shared(root, quota);
                    budget.remeasure(root);
                    Some(budget)
                }
                _ => None,
            })
            .collect();
        let preopens = dirs
            .iter()
            .enumerate()
            .map(|(i, dir)| {
                if dir.mode != DirMode::Rw {
                    // wasmtime-wasi refuses every write under it already.
                    return None;
                }
                // A write under grant i lands in grant j's tree too if the two
                // trees overlap (one contains the other), so it is charged to
                // every overlapping quota.
                let mut overlapping: Vec<Arc<DirBudget>> = budgets
                    .iter()
                    .zip(&roots)
                    .filter(|(_, root)| roots[i].starts_with(root) || root.starts_with(&roots[i]))
                    .filter_map(|(budget, _)| budget.clone())
                    .collect();
                if overlapping.is_empty() {
                    return None;
                }
                // One global lock order, so charges to several budgets from
                // concurrent calls cannot deadlock.
                overlapping.sort_by_key(|b| Arc::as_ptr(b) as usize);
                overlapping.dedup_by(|a, b| Arc::ptr_eq(a, b));
                let own = budgets[i].as_ref();
                let moves_stay_inside = overlapping.len() == 1
                    && own.is_some_and(|own| Arc::ptr_eq(own, &overlapping[0]));
                Some(Arc::new(GrantCharge {
                    budgets: overlapping,
                    moves_stay_inside,
                }))
            })
            .collect();
        Some(FsQuota {
            preopens,
            descriptors: HashMap::new(),
        })
    }
}

/// What writing under one grant is charged to.
struct GrantCharge {
    /// The budgets of every quota'd grant whose tree overlaps this grant's,
    /// its own included; sorted by address (the lock order).
    budgets: Vec<Arc<DirBudget>>,
    /// Whether renames and links within this grant keep bytes inside the one
    /// quota they were counted against: true when the grant has a quota and
    /// no other quota'd grant overlaps it. (Were another quota'd tree nested
    /// inside, a rename within this grant could move bytes into it.)
    moves_stay_inside: bool,
}

impl GrantCharge {
    /// Takes `bytes` and `entries` from every budget, or from none.
    fn charge(&self, bytes: u64, entries: u64) -> Result<(), QuotaExceeded> {
        if let [budget] = &self.budgets[..] {
            return budget.ledger().charge(budget.quota, bytes, entries);
        }
        let mut ledgers: Vec<_> = self.budgets.iter().map(|b| (b.quota, b.ledger())).collect();
        if ledgers
            .iter()
            .any(|(quota, l)| !l.fits(*quota, bytes, entries))
        {
            return Err(QuotaExceeded);
        }
        for (quota, ledger) in &mut ledgers {
            ledger.charge(*quota, bytes, entries)?;
        }
        Ok(())
    }
}

/// A charge did not fit.
#[derive(Debug, Clone, Copy)]
struct QuotaExceeded;

/// The error a stream reports when a write does not fit. `filesystem-error-code`
/// below turns it into `insufficient-space`.
fn stream_quota_error() -> StreamError {
    StreamError::LastOperationFailed(
        io::Error::new(io::ErrorKind::StorageFull, "directory quota exceeded").into(),
    )
}

/// The remaining space of one quota'd directory tree, shared by every live
/// call that grants that directory with that quota.
pub(crate) struct DirBudget {
    quota: u64,
    ledger: Mutex<Ledger>,
}

/// Bytes and entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TreeUsage {
    pub(crate) bytes: u64,
    pub(crate) entries: u64,
}

impl TreeUsage {
    /// What an unmeasurable tree counts as: nothing more fits.
    const FULL: TreeUsage = TreeUsage {
        bytes: u64::MAX,
        entries: u64::MAX,
    };
}

/// The books of a [`DirBudget`]. `charged` only ever grows; a measurement
/// records how far it had got when the walk started (`base`), so what was
/// charged since then counts on top of the measured usage. Charges made while
/// the walk ran may be counted twice (once seen on disk, once charged);
/// charges made before it are taken to be on disk already.
struct Ledger {
    measured: TreeUsage,
    base: TreeUsage,
    charged: TreeUsage,
    /// Walks started and the newest one applied: a walk that finishes after a
    /// newer one must not replace its result.
    walks_started: u64,
    walk_applied: u64,
}

impl Ledger {
    fn used(&self) -> TreeUsage {
        TreeUsage {
            bytes: self
                .measured
                .bytes
                .saturating_add(self.charged.bytes - self.base.bytes),
            entries: self
                .measured
                .entries
                .saturating_add(self.charged.entries - self.base.entries),
        }
    }

    fn fits(&self, quota: u64, bytes: u64, entries: u64) -> bool {
        let used = self.used();
        bytes <= quota.saturating_sub(used.bytes)
            && entries <= MAX_TREE_ENTRIES.saturating_sub(used.entries)
    }

    fn charge(&mut self, quota: u64, bytes: u64, entries: u64) -> Result<(), QuotaExceeded> {
        if !self.fits(quota, bytes, entries) {
            return Err(QuotaExceeded);
        }
        self.charged.bytes = self.charged.bytes.saturating_add(bytes);
        self.charged.entries = self.charged.entries.saturating_add(entries);
        Ok(())
    }
}

/// Live budgets by (canonical directory, quota). Weak: a budget dies with the
/// last call that uses it.
type Registry = HashMap<(PathBuf, u64), Weak<DirBudget>>;
static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Mutex::default);

impl DirBudget {
    /// The budget live calls already share for `root` with `quota`, or a new
    /// one. A new one counts as full until [`DirBudget::remeasure`] ran.
    fn shared(root: &Path, quota: u64) -> Arc<DirBudget> {
        let mut registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (root.to_path_buf(), quota);
        if let Some(budget) = registry.get(&key).and_then(Weak::upgrade) {
            return budget;
        }
        registry.retain(|_, budget| budget.strong_count() > 0);
        let budget = Arc::new(DirBudget::new(quota));
        registry.insert(key, Arc::downgrade(&budget));
        budget
    }

    fn new(quota: u64) -> DirBudget {
        DirBudget {
            quota,
            ledger: Mutex::new(Ledger {
                measured: TreeUsage::FULL,
                base: TreeUsage::default(),
                charged: TreeUsage::default(),
                walks_started: 0,
                walk_applied: 0,
            }),
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Measures `root` and rebases the books on it. The walk runs unlocked:
    /// calls sharing the budget keep writing meanwhile.
    fn remeasure(&self, root: &Path) {
        let walk = self.start_walk();
        let measured = measure_tree(root, MAX_TREE_ENTRIES).unwrap_or(TreeUsage::FULL);
        self.finish_walk(walk, measured);
    }

    /// Numbers a walk and notes how much was charged when it started.
    fn start_walk(&self) -> (u64, TreeUsage) {
        let mut ledger = self.ledger();
        ledger.walks_started += 1;
        (ledger.walks_started, ledger.charged)
    }

    fn finish_walk(&self, (walk, base): (u64, TreeUsage), measured: TreeUsage) {
        let mut ledger = self.ledger();
        if walk > ledger.walk_applied {
            ledger.walk_applied = walk;
            ledger.measured = measured;
            ledger.base = base;
        }
    }

    #[cfg(test)]
    fn remaining_bytes(&self) -> u64 {
        self.quota.saturating_sub(self.ledger().used().bytes)
    }
}

/// The bytes (sizes of everything but directories; a symlink counts its own
/// size, it is not followed) and entries beneath `root`. `None` (to be treated
/// as full) when the tree holds more than `max_entries` entries or cannot be
/// read: a quota we cannot measure must not turn into no quota.
pub(crate) fn measure_tree(root: &Path, max_entries: u64) -> Option<TreeUsage> {
    let mut usage = TreeUsage::default();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Removed since we listed it (e.g. by a concurrent call).
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir != root => continue,
            Err(_) => return None,
        };
        for entry in entries {
            let entry = entry.ok()?;
            usage.entries += 1;
            if usage.entries > max_entries {
                return None;
            }
            // `DirEntry::metadata` is lstat: it does not follow symlinks.
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => return None,
            };
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                usage.bytes = usage.bytes.saturating_add(meta.len());
            }
        }
    }
    Some(usage)
}

/// An output stream on a file under a quota'd grant: every byte written is
/// charged first. Everything else is the file stream's own behaviour.
struct QuotaOutputStream {
    inner: DynOutputStream,
    charge: Arc<GrantCharge>,
    /// A write did not fit. `last-operation-failed` closes a stream, so every
    /// later operation reports `closed`.
    failed: bool,
}

impl QuotaOutputStream {
    fn take(&mut self, bytes: usize) -> StreamResult<()> {
        if self.failed {
            return Err(StreamError::Closed);
        }
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        self.charge.charge(bytes, 0).map_err(|QuotaExceeded| {
            self.failed = true;
            stream_quota_error()
        })
    }

    fn check_open(&self) -> StreamResult<()> {
        if self.failed {
            Err(StreamError::Closed)
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl OutputStream for QuotaOutputStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.take(bytes.len())?;
        self.inner.write(bytes)
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.check_open()?;
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.check_open()?;
        self.inner.check_write()
    }

    // The file stream's own version skips a task spawn; keep it.
    async fn blocking_write_and_flush(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.take(bytes.len())?;
        self.inner.blocking_write_and_flush(bytes).await
    }

    fn write_zeroes(&mut self, nelem: usize) -> StreamResult<()> {
        self.take(nelem)?;
        self.inner.write_zeroes(nelem)
    }

    async fn write_ready(&mut self) -> StreamResult<usize> {
        self.check_open()?;
        self.inner.write_ready().await
    }

    // A pending background write must still be waited for on drop.
    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

#[async_trait]
impl Pollable for QuotaOutputStream {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

impl QuotaFsView<'_> {
    /// Replaces the file stream `stream` with one charging `charge`.
    fn wrap_stream(
        &mut self,
        stream: Resource<DynOutputStream>,
        charge: Option<Arc<GrantCharge>>,
    ) -> FsResult<Resource<DynOutputStream>> {
        let Some(charge) = charge else {
            return Ok(stream);
        };
        // wasmtime-wasi pushes the stream without a parent, so re-pushing it
        // loses no relation; the guest has not seen the first index yet.
        let inner = self.inner.table.delete(stream)?;
        let wrapped: DynOutputStream = Box::new(QuotaOutputStream {
            inner,
            charge,
            failed: false,
        });
        Ok(self.inner.table.push(wrapped)?)
    }
}

impl preopens::Host for QuotaFsView<'_> {
    fn get_directories(&mut self) -> wasmtime::Result<Vec<(Resource<Descriptor>, String)>> {
        let dirs = preopens::Host::get_directories(&mut self.inner)?;
        if let Some(quota) = self.quota.as_deref() {
            let charges: Vec<_> = dirs
                .iter()
                .zip(&quota.preopens)
                .map(|((fd, _), charge)| (fd.rep(), charge.clone()))
                .collect();
            for (rep, charge) in charges {
                self.track(rep, charge);
            }
        }
        Ok(dirs)
    }
}

impl types::Host for QuotaFsView<'_> {
    fn convert_error_code(&mut self, err: FsError) -> wasmtime::Result<ErrorCode> {
        types::Host::convert_error_code(&mut self.inner, err)
    }

    fn filesystem_error_code(
        &mut self,
        err: Resource<wasmtime::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        // The quota error carries no OS error number, which wasmtime-wasi
        // would map to plain `io`.
        let quota = self
            .inner
            .table
            .get(&err)?
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::StorageFull);
        if quota {
            return Ok(Some(ErrorCode::InsufficientSpace));
        }
        types::Host::filesystem_error_code(&mut self.inner, err)
    }
}

impl types::HostDescriptor for QuotaFsView<'_> {
    async fn write(
        &mut self,
        fd: Resource<Descriptor>,
        buf: Vec<u8>,
        offset: types::Filesize,
    ) -> FsResult<types::Filesize> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        charge(self.charge_of(&fd).as_deref(), len, 0)?;
        types::HostDescriptor::write(&mut self.inner, fd, buf, offset).await
    }

    fn write_via_stream(
        &mut self,
        fd: Resource<Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynOutputStream>> {
        let charge = self.charge_of(&fd);
        let stream = types::HostDescriptor::write_via_stream(&mut self.inner, fd, offset)?;
        self.wrap_stream(stream, charge)
    }

    fn append_via_stream(
        &mut self,
        fd: Resource<Descriptor>,
    ) -> FsResult<Resource<DynOutputStream>> {
        let charge = self.charge_of(&fd);
        let stream = types::HostDescriptor::append_via_stream(&mut self.inner, fd)?;
        self.wrap_stream(stream, charge)
    }

    async fn set_size(&mut self, fd: Resource<Descriptor>, size: types::Filesize) -> FsResult<()> {
        // Growing a file is writing zeroes: charge the growth.
        if let Some(grant) = self.charge_of(&fd) {
            let stat = types::HostDescriptor::stat(&mut self.inner, Resource::new_borrow(fd.rep()))
                .await?;
            charge(Some(&grant), size.saturating_sub(stat.size), 0)?;
        }
        types::HostDescriptor::set_size(&mut self.inner, fd, size).await
    }

    async fn open_at(
        &mut self,
        fd: Resource<Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        oflags: types::OpenFlags,
        flags: types::DescriptorFlags,
    ) -> FsResult<Resource<Descriptor>> {
        let grant = self.charge_of(&fd);
        if oflags.contains(types::OpenFlags::CREATE) {
            // Counted whether or not the file existed: knowing would cost a
            // syscall, and the count only bounds entries.
            charge(grant.as_deref(), 0, 1)?;
        }
        let opened =
            types::HostDescriptor::open_at(&mut self.inner, fd, path_flags, path, oflags, flags)
                .await?;
        // Whatever is opened under a grant stays in its tree (wasmtime-wasi
        // resolves every path inside the preopen), so it inherits the charge.
        self.track(opened.rep(), grant);
        Ok(opened)
    }

    async fn create_directory_at(
        &mut self,
        fd: Resource<Descriptor>,
        path: String,
    ) -> FsResult<()> {
        charge(self.charge_of(&fd).as_deref(), 0, 1)?;
        types::HostDescriptor::create_directory_at(&mut self.inner, fd, path).await
    }

    async fn symlink_at(
        &mut self,
        fd: Resource<Descriptor>,
        src_path: String,
        dest_path: String,
    ) -> FsResult<()> {
        // A symlink stores its target.
        let len = u64::try_from(src_path.len()).unwrap_or(u64::MAX);
        charge(self.charge_of(&fd).as_deref(), len, 1)?;
        types::HostDescriptor::symlink_at(&mut self.inner, fd, src_path, dest_path).await
    }

    async fn link_at(
        &mut self,
        fd: Resource<Descriptor>,
        old_path_flags: types::PathFlags,
        old_path: String,
        new_descriptor: Resource<Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        self.check_move(&fd, &new_descriptor)?;
        charge(self.charge_of(&new_descriptor).as_deref(), 0, 1)?;
        types::HostDescriptor::link_at(
            &mut self.inner,
            fd,
            old_path_flags,
            old_path,
            new_descriptor,
            new_path,
        )
        .await
    }

    async fn rename_at(
        &mut self,
        fd: Resource<Descriptor>,
        old_path: String,
        new_fd: Resource<Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        self.check_move(&fd, &new_fd)?;
        types::HostDescriptor::rename_at(&mut self.inner, fd, old_path, new_fd, new_path).await
    }

    fn drop(&mut self, fd: Resource<Descriptor>) -> wasmtime::Result<()> {
        self.track(fd.rep(), None);
        types::HostDescriptor::drop(&mut self.inner, fd)
    }

    // Everything below neither writes file data nor creates entries.

    async fn advise(
        &mut self,
        fd: Resource<Descriptor>,
        offset: types::Filesize,
        len: types::Filesize,
        advice: types::Advice,
    ) -> FsResult<()> {
        types::HostDescriptor::advise(&mut self.inner, fd, offset, len, advice).await
    }

    async fn sync_data(&mut self, fd: Resource<Descriptor>) -> FsResult<()> {
        types::HostDescriptor::sync_data(&mut self.inner, fd).await
    }

    async fn get_flags(&mut self, fd: Resource<Descriptor>) -> FsResult<types::DescriptorFlags> {
        types::HostDescriptor::get_flags(&mut self.inner, fd).await
    }

    async fn get_type(&mut self, fd: Resource<Descriptor>) -> FsResult<types::DescriptorType> {
        types::HostDescriptor::get_type(&mut self.inner, fd).await
    }

    async fn set_times(
        &mut self,
        fd: Resource<Descriptor>,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        types::HostDescriptor::set_times(&mut self.inner, fd, atim, mtim).await
    }

    async fn read(
        &mut self,
        fd: Resource<Descriptor>,
        len: types::Filesize,
        offset: types::Filesize,
    ) -> FsResult<(Vec<u8>, bool)> {
        types::HostDescriptor::read(&mut self.inner, fd, len, offset).await
    }

    async fn read_directory(
        &mut self,
        fd: Resource<Descriptor>,
    ) -> FsResult<Resource<types::DirectoryEntryStream>> {
        types::HostDescriptor::read_directory(&mut self.inner, fd).await
    }

    async fn sync(&mut self, fd: Resource<Descriptor>) -> FsResult<()> {
        types::HostDescriptor::sync(&mut self.inner, fd).await
    }

    async fn stat(&mut self, fd: Resource<Descriptor>) -> FsResult<types::DescriptorStat> {
        types::HostDescriptor::stat(&mut self.inner, fd).await
    }

    async fn stat_at(
        &mut self,
        fd: Resource<Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::DescriptorStat> {
        types::HostDescriptor::stat_at(&mut self.inner, fd, path_flags, path).await
    }

    async fn set_times_at(
        &mut self,
        fd: Resource<Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        types::HostDescriptor::set_times_at(&mut self.inner, fd, path_flags, path, atim, mtim).await
    }

    async fn readlink_at(&mut self, fd: Resource<Descriptor>, path: String) -> FsResult<String> {
        types::HostDescriptor::readlink_at(&mut self.inner, fd, path).await
    }

    async fn remove_directory_at(
        &mut self,
        fd: Resource<Descriptor>,
        path: String,
    ) -> FsResult<()> {
        types::HostDescriptor::remove_directory_at(&mut self.inner, fd, path).await
    }

    async fn unlink_file_at(&mut self, fd: Resource<Descriptor>, path: String) -> FsResult<()> {
        types::HostDescriptor::unlink_file_at(&mut self.inner, fd, path).await
    }

    fn read_via_stream(
        &mut self,
        fd: Resource<Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynInputStream>> {
        types::HostDescriptor::read_via_stream(&mut self.inner, fd, offset)
    }

    async fn is_same_object(
        &mut self,
        a: Resource<Descriptor>,
        b: Resource<Descriptor>,
    ) -> wasmtime::Result<bool> {
        types::HostDescriptor::is_same_object(&mut self.inner, a, b).await
    }

    async fn metadata_hash(
        &mut self,
        fd: Resource<Descriptor>,
    ) -> FsResult<types::MetadataHashValue> {
        types::HostDescriptor::metadata_hash(&mut self.inner, fd).await
    }

    async fn metadata_hash_at(
        &mut self,
        fd: Resource<Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::MetadataHashValue> {
        types::HostDescriptor::metadata_hash_at(&mut self.inner, fd, path_flags, path).await
    }
}

impl types::HostDirectoryEntryStream for QuotaFsView<'_> {
    async fn read_directory_entry(
        &mut self,
        stream: Resource<types::DirectoryEntryStream>,
    ) -> FsResult<Option<types::DirectoryEntry>> {
        types::HostDirectoryEntryStream::read_directory_entry(&mut self.inner, stream).await
    }

    fn drop(&mut self, stream: Resource<types::DirectoryEntryStream>) -> wasmtime::Result<()> {
        types::HostDirectoryEntryStream::drop(&mut self.inner, stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn measures_file_sizes_and_entries_recursively() {
        let dir = tree();
        std::fs::write(dir.path().join("a"), vec![0; 1000]).unwrap();
        std::fs::create_dir_all(dir.path().join("sub/deeper")).unwrap();
        std::fs::write(dir.path().join("sub/deeper/b"), vec![0; 24]).unwrap();
        let usage = measure_tree(dir.path(), 100).unwrap();
        // a, sub, sub/deeper, sub/deeper/b; directories add entries, not bytes.
        assert_eq!(
            usage,
            TreeUsage {
                bytes: 1024,
                entries: 4
            }
        );
    }

    #[test]
    fn symlinks_are_not_followed() {
        let outside = tree();
        std::fs::write(outside.path().join("big"), vec![0; 1 << 20]).unwrap();
        let dir = tree();
        let target = outside.path().join("big");
        std::os::unix::fs::symlink(&target, dir.path().join("to-file")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("to-dir")).unwrap();
        let usage = measure_tree(dir.path(), 100).unwrap();
        // Two links, each counting only its own size (the target's length).
        let link_sizes = target.as_os_str().len() + outside.path().as_os_str().len();
        assert_eq!(usage.entries, 2);
        assert_eq!(usage.bytes, link_sizes as u64);
    }

    #[test]
    fn too_many_entries_count_as_full() {
        let dir = tree();
        for i in 0..5 {
            std::fs::write(dir.path().join(i.to_string()), "x").unwrap();
        }
        assert!(measure_tree(dir.path(), 5).is_some());
        assert_eq!(measure_tree(dir.path(), 4), None);
    }

    #[test]
    fn an_unreadable_root_counts_as_full() {
        let dir = tree();
        assert_eq!(measure_tree(&dir.path().join("missing"), 100), None);
    }

    #[test]
    fn charges_stop_at_the_quota_and_a_measurement_rebases() {
        let dir = tree();
        std::fs::write(dir.path().join("old"), vec![0; 100]).unwrap();
        let budget = DirBudget::new(1000);
        assert_eq!(budget.remaining_bytes(), 0, "unmeasured counts as full");
        budget.remeasure(dir.path());
        assert_eq!(budget.remaining_bytes(), 900);
        let grant = GrantCharge {
            budgets: vec![Arc::new(budget)],
            moves_stay_inside: true,
        };
        grant.charge(800, 1).unwrap();
        assert!(grant.charge(101, 0).is_err());
        grant.charge(100, 0).unwrap();
        assert!(grant.charge(1, 0).is_err());
        // What was charged is on disk by the next measurement, which then
        // counts it. Here the charges were never written and the old file
        // is deleted: the tree is empty, the whole quota is back.
        std::fs::remove_file(dir.path().join("old")).unwrap();
        grant.budgets[0].remeasure(dir.path());
        assert_eq!(grant.budgets[0].remaining_bytes(), 1000);
        // Charges after the measurement count on top of it.
        grant.charge(300, 0).unwrap();
        assert_eq!(grant.budgets[0].remaining_bytes(), 700);
    }

    #[test]
    fn a_charge_to_overlapping_budgets_is_all_or_nothing() {
        let dir = tree();
        let small = Arc::new(DirBudget::new(10));
        let large = Arc::new(DirBudget::new(1000));
        small.remeasure(dir.path());
        large.remeasure(dir.path());
        let grant = GrantCharge {
            budgets: vec![small.clone(), large.clone()],
            moves_stay_inside: false,
        };
        assert!(grant.charge(11, 0).is_err());
        assert_eq!(
            large.remaining_bytes(),
            1000,
            "nothing taken from the larger one"
        );
        grant.charge(10, 0).unwrap();
        assert_eq!((small.remaining_bytes(), large.remaining_bytes()), (0, 990));
    }

    #[test]
    fn live_calls_share_one_budget_per_directory_and_quota() {
        let dir = tree();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let a = DirBudget::shared(&root, 4096);
        let b = DirBudget::shared(&root, 4096);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &DirBudget::shared(&root, 8192)));
        drop((a, b));
        // Once no call holds it, the next one starts from a fresh measurement.
        let c = DirBudget::shared(&root, 4096);
        assert_eq!(c.remaining_bytes(), 0);
    }

    #[test]
    fn overlapping_grants_are_charged_together() {
        let outer = tree();
        let inner = outer.path().join("inner");
        std::fs::create_dir(&inner).unwrap();
        let grant = |host_path: &Path, quota_bytes| DirGrant {
            host_path: host_path.to_path_buf(),
            guest_path: "/x".into(),
            mode: DirMode::Rw,
            quota_bytes,
        };
        // A quota'd tree with an unquota'd grant nested inside: writes through
        // the nested grant count against the outer quota.
        let quota =
            FsQuota::for_grants(&[grant(outer.path(), Some(10)), grant(&inner, None)]).unwrap();
        let (a, b) = (
            quota.preopens[0].clone().unwrap(),
            quota.preopens[1].clone().unwrap(),
        );
        assert!(Arc::ptr_eq(&a.budgets[0], &b.budgets[0]));
        assert!(a.moves_stay_inside && !b.moves_stay_inside);
        // Two quota'd trees, one inside the other: both pay for either, and
        // no rename may stay "inside" (it could cross into the inner tree).
        let quota =
            FsQuota::for_grants(&[grant(outer.path(), Some(10)), grant(&inner, Some(20))]).unwrap();
        for charge in quota.preopens.iter().flatten() {
            assert_eq!(charge.budgets.len(), 2);
            assert!(!charge.moves_stay_inside);
        }
    }

    #[test]
    fn a_walk_overtaken_by_a_newer_one_is_dropped() {
        let budget = DirBudget::new(1000);
        let old = budget.start_walk();
        let new = budget.start_walk();
        budget.finish_walk(
            new,
            TreeUsage {
                bytes: 100,
                entries: 1,
            },
        );
        // The older walk finishes late with a stale result: ignored.
        budget.finish_walk(old, TreeUsage::default());
        assert_eq!(budget.remaining_bytes(), 900);
    }

    #[test]
    fn only_quota_d_read_write_grants_get_budgets() {
        let quota_d = tree();
        let scratch = tree();
        let grant = |dir: &tempfile::TempDir, mode, quota_bytes| DirGrant {
            host_path: dir.path().to_path_buf(),
            guest_path: "/x".into(),
            mode,
            quota_bytes,
        };
        assert!(FsQuota::for_grants(&[grant(&scratch, DirMode::Rw, None)]).is_none());
        let quota = FsQuota::for_grants(&[
            grant(&quota_d, DirMode::Rw, Some(10)),
            grant(&scratch, DirMode::Rw, None),
            grant(&quota_d, DirMode::Ro, None),
        ])
        .unwrap();
        let first = quota.preopens[0].as_ref().unwrap();
        assert!(first.moves_stay_inside);
        assert!(
            quota.preopens[1].is_none(),
            "an unrelated scratch grant is free"
        );
        assert!(quota.preopens[2].is_none(), "read-only grants cannot write");
    }
}
