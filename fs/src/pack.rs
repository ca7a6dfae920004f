//! The pack record format and block sealing (hash + compress) / opening
//! (decompress + verify).
//!
//! A pack file is a header page followed by page-aligned batches of records. **Frozen format
//! (version 1)** — change it only with a new format version:
//!
//! ```text
//! header page (4096 bytes): "GSYNCPK1" | u32 LE format version = 1 | u32 LE reserved = 0 | zeros
//! then records, in batches; every batch is padded with zero bytes to a
//! 4096-byte boundary (so packs can be appended with O_DIRECT). A record never
//! starts with a zero byte, so a reader skips zeros to the next boundary.
//! record header (52 bytes, then `stored_len` payload bytes):
//!   0..4    magic "GSB1"
//!   4..36   BLAKE3-256 of the raw (uncompressed) block
//!   36..40  u32 LE raw_len      (block bytes after decoding)
//!   40..44  u32 LE stored_len   (payload bytes that follow the header)
//!   44      codec: 0 = raw, 1 = zstd
//!   45..48  reserved, zero
//!   48..52  first 4 bytes of BLAKE3(header bytes 0..48): catches a torn or
//!           shifted header before its lengths are trusted
//! ```
//!
//! Records are self-describing, so the block index can be rebuilt from the
//! packs alone (`repair --reindex`).

use std::cell::RefCell;
use std::sync::Arc;

use crate::BlockHash;

/// Pack file magic (frozen).
pub const PACK_MAGIC: [u8; 8] = *b"GSYNCPK1";
/// Pack files grow in whole pages: the header is one page and every append is
/// padded with zeros to this boundary (frozen).
pub const PACK_ALIGN: u64 = 4096;
/// Offset of the first record (frozen).
pub const PACK_DATA_START: u64 = PACK_ALIGN;

/// `n` rounded up to a page boundary.
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(PACK_ALIGN) * PACK_ALIGN
}

/// A zeroed, page-aligned byte buffer (what O_DIRECT needs), without unsafe
/// code: an over-allocated vector sliced at its first aligned address.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} of {} bytes)", self.len, self.capacity())
    }
}

impl AlignedBuf {
    /// `len` zero bytes starting at a page-aligned address.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + PACK_ALIGN as usize];
        let start = raw.as_ptr().align_offset(PACK_ALIGN as usize);
        AlignedBuf { raw, start, len }
    }

    /// Bytes available from the aligned start.
    pub fn capacity(&self) -> usize {
        self.raw.len() - self.start
    }

    /// Use the first `len` bytes (at most the capacity; contents are whatever
    /// was there: callers overwrite them).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity());
        self.len = len;
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}
/// Record magic (frozen).
pub const RECORD_MAGIC: [u8; 4] = *b"GSB1";
/// Record header length (frozen).
pub const RECORD_HEADER_LEN: usize = 52;
/// Largest block a record may hold (and largest block size a store may use).
pub const MAX_BLOCK: u32 = 4 << 20;

/// How a record's payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Stored as is (compression did not pay).
    Raw = 0,
    /// zstd frame.
    Zstd = 1,
}

impl Codec {
    /// From the on-disk byte.
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// The header page of a pack file.
pub fn pack_header() -> AlignedBuf {
    let mut h = AlignedBuf::zeroed(PACK_DATA_START as usize);
    let b = h.as_mut_slice();
    b[..8].copy_from_slice(&PACK_MAGIC);
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    h
}

/// A parsed record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Name of the block.
    pub hash: BlockHash,
    /// Decoded length.
    pub raw_len: u32,
    /// Payload length.
    pub stored_len: u32,
    /// Payload encoding.
    pub codec: Codec,
}

impl RecordHeader {
    /// Serialize (with its check bytes).
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(&RECORD_MAGIC);
        h[4..36].copy_from_slice(&self.hash.0);
        h[36..40].copy_from_slice(&self.raw_len.to_le_bytes());
        h[40..44].copy_from_slice(&self.stored_len.to_le_bytes());
        h[44] = self.codec as u8;
        let check = blake3::hash(&h[..48]);
        h[48..52].copy_from_slice(&check.as_bytes()[..4]);
        h
    }

    /// Parse and check a header; `Err` says what is wrong.
    pub fn decode(h: &[u8; RECORD_HEADER_LEN]) -> Result<RecordHeader, &'static str> {
        if h[0..4] != RECORD_MAGIC {
            return Err("bad record magic");
        }
        if blake3::hash(&h[..48]).as_bytes()[..4] != h[48..52] {
            return Err("record header checksum mismatch");
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        let raw_len = u32_at(36);
        let stored_len = u32_at(40);
        let codec = Codec::from_u8(h[44]).ok_or("unknown codec")?;
        if raw_len == 0 || raw_len > MAX_BLOCK || stored_len > MAX_BLOCK + 4096 {
            return Err("record lengths out of range");
        }
        Ok(RecordHeader {
            hash: BlockHash(h[4..36].try_into().unwrap()),
            raw_len,
            stored_len,
            codec,
        })
    }
}

