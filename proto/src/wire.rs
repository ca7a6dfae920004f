//! Wire messages and their one codec.
//!
//! A frame is `u32 LE length | u8 kind | body`, where `length` counts the
//! kind byte and the body. Decoding is total: any byte string yields a
//! message, "need more bytes", or a [`DecodeError`] — never a panic, and
//! never an allocation larger than the input justifies: a frame longer than
//! [`MAX_FRAME`] is refused from its length prefix alone, and every element
//! count is checked against the bytes that remain before anything is
//! allocated.
//!
//! Integers are little-endian; strings are `u16 length | UTF-8`; byte
//! strings are `u32 length | bytes`; lists are `u32 count | elements`.

use crate::{Hlc, NodeId, Stamp};

/// Largest frame (length prefix value) accepted: 16 MiB — a block (≤ 4 MiB
/// raw, stored compressed or raw) plus headroom, or a batch of map rows.
pub const MAX_FRAME: usize = 16 << 20;
/// Longest image or snapshot name.
pub const MAX_NAME: usize = 128;

/// A block's name on the wire.
pub type Hash = [u8; 32];

/// One image in a catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Image name.
    pub name: String,
    /// The sender's version of it.
    pub version: u64,
    /// Stamp of that version.
    pub stamp: Stamp,
    /// Logical size.
    pub size: u64,
    /// A deletion (tombstone) rather than a live image.
    pub deleted: bool,
}

/// One changed block in a map diff: `None` is a hole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapChange {
    /// Block index.
    pub block: u64,
    /// New content.
    pub hash: Option<Hash>,
}

/// Everything peers say to each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First message on a connection, both ways.
    Hello {
        /// [`crate::PROTOCOL_VERSION`] of the sender.
        version: u32,
        /// The sender's node id (also pinned by its TLS certificate).
        node: NodeId,
        /// The sender's store block size in bytes: maps are arrays of
        /// blocks, so only stores with the same block size replicate.
        block_size: u32,
    },
    /// "Send me catalog changes after sequence number `since`."
    CatalogRequest {
        /// Last sequence number seen from this peer (0: everything).
        since: u64,
    },
    /// Catalog changes, up to sequence number `seq`.
    Catalog {
        /// The sender's change sequence number these entries bring us to.
        seq: u64,
        /// Changed images.
        entries: Vec<CatalogEntry>,
        /// More `Catalog` frames follow on this stream.
        more: bool,
    },
    /// "Send me your head of `image`; mine is the version stamped `have`."
    PullRequest {
        /// Image name.
        image: String,
        /// Stamp of the requester's head of this image, if it has one.
        have: Option<Stamp>,
    },
    /// Part of the sender's head map of `image`. If `base_known`, the
    /// sender's history holds the version the requester named in `have`:
    /// `changes` are the blocks that changed since, and every block outside
    /// `live` is a hole. Otherwise `changes` is the whole map.
    MapDiff {
        /// Image name.
        image: String,
        /// The requester's `have` is in the sender's history of the image
        /// (the head descends from it, or kept it as a snapshot).
        base_known: bool,
        /// Stamp of the head these changes lead to.
        stamp: Stamp,
        /// Its size.
        size: u64,
        /// Changed blocks.
        changes: Vec<MapChange>,
        /// Extents `[start, end)` of block indexes that hold data (part of
        /// the list; frames add up).
        live: Vec<(u64, u64)>,
        /// Whether more `MapDiff` frames follow for this version.
        more: bool,
    },
    /// "Send me these blocks." The answer is one `Block` or `Error` per
    /// hash, in order.
    BlockRequest {
        /// Block names.
        hashes: Vec<Hash>,
    },
    /// One block, as stored (compressed or raw).
    Block {
        /// Its name (the receiver verifies it).
        hash: Hash,
        /// Storage codec (0 raw, 1 zstd).
        codec: u8,
        /// Raw length.
        raw_len: u32,
        /// Stored bytes.
        payload: Vec<u8>,
    },
    /// "Pull `image` from me now, whatever your pacing says" (a project
    /// move). Answered by `Ok` or `Error`.
    Offer {
        /// Image name.
        image: String,
    },
    /// A request was accepted.
    Ok,
    /// A refusal or failure; the connection may continue.
    Error {
        /// Machine-readable code.
        code: u16,
        /// Human-readable message.
        message: String,
    },
}

