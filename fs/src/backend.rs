//! Where pack bytes live: the [`PackStorage`] trait and its implementations.
//!
//! The store sees packs as numbered append-only byte files. Three
//! implementations:
//! - [`DiskPacks`]: files `packs/<16 hex digits>.pack` in the store directory;
//!   file handles are cached; page-aligned appends go through a second file
//!   descriptor opened with `O_DIRECT` (no copy into the page cache), others
//!   (a pack's header), and all on filesystems without `O_DIRECT` (tmpfs),
//!   are buffered; `sync` is `fdatasync`, and the first `sync` of a new pack
//!   also syncs the directory (once for every pack created before it: a
//!   1 GiB flush fills ~16 packs and syncs the directory once, not 16 times).
//! - [`MemPacks`]: in memory, for tests; shareable so a test can "reopen".
//! - [`FaultPacks`]: wraps another implementation and injects failures —
//!   a failing `sync`, a short (torn) write, `ENOSPC` after a byte budget —
//!   and simulates a crash by dropping every byte appended since the last
//!   successful `sync` of each pack.
//!
//! Contract: bytes passed to `append` — and a new pack's name — are durable
//! only after `sync` on that pack returned `Ok`. A failed `append` may leave part of its
//! bytes at the pack's end: the caller appends no more to it. If it failed for lack of
//! space, what was appended before stands and a `sync` makes it durable; after any other
//! failed `append`, or a failed `sync`, nothing appended since the last good `sync` can be
//! relied on (the caller abandons the pack).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Number of a pack file.
pub type PackId = u64;

/// Append-only numbered byte files.
pub trait PackStorage: Send + Sync + std::fmt::Debug {
    /// All packs present, in ascending order.
    fn list(&self) -> io::Result<Vec<PackId>>;
    /// Create an empty pack; fails if it exists.
    fn create(&self, id: PackId) -> io::Result<()>;
    /// Append bytes at the end of the pack.
    fn append(&self, id: PackId, data: &[u8]) -> io::Result<()>;
    /// Append several buffers, in order (one vectored write where possible).
    fn append_all(&self, id: PackId, parts: &[&[u8]]) -> io::Result<()> {
        self.append(id, &parts.concat())
    }
    /// Make everything appended so far durable.
    fn sync(&self, id: PackId) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self, id: PackId) -> io::Result<u64>;
    /// Read exactly `buf.len()` bytes at `offset` (`UnexpectedEof` past the end).
    fn read_at(&self, id: PackId, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// `len` bytes at `offset` in a new shared buffer (what the read cache
    /// keeps), read straight into it.
    fn read_at_new(&self, id: PackId, offset: u64, len: usize) -> io::Result<Arc<[u8]>> {
        let mut data: Arc<[u8]> = std::iter::repeat_n(0u8, len).collect();
        self.read_at(id, offset, Arc::get_mut(&mut data).expect("a new Arc is unique"))?;
        Ok(data)
    }
    /// Read up to `buf.len()` bytes at `offset` past the page cache where the
    /// storage can (`O_DIRECT`, when `offset` and `buf`'s address and length
    /// are 4 KiB-aligned): for large reads not read again soon. Returns the
    /// bytes read, short at the end of the pack.
    fn read_direct(&self, id: PackId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.len(id)?.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.read_at(id, offset, &mut buf[..n])?;
        Ok(n)
    }
    /// Cut the pack to `len` bytes (recovery of a torn tail) and make it durable.
    fn truncate(&self, id: PackId, len: u64) -> io::Result<()>;
    /// Delete the pack.
    fn remove(&self, id: PackId) -> io::Result<()>;
    /// Try to become the pack's only writer across processes (an advisory
    /// lock held until [`PackStorage::release`] or process exit). `create`
    /// claims the new pack. Recovery and GC touch only packs they can claim.
    fn try_claim(&self, id: PackId) -> io::Result<bool>;
    /// Give up a claim.
    fn release(&self, id: PackId);
}

// ---------------------------------------------------------------- disk

/// Packs as files in a directory.
#[derive(Debug)]
pub struct DiskPacks {
    dir: PathBuf,
    files: Mutex<Descriptors>,
    /// O_DIRECT descriptors, for aligned appends and large reads (`None`:
    /// the filesystem refuses O_DIRECT), least recently used dropped first.
    direct: Mutex<lru::LruCache<PackId, Option<Arc<File>>>>,
    /// Packs created whose directory entry may not be durable yet.
    new_names: Mutex<HashSet<PackId>>,
    /// Directory syncs done (tests).
    #[cfg(test)]
    dir_syncs: std::sync::atomic::AtomicUsize,
}

