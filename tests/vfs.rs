//! The mount's filesystem logic (`fs::vfs`) without FUSE: namespace, data
//! ops, snapshots, quotas, leases — the same calls the FUSE adapter makes.

use geosync_fs::backend::{FaultPacks, FaultPlan, MemPacks};
use geosync_fs::vfs::{Kind, Vfs, VfsConfig, ROOT_INO, SNAP_ROOT_INO};
use geosync_fs::{Error, OpenMode, Store};
use geosync_suite::kit::noise;

const BS: u64 = 4096;

/// A VFS over a store whose packs (in memory) fail as a test plans.
fn faulty_vfs(cfg: VfsConfig) -> (tempfile::TempDir, FaultPacks<MemPacks>, Vfs) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meta.db");
    let packs = FaultPacks::new(MemPacks::new());
    let opts = geosync_fs::InitOptions {
        block_size: BS as u32,
        ..Default::default()
    };
    Store::init_with(&db, Box::new(packs.clone()), &opts).unwrap();
    let s = Store::open_with(&db, Box::new(packs.clone()), OpenMode::ReadWrite).unwrap();
    (dir, packs, Vfs::new(s, cfg))
}

/// [`faulty_vfs`] with `dirty_limit`, a seal job per block written and no
/// timed commits, and an image "img" open (`fh`) whose block 0 (`kept`) is
/// committed.
fn image_with_a_committed_block(
    dirty_limit: usize,
) -> (tempfile::TempDir, FaultPacks<MemPacks>, Vfs, u64, Vec<u8>) {
    let (dir, packs, v) = faulty_vfs(VfsConfig {
        dirty_limit,
        flush_at: dirty_limit / 2,
        seal_at: BS as usize,
        commit_interval: std::time::Duration::from_secs(3600),
        ..Default::default()
    });
    let (_, fh) = v.create(ROOT_INO, "img").unwrap();
    let kept = noise(1, BS as usize);
    v.write(fh, 0, &kept).unwrap();
    v.fsync(fh).unwrap();
    (dir, packs, v, fh, kept)
}

fn vfs() -> (tempfile::TempDir, Vfs) {
    let (d, s) = geosync_suite::kit::disk_store(BS as u32);
    (d, Vfs::new(s, VfsConfig::default()))
}

#[test]
fn namespace_create_lookup_rename_unlink() {
    let (_d, v) = vfs();
    let _d = _d.path().to_path_buf();
    let names: Vec<String> = v.readdir(ROOT_INO).unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, vec![".snapshots"]);
    let (a, fh) = v.create(ROOT_INO, "vm1").unwrap();
    assert_eq!(a.kind, Kind::File);
    assert_eq!(a.size, 0);
    v.set_size(a.ino, 16 << 30).unwrap();
    v.release(fh).unwrap();
    let a2 = v.lookup(ROOT_INO, "vm1").unwrap();
    assert_eq!((a2.ino, a2.size, a2.allocated), (a.ino, 16 << 30, 0));
    for bad in ["..", "a b", "x\u{7}", &"n".repeat(129), ".hidden"] {
        let e = v.create(ROOT_INO, bad).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "{bad:?}: {e}");
        assert_eq!(v.lookup(ROOT_INO, bad).unwrap_err().errno(), libc::EINVAL);
    }
    assert_eq!(v.lookup(ROOT_INO, "nope").unwrap_err().errno(), libc::ENOENT);
    assert_eq!(v.create(ROOT_INO, "vm1").unwrap_err().errno(), libc::EEXIST);
    assert_eq!(v.create(SNAP_ROOT_INO, "x").unwrap_err().errno(), libc::EROFS);

    v.rename(ROOT_INO, "vm1", ROOT_INO, "vm2", false).unwrap();
    assert_eq!(
        v.lookup(ROOT_INO, "vm2").unwrap().ino,
        a.ino,
        "rename keeps the inode"
    );
    assert_eq!(v.lookup(ROOT_INO, "vm1").unwrap_err().errno(), libc::ENOENT);
    v.create(ROOT_INO, "vm3")
        .map(|(_, fh)| v.release(fh))
        .unwrap()
        .unwrap();
    assert_eq!(
        v.rename(ROOT_INO, "vm2", ROOT_INO, "vm3", true)
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    // A refused replacing rename (the source is being written) removes nothing.
    let other = Store::open(&_d, OpenMode::ReadWrite).unwrap();
    let mut writer = other.open_image("vm2").unwrap();
    writer.write(0, b"busy").unwrap();
    assert_eq!(
        v.rename(ROOT_INO, "vm2", ROOT_INO, "vm3", false)
            .unwrap_err()
            .errno(),
        libc::EBUSY
    );
    assert!(
        v.lookup(ROOT_INO, "vm3").is_ok(),
        "the target survived the refused rename"
    );
    writer.commit().unwrap();
    drop(writer);
    v.rename(ROOT_INO, "vm2", ROOT_INO, "vm3", false).unwrap(); // replaces
    assert_eq!(v.lookup(ROOT_INO, "vm3").unwrap().size, 16 << 30);
    // An open image cannot be removed underneath its users.
    let ino = v.lookup(ROOT_INO, "vm3").unwrap().ino;
    let fh = v.open(ino, false).unwrap();
    assert_eq!(v.unlink(ROOT_INO, "vm3").unwrap_err().errno(), libc::EBUSY);
    v.release(fh).unwrap();
    v.unlink(ROOT_INO, "vm3").unwrap();
    assert_eq!(v.readdir(ROOT_INO).unwrap().len(), 1);
}

