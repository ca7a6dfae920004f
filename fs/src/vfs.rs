//! The filesystem the mount serves, as plain methods over the store — tested
//! without FUSE; [`crate::fuse`] is a thin adapter over it.
//!
//! Namespace (flat):
//! - `/<image>`: read-write image files. `create` makes an empty image,
//!   `unlink` removes one, `rename` renames (replacing the target).
//! - `/.snapshots/<image>/<snapshot>`: read-only images; `unlink` deletes
//!   the snapshot.
//!
//! Names outside `[A-Za-z0-9][A-Za-z0-9._-]{0,127}` are refused with EINVAL.
//!
//! Open files: every open of an image shares one [`ImageHandle`] (so all
//! file descriptors see the same bytes), behind a read-write lock: reads run
//! in parallel, writes one at a time. The first open for writing takes the
//! image's writer lease (EBUSY if another process writes it). When the last
//! descriptor closes, pending changes are committed and the handle dropped,
//! so the next open sees any change made behind the mount (a rollback, a
//! replica update).
//!
//! Commits: on `fsync` and `flush` (every `close`), and from
//! [`Vfs::commit_due`] for images with changes older than `commit_interval`
//! (each a full commit: everything written is sealed, then durable).
//! A write that finds half the `dirty_limit` of an image's blocks in memory
//! (dirty or being sealed) waits for seal jobs to give some back
//! (backpressure); the write that finds `flush_at` bytes of them sealed
//! (uncommitted, holding no memory) commits those as a new version (a
//! [`crate::Flush`]) without holding the image, so other writes go on
//! meanwhile. (A full dirty set used to force a full commit, which stopped
//! every writer until the whole backlog was sealed.) `fsync` returns only
//! when the data is durable. A failed commit drops the image's uncommitted writes; every
//! file handle open then gets [`Error::WritesLost`] once from its next
//! `fsync`/`flush` (the kernel's `errseq` rule for writeback errors), so
//! acknowledged writes are never silently missing from a version an
//! `fsync` called durable. Memory: at most half the `dirty_limit` of blocks
//! per open image (plus one write per FUSE thread), and the store's read cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::image::BlockSource;
use crate::{validate_name, Error, ImageHandle, Result, Stamp, Store};

/// Inode of the root directory.
pub const ROOT_INO: u64 = 1;
/// Inode of `/.snapshots`.
pub const SNAP_ROOT_INO: u64 = 2;
/// Name of the snapshots directory.
pub const SNAP_DIR: &str = ".snapshots";

/// Mount settings.
#[derive(Clone, Debug)]
pub struct VfsConfig {
    /// Bytes of blocks per open image: writes wait for sealing while half
    /// of it is in memory (dirty or being sealed).
    pub dirty_limit: usize,
    /// Sealed, uncommitted bytes of an open image that a write commits as a
    /// version (a *flush*) while writing goes on. Sealed blocks hold no
    /// memory, only their map entries; a flush's metadata transaction costs
    /// about a page per changed block of the dedup index (random by hash)
    /// plus its map rows, so fewer, larger flushes write less: flushes of
    /// 128 MiB held the store's connection 20-70 ms each, 14 times per
    /// 2 GiB written, while seal jobs waited for it to look blocks up.
    pub flush_at: usize,
    /// Changes older than this are committed by [`Vfs::commit_due`].
    pub commit_interval: Duration,
    /// Dirty bytes of an open image that start a background seal job.
    pub seal_at: usize,
    /// Also start one for any dirty block while no job of that image runs.
    pub eager_seal: bool,
}

impl VfsConfig {
    /// Bytes of blocks in memory, and of sealed ones, per open image.
    fn half_limit(&self) -> usize {
        (self.dirty_limit / 2).max(1)
    }

    /// Sealed bytes of an image that start a flush.
    fn flush_bytes(&self) -> usize {
        self.flush_at.max(1)
    }
}

impl Default for VfsConfig {
    fn default() -> Self {
        VfsConfig {
            dirty_limit: 256 << 20,
            flush_at: 1 << 30,
            commit_interval: Duration::from_secs(5),
            seal_at: crate::image::SEAL_JOB_BYTES,
            eager_seal: true,
        }
    }
}

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Node {
    Root,
    SnapRoot,
    SnapDir(String),
    Image(String),
    Snapshot(String, String),
}

/// File or directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// An image file.
    File,
}

/// Attributes of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// File or directory.
    pub kind: Kind,
    /// Logical size.
    pub size: u64,
    /// Bytes really allocated (for `st_blocks`).
    pub allocated: u64,
    /// Permission bits.
    pub perm: u16,
    /// Modification time (ms since the epoch): the version's stamp.
    pub mtime_ms: u64,
    /// Creation time (ms since the epoch).
    pub crtime_ms: u64,
    /// Preferred I/O size (the block size).
    pub blksize: u32,
}

/// A directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Inode number.
    pub ino: u64,
    /// File or directory.
    pub kind: Kind,
    /// Name.
    pub name: String,
}

