//! `geosync bench fuse`: `fio` on ext4 loop-mounted through a geosync mount
//! against the same `fio` on ext4 loop-mounted from a plain sparse file on the
//! same disk, in one run. Both loop devices use `--direct-io=on` (a buffered
//! loop device would read from the host page cache and flatter the
//! baseline); caches are dropped before each job. Prints ratios and the
//! mount daemon's peak RSS. Needs root, `fio`, `losetup`, `mkfs.ext4`.

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

/// Run the jobs in `dir`; returns (MB/s or IOPS) per job.
fn run_jobs(dir: &Path, jobs: &[Job]) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for j in jobs {
        drop_caches();
        let json = sh(Command::new("fio")
            .current_dir(dir)
            .args(["--name=bench", "--output-format=json", "--group_reporting"])
            .args(&j.args))?;
        let v: serde_json::Value = serde_json::from_str(&json).context("parsing fio output")?;
        let side = &v["jobs"][0][if j.read { "read" } else { "write" }];
        let figure = if j.iops {
            side["iops"].as_f64().unwrap_or(0.0)
        } else {
            side["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6
        };
        eprintln!(
            "  {:<26} {:>10.1} {}",
            j.name,
            figure,
            if j.iops { "IOPS" } else { "MB/s" }
        );
        out.push(figure);
    }
    Ok(out)
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
    eprintln!(
        "plain sparse file, {} (ext4 on loop --direct-io=on):",
        format_size(args.size)
    );
    let plain_file = work.join("plain.img");
    fs::File::create(&plain_file)?.set_len(args.size)?;
    let plain = {
        let fs = Ext4OnLoop::new(&plain_file, &work.join("plain-mnt"))?;
        run_jobs(&fs.at, &jobs)?
    };
    fs::remove_file(&plain_file)?;

    eprintln!(
        "geosync image, {} (ext4 on loop --direct-io=on over the FUSE mount):",
        format_size(args.size)
    );
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
    let result = (|| -> Result<Vec<f64>> {
        fs::File::create(&img)?.set_len(args.size)?;
        let fs = Ext4OnLoop::new(&img, &work.join("geo-mnt"))?;
        run_jobs(&fs.at, &jobs)
    })();
    let rss = peak_rss_kib(daemon.id());
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(daemon.id().to_string())
        .status();
    let _ = daemon.wait();
    let geo = result?;

    println!(
        "\nfio on ext4, geosync mount ({} blocks) vs plain sparse file ({} image)",
        args.block_size,
        format_size(args.size)
    );
    println!("{:<26} {:>12} {:>12} {:>8}", "job", "plain", "geosync", "ratio");
    let mut csv = String::from("job,plain,geosync,ratio\n");
    for ((j, p), g) in jobs.iter().zip(&plain).zip(&geo) {
        let unit = if j.iops { "IOPS" } else { "MB/s" };
        println!(
            "{:<26} {:>7.0} {unit} {:>7.0} {unit} {:>7.2}x",
            j.name,
            p,
            g,
            g / p.max(1e-9)
        );
        csv.push_str(&format!("{},{p:.1},{g:.1},{:.3}\n", j.name, g / p.max(1e-9)));
    }
    println!("mount daemon peak RSS: {} MiB", rss / 1024);
    fs::write(work.join("fuse-bench.csv"), csv)?;
    Ok(())
}
