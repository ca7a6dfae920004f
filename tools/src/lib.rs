//! The `geosync` command line ([`cli`]) and the benchmark harness ([`bench`]).
#![deny(missing_docs)]

pub mod bench;
pub mod cli;
pub mod fuse_bench;
pub mod mount;
pub mod relay;
pub mod replication;
pub mod sync_bench;
pub mod units;
