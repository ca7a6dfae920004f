//! The benchmark harness: builds real ext4 images and times geosync against
//! the tools it replaces, in one run, printing ratios (never asserting them).
//!
//! `geosync bench import` — import of a sparse ext4 image holding real files
//! vs `cp --sparse=always` of the same file (both from a cold page cache when
//! run as root).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use geosync_fs::{InitOptions, Store};

use crate::units::{format_size, parse_size};

/// `geosync bench ...`
#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Import of a sparse ext4 image vs `cp --sparse=always`.
    Import {
        /// Logical size of the image.
        #[arg(long, default_value = "16G", value_parser = parse_size)]
        size: u64,
        /// Real file data to put in it (copied from --source).
        #[arg(long, default_value = "1.5G", value_parser = parse_size)]
        data: u64,
        /// Where the files come from.
        #[arg(long, default_value = "/usr")]
        source: PathBuf,
        /// Scratch directory (default: a temporary directory under /var/tmp).
        #[arg(long)]
        workdir: Option<PathBuf>,
    },
    /// fio on ext4 loop-mounted through geosync vs on a plain sparse file (needs root, fio).
    Fuse(FuseBenchArgs),
    /// Replication by two syncd vs an rsync daemon and a bsdtar pipe, over
    /// loopback and a tc tbf link (needs root, rsync, bsdtar).
    Sync(crate::sync_bench::SyncBenchArgs),
    /// (used by `bench sync`) Run a command and send its stdout over TCP.
    #[command(hide = true)]
    PipeSend {
        /// Address to connect to.
        addr: String,
        /// The command.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// (used by `bench sync`) Accept one TCP connection into a command's stdin.
    #[command(hide = true)]
    PipeRecv {
        /// Address to listen on.
        addr: String,
        /// The command.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

/// `geosync bench fuse` options.
#[derive(clap::Args, Debug)]
pub struct FuseBenchArgs {
    /// Logical size of the image (and of the plain-file baseline).
    #[arg(long, default_value = "16G", value_parser = parse_size)]
    pub size: u64,
    /// Bytes each sequential job moves.
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub seq: u64,
    /// Seconds each random job runs.
    #[arg(long, default_value_t = 15)]
    pub runtime: u64,
    /// Block size of the geosync store.
    #[arg(long, default_value = "64K")]
    pub block_size: String,
    /// Runs of each job on each side (the medians are compared).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Scratch directory (default: a temporary directory under /var/tmp).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

/// Run a bench subcommand.
pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Import {
            size,
            data,
            source,
            workdir,
        } => {
            let tmp;
            let work = match workdir {
                Some(w) => w,
                None => {
                    tmp = tempfile::Builder::new()
                        .prefix("geosync-bench")
                        .tempdir_in("/var/tmp")?;
                    tmp.path().to_path_buf()
                }
            };
            let r = import_bench(&work, size, data, &source)?;
            r.print();
            Ok(())
        }
        BenchCmd::Fuse(args) => crate::fuse_bench::run(args),
        BenchCmd::Sync(args) => crate::sync_bench::run(args),
        BenchCmd::PipeSend { addr, cmd } => crate::sync_bench::pipe_send(&addr, &cmd),
        BenchCmd::PipeRecv { addr, cmd } => crate::sync_bench::pipe_recv(&addr, &cmd),
    }
}

/// Copy regular files from `sources` into `dest` until about `target` bytes.
/// Returns the bytes copied.
pub fn stage_files(dest: &Path, sources: &Path, target: u64) -> Result<u64> {
    fs::create_dir_all(dest)?;
    let mut copied = 0u64;
    let mut stack = vec![sources.to_path_buf()];
    let mut n = 0u64;
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            if copied >= target {
                return Ok(copied);
            }
            let Ok(ft) = e.file_type() else { continue };
            let p = e.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                if len == 0 || len > 256 << 20 {
                    continue;
                }
                n += 1;
                let sub = dest.join(format!("d{:03}", n % 512));
                fs::create_dir_all(&sub)?;
                let to = sub.join(format!("{n}-{}", e.file_name().to_string_lossy()));
                if fs::copy(&p, &to).is_ok() {
                    copied += len;
                }
            }
        }
    }
    Ok(copied)
}