/// Why bytes did not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The length prefix exceeds [`MAX_FRAME`] (refused before allocating).
    #[error("frame of {0} bytes exceeds the {max} byte limit", max = MAX_FRAME)]
    TooLarge(usize),
    /// A zero-length frame (no kind byte).
    #[error("empty frame")]
    Empty,
    /// An unknown message kind.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The body ended before a field did.
    #[error("message body is truncated")]
    Truncated,
    /// The body has bytes after its last field.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// A string is not UTF-8.
    #[error("string is not UTF-8")]
    BadUtf8,
    /// A field value is out of range (name too long, bad flag, ...).
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

const K_HELLO: u8 = 1;
const K_CATALOG_REQUEST: u8 = 2;
const K_CATALOG: u8 = 3;
const K_PULL_REQUEST: u8 = 4;
const K_MAP_DIFF: u8 = 5;
const K_BLOCK_REQUEST: u8 = 6;
const K_BLOCK: u8 = 7;
const K_ERROR: u8 = 8;
const K_OFFER: u8 = 9;
const K_OK: u8 = 10;

/// Error codes carried by [`Message::Error`].
pub mod code {
    /// The request was malformed or out of order.
    pub const BAD_REQUEST: u16 = 400;
    /// The peer may not do this (pull or push policy).
    pub const FORBIDDEN: u16 = 403;
    /// No such image or block.
    pub const NOT_FOUND: u16 = 404;
    /// The other side speaks another protocol version.
    pub const VERSION: u16 = 426;
    /// The two stores' block sizes differ: they cannot replicate.
    pub const BLOCK_SIZE: u16 = 412;
    /// The sender failed (store error); try again later.
    pub const INTERNAL: u16 = 500;
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u16(s.len() as u16);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn name(&mut self, s: &str) {
        assert!(!s.is_empty() && s.len() <= MAX_NAME, "name {s:?} cannot be sent");
        self.str(s);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn opt_stamp(&mut self, v: &Option<Stamp>) {
        match v {
            None => self.u8(0),
            Some(x) => {
                self.u8(1);
                self.stamp(x);
            }
        }
    }
    fn stamp(&mut self, s: &Stamp) {
        self.u64(s.hlc.wall_ms);
        self.u32(s.hlc.counter);
        self.0.extend_from_slice(&s.origin.0);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid("boolean is neither 0 nor 1")),
        }
    }
    fn str(&mut self, max: usize) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(DecodeError::Invalid("string too long"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| DecodeError::BadUtf8)
    }
    fn name(&mut self) -> Result<String, DecodeError> {
        let s = self.str(MAX_NAME)?;
        if s.is_empty() {
            return Err(DecodeError::Invalid("empty name"));
        }
        Ok(s)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn hash(&mut self) -> Result<Hash, DecodeError> {
        Ok(self.take(32)?.try_into().unwrap())
    }
    fn opt_stamp(&mut self) -> Result<Option<Stamp>, DecodeError> {
        Ok(if self.bool()? { Some(self.stamp()?) } else { None })
    }
    fn stamp(&mut self) -> Result<Stamp, DecodeError> {
        Ok(Stamp {
            hlc: Hlc {
                wall_ms: self.u64()?,
                counter: self.u32()?,
            },
            origin: NodeId(self.take(16)?.try_into().unwrap()),
        })
    }
    /// A list count, checked against what remains (each element is at least
    /// `min_elem` bytes), so a forged count cannot make us allocate.
    fn count(&mut self, min_elem: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_elem) > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }
}

