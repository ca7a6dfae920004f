//! Errors of the store layer.
//!
//! Rules for errors in this crate:
//! - One enum, [`Error`]; every variant says what the caller can do about it.
//!   Callers (the CLI, the FUSE adapter, `syncd`) branch on the variant, never
//!   on message text, so "missing" and "corrupt" are never folded together.
//! - Integrity failures name the image and block when known, and the block
//!   hash and pack location always.
//! - I/O errors carry what was being done (`context`); a full disk is its own
//!   variant so the FUSE layer can answer `ENOSPC`.
//! - [`Error::errno`] maps each variant to the errno a filesystem would return.

use std::io;

use crate::BlockHash;

/// Result alias of the store layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An image or snapshot name outside `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
    #[error("invalid name {name:?}: {why} (allowed: a letter or digit, then up to 127 of letters, digits, '.', '_', '-')")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The directory holds no store (no `meta.db`).
    #[error("no geosync store at {0} (create one with `geosync init`)")]
    NoStore(String),
    /// `init` on a directory that already holds a store.
    #[error("a geosync store already exists at {0}")]
    StoreExists(String),
    /// The store was written by another on-disk format version.
    #[error("store format version {found} is not supported by this geosync (supports {supported})")]
    FormatVersion {
        /// Version recorded in the store.
        found: i64,
        /// Version this build reads and writes.
        supported: i64,
    },
    /// No image of that name.
    #[error("no image named {0:?}")]
    NoSuchImage(String),
    /// An image of that name exists already.
    #[error("an image named {0:?} already exists")]
    ImageExists(String),
    /// No snapshot of that name on the image.
    #[error("image {image:?} has no snapshot {snapshot:?}")]
    NoSuchSnapshot {
        /// Image name.
        image: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// A snapshot of that name exists already.
    #[error("image {image:?} already has a snapshot {snapshot:?}")]
    SnapshotExists {
        /// Image name.
        image: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// A version that is neither the head nor pinned by a snapshot: its map
    /// rows may have been pruned.
    #[error("image {image:?} version {version} is not retained (only the head and snapshots are kept)")]
    VersionNotRetained {
        /// Image name.
        image: String,
        /// The version asked for.
        version: u64,
    },
    /// The image changed since this handle was opened (another writer committed).
    #[error(
        "image {image:?} changed underneath (expected version {expected}, found {found}); reopen and retry"
    )]
    Conflict {
        /// Image name.
        image: String,
        /// Version the handle was based on.
        expected: u64,
        /// Version found at commit.
        found: u64,
    },
    /// A block's bytes do not match its name, or its record is damaged.
    #[error("integrity error: {what} (block {hash} in pack {pack} at offset {offset}{})",
        match (image, block) { (Some(i), Some(b)) => format!(", image {i:?} block {b}"), _ => String::new() })]
    Integrity {
        /// What failed to verify.
        what: String,
        /// Name of the block.
        hash: BlockHash,
        /// Pack holding the record.
        pack: u64,
        /// Record offset in the pack.
        offset: u64,
        /// Image being read, when known.
        image: Option<String>,
        /// Block index in that image, when known.
        block: Option<u64>,
    },
    /// A map references a block the index does not have.
    #[error("block {hash} is missing from the store{}",
        match (image, block) { (Some(i), Some(b)) => format!(" (image {i:?} block {b})"), _ => String::new() })]
    MissingBlock {
        /// Name of the block.
        hash: BlockHash,
        /// Image being read, when known.
        image: Option<String>,
        /// Block index in that image, when known.
        block: Option<u64>,
    },
    /// The disk holding the store is full.
    #[error("no space left on the store's disk while {0}")]
    NoSpace(String),
    /// A quota would be exceeded.
    #[error("quota of image {image:?} exceeded ({quota} bytes)")]
    QuotaExceeded {
        /// Image name.
        image: String,
        /// The quota in bytes.
        quota: u64,
    },
    /// The image is open for writing by a live handle (this or another process).
    #[error("image {image:?} is open for writing (pid {pid}); close it first")]
    ImageBusy {
        /// Image name.
        image: String,
        /// Process holding it.
        pid: u32,
    },
    /// A write to something read-only (a snapshot, a read-only store).
    #[error("read-only: {0}")]
    ReadOnly(String),
    /// An operation geosync does not do (a fallocate mode, a directory op).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A bad argument (size, offset, option).
    #[error("{0}")]
    InvalidArgument(String),
    /// An I/O error.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The metadata database failed.
    #[error("metadata database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A background seal or commit of an open image failed after its writes
    /// were acknowledged: the writes made since its last commit were dropped.
    /// Returned by the next `fsync`/`flush`, like a page-cache writeback error.
    #[error(
        "writes to image {image:?} since its last commit were lost: a background commit failed: {cause}"
    )]
    WritesLost {
        /// Image name.
        image: String,
        /// The error the background work met.
        cause: String,
        /// The errno of that error.
        errno: i32,
    },
    /// A replicated version stamped too far ahead of this node's clock: a
    /// clock is wrong. Applying it would move this node's clock forward for
    /// good (every later local commit would lose to it).
    #[error(
        "the version of {image:?} from node {origin} is stamped {ahead_s} s ahead of this node's \
         clock: one of the two clocks is wrong; not applied"
    )]
    ClockAhead {
        /// Image name.
        image: String,
        /// The node that made the version.
        origin: String,
        /// Seconds ahead of this node's clock.
        ahead_s: u64,
    },
    /// A bug: a background task panicked. The work it was doing failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Wrap an I/O error with what was being done; a full disk becomes [`Error::NoSpace`].
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        let context = context.into();
        if source.raw_os_error() == Some(libc::ENOSPC) || source.kind() == io::ErrorKind::StorageFull {
            Error::NoSpace(context)
        } else {
            Error::Io { context, source }
        }
    }

    /// Attach the image name and block index to an integrity or missing-block error.
    pub fn at_block(self, image_name: &str, block_index: u64) -> Error {
        match self {
            Error::Integrity {
                what,
                hash,
                pack,
                offset,
                ..
            } => Error::Integrity {
                what,
                hash,
                pack,
                offset,
                image: Some(image_name.to_string()),
                block: Some(block_index),
            },
            Error::MissingBlock { hash, .. } => Error::MissingBlock {
                hash,
                image: Some(image_name.to_string()),
                block: Some(block_index),
            },
            other => other,
        }
    }

    /// The errno a filesystem should answer for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::InvalidName { .. } | Error::InvalidArgument(_) => libc::EINVAL,
            Error::NoSuchImage(_) | Error::NoSuchSnapshot { .. } | Error::NoStore(_) => libc::ENOENT,
            Error::ImageExists(_) | Error::SnapshotExists { .. } | Error::StoreExists(_) => libc::EEXIST,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::ReadOnly(_) => libc::EROFS,
            Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::QuotaExceeded { .. } => libc::EDQUOT,
            Error::Conflict { .. } | Error::ImageBusy { .. } => libc::EBUSY,
            Error::WritesLost { errno, .. } => *errno,
            _ => libc::EIO,
        }
    }
}
