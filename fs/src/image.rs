//! An open image: reads, writes, holes, resize and commit.
//!
//! Writes land in a bounded dirty set of whole blocks (partial writes
//! read-modify-write). When the dirty set passes its limit it is *sealed*:
//! each block is checked for zero (→ hole), hashed, compressed and appended
//! to a pack unless the store has it already — but nothing is visible yet.
//! [`ImageHandle::commit`] seals what is left, syncs the packs it used, and
//! switches the map in ONE transaction: the image is exactly the old or the
//! new version, never a mix.
//!
//! Failure: if a commit (or a seal) fails, the handle drops its uncommitted
//! changes and returns to the image's last committed version; the error says
//! why. The committed version is untouched.
//!
//! Holes: a block is data iff it holds a non-zero byte. SEEK_DATA/SEEK_HOLE
//! answers come from the map plus the uncommitted overlay, at block
//! granularity.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use rayon::prelude::*;
use rusqlite::OptionalExtension;

use crate::backend::PackId;
use crate::meta;
use crate::pack::{self, is_zero};
use crate::store::{BlockLoc, CommitRequest, Committed, ImageRow, StageGuard, Via, WriterLease};
use crate::{panic_message, BlockHash, Error, Result, Stamp, Store};

/// Bytes of dirty blocks one [`SealJob`] takes (and a commit seals at a
/// time: each lane's append buffer is sized for it).
pub const SEAL_JOB_BYTES: usize = 8 << 20;

/// Writes a block written in part waits for before a seal job that is not
/// eager takes it (see [`ImageHandle::seal_job_when`]).
const PARTIAL_GRACE: u64 = 16;

/// Default bound of a handle's dirty set.
pub const DEFAULT_DIRTY_LIMIT: usize = 256 << 20;

/// An uncommitted block.
#[derive(Clone, Debug)]
enum Dirty {
    /// All zeros: will become a hole.
    Zero,
    /// Whole block contents (bytes past the image end are zero). Shared
    /// with a [`SealJob`] while one seals it; a write then copies it first.
    Data(Arc<[u8]>),
    /// An existing stored block, shared rather than copied (`copy_file_range`).
    /// The handle holds the stage gate while it has any, so GC keeps the block.
    Ref(BlockHash),
    /// Sector-aligned writes into a block whose old contents were not read
    /// (a 4 KiB write need not cost a 64 KiB read): merged with the old
    /// contents when sealed, or when read. Only in the dirty set, and
    /// always holding a non-zero byte.
    Partial(Box<Partial>),
    /// A [`Dirty::Partial`] taken by a seal job with what lies below it: the
    /// job reads the old contents and merges, outside the handle's lock.
    /// Only in `sealing` and in jobs; holds a non-zero byte.
    Merge(Arc<Merge>),
}

/// Written sectors over the old contents of a block, to be merged.
#[derive(Debug)]
struct Merge {
    partial: Partial,
    base: Base,
}

/// The old contents under a [`Merge`].
#[derive(Debug)]
enum Base {
    /// A hole.
    Zero,
    /// Bytes being sealed by an earlier job.
    Bytes(Arc<[u8]>),
    /// A stored block (committed, staged, or shared in).
    Stored(BlockHash),
}

/// Granularity of [`Partial`] writes: what block devices write.
const SECTOR: usize = 512;

/// The written sectors of a block.
#[derive(Clone, Debug)]
struct Partial {
    buf: Box<[u8]>,
    /// One bit per sector.
    valid: Vec<u64>,
    /// The handle's write count when this block was first written.
    since: u64,
}

impl Partial {
    fn new(bs: usize, since: u64) -> Partial {
        Partial {
            buf: vec![0; bs].into(),
            valid: vec![0; (bs / SECTOR).div_ceil(64)],
            since,
        }
    }

    fn sectors(&self) -> usize {
        self.buf.len() / SECTOR
    }

    fn is_valid(&self, s: usize) -> bool {
        self.valid[s / 64] & (1 << (s % 64)) != 0
    }

    /// Write sector-aligned `data` at `within`.
    fn write(&mut self, within: usize, data: &[u8]) {
        self.buf[within..within + data.len()].copy_from_slice(data);
        for s in within / SECTOR..(within + data.len()) / SECTOR {
            self.valid[s / 64] |= 1 << (s % 64);
        }
    }

    /// Whether every byte of `[from, to)` was written.
    fn covers(&self, from: usize, to: usize) -> bool {
        (from / SECTOR..to.div_ceil(SECTOR)).all(|s| self.is_valid(s))
    }

    /// Copy the written sectors over `base` (the old contents).
    fn overlay(&self, base: &mut [u8]) {
        let n = self.sectors();
        let mut s = 0;
        while s < n {
            if !self.is_valid(s) {
                s += 1;
                continue;
            }
            let start = s;
            while s < n && self.is_valid(s) {
                s += 1;
            }
            base[start * SECTOR..s * SECTOR].copy_from_slice(&self.buf[start * SECTOR..s * SECTOR]);
        }
    }
}

/// Whether a write of `len` bytes at `within` a block is sector-aligned.
fn sector_aligned(within: usize, len: usize) -> bool {
    within.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR)
}

/// Whether an uncommitted block holds a block's worth of memory.
fn holds_bytes(d: &Dirty) -> bool {
    matches!(d, Dirty::Data(_) | Dirty::Partial(_) | Dirty::Merge(_))
}

/// A stored block's bytes: from where this handle appended it (not indexed
/// yet), else through the index.
fn read_stored(
    store: &Store,
    known: &Mutex<HashMap<BlockHash, BlockLoc>>,
    hash: &BlockHash,
    image: &str,
    block: u64,
    via: Via,
) -> Result<Arc<[u8]>> {
    let loc = known.lock().unwrap().get(hash).copied();
    let r = match loc {
        Some(loc) => store.read_record_via(hash, &loc, via),
        None => store.read_block_via(hash, via),
    };
    r.map_err(|e| e.at_block(image, block))
}

impl Merge {
    /// The merged block.
    fn contents(
        &self,
        store: &Store,
        known: &Mutex<HashMap<BlockHash, BlockLoc>>,
        image: &str,
        block: u64,
    ) -> Result<Vec<u8>> {
        let bs = self.partial.buf.len();
        let mut b = match &self.base {
            Base::Zero => vec![0; bs],
            Base::Bytes(d) => d.to_vec(),
            Base::Stored(h) => {
                let mut v = read_stored(store, known, h, image, block, Via::Direct)?.to_vec();
                v.resize(bs, 0);
                v
            }
        };
        self.partial.overlay(&mut b);
        Ok(b)
    }
}

/// Old blocks being read ahead for partial writes, at most.
const PREFETCH_MAX: usize = 256;

/// Threads reading old block contents: ahead of partial writes, and for
/// seal jobs merging them. They wait on the disk, not the CPU, and sleep
/// when idle: a rayon pool's idle threads spin on `sched_yield`, which on a
/// 2-core machine took a third of the CPU under random writes.
const DISK_THREADS: usize = 8;

/// A task for the disk threads.
type DiskTask = Box<dyn FnOnce() + Send>;

/// Queue of the disk threads (started on first use). A task that panics
/// drops what it captured (a merge's result sender: its seal job fails) and
/// the thread goes on.
fn disk_pool() -> &'static std::sync::mpsc::Sender<DiskTask> {
    static Q: std::sync::OnceLock<std::sync::mpsc::Sender<DiskTask>> = std::sync::OnceLock::new();
    Q.get_or_init(|| start_pool("geosync-disk", DISK_THREADS))
}

/// Queue of the threads that sync packs beside a commit's statements (not
/// the disk threads': a sync must not wait behind queued reads).
fn sync_pool() -> &'static std::sync::mpsc::Sender<DiskTask> {
    static Q: std::sync::OnceLock<std::sync::mpsc::Sender<DiskTask>> = std::sync::OnceLock::new();
    Q.get_or_init(|| start_pool("geosync-sync", 2))
}

/// `threads` threads named `name-N` running the tasks sent to the queue.
fn start_pool(name: &'static str, threads: usize) -> std::sync::mpsc::Sender<DiskTask> {
    let (tx, rx) = std::sync::mpsc::channel::<DiskTask>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..threads {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || loop {
                let task = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                match task {
                    Ok(task) => {
                        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(task)) {
                            tracing::error!(pool = name, panic = %panic_message(&*p), "a task panicked");
                        }
                    }
                    Err(_) => return,
                }
            })
            .expect("starting a disk thread");
    }
    tx
}

/// Threads merging, at most, the (rare) partial blocks a handle merges
/// itself when it takes a seal job: those over a merge still running.
const MERGE_THREADS: usize = 8;

/// Where a block's content comes from, for copying ranges by sharing.
#[derive(Clone, Debug)]
pub enum BlockSource {
    /// All zeros.
    Hole,
    /// A stored block.
    Stored(BlockHash),
    /// Uncommitted bytes.
    Bytes(Box<[u8]>),
}

/// A sealed but uncommitted block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Staged {
    /// Becomes a hole.
    Hole,
    /// Becomes this block.
    Block(BlockHash),
}

impl Staged {
    /// The block it makes (`None`: a hole).
    fn hash(self) -> Option<BlockHash> {
        match self {
            Staged::Hole => None,
            Staged::Block(h) => Some(h),
        }
    }
}

/// What a commit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitInfo {
    /// The image version after the commit.
    pub version: u64,
    /// Its stamp (unchanged when there was nothing to commit).
    pub stamp: Option<Stamp>,
    /// Whether a new version was made.
    pub changed: bool,
}

/// A read-write handle on one image. Not shared between threads; the FUSE
/// layer wraps it in a lock.
#[derive(Debug)]
pub struct ImageHandle {
    store: Store,
    row: ImageRow,
    bs: u64,
    size: u64,
    dirty: BTreeMap<u64, Dirty>,
    dirty_bytes: usize,
    dirty_limit: usize,
    /// Blocks a [`SealJob`] is sealing, under the generation it took them
    /// at: read through until the job's result is applied (the dirty set,
    /// where a block may have been written again since, comes first).
    sealing: BTreeMap<u64, (u64, Dirty)>,
    sealing_bytes: usize,
    seal_gen: u64,
    /// Writes so far (ages partial blocks: see [`PARTIAL_GRACE`]).
    writes: u64,
    /// Bumped by every reset: results of jobs taken before it are dropped.
    epoch: u64,
    /// Resets forced by failures (see [`ImageHandle::failures`]).
    failures: u64,
    jobs: Arc<JobState>,
    staged: BTreeMap<u64, Staged>,
    /// Blocks this handle appended and has not committed (not indexed yet).
    /// Shared with its seal jobs, which skip what is already here.
    new_blocks: Arc<Mutex<HashMap<BlockHash, BlockLoc>>>,
    touched: BTreeSet<PackId>,
    trunc_from: Option<u64>,
    /// The stage gate (GC waits): shared with seal jobs in flight.
    guard: Option<Arc<StageGuard>>,
    lease: Option<WriterLease>,
    /// Read-only view of this committed version (a snapshot) instead of the head.
    view: Option<u64>,
    /// Stored blocks shared in by `put_blocks`: the commit checks they still exist.
    shared: HashSet<BlockHash>,
    /// Committed map lookups (valid for `row.version`; kept in step by commit).
    map_cache: Mutex<HashMap<u64, Option<BlockHash>>>,
    /// Data blocks of the effective image, when known (for `st_blocks` and quota).
    alloc: Mutex<Option<u64>>,
    /// Live map rows at a version, as its commit counted them (the next
    /// commit's quota check starts from them instead of a COUNT).
    live: Option<(u64, u64)>,
    /// Bytes of blocks this handle holds in memory (dirty or being sealed)
    /// as last told to the store, whose read cache may use what the mount's
    /// dirty limit leaves over ([`Store::lend_to_read_cache`]).
    held: usize,
    /// Staged blocks a [`Flush`] is committing: read as committed until it
    /// lands (then they are), or fails (then every uncommitted change goes).
    inflight: Option<Inflight>,
}

/// The part of a handle's state a [`Flush`] took.
#[derive(Debug)]
struct Inflight {
    staged: Arc<BTreeMap<u64, Staged>>,
    /// The image's size in the flushed version (grown by writes, or as committed).
    size: u64,
    /// The records it indexes (dropped from `new_blocks` when it lands).
    indexed: Vec<BlockHash>,
    outcome: Arc<FlushOutcome>,
}

/// Where a [`Flush`] leaves its result for the handle.
#[derive(Debug, Default)]
struct FlushOutcome {
    result: Mutex<Option<Result<Committed>>>,
    done: Condvar,
}

impl FlushOutcome {
    fn set(&self, r: Result<Committed>) {
        *self.result.lock().unwrap() = Some(r);
        self.done.notify_all();
    }

    fn wait(&self) -> Result<Committed> {
        let mut r = self.result.lock().unwrap();
        loop {
            if let Some(r) = r.take() {
                return r;
            }
            r = self.done.wait(r).unwrap();
        }
    }
}

/// The sealed part of a handle's changes, committed as a new version without
/// holding the handle: writes, seal jobs and reads go on meanwhile (see
/// [`ImageHandle::begin_flush`]). Run it with [`Flush::run`], then call
/// [`ImageHandle::land_flush`].
#[derive(Debug)]
pub struct Flush {
    store: Store,
    image_id: i64,
    name: String,
    base_version: u64,
    size: u64,
    staged: Arc<BTreeMap<u64, Staged>>,
    new_blocks: HashMap<BlockHash, BlockLoc>,
    shared: HashSet<BlockHash>,
    packs: Vec<PackId>,
    live_before: Option<u64>,
    outcome: Arc<FlushOutcome>,
    ran: bool,
}

impl Flush {
    /// Make the records durable and commit the version (the handle picks
    /// up the result).
    pub fn run(mut self) -> FlushTicket {
        self.ran = true;
        let t0 = std::time::Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<Committed> {
            sync_and_commit(
                &self.store,
                self.packs.clone(),
                &CommitRequest {
                    image_id: self.image_id,
                    name: &self.name,
                    base_version: self.base_version,
                    size: self.size,
                    trunc_from: None,
                    staged: &self.staged,
                    new_blocks: &self.new_blocks,
                    shared: &self.shared,
                    live_before: self.live_before,
                },
            )
        }))
        .unwrap_or_else(|p| {
            Err(Error::Internal(format!(
                "a flush panicked: {}",
                panic_message(&*p)
            )))
        });
        if let Ok(c) = &r {
            tracing::debug!(
                image = %self.name,
                version = c.version,
                blocks = self.staged.len(),
                us = t0.elapsed().as_micros() as u64,
                "flushed"
            );
        }
        self.outcome.set(r);
        FlushTicket(self.outcome.clone())
    }
}

/// Names a [`Flush`] that ran, for [`ImageHandle::land_flush`].
#[derive(Debug)]
pub struct FlushTicket(Arc<FlushOutcome>);

impl Drop for Flush {
    /// A flush dropped unrun fails: its handle drops its uncommitted changes
    /// (it does not wait forever).
    fn drop(&mut self) {
        if !self.ran {
            self.outcome.set(Err(Error::Internal(format!(
                "a flush of {} was dropped unrun",
                self.name
            ))));
        }
    }
}

impl Drop for ImageHandle {
    fn drop(&mut self) {
        // A flush's failure dropped what was uncommitted: so does this drop.
        let _ = self.settle();
        // Jobs in flight hold pins on the packs they wrote: wait, then drop them.
        for (_, r) in self.jobs.wait_all() {
            if let Ok(out) = r {
                self.store.unpin_packs(out.pinned);
            }
        }
        self.store.unpin_packs(std::mem::take(&mut self.touched));
        self.store.hold_memory(self.held, 0); // (the jobs' blocks are gone too)
    }
}

/// Seal jobs of one handle: how many are running, and results not yet applied.
#[derive(Debug, Default)]
struct JobState {
    state: Mutex<(usize, Vec<JobResult>)>,
    done: Condvar,
}

impl JobState {
    fn start(&self) {
        self.state.lock().unwrap().0 += 1;
    }

    fn finish(&self, r: JobResult) {
        let mut st = self.state.lock().unwrap();
        st.0 -= 1;
        st.1.push(r);
        self.done.notify_all();
    }

    /// Jobs taken and not finished.
    fn running(&self) -> usize {
        self.state.lock().unwrap().0
    }

