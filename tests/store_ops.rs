//! Store operations and their failure paths, on a real disk store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use geosync_fs::backend::{FaultPacks, FaultPlan, MemPacks};
use geosync_fs::{Error, InitOptions, OpenMode, Store};
use geosync_suite::kit::noise;

fn new_store() -> (tempfile::TempDir, Store) {
    geosync_suite::kit::disk_store(BS as u32)
}

const BS: u64 = 4096;

fn read_all(s: &Store, name: &str) -> Vec<u8> {
    let h = s.open_image(name).unwrap();
    let mut buf = vec![0u8; h.size() as usize];
    h.read(0, &mut buf).unwrap();
    buf
}

fn write_commit(s: &Store, name: &str, off: u64, data: &[u8]) -> u64 {
    let mut h = s.open_image(name).unwrap();
    h.write(off, data).unwrap();
    h.commit().unwrap().version
}

#[test]
fn versions_stamps_snapshots_rollback_diff() {
    let (_d, s) = new_store();
    s.create_image("vm", 16 * BS).unwrap();
    let v2 = write_commit(&s, "vm", 0, &noise(1, 4 * BS as usize));
    let st2 = s.image_info("vm").unwrap().stamp;
    s.create_snapshot("vm", "before").unwrap();
    let v3 = write_commit(&s, "vm", 2 * BS, &noise(2, 2 * BS as usize));
    assert_eq!(v3, v2 + 1);
    let st3 = s.image_info("vm").unwrap().stamp;
    assert!(st3 > st2, "stamps must increase");
    assert_eq!(st3.origin, s.config().node_id);

    let d = s.diff("vm", "before", "head").unwrap();
    assert_eq!(d.changed, vec![2..4]);
    assert_eq!(s.diff("vm", "head", "before").unwrap().changed, vec![2..4]);
    assert_eq!(
        s.diff("vm", &format!("@{v2}"), &format!("@{v3}"))
            .unwrap()
            .changed,
        vec![2..4]
    );
    assert!(matches!(
        s.diff("vm", "@1", "head"),
        Err(Error::VersionNotRetained { version: 1, .. })
    ));
    assert!(matches!(
        s.diff("vm", "nope", "head"),
        Err(Error::NoSuchSnapshot { .. })
    ));

    let before = {
        let mut b = noise(1, 4 * BS as usize);
        b.resize(16 * BS as usize, 0);
        b
    };
    s.create_snapshot("vm", "after").unwrap();
    let after = read_all(&s, "vm");
    s.rollback("vm", "before").unwrap();
    assert_eq!(read_all(&s, "vm"), before);
    // The newer state is still reachable through its snapshot.
    s.rollback("vm", "after").unwrap();
    assert_eq!(read_all(&s, "vm"), after);
    assert!(matches!(
        s.create_snapshot("vm", "after"),
        Err(Error::SnapshotExists { .. })
    ));
    s.delete_snapshot("vm", "before").unwrap();
    assert!(matches!(
        s.rollback("vm", "before"),
        Err(Error::NoSuchSnapshot { .. })
    ));
}

#[test]
fn clone_shares_blocks_and_diverges() {
    let (_d, s) = new_store();
    s.create_image("base", 64 * BS).unwrap();
    write_commit(&s, "base", 0, &noise(3, 32 * BS as usize));
    let before = s.stats().unwrap();
    for i in 0..5 {
        s.clone_image("base", None, &format!("c{i}")).unwrap();
    }
    let after = s.stats().unwrap();
    assert_eq!(after.stored, before.stored, "clones store nothing new");
    assert_eq!(after.referenced, 6 * before.referenced);
    assert!(
        (after.dedup_ratio - 6.0).abs() < 0.01,
        "dedup ratio {}",
        after.dedup_ratio
    );
    write_commit(&s, "c0", 0, &noise(4, BS as usize));
    assert_eq!(
        read_all(&s, "base")[..BS as usize],
        noise(3, 32 * BS as usize)[..BS as usize]
    );
    assert!(matches!(
        s.clone_image("base", None, "c1"),
        Err(Error::ImageExists(_))
    ));
    assert!(matches!(
        s.clone_image("nope", None, "x"),
        Err(Error::NoSuchImage(_))
    ));
}

#[test]
fn resize_is_instant_and_exact() {
    let (_d, s) = new_store();
    s.create_image("r", 4 * BS).unwrap();
    write_commit(&s, "r", 0, &vec![7u8; 4 * BS as usize]);
    let mut h = s.open_image("r").unwrap();
    h.set_size(BS + 10).unwrap();
    h.commit().unwrap();
    h.set_size(1 << 40).unwrap(); // 1 TiB: no work, no space
    h.commit().unwrap();
    let info = s.image_info("r").unwrap();
    assert_eq!(info.size, 1 << 40);
    assert_eq!(info.referenced, 2 * BS);
    let mut buf = vec![1u8; 3 * BS as usize];
    h.read(0, &mut buf).unwrap();
    assert!(buf[..BS as usize + 10].iter().all(|&b| b == 7));
    assert!(
        buf[BS as usize + 10..].iter().all(|&b| b == 0),
        "shrunk tail must read as zeros"
    );
    assert_eq!(h.seek_hole(0).unwrap(), Some(2 * BS));
    assert_eq!(h.seek_data(2 * BS).unwrap(), None);
}

