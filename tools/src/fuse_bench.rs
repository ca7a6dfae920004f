//! `geosync bench fuse`: `fio` on ext4 loop-mounted through a geosync mount
//! against the same `fio` on ext4 loop-mounted from a plain sparse file on the
//! same disk, in one run. Both loop devices use `--direct-io=on` (a buffered
//! loop device would read from the host page cache and flatter the
//! baseline); caches are dropped before each job. Both file systems stay
//! mounted for the whole run, and each job runs on one then the other,
//! `--rounds` times, the order alternating: on a noisy machine the same job
//! varies by 1.5x from run to run, so the ratio is of the medians, and the
//! range is printed. Prints the mount daemon's peak RSS too. Needs root,
//! `fio`, `losetup`, `mkfs.ext4`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::FuseBenchArgs;
use crate::units::format_size;

struct Job {
    name: &'static str,
    args: Vec<String>,
    /// Read (true) or write (false) figures.
    read: bool,
    /// Report IOPS (true) or bandwidth (false).
    iops: bool,
}

fn jobs(a: &FuseBenchArgs) -> Vec<Job> {
    let seq = format!("--size={}", a.seq);
    let rt = format!("--runtime={}", a.runtime);
    let common = ["--ioengine=libaio", "--direct=1", "--filename=fio.data"];
    let mk = |name, read, iops, extra: &[&str]| Job {
        name,
        read,
        iops,
        args: common.iter().chain(extra.iter()).map(|s| s.to_string()).collect(),
    };
    vec![
        mk(
            "seq write 1M",
            false,
            false,
            &["--rw=write", "--bs=1M", "--iodepth=8", &seq, "--end_fsync=1"],
        ),
        mk(
            "seq read 1M",
            true,
            false,
            &["--rw=read", "--bs=1M", "--iodepth=8", &seq],
        ),
        mk(
            "rand write 4K (fsync/32)",
            false,
            true,
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=1",
                "--size=1G",
                "--fsync=32",
                "--time_based",
                &rt,
            ],
        ),
        mk(
            "rand read 4K",
            true,
            true,
            &[
                "--rw=randread",
                "--bs=4k",
                "--iodepth=16",
                "--size=1G",
                "--time_based",
                &rt,
            ],
        ),
    ]
}

fn sh(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

/// An ext4 filesystem on a loop device over `file`, mounted at `at`.
struct Ext4OnLoop {
    dev: String,
    at: PathBuf,
}

impl Ext4OnLoop {
    fn new(file: &Path, at: &Path) -> Result<Self> {
        let dev = sh(Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(file))?
        .trim()
        .to_string();
        let me = Ext4OnLoop { dev, at: at.into() };
        sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "nodiscard"])
            .arg(&me.dev))?;
        fs::create_dir_all(at)?;
        sh(Command::new("mount").arg(&me.dev).arg(at))?;
        Ok(me)
    }
}

