//! Prometheus metrics, served as text at `http://METRICS/metrics`.
//!
//! Bytes are counted twice: `geosync_frame_bytes_*` are the protocol frames
//! (what the application sent), `geosync_wire_bytes_*` are UDP payload bytes
//! from QUIC's own statistics (frames plus QUIC and TLS overhead, ACKs and
//! retransmissions): the honest "bytes on the wire".

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Label: a peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerL {
    /// Node id.
    pub peer: String,
}

/// Label: an image at a peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImagePeerL {
    /// Image name.
    pub image: String,
    /// Node id.
    pub peer: String,
}

/// Label: outcome of a transfer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransferL {
    /// Node id.
    pub peer: String,
    /// "ok", "failed".
    pub result: String,
}

/// Label: a kind of error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindL {
    /// "protocol", "refused", "store", "integrity", ...
    pub kind: String,
}

/// Every metric the daemon exports.
#[derive(Default)]
pub struct Metrics {
    /// Frame bytes sent, per peer.
    pub frame_bytes_sent: Family<PeerL, Counter>,
    /// Frame bytes received, per peer.
    pub frame_bytes_received: Family<PeerL, Counter>,
    /// UDP bytes sent, per peer.
    pub wire_bytes_sent: Family<PeerL, Counter>,
    /// UDP bytes received, per peer.
    pub wire_bytes_received: Family<PeerL, Counter>,
    /// Blocks served to a peer.
    pub blocks_sent: Family<PeerL, Counter>,
    /// Blocks fetched from a peer.
    pub blocks_fetched: Family<PeerL, Counter>,
    /// Payload bytes (compressed, as stored) of blocks fetched.
    pub block_bytes_fetched: Family<PeerL, Counter>,
    /// Blocks a pulled map named that we already had (not sent).
    pub blocks_deduped: Family<PeerL, Counter>,
    /// Blocks whose bytes did not match their hash (rejected, fetched again).
    pub blocks_rejected: Family<PeerL, Counter>,
    /// Pulls finished, by result.
    pub transfers: Family<TransferL, Counter>,
    /// Conflicts resolved (a losing head kept as a snapshot).
    pub conflicts: Family<PeerL, Counter>,
    /// How far behind a peer's head ours is, in seconds of stamp time (0: not behind).
    pub lag_seconds: Family<ImagePeerL, Gauge<f64, AtomicU64>>,
    /// Errors, by kind.
    pub errors: Family<KindL, Counter>,
}

impl Metrics {
    /// Register everything.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("geosync");
        r.register(
            "frame_bytes_sent",
            "Protocol frame bytes sent",
            self.frame_bytes_sent.clone(),
        );
        r.register(
            "frame_bytes_received",
            "Protocol frame bytes received",
            self.frame_bytes_received.clone(),
        );
        r.register(
            "wire_bytes_sent",
            "UDP payload bytes sent (QUIC stats)",
            self.wire_bytes_sent.clone(),
        );
        r.register(
            "wire_bytes_received",
            "UDP payload bytes received (QUIC stats)",
            self.wire_bytes_received.clone(),
        );
        r.register("blocks_sent", "Blocks served to peers", self.blocks_sent.clone());
        r.register(
            "blocks_fetched",
            "Blocks fetched from peers",
            self.blocks_fetched.clone(),
        );
        r.register(
            "block_bytes_fetched",
            "Stored (compressed) bytes of blocks fetched",
            self.block_bytes_fetched.clone(),
        );
        r.register(
            "blocks_deduped",
            "Blocks named by a pulled map that were already here",
            self.blocks_deduped.clone(),
        );
        r.register(
            "blocks_rejected",
            "Blocks that failed verification and were fetched again",
            self.blocks_rejected.clone(),
        );
        r.register("transfers", "Image pulls finished", self.transfers.clone());
        r.register(
            "conflicts",
            "Conflicting heads kept as snapshots",
            self.conflicts.clone(),
        );
        r.register(
            "lag_seconds",
            "Stamp time by which our head trails the peer's",
            self.lag_seconds.clone(),
        );
        r.register("errors", "Errors by kind", self.errors.clone());
        r
    }

    /// Count an error.
    pub fn error(&self, kind: &str) {
        self.errors.get_or_create(&KindL { kind: kind.into() }).inc();
    }
}

/// Serve `registry` over minimal HTTP/1.1 on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, registry: Arc<Registry>) -> std::io::Result<()> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    loop {
        let (mut s, _) = l.accept().await?;
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                let mut body = String::new();
                let _ = prometheus_client::encoding::text::encode(&mut body, &registry);
                ("200 OK", body)
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
        });
    }
}