/// Open descriptors of packs. Bounded: a scrub, a GC or a long-lived mount
/// of a large store touches every pack, and one descriptor each would run
/// into the process's limit (`EMFILE`). A claimed pack stays open: its
/// advisory lock lives on the descriptor.
#[derive(Debug)]
struct Descriptors {
    claimed: HashMap<PackId, Arc<File>>,
    open: lru::LruCache<PackId, Arc<File>>,
}

/// Unclaimed packs kept open, per kind of descriptor.
pub const OPEN_PACKS: usize = 256;

impl DiskPacks {
    /// Packs under `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        Self::with_open_limit(dir, OPEN_PACKS)
    }

    /// [`DiskPacks::new`], keeping at most `limit` unclaimed packs open.
    pub fn with_open_limit(dir: impl Into<PathBuf>, limit: usize) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        let limit = std::num::NonZeroUsize::new(limit.max(1)).expect("at least 1");
        Ok(DiskPacks {
            dir,
            files: Mutex::new(Descriptors {
                claimed: HashMap::new(),
                open: lru::LruCache::new(limit),
            }),
            direct: Mutex::new(lru::LruCache::new(limit)),
            new_names: Mutex::new(HashSet::new()),
            #[cfg(test)]
            dir_syncs: Default::default(),
        })
    }

    /// Descriptors held open: claimed packs, others, and `O_DIRECT` ones (tests).
    #[cfg(test)]
    fn open_descriptors(&self) -> (usize, usize, usize) {
        let f = self.files.lock().unwrap();
        let direct = self
            .direct
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, f)| f.is_some())
            .count();
        (f.claimed.len(), f.open.len(), direct)
    }

    fn sync_directory(&self) -> io::Result<()> {
        sync_dir(&self.dir)?;
        #[cfg(test)]
        self.dir_syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Sync the directory: the names of every pack created before now (and
    /// removals) become durable. A name leaves `new_names` only once a sync
    /// that started after its creation has returned.
    fn sync_names(&self) -> io::Result<()> {
        let names: Vec<PackId> = self.new_names.lock().unwrap().iter().copied().collect();
        self.sync_directory()?;
        let mut new = self.new_names.lock().unwrap();
        for id in names {
            new.remove(&id);
        }
        Ok(())
    }

    /// The file name of a pack.
    pub fn path(&self, id: PackId) -> PathBuf {
        self.dir.join(format!("{id:016x}.pack"))
    }

    fn direct_file(&self, id: PackId) -> io::Result<Option<Arc<File>>> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut direct = self.direct.lock().unwrap();
        if let Some(f) = direct.get(&id) {
            return Ok(f.clone());
        }
        let f = match OpenOptions::new()
            .read(true)
            .append(true)
            .custom_flags(libc::O_DIRECT)
            .open(self.path(id))
        {
            Ok(f) => Some(Arc::new(f)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
            Err(e) => return Err(e),
        };
        direct.put(id, f.clone());
        Ok(f)
    }

    fn file(&self, id: PackId) -> io::Result<Arc<File>> {
        let mut files = self.files.lock().unwrap();
        if let Some(f) = files.claimed.get(&id) {
            return Ok(f.clone());
        }
        if let Some(f) = files.open.get(&id) {
            return Ok(f.clone());
        }
        let f = Arc::new(OpenOptions::new().read(true).append(true).open(self.path(id))?);
        files.open.put(id, f.clone());
        Ok(f)
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl PackStorage for DiskPacks {
    fn list(&self) -> io::Result<Vec<PackId>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(hex) = name.strip_suffix(".pack") {
                if let Ok(id) = u64::from_str_radix(hex, 16) {
                    ids.push(id);
                }
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    fn create(&self, id: PackId) -> io::Result<()> {
        let f = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(self.path(id))?;
        f.try_lock()
            .map_err(|e| io::Error::other(format!("claiming new pack {id}: {e}")))?;
        // The name becomes durable with the pack's first sync (nothing may
        // rely on a pack before it is synced).
        self.new_names.lock().unwrap().insert(id);
        self.files.lock().unwrap().claimed.insert(id, Arc::new(f));
        Ok(())
    }

    fn append(&self, id: PackId, data: &[u8]) -> io::Result<()> {
        // Every page-aligned buffer goes around the page cache, small ones
        // too: buffered, fio's random 4 KiB writes spent ~12 % of both cores
        // copying seal jobs' records into the page cache, and each write
        // waited ~1 ms on the pack file system's journal (ARCHITECTURE.md).
        let aligned = data.len().is_multiple_of(4096) && (data.as_ptr() as usize).is_multiple_of(4096);
        if aligned {
            if let Some(f) = self.direct_file(id)? {
                return (&*f).write_all(data);
            }
        }
        (&*self.file(id)?).write_all(data)
    }

    fn append_all(&self, id: PackId, parts: &[&[u8]]) -> io::Result<()> {
        let f = self.file(id)?;
        let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            // At most IOV_MAX (1024) buffers per call.
            let n = (&*f).write_vectored(&rest[..rest.len().min(1024)])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pack append wrote nothing",
                ));
            }
            io::IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }

    fn sync(&self, id: PackId) -> io::Result<()> {
        self.file(id)?.sync_data()?;
        if self.new_names.lock().unwrap().contains(&id) {
            self.sync_names()?;
        }
        Ok(())
    }

    fn len(&self, id: PackId) -> io::Result<u64> {
        Ok(self.file(id)?.metadata()?.len())
    }

    fn read_at(&self, id: PackId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file(id)?.read_exact_at(buf, offset)
    }

    /// Without zeroing the buffer first (that was ~8 % of the mount's CPU
    /// under random reads): `pread(2)` into uninitialized memory, assumed
    /// initialized only once every byte is in.
    #[allow(unsafe_code)]
    fn read_at_new(&self, id: PackId, offset: u64, len: usize) -> io::Result<Arc<[u8]>> {
        use std::os::fd::AsRawFd;
        let f = self.file(id)?;
        let mut data = Arc::<[u8]>::new_uninit_slice(len);
        let buf = Arc::get_mut(&mut data).expect("a new Arc is unique");
        let mut done = 0;
        while done < len {
            let rest = &mut buf[done..];
            let at = libc::off_t::try_from(offset + done as u64)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
            // SAFETY: pread(2) writes at most `rest.len()` bytes into `rest`,
            // memory borrowed mutably here; nothing reads it unwritten.
            let n = unsafe { libc::pread(f.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len(), at) };
            match n {
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "failed to fill whole buffer",
                    ))
                }
                n => done += n as usize,
            }
        }
        // SAFETY: the loop above wrote all `len` bytes.
        Ok(unsafe { data.assume_init() })
    }

    fn read_direct(&self, id: PackId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let aligned = offset.is_multiple_of(4096)
            && buf.len().is_multiple_of(4096)
            && (buf.as_ptr() as usize).is_multiple_of(4096);
        let read_all = |f: &File, buf: &mut [u8]| -> io::Result<usize> {
            let mut done = 0;
            while done < buf.len() {
                match f.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(done)
        };
        if aligned {
            if let Some(f) = self.direct_file(id)? {
                match read_all(&f, buf) {
                    // Opened with O_DIRECT but refused at the read: buffered.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    r => return r,
                }
            }
        }
        read_all(&*self.file(id)?, buf)
    }

    fn truncate(&self, id: PackId, len: u64) -> io::Result<()> {
        let f = self.file(id)?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn remove(&self, id: PackId) -> io::Result<()> {
        {
            let mut files = self.files.lock().unwrap();
            files.claimed.remove(&id);
            files.open.pop(&id);
        }
        self.direct.lock().unwrap().pop(&id);
        self.new_names.lock().unwrap().remove(&id);
        fs::remove_file(self.path(id))?;
        self.sync_names()
    }

    fn try_claim(&self, id: PackId) -> io::Result<bool> {
        let f = self.file(id)?;
        match f.try_lock() {
            Ok(()) => {
                let mut files = self.files.lock().unwrap();
                files.open.pop(&id);
                files.claimed.insert(id, f);
                Ok(true)
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    fn release(&self, id: PackId) {
        let mut files = self.files.lock().unwrap();
        if let Some(f) = files.claimed.remove(&id) {
            let _ = f.unlock();
            files.open.put(id, f);
        }
    }
}

// ---------------------------------------------------------------- memory

/// Packs in memory. Cloning shares the same packs (a test can drop a store
/// and reopen another on the same bytes).
#[derive(Debug, Clone, Default)]
pub struct MemPacks {
    packs: Arc<Mutex<BTreeMap<PackId, Vec<u8>>>>,
}

impl MemPacks {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Mutate a pack's bytes directly (tests: corrupt a record).
    pub fn with_pack<R>(&self, id: PackId, f: impl FnOnce(&mut Vec<u8>) -> R) -> Option<R> {
        self.packs.lock().unwrap().get_mut(&id).map(f)
    }
}

fn not_found(id: PackId) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("pack {id:016x} does not exist"))
}

impl PackStorage for MemPacks {
    fn list(&self) -> io::Result<Vec<PackId>> {
        Ok(self.packs.lock().unwrap().keys().copied().collect())
    }
    fn create(&self, id: PackId) -> io::Result<()> {
        let mut p = self.packs.lock().unwrap();
        if p.contains_key(&id) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "pack exists"));
        }
        p.insert(id, Vec::new());
        Ok(())
    }
    fn append(&self, id: PackId, data: &[u8]) -> io::Result<()> {
        self.packs
            .lock()
            .unwrap()
            .get_mut(&id)
            .ok_or_else(|| not_found(id))?
            .extend_from_slice(data);
        Ok(())
    }
    fn sync(&self, id: PackId) -> io::Result<()> {
        if self.packs.lock().unwrap().contains_key(&id) {
            Ok(())
        } else {
            Err(not_found(id))
        }
    }
    fn len(&self, id: PackId) -> io::Result<u64> {
        Ok(self
            .packs
            .lock()
            .unwrap()
            .get(&id)
            .ok_or_else(|| not_found(id))?
            .len() as u64)
    }
    fn read_at(&self, id: PackId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let p = self.packs.lock().unwrap();
        let pack = p.get(&id).ok_or_else(|| not_found(id))?;
        let start = offset as usize;
        let end = start.checked_add(buf.len()).filter(|&e| e <= pack.len());
        match end {
            Some(end) => {
                buf.copy_from_slice(&pack[start..end]);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end of pack",
            )),
        }
    }
    fn truncate(&self, id: PackId, len: u64) -> io::Result<()> {
        self.packs
            .lock()
            .unwrap()
            .get_mut(&id)
            .ok_or_else(|| not_found(id))?
            .truncate(len as usize);
        Ok(())
    }
    fn remove(&self, id: PackId) -> io::Result<()> {
        self.packs
            .lock()
            .unwrap()
            .remove(&id)
            .map(|_| ())
            .ok_or_else(|| not_found(id))
    }
    /// One process: every claim succeeds.
    fn try_claim(&self, id: PackId) -> io::Result<bool> {
        if self.packs.lock().unwrap().contains_key(&id) {
            Ok(true)
        } else {
            Err(not_found(id))
        }
    }
    fn release(&self, _id: PackId) {}
}

