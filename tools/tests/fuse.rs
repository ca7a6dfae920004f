//! Real FUSE mounts (feature `fuse_tests`; root, /dev/fuse, loop devices):
//! ext4 loop-mounted through geosync, fstrim, sparse copies, names, quotas,
//! corruption, `kill -9` of the daemon, and the store model's random
//! operation sequences through the mount.
#![cfg(feature = "fuse_tests")]

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use geosync_suite::model::{self, ModelImage, Op, BS};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

mod common;
use common::*;

fn b3_tree(dir: &Path) -> Vec<(String, blake3::Hash)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                if e.file_name() != "lost+found" {
                    stack.push(e.path());
                }
            } else if ft.is_file() {
                let mut h = blake3::Hasher::new();
                h.update_reader(File::open(e.path()).unwrap()).unwrap();
                out.push((
                    e.path().strip_prefix(dir).unwrap().display().to_string(),
                    h.finalize(),
                ));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn init_store(dir: &Path, bs: &str) -> PathBuf {
    let store = dir.join("store");
    ok(&store, &["init", "--block-size", bs]);
    store
}

fn referenced(store: &Path, name: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&ok(store, &["info", name, "--json"])).unwrap();
    v["referenced"].as_u64().unwrap()
}

#[test]
fn ext4_on_a_loop_device_over_the_mount() {
    let t = tempfile::tempdir().unwrap();
    let store = init_store(t.path(), "64K");
    let mnt = t.path().join("mnt");
    let m = Mount::new(&store, &mnt, &[]);
    let img = m.path("vm1");
    sh(Command::new("truncate").args(["-s", "2G"]).arg(&img));
    assert_eq!(
        fs::metadata(&img).unwrap().blocks(),
        0,
        "a new image allocates nothing"
    );
    let want;
    {
        let lo = Loop::new(&img);
        sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&lo.0));
        let inner = FsMount::new(&lo.0, &t.path().join("inner"), "rw");
        sh(Command::new("cp")
            .args(["-r", "/usr/share/doc", "/usr/bin"])
            .arg(&inner.0));
        sh(&mut Command::new("sync"));
        want = b3_tree(&inner.0);
        assert!(want.len() > 100);
    }
    // The image is sparse and honest: du < logical, SEEK_DATA works.
    let meta = fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 2 << 30);
    assert!(
        meta.blocks() * 512 < 1 << 30,
        "du {} of a mostly empty image",
        meta.blocks() * 512
    );
    let fsck = Command::new("e2fsck").arg("-fn").arg(&img).output().unwrap();
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));

    // cp --sparse=always out of the mount keeps the holes.
    let copy = t.path().join("copy.img");
    sh(Command::new("cp").arg("--sparse=always").arg(&img).arg(&copy));
    let cmeta = fs::metadata(&copy).unwrap();
    assert!(
        cmeta.blocks() <= meta.blocks() + 64,
        "copy du {} vs image {}",
        cmeta.blocks(),
        meta.blocks()
    );
    sh(Command::new("cmp").arg(&img).arg(&copy));
    m.stop();

    // Remount the store: every file is there, byte for byte.
    let m = Mount::new(&store, &mnt, &[]);
    {
        let lo = Loop::new(&m.path("vm1"));
        let inner = FsMount::new(&lo.0, &t.path().join("inner"), "ro");
        assert_eq!(b3_tree(&inner.0), want);
    }
    m.stop();
    assert!(gs(&store, &["scrub"]).status.success());
}

