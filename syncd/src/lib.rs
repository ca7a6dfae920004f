//! geosync replication daemon: the sans-I/O state machine of
//! [`geosync_proto::sync`] driven over QUIC (quinn, rustls) with mutual TLS
//! and pinned node ids.
//!
//! - [`config`]: `syncd.toml` (strict).
//! - [`identity`]: node keys, node ids, TLS configurations that pin peers.
//! - [`net`]: the endpoint and frames over streams.
//! - [`daemon`]: the driver, dialers, server, control socket.
//! - [`control`]: the control socket protocol and its client (used by
//!   `geosync move` and `geosync sync status`).
//! - [`metrics`]: Prometheus metrics.
#![deny(missing_docs)]

pub mod config;
pub mod control;
pub mod daemon;
pub mod identity;
pub mod metrics;
pub mod net;
