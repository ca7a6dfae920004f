//! geosync wire protocol — sans-I/O.
//!
//! This crate does no I/O and reads no clock: callers pass `now` in. Today it
//! holds the vocabulary shared by the store and (later) the replication
//! protocol: node identities and hybrid-logical-clock stamps, which order
//! image versions across sites for the newest-wins rule.
//!
//! - [`wire`]: the message types and their one codec (hard size limits,
//!   total decoding).
//! - [`sync`]: the replication state machine (events and `now` in, actions
//!   out): catalogs, pulls of missing blocks, newest wins, pacing, leases.
//! - [`serve`]: the answering side, over a [`serve::Source`] trait.
#![deny(missing_docs)]

pub mod serve;
pub mod sync;
pub mod wire;

use std::fmt;

/// Version of the wire protocol, exchanged in the handshake (issue 4).
/// 2: `Hello` carries the sender's block size.
pub const PROTOCOL_VERSION: u32 = 2;

/// Identity of a node (a store / a site): 16 bytes. Once `syncd` exists this
/// is the truncated BLAKE3 of the node's public key; a store created before a
/// key exists gets a random id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub [u8; 16]);

impl NodeId {
    /// Parse 32 lowercase or uppercase hex digits.
    pub fn from_hex(s: &str) -> Result<Self, ParseError> {
        let bytes = s.as_bytes();
        if bytes.len() != 32 {
            return Err(ParseError::NodeId(s.to_string()));
        }
        let mut out = [0u8; 16];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(|| ParseError::NodeId(s.to_string()))?;
            let lo = hex_val(pair[1]).ok_or_else(|| ParseError::NodeId(s.to_string()))?;
            out[i] = (hi << 4) | lo;
        }
        Ok(NodeId(out))
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// A hybrid logical clock reading: wall-clock milliseconds plus a counter
/// that orders events within (or despite a backwards step of) the wall clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch (never decreases).
    pub wall_ms: u64,
    /// Tie-breaker within one `wall_ms`.
    pub counter: u32,
}

impl Hlc {
    /// The next reading after `self` given the local wall clock `now_ms`:
    /// strictly greater than `self`, and at least `now_ms`.
    pub fn tick(self, now_ms: u64) -> Hlc {
        if now_ms > self.wall_ms {
            Hlc {
                wall_ms: now_ms,
                counter: 0,
            }
        } else {
            Hlc {
                wall_ms: self.wall_ms,
                counter: self.counter,
            }
            .next()
        }
    }

    /// The reading right after this one (a full counter carries into the
    /// wall clock, so a peer's stamp can never make the clock wrap; the
    /// last reading of all stays the last, never going back).
    fn next(self) -> Hlc {
        match (self.counter.checked_add(1), self.wall_ms.checked_add(1)) {
            (Some(c), _) => Hlc {
                wall_ms: self.wall_ms,
                counter: c,
            },
            (None, Some(w)) => Hlc {
                wall_ms: w,
                counter: 0,
            },
            (None, None) => self,
        }
    }

    /// Merge a reading received from another node (the HLC receive rule):
    /// the result is greater than both `self` and `remote`.
    pub fn observe(self, remote: Hlc, now_ms: u64) -> Hlc {
        let wall = now_ms.max(self.wall_ms).max(remote.wall_ms);
        let base = match (wall == self.wall_ms, wall == remote.wall_ms) {
            (true, true) => self.counter.max(remote.counter),
            (true, false) => self.counter,
            (false, true) => remote.counter,
            (false, false) => {
                return Hlc {
                    wall_ms: wall,
                    counter: 0,
                }
            }
        };
        Hlc {
            wall_ms: wall,
            counter: base,
        }
        .next()
    }
}

/// The stamp of one committed image version: when (HLC) and where (origin).
/// Stamps are totally ordered; the origin breaks exact HLC ties.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Stamp {
    /// Hybrid logical clock at commit.
    pub hlc: Hlc,
    /// Node that made the commit.
    pub origin: NodeId,
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}@{}",
            self.hlc.wall_ms,
            self.hlc.counter,
            &self.origin.to_string()[..8]
        )
    }
}

/// Errors parsing protocol vocabulary.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// A node id must be 32 hex digits.
    #[error("invalid node id {0:?}: expected 32 hex digits")]
    NodeId(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hlc_never_goes_backwards() {
        let a = Hlc::default().tick(1000);
        assert_eq!(
            a,
            Hlc {
                wall_ms: 1000,
                counter: 0
            }
        );
        // The wall clock steps back: the counter keeps order.
        let b = a.tick(500);
        assert!(b > a);
        assert_eq!(b.wall_ms, 1000);
        let c = b.tick(2000);
        assert!(c > b);
        assert_eq!(c.counter, 0);
    }

    #[test]
    fn hlc_observe_exceeds_both() {
        let local = Hlc {
            wall_ms: 100,
            counter: 5,
        };
        let remote = Hlc {
            wall_ms: 100,
            counter: 9,
        };
        let m = local.observe(remote, 50);
        assert!(m > local && m > remote);
        let far = Hlc {
            wall_ms: 10_000,
            counter: 0,
        };
        assert!(local.observe(far, 50) > far);
    }

    #[test]
    fn a_full_counter_carries_into_the_wall_clock() {
        let max = Hlc {
            wall_ms: 5_000,
            counter: u32::MAX,
        };
        let local = Hlc {
            wall_ms: 4_000,
            counter: 0,
        };
        let m = local.observe(max, 1_000);
        assert!(m > max, "{m:?}");
        assert!(max.tick(1_000) > max);
        // The last reading of all: the clock stays there, never goes back.
        let end = Hlc {
            wall_ms: u64::MAX,
            counter: u32::MAX,
        };
        assert_eq!(local.observe(end, 1_000), end);
        assert_eq!(end.tick(1_000), end);
    }

    #[test]
    fn node_id_hex_round_trip() {
        let id = NodeId([0xab; 16]);
        assert_eq!(NodeId::from_hex(&id.to_string()).unwrap(), id);
        assert!(NodeId::from_hex("xyz").is_err());
        assert!(NodeId::from_hex(&"g".repeat(32)).is_err());
    }
}
