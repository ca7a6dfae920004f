//! The daemon: drives [`geosync_proto::sync::Sync`] over QUIC.
//!
//! Tasks:
//! - **driver** (one): owns the state machine. Feeds it events (replies,
//!   connection changes, local head changes polled from the store, control
//!   commands) and `now` (monotonic ms), and carries out its actions:
//!   requests go out on the peer's connection, store work (missing hashes,
//!   verified block batches, the switch, leases) runs on this task with
//!   `block_in_place`. Blocks of one reply stream are kept in one batch: one
//!   pack sync per batch.
//! - **dialer** per peer: keeps one outgoing connection (ours, for our
//!   requests), with a Hello exchange, redialing with jitter.
//! - **server**: accepts connections (TLS has already refused unknown
//!   peers), one task per request stream; answers through
//!   [`geosync_proto::serve::serve`] under the peer's policy, paced by the
//!   per-peer bandwidth limit. A malformed or out-of-order frame closes
//!   that connection (logged, counted); other peers are not affected.
//! - **control** socket and **metrics** endpoint.
//!
//! Shutdown (SIGTERM/SIGINT, via the future given to [`run`]): stop
//! accepting, close connections, release leases; stored blocks stay, so a
//! restarted daemon resumes pulls without fetching them again.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geosync_fs::store::replica::{IncomingBlock, ReplicaOutcome};
use geosync_fs::{BlockHash, Store};
use geosync_proto::serve::serve;
use geosync_proto::sync::{self, Action, ApplyOutcome, Event, ReqId, Sync};
use geosync_proto::wire::{code, Message};
use geosync_proto::{NodeId, Stamp, PROTOCOL_VERSION};
use quinn::{Connection, Endpoint, VarInt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::config::{Config, Peer};
use crate::control::{self, ImagePeer, ImageStatus, LastTransfer, MoveEvent, PeerStatus, Status};
use crate::identity::{self, Identity};
use crate::metrics::{self, ImagePeerL, Metrics, PeerL, TransferL};
use crate::net::{self, close, read_frame, write_frame, FrameError};

/// How long a transfer lease lasts unless renewed (the driver renews the
/// leases of running pulls every tick). A lease of a daemon on this host
/// that died is taken over at once (its pid is in the holder).
pub const LEASE_MS: u64 = 60 * 1000;

/// Is this lease holder ("node:pid:start") a process of this node that is
/// gone? Only this host's pids can be checked; others wait for expiry.
fn holder_is_dead(me: NodeId, holder: &str) -> bool {
    let mut parts = holder.split(':');
    let (Some(node), Some(pid)) = (parts.next(), parts.next().and_then(|p| p.parse::<u32>().ok())) else {
        return false;
    };
    node == me.to_string()
        && pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Daemon errors.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The store.
    #[error(transparent)]
    Store(#[from] geosync_fs::Error),
    /// Keys and TLS.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// Sockets.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration.
    #[error("{0}")]
    Config(String),
    /// The replication driver stopped before shutdown (a bug).
    #[error("the replication driver stopped: {0}")]
    DriverStopped(String),
}

enum Input {
    Events(Vec<Event>),
    Control(ControlCmd),
}

enum ControlCmd {
    Status(tokio::sync::oneshot::Sender<Status>),
    Move {
        image: String,
        to: NodeId,
        events: mpsc::UnboundedSender<MoveEvent>,
    },
}

struct Shared {
    store: Store,
    me: NodeId,
    identity: Identity,
    peers: BTreeMap<NodeId, Peer>,
    conns: Mutex<BTreeMap<NodeId, Connection>>,
    metrics: Arc<Metrics>,
    tx: mpsc::UnboundedSender<Input>,
    bandwidth: Option<u64>,
    /// How long a peer may leave a request unsent or a reply frame unread.
    stall: Duration,
    limiters: Mutex<HashMap<NodeId, Instant>>,
    homes_path: PathBuf,
}

impl Shared {
    fn peer_label(&self, p: &NodeId) -> PeerL {
        PeerL { peer: p.to_string() }
    }

    /// Wait until `n` more bytes may be sent to `peer` (a virtual-clock
    /// token bucket with 50 ms of burst).
    async fn pace(&self, peer: NodeId, n: usize) {
        let Some(rate) = self.bandwidth else {
            return;
        };
        let wait = {
            let mut l = self.limiters.lock().unwrap();
            let now = Instant::now();
            let next = l.entry(peer).or_insert(now);
            let burst = Duration::from_millis(50);
            if *next + burst < now {
                *next = now - burst;
            }
            let start = *next;
            *next = start + Duration::from_secs_f64(n as f64 / rate as f64);
            start.saturating_duration_since(now)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Run the daemon until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), DaemonError> {
    let store = Store::open(&cfg.store, geosync_fs::OpenMode::ReadWrite)?;
    let identity = Identity::load(&cfg.store)?;
    if store.node_id() != identity.id {
        return Err(DaemonError::Config(format!(
            "store {} has node id {} but its key says {}: `syncd init --store {}` says what to do",
            cfg.store.display(),
            store.node_id(),
            identity.id,
            cfg.store.display()
        )));
    }
    let peers: BTreeMap<NodeId, Peer> = cfg
        .peer_list()
        .map_err(DaemonError::Config)?
        .into_iter()
        .map(|p| (p.id, p))
        .collect();
    if peers.contains_key(&identity.id) {
        return Err(DaemonError::Config(format!(
            "node {} lists itself as a peer",
            identity.id
        )));
    }
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(
            identity.server_config(peers.keys().copied().collect())?,
        )
        .map_err(|e| DaemonError::Config(format!("TLS: {e}")))?,
    ));
    server.transport_config(net::transport());
    let endpoint = net::endpoint(cfg.listen, Some(server)).map_err(|source| DaemonError::Io {
        what: format!("listening on {}", cfg.listen),
        source,
    })?;
    let (tx, rx) = mpsc::unbounded_channel();
    let metrics = Arc::new(Metrics::default());
    let shared = Arc::new(Shared {
        store: store.clone(),
        me: identity.id,
        identity: identity.clone(),
        peers: peers.clone(),
        conns: Mutex::new(BTreeMap::new()),
        metrics: metrics.clone(),
        tx,
        bandwidth: cfg.bandwidth_bytes(),
        stall: Duration::from_secs_f64(cfg.stall_timeout_secs),
        limiters: Mutex::new(HashMap::new()),
        homes_path: identity::state_dir(&cfg.store).join("homes.json"),
    });
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = cfg.metrics {
        let registry = Arc::new(metrics.registry());
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Io {
                what: format!("metrics listener on {addr}"),
                source,
            })?;
        drop(l); // bound once to report the error here; serve() binds again
        tasks.spawn(async move {
            if let Err(e) = metrics::serve(addr, registry).await {
                warn!(error = %e, "metrics endpoint failed");
            }
        });
    }
    let control_path = cfg.control_path();
    let control = bind_control(&control_path)?;
    tasks.spawn(control_loop(control, shared.clone()));
    tasks.spawn(accept_loop(endpoint.clone(), shared.clone()));
    for p in peers.values() {
        tasks.spawn(dial_loop(endpoint.clone(), shared.clone(), p.clone()));
    }
    let sync_cfg = sync::Config {
        catalog_interval_ms: cfg.catalog_interval_ms,
        pacing_factor: cfg.pacing_factor,
        block_size: store.block_size(),
        ..sync::Config::default()
    };
    let sm = Sync::new(
        sync_cfg,
        peers.values().map(|p| (p.id, p.policy.clone())),
        std::process::id() as u64 ^ geosync_fs_now_ms(),
    );
    let holder = format!("{}:{}:{}", identity.id, std::process::id(), geosync_fs_now_ms());
    let driver = Driver {
        shared: shared.clone(),
        sm,
        start: Instant::now(),
        local_seq: 0,
        streams: Streams::default(),
        holder,
        leases: Vec::new(),
        last: BTreeMap::new(),
        moves: Vec::new(),
        homes: load_homes(&shared.homes_path),
        ticks: 0,
    };
    info!(node = %identity.id, listen = %cfg.listen, peers = peers.len(), control = %control_path.display(), "syncd ready");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut driver = tokio::spawn(driver.run(rx));
    // The driver ends only on shutdown: if it ends before (a bug: it
    // panicked), the daemon stops with an error, so a supervisor restarts it
    // instead of leaving replication stopped behind a clean exit.
    let failed = tokio::select! {
        r = &mut driver => {
            let why = match r {
                Err(e) if e.is_panic() => "it panicked".to_string(),
                Err(e) => e.to_string(),
                Ok(()) => "its input closed".to_string(),
            };
            error!(%why, "the replication driver stopped; exiting");
            Some(why)
        }
        _ = shutdown => {
            info!("shutting down");
            None
        }
    };
    driver.abort(); // no lease renewal after the leases are released below
    let _ = driver.await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    endpoint.close(VarInt::from_u32(close::SHUTDOWN), b"shutdown");
    tasks.abort_all();
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    let _ = std::fs::remove_file(&control_path);
    // Leases of this process: released so other daemons need not wait them out.
    if let Ok(db) = Store::open(&cfg.store, geosync_fs::OpenMode::ReadWrite) {
        let _ = db.release_transfer_leases_of(&format!("{}:{}:", identity.id, std::process::id()));
    }
    info!("stopped");
    match failed {
        Some(why) => Err(DaemonError::DriverStopped(why)),
        None => Ok(()),
    }
}

fn geosync_fs_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn load_homes(p: &std::path::Path) -> BTreeMap<String, String> {
    std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_homes(p: &std::path::Path, homes: &BTreeMap<String, String>) -> std::io::Result<()> {
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(homes).expect("serializes"))?;
    std::fs::rename(&tmp, p)
}

// ------------------------------------------------------------------ driver

struct PendingMove {
    image: String,
    to: NodeId,
    stamp: Stamp,
    total: u64,
    sent_at_start: u64,
    offered: bool,
    events: mpsc::UnboundedSender<MoveEvent>,
}

/// The request tasks running, to stop one the state machine cancels (a
/// timeout, an abort). A task's last event is its `Failed` (sent after its
/// reply, complete or not); a long reply's frames come earlier, in batches,
/// and do not end it (they did: a reply slower than a second could then not
/// be cancelled, and a peer stalling mid-reply held the task forever).
#[derive(Default)]
struct Streams(HashMap<ReqId, tokio::task::AbortHandle>);

impl Streams {
    fn started(&mut self, req: ReqId, h: tokio::task::AbortHandle) {
        self.0.insert(req, h);
    }

    fn seen(&mut self, ev: &Event) {
        if let Event::Failed { req, .. } = ev {
            self.0.remove(req);
        }
    }

    fn cancel(&mut self, req: ReqId) {
        if let Some(h) = self.0.remove(&req) {
            h.abort();
        }
    }
}

struct Driver {
    shared: Arc<Shared>,
    sm: Sync,
    start: Instant,
    local_seq: u64,
    streams: Streams,
    holder: String,
    leases: Vec<String>,
    last: BTreeMap<(String, NodeId), LastTransfer>,
    moves: Vec<PendingMove>,
    homes: BTreeMap<String, String>,
    ticks: u64,
}

impl Driver {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self
                .sm
                .poll_timeout()
                .map(|t| self.start + Duration::from_millis(t))
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                inp = rx.recv() => {
                    let Some(inp) = inp else { return };
                    match inp {
                        Input::Events(evs) => {
                            for ev in evs {
                                self.streams.seen(&ev);
                                let now = self.now();
                                self.sm.handle(now, ev);
                            }
                        }
                        Input::Control(c) => self.control(c),
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = self.now();
                    self.sm.handle_timeout(now);
                }
                _ = tick.tick() => self.tick(),
            }
            self.drain();
        }
    }

    /// Poll the store for local changes; renew leases; report move progress
    /// and lag.
    fn tick(&mut self) {
        let store = self.shared.store.clone();
        self.ticks += 1;
        // Leases of running pulls, every 10 s (a write transaction each).
        let renew_due = self.ticks.is_multiple_of(40);
        for image in self.leases.iter().filter(|_| renew_due) {
            let r = tokio::task::block_in_place(|| {
                store.try_transfer_lease(image, &self.holder, LEASE_MS, &|_| false)
            });
            if !matches!(r, Ok(true)) {
                warn!(%image, "lost the transfer lease of a running pull");
            }
        }
        match tokio::task::block_in_place(|| store.catalog_since(self.local_seq)) {
            Ok((seq, entries)) if !entries.is_empty() || seq != self.local_seq => {
                let mut heads: Vec<(String, Option<Stamp>)> =
                    entries.into_iter().map(|e| (e.name, Some(e.stamp))).collect();
                if self.local_seq > 0 || seq == 0 {
                    // Images removed since: the catalog does not list them.
                    if let Ok(names) = store.image_names() {
                        for n in self.sm.local_heads().keys() {
                            if !names.contains(n) {
                                heads.push((n.clone(), None));
                            }
                        }
                    }
                }
                self.local_seq = seq;
                let now = self.now();
                self.sm.handle(now, Event::LocalHeads(heads));
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "cannot read the local catalog");
                self.shared.metrics.error("store");
            }
        }
        // Lag per image and peer, once a second (it walks every catalog).
        let lag_due = self.ticks % 4 == 1;
        for p in self.shared.peers.keys().filter(|_| lag_due) {
            if let Some(cat) = self.sm.remote_catalog(p) {
                for (name, e) in cat {
                    let local = self.sm.local_heads().get(name);
                    let lag = match local {
                        Some(l) if *l >= e.stamp => 0.0,
                        Some(l) => e.stamp.hlc.wall_ms.saturating_sub(l.hlc.wall_ms) as f64 / 1000.0,
                        None => 0.0,
                    };
                    self.shared
                        .metrics
                        .lag_seconds
                        .get_or_create(&ImagePeerL {
                            image: name.clone(),
                            peer: p.to_string(),
                        })
                        .set(lag);
                }
            }
        }
        // Moves: done when the peer's catalog shows our head.
        let mut done = Vec::new();
        for (i, m) in self.moves.iter().enumerate() {
            let sent = self
                .shared
                .metrics
                .frame_bytes_sent
                .get_or_create(&self.shared.peer_label(&m.to))
                .get();
            let bytes = sent.saturating_sub(m.sent_at_start);
            let there = self
                .sm
                .remote_catalog(&m.to)
                .and_then(|c| c.get(&m.image))
                .map(|e| e.stamp);
            if m.offered && there.is_some_and(|s| s >= m.stamp) {
                done.push((i, true));
                let _ = m.events.send(MoveEvent {
                    state: "done".into(),
                    bytes,
                    total: m.total.max(bytes),
                    message: None,
                });
            } else if m.events.is_closed() {
                done.push((i, false)); // the client went away; the pull goes on
            } else {
                let _ = m.events.send(MoveEvent {
                    state: "progress".into(),
                    bytes,
                    total: m.total,
                    message: None,
                });
            }
        }
        for (i, finished) in done.into_iter().rev() {
            let m = self.moves.remove(i);
            if finished {
                info!(image = %m.image, to = %m.to, "move finished; the image's home is now the destination");
                self.homes.insert(m.image.clone(), m.to.to_string());
                if let Err(e) = save_homes(&self.shared.homes_path, &self.homes) {
                    warn!(error = %e, "cannot record the image's new home");
                }
            }
        }
    }

    fn control(&mut self, c: ControlCmd) {
        match c {
            ControlCmd::Status(reply) => {
                let _ = reply.send(self.status());
            }
            ControlCmd::Move { image, to, events } => {
                let fail = |m: String| {
                    let _ = events.send(MoveEvent {
                        state: "error".into(),
                        bytes: 0,
                        total: 0,
                        message: Some(m),
                    });
                };
                if !self.shared.peers.contains_key(&to) {
                    return fail(format!("{to} is not a configured peer"));
                }
                if !self.shared.peers[&to].policy.may_pull(&image) {
                    return fail(format!(
                        "peer {to} may not pull {image:?} (its pull globs in the config)"
                    ));
                }
                let info = match self.shared.store.image_info(&image) {
                    Ok(i) => i,
                    Err(e) => return fail(e.to_string()),
                };
                let sent = self
                    .shared
                    .metrics
                    .frame_bytes_sent
                    .get_or_create(&self.shared.peer_label(&to))
                    .get();
                self.moves.push(PendingMove {
                    image: image.clone(),
                    to,
                    stamp: info.stamp,
                    total: info.stored,
                    sent_at_start: sent,
                    offered: false,
                    events,
                });
                self.sm.offer(&image, to);
            }
        }
    }

    fn status(&self) -> Status {
        let wall = geosync_fs_now_ms();
        let now = self.now();
        let mut names: std::collections::BTreeSet<String> = self.sm.local_heads().keys().cloned().collect();
        for p in self.shared.peers.keys() {
            if let Some(c) = self.sm.remote_catalog(p) {
                names.extend(c.keys().cloned());
            }
        }
        let images = names
            .into_iter()
            .map(|name| {
                let local = self.sm.local_heads().get(&name).copied();
                let peers = self
                    .shared
                    .peers
                    .keys()
                    .map(|p| {
                        let remote = self
                            .sm
                            .remote_catalog(p)
                            .and_then(|c| c.get(&name))
                            .map(|e| e.stamp);
                        let state = match (local, remote) {
                            (Some(l), Some(r)) if l == r => "in sync",
                            (Some(l), Some(r)) if l < r => "behind",
                            (Some(_), Some(_)) => "ahead",
                            (Some(_), None) => "only here",
                            (None, Some(_)) => "only there",
                            (None, None) => "unknown",
                        };
                        let pace = self.sm.pace(&name);
                        ImagePeer {
                            peer: p.to_string(),
                            state: state.into(),
                            remote_stamp: remote.map(|s| s.to_string()),
                            behind_blocks: None,
                            behind_bytes: None,
                            transferring: self.sm.transferring(&name) == Some(*p),
                            last_transfer: self.last.get(&(name.clone(), *p)).cloned(),
                            next_allowed_ms: pace
                                .filter(|pc| pc.next_allowed_ms > now)
                                .map(|pc| wall + (pc.next_allowed_ms - now)),
                        }
                    })
                    .collect();
                ImageStatus {
                    home: self.homes.get(&name).cloned(),
                    image: name,
                    stamp: local.map(|s| s.to_string()),
                    peers,
                }
            })
            .collect();
        Status {
            node: self.shared.me.to_string(),
            peers: self
                .shared
                .peers
                .values()
                .map(|p| PeerStatus {
                    id: p.id.to_string(),
                    address: p.address.to_string(),
                    up: self.sm.peer_up(&p.id),
                })
                .collect(),
            images,
        }
    }

    /// Carry out actions until the state machine has none.
    fn drain(&mut self) {
        loop {
            let mut batch: Vec<(String, NodeId, IncomingBlock)> = Vec::new();
            let mut any = false;
            while let Some(a) = self.sm.poll_action() {
                any = true;
                match a {
                    Action::Store {
                        image,
                        peer,
                        hash,
                        codec,
                        raw_len,
                        payload,
                    } => batch.push((
                        image,
                        peer,
                        IncomingBlock {
                            hash: BlockHash(hash),
                            codec,
                            raw_len,
                            payload,
                        },
                    )),
                    other => {
                        self.flush(&mut batch);
                        self.exec(other);
                    }
                }
            }
            self.flush(&mut batch);
            if !any {
                return;
            }
        }
    }

    /// Verify and keep a batch of received blocks (one pack sync).
    fn flush(&mut self, batch: &mut Vec<(String, NodeId, IncomingBlock)>) {
        if batch.is_empty() {
            return;
        }
        let items = std::mem::take(batch);
        let blocks: Vec<IncomingBlock> = items.iter().map(|(_, _, b)| b.clone()).collect();
        let store = self.shared.store.clone();
        let (verdicts, store_failed) = match tokio::task::block_in_place(|| store.put_stored(blocks)) {
            Ok(v) => (v, false),
            Err(e) => {
                // Not the peer's fault (a full disk, say): the pull retries
                // the blocks and gives up after a few tries.
                warn!(error = %e, "cannot keep received blocks");
                self.shared.metrics.error("store");
                (vec![false; items.len()], true)
            }
        };
        let now = self.now();
        for ((image, peer, b), ok) in items.into_iter().zip(verdicts) {
            if !ok && !store_failed {
                warn!(%image, %peer, block = %b.hash, "received block does not match its hash: rejected, fetching again");
                self.shared
                    .metrics
                    .blocks_rejected
                    .get_or_create(&self.shared.peer_label(&peer))
                    .inc();
            }
            self.sm.handle(
                now,
                Event::Stored {
                    image,
                    hash: b.hash.0,
                    ok,
                },
            );
        }
    }

    fn exec(&mut self, a: Action) {
        let now = self.now();
        let store = self.shared.store.clone();
        match a {
            Action::Send { peer, req, msg } => {
                let conn = self.shared.conns.lock().unwrap().get(&peer).cloned();
                let Some(conn) = conn else {
                    self.sm.handle(
                        now,
                        Event::Failed {
                            peer,
                            req,
                            reason: "not connected".into(),
                        },
                    );
                    return;
                };
                let shared = self.shared.clone();
                let h = tokio::spawn(request(shared, conn, peer, req, msg));
                self.streams.started(req, h.abort_handle());
            }
            Action::Cancel { req, .. } => self.streams.cancel(req),
            Action::CheckMissing { image, hashes } => {
                let hs: Vec<BlockHash> = hashes.iter().map(|h| BlockHash(*h)).collect();
                let missing = match tokio::task::block_in_place(|| store.lacking(&hs)) {
                    Ok(m) => m.into_iter().map(|h| h.0).collect(),
                    Err(e) => {
                        warn!(error = %e, "cannot check blocks; fetching all");
                        hashes
                    }
                };
                self.sm.handle(
                    now,
                    Event::Missing {
                        image,
                        hashes: missing,
                    },
                );
            }
            Action::Store { .. } => unreachable!("batched in drain"),
            Action::Apply(plan) => {
                let image = plan.image.clone();
                let outcome = match tokio::task::block_in_place(|| store.apply_replica(&plan)) {
                    Ok(ReplicaOutcome::Applied(_)) => ApplyOutcome::Done,
                    Ok(ReplicaOutcome::Busy) => {
                        info!(%image, "image is open for writing here; the newer version waits until it is closed");
                        ApplyOutcome::Busy
                    }
                    Ok(ReplicaOutcome::Stale) => ApplyOutcome::Stale,
                    Err(e) => {
                        self.shared.metrics.error("store");
                        warn!(%image, error = %e, "a pulled version could not be applied");
                        ApplyOutcome::Failed(e.to_string())
                    }
                };
                self.sm.handle(now, Event::Applied { image, outcome });
            }
            Action::AcquireLease { image } => {
                let me = self.shared.me;
                let granted = match tokio::task::block_in_place(|| {
                    store.try_transfer_lease(&image, &self.holder, LEASE_MS, &|h| holder_is_dead(me, h))
                }) {
                    Ok(g) => g,
                    Err(e) => {
                        warn!(error = %e, %image, "cannot take the transfer lease");
                        false
                    }
                };
                if granted {
                    self.leases.push(image.clone());
                } else {
                    debug!(%image, "another daemon is transferring this image; retrying later");
                }
                self.sm.handle(now, Event::Lease { image, granted });
            }
            Action::ReleaseLease { image } => {
                self.leases.retain(|i| *i != image);
                if let Err(e) =
                    tokio::task::block_in_place(|| store.release_transfer_lease(&image, &self.holder))
                {
                    warn!(error = %e, %image, "cannot release the transfer lease (it expires)");
                }
            }
            Action::Done { image, peer, report } => {
                let m = &self.shared.metrics;
                let pl = self.shared.peer_label(&peer);
                m.blocks_fetched.get_or_create(&pl).inc_by(report.fetched);
                m.block_bytes_fetched.get_or_create(&pl).inc_by(report.bytes);
                m.blocks_deduped.get_or_create(&pl).inc_by(report.deduped);
                m.transfers
                    .get_or_create(&TransferL {
                        peer: peer.to_string(),
                        result: "ok".into(),
                    })
                    .inc();
                if let Some(snap) = &report.conflict {
                    m.conflicts.get_or_create(&pl).inc();
                    warn!(%image, %peer, snapshot = %snap, "both sites changed the image: the newer version won, ours is kept as a snapshot");
                }
                info!(
                    %image, %peer, stamp = %report.stamp, millis = report.millis,
                    fetched = report.fetched, deduped = report.deduped, bytes = report.bytes,
                    rejected = report.rejected, "pulled"
                );
                self.last.insert(
                    (image, peer),
                    LastTransfer {
                        at_ms: geosync_fs_now_ms(),
                        millis: report.millis,
                        bytes: report.bytes,
                        fetched: report.fetched,
                        deduped: report.deduped,
                    },
                );
            }
            Action::PullFailed { image, peer, reason } => {
                self.shared
                    .metrics
                    .transfers
                    .get_or_create(&TransferL {
                        peer: peer.to_string(),
                        result: "failed".into(),
                    })
                    .inc();
                info!(%image, %peer, %reason, "pull stopped; will retry");
            }
            Action::Violation { peer, reason } => {
                warn!(%peer, %reason, "peer broke the protocol; closing the connection");
                self.shared.metrics.error("protocol");
                if let Some(c) = self.shared.conns.lock().unwrap().get(&peer) {
                    c.close(VarInt::from_u32(close::PROTOCOL), reason.as_bytes());
                }
            }
            Action::OfferResult { image, peer, refused } => {
                for m in self.moves.iter_mut().filter(|m| m.image == image && m.to == peer) {
                    match &refused {
                        None => {
                            m.offered = true;
                            let _ = m.events.send(MoveEvent {
                                state: "offered".into(),
                                bytes: 0,
                                total: m.total,
                                message: None,
                            });
                        }
                        Some(r) => {
                            let _ = m.events.send(MoveEvent {
                                state: "error".into(),
                                bytes: 0,
                                total: 0,
                                message: Some(format!("peer {peer} refused the move: {r}")),
                            });
                        }
                    }
                }
                if refused.is_some() {
                    self.moves.retain(|m| !(m.image == image && m.to == peer));
                }
            }
        }
    }
}