/// Store usage for `statfs`.
#[derive(Clone, Copy, Debug)]
pub struct FsStats {
    /// Fragment size.
    pub frsize: u64,
    /// Total fragments of the disk holding the store.
    pub blocks: u64,
    /// Free fragments.
    pub bfree: u64,
    /// Free fragments for unprivileged users.
    pub bavail: u64,
    /// Images.
    pub files: u64,
}

#[derive(Default)]
struct Nodes {
    by_ino: HashMap<u64, Node>,
    by_node: HashMap<Node, u64>,
    next: u64,
}

impl Nodes {
    fn ino(&mut self, n: Node) -> u64 {
        match n {
            Node::Root => return ROOT_INO,
            Node::SnapRoot => return SNAP_ROOT_INO,
            _ => {}
        }
        if let Some(&i) = self.by_node.get(&n) {
            return i;
        }
        self.next = self.next.max(SNAP_ROOT_INO) + 1;
        let i = self.next;
        self.by_node.insert(n.clone(), i);
        self.by_ino.insert(i, n);
        i
    }

    fn get(&self, ino: u64) -> Option<Node> {
        match ino {
            ROOT_INO => Some(Node::Root),
            SNAP_ROOT_INO => Some(Node::SnapRoot),
            _ => self.by_ino.get(&ino).cloned(),
        }
    }

    fn forget(&mut self, n: &Node) {
        if let Some(i) = self.by_node.remove(n) {
            self.by_ino.remove(&i);
        }
    }

    fn rename(&mut self, from: &Node, to: Node) {
        if let Some(i) = self.by_node.remove(from) {
            self.by_node.insert(to.clone(), i);
            self.by_ino.insert(i, to);
        }
    }
}

/// Writes dropped by background work: how many times, and the last
/// (image, cause, errno).
type LostWrites = (u64, Option<(String, String, i32)>);

/// Makes a directory's node from an entry's name.
type NodeOf = Box<dyn Fn(String) -> Node>;

struct OpenImage {
    handle: RwLock<ImageHandle>,
    opens: AtomicU64,
    /// When the oldest uncommitted change was made (None: nothing pending).
    dirty_since: Mutex<Option<Instant>>,
    /// Failures of background work (a seal job, a timed commit, a commit
    /// answered to a write) that dropped acknowledged writes: how many so
    /// far, and the last one (image, cause, errno). Like the kernel's
    /// `errseq`, every file handle open when one happens gets it once from
    /// its next `fsync`/`flush`, so durability is never claimed for them.
    lost: Mutex<LostWrites>,
}

impl OpenImage {
    /// The image handle, locked for writing. If an operation panicked while
    /// holding it, what it left is not to be trusted: the uncommitted
    /// changes are dropped (the next `fsync` of every file handle reports
    /// it, as for any lost writes) and the image goes on from its last
    /// committed version; the panic itself was answered with `EIO`.
    fn write(&self) -> RwLockWriteGuard<'_, ImageHandle> {
        match self.handle.write() {
            Ok(h) => h,
            Err(poisoned) => {
                let mut h = poisoned.into_inner();
                h.discard();
                self.handle.clear_poison();
                let cause = Error::Internal("an operation on the image panicked".into());
                self.writes_lost(h.name(), &cause);
                h
            }
        }
    }

    /// The image handle, locked for reading (recovered as by
    /// [`OpenImage::write`] if an operation panicked holding it).
    fn read(&self) -> RwLockReadGuard<'_, ImageHandle> {
        if self.handle.is_poisoned() {
            drop(self.write());
        }
        self.handle.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Record that a failure dropped this image's uncommitted writes.
    fn writes_lost(&self, image: &str, e: &Error) {
        warn!(image, error = %e, "uncommitted writes were dropped; the next fsync reports it");
        let mut lost = self.lost.lock().unwrap();
        lost.0 += 1;
        lost.1 = Some((image.to_string(), e.to_string(), e.errno()));
    }
}

/// The mounted filesystem, independent of FUSE.
pub struct Vfs {
    store: Store,
    cfg: VfsConfig,
    nodes: Mutex<Nodes>,
    open: Mutex<HashMap<u64, Arc<OpenImage>>>,
    /// Open file handles: inode, and the count of lost-writes failures of
    /// the image this handle has been told of (or was opened after).
    fhs: Mutex<HashMap<u64, (u64, u64)>>,
    /// A GC in another process waits (checked by [`Vfs::commit_due`]): no
    /// new seal jobs start, so this process can leave the stage gate.
    gc_draining: std::sync::atomic::AtomicBool,
    next_fh: AtomicU64,
    mounted_ms: u64,
    /// Allocated bytes of images and snapshots not open here, by inode, with
    /// the version and stamp they were counted at: `ls -l` or `du` over
    /// many images does not count every map again each time the kernel's
    /// attributes expire (a count holds the store's connection).
    allocated: Mutex<HashMap<u64, (u64, Stamp, u64)>>,
}

fn enoent(what: &str) -> Error {
    Error::NoSuchImage(what.to_string())
}