/// `mount --daemon` returns once the mount is up, logs at `info` to
/// STORE/mount.log, and `geosync umount` ends it, committing; a foreground
/// mount whose terminal hangs up (SIGHUP) commits and unmounts cleanly
/// (exit 0) instead of dying with a dead mount point.
#[test]
fn daemon_mode_and_hangup_unmount_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let store = init_store(t.path(), "64K");
    let mnt = t.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let data = b"written through the daemon".repeat(5000);
    let said = ok(&store, &["mount", mnt.to_str().unwrap(), "--daemon"]);
    let pid: u32 = said
        .split("daemon pid ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no daemon pid in {said:?}"));
    assert!(
        geosync_tools::mount::is_mounted(&mnt),
        "--daemon returned before the mount was up"
    );
    fs::write(mnt.join("img"), &data).unwrap();
    let out = gs(&store, &["umount", mnt.to_str().unwrap()]);
    if !out.status.success() {
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        panic!("umount: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(!geosync_tools::mount::is_mounted(&mnt));
    let start = std::time::Instant::now();
    // (Exited: gone, or a zombie its adoptive parent has not reaped.)
    let running = || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|st| st.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"))
    };
    while running() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the daemon did not exit after umount"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = fs::read_to_string(store.join("mount.log")).unwrap();
    assert!(
        // (not the "geosync: mounted" line: that goes to the log at any level)
        log.contains("INFO") && log.contains("mountpoint="),
        "the daemon's log has no info lines:\n{log}"
    );

    let m = Mount::new(&store, &mnt, &[]);
    assert_eq!(fs::read(m.path("img")).unwrap(), data, "the daemon's write");
    let more = b"then a hangup".repeat(7000);
    let f = File::create(m.path("img2")).unwrap();
    f.write_all_at(&more, 0).unwrap();
    drop(f);
    m.stop_with("HUP");
    let m = Mount::new(&store, &mnt, &[]);
    assert_eq!(fs::read(m.path("img2")).unwrap(), more);
    m.stop();
}

#[test]
fn fstrim_inside_shrinks_the_image() {
    let t = tempfile::tempdir().unwrap();
    let store = init_store(t.path(), "64K");
    let m = Mount::new(&store, &t.path().join("mnt"), &[]);
    let img = m.path("trim");
    sh(Command::new("truncate").args(["-s", "1G"]).arg(&img));
    let (full, trimmed);
    {
        let lo = Loop::new(&img);
        sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&lo.0));
        let inner = FsMount::new(&lo.0, &t.path().join("inner"), "rw");
        let mut big = vec![0u8; 64 << 20];
        blake3::Hasher::new()
            .update(b"trim")
            .finalize_xof()
            .fill(&mut big);
        fs::write(inner.0.join("big"), &big).unwrap();
        sh(&mut Command::new("sync"));
        full = fs::metadata(&img).unwrap().blocks() * 512;
        fs::remove_file(inner.0.join("big")).unwrap();
        sh(&mut Command::new("sync"));
        sh(Command::new("fstrim").arg(&inner.0));
        sh(&mut Command::new("sync"));
        trimmed = fs::metadata(&img).unwrap().blocks() * 512;
    }
    assert!(full > 64 << 20, "full {full}");
    assert!(
        trimmed + (60 << 20) < full,
        "fstrim freed too little: {full} -> {trimmed}"
    );
    m.stop();
    assert!(referenced(&store, "trim") + (60 << 20) < full);
}