/// Largest reply accepted to one request (a map of a huge image is the
/// largest legitimate one).
const MAX_REPLY: usize = 2 << 30;

/// One request on its own stream; the whole reply goes to the driver as one
/// batch of events (so a block batch is stored with one sync), followed by
/// a `Failed` that the state machine ignores if the reply was complete.
async fn request(shared: Arc<Shared>, conn: Connection, peer: NodeId, req: ReqId, msg: Message) {
    let pl = shared.peer_label(&peer);
    // A block reply has one frame per hash: nothing more is read. Frames go
    // to the driver in batches (one pack sync per batch), at least once a
    // second so slow links show progress before the request timeout.
    let expect = match &msg {
        Message::BlockRequest { hashes } => Some(hashes.len()),
        _ => None,
    };
    let r: Result<Vec<Message>, FrameError> = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| FrameError::Write(e.into()))?;
        let n = write_frame(&mut send, &msg).await?;
        shared
            .metrics
            .frame_bytes_sent
            .get_or_create(&pl)
            .inc_by(n as u64);
        let _ = send.finish();
        let mut frames = Vec::new();
        let (mut count, mut total, mut last) = (0usize, 0usize, Instant::now());
        while let Some((m, n)) = read_frame(&mut recv).await? {
            shared
                .metrics
                .frame_bytes_received
                .get_or_create(&pl)
                .inc_by(n as u64);
            count += 1;
            total += n;
            if total > MAX_REPLY {
                return Err(FrameError::Decode(geosync_proto::wire::DecodeError::Invalid(
                    "reply larger than the limit",
                )));
            }
            frames.push(m);
            if expect == Some(count) {
                break;
            }
            if last.elapsed() > Duration::from_secs(1) {
                let evs = frames
                    .drain(..)
                    .map(|msg| Event::Frame { peer, req, msg })
                    .collect();
                let _ = shared.tx.send(Input::Events(evs));
                last = Instant::now();
            }
        }
        Ok(frames)
    }
    .await;
    let mut evs: Vec<Event> = Vec::new();
    let reason = match r {
        Ok(frames) => {
            evs.extend(frames.into_iter().map(|msg| Event::Frame { peer, req, msg }));
            "reply ended early".to_string()
        }
        Err(FrameError::Decode(e)) => {
            warn!(%peer, error = %e, "malformed reply; closing the connection");
            shared.metrics.error("protocol");
            conn.close(VarInt::from_u32(close::PROTOCOL), e.to_string().as_bytes());
            format!("malformed reply: {e}")
        }
        Err(e) => e.to_string(),
    };
    evs.push(Event::Failed { peer, req, reason });
    let _ = shared.tx.send(Input::Events(evs));
}

