//! `geosync bench sync`: replication by two `syncd` against an rsync daemon
//! (`rsync --sparse` for the first copy, `rsync --inplace --no-whole-file`
//! for the update) and a `bsdtar -cf - | bsdtar -xf -` pipe over TCP, on
//! sparse ext4 images of several logical sizes holding the same real files;
//! over loopback and over a `tc tbf` link between the root network namespace
//! (site A) and a namespace of its own (site B). Needs root (page cache
//! drops, namespaces), rsync, bsdtar, e2fsprogs, iproute2.
//!
//! What is timed: geosync from the moment both daemons run (the image is
//! in site A's store) until site B's store has the same version; rsync and
//! bsdtar from their start until they exit. Bytes: geosync's from QUIC's UDP
//! statistics at B (`geosync_wire_bytes_received_total`), rsync's from its
//! `--stats`, bsdtar's as the bytes through the TCP pipe. The page cache is
//! dropped before every run.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use geosync_fs::{InitOptions, OpenMode, Store};

use crate::bench::{drop_caches, du_bytes, stage_files};
use crate::units::{format_size, parse_size};

/// Arguments of `geosync bench sync`.
#[derive(Args, Debug)]
pub struct SyncBenchArgs {
    /// Logical sizes of the images (same files in each).
    #[arg(long, default_value = "16G,64G", value_delimiter = ',', value_parser = parse_size)]
    pub sizes: Vec<u64>,
    /// Real file data in the images (copied from --source).
    #[arg(long, default_value = "1.5G", value_parser = parse_size)]
    pub data: u64,
    /// Where the files come from.
    #[arg(long, default_value = "/usr")]
    pub source: PathBuf,
    /// Links to run over: loopback, tbf (a rate-limited veth pair between namespaces).
    #[arg(long, default_value = "loopback,tbf", value_delimiter = ',')]
    pub links: Vec<String>,
    /// Rate of the tbf link (tc syntax).
    #[arg(long, default_value = "1gbit")]
    pub rate: String,
    /// Images in the idle-round measurement (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    pub idle_images: usize,
    /// Skip rsync and bsdtar (geosync only).
    #[arg(long)]
    pub no_baselines: bool,
    /// Scratch directory (default: a temporary directory under /var/tmp).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Also write the results as CSV here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

const NS: &str = "gsbench-b";

/// Where site B lives.
struct Link {
    name: String,
    a_ip: String,
    b_ip: String,
    ns: Option<String>,
}

impl Link {
    /// A command that runs at site B (inside its namespace, if any).
    fn at_b(&self, prog: &str) -> Command {
        match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, prog]);
                c
            }
            None => Command::new(prog),
        }
    }
}

