//! What replication needs from the store: the catalog, maps relative to a
//! version a peer holds, blocks as stored (compressed), received blocks kept
//! after verification, the one-transaction switch of a replica, and
//! transfer leases. The store also answers peers through
//! [`geosync_proto::serve::Source`].
//!
//! Invariants:
//! - A received block is verified (decoded and hashed) before it is kept,
//!   and it is durable (pack synced, then indexed) before
//!   [`Store::put_stored`] returns: a pull that dies resumes without asking
//!   for it again. Until a version references it, GC may sweep it (a resume
//!   then fetches it again).
//! - [`Store::apply_replica`] is ONE transaction: readers of the image see
//!   the old version or the new one. It refuses an image open for writing
//!   ([`ReplicaOutcome::Busy`]) and one whose head is not the one the plan
//!   was made against ([`ReplicaOutcome::Stale`]), and it checks every block
//!   the new version names is indexed.
//! - A pulled version keeps its stamp; the local HLC observes it, so a
//!   later local commit is stamped after it.

use std::collections::BTreeMap;

use geosync_proto::serve::{MapView, Source, StoredBlock};
use geosync_proto::sync::ApplyPlan;
use geosync_proto::wire::{CatalogEntry, Hash, MapChange};
use rusqlite::{params, OptionalExtension};
use tracing::info;

use super::{
    check_record_header, image_row, index_records, record_integrity, record_read_error, refuse_if_open,
    snapshots_of, Store,
};
use crate::meta;
use crate::pack::{self, Codec, RecordHeader, Sealed, RECORD_HEADER_LEN};
use crate::{validate_name, BlockHash, Error, Hlc, NodeId, Result, Stamp};

/// Result of [`Store::apply_replica`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaOutcome {
    /// The image is now the pulled version (its new local version number).
    Applied(u64),
    /// The image is open for writing; nothing changed.
    Busy,
    /// The head is not the one the plan expected; nothing changed.
    Stale,
}

/// A received block, before verification.
#[derive(Clone, Debug)]
pub struct IncomingBlock {
    /// Its claimed name.
    pub hash: BlockHash,
    /// Codec (0 raw, 1 zstd).
    pub codec: u8,
    /// Raw length.
    pub raw_len: u32,
    /// Stored bytes.
    pub payload: Vec<u8>,
}

fn stamp_params(s: &Stamp) -> (i64, i64, Vec<u8>) {
    (s.hlc.wall_ms as i64, s.hlc.counter as i64, s.origin.0.to_vec())
}

impl Store {
    /// This store's node id (the origin of its stamps).
    pub fn node_id(&self) -> NodeId {
        self.inner.config.node_id
    }

    /// Set the store's node id (`syncd init`: the hash of its key). Takes
    /// effect when the store is next opened.
    pub fn set_node_id(&self, id: NodeId) -> Result<()> {
        self.check_writable()?;
        meta::set(&self.db(), "node_id", id.to_string())
    }

    /// The change sequence number: bumped by every change to any image.
    pub fn seq(&self) -> Result<u64> {
        Ok(meta::get_i64(&self.db(), "seq")?.unwrap_or(0) as u64)
    }

