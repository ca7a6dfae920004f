//! The control socket: a Unix socket (mode 0600, in the store's `syncd/`
//! directory by default) through which `geosync move` and `geosync sync
//! status` talk to the local daemon — never over the network.
//!
//! Protocol: the client writes one JSON [`Request`] line; the daemon
//! answers with JSON lines: one [`Status`] for `status`, a stream of
//! [`MoveEvent`]s for `move` (the last has `state` "done" or "error").

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Sync state per image and peer.
    Status,
    /// Force a transfer of `image` to peer `to`, then make it the image's home.
    Move {
        /// Image.
        image: String,
        /// Peer node id.
        to: String,
    },
}

/// A peer as the daemon sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Node id.
    pub id: String,
    /// Address.
    pub address: String,
    /// Connected.
    pub up: bool,
}

/// The last finished pull of an image from a peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastTransfer {
    /// When it finished (ms since the epoch).
    pub at_ms: u64,
    /// How long it took.
    pub millis: u64,
    /// Compressed bytes fetched.
    pub bytes: u64,
    /// Blocks fetched.
    pub fetched: u64,
    /// Blocks already here.
    pub deduped: u64,
}

/// An image at one peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImagePeer {
    /// Peer node id.
    pub peer: String,
    /// "in sync", "behind" (the peer has newer), "ahead" (we have newer),
    /// "only here", "only there".
    pub state: String,
    /// The peer's head stamp, as last seen in its catalog.
    pub remote_stamp: Option<String>,
    /// Blocks of the peer's head that we lack (known when behind).
    pub behind_blocks: Option<u64>,
    /// Their raw bytes (block size × blocks).
    pub behind_bytes: Option<u64>,
    /// A pull from this peer is running.
    pub transferring: bool,
    /// The last pull from this peer.
    pub last_transfer: Option<LastTransfer>,
    /// Not pulled again before this (ms since the epoch; pacing), unless forced.
    pub next_allowed_ms: Option<u64>,
}

/// One image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageStatus {
    /// Name.
    pub image: String,
    /// Our head stamp (None: we do not have it).
    pub stamp: Option<String>,
    /// Node id of its home (after a move).
    pub home: Option<String>,
    /// Per peer.
    pub peers: Vec<ImagePeer>,
}

/// Answer to [`Request::Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Our node id.
    pub node: String,
    /// Peers.
    pub peers: Vec<PeerStatus>,
    /// Images.
    pub images: Vec<ImageStatus>,
}

/// Progress of a move.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MoveEvent {
    /// "offered", "progress", "done", "error".
    pub state: String,
    /// Bytes sent to the peer since the move began.
    pub bytes: u64,
    /// Estimate of the bytes to send (the image's stored size).
    pub total: u64,
    /// Error text, for "error".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A reply line that is an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong.
    pub error: String,
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon.
    #[error("cannot reach syncd at {path}: {source} (is `syncd run` going for this store?)")]
    Connect {
        /// Socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// I/O on the socket.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon said no.
    #[error("syncd: {0}")]
    Daemon(String),
    /// A line that does not parse.
    #[error("unexpected reply from syncd: {0}")]
    Reply(String),
}

/// A connection to the local daemon.
pub struct Client {
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connect to the control socket at `path`.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Client {
            reader: BufReader::new(s),
        })
    }

    fn send(&mut self, r: &Request) -> Result<(), ClientError> {
        let mut line = serde_json::to_string(r).expect("request serializes");
        line.push('\n');
        self.reader.get_mut().write_all(line.as_bytes())?;
        Ok(())
    }

    fn line<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if let Ok(e) = serde_json::from_str::<ErrorReply>(&line) {
            return Err(ClientError::Daemon(e.error));
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| ClientError::Reply(format!("{e}: {}", line.trim())))
    }

    /// Sync state.
    pub fn status(mut self) -> Result<Status, ClientError> {
        self.send(&Request::Status)?;
        self.line()?
            .ok_or_else(|| ClientError::Reply("connection closed".into()))
    }

    /// Start a move; then read its events with [`Client::next_event`].
    pub fn start_move(&mut self, image: &str, to: &str) -> Result<(), ClientError> {
        self.send(&Request::Move {
            image: image.into(),
            to: to.into(),
        })
    }

    /// The next event of a move (`None`: the daemon closed the socket).
    pub fn next_event(&mut self) -> Result<Option<MoveEvent>, ClientError> {
        self.line()
    }
}
