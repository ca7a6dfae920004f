//! The store: opening, the pack writer, block reads, and image metadata
//! operations (create, snapshot, rollback, clone, remove, diff, statistics).
//! Maintenance (GC, scrub, reindex) is in [`crate::store::maint`].
//!
//! Locking inside a process (across processes: see `ARCHITECTURE.md`):
//! - `db`: one SQLite connection behind a mutex; every metadata operation is
//!   one short transaction under it.
//! - `writer`: the active pack; held while a batch of records is appended.
//! - `gate`: the stage gate (see the crate docs, invariant 4).
//! - `checkpointer`: the WAL checkpoint's own connection and state.
//!
//! Lock order: `gate` → `writer` → `db`, and `checkpointer` → `db` (the
//! WAL's restart holds the connection). Pack reads take no store lock.

pub mod maint;
pub mod replica;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tracing::{debug, info, warn};

use crate::backend::{DiskPacks, PackId, PackStorage};
use crate::image::Staged;
use crate::meta::{self, FORMAT_VERSION};
use crate::pack::{
    self, align_up, Codec, Compression, RecordHeader, Sealed, PACK_DATA_START, RECORD_HEADER_LEN,
};
use crate::proof::Proof;
use crate::{validate_name, BlockHash, Error, ImageHandle, NodeId, Result, Stamp};

/// Default bytes of decompressed blocks kept for re-reading.
pub const DEFAULT_READ_CACHE: usize = 128 << 20;

fn cache_entries(bytes: usize, block_size: u32) -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new((bytes / block_size.max(1) as usize).max(1)).unwrap()
}

/// Bytes of piece proofs kept (with 64 KiB blocks ~700 bytes each, so the
/// raw blocks of ~1.5 GiB of image are read piece by piece once read whole).
pub const PROOF_CACHE: usize = 16 << 20;

/// A raw block's place and piece proof.
#[derive(Debug)]
struct Proven {
    loc: BlockLoc,
    proof: Proof,
}

fn proof_entries(bytes: usize, block_size: u32) -> std::num::NonZeroUsize {
    if !Proof::applies(block_size as usize) {
        return std::num::NonZeroUsize::MIN; // blocks of one piece have none
    }
    // The proof's chaining values, plus its key, place, the `Arc` and the
    // cache's node and table slot.
    let each = block_size as usize / crate::proof::PIECE * 32 + 192;
    std::num::NonZeroUsize::new((bytes / each).max(1)).unwrap()
}

/// Bytes of `block` from `within` on into `out`, zeros past its end.
pub(crate) fn copy_from(block: &[u8], within: usize, out: &mut [u8]) {
    let from = block.get(within..).unwrap_or_default();
    let n = from.len().min(out.len());
    out[..n].copy_from_slice(&from[..n]);
    out[n..].fill(0);
}

/// The read cache's bound: its own bytes, plus the part of `lent` (at most
/// the mount's dirty limit) that open images' dirty blocks do not hold
/// (`held`). The cache and the dirty blocks together stay within `own`
/// plus the dirty limit either way, and random reads of a working set
/// larger than `own` get the dirty set's share while nothing is written.
#[derive(Debug)]
struct CacheBudget {
    own: usize,
    lent: usize,
    held: usize,
}

impl CacheBudget {
    fn bytes(&self) -> usize {
        if self.own == 0 {
            return 0; // disabled
        }
        self.own + self.lent.saturating_sub(self.held)
    }
}

/// A pack is closed and a new one started once it reaches this size.
pub const PACK_TARGET_SIZE: u64 = 64 << 20;

/// Options of `geosync init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Block size in bytes: a power of two from 4 KiB to 4 MiB.
    pub block_size: u32,
    /// Block compression.
    pub compression: Compression,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            block_size: 64 << 10,
            compression: Compression::Zstd(3),
        }
    }
}

/// How a store is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Readers only; any number of processes may do this at once.
    ReadOnly,
    /// Readers and writers; several processes may do this at once.
    ReadWrite,
}

/// Where a block's record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLoc {
    /// Pack number.
    pub pack: PackId,
    /// Offset of the record header in the pack.
    pub offset: u64,
    /// Payload length.
    pub stored_len: u32,
    /// Raw block length.
    pub raw_len: u32,
    /// Payload encoding.
    pub codec: Codec,
}

impl BlockLoc {
    fn end(&self) -> u64 {
        self.offset + RECORD_HEADER_LEN as u64 + self.stored_len as u64
    }
}

/// An image as `ls` / `info` show it.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    /// Name.
    pub name: String,
    /// Logical size in bytes.
    pub size: u64,
    /// Head version.
    pub version: u64,
    /// Stamp of the head version.
    pub stamp: Stamp,
    /// Quota on referenced bytes, if set.
    pub quota: Option<u64>,
    /// Bytes in non-hole blocks of the head (before dedup and compression).
    pub referenced: u64,
    /// Compressed bytes of the distinct blocks the head uses (shared blocks counted in full).
    pub stored: u64,
    /// Snapshots, oldest first.
    pub snapshots: Vec<SnapshotInfo>,
    /// Creation time (ms since the epoch).
    pub created_ms: u64,
}

/// A snapshot of an image.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    /// Snapshot name.
    pub name: String,
    /// The image version it pins.
    pub version: u64,
    /// Image size at that version.
    pub size: u64,
    /// Stamp of that version.
    pub stamp: Stamp,
    /// When the snapshot was taken (ms since the epoch).
    pub created_ms: u64,
}

/// Store-wide usage, the figures `zfs get compressratio` / `zpool get dedupratio` give.
#[derive(Clone, Debug, Default)]
pub struct StoreStats {
    /// Number of images.
    pub images: u64,
    /// Number of snapshots.
    pub snapshots: u64,
    /// Σ image sizes.
    pub logical: u64,
    /// Σ non-hole bytes of image heads (before dedup and compression).
    pub referenced: u64,
    /// Raw bytes of the distinct blocks the heads use (after dedup, before compression).
    pub unique: u64,
    /// Raw bytes of the distinct blocks heads and snapshots use.
    pub unique_with_snapshots: u64,
    /// Compressed bytes of the distinct blocks heads and snapshots use.
    pub stored: u64,
    /// Bytes of all pack files (includes garbage awaiting `gc`).
    pub pack_bytes: u64,
    /// Blocks in the index.
    pub indexed_blocks: u64,
    /// `unique_with_snapshots / stored`.
    pub compress_ratio: f64,
    /// `referenced / unique`.
    pub dedup_ratio: f64,
}

/// The result of `diff`: changed block ranges between two retained versions.
#[derive(Clone, Debug)]
pub struct Diff {
    /// Older version.
    pub from_version: u64,
    /// Newer version.
    pub to_version: u64,
    /// Image size at `from_version`.
    pub from_size: u64,
    /// Image size at `to_version`.
    pub to_size: u64,
    /// Changed blocks as half-open ranges of block indexes, ascending.
    pub changed: Vec<Range<u64>>,
}

/// Store configuration read from `meta.db`.
#[derive(Clone, Copy, Debug)]
pub struct StoreConfig {
    /// Block size in bytes.
    pub block_size: u32,
    /// Compression of new blocks.
    pub compression: Compression,
    /// This store's node id (origin of its stamps).
    pub node_id: NodeId,
}

#[derive(Debug, Default)]
struct GateState {
    stagers: usize,
    gc: bool,
}

/// Held by a writer from its first sealed block until its commit ends.
#[derive(Debug)]
pub(crate) struct StageGuard {
    inner: Arc<Inner>,
}

impl Drop for StageGuard {
    fn drop(&mut self) {
        let mut st = self.inner.gate.lock().unwrap();
        st.stagers -= 1;
        if st.stagers == 0 {
            if let Some(f) = &self.inner.gc_lock {
                let _ = f.unlock();
            }
        }
        self.inner.gate_cv.notify_all();
    }
}

struct GcGuard {
    inner: Arc<Inner>,
    /// `gc.intent` and `gc.lock`, held exclusively.
    cross_process: Vec<std::fs::File>,
}

impl Drop for GcGuard {
    fn drop(&mut self) {
        for f in self.cross_process.drain(..).rev() {
            let _ = f.unlock();
        }
        self.inner.gate.lock().unwrap().gc = false;
        self.inner.gate_cv.notify_all();
    }
}

/// One of [`APPEND_LANES`] independent appenders, each with a pack of its own.
#[derive(Debug, Default)]
struct Lane {
    /// The pack being appended to (claimed by this process) and its length.
    active: Option<(PackId, u64)>,
    /// The aligned write buffer, kept for the next batch.
    buf: Option<pack::AlignedBuf>,
}

/// Appenders writing at once, each to its own pack. Appends from seal jobs
/// running side by side no longer wait for each other's copy and write:
/// with one appender, sequential writes spent most of their time queued on
/// it (the disk here takes one 8 MiB `O_DIRECT` write at ~2 GB/s).
const APPEND_LANES: usize = 2;

/// A held lane. If its holder panics mid-append, the lane is reset as the
/// panic unwinds: its pack's end may hold a partial write, so the pack takes
/// no more records (those before stand) and its claim follows its pins.
struct LaneGuard<'a> {
    store: &'a Store,
    lane: MutexGuard<'a, Lane>,
}

impl std::ops::Deref for LaneGuard<'_> {
    type Target = Lane;
    fn deref(&self) -> &Lane {
        &self.lane
    }
}

impl std::ops::DerefMut for LaneGuard<'_> {
    fn deref_mut(&mut self) -> &mut Lane {
        &mut self.lane
    }
}

impl Drop for LaneGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.lane.buf = None;
            if let Some((id, _)) = self.lane.active.take() {
                tracing::warn!(pack = id, "an append panicked: its pack takes no more records");
                self.store.retire(id);
            }
        }
    }
}

/// Which packs hold uncommitted records, and which are being appended to:
/// a pack's claim is kept while either holds.
#[derive(Debug, Default)]
struct PackUse {
    /// Handles with uncommitted records in each pack.
    users: HashMap<PackId, usize>,
    /// Packs some lane appends to.
    active: HashSet<PackId>,
}

/// Size of the append buffer each lane keeps between batches: a seal job's
/// blocks (`image::SEAL_JOB_BYTES`) and their record headers fit. Larger
/// batches (compaction) get a buffer of their own, freed after.
const REUSED_BUF: usize = 10 << 20;

