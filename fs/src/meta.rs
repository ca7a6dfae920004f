//! SQLite schema and row helpers. Only `store` and `image` use this module.
//!
//! Schema (format version 1):
//! - `store(key, value)`: format_version, block_size, compression, node_id,
//!   hlc_ms/hlc_ctr (last HLC reading issued), seq (change sequence number).
//! - `packs(id, committed_len)`: every pack holding committed records, and
//!   how many of its bytes committed transactions cover (a longer file has a
//!   torn or abandoned tail, cut at open).
//! - `blocks(hash → pack, offset, stored_len, raw_len, codec)`: the index.
//! - `images(id, name, size, version, stamp, quota, seq, created_ms)`.
//! - `map(image, block, born, died, hash)`: block `block` of `image` is `hash`
//!   in versions `[born, died)`; `died IS NULL` for the head.
//! - `snapshots(image, name, version, size, stamp, created_ms)`.
//! - `writers(image, pid, token, since_ms)`: the one live writer of an image
//!   (a lease; rows of dead processes are ignored and cleaned up).
//! - `history(image, version, stamp)`: the stamps of the last
//!   [`HISTORY_KEEP`] versions of each image, so a peer holding one of them
//!   gets only what changed since (replication).
//! - `transfer_leases(image, holder, expires_ms)`: one replication transfer
//!   per image at a time, across the daemons sharing this store.
//! - `removed(name, seq, removed_ms)`: names whose image was removed or
//!   renamed away, at which change sequence number, so catalogs tell peers
//!   (forgotten when an image of that name exists again).

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::{BlockHash, Hlc, NodeId, Result, Stamp};

/// On-disk format version this build reads and writes.
pub const FORMAT_VERSION: i64 = 1;

pub const SCHEMA: &str = r#"
CREATE TABLE store (key TEXT PRIMARY KEY, value ANY) WITHOUT ROWID, STRICT;
CREATE TABLE packs (id INTEGER PRIMARY KEY AUTOINCREMENT, committed_len INTEGER NOT NULL) STRICT;
CREATE TABLE writers (
    image INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    token INTEGER NOT NULL,
    since_ms INTEGER NOT NULL,
    PRIMARY KEY (image, pid, token)
) WITHOUT ROWID, STRICT;
CREATE TABLE blocks (
    hash BLOB PRIMARY KEY,
    pack INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    stored_len INTEGER NOT NULL,
    raw_len INTEGER NOT NULL,
    codec INTEGER NOT NULL
) WITHOUT ROWID, STRICT;
CREATE INDEX blocks_pack ON blocks(pack, offset);
CREATE TABLE images (
    id INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: open handles follow ids
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    version INTEGER NOT NULL,
    stamp_ms INTEGER NOT NULL,
    stamp_ctr INTEGER NOT NULL,
    origin BLOB NOT NULL,
    quota INTEGER,
    seq INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
) STRICT;
CREATE TABLE map (
    image INTEGER NOT NULL,
    block INTEGER NOT NULL,
    born INTEGER NOT NULL,
    died INTEGER,
    hash BLOB NOT NULL,
    PRIMARY KEY (image, block, born)
) WITHOUT ROWID, STRICT;
CREATE INDEX map_died ON map(image, died) WHERE died IS NOT NULL;
CREATE TABLE snapshots (
    image INTEGER NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    size INTEGER NOT NULL,
    stamp_ms INTEGER NOT NULL,
    stamp_ctr INTEGER NOT NULL,
    origin BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (image, name)
) WITHOUT ROWID, STRICT;
"#;

/// Tables added after format 1 was first released; created on open when
/// missing (they only add information). And two indexes dropped, each one
/// more B-tree page per changed block in every commit's WAL and checkpoint:
/// - `map_live` (`map(image, block) WHERE died IS NULL`) found nothing the
///   primary key's `(image, block)` prefix does not (dropping it: fio's
///   random 4 KiB writes with `fsync` every 32 ~3.2k -> ~3.5k IOPS).
/// - `map_born` (`map(image, born)`) served only `diff` and `rollback`,
///   operator commands, which now read the image's rows by the primary key's
///   `image` prefix instead. Every overwritten block deleted its old row's
///   entry, on a random page (random writes +5 %, three interleaved pairs).
pub const MIGRATIONS: &str = r#"
DROP INDEX IF EXISTS map_live;
DROP INDEX IF EXISTS map_born;
CREATE TABLE IF NOT EXISTS history (
    image INTEGER NOT NULL,
    version INTEGER NOT NULL,
    stamp_ms INTEGER NOT NULL,
    stamp_ctr INTEGER NOT NULL,
    origin BLOB NOT NULL,
    PRIMARY KEY (image, version)
) WITHOUT ROWID, STRICT;
CREATE INDEX IF NOT EXISTS history_stamp ON history(image, stamp_ms);
CREATE TABLE IF NOT EXISTS removed (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    removed_ms INTEGER NOT NULL
) WITHOUT ROWID, STRICT;
CREATE INDEX IF NOT EXISTS removed_seq ON removed(seq);
CREATE TABLE IF NOT EXISTS transfer_leases (
    image TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID, STRICT;
"#;

/// Versions of an image whose stamps are remembered (for incremental pulls).
pub const HISTORY_KEEP: i64 = 4096;

/// Remember that `version` of `image` has `stamp`; forget the oldest.
pub fn record_history(conn: &Connection, image: i64, version: u64, stamp: &Stamp) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO history(image, version, stamp_ms, stamp_ctr, origin) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        image,
        version as i64,
        stamp.hlc.wall_ms as i64,
        stamp.hlc.counter as i64,
        &stamp.origin.0[..]
    ])?;
    conn.prepare_cached("DELETE FROM history WHERE image = ?1 AND version <= ?2")?
        .execute(params![image, version as i64 - HISTORY_KEEP])?;
    Ok(())
}