// ---------------------------------------------------------------- faults

/// Which failures a [`FaultPacks`] injects. All counters are "from now on".
#[derive(Debug, Default, Clone)]
pub struct FaultPlan {
    /// Fail the n-th `sync` from now (0 = the next one) with `EIO`.
    pub fail_sync_at: Option<u64>,
    /// After this many more appended bytes, `append` fails with `ENOSPC`
    /// (the append that crosses the budget writes nothing).
    pub enospc_after_bytes: Option<u64>,
    /// Make the n-th `append` from now a torn write: half its bytes land,
    /// then it fails with `EIO`.
    pub short_write_at: Option<u64>,
    /// Panic in the n-th `sync` from now (a bug below the store), before
    /// anything is synced.
    pub panic_sync_at: Option<u64>,
    /// `list` also names this pack, which is not there (another process
    /// removed it after the listing).
    pub listed_but_gone: Option<PackId>,
    /// Every read panics (a bug below the store).
    pub panic_reads: bool,
}

#[derive(Debug, Default)]
struct FaultState {
    plan: FaultPlan,
    syncs: u64,
    appends: u64,
    appended_bytes: u64,
    /// Durable length of each pack (as of its last successful sync).
    synced: HashMap<PackId, u64>,
    /// Syncs wait while this is set ([`FaultPacks::hold_syncs`]).
    hold: bool,
    /// Syncs waiting now.
    held: usize,
    /// Packs `try_claim` was asked for, in order.
    claims: Vec<PackId>,
}

