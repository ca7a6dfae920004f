//! Test support shared by the integration tests (`tests/`) and benchmarks
//! (`benches/`) of geosync: the reference model of images that the store —
//! and, through a real mount, the FUSE layer — is checked against.
#![deny(missing_docs)]

pub mod kit;
pub mod model;
