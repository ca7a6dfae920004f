//! An open image: reads, writes, holes, resize and commit.
//!
//! Writes land in a bounded dirty set of whole blocks (partial writes
//! read-modify-write). When the dirty set passes its limit it is *sealed*:
//! each block is checked for zero (→ hole), hashed, compressed and appended
//! to a pack unless the store has it already — but nothing is visible yet.
//! [`ImageHandle::commit`] seals what is left, syncs the packs it used, and
//! switches the map in ONE transaction: the image is exactly the old or the
//! new version, never a mix.
//!
//! Failure: if a commit (or a seal) fails, the handle drops its uncommitted
//! changes and returns to the image's last committed version; the error says
//! why. The committed version is untouched.
//!
//! Holes: a block is data iff it holds a non-zero byte. SEEK_DATA/SEEK_HOLE
//! answers come from the map plus the uncommitted overlay, at block
//! granularity.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use rayon::prelude::*;
use rusqlite::OptionalExtension;

use crate::backend::PackId;
use crate::meta;
use crate::pack::{self, is_zero};
use crate::store::{BlockLoc, CommitRequest, ImageRow, StageGuard, WriterLease};
use crate::{BlockHash, Error, Result, Stamp, Store};

/// Default bound of a handle's dirty set.
pub const DEFAULT_DIRTY_LIMIT: usize = 256 << 20;

/// An uncommitted block.
#[derive(Debug)]
enum Dirty {
    /// All zeros: will become a hole.
    Zero,
    /// Whole block contents (bytes past the image end are zero).
    Data(Box<[u8]>),
}

/// A sealed but uncommitted block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Staged {
    /// Becomes a hole.
    Hole,
    /// Becomes this block.
    Block(BlockHash),
}

/// What a commit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitInfo {
    /// The image version after the commit.
    pub version: u64,
    /// Its stamp (unchanged when there was nothing to commit).
    pub stamp: Option<Stamp>,
    /// Whether a new version was made.
    pub changed: bool,
}

/// A read-write handle on one image. Not shared between threads; the FUSE
/// layer wraps it in a lock.
#[derive(Debug)]
pub struct ImageHandle {
    store: Store,
    row: ImageRow,
    bs: u64,
    size: u64,
    dirty: BTreeMap<u64, Dirty>,
    dirty_bytes: usize,
    dirty_limit: usize,
    staged: BTreeMap<u64, Staged>,
    new_blocks: HashMap<BlockHash, BlockLoc>,
    touched: BTreeSet<PackId>,
    trunc_from: Option<u64>,
    guard: Option<StageGuard>,
    lease: Option<WriterLease>,
}

impl ImageHandle {
    pub(crate) fn new(store: Store, row: ImageRow) -> Self {
        ImageHandle {
            bs: store.block_size(),
            size: row.size,
            store,
            row,
            dirty: BTreeMap::new(),
            dirty_bytes: 0,
            dirty_limit: DEFAULT_DIRTY_LIMIT,
            staged: BTreeMap::new(),
            new_blocks: HashMap::new(),
            touched: BTreeSet::new(),
            trunc_from: None,
            guard: None,
            lease: None,
        }
    }

    /// Become the image's one writer (on the first change; kept until drop).
    fn ensure_lease(&mut self) -> Result<()> {
        if self.lease.is_none() {
            let lease = self.store.acquire_writer(self.row.id, &self.row.name)?;
            if !self.is_dirty() {
                // Nothing pending: start from the head as it is now (another
                // writer may have committed since this handle was opened).
                self.row = self.store.image_row_by_id(self.row.id, &self.row.name)?;
                self.size = self.row.size;
            }
            self.lease = Some(lease);
        }
        Ok(())
    }

    /// Image name.
    pub fn name(&self) -> &str {
        &self.row.name
    }

    /// Current logical size (including uncommitted changes).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The committed version this handle is based on.
    pub fn version(&self) -> u64 {
        self.row.version
    }