// ------------------------------------------------------------------ dialing

async fn dial_loop(endpoint: Endpoint, shared: Arc<Shared>, peer: Peer) {
    let mut failures = 0u32;
    loop {
        match dial(&endpoint, &shared, &peer).await {
            Ok(conn) => {
                failures = 0;
                info!(peer = %peer.id, address = %peer.address, "connected");
                shared.conns.lock().unwrap().insert(peer.id, conn.clone());
                let _ = shared.tx.send(Input::Events(vec![Event::PeerUp(peer.id)]));
                track_wire(&shared, &conn, peer.id).await;
                let why = conn.close_reason().map(|r| r.to_string()).unwrap_or_default();
                shared.conns.lock().unwrap().remove(&peer.id);
                let _ = shared.tx.send(Input::Events(vec![Event::PeerDown(peer.id)]));
                info!(peer = %peer.id, reason = %why, "disconnected");
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    warn!(peer = %peer.id, address = %peer.address, error = %e, "cannot connect; retrying");
                } else {
                    debug!(peer = %peer.id, error = %e, "cannot connect");
                }
            }
        }
        // Randomized back-off: daemons on many nodes do not redial in step.
        let jitter = 500 + (geosync_fs_now_ms() ^ (std::process::id() as u64 * 7919)) % 1500;
        tokio::time::sleep(Duration::from_millis(jitter)).await;
    }
}

