//! Fixtures shared by the integration tests: deterministic data and stores
//! in temporary directories.

use geosync_fs::{InitOptions, Store};

/// `len` pseudo-random (incompressible) bytes determined by `seed`.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut v);
    v
}

/// A fresh disk store with `block_size`-byte blocks in a temporary directory
/// (kept alive by the returned guard).
pub fn disk_store(block_size: u32) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = Store::init(
        dir.path(),
        &InitOptions {
            block_size,
            ..Default::default()
        },
    )
    .expect("init store");
    (dir, store)
}
