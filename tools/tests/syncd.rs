//! Real `syncd` processes on 127.0.0.1 (QUIC, mutual TLS), each with its
//! own store: replication of real ext4 images, incremental transfers
//! measured on the wire, `kill -9` of either side mid-transfer, both sites
//! writing, an image open for writing, clock skew, corrupted blocks, a
//! lossy relay, refused peers and requests, malformed frames, move and
//! status.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::{gs, ok, BIN};

const SYNCD: &str = env!("CARGO_BIN_EXE_syncd");

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One site: a store, its key, and (when running) its syncd.
struct Site {
    name: String,
    store: PathBuf,
    id: String,
    port: u16,
    metrics: u16,
    config: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// How a site sees one peer.
struct PeerCfg<'a> {
    site: &'a Site,
    address: Option<SocketAddr>,
    pull: &'a str,
    push: &'a str,
}

fn peer(site: &Site) -> PeerCfg<'_> {
    PeerCfg {
        site,
        address: None,
        pull: "\"*\"",
        push: "\"*\"",
    }
}

impl Site {
    fn new(root: &Path, name: &str) -> Site {
        let store = root.join(name);
        let o = Command::new(SYNCD)
            .arg("init")
            .arg("--store")
            .arg(&store)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let id = String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_string();
        assert_eq!(id.len(), 32, "node id is the last line: {id:?}");
        Site {
            name: name.into(),
            store,
            id,
            port: free_udp(),
            metrics: free_tcp(),
            config: root.join(format!("{name}.toml")),
            log: root.join(format!("{name}.log")),
            env: Vec::new(),
            child: None,
        }
    }

    fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    fn configure(&self, peers: &[PeerCfg<'_>], extra: &str) {
        let mut t = format!(
            "store = {:?}\nlisten = \"127.0.0.1:{}\"\nmetrics = \"127.0.0.1:{}\"\ncatalog_interval_ms = 300\n{extra}\n",
            self.store, self.port, self.metrics
        );
        for p in peers {
            t += &format!(
                "[[peer]]\nid = \"{}\"\naddress = \"{}\"\npull = [{}]\npush = [{}]\n",
                p.site.id,
                p.address.unwrap_or(p.site.addr()),
                p.pull,
                p.push
            );
        }
        fs::write(&self.config, t).unwrap();
    }

    fn start(&mut self) {
        assert!(self.child.is_none());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(SYNCD)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info,quinn=warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.metrics)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{} did not start:\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            match common::wait_for(&mut c, Duration::from_secs(15)) {
                Some(st) => assert!(st.success(), "{} exited with {st}:\n{}", self.name, self.logs()),
                None => {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("{} did not stop on SIGTERM:\n{}", self.name, self.logs());
                }
            }
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn logs(&self) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Sum of a counter over all its label sets (0 if absent).
    fn metric(&self, name: &str) -> u64 {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.metrics)) else {
            return 0;
        };
        use std::io::Write;
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    fn stamp(&self, image: &str) -> Option<String> {
        let o = gs(&self.store, &["info", image, "--json"]);
        if !o.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        Some(v["stamp"].to_string())
    }