/// This store's block size, as the handshake states it.
fn block_size(shared: &Shared) -> u32 {
    u32::try_from(shared.store.block_size()).unwrap_or(u32::MAX)
}

/// Why two nodes cannot replicate: their stores' block sizes differ.
fn block_size_mismatch(me: NodeId, ours: u32, peer: NodeId, theirs: u32) -> String {
    format!(
        "block sizes differ: node {me} stores {ours}-byte blocks, node {peer} {theirs}-byte \
         blocks; stores replicate only with the same block size (`geosync init --block-size`)"
    )
}

async fn dial(endpoint: &Endpoint, shared: &Shared, peer: &Peer) -> Result<Connection, String> {
    let conn = net::connect(endpoint, &shared.identity, peer.id, peer.address).await?;
    // Hello both ways: versions and block sizes must match, and the id must
    // be the pinned one.
    let ours = block_size(shared);
    let hello = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(
            &mut send,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                node: shared.me,
                block_size: ours,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        let _ = send.finish();
        match read_frame(&mut recv).await.map_err(|e| e.to_string())? {
            Some((
                Message::Hello {
                    version,
                    node,
                    block_size,
                },
                _,
            )) if version == PROTOCOL_VERSION && node == peer.id => {
                if block_size == ours {
                    Ok(())
                } else {
                    Err(block_size_mismatch(shared.me, ours, peer.id, block_size))
                }
            }
            Some((Message::Hello { version, .. }, _)) if version != PROTOCOL_VERSION => Err(format!(
                "peer speaks protocol version {version}, we speak {PROTOCOL_VERSION}"
            )),
            Some((Message::Error { code, message }, _)) => {
                Err(format!("peer refused: {message} (code {code})"))
            }
            other => Err(format!("unexpected handshake reply: {other:?}")),
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), hello).await {
        Ok(Ok(())) => Ok(conn),
        Ok(Err(e)) => {
            conn.close(VarInt::from_u32(close::VERSION), e.as_bytes());
            Err(e)
        }
        Err(_) => Err("handshake timed out".into()),
    }
}

