//! `geosync mount` / `geosync umount`: run the FUSE filesystem in the
//! foreground (clean unmount on SIGINT/SIGTERM) or as a daemon.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use geosync_fs::vfs::{Vfs, VfsConfig};
use geosync_fs::{OpenMode, Store};
use tracing::{error, info, warn};

/// Options of `geosync mount`.
#[derive(clap::Args, Debug, Clone)]
pub struct MountArgs {
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// Run in the background; logs go to --log.
    #[arg(long)]
    pub daemon: bool,
    /// Log file of --daemon (default: STORE/mount.log).
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Uncommitted bytes of blocks per open image in memory: writes wait
    /// for sealing while half of it is held.
    #[arg(long, default_value = "256M", value_parser = crate::units::parse_size)]
    pub dirty_limit: u64,
    /// Sealed, uncommitted bytes of an open image that are committed as a
    /// version while writing goes on (they hold no memory; fewer, larger
    /// metadata transactions cost less in all).
    #[arg(long, default_value = "1G", value_parser = crate::units::parse_size)]
    pub flush_at: u64,
    /// Commit changes older than this many seconds (0.1 to 86400).
    #[arg(long, default_value_t = 5.0, value_parser = parse_interval)]
    pub commit_interval: f64,
    /// Bytes of decompressed blocks cached for reads.
    #[arg(long, default_value = "128M", value_parser = crate::units::parse_size)]
    pub read_cache: u64,
    /// The read cache grows up to this while the images' dirty blocks leave
    /// part of --dirty-limit unused, and gives it back as they fill it.
    #[arg(long, default_value = "256M", value_parser = crate::units::parse_size)]
    pub read_cache_max: u64,
    /// Threads serving FUSE requests. Most wait on the disk: 8 gave fio's
    /// random 4 KiB reads at queue depth 16 ~15% more IOPS than 4.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Dirty bytes of an open image that start a background seal job
    /// (tests set it tiny to run jobs alongside every write).
    #[arg(long, default_value = "8M", value_parser = crate::units::parse_size, hide = true)]
    pub seal_at: u64,
    /// glibc malloc arenas (0: glibc's default of 8 per core). Each thread
    /// that frees block buffers into its own arena keeps that memory: with
    /// the default, the bench's peak RSS was 518 MiB, with 2 it was 311 MiB
    /// at the same speed. `MALLOC_ARENA_MAX` in the environment wins.
    #[arg(long, default_value_t = 2)]
    pub malloc_arenas: u32,
    /// Threads sealing blocks (hash, compress, append); 0: one more than
    /// the CPUs, so the cores keep busy while a thread waits on the disk.
    /// `RAYON_NUM_THREADS` in the environment wins.
    #[arg(long, default_value_t = 0)]
    pub seal_threads: usize,
}

/// `--commit-interval`: seconds, 0.1 to a day.
fn parse_interval(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.1..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds from 0.1 to 86400")),
    }
}

/// Whether `mnt` is a geosync FUSE mount (from /proc/self/mountinfo).
pub fn is_mounted(mnt: &Path) -> bool {
    let Ok(canon) = mnt.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    mountinfo_has_fuse(&info, &canon)
}

/// Whether a `/proc/self/mountinfo` text lists a FUSE mount at `path`.
fn mountinfo_has_fuse(info: &str, path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-");
        f.get(4)
            .is_some_and(|p| unescape_mountinfo(p) == path.as_os_str().as_bytes())
            && sep
                .and_then(|s| f.get(s + 1))
                .is_some_and(|t| t.starts_with("fuse"))
    })
}

