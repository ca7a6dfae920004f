//! `geosync import` of a sparse ext4 image holding real files, against
//! `cp --sparse=always` of the same file, in the same run; prints the ratio.
//! Size with GEOSYNC_BENCH_SIZE (default 16G) and GEOSYNC_BENCH_DATA (1.5G).

use geosync_tools::units::parse_size;

fn main() {
    // `cargo bench -- <filter>` passes arguments; `cargo test --benches` passes --bench-less flags.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let env = |k: &str, d: &str| parse_size(&std::env::var(k).unwrap_or_else(|_| d.into())).unwrap();
    let size = env("GEOSYNC_BENCH_SIZE", "16G");
    let data = env("GEOSYNC_BENCH_DATA", "1.5G");
    let work = tempfile::Builder::new()
        .prefix("geosync-import-bench")
        .tempdir_in("/var/tmp")
        .unwrap();
    let r =
        geosync_tools::bench::import_bench(work.path(), size, data, std::path::Path::new("/usr")).unwrap();
    r.print();
}