/// Compression setting of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Store blocks raw.
    None,
    /// zstd at this level (1..=19).
    Zstd(i32),
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "none" {
            return Ok(Compression::None);
        }
        let level = match s.strip_prefix("zstd") {
            Some("") => 3,
            Some(rest) => rest
                .strip_prefix(':')
                .and_then(|l| l.parse::<i32>().ok())
                .filter(|l| (1..=19).contains(l))
                .ok_or_else(|| format!("invalid compression {s:?}: use none, zstd or zstd:LEVEL (1-19)"))?,
            None => {
                return Err(format!(
                    "invalid compression {s:?}: use none, zstd or zstd:LEVEL (1-19)"
                ))
            }
        };
        Ok(Compression::Zstd(level))
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => write!(f, "none"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

/// A block ready to append: its name and its encoded record (header + payload).
#[derive(Debug)]
pub struct Sealed {
    /// Name of the block.
    pub hash: BlockHash,
    /// The record to append: header, then the payload unless `shared` holds it.
    pub record: Vec<u8>,
    /// The payload when it is the raw block itself, shared instead of copied.
    pub shared: Option<Arc<[u8]>>,
    /// Raw length.
    pub raw_len: u32,
    /// Payload length.
    pub stored_len: u32,
    /// Payload encoding.
    pub codec: Codec,
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>, Vec<u8>)>> = const { RefCell::new(None) };
    static TRIAL: RefCell<Option<(zstd::bulk::Compressor<'static>, Vec<u8>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

#[allow(clippy::len_without_is_empty)] // a record always holds its header
impl Sealed {
    /// The record's bytes, in order.
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(&self.record[..]).chain(self.shared.as_deref())
    }

    /// Length of the record.
    pub fn len(&self) -> usize {
        self.record.len() + self.shared.as_ref().map_or(0, |s| s.len())
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        match &self.shared {
            Some(s) => s,
            None => &self.record[RECORD_HEADER_LEN..],
        }
    }
}

/// Name of a raw block.
pub fn hash_block(raw: &[u8]) -> BlockHash {
    BlockHash(*blake3::hash(raw).as_bytes())
}

/// Whether a block looks worth compressing, judged from a sample (after the
/// heuristic btrfs uses before it compresses): 16 bytes of every 256. A
/// repeating sample or low byte entropy mean yes; a flat byte distribution (random, encrypted or already
/// compressed data) means no, and zstd is not run on the block at all; in
/// between, a trial compression in zstd's fast mode decides.
pub fn looks_compressible(raw: &[u8]) -> bool {
    const STEP: usize = 256;
    const TAKE: usize = 16;
    if raw.len() < 2 * STEP {
        return true;
    }
    let mut sample = Vec::with_capacity(raw.len() / STEP * TAKE);
    for (i, chunk) in raw.chunks_exact(STEP).enumerate() {
        // Not always at the start of a window: data with a header every 256 or
        // 512 bytes (fio's buffers) would fill the sample. The offset repeats
        // every 16 windows, so periodic data still gives a repeating sample.
        let at = (i % 16) * 37 % (STEP - TAKE);
        sample.extend_from_slice(&chunk[at..at + TAKE]);
    }
    let n = sample.len();
    // Repeated patterns: the first half of the sample equals the second.
    if sample[..n / 2] == sample[n / 2..] {
        return true;
    }
    let entropy = byte_entropy(&sample);
    // Sampled entropy: text 4–5 bits, machine code 5–7.2 (some of it at 6.5+
    // still shrinks by a quarter: btrfs's cut at 80 % of 8 bits would store
    // it raw), fio's buffers 7.25–7.8, random bytes 7.9+. In between, a
    // trial decides: zstd's fast mode on an eighth of the block, far cheaper
    // than level 3 on data that does not compress (which level 3 runs
    // through in full). The cut at 7.25 (it was 7.45) was measured on 64 KiB
    // blocks of /usr/lib, /usr/bin, /usr/share and the cargo registry: it
    // keeps 99.9 % of level 3's savings on each (0.12 % less on /usr/share),
    // while three quarters of fio's blocks had gone to the trial for nothing.
    if entropy < 6.5 {
        return true;
    }
    if entropy >= 7.25 {
        return false;
    }
    // Slices from the start of each quarter: an eighth of the bytes, and a
    // small compressible patch in an otherwise random block does not pass.
    // (A quarter cost twice as much and kept 0.1 % more of the savings on
    // machine code.)
    let q = raw.len() / 4;
    let mut part = Vec::with_capacity(q / 2);
    for i in 0..4 {
        part.extend_from_slice(&raw[i * q..i * q + q / 8]);
    }
    let part = &part[..];
    TRIAL.with(|t| {
        let mut t = t.borrow_mut();
        let (comp, scratch) = t.get_or_insert_with(|| {
            (
                zstd::bulk::Compressor::new(TRIAL_LEVEL).expect("zstd compressor"),
                Vec::new(),
            )
        });
        let room = part.len() - part.len() / 8;
        if scratch.len() < room {
            scratch.resize(room, 0);
        }
        comp.compress_to_buffer(part, &mut scratch[..room]).is_ok()
    })
}

/// Shannon entropy of the byte distribution of `sample`, in bits per byte.
/// Counted into four tables (consecutive bytes do not wait on each other's
/// increments) and summed as log2(n) - Σ c·log2(c) / n, with c·log2(c) from
/// a table for the counts a 64 KiB block's sample can have: `log2` per
/// distinct byte cost more than the rest of the check together.
fn byte_entropy(sample: &[u8]) -> f64 {
    const TABLE: usize = 4097;
    static CLOGC: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    let table = CLOGC.get_or_init(|| {
        (0..TABLE)
            .map(|c| {
                if c == 0 {
                    0.0
                } else {
                    (c as f64 * (c as f64).log2()) as f32
                }
            })
            .collect()
    });
    let mut counts = [[0u32; 256]; 4];
    let mut quads = sample.chunks_exact(4);
    for q in &mut quads {
        counts[0][q[0] as usize] += 1;
        counts[1][q[1] as usize] += 1;
        counts[2][q[2] as usize] += 1;
        counts[3][q[3] as usize] += 1;
    }
    for &b in quads.remainder() {
        counts[0][b as usize] += 1;
    }
    let n = sample.len() as f64;
    let mut sum = 0.0f64;
    let [c0, c1, c2, c3] = &counts;
    for (((a, b), c), d) in c0.iter().zip(c1).zip(c2).zip(c3) {
        let c = (a + b + c + d) as usize;
        sum += match table.get(c) {
            Some(&v) => v as f64,
            None => c as f64 * (c as f64).log2(),
        };
    }
    n.log2() - sum / n
}

/// zstd level of the compressibility trial (a negative level: its fast mode).
const TRIAL_LEVEL: i32 = -4;

/// Encode a non-zero block into a record: compressed when that saves at
/// least 1/8 of its size (the rule ZFS applies), raw otherwise. Blocks that
/// [`looks_compressible`] rejects are stored raw without trying. Reuses one
/// compressor per thread.
pub fn seal(raw: &[u8], hash: BlockHash, compression: Compression) -> Sealed {
    seal_inner(raw, None, hash, compression, None)
}

/// [`seal`] a block held in an `Arc`: stored raw, it is shared, not copied.
/// `compressible` is [`looks_compressible`]'s verdict when known (it costs
/// half as much run while the block is still in the CPU cache, right after
/// hashing it).
pub fn seal_shared(
    raw: &Arc<[u8]>,
    hash: BlockHash,
    compression: Compression,
    compressible: Option<bool>,
) -> Sealed {
    seal_inner(raw, Some(raw), hash, compression, compressible)
}

fn seal_inner(
    raw: &[u8],
    arc: Option<&Arc<[u8]>>,
    hash: BlockHash,
    compression: Compression,
    compressible: Option<bool>,
) -> Sealed {
    let raw_len = raw.len() as u32;
    // Compression must save at least 1/8: give zstd only that much room, so
    // blocks that do not compress well enough fail as soon as they overflow it.
    let room = raw.len() - raw.len() / 8;
    let mut record = Vec::with_capacity(RECORD_HEADER_LEN + if arc.is_some() { room } else { raw.len() });
    record.resize(RECORD_HEADER_LEN, 0);
    let mut codec = Codec::Raw;
    let level = match compression {
        Compression::Zstd(level) if compressible.unwrap_or_else(|| looks_compressible(raw)) => Some(level),
        _ => None,
    };
    if let Some(level) = level {
        COMPRESSOR.with(|c| {
            let mut c = c.borrow_mut();
            if c.as_ref().map(|(l, _, _)| *l) != Some(level) {
                *c = Some((
                    level,
                    zstd::bulk::Compressor::new(level).expect("zstd compressor"),
                    Vec::new(),
                ));
            }
            let (_, comp, scratch) = c.as_mut().unwrap();
            if scratch.len() < room {
                scratch.resize(room, 0); // once per thread: the buffer is reused
            }
            if let Ok(n) = comp.compress_to_buffer(raw, &mut scratch[..room]) {
                record.extend_from_slice(&scratch[..n]);
                codec = Codec::Zstd;
            }
        });
    }
    let mut shared = None;
    if codec == Codec::Raw {
        match arc {
            Some(a) => shared = Some(a.clone()),
            None => record.extend_from_slice(raw),
        }
    }
    let stored_len = (record.len() - RECORD_HEADER_LEN + shared.as_ref().map_or(0, |s| s.len())) as u32;
    let header = RecordHeader {
        hash,
        raw_len,
        stored_len,
        codec,
    };
    record[..RECORD_HEADER_LEN].copy_from_slice(&header.encode());
    Sealed {
        hash,
        record,
        shared,
        raw_len,
        stored_len,
        codec,
    }
}

/// [`open`] into shared bytes: a raw payload is verified where it lies and
/// copied once, a compressed one decoded straight into the shared buffer.
pub fn open_shared(
    payload: &[u8],
    codec: Codec,
    raw_len: u32,
    expected: &BlockHash,
) -> Result<Arc<[u8]>, String> {
    match codec {
        Codec::Raw => {
            verify(payload, raw_len, expected)?;
            Ok(payload.into())
        }
        Codec::Zstd => {
            let mut out: Arc<[u8]> = std::iter::repeat_n(0u8, raw_len as usize).collect();
            decompress_into(payload, Arc::get_mut(&mut out).expect("a new Arc is unique"))?;
            verify(&out, raw_len, expected)?;
            Ok(out)
        }
    }
}

/// Check a block's decoded bytes against its record's length and name.
fn verify(raw: &[u8], raw_len: u32, expected: &BlockHash) -> Result<(), String> {
    if raw.len() != raw_len as usize {
        return Err(format!("payload is {} bytes, expected {raw_len}", raw.len()));
    }
    let actual = hash_block(raw);
    if &actual != expected {
        return Err(format!("content hashes to {actual}"));
    }
    Ok(())
}

/// Decode a zstd payload into exactly `out.len()` bytes.
fn decompress_into(payload: &[u8], out: &mut [u8]) -> Result<(), String> {
    let n = DECOMPRESSOR
        .with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new().expect("zstd decompressor"));
            }
            d.as_mut().unwrap().decompress_to_buffer(payload, out)
        })
        .map_err(|e| format!("zstd payload does not decode: {e}"))?;
    if n != out.len() {
        return Err(format!("payload decodes to {n} bytes, expected {}", out.len()));
    }
    Ok(())
}