/// A mountinfo path field with its octal escapes (`\040` space, `\011`
/// tab, `\012` newline, `\134` backslash) decoded.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(
                    d.iter()
                        .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')),
                );
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// `geosync mount`.
/// `verbose` (the `-v` count) is passed on to a `--daemon` child, whose
/// log gets at least `info` (mounts, images created and removed, recovery).
pub fn mount(store_dir: &Path, args: MountArgs, verbose: u8) -> Result<()> {
    if !args.mountpoint.is_dir() {
        bail!("mount point {} is not a directory", args.mountpoint.display());
    }
    if is_mounted(&args.mountpoint) {
        bail!("{} is already mounted", args.mountpoint.display());
    }
    if args.daemon {
        return spawn_daemon(store_dir, &args, verbose.max(1));
    }
    if args.malloc_arenas > 0 && std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        cap_malloc_arenas(args.malloc_arenas);
    }
    if let Err(e) = geosync_fs::set_seal_threads(args.seal_threads) {
        tracing::warn!(error = %e, "could not size the sealing pool; it keeps its size");
    }
    let store = Store::open(store_dir, OpenMode::ReadWrite)?;
    store.set_read_cache(args.read_cache as usize);
    // The cache grows past --read-cache, up to --read-cache-max, into what
    // the dirty limit leaves over: memory stays within the two limits'
    // sum, as without it.
    let lend = args
        .read_cache_max
        .saturating_sub(args.read_cache)
        .min(args.dirty_limit);
    store.lend_to_read_cache(lend as usize);
    store.defer_checkpoints()?;
    {
        let store = store.clone();
        // Failures are logged (rate-limited) and counted by the store.
        std::thread::spawn(move || loop {
            std::thread::sleep(geosync_fs::store::CHECKPOINT_INTERVAL);
            let _ = store.checkpoint();
        });
    }
    let vfs = Arc::new(Vfs::new(
        store,
        VfsConfig {
            dirty_limit: args.dirty_limit as usize,
            flush_at: args.flush_at as usize,
            commit_interval: Duration::from_secs_f64(args.commit_interval),
            seal_at: args.seal_at as usize,
            ..VfsConfig::default()
        },
    ));
    let (tx, rx) = mpsc::channel::<&'static str>();
    {
        let tx = tx.clone();
        // SIGHUP too: a foreground mount whose terminal goes away was
        // killed by it, leaving a dead mount point and uncommitted writes.
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
            .context("installing signal handlers")?;
        std::thread::spawn(move || {
            for _ in signals.forever() {
                let _ = tx.send("signal");
            }
        });
    }
    let session = {
        let (vfs, mnt, tx) = (vfs.clone(), args.mountpoint.clone(), tx.clone());
        let cfg = geosync_fs::fuse::mount_config(args.threads);
        std::thread::spawn(move || {
            let r = fuser::mount(geosync_fs::fuse::Fuse::new(vfs), &mnt, &cfg);
            if let Err(e) = &r {
                error!(error = %e, "FUSE session ended with an error");
            }
            let _ = tx.send("unmounted");
            r
        })
    };
    {
        let vfs = vfs.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            vfs.commit_due();
            give_back_free_memory();
        });
    }
    // Wait for the mount to appear, then serve until unmounted or signalled.
    let start = Instant::now();
    while !is_mounted(&args.mountpoint) {
        if session.is_finished() {
            let r = session.join().unwrap();
            bail!(
                "mount failed: {}",
                r.err()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "unmounted".into())
            );
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("mount did not appear within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    info!(mountpoint = %args.mountpoint.display(), "mounted");
    eprintln!(
        "geosync: mounted {} on {}",
        store_dir.display(),
        args.mountpoint.display()
    );
    while let Ok("signal") = rx.recv() {
        info!("signal received: committing and unmounting");
        if let Err(e) = vfs.commit_all() {
            error!(error = %e, "commit before unmount failed");
        }
        if let Err(e) = unmount(&args.mountpoint) {
            warn!(error = %e, "cannot unmount yet; still serving");
            eprintln!("geosync: {e:#}; still serving (signal again after detaching)");
        }
    }
    vfs.shutdown();
    // A session that ended in an error is the mount's error (exit 1), even
    // though the images were committed above.
    match session.join() {
        Ok(Ok(())) => {
            eprintln!("geosync: unmounted {}", args.mountpoint.display());
            Ok(())
        }
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("the FUSE session ended with an error")),
        Err(_) => bail!("the FUSE session panicked"),
    }
}

/// Return the allocator's free pages to the kernel. Blocks of 64 KiB churn
/// through the heap (dirty sets, the read cache, seal records) and glibc keeps
/// what was freed in the middle of its heaps, so the RSS stayed at the peak of
/// whichever phase used most.
#[allow(unsafe_code)]
fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases the allocator's own free pages
    // (madvise) under its own locks; it touches no memory of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Cap glibc's malloc arenas at `n`, before the mount's threads start (an