impl Vfs {
    /// A filesystem over `store`.
    pub fn new(store: Store, cfg: VfsConfig) -> Vfs {
        Vfs {
            store,
            cfg,
            nodes: Mutex::new(Nodes::default()),
            open: Mutex::new(HashMap::new()),
            fhs: Mutex::new(HashMap::new()),
            gc_draining: std::sync::atomic::AtomicBool::new(false),
            next_fh: AtomicU64::new(1),
            mounted_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            allocated: Mutex::new(HashMap::new()),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn node(&self, ino: u64) -> Result<Node> {
        self.nodes
            .lock()
            .unwrap()
            .get(ino)
            .ok_or_else(|| enoent(&format!("inode {ino}")))
    }

    fn dir_attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            allocated: 0,
            perm: 0o755,
            mtime_ms: self.mounted_ms,
            crtime_ms: self.mounted_ms,
            blksize: self.store.block_size() as u32,
        }
    }

    fn handle_attr(&self, ino: u64, h: &ImageHandle) -> Result<Attr> {
        self.attr_with(ino, h, h.allocated_bytes()?)
    }

    fn attr_with(&self, ino: u64, h: &ImageHandle, allocated: u64) -> Result<Attr> {
        Ok(Attr {
            ino,
            kind: Kind::File,
            size: h.size(),
            allocated,
            perm: if h.is_read_only() { 0o444 } else { 0o644 },
            mtime_ms: h.stamp().hlc.wall_ms,
            crtime_ms: h.created_ms(),
            blksize: self.store.block_size() as u32,
        })
    }

    fn attr_of(&self, ino: u64, node: &Node) -> Result<Attr> {
        match node {
            Node::Root | Node::SnapRoot | Node::SnapDir(_) => Ok(self.dir_attr(ino)),
            _ => {
                let open = self.open.lock().unwrap().get(&ino).cloned(); // table lock released here
                if let Some(o) = open {
                    return self.handle_attr(ino, &o.read());
                }
                let h = match node {
                    Node::Image(name) => self.store.open_image(name)?,
                    Node::Snapshot(img, snap) => self.store.open_snapshot(img, snap)?,
                    _ => unreachable!(),
                };
                let at = (h.version(), h.stamp());
                let known = self.allocated.lock().unwrap().get(&ino).copied();
                let allocated = match known {
                    Some((v, s, bytes)) if (v, s) == at => bytes,
                    _ => {
                        let bytes = h.allocated_bytes()?;
                        self.allocated.lock().unwrap().insert(ino, (at.0, at.1, bytes));
                        bytes
                    }
                };
                self.attr_with(ino, &h, allocated)
            }
        }
    }

