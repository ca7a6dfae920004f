//! The serving side: one request in, its reply frames out. Stateless; the
//! store is reached through [`Source`], so the same code answers real peers
//! in `syncd` and simulated ones in the tests.
//!
//! Every request is checked against the requesting peer's [`Policy`]
//! before anything is read: a catalog lists only images the peer may pull,
//! and a pull of any other image is refused with `FORBIDDEN` — the same
//! answer as for an image that does not exist, so names do not leak.
//! Blocks are asked for by hash alone: a peer that may pull no image at all
//! gets `FORBIDDEN` for each (one that may pull some image can still fetch
//! any block whose hash it knows: per-image checks are not done).
//! A frame that is not a request is a [`Violation`]: the driver closes the
//! connection.

use crate::sync::{kind_name, Policy};
use crate::wire::{code, CatalogEntry, Hash, MapChange, Message};
use crate::Stamp;

/// Catalog entries per `Catalog` frame.
pub const CATALOG_CHUNK: usize = 4096;
/// Map changes per `MapDiff` frame (each at most 41 bytes on the wire).
pub const MAP_CHUNK: usize = 65536;
/// Longest `BlockRequest` served.
pub const MAX_BATCH: usize = 256;

/// A map as the sender serves it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapView {
    /// The requester's `have` is in our history of the image.
    pub base_known: bool,
    /// Stamp of our head.
    pub stamp: Stamp,
    /// Its size.
    pub size: u64,
    /// Blocks changed since `have` (or all blocks).
    pub changes: Vec<MapChange>,
    /// Extents of blocks holding data.
    pub live: Vec<(u64, u64)>,
}

/// A block as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBlock {
    /// Codec (0 raw, 1 zstd).
    pub codec: u8,
    /// Raw length.
    pub raw_len: u32,
    /// Stored bytes.
    pub payload: Vec<u8>,
}

/// What the serving side reads from the store.
pub trait Source {
    /// Entries of images changed after `since`, and the sequence number
    /// they bring the reader to.
    fn catalog_since(&self, since: u64) -> Result<(u64, Vec<CatalogEntry>), String>;
    /// The head map of `image` relative to the version stamped `have`, if
    /// our history holds it; `None` if there is no such image.
    fn map(&self, image: &str, have: Option<Stamp>) -> Result<Option<MapView>, String>;
    /// A block by name.
    fn block(&self, hash: &Hash) -> Result<Option<StoredBlock>, String>;
}

/// The peer sent something that is not a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("protocol violation: {0}")]
pub struct Violation(pub String);

fn err(code: u16, message: impl Into<String>) -> Message {
    Message::Error {
        code,
        message: message.into(),
    }
}