/// Build a sparse ext4 image of `size` at `img` holding ~`data` bytes of
/// real files from `source` (`mkfs.ext4 -d`, no root needed).
pub fn build_ext4_image(img: &Path, size: u64, data: u64, source: &Path, staging: &Path) -> Result<u64> {
    let copied = stage_files(staging, source, data)?;
    let f = fs::File::create(img)?;
    f.set_len(size)?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", "-d"])
        .arg(staging)
        .arg(img)
        .output()
        .context("running mkfs.ext4 (install e2fsprogs)")?;
    if !out.status.success() {
        bail!("mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(copied)
}

/// Bytes a file really occupies (`du`).
pub fn du_bytes(p: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(p)?.blocks() * 512)
}

/// Flush and drop the page cache (root only); false if not allowed.
pub fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Results of the import benchmark.
#[derive(Debug)]
pub struct ImportBench {
    /// Logical size.
    pub size: u64,
    /// File bytes put in the image.
    pub files: u64,
    /// `du` of the source image.
    pub source_du: u64,
    /// Seconds for `cp --sparse=always`.
    pub cp_secs: f64,
    /// Seconds for `geosync import`.
    pub import_secs: f64,
    /// Compressed bytes geosync stored.
    pub stored: u64,
    /// Pack bytes on disk.
    pub pack_bytes: u64,
    /// Whether caches were dropped before each run.
    pub cold: bool,
}

impl ImportBench {
    /// Print the table and ratios.
    pub fn print(&self) {
        println!(
            "import of a {} sparse ext4 image holding {} of real files (source du {}), {} cache",
            format_size(self.size),
            format_size(self.files),
            format_size(self.source_du),
            if self.cold { "cold" } else { "warm" }
        );
        println!("  {:<24} {:>8.2} s", "cp --sparse=always", self.cp_secs);
        println!(
            "  {:<24} {:>8.2} s   {:.2}x the time of cp   {:.0} MB/s of source du",
            "geosync import",
            self.import_secs,
            self.import_secs / self.cp_secs,
            self.source_du as f64 / self.import_secs / 1e6
        );
        println!(
            "  stored {} (packs {}) = {:.2}x the source's du",
            format_size(self.stored),
            format_size(self.pack_bytes),
            self.pack_bytes as f64 / self.source_du as f64
        );
        println!(
            "RESULT import_vs_cp_ratio={:.3} stored_vs_du_ratio={:.3}",
            self.import_secs / self.cp_secs,
            self.pack_bytes as f64 / self.source_du as f64
        );
    }
}

/// Build the image in `work`, then time `cp --sparse=always` and `geosync
/// import` of it in the same run.
pub fn import_bench(work: &Path, size: u64, data: u64, source: &Path) -> Result<ImportBench> {
    fs::create_dir_all(work)?;
    let img = work.join("source.img");
    eprintln!(
        "building a {} ext4 image with {} of files from {} ...",
        format_size(size),
        format_size(data),
        source.display()
    );
    let files = build_ext4_image(&img, size, data, source, &work.join("staging"))?;
    let _ = fs::remove_dir_all(work.join("staging"));
    let source_du = du_bytes(&img)?;

    let cold = drop_caches();
    let copy = work.join("copy.img");
    let t = Instant::now();
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&img)
        .arg(&copy)
        .status()?;
    let _ = Command::new("sync").arg(&copy).status();
    let cp_secs = t.elapsed().as_secs_f64();
    if !st.success() {
        bail!("cp failed");
    }
    fs::remove_file(&copy)?;

    drop_caches();
    let store_dir = work.join("store");
    let store = Store::init(&store_dir, &InitOptions::default())?;
    let t = Instant::now();
    geosync_fs::io::import(&store, "bench", &img, &|_| {})?;
    let import_secs = t.elapsed().as_secs_f64();
    let stats = store.stats()?;
    Ok(ImportBench {
        size,
        files,
        source_du,
        cp_secs,
        import_secs,
        stored: stats.stored,
        pack_bytes: stats.pack_bytes,
        cold,
    })
}
