//! Piece proofs: verifying part of a block without reading all of it.
//!
//! A block is named by BLAKE3 of its bytes, and BLAKE3 is a hash tree: every
//! aligned 4 KiB piece of the input is a subtree whose chaining value the
//! tree's root is built from. A [`Proof`] keeps those chaining values, checked
//! once against the block's name when the whole block was read. After that a
//! read of a few pieces of the block is verified by hashing only those
//! pieces (~1 µs per 4 KiB): a random 4 KiB read of a stored raw block reads
//! one page from its pack instead of the whole 64 KiB block, and hashes one
//! page instead of sixteen. Nothing here does I/O.

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::BlockHash;

/// Bytes of a piece: a subtree of the block's hash tree (and a page).
pub const PIECE: usize = 4096;

/// The chaining values of a block's pieces, checked against its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    pieces: Box<[ChainingValue]>,
}

/// The chaining value of the piece at byte `offset` of a block.
fn piece_cv(offset: usize, bytes: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset as u64);
    h.update(bytes);
    h.finalize_non_root()
}

/// The chaining value of the subtree made of `cvs` (pieces, in order): a
/// BLAKE3 tree's left subtree holds the largest power of two of chunks that
/// leaves some for the right one.
fn subtree(cvs: &[ChainingValue]) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (l, r) = split(cvs);
    merge_subtrees_non_root(&subtree(l), &subtree(r), Mode::Hash)
}

fn split(cvs: &[ChainingValue]) -> (&[ChainingValue], &[ChainingValue]) {
    let left = left_subtree_len((cvs.len() * PIECE) as u64) as usize / PIECE;
    cvs.split_at(left)
}

impl Proof {
    /// The proof of `data` if its BLAKE3 is `hash`: `None` when the bytes
    /// do not hash to it, or are not at least two whole pieces (a shorter
    /// block is read whole anyway; an uneven tail is not a subtree).
    pub fn build(data: &[u8], hash: &BlockHash) -> Option<Proof> {
        if !Proof::applies(data.len()) {
            return None;
        }
        let pieces: Box<[ChainingValue]> = data
            .chunks(PIECE)
            .enumerate()
            .map(|(i, p)| piece_cv(i * PIECE, p))
            .collect();
        let (l, r) = split(&pieces);
        let root = merge_subtrees_root(&subtree(l), &subtree(r), Mode::Hash);
        (root.as_bytes() == &hash.0).then_some(Proof { pieces })
    }

    /// Whether a block of `len` bytes has a proof: two or more whole pieces.
    pub fn applies(len: usize) -> bool {
        len >= 2 * PIECE && len.is_multiple_of(PIECE)
    }

    /// Bytes of the block this proves.
    pub fn len(&self) -> usize {
        self.pieces.len() * PIECE
    }

    /// Whether it proves no bytes (never: [`Proof::build`] needs two pieces).
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Bytes the proof itself takes in memory.
    pub fn footprint(&self) -> usize {
        std::mem::size_of::<Proof>() + self.pieces.len() * std::mem::size_of::<ChainingValue>()
    }

    /// The pieces holding bytes `from..to` of the block, as a byte range.
    pub fn span(&self, from: usize, to: usize) -> std::ops::Range<usize> {
        (from / PIECE * PIECE)..to.div_ceil(PIECE).min(self.pieces.len()) * PIECE
    }

    /// Whether `bytes` are the block's bytes from `start` (a piece boundary)
    /// on, whole pieces.
    pub fn verify(&self, start: usize, bytes: &[u8]) -> bool {
        if !start.is_multiple_of(PIECE)
            || !bytes.len().is_multiple_of(PIECE)
            || start + bytes.len() > self.len()
        {
            return false;
        }
        bytes
            .chunks(PIECE)
            .enumerate()
            .all(|(i, p)| piece_cv(start + i * PIECE, p) == self.pieces[start / PIECE + i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::hash_block;

    fn noise(len: usize, seed: u8) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
            .collect()
    }

    #[test]
    fn a_proof_is_built_only_from_bytes_that_hash_to_the_name() {
        // Piece counts that are and are not powers of two: the tree's shape differs.
        for pieces in [2, 3, 5, 7, 16, 17, 64] {
            let data = noise(pieces * PIECE, pieces as u8);
            let proof = Proof::build(&data, &hash_block(&data)).expect("proof");
            assert_eq!(proof.len(), data.len());
            assert!(Proof::build(&data, &hash_block(b"other")).is_none());
        }
        let data = noise(16 * PIECE, 1);
        assert!(
            Proof::build(&data[..PIECE], &hash_block(&data[..PIECE])).is_none(),
            "one piece"
        );
        let odd = &data[..3 * PIECE + 100];
        assert!(Proof::build(odd, &hash_block(odd)).is_none(), "uneven tail");
    }

    #[test]
    fn pieces_verify_only_where_they_belong_and_as_they_were() {
        let data = noise(16 * PIECE, 7);
        let proof = Proof::build(&data, &hash_block(&data)).unwrap();
        for i in 0..16 {
            assert!(
                proof.verify(i * PIECE, &data[i * PIECE..(i + 1) * PIECE]),
                "piece {i}"
            );
        }
        assert!(
            proof.verify(4 * PIECE, &data[4 * PIECE..9 * PIECE]),
            "a run of pieces"
        );
        assert!(proof.verify(0, &data), "all of it");
        // The right bytes at the wrong place, a flipped bit, a torn piece.
        assert!(!proof.verify(PIECE, &data[..PIECE]));
        let mut bad = data[3 * PIECE..4 * PIECE].to_vec();
        bad[100] ^= 1;
        assert!(!proof.verify(3 * PIECE, &bad));
        assert!(!proof.verify(3 * PIECE, &data[3 * PIECE..4 * PIECE - 1]));
        assert!(!proof.verify(100, &data[100..100 + PIECE]));
        assert!(!proof.verify(16 * PIECE, &data[..PIECE]), "past the end");
    }

    #[test]
    fn span_covers_the_pieces_of_a_range() {
        let data = noise(16 * PIECE, 3);
        let proof = Proof::build(&data, &hash_block(&data)).unwrap();
        assert_eq!(proof.span(0, PIECE), 0..PIECE);
        assert_eq!(proof.span(PIECE + 1, PIECE + 2), PIECE..2 * PIECE);
        assert_eq!(proof.span(PIECE - 1, PIECE + 1), 0..2 * PIECE);
        assert_eq!(proof.span(5 * PIECE, 16 * PIECE), 5 * PIECE..16 * PIECE);
    }
}
