//! Maintenance: garbage collection (planned, then executed), scrub, and
//! rebuilding the block index from the packs.
//!
//! GC protocol (why a racing commit never loses a block):
//! 1. GC enters the stage gate exclusively: it waits for every writer that
//!    has sealed or deduplicated blocks to commit (or fail), and new writers
//!    wait for GC — in this process (a counter and condvar) and in others
//!    (`STORE/gc.lock`: held shared by a process while it has stagers,
//!    exclusively by GC). So no block that a pending commit relies on — one it just
//!    appended, or an existing one it deduplicated against — is unreferenced
//!    while GC runs.
//! 2. Mark = every hash in any map row (heads, and history pinned by snapshots).
//! 3. Sweep deletes index rows of unmarked blocks in one transaction.
//! 4. Packs with no live record are deleted; packs whose live records are
//!    under half their bytes are compacted: live records are copied (and
//!    verified) into a fresh pack, synced, the index is switched in one
//!    transaction, and only then is the old pack deleted. GC deletes or
//!    compacts only packs it can claim, never one another process appends
//!    to. A crash at any
//!    point leaves every indexed block readable (at worst a pack with no
//!    index rows, which the next GC deletes).

use std::collections::{BTreeMap, HashMap};

use rusqlite::params;
use tracing::{info, warn};

use super::{loc_from_row, BlockLoc, Store};
use crate::backend::PackId;
use crate::pack::{self, align_up, RecordHeader, Sealed, PACK_DATA_START, PACK_MAGIC, RECORD_HEADER_LEN};
use crate::{meta, BlockHash, Error, Result};

/// Compact packs whose live bytes are below this fraction of their size.
pub const COMPACT_BELOW: f64 = 0.5;

/// What `gc` will do (or did).
#[derive(Clone, Debug, Default)]
pub struct GcPlan {
    /// Blocks no map references.
    pub dead_blocks: u64,
    /// Their stored bytes.
    pub dead_bytes: u64,
    /// Packs with no live record: deleted.
    pub delete_packs: Vec<PackId>,
    /// Packs to rewrite: (pack, live bytes, file bytes).
    pub compact_packs: Vec<(PackId, u64, u64)>,
    /// Pack bytes freed once done.
    pub reclaim_bytes: u64,
}

impl GcPlan {
    /// Bytes of the packs to compact: the work that takes time.
    pub fn compact_bytes(&self) -> u64 {
        self.compact_packs.iter().map(|(_, _, len)| len).sum()
    }
}

/// One damaged or missing block and who uses it.
#[derive(Clone, Debug)]
pub struct Damage {
    /// Name of the block.
    pub hash: BlockHash,
    /// Where its record is, if indexed.
    pub location: Option<(PackId, u64)>,
    /// What is wrong.
    pub what: String,
    /// (image, block index, whether the head uses it — else only a snapshot).
    pub users: Vec<(String, u64, bool)>,
}

/// Result of `scrub`.
#[derive(Clone, Debug, Default)]
pub struct ScrubReport {
    /// Blocks read and verified.
    pub blocks_checked: u64,
    /// Stored bytes read.
    pub bytes_checked: u64,
    /// Problems found.
    pub damaged: Vec<Damage>,
}

/// Result of `repair --reindex`.
#[derive(Clone, Debug, Default)]
pub struct ReindexReport {
    /// Packs read.
    pub packs_scanned: u64,
    /// Records that verified.
    pub records_ok: u64,
    /// Records that did not: (pack, offset, what).
    pub records_damaged: Vec<(PackId, u64, String)>,
    /// Verified records of a block already found in an earlier record.
    pub duplicates: u64,
    /// Index rows before and after.
    pub indexed_before: u64,
    /// Index rows after.
    pub indexed_after: u64,
    /// Blocks the maps need that no pack holds intact.
    pub missing: Vec<Damage>,
}