fn sh(c: &mut Command) -> Result<String> {
    let o = c.output().with_context(|| format!("running {c:?}"))?;
    if !o.status.success() {
        bail!("{c:?} failed: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn setup_link(name: &str, rate: &str) -> Result<Link> {
    match name {
        "loopback" => Ok(Link {
            name: "loopback".into(),
            a_ip: "127.0.0.1".into(),
            b_ip: "127.0.0.1".into(),
            ns: None,
        }),
        "tbf" => {
            teardown_tbf();
            sh(Command::new("ip").args(["netns", "add", NS]))?;
            sh(Command::new("ip").args(["link", "add", "gsb0", "type", "veth", "peer", "name", "gsb1"]))?;
            sh(Command::new("ip").args(["link", "set", "gsb1", "netns", NS]))?;
            sh(Command::new("ip").args(["addr", "add", "10.77.0.1/24", "dev", "gsb0"]))?;
            sh(Command::new("ip").args(["link", "set", "gsb0", "up"]))?;
            let inns = |args: &[&str]| {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", NS]).args(args);
                sh(&mut c)
            };
            inns(&["ip", "addr", "add", "10.77.0.2/24", "dev", "gsb1"])?;
            inns(&["ip", "link", "set", "gsb1", "up"])?;
            inns(&["ip", "link", "set", "lo", "up"])?;
            let tbf = ["root", "tbf", "rate", rate, "burst", "1mb", "latency", "50ms"];
            sh(Command::new("tc").args(["qdisc", "add", "dev", "gsb0"]).args(tbf))?;
            inns(&[&["tc", "qdisc", "add", "dev", "gsb1"][..], &tbf[..]].concat())?;
            Ok(Link {
                name: format!("tbf {rate}"),
                a_ip: "10.77.0.1".into(),
                b_ip: "10.77.0.2".into(),
                ns: Some(NS.into()),
            })
        }
        other => bail!("unknown link {other:?}: use loopback or tbf"),
    }
}

fn teardown_tbf() {
    let _ = Command::new("ip").args(["netns", "del", NS]).output();
    let _ = Command::new("ip").args(["link", "del", "gsb0"]).output();
}

fn syncd_bin() -> Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name("syncd");
    if !p.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p geosync-tools`",
            p.display()
        );
    }
    Ok(p)
}

fn geosync_bin() -> Result<PathBuf> {
    Ok(std::env::current_exe()?)
}

/// `syncd init`: the node id.
fn syncd_init(store: &Path) -> Result<String> {
    let out = sh(Command::new(syncd_bin()?).arg("init").arg("--store").arg(store))?;
    Ok(out.lines().last().unwrap_or_default().trim().to_string())
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

#[allow(clippy::too_many_arguments)]
fn start_syncd(
    cmd: Command,
    dir: &Path,
    name: &str,
    store: &Path,
    listen: SocketAddr,
    metrics: SocketAddr,
    peer_id: &str,
    peer: SocketAddr,
) -> Result<Daemon> {
    let cfg = dir.join(format!("{name}.toml"));
    fs::write(
        &cfg,
        format!(
            "store = {store:?}\nlisten = \"{listen}\"\nmetrics = \"{metrics}\"\ncatalog_interval_ms = 100\npacing_factor = 0\n\
             [[peer]]\nid = \"{peer_id}\"\naddress = \"{peer}\"\npull = [\"*\"]\npush = [\"*\"]\n"
        ),
    )?;
    let log = fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = cmd;
    let child = cmd
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting syncd")?;
    let d = Daemon(child);
    let start = Instant::now();
    while TcpStream::connect_timeout(&metrics, Duration::from_millis(200)).is_err() {
        if start.elapsed() > Duration::from_secs(15) {
            bail!(
                "syncd {name} did not start; see {}",
                dir.join(format!("{name}.log")).display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(d)
}

/// Sum of a Prometheus counter over its label sets.
pub fn metric(addr: SocketAddr, name: &str) -> Result<u64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

fn wait_stamp(store: &Path, image: &str, want: geosync_fs::Stamp, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    let s = Store::open(store, OpenMode::ReadOnly);
    let mut s = s.ok();
    loop {
        if s.is_none() {
            s = Store::open(store, OpenMode::ReadOnly).ok();
        }
        if let Some(st) = &s {
            if matches!(st.image_info(image), Ok(i) if i.stamp == want) {
                return Ok(start.elapsed());
            }
        }
        if start.elapsed() > limit {
            bail!("site B did not get {image} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn rsync_bytes(stats: &str) -> u64 {
    stats
        .lines()
        .find(|l| l.starts_with("Total bytes received:"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().replace(',', ""))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One measured transfer.
#[derive(Clone, Debug, Default)]
pub struct Run {
    /// Seconds.
    pub secs: f64,
    /// Bytes on the wire (or through the pipe).
    pub bytes: u64,
}

/// One row: a link and an image size.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// Link name.
    pub link: String,
    /// Logical size.
    pub size: u64,
    /// Stored (compressed) bytes of the image at site A.
    pub stored: u64,
    /// geosync, first copy.
    pub geo: Run,
    /// rsync --sparse, first copy.
    pub rsync: Option<Run>,
    /// bsdtar pipe, first copy.
    pub tar: Option<Run>,
    /// geosync, after a 1 % change.
    pub geo_incr: Run,
    /// Compressed bytes of the changed blocks.
    pub changed: u64,
    /// rsync --inplace, after the change.
    pub rsync_incr: Option<Run>,
}

/// Run the whole benchmark.
pub fn run(args: SyncBenchArgs) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("geosync bench sync needs root (page cache drops, network namespaces)");
    }
    let tmp;
    let work = match &args.workdir {
        Some(w) => {
            fs::create_dir_all(w)?;
            w.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("geosync-syncbench")
                .tempdir_in("/var/tmp")?;
            tmp.path().to_path_buf()
        }
    };
    eprintln!(
        "staging {} of files from {}",
        format_size(args.data),
        args.source.display()
    );
    let tree = work.join("tree");
    let copied = stage_files(&tree, &args.source, args.data)?;
    let mut rows = Vec::new();
    for l in &args.links {
        let link = setup_link(l, &args.rate)?;
        let r = (|| -> Result<()> {
            for &size in &args.sizes {
                eprintln!(
                    "== {} / {} image holding {}",
                    link.name,
                    format_size(size),
                    format_size(copied)
                );
                let row = one(&args, &link, &work, &tree, size)?;
                print_row(&row);
                rows.push(row);
            }
            Ok(())
        })();
        if link.ns.is_some() {
            teardown_tbf();
        }
        r?;
    }
    let idle = if args.idle_images > 0 {
        Some(idle_round(&work, args.idle_images)?)
    } else {
        None
    };
    let report = report(&rows, idle.as_ref(), copied);
    println!("{report}");
    if let Some(p) = &args.csv {
        let mut csv = String::from(
            "link,size,stored,geo_s,geo_bytes,rsync_s,rsync_bytes,tar_s,tar_bytes,geo_incr_s,geo_incr_bytes,changed_bytes,rsync_incr_s,rsync_incr_bytes\n",
        );
        for r in &rows {
            let o = |r: &Option<Run>| {
                r.as_ref()
                    .map(|r| format!("{:.3},{}", r.secs, r.bytes))
                    .unwrap_or_else(|| ",".into())
            };
            let _ = writeln!(
                csv,
                "{},{},{},{:.3},{},{},{},{:.3},{},{},{}",
                r.link,
                r.size,
                r.stored,
                r.geo.secs,
                r.geo.bytes,
                o(&r.rsync),
                o(&r.tar),
                r.geo_incr.secs,
                r.geo_incr.bytes,
                r.changed,
                o(&r.rsync_incr)
            );
        }
        fs::write(p, csv)?;
    }
    Ok(())
}

fn one(args: &SyncBenchArgs, link: &Link, work: &Path, tree: &Path, size: u64) -> Result<Row> {
    let dir = work.join(format!(
        "{}-{}",
        link.name.replace(' ', "_"),
        format_size(size).replace(' ', "")
    ));
    let _ = fs::remove_dir_all(&dir);
    let src = dir.join("src");
    fs::create_dir_all(&src)?;
    let img = src.join("image.raw");
    fs::File::create(&img)?.set_len(size)?;
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", "-d"])
        .arg(tree)
        .arg(&img))?;
    // Site A: the image in its store. Site B: an empty store.
    let (sa, sb) = (dir.join("a"), dir.join("b"));
    Store::init(&sa, &InitOptions::default())?;
    let id_a = syncd_init(&sa)?;
    let id_b = syncd_init(&sb)?;
    sh(Command::new(geosync_bin()?)
        .arg("--store")
        .arg(&sa)
        .args(["import", "img"])
        .arg(&img))?;
    let info = Store::open(&sa, OpenMode::ReadOnly)?.image_info("img")?;
    let mut row = Row {
        link: link.name.clone(),
        size,
        stored: info.stored,
        ..Row::default()
    };
    let a_addr: SocketAddr = format!("{}:7600", link.a_ip).parse()?;
    let b_addr: SocketAddr = format!("{}:7601", link.b_ip).parse()?;
    let b_metrics: SocketAddr = format!("{}:9601", link.b_ip).parse()?;

    // geosync, first copy.
    drop_caches();
    let t0 = Instant::now();
    let da = start_syncd(
        Command::new(syncd_bin()?),
        &dir,
        "a",
        &sa,
        a_addr,
        format!("{}:9600", link.a_ip).parse()?,
        &id_b,
        b_addr,
    )?;
    let db = start_syncd(
        link.at_b(syncd_bin()?.to_str().unwrap()),
        &dir,
        "b",
        &sb,
        b_addr,
        b_metrics,
        &id_a,
        a_addr,
    )?;
    wait_stamp(&sb, "img", info.stamp, Duration::from_secs(1800))?;
    let secs = t0.elapsed().as_secs_f64();
    settle();
    row.geo = Run {
        secs,
        bytes: metric(b_metrics, "geosync_wire_bytes_received_total")?,
    };
    eprintln!(
        "  geosync first copy: {:.2} s, {}",
        row.geo.secs,
        format_size(row.geo.bytes)
    );

    let rsync_dir = dir.join("rsync");
    let mut rsyncd = None;
    if !args.no_baselines {
        // rsync daemon at A; client at B.
        fs::create_dir_all(&rsync_dir)?;
        let conf = dir.join("rsyncd.conf");
        fs::write(
            &conf,
            format!(
                "use chroot = no\npid file = {}\n[src]\npath = {}\nread only = yes\nuid = root\ngid = root\n",
                dir.join("rsyncd.pid").display(),
                src.display()
            ),
        )?;
        let d = Command::new("rsync")
            .args(["--daemon", "--no-detach", "--port=8730"])
            .arg(format!("--address={}", link.a_ip))
            .arg(format!("--config={}", conf.display()))
            .stderr(Stdio::null())
            .spawn()
            .context("starting rsync --daemon (install rsync)")?;
        rsyncd = Some(Daemon(d));
        let a8730: SocketAddr = format!("{}:8730", link.a_ip).parse()?;
        let start = Instant::now();
        while TcpStream::connect_timeout(&a8730, Duration::from_millis(200)).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("rsync daemon did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop_caches();
        let t = Instant::now();
        let out = sh(link
            .at_b("rsync")
            .args(["--sparse", "--stats"])
            .arg(format!("rsync://{}:8730/src/image.raw", link.a_ip))
            .arg(&rsync_dir))?;
        row.rsync = Some(Run {
            secs: t.elapsed().as_secs_f64(),
            bytes: rsync_bytes(&out),
        });
        eprintln!(
            "  rsync --sparse: {:.2} s, {}",
            row.rsync.as_ref().unwrap().secs,
            format_size(rsync_bytes(&out))
        );

        // bsdtar pipe over TCP: receiver at B, sender at A.
        let tar_dir = dir.join("tar");
        fs::create_dir_all(&tar_dir)?;
        drop_caches();
        let t = Instant::now();
        let mut recv = link
            .at_b(geosync_bin()?.to_str().unwrap())
            .args([
                "bench",
                "pipe-recv",
                &format!("{}:8731", link.b_ip),
                "--",
                "bsdtar",
                "-xf",
                "-",
                "-C",
            ])
            .arg(&tar_dir)
            .stdout(Stdio::piped())
            .spawn()?;
        let sent = sh(Command::new(geosync_bin()?)
            .args([
                "bench",
                "pipe-send",
                &format!("{}:8731", link.b_ip),
                "--",
                "bsdtar",
                "-cf",
                "-",
                "-C",
            ])
            .arg(&src)
            .arg("image.raw"))?;
        let st = recv.wait()?;
        if !st.success() {
            bail!("bsdtar receiver failed");
        }
        let tar = Run {
            secs: t.elapsed().as_secs_f64(),
            bytes: sent.trim().parse().unwrap_or(0),
        };
        eprintln!(
            "  bsdtar pipe: {:.2} s, {} (extracted du {})",
            tar.secs,
            format_size(tar.bytes),
            format_size(du_bytes(&tar_dir.join("image.raw")).unwrap_or(0))
        );
        row.tar = Some(tar);
        let _ = fs::remove_dir_all(&tar_dir);
    }

    // A 1 % change of the data: a new file written into the image.
    {
        let s = Store::open(&sa, OpenMode::ReadWrite)?;
        s.create_snapshot("img", "base")?;
    }
    let change = dir.join("change.bin");
    let mut d = vec![0u8; (args.data / 100) as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in d.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    fs::write(&change, &d)?;
    sh(Command::new("debugfs")
        .args(["-w", "-R"])
        .arg(format!("write {} change.bin", change.display()))
        .arg(&img))?;
    settle();
    let before = metric(b_metrics, "geosync_wire_bytes_received_total")?;
    sh(Command::new(geosync_bin()?)
        .arg("--store")
        .arg(&sa)
        .args(["import", "img"])
        .arg(&img))?;
    let want = Store::open(&sa, OpenMode::ReadOnly)?.image_info("img")?.stamp;
    let t = Instant::now();
    wait_stamp(&sb, "img", want, Duration::from_secs(600))?;
    let secs = t.elapsed().as_secs_f64();
    settle();
    row.geo_incr = Run {
        secs,
        bytes: metric(b_metrics, "geosync_wire_bytes_received_total")? - before,
    };
    row.changed = changed_stored(&sa)?;
    eprintln!(
        "  geosync after 1 %: {:.3} s, {} (changed blocks: {} compressed)",
        row.geo_incr.secs,
        format_size(row.geo_incr.bytes),
        format_size(row.changed)
    );
    drop(da);
    drop(db);
    if rsyncd.is_some() {
        drop_caches();
        let t = Instant::now();
        let out = sh(link
            .at_b("rsync")
            .args(["--inplace", "--no-whole-file", "--stats"])
            .arg(format!("rsync://{}:8730/src/image.raw", link.a_ip))
            .arg(rsync_dir.join("image.raw")))?;
        row.rsync_incr = Some(Run {
            secs: t.elapsed().as_secs_f64(),
            bytes: rsync_bytes(&out),
        });
        eprintln!(
            "  rsync --inplace after 1 %: {:.2} s, {}",
            row.rsync_incr.as_ref().unwrap().secs,
            format_size(rsync_bytes(&out))
        );
    }
    drop(rsyncd);
    let _ = fs::remove_dir_all(&dir);
    Ok(row)
}

/// The daemons publish QUIC's byte counters every 200 ms: wait for them.
fn settle() {
    std::thread::sleep(Duration::from_millis(600));
}

/// Compressed bytes of the distinct blocks changed since snapshot `base`.
fn changed_stored(store: &Path) -> Result<u64> {
    let st = Store::open(store, OpenMode::ReadOnly)?;
    let d = st.diff("img", "base", "head")?;
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0;
    for (block, hash, loc) in st.live_map("img")? {
        if d.changed.iter().any(|r| r.contains(&block)) && seen.insert(hash) {
            bytes += loc.map(|l| l.stored_len as u64).unwrap_or(0);
        }
    }
    Ok(bytes)
}

/// Cost of one idle catalog round against a node holding `n` images.
pub struct Idle {
    /// Images.
    pub images: usize,
    /// First (full) catalog: ms and UDP bytes both ways.
    pub full: (f64, u64),
    /// An idle round: ms and UDP bytes both ways.
    pub idle: (f64, u64),
}

fn idle_round(work: &Path, n: usize) -> Result<Idle> {
    eprintln!("== idle round over {n} images (loopback)");
    let dir = work.join("idle");
    let _ = fs::remove_dir_all(&dir);
    let (sa, sb) = (dir.join("a"), dir.join("b"));
    Store::init(&sa, &InitOptions::default())?;
    let id_a = syncd_init(&sa)?;
    let id_b = syncd_init(&sb)?;
    {
        let s = Store::open(&sa, OpenMode::ReadWrite)?;
        for i in 0..n {
            s.create_image(&format!("project-{i:05}"), 128 << 30)?;
        }
    }
    let a_addr: SocketAddr = "127.0.0.1:7610".parse()?;
    let _da = start_syncd(
        Command::new(syncd_bin()?),
        &dir,
        "a",
        &sa,
        a_addr,
        "127.0.0.1:9610".parse()?,
        &id_b,
        "127.0.0.1:7611".parse()?,
    )?;
    let me = geosync_syncd::identity::Identity::load(&sb)?;
    let peer = geosync_proto::NodeId::from_hex(&id_a)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let r = rt.block_on(async move {
        use geosync_proto::wire::Message;
        use geosync_syncd::net;
        let ep = net::endpoint("127.0.0.1:0".parse().unwrap(), None)?;
        let conn = net::connect(&ep, &me, peer, a_addr)
            .await
            .map_err(anyhow::Error::msg)?;
        let round = |since: u64| {
            let conn = conn.clone();
            async move {
                let s0 = conn.stats();
                let t = Instant::now();
                let (mut s, mut r) = conn.open_bi().await?;
                net::write_frame(&mut s, &Message::CatalogRequest { since }).await?;
                s.finish()?;
                let mut seq = 0;
                let mut entries = 0;
                while let Some((m, _)) = net::read_frame(&mut r).await? {
                    if let Message::Catalog {
                        seq: q, entries: e, ..
                    } = m
                    {
                        seq = q;
                        entries += e.len();
                    }
                }
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                // Let the ACKs go out before reading the counters.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let s1 = conn.stats();
                let bytes = (s1.udp_tx.bytes - s0.udp_tx.bytes) + (s1.udp_rx.bytes - s0.udp_rx.bytes);
                anyhow::Ok((seq, entries, ms, bytes))
            }
        };
        let (seq, entries, fms, fbytes) = round(0).await?;
        let (_, idle_entries, ims, ibytes) = round(seq).await?;
        if entries != n || idle_entries != 0 {
            bail!("catalog listed {entries} images (want {n}), idle round {idle_entries} (want 0)");
        }
        anyhow::Ok(Idle {
            images: n,
            full: (fms, fbytes),
            idle: (ims, ibytes),
        })
    })?;
    let _ = fs::remove_dir_all(&dir);
    Ok(r)
}

fn print_row(r: &Row) {
    eprintln!(
        "  => geosync {:.2} s / {}; incremental {:.3} s / {}",
        r.geo.secs,
        format_size(r.geo.bytes),
        r.geo_incr.secs,
        format_size(r.geo_incr.bytes)
    );
}

fn report(rows: &[Row], idle: Option<&Idle>, data: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\ngeosync bench sync: sparse ext4 images holding {} of files; times in seconds, bytes on the wire\n",
        format_size(data)
    );
    let _ = writeln!(
        s,
        "| link | image | stored at A | geosync first copy | rsync --sparse | bsdtar pipe | rsync / geosync | geosync / bsdtar | geosync after 1 % | changed (compressed) | wire / changed | rsync --inplace after 1 % | rsync / geosync |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let run = |r: &Option<Run>| {
        r.as_ref()
            .map(|r| format!("{:.2} s, {}", r.secs, format_size(r.bytes)))
            .unwrap_or_else(|| "-".into())
    };
    for r in rows {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.1}x", a / b),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} s, {} | {} | {} | {} | {} | {:.3} s, {} | {} | {:.2}x | {} | {} |",
            r.link,
            format_size(r.size),
            format_size(r.stored),
            r.geo.secs,
            format_size(r.geo.bytes),
            run(&r.rsync),
            run(&r.tar),
            ratio(r.rsync.as_ref().map(|x| x.secs), Some(r.geo.secs)),
            ratio(Some(r.geo.secs), r.tar.as_ref().map(|x| x.secs)),
            r.geo_incr.secs,
            format_size(r.geo_incr.bytes),
            format_size(r.changed),
            r.geo_incr.bytes as f64 / r.changed.max(1) as f64,
            run(&r.rsync_incr),
            ratio(r.rsync_incr.as_ref().map(|x| x.secs), Some(r.geo_incr.secs)),
        );
    }
    // Growth with logical size, per link.
    let mut links: Vec<&str> = rows.iter().map(|r| r.link.as_str()).collect();
    links.dedup();
    for l in links {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.link == l).collect();
        if let (Some(small), Some(big)) = (mine.first(), mine.last()) {
            if big.size > small.size {
                let _ = writeln!(
                    s,
                    "\n{l}: geosync first copy {} vs {}: {:.2}x the time for {}x the logical size",
                    format_size(big.size),
                    format_size(small.size),
                    big.geo.secs / small.geo.secs,
                    big.size / small.size
                );
            }
        }
    }
    if let Some(i) = idle {
        let _ = writeln!(
            s,
            "\nidle round over {} images: {:.1} ms, {} on the wire (the first, full catalog: {:.1} ms, {})",
            i.images,
            i.idle.0,
            format_size(i.idle.1),
            i.full.0,
            format_size(i.full.1)
        );
    }
    s
}

/// `geosync bench pipe-send ADDR -- CMD...`: run CMD, send its stdout to
/// ADDR over TCP; print the bytes sent.
pub fn pipe_send(addr: &str, cmd: &[String]) -> Result<()> {
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", cmd[0]))?;
    let start = Instant::now();
    let mut sock = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(e).context(format!("connecting to {addr}")),
        }
    };
    let n = std::io::copy(child.stdout.as_mut().unwrap(), &mut sock)?;
    drop(sock);
    if !child.wait()?.success() {
        bail!("{} failed", cmd[0]);
    }
    println!("{n}");
    Ok(())
}

/// `geosync bench pipe-recv ADDR -- CMD...`: accept one TCP connection on
/// ADDR and feed it to CMD's stdin.
pub fn pipe_recv(addr: &str, cmd: &[String]) -> Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", cmd[0]))?;
    let (mut sock, _) = l.accept()?;
    std::io::copy(&mut sock, child.stdin.as_mut().unwrap())?;
    drop(child.stdin.take());
    if !child.wait()?.success() {
        bail!("{} failed", cmd[0]);
    }
    Ok(())
}