#[test]
fn data_ops_holes_and_durability() {
    let (d, v) = vfs();
    let (a, fh) = v.create(ROOT_INO, "img").unwrap();
    v.set_size(a.ino, 64 * BS).unwrap();
    let data = noise(1, 3 * BS as usize);
    assert_eq!(v.write(fh, 10 * BS + 100, &data).unwrap() as usize, data.len());
    assert_eq!(v.read(fh, 10 * BS + 100, data.len() as u32).unwrap(), data);
    assert_eq!(v.getattr(a.ino).unwrap().allocated, 4 * BS);
    assert_eq!(v.seek(fh, 0, true).unwrap(), Some(10 * BS));
    assert_eq!(v.seek(fh, 10 * BS, false).unwrap(), Some(14 * BS));
    assert_eq!(v.seek(fh, 20 * BS, true).unwrap(), None);
    // Punch a hole (KEEP_SIZE), zero a range past the end (extends).
    v.fallocate(
        fh,
        11 * BS,
        2 * BS,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    assert_eq!(v.getattr(a.ino).unwrap().allocated, 2 * BS);
    v.fallocate(fh, 63 * BS, 4 * BS, libc::FALLOC_FL_ZERO_RANGE)
        .unwrap();
    assert_eq!(v.getattr(a.ino).unwrap().size, 67 * BS);
    v.fallocate(fh, 0, 100 * BS, 0).unwrap(); // plain allocation: size only (thin)
    assert_eq!(v.getattr(a.ino).unwrap().size, 100 * BS);
    assert_eq!(
        v.fallocate(fh, 0, BS, libc::FALLOC_FL_COLLAPSE_RANGE)
            .unwrap_err()
            .errno(),
        libc::EOPNOTSUPP
    );
    v.fsync(fh).unwrap();
    let want = v.read(fh, 0, (100 * BS) as u32).unwrap();
    v.release(fh).unwrap();
    drop(v);
    // Durable: a new store open sees exactly what was fsync'd.
    let s = Store::open(d.path(), OpenMode::ReadWrite).unwrap();
    let v = Vfs::new(s, VfsConfig::default());
    let ino = v.lookup(ROOT_INO, "img").unwrap().ino;
    let fh = v.open(ino, false).unwrap();
    assert_eq!(v.read(fh, 0, (100 * BS) as u32).unwrap(), want);
}

#[test]
fn copy_file_range_shares_blocks() {
    let (_d, v) = vfs();
    let (a, fa) = v.create(ROOT_INO, "a").unwrap();
    let data = noise(2, 64 * BS as usize);
    v.write(fa, 0, &data).unwrap();
    v.fsync(fa).unwrap();
    let stored = v.store().stats().unwrap().stored;
    let (b, fb) = v.create(ROOT_INO, "b").unwrap();
    assert_eq!(v.copy_range(fa, 0, fb, 0, 64 * BS).unwrap(), 64 * BS);
    // Unaligned copy: copied, not shared.
    assert_eq!(v.copy_range(fa, 100, fb, 64 * BS + 100, 1000).unwrap(), 1000);
    v.fsync(fb).unwrap();
    let after = v.store().stats().unwrap();
    assert!(
        after.stored - stored < 2 * BS,
        "the aligned copy must share blocks: {} new bytes",
        after.stored - stored
    );
    assert_eq!(v.read(fb, 0, (64 * BS) as u32).unwrap(), data);
    assert_eq!(v.read(fb, 64 * BS + 100, 1000).unwrap(), data[100..1100]);
    // Within one image, overlapping.
    v.copy_range(fa, 0, fa, 2 * BS + 7, 8 * BS).unwrap();
    let mut want = data.clone();
    want.copy_within(0..(8 * BS) as usize, (2 * BS + 7) as usize);
    assert_eq!(v.read(fa, 0, (64 * BS) as u32).unwrap(), want);
    // Copy past the source end stops at the end.
    assert_eq!(v.copy_range(fa, 63 * BS, fb, 0, 10 * BS).unwrap(), BS);
    let _ = (a, b);
}

#[test]
fn a_copy_of_unaligned_bytes_is_bounded_by_the_dirty_limit() {
    // Offsets not aligned alike: every byte is copied into dirty memory, so
    // one call copies at most half the dirty limit; callers loop.
    let (_d, s) = geosync_suite::kit::disk_store(BS as u32);
    let v = Vfs::new(
        s,
        VfsConfig {
            dirty_limit: 8 * BS as usize,
            ..Default::default()
        },
    );
    let (_, fa) = v.create(ROOT_INO, "a").unwrap();
    let data = noise(7, 64 * BS as usize);
    v.write(fa, 0, &data).unwrap();
    v.fsync(fa).unwrap();
    let (_, fb) = v.create(ROOT_INO, "b").unwrap();
    let (mut done, mut calls) = (0u64, 0);
    while done < 63 * BS {
        let n = v.copy_range(fa, done + 100, fb, done, 63 * BS - done).unwrap();
        assert!(n > 0 && n <= 4 * BS, "copied {n} bytes in one call");
        done += n;
        calls += 1;
    }
    assert!(calls >= 16, "{calls} calls");
    v.fsync(fb).unwrap();
    assert_eq!(
        v.read(fb, 0, (63 * BS) as u32).unwrap(),
        data[100..100 + (63 * BS) as usize]
    );
}

#[test]
fn snapshots_are_read_only_files_and_unlink_deletes_them() {
    let (_d, v) = vfs();
    let (a, fh) = v.create(ROOT_INO, "img").unwrap();
    v.write(fh, 0, &noise(3, 4 * BS as usize)).unwrap();
    v.fsync(fh).unwrap();
    v.store().create_snapshot("img", "before").unwrap();
    v.write(fh, 0, &noise(4, BS as usize)).unwrap();
    v.fsync(fh).unwrap();
    let dirs: Vec<String> = v
        .readdir(SNAP_ROOT_INO)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(dirs, vec!["img"]);
    let dir = v.lookup(SNAP_ROOT_INO, "img").unwrap();
    assert_eq!(dir.kind, Kind::Dir);
    let snap = v.lookup(dir.ino, "before").unwrap();
    assert_eq!(snap.perm, 0o444);
    assert_eq!(
        v.open(snap.ino, true).map(|_| ()).unwrap_err().errno(),
        libc::EROFS
    );
    let sfh = v.open(snap.ino, false).unwrap();
    assert_eq!(
        v.read(sfh, 0, (4 * BS) as u32).unwrap(),
        noise(3, 4 * BS as usize)
    );
    assert_eq!(v.write(sfh, 0, b"x").unwrap_err().errno(), libc::EROFS);
    v.release(sfh).unwrap();
    v.unlink(dir.ino, "before").unwrap();
    assert!(v.store().list_snapshots("img").unwrap().is_empty());
    assert_eq!(v.lookup(dir.ino, "before").unwrap_err().errno(), libc::ENOENT);
    let _ = a;
}

#[test]
fn quota_gives_edquot_and_keeps_the_image() {
    let (_d, v) = vfs();
    let (_a, fh) = v.create(ROOT_INO, "q").unwrap();
    v.store().set_quota("q", Some(8 * BS)).unwrap();
    v.release(fh).unwrap(); // reopen so the handle sees the quota
    let ino = v.lookup(ROOT_INO, "q").unwrap().ino;
    let fh = v.open(ino, true).unwrap();
    v.write(fh, 0, &noise(5, 8 * BS as usize)).unwrap();
    let e = v.write(fh, 8 * BS, &noise(6, BS as usize)).unwrap_err();
    assert_eq!(e.errno(), libc::EDQUOT, "{e}");
    v.fsync(fh).unwrap();
    assert_eq!(v.read(fh, 0, (8 * BS) as u32).unwrap(), noise(5, 8 * BS as usize));
    assert_eq!(v.store().image_info("q").unwrap().referenced, 8 * BS);
}

#[test]
fn an_image_open_for_writing_is_never_replaced_underneath() {
    let (d, v) = vfs();
    let (a, fh) = v.create(ROOT_INO, "img").unwrap();
    v.write(fh, 0, &noise(7, BS as usize)).unwrap();
    v.fsync(fh).unwrap();
    v.store().create_snapshot("img", "s").unwrap();
    // Another process (another store open) cannot roll it back, remove it or write it.
    let other = Store::open(d.path(), OpenMode::ReadWrite).unwrap();
    let e = other.rollback("img", "s").unwrap_err();
    assert!(matches!(e, Error::ImageBusy { .. }), "{e}");
    assert!(matches!(other.remove_image("img"), Err(Error::ImageBusy { .. })));
    let mut h = other.open_image("img").unwrap();
    assert!(matches!(h.write(0, b"x"), Err(Error::ImageBusy { .. })));
    drop(h);
    v.write(fh, 0, &noise(8, BS as usize)).unwrap();
    v.release(fh).unwrap();
    // Closed: now a rollback works, and the next open sees it.
    other.rollback("img", "s").unwrap();
    let fh = v.open(a.ino, false).unwrap();
    assert_eq!(v.read(fh, 0, BS as u32).unwrap(), noise(7, BS as usize));
    v.release(fh).unwrap();
    let st = v.statfs().unwrap();
    assert!(st.blocks > 0 && st.bfree <= st.blocks && st.files == 1);
}

/// Copies in opposite directions between two images at the same time must
/// not deadlock (the two image locks are taken in one global order).
#[test]
fn crossing_copies_do_not_deadlock() {
    let (_d, v) = vfs();
    let v = std::sync::Arc::new(v);
    let (_, fa) = v.create(ROOT_INO, "a").unwrap();
    let (_, fb) = v.create(ROOT_INO, "b").unwrap();
    v.write(fa, 0, &noise(1, 16 * BS as usize)).unwrap();
    v.write(fb, 0, &noise(2, 16 * BS as usize)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for (from, to) in [(fa, fb), (fb, fa)] {
        let (v, tx) = (v.clone(), tx.clone());
        std::thread::spawn(move || {
            for i in 0..300u64 {
                v.copy_range(from, (i % 8) * BS, to, ((i + 3) % 8) * BS, 4 * BS)
                    .unwrap();
            }
            tx.send(()).unwrap();
        });
    }
    for _ in 0..2 {
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("copy_file_range deadlocked");
    }
}

/// A failure in background work (a seal job, a timed commit) drops the
/// image's uncommitted writes after they were acknowledged: the next fsync
/// must fail with ENOSPC (never claim them durable), once per file handle
/// open at the time — a reader's close must not use up the writer's error —
/// and not on a handle opened afterwards; what was fsync'd before stays,
/// and writes after the failure commit normally.
#[test]
fn a_background_failure_is_reported_by_the_next_fsync() {
    let (_dir, packs, v) = faulty_vfs(VfsConfig {
        commit_interval: std::time::Duration::ZERO,
        seal_at: BS as usize, // a seal job for every write
        ..Default::default()
    });
    let (a, fh) = v.create(ROOT_INO, "img").unwrap();
    let kept = noise(1, BS as usize);
    v.write(fh, 0, &kept).unwrap();
    v.fsync(fh).unwrap();
    let reader = v.open(a.ino, false).unwrap(); // say, a backup tool

    packs.set_plan(FaultPlan {
        enospc_after_bytes: Some(0),
        ..Default::default()
    });
    // Acknowledged: the disk is only met by the seal job or the commit.
    assert_eq!(v.write(fh, BS, &noise(2, BS as usize)).unwrap(), BS as u32);
    v.commit_due(); // fails (the job's ENOSPC, or the commit's own)
    packs.set_plan(FaultPlan::default());
    let later = noise(3, BS as usize);
    v.write(fh, 2 * BS, &later).unwrap();

    let late = v.open(a.ino, false).unwrap();
    // The reader closes first (its flush): it is told, and the writer still is.
    assert_eq!(v.fsync(reader).unwrap_err().errno(), libc::ENOSPC);
    v.release(reader).unwrap();
    v.fsync(late).unwrap(); // opened after the failure
    v.release(late).unwrap();
    let e = v.fsync(fh).unwrap_err();
    assert!(
        matches!(e, Error::WritesLost { ref image, .. } if image == "img"),
        "{e}"
    );
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert!(e.to_string().contains("no space left"), "{e}");
    v.fsync(fh).unwrap(); // reported once
    assert_eq!(v.read(fh, 0, BS as u32).unwrap(), kept);
    assert_eq!(v.read(fh, BS, BS as u32).unwrap(), vec![0; BS as usize]); // the lost write
    assert_eq!(v.read(fh, 2 * BS, BS as u32).unwrap(), later);
    v.release(fh).unwrap();
}

/// Two images written without pause keep seal jobs in flight, so at any
/// moment one of them is in the stage gate: a GC in another process (here,
/// another store handle: its own gc.lock) would wait forever. It announces
/// itself on gc.intent; the mount's periodic `commit_due` sees that,
/// commits both images at once, and the GC gets in while the writes go on.
#[test]
fn gc_in_another_process_gets_in_while_images_are_busy() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    let (d, s) = geosync_suite::kit::disk_store(BS as u32);
    let v = Arc::new(Vfs::new(
        s,
        VfsConfig {
            commit_interval: Duration::from_millis(200),
            ..Default::default()
        },
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for name in ["one", "two"] {
        let (_, fh) = v.create(ROOT_INO, name).unwrap();
        let (v, stop) = (v.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                v.write(fh, (i % 256) * BS, &noise(i, BS as usize)).unwrap();
                i += 1;
            }
            v.release(fh).unwrap();
        }));
    }
    {
        let (v, stop) = (v.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                v.commit_due(); // what the mount does every second
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(300));
    let collector = Store::open(d.path(), OpenMode::ReadWrite).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(collector.gc(false).map(|_| ()));
    });
    // A liveness bound, not a speed check: the GC takes milliseconds here.
    let r = rx.recv_timeout(Duration::from_secs(60));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    assert!(matches!(r, Ok(Ok(()))), "the GC did not get in: {r:?}");
    assert!(v.store().scrub(&|_| {}).unwrap().damaged.is_empty());
}