#[derive(Debug)]
pub(crate) struct Inner {
    dir: Option<PathBuf>,
    pub(crate) packs: Box<dyn PackStorage>,
    db: Mutex<Connection>,
    /// The database file, for connections of helpers ([`Store::checkpoint`]).
    db_path: PathBuf,
    /// What [`Store::checkpoint`] keeps between calls.
    checkpointer: Mutex<CheckpointState>,
    pub(crate) config: StoreConfig,
    mode: OpenMode,
    /// `STORE/gc.lock`: held shared by a process while it has stagers, and
    /// exclusively by a GC (cross-process half of the stage gate).
    gc_lock: Option<std::fs::File>,
    /// `STORE/gc.intent`: held exclusively by a GC from before it waits for
    /// `gc.lock`. A process whose first stager enters passes through it
    /// shared (so it waits while a GC waits: flock itself lets shared
    /// lockers overtake an exclusive waiter), and a mount that sees it taken
    /// stops sealing and commits the images in the gate ([`Store::gc_waiting`]).
    gc_intent: Option<std::fs::File>,
    /// Lock order: a lane, then `uses`, then `poisoned`; a lane may wait for
    /// the database (a new pack's number), never the other way round.
    lanes: Vec<Mutex<Lane>>,
    uses: Mutex<PackUse>,
    /// Serializes pack syncs (see `sync_packs`).
    sync_lock: Mutex<()>,
    /// Packs whose sync, or append other than on a full disk, failed: their
    /// unsynced tail may be lost. (A pack whose append found the disk full
    /// only takes no more records: see `append`.)
    /// Its own lock, taken last and held briefly, so `sync_packs` never
    /// waits for a lane (a lane may be held through a long write).
    poisoned: Mutex<HashSet<PackId>>,
    /// Packs appended to since their last good sync (by anyone): the others
    /// are durable already, and `sync_packs` skips them. An image's flushes
    /// each name every pack it wrote since its last full commit; without
    /// this a long write synced the same clean packs again and again (an
    /// `fdatasync` is a device flush even on a clean file). Same lock rules
    /// as `poisoned`.
    unsynced: Mutex<HashSet<PackId>>,
    /// Recently read blocks, verified and decompressed (bounded by bytes).
    cache: Mutex<lru::LruCache<BlockHash, Arc<[u8]>>>,
    /// What bounds `cache` (lock order: this, then `cache`).
    cache_budget: Mutex<CacheBudget>,
    /// The read cache is disabled (bound 0): nothing goes in (an LRU holds
    /// at least one entry).
    cache_off: std::sync::atomic::AtomicBool,
    /// Where raw blocks read whole lately lie, with their piece proofs: a
    /// small read of one of them reads and verifies only its pieces
    /// ([`Store::read_part`]). Bounded by [`PROOF_CACHE`] bytes.
    proofs: Mutex<lru::LruCache<BlockHash, Arc<Proven>>>,
    /// Reads [`Store::read_part`] served piece by piece (tests).
    #[cfg(test)]
    piece_reads: std::sync::atomic::AtomicUsize,
    gate: Mutex<GateState>,
    gate_cv: Condvar,
}

/// A handle on an open store; cheap to clone and shared by threads.
#[derive(Clone, Debug)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

/// How a record is read from its pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Via {
    /// Buffered: the page cache is a second-level cache for what the read
    /// cache drops (random reads of a working set larger than it).
    PageCache,
    /// [`Via::PageCache`], for an image's reads: a raw block read whole
    /// leaves its piece proof, so later small reads of it read only their
    /// pieces ([`Store::read_part`]). (Scrub, compaction and exports read
    /// each block once: a proof would cost them the hashing twice over
    /// and push the image reads' proofs out.)
    Proven,
    /// One `O_DIRECT` read of the pages the record lies in (where the pack
    /// file system takes it), copied out of a buffer kept per thread. For
    /// the old contents of a block a partial write is merged with: they die
    /// with the merge, and the merged block goes to the read cache. Buffered,
    /// under fio's random writes each such read allocated fresh page-cache
    /// pages (a fault in the host on this VM) and read ahead past the
    /// record: direct, ~2.95k -> ~3.3k IOPS. For reads of the image, direct
    /// halved fio's random 4 KiB reads (~29k -> ~16k IOPS: their working set
    /// lives in the page cache).
    Direct,
}

/// Alignment of direct reads of packs.
const SPAN_ALIGN: u64 = 4096;

/// The page-aligned span `[start, end)` holding the pack bytes `[from, to)`.
fn page_span(from: u64, to: u64) -> (u64, u64) {
    (
        from / SPAN_ALIGN * SPAN_ALIGN,
        to.div_ceil(SPAN_ALIGN) * SPAN_ALIGN,
    )
}

/// `f` on a page-aligned buffer of `len` bytes (a multiple of
/// [`SPAN_ALIGN`]), kept per thread: one record's worth for a thread that
/// reads single records (the disk threads merging partial blocks: each
/// zeroed 2 MiB it never used), else [`SPAN_MAX`] and a page each side.
fn with_span_buf<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static SPAN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SPAN.with(|buf| {
        let mut buf = buf.borrow_mut();
        let align = SPAN_ALIGN as usize;
        if buf.len() < len + align {
            let one_record = len + align <= SMALL_SPAN_BUF;
            *buf = vec![
                0u8;
                if one_record {
                    SMALL_SPAN_BUF
                } else {
                    (len + align).max((SPAN_MAX + 3 * SPAN_ALIGN) as usize)
                }
            ];
        }
        let at = buf.as_ptr().align_offset(align);
        f(&mut buf[at..at + len])
    })
}

/// A thread's span buffer while it reads no more than a 64 KiB block's
/// record at a time.
const SMALL_SPAN_BUF: usize = 128 << 10;

/// Where a block's record is.
const LOOKUP_SQL: &str = "SELECT pack, offset, stored_len, raw_len, codec FROM blocks WHERE hash = ?1";

/// Longest run of records [`Store::read_blocks_into`] reads at once.
const SPAN_MAX: u64 = 2 << 20;

/// Bytes between two records [`Store::read_blocks_into`] reads through (a
/// batch's padding to the next page, a record it does not need).
const SPAN_GAP: u64 = 64 << 10;

/// An integrity error about the record of `hash` at `loc`.
fn record_integrity(hash: &BlockHash, loc: &BlockLoc, what: String) -> Error {
    Error::Integrity {
        what,
        hash: *hash,
        pack: loc.pack,
        offset: loc.offset,
        image: None,
        block: None,
    }
}

/// A failed read of the record of `hash` at `loc` (cut short: damage).
fn record_read_error(hash: &BlockHash, loc: &BlockLoc, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => record_integrity(hash, loc, "record is truncated".into()),
        _ => Error::io(format!("reading pack {} at {}", loc.pack, loc.offset), e),
    }
}

/// Check that a record's header matches what the index says of it.
fn check_record_header(hash: &BlockHash, loc: &BlockLoc, head: &[u8]) -> Result<RecordHeader> {
    let header = RecordHeader::decode(head.try_into().unwrap())
        .map_err(|w| record_integrity(hash, loc, w.to_string()))?;
    if header.hash != *hash || header.stored_len != loc.stored_len || header.codec != loc.codec {
        return Err(record_integrity(
            hash,
            loc,
            "record header does not match the index".into(),
        ));
    }
    Ok(header)
}

/// Verify and open a whole record (header and payload) read from `loc`.
fn open_record(hash: &BlockHash, loc: &BlockLoc, record: &[u8]) -> Result<Arc<[u8]>> {
    let header = check_record_header(hash, loc, &record[..RECORD_HEADER_LEN])?;
    pack::open_shared(&record[RECORD_HEADER_LEN..], header.codec, header.raw_len, hash)
        .map_err(|w| record_integrity(hash, loc, w))
}

/// WAL frames (pages) past which [`Store::checkpoint`] restarts the WAL.
pub const WAL_RESTART_FRAMES: u64 = 4096;

/// What a [`Store::checkpoint`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Frames (pages) in the WAL.
    pub frames: u64,
    /// Of them, copied into the database.
    pub copied: u64,
    /// Whether the WAL was restarted: all of it copied, and no reader in it,
    /// so the next commit writes it from its start.
    pub restarted: bool,
}

/// [`Store::checkpoint`]'s connection and memory.
#[derive(Debug, Default)]
struct CheckpointState {
    conn: Option<Connection>,
    /// WAL frames at the last call (unchanged: no commit since).
    last_frames: u64,
    /// Calls left before a restart is tried again after a reader foiled one.
    skip_restarts: u32,
    /// Restarts foiled in a row.
    foiled: u32,
    /// Failed calls in a row.
    failures: u32,
}

/// Failed [`Store::checkpoint`] calls in a row after which SQLite's own
/// checkpoints come back.
pub const CHECKPOINT_FAILURES_MAX: u32 = 20;

/// Bytes a restarted WAL is cut back to.
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// How often a process that defers checkpoints should call [`Store::checkpoint`].
pub const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// How long [`Store::checkpoint`] waits for a commit or a reader to finish.
pub const CHECKPOINT_BUSY_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

fn db_path(dir: &Path) -> PathBuf {
    dir.join("meta.db")
}

