//! The thin `fuser::Filesystem` adapter over [`Vfs`]: it converts
//! arguments, calls one `Vfs` method, and converts the result or the error's
//! errno. Each operation runs in a `tracing` span with the request id, inode
//! and pid. Everything worth testing lives in [`crate::vfs`].

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug_span, warn};

use crate::vfs::{Attr, Kind, Vfs};
use crate::Error;

/// How long the kernel may cache attributes and entries (images can change
/// behind the mount: keep it short).
const TTL: Duration = Duration::from_secs(1);

/// The adapter.
pub struct Fuse {
    vfs: Arc<Vfs>,
    uid: u32,
    gid: u32,
}

impl Fuse {
    /// Serve `vfs`.
    pub fn new(vfs: Arc<Vfs>) -> Fuse {
        Fuse {
            vfs,
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        }
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        let t = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.allocated.div_ceil(512),
            atime: t(a.mtime_ms),
            mtime: t(a.mtime_ms),
            ctime: t(a.mtime_ms),
            crtime: t(a.crtime_ms),
            kind: match a.kind {
                Kind::Dir => FileType::Directory,
                Kind::File => FileType::RegularFile,
            },
            perm: a.perm,
            nlink: if a.kind == Kind::Dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: a.blksize,
            flags: 0,
        }
    }
}

fn errno(e: &Error) -> Errno {
    let n = e.errno();
    if n == libc::EIO {
        warn!(error = %e, "I/O error returned to the kernel");
    }
    Errno::from_i32(n)
}

fn name_str(name: &OsStr) -> Result<&str, Errno> {
    name.to_str().ok_or(Errno::EINVAL)
}