    /// Whether there are uncommitted changes.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
            || !self.staged.is_empty()
            || self.size != self.row.size
            || self.trunc_from.is_some()
    }

    /// Bound the dirty set (bytes of whole blocks); past it, writes seal.
    pub fn set_dirty_limit(&mut self, bytes: usize) {
        self.dirty_limit = bytes.max(self.bs as usize);
    }

    fn nblocks(&self) -> u64 {
        self.size.div_ceil(self.bs)
    }

    // -------------------------------------------------------------- reading

    fn committed_hash(&self, block: u64) -> Result<Option<BlockHash>> {
        let db = self.store.db();
        let mut st =
            db.prepare_cached("SELECT hash FROM map WHERE image = ?1 AND block = ?2 AND died IS NULL")?;
        Ok(st
            .query_row(rusqlite::params![self.row.id, block as i64], |r| {
                meta::hash_from_row(r, 0)
            })
            .optional()?)
    }

    /// The block's effective content source, ignoring the dirty set.
    fn base_state(&self, block: u64) -> Result<Option<BlockHash>> {
        if let Some(s) = self.staged.get(&block) {
            return Ok(match s {
                Staged::Hole => None,
                Staged::Block(h) => Some(*h),
            });
        }
        if self.trunc_from.is_some_and(|t| block >= t) || block >= self.nblocks() {
            return Ok(None);
        }
        self.committed_hash(block)
    }

    fn read_hash(&self, hash: &BlockHash, block: u64) -> Result<Vec<u8>> {
        let r = match self.new_blocks.get(hash) {
            Some(loc) => self.store.read_record(hash, loc),
            None => self.store.read_block(hash),
        };
        r.map_err(|e| e.at_block(&self.row.name, block))
    }

    /// Full contents of a block (zeros for a hole).
    fn block_contents(&self, block: u64) -> Result<Vec<u8>> {
        match self.dirty.get(&block) {
            Some(Dirty::Zero) => return Ok(vec![0; self.bs as usize]),
            Some(Dirty::Data(d)) => return Ok(d.to_vec()),
            None => {}
        }
        match self.base_state(block)? {
            None => Ok(vec![0; self.bs as usize]),
            Some(h) => {
                let mut v = self.read_hash(&h, block)?;
                v.resize(self.bs as usize, 0);
                Ok(v)
            }
        }
    }

    /// Read at `offset`; returns the bytes read (short at the end of the image).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(self.size - offset) as usize;
        let mut done = 0;
        while done < len {
            let pos = offset + done as u64;
            let block = pos / self.bs;
            let within = (pos % self.bs) as usize;
            let n = (self.bs as usize - within).min(len - done);
            let out = &mut buf[done..done + n];
            match self.dirty.get(&block) {
                Some(Dirty::Data(d)) => out.copy_from_slice(&d[within..within + n]),
                Some(Dirty::Zero) => out.fill(0),
                None => match self.base_state(block)? {
                    None => out.fill(0),
                    Some(h) => {
                        let data = self.read_hash(&h, block)?;
                        let avail = data.len().saturating_sub(within).min(n);
                        out[..avail].copy_from_slice(&data[within..within + avail]);
                        out[avail..].fill(0);
                    }
                },
            }
            done += n;
        }
        Ok(len)
    }

    // -------------------------------------------------------------- holes

    /// Whether a block holds data (a non-zero byte).
    fn is_data(&self, block: u64) -> Result<bool> {
        if block >= self.nblocks() {
            return Ok(false);
        }
        Ok(match self.dirty.get(&block) {
            Some(Dirty::Zero) => false,
            Some(Dirty::Data(d)) => !is_zero(d),
            None => self.base_state(block)?.is_some(),
        })
    }

    /// First data block at or after `from`.
    fn next_data_block(&self, mut from: u64) -> Result<Option<u64>> {
        let n = self.nblocks();
        loop {
            if from >= n {
                return Ok(None);
            }
            let limit = self.trunc_from.unwrap_or(u64::MAX).min(n);
            let db_next: Option<u64> = if from < limit {
                let db = self.store.db();
                let mut st = db.prepare_cached(
                    "SELECT block FROM map WHERE image = ?1 AND died IS NULL AND block >= ?2 AND block < ?3
                      ORDER BY block LIMIT 1",
                )?;
                st.query_row(rusqlite::params![self.row.id, from as i64, limit as i64], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()?
                .map(|b| b as u64)
            } else {
                None
            };
            let ov_next = self
                .dirty
                .range(from..)
                .map(|(b, _)| *b)
                .next()
                .into_iter()
                .chain(self.staged.range(from..).map(|(b, _)| *b).next())
                .min();
            let cand = match (db_next, ov_next) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(c) => c,
                    None => return Ok(None),
                },
            };
            if cand >= n {
                return Ok(None);
            }
            if self.is_data(cand)? {
                return Ok(Some(cand));
            }
            from = cand + 1;
        }
    }

    /// `lseek(SEEK_DATA)`: the first data offset at or after `offset`, or
    /// `None` (ENXIO) when only holes follow.
    pub fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        if offset >= self.size {
            return Ok(None);
        }
        let b = offset / self.bs;
        Ok(self
            .next_data_block(b)?
            .map(|d| if d == b { offset } else { d * self.bs }))
    }

    /// `lseek(SEEK_HOLE)`: the first hole offset at or after `offset` (the
    /// end of the image counts as a hole), or `None` past the end.
    pub fn seek_hole(&self, offset: u64) -> Result<Option<u64>> {
        if offset >= self.size {
            return Ok(None);
        }
        let mut b = offset / self.bs;
        let n = self.nblocks();
        while b < n && self.is_data(b)? {
            b += 1;
        }
        Ok(Some((b * self.bs).clamp(offset, self.size)))
    }

    /// Data extents `[start, end)` in bytes, ascending.
    pub fn data_extents(&self) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(start) = self.seek_data(pos)? {
            let end = self.seek_hole(start)?.unwrap_or(self.size);
            out.push((start, end));
            pos = end;
        }
        Ok(out)
    }

    /// Blocks holding data (committed and uncommitted), for `st_blocks`.
    pub fn allocated_bytes(&self) -> Result<u64> {
        let mut n = 0u64;
        let mut b = 0;
        while let Some(d) = self.next_data_block(b)? {
            n += 1;
            b = d + 1;
        }
        Ok(n * self.bs)
    }

    // -------------------------------------------------------------- writing

    fn set_dirty(&mut self, block: u64, d: Dirty) {
        let add = matches!(d, Dirty::Data(_)) as usize * self.bs as usize;
        if let Some(Dirty::Data(_)) = self.dirty.insert(block, d) {
            self.dirty_bytes -= self.bs as usize;
        }
        self.dirty_bytes += add;
    }

    /// Write `data` at `offset`, growing the image if it ends past the end.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.ensure_lease()?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| Error::InvalidArgument("write past the largest offset".into()))?;
        if end > self.size {
            self.size = end;
        }
        let mut done = 0;
        while done < data.len() {
            let pos = offset + done as u64;
            let block = pos / self.bs;
            let within = (pos % self.bs) as usize;
            let n = (self.bs as usize - within).min(data.len() - done);
            let contents: Box<[u8]> = if n == self.bs as usize {
                data[done..done + n].into()
            } else {
                let mut b = match self.dirty.remove(&block) {
                    Some(Dirty::Data(d)) => {
                        self.dirty_bytes -= self.bs as usize;
                        d
                    }
                    Some(Dirty::Zero) => vec![0; self.bs as usize].into(),
                    None => self.block_contents(block)?.into(),
                };
                b[within..within + n].copy_from_slice(&data[done..done + n]);
                b
            };
            self.set_dirty(block, Dirty::Data(contents));
            done += n;
        }
        if self.dirty_bytes > self.dirty_limit {
            self.seal_or_reset()?;
        }
        Ok(())
    }

    /// Zero `[offset, offset + len)` within the image (punch hole / zero
    /// range: both read back as zeros, and whole blocks become holes). Does
    /// not change the size. Costs O(data blocks in the range).
    pub fn punch(&mut self, offset: u64, len: u64) -> Result<()> {
        self.ensure_lease()?;
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(());
        }
        let first_full = offset.div_ceil(self.bs);
        let end_full = end / self.bs;
        // Partial blocks at the edges: read-modify-write.
        let edge = |h: &mut Self, block: u64| -> Result<()> {
            if !h.is_data(block)? {
                return Ok(());
            }
            let start = (block * h.bs).max(offset);
            let stop = ((block + 1) * h.bs).min(end);
            let mut b = h.block_contents(block)?;
            b[(start - block * h.bs) as usize..(stop - block * h.bs) as usize].fill(0);
            h.set_dirty(block, Dirty::Data(b.into()));
            Ok(())
        };
        if first_full > end_full {
            // Inside one block.
            edge(self, offset / self.bs)?;
            return Ok(());
        }
        if offset % self.bs != 0 {
            edge(self, offset / self.bs)?;
        }
        if end % self.bs != 0 && end_full >= first_full {
            edge(self, end_full)?;
        }
        let mut b = first_full;
        while let Some(d) = self.next_data_block(b)? {
            if d >= end_full {
                break;
            }
            self.set_dirty(d, Dirty::Zero);
            b = d + 1;
        }
        Ok(())
    }

    /// Set the size: grow adds holes; shrink drops everything past the new
    /// end (the tail of a partial last block reads as zeros).
    pub fn set_size(&mut self, new: u64) -> Result<()> {
        self.ensure_lease()?;
        if new >= self.size {
            self.size = new;
            return Ok(());
        }
        let nb = new.div_ceil(self.bs);
        let dropped = self.dirty.split_off(&nb);
        for d in dropped.values() {
            if let Dirty::Data(_) = d {
                self.dirty_bytes -= self.bs as usize;
            }
        }
        self.staged.split_off(&nb);
        self.trunc_from = Some(self.trunc_from.map_or(nb, |t| t.min(nb)));
        if new % self.bs != 0 {
            let last = new / self.bs;
            if self.is_data(last)? {
                let mut b = self.block_contents(last)?;
                b[(new % self.bs) as usize..].fill(0);
                self.set_dirty(last, Dirty::Data(b.into()));
            }
        }
        self.size = new;
        Ok(())
    }

    // -------------------------------------------------------------- commit

    fn reset(&mut self) {
        self.dirty.clear();
        self.dirty_bytes = 0;
        self.staged.clear();
        self.new_blocks.clear();
        self.touched.clear();
        self.trunc_from = None;
        self.size = self.row.size;
        self.guard = None;
    }

    fn seal_or_reset(&mut self) -> Result<()> {
        let r = self.seal();
        if r.is_err() {
            self.reset();
        }
        r
    }

    /// Hash, compress and append the dirty blocks; nothing becomes visible.
    fn seal(&mut self) -> Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        if self.guard.is_none() {
            self.guard = Some(self.store.stage_enter());
        }
        let dirty = std::mem::take(&mut self.dirty);
        self.dirty_bytes = 0;
        let hashed: Vec<(u64, Option<BlockHash>, Option<Box<[u8]>>)> = dirty
            .into_par_iter()
            .map(|(block, d)| match d {
                Dirty::Zero => (block, None, None),
                Dirty::Data(data) if is_zero(&data) => (block, None, None),
                Dirty::Data(data) => (block, Some(pack::hash_block(&data)), Some(data)),
            })
            .collect();
        let mut to_seal: Vec<(BlockHash, Box<[u8]>)> = Vec::new();
        let mut seen: HashSet<BlockHash> = HashSet::new();
        for (block, hash, data) in hashed {
            let in_base = self.trunc_from.is_none_or(|t| block < t);
            let committed = if in_base {
                self.committed_hash(block)?
            } else {
                None
            };
            match hash {
                None => {
                    if committed.is_some() {
                        self.staged.insert(block, Staged::Hole);
                    } else {
                        self.staged.remove(&block);
                    }
                }
                Some(h) => {
                    if committed == Some(h) {
                        self.staged.remove(&block);
                        continue;
                    }
                    self.staged.insert(block, Staged::Block(h));
                    if !self.new_blocks.contains_key(&h) && !seen.contains(&h) && !self.store.has_block(&h)? {
                        seen.insert(h);
                        to_seal.push((h, data.unwrap()));
                    }
                }
            }
        }
        if to_seal.is_empty() {
            return Ok(());
        }
        let compression = self.store.config().compression;
        let sealed: Vec<pack::Sealed> = to_seal
            .par_iter()
            .map(|(h, data)| pack::seal(data, *h, compression))
            .collect();
        drop(to_seal);
        let locs = self.store.append_batch(&sealed)?;
        for (s, loc) in sealed.iter().zip(locs) {
            self.touched.insert(loc.pack);
            self.new_blocks.insert(s.hash, loc);
        }
        Ok(())
    }

    /// Make every change durable as one new version. Returns only after the
    /// pack data and the metadata transaction are on stable storage. On
    /// error the uncommitted changes are dropped and the image stays at its
    /// last committed version.
    pub fn commit(&mut self) -> Result<CommitInfo> {
        self.store.check_writable()?;
        let r = self.try_commit();
        if r.is_err() {
            self.reset();
        }
        r
    }

    fn try_commit(&mut self) -> Result<CommitInfo> {
        self.seal()?;
        if self.staged.is_empty() && self.size == self.row.size && self.trunc_from.is_none() {
            self.reset();
            return Ok(CommitInfo {
                version: self.row.version,
                stamp: None,
                changed: false,
            });
        }
        self.store.sync_packs(self.touched.iter().copied())?;
        let (version, stamp) = self.store.apply_commit(&CommitRequest {
            image_id: self.row.id,
            name: &self.row.name,
            base_version: self.row.version,
            size: self.size,
            trunc_from: self.trunc_from,
            staged: &self.staged,
            new_blocks: &self.new_blocks,
        })?;
        self.row.version = version;
        self.row.size = self.size;
        self.row.stamp = stamp;
        self.reset();
        tracing::debug!(image = %self.row.name, version, %stamp, "committed");
        Ok(CommitInfo {
            version,
            stamp: Some(stamp),
            changed: true,
        })
    }

    /// Drop uncommitted changes.
    pub fn discard(&mut self) {
        self.reset();
    }

    /// Whether the image's committed head moved since this handle was based
    /// on it (another writer, a rollback).
    pub fn is_stale(&self) -> Result<bool> {
        let row = self.store.image_row(&self.row.name)?;
        Ok(row.id != self.row.id || row.version != self.row.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemPacks;
    use crate::store::{InitOptions, OpenMode};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("meta.db");
        let opts = InitOptions {
            block_size: 4096,
            ..Default::default()
        };
        Store::init_with(&db, Box::new(MemPacks::new()), &opts).unwrap();
        let s = Store::open_with(&db, Box::new(MemPacks::new()), OpenMode::ReadWrite).unwrap();
        (dir, s)
    }

    #[test]
    fn write_read_commit_and_holes() {
        let (_d, s) = store();
        s.create_image("a", 10 * 4096).unwrap();
        let mut h = s.open_image("a").unwrap();
        h.write(4096 + 100, b"hello").unwrap();
        let mut buf = [0u8; 5];
        h.read(4096 + 100, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(h.seek_data(0).unwrap(), Some(4096));
        assert_eq!(h.seek_hole(4096).unwrap(), Some(8192));
        let c = h.commit().unwrap();
        assert_eq!(c.version, 2);
        drop(h); // one writer per image at a time
        let h2 = s.open_image("a").unwrap();
        h2.read(4096 + 100, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(h2.data_extents().unwrap(), vec![(4096, 8192)]);
        // Writing zeros over the data makes it a hole again.
        let mut h = s.open_image("a").unwrap();
        h.write(4096 + 100, &[0; 5]).unwrap();
        assert_eq!(h.seek_data(0).unwrap(), None);
        h.commit().unwrap();
        assert_eq!(s.image_info("a").unwrap().referenced, 0);
    }

    #[test]
    fn unchanged_rewrite_makes_no_version() {
        let (_d, s) = store();
        s.create_image("a", 4096).unwrap();
        let mut h = s.open_image("a").unwrap();
        h.write(0, &[1; 4096]).unwrap();
        assert!(h.commit().unwrap().changed);
        h.write(0, &[1; 4096]).unwrap();
        assert!(!h.commit().unwrap().changed);
    }
}
