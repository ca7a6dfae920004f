//! The `geosync` command line. Parsing (clap) and presentation live here;
//! every operation is a call into `geosync_fs`.
//!
//! Exit status: 0 success, 1 error, 3 `scrub`/`repair` found damage that
//! remains.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use geosync_fs::io::{export, import, ExportTarget};
use geosync_fs::store::maint::Damage;
use geosync_fs::{Compression, InitOptions, OpenMode, Stamp, Store};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::units::{format_size, parse_size};

/// geosync: disk images as deduplicated, compressed, versioned block maps.
#[derive(Parser, Debug)]
#[command(name = "geosync", version, about, long_about = None)]
pub struct Cli {
    /// Store directory.
    #[arg(long, global = true, env = "GEOSYNC_STORE", default_value = "./data")]
    pub store: PathBuf,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a store.
    Init {
        /// Block size (power of two, 4K to 4M).
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        block_size: u64,
        /// Compression of blocks: none, zstd, zstd:LEVEL.
        #[arg(long, default_value = "zstd:3")]
        compression: Compression,
    },
    /// Create an empty (all-hole) image.
    Create {
        /// Image name.
        name: String,
        /// Logical size, e.g. 16G.
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Import a (sparse) file as an image; onto an existing image, commit a new version.
    Import {
        /// Image name.
        name: String,
        /// Source file (only its data extents are read).
        file: PathBuf,
    },
    /// Export an image to a sparse file, or `-` for stdout.
    Export {
        /// Image name.
        name: String,
        /// Destination file, or `-`.
        file: String,
    },
    /// List images.
    Ls {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show one image: sizes, version, stamp, snapshots.
    Info {
        /// Image name.
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Store-wide usage: logical, referenced, stored; compression and dedup ratios.
    Stat {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Create, list or delete snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Make an image's head equal to a snapshot (as a new version).
    Rollback {
        /// Image name.
        name: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// A new image sharing all blocks of SRC (or SRC@SNAPSHOT); instant.
    Clone {
        /// Source image, optionally `@snapshot`.
        src: String,
        /// New image name.
        new: String,
    },
    /// Remove an image and its snapshots (space returns with `gc`).
    Rm {
        /// Image name.
        name: String,
    },
    /// Rename an image.
    Mv {
        /// Current name.
        old: String,
        /// New name.
        new: String,
    },
    /// Grow or shrink an image; instant.
    Resize {
        /// Image name.
        name: String,
        /// New logical size, e.g. 32G.
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Changed block ranges between two versions: `head`, `@N`, or a snapshot name.
    Diff {
        /// Image name.
        name: String,
        /// Older version.
        from: String,
        /// Newer version.
        to: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Free blocks no image or snapshot uses; compact mostly-dead packs.
    Gc {
        /// Show the plan, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Verify every stored block; exit 3 if anything is damaged.
    Scrub {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Repair the store.
    Repair {
        /// Rebuild the block index from the packs.
        #[arg(long, required = true)]
        reindex: bool,
    },
    /// Serve the store's images as files over FUSE (foreground unless --daemon).
    Mount(crate::mount::MountArgs),
    /// Unmount a geosync mount (the daemon commits and exits).
    Umount {
        /// Mount point.
        mountpoint: PathBuf,
    },
    /// Set or clear an image's quota on referenced bytes.
    #[command(subcommand)]
    Quota(QuotaCmd),
    /// Move an image to a peer site: a forced transfer through the local
    /// `syncd` (with progress), after which the peer is the image's home.
    Move {
        /// Image name.
        name: String,
        /// Node id of the destination peer.
        #[arg(long)]
        to: String,
        /// syncd's control socket (default STORE/syncd/control.sock).
        #[arg(long)]
        control: Option<PathBuf>,
    },
    /// A UDP relay that drops, duplicates, reorders and delays datagrams
    /// (seeded): put it between two syncd to test a bad WAN.
    Relay {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Where to forward.
        #[arg(long)]
        to: std::net::SocketAddr,
        /// Drop probability.
        #[arg(long, default_value_t = 0.0)]
        drop: f64,
        /// Duplicate probability.
        #[arg(long, default_value_t = 0.0)]
        dup: f64,
        /// Reorder probability.
        #[arg(long, default_value_t = 0.0)]
        reorder: f64,
        /// One-way delay, e.g. 20ms.
        #[arg(long, default_value = "0ms")]
        delay: humantime::Duration,
        /// Random extra delay, up to this.
        #[arg(long, default_value = "0ms")]
        jitter: humantime::Duration,
        /// RNG seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Replication state, from the local `syncd`.
    #[command(subcommand)]
    Sync(SyncCmd),
    /// Benchmarks (see `geosync bench --help`).
    #[command(subcommand)]
    Bench(crate::bench::BenchCmd),
}

/// `geosync sync ...`
#[derive(Subcommand, Debug)]
pub enum SyncCmd {
    /// Per image and peer: in sync or behind, last transfer, next allowed time.
    Status {
        /// syncd's control socket (default STORE/syncd/control.sock).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `geosync snapshot ...`
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Pin the image's current version.
    Create {
        /// Image name.
        name: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// List an image's snapshots.
    List {
        /// Image name.
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot.
    Delete {
        /// Image name.
        name: String,
        /// Snapshot name.
        snapshot: String,
    },
}

/// `geosync quota ...`
#[derive(Subcommand, Debug)]
pub enum QuotaCmd {
    /// Set a quota (`none` clears it).
    Set {
        /// Image name.
        name: String,
        /// Quota, e.g. 10G, or `none`.
        size: String,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("geosync: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    // fuser logs unimplemented optional ops (xattrs, ioctls) as warnings: keep them at debug.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},fuser=error")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

fn open(dir: &Path, mode: OpenMode) -> Result<Store> {
    Ok(Store::open(dir, mode)?)
}

/// A byte progress bar on stderr, hidden when stderr is not a terminal.
pub fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap()
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn fmt_stamp(s: &Stamp) -> String {
    format!("{} ({})", s, fmt_time(s.hlc.wall_ms))
}

fn stamp_json(s: &Stamp) -> serde_json::Value {
    json!({"wall_ms": s.hlc.wall_ms, "counter": s.hlc.counter, "origin": s.origin.to_string()})
}

fn damage_json(d: &Damage) -> serde_json::Value {
    json!({
        "block": format!("{:?}", d.hash),
        "pack": d.location.map(|l| l.0),
        "offset": d.location.map(|l| l.1),
        "problem": d.what,
        "users": d.users.iter().map(|(i, b, head)| json!({"image": i, "block": b, "head": head})).collect::<Vec<_>>(),
    })
}

fn print_damage(d: &Damage) {
    let at = d
        .location
        .map(|(p, o)| format!(" (pack {p}, offset {o})"))
        .unwrap_or_default();
    println!("DAMAGED block {}{at}: {}", d.hash, d.what);
    for (image, block, head) in d.users.iter().take(20) {
        println!(
            "    used by image {image} block {block}{}",
            if *head { "" } else { " (snapshot only)" }
        );
    }
    if d.users.len() > 20 {
        println!("    ... and {} more uses", d.users.len() - 20);
    }
}

/// Run one parsed command.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let dir = cli.store.as_path();
    let verbose = cli.verbose;
    match cli.command {
        Command::Init {
            block_size,
            compression,
        } => {
            let bs = u32::try_from(block_size).context("block size too large")?;
            let s = Store::init(
                dir,
                &InitOptions {
                    block_size: bs,
                    compression,
                },
            )?;
            println!(
                "initialized store at {} (block size {}, compression {}, node {})",
                dir.display(),
                format_size(bs as u64),
                compression,
                s.config().node_id
            );
        }
        Command::Create { name, size } => {
            open(dir, OpenMode::ReadWrite)?.create_image(&name, size)?;
            println!("created image {name} ({})", format_size(size));
        }
        Command::Import { name, file } => {
            let store = open(dir, OpenMode::ReadWrite)?;
            let f = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
            let data: u64 = geosync_fs::io::file_data_extents(&f)?
                .iter()
                .map(|(s, e)| e - s)
                .sum();
            let pb = progress_bar(data, &format!("importing {name}"));
            let t = std::time::Instant::now();
            let r = import(&store, &name, &file, &|n| pb.inc(n))?;
            pb.finish_and_clear();
            let info = store.image_info(&name)?;
            println!(
                "{} {name} version {}: {} logical, {} data read in {:.2}s, {} referenced, {} stored{}",
                if r.created { "imported" } else { "updated" },
                r.commit.version,
                format_size(r.size),
                format_size(r.data_read),
                t.elapsed().as_secs_f64(),
                format_size(info.referenced),
                format_size(info.stored),
                if r.commit.changed || r.created {
                    ""
                } else {
                    " (unchanged)"
                }
            );
        }
        Command::Export { name, file } => {
            let store = open(dir, OpenMode::ReadOnly)?;
            let info = store.image_info(&name)?;
            let pb = progress_bar(info.referenced, &format!("exporting {name}"));
            if file == "-" {
                let stdout = std::io::stdout();
                let mut lock = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
                export(&store, &name, ExportTarget::Stream(&mut lock), &|n| pb.inc(n))?;
                pb.finish_and_clear();
            } else {
                export(&store, &name, ExportTarget::File(Path::new(&file)), &|n| {
                    pb.inc(n)
                })?;
                pb.finish_and_clear();
                println!(
                    "exported {name} version {} to {file} ({})",
                    info.version,
                    format_size(info.size)
                );
            }
        }
        Command::Ls { json } => {
            let store = open(dir, OpenMode::ReadOnly)?;
            let images = store.list_images()?;
            if json {
                let v: Vec<_> = images
                    .iter()
                    .map(|i| {
                        json!({"name": i.name, "size": i.size, "referenced": i.referenced, "stored": i.stored,
                               "version": i.version, "stamp": stamp_json(&i.stamp), "snapshots": i.snapshots.len(),
                               "quota": i.quota})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<24} {:>11} {:>11} {:>11} {:>8} {:>5}",
                    "NAME", "SIZE", "REFERENCED", "STORED", "VERSION", "SNAPS"
                );
                for i in images {
                    println!(
                        "{:<24} {:>11} {:>11} {:>11} {:>8} {:>5}",
                        i.name,
                        format_size(i.size),
                        format_size(i.referenced),
                        format_size(i.stored),
                        i.version,
                        i.snapshots.len()
                    );
                }
            }
        }
        Command::Info { name, json } => {
            let i = open(dir, OpenMode::ReadOnly)?.image_info(&name)?;
            if json {
                let snaps: Vec<_> = i
                    .snapshots
                    .iter()
                    .map(|s| json!({"name": s.name, "version": s.version, "size": s.size, "stamp": stamp_json(&s.stamp), "created_ms": s.created_ms}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "name": i.name, "size": i.size, "referenced": i.referenced, "stored": i.stored,
                        "version": i.version, "stamp": stamp_json(&i.stamp), "quota": i.quota,
                        "created_ms": i.created_ms, "snapshots": snaps,
                    }))?
                );
            } else {
                println!("image:      {}", i.name);
                println!("logical:    {} ({} bytes)", format_size(i.size), i.size);
                println!("referenced: {}", format_size(i.referenced));
                println!(
                    "stored:     {} (compressed; blocks shared with other images counted in full)",
                    format_size(i.stored)
                );
                println!("version:    {}", i.version);
                println!("stamp:      {}", fmt_stamp(&i.stamp));
                println!(
                    "quota:      {}",
                    i.quota.map(format_size).unwrap_or_else(|| "none".into())
                );
                println!("created:    {}", fmt_time(i.created_ms));
                println!("snapshots:  {}", i.snapshots.len());
                for s in &i.snapshots {
                    println!(
                        "  {:<20} version {:<6} {:>11}  {}",
                        s.name,
                        s.version,
                        format_size(s.size),
                        fmt_time(s.created_ms)
                    );
                }
            }
        }
        Command::Stat { json } => {
            let s = open(dir, OpenMode::ReadOnly)?.stats()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "images": s.images, "snapshots": s.snapshots, "logical": s.logical,
                        "referenced": s.referenced, "unique": s.unique,
                        "unique_with_snapshots": s.unique_with_snapshots, "stored": s.stored,
                        "pack_bytes": s.pack_bytes, "indexed_blocks": s.indexed_blocks,
                        "compress_ratio": s.compress_ratio, "dedup_ratio": s.dedup_ratio,
                    }))?
                );
            } else {
                println!("images:         {} ({} snapshots)", s.images, s.snapshots);
                println!("logical:        {}", format_size(s.logical));
                println!(
                    "referenced:     {}   (non-hole bytes of all images)",
                    format_size(s.referenced)
                );
                println!(
                    "unique:         {}   (after dedup, before compression)",
                    format_size(s.unique)
                );
                println!(
                    "stored:         {}   (compressed, incl. snapshot-only blocks)",
                    format_size(s.stored)
                );
                println!(
                    "on disk:        {}   (pack files, incl. garbage awaiting gc)",
                    format_size(s.pack_bytes)
                );
                println!("compressratio:  {:.2}x", s.compress_ratio);
                println!("dedupratio:     {:.2}x", s.dedup_ratio);
            }
        }
        Command::Snapshot(cmd) => match cmd {
            SnapshotCmd::Create { name, snapshot } => {
                let s = open(dir, OpenMode::ReadWrite)?.create_snapshot(&name, &snapshot)?;
                println!("snapshot {name}@{snapshot} pins version {}", s.version);
            }
            SnapshotCmd::List { name, json } => {
                let snaps = open(dir, OpenMode::ReadOnly)?.list_snapshots(&name)?;
                if json {
                    let v: Vec<_> = snaps
                        .iter()
                        .map(|s| json!({"name": s.name, "version": s.version, "size": s.size, "stamp": stamp_json(&s.stamp), "created_ms": s.created_ms}))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!("{:<24} {:>8} {:>11}  CREATED", "SNAPSHOT", "VERSION", "SIZE");
                    for s in snaps {
                        println!(
                            "{:<24} {:>8} {:>11}  {}",
                            s.name,
                            s.version,
                            format_size(s.size),
                            fmt_time(s.created_ms)
                        );
                    }
                }
            }
            SnapshotCmd::Delete { name, snapshot } => {
                open(dir, OpenMode::ReadWrite)?.delete_snapshot(&name, &snapshot)?;
                println!("deleted snapshot {name}@{snapshot}");
            }
        },
        Command::Rollback { name, snapshot } => {
            let v = open(dir, OpenMode::ReadWrite)?.rollback(&name, &snapshot)?;
            println!("rolled {name} back to {snapshot}: now version {v}");
        }
        Command::Clone { src, new } => {
            let (image, snap) = match src.split_once('@') {
                Some((i, s)) => (i.to_string(), Some(s.to_string())),
                None => (src.clone(), None),
            };
            open(dir, OpenMode::ReadWrite)?.clone_image(&image, snap.as_deref(), &new)?;
            println!("cloned {src} to {new}");
        }
        Command::Rm { name } => {
            open(dir, OpenMode::ReadWrite)?.remove_image(&name)?;
            println!("removed {name} (run `geosync gc` to free its blocks)");
        }
        Command::Mv { old, new } => {
            open(dir, OpenMode::ReadWrite)?.rename_image(&old, &new)?;
            println!("renamed {old} to {new}");
        }
        Command::Resize { name, size } => {
            let store = open(dir, OpenMode::ReadWrite)?;
            let mut h = store.open_image(&name)?;
            let old = h.size();
            h.set_size(size)?;
            let c = h.commit()?;
            println!(
                "resized {name} from {} to {} (version {})",
                format_size(old),
                format_size(size),
                c.version
            );
        }
        Command::Diff { name, from, to, json } => {
            let store = open(dir, OpenMode::ReadOnly)?;
            let d = store.diff(&name, &from, &to)?;
            let bs = store.block_size();
            let changed: u64 = d.changed.iter().map(|r| r.end - r.start).sum();
            if json {
                let ranges: Vec<_> = d
                    .changed
                    .iter()
                    .map(|r| json!({"offset": r.start * bs, "length": (r.end - r.start) * bs}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "from_version": d.from_version, "to_version": d.to_version,
                        "from_size": d.from_size, "to_size": d.to_size,
                        "block_size": bs, "changed_blocks": changed, "ranges": ranges,
                    }))?
                );
            } else {
                println!(
                    "{name}: version {} -> {}: {} blocks changed ({}), size {} -> {}",
                    d.from_version,
                    d.to_version,
                    changed,
                    format_size(changed * bs),
                    format_size(d.from_size),
                    format_size(d.to_size)
                );
                for r in &d.changed {
                    println!("  {:>14} +{}", r.start * bs, (r.end - r.start) * bs);
                }
            }
        }
        Command::Gc { dry_run } => {
            let store = open(
                dir,
                if dry_run {
                    OpenMode::ReadOnly
                } else {
                    OpenMode::ReadWrite
                },
            )?;
            let pb = progress_bar(0, "compacting packs");
            let p = store.gc_with(
                dry_run,
                &|plan| {
                    if !dry_run {
                        pb.set_length(plan.compact_bytes())
                    }
                },
                &|n| pb.inc(n),
            )?;
            pb.finish_and_clear();
            println!(
                "{}{} unreferenced blocks ({} stored); {} packs to delete, {} to compact; {} reclaimed",
                if dry_run { "plan: " } else { "gc: " },
                p.dead_blocks,
                format_size(p.dead_bytes),
                p.delete_packs.len(),
                p.compact_packs.len(),
                format_size(p.reclaim_bytes)
            );
            for (id, live, len) in &p.compact_packs {
                println!(
                    "  compact pack {id}: {} live of {}",
                    format_size(*live),
                    format_size(*len)
                );
            }
        }
        Command::Scrub { json } => {
            let store = open(dir, OpenMode::ReadOnly)?;
            let total = store.stats()?.pack_bytes;
            let pb = progress_bar(total, "scrubbing");
            let r = store.scrub(&|n| pb.inc(n))?;
            pb.finish_and_clear();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "blocks_checked": r.blocks_checked, "bytes_checked": r.bytes_checked,
                        "damaged": r.damaged.iter().map(damage_json).collect::<Vec<_>>(),
                    }))?
                );
            } else {
                println!(
                    "scrub: {} blocks ({}) verified",
                    r.blocks_checked,
                    format_size(r.bytes_checked)
                );
                for d in &r.damaged {
                    print_damage(d);
                }
                if r.damaged.is_empty() {
                    println!("no damage found");
                } else {
                    println!("{} damaged or missing blocks", r.damaged.len());
                }
            }
            if !r.damaged.is_empty() {
                return Ok(ExitCode::from(3));
            }
        }
        Command::Repair { reindex } => {
            if !reindex {
                bail!("nothing to do: pass --reindex");
            }
            let store = open(dir, OpenMode::ReadWrite)?;
            let total = store.stats()?.pack_bytes;
            let pb = progress_bar(total, "reindexing");
            let r = store.reindex(&|n| pb.inc(n))?;
            pb.finish_and_clear();
            println!(
                "reindex: {} packs, {} intact records ({} duplicates), index {} -> {} blocks",
                r.packs_scanned, r.records_ok, r.duplicates, r.indexed_before, r.indexed_after
            );
            for (p, o, what) in &r.records_damaged {
                println!("  damaged record in pack {p} at offset {o}: {what}");
            }
            for d in &r.missing {
                print_damage(d);
            }
            if !r.missing.is_empty() {
                println!(
                    "{} blocks are still missing: the images above cannot be fully read (restore them from a replica)",
                    r.missing.len()
                );
                return Ok(ExitCode::from(3));
            }
            println!("every referenced block is present and verified");
        }
        Command::Quota(QuotaCmd::Set { name, size }) => {
            let q = if size == "none" {
                None
            } else {
                Some(parse_size(&size).map_err(anyhow::Error::msg)?)
            };
            open(dir, OpenMode::ReadWrite)?.set_quota(&name, q)?;
            println!(
                "quota of {name}: {}",
                q.map(format_size).unwrap_or_else(|| "none".into())
            );
        }
        Command::Mount(args) => crate::mount::mount(dir, args, verbose)?,
        Command::Umount { mountpoint } => crate::mount::umount_cmd(&mountpoint)?,
        Command::Bench(cmd) => return crate::bench::run(cmd).map(|_| ExitCode::SUCCESS),
        Command::Move { name, to, control } => {
            let path = control.unwrap_or_else(|| control_path(dir));
            crate::replication::move_image(&path, &name, &to)?;
        }
        Command::Relay {
            listen,
            to,
            drop,
            dup,
            reorder,
            delay,
            jitter,
            seed,
        } => {
            let r = crate::relay::Relay::start(
                listen,
                to,
                crate::relay::Faults {
                    drop,
                    dup,
                    reorder,
                    delay: delay.into(),
                    jitter: jitter.into(),
                    seed,
                },
            )?;
            eprintln!("relaying {} -> {to} (Ctrl-C stops)", r.addr);
            loop {
                std::thread::sleep(Duration::from_secs(5));
                let c = &r.counts;
                use std::sync::atomic::Ordering::Relaxed;
                eprintln!(
                    "forwarded {} dropped {} duplicated {} reordered {}",
                    c.forwarded.load(Relaxed),
                    c.dropped.load(Relaxed),
                    c.duplicated.load(Relaxed),
                    c.reordered.load(Relaxed)
                );
            }
        }
        Command::Sync(SyncCmd::Status { control, json }) => {
            let path = control.unwrap_or_else(|| control_path(dir));
            crate::replication::status(&path, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn control_path(store: &Path) -> PathBuf {
    geosync_syncd::identity::state_dir(store).join("control.sock")
}