/// Image `keep` (16 blocks) written interleaved with image `drop` (16
/// blocks of 3 each) so both live in the same pack, then `drop` removed:
/// that pack is mostly garbage. Returns what `keep` holds.
fn keep_beside_garbage(s: &Store) -> Vec<u8> {
    s.create_image("keep", 64 * BS).unwrap();
    s.create_image("drop", 64 * BS).unwrap();
    for i in 0..16 {
        write_commit(s, "keep", i * BS, &noise(100 + i, BS as usize));
        write_commit(s, "drop", i * BS, &noise(200 + i, 3 * BS as usize));
    }
    s.remove_image("drop").unwrap();
    read_all(s, "keep")
}

#[test]
fn gc_frees_removed_images_and_compacts() {
    let (d, s) = new_store();
    let keep = keep_beside_garbage(&s);
    let plan = s.gc(true).unwrap();
    assert!(plan.dead_blocks >= 16);
    assert_eq!(plan.compact_packs.len(), 1, "{plan:?}");
    let before = s.stats().unwrap().pack_bytes;
    s.gc(false).unwrap();
    let after = s.stats().unwrap();
    assert!(
        after.pack_bytes < before / 2,
        "{} -> {}",
        before,
        after.pack_bytes
    );
    assert_eq!(after.indexed_blocks, 16);
    assert_eq!(read_all(&s, "keep"), keep);
    assert!(s.scrub(&|_| {}).unwrap().damaged.is_empty());
    // Reopen: the compacted layout is what is on disk.
    drop(s);
    let s = Store::open(d.path(), OpenMode::ReadWrite).unwrap();
    assert_eq!(read_all(&s, "keep"), keep);
    s.remove_image("keep").unwrap();
    s.gc(false).unwrap();
    assert_eq!(s.stats().unwrap().pack_bytes, 0);
}

/// Small reads of raw blocks read only their 4 KiB pieces once the block
/// was read whole (a piece proof is kept, with where the block lies). A GC
/// that compacts the pack moves the blocks and deletes the old file: small
/// reads still return the right bytes (they find the old place gone and
/// read the block whole from its new one), before and after a reopen.
#[test]
fn small_reads_follow_blocks_a_compaction_moved() {
    const BIG: u64 = 16 * 1024;
    let (_d, s) = geosync_suite::kit::disk_store(BIG as u32);
    s.create_image("keep", 16 * BIG).unwrap();
    s.create_image("drop", 16 * BIG).unwrap();
    for i in 0..8 {
        write_commit(&s, "keep", i * BIG, &noise(300 + i, BIG as usize));
        write_commit(&s, "drop", i * BIG, &noise(400 + i, 3 * BIG as usize));
    }
    let keep = read_all(&s, "keep");
    s.set_read_cache(0); // every read goes to the pack
    let h = s.open_image("keep").unwrap();
    let small_reads = |h: &geosync_fs::ImageHandle| {
        for at in (0..8 * BIG).step_by(3000) {
            let mut buf = vec![0u8; 1000];
            h.read(at, &mut buf).unwrap();
            assert_eq!(buf, keep[at as usize..][..1000], "1000 bytes at {at}");
        }
    };
    small_reads(&h);
    s.remove_image("drop").unwrap();
    let plan = s.gc(false).unwrap();
    assert_eq!(plan.compact_packs.len(), 1, "{plan:?}");
    small_reads(&h);
    small_reads(&h);
    assert!(s.scrub(&|_| {}).unwrap().damaged.is_empty());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..Default::default()
    })]
    /// Reads of any place and length return the image's bytes, whichever
    /// way each block is served: from the read cache, piece by piece
    /// (raw blocks read whole before; page-aligned reads straight into the
    /// reply, others through a buffer), or whole (compressed ones, holes,
    /// the image's cut last block, blocks not read yet).
    #[test]
    fn reads_anywhere_return_the_bytes_however_blocks_are_served(
        shift in 13u32..17,
        reads in proptest::collection::vec((0u64..1 << 20, 0usize..1 << 18, proptest::bool::ANY), 1..80),
    ) {
        let bs = 1u64 << shift;
        let (_d, s) = geosync_suite::kit::disk_store(bs as u32);
        let size = 8 * bs + bs / 2 + 100;
        let mut image = vec![0u8; size as usize];
        for (i, b) in image.chunks_mut(bs as usize).enumerate() {
            match (i + 1) % 3 {
                0 => b.copy_from_slice(&noise(500 + i as u64, b.len())), // raw
                1 => b.iter_mut().enumerate().for_each(|(j, x)| *x = (j / 512) as u8), // compressed
                _ => {} // a hole
            }
        }
        s.create_image("r", size).unwrap();
        write_commit(&s, "r", 0, &image);
        s.set_read_cache(0);
        let h = s.open_image("r").unwrap();
        for (at, len, aligned) in reads {
            let (at, len) = if aligned {
                // Whole pages within one block.
                let at = at % (size + bs) / 4096 * 4096;
                let room = (bs - at % bs) as usize / 4096;
                (at, (len % room + 1) * 4096)
            } else {
                (at % (size + bs), len % (2 * bs as usize) + 1)
            };
            let mut buf = vec![0xEEu8; len];
            let n = h.read(at, &mut buf).unwrap();
            let want = &image[(at.min(size)) as usize..(at as usize + len).min(size as usize)];
            proptest::prop_assert_eq!(n, want.len());
            proptest::prop_assert!(&buf[..n] == want, "{} bytes at {}", len, at);
        }
    }
}