/// Decode a payload and verify it against `expected`, and give `f` the
/// block's bytes: a raw payload is hashed and handed over where it lies (no
/// copy), a compressed one is decoded into `scratch` first.
pub fn open_with<T>(
    payload: &[u8],
    codec: Codec,
    raw_len: u32,
    expected: &BlockHash,
    scratch: &mut Vec<u8>,
    f: impl FnOnce(&[u8]) -> T,
) -> Result<T, String> {
    let raw = match codec {
        Codec::Raw => payload,
        Codec::Zstd => {
            scratch.resize(raw_len as usize, 0);
            decompress_into(payload, scratch)?;
            &scratch[..]
        }
    };
    verify(raw, raw_len, expected)?;
    Ok(f(raw))
}

/// Decode a payload and verify it against `expected`. `Err` says what failed.
pub fn open(payload: &[u8], codec: Codec, raw_len: u32, expected: &BlockHash) -> Result<Vec<u8>, String> {
    let mut scratch = Vec::new();
    let raw = open_with(payload, codec, raw_len, expected, &mut scratch, |raw| {
        (codec == Codec::Raw).then(|| raw.to_vec())
    })?;
    Ok(raw.unwrap_or(scratch))
}

/// True when every byte is zero (vectorizes well).
pub fn is_zero(buf: &[u8]) -> bool {
    let (chunks, rest) = buf.split_at(buf.len() - buf.len() % 16);
    chunks
        .chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap()) == 0)
        && rest.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_raw_fallback() {
        let text: Vec<u8> = b"geosync ".iter().cycle().take(65536).copied().collect();
        let h = hash_block(&text);
        let s = seal(&text, h, Compression::Zstd(3));
        assert_eq!(s.codec, Codec::Zstd);
        assert!(s.stored_len < 2000);
        let hdr = RecordHeader::decode(s.record[..RECORD_HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(hdr.hash, h);
        let back = open(s.payload(), hdr.codec, hdr.raw_len, &h).unwrap();
        assert_eq!(back, text);

        let mut noise = vec![0u8; 65536];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        let s = seal(&noise, hash_block(&noise), Compression::Zstd(3));
        assert_eq!(s.codec, Codec::Raw);
        assert_eq!(s.stored_len, 65536);
        assert_eq!(s.len(), RECORD_HEADER_LEN + 65536);
        // Shared, not copied: the same record bytes.
        let arc: Arc<[u8]> = noise.clone().into();
        let t = seal_shared(&arc, hash_block(&noise), Compression::Zstd(3), None);
        assert!(Arc::ptr_eq(t.shared.as_ref().unwrap(), &arc));
        assert_eq!(t.parts().collect::<Vec<_>>().concat(), s.record);
        assert_eq!(t.stored_len, 65536);
    }

    #[test]
    fn damaged_records_are_refused() {
        let data = vec![7u8; 4096];
        let h = hash_block(&data);
        let s = seal(&data, h, Compression::Zstd(1));
        let mut hdr: [u8; RECORD_HEADER_LEN] = s.record[..RECORD_HEADER_LEN].try_into().unwrap();
        hdr[40] ^= 1;
        assert!(RecordHeader::decode(&hdr).is_err());
        let mut payload = s.payload().to_vec();
        let last = payload.len() - 1;
        payload[last] ^= 0x40;
        assert!(open(&payload, s.codec, s.raw_len, &h).is_err());
        assert!(open_shared(&payload, s.codec, s.raw_len, &h).is_err());
        assert_eq!(
            &open_shared(s.payload(), s.codec, s.raw_len, &h).unwrap()[..],
            &data[..]
        );
        // Decodes, but to other bytes; or to fewer than the header says.
        let other = seal(&[8u8; 4096], hash_block(&[8u8; 4096]), Compression::Zstd(1));
        let e = open_shared(other.payload(), other.codec, 4096, &h).unwrap_err();
        assert!(e.contains("content hashes to"), "{e}");
        let short = seal(&[8u8; 2048], hash_block(&[8u8; 2048]), Compression::Zstd(1));
        assert!(open_shared(short.payload(), short.codec, 4096, &h).is_err());
        assert!(open(&vec![7u8; 4096], Codec::Raw, 4096, &hash_block(b"other")).is_err());
    }

    #[test]
    fn compressibility_heuristic() {
        let mut noise = vec![0u8; 65536];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        assert!(!looks_compressible(&noise));
        // Random bytes with an 8-byte header every 256 and a few zeros every
        // 512 (what fio writes): not worth it.
        let mut fio = noise.clone();
        for (i, c) in fio.chunks_mut(256).enumerate() {
            c[..8].copy_from_slice(&(i as u64 * 256).to_le_bytes());
            if i % 2 == 0 {
                c[48..56].fill(0);
            }
        }
        assert!(!looks_compressible(&fio));
        assert_eq!(
            seal(&fio, hash_block(&fio), Compression::Zstd(3)).codec,
            Codec::Raw
        );
        // The same 4 KiB of noise repeated: the sample repeats.
        let rep: Vec<u8> = noise[..4096].iter().cycle().take(65536).copied().collect();
        assert!(looks_compressible(&rep));
        assert_eq!(
            seal(&rep, hash_block(&rep), Compression::Zstd(3)).codec,
            Codec::Zstd
        );
        // Text and machine code have skewed byte distributions.
        let text: Vec<u8> = (0..65536u32)
            .map(|i| b"the quick brown fox jumps over the lazy dog "[(i * 7 % 44) as usize])
            .collect();
        assert!(looks_compressible(&text));
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let code = &exe[exe.len() / 2..exe.len() / 2 + 65536];
        assert!(looks_compressible(code));
    }

    #[test]
    fn compression_setting_parses() {
        assert_eq!("zstd:3".parse::<Compression>().unwrap(), Compression::Zstd(3));
        assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::Zstd(3));
        assert_eq!("none".parse::<Compression>().unwrap(), Compression::None);
        assert!("zstd:99".parse::<Compression>().is_err());
        assert!("lz4".parse::<Compression>().is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 65536]));
        let mut b = vec![0u8; 65537];
        b[65536] = 1;
        assert!(!is_zero(&b));
        b[65536] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
    }
}