    /// Results so far (jobs may still run).
    fn take(&self) -> Vec<JobResult> {
        std::mem::take(&mut self.state.lock().unwrap().1)
    }

    /// Wait until a result waits to be applied, or no job runs.
    fn wait_any(&self) {
        let mut st = self.state.lock().unwrap();
        while st.0 > 0 && st.1.is_empty() {
            st = self.done.wait(st).unwrap();
        }
    }

    /// Wait until no job runs; every result.
    fn wait_all(&self) -> Vec<JobResult> {
        let mut st = self.state.lock().unwrap();
        while st.0 > 0 {
            st = self.done.wait(st).unwrap();
        }
        std::mem::take(&mut st.1)
    }
}

/// Waits for an [`ImageHandle`]'s seal jobs.
#[derive(Debug, Clone)]
pub struct JobWaiter(Arc<JobState>);

impl JobWaiter {
    /// Until a job's result waits to be applied, or none runs.
    pub fn wait(&self) {
        self.0.wait_any()
    }
}

/// A sealed block: its number, the generation it was taken at, and its
/// name (`None`: a hole).
type Named = (u64, u64, Option<BlockHash>);

/// A job's result, with the handle's epoch when it was taken.
type JobResult = (u64, Result<SealOutput>);

/// What a seal job did: each block's name (`None`: a hole) under the
/// generation it was taken at, the records it appended, and the packs it
/// pinned (the handle takes the pins over, or releases them).
#[derive(Debug)]
struct SealOutput {
    blocks: Vec<Named>,
    appended: Vec<(BlockHash, BlockLoc)>,
    pinned: Vec<PackId>,
}

/// Dirty blocks taken from an [`ImageHandle`] to be hashed, compressed and
/// appended without holding the handle: the mount runs jobs while other
/// requests go on writing. Nothing becomes visible until the handle applies
/// the result (at its next change or commit; a commit waits for its jobs).
#[derive(Debug)]
pub struct SealJob {
    store: Store,
    image: String,
    epoch: u64,
    blocks: Vec<(u64, u64, Dirty)>,
    ran: bool,
    known: Arc<Mutex<HashMap<BlockHash, BlockLoc>>>,
    jobs: Arc<JobState>,
    _gate: Arc<StageGuard>,
}

impl SealJob {
    /// Do the work; the handle picks up the result.
    pub fn run(mut self) {
        self.work();
    }

    fn work(&mut self) {
        self.ran = true;
        let blocks = std::mem::take(&mut self.blocks);
        // A panic must still finish the job (the handle waits for every job)
        // and give back the pins its appends took.
        let mut pinned = Vec::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            seal_blocks(&self.store, &self.known, &self.image, blocks, &mut pinned)
        }))
        .unwrap_or_else(|p| {
            self.store.unpin_packs(std::mem::take(&mut pinned));
            let msg = panic_message(&*p);
            tracing::error!(panic = %msg, "a seal job panicked");
            Err(Error::Internal(format!("a seal job panicked: {msg}")))
        });
        self.jobs.finish((self.epoch, r));
    }
}

impl Drop for SealJob {
    /// A job dropped unrun still runs: the handle waits for it, and its
    /// blocks are only readable until its result is applied.
    fn drop(&mut self) {
        if !self.ran {
            self.work();
        }
    }
}

/// Commit `req` once `packs` are synced: the sync runs on a sync thread
/// while the transaction's statements run, and the transaction commits only
/// after it succeeded (no row may name a record that is not durable). Saves
/// one of the two waits of every commit; on a sync error nothing commits.
fn sync_and_commit(store: &Store, packs: Vec<PackId>, req: &CommitRequest<'_>) -> Result<Committed> {
    let (tx, rx) = std::sync::mpsc::channel();
    let s = store.clone();
    let task: DiskTask = Box::new(move || {
        let _ = tx.send(s.sync_packs(packs));
    });
    if let Err(std::sync::mpsc::SendError(task)) = sync_pool().send(task) {
        task(); // no threads (cannot happen once started): here
    }
    store.apply_commit(req, || {
        rx.recv()
            .map_err(|_| Error::Internal("syncing packs for a commit panicked".into()))?
    })
}

/// A block's name and whether it looks worth compressing (`None`: all zeros).
type BlockName = (Option<BlockHash>, bool);

/// Blocks (number, generation, contents) with the names of those merged.
type Merged = (Vec<(u64, u64, Dirty)>, Vec<Option<BlockName>>);

/// Name a block's contents: its hash (`None` for zeros) and whether to try
/// compressing it.
fn name_data(data: &[u8], compress: bool) -> BlockName {
    if is_zero(data) {
        (None, false)
    } else {
        (
            Some(pack::hash_block(data)),
            compress && pack::looks_compressible(data),
        )
    }
}