/// Count UDP bytes of a connection (QUIC stats) until it closes.
async fn track_wire(shared: &Shared, conn: &Connection, peer: NodeId) {
    let pl = shared.peer_label(&peer);
    let (mut rx, mut tx) = (0u64, 0u64);
    let mut update = |conn: &Connection| {
        let s = conn.stats();
        shared
            .metrics
            .wire_bytes_received
            .get_or_create(&pl)
            .inc_by(s.udp_rx.bytes.saturating_sub(rx));
        shared
            .metrics
            .wire_bytes_sent
            .get_or_create(&pl)
            .inc_by(s.udp_tx.bytes.saturating_sub(tx));
        rx = rx.max(s.udp_rx.bytes);
        tx = tx.max(s.udp_tx.bytes);
    };
    loop {
        tokio::select! {
            _ = conn.closed() => { update(conn); return; }
            _ = tokio::time::sleep(Duration::from_millis(200)) => update(conn),
        }
    }
}

// ------------------------------------------------------------------ serving

async fn accept_loop(endpoint: Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%remote, error = %e, "refused a connection (unknown or invalid peer certificate)");
                    shared.metrics.error("refused");
                    return;
                }
            };
            let Some(peer) = conn
                .peer_identity()
                .and_then(|i| {
                    i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                        .ok()
                })
                .and_then(|c| c.first().and_then(|c| identity::node_id_of(c).ok()))
            else {
                conn.close(VarInt::from_u32(close::PROTOCOL), b"no certificate");
                return;
            };
            let Some(policy) = shared.peers.get(&peer).map(|p| p.policy.clone()) else {
                conn.close(VarInt::from_u32(close::PROTOCOL), b"unknown peer");
                return;
            };
            debug!(%peer, %remote, "peer connected to us");
            let tracker = {
                let shared = shared.clone();
                let conn = conn.clone();
                tokio::spawn(async move { track_wire(&shared, &conn, peer).await })
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                let shared = shared.clone();
                let conn = conn.clone();
                let policy = policy.clone();
                tokio::spawn(async move { serve_stream(shared, conn, peer, policy, send, recv).await });
            }
            let _ = tracker.await;
        });
    }
}