impl Message {
    /// Append this message as one frame to `out`.
    ///
    /// Panics if the message cannot be framed (a name over [`MAX_NAME`] bytes,
    /// a frame over [`MAX_FRAME`]): senders build messages from validated data.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let mut w = Writer(out);
        match self {
            Message::Hello {
                version,
                node,
                block_size,
            } => {
                w.u8(K_HELLO);
                w.u32(*version);
                w.0.extend_from_slice(&node.0);
                w.u32(*block_size);
            }
            Message::CatalogRequest { since } => {
                w.u8(K_CATALOG_REQUEST);
                w.u64(*since);
            }
            Message::Catalog { seq, entries, more } => {
                w.u8(K_CATALOG);
                w.u64(*seq);
                w.u8(*more as u8);
                w.u32(entries.len() as u32);
                for e in entries {
                    w.name(&e.name);
                    w.u64(e.version);
                    w.stamp(&e.stamp);
                    w.u64(e.size);
                    w.u8(e.deleted as u8);
                }
            }
            Message::PullRequest { image, have } => {
                w.u8(K_PULL_REQUEST);
                w.name(image);
                w.opt_stamp(have);
            }
            Message::MapDiff {
                image,
                base_known,
                stamp,
                size,
                changes,
                live,
                more,
            } => {
                w.u8(K_MAP_DIFF);
                w.name(image);
                w.u8(*base_known as u8);
                w.stamp(stamp);
                w.u64(*size);
                w.u8(*more as u8);
                w.u32(changes.len() as u32);
                for c in changes {
                    w.u64(c.block);
                    match &c.hash {
                        None => w.u8(0),
                        Some(h) => {
                            w.u8(1);
                            w.0.extend_from_slice(h);
                        }
                    }
                }
                w.u32(live.len() as u32);
                for (a, b) in live {
                    w.u64(*a);
                    w.u64(*b);
                }
            }
            Message::BlockRequest { hashes } => {
                w.u8(K_BLOCK_REQUEST);
                w.u32(hashes.len() as u32);
                for h in hashes {
                    w.0.extend_from_slice(h);
                }
            }
            Message::Block {
                hash,
                codec,
                raw_len,
                payload,
            } => {
                w.u8(K_BLOCK);
                w.0.extend_from_slice(hash);
                w.u8(*codec);
                w.u32(*raw_len);
                w.bytes(payload);
            }
            Message::Offer { image } => {
                w.u8(K_OFFER);
                w.name(image);
            }
            Message::Ok => w.u8(K_OK),
            Message::Error { code, message } => {
                w.u8(K_ERROR);
                w.u16(*code);
                // At most 1 KiB, cut at a character boundary.
                let mut end = message.len().min(1024);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                w.str(&message[..end]);
            }
        }
        let len = out.len() - start - 4;
        assert!(len <= MAX_FRAME, "frame of {len} bytes exceeds MAX_FRAME");
        out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    }

    /// Decode one frame from the front of `buf`: `Ok(None)` if more bytes are
    /// needed, else the message and how many bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
        if len > MAX_FRAME {
            return Err(DecodeError::TooLarge(len));
        }
        if len == 0 {
            return Err(DecodeError::Empty);
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        let mut r = Reader {
            buf: &buf[4..4 + len],
        };
        let msg = match r.u8()? {
            K_HELLO => Message::Hello {
                version: r.u32()?,
                node: NodeId(r.take(16)?.try_into().unwrap()),
                block_size: r.u32()?,
            },
            K_CATALOG_REQUEST => Message::CatalogRequest { since: r.u64()? },
            K_CATALOG => {
                let seq = r.u64()?;
                let more = r.bool()?;
                let n = r.count(2 + 8 + 28 + 8 + 1)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(CatalogEntry {
                        name: r.name()?,
                        version: r.u64()?,
                        stamp: r.stamp()?,
                        size: r.u64()?,
                        deleted: r.bool()?,
                    });
                }
                Message::Catalog { seq, entries, more }
            }
            K_PULL_REQUEST => Message::PullRequest {
                image: r.name()?,
                have: r.opt_stamp()?,
            },
            K_MAP_DIFF => {
                let image = r.name()?;
                let base_known = r.bool()?;
                let stamp = r.stamp()?;
                let size = r.u64()?;
                let more = r.bool()?;
                let n = r.count(9)?;
                let mut changes = Vec::with_capacity(n);
                for _ in 0..n {
                    let block = r.u64()?;
                    let hash = if r.bool()? { Some(r.hash()?) } else { None };
                    changes.push(MapChange { block, hash });
                }
                let n = r.count(16)?;
                let mut live = Vec::with_capacity(n);
                for _ in 0..n {
                    let (a, b) = (r.u64()?, r.u64()?);
                    if a >= b {
                        return Err(DecodeError::Invalid("empty or reversed extent"));
                    }
                    live.push((a, b));
                }
                Message::MapDiff {
                    image,
                    base_known,
                    stamp,
                    size,
                    changes,
                    live,
                    more,
                }
            }
            K_BLOCK_REQUEST => {
                let n = r.count(32)?;
                let mut hashes = Vec::with_capacity(n);
                for _ in 0..n {
                    hashes.push(r.hash()?);
                }
                Message::BlockRequest { hashes }
            }
            K_BLOCK => {
                let hash = r.hash()?;
                let codec = r.u8()?;
                if codec > 1 {
                    return Err(DecodeError::Invalid("unknown block codec"));
                }
                let raw_len = r.u32()?;
                if raw_len == 0 || raw_len > 4 << 20 {
                    return Err(DecodeError::Invalid("block length out of range"));
                }
                Message::Block {
                    hash,
                    codec,
                    raw_len,
                    payload: r.bytes()?,
                }
            }
            K_OFFER => Message::Offer { image: r.name()? },
            K_OK => Message::Ok,
            K_ERROR => Message::Error {
                code: r.u16()?,
                message: r.str(1024)?,
            },
            k => return Err(DecodeError::UnknownKind(k)),
        };
        if !r.buf.is_empty() {
            return Err(DecodeError::Trailing(r.buf.len()));
        }
        Ok(Some((msg, 4 + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stamp() -> impl Strategy<Value = Stamp> {
        (any::<u64>(), any::<u32>(), any::<[u8; 16]>()).prop_map(|(w, c, o)| Stamp {
            hlc: Hlc {
                wall_ms: w,
                counter: c,
            },
            origin: NodeId(o),
        })
    }

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9][A-Za-z0-9._-]{0,40}"
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u32>(), any::<[u8; 16]>(), any::<u32>()).prop_map(|(version, n, block_size)| {
                Message::Hello {
                    version,
                    node: NodeId(n),
                    block_size,
                }
            }),
            any::<u64>().prop_map(|since| Message::CatalogRequest { since }),
            (
                any::<u64>(),
                prop::collection::vec(
                    (name(), any::<u64>(), stamp(), any::<u64>(), any::<bool>()).prop_map(
                        |(name, version, stamp, size, deleted)| CatalogEntry {
                            name,
                            version,
                            stamp,
                            size,
                            deleted
                        }
                    ),
                    0..8
                ),
                any::<bool>()
            )
                .prop_map(|(seq, entries, more)| Message::Catalog { seq, entries, more }),
            (name(), prop::option::of(stamp()))
                .prop_map(|(image, have)| Message::PullRequest { image, have }),
            (
                name(),
                any::<bool>(),
                stamp(),
                any::<u64>(),
                prop::collection::vec(
                    (any::<u64>(), any::<Option<[u8; 32]>>())
                        .prop_map(|(block, hash)| MapChange { block, hash }),
                    0..20
                ),
                prop::collection::vec((0u64..1 << 40, 1u64..1000).prop_map(|(a, n)| (a, a + n)), 0..5),
                any::<bool>()
            )
                .prop_map(|(image, base_known, stamp, size, changes, live, more)| {
                    Message::MapDiff {
                        image,
                        base_known,
                        stamp,
                        size,
                        changes,
                        live,
                        more,
                    }
                }),
            name().prop_map(|image| Message::Offer { image }),
            Just(Message::Ok),
            prop::collection::vec(any::<[u8; 32]>(), 0..10)
                .prop_map(|hashes| Message::BlockRequest { hashes }),
            (
                any::<[u8; 32]>(),
                0u8..2,
                1u32..(4 << 20),
                prop::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(hash, codec, raw_len, payload)| Message::Block {
                    hash,
                    codec,
                    raw_len,
                    payload
                }),
            (any::<u16>(), ".{0,50}").prop_map(|(code, message)| Message::Error { code, message }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_and_every_prefix_is_safe(m in message()) {
            let mut buf = Vec::new();
            m.encode(&mut buf);
            let (back, used) = Message::decode(&buf).unwrap().unwrap();
            prop_assert_eq!(&back, &m);
            prop_assert_eq!(used, buf.len());
            for cut in 0..buf.len() {
                prop_assert_eq!(Message::decode(&buf[..cut]), Ok(None));
            }
            // Two frames back to back decode one at a time.
            let mut two = buf.clone();
            m.encode(&mut two);
            prop_assert_eq!(Message::decode(&two).unwrap().unwrap().1, buf.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn damaged_frames_are_errors_not_panics(m in message(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut buf = Vec::new();
            m.encode(&mut buf);
            let i = 4 + pos.index(buf.len() - 4);
            buf[i] = byte;
            let _ = Message::decode(&buf);
        }
    }

    #[test]
    fn a_long_error_message_is_cut_at_a_character_boundary() {
        // 1 KiB is kept; a character straddling that cut goes whole.
        let message = format!("{}é and more", "a".repeat(1023));
        let mut buf = Vec::new();
        Message::Error { code: 500, message }.encode(&mut buf);
        let (back, _) = Message::decode(&buf).unwrap().unwrap();
        assert_eq!(
            back,
            Message::Error {
                code: 500,
                message: "a".repeat(1023)
            }
        );
    }

    #[test]
    fn oversized_frames_are_refused_from_the_prefix() {
        let mut buf = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        buf.push(K_BLOCK);
        assert_eq!(Message::decode(&buf), Err(DecodeError::TooLarge(MAX_FRAME + 1)));
        assert_eq!(Message::decode(&[0, 0, 0, 0]), Err(DecodeError::Empty));
        assert_eq!(
            Message::decode(&[1, 0, 0, 0, 99]),
            Err(DecodeError::UnknownKind(99))
        );
    }

    #[test]
    fn forged_counts_do_not_allocate() {
        // A block request claiming 2^32-1 hashes in a 5-byte body.
        let mut buf = Vec::new();
        buf.extend_from_slice(&5u32.to_le_bytes());
        buf.push(K_BLOCK_REQUEST);
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Message::decode(&buf), Err(DecodeError::Truncated));
    }

    #[test]
    fn bad_fields_are_named() {
        let mut buf = Vec::new();
        Message::PullRequest {
            image: "ok".into(),
            have: None,
        }
        .encode(&mut buf);
        let mut bad = buf.clone();
        bad[7] = 0xff; // inside the UTF-8 name
        assert_eq!(Message::decode(&bad), Err(DecodeError::BadUtf8));
        let mut trailing = buf.clone();
        trailing.push(0);
        trailing[0] += 1;
        assert_eq!(Message::decode(&trailing), Err(DecodeError::Trailing(1)));
        let mut flag = buf;
        let last = flag.len() - 1;
        flag[last] = 7; // the Option tag
        assert!(matches!(Message::decode(&flag), Err(DecodeError::Invalid(_))));
    }
}
