//! Import from and export to plain (sparse) files.
//!
//! Import reads only the data extents of the source (SEEK_DATA/SEEK_HOLE), so
//! a 64 GiB file with 1 GiB of data costs about what 1 GiB costs. Importing
//! onto an existing image commits a new version that is exactly the file;
//! unchanged blocks cost nothing new. Export writes a sparse file: holes are
//! never written, and neither are all-zero 4 KiB pages inside blocks, so the
//! copy has the source's hole layout (or a sparser one) at 4 KiB granularity.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;
use rustix::fs::SeekFrom;

use crate::image::CommitInfo;
use crate::pack::is_zero;
use crate::{Error, Result, Store};

/// Bytes read from the source per `write` into the image.
const IMPORT_CHUNK: u64 = 4 << 20;
/// Page size holes are preserved at on export.
const EXPORT_PAGE: usize = 4096;

/// What an import did.
#[derive(Clone, Debug)]
pub struct ImportReport {
    /// Logical size of the image.
    pub size: u64,
    /// Bytes of data extents read from the source.
    pub data_read: u64,
    /// Whether the image was created.
    pub created: bool,
    /// The commit.
    pub commit: CommitInfo,
}

/// Data extents `[start, end)` of an open file, from SEEK_DATA/SEEK_HOLE.
pub fn file_data_extents(f: &File) -> Result<Vec<(u64, u64)>> {
    let size = f
        .metadata()
        .map_err(|e| Error::io("reading source size", e))?
        .len();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(f, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(Error::io("SEEK_DATA on the source", e.into())),
        };
        let end = rustix::fs::seek(f, SeekFrom::Hole(start))
            .map_err(|e| Error::io("SEEK_HOLE on the source", e.into()))?;
        out.push((start, end.min(size)));
        pos = end;
    }
    Ok(out)
}

/// Import `path` as image `name` (created if missing, else a new version).
pub fn import(store: &Store, name: &str, path: &Path, progress: &dyn Fn(u64)) -> Result<ImportReport> {
    crate::validate_name(name)?;
    let f = File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let meta = f
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let size = meta.len();
    let created = !store.image_exists(name)?;
    if created {
        store.create_image(name, size)?;
    }
    let bs = store.block_size();
    let mut h = store.open_image(name)?;
    h.set_size(size)?;
    let extents = file_data_extents(&f)?;
    let mut next_block = 0u64; // blocks below this are done
    let mut data_read = 0u64;
    let mut buf = vec![0u8; IMPORT_CHUNK as usize];
    for (ds, de) in extents {
        let first = (ds / bs).max(next_block);
        let end_block = de.div_ceil(bs);
        if first >= end_block {
            continue;
        }
        if first > next_block {
            h.punch(next_block * bs, (first - next_block) * bs)?;
        }
        let mut pos = first * bs;
        let stop = (end_block * bs).min(size);
        while pos < stop {
            let n = (stop - pos).min(IMPORT_CHUNK) as usize;
            f.read_exact_at(&mut buf[..n], pos)
                .map_err(|e| Error::io(format!("reading {} at {pos}", path.display()), e))?;
            h.write(pos, &buf[..n])?;
            pos += n as u64;
            data_read += n as u64;
            progress(n as u64);
        }
        next_block = end_block;
    }
    if next_block * bs < size {
        h.punch(next_block * bs, size - next_block * bs)?;
    }
    let commit = h.commit()?;
    tracing::info!(
        image = name,
        size,
        data_read,
        version = commit.version,
        "imported"
    );
    Ok(ImportReport {
        size,
        data_read,
        created,
        commit,
    })
}

/// Where an export goes.
pub enum ExportTarget<'a> {
    /// A sparse file (created or truncated).
    File(&'a Path),
    /// A stream (holes are written as zeros).
    Stream(&'a mut dyn Write),
}

/// Export image `name` (its head, or `snapshot`) and return the logical size.
pub fn export(store: &Store, name: &str, target: ExportTarget<'_>, progress: &dyn Fn(u64)) -> Result<u64> {
    // One version: the size and the map must come from the same head, so read
    // the map between two looks at the head and retry if a commit slipped in.
    let (size, map) = {
        let mut tries = 0;
        loop {
            let before = store.resolve_version(name, "head")?;
            let map = store.live_map(name)?;
            if store.resolve_version(name, "head")? == before {
                break (before.1, map);
            }
            tries += 1;
            if tries == 10 {
                return Err(Error::InvalidArgument(format!(
                    "image {name:?} keeps changing during export; try again or export a snapshot"
                )));
            }
        }
    };
    let bs = store.block_size();
    let read =
        |block: u64, hash: &crate::BlockHash, loc: &Option<crate::store::BlockLoc>| -> Result<Vec<u8>> {
            let loc = loc.ok_or(Error::MissingBlock {
                hash: *hash,
                image: Some(name.into()),
                block: Some(block),
            })?;
            match store.read_record(hash, &loc) {
                // GC compacted the pack since we read the map: look the block up again.
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    store.read_block(hash)
                }
                r => r,
            }
            .map_err(|e| e.at_block(name, block))
        };
    match target {
        ExportTarget::File(path) => {
            let f = File::create(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
            f.set_len(size)
                .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
            for batch in map.chunks(64) {
                let blocks: Vec<Result<(u64, Vec<u8>)>> = batch
                    .par_iter()
                    .map(|(b, h, l)| read(*b, h, l).map(|d| (*b, d)))
                    .collect();
                for r in blocks {
                    let (block, data) = r?;
                    let base = block * bs;
                    let len = (data.len() as u64).min(size.saturating_sub(base)) as usize;
                    write_nonzero_pages(&f, base, &data[..len])
                        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
                    progress(len as u64);
                }
            }
            f.sync_all()
                .map_err(|e| Error::io(format!("syncing {}", path.display()), e))?;
        }
        ExportTarget::Stream(w) => {
            let zeros = vec![0u8; bs as usize];
            let mut pos = 0u64;
            let put = |w: &mut dyn Write, buf: &[u8]| -> Result<()> {
                w.write_all(buf)
                    .map_err(|e| Error::io("writing the export stream", e))
            };
            for (block, hash, loc) in &map {
                while pos < block * bs {
                    let n = (block * bs - pos).min(bs) as usize;
                    put(w, &zeros[..n])?;
                    pos += n as u64;
                }
                let data = read(*block, hash, loc)?;
                let len = (data.len() as u64).min(size.saturating_sub(pos)) as usize;
                put(w, &data[..len])?;
                pos += len as u64;
                progress(len as u64);
            }
            while pos < size {
                let n = (size - pos).min(bs) as usize;
                put(w, &zeros[..n])?;
                pos += n as u64;
            }
            w.flush()
                .map_err(|e| Error::io("flushing the export stream", e))?;
        }
    }
    Ok(size)
}

fn write_nonzero_pages(f: &File, base: u64, data: &[u8]) -> std::io::Result<()> {
    let mut i = 0;
    while i < data.len() {
        let page_end = (i + EXPORT_PAGE).min(data.len());
        if is_zero(&data[i..page_end]) {
            i = page_end;
            continue;
        }
        // Extend the run over following non-zero pages.
        let start = i;
        let mut end = page_end;
        while end < data.len() {
            let next = (end + EXPORT_PAGE).min(data.len());
            if is_zero(&data[end..next]) {
                break;
            }
            end = next;
        }
        f.write_all_at(&data[start..end], base + start as u64)?;
        i = end;
    }
    Ok(())
}