/// Merge partial blocks with their old contents, read on the disk threads
/// (one task per block: no thread is started for it, and a block whose
/// prefetch is queued ahead of it finds it done). Each merged block is
/// named there too, while it is in that CPU's cache and beside the other
/// merges' reads (hashing them afterwards, one by one, was ~0.3 ms of a
/// random-write `fsync`'s commit). Returns the blocks and, per block, the
/// name of those merged.
fn merge_blocks(
    store: &Store,
    known: &Arc<Mutex<HashMap<BlockHash, BlockLoc>>>,
    image: &str,
    mut blocks: Vec<(u64, u64, Dirty)>,
    compress: bool,
) -> Result<Merged> {
    let mut names: Vec<Option<BlockName>> = vec![None; blocks.len()];
    let todo: Vec<(usize, Arc<Merge>)> = blocks
        .iter()
        .enumerate()
        .filter_map(|(i, (_, _, d))| match d {
            Dirty::Merge(m) => Some((i, m.clone())),
            _ => None,
        })
        .collect();
    if todo.len() <= 1 {
        // One read: no hand-off.
        for (i, m) in todo {
            let data = m.contents(store, known, image, blocks[i].0)?;
            names[i] = Some(name_data(&data, compress));
            blocks[i].2 = Dirty::Data(data.into());
        }
        return Ok((blocks, names));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let n = todo.len();
    for (i, m) in todo {
        let (store, known, image, tx, block) = (
            store.clone(),
            known.clone(),
            image.to_string(),
            tx.clone(),
            blocks[i].0,
        );
        let task: DiskTask = Box::new(move || {
            let r = m.contents(&store, &known, &image, block).map(|data| {
                let name = name_data(&data, compress);
                (data, name)
            });
            let _ = tx.send((i, r));
        });
        if let Err(std::sync::mpsc::SendError(task)) = disk_pool().send(task) {
            task(); // no disk threads (cannot happen once started): here
        }
    }
    drop(tx);
    for _ in 0..n {
        let (i, m) = rx
            .recv()
            .map_err(|_| Error::Internal(format!("merging a block of {image} panicked")))?;
        let (data, name) = m?;
        names[i] = Some(name);
        blocks[i].2 = Dirty::Data(data.into());
    }
    Ok((blocks, names))
}

/// `f` over `items` on up to `threads` scoped threads (4 items or more
/// each), in order. For work that waits on the disk: rayon's idle workers
/// spin, these exit.
fn parallel_map<I: Sync, T: Send>(items: &[I], threads: usize, f: impl Fn(&I) -> T + Sync) -> Vec<T> {
    let threads = items.len().div_ceil(4).min(threads);
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let parts: Vec<Vec<(usize, T)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut got = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= items.len() {
                            return got;
                        }
                        got.push((i, f(&items[i])));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut out: Vec<Option<T>> = (0..items.len()).map(|_| None).collect();
    for (i, r) in parts.into_iter().flatten() {
        out[i] = Some(r);
    }
    out.into_iter().map(|r| r.expect("every item mapped")).collect()
}

/// Hash the blocks, drop zeros, and compress and append those neither the
/// store nor `known` has (in parallel). Partial blocks are merged first.
/// The packs appended to are pinned in `pinned` (the caller's, so a panic
/// does not lose them), and handed to the output.
fn seal_blocks(
    store: &Store,
    known: &Arc<Mutex<HashMap<BlockHash, BlockLoc>>>,
    image: &str,
    blocks: Vec<(u64, u64, Dirty)>,
    pinned: &mut Vec<PackId>,
) -> Result<SealOutput> {
    let t0 = std::time::Instant::now();
    let compress = matches!(store.config().compression, pack::Compression::Zstd(_));
    let (blocks, names) = merge_blocks(store, known, image, blocks, compress)?;
    let t_merge = t0.elapsed();
    let blocks = &blocks[..];
    // Hash, and judge compressibility while the block is in the CPU cache.
    // On a pool thread (a seal job), one job's blocks are done here: a
    // parallel iterator there lets the waiting thread steal a whole other
    // job, append included, so a job's hashing waited for another's disk
    // write (p90 85 ms for 8 MiB). Parallelism comes from jobs side by side.
    let on_pool = rayon::current_thread_index().is_some();
    let name_one = |((block, gen, d), pre): (&(u64, u64, Dirty), &Option<BlockName>)| {
        let (h, worth) = match (d, pre) {
            (_, Some(named)) => *named, // merged, and named there
            (Dirty::Zero, _) => (None, false),
            (Dirty::Data(data), _) => name_data(data, compress),
            (Dirty::Ref(h), _) => (Some(*h), false), // already stored, kept by the gate
            (Dirty::Partial(_) | Dirty::Merge(_), _) => unreachable!("partial blocks are merged first"),
        };
        ((*block, *gen, h), worth)
    };
    let (named, worth): (Vec<Named>, Vec<bool>) = if on_pool {
        blocks.iter().zip(&names).map(name_one).unzip()
    } else {
        blocks.par_iter().zip(&names).map(name_one).unzip()
    };
    let mut to_seal: Vec<(BlockHash, &Arc<[u8]>, bool)> = Vec::new();
    {
        let known = known.lock().unwrap();
        let mut seen: HashSet<BlockHash> = HashSet::new();
        // (A block has a name from `merge_blocks` only if it was merged.)
        for ((((_, _, h), worth), (_, _, d)), pre) in named.iter().zip(&worth).zip(blocks).zip(&names) {
            if let (Some(h), Dirty::Data(data)) = (h, d) {
                if pre.is_some() {
                    // A block written in part is likely written in part
                    // again soon (a journal, an inode table): its next
                    // merge then needs no disk read, in the fsync's path.
                    store.cache_block(*h, data.clone());
                }
                if !known.contains_key(h) && seen.insert(*h) {
                    to_seal.push((*h, data, *worth));
                }
            }
        }
    }
    let t_hash = t0.elapsed();
    let absent: HashSet<BlockHash> = store
        .lacking(&to_seal.iter().map(|(h, _, _)| *h).collect::<Vec<_>>())?
        .into_iter()
        .collect();
    let lacking: Vec<(BlockHash, &Arc<[u8]>, bool)> = to_seal
        .into_iter()
        .filter(|(h, _, _)| absent.contains(h))
        .collect();
    let mut out = SealOutput {
        blocks: named,
        appended: Vec::new(),
        pinned: Vec::new(),
    };
    if lacking.is_empty() {
        return Ok(out);
    }
    let t_lack = t0.elapsed();
    let compression = store.config().compression;
    let seal_one = |(h, data, worth): &(BlockHash, &Arc<[u8]>, bool)| {
        pack::seal_shared(data, *h, compression, Some(*worth))
    };
    let sealed: Vec<pack::Sealed> = if on_pool {
        lacking.iter().map(seal_one).collect()
    } else {
        lacking.par_iter().map(seal_one).collect()
    };
    let t_comp = t0.elapsed();
    let r = store.append_pinned(&sealed, pinned);
    tracing::trace!(
        blocks = blocks.len(),
        merge_us = t_merge.as_micros() as u64,
        hash_us = (t_hash - t_merge).as_micros() as u64,
        lack_us = (t_lack - t_hash).as_micros() as u64,
        comp_us = (t_comp - t_lack).as_micros() as u64,
        append_us = (t0.elapsed() - t_comp).as_micros() as u64,
        "sealed"
    );
    let locs = r?; // (a failed append gave its pins back)
    out.appended = sealed.iter().map(|s| s.hash).zip(locs).collect();
    out.pinned = std::mem::take(pinned);
    Ok(out)
}

/// Entries of the committed-map cache before it is cleared (bounds memory).
const MAP_CACHE_MAX: usize = 1 << 20;

impl ImageHandle {
    pub(crate) fn new(store: Store, row: ImageRow) -> Self {
        ImageHandle {
            bs: store.block_size(),
            size: row.size,
            store,
            row,
            dirty: BTreeMap::new(),
            dirty_bytes: 0,
            dirty_limit: DEFAULT_DIRTY_LIMIT,
            sealing: BTreeMap::new(),
            sealing_bytes: 0,
            seal_gen: 0,
            writes: 0,
            epoch: 0,
            failures: 0,
            jobs: Arc::default(),
            staged: BTreeMap::new(),
            new_blocks: Arc::default(),
            touched: BTreeSet::new(),
            trunc_from: None,
            guard: None,
            lease: None,
            view: None,
            shared: HashSet::new(),
            map_cache: Mutex::new(HashMap::new()),
            alloc: Mutex::new(None),
            live: None,
            held: 0,
            inflight: None,
        }
    }

    /// A read-only handle on a committed version (a snapshot).
    pub(crate) fn new_view(store: Store, mut row: ImageRow, version: u64, size: u64) -> Self {
        row.version = version;
        row.size = size;
        let mut h = Self::new(store, row);
        h.view = Some(version);
        h
    }

    /// Whether this handle is a read-only view of a snapshot.
    pub fn is_read_only(&self) -> bool {
        self.view.is_some()
    }

    fn check_writable(&self) -> Result<()> {
        match self.view {
            Some(_) => Err(Error::ReadOnly(format!("{} is a snapshot", self.row.name))),
            None => self.store.check_writable(),
        }
    }

    /// Become the image's one writer now (otherwise done at the first change;
    /// kept until the handle is dropped). `ImageBusy` if another handle writes it.
    pub fn acquire(&mut self) -> Result<()> {
        self.ensure_lease()
    }

    /// Give up the right to write if nothing is uncommitted (the next write
    /// or [`ImageHandle::acquire`] takes it again); kept otherwise.
    pub fn release_lease(&mut self) {
        if !self.is_dirty() && self.inflight.is_none() {
            self.lease = None;
        }
    }

    fn ensure_lease(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.lease.is_none() {
            let lease = self.store.acquire_writer(self.row.id, &self.row.name)?;
            if !self.is_dirty() {
                // Nothing pending: start from the head as it is now (another
                // writer may have committed since this handle was opened).
                let row = self.store.image_row_by_id(self.row.id, &self.row.name)?;
                if row.version != self.row.version {
                    self.map_cache.lock().unwrap().clear();
                    *self.alloc.lock().unwrap() = None;
                }
                self.row = row;
                self.size = self.row.size;
            }
            self.lease = Some(lease);
        }
        Ok(())
    }

    /// Image name.
    pub fn name(&self) -> &str {
        &self.row.name
    }

    /// Current logical size (including uncommitted changes).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The committed version this handle is based on.
    pub fn version(&self) -> u64 {
        self.row.version
    }

    /// Whether there are uncommitted changes.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
            || !self.sealing.is_empty()
            || !self.staged.is_empty()
            || self.inflight.is_some()
            || self.size != self.row.size
            || self.trunc_from.is_some()
    }

    /// Whether this handle holds the stage gate (from its first sealed or
    /// shared block until its commit ends).
    pub fn in_stage_gate(&self) -> bool {
        self.guard.is_some()
    }

    /// Bound the dirty set (bytes of whole blocks); past it, writes seal.
    pub fn set_dirty_limit(&mut self, bytes: usize) {
        self.dirty_limit = bytes.max(self.bs as usize);
    }

    fn nblocks(&self) -> u64 {
        self.size.div_ceil(self.bs)
    }

    // -------------------------------------------------------------- reading

    fn committed_hash(&self, block: u64) -> Result<Option<BlockHash>> {
        if let Some(st) = self.inflight.as_ref().and_then(|f| f.staged.get(&block)) {
            return Ok(st.hash());
        }
        if let Some(h) = self.map_cache.lock().unwrap().get(&block) {
            return Ok(*h);
        }
        let h = {
            let db = self.store.db();
            match self.view {
                None => db
                    .prepare_cached("SELECT hash FROM map WHERE image = ?1 AND block = ?2 AND died IS NULL")?
                    .query_row(rusqlite::params![self.row.id, block as i64], |r| {
                        meta::hash_from_row(r, 0)
                    })
                    .optional()?,
                Some(v) => db
                    .prepare_cached(
                        "SELECT hash FROM map WHERE image = ?1 AND block = ?2 AND born <= ?3
                           AND (died IS NULL OR died > ?3)",
                    )?
                    .query_row(rusqlite::params![self.row.id, block as i64, v as i64], |r| {
                        meta::hash_from_row(r, 0)
                    })
                    .optional()?,
            }
        };
        let mut c = self.map_cache.lock().unwrap();
        if c.len() >= MAP_CACHE_MAX {
            c.clear();
        }
        c.insert(block, h);
        Ok(h)
    }

    /// The block's effective content source, ignoring the dirty set.
    fn base_state(&self, block: u64) -> Result<Option<BlockHash>> {
        if let Some(s) = self.staged.get(&block) {
            return Ok(s.hash());
        }
        if self.trunc_from.is_some_and(|t| block >= t) || block >= self.nblocks() {
            return Ok(None);
        }
        self.committed_hash(block)
    }

    /// The uncommitted content of a block: the dirty set, then blocks being sealed.
    fn overlay(&self, block: u64) -> Option<&Dirty> {
        self.dirty
            .get(&block)
            .or_else(|| self.sealing.get(&block).map(|(_, d)| d))
    }

    fn read_hash(&self, hash: &BlockHash, block: u64) -> Result<Vec<u8>> {
        Ok(self.read_shared(hash, block)?.to_vec())
    }

    /// A block's bytes, shared with the read cache (no copy).
    fn read_shared(&self, hash: &BlockHash, block: u64) -> Result<Arc<[u8]>> {
        read_stored(
            &self.store,
            &self.new_blocks,
            hash,
            &self.row.name,
            block,
            Via::Proven,
        )
    }

    /// Bytes `within..within + out.len()` of the stored block `hash` into
    /// `out` (zeros past its end): only the pieces holding them when the
    /// store can ([`Store::read_part`]), else the whole block.
    fn read_stored_part(&self, hash: &BlockHash, block: u64, within: usize, out: &mut [u8]) -> Result<()> {
        // Blocks this handle sealed are not indexed yet: read from where it put them.
        if !self.new_blocks.lock().unwrap().contains_key(hash) && self.store.read_part(hash, within, out) {
            return Ok(());
        }
        crate::store::copy_from(&self.read_shared(hash, block)?, within, out);
        Ok(())
    }

    /// Start reading a stored block's old contents into the read cache in
    /// the background, so merging a partial write later finds it there.
    fn prefetch(&self, block: u64) -> Result<()> {
        if self.sealing.contains_key(&block) {
            return Ok(()); // in memory
        }
        if let Some(h) = self.base_state(block)? {
            // At most PREFETCH_MAX queued: past that the merge reads what is missing.
            static QUEUED: AtomicUsize = AtomicUsize::new(0);
            if self.new_blocks.lock().unwrap().contains_key(&h) {
                return Ok(()); // sealed by this handle: not in the read cache's path
            }
            if QUEUED.fetch_add(1, Ordering::Relaxed) < PREFETCH_MAX {
                let store = self.store.clone();
                let job = Box::new(move || {
                    let _ = store.read_block_via(&h, Via::Direct); // an error shows when the block is merged
                    QUEUED.fetch_sub(1, Ordering::Relaxed);
                });
                if disk_pool().send(job).is_err() {
                    QUEUED.fetch_sub(1, Ordering::Relaxed);
                }
            } else {
                QUEUED.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Full contents of a block (zeros for a hole).
    fn block_contents(&self, block: u64) -> Result<Vec<u8>> {
        match self.dirty.get(&block) {
            Some(Dirty::Partial(p)) => {
                let mut b = self.contents_below_dirty(block)?;
                p.overlay(&mut b);
                Ok(b)
            }
            Some(d) => self.dirty_contents(d, block),
            None => self.contents_below_dirty(block),
        }
    }

    fn dirty_contents(&self, d: &Dirty, block: u64) -> Result<Vec<u8>> {
        match d {
            Dirty::Zero => Ok(vec![0; self.bs as usize]),
            Dirty::Data(d) => Ok(d.to_vec()),
            Dirty::Ref(h) => {
                let mut v = self.read_hash(h, block)?;
                v.resize(self.bs as usize, 0);
                Ok(v)
            }
            Dirty::Merge(m) => m.contents(&self.store, &self.new_blocks, &self.row.name, block),
            Dirty::Partial(_) => unreachable!("partial blocks are only in the dirty set"),
        }
    }

    /// Contents of a block ignoring the dirty set: being sealed, staged or
    /// committed.
    fn contents_below_dirty(&self, block: u64) -> Result<Vec<u8>> {
        if let Some((_, d)) = self.sealing.get(&block) {
            return self.dirty_contents(d, block);
        }
        match self.base_state(block)? {
            None => Ok(vec![0; self.bs as usize]),
            Some(h) => {
                let mut v = self.read_hash(&h, block)?;
                v.resize(self.bs as usize, 0);
                Ok(v)
            }
        }
    }

    /// Read at `offset`; returns the bytes read (short at the end of the image).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(self.size - offset) as usize;
        let filled = if len as u64 > self.bs {
            self.read_stored_into(offset, &mut buf[..len])?
        } else {
            Vec::new()
        };
        let first = offset / self.bs;
        let mut done = 0;
        while done < len {
            let pos = offset + done as u64;
            let block = pos / self.bs;
            let within = (pos % self.bs) as usize;
            let n = (self.bs as usize - within).min(len - done);
            if filled.get((block - first) as usize) == Some(&true) {
                done += n;
                continue;
            }
            let out = &mut buf[done..done + n];
            match self.overlay(block) {
                Some(Dirty::Partial(p)) if p.covers(within, within + n) => {
                    out.copy_from_slice(&p.buf[within..within + n])
                }
                Some(Dirty::Merge(m)) if m.partial.covers(within, within + n) => {
                    out.copy_from_slice(&m.partial.buf[within..within + n])
                }
                Some(Dirty::Partial(_) | Dirty::Merge(_)) => {
                    out.copy_from_slice(&self.block_contents(block)?[within..within + n])
                }
                Some(Dirty::Data(d)) => out.copy_from_slice(&d[within..within + n]),
                Some(Dirty::Zero) => out.fill(0),
                Some(Dirty::Ref(h)) => self.read_stored_part(h, block, within, out)?,
                None => match self.base_state(block)? {
                    None => out.fill(0),
                    Some(h) => self.read_stored_part(&h, block, within, out)?,
                },
            }
            done += n;
        }
        Ok(len)
    }

    /// Read the stored blocks under `offset..offset + out.len()` that the
    /// read cache lacks straight into `out`, runs of records lying together
    /// with one pack read each ([`Store::read_blocks_into`]). Returns, per
    /// block from the first, whether it was filled (the rest are read one by
    /// one: dirty ones, holes, cached ones, and any that failed).
    fn read_stored_into(&self, offset: u64, out: &mut [u8]) -> Result<Vec<bool>> {
        let first = offset / self.bs;
        let blocks = first..(offset + out.len() as u64).div_ceil(self.bs);
        let mut wanted = Vec::with_capacity(blocks.clone().count());
        let mut which = Vec::with_capacity(wanted.capacity());
        let known = self.new_blocks.lock().unwrap();
        for b in blocks.clone() {
            let h = match self.overlay(b) {
                Some(Dirty::Ref(h)) => Some(*h),
                Some(_) => None,
                None => self.base_state(b)?,
            };
            // Blocks sealed by this handle are read from where it put them.
            let Some(h) = h.filter(|h| !known.contains_key(h)) else {
                continue;
            };
            let pos = (b * self.bs).max(offset);
            let within = (pos % self.bs) as usize;
            let at = (pos - offset) as usize;
            let n = (self.bs as usize - within).min(out.len() - at);
            wanted.push((h, within, at, n));
            which.push(b - first);
        }
        drop(known);
        let mut filled = vec![false; blocks.count()];
        for (i, ok) in self.store.read_blocks_into(&wanted, out).into_iter().enumerate() {
            filled[which[i] as usize] = ok;
        }
        Ok(filled)
    }

    // -------------------------------------------------------------- holes

    /// Whether a block holds data (a non-zero byte).
    fn is_data(&self, block: u64) -> Result<bool> {
        if block >= self.nblocks() {
            return Ok(false);
        }
        Ok(match self.overlay(block) {
            Some(Dirty::Zero) => false,
            Some(Dirty::Data(d)) => !is_zero(d),
            Some(Dirty::Ref(_) | Dirty::Partial(_) | Dirty::Merge(_)) => true,
            None => self.base_state(block)?.is_some(),
        })
    }

    /// First data block at or after `from`.
    fn next_data_block(&self, mut from: u64) -> Result<Option<u64>> {
        let n = self.nblocks();
        loop {
            if from >= n {
                return Ok(None);
            }
            let limit = self.trunc_from.unwrap_or(u64::MAX).min(n);
            let db_next: Option<u64> = if from < limit {
                let db = self.store.db();
                match self.view {
                    None => db
                        .prepare_cached(
                            "SELECT block FROM map WHERE image = ?1 AND died IS NULL AND block >= ?2
                               AND block < ?3 ORDER BY block LIMIT 1",
                        )?
                        .query_row(rusqlite::params![self.row.id, from as i64, limit as i64], |r| {
                            r.get::<_, i64>(0)
                        })
                        .optional()?,
                    Some(v) => db
                        .prepare_cached(
                            "SELECT block FROM map WHERE image = ?1 AND block >= ?2 AND block < ?3
                               AND born <= ?4 AND (died IS NULL OR died > ?4) ORDER BY block LIMIT 1",
                        )?
                        .query_row(
                            rusqlite::params![self.row.id, from as i64, limit as i64, v as i64],
                            |r| r.get::<_, i64>(0),
                        )
                        .optional()?,
                }
                .map(|b| b as u64)
            } else {
                None
            };
            let ov_next = self
                .dirty
                .range(from..)
                .map(|(b, _)| *b)
                .next()
                .into_iter()
                .chain(self.sealing.range(from..).map(|(b, _)| *b).next())
                .chain(self.staged.range(from..).map(|(b, _)| *b).next())
                .chain(
                    self.inflight
                        .iter()
                        .filter_map(|f| f.staged.range(from..).map(|(b, _)| *b).next()),
                )
                .min();
            let cand = match (db_next, ov_next) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(c) => c,
                    None => return Ok(None),
                },
            };
            if cand >= n {
                return Ok(None);
            }
            if self.is_data(cand)? {
                return Ok(Some(cand));
            }
            from = cand + 1;
        }
    }

    /// `lseek(SEEK_DATA)`: the first data offset at or after `offset`, or
    /// `None` (ENXIO) when only holes follow.
    pub fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        if offset >= self.size {
            return Ok(None);
        }
        let b = offset / self.bs;
        Ok(self
            .next_data_block(b)?
            .map(|d| if d == b { offset } else { d * self.bs }))
    }

    /// `lseek(SEEK_HOLE)`: the first hole offset at or after `offset` (the
    /// end of the image counts as a hole), or `None` past the end.
    pub fn seek_hole(&self, offset: u64) -> Result<Option<u64>> {
        if offset >= self.size {
            return Ok(None);
        }
        let mut b = offset / self.bs;
        let n = self.nblocks();
        while b < n && self.is_data(b)? {
            b += 1;
        }
        Ok(Some((b * self.bs).clamp(offset, self.size)))
    }

    /// Data extents `[start, end)` in bytes, ascending.
    pub fn data_extents(&self) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(start) = self.seek_data(pos)? {
            let end = self.seek_hole(start)?.unwrap_or(self.size);
            out.push((start, end));
            pos = end;
        }
        Ok(out)
    }

    /// Blocks holding data (committed and uncommitted), for `st_blocks`.
    pub fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.alloc_blocks()? * self.bs)
    }

    /// Data blocks of the effective image: counted once (one indexed COUNT plus
    /// the overlay), then kept up to date by every change.
    fn alloc_blocks(&self) -> Result<u64> {
        if let Some(n) = *self.alloc.lock().unwrap() {
            return Ok(n);
        }
        // The count below may see a flush's rows or not, racing it: counted
        // before one starts, then kept up to date.
        debug_assert!(self.inflight.is_none(), "allocation counted during a flush");
        let limit = self
            .trunc_from
            .unwrap_or(u64::MAX)
            .min(self.row.size.div_ceil(self.bs));
        let committed: i64 = {
            let db = self.store.db();
            match self.view {
                None => db.query_row(
                    "SELECT COUNT(*) FROM map WHERE image = ?1 AND died IS NULL AND block < ?2",
                    rusqlite::params![self.row.id, limit.min(i64::MAX as u64) as i64],
                    |r| r.get(0),
                )?,
                Some(v) => db.query_row(
                    "SELECT COUNT(*) FROM map WHERE image = ?1 AND block < ?2 AND born <= ?3
                       AND (died IS NULL OR died > ?3)",
                    rusqlite::params![self.row.id, limit.min(i64::MAX as u64) as i64, v as i64],
                    |r| r.get(0),
                )?,
            }
        };
        let mut n = committed;
        let overlay: BTreeSet<u64> = self
            .dirty
            .keys()
            .chain(self.sealing.keys())
            .chain(self.staged.keys())
            .copied()
            .collect();
        for b in overlay {
            let was = b < limit && self.committed_hash(b)?.is_some();
            n += self.is_data(b)? as i64 - was as i64;
        }
        let n = n.max(0) as u64;
        *self.alloc.lock().unwrap() = Some(n);
        Ok(n)
    }

    /// Quota check before a change that may turn `new_data` holes into data.
    fn check_quota(&self, blocks: impl Iterator<Item = u64>) -> Result<()> {
        let Some(quota) = self.row.quota else {
            return Ok(());
        };
        let mut grow = 0;
        for b in blocks {
            grow += !self.is_data(b)? as u64;
        }
        if grow > 0 && (self.alloc_blocks()? + grow) * self.bs > quota {
            return Err(Error::QuotaExceeded {
                image: self.row.name.clone(),
                quota,
            });
        }
        Ok(())
    }

    // -------------------------------------------------------------- writing

    fn alloc_known(&self) -> bool {
        self.alloc.lock().unwrap().is_some()
    }

    fn alloc_adjust(&self, was: bool, now: bool) {
        if let Some(n) = self.alloc.lock().unwrap().as_mut() {
            *n = (*n + now as u64).saturating_sub(was as u64);
        }
    }

    fn set_dirty(&mut self, block: u64, d: Dirty) -> Result<()> {
        if self.alloc_known() {
            let was = self.is_data(block)?;
            let now = match &d {
                Dirty::Zero => false,
                Dirty::Data(b) => !is_zero(b),
                Dirty::Ref(_) | Dirty::Partial(_) | Dirty::Merge(_) => true,
            };
            self.alloc_adjust(was, now);
        }
        let add = holds_bytes(&d) as usize * self.bs as usize;
        if self.dirty.insert(block, d).as_ref().is_some_and(holds_bytes) {
            self.dirty_bytes -= self.bs as usize;
        }
        self.dirty_bytes += add;
        self.account_memory();
        Ok(())
    }

    /// Bytes of whole blocks held in memory (dirty, or being sealed).
    pub fn dirty_bytes(&self) -> usize {
        self.dirty_bytes + self.sealing_bytes
    }

    /// Tell the store what this handle now holds in memory, where that
    /// changes (a block made dirty, taken by a job, applied, dropped): the
    /// read cache shrinks as the dirty set grows, and grows back as it is
    /// sealed and committed.
    fn account_memory(&mut self) {
        let now = self.dirty_bytes + self.sealing_bytes;
        if now != self.held {
            self.store.hold_memory(self.held, now);
            self.held = now;
        }
    }

    /// Bytes of uncommitted blocks, sealed or not: what the next commit writes.
    pub fn pending_bytes(&self) -> usize {
        self.dirty_bytes + self.sealing_bytes + self.staged.len() * self.bs as usize
    }

    /// Write `data` at `offset`, growing the image if it ends past the end.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.ensure_lease()?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| Error::InvalidArgument("write past the largest offset".into()))?;
        if data.is_empty() {
            return Ok(());
        }
        self.check_quota(offset / self.bs..end.div_ceil(self.bs))?;
        if end > self.size {
            self.size = end;
        }
        self.writes += 1;
        let mut done = 0;
        while done < data.len() {
            let pos = offset + done as u64;
            let block = pos / self.bs;
            let within = (pos % self.bs) as usize;
            let n = (self.bs as usize - within).min(data.len() - done);
            let part = &data[done..done + n];
            done += n;
            if n == self.bs as usize {
                self.set_dirty(block, Dirty::Data(part.into()))?;
                continue;
            }
            // A partial write into a dirty block changes it in place (unless a
            // seal job holds it: then it is copied first).
            if let Some(Dirty::Data(d)) = self.dirty.get_mut(&block) {
                let known = self.alloc.lock().unwrap().is_some();
                let was = known && !is_zero(d);
                let b = Arc::make_mut(d);
                b[within..within + n].copy_from_slice(part);
                if known {
                    let now = !is_zero(b);
                    self.alloc_adjust(was, now);
                }
                continue;
            }
            // Sector-aligned writes do not read the old contents now.
            let aligned = sector_aligned(within, n);
            if let Some(Dirty::Partial(p)) = self.dirty.get_mut(&block) {
                if aligned {
                    p.write(within, part);
                    if p.covers(0, self.bs as usize) {
                        // Complete: no read needed at all.
                        let buf = std::mem::take(&mut p.buf);
                        self.alloc_adjust(true, !is_zero(&buf));
                        self.dirty.insert(block, Dirty::Data(buf.into()));
                        continue;
                    }
                    if !is_zero(&p.buf) {
                        continue;
                    }
                    // All that was written is zeros: merge, it may be a hole now.
                }
            } else if aligned && !is_zero(part) && !self.dirty.contains_key(&block) {
                // (Over a punched or shared dirty block, the old contents are those: merge now.)
                let mut p = Partial::new(self.bs as usize, self.writes);
                p.write(within, part);
                self.set_dirty(block, Dirty::Partial(Box::new(p)))?;
                self.prefetch(block)?;
                continue;
            }
            let mut b = self.block_contents(block)?;
            b[within..within + n].copy_from_slice(part);
            self.set_dirty(block, Dirty::Data(b.into()))?;
        }
        if self.dirty_bytes > self.dirty_limit {
            self.seal_or_reset()?;
        }
        Ok(())
    }

    /// Zero `[offset, offset + len)` within the image (punch hole / zero
    /// range: both read back as zeros, and whole blocks become holes). Does
    /// not change the size. Costs O(data blocks in the range).
    pub fn punch(&mut self, offset: u64, len: u64) -> Result<()> {
        self.ensure_lease()?;
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(());
        }
        let first_full = offset.div_ceil(self.bs);
        let end_full = end / self.bs;
        // Partial blocks at the edges: read-modify-write.
        let edge = |h: &mut Self, block: u64| -> Result<()> {
            if !h.is_data(block)? {
                return Ok(());
            }
            let start = (block * h.bs).max(offset);
            let stop = ((block + 1) * h.bs).min(end);
            let mut b = h.block_contents(block)?;
            b[(start - block * h.bs) as usize..(stop - block * h.bs) as usize].fill(0);
            h.set_dirty(block, Dirty::Data(b.into()))
        };
        if first_full > end_full {
            // Inside one block.
            edge(self, offset / self.bs)?;
            return Ok(());
        }
        if !offset.is_multiple_of(self.bs) {
            edge(self, offset / self.bs)?;
        }
        if !end.is_multiple_of(self.bs) && end_full >= first_full {
            edge(self, end_full)?;
        }
        let mut b = first_full;
        while let Some(d) = self.next_data_block(b)? {
            if d >= end_full {
                break;
            }
            self.set_dirty(d, Dirty::Zero)?;
            b = d + 1;
        }
        Ok(())
    }

    /// Set the size: grow adds holes; shrink drops everything past the new
    /// end (the tail of a partial last block reads as zeros).
    pub fn set_size(&mut self, new: u64) -> Result<()> {
        self.settle()?; // (a flush commits at the size it was cut at)
        self.ensure_lease()?;
        if new >= self.size {
            self.size = new;
            return Ok(());
        }
        let nb = new.div_ceil(self.bs);
        // The new last block keeps its head: read before anything changes,
        // so a block that cannot be read fails the call with the image as
        // it was (not cut at its next commit).
        let tail = match new % self.bs {
            0 => None,
            keep => {
                let last = new / self.bs;
                if self.is_data(last)? {
                    let mut b = self.block_contents(last)?;
                    b[keep as usize..].fill(0);
                    Some((last, b))
                } else {
                    None
                }
            }
        };
        let dropped = self.dirty.split_off(&nb);
        for d in dropped.values() {
            if holds_bytes(d) {
                self.dirty_bytes -= self.bs as usize;
            }
        }
        for (_, (_, d)) in self.sealing.split_off(&nb) {
            if holds_bytes(&d) {
                self.sealing_bytes -= self.bs as usize;
            }
        }
        self.account_memory();
        self.staged.split_off(&nb);
        self.trunc_from = Some(self.trunc_from.map_or(nb, |t| t.min(nb)));
        *self.alloc.lock().unwrap() = None; // recounted when next asked
        self.size = new;
        if let Some((last, b)) = tail {
            self.set_dirty(last, Dirty::Data(b.into()))?;
        }
        Ok(())
    }

    // -------------------------------------------------------------- commit

    /// Drop every uncommitted change because something failed (counted:
    /// [`ImageHandle::failures`]).
    fn reset_failed(&mut self) {
        self.failures += 1;
        self.reset();
    }

    /// How many times a failure (this handle's or its background work's:
    /// a seal job, a flush) dropped the uncommitted changes. Whoever
    /// acknowledged those writes must report the loss.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    fn reset(&mut self) {
        // A flush in flight may still commit: take its version first (its
        // failure drops no more than this does).
        let _ = self.settle();
        self.dirty.clear();
        self.dirty_bytes = 0;
        self.sealing.clear();
        self.sealing_bytes = 0;
        self.epoch += 1; // results of jobs still running are dropped
        self.staged.clear();
        // A new map, not `clear()`, which keeps the table: a long write's
        // ~16k entries made every later commit's copy of the map (try_commit)
        // a 2 MB copy, ~0.2 ms of each `fsync` under random writes.
        *self.new_blocks.lock().unwrap() = HashMap::new();
        self.shared.clear();
        self.store.unpin_packs(std::mem::take(&mut self.touched));
        self.trunc_from = None;
        self.size = self.row.size;
        self.guard = None;
        *self.alloc.lock().unwrap() = None;
        self.account_memory();
    }

    /// Take up to `max_blocks` dirty blocks (lowest first) into a job.
    /// The dirty blocks a job takes: the first [`SEAL_JOB_BYTES`] of them,
    /// leaving out the young partial ones if `settled`.
    fn job_keys(&self, settled: bool) -> Vec<u64> {
        let young =
            |d: &Dirty| settled && matches!(d, Dirty::Partial(p) if self.writes - p.since < PARTIAL_GRACE);
        self.dirty
            .iter()
            .filter(|(_, d)| !young(d))
            .map(|(&k, _)| k)
            .take((SEAL_JOB_BYTES / self.bs as usize).max(1))
            .collect()
    }

    fn take_job(&mut self, keys: Vec<u64>) -> Result<SealJob> {
        let gate = match &self.guard {
            Some(g) => g.clone(),
            None => {
                let g = Arc::new(self.store.stage_enter()?);
                self.guard = Some(g.clone());
                g
            }
        };
        self.seal_gen += 1;
        let gen = self.seal_gen;
        let bs = self.bs as usize;
        // Partial blocks: the job reads their old contents and merges, so
        // the reads do not hold up this handle. What lies below them is
        // fixed now (a later write goes to the dirty set, above the job).
        let mut now = Vec::new();
        for &k in &keys {
            if !matches!(self.dirty.get(&k), Some(Dirty::Partial(_))) {
                continue;
            }
            let base = match self.sealing.get(&k) {
                Some((_, Dirty::Zero)) => Base::Zero,
                Some((_, Dirty::Data(d))) => Base::Bytes(d.clone()),
                Some((_, Dirty::Ref(h))) => Base::Stored(*h),
                Some(_) => {
                    now.push(k); // over a merge still running: merge here (rare)
                    continue;
                }
                None => match self.base_state(k)? {
                    None => Base::Zero,
                    Some(h) => Base::Stored(h),
                },
            };
            let Some(Dirty::Partial(p)) = self.dirty.remove(&k) else {
                unreachable!()
            };
            let m = Dirty::Merge(Arc::new(Merge { partial: *p, base }));
            self.dirty.insert(k, m);
        }
        let merged = parallel_map(&now, MERGE_THREADS, |&k| self.block_contents(k));
        for (k, m) in now.into_iter().zip(merged) {
            self.dirty.insert(k, Dirty::Data(m?.into()));
        }
        let mut blocks = Vec::with_capacity(keys.len());
        for k in keys {
            let d = self.dirty.remove(&k).unwrap();
            if holds_bytes(&d) {
                self.dirty_bytes -= bs;
                self.sealing_bytes += bs;
            }
            if self
                .sealing
                .insert(k, (gen, d.clone()))
                .is_some_and(|(_, d)| holds_bytes(&d))
            {
                self.sealing_bytes -= bs;
            }
            blocks.push((k, gen, d));
        }
        self.account_memory();
        self.jobs.start();
        Ok(SealJob {
            store: self.store.clone(),
            image: self.row.name.clone(),
            epoch: self.epoch,
            blocks,
            ran: false,
            known: self.new_blocks.clone(),
            jobs: self.jobs.clone(),
            _gate: gate,
        })
    }

    /// A job sealing dirty blocks outside this handle (up to
    /// [`SEAL_JOB_BYTES`] of them), when at least `min_bytes` of them wait
    /// (first applying what finished jobs did).
    /// Run it with [`SealJob::run`] on any thread. On error (an earlier
    /// job's, or reading old contents to merge) the uncommitted changes are
    /// dropped, as for a failed commit.
    pub fn seal_job(&mut self, min_bytes: usize) -> Result<Option<SealJob>> {
        self.check_writable()?;
        self.apply_jobs(self.jobs.take())?;
        self.seal_job_taking(min_bytes, false)
    }

    /// The job a writer starts. When `eager` and no job of this handle is
    /// running, a job for whatever is dirty: blocks are sealed while the
    /// writer goes on, so an `fsync` finds little left to seal. (A block
    /// written again after that is sealed again: CPU spent off the path.)
    /// Otherwise [`ImageHandle::seal_job`], but for blocks written in part
    /// by the last [`PARTIAL_GRACE`] writes: a long write's edge block is
    /// most often completed by the next write (the loop device splits
    /// writes at any 4 KiB); sealed at once, it was merged with its old
    /// contents read from the disk, then merged and sealed again.
    pub fn seal_job_when(&mut self, min_bytes: usize, eager: bool) -> Result<Option<SealJob>> {
        self.check_writable()?;
        self.apply_jobs(self.jobs.take())?;
        if eager && self.jobs.running() == 0 {
            self.seal_job_taking(1, false)
        } else {
            self.seal_job_taking(min_bytes, true)
        }
    }

    /// A job for the blocks [`ImageHandle::job_keys`] picks, if `min_bytes`
    /// of dirty blocks wait.
    fn seal_job_taking(&mut self, min_bytes: usize, settled: bool) -> Result<Option<SealJob>> {
        if self.dirty_bytes < min_bytes.max(1) {
            return Ok(None);
        }
        let keys = self.job_keys(settled);
        if keys.is_empty() {
            return Ok(None);
        }
        match self.take_job(keys) {
            Ok(job) => Ok(Some(job)),
            Err(e) => {
                self.reset_failed(); // as a failed job would: the caller reports the loss
                Err(e)
            }
        }
    }

    /// Apply finished jobs' results. On a job's error the uncommitted
    /// changes are dropped (as for a failed commit) and the error returned.
    fn apply_jobs(&mut self, results: Vec<JobResult>) -> Result<()> {
        let mut err = None;
        for (epoch, r) in results {
            match r {
                Ok(out) if epoch == self.epoch && err.is_none() => {
                    if let Err(e) = self.apply_output(out) {
                        err = Some(e);
                    }
                }
                Ok(out) => self.store.unpin_packs(out.pinned),
                Err(e) if epoch == self.epoch => {
                    err.get_or_insert(e);
                }
                Err(_) => {} // taken before a reset: already dropped
            }
        }
        self.account_memory(); // (what applied outputs stopped holding)
        match err {
            Some(e) => {
                self.reset_failed();
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn apply_output(&mut self, out: SealOutput) -> Result<()> {
        {
            let mut nb = self.new_blocks.lock().unwrap();
            for (h, loc) in out.appended {
                nb.entry(h).or_insert(loc);
            }
        }
        for p in out.pinned {
            if !self.touched.insert(p) {
                self.store.unpin_packs([p]); // this handle pins it already
            }
        }
        for (block, gen, hash) in out.blocks {
            // Written again, truncated or sealed by a later job since: not ours to apply.
            if self.sealing.get(&block).map(|(g, _)| *g) != Some(gen) {
                continue;
            }
            // Before the entry goes: on error the caller resets the handle.
            let in_base = self.trunc_from.is_none_or(|t| block < t);
            let committed = if in_base {
                self.committed_hash(block)?
            } else {
                None
            };
            if self.sealing.remove(&block).is_some_and(|(_, d)| holds_bytes(&d)) {
                self.sealing_bytes -= self.bs as usize;
            }
            match hash {
                None if committed.is_some() => {
                    self.staged.insert(block, Staged::Hole);
                }
                Some(h) if committed != Some(h) => {
                    self.staged.insert(block, Staged::Block(h));
                }
                _ => {
                    self.staged.remove(&block);
                }
            }
        }
        Ok(())
    }

    fn seal_or_reset(&mut self) -> Result<()> {
        let r = self.seal();
        if r.is_err() {
            self.reset_failed();
        }
        r
    }

    /// Hash, compress and append the dirty blocks here and now; nothing
    /// becomes visible. Jobs running elsewhere are not waited for.
    fn seal(&mut self) -> Result<()> {
        self.apply_jobs(self.jobs.take())?;
        // In chunks, so sealing needs little memory beyond the dirty set itself.
        while !self.dirty.is_empty() {
            let keys = self.job_keys(false);
            self.take_job(keys)?.run();
            self.apply_jobs(self.jobs.take())?;
        }
        Ok(())
    }

    /// Make every change durable as one new version. Returns only after the
    /// pack data and the metadata transaction are on stable storage. On
    /// error the uncommitted changes are dropped and the image stays at its
    /// last committed version.
    pub fn commit(&mut self) -> Result<CommitInfo> {
        self.store.check_writable()?;
        let r = self.try_commit();
        if r.is_err() {
            self.reset_failed();
        }
        r
    }

    /// Cut off the sealed (staged) changes into a [`Flush`] that commits them
    /// as a new version without holding this handle, so writes go on while
    /// the records are synced and the metadata transaction runs. Until it
    /// lands they read as committed. `None` when nothing is sealed, a flush
    /// is in flight already, or the image was cut shorter (a full commit
    /// takes that; growth by writes is flushed along).
    ///
    /// A version made so holds the writes whose blocks were sealed, not
    /// necessarily every write before them: as a disk's volatile cache may
    /// keep any of the writes since the last flush. [`ImageHandle::commit`]
    /// (`fsync`) makes all of them durable, as always.
    pub fn begin_flush(&mut self) -> Result<Option<Flush>> {
        if self.inflight.is_some()
            || self.view.is_some()
            || self.trunc_from.is_some()
            || self.size < self.row.size
        {
            return Ok(None);
        }
        self.apply_jobs(self.jobs.take())?;
        // Counted now, while no flush races the count (then kept up to date).
        if self.staged.is_empty() || self.alloc_blocks().is_err() {
            return Ok(None);
        }
        let staged = Arc::new(std::mem::take(&mut self.staged));
        let new_blocks = self.new_blocks.lock().unwrap().clone();
        let outcome = Arc::new(FlushOutcome::default());
        self.inflight = Some(Inflight {
            staged: staged.clone(),
            size: self.size,
            indexed: new_blocks.keys().copied().collect(),
            outcome: outcome.clone(),
        });
        Ok(Some(Flush {
            store: self.store.clone(),
            image_id: self.row.id,
            name: self.row.name.clone(),
            base_version: self.row.version,
            size: self.size,
            staged,
            new_blocks,
            shared: self.shared.clone(),
            packs: self.touched.iter().copied().collect(),
            live_before: self.live.filter(|&(v, _)| v == self.row.version).map(|(_, n)| n),
            outcome,
            ran: false,
        }))
    }

    /// Take the result of `flush` (run) if it is still in flight: see
    /// [`ImageHandle::settle`]. `Ok` if another call took it already.
    pub fn land_flush(&mut self, flush: &FlushTicket) -> Result<()> {
        match &self.inflight {
            Some(f) if Arc::ptr_eq(&f.outcome, &flush.0) => self.settle(),
            _ => Ok(()),
        }
    }

    /// Wait for the flush in flight, if any, and take its result: its version
    /// becomes the one this handle is based on; or, if it failed, every
    /// uncommitted change is dropped (as for a failed commit) and its error
    /// returned.
    fn settle(&mut self) -> Result<()> {
        let Some(f) = self.inflight.take() else {
            return Ok(());
        };
        let c = match f.outcome.wait() {
            Ok(c) => c,
            Err(e) => {
                self.reset_failed();
                return Err(e);
            }
        };
        self.adopt(&c, f.size, &f.staged);
        // Indexed now: the store finds them.
        let mut nb = self.new_blocks.lock().unwrap();
        for h in &f.indexed {
            nb.remove(h);
        }
        Ok(())
    }

    /// Base this handle on the version a commit or flush made, of `size`,
    /// with `staged` now in it.
    fn adopt(&mut self, c: &Committed, size: u64, staged: &BTreeMap<u64, Staged>) {
        self.row.version = c.version;
        self.row.stamp = c.stamp;
        self.row.size = size;
        self.live = c.live.map(|n| (c.version, n));
        self.map_cache
            .lock()
            .unwrap()
            .extend(staged.iter().map(|(&b, st)| (b, st.hash())));
        if let Ok(row) = self.store.image_row_by_id(self.row.id, &self.row.name) {
            self.row.quota = row.quota; // `geosync quota set` may have changed it
        }
    }

    /// Bytes of sealed blocks not yet committed (nor in a flush).
    pub fn staged_bytes(&self) -> usize {
        self.staged.len() * self.bs as usize
    }

    /// Waits for this handle's seal jobs without holding the handle.
    pub fn job_waiter(&self) -> JobWaiter {
        JobWaiter(self.jobs.clone())
    }

    /// Apply what finished seal jobs did, giving back the memory they held.
    /// On a job's error the uncommitted changes are dropped and it is returned.
    pub fn apply_finished(&mut self) -> Result<()> {
        self.apply_jobs(self.jobs.take())
    }

    /// Seal jobs taken and not finished.
    pub fn jobs_running(&self) -> usize {
        self.jobs.running()
    }

    fn try_commit(&mut self) -> Result<CommitInfo> {
        let t0 = std::time::Instant::now();
        self.settle()?;
        self.seal()?;
        let t_seal_first = t0.elapsed();
        self.apply_jobs(self.jobs.wait_all())?;
        let t_wait = t0.elapsed() - t_seal_first;
        let t_seal = t0.elapsed();
        // A commit does not change what the image holds: the allocation stays valid.
        let alloc = *self.alloc.lock().unwrap();
        if self.staged.is_empty() && self.size == self.row.size && self.trunc_from.is_none() {
            self.reset();
            *self.alloc.lock().unwrap() = alloc;
            return Ok(CommitInfo {
                version: self.row.version,
                stamp: None,
                changed: false,
            });
        }
        let nstaged = self.staged.len();
        let new_blocks = self.new_blocks.lock().unwrap().clone();
        let committed = sync_and_commit(
            &self.store,
            self.touched.iter().copied().collect(),
            &CommitRequest {
                image_id: self.row.id,
                name: &self.row.name,
                base_version: self.row.version,
                size: self.size,
                trunc_from: self.trunc_from,
                staged: &self.staged,
                new_blocks: &new_blocks,
                shared: &self.shared,
                live_before: self.live.filter(|&(v, _)| v == self.row.version).map(|(_, n)| n),
            },
        )?;
        let (version, stamp) = (committed.version, committed.stamp);
        if self.trunc_from.is_some() {
            self.map_cache.lock().unwrap().clear(); // (and none of `staged` cached below)
            self.staged.clear();
        }
        let staged = std::mem::take(&mut self.staged);
        self.adopt(&committed, self.size, &staged);
        self.reset();
        *self.alloc.lock().unwrap() = alloc;
        tracing::debug!(
            image = %self.row.name,
            version,
            %stamp,
            blocks = nstaged,
            wait_us = t_wait.as_micros() as u64,
            seal_us = t_seal_first.as_micros() as u64,
            meta_us = (t0.elapsed() - t_seal).as_micros() as u64,
            "committed"
        );
        Ok(CommitInfo {
            version,
            stamp: Some(stamp),
            changed: true,
        })
    }

    /// Where the content of each block in `blocks` comes from, for sharing it
    /// with another image (or another place in this one) without copying.
    pub fn block_sources(&self, blocks: std::ops::Range<u64>) -> Result<Vec<BlockSource>> {
        blocks
            .map(|b| {
                Ok(match self.overlay(b) {
                    Some(Dirty::Zero) => BlockSource::Hole,
                    Some(Dirty::Data(d)) => BlockSource::Bytes(d[..].into()),
                    Some(Dirty::Partial(_) | Dirty::Merge(_)) => {
                        BlockSource::Bytes(self.block_contents(b)?.into())
                    }
                    Some(Dirty::Ref(h)) => BlockSource::Stored(*h),
                    None => match self.base_state(b)? {
                        None => BlockSource::Hole,
                        // Sealed by this handle but not committed: not indexed yet,
                        // and gone if this handle's commit fails: copy the bytes.
                        Some(h) if self.new_blocks.lock().unwrap().contains_key(&h) => {
                            BlockSource::Bytes(self.block_contents(b)?.into())
                        }
                        Some(h) => BlockSource::Stored(h),
                    },
                })
            })
            .collect()
    }

    /// Make whole blocks starting at `first` equal to `sources` by sharing
    /// stored blocks (a clone, not a copy). Grows the image to cover them.
    /// Hold the stage gate until commit so GC keeps the shared blocks.
    pub fn put_blocks(&mut self, first: u64, sources: Vec<BlockSource>, size_at_least: u64) -> Result<()> {
        self.ensure_lease()?;
        self.check_quota(first..first + sources.len() as u64)?;
        if self.guard.is_none() {
            self.guard = Some(Arc::new(self.store.stage_enter()?));
        }
        if size_at_least > self.size {
            self.size = size_at_least;
        }
        for (i, src) in sources.into_iter().enumerate() {
            let d = match src {
                BlockSource::Hole => Dirty::Zero,
                BlockSource::Stored(h) => {
                    self.shared.insert(h);
                    Dirty::Ref(h)
                }
                BlockSource::Bytes(b) => Dirty::Data(b.into()),
            };
            self.set_dirty(first + i as u64, d)?;
        }
        if self.dirty_bytes > self.dirty_limit {
            self.seal_or_reset()?;
        }
        Ok(())
    }

    /// Block size of the image's store.
    pub fn block_size(&self) -> u64 {
        self.bs
    }

    /// Stamp of the committed version this handle is based on.
    pub fn stamp(&self) -> Stamp {
        self.row.stamp
    }

    /// Creation time of the image (ms since the epoch).
    pub fn created_ms(&self) -> u64 {
        self.row.created_ms
    }

    /// Drop uncommitted changes.
    pub fn discard(&mut self) {
        self.reset();
    }

    /// Whether the image's committed head moved since this handle was based
    /// on it (another writer, a rollback).
    pub fn is_stale(&self) -> Result<bool> {
        let row = self.store.image_row(&self.row.name)?;
        // A flush in flight may have committed its version, not landed yet.
        let flushed = self.inflight.is_some() && row.version == self.row.version + 1;
        Ok(row.id != self.row.id || (row.version != self.row.version && !flushed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{FaultPacks, FaultPlan, MemPacks};
    use crate::store::{InitOptions, OpenMode};

    fn store() -> (tempfile::TempDir, Store) {
        store_on(MemPacks::new())
    }

    /// A disk store with `bs`-byte blocks in a temporary directory.
    fn disk_store(bs: u32) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            block_size: bs,
            ..Default::default()
        };
        let s = Store::init(dir.path(), &opts).unwrap();
        (dir, s)
    }

    /// `len` incompressible bytes determined by `seed`.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let mut h = blake3::Hasher::new();
        h.update(&seed.to_le_bytes());
        h.finalize_xof().fill(&mut v);
        v
    }

    /// A store with 4 KiB blocks whose packs are `packs` (cloned: shared).
    fn store_on<P: crate::backend::PackStorage + Clone + 'static>(packs: P) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("meta.db");
        let opts = InitOptions {
            block_size: 4096,
            ..Default::default()
        };
        Store::init_with(&db, Box::new(packs.clone()), &opts).unwrap();
        let s = Store::open_with(&db, Box::new(packs), OpenMode::ReadWrite).unwrap();
        (dir, s)
    }

    #[test]
    fn only_raw_blocks_read_whole_keep_a_piece_proof() {
        let (_d, s) = disk_store(16384);
        let raw = noise(1, 16384);
        let raw2 = noise(2, 16384);
        let packed: Vec<u8> = (0..16384).map(|i| (i / 1000) as u8).collect();
        s.create_image("p", 4 * 16384).unwrap();
        let mut h = s.open_image("p").unwrap();
        h.write(0, &raw).unwrap();
        h.write(16384, &packed).unwrap();
        h.write(3 * 16384, &raw2).unwrap();
        h.commit().unwrap();
        s.set_read_cache(0);
        let (raw_hash, packed_hash) = (pack::hash_block(&raw), pack::hash_block(&packed));
        assert!(!s.has_proof(&raw_hash), "written, not read");
        // Whole reads by scrub (and compaction, exports) leave no proof.
        assert!(s.scrub(&|_| {}).unwrap().damaged.is_empty());
        assert!(!s.has_proof(&raw_hash), "scrubbed, not read by an image");
        let mut buf = [0u8; 100];
        for at in [16384 + 50, 50, 2 * 16384 + 50] {
            h.read(at, &mut buf).unwrap();
        }
        assert_eq!(buf, [0u8; 100], "a hole");
        assert!(s.has_proof(&raw_hash));
        assert!(!s.has_proof(&packed_hash), "compressed: read whole anyway");
        assert_eq!(s.piece_reads(), 0);
        h.read(3 * 16384 + 50, &mut buf).unwrap();
        assert_eq!(buf[..], raw2[50..150]);
        assert!(
            !s.is_cached(&raw_hash) && !s.is_cached(&pack::hash_block(&raw2)),
            "cache off"
        );
        h.read(50, &mut buf).unwrap();
        assert_eq!(buf[..], raw[50..150]);
        let mut page = [0u8; 4096];
        h.read(2 * 4096, &mut page).unwrap();
        assert_eq!(page[..], raw[2 * 4096..3 * 4096]);
        assert_eq!(s.piece_reads(), 2, "both read by pieces");
    }

    #[test]
    fn write_read_commit_and_holes() {
        let (_d, s) = store();
        s.create_image("a", 10 * 4096).unwrap();
        let mut h = s.open_image("a").unwrap();
        h.write(4096 + 100, b"hello").unwrap();
        let mut buf = [0u8; 5];
        h.read(4096 + 100, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(h.seek_data(0).unwrap(), Some(4096));
        assert_eq!(h.seek_hole(4096).unwrap(), Some(8192));
        let c = h.commit().unwrap();
        assert_eq!(c.version, 2);
        drop(h); // one writer per image at a time
        let h2 = s.open_image("a").unwrap();
        h2.read(4096 + 100, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(h2.data_extents().unwrap(), vec![(4096, 8192)]);
        // Writing zeros over the data makes it a hole again.
        let mut h = s.open_image("a").unwrap();
        h.write(4096 + 100, &[0; 5]).unwrap();
        assert_eq!(h.seek_data(0).unwrap(), None);
        h.commit().unwrap();
        assert_eq!(s.image_info("a").unwrap().referenced, 0);
    }

    /// Two jobs outstanding on one block: a sector write taken by a job
    /// (merged by the job, off the handle), then another sector write to the
    /// same block taken by a second job while the first still holds it (over
    /// a whole block: merged on its bytes; over a merge: merged at once).
    /// Reads are right at every step, whichever job runs first.
    #[test]
    fn stacked_jobs_over_one_block_merge_in_order() {
        for first_runs_first in [true, false] {
            for whole_first in [true, false] {
                let (_d, s) = store();
                s.create_image("a", 2 * 4096).unwrap();
                let mut h = s.open_image("a").unwrap();
                h.write(0, &[7; 2 * 4096]).unwrap();
                h.commit().unwrap();
                let mut expect = vec![7u8; 2 * 4096];
                let check = |h: &ImageHandle, expect: &[u8]| {
                    let mut buf = vec![0xAA; 2 * 4096];
                    h.read(0, &mut buf).unwrap();
                    assert_eq!(
                        buf, expect,
                        "first_runs_first {first_runs_first} whole_first {whole_first}"
                    );
                };
                if whole_first {
                    h.write(4096, &[3; 4096]).unwrap(); // a whole block: Data
                    expect[4096..].fill(3);
                } else {
                    h.write(4096 + 512, &[1; 512]).unwrap(); // a sector: merged by the job
                    expect[4096 + 512..4096 + 1024].fill(1);
                }
                let j1 = h.seal_job(0).unwrap().unwrap();
                check(&h, &expect);
                h.write(4096 + 2048, &[2; 1024]).unwrap();
                expect[4096 + 2048..4096 + 3072].fill(2);
                check(&h, &expect);
                let j2 = h.seal_job(0).unwrap().unwrap();
                check(&h, &expect);
                if first_runs_first {
                    j1.run();
                    check(&h, &expect);
                    j2.run();
                } else {
                    j2.run();
                    check(&h, &expect);
                    j1.run();
                }
                check(&h, &expect);
                h.commit().unwrap();
                check(&h, &expect);
                drop(h);
                check(&s.open_image("a").unwrap(), &expect);
                assert_eq!(s.pins(), 0, "a pack pin leaked");
            }
        }
    }

    #[test]
    fn sector_writes_merge_with_old_contents_when_sealed() {
        let (_d, s) = store();
        s.create_image("a", 3 * 4096).unwrap();
        let mut h = s.open_image("a").unwrap();
        h.write(0, &[7; 3 * 4096]).unwrap();
        h.commit().unwrap();
        // Two sectors of block 1, and one sector of a hole past the end.
        h.write(4096 + 512, &[1; 1024]).unwrap();
        h.set_size(4 * 4096).unwrap();
        h.write(3 * 4096 + 2048, &[2; 512]).unwrap();
        let mut expect = vec![7u8; 3 * 4096];
        expect[4096 + 512..4096 + 1536].fill(1);
        expect.resize(4 * 4096, 0);
        expect[3 * 4096 + 2048..3 * 4096 + 2560].fill(2);
        let check = |h: &ImageHandle| {
            let mut buf = vec![0xAA; 4 * 4096];
            h.read(0, &mut buf).unwrap();
            assert_eq!(buf, expect);
            // A read inside the written sectors, and one across their edge.
            let mut b = [0u8; 512];
            h.read(4096 + 1024, &mut b).unwrap();
            assert_eq!(b, [1; 512]);
            h.read(4096 + 1280, &mut b).unwrap();
            assert_eq!(&b[..256], &[1; 256]);
            assert_eq!(&b[256..], &[7; 256]);
            assert_eq!(h.allocated_bytes().unwrap(), 4 * 4096);
        };
        check(&h);
        h.commit().unwrap();
        check(&h);
        drop(h);
        check(&s.open_image("a").unwrap());
        // A sector written into a punched block: the rest of it reads as zeros.
        let mut h = s.open_image("a").unwrap();
        h.punch(2 * 4096, 4096).unwrap();
        h.write(2 * 4096, &[8; 512]).unwrap();
        let mut b = vec![0xAA; 4096];
        h.read(2 * 4096, &mut b).unwrap();
        assert_eq!(&b[..512], &[8; 512]);
        assert!(b[512..].iter().all(|&x| x == 0));
        h.commit().unwrap();
        h.read(2 * 4096, &mut b).unwrap();
        assert!(b[512..].iter().all(|&x| x == 0));
        drop(h);
        // Zeros over the only written sectors of a hole: still a hole.
        let mut h = s.open_image("a").unwrap();
        h.set_size(5 * 4096).unwrap();
        h.write(4 * 4096, &[3; 512]).unwrap();
        h.write(4 * 4096, &[0; 512]).unwrap();
        assert_eq!(h.seek_data(4 * 4096).unwrap(), None);
        assert_eq!(h.allocated_bytes().unwrap(), 4 * 4096);
        // Every sector written: whole, no old contents needed.
        for i in 0..8 {
            h.write(4 * 4096 + i * 512, &[4; 512]).unwrap();
        }
        h.commit().unwrap();
        let mut b = vec![0; 4096];
        h.read(4 * 4096, &mut b).unwrap();
        assert_eq!(b, vec![4; 4096]);
    }

    #[test]
    fn seal_jobs_lose_to_later_writes_and_resets() {
        let (_d, s) = store();
        s.create_image("a", 4 * 4096).unwrap();
        let mut h = s.open_image("a").unwrap();
        h.write(0, &[1; 4 * 4096]).unwrap();
        let job = h.seal_job(0).unwrap().expect("dirty blocks to seal");
        // Written again while the job holds the old bytes; read through it meanwhile.
        h.write(4096, &[2; 4096]).unwrap();
        h.write(2 * 4096 + 512, &[3; 512]).unwrap();
        let mut b = vec![0; 4096];
        h.read(0, &mut b).unwrap();
        assert_eq!(b, vec![1; 4096]);
        job.run();
        h.commit().unwrap();
        drop(h);
        let h = s.open_image("a").unwrap();
        let mut all = vec![0; 4 * 4096];
        h.read(0, &mut all).unwrap();
        let mut expect = vec![1u8; 4 * 4096];
        expect[4096..8192].fill(2);
        expect[2 * 4096 + 512..2 * 4096 + 1024].fill(3);
        assert_eq!(all, expect);
        drop(h);
        // A job whose changes were discarded meanwhile applies nothing.
        let mut h = s.open_image("a").unwrap();
        h.write(0, &[9; 4096]).unwrap();
        let job = h.seal_job(0).unwrap().unwrap();
        h.discard();
        job.run();
        assert!(!h.commit().unwrap().changed);
        h.read(0, &mut b).unwrap();
        assert_eq!(b, vec![1; 4096]);
        drop(h);
        assert_eq!(s.pins(), 0, "a pack pin leaked");
    }

    /// [`MemPacks`] that counts reads (and holds appends to meet, when armed).
    #[derive(Debug, Clone, Default)]
    struct CountingPacks(MemPacks, Arc<AtomicUsize>, Arc<Rendezvous>);

    /// When armed, an append of records waits (up to 5 s) until another is
    /// in progress too, and the most in progress at once is recorded. When
    /// `panic` is set, an append of records panics (a bug in the write path).
    #[derive(Debug, Default)]
    struct Rendezvous {
        armed: std::sync::atomic::AtomicBool,
        panic: std::sync::atomic::AtomicBool,
        /// Reads panic (a bug in the read path).
        panic_reads: std::sync::atomic::AtomicBool,
        /// (in progress, most at once)
        state: Mutex<(usize, usize)>,
        cv: Condvar,
    }

    impl crate::backend::PackStorage for CountingPacks {
        fn list(&self) -> std::io::Result<Vec<PackId>> {
            self.0.list()
        }
        fn create(&self, id: PackId) -> std::io::Result<()> {
            self.0.create(id)
        }
        fn append(&self, id: PackId, data: &[u8]) -> std::io::Result<()> {
            let r = &self.2;
            if r.panic.load(Ordering::SeqCst) && data.len() > pack::PACK_ALIGN as usize {
                panic!("injected panic in an append");
            }
            if !r.armed.load(Ordering::SeqCst) || data.len() <= pack::PACK_ALIGN as usize {
                return self.0.append(id, data); // not armed, or a pack header
            }
            let mut st = r.state.lock().unwrap();
            st.0 += 1;
            st.1 = st.1.max(st.0);
            r.cv.notify_all();
            let (mut st, _) =
                r.cv.wait_timeout_while(st, std::time::Duration::from_secs(5), |st| st.1 < 2)
                    .unwrap();
            let res = self.0.append(id, data);
            st.0 -= 1;
            res
        }
        fn sync(&self, id: PackId) -> std::io::Result<()> {
            self.0.sync(id)
        }
        fn len(&self, id: PackId) -> std::io::Result<u64> {
            self.0.len(id)
        }
        fn read_at(&self, id: PackId, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            if self.2.panic_reads.load(Ordering::SeqCst) {
                panic!("injected panic in a read");
            }
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.read_at(id, offset, buf)
        }
        fn truncate(&self, id: PackId, len: u64) -> std::io::Result<()> {
            self.0.truncate(id, len)
        }
        fn remove(&self, id: PackId) -> std::io::Result<()> {
            self.0.remove(id)
        }
        fn try_claim(&self, id: PackId) -> std::io::Result<bool> {
            self.0.try_claim(id)
        }
        fn release(&self, id: PackId) {
            self.0.release(id)
        }
    }

    /// Seal `data` as one block and append it; returns its name and place.
    fn append_one(s: &Store, data: &[u8]) -> Result<(BlockHash, BlockLoc)> {
        let h = pack::hash_block(data);
        let mut pinned = Vec::new();
        let r = s.append_pinned(&[pack::seal(data, h, s.config().compression)], &mut pinned);
        s.unpin_packs(pinned);
        Ok((h, r?[0]))
    }

    #[test]
    fn appends_at_once_go_to_packs_of_their_own() {
        let packs = CountingPacks::default();
        let (_d, s) = store_on(packs.clone());
        packs.2.armed.store(true, Ordering::SeqCst);
        let blocks: Vec<Vec<u8>> = (0..2).map(|i| noise(i, 4096)).collect();
        let placed: Vec<(BlockHash, BlockLoc)> = std::thread::scope(|sc| {
            let running: Vec<_> = blocks
                .iter()
                .map(|b| sc.spawn(|| append_one(&s, b).unwrap()))
                .collect();
            running.into_iter().map(|t| t.join().unwrap()).collect()
        });
        // With one appender the second waited for the first to finish.
        assert_eq!(
            packs.2.state.lock().unwrap().1,
            2,
            "the appends were not made at once"
        );
        assert_ne!(placed[0].1.pack, placed[1].1.pack);
        for ((h, loc), b) in placed.iter().zip(&blocks) {
            assert_eq!(&s.read_record(h, loc).unwrap(), b);
        }
        // Uncontended, appends keep to one pack.
        packs.2.armed.store(false, Ordering::SeqCst);
        let a = append_one(&s, &noise(3, 4096)).unwrap().1.pack;
        assert_eq!(append_one(&s, &noise(4, 4096)).unwrap().1.pack, a);
    }

    #[test]
    fn a_panicking_seal_job_fails_the_commit_and_writing_goes_on() {
        let packs = CountingPacks::default();
        let (_d, s) = store_on(packs.clone());
        s.create_image("a", 2 * 4096).unwrap();
        let mut h = s.open_image("a").unwrap();
        h.write(0, &[5; 2 * 4096]).unwrap();
        h.commit().unwrap();
        // Each panic leaves the lane it held poisoned (reset as it unwound).
        for round in 0..3u8 {
            h.write(0, &noise(round.into(), 4096)).unwrap(); // (a record longer than a page)
            packs.2.panic.store(true, Ordering::SeqCst);
            h.seal_job(0).unwrap().unwrap().run();
            packs.2.panic.store(false, Ordering::SeqCst);
            let e = h.commit().unwrap_err();
            assert!(matches!(e, Error::Internal(_)), "{e}");
            assert!(e.to_string().contains("injected panic"), "{e}");
            let mut b = vec![0; 2 * 4096];
            h.read(0, &mut b).unwrap();
            assert_eq!(b, vec![5; 2 * 4096], "round {round}");
        }
        // GC closes every lane, this poisoned one too.
        s.gc(false).unwrap();
        h.write(0, &[9; 2 * 4096]).unwrap();
        h.commit().unwrap();
        drop(h);
        let mut b = vec![0; 2 * 4096];
        s.open_image("a").unwrap().read(0, &mut b).unwrap();
        assert_eq!(b, vec![9; 2 * 4096]);
        assert!(s.scrub(&|_| {}).unwrap().damaged.is_empty());
        assert_eq!(s.pins(), 0, "a pack pin leaked");
    }

    #[test]
    fn a_merge_that_panics_fails_the_commit_and_the_disk_threads_go_on() {
        let packs = CountingPacks::default();
        let (_d, s) = store_on(packs.clone());
        let n = 16u64;
        s.create_image("a", n * 4096).unwrap();
        let mut h = s.open_image("a").unwrap();
        let old = noise(1, n as usize * 4096);
        h.write(0, &old).unwrap();
        h.commit().unwrap();
        // A sector into every block: each prefetch of the old contents and
        // each merge reading them panics (more tasks than disk threads).
        packs.2.panic_reads.store(true, Ordering::SeqCst);
        for b in 0..n {
            h.write(b * 4096, &[7; 512]).unwrap();
        }
        let e = h.commit().unwrap_err();
        packs.2.panic_reads.store(false, Ordering::SeqCst);
        assert!(matches!(e, Error::Internal(_)), "{e}");
        assert!(e.to_string().contains("merging a block of a panicked"), "{e}");
        let mut got = vec![0; old.len()];
        h.read(0, &mut got).unwrap();
        assert_eq!(got, old, "the failed commit changed the image");
        // The disk threads survived: the same merges now run on them.
        let mut want = old.clone();
        for b in 0..n {
            h.write(b * 4096, &[7; 512]).unwrap();
            want[b as usize * 4096..][..512].fill(7);
        }
        h.commit().unwrap();
        drop(h);
        s.open_image("a").unwrap().read(0, &mut got).unwrap();
        assert_eq!(got, want);
        assert_eq!(s.pins(), 0, "a pack pin leaked");
    }

    #[test]
    fn a_commit_lands_only_once_its_packs_are_synced() {
        // The packs sync beside the transaction's statements: the
        // transaction must still commit only after the sync returned, or a
        // crash in between leaves rows naming records that are not there.
        let faults = FaultPacks::new(MemPacks::new());
        let (d, s) = store_on(faults.clone());
        s.create_image("a", 4 * 4096).unwrap();
        let version = || -> i64 {
            // Another connection: sees only what is committed.
            let c = rusqlite::Connection::open(d.path().join("meta.db")).unwrap();
            c.query_row("SELECT version FROM images WHERE name = 'a'", [], |r| r.get(0))
                .unwrap()
        };
        let before = version();
        let mut h = s.open_image("a").unwrap();
        h.write(0, &noise(1, 3 * 4096)).unwrap();
        faults.hold_syncs(true);
        let commit = std::thread::spawn(move || h.commit().map(|c| c.version));
        let t0 = std::time::Instant::now();
        while faults.syncs_held() == 0 {
            assert!(t0.elapsed().as_secs() < 10, "the commit never synced its packs");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // However long the sync takes, the version does not move.
        for _ in 0..20 {
            assert_eq!(version(), before, "committed before its packs were durable");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        faults.hold_syncs(false);
        let v = commit.join().unwrap().unwrap();
        assert_eq!(v as i64, before + 1);
        assert_eq!(version(), before + 1);
        let mut got = vec![0; 3 * 4096];
        s.open_image("a").unwrap().read(0, &mut got).unwrap();
        assert_eq!(got, noise(1, 3 * 4096));
    }

    #[test]
    fn a_commit_whose_pack_sync_panics_fails_and_the_store_commits_on() {
        // A panic below the store (a pack backend's bug) in the sync a
        // commit runs beside its statements: that commit fails with an
        // error, the image stays at its last version, and later commits
        // (their syncs included) go on.
        let faults = FaultPacks::new(MemPacks::new());
        let (_d, s) = store_on(faults.clone());
        s.create_image("a", 4 * 4096).unwrap();
        let mut h = s.open_image("a").unwrap();
        h.write(0, &noise(1, 4096)).unwrap();
        let v1 = h.commit().unwrap().version;
        h.write(0, &noise(2, 4096)).unwrap();
        faults.set_plan(FaultPlan {
            panic_sync_at: Some(0),
            ..Default::default()
        });
        let e = h.commit().unwrap_err();
        assert!(e.to_string().contains("panicked"), "{e}");
        assert_eq!(h.version(), v1);
        let mut got = vec![0; 4096];
        h.read(0, &mut got).unwrap();
        assert_eq!(got, noise(1, 4096), "the failed commit's write is still read");
        faults.set_plan(FaultPlan::default());
        for i in 3..5 {
            h.write(0, &noise(i, 4096)).unwrap();
            assert_eq!(h.commit().unwrap().version, v1 + i - 2);
        }
        drop(h);
        s.open_image("a").unwrap().read(0, &mut got).unwrap();
        assert_eq!(got, noise(4, 4096));
    }

    #[test]
    fn a_pack_is_synced_only_when_written_since_its_last_sync() {
        // Every flush of a long write names all the packs the image wrote
        // since its last full commit: the clean ones must cost no sync.
        let faults = FaultPacks::new(MemPacks::new());
        let (_d, s) = store_on(faults.clone());
        let (_, a) = append_one(&s, &noise(1, 4096)).unwrap();
        faults.set_plan(FaultPlan::default()); // (counts from here)
        s.sync_packs([a.pack]).unwrap();
        assert_eq!(faults.syncs(), 1);
        s.sync_packs([a.pack, a.pack]).unwrap();
        assert_eq!(faults.syncs(), 1, "a clean pack was synced again");
        let (_, b) = append_one(&s, &noise(2, 4096)).unwrap();
        assert_eq!(b.pack, a.pack);
        s.sync_packs([a.pack]).unwrap();
        assert_eq!(faults.syncs(), 2, "a pack written since its sync was not synced");
        // What a crash keeps is what the syncs made durable.
        faults.crash();
        assert_eq!(
            s.read_record(&pack::hash_block(&noise(2, 4096)), &b).unwrap(),
            noise(2, 4096)
        );
    }

    #[test]
    fn a_pack_that_cannot_be_started_leaves_nothing_behind() {
        // On a full disk every seal job tries to start a pack: none may
        // leave a file, a claim or a row behind.
        use crate::backend::PackStorage as _;
        let faults = FaultPacks::new(MemPacks::new());
        let (d, s) = store_on(faults.clone());
        faults.set_plan(FaultPlan {
            enospc_after_bytes: Some(0),
            ..Default::default()
        });
        for i in 0..20 {
            let e = append_one(&s, &noise(i, 4096)).unwrap_err();
            assert!(e.to_string().contains("header"), "{e}");
        }
        assert_eq!(
            faults.list().unwrap(),
            Vec::<PackId>::new(),
            "pack files left behind"
        );
        let c = rusqlite::Connection::open(d.path().join("meta.db")).unwrap();
        let rows: i64 = c
            .query_row("SELECT count(*) FROM packs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0, "pack rows left behind");
        // Room again: appends go on.
        faults.set_plan(FaultPlan::default());
        let (h, loc) = append_one(&s, &noise(99, 4096)).unwrap();
        s.sync_packs([loc.pack]).unwrap();
        assert_eq!(s.read_record(&h, &loc).unwrap(), noise(99, 4096));
    }

    #[test]
    fn opening_read_write_skips_a_pack_removed_while_it_recovers() {
        // A GC in another process removes a pack (file, then row) between
        // the listing of packs and the look at each: the open goes on, and
        // still cuts the torn tail of the pack that is there.
        let faults = FaultPacks::new(MemPacks::new());
        let (d, s) = store_on(faults.clone());
        let (_, loc) = append_one(&s, &noise(1, 4096)).unwrap(); // never committed
        drop(s);
        let db = d.path().join("meta.db");
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute("INSERT INTO packs(id, committed_len) VALUES (77, 4096)", [])
            .unwrap();
        drop(c);
        faults.set_plan(FaultPlan {
            listed_but_gone: Some(77),
            ..Default::default()
        });
        let s = Store::open_with(&db, Box::new(faults.clone()), OpenMode::ReadWrite).unwrap();
        use crate::backend::PackStorage as _;
        assert_eq!(
            faults.len(loc.pack).unwrap(),
            pack::PACK_DATA_START,
            "the torn tail was not cut"
        );
        drop(s);
    }

    #[test]
    fn opening_read_write_leaves_a_pack_being_created_to_its_creator() {
        // Another process made a pack's row, then its empty file, and is
        // about to claim it: a recovery that claimed it first (it is shorter
        // than its row's length) made that claim, and the write, fail.
        // Only a pack longer than its committed length is claimed (to cut).
        use crate::backend::PackStorage as _;
        let faults = FaultPacks::new(MemPacks::new());
        let (d, s) = store_on(faults.clone());
        let (_, torn) = append_one(&s, &noise(1, 4096)).unwrap(); // never committed
        drop(s);
        let db = d.path().join("meta.db");
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute(
            "INSERT INTO packs(id, committed_len) VALUES (90, ?1)",
            [pack::PACK_DATA_START as i64],
        )
        .unwrap();
        drop(c);
        faults.create(90).unwrap();
        let before = faults.claims_tried().len();
        let s = Store::open_with(&db, Box::new(faults.clone()), OpenMode::ReadWrite).unwrap();
        assert_eq!(
            faults.claims_tried()[before..],
            [torn.pack],
            "recovery claimed a pack with nothing committed past its length"
        );
        assert_eq!(faults.len(torn.pack).unwrap(), pack::PACK_DATA_START);
        assert_eq!(faults.len(90).unwrap(), 0, "the new pack was changed");
        drop(s);
        // A pack shorter than what commits cover is damage: the open goes on
        // (scrub names the blocks), and nothing is claimed or cut.
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute(
            "INSERT INTO packs(id, committed_len) VALUES (91, ?1)",
            [3 * pack::PACK_DATA_START as i64],
        )
        .unwrap();
        drop(c);
        faults.create(91).unwrap();
        faults.append(91, pack::pack_header().as_slice()).unwrap();
        let before = faults.claims_tried().len();
        let s = Store::open_with(&db, Box::new(faults.clone()), OpenMode::ReadWrite).unwrap();
        assert!(
            faults.claims_tried()[before..].is_empty(),
            "a short pack was claimed"
        );
        assert_eq!(faults.len(91).unwrap(), pack::PACK_DATA_START);
        drop(s);
    }

    #[test]
    fn a_pack_whose_sync_failed_is_not_appended_to_again() {
        let faults = FaultPacks::new(MemPacks::new());
        let (_d, s) = store_on(faults.clone());
        let (_, first) = append_one(&s, &noise(1, 4096)).unwrap();
        faults.set_plan(FaultPlan {
            fail_sync_at: Some(0),
            ..Default::default()
        });
        assert!(s.sync_packs([first.pack]).is_err());
        faults.set_plan(FaultPlan::default());
        let (h, next) = append_one(&s, &noise(2, 4096)).unwrap();
        assert_ne!(next.pack, first.pack, "appended to a pack that lost data");
        s.sync_packs([next.pack]).unwrap();
        assert_eq!(s.read_record(&h, &next).unwrap(), noise(2, 4096));
        assert!(
            s.sync_packs([first.pack]).is_err(),
            "a failed pack was trusted again"
        );
    }

    #[test]
    fn a_full_disk_fails_only_the_writer_that_met_it_not_the_records_before() {
        // Two images seal into the same pack; the second's append finds the
        // disk full. The first's records, appended before, still commit and
        // survive a crash: the pack only takes no more records. A torn
        // write (EIO) is taken as the pack's failure: its writers all fail.
        use crate::backend::PackStorage as _;
        for full in [true, false] {
            let faults = FaultPacks::new(MemPacks::new());
            let (d, s) = store_on(faults.clone());
            for name in ["a", "b"] {
                s.create_image(name, 4 * 4096).unwrap();
            }
            let mut a = s.open_image("a").unwrap();
            let mut b = s.open_image("b").unwrap();
            a.write(0, &noise(1, 2 * 4096)).unwrap();
            a.seal_job(0).unwrap().expect("a's blocks").run();
            b.write(0, &noise(2, 2 * 4096)).unwrap();
            faults.set_plan(if full {
                FaultPlan {
                    enospc_after_bytes: Some(0),
                    ..Default::default()
                }
            } else {
                FaultPlan {
                    short_write_at: Some(0),
                    ..Default::default()
                }
            });
            let e = b.commit().expect_err("the failed append was not reported");
            assert_eq!(matches!(e, Error::NoSpace(_)), full, "{e}");
            faults.set_plan(FaultPlan::default());
            assert_eq!(faults.list().unwrap().len(), 1, "b's append was not to a's pack");
            let r = a.commit();
            if !full {
                assert!(
                    r.is_err(),
                    "a commit relied on a pack whose write failed with EIO"
                );
                continue;
            }
            r.expect("a's records were appended before the disk filled");
            // b writes again: to another pack, and commits.
            b.write(0, &noise(3, 2 * 4096)).unwrap();
            b.commit().unwrap();
            drop((a, b));
            drop(s);
            faults.crash();
            let s = Store::open_with(
                &d.path().join("meta.db"),
                Box::new(faults.clone()),
                OpenMode::ReadWrite,
            )
            .unwrap();
            let mut got = vec![0; 2 * 4096];
            s.open_image("a").unwrap().read(0, &mut got).unwrap();
            assert!(got == noise(1, 2 * 4096), "a's committed data was lost");
            s.open_image("b").unwrap().read(0, &mut got).unwrap();
            assert!(got == noise(3, 2 * 4096), "b's committed data was lost");
        }
    }

    #[test]
    fn a_rollback_reads_again_an_image_committed_to_while_it_looked() {
        // Rollback finds the rows to kill outside the write lock; a commit
        // landing between that read and its transaction must not be missed.
        let (_d, s) = store();
        s.create_image("a", 4 * 4096).unwrap();
        let commit = |block: u64, seed: u64| {
            let mut h = s.open_image("a").unwrap();
            h.write(block * 4096, &noise(seed, 4096)).unwrap();
            h.commit().unwrap();
        };
        commit(0, 1);
        s.create_snapshot("a", "s").unwrap();
        commit(1, 2);
        let n = std::cell::Cell::new(0);
        s.rollback_with("a", "s", &|| {
            n.set(n.get() + 1);
            if n.get() == 1 {
                commit(2, 3); // lands after the first read
            }
        })
        .unwrap();
        assert_eq!(n.get(), 2, "the changed image was not read again");
        let mut got = vec![0; 4 * 4096];
        s.open_image("a").unwrap().read(0, &mut got).unwrap();
        let mut want = vec![0; 4 * 4096];
        want[..4096].copy_from_slice(&noise(1, 4096));
        assert!(
            got == want,
            "the rollback kept a block written after the snapshot"
        );
        // An image committed to at every look: a clear error, nothing changed.
        commit(3, 4);
        let before = s.image_row("a").unwrap().version;
        let seed = std::cell::Cell::new(10);
        let e = s
            .rollback_with("a", "s", &|| {
                seed.set(seed.get() + 1);
                commit(1, seed.get());
            })
            .unwrap_err();
        assert!(matches!(e, Error::Conflict { .. }), "{e}");
        s.open_image("a").unwrap().read(0, &mut got).unwrap();
        assert!(got[4096..2 * 4096] == noise(13, 4096)[..] && got[3 * 4096..] == noise(4, 4096)[..]);
        assert_eq!(
            s.image_row("a").unwrap().version,
            before + 3,
            "only the three commits"
        );
    }

    #[test]
    fn a_block_written_in_part_is_merged_again_from_the_cache() {
        let packs = CountingPacks::default();
        let (_d, s) = store_on(packs.clone());
        s.create_image("a", 4 * 4096).unwrap();
        let mut h = s.open_image("a").unwrap();
        // A journal's pattern: sectors appended to one block, commit by commit.
        let mut want = vec![0u8; 4096];
        for i in 0..4usize {
            let sector = [i as u8 + 1; 512];
            h.write(i as u64 * 512, &sector).unwrap();
            want[i * 512..(i + 1) * 512].copy_from_slice(&sector);
            h.commit().unwrap();
        }
        assert_eq!(packs.1.load(Ordering::SeqCst), 0, "a merge read the pack");
        let mut got = vec![0u8; 4096];
        s.open_image("a").unwrap().read(0, &mut got).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn the_read_cache_grows_into_the_unused_dirty_limit_and_gives_it_back() {
        let packs = CountingPacks::default();
        let (_d, s) = store_on(packs.clone());
        let bs = 4096usize;
        s.set_read_cache(4 * bs);
        s.lend_to_read_cache(8 * bs);
        assert_eq!(s.read_cache_capacity(), 12, "nothing dirty: all of the loan");
        s.create_image("a", 12 * 4096).unwrap();
        s.create_image("b", 12 * 4096).unwrap();
        let mut a = s.open_image("a").unwrap();
        for b in 0..12u64 {
            a.write(b * 4096, &noise(b, bs)).unwrap();
        }
        assert_eq!(
            s.read_cache_capacity(),
            4,
            "12 dirty blocks: the loan is taken back"
        );
        a.commit().unwrap();
        assert_eq!(s.read_cache_capacity(), 12, "committed: lent again");
        let reads = || packs.1.load(Ordering::SeqCst);
        let read_all = |h: &ImageHandle| {
            for b in 0..12u64 {
                let mut got = vec![0u8; bs];
                h.read(b * 4096, &mut got).unwrap();
                assert_eq!(got, noise(b, bs), "block {b}");
            }
        };
        read_all(&a);
        let warm = reads();
        read_all(&a);
        assert_eq!(reads(), warm, "12 blocks fit in a cache of 12");

        // Another image's dirty blocks shrink the cache at once (evicting),
        // and dropping them gives the room back.
        let mut b = s.open_image("b").unwrap();
        b.write(0, &noise(100, 6 * bs)).unwrap();
        assert_eq!(s.read_cache_capacity(), 6);
        read_all(&a);
        assert!(reads() >= warm + 6, "a cache of 6 kept 12 blocks");
        drop(b);
        assert_eq!(s.read_cache_capacity(), 12, "a dropped handle holds nothing");
        read_all(&a);
        let warm = reads();
        read_all(&a);
        assert_eq!(reads(), warm);

        // Without a loan, the cache keeps its own size whatever is dirty.
        s.lend_to_read_cache(0);
        assert_eq!(s.read_cache_capacity(), 4);
        a.write(0, &noise(7, 12 * bs)).unwrap();
        assert_eq!(s.read_cache_capacity(), 4);
    }

    #[test]
    fn a_long_read_fetches_neighbouring_records_with_one_pack_read() {
        let packs = CountingPacks::default();
        let (_d, s) = store_on(packs.clone());
        s.create_image("a", 16 * 4096).unwrap();
        let data = noise(1, 16 * 4096);
        let mut h = s.open_image("a").unwrap();
        h.write(0, &data).unwrap();
        h.commit().unwrap();
        let before = packs.1.load(Ordering::SeqCst);
        let mut got = vec![0u8; data.len()];
        h.read(0, &mut got).unwrap();
        assert_eq!(got, data);
        // Block by block: two reads each (header, then payload).
        assert_eq!(packs.1.load(Ordering::SeqCst) - before, 1, "reads of the pack");
    }

    #[test]
    fn long_reads_of_large_or_many_blocks_come_back_whole() {
        // Blocks larger than a fetched span, and reads of more blocks than one span holds.
        for (bs, blocks) in [(4u32 << 20, 3u64), (64 << 10, 80)] {
            let (_d, s) = disk_store(bs);
            let len = blocks * bs as u64;
            s.create_image("a", len).unwrap();
            let data = noise(bs as u64, len as usize);
            let mut h = s.open_image("a").unwrap();
            h.write(0, &data).unwrap();
            h.commit().unwrap();
            drop(h);
            let h = s.open_image("a").unwrap();
            let mut got = vec![0u8; data.len()];
            h.read(0, &mut got).unwrap();
            assert!(got == data, "{bs}-byte blocks");
            let mut got = vec![0u8; data.len() - 1000];
            h.read(777, &mut got).unwrap();
            assert!(
                got[..] == data[777..777 + got.len()],
                "{bs}-byte blocks, unaligned"
            );
        }
    }

    #[test]
    fn a_long_read_over_a_damaged_record_fails_naming_it_and_caches_nothing() {
        use std::os::unix::fs::FileExt;
        let (dir, s) = disk_store(4096);
        s.create_image("a", 8 * 4096).unwrap();
        let data = noise(2, 8 * 4096);
        let mut h = s.open_image("a").unwrap();
        h.write(0, &data).unwrap();
        h.commit().unwrap();
        let hashes: Vec<BlockHash> = (0..8).map(|b| h.committed_hash(b).unwrap().unwrap()).collect();
        drop(h);
        // Damage block 3's payload in its pack.
        let loc = s.lookup(&hashes[3]).unwrap().unwrap();
        let path = dir.path().join("packs").join(format!("{:016x}.pack", loc.pack));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        let at = loc.offset + pack::RECORD_HEADER_LEN as u64 + 100;
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
        drop(s);
        let s = Store::open(dir.path(), OpenMode::ReadWrite).unwrap();
        let h = s.open_image("a").unwrap();
        let mut got = vec![0u8; data.len()];
        let e = h.read(0, &mut got).unwrap_err();
        assert!(
            matches!(e, Error::Integrity { block: Some(3), ref image, .. } if image.as_deref() == Some("a")),
            "{e}"
        );
        // The span's good records went straight to the reader: nothing cached.
        for (b, hash) in hashes.iter().enumerate() {
            assert!(!s.is_cached(hash), "block {b} was cached");
        }
        // Around the damage, long reads (unaligned too) come back whole.
        let mut got = vec![0u8; 3 * 4096 - 10];
        h.read(10, &mut got).unwrap();
        assert!(got[..] == data[10..3 * 4096]);
        let mut got = vec![0u8; 4 * 4096 - 1];
        h.read(4 * 4096, &mut got).unwrap();
        assert!(got[..] == data[4 * 4096..8 * 4096 - 1]);
    }

    #[test]
    /// Every way a handle's jobs can end gives their pack pins back: applied
    /// and committed, outstanding when the handle is dropped, taken before a
    /// discard, failed. (A leaked pin keeps its pack claimed: GC could never
    /// compact it.)
    fn pack_pins_are_given_back() {
        let faults = FaultPacks::new(MemPacks::new());
        let (_d, s) = store_on(faults.clone());
        s.create_image("a", 8 * 4096).unwrap();
        let mut h = s.open_image("a").unwrap();
        // Two jobs applied, then committed.
        h.write(0, &[1; 2 * 4096]).unwrap();
        let j1 = h.seal_job(0).unwrap().unwrap();
        h.write(2 * 4096, &[2; 2 * 4096]).unwrap();
        let j2 = h.seal_job(0).unwrap().unwrap();
        j2.run();
        j1.run();
        assert!(s.pins() > 0);
        h.commit().unwrap();
        assert_eq!(s.pins(), 0, "after a commit");
        // Jobs run, not applied, when the handle is dropped.
        h.write(0, &[3; 4096]).unwrap();
        h.seal_job(0).unwrap().unwrap().run();
        h.write(4096, &[4; 4096]).unwrap();
        let outstanding = h.seal_job(0).unwrap().unwrap();
        outstanding.run();
        drop(h);
        assert_eq!(s.pins(), 0, "after a drop with results not applied");
        // A job taken before a discard.
        let mut h = s.open_image("a").unwrap();
        h.write(0, &[5; 4096]).unwrap();
        let j = h.seal_job(0).unwrap().unwrap();
        h.discard();
        j.run();
        h.write(4096, &[6; 4096]).unwrap();
        h.commit().unwrap();
        assert_eq!(s.pins(), 0, "after a discard");
        // A failed job, and a failed commit.
        h.write(0, &[7; 4096]).unwrap();
        h.seal_job(0).unwrap().unwrap().run(); // appended, pinned
        faults.set_plan(FaultPlan {
            enospc_after_bytes: Some(0),
            ..Default::default()
        });
        h.write(4096, &[8; 4096]).unwrap();
        h.seal_job(0).unwrap().unwrap().run(); // fails
        assert!(h.commit().is_err());
        faults.set_plan(FaultPlan::default());
        assert_eq!(s.pins(), 0, "after a failed job");
        h.write(0, &[9; 4096]).unwrap();
        faults.set_plan(FaultPlan {
            fail_sync_at: Some(0),
            ..Default::default()
        });
        assert!(h.commit().is_err());
        faults.set_plan(FaultPlan::default());
        assert_eq!(s.pins(), 0, "after a failed commit");
        drop(h);
        assert_eq!(s.pins(), 0);
    }

    /// Reads of every block of `h` against `model` (and what is data).
    fn check_model(h: &ImageHandle, model: &[u8], bs: usize) {
        let mut got = vec![0; model.len()];
        assert_eq!(h.read(0, &mut got).unwrap(), model.len());
        for (b, (g, m)) in got.chunks(bs).zip(model.chunks(bs)).enumerate() {
            assert!(g == m, "block {b} reads wrong");
            let data = m.iter().any(|&x| x != 0);
            assert_eq!(
                h.seek_data((b * bs) as u64).unwrap() == Some((b * bs) as u64),
                data,
                "block {b}"
            );
        }
        let data_blocks = model.chunks(bs).filter(|c| c.iter().any(|&x| x != 0)).count();
        assert_eq!(h.allocated_bytes().unwrap(), (data_blocks * bs) as u64);
    }

    /// A job a writer starts leaves a block written in part for the write
    /// that completes it (no merge with the old contents, no second seal),
    /// but takes it once it is no longer young; an eager job, `seal_job` and
    /// a commit take it at once.
    #[test]
    fn a_block_written_in_part_waits_for_its_other_part_before_a_seal_job_takes_it() {
        let (_d, s) = store();
        let bs = s.block_size() as usize;
        s.create_image("a", 64 * bs as u64).unwrap();
        let mut h = s.open_image("a").unwrap();
        let mut model = vec![0u8; 64 * bs];
        let put = |h: &mut ImageHandle, model: &mut Vec<u8>, at: usize, data: &[u8]| {
            h.write(at as u64, data).unwrap();
            model[at..at + data.len()].copy_from_slice(data);
        };
        let taken = |job: &SealJob| job.blocks.iter().map(|(b, _, _)| *b).collect::<Vec<_>>();
        put(&mut h, &mut model, 0, &noise(1, 4 * bs));
        h.commit().unwrap();
        // A long write ending half-way into block 1 (the loop device's split).
        put(&mut h, &mut model, 0, &noise(2, bs + bs / 2));
        let job = h.seal_job_when(0, false).unwrap().expect("block 0 to seal");
        assert_eq!(taken(&job), vec![0], "a job took the fresh edge block");
        job.run();
        // Its other part comes: a whole block now, never merged with the old one.
        let half = noise(3, bs / 2);
        put(&mut h, &mut model, bs + bs / 2, &half);
        assert!(matches!(h.dirty.get(&1), Some(Dirty::Data(_))));
        // An edge that stays half-written waits, then is taken once old.
        put(&mut h, &mut model, 2 * bs, &half);
        let job = h.seal_job_when(0, false).unwrap().expect("block 1 to seal");
        assert_eq!(taken(&job), vec![1]);
        job.run();
        for i in 0..PARTIAL_GRACE {
            put(&mut h, &mut model, (10 + i as usize) * bs, &noise(10 + i, bs));
        }
        let job = h.seal_job_when(0, false).unwrap().expect("blocks to seal");
        assert!(taken(&job).contains(&2), "an old half-written block was left");
        job.run();
        put(&mut h, &mut model, 40 * bs, &half);
        let job = h.seal_job_when(usize::MAX, true).unwrap().expect("an eager job");
        assert!(taken(&job).contains(&40));
        job.run();
        put(&mut h, &mut model, 41 * bs, &half);
        assert!(
            h.seal_job_when(0, false).unwrap().is_none(),
            "only a young edge is dirty"
        );
        let job = h.seal_job(0).unwrap().expect("seal_job takes every dirty block");
        assert_eq!(taken(&job), vec![41]);
        drop(job); // (runs)
        put(&mut h, &mut model, 42 * bs, &half);
        check_model(&h, &model, bs);
        h.commit().unwrap();
        assert!(!h.is_dirty());
        drop(h);
        check_model(&s.open_image("a").unwrap(), &model, bs);
    }

    /// A flush commits the blocks sealed so far as a new version while the
    /// handle goes on: writes over flushed blocks, punches, new blocks and
    /// new seals meanwhile read right before and after it lands, the
    /// flushed version holds exactly what was cut, and the next commit the rest.
    #[test]
    fn a_flush_commits_the_sealed_blocks_while_the_handle_goes_on() {
        let (_d, s) = store();
        let bs = s.block_size() as usize;
        s.create_image("a", 32 * bs as u64).unwrap();
        let mut h = s.open_image("a").unwrap();
        let mut model = vec![0u8; 32 * bs];
        let put = |h: &mut ImageHandle, model: &mut Vec<u8>, b: usize, data: Vec<u8>| {
            h.write((b * bs) as u64, &data).unwrap();
            model[b * bs..(b + 1) * bs].copy_from_slice(&data);
        };
        put(&mut h, &mut model, 10, noise(100, bs));
        let v1 = h.commit().unwrap().version;
        for b in 0..8 {
            put(&mut h, &mut model, b, noise(b as u64, bs));
        }
        h.punch((10 * bs) as u64, bs as u64).unwrap(); // a hole over committed data
        model[10 * bs..11 * bs].fill(0);
        h.seal_job(0).unwrap().unwrap().run();
        let flushed = model.clone();
        let f = h.begin_flush().unwrap().expect("sealed blocks to flush");
        assert!(h.begin_flush().unwrap().is_none(), "one flush at a time");
        assert_eq!(h.staged_bytes(), 0);
        assert!(h.is_dirty());
        check_model(&h, &model, bs);

        // Changes on top of the flush in flight, some sealed.
        put(&mut h, &mut model, 3, noise(200, bs));
        put(&mut h, &mut model, 20, noise(201, bs));
        h.punch((5 * bs) as u64, bs as u64).unwrap();
        model[5 * bs..6 * bs].fill(0);
        h.seal_job(0).unwrap().unwrap().run();
        h.apply_finished().unwrap();
        put(&mut h, &mut model, 4, noise(202, bs)); // dirty
        check_model(&h, &model, bs);

        let ticket = f.run();
        check_model(&h, &model, bs); // committed, not landed yet
        assert_eq!(s.image_info("a").unwrap().version, v1 + 1);
        h.land_flush(&ticket).unwrap();
        h.land_flush(&ticket).unwrap(); // landed once
        assert_eq!(h.version(), v1 + 1);
        check_model(&h, &model, bs);

        // The flushed version holds what was cut, nothing later.
        check_model(&s.open_image("a").unwrap(), &flushed, bs);
        assert_eq!(h.commit().unwrap().version, v1 + 2);
        check_model(&h, &model, bs);
        drop(h);
        check_model(&s.open_image("a").unwrap(), &model, bs);
        assert_eq!(s.pins(), 0, "a pack pin leaked");
    }

    /// Writes past the end grow the image; a flush commits the grown size
    /// with its blocks (a cp of a new image into the mount is flushed as it
    /// goes, not only at the end), and the handle's committed size follows.
    #[test]
    fn a_flush_carries_the_size_grown_by_writes() {
        let (_d, s) = store();
        let bs = s.block_size();
        s.create_image("a", 2 * bs).unwrap();
        let mut h = s.open_image("a").unwrap();
        h.write(0, &noise(1, bs as usize)).unwrap();
        h.write(5 * bs, &noise(2, bs as usize)).unwrap(); // grows to 6 blocks
        h.seal_job(0).unwrap().unwrap().run();
        let f = h.begin_flush().unwrap().expect("a grown image flushes");
        h.write(7 * bs, &noise(3, 10)).unwrap(); // grows on meanwhile
        assert!(!h.is_stale().unwrap());
        let t = f.run();
        assert!(!h.is_stale().unwrap(), "flushed, not landed: not stale");
        assert_eq!(s.image_info("a").unwrap().size, 6 * bs);
        h.land_flush(&t).unwrap();
        assert!(!h.is_stale().unwrap());
        assert_eq!(h.size(), 7 * bs + 10);
        let mut b = vec![0; bs as usize];
        let reader = s.open_image("a").unwrap();
        assert_eq!(reader.size(), 6 * bs);
        reader.read(5 * bs, &mut b).unwrap();
        assert_eq!(b, noise(2, bs as usize));
        drop(reader);
        h.commit().unwrap();
        assert_eq!(s.image_info("a").unwrap().size, 7 * bs + 10);
        // Cut shorter: no flush, a full commit takes it.
        h.set_size(bs).unwrap();
        h.write(0, &noise(4, bs as usize)).unwrap();
        h.seal_job(0).unwrap().unwrap().run();
        assert!(h.begin_flush().unwrap().is_none());
        h.commit().unwrap();
        assert_eq!(s.image_info("a").unwrap().size, bs);
    }

    /// A commit (an fsync) while a flush runs elsewhere waits for it, and
    /// makes everything durable after it.
    #[test]
    fn a_commit_waits_for_the_flush_in_flight() {
        let (_d, s) = disk_store(4096);
        s.create_image("a", 16 * 4096).unwrap();
        let mut h = s.open_image("a").unwrap();
        let v0 = h.version();
        h.write(0, &noise(1, 4 * 4096)).unwrap();
        h.seal_job(0).unwrap().unwrap().run();
        let f = h.begin_flush().unwrap().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let runner = std::thread::spawn(move || {
            rx.recv().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50)); // (likely: the commit waits)
            f.run()
        });
        h.write(4 * 4096, &noise(2, 4096)).unwrap();
        tx.send(()).unwrap();
        assert_eq!(h.commit().unwrap().version, v0 + 2);
        let ticket = runner.join().unwrap();
        h.land_flush(&ticket).unwrap(); // the commit took it
        assert_eq!(h.version(), v0 + 2);
        drop(h);
        let mut all = noise(1, 4 * 4096);
        all.extend(noise(2, 4096));
        let mut got = vec![0; all.len()];
        s.open_image("a").unwrap().read(0, &mut got).unwrap();
        assert_eq!(got, all);
    }

    /// A flush that fails (its records' sync, the quota at commit time, or
    /// dropped unrun) drops every uncommitted change, the later ones too, as
    /// a failed commit does: the handle is back at the last version, intact.
    #[test]
    fn a_failed_flush_drops_every_uncommitted_change() {
        use crate::backend::{FaultPacks, FaultPlan};
        let faults = FaultPacks::new(MemPacks::new());
        let (_d, s) = store_on(faults.clone());
        let bs = s.block_size() as usize;
        s.create_image("a", 16 * bs as u64).unwrap();
        let mut h = s.open_image("a").unwrap();
        let kept = noise(9, bs);
        h.write(0, &kept).unwrap();
        let v1 = h.commit().unwrap().version;
        let mut model = vec![0u8; 16 * bs];
        model[..bs].copy_from_slice(&kept);
        type Breaker<'a> = Box<dyn Fn(&Flush) + 'a>;
        let cases: Vec<(&str, Breaker)> = vec![
            (
                "sync",
                Box::new(|_| {
                    faults.set_plan(FaultPlan {
                        fail_sync_at: Some(0),
                        ..Default::default()
                    })
                }),
            ),
            (
                "quota",
                Box::new(|_| s.set_quota("a", Some(2 * bs as u64)).unwrap()),
            ),
        ];
        for (why, break_it) in cases {
            for b in 1..5 {
                h.write((b * bs) as u64, &noise(b as u64, bs)).unwrap();
            }
            h.seal_job(0).unwrap().unwrap().run();
            let f = h.begin_flush().unwrap().unwrap();
            h.write((6 * bs) as u64, &noise(6, bs)).unwrap(); // later: dropped too
            break_it(&f);
            let e = h.land_flush(&f.run()).unwrap_err();
            match why {
                "sync" => assert!(matches!(e, Error::Io { .. }), "{e}"),
                _ => assert!(matches!(e, Error::QuotaExceeded { .. }), "{e}"),
            }
            faults.set_plan(FaultPlan::default());
            s.set_quota("a", None).unwrap();
            assert!(!h.is_dirty(), "{why}");
            assert_eq!(h.version(), v1, "{why}");
            check_model(&h, &model, bs);
        }
        // Dropped unrun: the next commit says so, and drops the rest.
        h.write(bs as u64, &noise(1, bs)).unwrap();
        h.seal_job(0).unwrap().unwrap().run();
        drop(h.begin_flush().unwrap().unwrap());
        let e = h.commit().unwrap_err();
        assert!(e.to_string().contains("dropped unrun"), "{e}");
        check_model(&h, &model, bs);
        assert_eq!(h.commit().unwrap().version, v1); // nothing left
        drop(h);
        check_model(&s.open_image("a").unwrap(), &model, bs);
        assert_eq!(s.pins(), 0, "a pack pin leaked");
    }

    #[test]
    fn a_failed_flush_taken_by_a_resize_is_counted_as_a_failure() {
        // A flush runs with the handle free: a resize (a truncate from
        // another file handle) can be the call that takes its result. The
        // writes it dropped must be counted, so their writer hears of it.
        use crate::backend::{FaultPacks, FaultPlan};
        let faults = FaultPacks::new(MemPacks::new());
        let (_d, s) = store_on(faults.clone());
        let bs = s.block_size() as usize;
        s.create_image("a", 8 * bs as u64).unwrap();
        let mut h = s.open_image("a").unwrap();
        h.write(0, &noise(1, bs)).unwrap();
        let v1 = h.commit().unwrap().version;
        h.write(bs as u64, &noise(2, bs)).unwrap();
        h.seal_job(0).unwrap().unwrap().run();
        let f = h.begin_flush().unwrap().unwrap();
        faults.set_plan(FaultPlan {
            fail_sync_at: Some(0),
            ..Default::default()
        });
        let _ticket = f.run();
        faults.set_plan(FaultPlan::default());
        assert_eq!(h.failures(), 0);
        let e = h.set_size(16 * bs as u64).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert_eq!(h.failures(), 1, "the dropped writes were not counted");
        assert_eq!(h.version(), v1);
        assert!(!h.is_dirty());
    }

    #[test]
    fn a_failed_seal_job_fails_the_commit_and_keeps_the_old_version() {
        use crate::backend::{FaultPacks, FaultPlan};
        let faults = FaultPacks::new(MemPacks::new());
        let (_d, s) = store_on(faults.clone());
        s.create_image("a", 2 * 4096).unwrap();
        let mut h = s.open_image("a").unwrap();
        h.write(0, &[5; 2 * 4096]).unwrap();
        h.commit().unwrap();
        h.write(0, &[6; 4096]).unwrap();
        faults.set_plan(FaultPlan {
            enospc_after_bytes: Some(0),
            ..Default::default()
        });
        h.seal_job(0).unwrap().unwrap().run();
        faults.set_plan(FaultPlan::default());
        assert!(matches!(h.commit(), Err(Error::NoSpace(_))));
        let mut b = vec![0; 2 * 4096];
        h.read(0, &mut b).unwrap();
        assert_eq!(b, vec![5; 2 * 4096]);
        drop(h);
        s.open_image("a").unwrap().read(0, &mut b).unwrap();
        assert_eq!(b, vec![5; 2 * 4096]);
        assert_eq!(s.pins(), 0, "a pack pin leaked");
    }

    #[test]
    fn unchanged_rewrite_makes_no_version() {
        let (_d, s) = store();
        s.create_image("a", 4096).unwrap();
        let mut h = s.open_image("a").unwrap();
        h.write(0, &[1; 4096]).unwrap();
        assert!(h.commit().unwrap().changed);
        h.write(0, &[1; 4096]).unwrap();
        assert!(!h.commit().unwrap().changed);
    }
}
