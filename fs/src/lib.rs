//! geosync store: disk images as deduplicated, compressed, versioned block maps.
//!
//! # Model
//! A store is a directory: `meta.db` (SQLite, WAL) and `packs/` (append-only
//! pack files, see [`pack`]). An image is an array of fixed-size blocks (the
//! block size is chosen at `init`). A block is named by the BLAKE3 of its raw
//! bytes ([`BlockHash`]) and stored once, zstd-compressed when that pays.
//! **All-zero blocks are holes**: never hashed into the store, never stored.
//!
//! Each image has a version counter bumped by every commit, and a map of rows
//! "block `i` is hash `h` in versions `[born, died)`". The head is the rows
//! with no `died`; a snapshot pins a version; the change between two retained
//! versions is the rows born or died between them, found by index. Rows that
//! neither the head nor a snapshot can see are pruned when they die.
//!
//! # Invariants
//! 1. The metadata never references pack bytes that are not durable: pack
//!    appends are `fdatasync`ed before the SQLite transaction that indexes
//!    them commits (SQLite `synchronous=FULL`).
//! 2. A commit is ONE SQLite transaction: after a crash an image is exactly
//!    some committed version.
//! 3. Every block read is verified against its name.
//! 4. GC never sweeps a block a commit in progress relies on: writers hold
//!    the [`store::Store`] stage gate shared from the first block they seal
//!    (or dedup against) until their commit ends; GC holds it exclusively.
//!
//! # Concurrency
//! Several processes may open a store read-write: SQLite serializes metadata,
//! packs are claimed by the process appending to them, each image has one
//! writer lease at a time, and `gc.lock` extends the stage gate across
//! processes. Inside a process the store is `Send + Sync` and shared by
//! threads. See `ARCHITECTURE.md` for the table of which operations may run
//! together.
#![deny(missing_docs)]

pub mod backend;
pub mod error;
pub mod fuse;
pub mod image;
pub mod io;
mod meta;
pub mod pack;
pub mod proof;
pub mod store;
pub mod vfs;

use std::fmt;

pub use error::{Error, Result};
pub use geosync_proto::{Hlc, NodeId, Stamp};
pub use image::{Flush, FlushTicket, ImageHandle, JobWaiter, SealJob};
pub use pack::Compression;
pub use store::{InitOptions, OpenMode, Store};

/// Name of a block: BLAKE3-256 of its raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockHash(pub [u8; 32]);

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Size the pool that seals blocks (hash, compress, append: rayon's global
/// pool) to `threads`, or to one more than the CPUs when 0: a sealing
/// thread waits on the disk while its records are written, and with one
/// thread per CPU the cores sat idle then (sequential writes through a mount
/// ran ~5 % faster with 3 threads than 2 on 2 cores, medians of 5; random
/// writes the same). Call before anything is sealed; `RAYON_NUM_THREADS` wins. Fails
/// if the pool is already running.
pub fn set_seal_threads(threads: usize) -> std::result::Result<(), String> {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return Ok(());
    }
    let n = match threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()) + 1,
        n => n,
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("geosync-seal-{i}"))
        .build_global()
        .map_err(|e| e.to_string())
}

/// What a caught panic said.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Check an image or snapshot name: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |why| {
        Err(Error::InvalidName {
            name: name.to_string(),
            why,
        })
    };
    let bytes = name.as_bytes();
    match bytes.first() {
        None => return bad("it is empty"),
        Some(c) if !c.is_ascii_alphanumeric() => return bad("it must start with a letter or digit"),
        _ => {}
    }
    if bytes.len() > 128 {
        return bad("it is longer than 128 bytes");
    }
    if let Some(c) = bytes
        .iter()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-')))
    {
        return if *c == b'/' {
            bad("it contains '/'")
        } else if c.is_ascii_control() {
            bad("it contains a control character")
        } else {
            bad("it contains a character outside the allowed set")
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "Proj-1.img", "0_x", &"a".repeat(128)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "a\nb",
            "é",
            &"a".repeat(129),
            "-x",
        ] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
    }
}