/// Connection settings: WAL, durable commits, foreign-key-free schema.
pub fn configure(conn: &Connection) -> Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.pragma_update(None, "cache_size", -65536)?;
    // Room for every statement a commit, a flush and the seal jobs' lookups
    // run (the default 16 let them evict each other).
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Run `f` with commits that reach the WAL but are not synced
/// (`synchronous=NORMAL`): they become durable with the next synced commit
/// on the same WAL (any connection's), or are lost with a crash of the
/// machine before it, as one whole transaction. Only for rows no commit
/// relies on until it has made them durable itself.
pub fn unsynced<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let r = f(conn);
    // Sets a flag on the connection; it can fail only if the schema must be
    // read again and that fails (BUSY, I/O). Tried again for a while; a
    // connection left unsynced must never commit again, so past that the
    // store's connection is given up (its mutex poisoned: the mount fails
    // every later request rather than acknowledge writes it did not sync).
    let mut tries = 0;
    while let Err(e) = conn.pragma_update(None, "synchronous", "FULL") {
        tries += 1;
        if tries == 50 {
            panic!("restoring synchronous=FULL on the store's connection failed: {e}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    r
}

// (Statements every commit runs are prepared once per connection: parsing
// them again was ~10–30 µs each, a dozen per commit.)

pub fn get_i64(conn: &Connection, key: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT value FROM store WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?)
}

pub fn get_text(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT value FROM store WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?)
}

pub fn set<V: rusqlite::ToSql>(conn: &Connection, key: &str, value: V) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO store(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

/// Issue the next HLC reading (persisted in the same transaction).
pub fn next_stamp(conn: &Connection, origin: NodeId) -> Result<Stamp> {
    let last = Hlc {
        wall_ms: get_i64(conn, "hlc_ms")?.unwrap_or(0) as u64,
        counter: get_i64(conn, "hlc_ctr")?.unwrap_or(0) as u32,
    };
    let hlc = last.tick(now_ms());
    set(conn, "hlc_ms", hlc.wall_ms as i64)?;
    set(conn, "hlc_ctr", hlc.counter as i64)?;
    Ok(Stamp { hlc, origin })
}

/// Bump and return the store's change sequence number.
/// `name` no longer names an image as of change `seq` (removed, renamed away).
pub fn record_removal(conn: &Connection, name: &str, seq: i64) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO removed(name, seq, removed_ms) VALUES (?1, ?2, ?3)")?
        .execute(params![name, seq, now_ms() as i64])?;
    Ok(())
}

/// An image named `name` exists (again).
pub fn forget_removal(conn: &Connection, name: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM removed WHERE name = ?1")?
        .execute([name])?;
    Ok(())
}

pub fn next_seq(conn: &Connection) -> Result<i64> {
    let seq = get_i64(conn, "seq")?.unwrap_or(0) + 1;
    set(conn, "seq", seq)?;
    Ok(seq)
}

/// Wall clock for stamps, in ms since the epoch. `GEOSYNC_CLOCK_SKEW_MS`
/// (signed) shifts it: a test hook that gives processes on one machine the
/// skewed clocks of distant sites.
pub fn now_ms() -> u64 {
    static SKEW: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let skew = *SKEW.get_or_init(|| {
        std::env::var("GEOSYNC_CLOCK_SKEW_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    (now + skew).max(0) as u64
}

pub fn hash_from_row(row: &Row, idx: usize) -> rusqlite::Result<BlockHash> {
    let v: Vec<u8> = row.get(idx)?;
    let arr: [u8; 32] = v.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Blob,
            "hash is not 32 bytes".into(),
        )
    })?;
    Ok(BlockHash(arr))
}

pub fn stamp_from_row(row: &Row, ms: usize) -> rusqlite::Result<Stamp> {
    let origin: Vec<u8> = row.get(ms + 2)?;
    Ok(Stamp {
        hlc: Hlc {
            wall_ms: row.get::<_, i64>(ms)? as u64,
            counter: row.get::<_, i64>(ms + 1)? as u32,
        },
        origin: NodeId(origin.try_into().unwrap_or_default()),
    })
}

/// Delete dead rows of `image` that no snapshot can see, among rows with
/// `died` in `[died_lo, died_hi]`.
pub fn prune(conn: &Connection, image: i64, died_lo: u64, died_hi: u64) -> Result<usize> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM map WHERE image = ?1 AND died IS NOT NULL AND died BETWEEN ?2 AND ?3
               AND NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.image = map.image
                                AND s.version >= map.born AND s.version < map.died)",
        )?
        .execute(params![image, died_lo as i64, died_hi as i64])?)
}