async fn serve_stream(
    shared: Arc<Shared>,
    conn: Connection,
    peer: NodeId,
    policy: sync::Policy,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let pl = shared.peer_label(&peer);
    let violation = |why: String| {
        warn!(%peer, reason = %why, "peer broke the protocol; closing its connection");
        shared.metrics.error("protocol");
        conn.close(VarInt::from_u32(close::PROTOCOL), why.as_bytes());
    };
    let Some(first) = read_request_frame(&shared, peer, &mut send, &mut recv).await else {
        return;
    };
    let req = match first {
        Ok(Some((m, n))) => {
            shared
                .metrics
                .frame_bytes_received
                .get_or_create(&pl)
                .inc_by(n as u64);
            m
        }
        Ok(None) => return violation("empty request stream".into()),
        Err(FrameError::Read(_)) => return,
        Err(e) => return violation(e.to_string()),
    };
    let Some(end) = read_request_frame(&shared, peer, &mut send, &mut recv).await else {
        return;
    };
    match end {
        Ok(None) => {}
        Ok(Some(_)) => return violation("more than one request on a stream".into()),
        Err(FrameError::Read(_)) => return,
        Err(e) => return violation(e.to_string()),
    }
    if let Message::Hello {
        version,
        node,
        block_size: theirs,
    } = &req
    {
        let ours = block_size(&shared);
        let reply = if *version != PROTOCOL_VERSION {
            Message::Error {
                code: code::VERSION,
                message: format!("this node speaks protocol version {PROTOCOL_VERSION}, not {version}"),
            }
        } else if *node != peer {
            return violation(format!("Hello names node {node} but its certificate is {peer}"));
        } else if *theirs != ours {
            let message = block_size_mismatch(shared.me, ours, peer, *theirs);
            warn!(%peer, "{message}");
            Message::Error {
                code: code::BLOCK_SIZE,
                message,
            }
        } else {
            Message::Hello {
                version: PROTOCOL_VERSION,
                node: shared.me,
                block_size: ours,
            }
        };
        if send_frame(&shared, peer, &mut send, reply).await {
            let _ = send.finish();
        }
        return;
    }
    // The reply streams from the store through a small channel: a request
    // for many large blocks never sits in memory whole.
    let (ftx, mut frx) = mpsc::channel::<Message>(4);
    let store = shared.store.clone();
    let kind = sync::kind_name(&req);
    let task = tokio::task::spawn_blocking(move || {
        serve(&policy, &req, &store, &mut |m| {
            let _ = ftx.blocking_send(m);
        })
    });
    let mut ok = true;
    while let Some(mut f) = frx.recv().await {
        if !ok {
            continue; // the stream failed: drain so the store side ends
        }
        if let Message::Error { code, message } = &f {
            if *code == code::FORBIDDEN {
                warn!(%peer, request = kind, %message, "refused a request the peer's policy does not allow");
                shared.metrics.error("forbidden");
            }
        }
        if let (Some(n), Message::Block { payload, .. }) = (corrupt_hook(), &mut f) {
            // Test hook: damage the first N blocks this daemon serves.
            if CORRUPTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                if let Some(b) = payload.first_mut() {
                    *b ^= 0x55;
                }
            }
        }
        ok = send_frame(&shared, peer, &mut send, f).await;
    }
    match task.await {
        Ok(Ok(Some(image))) => {
            info!(%peer, %image, "peer offered an image (a move): pulling it now");
            let _ = shared.tx.send(Input::Events(vec![Event::Force { image, peer }]));
        }
        Ok(Ok(None)) => {}
        Ok(Err(v)) => return violation(v.0),
        Err(_) => return,
    }
    if ok {
        let _ = send.finish();
    }
}