    /// Look `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr> {
        let node = match self.node(parent)? {
            Node::Root if name == SNAP_DIR => Node::SnapRoot,
            Node::Root => {
                validate_name(name)?;
                if !self.store.image_exists(name)? {
                    return Err(enoent(name));
                }
                Node::Image(name.to_string())
            }
            Node::SnapRoot => {
                validate_name(name)?;
                if !self.store.image_exists(name)? {
                    return Err(enoent(name));
                }
                Node::SnapDir(name.to_string())
            }
            Node::SnapDir(img) => {
                validate_name(name)?;
                self.store.resolve_version(&img, name)?;
                Node::Snapshot(img, name.to_string())
            }
            _ => return Err(Error::InvalidArgument("not a directory".into())),
        };
        let ino = self.nodes.lock().unwrap().ino(node.clone());
        self.attr_of(ino, &node)
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let node = self.node(ino)?;
        self.attr_of(ino, &node)
    }

    /// Entries of a directory (without `.` and `..`).
    pub fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let (entries, mk): (Vec<(String, Kind)>, NodeOf) = match self.node(ino)? {
            Node::Root => {
                let mut v = vec![(SNAP_DIR.to_string(), Kind::Dir)];
                v.extend(self.store.image_names()?.into_iter().map(|n| (n, Kind::File)));
                (v, Box::new(Node::Image))
            }
            Node::SnapRoot => (
                self.store
                    .image_names()?
                    .into_iter()
                    .map(|n| (n, Kind::Dir))
                    .collect(),
                Box::new(Node::SnapDir),
            ),
            Node::SnapDir(img) => {
                let snaps = self.store.list_snapshots(&img)?;
                (
                    snaps.into_iter().map(|s| (s.name, Kind::File)).collect(),
                    Box::new(move |s| Node::Snapshot(img.clone(), s)),
                )
            }
            _ => return Err(Error::InvalidArgument("not a directory".into())),
        };
        let mut nodes = self.nodes.lock().unwrap();
        Ok(entries
            .into_iter()
            .map(|(name, kind)| {
                let node = if name == SNAP_DIR && ino == ROOT_INO {
                    Node::SnapRoot
                } else {
                    mk(name.clone())
                };
                DirEntry {
                    ino: nodes.ino(node),
                    kind,
                    name,
                }
            })
            .collect())
    }

    /// Create an empty image `name` in the root and open it for writing.
    pub fn create(&self, parent: u64, name: &str) -> Result<(Attr, u64)> {
        if parent != ROOT_INO {
            return Err(Error::ReadOnly(
                "only images can be created, in the mount's root".into(),
            ));
        }
        validate_name(name)?;
        self.store.create_image(name, 0)?;
        let ino = self.nodes.lock().unwrap().ino(Node::Image(name.to_string()));
        let fh = self.open(ino, true)?;
        Ok((self.getattr(ino)?, fh))
    }

    /// Open an image or snapshot; returns a file handle.
    pub fn open(&self, ino: u64, write: bool) -> Result<u64> {
        let node = self.node(ino)?;
        let o = {
            let mut open = self.open.lock().unwrap();
            let o = match open.get(&ino) {
                Some(o) => o.clone(),
                None => {
                    let h = match &node {
                        Node::Image(name) => self.store.open_image(name)?,
                        Node::Snapshot(img, snap) => self.store.open_snapshot(img, snap)?,
                        _ => return Err(Error::InvalidArgument("is a directory".into())),
                    };
                    let o = Arc::new(OpenImage {
                        handle: RwLock::new(h),
                        opens: AtomicU64::new(0),
                        dirty_since: Mutex::new(None),
                        lost: Mutex::new((0, None)),
                    });
                    open.insert(ino, o.clone());
                    o
                }
            };
            // Counted before the table lock is released, so a racing release keeps it.
            o.opens.fetch_add(1, Ordering::SeqCst);
            o
        };
        if write {
            // Outside the table lock: a commit holding this image must not stall other files.
            let r = {
                let mut h = o.write();
                h.acquire().map(|()| h.set_dirty_limit(usize::MAX)) // the mount decides when to commit
            };
            if let Err(e) = r {
                if o.opens.fetch_sub(1, Ordering::SeqCst) == 1 {
                    let mut open = self.open.lock().unwrap();
                    if o.opens.load(Ordering::SeqCst) == 0
                        && open.get(&ino).is_some_and(|x| Arc::ptr_eq(x, &o))
                    {
                        open.remove(&ino);
                    }
                }
                return Err(e);
            }
        }
        let fh = self.next_fh.fetch_add(1, Ordering::SeqCst);
        let seen = o.lost.lock().unwrap().0;
        self.fhs.lock().unwrap().insert(fh, (ino, seen));
        Ok(fh)
    }

    fn file(&self, fh: u64) -> Result<(u64, Arc<OpenImage>)> {
        let ino = self
            .fhs
            .lock()
            .unwrap()
            .get(&fh)
            .map(|(ino, _)| *ino)
            .ok_or_else(|| Error::InvalidArgument(format!("bad file handle {fh}")))?;
        let o = self
            .open
            .lock()
            .unwrap()
            .get(&ino)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("file handle {fh} is not open")))?;
        Ok((ino, o))
    }

    /// Commit an open image. A failure dropped acknowledged writes: it is
    /// also kept for the next `fsync`/`flush` of every handle (see
    /// [`Vfs::sync_open`]).
    fn commit_open(&self, o: &OpenImage) -> Result<()> {
        // (Sealing the dirty set before taking the image lock, so writers go
        // on meanwhile, was tried: the mount's peak RSS passed 512 MiB, as
        // writers refill the dirty set while it is sealed, with no gain in
        // throughput measured. Seal jobs started by writes do that work.)
        self.commit_held(o, &mut o.write())
    }

    /// Commit `h`, the locked handle of `o`; a failure is kept for every
    /// file handle (see [`OpenImage::writes_lost`]).
    fn commit_held(&self, o: &OpenImage, h: &mut ImageHandle) -> Result<()> {
        if h.is_read_only() {
            return Ok(());
        }
        let r = h.commit();
        *o.dirty_since.lock().unwrap() = None;
        if let Err(e) = &r {
            o.writes_lost(h.name(), e);
        }
        r.map(|_| ())
    }

    /// `f` on `o`'s locked handle; if it failed and that dropped the
    /// uncommitted writes (its own failure, or a flush's or a seal job's it
    /// picked up: a `truncate` can be the one to meet a writer's failed
    /// flush), the next `fsync` of every file handle reports the loss.
    fn on_handle<T>(
        &self,
        o: &OpenImage,
        h: &mut ImageHandle,
        f: impl FnOnce(&mut ImageHandle) -> Result<T>,
    ) -> Result<T> {
        let before = h.failures();
        let r = f(h);
        if let Err(e) = &r {
            if h.failures() != before {
                o.writes_lost(h.name(), e);
            }
        }
        r
    }

    /// `fsync`/`flush` on `fh`: commit, and fail if this commit, or any
    /// background work since this handle last asked (or was opened), lost
    /// acknowledged writes.
    fn sync_open(&self, fh: u64, o: &OpenImage) -> Result<()> {
        let r = self.commit_open(o);
        let count = o.lost.lock().unwrap().0;
        let seen = self
            .fhs
            .lock()
            .unwrap()
            .get_mut(&fh)
            .map(|(_, seen)| std::mem::replace(seen, count))
            .unwrap_or(count);
        r?;
        Self::lost_since(o, seen)
    }

    /// The lost-writes failure of `o`, if one happened after the `seen`-th.
    fn lost_since(o: &OpenImage, seen: u64) -> Result<()> {
        match &*o.lost.lock().unwrap() {
            (count, Some((image, cause, errno))) if *count > seen => Err(Error::WritesLost {
                image: image.clone(),
                cause: cause.clone(),
                errno: *errno,
            }),
            _ => Ok(()),
        }
    }

    /// Close a file handle; the last close commits and drops the image handle.
    pub fn release(&self, fh: u64) -> Result<()> {
        let Some((ino, seen)) = self.fhs.lock().unwrap().remove(&fh) else {
            return Ok(());
        };
        let Some(o) = self.open.lock().unwrap().get(&ino).cloned() else {
            return Ok(());
        };
        if o.opens.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Commit while the image is still in the table: an open racing this
            // release (the kernel sends RELEASE after close() returns) reuses the
            // handle and its writer lease instead of finding the image busy.
            let r = self.commit_open(&o).and_then(|()| Self::lost_since(&o, seen));
            {
                // The right to write goes with the last close, not with the
                // last reference: the commit sweep or a `getattr` may hold
                // `o` a while yet, and a reopen (a VM restarted) must not
                // find the image busy. An open that reuses `o` meanwhile
                // takes it again.
                let mut h = o.write();
                if o.opens.load(Ordering::SeqCst) == 0 {
                    h.release_lease();
                }
            }
            let mut open = self.open.lock().unwrap();
            if o.opens.load(Ordering::SeqCst) == 0 && open.get(&ino).is_some_and(|x| Arc::ptr_eq(x, &o)) {
                open.remove(&ino);
            }
            return r;
        }
        Ok(())
    }

    /// Read up to `size` bytes at `offset`.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        let n = self.read_into(fh, offset, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Read into `buf` at `offset`; returns the bytes read (short at the end).
    pub fn read_into(&self, fh: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let (_, o) = self.file(fh)?;
        let h = o.read();
        h.read(offset, buf)
    }

    fn mark_dirty(&self, o: &OpenImage) {
        let mut since = o.dirty_since.lock().unwrap();
        if since.is_none() {
            *since = Some(Instant::now());
        }
    }

    /// Write `data` at `offset`. Once enough dirty blocks wait, a batch of
    /// them is sealed (hash, compress, append) on the sealing pool while
    /// requests go on writing. Once `flush_at` bytes are sealed blocks,
    /// this request commits them as a new version (a [`crate::Flush`]) while
    /// the others go on. When blocks in memory (dirty or being sealed) fill
    /// half the dirty limit, this request waits for seal jobs to free them.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let (_, o) = self.file(fh)?;
        let limit = self.cfg.dirty_limit;
        let (commit, job, flush, full) = {
            let mut h = o.write();
            self.on_handle(&o, &mut h, |h| h.write(offset, data))?;
            self.mark_dirty(&o);
            // This write is done. A failure now is background work's (an
            // earlier job, reading old contents to merge, a flush): it
            // dropped the uncommitted writes, this one included, and the
            // next fsync says so.
            if self.gc_draining.load(Ordering::Relaxed) {
                // A GC waits for the stage gate: no new jobs; commit (and
                // leave the gate) rather than fill the dirty set.
                (
                    h.pending_bytes() >= limit,
                    None,
                    None,
                    h.dirty_bytes() >= self.cfg.half_limit(),
                )
            } else {
                let job = h
                    .seal_job_when(self.cfg.seal_at, self.cfg.eager_seal)
                    .unwrap_or_else(|e| {
                        o.writes_lost(h.name(), &e);
                        None
                    });
                let flush = if h.staged_bytes() >= self.cfg.flush_bytes() {
                    h.begin_flush().unwrap_or_else(|e| {
                        o.writes_lost(h.name(), &e);
                        None
                    })
                } else {
                    None
                };
                (false, job, flush, h.dirty_bytes() >= self.cfg.half_limit())
            }
        };
        if let Some(job) = job {
            // On the sealing pool, so this write is answered now. Bounded: the
            // blocks it holds count toward the dirty limit, and a commit waits
            // for it. Its error, if any, is met by the next write or commit.
            rayon::spawn(move || job.run());
        }
        if let Some(flush) = flush {
            let ticket = flush.run();
            let mut h = o.write();
            if let Err(e) = h.land_flush(&ticket) {
                o.writes_lost(h.name(), &e);
            }
        }
        if commit {
            self.commit_open(&o)?;
        } else if full {
            self.wait_for_room(&o)?;
        }
        Ok(data.len() as u32)
    }

    /// Backpressure: while `o`'s blocks in memory (dirty or being sealed)
    /// fill half the dirty limit, wait for its seal jobs to finish and give their
    /// blocks back. If none runs (none could be started), commit instead.
    fn wait_for_room(&self, o: &OpenImage) -> Result<()> {
        loop {
            let waiter = {
                let h = o.read();
                if h.dirty_bytes() < self.cfg.half_limit() {
                    return Ok(());
                }
                h.job_waiter()
            };
            waiter.wait();
            let mut h = o.write();
            if let Err(e) = h.apply_finished() {
                o.writes_lost(h.name(), &e); // (all dropped: room now)
                return Ok(());
            }
            if h.dirty_bytes() >= self.cfg.half_limit() && h.jobs_running() == 0 {
                return self.commit_held(o, &mut h);
            }
        }
    }

    /// Make everything written through this image durable.
    pub fn fsync(&self, fh: u64) -> Result<()> {
        let (_, o) = self.file(fh)?;
        self.sync_open(fh, &o)
    }

    /// Set the size of an image (open or not).
    pub fn set_size(&self, ino: u64, size: u64) -> Result<Attr> {
        let node = self.node(ino)?;
        let name = match &node {
            Node::Image(n) => n.clone(),
            Node::Snapshot(..) => return Err(Error::ReadOnly("snapshots are read-only".into())),
            _ => return Err(Error::InvalidArgument("is a directory".into())),
        };
        let open = self.open.lock().unwrap().get(&ino).cloned();
        match open {
            Some(o) => {
                let mut h = o.write();
                self.on_handle(&o, &mut h, |h| h.set_size(size))?;
                self.mark_dirty(&o);
            }
            None => {
                let mut h = self.store.open_image(&name)?;
                h.set_size(size)?;
                h.commit()?;
            }
        }
        self.getattr(ino)
    }

    /// `fallocate(2)`: PUNCH_HOLE, ZERO_RANGE (with or without KEEP_SIZE),
    /// or plain allocation (which only extends the size: storage is thin).
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        let known = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return Err(Error::Unsupported(format!("fallocate mode {mode:#x}")));
        }
        let (_, o) = self.file(fh)?;
        let mut h = o.write();
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::InvalidArgument("fallocate range overflows".into()))?;
        self.on_handle(&o, &mut h, |h| {
            if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                h.punch(offset, len)?;
            }
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > h.size() {
                h.set_size(end)?;
            }
            Ok(())
        })?;
        self.mark_dirty(&o);
        Ok(())
    }

    /// `lseek(2)` with SEEK_DATA (`data = true`) or SEEK_HOLE; `None` is ENXIO.
    pub fn seek(&self, fh: u64, offset: u64, data: bool) -> Result<Option<u64>> {
        let (_, o) = self.file(fh)?;
        let h = o.read();
        if data {
            h.seek_data(offset)
        } else {
            h.seek_hole(offset)
        }
    }

    /// `copy_file_range(2)` inside the mount: whole blocks are shared (a
    /// clone, not a copy); unaligned edges are copied. A copy whose bytes
    /// must be copied (the two offsets not aligned alike, or overlapping
    /// ranges) copies at most half the dirty limit per call: those bytes
    /// are dirty memory (the kernel passes up to 4 GiB), and the count is
    /// short, as `copy_file_range` allows (callers loop).
    pub fn copy_range(&self, fh_in: u64, off_in: u64, fh_out: u64, off_out: u64, len: u64) -> Result<u64> {
        let (ino_in, src) = self.file(fh_in)?;
        let (ino_out, dst) = self.file(fh_out)?;
        let bs = self.store.block_size();
        let overlap =
            ino_in == ino_out && off_in < off_out.saturating_add(len) && off_out < off_in.saturating_add(len);
        let len = if off_in % bs != off_out % bs || overlap {
            len.min((self.cfg.half_limit() as u64 / bs * bs).max(bs))
        } else {
            len
        };
        let n = if ino_in == ino_out {
            let mut h = dst.write();
            self.on_handle(&dst, &mut h, |h| copy_blocks(None, h, off_in, off_out, len))?
        } else if ino_in < ino_out {
            // Locks in inode order: two copies in opposite directions cannot deadlock.
            let from = src.read();
            let mut to = dst.write();
            self.on_handle(&dst, &mut to, |to| {
                copy_blocks(Some(&from), to, off_in, off_out, len)
            })?
        } else {
            let mut to = dst.write();
            let from = src.read();
            self.on_handle(&dst, &mut to, |to| {
                copy_blocks(Some(&from), to, off_in, off_out, len)
            })?
        };
        self.mark_dirty(&dst);
        // As for writes: blocks in memory past half the limit, or sealed
        // ones past `flush_at` (a full commit here: copies are rare).
        let full = {
            let h = dst.read();
            h.dirty_bytes() >= self.cfg.half_limit() || h.staged_bytes() >= self.cfg.flush_bytes()
        };
        if full {
            self.commit_open(&dst)?;
        }
        Ok(n)
    }

    /// Remove an image (in the root) or a snapshot (in `/.snapshots/<image>`).
    pub fn unlink(&self, parent: u64, name: &str) -> Result<()> {
        validate_name(name)?;
        match self.node(parent)? {
            Node::Root => self.after_own_releases(|| {
                let node = Node::Image(name.to_string());
                let ino = self.nodes.lock().unwrap().by_node.get(&node).copied();
                if let Some(ino) = ino {
                    if self.open.lock().unwrap().contains_key(&ino) {
                        return Err(Error::ImageBusy {
                            image: name.into(),
                            pid: std::process::id(),
                        });
                    }
                }
                self.store.remove_image(name)?;
                self.nodes.lock().unwrap().forget(&node);
                info!(image = name, "removed through the mount");
                Ok(())
            }),
            Node::SnapDir(img) => {
                self.store.delete_snapshot(&img, name)?;
                self.nodes
                    .lock()
                    .unwrap()
                    .forget(&Node::Snapshot(img, name.to_string()));
                Ok(())
            }
            _ => Err(Error::ReadOnly("only images and snapshots can be removed".into())),
        }
    }

    /// `f`, again for up to a second while it finds an image busy because of
    /// this mount itself: the kernel sends the RELEASE of a closed file after
    /// `close` returned, and may send a `rename` or `unlink` made right after
    /// the close before it (`mv`/`rm` of an image just written then fail
    /// with EBUSY). A file really still open stays busy after the wait.
    fn after_own_releases<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        loop {
            match f() {
                Err(Error::ImageBusy { pid, .. })
                    if pid == std::process::id() && start.elapsed() < Duration::from_secs(1) =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => return r,
            }
        }
    }

    /// Rename an image (root to root). Replaces an existing target unless
    /// `noreplace`.
    pub fn rename(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        noreplace: bool,
    ) -> Result<()> {
        if parent != ROOT_INO || newparent != ROOT_INO {
            return Err(Error::Unsupported(
                "only images in the mount's root can be renamed".into(),
            ));
        }
        validate_name(name)?;
        validate_name(newname)?;
        if name == newname {
            return Ok(());
        }
        self.after_own_releases(|| self.rename_image(name, newname, noreplace))
    }

    fn rename_image(&self, name: &str, newname: &str, noreplace: bool) -> Result<()> {
        if self.store.image_exists(newname)? {
            if noreplace {
                return Err(Error::ImageExists(newname.into()));
            }
            let target = self
                .nodes
                .lock()
                .unwrap()
                .by_node
                .get(&Node::Image(newname.into()))
                .copied();
            if target.is_some_and(|ino| self.open.lock().unwrap().contains_key(&ino)) {
                return Err(Error::ImageBusy {
                    image: newname.into(),
                    pid: std::process::id(),
                });
            }
            self.store.replace_image(name, newname)?;
            self.nodes.lock().unwrap().forget(&Node::Image(newname.into()));
        } else {
            self.store.rename_image(name, newname)?;
        }
        self.nodes
            .lock()
            .unwrap()
            .rename(&Node::Image(name.into()), Node::Image(newname.into()));
        Ok(())
    }

    /// Usage of the disk holding the store.
    pub fn statfs(&self) -> Result<FsStats> {
        let dir = self
            .store
            .dir()
            .map(|d| d.to_path_buf())
            .unwrap_or_else(|| ".".into());
        let st = rustix::fs::statvfs(&dir).map_err(|e| Error::io("statvfs of the store", e.into()))?;
        Ok(FsStats {
            frsize: st.f_frsize,
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: self.store.image_names()?.len() as u64,
        })
    }

    /// Commit open images whose oldest pending change is older than the
    /// commit interval. Called about once a second by the mount.
    ///
    /// When a GC in another process waits ([`Store::gc_waiting`]), no new
    /// seal job starts (writes check a flag this sets), and the images that
    /// are in the stage gate are committed, one at a time, so this process
    /// leaves it and the GC gets in. (Images sealing continuously would
    /// otherwise keep some writer in the gate forever.) Images not in the
    /// gate are left alone: committing them would enter it and wait for the
    /// GC. An image busy right now is tried again next time.
    pub fn commit_due(&self) {
        let draining = self.store.gc_waiting();
        let was = self.gc_draining.swap(draining, Ordering::SeqCst);
        if draining {
            let open: Vec<Arc<OpenImage>> = self.open.lock().unwrap().values().cloned().collect();
            let mut committed = 0;
            for o in open {
                let Ok(mut h) = o.handle.try_write() else {
                    continue;
                };
                if h.is_read_only() || !h.in_stage_gate() {
                    continue;
                }
                let _ = self.commit_held(&o, &mut h);
                committed += 1;
            }
            if !was || committed > 0 {
                info!(
                    committed,
                    "a GC in another process waits: no new seal jobs; images in the stage gate committed"
                );
            }
            return;
        }
        if was {
            info!("the GC in another process is done: sealing resumes");
        }
        let open: Vec<Arc<OpenImage>> = self.open.lock().unwrap().values().cloned().collect();
        for o in open {
            let due = o
                .dirty_since
                .lock()
                .unwrap()
                .is_some_and(|t| t.elapsed() >= self.cfg.commit_interval);
            if due {
                let _ = self.commit_open(&o);
            }
        }
    }

    /// Commit every open image now; they stay open.
    pub fn commit_all(&self) -> Result<()> {
        let open: Vec<Arc<OpenImage>> = self.open.lock().unwrap().values().cloned().collect();
        let mut first_err = None;
        for o in open {
            if let Err(e) = self.commit_open(&o) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Commit everything and close all files (the unmount).
    pub fn shutdown(&self) {
        let open: Vec<Arc<OpenImage>> = self.open.lock().unwrap().drain().map(|(_, o)| o).collect();
        for o in open {
            let _ = self.commit_open(&o);
        }
        self.fhs.lock().unwrap().clear();
    }
}

/// Copy `len` bytes from `src` (or, when `None`, from `dst` itself) by
/// sharing whole blocks where both offsets have the same alignment.
fn copy_blocks(
    src: Option<&ImageHandle>,
    dst: &mut ImageHandle,
    off_in: u64,
    off_out: u64,
    len: u64,
) -> Result<u64> {
    let bs = dst.block_size();
    let len = len.min(src.unwrap_or(dst).size().saturating_sub(off_in));
    if len == 0 {
        return Ok(0);
    }
    let same = src.is_none();
    let overlap = same && off_in < off_out + len && off_out < off_in + len;
    let copy_bytes = |dst: &mut ImageHandle, a: u64, b: u64, n: u64| -> Result<()> {
        // Read all first: with one image the ranges may overlap.
        let mut done = 0;
        while done < n {
            let k = if overlap { n } else { (n - done).min(1 << 20) };
            let mut buf = vec![0u8; k as usize];
            src.unwrap_or(dst).read(a + done, &mut buf)?;
            dst.write(b + done, &buf)?;
            done += k;
        }
        Ok(())
    };
    if off_in % bs != off_out % bs || overlap || len < bs {
        copy_bytes(dst, off_in, off_out, len)?;
        return Ok(len);
    }
    let head = ((bs - off_in % bs) % bs).min(len);
    let whole = (len - head) / bs;
    if head > 0 {
        copy_bytes(dst, off_in, off_out, head)?;
    }
    if whole > 0 {
        let first_src = (off_in + head) / bs;
        let sources: Vec<BlockSource> = src.unwrap_or(dst).block_sources(first_src..first_src + whole)?;
        dst.put_blocks((off_out + head) / bs, sources, off_out + head + whole * bs)?;
    }
    let done = head + whole * bs;
    if done < len {
        copy_bytes(dst, off_in + done, off_out + done, len - done)?;
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unopened_images_allocation_is_counted_once_per_version() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::init(d.path(), &crate::InitOptions::default()).unwrap();
        let bs = s.block_size();
        let v = Vfs::new(s, VfsConfig::default());
        let (attr, fh) = v.create(ROOT_INO, "img").unwrap();
        let ino = attr.ino;
        v.write(fh, 0, &vec![7; 4 * bs as usize]).unwrap();
        v.release(fh).unwrap();
        assert_eq!(v.getattr(ino).unwrap().allocated, 4 * bs);
        // The next look uses the count kept for this version (planted here).
        v.allocated.lock().unwrap().get_mut(&ino).unwrap().2 = 12345;
        assert_eq!(v.getattr(ino).unwrap().allocated, 12345);
        // A change behind the mount is a new version: counted again.
        let mut h = v.store().open_image("img").unwrap();
        h.write(8 * bs, &vec![9; 2 * bs as usize]).unwrap();
        h.commit().unwrap();
        drop(h);
        assert_eq!(v.getattr(ino).unwrap().allocated, 6 * bs);
    }

    #[test]
    fn a_rename_or_unlink_racing_the_last_release_waits_for_it() {
        // The kernel sends RELEASE after close() returned: a `mv` or `rm`
        // right after can arrive first.
        let d = tempfile::tempdir().unwrap();
        let s = Store::init(d.path(), &crate::InitOptions::default()).unwrap();
        let v = Vfs::new(s, VfsConfig::default());
        for op in ["rename", "unlink"] {
            let (_, fh) = v.create(ROOT_INO, "img").unwrap();
            v.write(fh, 0, &[7; 4096]).unwrap();
            v.fsync(fh).unwrap(); // (the close's FLUSH)
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    std::thread::sleep(Duration::from_millis(100));
                    v.release(fh).unwrap();
                });
                match op {
                    "rename" => v.rename(ROOT_INO, "img", ROOT_INO, "img2", false).unwrap(),
                    _ => v.unlink(ROOT_INO, "img").unwrap(),
                }
            });
            if op == "rename" {
                assert!(v.lookup(ROOT_INO, "img2").is_ok());
                v.unlink(ROOT_INO, "img2").unwrap();
            }
            assert!(v.lookup(ROOT_INO, "img").is_err());
        }
        // Still open after the wait: busy.
        let (_, fh) = v.create(ROOT_INO, "open").unwrap();
        v.write(fh, 0, &[1; 4096]).unwrap();
        let e = v.rename(ROOT_INO, "open", ROOT_INO, "moved", false).unwrap_err();
        assert_eq!(e.errno(), libc::EBUSY, "{e}");
        v.release(fh).unwrap();
    }

    #[test]
    fn the_last_close_gives_up_the_right_to_write() {
        // Something else (the commit sweep) still holds the open image when
        // the last file handle closes: a reopen for writing must succeed.
        let d = tempfile::tempdir().unwrap();
        let s = Store::init(d.path(), &crate::InitOptions::default()).unwrap();
        let v = Vfs::new(s, VfsConfig::default());
        let (attr, fh) = v.create(ROOT_INO, "img").unwrap();
        let ino = attr.ino;
        v.write(fh, 0, &[7; 4096]).unwrap();
        let held = v.open.lock().unwrap().get(&ino).cloned().unwrap();
        v.release(fh).unwrap();
        let fh = v.open(ino, true).unwrap();
        v.write(fh, 4096, &[8; 4096]).unwrap();
        v.fsync(fh).unwrap();
        v.release(fh).unwrap();
        drop(held);
        let fh = v.open(ino, false).unwrap();
        assert_eq!(v.read(fh, 0, 8192).unwrap(), [[7u8; 4096], [8u8; 4096]].concat());
    }
}
