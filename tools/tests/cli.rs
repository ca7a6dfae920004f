//! The `geosync` binary end to end: real ext4 images (mkfs.ext4, e2fsck),
//! real files, `kill -9` in the middle of commits, a really full disk.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod common;
use common::{gs, ok, umount, BIN};

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Data extents of a file at 4 KiB pages, only pages holding a non-zero byte.
fn nonzero_data_pages(p: &Path) -> Vec<u64> {
    let f = fs::File::open(p).unwrap();
    let mut pages = Vec::new();
    let mut buf = vec![0u8; 4096];
    for (s, e) in geosync_fs::io::file_data_extents(&f).unwrap() {
        let mut pg = s / 4096;
        while pg * 4096 < e {
            let n = f.read_at(&mut buf, pg * 4096).unwrap();
            if buf[..n].iter().any(|&b| b != 0) {
                pages.push(pg);
            }
            pg += 1;
        }
    }
    pages
}

fn data_pages(p: &Path) -> Vec<u64> {
    let f = fs::File::open(p).unwrap();
    let mut pages = Vec::new();
    for (s, e) in geosync_fs::io::file_data_extents(&f).unwrap() {
        pages.extend(s / 4096..e.div_ceil(4096));
    }
    pages
}

fn b3(p: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(p).unwrap()).unwrap();
    h.finalize()
}

/// A real ext4 image with real files in it, built without root (`mkfs.ext4 -d`).
fn ext4_image(dir: &Path, size: &str) -> PathBuf {
    let files = dir.join("files");
    fs::create_dir_all(files.join("docs")).unwrap();
    // Real files: text and binaries from the system, plus generated logs.
    for src in ["/usr/share/doc", "/usr/bin"] {
        let _ = Command::new("cp")
            .args(["-r", "--no-dereference"])
            .arg(src)
            .arg(files.join("docs"))
            .status();
    }
    let mut log = String::new();
    for i in 0..200_000 {
        log.push_str(&format!(
            "{i} request served in {} ms by worker {}\n",
            i % 97,
            i % 7
        ));
    }
    fs::write(files.join("app.log"), log).unwrap();
    let img = dir.join("src.img");
    run(Command::new("truncate").args(["-s", size]).arg(&img));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&files)
        .arg(&img));
    img
}

#[test]
fn ext4_round_trip_is_byte_identical_sparse_and_fsck_clean() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    ok(&store, &["init"]);
    let img = ext4_image(t.path(), "512M");
    let out = ok(&store, &["import", "proj", img.to_str().unwrap()]);
    assert!(out.contains("imported proj version 2"), "{out}");

    let exp = t.path().join("export.img");
    ok(&store, &["export", "proj", exp.to_str().unwrap()]);
    assert_eq!(fs::metadata(&exp).unwrap().len(), 512 << 20);
    assert_eq!(b3(&img), b3(&exp), "export differs from the source");
    // Same hole layout: holes stay holes; only all-zero pages may become holes.
    assert_eq!(data_pages(&exp), nonzero_data_pages(&img));
    let (du_src, du_exp) = (
        fs::metadata(&img).unwrap().blocks() * 512,
        fs::metadata(&exp).unwrap().blocks() * 512,
    );
    assert!(du_exp <= du_src, "export uses {du_exp} bytes, source {du_src}");
    let fsck = Command::new("e2fsck").arg("-fn").arg(&exp).output().unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // Stored bytes are at or below what du reports for the source.
    let stat: serde_json::Value = serde_json::from_str(&ok(&store, &["stat", "--json"])).unwrap();
    assert!(stat["pack_bytes"].as_u64().unwrap() <= du_src, "{stat}");
    assert!(stat["compress_ratio"].as_f64().unwrap() > 1.2, "{stat}");

    // Export to stdout is the same bytes.
    let o = Command::new(BIN)
        .arg("--store")
        .arg(&store)
        .args(["export", "proj", "-"])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(blake3::hash(&o.stdout), b3(&img));

    // Change 1 MiB inside the image and re-import: a new version, only the
    // changed blocks cost anything, and diff finds exactly them.
    ok(&store, &["snapshot", "create", "proj", "v1"]);
    let before: serde_json::Value = serde_json::from_str(&ok(&store, &["stat", "--json"])).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mut rng_bytes = vec![0u8; 1 << 20];
    blake3::Hasher::new()
        .update(b"change")
        .finalize_xof()
        .fill(&mut rng_bytes);
    f.write_all_at(&rng_bytes, 300 << 20).unwrap();
    drop(f);
    let out = ok(&store, &["import", "proj", img.to_str().unwrap()]);
    assert!(out.contains("updated proj version 3"), "{out}");
    let after: serde_json::Value = serde_json::from_str(&ok(&store, &["stat", "--json"])).unwrap();
    let grew = after["stored"].as_u64().unwrap() - before["stored"].as_u64().unwrap();
    assert!(
        ((1 << 20) - 4096..=(1 << 20) + 4096).contains(&grew),
        "stored grew by {grew}"
    );
    let diff: serde_json::Value =
        serde_json::from_str(&ok(&store, &["diff", "proj", "v1", "head", "--json"])).unwrap();
    assert_eq!(diff["changed_blocks"], 16, "{diff}");
    assert_eq!(diff["ranges"][0]["offset"], 300u64 << 20);
    ok(&store, &["export", "proj", exp.to_str().unwrap()]);
    assert_eq!(b3(&img), b3(&exp));

    // Roll back, and the first version comes back byte for byte.
    ok(&store, &["rollback", "proj", "v1"]);
    ok(&store, &["export", "proj", exp.to_str().unwrap()]);
    let fsck = Command::new("e2fsck").arg("-fn").arg(&exp).output().unwrap();
    assert!(fsck.status.success());
    let scrub = gs(&store, &["scrub"]);
    assert!(
        scrub.status.success(),
        "{}",
        String::from_utf8_lossy(&scrub.stdout)
    );
}