    fn snapshots(&self, image: &str) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&self.store, &["snapshot", "list", image, "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn export_hash(&self, spec: &str) -> blake3::Hash {
        let out = self.store.with_extension(format!("export-{}", rand_suffix()));
        ok(&self.store, &["export", spec, out.to_str().unwrap()]);
        let h = b3(&out);
        let _ = fs::remove_file(&out);
        h
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn b3(p: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(p).unwrap()).unwrap();
    h.finalize()
}

#[track_caller]
fn wait_until(what: &str, limit: Duration, sites: &[&Site], mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            let logs: Vec<String> = sites
                .iter()
                .map(|s| format!("--- {}:\n{}", s.name, s.logs()))
                .collect();
            panic!(
                "timed out after {limit:?} waiting for {what}\n{}",
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A real ext4 image holding `mb` MiB of files (half text, half random),
/// built without mounting (`mkfs.ext4 -d`).
fn ext4_image(dir: &Path, size: &str, mb: usize, seed: u64) -> PathBuf {
    let tree = dir.join(format!("tree{seed}"));
    fs::create_dir_all(&tree).unwrap();
    let words = b"geosync replicates sparse disk images between sites block by block ";
    for i in 0..mb * 2 {
        let mut d = vec![0u8; 512 << 10];
        if i % 2 == 0 {
            for (j, b) in d.iter_mut().enumerate() {
                *b = words[(j + i * 7) % words.len()];
            }
            d[..8].copy_from_slice(&(seed + i as u64).to_le_bytes());
        } else {
            blake3::Hasher::new()
                .update(&(seed, i).0.to_le_bytes())
                .update(&i.to_le_bytes())
                .finalize_xof()
                .fill(&mut d);
        }
        fs::write(tree.join(format!("f{i:04}")), d).unwrap();
    }
    let img = dir.join(format!("img{seed}.raw"));
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg(size)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    img
}

/// Add a file of `bytes` random bytes to an ext4 image, without mounting.
fn add_file(img: &Path, name: &str, bytes: usize, seed: u64) {
    let src = img.with_extension(format!("add{seed}"));
    let mut d = vec![0u8; bytes];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut d);
    fs::write(&src, d).unwrap();
    let o = Command::new("debugfs")
        .args(["-w", "-R"])
        .arg(format!("write {} {name}", src.display()))
        .arg(img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fsck = Command::new("e2fsck").arg("-fn").arg(img).output().unwrap();
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
}

fn import(site: &Site, name: &str, file: &Path) {
    ok(&site.store, &["import", name, file.to_str().unwrap()]);
}

/// Compressed (stored) bytes of the distinct blocks that changed in
/// `image` between snapshot `from` and the head, in `store`.
fn changed_stored_bytes(store: &Path, image: &str, from: &str) -> (u64, u64) {
    let st = geosync_fs::Store::open(store, geosync_fs::OpenMode::ReadOnly).unwrap();
    let d = st.diff(image, from, "head").unwrap();
    let map = st.live_map(image).unwrap();
    let mut seen = BTreeSet::new();
    let mut bytes = 0;
    for (block, hash, loc) in map {
        if d.changed.iter().any(|r| r.contains(&block)) && seen.insert(hash) {
            bytes += loc.unwrap().stored_len as u64;
        }
    }
    (seen.len() as u64, bytes)
}

#[test]
fn three_sites_initial_then_incremental_and_readers_see_old_or_new() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Site::new(t.path(), "a");
    let mut b = Site::new(t.path(), "b");
    let mut c = Site::new(t.path(), "c");
    a.configure(&[peer(&b), peer(&c)], "");
    b.configure(&[peer(&a), peer(&c)], "");
    c.configure(&[peer(&a), peer(&b)], "");
    let img = ext4_image(t.path(), "4G", 48, 1);
    import(&a, "vm1", &img);
    for s in [&mut a, &mut b, &mut c] {
        s.start();
    }
    let want = a.stamp("vm1");
    wait_until(
        "initial replication",
        Duration::from_secs(60),
        &[&a, &b, &c],
        || b.stamp("vm1") == want && c.stamp("vm1") == want,
    );
    let old = a.export_hash("vm1");
    assert_eq!(b.export_hash("vm1"), old, "B's replica differs");
    assert_eq!(c.export_hash("vm1"), old, "C's replica differs");
    // Only-once: the first site to get it deduplicates nothing, and
    // nothing is fetched twice by anyone.
    let fetched_b = b.metric("geosync_blocks_fetched_total");
    assert!(fetched_b > 0);

    // Incremental: about 1 % of the data changes; a reader hashes B's
    // replica all along.
    ok(&a.store, &["snapshot", "create", "vm1", "base"]);
    let wire_before = b.metric("geosync_wire_bytes_received_total");
    let dedup_before = b.metric("geosync_blocks_deduped_total");
    add_file(&img, "change.bin", 512 << 10, 99);
    import(&a, "vm1", &img);
    let new = b3(&img);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, store) = (stop.clone(), b.store.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let o = Command::new(BIN)
                    .arg("--store")
                    .arg(&store)
                    .args(["export", "vm1", "-"])
                    .stderr(Stdio::null())
                    .output()
                    .unwrap();
                assert!(o.status.success());
                seen.push(blake3::hash(&o.stdout));
            }
            seen
        })
    };
    let want = a.stamp("vm1");
    wait_until(
        "incremental replication",
        Duration::from_secs(60),
        &[&a, &b, &c],
        || b.stamp("vm1") == want && c.stamp("vm1") == want,
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let seen = reader.join().unwrap();
    assert!(!seen.is_empty());
    for h in &seen {
        assert!(*h == old || *h == new, "a reader saw a mix of versions");
    }
    assert_eq!(b.export_hash("vm1"), new);
    assert_eq!(c.export_hash("vm1"), new);
    let wire = b.metric("geosync_wire_bytes_received_total") - wire_before;
    let (blocks, changed) = changed_stored_bytes(&a.store, "vm1", "base");
    eprintln!(
        "incremental: {blocks} changed blocks, {changed} bytes stored compressed; B received {wire} bytes on the wire ({:.2}x)",
        wire as f64 / changed as f64
    );
    assert!(blocks > 0 && changed > 0);
    assert!(
        wire as f64 <= 1.2 * changed as f64,
        "{wire} bytes on the wire for {changed} bytes of changed blocks"
    );
    // The unchanged blocks the new map names were not sent again.
    let _ = dedup_before;
    for s in [&mut a, &mut b, &mut c] {
        s.stop();
    }
}