/// Writes past the dirty limit from several threads: the blocks in memory
/// stay within it (writers wait for seal jobs to free them), sealed blocks
/// are committed as new versions while writing goes on (no fsync asked),
/// each once `flush_at` of them wait (not half the dirty limit: sealed
/// blocks hold no memory), every write reads back at once, and after the
/// fsync a fresh store holds everything.
#[test]
fn writes_past_the_dirty_limit_wait_for_sealing_and_flush_versions_meanwhile() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    const LIMIT: usize = 16 * BS as usize;
    const FLUSH_AT: usize = 4 * LIMIT;
    const PER_WRITE: u64 = 4; // blocks
    const WRITERS: u64 = 2;
    const BLOCKS: u64 = 1024; // per writer
    let (d, s) = geosync_suite::kit::disk_store(BS as u32);
    let v = Arc::new(Vfs::new(
        s,
        VfsConfig {
            dirty_limit: LIMIT,
            flush_at: FLUSH_AT,
            seal_at: 4 * BS as usize,
            commit_interval: std::time::Duration::from_secs(3600),
            ..Default::default()
        },
    ));
    let (a, fh) = v.create(ROOT_INO, "img").unwrap();
    v.set_size(a.ino, WRITERS * BLOCKS * BS).unwrap();
    v.fsync(fh).unwrap();
    let v0 = v.store().image_info("img").unwrap().version;
    let (done, peak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let sampler = {
        let (v, done, peak) = (v.clone(), done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(v.store().memory_held(), Ordering::SeqCst);
                std::thread::yield_now();
            }
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let v = v.clone();
            std::thread::spawn(move || {
                for i in (0..BLOCKS).step_by(PER_WRITE as usize) {
                    let off = (w * BLOCKS + i) * BS;
                    let data = noise(off, (PER_WRITE * BS) as usize);
                    v.write(fh, off, &data).unwrap();
                    assert!(v.read(fh, off, data.len() as u32).unwrap() == data, "at {off}");
                }
            })
        })
        .collect();
    for t in writers {
        t.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::SeqCst);
    // Half the limit in memory; each writer may add its write before it waits.
    let bound = LIMIT / 2 + (WRITERS * PER_WRITE * BS) as usize;
    assert!(peak <= bound, "{peak} bytes of blocks in memory, limit {LIMIT}");
    let mid = v.store().image_info("img").unwrap().version;
    assert!(mid > v0 + 1, "no version flushed while writing: {v0} -> {mid}");
    // 2048 blocks at 64 per flush: 32 (at half the limit it would be 256).
    // A writer that finds memory full and no job running commits too: rare.
    let most = (WRITERS * BLOCKS * BS) as usize / FLUSH_AT + 8;
    assert!(
        mid - v0 <= most as u64,
        "{} versions while writing, expected <= {most}",
        mid - v0
    );
    v.fsync(fh).unwrap();
    v.release(fh).unwrap();
    drop(v);
    let s = Store::open(d.path(), OpenMode::ReadWrite).unwrap();
    let h = s.open_image("img").unwrap();
    for w in 0..WRITERS {
        for i in (0..BLOCKS).step_by(PER_WRITE as usize) {
            let off = (w * BLOCKS + i) * BS;
            let mut got = vec![0; (PER_WRITE * BS) as usize];
            h.read(off, &mut got).unwrap();
            assert!(got == noise(off, got.len()), "at {off} after reopening");
        }
    }
}