impl Drop for Ext4OnLoop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.at).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Run one job in `dir`; returns MB/s or IOPS.
fn run_job(dir: &Path, j: &Job, side: &str) -> Result<f64> {
    drop_caches();
    let json = sh(Command::new("fio")
        .current_dir(dir)
        .args(["--name=bench", "--output-format=json", "--group_reporting"])
        .args(&j.args))?;
    let v: serde_json::Value = serde_json::from_str(&json).context("parsing fio output")?;
    let rw = &v["jobs"][0][if j.read { "read" } else { "write" }];
    let figure = if j.iops {
        rw["iops"].as_f64().unwrap_or(0.0)
    } else {
        rw["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6
    };
    eprintln!(
        "  {:<26} {:<8} {:>10.1} {}",
        j.name,
        side,
        figure,
        if j.iops { "IOPS" } else { "MB/s" }
    );
    Ok(figure)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// Run `geosync bench fuse`.
pub fn run(args: FuseBenchArgs) -> Result<()> {
    let tmp;
    let work = match &args.workdir {
        Some(w) => w.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("geosync-fuse-bench")
                .tempdir_in("/var/tmp")?;
            tmp.path().to_path_buf()
        }
    };
    let jobs = jobs(&args);
    let rounds = args.rounds.max(1);
    let plain_file = work.join("plain.img");
    fs::File::create(&plain_file)?.set_len(args.size)?;
    let plain_fs = Ext4OnLoop::new(&plain_file, &work.join("plain-mnt"))?;

    let store = work.join("store");
    let exe = std::env::current_exe()?;
    sh(Command::new(&exe)
        .arg("--store")
        .arg(&store)
        .args(["init", "--block-size", &args.block_size]))?;
    let mnt = work.join("mnt");
    fs::create_dir_all(&mnt)?;
    let mut daemon: Child = Command::new(&exe)
        .arg("--store")
        .arg(&store)
        .arg("mount")
        .arg(&mnt)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let start = Instant::now();
    while !crate::mount::is_mounted(&mnt) {
        if start.elapsed() > Duration::from_secs(10) {
            let _ = daemon.kill();
            bail!("the mount did not come up");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let img = mnt.join("bench");
    eprintln!(
        "fio on ext4 (loop --direct-io=on): a plain sparse file and a geosync image, {} each, {rounds} rounds",
        format_size(args.size)
    );
    let result = (|| -> Result<Vec<(Vec<f64>, Vec<f64>)>> {
        fs::File::create(&img)?.set_len(args.size)?;
        let geo_fs = Ext4OnLoop::new(&img, &work.join("geo-mnt"))?;
        let mut figures = vec![(Vec::new(), Vec::new()); jobs.len()];
        for round in 0..rounds {
            eprintln!("round {}:", round + 1);
            for (j, (plain, geo)) in jobs.iter().zip(figures.iter_mut()) {
                // Alternate which goes first: drift over a round cancels out.
                if round % 2 == 0 {
                    plain.push(run_job(&plain_fs.at, j, "plain")?);
                    geo.push(run_job(&geo_fs.at, j, "geosync")?);
                } else {
                    geo.push(run_job(&geo_fs.at, j, "geosync")?);
                    plain.push(run_job(&plain_fs.at, j, "plain")?);
                }
            }
        }
        Ok(figures)
    })();
    let rss = peak_rss_kib(daemon.id());
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(daemon.id().to_string())
        .status();
    let _ = daemon.wait();
    drop(plain_fs);
    fs::remove_file(&plain_file)?;
    let figures = result?;

    println!(
        "\nfio on ext4, geosync mount ({} blocks) vs plain sparse file ({} image), median of {rounds}",
        args.block_size,
        format_size(args.size)
    );
    println!(
        "{:<26} {:>12} {:>12} {:>8}   range (plain; geosync)",
        "job", "plain", "geosync", "ratio"
    );
    let mut csv = String::from("job,plain,geosync,ratio,plain_runs,geosync_runs\n");
    for (j, (p, g)) in jobs.iter().zip(&figures) {
        let unit = if j.iops { "IOPS" } else { "MB/s" };
        let (pm, gm) = (median(p), median(g));
        let range = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            format!("{lo:.0}-{hi:.0}")
        };
        println!(
            "{:<26} {:>7.0} {unit} {:>7.0} {unit} {:>7.2}x   {}; {}",
            j.name,
            pm,
            gm,
            gm / pm.max(1e-9),
            range(p),
            range(g)
        );
        let runs = |v: &[f64]| v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(" ");
        csv.push_str(&format!(
            "{},{pm:.1},{gm:.1},{:.3},{},{}\n",
            j.name,
            gm / pm.max(1e-9),
            runs(p),
            runs(g)
        ));
    }
    println!("mount daemon peak RSS: {} MiB", rss / 1024);
    fs::write(work.join("fuse-bench.csv"), csv)?;
    Ok(())
}