/// A peer that left a stream idle past the stall timeout: counted, logged.
fn stalled(shared: &Shared, peer: NodeId, what: &str) {
    warn!(%peer, timeout_s = shared.stall.as_secs_f64(), "peer stalled {what}; stream dropped");
    shared.metrics.error("stalled");
}

/// Read one frame of a request within the stall timeout; `None` (the
/// stream stopped and reset) if the peer sent nothing for that long.
async fn read_request_frame(
    shared: &Shared,
    peer: NodeId,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Option<Result<Option<(Message, usize)>, FrameError>> {
    match tokio::time::timeout(shared.stall, read_frame(recv)).await {
        Ok(r) => Some(r),
        Err(_) => {
            let _ = recv.stop(VarInt::from_u32(close::STALLED));
            let _ = send.reset(VarInt::from_u32(close::STALLED));
            stalled(shared, peer, "sending its request");
            None
        }
    }
}

/// Send one reply frame, paced by the peer's bandwidth limit; false if the
/// stream failed, or the peer made no room for it within the stall timeout
/// (then the stream is reset).
async fn send_frame(shared: &Shared, peer: NodeId, send: &mut quinn::SendStream, f: Message) -> bool {
    let mut b = Vec::new();
    f.encode(&mut b);
    shared.pace(peer, b.len()).await;
    match tokio::time::timeout(shared.stall, send.write_all(&b)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return false,
        Err(_) => {
            let _ = send.reset(VarInt::from_u32(close::STALLED));
            stalled(shared, peer, "reading our reply");
            return false;
        }
    }
    let pl = shared.peer_label(&peer);
    shared
        .metrics
        .frame_bytes_sent
        .get_or_create(&pl)
        .inc_by(b.len() as u64);
    if matches!(f, Message::Block { .. }) {
        shared.metrics.blocks_sent.get_or_create(&pl).inc();
    }
    true
}

static CORRUPTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `GEOSYNC_SYNCD_CORRUPT_BLOCKS=N`: a test hook that damages the first N
/// blocks served, as a faulty path would (QUIC's own integrity checks make
/// that impossible to provoke from outside).
fn corrupt_hook() -> Option<u64> {
    static N: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("GEOSYNC_SYNCD_CORRUPT_BLOCKS")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

// ------------------------------------------------------------------ control

/// Most (image, peer) pairs whose backlog one status request measures.
const PROBE_LIMIT: usize = 32;

/// Fill in how far behind we are where a peer has a newer head: ask it for
/// the map relative to our head and count the blocks we lack.
async fn behind_by(shared: &Arc<Shared>, st: &mut Status) {
    let mut n = 0;
    for img in &mut st.images {
        let have = shared.store.image_info(&img.image).ok().map(|i| i.stamp);
        for p in &mut img.peers {
            if p.state != "behind" && p.state != "only there" {
                continue;
            }
            n += 1;
            if n > PROBE_LIMIT {
                return;
            }
            let Ok(peer) = NodeId::from_hex(&p.peer) else {
                continue;
            };
            let Some(conn) = shared.conns.lock().unwrap().get(&peer).cloned() else {
                continue;
            };
            let probe = async {
                let (mut send, mut recv) = conn.open_bi().await.ok()?;
                write_frame(
                    &mut send,
                    &Message::PullRequest {
                        image: img.image.clone(),
                        have,
                    },
                )
                .await
                .ok()?;
                let _ = send.finish();
                let mut hashes = std::collections::BTreeSet::new();
                while let Ok(Some((m, _))) = read_frame(&mut recv).await {
                    match m {
                        Message::MapDiff { changes, .. } => {
                            hashes.extend(changes.into_iter().filter_map(|c| c.hash).map(BlockHash))
                        }
                        _ => return None,
                    }
                }
                let hashes: Vec<BlockHash> = hashes.into_iter().collect();
                let store = shared.store.clone();
                tokio::task::spawn_blocking(move || store.lacking(&hashes))
                    .await
                    .ok()?
                    .ok()
            };
            if let Ok(Some(lacking)) = tokio::time::timeout(Duration::from_secs(5), probe).await {
                p.behind_blocks = Some(lacking.len() as u64);
                p.behind_bytes = Some(lacking.len() as u64 * shared.store.block_size());
            }
        }
    }
}

fn bind_control(path: &std::path::Path) -> Result<tokio::net::UnixListener, DaemonError> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| DaemonError::Io { what, source }
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io("creating the directory of"))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::Config(format!(
                "another syncd is running on this store (control socket {} answers)",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
    }
    // Owner only: the umask applies to bind(), then the mode is made exact.
    // SAFETY: umask has no preconditions; restored right after.
    let old = unsafe_umask(0o177);
    let l = tokio::net::UnixListener::bind(path);
    unsafe_umask(old);
    let l = l.map_err(io("binding"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io("securing"))?;
    Ok(l)
}

#[allow(unsafe_code)]
fn unsafe_umask(m: u32) -> u32 {
    // SAFETY: umask(2) cannot fail and has no memory effects.
    unsafe { libc::umask(m as libc::mode_t) as u32 }
}

async fn control_loop(l: tokio::net::UnixListener, shared: Arc<Shared>) {
    loop {
        let Ok((s, _)) = l.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            let Ok(Some(line)) = lines.next_line().await else {
                return;
            };
            let reply_err = |e: String| {
                let mut s = serde_json::to_string(&control::ErrorReply { error: e }).unwrap();
                s.push('\n');
                s
            };
            let req: control::Request = match serde_json::from_str(&line) {
                Ok(r) => r,
                Err(e) => {
                    let _ = w
                        .write_all(reply_err(format!("bad request: {e}")).as_bytes())
                        .await;
                    return;
                }
            };
            match req {
                control::Request::Status => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let _ = shared.tx.send(Input::Control(ControlCmd::Status(tx)));
                    if let Ok(mut st) = rx.await {
                        behind_by(&shared, &mut st).await;
                        let mut s = serde_json::to_string(&st).unwrap();
                        s.push('\n');
                        let _ = w.write_all(s.as_bytes()).await;
                    }
                }
                control::Request::Move { image, to } => {
                    let to = match NodeId::from_hex(&to) {
                        Ok(t) => t,
                        Err(e) => {
                            let _ = w.write_all(reply_err(e.to_string()).as_bytes()).await;
                            return;
                        }
                    };
                    let (tx, mut rx) = mpsc::unbounded_channel();
                    let _ = shared.tx.send(Input::Control(ControlCmd::Move {
                        image,
                        to,
                        events: tx,
                    }));
                    while let Some(ev) = rx.recv().await {
                        let end = ev.state == "done" || ev.state == "error";
                        let mut s = serde_json::to_string(&ev).unwrap();
                        s.push('\n');
                        if w.write_all(s.as_bytes()).await.is_err() || end {
                            return;
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_with_frames_delivered_can_still_be_cancelled() {
        let mut streams = Streams::default();
        let task = tokio::spawn(std::future::pending::<()>()); // a peer that stalls
        let req = 7;
        streams.started(req, task.abort_handle());
        // A first batch of the reply arrived (a slow reply: more to come).
        streams.seen(&Event::Frame {
            peer: NodeId([1; 16]),
            req,
            msg: Message::Ok,
        });
        streams.cancel(req);
        let r = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(r.expect("the task was not stopped").unwrap_err().is_cancelled());
        // Its end removes it.
        let task = tokio::spawn(async {});
        streams.started(8, task.abort_handle());
        streams.seen(&Event::Failed {
            peer: NodeId([1; 16]),
            req: 8,
            reason: "reply ended early".into(),
        });
        assert!(streams.0.is_empty());
    }
}