/// A write that finds half the dirty limit in memory and no seal job to
/// free it (here: jobs start only at 64 blocks, eager sealing off) commits
/// instead of waiting for nothing: memory stays bounded, the data is there.
#[test]
fn a_full_dirty_set_with_no_seal_job_is_committed() {
    let (_d, s) = geosync_suite::kit::disk_store(BS as u32);
    let v = Vfs::new(
        s,
        VfsConfig {
            dirty_limit: 8 * BS as usize,
            flush_at: 4 * BS as usize,
            seal_at: 64 * BS as usize,
            eager_seal: false,
            commit_interval: std::time::Duration::from_secs(3600),
        },
    );
    let (a, fh) = v.create(ROOT_INO, "img").unwrap();
    v.set_size(a.ino, 16 * BS).unwrap();
    v.fsync(fh).unwrap();
    let v0 = v.store().image_info("img").unwrap().version;
    for b in 0..16 {
        v.write(fh, b * BS, &noise(b, BS as usize)).unwrap();
        assert!(v.store().memory_held() <= 4 * BS as usize, "after block {b}");
    }
    assert!(
        v.store().image_info("img").unwrap().version > v0,
        "nothing committed"
    );
    for b in 0..16 {
        assert_eq!(v.read(fh, b * BS, BS as u32).unwrap(), noise(b, BS as usize));
    }
    v.release(fh).unwrap();
}