#[test]
fn killed_receiver_and_sender_resume_without_resending() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Site::new(t.path(), "a");
    let mut b = Site::new(t.path(), "b");
    a.configure(&[peer(&b)], "bandwidth = \"48M\"");
    b.configure(&[peer(&a)], "");
    // 192 MiB of incompressible data: a transfer of about four seconds.
    let raw = t.path().join("big.raw");
    let mut d = vec![0u8; 192 << 20];
    blake3::Hasher::new().update(b"big").finalize_xof().fill(&mut d);
    fs::write(&raw, &d).unwrap();
    drop(d);
    import(&a, "big", &raw);
    let total = 192u64 << 20;
    a.start();
    b.start();
    // Kill the receiver past half way.
    wait_until("half the transfer", Duration::from_secs(60), &[&a, &b], || {
        b.metric("geosync_frame_bytes_received_total") > total / 2
    });
    b.kill9();
    b.start();
    // Then the sender, a little into the second run.
    wait_until(
        "the second run to start",
        Duration::from_secs(60),
        &[&a, &b],
        || b.metric("geosync_frame_bytes_received_total") > total / 8,
    );
    a.kill9();
    a.start();
    let want = a.stamp("big");
    wait_until(
        "the transfer to finish",
        Duration::from_secs(120),
        &[&a, &b],
        || b.stamp("big") == want,
    );
    // Everything the restarted receiver got (it was not restarted again).
    let after = b.metric("geosync_frame_bytes_received_total");
    eprintln!(
        "resume: after the receiver was killed past half way, {after} more bytes arrived for {total} ({:.2}x)",
        after as f64 / total as f64
    );
    // Starting over would take at least 1.0x; resuming takes the half that
    // was left, plus what was in flight at each kill (at most 16 MiB).
    assert!(
        after < total * 3 / 4,
        "{after} bytes after the kill for {total}: blocks were sent again"
    );
    assert_eq!(b.export_hash("big"), b3(&raw));
    assert!(gs(&b.store, &["scrub"]).status.success());
    a.stop();
    b.stop();
}