#[test]
fn cli_errors_are_clear_and_listings_are_json() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("s");
    let o = gs(&store, &["ls"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no geosync store"),
        "{o:?}"
    );

    ok(
        &store,
        &["init", "--block-size", "16K", "--compression", "zstd:1"],
    );
    let o = gs(&store, &["init"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    let o = gs(&store, &["create", "../etc", "1G"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("invalid name \"../etc\""),
        "{o:?}"
    );
    let o = gs(&store, &["create", "x", "12Q"]);
    assert!(!o.status.success());
    // Sizes past what off_t and SQLite hold are refused, not wrapped.
    for big in ["8192P", "16384P"] {
        let o = gs(&store, &["create", "x", big]);
        assert_eq!(o.status.code(), Some(2), "{big}: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("out of range"),
            "{o:?}"
        );
    }
    // A commit interval that is no duration: refused before anything starts.
    let o = gs(
        &store,
        &["mount", t.path().to_str().unwrap(), "--commit-interval", "inf"],
    );
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("0.1 to 86400"),
        "{o:?}"
    );
    let o = gs(&store, &["info", "missing"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no image named \"missing\""));
    let o = gs(&store, &["init", "--block-size", "3000"]);
    assert!(!o.status.success());

    ok(&store, &["create", "vm1", "16G"]);
    ok(&store, &["clone", "vm1", "vm2"]);
    ok(&store, &["snapshot", "create", "vm1", "daily"]);
    ok(&store, &["resize", "vm2", "32G"]);
    let ls: serde_json::Value = serde_json::from_str(&ok(&store, &["ls", "--json"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2);
    assert_eq!(ls[0]["name"], "vm1");
    assert_eq!(ls[1]["size"], 32u64 << 30);
    let snaps: serde_json::Value =
        serde_json::from_str(&ok(&store, &["snapshot", "list", "vm1", "--json"])).unwrap();
    assert_eq!(snaps[0]["name"], "daily");
    let info: serde_json::Value = serde_json::from_str(&ok(&store, &["info", "vm1", "--json"])).unwrap();
    assert_eq!(info["snapshots"][0]["name"], "daily");
    ok(&store, &["mv", "vm2", "vm3"]);
    ok(&store, &["rm", "vm3"]);
    let o = gs(&store, &["rollback", "vm1", "nope"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("has no snapshot \"nope\""));
    // Progress output is hidden when stderr is not a terminal.
    let src = t.path().join("f");
    fs::write(&src, vec![1u8; 1 << 20]).unwrap();
    let o = gs(&store, &["import", "f", src.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(o.stderr.is_empty(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn scrub_exits_nonzero_on_damage_and_reindex_reports() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("s");
    ok(&store, &["init"]);
    let src = t.path().join("f");
    let mut data = vec![0u8; 4 << 20];
    blake3::Hasher::new().update(b"x").finalize_xof().fill(&mut data);
    fs::write(&src, &data).unwrap();
    ok(&store, &["import", "img", src.to_str().unwrap()]);
    assert!(gs(&store, &["scrub"]).status.success());
    // Flip a byte in the middle of the first pack.
    let pack = fs::read_dir(store.join("packs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let f = fs::OpenOptions::new().read(true).write(true).open(&pack).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, 1 << 20).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], 1 << 20).unwrap();
    let o = gs(&store, &["scrub"]);
    assert_eq!(o.status.code(), Some(3));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("DAMAGED block") && out.contains("used by image img block"),
        "{out}"
    );
    let o = gs(&store, &["export", "img", t.path().join("out").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("integrity error"),
        "{o:?}"
    );
    let o = gs(&store, &["repair", "--reindex"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stdout).contains("still missing"));
}

/// Where the store is (`--store`, `GEOSYNC_STORE`, `./data`), snapshot
/// delete, `gc --dry-run` then `gc`, `repair --reindex` of a store whose
/// index was lost, and a store of another format version, all as the binary
/// reports them.
#[test]
fn store_location_snapshot_delete_gc_and_repair() {
    let t = tempfile::tempdir().unwrap();
    let bare = |dir: &Path, env: Option<&Path>, args: &[&str]| {
        let mut c = Command::new(BIN);
        c.current_dir(dir).args(args).env_remove("RUST_LOG");
        match env {
            Some(s) => c.env("GEOSYNC_STORE", s),
            None => c.env_remove("GEOSYNC_STORE"),
        };
        c.output().unwrap()
    };
    // Default: ./data under the working directory.
    let cwd = t.path().join("cwd");
    fs::create_dir(&cwd).unwrap();
    assert!(bare(&cwd, None, &["init"]).status.success());
    assert!(cwd.join("data/meta.db").exists());
    // GEOSYNC_STORE.
    let store = t.path().join("s");
    assert!(bare(&cwd, Some(&store), &["init", "--block-size", "16K"])
        .status
        .success());
    assert!(store.join("meta.db").exists());
    assert!(bare(&cwd, Some(&store), &["create", "vm", "1G"]).status.success());
    assert!(ok(&store, &["ls"]).contains("vm"));

    // Snapshot delete.
    ok(&store, &["snapshot", "create", "vm", "s1"]);
    ok(&store, &["snapshot", "delete", "vm", "s1"]);
    assert!(!ok(&store, &["snapshot", "list", "vm"]).contains("s1"));
    let o = gs(&store, &["snapshot", "delete", "vm", "s1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("has no snapshot \"s1\""),
        "{o:?}"
    );

    // gc --dry-run plans and changes nothing; gc reclaims.
    let src = t.path().join("f");
    fs::write(&src, geosync_suite::kit::noise(9, 4 << 20)).unwrap();
    ok(&store, &["import", "gone", src.to_str().unwrap()]);
    ok(&store, &["import", "kept", src.to_str().unwrap()]);
    fs::write(&src, geosync_suite::kit::noise(10, 4 << 20)).unwrap();
    ok(&store, &["import", "gone", src.to_str().unwrap()]); // new blocks
    ok(&store, &["rm", "gone"]);
    let pack_bytes = |s: &Path| -> u64 {
        fs::read_dir(s.join("packs"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let before = pack_bytes(&store);
    let plan = ok(&store, &["gc", "--dry-run"]);
    assert!(plan.starts_with("plan: 256 unreferenced blocks"), "{plan}");
    assert_eq!(pack_bytes(&store), before);
    let done = ok(&store, &["gc"]);
    assert!(done.starts_with("gc: 256 unreferenced blocks"), "{done}");
    assert!(pack_bytes(&store) < before - (3 << 20), "{done}");
    assert!(ok(&store, &["gc", "--dry-run"]).starts_with("plan: 0 unreferenced"));

    // repair --reindex rebuilds a lost block index from the packs.
    let db = rusqlite::Connection::open(store.join("meta.db")).unwrap();
    db.execute("DELETE FROM blocks", []).unwrap();
    drop(db);
    let out = t.path().join("out");
    assert_eq!(
        gs(&store, &["export", "kept", out.to_str().unwrap()])
            .status
            .code(),
        Some(1)
    );
    let r = ok(&store, &["repair", "--reindex"]);
    assert!(r.contains("256"), "{r}");
    ok(&store, &["export", "kept", out.to_str().unwrap()]);
    assert_eq!(b3(&out), blake3::hash(&geosync_suite::kit::noise(9, 4 << 20)));
    ok(&store, &["scrub"]);

    // Another format version.
    let db = rusqlite::Connection::open(store.join("meta.db")).unwrap();
    db.execute("UPDATE store SET value = 99 WHERE key = 'format_version'", [])
        .unwrap();
    drop(db);
    let o = gs(&store, &["ls"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("store format version 99 is not supported"),
        "{o:?}"
    );
}

/// `kill -9` at random points of an import: afterwards the image is exactly
/// the old or the new version, and the store is clean.
#[test]
fn kill_9_during_commit_leaves_old_or_new() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("s");
    ok(&store, &["init"]);
    let mk = |name: &str, seed: &[u8]| {
        let p = t.path().join(name);
        let mut d = vec![0u8; 48 << 20];
        blake3::Hasher::new().update(seed).finalize_xof().fill(&mut d);
        // Make it compressible so commits take a while.
        for chunk in d.chunks_mut(4096) {
            chunk[2048..].fill(0x20);
        }
        fs::write(&p, &d).unwrap();
        (p, blake3::hash(&d))
    };
    let versions = [mk("a", b"a"), mk("b", b"b")];
    ok(&store, &["import", "img", versions[1].0.to_str().unwrap()]);
    // Time one whole import, then kill at random points within that span.
    let start = std::time::Instant::now();
    ok(&store, &["import", "img", versions[0].0.to_str().unwrap()]);
    let span = start.elapsed().as_millis().max(20) as u64;
    let out = t.path().join("out");
    let mut rng = rand::rng();
    let mut saw_old = 0;
    let mut saw_new = 0;
    for i in 0..16 {
        let (src, _) = &versions[(i + 1) % 2];
        let mut child = Command::new(BIN)
            .arg("--store")
            .arg(&store)
            .args(["import", "img"])
            .arg(src)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rand::Rng::random_range(
            &mut rng,
            5..(span * 3 / 4).max(6),
        )));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        ok(&store, &["export", "img", out.to_str().unwrap()]);
        let got = b3(&out);
        if got == versions[(i + 1) % 2].1 {
            saw_new += 1;
        } else {
            assert_eq!(
                got,
                versions[i % 2].1,
                "after kill -9 the image is neither version"
            );
            saw_old += 1;
            // Bring it to the new version so the next round changes it again.
            ok(&store, &["import", "img", src.to_str().unwrap()]);
        }
        let scrub = gs(&store, &["scrub"]);
        assert!(
            scrub.status.success(),
            "{}",
            String::from_utf8_lossy(&scrub.stdout)
        );
    }
    eprintln!("kill -9 within {span} ms: {saw_old} rounds kept the old version, {saw_new} had the new one");
    assert!(
        saw_old > 0,
        "no kill landed before the commit: the test did not test anything"
    );
    let o = ok(&store, &["gc"]);
    assert!(o.contains("gc:"), "{o}");
}

/// A really full disk (a tiny tmpfs; needs root, as CI runs): the import
/// fails with a clear error and the previous version stays readable.
#[test]
fn full_disk_during_import_keeps_previous_version() {
    if !common::is_root() {
        eprintln!("skipped: needs root to mount a small tmpfs (CI runs as root)");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let mnt = t.path().join("small");
    fs::create_dir(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(&mnt));
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            umount(&self.0);
        }
    }
    let _guard = Umount(mnt.clone());
    let store = mnt.join("store");
    ok(&store, &["init", "--compression", "none"]);
    let small = t.path().join("small.img");
    let mut d = vec![0u8; 2 << 20];
    blake3::Hasher::new().update(b"small").finalize_xof().fill(&mut d);
    fs::write(&small, &d).unwrap();
    ok(&store, &["import", "img", small.to_str().unwrap()]);
    let big = t.path().join("big.img");
    let mut d = vec![0u8; 32 << 20];
    blake3::Hasher::new().update(b"big").finalize_xof().fill(&mut d);
    fs::write(&big, &d).unwrap();
    let o = gs(&store, &["import", "img", big.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no space left") || err.contains("full"), "{err}");
    let out = t.path().join("out");
    ok(&store, &["export", "img", out.to_str().unwrap()]);
    assert_eq!(b3(&out), b3(&small));
    // Space is given back by gc, and the store still verifies.
    ok(&store, &["gc"]);
    assert!(gs(&store, &["scrub"]).status.success());
}
