//! The commit path — hash + compress + append + index — in MB/s, on a real
//! disk store. Each iteration writes 64 MiB of fresh (never seen before)
//! blocks of real file data into an image and commits it.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use geosync_fs::{InitOptions, Store};

const BATCH: usize = 64 << 20;

/// Real bytes: binaries and text from /usr, salted per block so nothing dedups.
fn corpus() -> Vec<u8> {
    let mut out = Vec::with_capacity(BATCH);
    let mut stack = vec![
        std::path::PathBuf::from("/usr/lib"),
        std::path::PathBuf::from("/usr/share"),
    ];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            if out.len() >= BATCH {
                return out;
            }
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                if let Ok(d) = std::fs::read(e.path()) {
                    out.extend_from_slice(&d[..d.len().min(BATCH - out.len())]);
                }
            }
        }
    }
    out.resize(BATCH, 0x5a);
    out
}

fn commit_path(c: &mut Criterion) {
    let base = corpus();
    let mut g = c.benchmark_group("commit");
    g.throughput(Throughput::Bytes(BATCH as u64));
    g.sample_size(10);
    for (bs, name, compression) in [
        (64u32 << 10, "zstd3", "zstd:3"),
        (64 << 10, "zstd1", "zstd:1"),
        (64 << 10, "none", "none"),
        (16 << 10, "zstd3", "zstd:3"),
        (256 << 10, "zstd3", "zstd:3"),
    ] {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let store = Store::init(
            dir.path(),
            &InitOptions {
                block_size: bs,
                compression: compression.parse().unwrap(),
            },
        )
        .unwrap();
        store.create_image("bench", 1 << 40).unwrap();
        let round = std::cell::Cell::new(0u64);
        g.bench_function(format!("{}KiB-blocks/{name}", bs >> 10), |b| {
            b.iter_batched(
                || {
                    round.set(round.get() + 1);
                    let r = round.get();
                    let mut d = base.clone();
                    for (i, block) in d.chunks_mut(bs as usize).enumerate() {
                        block[..16].copy_from_slice(&[r.to_le_bytes(), (i as u64).to_le_bytes()].concat());
                    }
                    (r, d)
                },
                |(r, data)| {
                    let mut h = store.open_image("bench").unwrap();
                    h.write((r % 1024) * BATCH as u64, &data).unwrap();
                    h.commit().unwrap();
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// Sealing one 64 KiB block (hash, compressibility, compression) of the
/// kinds a loop-mounted file system writes: a random 4 KiB write into an
/// unwritten extent (one sector group of noise, zeros around it), a block
/// of real file data, and noise.
fn seal_block(c: &mut Criterion) {
    use geosync_fs::pack;
    use std::sync::Arc;
    const BS: usize = 64 << 10;
    let corpus = corpus();
    let mut sparse = vec![0u8; BS];
    sparse[8192..12288].copy_from_slice(&geosync_suite::kit::noise(1, 4096));
    let random = geosync_suite::kit::noise(2, BS);
    let mut g = c.benchmark_group("seal_block");
    g.throughput(Throughput::Bytes(BS as u64));
    for (name, data) in [
        ("4k-in-zeros", sparse),
        ("files", corpus[..BS].to_vec()),
        ("noise", random),
    ] {
        let data: Arc<[u8]> = data.into();
        for compression in ["zstd:3", "zstd:1"] {
            let comp: pack::Compression = compression.parse().unwrap();
            g.bench_function(format!("{name}/{compression}"), |b| {
                b.iter(|| {
                    let h = pack::hash_block(&data);
                    pack::seal_shared(&data, h, comp, None)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, commit_path, seal_block);
criterion_main!(benches);