#[test]
fn names_quota_and_corruption_through_the_mount() {
    let t = tempfile::tempdir().unwrap();
    let store = init_store(t.path(), "64K");
    let m = Mount::new(&store, &t.path().join("mnt"), &[]);
    // Names outside the pattern: EINVAL.
    for bad in ["bad\u{1}name", &"x".repeat(129), ".dot", "sp ace"] {
        let e = File::create(m.path(bad)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{bad:?}: {e}");
    }
    let e = fs::create_dir(m.path("dir")).unwrap_err();
    assert!(e.raw_os_error().is_some());

    // Quota: EDQUOT, and the image stays readable with what was accepted.
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(m.path("q"))
        .unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    ok(&store, &["quota", "set", "q", "1M"]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("q"))
        .unwrap();
    let chunk = vec![0x42u8; 256 << 10];
    let mut written = 0u64;
    let err = loop {
        match f.write_all_at(&chunk, written) {
            Ok(()) => written += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(written <= 2 << 20, "quota not enforced");
    };
    assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
    f.sync_all().unwrap();
    let mut buf = vec![0u8; written as usize];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
    drop(f);

    // Rename and remove.
    fs::rename(m.path("q"), m.path("q2")).unwrap();
    assert!(m.path("q2").exists() && !m.path("q").exists());
    fs::remove_file(m.path("q2")).unwrap();

    // A corrupted block: EIO for that range only.
    let f = File::create(m.path("c")).unwrap();
    let mut data = vec![0u8; 4 << 20];
    blake3::Hasher::new().update(b"c").finalize_xof().fill(&mut data);
    f.write_all_at(&data, 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.stop();
    let pack = fs::read_dir(store.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let pf = OpenOptions::new().read(true).write(true).open(&pack).unwrap();
    let mut b = [0u8];
    pf.read_exact_at(&mut b, 2 << 20).unwrap();
    pf.write_all_at(&[b[0] ^ 0x10], 2 << 20).unwrap();
    drop(pf);
    let m = Mount::new(&store, &t.path().join("mnt"), &[]);
    let f = File::open(m.path("c")).unwrap();
    let mut bad = 0;
    let mut buf = vec![0u8; 64 << 10];
    for blk in 0..64u64 {
        match f.read_exact_at(&mut buf, blk * (64 << 10)) {
            Ok(()) => assert_eq!(
                buf[..],
                data[(blk * 65536) as usize..((blk + 1) * 65536) as usize]
            ),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO));
                bad += 1;
            }
        }
    }
    assert_eq!(bad, 1, "exactly the damaged block fails");
    drop(f);
    m.stop();
}

/// `kill -9` of the mount daemon under a write load: after a remount every
/// fsync'd write is there.
#[test]
fn kill_9_of_the_daemon_keeps_every_fsynced_write() {
    let t = tempfile::tempdir().unwrap();
    let store = init_store(t.path(), "64K");
    let mnt = t.path().join("mnt");
    let m = Mount::new(&store, &mnt, &[]);
    let img = m.path("w");
    File::create(&img).unwrap().set_len(256 << 20).unwrap();
    // A writer thread: random 64 KiB writes, fsync every 8; record what was fsync'd.
    let synced = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<u64, u8>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (synced, stop, img) = (synced.clone(), stop.clone(), img.clone());
        std::thread::spawn(move || {
            let f = OpenOptions::new().read(true).write(true).open(&img).unwrap();
            let mut pending = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let slot = (i * 7919) % 4096;
                let byte = (i % 251) as u8 + 1;
                if f.write_all_at(&vec![byte; 64 << 10], slot << 16).is_err() {
                    return;
                }
                pending.push((slot, byte));
                i += 1;
                if i.is_multiple_of(8) {
                    if f.sync_all().is_err() {
                        return;
                    }
                    synced.lock().unwrap().extend(pending.drain(..));
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    m.kill9();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    let synced = synced.lock().unwrap().clone();
    assert!(
        synced.len() > 16,
        "the writer made too little progress: {}",
        synced.len()
    );
    let m = Mount::new(&store, &mnt, &[]);
    let f = File::open(m.path("w")).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    for (&slot, &byte) in &synced {
        f.read_exact_at(&mut buf, slot << 16).unwrap();
        // A later unsynced write may have landed too (it was committed by size or timer),
        // but an fsync'd slot never reads as a hole or as an older value than synced.
        assert!(buf.iter().all(|&b| b == buf[0]), "slot {slot} is torn");
        assert_ne!(buf[0], 0, "fsync'd slot {slot} was lost");
        let _ = byte;
    }
    drop(f);
    m.stop();
    assert!(gs(&store, &["scrub"]).status.success());
}

/// The store model's operation sequences, through a real mount.
#[test]
fn model_ops_through_the_mount() {
    let t = tempfile::tempdir().unwrap();
    let store = init_store(t.path(), "4K");
    let mnt = t.path().join("mnt");
    // Seal jobs after every write: they run while the next requests come in.
    let m = Mount::new(&store, &mnt, &["--commit-interval", "0.5", "--seal-at", "4K"]);
    let mut runner = TestRunner::new(Config {
        cases: model::cases(24),
        failure_persistence: None,
        ..Config::default()
    });
    let case = std::cell::Cell::new(0u32);
    runner
        .run(&prop::collection::vec(mount_op(), 1..40), |ops| {
            case.set(case.get() + 1);
            let names: Vec<String> = (0..model::SLOTS)
                .map(|i| format!("c{}-{}", case.get(), i))
                .collect();
            let mut files: Vec<Option<File>> = (0..model::SLOTS).map(|_| None).collect();
            let mut models: Vec<Option<ModelImage>> = vec![None; model::SLOTS];
            for op in &ops {
                apply(&m, &names, &mut files, &mut models, op);
                for i in 0..model::SLOTS {
                    if let (Some(f), Some(md)) = (&files[i], &models[i]) {
                        check(f, md)?;
                    }
                }
            }
            // Everything written, closed: read back through fresh opens.
            for i in 0..model::SLOTS {
                files[i] = None;
                if let Some(md) = &models[i] {
                    let f = File::open(m.path(&names[i])).unwrap();
                    check(&f, md)?;
                }
            }
            Ok(())
        })
        .unwrap();
    m.stop();
    assert!(gs(&store, &["scrub"]).status.success());
}

fn mount_op() -> impl Strategy<Value = Op> {
    model::op(false).prop_filter("ops the mount expresses as file calls", |op| {
        matches!(
            op,
            Op::Write { .. }
                | Op::Punch { .. }
                | Op::Resize { .. }
                | Op::Commit { .. }
                | Op::ShareBlocks { .. }
        )
    })
}

fn apply(
    m: &Mount,
    names: &[String],
    files: &mut [Option<File>],
    models: &mut [Option<ModelImage>],
    op: &Op,
) {
    match *op {
        Op::Write {
            img,
            offset,
            len,
            fill,
        } => {
            if files[img].is_none() {
                let f = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(m.path(&names[img]))
                    .unwrap();
                files[img] = Some(f);
                models[img] = Some(ModelImage::default());
            }
            let bytes = fill.bytes(len);
            files[img].as_ref().unwrap().write_all_at(&bytes, offset).unwrap();
            model::model_write(&mut models[img].as_mut().unwrap().current, offset, &bytes);
        }
        Op::Punch { img, offset, len } => {
            if let (Some(f), Some(md)) = (&files[img], &mut models[img]) {
                // PUNCH_HOLE and ZERO_RANGE (both with KEEP_SIZE) read back the same.
                let mode = if offset % 2 == 0 {
                    rustix::fs::FallocateFlags::PUNCH_HOLE
                } else {
                    rustix::fs::FallocateFlags::ZERO_RANGE
                };
                rustix::fs::fallocate(f, mode | rustix::fs::FallocateFlags::KEEP_SIZE, offset, len).unwrap();
                model::model_punch(&mut md.current, offset, len);
            }
        }
        Op::Resize { img, size } => {
            if let (Some(f), Some(md)) = (&files[img], &mut models[img]) {
                f.set_len(size).unwrap();
                md.current.resize(size as usize, 0);
            }
        }
        Op::Commit { img } => {
            if let Some(f) = &files[img] {
                f.sync_all().unwrap();
            }
        }
        Op::ShareBlocks {
            src,
            dst,
            from,
            to,
            n,
        } => {
            if files[src].is_some() && files[dst].is_some() {
                let src_len = models[src].as_ref().unwrap().current.len() as u64;
                let start = from * BS;
                let len = (n * BS).min(src_len.saturating_sub(start));
                if src == dst && start < to * BS + len && to * BS < start + len {
                    return; // the kernel refuses overlapping ranges in one file (EINVAL)
                }
                let mut done = 0;
                while done < len {
                    let k = rustix::fs::copy_file_range(
                        files[src].as_ref().unwrap(),
                        Some(&mut (start + done)),
                        files[dst].as_ref().unwrap(),
                        Some(&mut (to * BS + done)),
                        (len - done) as usize,
                    )
                    .unwrap() as u64;
                    assert!(k > 0);
                    done += k;
                }
                if len > 0 {
                    let chunk = models[src].as_ref().unwrap().current[start as usize..(start + len) as usize]
                        .to_vec();
                    let d = &mut models[dst].as_mut().unwrap().current;
                    model::model_write(d, to * BS, &chunk);
                }
            }
        }
        _ => unreachable!(),
    }
}

fn check(f: &File, md: &ModelImage) -> Result<(), TestCaseError> {
    let len = f.metadata().unwrap().len();
    prop_assert_eq!(len, md.current.len() as u64);
    let mut buf = vec![0xAAu8; len as usize];
    f.read_exact_at(&mut buf, 0).unwrap();
    prop_assert!(buf == md.current, "contents differ from the model");
    for b in 0..=len.div_ceil(BS) {
        let off = b * BS;
        let got_data = match rustix::fs::seek(f, rustix::fs::SeekFrom::Data(off)) {
            Ok(o) => Some(o),
            Err(rustix::io::Errno::NXIO) => None,
            Err(e) => panic!("SEEK_DATA: {e}"),
        };
        prop_assert_eq!(got_data, md.seek_data(off), "SEEK_DATA {}", off);
        let got_hole = match rustix::fs::seek(f, rustix::fs::SeekFrom::Hole(off)) {
            Ok(o) => Some(o),
            Err(rustix::io::Errno::NXIO) => None,
            Err(e) => panic!("SEEK_HOLE: {e}"),
        };
        prop_assert_eq!(got_hole, md.seek_hole(off), "SEEK_HOLE {}", off);
    }
    let data_blocks = (0..len.div_ceil(BS))
        .filter(|&b| model::block_is_data(&md.current, b))
        .count() as u64;
    prop_assert_eq!(
        f.metadata().unwrap().blocks() * 512,
        data_blocks * BS,
        "st_blocks"
    );
    Ok(())
}

/// The external exerciser `fsx` (crate `fsx`, installed by scripts/install-deps)
/// against an image on the mount: reads, writes, mmap, truncate, fallocate,
/// punch hole, copy_file_range, fsync, close/reopen; several seeds.
/// `GEOSYNC_FSX_OPS` sets operations per seed (default 10000).
#[test]
fn fsx_on_an_image() {
    let fsx = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"))
        .join("bin/fsx");
    let fsx = if fsx.exists() { fsx } else { PathBuf::from("fsx") };
    let ops: u64 = std::env::var("GEOSYNC_FSX_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let t = tempfile::tempdir().unwrap();
    let store = init_store(t.path(), "4K");
    let m = Mount::new(&store, &t.path().join("mnt"), &["--commit-interval", "0.2"]);
    let cfg = t.path().join("fsx.toml");
    fs::write(
        &cfg,
        "flen = 4194304\n[opsize]\nmax = 131072\n[weights]\nclose_open = 1\nread = 6\nwrite = 6\n\
         mapread = 1\nmapwrite = 1\ntruncate = 2\nfsync = 1\nfdatasync = 1\nposix_fallocate = 1\n\
         punch_hole = 3\ncopy_file_range = 2\n",
    )
    .unwrap();
    for seed in [1u64, 7, 42] {
        let artifacts = t.path().join(format!("fsx-{seed}"));
        fs::create_dir_all(&artifacts).unwrap();
        let o = Command::new(&fsx)
            .arg("-f")
            .arg(&cfg)
            .args(["-N", &ops.to_string(), "-S", &seed.to_string(), "-P"])
            .arg(&artifacts)
            .arg(m.path(&format!("fsx{seed}")))
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e} (cargo install fsx)", fsx.display()));
        assert!(
            o.status.success(),
            "fsx seed {seed} failed:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    m.stop();
    assert!(gs(&store, &["scrub"]).status.success());
}

/// A full store disk under the mount: the writer gets ENOSPC (at fsync), the
/// image stays readable, and everything fsync'd before is intact.
#[test]
fn full_store_disk_gives_enospc_and_loses_nothing_fsynced() {
    let t = tempfile::tempdir().unwrap();
    let small = t.path().join("small");
    fs::create_dir(&small).unwrap();
    sh(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&small));
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _small = Umount(small.clone());
    let store = small.join("store");
    ok(&store, &["init", "--compression", "none"]);
    let m = Mount::new(&store, &t.path().join("mnt"), &[]);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(m.path("img"))
        .unwrap();
    let mut kept = Vec::new();
    let mut err = None;
    for i in 0..64u64 {
        let mut chunk = vec![0u8; 1 << 20];
        blake3::Hasher::new()
            .update(&i.to_le_bytes())
            .finalize_xof()
            .fill(&mut chunk);
        let r = f.write_all_at(&chunk, i << 20).and_then(|_| f.sync_all());
        match r {
            Ok(()) => kept.push(chunk),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let e = err.expect("a 24 MiB disk must fill up");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert!(kept.len() >= 4, "only {} MiB fit", kept.len());
    drop(f);
    // Readable, through the mount and after a remount.
    let mut buf = vec![0u8; 1 << 20];
    let f = File::open(m.path("img")).unwrap();
    for (i, chunk) in kept.iter().enumerate() {
        f.read_exact_at(&mut buf, (i as u64) << 20).unwrap();
        assert!(buf == *chunk, "fsync'd MiB {i} changed");
    }
    drop(f);
    m.stop();
    let m = Mount::new(&store, &t.path().join("mnt"), &[]);
    let f = File::open(m.path("img")).unwrap();
    for (i, chunk) in kept.iter().enumerate() {
        f.read_exact_at(&mut buf, (i as u64) << 20).unwrap();
        assert!(buf == *chunk, "fsync'd MiB {i} lost after remount");
    }
    drop(f);
    m.stop();
}

/// `kill -9` of the daemon under ext4: after cleanup and remount, ext4's
/// journal replays, `e2fsck -fn` is clean, and every file synced before
/// the kill has its content.
#[test]
fn kill_9_under_ext4_then_journal_replay_is_clean() {
    let t = tempfile::tempdir().unwrap();
    let store = init_store(t.path(), "64K");
    let mnt = t.path().join("mnt");
    let inner = t.path().join("inner");
    let m = Mount::new(&store, &mnt, &[]);
    let img = m.path("vm");
    sh(Command::new("truncate").args(["-s", "1G"]).arg(&img));
    let dev = sh(Command::new("losetup")
        .args(["-f", "--show", "--direct-io=on"])
        .arg(&img))
    .trim()
    .to_string();
    sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
    fs::create_dir_all(&inner).unwrap();
    sh(Command::new("mount").arg(&dev).arg(&inner));
    let mut synced = Vec::new();
    for i in 0..40u64 {
        let mut d = vec![0u8; 256 << 10];
        blake3::Hasher::new()
            .update(&i.to_le_bytes())
            .finalize_xof()
            .fill(&mut d);
        let p = inner.join(format!("f{i}"));
        let f = File::create(&p).unwrap();
        f.write_all_at(&d, 0).unwrap();
        f.sync_all().unwrap();
        synced.push((format!("f{i}"), blake3::hash(&d)));
    }
    // Unsynced work in flight, then the daemon dies.
    let _ = fs::write(inner.join("unsynced"), vec![7u8; 4 << 20]);
    m.kill9();
    let _ = Command::new("umount").arg("-l").arg(&inner).status();
    let _ = Command::new("losetup").arg("-d").arg(&dev).status();
    std::thread::sleep(Duration::from_millis(300));

    let m = Mount::new(&store, &mnt, &[]);
    {
        let lo = Loop::new(&m.path("vm"));
        {
            let _fs = FsMount::new(&lo.0, &inner, "rw"); // replays the journal
            for (name, hash) in &synced {
                let got = blake3::hash(&fs::read(inner.join(name)).unwrap());
                assert_eq!(got, *hash, "{name} lost its synced content");
            }
        }
        let fsck = Command::new("e2fsck").arg("-fn").arg(&lo.0).output().unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck after replay: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
    m.stop();
}