/// A writer waiting for room meets the failure of the seal job it waits
/// for (the store's disk full): the write itself was acknowledged, the
/// uncommitted writes are dropped, and the next fsync says so.
#[test]
fn a_seal_job_failing_while_a_writer_waits_is_reported_by_the_next_fsync() {
    // One block in memory fills the dirty limit.
    let (_dir, packs, v, fh, kept) = image_with_a_committed_block(2 * BS as usize);
    packs.set_plan(FaultPlan {
        enospc_after_bytes: Some(0),
        ..Default::default()
    });
    assert_eq!(v.write(fh, BS, &noise(2, BS as usize)).unwrap(), BS as u32);
    assert_eq!(v.store().memory_held(), 0, "the failed job's block is still held");
    packs.set_plan(FaultPlan::default());
    let e = v.fsync(fh).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert_eq!(v.read(fh, 0, BS as u32).unwrap(), kept);
    // The lost write is gone, with the growth it made.
    assert!(v.read(fh, BS, BS as u32).unwrap().iter().all(|&b| b == 0));
    v.release(fh).unwrap();
}

/// A flush (sealed blocks committed while writing goes on) whose pack sync
/// fails inside a write: that write is acknowledged, every uncommitted
/// write is dropped (never a part of one), the next fsync says so with the
/// sync's EIO, and writing goes on into a fresh pack.
#[test]
fn a_writers_failed_flush_taken_by_a_truncate_is_reported_by_the_writers_fsync() {
    // A write's flush runs with the image unlocked; a truncate from another
    // thread can be the call that takes its result. The flush's failure
    // dropped the writer's acknowledged writes: the writer's fsync says so.
    let (_dir, packs, v, fh, _kept) = image_with_a_committed_block(4 * BS as usize);
    let ino = v.lookup(ROOT_INO, "img").unwrap().ino;
    packs.hold_syncs(true);
    std::thread::scope(|sc| {
        let writer = sc.spawn(|| {
            for b in 1..=8u64 {
                v.write(fh, b * BS, &noise(b + 1, BS as usize)).unwrap();
            }
        });
        let t0 = std::time::Instant::now();
        while packs.syncs_held() == 0 {
            assert!(t0.elapsed().as_secs() < 20, "no flush started");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The truncate takes the image and waits for the flush in flight.
        let truncate = sc.spawn(|| v.set_size(ino, 64 * BS));
        std::thread::sleep(std::time::Duration::from_millis(300));
        packs.set_plan(FaultPlan {
            fail_sync_at: Some(0),
            ..Default::default()
        });
        packs.hold_syncs(false);
        writer.join().unwrap();
        let e = truncate.join().unwrap().unwrap_err();
        assert!(
            matches!(e, Error::Io { .. }),
            "the truncate did not meet the flush: {e}"
        );
    });
    let e = v.fsync(fh).unwrap_err();
    assert!(
        matches!(e, Error::WritesLost { ref image, .. } if image == "img"),
        "the lost writes went unreported: {e}"
    );
    v.fsync(fh).unwrap();
    v.release(fh).unwrap();
}

#[test]
fn a_panic_holding_an_image_drops_its_uncommitted_writes_and_says_so() {
    // (The FUSE adapter answers the request that panicked with EIO.) What
    // the panic left under the image's lock is not trusted: the next
    // operation drops the uncommitted writes, every file handle's next
    // fsync reports them lost, and the image goes on from its last version.
    let (_dir, packs, v, fh, kept) = image_with_a_committed_block(64 * BS as usize);
    v.write(fh, BS, &noise(5, BS as usize)).unwrap(); // not committed
    packs.set_plan(FaultPlan {
        panic_reads: true,
        ..Default::default()
    });
    // Part of a committed block, not sector-aligned: its old contents are
    // read there and then, under the image's lock.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| v.write(fh, 100, &[1; 10])));
    assert!(r.is_err(), "the read did not panic");
    packs.set_plan(FaultPlan::default());
    assert_eq!(v.read(fh, 0, BS as u32).unwrap(), kept);
    // (Its size too: the dropped write had grown it.)
    let size = v.getattr(v.lookup(ROOT_INO, "img").unwrap().ino).unwrap().size;
    assert_eq!(size, BS, "kept a write the panic may have torn");
    let e = v.fsync(fh).unwrap_err();
    assert!(
        matches!(e, Error::WritesLost { ref image, .. } if image == "img"),
        "{e}"
    );
    v.fsync(fh).unwrap(); // reported once
    v.write(fh, 2 * BS, &noise(6, BS as usize)).unwrap();
    v.fsync(fh).unwrap();
    assert_eq!(v.read(fh, 2 * BS, BS as u32).unwrap(), noise(6, BS as usize));
    v.release(fh).unwrap();
}

#[test]
fn a_flush_failing_inside_a_write_is_reported_by_the_next_fsync() {
    // Two sealed blocks start a flush.
    let (dir, packs, v, fh, kept) = image_with_a_committed_block(4 * BS as usize);
    // Only a flush syncs packs until the fsync below: its sync fails.
    packs.set_plan(FaultPlan {
        fail_sync_at: Some(0),
        ..Default::default()
    });
    let n = 16u64;
    for b in 1..=n {
        assert_eq!(
            v.write(fh, b * BS, &noise(b + 1, BS as usize)).unwrap(),
            BS as u32
        );
    }
    let e = v.fsync(fh).unwrap_err();
    assert!(
        matches!(e, Error::WritesLost { ref image, .. } if image == "img"),
        "not the flush's failure: {e}"
    );
    assert_eq!(e.errno(), libc::EIO, "{e}");
    v.fsync(fh).unwrap(); // reported once; what came after commits
                          // Each block is either lost (zeros) or whole; the fsync'd one stays.
    let check = |v: &Vfs, fh: u64| -> usize {
        assert_eq!(v.read(fh, 0, BS as u32).unwrap(), kept);
        let mut lost = 0;
        for b in 1..=n {
            let got = v.read(fh, b * BS, BS as u32).unwrap();
            if got.iter().all(|&x| x == 0) {
                lost += 1;
            } else {
                assert_eq!(got, noise(b + 1, BS as usize), "block {b} is a mix");
            }
        }
        lost
    };
    let lost = check(&v, fh);
    assert!(lost > 0 && lost < n as usize, "{lost} of {n} blocks lost");
    v.release(fh).unwrap();
    // The same after reopening the store.
    drop(v);
    let db = dir.path().join("meta.db");
    let s = Store::open_with(&db, Box::new(packs.clone()), OpenMode::ReadWrite).unwrap();
    let v = Vfs::new(s, VfsConfig::default());
    let fh = v.open(v.lookup(ROOT_INO, "img").unwrap().ino, false).unwrap();
    assert_eq!(check(&v, fh), lost);
    v.release(fh).unwrap();
}