#[test]
fn both_sites_write_newest_wins_loser_kept_and_open_images_wait() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Site::new(t.path(), "a");
    let mut b = Site::new(t.path(), "b");
    a.configure(&[peer(&b)], "");
    b.configure(&[peer(&a)], "");
    let img = ext4_image(t.path(), "1G", 8, 2);
    import(&a, "vm", &img);
    a.start();
    b.start();
    let want = a.stamp("vm");
    wait_until("replication", Duration::from_secs(30), &[&a, &b], || {
        b.stamp("vm") == want
    });
    a.stop();
    b.stop();
    // Both sites change the image while apart; B's change is the newer.
    let ia = t.path().join("a.raw");
    let ib = t.path().join("b.raw");
    fs::copy(&img, &ia).unwrap();
    fs::copy(&img, &ib).unwrap();
    add_file(&ia, "from-a", 1 << 20, 10);
    add_file(&ib, "from-b", 1 << 20, 11);
    import(&a, "vm", &ia);
    std::thread::sleep(Duration::from_millis(20));
    import(&b, "vm", &ib);
    let winner = b.stamp("vm");
    a.start();
    b.start();
    wait_until("convergence", Duration::from_secs(30), &[&a, &b], || {
        a.stamp("vm") == winner && b.stamp("vm") == winner
    });
    assert_eq!(a.export_hash("vm"), b3(&ib));
    // A's version is kept on A as a conflict snapshot named for its origin.
    let snaps = a.snapshots("vm");
    let conflict: Vec<&String> = snaps.iter().filter(|s| s.starts_with("conflict-")).collect();
    assert_eq!(conflict.len(), 1, "{snaps:?}");
    assert!(
        conflict[0].starts_with(&format!("conflict-{}", &a.id[..8])),
        "{snaps:?}"
    );
    ok(&a.store, &["clone", &format!("vm@{}", conflict[0]), "kept"]);
    assert_eq!(a.export_hash("kept"), b3(&ia), "the kept loser is A's version");
    assert!(b.snapshots("vm").iter().all(|s| !s.starts_with("conflict-")));
    assert!(a.metric("geosync_conflicts_total") >= 1);

    // An image open for writing on B is not replaced under its writer.
    let store_b = geosync_fs::Store::open(&b.store, geosync_fs::OpenMode::ReadWrite).unwrap();
    let mut writer = store_b.open_image("vm").unwrap();
    writer.acquire().unwrap();
    let iz = t.path().join("z.raw");
    fs::copy(&ib, &iz).unwrap();
    add_file(&iz, "later", 256 << 10, 12);
    import(&a, "vm", &iz);
    let newer = a.stamp("vm");
    wait_until("B to notice and wait", Duration::from_secs(30), &[&a, &b], || {
        fs::read_to_string(&b.log)
            .unwrap()
            .contains("open for writing here")
    });
    assert_eq!(b.stamp("vm"), winner, "replaced under its writer");
    drop(writer);
    wait_until(
        "the waiting version to apply",
        Duration::from_secs(30),
        &[&a, &b],
        || b.stamp("vm") == newer,
    );
    assert_eq!(b.export_hash("vm"), b3(&iz));
    a.stop();
    b.stop();
}

#[test]
fn clock_skew_of_minutes_keeps_causal_order() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Site::new(t.path(), "a");
    let mut b = Site::new(t.path(), "b");
    a.env.push(("GEOSYNC_CLOCK_SKEW_MS".into(), "300000".into()));
    b.env.push(("GEOSYNC_CLOCK_SKEW_MS".into(), "-300000".into()));
    a.configure(&[peer(&b)], "");
    b.configure(&[peer(&a)], "");
    let img = ext4_image(t.path(), "512M", 4, 3);
    // A's clock runs 10 minutes ahead of B's.
    let o = Command::new(BIN)
        .arg("--store")
        .arg(&a.store)
        .args(["import", "vm"])
        .arg(&img)
        .env("GEOSYNC_CLOCK_SKEW_MS", "300000")
        .output()
        .unwrap();
    assert!(o.status.success());
    a.start();
    b.start();
    let want = a.stamp("vm");
    wait_until("replication to B", Duration::from_secs(30), &[&a, &b], || {
        b.stamp("vm") == want
    });
    // B changes it after receiving it: with its slow clock, only the HLC
    // makes the change newer than A's version.
    let ib = t.path().join("b.raw");
    fs::copy(&img, &ib).unwrap();
    add_file(&ib, "from-b", 256 << 10, 13);
    let o = Command::new(BIN)
        .arg("--store")
        .arg(&b.store)
        .args(["import", "vm"])
        .arg(&ib)
        .env("GEOSYNC_CLOCK_SKEW_MS", "-300000")
        .output()
        .unwrap();
    assert!(o.status.success());
    let newer = b.stamp("vm");
    wait_until(
        "B's change to reach A",
        Duration::from_secs(30),
        &[&a, &b],
        || a.stamp("vm") == newer,
    );
    assert_eq!(a.export_hash("vm"), b3(&ib));
    assert!(
        a.snapshots("vm").is_empty(),
        "a causal successor is not a conflict"
    );
    a.stop();
    b.stop();
}