/// Wraps a [`PackStorage`] and injects the failures of a [`FaultPlan`].
#[derive(Debug, Clone)]
pub struct FaultPacks<S> {
    inner: S,
    state: Arc<Mutex<FaultState>>,
    released: Arc<std::sync::Condvar>,
}

impl<S: PackStorage> FaultPacks<S> {
    /// Wrap `inner` with no faults planned.
    pub fn new(inner: S) -> Self {
        let mut state = FaultState::default();
        for id in inner.list().unwrap_or_default() {
            let len = inner.len(id).unwrap_or(0);
            state.synced.insert(id, len);
        }
        FaultPacks {
            inner,
            state: Arc::new(Mutex::new(state)),
            released: Arc::default(),
        }
    }

    /// While `hold`, every `sync` waits (a slow disk, for ordering tests);
    /// `false` lets them go on.
    pub fn hold_syncs(&self, hold: bool) {
        self.state.lock().unwrap().hold = hold;
        self.released.notify_all();
    }

    /// Syncs so far (since the last [`FaultPacks::set_plan`]).
    pub fn syncs(&self) -> u64 {
        self.state.lock().unwrap().syncs
    }

    /// Syncs waiting under [`FaultPacks::hold_syncs`] now.
    pub fn syncs_held(&self) -> usize {
        self.state.lock().unwrap().held
    }