/// A commit that deduplicates against a block no image references any more
/// races a GC: the GC must wait for the commit, and the block must survive.
#[test]
fn gc_protect_race() {
    let (_d, s) = new_store();
    let data = noise(9, 8 * BS as usize);
    s.create_image("old", 8 * BS).unwrap();
    write_commit(&s, "old", 0, &data);
    s.remove_image("old").unwrap(); // its blocks are now garbage, still indexed

    s.create_image("new", 8 * BS).unwrap();
    let mut h = s.open_image("new").unwrap();
    h.set_dirty_limit(BS as usize);
    h.write(0, &data).unwrap(); // seals: every block dedups against the garbage
    let done = Arc::new(AtomicBool::new(false));
    let gc = {
        let (s, done) = (s.clone(), done.clone());
        std::thread::spawn(move || {
            let plan = s.gc(false).unwrap();
            done.store(true, Ordering::SeqCst);
            plan
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !done.load(Ordering::SeqCst),
        "GC ran while a commit relied on its garbage"
    );
    h.commit().unwrap();
    gc.join().unwrap();
    assert_eq!(read_all(&s, "new"), data);
    assert!(s.scrub(&|_| {}).unwrap().damaged.is_empty());
}

/// The same race across processes: the committing store and the collecting
/// store are separate opens (separate lock file descriptions, as two
/// processes have), so only `gc.lock` and pack claims keep them apart.
#[test]
fn gc_protect_race_across_processes() {
    let (d, writer) = new_store();
    let data = noise(10, 8 * BS as usize);
    writer.create_image("old", 8 * BS).unwrap();
    write_commit(&writer, "old", 0, &data);
    writer.remove_image("old").unwrap();
    let collector = Store::open(d.path(), OpenMode::ReadWrite).unwrap();

    writer.create_image("new", 8 * BS).unwrap();
    let mut h = writer.open_image("new").unwrap();
    h.set_dirty_limit(BS as usize);
    h.write(0, &data).unwrap();
    h.write(8 * BS, &noise(11, 4 * BS as usize)).unwrap(); // appends to the writer's pack
    let done = Arc::new(AtomicBool::new(false));
    let gc = {
        let done = done.clone();
        std::thread::spawn(move || {
            let plan = collector.gc(false).unwrap();
            done.store(true, Ordering::SeqCst);
            (collector, plan)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !done.load(Ordering::SeqCst),
        "GC ran while another process's commit relied on its garbage"
    );
    h.commit().unwrap();
    let (collector, _) = gc.join().unwrap();
    drop(h);
    let mut want = data.clone();
    want.extend(noise(11, 4 * BS as usize));
    assert_eq!(read_all(&writer, "new"), want);
    assert_eq!(read_all(&collector, "new"), want);
    // The writer's active pack is claimed: GC in the other process left it alone.
    write_commit(&writer, "new", 0, &noise(12, BS as usize));
    collector.gc(false).unwrap();
    assert!(collector.scrub(&|_| {}).unwrap().damaged.is_empty());
}

#[test]
fn quota_refuses_growth_and_keeps_the_image() {
    let (_d, s) = new_store();
    s.create_image("q", 64 * BS).unwrap();
    s.set_quota("q", Some(4 * BS)).unwrap();
    write_commit(&s, "q", 0, &noise(1, 3 * BS as usize));
    let before = read_all(&s, "q");
    let mut h = s.open_image("q").unwrap();
    h.write(20 * BS, &noise(3, 100)).unwrap(); // the 4th block: still within the quota
    let e = h.write(10 * BS, &noise(2, 2 * BS as usize)).unwrap_err();
    assert!(matches!(e, Error::QuotaExceeded { .. }), "{e}");
    assert_eq!(e.errno(), libc::EDQUOT);
    // The refused write changed nothing; what was accepted commits.
    h.commit().unwrap();
    let mut want = before.clone();
    want.resize(64 * BS as usize, 0);
    want[20 * BS as usize..20 * BS as usize + 100].copy_from_slice(&noise(3, 100));
    assert_eq!(read_all(&s, "q"), want);
    assert_eq!(s.image_info("q").unwrap().referenced, 4 * BS);
    // A quota lowered underneath a writer is still enforced at commit.
    h.write(30 * BS, &[1]).unwrap_err();
    s.set_quota("q", Some(2 * BS)).unwrap();
    h.write(0, &[9]).unwrap(); // overwrites a data block: no growth
    h.commit().unwrap();
    // Freeing space is always allowed, even over the quota.
    h.punch(0, BS).unwrap();
    h.commit().unwrap();
    assert_eq!(s.image_info("q").unwrap().referenced, 3 * BS);
    assert_eq!(h.allocated_bytes().unwrap(), 3 * BS);
}

#[test]
fn commits_check_the_quota_from_the_rows_they_counted() {
    let (_d, s) = new_store();
    s.create_image("q", 64 * BS).unwrap();
    s.set_quota("q", Some(32 * BS)).unwrap();
    let mut h = s.open_image("q").unwrap();
    // Each commit starts from the live rows the one before counted (debug
    // builds count them again and compare): growth, overwrite, punch,
    // shrink, growth past the old end.
    h.write(0, &noise(1, 8 * BS as usize)).unwrap();
    h.commit().unwrap();
    h.write(4 * BS, &noise(2, 8 * BS as usize)).unwrap();
    h.commit().unwrap();
    h.punch(0, 2 * BS).unwrap();
    h.commit().unwrap();
    h.set_size(11 * BS).unwrap();
    h.commit().unwrap();
    h.set_size(64 * BS).unwrap();
    h.write(40 * BS, &noise(3, BS as usize)).unwrap();
    h.commit().unwrap();
    assert_eq!(s.image_info("q").unwrap().referenced, 10 * BS);
    // Lowered underneath the writer: its next growth passes the write-time
    // check (the handle still knows the old quota) and fails at commit.
    s.set_quota("q", Some(12 * BS)).unwrap();
    h.write(50 * BS, &noise(4, 3 * BS as usize)).unwrap();
    let e = h.commit().unwrap_err();
    assert!(matches!(e, Error::QuotaExceeded { .. }), "{e}");
    assert_eq!(s.image_info("q").unwrap().referenced, 10 * BS);
    // Up to the quota, growth commits.
    h.write(50 * BS, &noise(5, 2 * BS as usize)).unwrap();
    h.commit().unwrap();
    assert_eq!(s.image_info("q").unwrap().referenced, 12 * BS);
    // The quota is full now: the next new block is refused at once.
    assert!(matches!(h.write(60 * BS, &[1]), Err(Error::QuotaExceeded { .. })));
}

#[test]
fn full_disk_during_commit_keeps_the_previous_version() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meta.db");
    let packs = FaultPacks::new(MemPacks::new());
    Store::init_with(&db, Box::new(packs.clone()), &InitOptions::default()).unwrap();
    let s = Store::open_with(&db, Box::new(packs.clone()), OpenMode::ReadWrite).unwrap();
    s.create_image("img", 1 << 20).unwrap();
    write_commit(&s, "img", 0, &noise(1, 256 << 10));
    let before = read_all(&s, "img");
    let mut h = s.open_image("img").unwrap();
    h.write(512 << 10, &noise(2, 256 << 10)).unwrap();
    packs.set_plan(FaultPlan {
        enospc_after_bytes: Some(1000),
        ..Default::default()
    });
    let e = h.commit().unwrap_err();
    assert!(matches!(e, Error::NoSpace(_)), "{e}");
    assert!(e.to_string().contains("no space left"), "{e}");
    assert_eq!(read_all(&s, "img"), before);
    assert_eq!(s.image_info("img").unwrap().version, 2);
    drop(h);
    // Space comes back: writing works again.
    packs.set_plan(FaultPlan::default());
    write_commit(&s, "img", 512 << 10, &noise(2, 256 << 10));
    // A failed fsync is reported and the old version stays.
    let mut h = s.open_image("img").unwrap();
    h.write(0, &noise(3, 64 << 10)).unwrap();
    packs.set_plan(FaultPlan {
        fail_sync_at: Some(0),
        ..Default::default()
    });
    assert!(matches!(h.commit(), Err(Error::Io { .. })));
    packs.set_plan(FaultPlan::default());
    packs.crash();
    drop(h);
    drop(s);
    let s = Store::open_with(&db, Box::new(packs.clone()), OpenMode::ReadWrite).unwrap();
    assert_eq!(s.image_info("img").unwrap().version, 3);
    assert!(s.scrub(&|_| {}).unwrap().damaged.is_empty());
}

/// A GC whose compaction runs out of space (or whose pack sync fails)
/// stops with the error and moves nothing: every image reads back whole,
/// before and after a crash, and the next GC with space compacts.
#[test]
fn gc_on_a_full_disk_moves_nothing_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meta.db");
    let packs = FaultPacks::new(MemPacks::new());
    let opts = InitOptions {
        block_size: BS as u32,
        ..Default::default()
    };
    Store::init_with(&db, Box::new(packs.clone()), &opts).unwrap();
    let s = Store::open_with(&db, Box::new(packs.clone()), OpenMode::ReadWrite).unwrap();
    let keep = keep_beside_garbage(&s);
    assert_eq!(s.gc(true).unwrap().compact_packs.len(), 1);
    let packs_before = s.stats().unwrap().pack_bytes;
    for plan in [
        FaultPlan {
            enospc_after_bytes: Some(2 * BS),
            ..Default::default()
        },
        FaultPlan {
            fail_sync_at: Some(0),
            ..Default::default()
        },
    ] {
        let enospc = plan.enospc_after_bytes.is_some();
        packs.set_plan(plan);
        let e = s.gc(false).unwrap_err();
        packs.set_plan(FaultPlan::default());
        if enospc {
            assert!(matches!(e, Error::NoSpace(_)), "{e}");
        } else {
            assert!(matches!(e, Error::Io { .. }), "{e}");
        }
        assert_eq!(read_all(&s, "keep"), keep);
        assert!(s.scrub(&|_| {}).unwrap().damaged.is_empty());
    }
    // What the failed compactions appended was never synced or indexed.
    packs.crash();
    drop(s);
    let s = Store::open_with(&db, Box::new(packs.clone()), OpenMode::ReadWrite).unwrap();
    assert_eq!(read_all(&s, "keep"), keep);
    assert!(s.scrub(&|_| {}).unwrap().damaged.is_empty());
    s.gc(false).unwrap();
    let after = s.stats().unwrap();
    assert!(
        after.pack_bytes < packs_before / 2,
        "{packs_before} -> {}",
        after.pack_bytes
    );
    assert_eq!(after.indexed_blocks, 16);
    assert_eq!(read_all(&s, "keep"), keep);
}

#[test]
fn bad_input_is_refused_clearly() {
    let (d, s) = new_store();
    for bad in ["", "..", "a/b", "../etc", ".x", "a\u{1}b", &"x".repeat(129)] {
        let e = s.create_image(bad, 0).unwrap_err();
        assert!(matches!(e, Error::InvalidName { .. }), "{bad:?}: {e}");
        assert_eq!(e.errno(), libc::EINVAL);
    }
    s.create_image("ok", 0).unwrap();
    assert!(matches!(
        s.create_snapshot("ok", "a/b"),
        Err(Error::InvalidName { .. })
    ));
    assert!(matches!(
        s.rename_image("ok", ".."),
        Err(Error::InvalidName { .. })
    ));
    assert!(matches!(s.create_image("ok", 0), Err(Error::ImageExists(_))));
    assert!(matches!(s.open_image("missing"), Err(Error::NoSuchImage(_))));
    assert_eq!(s.open_image("missing").unwrap_err().errno(), libc::ENOENT);

    // Several writer processes may open a store; each image has one writer at a time.
    let other = Store::open(d.path(), OpenMode::ReadWrite).unwrap();
    let mut mine = s.open_image("ok").unwrap();
    mine.write(0, b"held").unwrap();
    let mut theirs = other.open_image("ok").unwrap();
    let e = theirs.write(0, b"x").unwrap_err();
    assert!(matches!(e, Error::ImageBusy { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!("pid {}", std::process::id())),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EBUSY);
    other.create_snapshot("ok", "snap").unwrap(); // pins the last commit: allowed
    assert!(matches!(
        other.rollback("ok", "snap"),
        Err(Error::ImageBusy { .. })
    ));
    assert!(matches!(other.remove_image("ok"), Err(Error::ImageBusy { .. })));
    assert!(matches!(
        other.rename_image("ok", "ok2"),
        Err(Error::ImageBusy { .. })
    ));
    assert_eq!(other.image_writer("ok").unwrap(), Some(std::process::id()));
    mine.commit().unwrap();
    drop(mine); // closing releases the lease
    assert_eq!(other.image_writer("ok").unwrap(), None);
    theirs.write(0, b"x").unwrap();
    theirs.commit().unwrap();
    drop(theirs);
    other.rollback("ok", "snap").unwrap();
    let ro = Store::open(d.path(), OpenMode::ReadOnly).unwrap();
    assert!(ro.create_image("x", 0).is_err());
    drop(ro);
    drop(other);
    drop(s);

    // Missing store, another format version.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        Store::open(empty.path(), OpenMode::ReadOnly),
        Err(Error::NoStore(_))
    ));
    assert!(matches!(
        Store::init(d.path(), &InitOptions::default()),
        Err(Error::StoreExists(_))
    ));
    let conn = rusqlite_conn(&d.path().join("meta.db"));
    conn.execute("UPDATE store SET value = 99 WHERE key = 'format_version'", [])
        .unwrap();
    drop(conn);
    let e = Store::open(d.path(), OpenMode::ReadOnly).unwrap_err();
    assert!(
        matches!(
            e,
            Error::FormatVersion {
                found: 99,
                supported: 1
            }
        ),
        "{e}"
    );

    let e = Store::init(
        tempfile::tempdir().unwrap().path(),
        &InitOptions {
            block_size: 3000,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
}

/// A new pack's row and name are made durable by the first commit that uses
/// it, not when it is made. A crash of the machine before that commit can
/// keep the file (a sibling's sync synced the directory) and lose the row,
/// its number with it: reopening moves the numbering past the file (a new
/// pack by that number would find it there and every write would fail), and
/// `gc` removes it.
#[test]
fn a_pack_file_whose_row_was_lost_is_not_numbered_again() {
    let (d, s) = new_store();
    s.create_image("vm", 64 * BS).unwrap();
    write_commit(&s, "vm", 0, &noise(1, 8 * BS as usize));
    drop(s);
    let packs = d.path().join("packs");
    let mut ids: Vec<u64> = std::fs::read_dir(&packs)
        .unwrap()
        .map(|e| {
            u64::from_str_radix(
                e.unwrap().file_name().to_str().unwrap().trim_end_matches(".pack"),
                16,
            )
            .unwrap()
        })
        .collect();
    ids.sort();
    let next = ids.last().unwrap() + 1;
    let left = packs.join(format!("{next:016x}.pack"));
    std::fs::copy(packs.join(format!("{:016x}.pack", ids[0])), &left).unwrap();

    let s = Store::open(d.path(), OpenMode::ReadWrite).unwrap();
    let want = noise(2, 8 * BS as usize);
    write_commit(&s, "vm", 8 * BS, &want);
    assert_eq!(read_all(&s, "vm")[8 * BS as usize..16 * BS as usize], want[..]);
    assert!(s.gc(false).unwrap().delete_packs.contains(&next));
    assert!(!left.exists(), "gc removes the pack left behind");
    assert_eq!(
        read_all(&s, "vm")[..8 * BS as usize],
        noise(1, 8 * BS as usize)[..]
    );
    assert!(s.scrub(&|_| {}).unwrap().damaged.is_empty());
}

/// A file already under the number a new pack gets (not expected: recovery
/// moves the numbering past files it finds at open) fails that commit
/// clearly and is left alone; the next commit takes the next number.
#[test]
fn a_pack_number_whose_file_exists_fails_the_commit_and_keeps_the_file() {
    let (d, s) = new_store();
    s.create_image("vm", 64 * BS).unwrap();
    write_commit(&s, "vm", 0, &noise(1, 4 * BS as usize));
    drop(s);
    let s = Store::open(d.path(), OpenMode::ReadWrite).unwrap(); // a process with no pack yet
    let seq: i64 = rusqlite_conn(&d.path().join("meta.db"))
        .query_row("SELECT seq FROM sqlite_sequence WHERE name = 'packs'", [], |r| {
            r.get(0)
        })
        .unwrap();
    let theirs = d.path().join("packs").join(format!("{:016x}.pack", seq + 1));
    std::fs::write(&theirs, b"not ours").unwrap();

    let mut h = s.open_image("vm").unwrap();
    h.write(4 * BS, &noise(2, 4 * BS as usize)).unwrap();
    let e = h.commit().unwrap_err();
    assert!(
        e.to_string().contains(&format!("creating pack {}", seq + 1)),
        "{e}"
    );
    drop(h);
    assert_eq!(std::fs::read(&theirs).unwrap(), b"not ours");
    write_commit(&s, "vm", 4 * BS, &noise(3, 4 * BS as usize));
    let got = read_all(&s, "vm");
    assert_eq!(got[..4 * BS as usize], noise(1, 4 * BS as usize)[..]);
    assert_eq!(
        got[4 * BS as usize..8 * BS as usize],
        noise(3, 4 * BS as usize)[..]
    );
}

fn rusqlite_conn(p: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(p).unwrap()
}

/// Sharing a block (copy_file_range) whose source was swept by GC between
/// reading the source and committing fails cleanly: no map row ever points
/// at a missing block.
#[test]
fn sharing_a_swept_block_is_refused_at_commit() {
    let (_d, s) = new_store();
    s.create_image("src", 4 * BS).unwrap();
    write_commit(&s, "src", 0, &noise(1, 4 * BS as usize));
    s.create_snapshot("src", "snap").unwrap();
    let view = s.open_snapshot("src", "snap").unwrap();
    let sources = view.block_sources(0..4).unwrap();
    drop(view);
    // The source goes away: new content, snapshot deleted, garbage collected.
    write_commit(&s, "src", 0, &noise(2, 4 * BS as usize));
    s.delete_snapshot("src", "snap").unwrap();
    s.gc(false).unwrap();
    s.create_image("dst", 4 * BS).unwrap();
    write_commit(&s, "dst", 0, &noise(3, 4 * BS as usize));
    let mut h = s.open_image("dst").unwrap();
    h.put_blocks(0, sources, 4 * BS).unwrap();
    let e = h.commit().unwrap_err();
    assert!(matches!(e, Error::MissingBlock { .. }), "{e}");
    drop(h);
    assert_eq!(read_all(&s, "dst"), noise(3, 4 * BS as usize));
    assert!(s.scrub(&|_| {}).unwrap().damaged.is_empty());
}

/// With checkpoints deferred (the mount), commits only append to the WAL,
/// and `checkpoint` copies it back and restarts it; the data stays whole.
#[test]
fn deferred_checkpoints_copy_the_wal_back_and_restart_it() {
    let (d, s, wal) = deferred_store();
    let mut want = vec![0u8; 4096 * BS as usize];
    commit_scattered(&s, 0..100, &mut want);
    // SQLite's own checkpoints would have kept the WAL near 1000 pages.
    let wal_len = std::fs::metadata(&wal).unwrap().len();
    assert!(wal_len > 4096 * 4096, "the WAL did not grow: {wal_len} bytes");
    let c = s.checkpoint().unwrap();
    assert!(c.frames > geosync_fs::store::WAL_RESTART_FRAMES, "{c:?}");
    assert!(c.restarted && c.copied == c.frames, "{c:?}");
    // No commit since: nothing to restart again.
    assert!(!s.checkpoint().unwrap().restarted);
    // The next commit writes the WAL from its start again.
    write_commit(&s, "vm", 0, &noise(7, BS as usize));
    want[..BS as usize].copy_from_slice(&noise(7, BS as usize));
    let c = s.checkpoint().unwrap();
    assert!(c.frames < 200, "the WAL did not restart: {c:?}");
    assert_eq!(read_all(&s, "vm"), want);
    drop(s);
    let s = Store::open(d.path(), OpenMode::ReadOnly).unwrap();
    assert_eq!(read_all(&s, "vm"), want);
}

/// A store whose checkpoints are deferred (as the mount's), with image
/// `vm` of 4096 blocks, and the path of its WAL.
fn deferred_store() -> (tempfile::TempDir, Store, std::path::PathBuf) {
    let (d, s) = new_store();
    s.create_image("vm", 4096 * BS).unwrap();
    s.defer_checkpoints().unwrap();
    let wal = d.path().join("meta.db-wal");
    (d, s, wal)
}

/// Commits of 100 scattered blocks each (every one dirties many pages of
/// the map's indexes), also applied to `want`.
fn commit_scattered(s: &Store, commits: std::ops::Range<u64>, want: &mut [u8]) {
    for i in commits {
        let mut h = s.open_image("vm").unwrap();
        for j in 0..100u64 {
            let b = (j * 41 + i * 7) % 4096;
            let data = noise(i * 1000 + j, BS as usize);
            h.write(b * BS, &data).unwrap();
            want[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&data);
        }
        h.commit().unwrap();
    }
}

/// Under commits without pause a passive checkpoint never catches up, and
/// the WAL would only grow (81 MB in 8 s of fio in the mount): past
/// `WAL_RESTART_FRAMES` the checkpoint restarts it, however little the
/// committers pause (a restart that only waited 20 ms for a gap between
/// commits was foiled again and again: the WAL reached 323 MB in CI, and
/// 916 MB in this test with two small committers).
#[test]
fn checkpoints_bound_the_wal_under_steady_commits() {
    use std::sync::atomic::AtomicU64;
    let (_d, s, wal) = deferred_store();
    let done = Arc::new(AtomicBool::new(false));
    let restarts = Arc::new(AtomicU64::new(0));
    let checkpointer = {
        let (s, done, restarts) = (s.clone(), done.clone(), restarts.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if s.checkpoint().unwrap().restarted {
                    restarts.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(geosync_fs::store::CHECKPOINT_INTERVAL);
            }
        })
    };
    // Small commits from two more threads, one after the other: the
    // writers' lock is almost never free.
    let small: Vec<_> = (0..2)
        .map(|t| {
            let (s, done) = (s.clone(), done.clone());
            let name = format!("small{t}");
            s.create_image(&name, 64 * BS).unwrap();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !done.load(Ordering::SeqCst) {
                    write_commit(&s, &name, (n % 64) * BS, &noise(n, BS as usize));
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut want = vec![0u8; 4096 * BS as usize];
    let mut peak = 0;
    let mut commits = 0;
    // Three restarts: the WAL is past WAL_RESTART_FRAMES three times over.
    while restarts.load(Ordering::SeqCst) < 3 {
        assert!(commits < 6000, "no restart after {commits} commits");
        commit_scattered(&s, commits..commits + 20, &mut want);
        commits += 20;
        peak = peak.max(std::fs::metadata(&wal).unwrap().len());
    }
    done.store(true, Ordering::SeqCst);
    checkpointer.join().unwrap();
    for t in small {
        assert!(t.join().unwrap() > 0);
    }
    // Bounded by what commits add between two checkpoints (~50 MB here);
    // without restarts this test's WAL reached 390 MB.
    assert!(peak < 110 << 20, "the WAL grew to {peak} bytes");
    assert_eq!(read_all(&s, "vm"), want);
}

/// A reader in another process (here: another connection) that keeps a
/// snapshot open foils the restart; once it ends the WAL restarts; the
/// data stays whole throughout.
#[test]
fn a_restart_foiled_by_another_reader_happens_once_it_ends() {
    let (d, s, wal) = deferred_store();
    let mut want = vec![0u8; 4096 * BS as usize];
    commit_scattered(&s, 0..100, &mut want);
    let reader = rusqlite::Connection::open(d.path().join("meta.db")).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let rows: i64 = reader
        .query_row("SELECT count(*) FROM map", [], |r| r.get(0))
        .unwrap();
    assert!(rows > 0);
    let c = s.checkpoint().unwrap();
    assert!(c.frames > geosync_fs::store::WAL_RESTART_FRAMES, "{c:?}");
    assert!(!c.restarted, "restarted under a reader: {c:?}");
    // Commits go on meanwhile, and the reader still sees its snapshot.
    commit_scattered(&s, 100..105, &mut want);
    let again: i64 = reader
        .query_row("SELECT count(*) FROM map", [], |r| r.get(0))
        .unwrap();
    assert_eq!(again, rows);
    reader.execute_batch("COMMIT").unwrap();
    // Once it ends, a checkpoint copies all of the WAL, and the next commit
    // writes it from its start (cut back to 64 MiB).
    let c = s.checkpoint().unwrap();
    assert_eq!(c.copied, c.frames, "{c:?}");
    write_commit(&s, "vm", 0, &noise(8, BS as usize));
    want[..BS as usize].copy_from_slice(&noise(8, BS as usize));
    let c = s.checkpoint().unwrap();
    assert!(c.frames < 200, "the WAL did not restart: {c:?}");
    assert!(std::fs::metadata(&wal).unwrap().len() <= 64 << 20);
    assert_eq!(read_all(&s, "vm"), want);
}

/// When the checkpoint's own connection keeps failing (here: it cannot
/// open the database, moved aside), SQLite's own checkpoints come back after
/// `CHECKPOINT_FAILURES_MAX` failures, so the WAL stays bounded; commits
/// never stop, and checkpoints work again once the cause is gone.
#[test]
fn checkpoints_that_keep_failing_give_the_wal_back_to_sqlite() {
    let (d, s, wal) = deferred_store();
    let db = d.path().join("meta.db");
    let away = d.path().join("meta.db.away");
    std::fs::rename(&db, &away).unwrap();
    for i in 1..=geosync_fs::store::CHECKPOINT_FAILURES_MAX {
        let e = s.checkpoint().unwrap_err();
        assert!(matches!(e, Error::Sqlite(_)), "call {i}: {e}");
    }
    let mut want = vec![0u8; 4096 * BS as usize];
    commit_scattered(&s, 0..100, &mut want);
    // Deferred, these commits grow the WAL past 16 MiB (see
    // deferred_checkpoints_copy_the_wal_back_and_restart_it); SQLite's own
    // checkpoints keep it near 1000 pages.
    let wal_len = std::fs::metadata(&wal).unwrap().len();
    assert!(wal_len < 8 << 20, "the WAL grew to {wal_len} bytes");
    std::fs::rename(&away, &db).unwrap();
    let c = s.checkpoint().unwrap();
    assert_eq!(c.copied, c.frames, "{c:?}");
    assert_eq!(read_all(&s, "vm"), want);
    drop(s);
    let s = Store::open(d.path(), OpenMode::ReadOnly).unwrap();
    assert_eq!(read_all(&s, "vm"), want);
}

#[test]
fn a_store_made_with_the_dropped_map_indexes_loses_them_on_a_read_write_open() {
    let (d, s) = new_store();
    s.create_image("vm", 16 * BS).unwrap();
    s.create_snapshot("vm", "empty").unwrap();
    write_commit(&s, "vm", 0, &noise(1, 8 * BS as usize));
    s.create_snapshot("vm", "first").unwrap();
    write_commit(&s, "vm", 4 * BS, &noise(2, 8 * BS as usize));
    let want = read_all(&s, "vm");
    drop(s);
    let db = d.path().join("meta.db");
    let indexes = || -> Vec<String> {
        let c = rusqlite::Connection::open(&db).unwrap();
        let mut st = c
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'map' ORDER BY name")
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    };
    assert_eq!(indexes(), ["map_died"]);
    // As stores made before they were dropped have them.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(
            "CREATE INDEX map_live ON map(image, block) WHERE died IS NULL;
             CREATE INDEX map_born ON map(image, born);",
        )
        .unwrap();
    let ro = Store::open(d.path(), OpenMode::ReadOnly).unwrap();
    assert_eq!(read_all(&ro, "vm"), want);
    drop(ro);
    assert_eq!(
        indexes(),
        ["map_born", "map_died", "map_live"],
        "a read-only open changed the schema"
    );
    let s = Store::open(d.path(), OpenMode::ReadWrite).unwrap();
    assert_eq!(indexes(), ["map_died"]);
    assert_eq!(read_all(&s, "vm"), want);
    let h = s.open_image("vm").unwrap();
    assert_eq!(h.data_extents().unwrap(), vec![(0, 12 * BS)]);
    assert_eq!(s.diff("vm", "empty", "first").unwrap().changed, vec![0..8]);
    assert_eq!(s.diff("vm", "first", "head").unwrap().changed, vec![4..12]);
}

/// A store whose `gc.intent` cannot be opened (here: a directory in its
/// place) still opens, writes and reads; a GC refuses with an error naming
/// the file, and changes nothing.
#[test]
fn an_unopenable_gc_intent_fails_gc_clearly_and_nothing_else() {
    let (d, s) = new_store();
    s.create_image("vm", 8 * BS).unwrap();
    write_commit(&s, "vm", 0, &noise(1, 8 * BS as usize));
    write_commit(&s, "vm", 0, &noise(2, 4 * BS as usize)); // garbage for GC
    drop(s);
    let intent = d.path().join("gc.intent");
    std::fs::remove_file(&intent).unwrap();
    std::fs::create_dir(&intent).unwrap();
    let s = Store::open(d.path(), OpenMode::ReadWrite).unwrap();
    write_commit(&s, "vm", 4 * BS, &noise(3, 2 * BS as usize));
    let want = read_all(&s, "vm");
    let e = s.gc(false).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("gc.intent"), "{e}");
    assert_eq!(read_all(&s, "vm"), want);
    assert!(s.scrub(&|_| {}).unwrap().damaged.is_empty());
    // The writer's gate was left open: writing goes on.
    write_commit(&s, "vm", 0, &noise(4, BS as usize));
    // Put right, GC runs.
    drop(s);
    std::fs::remove_dir(&intent).unwrap();
    let s = Store::open(d.path(), OpenMode::ReadWrite).unwrap();
    let before = read_all(&s, "vm");
    s.gc(false).unwrap();
    assert_eq!(read_all(&s, "vm"), before);
}