impl Store {
    /// Plan a GC without changing anything.
    pub fn gc_plan(&self) -> Result<GcPlan> {
        let db = self.db();
        let mut plan = GcPlan::default();
        let (n, b): (i64, i64) = db.query_row(
            "SELECT COUNT(*), COALESCE(SUM(stored_len), 0) FROM blocks WHERE hash NOT IN (SELECT hash FROM map)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        plan.dead_blocks = n as u64;
        plan.dead_bytes = b as u64;
        let mut live: HashMap<PackId, u64> = HashMap::new();
        let mut st = db.prepare(
            "SELECT pack, SUM(stored_len + ?1), COUNT(*) FROM blocks WHERE hash IN (SELECT hash FROM map) GROUP BY pack",
        )?;
        for r in st.query_map([RECORD_HEADER_LEN as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })? {
            let (p, bytes) = r?;
            live.insert(p as u64, bytes as u64);
        }
        drop(st);
        drop(db);
        // The active pack counts like any other: `gc` closes it before it plans.
        for id in self
            .inner
            .packs
            .list()
            .map_err(|e| Error::io("listing packs", e))?
        {
            let len = self
                .inner
                .packs
                .len(id)
                .map_err(|e| Error::io(format!("reading pack {id}"), e))?;
            let l = live.get(&id).copied().unwrap_or(0);
            if l == 0 {
                plan.delete_packs.push(id);
                plan.reclaim_bytes += len;
            } else if (l as f64) < COMPACT_BELOW * len.saturating_sub(PACK_DATA_START) as f64 {
                plan.compact_packs.push((id, l, len));
                plan.reclaim_bytes += len.saturating_sub(l + PACK_DATA_START);
            }
        }
        Ok(plan)
    }

    /// Run GC: plan, then (unless `dry_run`) sweep and compact. Returns the
    /// plan that was carried out.
    pub fn gc(&self, dry_run: bool) -> Result<GcPlan> {
        self.gc_with(dry_run, &|_| {}, &|_| {})
    }

    /// [`Store::gc`], telling `planned` the plan once made, and `progress`
    /// the bytes of packs compacted as each is done (the plan's
    /// [`GcPlan::compact_bytes`] in all; deleting a pack is quick).
    pub fn gc_with(
        &self,
        dry_run: bool,
        planned: &dyn Fn(&GcPlan),
        progress: &dyn Fn(u64),
    ) -> Result<GcPlan> {
        if dry_run {
            let plan = self.gc_plan()?;
            planned(&plan);
            return Ok(plan);
        }
        self.check_writable()?;
        let _gc = self.gc_enter()?;
        self.close_active_pack();
        let plan = self.gc_plan()?;
        planned(&plan);
        let swept = self
            .db()
            .execute("DELETE FROM blocks WHERE hash NOT IN (SELECT hash FROM map)", [])?;
        info!(swept, "gc: swept unreferenced blocks");
        for &(id, _, len) in &plan.compact_packs {
            if self.claim(id)? {
                let r = self.compact_pack(id);
                self.inner.packs.release(id);
                r?;
            }
            progress(len);
        }
        for &id in &plan.delete_packs {
            if !self.claim(id)? {
                continue; // another process is appending to it
            }
            let still: i64 =
                self.db()
                    .query_row("SELECT COUNT(*) FROM blocks WHERE pack = ?1", [id as i64], |r| {
                        r.get(0)
                    })?;
            if still > 0 {
                self.inner.packs.release(id);
                continue; // cannot happen under the gate; never delete indexed data
            }
            self.db()
                .execute("DELETE FROM packs WHERE id = ?1", [id as i64])?;
            self.inner
                .packs
                .remove(id)
                .map_err(|e| Error::io(format!("deleting pack {id}"), e))?;
        }
        self.close_active_pack();
        info!(
            deleted = plan.delete_packs.len(),
            compacted = plan.compact_packs.len(),
            reclaimed = plan.reclaim_bytes,
            "gc done"
        );
        Ok(plan)
    }

    fn claim(&self, id: PackId) -> Result<bool> {
        self.inner
            .packs
            .try_claim(id)
            .map_err(|e| Error::io(format!("claiming pack {id}"), e))
    }

    fn compact_pack(&self, id: PackId) -> Result<()> {
        let rows: Vec<(BlockHash, BlockLoc)> = {
            let db = self.db();
            let mut st = db.prepare(
                "SELECT pack, offset, stored_len, raw_len, codec, hash FROM blocks WHERE pack = ?1 ORDER BY offset",
            )?;
            let rows = st
                .query_map([id as i64], |r| {
                    Ok((meta::hash_from_row(r, 5)?, loc_from_row(r)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            rows
        };
        let mut sealed = Vec::with_capacity(rows.len());
        for (hash, loc) in &rows {
            let mut rec = vec![0u8; RECORD_HEADER_LEN + loc.stored_len as usize];
            let ok = self.inner.packs.read_at(id, loc.offset, &mut rec).is_ok()
                && self.read_record(hash, loc).is_ok();
            if !ok {
                warn!(pack = id, block = %hash, "gc: damaged record, pack kept for scrub/repair");
                return Ok(());
            }
            sealed.push(Sealed {
                hash: *hash,
                record: rec,
                shared: None,
                raw_len: loc.raw_len,
                stored_len: loc.stored_len,
                codec: loc.codec,
            });
        }
        // Pinned as they are appended: a switch to a new pack must not give
        // up the claim these records need until the index points at them.
        let mut pinned = Vec::new();
        let r = (|| -> Result<()> {
            let locs = self.append_pinned(&sealed, &mut pinned)?;
            let mut ends: BTreeMap<PackId, u64> = BTreeMap::new();
            for l in &locs {
                let e = ends.entry(l.pack).or_default();
                *e = (*e).max(align_up(l.end()));
            }
            self.sync_packs(ends.keys().copied())?;
            {
                let mut db = self.db();
                let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                for ((hash, _), l) in rows.iter().zip(&locs) {
                    tx.execute(
                        "UPDATE blocks SET pack = ?2, offset = ?3 WHERE hash = ?1",
                        params![&hash.0[..], l.pack as i64, l.offset as i64],
                    )?;
                }
                for (p, end) in ends {
                    tx.execute(
                    "INSERT INTO packs(id, committed_len) VALUES (?1, ?2)
                     ON CONFLICT(id) DO UPDATE SET committed_len = MAX(committed_len, excluded.committed_len)",
                    params![p as i64, end as i64],
                )?;
                }
                tx.execute("DELETE FROM packs WHERE id = ?1", [id as i64])?;
                tx.commit()?;
            }
            Ok(())
        })();
        self.unpin_packs(pinned);
        r?;
        self.inner
            .packs
            .remove(id)
            .map_err(|e| Error::io(format!("deleting pack {id}"), e))?;
        info!(pack = id, records = rows.len(), "gc: compacted pack");
        Ok(())
    }

    /// Who uses a block: (image, block, head?).
    fn users_of(&self, hash: &BlockHash) -> Result<Vec<(String, u64, bool)>> {
        let db = self.db();
        let mut st = db.prepare_cached(
            "SELECT i.name, m.block, m.died IS NULL FROM map m JOIN images i ON i.id = m.image
              WHERE m.hash = ?1 ORDER BY i.name, m.block",
        )?;
        let rows = st
            .query_map([&hash.0[..]], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    fn missing_blocks(&self) -> Result<Vec<Damage>> {
        let hashes: Vec<BlockHash> = {
            let db = self.db();
            let mut st =
                db.prepare("SELECT DISTINCT hash FROM map WHERE hash NOT IN (SELECT hash FROM blocks)")?;
            let rows = st
                .query_map([], |r| meta::hash_from_row(r, 0))?
                .collect::<rusqlite::Result<_>>()?;
            rows
        };
        hashes
            .into_iter()
            .map(|hash| {
                Ok(Damage {
                    hash,
                    location: None,
                    what: "block is referenced but not in the index".into(),
                    users: self.users_of(&hash)?,
                })
            })
            .collect()
    }

    /// Verify every indexed block against its name, and that every block a
    /// map references is indexed. `progress` gets stored bytes as they are read.
    pub fn scrub(&self, progress: &(dyn Fn(u64) + Sync)) -> Result<ScrubReport> {
        let rows: Vec<(BlockHash, BlockLoc)> = {
            let db = self.db();
            let mut st = db.prepare(
                "SELECT pack, offset, stored_len, raw_len, codec, hash FROM blocks ORDER BY pack, offset",
            )?;
            let rows = st
                .query_map([], |r| Ok((meta::hash_from_row(r, 5)?, loc_from_row(r)?)))?
                .collect::<rusqlite::Result<_>>()?;
            rows
        };
        use rayon::prelude::*;
        let bad: Vec<(BlockHash, BlockLoc, String)> = rows
            .par_iter()
            .filter_map(|(hash, loc)| {
                progress(loc.stored_len as u64 + RECORD_HEADER_LEN as u64);
                let e = self.read_record(hash, loc).err()?;
                // A writer's GC may have moved or swept the block since we listed
                // it: only what the index says now counts.
                match self.lookup(hash) {
                    Ok(None) => None,
                    Ok(Some(now)) if now != *loc => self
                        .read_record(hash, &now)
                        .err()
                        .map(|e| (*hash, now, e.to_string())),
                    _ => Some((*hash, *loc, e.to_string())),
                }
            })
            .collect();
        let mut report = ScrubReport {
            blocks_checked: rows.len() as u64,
            bytes_checked: rows.iter().map(|(_, l)| l.stored_len as u64).sum(),
            damaged: Vec::new(),
        };
        for (hash, loc, what) in bad {
            warn!(block = %hash, pack = loc.pack, offset = loc.offset, %what, "scrub: damaged block");
            report.damaged.push(Damage {
                hash,
                location: Some((loc.pack, loc.offset)),
                what,
                users: self.users_of(&hash)?,
            });
        }
        report.damaged.extend(self.missing_blocks()?);
        Ok(report)
    }

    /// Rebuild the block index from the packs alone: every record that
    /// verifies is indexed (the first intact copy of a block wins), damaged
    /// records are reported, and pack lengths are re-recorded.
    pub fn reindex(&self, progress: &(dyn Fn(u64) + Sync)) -> Result<ReindexReport> {
        self.check_writable()?;
        let _gc = self.gc_enter()?;
        self.close_active_pack();
        let mut report = ReindexReport {
            indexed_before: self
                .db()
                .query_row("SELECT COUNT(*) FROM blocks", [], |r| r.get::<_, i64>(0))?
                as u64,
            ..Default::default()
        };
        let mut found: HashMap<BlockHash, BlockLoc> = HashMap::new();
        let mut pack_ends: BTreeMap<PackId, u64> = BTreeMap::new();
        for id in self
            .inner
            .packs
            .list()
            .map_err(|e| Error::io("listing packs", e))?
        {
            report.packs_scanned += 1;
            let len = self
                .inner
                .packs
                .len(id)
                .map_err(|e| Error::io(format!("reading pack {id}"), e))?;
            let mut data = vec![0u8; len as usize];
            self.inner
                .packs
                .read_at(id, 0, &mut data)
                .map_err(|e| Error::io(format!("reading pack {id}"), e))?;
            progress(len);
            if data.len() < 16 || data[..8] != PACK_MAGIC {
                report
                    .records_damaged
                    .push((id, 0, "pack header is missing or damaged".into()));
            }
            let mut off = PACK_DATA_START as usize;
            let mut end = PACK_DATA_START;
            while off + RECORD_HEADER_LEN <= data.len() {
                if data[off] == 0 && data[off..off + RECORD_HEADER_LEN].iter().all(|&b| b == 0) {
                    // Padding after a batch: the next record starts at a page boundary.
                    off = align_up(off as u64 + 1) as usize;
                    continue;
                }
                let hdr = RecordHeader::decode(data[off..off + RECORD_HEADER_LEN].try_into().unwrap());
                let hdr = match hdr {
                    Ok(h) if off + RECORD_HEADER_LEN + h.stored_len as usize <= data.len() => h,
                    Ok(_) => {
                        report
                            .records_damaged
                            .push((id, off as u64, "record is truncated".into()));
                        break;
                    }
                    Err(what) => {
                        report.records_damaged.push((id, off as u64, what.to_string()));
                        // Resynchronize on the next header that checks out.
                        match find_next_record(&data, off + 1) {
                            Some(next) => {
                                off = next;
                                continue;
                            }
                            None => break,
                        }
                    }
                };
                let payload =
                    &data[off + RECORD_HEADER_LEN..off + RECORD_HEADER_LEN + hdr.stored_len as usize];
                let rec_end = off + RECORD_HEADER_LEN + hdr.stored_len as usize;
                match pack::open(payload, hdr.codec, hdr.raw_len, &hdr.hash) {
                    Ok(_) => {
                        report.records_ok += 1;
                        if let std::collections::hash_map::Entry::Vacant(e) = found.entry(hdr.hash) {
                            e.insert(BlockLoc {
                                pack: id,
                                offset: off as u64,
                                stored_len: hdr.stored_len,
                                raw_len: hdr.raw_len,
                                codec: hdr.codec,
                            });
                        } else {
                            report.duplicates += 1;
                        }
                    }
                    Err(what) => report.records_damaged.push((id, off as u64, what)),
                }
                end = align_up(rec_end as u64);
                off = rec_end;
            }
            pack_ends.insert(id, end);
        }
        // What gets indexed must be durable first (tails may never have been synced).
        for id in pack_ends.keys() {
            self.inner
                .packs
                .sync(*id)
                .map_err(|e| Error::io(format!("syncing pack {id}"), e))?;
        }
        {
            let mut db = self.db();
            let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM blocks", [])?;
            tx.execute("DELETE FROM packs", [])?;
            {
                let mut ins = tx.prepare(
                    "INSERT INTO blocks(hash, pack, offset, stored_len, raw_len, codec) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for (h, l) in &found {
                    ins.execute(params![
                        &h.0[..],
                        l.pack as i64,
                        l.offset as i64,
                        l.stored_len as i64,
                        l.raw_len as i64,
                        l.codec as i64
                    ])?;
                }
                let mut p = tx.prepare("INSERT INTO packs(id, committed_len) VALUES (?1, ?2)")?;
                for (id, end) in &pack_ends {
                    p.execute(params![*id as i64, *end as i64])?;
                }
            }
            tx.commit()?;
        }
        report.indexed_after = found.len() as u64;
        report.missing = self.missing_blocks()?;
        info!(
            ok = report.records_ok,
            damaged = report.records_damaged.len(),
            missing = report.missing.len(),
            "reindex done"
        );
        Ok(report)
    }
}

fn find_next_record(data: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + RECORD_HEADER_LEN <= data.len() {
        match data[i..].windows(4).position(|w| w == pack::RECORD_MAGIC) {
            Some(p) => {
                let at = i + p;
                if at + RECORD_HEADER_LEN <= data.len()
                    && RecordHeader::decode(data[at..at + RECORD_HEADER_LEN].try_into().unwrap()).is_ok()
                {
                    return Some(at);
                }
                i = at + 1;
            }
            None => return None,
        }
    }
    None
}