/// arena, once made, stays). Without it a thread-heavy daemon that allocates
/// and frees 64 KiB-1 MiB buffers on every thread keeps up to 8 arenas per
/// core of freed but unreturned memory.
#[allow(unsafe_code)]
fn cap_malloc_arenas(n: u32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let n = i32::try_from(n).unwrap_or(i32::MAX);
        // SAFETY: mallopt sets one allocator parameter and touches no memory
        // of ours; glibc takes its own lock for it.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, n) } != 1 {
            warn!(arenas = n, "mallopt(M_ARENA_MAX) refused; glibc's default stays");
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = n;
}

fn spawn_daemon(store_dir: &Path, args: &MountArgs, verbose: u8) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let log_path = args.log.clone().unwrap_or_else(|| store_dir.join("mount.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening log {}", log_path.display()))?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg(format!("-{}", "v".repeat(verbose.into())))
        .arg("--store")
        .arg(store_dir)
        .arg("mount")
        .arg(&args.mountpoint)
        .args(["--dirty-limit", &args.dirty_limit.to_string()])
        .args(["--flush-at", &args.flush_at.to_string()])
        .args(["--commit-interval", &args.commit_interval.to_string()])
        .args(["--read-cache", &args.read_cache.to_string()])
        .args(["--read-cache-max", &args.read_cache_max.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .args(["--seal-at", &args.seal_at.to_string()])
        .args(["--malloc-arenas", &args.malloc_arenas.to_string()])
        .args(["--seal-threads", &args.seal_threads.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the mount daemon")?;
    // Long enough for a store that is busy (its open waits up to 30 s for the
    // database) or recovering after a crash.
    const LIMIT: Duration = Duration::from_secs(60);
    let start = Instant::now();
    while start.elapsed() < LIMIT {
        if is_mounted(&args.mountpoint) {
            println!(
                "mounted on {} (daemon pid {}, log {})",
                args.mountpoint.display(),
                child.id(),
                log_path.display()
            );
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            bail!(
                "the mount daemon exited ({st}): {}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Not up in time: stop it as a signal stops a mount (if it got as far as
    // mounting, it commits and unmounts: no dead mount point), and kill it
    // only if it does not go.
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let stopping = Instant::now();
    while stopping.elapsed() < Duration::from_secs(10) && child.try_wait()?.is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    bail!(
        "the mount did not appear within {} s (see {})",
        LIMIT.as_secs(),
        log_path.display()
    )
}

/// Unmount a geosync mount.
pub fn unmount(mnt: &Path) -> Result<()> {
    if !is_mounted(mnt) {
        bail!("{} is not mounted", mnt.display());
    }
    let r = rustix::mount::unmount(mnt, rustix::mount::UnmountFlags::empty());
    match r {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::BUSY) => bail!(
            "{} is busy: unmount the filesystems and detach the loop devices (losetup -d) using its images first",
            mnt.display()
        ),
        Err(rustix::io::Errno::PERM) => {
            let st = Command::new("fusermount3").arg("-u").arg(mnt).status();
            match st {
                Ok(s) if s.success() => Ok(()),
                _ => bail!("cannot unmount {}: permission denied (try as root)", mnt.display()),
            }
        }
        Err(e) => bail!("cannot unmount {}: {e}", mnt.display()),
    }
}

/// `geosync umount`: unmount and wait for the daemon to finish committing.
pub fn umount_cmd(mnt: &Path) -> Result<()> {
    unmount(mnt)?;
    println!("unmounted {}", mnt.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_with_spaces_are_found_in_mountinfo() {
        let info = "36 35 0:47 / /mnt/vm\\040images rw,nosuid,nodev - fuse.geosync geosync rw\n\
                    37 35 0:48 / /mnt/a\\134b rw - ext4 /dev/vdb rw\n";
        assert!(mountinfo_has_fuse(info, Path::new("/mnt/vm images")));
        assert!(!mountinfo_has_fuse(info, Path::new("/mnt/vm\\040images")));
        assert!(!mountinfo_has_fuse(info, Path::new("/mnt/a\\b")), "not FUSE");
        assert_eq!(unescape_mountinfo("/a\\011b\\134c\\9"), b"/a\tb\\c\\9");
    }

    #[test]
    fn commit_intervals_out_of_range_are_refused() {
        assert_eq!(parse_interval("5").unwrap(), 5.0);
        for bad in ["inf", "1e20", "NaN", "0", "-1", "0.05", "x"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
