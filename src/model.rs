//! A reference model of images as plain byte arrays, and the random
//! operation sequences the store (and later the FUSE mount) is checked
//! against, step by step.
//!
//! Holes in the model: a block is data iff it holds a non-zero byte; this is
//! what geosync promises for SEEK_DATA/SEEK_HOLE (block granularity).

use proptest::prelude::*;

/// Block size used by model tests (small, so random writes overlap a lot).
pub const BS: u64 = 4096;
/// Image slots.
pub const SLOTS: usize = 3;
/// Largest image size the ops produce.
pub const MAX_SIZE: u64 = 24 * BS;

/// How the bytes of a write are made.
#[derive(Clone, Copy, Debug)]
pub enum Fill {
    /// All zeros (turns blocks into holes).
    Zeros,
    /// One repeated byte (dedups across blocks and images).
    Byte(u8),
    /// Pseudo-random bytes from a seed.
    Noise(u64),
}

impl Fill {
    /// The bytes.
    pub fn bytes(&self, len: usize) -> Vec<u8> {
        match *self {
            Fill::Zeros => vec![0; len],
            Fill::Byte(b) => vec![b; len],
            Fill::Noise(seed) => {
                let mut x = seed | 1;
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            }
        }
    }
}

/// One step.
#[derive(Clone, Debug)]
pub enum Op {
    /// Write at an offset (creates the image if the slot is empty).
    Write {
        /// Slot.
        img: usize,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Contents.
        fill: Fill,
    },
    /// Punch a hole (size unchanged).
    Punch {
        /// Slot.
        img: usize,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Set the size.
    Resize {
        /// Slot.
        img: usize,
        /// New size.
        size: u64,
    },
    /// Share `n` whole blocks of `src` (from block `from`) into `dst` at block
    /// `to`, as `copy_file_range` does: by reference, not by copying bytes.
    ShareBlocks {
        /// Source slot.
        src: usize,
        /// Destination slot.
        dst: usize,
        /// First source block.
        from: u64,
        /// First destination block.
        to: u64,
        /// Blocks.
        n: u64,
    },
    /// Commit the slot's pending changes.
    Commit {
        /// Slot.
        img: usize,
    },
    /// Commit, then snapshot.
    Snapshot {
        /// Slot.
        img: usize,
    },
    /// Commit, then roll back to the `which`-th snapshot (mod count).
    Rollback {
        /// Slot.
        img: usize,
        /// Snapshot choice.
        which: usize,
    },
    /// Commit `src`, then clone it (head) into an empty slot `dst`.
    Clone {
        /// Source slot.
        src: usize,
        /// Destination slot.
        dst: usize,
    },
    /// Commit, then delete the `which`-th snapshot (mod count).
    DeleteSnapshot {
        /// Slot.
        img: usize,
        /// Snapshot choice.
        which: usize,
    },
    /// Commit everything, then garbage-collect.
    Gc,
    /// Arm a fault (kind 0: fsync fails, 1: ENOSPC, 2: torn write) and commit `img`.
    FaultyCommit {
        /// Slot.
        img: usize,
        /// Fault kind.
        kind: u8,
        /// Where in the commit: the `at`-th sync or append from now, or
        /// ENOSPC after `at` KiB (a commit that ends first succeeds).
        at: u8,
    },
    /// Power loss: uncommitted changes and unsynced pack bytes are lost; reopen.
    Crash,
    /// Take the slot's dirty blocks into a seal job and run it only after
    /// the next operation (which may write the same blocks again).
    SealJob {
        /// Slot.
        img: usize,
    },
}

fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        1 => Just(Fill::Zeros),
        2 => (1u8..4).prop_map(Fill::Byte),
        3 => any::<u64>().prop_map(Fill::Noise),
    ]
}