    /// Packs `try_claim` was asked for so far, in order.
    pub fn claims_tried(&self) -> Vec<PackId> {
        self.state.lock().unwrap().claims.clone()
    }

    /// Replace the plan and reset its counters.
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut st = self.state.lock().unwrap();
        st.plan = plan;
        st.syncs = 0;
        st.appends = 0;
        st.appended_bytes = 0;
    }

    /// Simulate power loss: every pack loses what was appended after its
    /// last successful sync; packs created but never synced are gone. (The
    /// other outcome a real crash allows, such a file kept while its row is
    /// lost, is reached by a test of its own in `tests/store_ops.rs`.)
    /// The plan is cleared (the machine "reboots").
    pub fn crash(&self) {
        let mut st = self.state.lock().unwrap();
        for id in self.inner.list().unwrap_or_default() {
            match st.synced.get(&id).copied() {
                Some(keep) => {
                    let _ = self.inner.truncate(id, keep);
                }
                // Its name was never synced: the file is gone.
                None => {
                    let _ = self.inner.remove(id);
                }
            }
        }
        st.plan = FaultPlan::default();
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected fault: {what}"))
}

impl<S: PackStorage> PackStorage for FaultPacks<S> {
    fn list(&self) -> io::Result<Vec<PackId>> {
        let mut ids = self.inner.list()?;
        ids.extend(self.state.lock().unwrap().plan.listed_but_gone);
        Ok(ids)
    }
    fn create(&self, id: PackId) -> io::Result<()> {
        // Durable only with its first sync (`DiskPacks` syncs the name then).
        self.inner.create(id)
    }
    fn append(&self, id: PackId, data: &[u8]) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        let n = st.appends;
        st.appends += 1;
        if let Some(budget) = st.plan.enospc_after_bytes {
            if st.appended_bytes + data.len() as u64 > budget {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        st.appended_bytes += data.len() as u64;
        if st.plan.short_write_at == Some(n) {
            self.inner.append(id, &data[..data.len() / 2])?;
            return Err(eio("short write"));
        }
        self.inner.append(id, data)
    }
    fn sync(&self, id: PackId) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        if st.hold {
            st.held += 1;
            while st.hold {
                st = self.released.wait(st).unwrap();
            }
            st.held -= 1;
        }
        let n = st.syncs;
        st.syncs += 1;
        if st.plan.fail_sync_at == Some(n) {
            return Err(eio("fsync failed"));
        }
        if st.plan.panic_sync_at == Some(n) {
            drop(st); // (not poisoning the state)
            panic!("injected panic in sync");
        }
        self.inner.sync(id)?;
        let len = self.inner.len(id)?;
        st.synced.insert(id, len);
        Ok(())
    }
    fn len(&self, id: PackId) -> io::Result<u64> {
        self.inner.len(id)
    }
    fn read_at(&self, id: PackId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.state.lock().unwrap().plan.panic_reads {
            panic!("injected panic in a read of pack {id}");
        }
        self.inner.read_at(id, offset, buf)
    }
    fn truncate(&self, id: PackId, len: u64) -> io::Result<()> {
        self.inner.truncate(id, len)?;
        let mut st = self.state.lock().unwrap();
        let e = st.synced.entry(id).or_insert(len);
        *e = (*e).min(len);
        Ok(())
    }
    fn remove(&self, id: PackId) -> io::Result<()> {
        self.inner.remove(id)?;
        self.state.lock().unwrap().synced.remove(&id);
        Ok(())
    }
    fn try_claim(&self, id: PackId) -> io::Result<bool> {
        self.state.lock().unwrap().claims.push(id);
        self.inner.try_claim(id)
    }
    fn release(&self, id: PackId) {
        self.inner.release(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(s: &dyn PackStorage) {
        s.create(1).unwrap();
        assert!(s.create(1).is_err());
        s.append(1, b"hello ").unwrap();
        s.append(1, b"world").unwrap();
        s.sync(1).unwrap();
        assert_eq!(s.len(1).unwrap(), 11);
        let mut buf = [0u8; 5];
        s.read_at(1, 6, &mut buf).unwrap();
        assert_eq!(&buf, b"world");
        assert_eq!(
            s.read_at(1, 8, &mut buf).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        // Into a new buffer: all of it, or UnexpectedEof / NotFound.
        assert_eq!(&s.read_at_new(1, 6, 5).unwrap()[..], b"world");
        assert_eq!(
            s.read_at_new(1, 8, 5).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(
            s.read_at_new(99, 0, 5).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        // An offset no file reaches (past off_t on disk): an error, no panic.
        assert!(s.read_at_new(1, u64::MAX - 2, 1).is_err());
        // Direct reads, unaligned (buffered) and aligned (O_DIRECT on disk), short at the end.
        let mut buf = [0u8; 8];
        assert_eq!(s.read_direct(1, 6, &mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"world");
        s.create(2).unwrap();
        let data: Vec<u8> = (0..3 * 4096 + 100u32).map(|i| (i % 251) as u8).collect();
        s.append(2, &data).unwrap();
        let mut big = vec![0u8; 3 * 4096];
        let at = big.as_ptr().align_offset(4096);
        let aligned = &mut big[at..at + 2 * 4096];
        assert_eq!(s.read_direct(2, 8192, aligned).unwrap(), 4096 + 100);
        assert_eq!(&aligned[..4196], &data[8192..]);
        s.remove(2).unwrap();
        s.truncate(1, 5).unwrap();
        assert_eq!(s.len(1).unwrap(), 5);
        s.create(7).unwrap();
        assert_eq!(s.list().unwrap(), vec![1, 7]);
        s.remove(1).unwrap();
        assert_eq!(s.list().unwrap(), vec![7]);
    }

    #[test]
    fn disk_and_memory_behave_alike() {
        let dir = tempfile::tempdir().unwrap();
        exercise(&DiskPacks::new(dir.path().join("packs")).unwrap());
        exercise(&MemPacks::new());
        exercise(&FaultPacks::new(MemPacks::new()));
    }

    #[test]
    fn a_new_packs_name_is_synced_with_its_first_sync_for_all_made_before() {
        let dir = tempfile::tempdir().unwrap();
        let p = DiskPacks::new(dir.path()).unwrap();
        let pending = || {
            let mut v: Vec<_> = p.new_names.lock().unwrap().iter().copied().collect();
            v.sort();
            v
        };
        let syncs = || p.dir_syncs.load(std::sync::atomic::Ordering::Relaxed);
        for id in 1..=3 {
            p.create(id).unwrap();
        }
        assert_eq!((pending(), syncs()), (vec![1, 2, 3], 0), "creating syncs nothing");
        p.sync(2).unwrap();
        assert_eq!(
            (pending(), syncs()),
            (vec![], 1),
            "one directory sync covers every name made before it"
        );
        p.create(4).unwrap();
        p.sync(1).unwrap();
        assert_eq!(
            (pending(), syncs()),
            (vec![4], 1),
            "a sync of an older pack needs no directory sync"
        );
        p.create(5).unwrap();
        p.remove(4).unwrap();
        assert_eq!(
            (pending(), syncs()),
            (vec![], 2),
            "a removal's directory sync covers new names too"
        );
    }

    #[test]
    fn disk_claims_exclude_other_processes() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskPacks::new(dir.path()).unwrap();
        let b = DiskPacks::new(dir.path()).unwrap(); // another open file description, as another process has
        a.create(3).unwrap();
        assert!(!b.try_claim(3).unwrap(), "a new pack is claimed by its creator");
        a.release(3);
        assert!(b.try_claim(3).unwrap());
        assert!(!a.try_claim(3).unwrap());
    }

    #[test]
    fn open_descriptors_are_bounded_and_claims_outlive_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskPacks::with_open_limit(dir.path(), 4).unwrap();
        let b = DiskPacks::with_open_limit(dir.path(), 4).unwrap(); // as another process
        for id in 1..=20 {
            a.create(id).unwrap(); // claimed by its creator
            a.append(id, &[id as u8; 4096]).unwrap();
        }
        for id in 1..=10 {
            a.release(id);
        }
        assert_eq!(a.open_descriptors().0, 10);
        // Reading every pack, twice over, keeps at most 4 unclaimed ones open.
        for _ in 0..2 {
            for id in 1..=20 {
                let mut buf = [0u8; 4096];
                a.read_at(id, 0, &mut buf).unwrap();
                assert_eq!(buf, [id as u8; 4096]);
                let mut aligned = vec![0u8; 3 * 4096];
                let at = aligned.as_ptr().align_offset(4096);
                assert_eq!(a.read_direct(id, 0, &mut aligned[at..at + 4096]).unwrap(), 4096);
                let (claimed, open, direct) = a.open_descriptors();
                assert_eq!(claimed, 10);
                assert!(open <= 4 && direct <= 4, "{open} {direct} open");
            }
        }
        // The claims held through all of it; released packs can be claimed.
        for id in 11..=20 {
            assert!(!b.try_claim(id).unwrap(), "pack {id} lost its claim");
        }
        for id in 1..=10 {
            assert!(b.try_claim(id).unwrap(), "pack {id} is still claimed");
        }
        // A claim taken after its descriptor was dropped is kept too.
        b.release(1);
        assert!(a.try_claim(1).unwrap());
        for id in 2..=10 {
            let _ = a.len(id).unwrap(); // other packs through the cache
        }
        assert!(!b.try_claim(1).unwrap());
    }

    #[test]
    fn only_aligned_appends_bypass_the_page_cache() {
        const LEN: usize = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let a = DiskPacks::new(dir.path()).unwrap();
        a.create(1).unwrap();
        let mut buf = crate::pack::AlignedBuf::zeroed(LEN);
        buf.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 253) as u8);
        // Not a whole number of pages (as a pack header): buffered.
        a.append(1, &buf.as_slice()[..4000]).unwrap();
        assert_eq!(
            a.open_descriptors().2,
            0,
            "an unaligned append went around the page cache"
        );
        a.append(1, &buf.as_slice()[4000..4096]).unwrap();
        a.append(1, buf.as_slice()).unwrap();
        // Where the filesystem takes O_DIRECT (not tmpfs), the aligned one did.
        use std::os::unix::fs::OpenOptionsExt;
        let takes_direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(a.path(1))
            .is_ok();
        assert_eq!(a.open_descriptors().2, usize::from(takes_direct));
        let mut back = vec![0u8; 4096 + LEN];
        a.read_at(1, 0, &mut back).unwrap();
        assert_eq!(&back[..4096], &buf.as_slice()[..4096]);
        assert_eq!(&back[4096..], buf.as_slice());
    }

    #[test]
    fn crash_drops_unsynced_bytes() {
        let f = FaultPacks::new(MemPacks::new());
        f.create(1).unwrap();
        f.append(1, b"durable").unwrap();
        f.sync(1).unwrap();
        f.append(1, b" lost").unwrap();
        f.crash();
        assert_eq!(f.len(1).unwrap(), 7);
    }

    #[test]
    fn injected_faults_fire_once_where_planned() {
        let f = FaultPacks::new(MemPacks::new());
        f.create(1).unwrap();
        f.set_plan(FaultPlan {
            enospc_after_bytes: Some(4),
            ..Default::default()
        });
        f.append(1, b"abcd").unwrap();
        let e = f.append(1, b"e").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        f.set_plan(FaultPlan {
            short_write_at: Some(1),
            fail_sync_at: Some(0),
            ..Default::default()
        });
        f.append(1, b"ok").unwrap();
        assert!(f.append(1, b"torn").is_err());
        assert_eq!(f.len(1).unwrap(), 4 + 2 + 2);
        assert!(f.sync(1).is_err());
        f.sync(1).unwrap();
    }
}