impl Store {
    /// Create a store in `dir` (created if missing; must not hold a store).
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        if db_path(dir).exists() {
            return Err(Error::StoreExists(dir.display().to_string()));
        }
        let packs = DiskPacks::new(dir.join("packs")).map_err(|e| Error::io("creating packs/", e))?;
        Self::init_with(&db_path(dir), Box::new(packs), opts)?;
        Self::open(dir, OpenMode::ReadWrite)
    }

    /// Create the metadata of a store whose packs live in `packs` (tests: memory or faults).
    pub fn init_with(db: &Path, packs: Box<dyn PackStorage>, opts: &InitOptions) -> Result<()> {
        let bs = opts.block_size;
        if !bs.is_power_of_two() || !(4096..=pack::MAX_BLOCK).contains(&bs) {
            return Err(Error::InvalidArgument(format!(
                "block size {bs} must be a power of two from 4 KiB to 4 MiB"
            )));
        }
        drop(packs);
        let mut conn = Connection::open(db)?;
        meta::configure(&conn)?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(meta::SCHEMA)?;
        tx.execute_batch(meta::MIGRATIONS)?;
        meta::set(&tx, "format_version", FORMAT_VERSION)?;
        meta::set(&tx, "block_size", bs as i64)?;
        meta::set(&tx, "compression", opts.compression.to_string())?;
        let node: [u8; 16] = rand::random();
        meta::set(&tx, "node_id", NodeId(node).to_string())?;
        meta::set(&tx, "seq", 0i64)?;
        tx.commit()?;
        info!(db = %db.display(), block_size = bs, compression = %opts.compression, "initialized store");
        Ok(())
    }

    /// Open the store in `dir`.
    pub fn open(dir: &Path, mode: OpenMode) -> Result<Store> {
        if !db_path(dir).exists() {
            return Err(Error::NoStore(dir.display().to_string()));
        }
        let locks = (
            open_lock_file(dir, "gc.lock").ok(),
            open_lock_file(dir, "gc.intent").ok(),
        );
        let packs = DiskPacks::new(dir.join("packs")).map_err(|e| Error::io("opening packs/", e))?;
        Self::open_inner(
            Some(dir.to_path_buf()),
            &db_path(dir),
            Box::new(packs),
            mode,
            locks,
        )
    }

    /// Open a store whose metadata is `db` and packs are `packs` (tests).
    pub fn open_with(db: &Path, packs: Box<dyn PackStorage>, mode: OpenMode) -> Result<Store> {
        if !db.exists() {
            return Err(Error::NoStore(db.display().to_string()));
        }
        Self::open_inner(None, db, packs, mode, (None, None))
    }

    fn open_inner(
        dir: Option<PathBuf>,
        db: &Path,
        packs: Box<dyn PackStorage>,
        mode: OpenMode,
        (gc_lock, gc_intent): (Option<std::fs::File>, Option<std::fs::File>),
    ) -> Result<Store> {
        let conn = Connection::open(db)?;
        meta::configure(&conn)?;
        let version = meta::get_i64(&conn, "format_version")
            .ok()
            .flatten()
            .ok_or_else(|| Error::NoStore(db.display().to_string()))?;
        if version != FORMAT_VERSION {
            return Err(Error::FormatVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if mode == OpenMode::ReadWrite {
            conn.execute_batch(meta::MIGRATIONS)?;
        }
        let block_size = meta::get_i64(&conn, "block_size")?.unwrap_or(0) as u32;
        let compression: Compression = meta::get_text(&conn, "compression")?
            .unwrap_or_default()
            .parse()
            .map_err(Error::InvalidArgument)?;
        let node_id = NodeId::from_hex(&meta::get_text(&conn, "node_id")?.unwrap_or_default())
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let store = Store {
            inner: Arc::new(Inner {
                dir,
                packs,
                db: Mutex::new(conn),
                db_path: db.to_path_buf(),
                checkpointer: Mutex::new(CheckpointState::default()),
                config: StoreConfig {
                    block_size,
                    compression,
                    node_id,
                },
                mode,
                gc_lock,
                gc_intent,
                lanes: (0..APPEND_LANES).map(|_| Mutex::new(Lane::default())).collect(),
                uses: Mutex::new(PackUse::default()),
                sync_lock: Mutex::new(()),
                poisoned: Mutex::new(HashSet::new()),
                unsynced: Mutex::new(HashSet::new()),
                cache: Mutex::new(lru::LruCache::new(cache_entries(DEFAULT_READ_CACHE, block_size))),
                cache_off: Default::default(),
                cache_budget: Mutex::new(CacheBudget {
                    own: DEFAULT_READ_CACHE,
                    lent: 0,
                    held: 0,
                }),
                proofs: Mutex::new(lru::LruCache::new(proof_entries(PROOF_CACHE, block_size))),
                #[cfg(test)]
                piece_reads: Default::default(),
                gate: Mutex::new(GateState::default()),
                gate_cv: Condvar::new(),
            }),
        };
        if mode == OpenMode::ReadWrite {
            store.recover()?;
        }
        Ok(store)
    }

    /// Cut torn or abandoned pack tails back to what committed transactions
    /// cover — only for packs no live process is appending to (claimable).
    /// A pack shorter than its committed length is not claimed: reported if
    /// it has committed records, skipped if it has none (being created, or
    /// left by a crash before its header). Packs left with nothing committed
    /// are for `gc` to remove.
    fn recover(&self) -> Result<()> {
        let files = self
            .inner
            .packs
            .list()
            .map_err(|e| Error::io("listing packs", e))?;
        let rows: HashMap<PackId, u64> = {
            let db = self.db();
            let mut st = db.prepare("SELECT id, committed_len FROM packs")?;
            let rows = st
                .query_map([], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                })?
                .collect::<rusqlite::Result<_>>()?;
            rows
        };
        // A pack file whose row was lost with a crash of the machine (rows
        // are not synced until a commit relies on the pack) must not have its
        // number handed out again: `create` would find the file there.
        if let Some(&max) = files.iter().max() {
            self.number_packs_past(max)?;
        }
        // A GC in another process may remove a pack (file, then row) while
        // this runs: one gone by the time it is looked at is skipped.
        let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        for &id in &files {
            let Some(&committed) = rows.get(&id) else { continue };
            let len = match self.inner.packs.len(id) {
                Ok(len) => len,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(Error::io(format!("reading pack {id}"), e)),
            };
            if len == committed {
                continue;
            }
            if len < committed {
                // Appends only grow a pack and recovery cuts none below its
                // committed length: shorter is damage. Unless nothing is
                // committed in it: a pack another process is creating (its
                // row comes first, then its file, which it claims at once)
                // or one a crash left before its header. Not claimed: that
                // raced with its creator's claim and failed its write.
                if committed > PACK_DATA_START {
                    warn!(
                        pack = id,
                        len, committed, "pack is shorter than its committed length: run `geosync scrub`"
                    );
                }
                continue;
            }
            match self.inner.packs.try_claim(id) {
                Ok(true) => {}
                Ok(false) => continue, // another live process is appending to it
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(Error::io(format!("claiming pack {id}"), e)),
            }
            // Its owner may have committed between our read and the claim.
            let committed: Option<i64> = self
                .db()
                .query_row(
                    "SELECT committed_len FROM packs WHERE id = ?1",
                    [id as i64],
                    |r| r.get(0),
                )
                .optional()
                .inspect_err(|_| self.inner.packs.release(id))?;
            let Some(committed) = committed else {
                self.inner.packs.release(id); // removed meanwhile
                continue;
            };
            let committed = committed as u64;
            if len > committed {
                info!(pack = id, len, committed, "cutting uncommitted pack tail");
                let r = self.inner.packs.truncate(id, committed);
                self.inner.packs.release(id);
                r.map_err(|e| Error::io(format!("truncating pack {id}"), e))?;
            } else {
                // Its owner committed all of it meanwhile.
                self.inner.packs.release(id);
            }
        }
        Ok(())
    }

    /// Make sure no pack gets a number up to `max` again (see `recover`).
    /// Checked first without the write lock, which an open should not wait
    /// for: there is almost always nothing to do.
    fn number_packs_past(&self, max: PackId) -> Result<()> {
        const SEQ: &str = "SELECT seq FROM sqlite_sequence WHERE name = 'packs'";
        let seq = |db: &Connection| -> rusqlite::Result<Option<i64>> {
            db.query_row(SEQ, [], |r| r.get(0)).optional()
        };
        if seq(&self.db())?.unwrap_or(0) >= max as i64 {
            return Ok(());
        }
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = seq(&tx)?;
        if now.unwrap_or(0) < max as i64 {
            warn!(
                pack = max,
                "pack files past the last numbered pack (left by a crash of the machine before \
                 any commit used them; `geosync gc` removes them)"
            );
            let sql = if now.is_some() {
                "UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'packs'"
            } else {
                "INSERT INTO sqlite_sequence(name, seq) VALUES ('packs', ?1)"
            };
            tx.execute(sql, [max as i64])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The store's configuration.
    pub fn config(&self) -> StoreConfig {
        self.inner.config
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.inner.config.block_size as u64
    }

    /// The store directory, if it is on disk.
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    pub(crate) fn db(&self) -> MutexGuard<'_, Connection> {
        self.inner.db.lock().unwrap()
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        match self.inner.mode {
            OpenMode::ReadWrite => Ok(()),
            OpenMode::ReadOnly => Err(Error::ReadOnly("the store is open read-only".into())),
        }
    }

    // ------------------------------------------------------------ gate

    pub(crate) fn stage_enter(&self) -> Result<StageGuard> {
        let mut st = self.inner.gate.lock().unwrap();
        while st.gc {
            st = self.inner.gate_cv.wait(st).unwrap();
        }
        if st.stagers == 0 {
            if let Some(f) = &self.inner.gc_lock {
                // Waits while a GC in another process runs or waits to run.
                // (No stager of this process is in the gate: none waits on us.)
                if let Some(i) = &self.inner.gc_intent {
                    retry_eintr(|| i.lock_shared())
                        .map_err(|e| Error::io("locking gc.intent (shared)", e))?;
                }
                let r = retry_eintr(|| f.lock_shared()).map_err(|e| Error::io("locking gc.lock (shared)", e));
                if let Some(i) = &self.inner.gc_intent {
                    let _ = i.unlock();
                }
                r?;
            }
        }
        st.stagers += 1;
        Ok(StageGuard {
            inner: self.inner.clone(),
        })
    }

    /// Whether a GC in another process waits for this one's stagers to
    /// leave the stage gate (a process with writers that seal continuously
    /// should then commit them all at once).
    pub fn gc_waiting(&self) -> bool {
        match &self.inner.gc_intent {
            Some(i) => match i.try_lock_shared() {
                Ok(()) => {
                    let _ = i.unlock();
                    false
                }
                Err(_) => true,
            },
            None => false,
        }
    }

    fn gc_enter(&self) -> Result<GcGuard> {
        let mut st = self.inner.gate.lock().unwrap();
        while st.gc {
            st = self.inner.gate_cv.wait(st).unwrap();
        }
        st.gc = true; // new stagers wait from here on
        while st.stagers > 0 {
            st = self.inner.gate_cv.wait(st).unwrap();
        }
        drop(st);
        let mut guard = GcGuard {
            inner: self.inner.clone(),
            cross_process: Vec::new(),
        };
        // Then the other processes: announce the GC (their first stagers
        // wait, their mounts commit), and wait until none has a commit in
        // flight. Without these locks there is no GC (dropping the guard
        // reopens the gate).
        if let Some(d) = &self.inner.dir {
            for name in ["gc.intent", "gc.lock"] {
                let f = open_lock_file(d, name).map_err(|e| Error::io(format!("opening {name}"), e))?;
                retry_eintr(|| f.lock()).map_err(|e| Error::io(format!("locking {name} (exclusive)"), e))?;
                guard.cross_process.push(f);
            }
        }
        Ok(guard)
    }

    // ------------------------------------------------------------ packs

    /// Append sealed records (in as many packs as it takes); returns their
    /// locations. Every pack written to is pinned (once per pack, listed in
    /// `pinned`) before its lane is released, so no switch to a new pack can
    /// give up a claim the records still need; the caller unpins them (on
    /// error this does: `pinned` is as it was). The bytes are not durable
    /// until [`Store::sync_packs`].
    pub(crate) fn append_pinned(&self, sealed: &[Sealed], pinned: &mut Vec<PackId>) -> Result<Vec<BlockLoc>> {
        let before = pinned.len();
        let r = self.append(sealed, pinned);
        if r.is_err() {
            self.unpin_packs(pinned.drain(before..));
        }
        r
    }

    fn append(&self, sealed: &[Sealed], pinned: &mut Vec<PackId>) -> Result<Vec<BlockLoc>> {
        // A free lane, else wait for one (the first free one when uncontended:
        // a lone writer always appends to the same pack).
        let lanes = &self.inner.lanes;
        let w = match (0..lanes.len()).find_map(|i| self.lane(i, false)) {
            Some(w) => w,
            None => {
                static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % lanes.len();
                self.lane(i, true).expect("a blocking lock")
            }
        };
        let mut w = LaneGuard { store: self, lane: w };
        let mut locs = Vec::with_capacity(sealed.len());
        let mut i = 0;
        while i < sealed.len() {
            // A pack whose sync failed since (`sync_packs`) is not appended to.
            let poisoned = w
                .active
                .is_some_and(|(id, _)| self.inner.poisoned.lock().unwrap().contains(&id));
            let (id, start) = match w.active {
                Some((id, len)) if len < PACK_TARGET_SIZE && !poisoned => (id, len),
                old => {
                    if let Some((old, _)) = old {
                        w.active = None;
                        self.retire(old);
                    }
                    let id = self.create_pack()?;
                    w.active = Some((id, PACK_DATA_START));
                    self.inner.uses.lock().unwrap().active.insert(id);
                    (id, PACK_DATA_START)
                }
            };
            if !pinned.contains(&id) {
                pinned.push(id);
                *self.inner.uses.lock().unwrap().users.entry(id).or_default() += 1;
            }
            let mut parts: Vec<&[u8]> = Vec::new();
            let mut off = start;
            while i < sealed.len() && (off < PACK_TARGET_SIZE || parts.is_empty()) {
                let s = &sealed[i];
                locs.push(BlockLoc {
                    pack: id,
                    offset: off,
                    stored_len: s.stored_len,
                    raw_len: s.raw_len,
                    codec: s.codec,
                });
                parts.extend(s.parts());
                off += s.len() as u64;
                i += 1;
            }
            // One page-aligned, zero-padded write (O_DIRECT where the disk allows),
            // from a buffer reused across batches (no fresh zeroed pages each time).
            let need = (align_up(off) - start) as usize;
            let mut buf = match w.buf.take() {
                Some(b) if b.capacity() >= need => b,
                _ => pack::AlignedBuf::zeroed(need.max(REUSED_BUF)),
            };
            buf.set_len(need);
            let mut at = 0;
            for p in &parts {
                buf.as_mut_slice()[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            buf.as_mut_slice()[at..].fill(0);
            let off = align_up(off);
            let r = self.inner.packs.append(id, buf.as_slice());
            if buf.capacity() <= REUSED_BUF + pack::PACK_ALIGN as usize {
                w.buf = Some(buf);
            }
            if let Err(e) = r {
                // Its end may hold part of this write: it takes no more
                // records. On a full disk (or quota) those before stand (a
                // sync makes them durable), so other writers' commits that
                // rely on them go on. Any other error is taken as the pack's:
                // some file systems (NFS, FUSE) report an earlier buffered
                // write's failure at a later `write`, and the `fsync` after
                // may then succeed without those bytes.
                // (ENOSPC and EDQUOT decode to these kinds.)
                let full = matches!(
                    e.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
                );
                if !full {
                    self.inner.poisoned.lock().unwrap().insert(id);
                }
                w.active = None;
                self.retire(id);
                return Err(Error::io(format!("appending to pack {id}"), e));
            }
            self.inner.unsynced.lock().unwrap().insert(id);
            w.active = Some((id, off));
        }
        Ok(locs)
    }

    /// Allocate a pack number (from the database, so processes never collide),
    /// create and claim the file, and write its header.
    ///
    /// Neither the row nor the file's name is made durable here (that was a
    /// synced transaction and a directory sync per 64 MiB pack, ~3.4 ms with
    /// the store's connection held): the commit that first relies on the pack
    /// syncs it (the name with it, see `DiskPacks`) and then commits synced,
    /// which makes every earlier WAL frame — this row — durable too. A crash
    /// of the machine before that can lose the row and leave the file, with
    /// nothing committed in it: recovery moves the numbering past such files
    /// and `gc` removes them.
    fn create_pack(&self) -> Result<PackId> {
        let id = {
            let db = self.db();
            meta::unsynced(&db, |db| {
                db.execute(
                    "INSERT INTO packs(committed_len) VALUES (?1)",
                    [PACK_DATA_START as i64],
                )?;
                Ok(db.last_insert_rowid() as PackId)
            })?
        };
        let p = &self.inner.packs;
        // A pack that could not be made leaves nothing behind: no row, no
        // file, no claim (on a full disk every seal job tries again, and
        // claimed descriptors are not bounded by the descriptor cache).
        let abandon = |e: io::Error, context: String| {
            // A file already there is not ours to remove (recovery moves the
            // numbering past such files, so this is not expected).
            let theirs = e.kind() == io::ErrorKind::AlreadyExists;
            match if theirs { Ok(()) } else { p.remove(id) } {
                Ok(()) => {}
                Err(re) if re.kind() == io::ErrorKind::NotFound => {}
                Err(re) => {
                    warn!(pack = id, error = %re, "removing a pack that could not be started");
                    p.release(id);
                }
            }
            if let Err(de) = self.db().execute("DELETE FROM packs WHERE id = ?1", [id as i64]) {
                warn!(pack = id, error = %de, "dropping the row of a pack that could not be started");
            }
            Error::io(context, e)
        };
        p.create(id)
            .map_err(|e| abandon(e, format!("creating pack {id}")))?;
        p.append(id, pack::pack_header().as_slice())
            .map_err(|e| abandon(e, format!("writing pack {id} header")))?;
        self.inner.unsynced.lock().unwrap().insert(id);
        debug!(pack = id, "new pack");
        Ok(id)
    }

    /// Make the given packs durable. A pack whose sync fails is abandoned
    /// (poisoned): what was appended to it since its last good sync may be
    /// gone, so no commit may rely on it.
    pub(crate) fn sync_packs(&self, ids: impl IntoIterator<Item = PackId>) -> Result<()> {
        // One sync at a time: a failed fdatasync is reported to one caller only,
        // so the pack is poisoned before anyone else may sync (and trust) it.
        // (It guards nothing but the order: a sync that panicked under it
        // does not stop the next.)
        let _one = self.inner.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            if self.inner.poisoned.lock().unwrap().contains(&id) {
                return Err(Error::Io {
                    context: format!("committing: an earlier write or sync of pack {id} failed"),
                    source: io::Error::other("pack abandoned after an I/O error"),
                });
            }
            // Nothing appended since its last good sync: durable already.
            // (An append that lands while the sync below runs marks it again:
            // the flag goes before the sync starts.)
            if !self.inner.unsynced.lock().unwrap().remove(&id) {
                continue;
            }
            // A sync that panicked may or may not have reached the disk: a
            // failed one, whatever it was.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.inner.packs.sync(id)))
                .unwrap_or_else(|p| {
                    Err(io::Error::other(format!(
                        "the sync panicked: {}",
                        crate::panic_message(&*p)
                    )))
                });
            if let Err(e) = r {
                // The next append moves on to a new pack (and gives up the claim).
                self.inner.poisoned.lock().unwrap().insert(id);
                return Err(Error::io(format!("syncing pack {id}"), e));
            }
        }
        Ok(())
    }

    /// Lane `i`, waiting for it or not (`None`: busy). A lane whose holder
    /// panicked mid-append was reset as the panic unwound (`LaneGuard`):
    /// its poison is cleared.
    fn lane(&self, i: usize, wait: bool) -> Option<MutexGuard<'_, Lane>> {
        let m = &self.inner.lanes[i];
        let g = if wait {
            m.lock().unwrap_or_else(|p| p.into_inner())
        } else {
            match m.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return None,
            }
        };
        if m.is_poisoned() {
            m.clear_poison();
        }
        Some(g)
    }

    /// A lane stops appending to pack `id`. Its claim is kept while
    /// uncommitted handles have records in it, even if the pack failed:
    /// another handle's synced records in it may be about to commit, and
    /// recovery elsewhere must not cut them.
    fn retire(&self, id: PackId) {
        let mut u = self.inner.uses.lock().unwrap();
        u.active.remove(&id);
        if !u.users.contains_key(&id) {
            self.inner.packs.release(id);
        }
    }

    /// Stop appending to the current packs (GC compacts into fresh ones).
    fn close_active_pack(&self) {
        for i in 0..self.inner.lanes.len() {
            let mut w = self.lane(i, true).expect("a blocking lock");
            if let Some((id, _)) = w.active.take() {
                self.retire(id);
            }
        }
    }

    /// Pins held on packs, in all (tests: every handle gives its pins back).
    #[cfg(test)]
    pub(crate) fn pins(&self) -> usize {
        self.inner.uses.lock().unwrap().users.values().sum()
    }

    /// A handle committed (or dropped) its records in these packs.
    pub(crate) fn unpin_packs(&self, ids: impl IntoIterator<Item = PackId>) {
        let mut u = self.inner.uses.lock().unwrap();
        for id in ids {
            let n = u.users.entry(id).or_default();
            *n = n.saturating_sub(1);
            if *n == 0 {
                u.users.remove(&id);
                if !u.active.contains(&id) {
                    self.inner.packs.release(id);
                }
            }
        }
    }

    // ------------------------------------------------------------ blocks

    /// Where a block is stored, if the index has it.
    pub fn lookup(&self, hash: &BlockHash) -> Result<Option<BlockLoc>> {
        let db = self.db();
        let mut st = db.prepare_cached(LOOKUP_SQL)?;
        Ok(st.query_row([&hash.0[..]], loc_from_row).optional()?)
    }

    /// Read and verify one block from its record.
    pub fn read_record(&self, hash: &BlockHash, loc: &BlockLoc) -> Result<Vec<u8>> {
        Ok(self.read_record_shared(hash, loc)?.to_vec())
    }

    /// [`Store::read_record`] into shared bytes (one copy fewer).
    pub fn read_record_shared(&self, hash: &BlockHash, loc: &BlockLoc) -> Result<Arc<[u8]>> {
        self.read_record_via(hash, loc, Via::PageCache)
    }

    /// [`Store::read_record_shared`] through the page cache or around it.
    pub(crate) fn read_record_via(&self, hash: &BlockHash, loc: &BlockLoc, via: Via) -> Result<Arc<[u8]>> {
        let read_err = |e: io::Error| record_read_error(hash, loc, e);
        if via == Via::Direct {
            let (start, end) = page_span(loc.offset, loc.end());
            return with_span_buf((end - start) as usize, |span| {
                let got = self
                    .inner
                    .packs
                    .read_direct(loc.pack, start, span)
                    .map_err(read_err)?;
                let (from, to) = ((loc.offset - start) as usize, (loc.end() - start) as usize);
                if got < to {
                    return Err(read_err(io::ErrorKind::UnexpectedEof.into()));
                }
                open_record(hash, loc, &span[from..to])
            });
        }
        if loc.codec == pack::Codec::Raw && loc.stored_len == loc.raw_len {
            // Straight into the shared buffer the cache keeps: copying 64 KiB
            // out of a read buffer was a tenth of the mount's CPU under
            // sequential reads.
            let mut head = [0u8; RECORD_HEADER_LEN];
            self.inner
                .packs
                .read_at(loc.pack, loc.offset, &mut head)
                .map_err(read_err)?;
            check_record_header(hash, loc, &head)?;
            let data = self
                .inner
                .packs
                .read_at_new(
                    loc.pack,
                    loc.offset + RECORD_HEADER_LEN as u64,
                    loc.raw_len as usize,
                )
                .map_err(read_err)?;
            // Verified through its piece proof, kept: later small reads of
            // the block read and hash only their pieces. (No proof: the
            // check below names what the bytes hash to.)
            if via == Via::Proven && Proof::applies(data.len()) {
                if let Some(proof) = Proof::build(&data, hash) {
                    let proven = Arc::new(Proven { loc: *loc, proof });
                    self.inner.proofs.lock().unwrap().put(*hash, proven);
                    return Ok(data);
                }
            }
            let actual = pack::hash_block(&data);
            if actual != *hash {
                return Err(record_integrity(hash, loc, format!("content hashes to {actual}")));
            }
            return Ok(data);
        }
        let mut buf = vec![0u8; RECORD_HEADER_LEN + loc.stored_len as usize];
        self.inner
            .packs
            .read_at(loc.pack, loc.offset, &mut buf)
            .map_err(read_err)?;
        open_record(hash, loc, &buf)
    }

    /// Read the blocks `wanted` names that the read cache lacks straight
    /// into `out`, with one aligned read past the page cache per run of
    /// their records lying together in a pack (a sequential writer's blocks
    /// do): a sequential reader's 1 MiB request is one read instead of 16,
    /// and each block is copied once, from the pack buffer into `out`,
    /// instead of into the cache and then out of it (a stream's blocks are
    /// not read again). An entry `(hash, within, at, n)` asks for bytes
    /// `within..within + n` of the block at `out[at..at + n]`. Returns which
    /// entries were filled; the rest (cached, not indexed, damaged, or the
    /// read failed) are the caller's to read one by one, which reports any
    /// damage.
    pub(crate) fn read_blocks_into(
        &self,
        wanted: &[(BlockHash, usize, usize, usize)],
        out: &mut [u8],
    ) -> Vec<bool> {
        let mut filled = vec![false; wanted.len()];
        let todo: Vec<usize> = {
            let c = self.inner.cache.lock().unwrap();
            (0..wanted.len()).filter(|&i| !c.contains(&wanted[i].0)).collect()
        };
        if todo.len() < 2 {
            return filled;
        }
        let mut found: Vec<(usize, BlockLoc)> = Vec::with_capacity(todo.len());
        {
            let db = self.db();
            let Ok(mut st) = db.prepare_cached(LOOKUP_SQL) else {
                return filled;
            };
            for i in todo {
                match st.query_row([&wanted[i].0 .0[..]], loc_from_row).optional() {
                    Ok(Some(loc)) => found.push((i, loc)),
                    Ok(None) => {} // not indexed (yet, or any more): read alone
                    Err(e) => {
                        debug!(error = %e, "long read's lookup failed; blocks are read one by one");
                        return filled;
                    }
                }
            }
        }
        found.sort_by_key(|(_, l)| (l.pack, l.offset));
        let mut rest = &found[..];
        let mut scratch = Vec::new();
        while let Some((_, first)) = rest.first() {
            let mut end = first.end();
            // The first record always (it may be longer than a span alone).
            let mut n = 1;
            while let Some((_, l)) = rest.get(n) {
                if l.pack != first.pack || l.offset > end + SPAN_GAP || l.end() - first.offset > SPAN_MAX {
                    break;
                }
                end = end.max(l.end());
                n += 1;
            }
            self.read_span_into(&rest[..n], wanted, out, &mut filled, &mut scratch);
            rest = &rest[n..];
        }
        filled
    }

    /// Read records lying together in one pack with one aligned read, and
    /// copy those that verify into `out` (see [`Store::read_blocks_into`]).
    fn read_span_into(
        &self,
        records: &[(usize, BlockLoc)],
        wanted: &[(BlockHash, usize, usize, usize)],
        out: &mut [u8],
        filled: &mut [bool],
        scratch: &mut Vec<u8>,
    ) {
        let pack = records[0].1.pack;
        let first = records[0].1.offset;
        let (start, end) = page_span(first, records.iter().map(|(_, l)| l.end()).max().unwrap_or(first));
        with_span_buf((end - start) as usize, |span| {
            let got = match self.inner.packs.read_direct(pack, start, span) {
                Ok(n) => n,
                Err(e) => {
                    debug!(pack, offset = start, error = %e, "long read's span failed; blocks are read one by one");
                    0
                }
            };
            for (i, l) in records {
                let (hash, within, at, n) = wanted[*i];
                let (from, to) = ((l.offset - start) as usize, (l.end() - start) as usize);
                if to > got {
                    continue;
                }
                let record = &span[from..to];
                let Ok(header) = check_record_header(&hash, l, &record[..RECORD_HEADER_LEN]) else {
                    continue;
                };
                let dest = &mut out[at..at + n];
                let copied = pack::open_with(
                    &record[RECORD_HEADER_LEN..],
                    header.codec,
                    header.raw_len,
                    &hash,
                    scratch,
                    |data| {
                        let avail = data.len().saturating_sub(within).min(n);
                        dest[..avail].copy_from_slice(&data[within..within + avail]);
                        dest[avail..].fill(0);
                    },
                );
                filled[*i] = copied.is_ok();
            }
        });
    }

    /// Take WAL checkpoints off the commit path, for a long-running process
    /// that calls [`Store::checkpoint`] from a timer (the mount). Otherwise
    /// the commit that fills the WAL past 1000 pages copies it all back into
    /// the database and syncs it, while the writer waits on its `fsync`.
    pub fn defer_checkpoints(&self) -> Result<()> {
        let db = self.db();
        db.pragma_update(None, "wal_autocheckpoint", 0)?;
        // A restarted WAL is cut back to this when it is reused.
        db.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
        Ok(())
    }

    /// Copy the WAL's committed pages back into the database, on a
    /// connection of its own so that commits go on meanwhile. A passive
    /// checkpoint waits for no reader or writer, but under steady commits it
    /// never catches up, and the WAL restarts from its start only once all of
    /// it is copied: past [`WAL_RESTART_FRAMES`], and if commits came since
    /// the last call, a restarting checkpoint holds this process's writers
    /// and readers off (the store's connection) for the last pages. It
    /// waits at most [`CHECKPOINT_BUSY_WAIT`] for a reader in another
    /// process; if one keeps it from finishing, the next 10 calls do not
    /// try, and it is logged. After
    /// [`CHECKPOINT_FAILURES_MAX`] failures in a row SQLite's own
    /// checkpoints are turned back on, so the WAL stays bounded. Failures are
    /// logged: the first of a run, then every 240th (once a minute at
    /// [`CHECKPOINT_INTERVAL`]).
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let mut st = self.inner.checkpointer.lock().unwrap();
        let r = self.checkpoint_with(&mut st);
        match &r {
            Ok(_) => st.failures = 0,
            Err(e) => {
                st.failures += 1;
                if st.failures == 1 || st.failures.is_multiple_of(240) {
                    warn!(error = %e, failures = st.failures, "checkpointing the metadata WAL failed; retrying");
                }
                if st.failures == CHECKPOINT_FAILURES_MAX {
                    warn!(error = %e, "metadata checkpoints keep failing: SQLite checkpoints in commits again");
                    self.db().pragma_update(None, "wal_autocheckpoint", 1000)?;
                }
            }
        }
        r
    }

    fn checkpoint_with(&self, st: &mut CheckpointState) -> Result<Checkpoint> {
        let conn = match &mut st.conn {
            Some(c) => c,
            slot => {
                // Never creates a database: the store's must be there.
                let c = Connection::open_with_flags(
                    &self.inner.db_path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                meta::configure(&c)?;
                c.busy_timeout(CHECKPOINT_BUSY_WAIT)?;
                slot.insert(c)
            }
        };
        let run = |mode: &str| -> Result<(bool, u64, u64)> {
            let (busy, log, done): (i64, i64, i64) =
                conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
            debug!(mode, busy, log, done, "metadata checkpoint");
            Ok((busy != 0, log.max(0) as u64, done.max(0) as u64))
        };
        let (_, frames, copied) = run("PASSIVE")?;
        let grew = frames != st.last_frames;
        st.last_frames = frames;
        let mut c = Checkpoint {
            frames,
            copied,
            restarted: false,
        };
        if frames > WAL_RESTART_FRAMES && grew {
            if st.skip_restarts > 0 {
                st.skip_restarts -= 1;
            } else {
                // Holding the store's connection keeps this process's
                // writers (and its readers) out for the last pages: with
                // only the busy wait, commits that follow each other without
                // pause could foil every restart, and the WAL grew without
                // bound. Only a reader in another process can foil it now.
                let db = self.db();
                let (busy, frames, copied) = run("RESTART")?;
                drop(db);
                if busy {
                    st.skip_restarts = 10;
                    st.foiled += 1;
                    if st.foiled == 1 || st.foiled.is_multiple_of(24) {
                        warn!(
                            frames,
                            foiled = st.foiled,
                            "a reader in another process keeps the metadata WAL from restarting; it grows until that reader ends"
                        );
                    }
                } else {
                    st.foiled = 0;
                    c = Checkpoint {
                        frames,
                        copied,
                        restarted: true,
                    };
                }
            }
        }
        Ok(c)
    }

    /// Bound the read cache (bytes of decompressed blocks; 0 disables it).
    pub fn set_read_cache(&self, bytes: usize) {
        let mut b = self.inner.cache_budget.lock().unwrap();
        b.own = bytes;
        self.fit_cache(&b);
    }

    /// Let the read cache also use up to `bytes` that open images' dirty
    /// blocks do not hold (the mount passes its dirty limit: memory then
    /// stays within the read cache plus the dirty limit, as without it).
    pub fn lend_to_read_cache(&self, bytes: usize) {
        let mut b = self.inner.cache_budget.lock().unwrap();
        b.lent = bytes;
        self.fit_cache(&b);
    }

    /// Bytes of blocks the open image handles hold in memory (dirty, or being
    /// sealed): at most half the dirty limit per image under a mount (plus a
    /// write per FUSE thread).
    pub fn memory_held(&self) -> usize {
        self.inner.cache_budget.lock().unwrap().held
    }

    /// An image handle now holds `now` bytes of blocks in memory instead of
    /// `was`: the read cache gives up (or gets back) what is lent to it.
    pub(crate) fn hold_memory(&self, was: usize, now: usize) {
        let mut b = self.inner.cache_budget.lock().unwrap();
        b.held = (b.held + now).saturating_sub(was);
        if b.lent > 0 {
            self.fit_cache(&b);
        }
    }

    fn fit_cache(&self, b: &CacheBudget) {
        let bytes = b.bytes();
        let entries = cache_entries(bytes, self.inner.config.block_size);
        let mut c = self.inner.cache.lock().unwrap();
        if c.cap() != entries {
            c.resize(entries); // evicts the least recently used past it
        }
        self.inner
            .cache_off
            .store(bytes == 0, std::sync::atomic::Ordering::Relaxed);
        if bytes == 0 {
            c.clear();
        }
    }

    /// Blocks the read cache may hold now (tests).
    #[cfg(test)]
    pub(crate) fn read_cache_capacity(&self) -> usize {
        self.inner.cache.lock().unwrap().cap().get()
    }

    /// Whether the read cache holds a block (tests).
    #[cfg(test)]
    pub(crate) fn is_cached(&self, hash: &BlockHash) -> bool {
        self.inner.cache.lock().unwrap().contains(hash)
    }

    /// Bytes `within..within + out.len()` of the stored block `hash` into
    /// `out` (zeros past its end), if that needs no index lookup: from the
    /// read cache, else, when a whole read left its piece proof, by reading
    /// only the pieces holding them, verified against the proof. `false`
    /// (`out` holds anything) when neither is at hand, or the pieces are not
    /// where and what the proof says (the block moved, or is damaged): the
    /// caller then reads the whole block, which finds it, or reports the damage.
    pub(crate) fn read_part(&self, hash: &BlockHash, within: usize, out: &mut [u8]) -> bool {
        if let Some(b) = self.inner.cache.lock().unwrap().get(hash).cloned() {
            copy_from(&b, within, out);
            return true;
        }
        let Some(p) = self.inner.proofs.lock().unwrap().get(hash).cloned() else {
            return false;
        };
        let end = (within + out.len()).min(p.proof.len());
        if within >= end {
            out.fill(0);
            return true;
        }
        let span = p.proof.span(within, end);
        let at = p.loc.offset + RECORD_HEADER_LEN as u64 + span.start as u64;
        let read = if span.start == within && span.end == end && end - within == out.len() {
            // Whole pieces (a page-aligned read): straight into `out`.
            let r = self.inner.packs.read_at(p.loc.pack, at, out);
            r.map(|()| p.proof.verify(span.start, out))
        } else {
            let mut buf = vec![0u8; span.len()];
            let r = self.inner.packs.read_at(p.loc.pack, at, &mut buf);
            r.map(|()| {
                let ok = p.proof.verify(span.start, &buf);
                if ok {
                    copy_from(&buf, within - span.start, out);
                }
                ok
            })
        };
        match read {
            Ok(true) => {
                #[cfg(test)]
                self.inner
                    .piece_reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            Ok(false) if self.lookup(hash).ok().flatten() == Some(p.loc) => {
                // Damaged where the index still puts it: the whole read
                // reports it. The proof stays: the block's other pieces
                // are still proven by it.
                false
            }
            _ => {
                // Moved (a GC compacted its pack) or gone: the whole read
                // finds it, and keeps a proof with its new place.
                debug!(block = %hash, pack = p.loc.pack, offset = p.loc.offset, "block not where its proof says");
                let mut proofs = self.inner.proofs.lock().unwrap();
                // (Unless another reader put a newer one meanwhile.)
                if proofs.peek(hash).is_some_and(|q| Arc::ptr_eq(q, &p)) {
                    proofs.pop(hash);
                }
                false
            }
        }
    }

    /// Whether a piece proof of the block is kept (tests).
    #[cfg(test)]
    pub(crate) fn has_proof(&self, hash: &BlockHash) -> bool {
        self.inner.proofs.lock().unwrap().contains(hash)
    }

    /// Reads served piece by piece so far (tests).
    #[cfg(test)]
    pub(crate) fn piece_reads(&self) -> usize {
        self.inner.piece_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn put_cached(&self, hash: BlockHash, data: Arc<[u8]>) {
        let mut c = self.inner.cache.lock().unwrap();
        if !self.inner.cache_off.load(std::sync::atomic::Ordering::Relaxed) {
            c.put(hash, data);
        }
    }

    /// Put a block's verified contents in the read cache (write-through).
    pub(crate) fn cache_block(&self, hash: BlockHash, data: Arc<[u8]>) {
        self.put_cached(hash, data);
    }

    /// Read and verify a block by name (through the read cache).
    pub fn read_block(&self, hash: &BlockHash) -> Result<Vec<u8>> {
        Ok(self.read_block_shared(hash)?.to_vec())
    }

    /// [`Store::read_block`], sharing the cached bytes instead of copying them.
    pub fn read_block_shared(&self, hash: &BlockHash) -> Result<Arc<[u8]>> {
        self.read_block_via(hash, Via::PageCache)
    }

    /// [`Store::read_block_shared`], reading the pack through the page cache or around it.
    pub(crate) fn read_block_via(&self, hash: &BlockHash, via: Via) -> Result<Arc<[u8]>> {
        if let Some(b) = self.inner.cache.lock().unwrap().get(hash) {
            return Ok(b.clone());
        }
        let data = self.read_block_uncached(hash, via)?;
        self.put_cached(*hash, data.clone());
        Ok(data)
    }

    fn read_block_uncached(&self, hash: &BlockHash, via: Via) -> Result<Arc<[u8]>> {
        for attempt in 0..2 {
            let loc = self.lookup(hash)?.ok_or(Error::MissingBlock {
                hash: *hash,
                image: None,
                block: None,
            })?;
            match self.read_record_via(hash, &loc, via) {
                // GC may have moved the block between lookup and read: look again.
                Err(Error::Io { ref source, .. })
                    if source.kind() == io::ErrorKind::NotFound && attempt == 0 =>
                {
                    continue
                }
                r => return r,
            }
        }
        unreachable!()
    }

    // ------------------------------------------------------------ images

    pub(crate) fn image_row(&self, name: &str) -> Result<ImageRow> {
        validate_name(name)?;
        let db = self.db();
        image_row(&db, name)
    }

    pub(crate) fn image_row_by_id(&self, id: i64, name: &str) -> Result<ImageRow> {
        image_row_by_id(&self.db(), id, name)
    }

    /// Create an empty (all-hole) image of `size` bytes.
    pub fn create_image(&self, name: &str, size: u64) -> Result<()> {
        validate_name(name)?;
        self.check_writable()?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        insert_image(&tx, name, size, self.inner.config.node_id)?;
        tx.commit()?;
        info!(image = name, size, "created image");
        Ok(())
    }

    /// A read-only handle on a snapshot of an image.
    pub fn open_snapshot(&self, image: &str, snap: &str) -> Result<ImageHandle> {
        let row = self.image_row(image)?;
        let s = snapshot_row(&self.db(), &row, snap)?;
        Ok(ImageHandle::new_view(self.clone(), row, s.version, s.size))
    }

    /// Open an image for reading and writing through a handle.
    pub fn open_image(&self, name: &str) -> Result<ImageHandle> {
        let row = self.image_row(name)?;
        Ok(ImageHandle::new(self.clone(), row))
    }

    /// Whether an image exists.
    pub fn image_exists(&self, name: &str) -> Result<bool> {
        match self.image_row(name) {
            Ok(_) => Ok(true),
            Err(Error::NoSuchImage(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Names of all images, sorted.
    pub fn image_names(&self) -> Result<Vec<String>> {
        let db = self.db();
        let mut st = db.prepare_cached("SELECT name FROM images ORDER BY name")?;
        let names = st.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        Ok(names)
    }

    /// All images, by name.
    pub fn list_images(&self) -> Result<Vec<ImageInfo>> {
        let names: Vec<String> = {
            let db = self.db();
            let mut st = db.prepare("SELECT name FROM images ORDER BY name")?;
            let names = st.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            names
        };
        names.iter().map(|n| self.image_info(n)).collect()
    }

    /// One image's details.
    pub fn image_info(&self, name: &str) -> Result<ImageInfo> {
        let row = self.image_row(name)?;
        let db = self.db();
        let bs = self.block_size();
        let live: i64 = db.query_row(
            "SELECT COUNT(*) FROM map WHERE image = ?1 AND died IS NULL",
            [row.id],
            |r| r.get(0),
        )?;
        let stored: i64 = db.query_row(
            "SELECT COALESCE(SUM(stored_len), 0) FROM blocks WHERE hash IN
               (SELECT hash FROM map WHERE image = ?1 AND died IS NULL)",
            [row.id],
            |r| r.get(0),
        )?;
        let snapshots = snapshots_of(&db, row.id)?;
        Ok(ImageInfo {
            name: row.name,
            size: row.size,
            version: row.version,
            stamp: row.stamp,
            quota: row.quota,
            referenced: live as u64 * bs,
            stored: stored as u64,
            snapshots,
            created_ms: row.created_ms,
        })
    }

    /// Snapshots of an image, oldest first.
    pub fn list_snapshots(&self, image: &str) -> Result<Vec<SnapshotInfo>> {
        let row = self.image_row(image)?;
        snapshots_of(&self.db(), row.id)
    }

    /// Pin the image's head version under `snap`.
    pub fn create_snapshot(&self, image: &str, snap: &str) -> Result<SnapshotInfo> {
        validate_name(snap)?;
        self.check_writable()?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row = image_row(&tx, image)?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM snapshots WHERE image = ?1 AND name = ?2)",
            params![row.id, snap],
            |r| r.get(0),
        )?;
        if exists {
            return Err(Error::SnapshotExists {
                image: image.into(),
                snapshot: snap.into(),
            });
        }
        let now = meta::now_ms();
        tx.execute(
            "INSERT INTO snapshots(image, name, version, size, stamp_ms, stamp_ctr, origin, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                row.id,
                snap,
                row.version as i64,
                row.size as i64,
                row.stamp.hlc.wall_ms as i64,
                row.stamp.hlc.counter as i64,
                &row.stamp.origin.0[..],
                now as i64
            ],
        )?;
        let seq = meta::next_seq(&tx)?;
        tx.execute("UPDATE images SET seq = ?2 WHERE id = ?1", params![row.id, seq])?;
        tx.commit()?;
        info!(image, snapshot = snap, version = row.version, "snapshot created");
        Ok(SnapshotInfo {
            name: snap.into(),
            version: row.version,
            size: row.size,
            stamp: row.stamp,
            created_ms: now,
        })
    }

    /// Delete a snapshot and prune the rows only it kept.
    pub fn delete_snapshot(&self, image: &str, snap: &str) -> Result<()> {
        self.check_writable()?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row = image_row(&tx, image)?;
        let snap_row = snapshot_row(&tx, &row, snap)?;
        tx.execute(
            "DELETE FROM snapshots WHERE image = ?1 AND name = ?2",
            params![row.id, snap],
        )?;
        let pruned = meta::prune(&tx, row.id, snap_row.version + 1, u64::MAX >> 1)?;
        let seq = meta::next_seq(&tx)?;
        tx.execute("UPDATE images SET seq = ?2 WHERE id = ?1", params![row.id, seq])?;
        tx.commit()?;
        info!(image, snapshot = snap, pruned, "snapshot deleted");
        Ok(())
    }

    /// Make the image's head equal to a snapshot, as a new version (the
    /// versions after the snapshot stay reachable through other snapshots).
    /// Reads the image's rows once, outside the write lock, for the live
    /// rows born after the snapshot (killed), and re-inserts those that died
    /// since it, found by `map_died`. An image committed to meanwhile is
    /// read again, up to 3 times, then [`Error::Conflict`].
    pub fn rollback(&self, image: &str, snap: &str) -> Result<u64> {
        self.rollback_with(image, snap, &|| {})
    }

    /// [`Store::rollback`], calling `between` after each read (tests: a
    /// commit that lands there).
    pub(crate) fn rollback_with(&self, image: &str, snap: &str, between: &dyn Fn()) -> Result<u64> {
        self.check_writable()?;
        // The live rows born after the snapshot are found first, outside the
        // write lock: with no index on `born` that is a pass over the
        // image's rows, and every commit of every image (other processes'
        // too) waits while the lock is held. The write transaction then
        // kills them by their keys, if the image is still that version.
        let mut tries = 0;
        loop {
            let (id, version, born_after) = {
                let mut db = self.db();
                let tx = db.transaction()?; // one consistent read
                let row = image_row(&tx, image)?;
                let s = snapshot_row(&tx, &row, snap)?;
                let keys = tx
                    .prepare("SELECT block, born FROM map WHERE image = ?1 AND died IS NULL AND born > ?2")?
                    .query_map(params![row.id, s.version as i64], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                (row.id, row.version, keys)
            };
            between();
            let mut db = self.db();
            let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let row = image_row(&tx, image)?;
            refuse_if_open(&tx, &row)?;
            if row.id != id || row.version != version {
                tries += 1;
                if tries < 3 {
                    continue; // committed to meanwhile (a writer that has closed since)
                }
                return Err(Error::Conflict {
                    image: image.into(),
                    expected: version,
                    found: row.version,
                });
            }
            let s = snapshot_row(&tx, &row, snap)?;
            let v = row.version + 1;
            let mut killed = 0;
            {
                let mut kill = tx.prepare_cached(
                    "UPDATE map SET died = ?4 WHERE image = ?1 AND block = ?2 AND born = ?3 AND died IS NULL",
                )?;
                for (block, born) in born_after {
                    killed += kill.execute(params![row.id, block, born, v as i64])?;
                }
            }
            let revived = tx.execute(
                "INSERT INTO map(image, block, born, died, hash)
                 SELECT image, block, ?3, NULL, hash FROM map
                  WHERE image = ?1 AND born <= ?2 AND died IS NOT NULL AND died > ?2 AND died < ?3",
                params![row.id, s.version as i64, v as i64],
            )?;
            // Blocks past the snapshot's size cannot be live at the snapshot; nothing more to cut.
            let stamp = bump_version(&tx, &row, v, s.size, self.inner.config.node_id)?;
            meta::prune(&tx, row.id, v, v)?;
            tx.commit()?;
            info!(image, snapshot = snap, version = v, killed, revived, %stamp, "rolled back");
            return Ok(v);
        }
    }

    /// A new image sharing every block of `src` (its head, or snapshot `snap`).
    pub fn clone_image(&self, src: &str, snap: Option<&str>, new: &str) -> Result<()> {
        validate_name(new)?;
        self.check_writable()?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row = image_row(&tx, src)?;
        let (version, size) = match snap {
            Some(s) => {
                let s = snapshot_row(&tx, &row, s)?;
                (s.version, s.size)
            }
            None => (row.version, row.size),
        };
        let new_id = insert_image(&tx, new, size, self.inner.config.node_id)?;
        let rows = tx.execute(
            "INSERT INTO map(image, block, born, died, hash)
             SELECT ?1, block, 1, NULL, hash FROM map
              WHERE image = ?2 AND born <= ?3 AND (died IS NULL OR died > ?3)",
            params![new_id, row.id, version as i64],
        )?;
        tx.commit()?;
        info!(src, new, version, blocks = rows, "cloned");
        Ok(())
    }

    /// Rename an image.
    pub fn rename_image(&self, old: &str, new: &str) -> Result<()> {
        validate_name(new)?;
        self.check_writable()?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row = image_row(&tx, old)?;
        refuse_if_open(&tx, &row)?;
        if image_row(&tx, new).is_ok() {
            return Err(Error::ImageExists(new.into()));
        }
        let seq = meta::next_seq(&tx)?;
        tx.execute(
            "UPDATE images SET name = ?2, seq = ?3 WHERE id = ?1",
            params![row.id, new, seq],
        )?;
        meta::record_removal(&tx, old, seq)?;
        meta::forget_removal(&tx, new)?;
        tx.commit()?;
        Ok(())
    }

    /// Rename `old` over `new`, replacing it (and its snapshots) in one
    /// transaction: everything is checked before anything changes, so a
    /// refused rename (either image open for writing) removes nothing.
    pub fn replace_image(&self, old: &str, new: &str) -> Result<()> {
        validate_name(new)?;
        self.check_writable()?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let from = image_row(&tx, old)?;
        refuse_if_open(&tx, &from)?;
        let target = image_row(&tx, new)?;
        refuse_if_open(&tx, &target)?;
        tx.execute("DELETE FROM map WHERE image = ?1", [target.id])?;
        tx.execute("DELETE FROM snapshots WHERE image = ?1", [target.id])?;
        tx.execute("DELETE FROM images WHERE id = ?1", [target.id])?;
        let seq = meta::next_seq(&tx)?;
        tx.execute(
            "UPDATE images SET name = ?2, seq = ?3 WHERE id = ?1",
            params![from.id, new, seq],
        )?;
        meta::record_removal(&tx, old, seq)?;
        tx.commit()?;
        info!(old, new, "renamed, replacing the target");
        Ok(())
    }

    /// Remove an image and its snapshots; its blocks are freed by `gc`.
    pub fn remove_image(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row = image_row(&tx, name)?;
        refuse_if_open(&tx, &row)?;
        tx.execute("DELETE FROM map WHERE image = ?1", [row.id])?;
        tx.execute("DELETE FROM snapshots WHERE image = ?1", [row.id])?;
        tx.execute("DELETE FROM history WHERE image = ?1", [row.id])?;
        tx.execute("DELETE FROM images WHERE id = ?1", [row.id])?;
        let seq = meta::next_seq(&tx)?;
        meta::record_removal(&tx, name, seq)?;
        tx.commit()?;
        info!(image = name, "removed image");
        Ok(())
    }

    /// Set an image's quota on referenced bytes (`None` removes it).
    pub fn set_quota(&self, name: &str, quota: Option<u64>) -> Result<()> {
        self.check_writable()?;
        let row = self.image_row(name)?;
        self.db().execute(
            "UPDATE images SET quota = ?2 WHERE id = ?1",
            params![row.id, quota.map(|q| q as i64)],
        )?;
        Ok(())
    }

    /// Resolve `head`, `@N` or a snapshot name to (version, size), checking
    /// that the version is retained.
    pub fn resolve_version(&self, image: &str, spec: &str) -> Result<(u64, u64)> {
        let row = self.image_row(image)?;
        let db = self.db();
        if spec == "head" {
            return Ok((row.version, row.size));
        }
        let snaps = snapshots_of(&db, row.id)?;
        if let Some(n) = spec.strip_prefix('@') {
            let v: u64 = n.parse().map_err(|_| {
                Error::InvalidArgument(format!(
                    "invalid version {spec:?}: use @N, head or a snapshot name"
                ))
            })?;
            if v == row.version {
                return Ok((v, row.size));
            }
            return snaps
                .iter()
                .find(|s| s.version == v)
                .map(|s| (s.version, s.size))
                .ok_or(Error::VersionNotRetained {
                    image: image.into(),
                    version: v,
                });
        }
        snaps
            .iter()
            .find(|s| s.name == spec)
            .map(|s| (s.version, s.size))
            .ok_or_else(|| Error::NoSuchSnapshot {
                image: image.into(),
                snapshot: spec.into(),
            })
    }

    /// Blocks that differ between two retained versions (`head`, `@N`, or a
    /// snapshot name): rows born in (a, b] by one pass over the image's rows
    /// (the primary key's `image` prefix; no index on `born`, which every
    /// overwrite would pay for), rows that died in (a, b] by `map_died`.
    pub fn diff(&self, image: &str, from: &str, to: &str) -> Result<Diff> {
        let row = self.image_row(image)?;
        let (mut a, mut a_size) = self.resolve_version(image, from)?;
        let (mut b, mut b_size) = self.resolve_version(image, to)?;
        if a > b {
            std::mem::swap(&mut a, &mut b);
            std::mem::swap(&mut a_size, &mut b_size);
        }
        let db = self.db();
        let mut st = db.prepare_cached(
            "SELECT block, born, hash FROM map WHERE image = ?1 AND born > ?2 AND born <= ?3
               AND (died IS NULL OR died > ?3)
             UNION ALL
             SELECT block, born, hash FROM map WHERE image = ?1 AND died > ?2 AND died <= ?3 AND born <= ?2",
        )?;
        // Per block: the hash visible at `a` (rows that died in (a, b]) and at `b` (rows born in (a, b]).
        let mut at: BTreeMap<u64, (Option<BlockHash>, Option<BlockHash>)> = BTreeMap::new();
        let rows = st.query_map(params![row.id, a as i64, b as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                meta::hash_from_row(r, 2)?,
            ))
        })?;
        for r in rows {
            let (block, born, hash) = r?;
            let e = at.entry(block).or_default();
            if born <= a {
                e.0 = Some(hash);
            } else {
                e.1 = Some(hash);
            }
        }
        let mut changed: Vec<Range<u64>> = Vec::new();
        for (block, (ha, hb)) in at {
            if ha == hb {
                continue;
            }
            match changed.last_mut() {
                Some(r) if r.end == block => r.end += 1,
                _ => changed.push(block..block + 1),
            }
        }
        Ok(Diff {
            from_version: a,
            to_version: b,
            from_size: a_size,
            to_size: b_size,
            changed,
        })
    }

    /// The head map of an image with each block's location, by block index.
    pub fn live_map(&self, image: &str) -> Result<Vec<(u64, BlockHash, Option<BlockLoc>)>> {
        let row = self.image_row(image)?;
        let db = self.db();
        let mut st = db.prepare(
            "SELECT m.block, m.hash, b.pack, b.offset, b.stored_len, b.raw_len, b.codec
               FROM map m LEFT JOIN blocks b ON b.hash = m.hash
              WHERE m.image = ?1 AND m.died IS NULL ORDER BY m.block",
        )?;
        let rows = st
            .query_map([row.id], |r| {
                let loc = match r.get::<_, Option<i64>>(2)? {
                    Some(_) => Some(BlockLoc {
                        pack: r.get::<_, i64>(2)? as u64,
                        offset: r.get::<_, i64>(3)? as u64,
                        stored_len: r.get::<_, i64>(4)? as u32,
                        raw_len: r.get::<_, i64>(5)? as u32,
                        codec: Codec::from_u8(r.get::<_, i64>(6)? as u8).unwrap_or(Codec::Raw),
                    }),
                    None => None,
                };
                Ok((r.get::<_, i64>(0)? as u64, meta::hash_from_row(r, 1)?, loc))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Store-wide usage figures.
    pub fn stats(&self) -> Result<StoreStats> {
        let bs = self.block_size();
        let mut s = StoreStats::default();
        {
            let db = self.db();
            let (images, logical): (i64, i64) =
                db.query_row("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM images", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            s.images = images as u64;
            s.logical = logical as u64;
            s.snapshots = db.query_row("SELECT COUNT(*) FROM snapshots", [], |r| r.get::<_, i64>(0))? as u64;
            let live: i64 = db.query_row("SELECT COUNT(*) FROM map WHERE died IS NULL", [], |r| r.get(0))?;
            s.referenced = live as u64 * bs;
            s.unique = db.query_row(
                "SELECT COALESCE(SUM(raw_len), 0) FROM blocks WHERE hash IN (SELECT hash FROM map WHERE died IS NULL)",
                [],
                |r| r.get::<_, i64>(0),
            )? as u64;
            let (u, st): (i64, i64) = db.query_row(
                "SELECT COALESCE(SUM(raw_len), 0), COALESCE(SUM(stored_len), 0) FROM blocks
                  WHERE hash IN (SELECT hash FROM map)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            s.unique_with_snapshots = u as u64;
            s.stored = st as u64;
            s.indexed_blocks =
                db.query_row("SELECT COUNT(*) FROM blocks", [], |r| r.get::<_, i64>(0))? as u64;
        }
        for id in self
            .inner
            .packs
            .list()
            .map_err(|e| Error::io("listing packs", e))?
        {
            s.pack_bytes += self.inner.packs.len(id).unwrap_or(0);
        }
        s.compress_ratio = ratio(s.unique_with_snapshots, s.stored);
        s.dedup_ratio = ratio(s.referenced, s.unique);
        Ok(s)
    }

    /// Apply a sealed change set to an image as ONE transaction (for a
    /// commit or a flush of an [`ImageHandle`](crate::ImageHandle)).
    ///
    /// `durable` runs just before the transaction commits and must return
    /// only once every record the new rows name is on stable storage (the
    /// caller syncs the packs meanwhile, beside the statements); its error
    /// rolls the transaction back.
    pub(crate) fn apply_commit(
        &self,
        c: &CommitRequest<'_>,
        durable: impl FnOnce() -> Result<()>,
    ) -> Result<Committed> {
        let t0 = std::time::Instant::now();
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row = image_row_by_id(&tx, c.image_id, c.name)?;
        if row.version != c.base_version {
            return Err(Error::Conflict {
                image: c.name.into(),
                expected: c.base_version,
                found: row.version,
            });
        }
        let v = row.version + 1;
        for h in c.shared {
            let indexed: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM blocks WHERE hash = ?1)",
                [&h.0[..]],
                |r| r.get(0),
            )?;
            if !indexed && !c.new_blocks.contains_key(h) {
                // Its source changed and GC swept it before we could share it.
                return Err(Error::MissingBlock {
                    hash: *h,
                    image: Some(c.name.into()),
                    block: None,
                });
            }
        }
        let count_live = || -> Result<u64> {
            Ok(tx.query_row(
                "SELECT COUNT(*) FROM map WHERE image = ?1 AND died IS NULL",
                [c.image_id],
                |r| r.get::<_, i64>(0),
            )? as u64)
        };
        // Live rows are counted only under a quota, and only when the caller
        // does not know them for this version: a COUNT is O(image), and ran
        // twice in every commit of a quota'd image (each commit now adds up
        // what its statements changed).
        let live_before = match (row.quota, c.live_before) {
            (None, _) => None,
            (Some(_), Some(n)) => Some(n),
            (Some(_), None) => Some(count_live()?),
        };
        let mut delta: i64 = 0;
        {
            index_records(&tx, c.new_blocks.iter())?;
            if let Some(t) = c.trunc_from {
                delta -= tx.execute(
                    "UPDATE map SET died = ?3 WHERE image = ?1 AND died IS NULL AND block >= ?2",
                    params![c.image_id, t as i64, v as i64],
                )? as i64;
            }
            // A replaced row that no snapshot pins (born after the newest
            // one) is deleted outright: marking it dead for the prune below
            // to delete touched three more index entries per changed block.
            let newest_snapshot: Option<i64> = tx
                .prepare_cached("SELECT MAX(version) FROM snapshots WHERE image = ?1")?
                .query_row([c.image_id], |r| r.get(0))?;
            let mut drop_row = tx.prepare_cached(
                "DELETE FROM map WHERE image = ?1 AND block = ?2 AND died IS NULL AND born > ?3",
            )?;
            let mut kill = tx.prepare_cached(
                "UPDATE map SET died = ?3 WHERE image = ?1 AND block = ?2 AND died IS NULL",
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO map(image, block, born, died, hash) VALUES (?1, ?2, ?3, NULL, ?4)",
            )?;
            for (&block, staged) in c.staged {
                let unpinned = newest_snapshot.unwrap_or(-1);
                let mut gone = drop_row.execute(params![c.image_id, block as i64, unpinned])?;
                if gone == 0 {
                    gone = kill.execute(params![c.image_id, block as i64, v as i64])?;
                }
                delta -= gone as i64;
                if let Staged::Block(h) = staged {
                    delta += insert.execute(params![c.image_id, block as i64, v as i64, &h.0[..]])? as i64;
                }
            }
        }
        let live = live_before.map(|n| (n as i64 + delta).max(0) as u64);
        #[cfg(debug_assertions)]
        if let Some(live) = live {
            debug_assert_eq!(live, count_live()?, "live rows of {} miscounted", c.name);
        }
        if let (Some(quota), Some(live), Some(before)) = (row.quota, live, live_before) {
            // Refuse growth past the quota; a commit that shrinks usage is always allowed.
            if live * self.block_size() > quota && live > before {
                // Dropping `tx` rolls everything back.
                return Err(Error::QuotaExceeded {
                    image: c.name.into(),
                    quota,
                });
            }
        }
        let stamp = bump_version(&tx, &row, v, c.size, self.inner.config.node_id)?;
        meta::prune(&tx, c.image_id, v, v)?;
        // Nothing of the transaction is durable or visible before its commit
        // record (pages SQLite spills to the WAL early count for nothing
        // without it), so the map may point at records only once they are.
        let t1 = std::time::Instant::now();
        durable()?; // (dropping `tx` on its error rolls back)
        let t2 = std::time::Instant::now();
        tx.commit()?;
        tracing::trace!(
            image = c.name,
            statements_us = (t1 - t0).as_micros() as u64,
            durable_wait_us = (t2 - t1).as_micros() as u64,
            commit_us = t2.elapsed().as_micros() as u64,
            "metadata transaction"
        );
        Ok(Committed {
            version: v,
            stamp,
            live,
        })
    }
}

/// The right to write one image: held by at most one live handle, in any
/// process, so no writer's buffered changes are ever overwritten or rolled
/// back underneath it. Released on drop (or when its process dies).
#[derive(Debug)]
pub(crate) struct WriterLease {
    store: Store,
    image: i64,
    token: i64,
}

impl Drop for WriterLease {
    fn drop(&mut self) {
        let _ = self.store.db().execute(
            "DELETE FROM writers WHERE image = ?1 AND pid = ?2 AND token = ?3",
            params![self.image, std::process::id() as i64, self.token],
        );
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The live writer of an image, if any (rows of dead processes are removed).
fn live_writer(conn: &Connection, image: i64) -> Result<Option<u32>> {
    let pids: Vec<i64> = {
        let mut st = conn.prepare_cached("SELECT pid FROM writers WHERE image = ?1")?;
        let rows = st
            .query_map([image], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        rows
    };
    for pid in pids {
        if pid_alive(pid as u32) {
            return Ok(Some(pid as u32));
        }
        conn.execute(
            "DELETE FROM writers WHERE image = ?1 AND pid = ?2",
            params![image, pid],
        )?;
    }
    Ok(None)
}

impl Store {
    /// Take the writer lease of an image (fails with `ImageBusy` if another
    /// live handle, in this or another process, holds it).
    pub(crate) fn acquire_writer(&self, image: i64, name: &str) -> Result<WriterLease> {
        self.check_writable()?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Some(pid) = live_writer(&tx, image)? {
            return Err(Error::ImageBusy {
                image: name.into(),
                pid,
            });
        }
        let token: i64 = rand::random();
        tx.execute(
            "INSERT INTO writers(image, pid, token, since_ms) VALUES (?1, ?2, ?3, ?4)",
            params![image, std::process::id() as i64, token, meta::now_ms() as i64],
        )?;
        tx.commit()?;
        Ok(WriterLease {
            store: self.clone(),
            image,
            token,
        })
    }

    /// Whether a live handle has the image open for writing (and its pid).
    pub fn image_writer(&self, name: &str) -> Result<Option<u32>> {
        let row = self.image_row(name)?;
        live_writer(&self.db(), row.id)
    }
}

fn refuse_if_open(conn: &Connection, row: &ImageRow) -> Result<()> {
    match live_writer(conn, row.id)? {
        Some(pid) => Err(Error::ImageBusy {
            image: row.name.clone(),
            pid,
        }),
        None => Ok(()),
    }
}

/// What a handle commits.
pub(crate) struct CommitRequest<'a> {
    pub image_id: i64,
    pub name: &'a str,
    pub base_version: u64,
    pub size: u64,
    pub trunc_from: Option<u64>,
    pub staged: &'a BTreeMap<u64, Staged>,
    pub new_blocks: &'a HashMap<BlockHash, BlockLoc>,
    /// Blocks shared from other images: they must still be indexed.
    pub shared: &'a HashSet<BlockHash>,
    /// Live map rows at `base_version`, if the caller knows them.
    pub live_before: Option<u64>,
}

/// What [`Store::apply_commit`] made.
#[derive(Debug)]
pub(crate) struct Committed {
    pub version: u64,
    pub stamp: Stamp,
    /// Live map rows of the new version, when counted (under a quota).
    pub live: Option<u64>,
}

fn retry_eintr(mut f: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

pub(crate) fn loc_from_row(r: &rusqlite::Row) -> rusqlite::Result<BlockLoc> {
    Ok(BlockLoc {
        pack: r.get::<_, i64>(0)? as u64,
        offset: r.get::<_, i64>(1)? as u64,
        stored_len: r.get::<_, i64>(2)? as u32,
        raw_len: r.get::<_, i64>(3)? as u32,
        codec: Codec::from_u8(r.get::<_, i64>(4)? as u8).unwrap_or(Codec::Raw),
    })
}

/// An image's row.
#[derive(Clone, Debug)]
pub(crate) struct ImageRow {
    pub id: i64,
    pub name: String,
    pub size: u64,
    pub version: u64,
    pub stamp: Stamp,
    pub quota: Option<u64>,
    pub created_ms: u64,
}

const IMAGE_COLS: &str = "id, name, size, version, stamp_ms, stamp_ctr, origin, quota, created_ms";

fn image_from_row(r: &rusqlite::Row) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        id: r.get(0)?,
        name: r.get(1)?,
        size: r.get::<_, i64>(2)? as u64,
        version: r.get::<_, i64>(3)? as u64,
        stamp: meta::stamp_from_row(r, 4)?,
        quota: r.get::<_, Option<i64>>(7)?.map(|q| q as u64),
        created_ms: r.get::<_, i64>(8)? as u64,
    })
}

fn image_row(conn: &Connection, name: &str) -> Result<ImageRow> {
    conn.query_row(
        &format!("SELECT {IMAGE_COLS} FROM images WHERE name = ?1"),
        [name],
        image_from_row,
    )
    .optional()?
    .ok_or_else(|| Error::NoSuchImage(name.into()))
}

fn image_row_by_id(conn: &Connection, id: i64, name: &str) -> Result<ImageRow> {
    conn.prepare_cached(&format!("SELECT {IMAGE_COLS} FROM images WHERE id = ?1"))?
        .query_row([id], image_from_row)
        .optional()?
        .ok_or_else(|| Error::NoSuchImage(name.into()))
}

fn snapshots_of(conn: &Connection, image: i64) -> Result<Vec<SnapshotInfo>> {
    let mut st = conn.prepare_cached(
        "SELECT name, version, size, stamp_ms, stamp_ctr, origin, created_ms FROM snapshots
          WHERE image = ?1 ORDER BY version, created_ms, name",
    )?;
    let rows = st
        .query_map([image], |r| {
            Ok(SnapshotInfo {
                name: r.get(0)?,
                version: r.get::<_, i64>(1)? as u64,
                size: r.get::<_, i64>(2)? as u64,
                stamp: meta::stamp_from_row(r, 3)?,
                created_ms: r.get::<_, i64>(6)? as u64,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

fn snapshot_row(conn: &Connection, image: &ImageRow, snap: &str) -> Result<SnapshotInfo> {
    validate_name(snap)?;
    snapshots_of(conn, image.id)?
        .into_iter()
        .find(|s| s.name == snap)
        .ok_or_else(|| Error::NoSuchSnapshot {
            image: image.name.clone(),
            snapshot: snap.into(),
        })
}

/// A lock file in the store directory (created if missing; never truncated).
fn open_lock_file(dir: &Path, name: &str) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(name))
}

/// Index records whose packs are synced, and extend those packs'
/// `committed_len` to cover them (batches end on a page boundary).
pub(crate) fn index_records<'a>(
    tx: &Transaction<'_>,
    records: impl IntoIterator<Item = (&'a BlockHash, &'a BlockLoc)>,
) -> Result<()> {
    let mut ins = tx.prepare_cached(
        "INSERT OR IGNORE INTO blocks(hash, pack, offset, stored_len, raw_len, codec)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut ends: BTreeMap<PackId, u64> = BTreeMap::new();
    // In hash order, as the index is keyed: consecutive inserts land on the
    // same or the next leaf, not on pages all over the tree (a 1 GiB flush
    // indexes ~16k blocks; its statements took 10–25 % less time so).
    let mut records: Vec<_> = records.into_iter().collect();
    records.sort_unstable_by_key(|(h, _)| *h);
    for (hash, loc) in records {
        ins.execute(params![
            &hash.0[..],
            loc.pack as i64,
            loc.offset as i64,
            loc.stored_len as i64,
            loc.raw_len as i64,
            loc.codec as i64
        ])?;
        let e = ends.entry(loc.pack).or_default();
        *e = (*e).max(align_up(loc.end()));
    }
    let mut packs = tx.prepare_cached(
        "INSERT INTO packs(id, committed_len) VALUES (?1, ?2)
         ON CONFLICT(id) DO UPDATE SET committed_len = MAX(committed_len, excluded.committed_len)",
    )?;
    for (pack, end) in ends {
        packs.execute(params![pack as i64, end as i64])?;
    }
    Ok(())
}

/// Insert a new image at version 1 (fails if the name is taken); returns its id.
fn insert_image(tx: &Transaction<'_>, name: &str, size: u64, node: NodeId) -> Result<i64> {
    if image_row(tx, name).is_ok() {
        return Err(Error::ImageExists(name.into()));
    }
    let stamp = meta::next_stamp(tx, node)?;
    let seq = meta::next_seq(tx)?;
    tx.execute(
        "INSERT INTO images(name, size, version, stamp_ms, stamp_ctr, origin, seq, created_ms)
         VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6, ?7)",
        params![
            name,
            size as i64,
            stamp.hlc.wall_ms as i64,
            stamp.hlc.counter as i64,
            &stamp.origin.0[..],
            seq,
            meta::now_ms() as i64
        ],
    )?;
    let id = tx.last_insert_rowid();
    meta::record_history(tx, id, 1, &stamp)?;
    meta::forget_removal(tx, name)?;
    Ok(id)
}

fn bump_version(tx: &Transaction<'_>, row: &ImageRow, v: u64, size: u64, node: NodeId) -> Result<Stamp> {
    let stamp = meta::next_stamp(tx, node)?;
    let seq = meta::next_seq(tx)?;
    tx.prepare_cached(
        "UPDATE images SET version = ?2, size = ?3, stamp_ms = ?4, stamp_ctr = ?5, origin = ?6, seq = ?7
          WHERE id = ?1",
    )?
    .execute(params![
        row.id,
        v as i64,
        size as i64,
        stamp.hlc.wall_ms as i64,
        stamp.hlc.counter as i64,
        &stamp.origin.0[..],
        seq
    ])?;
    meta::record_history(tx, row.id, v, &stamp)?;
    Ok(stamp)
}