#[test]
fn corrupted_blocks_are_rejected_fetched_again_and_counted() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Site::new(t.path(), "a");
    let mut b = Site::new(t.path(), "b");
    a.env.push(("GEOSYNC_SYNCD_CORRUPT_BLOCKS".into(), "5".into()));
    a.configure(&[peer(&b)], "");
    b.configure(&[peer(&a)], "");
    let img = ext4_image(t.path(), "512M", 8, 4);
    import(&a, "vm", &img);
    a.start();
    b.start();
    let want = a.stamp("vm");
    wait_until("replication", Duration::from_secs(30), &[&a, &b], || {
        b.stamp("vm") == want
    });
    assert_eq!(b.metric("geosync_blocks_rejected_total"), 5);
    assert_eq!(b.export_hash("vm"), b3(&img));
    assert!(fs::read_to_string(&b.log)
        .unwrap()
        .contains("does not match its hash"));
    a.stop();
    b.stop();
}

#[test]
fn replication_converges_through_a_lossy_reordering_relay() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Site::new(t.path(), "a");
    let mut b = Site::new(t.path(), "b");
    let relay = geosync_tools::relay::Relay::start(
        "127.0.0.1:0".parse().unwrap(),
        a.addr(),
        geosync_tools::relay::Faults {
            drop: 0.03,
            dup: 0.02,
            reorder: 0.05,
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(5),
            seed: 7,
        },
    )
    .unwrap();
    a.configure(&[peer(&b)], "");
    b.configure(
        &[PeerCfg {
            address: Some(relay.addr),
            ..peer(&a)
        }],
        "",
    );
    let img = ext4_image(t.path(), "1G", 16, 5);
    import(&a, "vm", &img);
    a.start();
    b.start();
    let want = a.stamp("vm");
    wait_until(
        "replication through the relay",
        Duration::from_secs(120),
        &[&a, &b],
        || b.stamp("vm") == want,
    );
    assert_eq!(b.export_hash("vm"), b3(&img));
    let c = &relay.counts;
    eprintln!("relay: {c:?}");
    assert!(c.dropped.load(Ordering::Relaxed) > 0 && c.duplicated.load(Ordering::Relaxed) > 0);
    assert!(c.reordered.load(Ordering::Relaxed) > 0);
    a.stop();
    b.stop();
}

#[test]
fn move_forces_a_paced_image_and_status_tells_the_truth() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Site::new(t.path(), "a");
    let mut b = Site::new(t.path(), "b");
    a.configure(&[peer(&b)], "");
    // B paces hard: after a pull of k seconds, nothing for 10 000 k.
    b.configure(&[peer(&a)], "pacing_factor = 10000");
    let img = ext4_image(t.path(), "1G", 8, 6);
    import(&a, "vm", &img);
    a.start();
    b.start();
    let want = a.stamp("vm");
    wait_until("replication", Duration::from_secs(30), &[&a, &b], || {
        b.stamp("vm") == want
    });
    let status = |s: &Site| -> serde_json::Value {
        serde_json::from_str(&ok(&s.store, &["sync", "status", "--json"])).unwrap()
    };
    let st = status(&b);
    let vm = &st["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image"] == "vm")
        .unwrap()["peers"][0];
    assert_eq!(vm["state"], "in sync", "{st}");
    assert!(vm["last_transfer"]["bytes"].as_u64().unwrap() > 0, "{st}");
    assert!(vm["next_allowed_ms"].as_u64().is_some(), "pacing shows: {st}");
    // A newer version on A: B is paced, so it stays behind, and says by how much.
    let i2 = t.path().join("v2.raw");
    fs::copy(&img, &i2).unwrap();
    add_file(&i2, "more", 1 << 20, 14);
    import(&a, "vm", &i2);
    let newer = a.stamp("vm");
    wait_until(
        "B to see it is behind",
        Duration::from_secs(30),
        &[&a, &b],
        || {
            let st = status(&b);
            let p = &st["images"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["image"] == "vm")
                .unwrap()["peers"][0];
            p["state"] == "behind" && p["behind_blocks"].as_u64().is_some_and(|n| n > 0)
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_ne!(b.stamp("vm"), newer, "pacing held it back");
    // A move is forced: it goes now, with progress, and B becomes its home.
    let o = gs(&a.store, &["move", "vm", "--to", &b.id]);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        a.logs()
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("home is now"));
    assert_eq!(b.stamp("vm"), newer);
    let st = status(&a);
    let vm = st["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image"] == "vm")
        .unwrap();
    assert_eq!(vm["home"], b.id.as_str(), "{st}");
    // A move to a peer that may not receive it fails clearly.
    let o = gs(&a.store, &["move", "nope", "--to", &b.id]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no image"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    a.stop();
    b.stop();
}