/// Operations for a store test; `faults` adds fault injection and crashes.
pub fn op(faults: bool) -> impl Strategy<Value = Op> {
    let img = 0..SLOTS;
    let base = prop_oneof![
        8 => (img.clone(), 0..MAX_SIZE, 1..(3 * BS as usize), fill())
            .prop_map(|(img, offset, len, fill)| Op::Write { img, offset, len, fill }),
        // Sector-aligned, as a block device writes (merged with old contents later).
        6 => (img.clone(), 0..MAX_SIZE / 512, 1..(3 * BS as usize / 512), fill()).prop_map(
            |(img, sector, n, fill)| Op::Write { img, offset: sector * 512, len: n * 512, fill }
        ),
        3 => (img.clone(), 0..MAX_SIZE, 1..(6 * BS)).prop_map(|(img, offset, len)| Op::Punch { img, offset, len }),
        2 => (img.clone(), 0..MAX_SIZE).prop_map(|(img, size)| Op::Resize { img, size }),
        2 => (img.clone(), img.clone(), 0..MAX_SIZE / BS, 0..MAX_SIZE / BS, 1..4u64)
            .prop_map(|(src, dst, from, to, n)| Op::ShareBlocks { src, dst, from, to, n }),
        3 => img.clone().prop_map(|img| Op::Commit { img }),
        2 => img.clone().prop_map(|img| Op::Snapshot { img }),
        2 => (img.clone(), any::<usize>()).prop_map(|(img, which)| Op::Rollback { img, which }),
        1 => (img.clone(), img.clone()).prop_map(|(src, dst)| Op::Clone { src, dst }),
        1 => (img.clone(), any::<usize>()).prop_map(|(img, which)| Op::DeleteSnapshot { img, which }),
        1 => Just(Op::Gc),
        2 => img.clone().prop_map(|img| Op::SealJob { img }),
    ];
    if faults {
        prop_oneof![
            10 => base,
            2 => (img.clone(), 0u8..3, prop_oneof![Just(0u8), 0u8..4, 0u8..64])
                .prop_map(|(img, kind, at)| Op::FaultyCommit { img, kind, at }),
            1 => Just(Op::Crash),
        ]
        .boxed()
    } else {
        base.boxed()
    }
}

/// One image in the model.
#[derive(Clone, Debug, Default)]
pub struct ModelImage {
    /// Last committed contents.
    pub committed: Vec<u8>,
    /// Contents including uncommitted changes.
    pub current: Vec<u8>,
    /// Snapshots: (name, contents).
    pub snapshots: Vec<(String, Vec<u8>)>,
}

impl ModelImage {
    /// `lseek(SEEK_DATA)` as geosync answers it.
    pub fn seek_data(&self, off: u64) -> Option<u64> {
        let data = &self.current;
        let size = data.len() as u64;
        if off >= size {
            return None;
        }
        let nb = size.div_ceil(BS);
        let b0 = off / BS;
        (b0..nb)
            .find(|&b| block_is_data(data, b))
            .map(|b| if b == b0 { off } else { b * BS })
    }

    /// `lseek(SEEK_HOLE)` as geosync answers it.
    pub fn seek_hole(&self, off: u64) -> Option<u64> {
        let data = &self.current;
        let size = data.len() as u64;
        if off >= size {
            return None;
        }
        let nb = size.div_ceil(BS);
        let b0 = off / BS;
        let b = (b0..nb).find(|&b| !block_is_data(data, b)).unwrap_or(nb);
        Some((b * BS).clamp(off, size))
    }
}

/// Whether block `b` of `data` holds a non-zero byte.
pub fn block_is_data(data: &[u8], b: u64) -> bool {
    let s = (b * BS) as usize;
    let e = ((b + 1) * BS).min(data.len() as u64) as usize;
    data[s..e].iter().any(|&x| x != 0)
}

/// Apply a write to model bytes.
pub fn model_write(buf: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let end = offset as usize + bytes.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[offset as usize..end].copy_from_slice(bytes);
}

/// Apply a punch to model bytes.
pub fn model_punch(buf: &mut [u8], offset: u64, len: u64) {
    let s = (offset as usize).min(buf.len());
    let e = (offset.saturating_add(len) as usize).min(buf.len());
    buf[s..e].fill(0);
}

/// Image name of a slot.
pub fn slot_name(i: usize) -> String {
    format!("img{i}")
}

/// Number of proptest cases: `GEOSYNC_PROPTEST_CASES` or `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("GEOSYNC_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
