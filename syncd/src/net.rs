//! QUIC plumbing: the endpoint (explicit UDP buffers, tuned windows) and
//! frames over streams. One request per bidirectional stream: the requester
//! writes one frame and finishes its side; the server writes the reply
//! frames and finishes. A length prefix over [`MAX_FRAME`] is refused
//! before anything is allocated.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use geosync_proto::wire::{DecodeError, Message, MAX_FRAME};
use quinn::{Endpoint, EndpointConfig, RecvStream, SendStream, TransportConfig, VarInt};

/// UDP socket buffer size (both directions). The kernel default drops
/// thousands of datagrams per GiB at full speed.
pub const UDP_BUFFER: usize = 4 << 20;

/// Application close codes.
pub mod close {
    /// Clean shutdown.
    pub const SHUTDOWN: u32 = 0;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 1;
    /// Another protocol version.
    pub const VERSION: u32 = 2;
    /// (A stream's reset code) the peer stalled past the stall timeout.
    pub const STALLED: u32 = 3;
}

/// A frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream or connection failed.
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The bytes are not a valid frame.
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    /// Writing failed.
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
}

/// QUIC transport settings: large windows (a fat, long pipe between sites),
/// keep-alives so idle peers stay connected, an idle timeout so dead ones
/// are noticed.
pub fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(16 << 20))
        .receive_window(VarInt::from_u32(64 << 20))
        .send_window(64 << 20)
        .max_concurrent_bidi_streams(VarInt::from_u32(256))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_secs(3)))
        .max_idle_timeout(Some(VarInt::from_u32(10_000).into()));
    Arc::new(t)
}

/// Bind a QUIC endpoint on `addr` with explicit socket buffers.
pub fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<Endpoint> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = sock.set_recv_buffer_size(UDP_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_BUFFER);
    sock.bind(&addr.into())?;
    Endpoint::new(
        EndpointConfig::default(),
        server,
        sock.into(),
        Arc::new(quinn::TokioRuntime),
    )
}

/// Dial `peer` at `addr` with mutual TLS pinned to its id (no Hello yet).
pub async fn connect(
    endpoint: &Endpoint,
    me: &crate::identity::Identity,
    peer: geosync_proto::NodeId,
    addr: SocketAddr,
) -> Result<quinn::Connection, String> {
    let tls = me.client_config(peer).map_err(|e| e.to_string())?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?,
    ));
    cfg.transport_config(transport());
    endpoint
        .connect_with(cfg, addr, "geosync")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())
}

/// Read one frame; `None` at a clean end of stream.
pub async fn read_frame(recv: &mut RecvStream) -> Result<Option<(Message, usize)>, FrameError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(DecodeError::TooLarge(n).into());
    }
    let mut buf = vec![0u8; 4 + n];
    buf[..4].copy_from_slice(&len);
    match recv.read_exact(&mut buf[4..]).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    match Message::decode(&buf)? {
        Some((m, used)) => Ok(Some((m, used))),
        None => Err(FrameError::Truncated),
    }
}

/// Write one frame; returns its size.
pub async fn write_frame(send: &mut SendStream, msg: &Message) -> Result<usize, FrameError> {
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    send.write_all(&buf).await?;
    Ok(buf.len())
}