#[test]
fn unknown_peers_forbidden_images_and_malformed_frames_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Site::new(t.path(), "a");
    let mut b = Site::new(t.path(), "b");
    let mut c = Site::new(t.path(), "c"); // not in A's config
    a.configure(
        &[PeerCfg {
            pull: "\"pub-*\"",
            push: "\"pub-*\"",
            ..peer(&b)
        }],
        "stall_timeout_secs = 3",
    );
    b.configure(&[peer(&a)], "");
    c.configure(&[peer(&a)], "");
    let img = ext4_image(t.path(), "256M", 2, 7);
    import(&a, "pub-1", &img);
    import(&a, "priv-1", &img);
    import(&b, "secret", &img);
    a.start();
    b.start();
    c.start();
    let want = a.stamp("pub-1");
    wait_until("the public image", Duration::from_secs(30), &[&a, &b], || {
        b.stamp("pub-1") == want
    });
    wait_until(
        "A to log the unknown peer",
        Duration::from_secs(30),
        &[&a, &c],
        || fs::read_to_string(&a.log).unwrap().contains("unknown peer"),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(b.stamp("priv-1"), None, "B may not pull priv-1");
    assert_eq!(c.stamp("pub-1"), None, "C is unknown to A");
    assert_eq!(a.stamp("secret"), None, "A does not accept what B may not push");

    // A hand-made client with B's key: a forbidden pull, then bad frames.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let me = geosync_syncd::identity::Identity::load(&b.store).unwrap();
    let a_id = geosync_proto::NodeId::from_hex(&a.id).unwrap();
    let a_addr = a.addr();
    rt.block_on(async {
        use geosync_proto::wire::{code, Message};
        use geosync_syncd::net;
        let ep = net::endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let conn = net::connect(&ep, &me, a_id, a_addr).await.unwrap();
        let ask = |msg: Message| {
            let conn = conn.clone();
            async move {
                let (mut s, mut r) = conn.open_bi().await.unwrap();
                net::write_frame(&mut s, &msg).await.unwrap();
                s.finish().unwrap();
                let mut out = Vec::new();
                while let Ok(Some((m, _))) = net::read_frame(&mut r).await {
                    out.push(m);
                }
                out
            }
        };
        let r = ask(Message::PullRequest {
            image: "priv-1".into(),
            have: None,
        })
        .await;
        assert!(
            matches!(&r[..], [Message::Error { code, .. }] if *code == code::FORBIDDEN),
            "{r:?}"
        );
        let r = ask(Message::Offer {
            image: "priv-9".into(),
        })
        .await;
        assert!(
            matches!(&r[..], [Message::Error { code, .. }] if *code == code::FORBIDDEN),
            "{r:?}"
        );
        // Malformed: an oversized length prefix, garbage, a truncated frame,
        // a reply where a request belongs. Each closes that connection.
        let bad: [&[u8]; 4] = [
            &[0xff, 0xff, 0xff, 0xff, 7],
            &[5, 0, 0, 0, 0x63, 1, 2, 3, 4],
            &[40, 0, 0],
            &{
                let mut v = Vec::new();
                Message::Ok.encode(&mut v);
                v
            },
        ];
        for bytes in bad {
            let conn = net::connect(&ep, &me, a_id, a_addr).await.unwrap();
            let (mut s, mut r) = conn.open_bi().await.unwrap();
            s.write_all(bytes).await.unwrap();
            s.finish().unwrap();
            let _ = net::read_frame(&mut r).await;
            let why = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
            assert!(why.is_ok(), "A did not close a connection that sent {bytes:?}");
        }
        // A stalled reader: requests for more blocks than the connection's
        // window holds, never read. A drops those streams after its stall
        // timeout instead of keeping a serving thread per stream forever.
        let mut hashes = Vec::new();
        for m in ask(Message::PullRequest {
            image: "pub-1".into(),
            have: None,
        })
        .await
        {
            if let Message::MapDiff { changes, .. } = m {
                hashes.extend(changes.into_iter().filter_map(|c| c.hash));
            }
        }
        assert!(!hashes.is_empty());
        let hashes: Vec<_> = hashes.iter().cycle().take(256).copied().collect();
        let conn = net::connect(&ep, &me, a_id, a_addr).await.unwrap();
        let mut unread = Vec::new();
        // (Each reply ~6 MB here, a third of the blocks incompressible:
        // 48 of them are 4x the 64 MiB connection window.)
        for _ in 0..48 {
            let (mut s, r) = conn.open_bi().await.unwrap();
            net::write_frame(
                &mut s,
                &Message::BlockRequest {
                    hashes: hashes.clone(),
                },
            )
            .await
            .unwrap();
            s.finish().unwrap();
            unread.push((s, r));
        }
        // And a stream whose request never comes.
        let (mut s, r) = conn.open_bi().await.unwrap();
        s.write_all(&[0]).await.unwrap();
        unread.push((s, r));
        let start = std::time::Instant::now();
        loop {
            let log = fs::read_to_string(&a.log).unwrap();
            if log.contains("peer stalled reading our reply")
                && log.contains("peer stalled sending its request")
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "A never dropped the stalled streams:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(unread);
    });
    let log = fs::read_to_string(&a.log).unwrap();
    assert!(
        log.contains("refused a request the peer's policy does not allow"),
        "{log}"
    );
    assert!(log.matches("broke the protocol").count() >= 4, "{log}");
    // A still serves B.
    import(&a, "pub-2", &img);
    let want = a.stamp("pub-2");
    wait_until(
        "service after the bad frames",
        Duration::from_secs(30),
        &[&a, &b],
        || b.stamp("pub-2") == want,
    );
    // A move B may not receive is refused by policy before anything moves.
    let o = gs(&a.store, &["move", "priv-1", "--to", &b.id]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("may not pull"));
    // ...and one A does not accept from B is refused by A.
    let o = gs(&b.store, &["move", "secret", "--to", &a.id]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("refused the move"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The control socket is its owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(a.store.join("syncd/control.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    a.stop();
    b.stop();
    c.stop();
}

/// Maps are arrays of blocks: stores with different block sizes cannot
/// replicate. Each side refuses the other at the handshake and says why;
/// nothing moves.
#[test]
fn sites_with_different_block_sizes_refuse_each_other() {
    let t = tempfile::tempdir().unwrap();
    let o = gs(&t.path().join("d"), &["init", "--block-size", "16K"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut a = Site::new(t.path(), "a");
    let mut d = Site::new(t.path(), "d");
    a.configure(&[peer(&d)], "");
    d.configure(&[peer(&a)], "");
    let img = ext4_image(t.path(), "64M", 1, 11);
    import(&a, "img", &img);
    import(&d, "other", &img);
    a.start();
    d.start();
    let why = "stores replicate only with the same block size";
    wait_until(
        "both sides to refuse the other",
        Duration::from_secs(30),
        &[&a, &d],
        || {
            fs::read_to_string(&a.log).unwrap().contains(why)
                && fs::read_to_string(&d.log).unwrap().contains(why)
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        d.stamp("img"),
        None,
        "a 64 KiB-block image reached a 16 KiB-block store"
    );
    assert_eq!(
        a.stamp("other"),
        None,
        "a 16 KiB-block image reached a 64 KiB-block store"
    );
    let log = fs::read_to_string(&a.log).unwrap();
    assert!(
        log.contains("65536-byte blocks") && log.contains("16384-byte"),
        "{log}"
    );
    a.stop();
    d.stop();
}

/// Readiness goes to systemd (`NOTIFY_SOCKET`) once the daemon listens, and/// Readiness goes to systemd (`NOTIFY_SOCKET`) once the daemon listens, and
/// SIGTERM stops it cleanly (exit 0, control socket removed).
#[test]
fn sd_notify_ready_then_clean_sigterm() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Site::new(t.path(), "a");
    let b = Site::new(t.path(), "b");
    a.configure(&[peer(&b)], "");
    let sock_path = t.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    a.env
        .push(("NOTIFY_SOCKET".into(), sock_path.display().to_string()));
    a.start();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("no sd-notify message");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    let control = a.store.join("syncd/control.sock");
    assert!(control.exists());
    a.stop();
    assert!(!control.exists(), "the control socket is removed on shutdown");
    assert!(fs::read_to_string(&a.log).unwrap().contains("stopped"));
}

/// `syncd run` refuses what would go wrong later, saying why: a second
/// daemon on one store, a node listed as its own peer, a key that is not
/// the store's; and a move to a node that is not a peer.
#[test]
fn syncd_refuses_bad_setups_clearly() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Site::new(t.path(), "a");
    let b = Site::new(t.path(), "b");
    let run = |cfg: &Path| {
        let o = Command::new(SYNCD)
            .arg("run")
            .arg("--config")
            .arg(cfg)
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    a.configure(&[peer(&b)], "");
    a.start();
    // Another daemon on the same store (another port, same control socket).
    let second = t.path().join("second.toml");
    let text = fs::read_to_string(&a.config)
        .unwrap()
        .replace(&format!(":{}\"", a.port), &format!(":{}\"", free_udp()))
        .replace(&format!(":{}\"", a.metrics), &format!(":{}\"", free_tcp()));
    fs::write(&second, text).unwrap();
    let err = run(&second);
    assert!(err.contains("another syncd is running"), "{err}");
    // A move to a node that is not a peer.
    let o = gs(&a.store, &["move", "x", "--to", &"0".repeat(32)]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a configured peer"));
    a.stop();
    // A node that lists itself.
    let mut me = Site::new(t.path(), "c");
    me.id = a.id.clone();
    a.configure(&[peer(&me)], "");
    let err = run(&a.config);
    assert!(err.contains("lists itself"), "{err}");
    // A store whose key was replaced by another node's.
    fs::remove_dir_all(a.store.join("syncd")).unwrap();
    let o = Command::new("cp")
        .arg("-r")
        .arg(b.store.join("syncd"))
        .arg(a.store.join("syncd"))
        .status()
        .unwrap();
    assert!(o.success());
    a.configure(&[peer(&b)], "");
    let err = run(&a.config);
    assert!(err.contains("has node id") && err.contains("syncd init"), "{err}");
    // `syncd init` then says what to do; --adopt-key records the key's id;
    // run again, init prints the id and changes nothing.
    let init = |extra: &[&str]| {
        let o = Command::new(SYNCD)
            .arg("init")
            .arg("--store")
            .arg(&a.store)
            .args(extra)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
        (
            o.status.success(),
            out,
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, _, err) = init(&[]);
    assert!(
        !ok && err.contains("--adopt-key") && err.contains("remove"),
        "{err}"
    );
    let (ok, out, err) = init(&["--adopt-key"]);
    assert!(ok, "{err}");
    assert_eq!(out, b.id);
    let (ok, out, err) = init(&[]);
    assert!(ok, "{err}");
    assert_eq!(out, b.id);
    assert!(err.contains("already"), "{err}");
}