impl Filesystem for Fuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO | InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn destroy(&mut self) {
        self.vfs.shutdown();
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _s = debug_span!("lookup", req = req.unique().0, ino = parent.0, pid = req.pid()).entered();
        let r = name_str(name)
            .and_then(|n| guarded("lookup", || self.vfs.lookup(parent.0, n)).map_err(|e| errno(&e)));
        match r {
            Ok(a) => reply.entry(&TTL, &self.attr(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _s = debug_span!("getattr", req = req.unique().0, ino = ino.0, pid = req.pid()).entered();
        match guarded("getattr", || self.vfs.getattr(ino.0)) {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _s = debug_span!(
            "setattr",
            req = req.unique().0,
            ino = ino.0,
            pid = req.pid(),
            ?size
        )
        .entered();
        // Only the size is stored; mode, owner and times are accepted and ignored.
        let r = match size {
            Some(s) => guarded("set_size", || self.vfs.set_size(ino.0, s)),
            None => guarded("getattr", || self.vfs.getattr(ino.0)),
        };
        match r {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _s = debug_span!("unlink", req = req.unique().0, ino = parent.0, pid = req.pid()).entered();
        match name_str(name)
            .and_then(|n| guarded("unlink", || self.vfs.unlink(parent.0, n)).map_err(|e| errno(&e)))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _s = debug_span!("rename", req = req.unique().0, ino = parent.0, pid = req.pid()).entered();
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let r = name_str(name).and_then(|a| {
            name_str(newname).and_then(|b| {
                self.vfs
                    .rename(parent.0, a, newparent.0, b, noreplace)
                    .map_err(|e| errno(&e))
            })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _s = debug_span!("open", req = req.unique().0, ino = ino.0, pid = req.pid()).entered();
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match guarded("open", || self.vfs.open(ino.0, write)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let _s = debug_span!("create", req = req.unique().0, ino = parent.0, pid = req.pid()).entered();
        match name_str(name)
            .and_then(|n| guarded("create", || self.vfs.create(parent.0, n)).map_err(|e| errno(&e)))
        {
            Ok((a, fh)) => reply.created(
                &TTL,
                &self.attr(&a),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _s = debug_span!("read", req = req.unique().0, ino = ino.0, offset, size).entered();
        // One buffer per serving thread: a fresh zeroed 1 MiB per request
        // cost a memset and, from the allocator, page faults.
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with(|b| {
            let mut b = b.borrow_mut();
            if b.len() < size as usize {
                b.resize(size as usize, 0);
            }
            match guarded("read_into", || {
                self.vfs.read_into(fh.0, offset, &mut b[..size as usize])
            }) {
                Ok(n) => reply.data(&b[..n]),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _s = debug_span!(
            "write",
            req = req.unique().0,
            ino = ino.0,
            offset,
            len = data.len()
        )
        .entered();
        match guarded("write", || self.vfs.write(fh.0, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&self, req: &Request, ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let _s = debug_span!("flush", req = req.unique().0, ino = ino.0).entered();
        match guarded("fsync", || self.vfs.fsync(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _s = debug_span!("release", req = req.unique().0, ino = ino.0).entered();
        match guarded("release", || self.vfs.release(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(&self, req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let _s = debug_span!("fsync", req = req.unique().0, ino = ino.0).entered();
        match guarded("fsync", || self.vfs.fsync(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(&self, req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let _s = debug_span!("readdir", req = req.unique().0, ino = ino.0, offset).entered();
        let entries = match guarded("readdir", || self.vfs.readdir(ino.0)) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e)),
        };
        let parent = if ino.0 == crate::vfs::ROOT_INO {
            ino.0
        } else {
            crate::vfs::ROOT_INO
        };
        let all = [
            (ino.0, FileType::Directory, ".".to_string()),
            (parent, FileType::Directory, "..".to_string()),
        ]
        .into_iter()
        .chain(entries.into_iter().map(|e| {
            let kind = if e.kind == Kind::Dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            (e.ino, kind, e.name)
        }));
        for (i, (ino, kind, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY); // no ioctls: tools probing for them fall back
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match guarded("statfs", || self.vfs.statfs()) {
            Ok(s) => reply.statfs(
                s.blocks,
                s.bfree,
                s.bavail,
                s.files,
                u32::MAX as u64,
                s.frsize as u32,
                255,
                s.frsize as u32,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _s = debug_span!(
            "fallocate",
            req = req.unique().0,
            ino = ino.0,
            offset,
            length,
            mode
        )
        .entered();
        match guarded("fallocate", || self.vfs.fallocate(fh.0, offset, length, mode)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _s = debug_span!("lseek", req = req.unique().0, ino = ino.0, offset, whence).entered();
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(Errno::EINVAL),
        };
        if offset < 0 {
            return reply.error(Errno::ENXIO);
        }
        match guarded("seek", || self.vfs.seek(fh.0, offset as u64, data)) {
            Ok(Some(o)) => reply.offset(o as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _s = debug_span!("copy_file_range", req = req.unique().0, ino = ino_in.0, len).entered();
        let len = len.min(u32::MAX as u64 & !0xfff);
        match guarded("copy_range", || {
            self.vfs.copy_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        }) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// Mount options geosync uses.
pub fn mount_config(threads: usize) -> Config {
    let mut c = Config::default();
    c.mount_options = vec![
        MountOption::FSName("geosync".into()),
        MountOption::Subtype("geosync".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    c.n_threads = Some(threads.max(1));
    c
}

/// Mount `vfs` at `mountpoint` in the background; the session unmounts when
/// the returned handle is dropped or `umount_and_join` is called.
pub fn spawn(vfs: Arc<Vfs>, mountpoint: &Path, threads: usize) -> std::io::Result<fuser::BackgroundSession> {
    fuser::spawn_mount(Fuse::new(vfs), mountpoint, &mount_config(threads))
}

/// `f`, with a panic in it turned into an error (`EIO` to the kernel) and
/// logged: a bug met by one request must not take the mount, and every VM
/// disk on it, down (a fuser worker that dies ends the session). An image
/// whose lock the panic left poisoned drops its uncommitted writes and
/// reports that to their writers ([`Vfs`]).
fn guarded<T>(op: &str, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = crate::panic_message(&*p);
        tracing::error!(op, panic = %msg, "a request panicked; answered with EIO");
        Err(Error::Internal(format!("{op} panicked: {msg}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_request_is_answered_with_eio() {
        let r: Result<(), Error> = guarded("write", || panic!("a bug"));
        let e = r.unwrap_err();
        assert!(e.to_string().contains("write panicked: a bug"), "{e}");
        assert_eq!(errno(&e), Errno::EIO);
        assert_eq!(guarded("read", || Ok(7)).unwrap(), 7);
    }
}