    /// Images changed after sequence number `since`, and the sequence
    /// number this brings the reader to. Names removed (or renamed away)
    /// since come as `deleted` entries, so a peer forgets them.
    pub fn catalog_since(&self, since: u64) -> Result<(u64, Vec<CatalogEntry>)> {
        let db = self.db();
        let tx = db.unchecked_transaction()?;
        let seq = meta::get_i64(&tx, "seq")?.unwrap_or(0) as u64;
        let mut st = tx.prepare_cached(
            "SELECT name, version, stamp_ms, stamp_ctr, origin, size FROM images WHERE seq > ?1 ORDER BY seq",
        )?;
        let mut entries = st
            .query_map([since as i64], |r| {
                Ok(CatalogEntry {
                    name: r.get(0)?,
                    version: r.get::<_, i64>(1)? as u64,
                    stamp: meta::stamp_from_row(r, 2)?,
                    size: r.get::<_, i64>(5)? as u64,
                    deleted: false,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        drop(st);
        // (A store opened read-only before the table existed has none.)
        if let Ok(mut st) = tx.prepare_cached("SELECT name FROM removed WHERE seq > ?1 ORDER BY seq") {
            let gone = st
                .query_map([since as i64], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            entries.extend(gone.into_iter().map(|name| CatalogEntry {
                name,
                version: 0,
                stamp: Stamp::default(),
                size: 0,
                deleted: true,
            }));
        }
        tx.finish()?;
        Ok((seq, entries))
    }

    /// The head map of `image` for a peer whose head is the version stamped
    /// `have`: only the blocks changed since, if our history holds it (rows
    /// born after it), else all blocks. `None` if there is no such image.
    pub fn map_view(&self, image: &str, have: Option<Stamp>) -> Result<Option<MapView>> {
        let db = self.db();
        let tx = db.unchecked_transaction()?;
        let row = match image_row(&tx, image) {
            Ok(r) => r,
            Err(Error::NoSuchImage(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let base: Option<u64> = match have {
            None => None,
            Some(h) => {
                let (ms, ctr, origin) = stamp_params(&h);
                tx.prepare_cached(
                    "SELECT version FROM history WHERE image = ?1 AND stamp_ms = ?2 AND stamp_ctr = ?3 AND origin = ?4",
                )?
                .query_row(params![row.id, ms, ctr, origin], |r| r.get::<_, i64>(0))
                .optional()?
                .map(|v| v as u64)
            }
        };
        let mut st = tx.prepare_cached(
            "SELECT block, born, hash FROM map WHERE image = ?1 AND died IS NULL ORDER BY block",
        )?;
        let mut changes = Vec::new();
        let mut live: Vec<(u64, u64)> = Vec::new();
        let rows = st.query_map([row.id], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                meta::hash_from_row(r, 2)?,
            ))
        })?;
        for r in rows {
            let (block, born, hash) = r?;
            match live.last_mut() {
                Some(e) if e.1 == block => e.1 += 1,
                _ => live.push((block, block + 1)),
            }
            if base.is_none_or(|x| born > x) {
                changes.push(MapChange {
                    block,
                    hash: Some(hash.0),
                });
            }
        }
        drop(st);
        tx.finish()?;
        Ok(Some(MapView {
            base_known: base.is_some(),
            stamp: row.stamp,
            size: row.size,
            changes,
            live,
        }))
    }

    /// A block as stored (compressed or raw), verified before it is sent.
    pub fn stored_block(&self, hash: &BlockHash) -> Result<Option<(Codec, u32, Vec<u8>)>> {
        let Some(loc) = self.lookup(hash)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; RECORD_HEADER_LEN + loc.stored_len as usize];
        self.inner
            .packs
            .read_at(loc.pack, loc.offset, &mut buf)
            .map_err(|e| record_read_error(hash, &loc, e))?;
        let header = check_record_header(hash, &loc, &buf[..RECORD_HEADER_LEN])?;
        let payload = buf.split_off(RECORD_HEADER_LEN);
        pack::open(&payload, header.codec, header.raw_len, hash)
            .map_err(|w| record_integrity(hash, &loc, w))?;
        Ok(Some((header.codec, header.raw_len, payload)))
    }

    /// Which of `hashes` the store lacks.
    pub fn lacking(&self, hashes: &[BlockHash]) -> Result<Vec<BlockHash>> {
        let db = self.db();
        // One read transaction for all (not one lock round per hash).
        let tx = db.unchecked_transaction()?;
        let mut out = Vec::new();
        {
            let mut st = tx.prepare_cached("SELECT EXISTS(SELECT 1 FROM blocks WHERE hash = ?1)")?;
            for h in hashes {
                if !st.query_row([&h.0[..]], |r| r.get::<_, bool>(0))? {
                    out.push(*h);
                }
            }
        }
        tx.finish()?;
        Ok(out)
    }

    /// Verify received blocks and keep the good ones durably, as stored by
    /// the sender (no recompression). Returns, per block, whether it was
    /// kept (`false`: its bytes do not match its name, or its header is
    /// invalid).
    pub fn put_stored(&self, blocks: Vec<IncomingBlock>) -> Result<Vec<bool>> {
        self.check_writable()?;
        let mut verdict = Vec::with_capacity(blocks.len());
        let mut sealed = Vec::new();
        for b in blocks {
            let codec = Codec::from_u8(b.codec);
            // Stored bytes are what a store would have written: raw blocks
            // exactly their length, compressed ones shorter (a padded
            // payload could verify yet make a record no reader accepts).
            let sane = match codec {
                Some(Codec::Raw) => b.payload.len() == b.raw_len as usize,
                Some(Codec::Zstd) => b.payload.len() < b.raw_len as usize,
                None => false,
            };
            // Every block of a store is one block long (a peer with another
            // block size is refused at the handshake: this is the backstop).
            let good = match codec {
                Some(c) if sane && u64::from(b.raw_len) == self.block_size() => {
                    pack::open(&b.payload, c, b.raw_len, &b.hash).is_ok()
                }
                _ => false,
            };
            verdict.push(good);
            if !good {
                continue;
            }
            let codec = codec.unwrap();
            let header = RecordHeader {
                hash: b.hash,
                raw_len: b.raw_len,
                stored_len: b.payload.len() as u32,
                codec,
            };
            let mut record = Vec::with_capacity(RECORD_HEADER_LEN + b.payload.len());
            record.extend_from_slice(&header.encode());
            record.extend_from_slice(&b.payload);
            sealed.push(Sealed {
                hash: b.hash,
                record,
                shared: None,
                raw_len: b.raw_len,
                stored_len: header.stored_len,
                codec,
            });
        }
        if sealed.is_empty() {
            return Ok(verdict);
        }
        // Like a commit: inside the stage gate, synced before indexed.
        let _stage = self.stage_enter()?;
        // Pinned as they are appended: a switch to a new pack must not give up
        // the claim these records still need.
        let mut packs = Vec::new();
        let locs = self.append_pinned(&sealed, &mut packs)?;
        let r = (|| {
            self.sync_packs(packs.iter().copied())?;
            let mut db = self.db();
            let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            index_records(&tx, sealed.iter().map(|s| &s.hash).zip(&locs))?;
            tx.commit()?;
            Ok(())
        })();
        self.unpin_packs(packs);
        r.map(|()| verdict)
    }

    /// How far ahead of this node's clock a pulled version may be stamped
    /// (further: [`Error::ClockAhead`]). Sites' clocks are NTP-synced to well
    /// under a second; an hour ahead is a wrong clock, not skew.
    pub const MAX_STAMP_AHEAD_MS: u64 = 3_600_000;

    /// Switch `plan.image` to a pulled version in ONE transaction (see the
    /// module docs for what is refused; also a version stamped more than
    /// [`Store::MAX_STAMP_AHEAD_MS`] ahead of this node's clock).
    pub fn apply_replica(&self, plan: &ApplyPlan) -> Result<ReplicaOutcome> {
        self.check_writable()?;
        validate_name(&plan.image)?;
        let now = meta::now_ms();
        if plan.stamp.hlc.wall_ms > now.saturating_add(Self::MAX_STAMP_AHEAD_MS) {
            return Err(Error::ClockAhead {
                image: plan.image.clone(),
                origin: plan.stamp.origin.to_string(),
                ahead_s: (plan.stamp.hlc.wall_ms - now) / 1000,
            });
        }
        if let Some(s) = &plan.keep_local_as {
            validate_name(s)?;
        }
        let bs = self.block_size();
        let nblocks = plan.size.div_ceil(bs);
        let _stage = self.stage_enter()?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let current = match image_row(&tx, &plan.image) {
            Ok(r) => Some(r),
            Err(Error::NoSuchImage(_)) => None,
            Err(e) => return Err(e),
        };
        if current.as_ref().map(|r| r.stamp) != plan.expect_local {
            return Ok(ReplicaOutcome::Stale);
        }
        if let Some(row) = &current {
            match refuse_if_open(&tx, row) {
                Ok(()) => {}
                Err(Error::ImageBusy { .. }) => return Ok(ReplicaOutcome::Busy),
                Err(e) => return Err(e),
            }
        }
        // Every block the new version names must be here.
        {
            let mut st = tx.prepare_cached("SELECT EXISTS(SELECT 1 FROM blocks WHERE hash = ?1)")?;
            for c in &plan.changes {
                if let Some(h) = c.hash {
                    if !st.query_row([&h[..]], |r| r.get::<_, bool>(0))? {
                        return Err(Error::MissingBlock {
                            hash: BlockHash(h),
                            image: Some(plan.image.clone()),
                            block: Some(c.block),
                        });
                    }
                }
            }
        }
        let (ms, ctr, origin) = stamp_params(&plan.stamp);
        let seq = meta::next_seq(&tx)?;
        let (id, v) = match &current {
            Some(row) => {
                if let Some(snap) = &plan.keep_local_as {
                    if !snapshots_of(&tx, row.id)?.iter().any(|s| s.name == *snap) {
                        let (lms, lctr, lorigin) = stamp_params(&row.stamp);
                        tx.execute(
                            "INSERT INTO snapshots(image, name, version, size, stamp_ms, stamp_ctr, origin, created_ms)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                            params![
                                row.id,
                                snap,
                                row.version as i64,
                                row.size as i64,
                                lms,
                                lctr,
                                lorigin,
                                meta::now_ms() as i64
                            ],
                        )?;
                    }
                }
                let v = row.version + 1;
                tx.execute(
                    "UPDATE images SET version = ?2, size = ?3, stamp_ms = ?4, stamp_ctr = ?5, origin = ?6, seq = ?7
                      WHERE id = ?1",
                    params![row.id, v as i64, plan.size as i64, ms, ctr, origin, seq],
                )?;
                (row.id, v)
            }
            None => {
                tx.execute(
                    "INSERT INTO images(name, size, version, stamp_ms, stamp_ctr, origin, seq, created_ms)
                     VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        plan.image,
                        plan.size as i64,
                        ms,
                        ctr,
                        origin,
                        seq,
                        meta::now_ms() as i64
                    ],
                )?;
                meta::forget_removal(&tx, &plan.image)?;
                (tx.last_insert_rowid(), 1)
            }
        };
        // The new map: (old ∩ live) + changes if the base is known, else changes.
        let old: BTreeMap<u64, Hash> = {
            let mut st =
                tx.prepare_cached("SELECT block, hash FROM map WHERE image = ?1 AND died IS NULL")?;
            let rows = st.query_map([id], |r| {
                Ok((r.get::<_, i64>(0)? as u64, meta::hash_from_row(r, 1)?.0))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut new: BTreeMap<u64, Hash> = BTreeMap::new();
        if plan.base_known {
            let mut ext = plan.live.iter().peekable();
            for (b, h) in &old {
                while ext.peek().is_some_and(|e| e.1 <= *b) {
                    ext.next();
                }
                if ext.peek().is_some_and(|e| e.0 <= *b) {
                    new.insert(*b, *h);
                }
            }
        }
        for c in &plan.changes {
            if c.block >= nblocks {
                return Err(Error::InvalidArgument(format!(
                    "replica of {} names block {} past its size {}",
                    plan.image, c.block, plan.size
                )));
            }
            match c.hash {
                Some(h) => new.insert(c.block, h),
                None => new.remove(&c.block),
            };
        }
        let mut killed = 0u64;
        let mut born = 0u64;
        {
            let mut kill = tx.prepare_cached(
                "UPDATE map SET died = ?3 WHERE image = ?1 AND block = ?2 AND died IS NULL",
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO map(image, block, born, died, hash) VALUES (?1, ?2, ?3, NULL, ?4)",
            )?;
            for (b, h) in &old {
                if new.get(b) != Some(h) {
                    kill.execute(params![id, *b as i64, v as i64])?;
                    killed += 1;
                }
            }
            for (b, h) in &new {
                if old.get(b) != Some(h) {
                    insert.execute(params![id, *b as i64, v as i64, &h[..]])?;
                    born += 1;
                }
            }
        }
        meta::record_history(&tx, id, v, &plan.stamp)?;
        // The local clock moves past the pulled stamp.
        let last = Hlc {
            wall_ms: meta::get_i64(&tx, "hlc_ms")?.unwrap_or(0) as u64,
            counter: meta::get_i64(&tx, "hlc_ctr")?.unwrap_or(0) as u32,
        };
        let hlc = last.observe(plan.stamp.hlc, meta::now_ms());
        meta::set(&tx, "hlc_ms", hlc.wall_ms as i64)?;
        meta::set(&tx, "hlc_ctr", hlc.counter as i64)?;
        meta::prune(&tx, id, v, v)?;
        tx.commit()?;
        info!(
            image = %plan.image,
            version = v,
            stamp = %plan.stamp,
            changed = born,
            dropped = killed,
            conflict = plan.keep_local_as.as_deref().unwrap_or(""),
            "replica switched"
        );
        Ok(ReplicaOutcome::Applied(v))
    }

    /// Take (or renew) the transfer lease on `image` for `holder` for
    /// `ttl_ms`: true if it is now ours — it was free, expired, ours, or
    /// `stale(current holder)` says its holder is gone (a killed daemon).
    pub fn try_transfer_lease(
        &self,
        image: &str,
        holder: &str,
        ttl_ms: u64,
        stale: &dyn Fn(&str) -> bool,
    ) -> Result<bool> {
        self.check_writable()?;
        let now = meta::now_ms() as i64;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let cur: Option<(String, i64)> = tx
            .query_row(
                "SELECT holder, expires_ms FROM transfer_leases WHERE image = ?1",
                [image],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((h, exp)) = cur {
            if h != holder && exp > now && !stale(&h) {
                return Ok(false);
            }
        }
        tx.execute(
            "INSERT INTO transfer_leases(image, holder, expires_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(image) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms",
            params![image, holder, now + ttl_ms as i64],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Give back every transfer lease whose holder starts with `prefix` (a
    /// daemon stopping).
    pub fn release_transfer_leases_of(&self, prefix: &str) -> Result<()> {
        self.db().execute(
            "DELETE FROM transfer_leases WHERE substr(holder, 1, length(?1)) = ?1",
            [prefix],
        )?;
        Ok(())
    }

    /// Give a transfer lease back (if `holder` still has it).
    pub fn release_transfer_lease(&self, image: &str, holder: &str) -> Result<()> {
        self.db().execute(
            "DELETE FROM transfer_leases WHERE image = ?1 AND holder = ?2",
            params![image, holder],
        )?;
        Ok(())
    }
}

impl Source for Store {
    fn catalog_since(&self, since: u64) -> std::result::Result<(u64, Vec<CatalogEntry>), String> {
        Store::catalog_since(self, since).map_err(|e| e.to_string())
    }

    fn map(&self, image: &str, have: Option<Stamp>) -> std::result::Result<Option<MapView>, String> {
        if validate_name(image).is_err() {
            return Ok(None);
        }
        self.map_view(image, have).map_err(|e| e.to_string())
    }

    fn block(&self, hash: &Hash) -> std::result::Result<Option<StoredBlock>, String> {
        match self.stored_block(&BlockHash(*hash)) {
            Ok(Some((codec, raw_len, payload))) => Ok(Some(StoredBlock {
                codec: codec as u8,
                raw_len,
                payload,
            })),
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve a block");
                Err(e.to_string())
            }
        }
    }
}
