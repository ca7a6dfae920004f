//! geosync replication daemon — **not implemented yet** (issue 4).
//!
//! `syncd` will own the QUIC endpoint (quinn + rustls, mutual TLS with pinned
//! node ids), timers and the store handle, and drive the sans-I/O state
//! machine of `geosync-proto`. Today this crate only builds, so the
//! workspace has its final shape; the binary refuses to run.
#![deny(missing_docs)]

/// What the binary says when asked to do anything.
pub const NOT_YET: &str =
    "syncd is not implemented yet: replication lands with issue 4 (see ARCHITECTURE.md)";