/// Answer one request from a peer with `policy`. `emit` receives the reply
/// frames in order (a block reply streams one frame per block). Returns the
/// image of an accepted [`Message::Offer`]: the driver must then pull it
/// from that peer at once ([`crate::sync::Event::Force`]).
pub fn serve(
    policy: &Policy,
    req: &Message,
    src: &dyn Source,
    emit: &mut dyn FnMut(Message),
) -> Result<Option<String>, Violation> {
    match req {
        Message::Offer { image } => {
            if policy.may_push(image) {
                emit(Message::Ok);
                return Ok(Some(image.clone()));
            }
            emit(err(
                code::FORBIDDEN,
                format!("you may not push {image:?} to this node"),
            ));
        }
        Message::CatalogRequest { since } => match src.catalog_since(*since) {
            Ok((seq, entries)) => {
                let visible: Vec<CatalogEntry> =
                    entries.into_iter().filter(|e| policy.may_pull(&e.name)).collect();
                let mut chunks = visible.chunks(CATALOG_CHUNK).peekable();
                if chunks.peek().is_none() {
                    emit(Message::Catalog {
                        seq,
                        entries: vec![],
                        more: false,
                    });
                }
                while let Some(c) = chunks.next() {
                    emit(Message::Catalog {
                        seq,
                        entries: c.to_vec(),
                        more: chunks.peek().is_some(),
                    });
                }
            }
            Err(e) => emit(err(code::INTERNAL, e)),
        },
        Message::PullRequest { image, have } => {
            if !policy.may_pull(image) {
                emit(err(code::FORBIDDEN, format!("no image {image:?} you may pull")));
                return Ok(None);
            }
            match src.map(image, *have) {
                Ok(Some(v)) => {
                    let n = v.changes.len().max(v.live.len());
                    let frames = n.div_ceil(MAP_CHUNK).max(1);
                    for i in 0..frames {
                        let r = |len: usize| (i * MAP_CHUNK).min(len)..((i + 1) * MAP_CHUNK).min(len);
                        emit(Message::MapDiff {
                            image: image.clone(),
                            base_known: v.base_known,
                            stamp: v.stamp,
                            size: v.size,
                            changes: v.changes[r(v.changes.len())].to_vec(),
                            live: v.live[r(v.live.len())].to_vec(),
                            more: i + 1 < frames,
                        });
                    }
                }
                Ok(None) => emit(err(code::FORBIDDEN, format!("no image {image:?} you may pull"))),
                Err(e) => emit(err(code::INTERNAL, e)),
            }
        }
        Message::BlockRequest { hashes } => {
            if hashes.len() > MAX_BATCH {
                return Err(Violation(format!(
                    "block request for {} blocks (limit {MAX_BATCH})",
                    hashes.len()
                )));
            }
            if policy.pull.is_empty() {
                // It is named in no map this peer may read. One answer per
                // hash, as the requester counts them.
                for _ in hashes {
                    emit(err(code::FORBIDDEN, "you may pull no image from this node"));
                }
                return Ok(None);
            }
            for h in hashes {
                match src.block(h) {
                    Ok(Some(b)) => emit(Message::Block {
                        hash: *h,
                        codec: b.codec,
                        raw_len: b.raw_len,
                        payload: b.payload,
                    }),
                    Ok(None) => emit(err(code::NOT_FOUND, "no such block")),
                    Err(e) => emit(err(code::INTERNAL, e)),
                }
            }
        }
        other => {
            return Err(Violation(format!("{} is not a request", kind_name(other))));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Has every block; counts the reads.
    struct AllBlocks(Cell<usize>);

    impl Source for AllBlocks {
        fn catalog_since(&self, since: u64) -> Result<(u64, Vec<CatalogEntry>), String> {
            Ok((since, vec![]))
        }
        fn map(&self, _: &str, _: Option<Stamp>) -> Result<Option<MapView>, String> {
            Ok(None)
        }
        fn block(&self, _: &Hash) -> Result<Option<StoredBlock>, String> {
            self.0.set(self.0.get() + 1);
            Ok(Some(StoredBlock {
                codec: 0,
                raw_len: 1,
                payload: vec![7],
            }))
        }
    }

    fn ask(policy: &Policy, src: &AllBlocks) -> Vec<Message> {
        let req = Message::BlockRequest {
            hashes: vec![[1; 32], [2; 32]],
        };
        let mut out = Vec::new();
        serve(policy, &req, src, &mut |m| out.push(m)).unwrap();
        out
    }

    #[test]
    fn a_peer_that_may_pull_nothing_gets_no_block() {
        let src = AllBlocks(Cell::new(0));
        let push_only = Policy {
            pull: vec![],
            push: vec!["*".into()],
        };
        let r = ask(&push_only, &src);
        assert_eq!(r.len(), 2, "one answer per hash: {r:?}");
        assert!(
            r.iter()
                .all(|m| matches!(m, Message::Error { code, .. } if *code == code::FORBIDDEN)),
            "{r:?}"
        );
        assert_eq!(src.0.get(), 0, "nothing read");

        let puller = Policy {
            pull: vec!["pub-*".into()],
            push: vec![],
        };
        let r = ask(&puller, &src);
        assert!(r.iter().all(|m| matches!(m, Message::Block { .. })), "{r:?}");
        assert_eq!(src.0.get(), 2);
    }
}
