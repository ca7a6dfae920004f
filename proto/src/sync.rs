//! The replication state machine: which images to pull from which peer, and
//! one pull per image from request to the switch. Sans-I/O: the driver
//! (`syncd`, or the simulation in the tests) feeds [`Event`]s with `now`
//! and carries out the [`Action`]s it polls; nothing here reads a clock,
//! touches a socket or a disk.
//!
//! # The rules
//! - **Receiver-driven.** A node polls each peer's catalog incrementally
//!   (`CatalogRequest { since }`) and pulls an image when the peer's head
//!   has a newer stamp than its own and the peer may push that image to it
//!   ([`Policy::may_push`]). Pushing is asking: [`Message::Offer`] makes the
//!   other side pull now, bypassing its pacing (a project move).
//! - **Newest wins, per image.** A pull says which version the receiver
//!   holds (`have`, its head's stamp). If the sender's history holds that
//!   version (`base_known`), the new head descends from ours or kept ours as
//!   a snapshot, and we switch to it. If not, both sides changed: the newer
//!   stamp wins (we only pull newer ones), and our head is kept as a
//!   snapshot named by [`conflict_name`] — nothing is lost.
//! - **Only missing blocks travel.** After the map, the driver reports which
//!   hashes the store lacks ([`Event::Missing`]); only those are requested,
//!   `window` batches at a time. Each block is verified by the driver before
//!   it is kept ([`Event::Stored`] with `ok: false` re-requests it, up to
//!   `max_rejects` times). Stored blocks outlive a failed transfer, so a
//!   retry asks only for what is still missing: it resumes.
//! - **One switch.** When every block is present, [`Action::Apply`] asks the
//!   driver to switch the image in one transaction, provided its head is
//!   still `expect_local` (else [`ApplyOutcome::Stale`]) and no one has it
//!   open for writing (else [`ApplyOutcome::Busy`]: the version waits, and
//!   the pull is retried with jitter; its blocks are already here).
//! - **One transfer per image.** A node runs at most one pull per image, and
//!   takes the store's transfer lease first ([`Action::AcquireLease`]) so
//!   that several daemons on one store do not race; a refused lease is
//!   retried after a random delay in `[retry_min_ms, retry_max_ms]`.
//! - **Pacing.** An image whose last pull took k ms is not pulled again for
//!   `pacing_factor × k` ms unless forced.
//! - **Failure.** A request without progress for `request_timeout_ms`, a
//!   peer that goes down, or an error reply aborts the pull (lease
//!   released) and schedules a retry with jitter. Frames that break the
//!   protocol produce [`Action::Violation`]: the driver drops the
//!   connection.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::wire::{CatalogEntry, Hash, MapChange, Message};
use crate::{NodeId, Stamp};

/// Identifies one request (and its response stream) on a node.
pub type ReqId = u64;

/// Tuning of the state machine.
#[derive(Clone, Debug)]
pub struct Config {
    /// How often each peer's catalog is polled.
    pub catalog_interval_ms: u64,
    /// A request with no progress for this long fails.
    pub request_timeout_ms: u64,
    /// Pacing: an image whose last pull took k ms waits `factor × k` ms.
    pub pacing_factor: f64,
    /// Lower bound of the random retry delay.
    pub retry_min_ms: u64,
    /// Upper bound of the random retry delay.
    pub retry_max_ms: u64,
    /// Hashes per `BlockRequest`.
    pub batch: usize,
    /// `BlockRequest`s in flight per pull.
    pub window: usize,
    /// Pulls in flight per node.
    pub max_transfers: usize,
    /// Times a block failing verification is fetched again before the pull
    /// fails.
    pub max_rejects: u32,
    /// This node's block size (0: unknown). A map naming blocks past the
    /// image's size in it is refused when it arrives, before any block of
    /// it is fetched.
    pub block_size: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            catalog_interval_ms: 2_000,
            request_timeout_ms: 30_000,
            pacing_factor: 2.0,
            retry_min_ms: 500,
            retry_max_ms: 5_000,
            batch: 32,
            window: 8,
            max_transfers: 4,
            max_rejects: 3,
            block_size: 0,
        }
    }
}

/// What one peer may do with our images. Patterns are globs over image
/// names: `*` is any run of characters, `?` any one character (image names
/// have no other special characters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Images this peer may pull from us.
    pub pull: Vec<String>,
    /// Images this peer may push to us (that we accept from it).
    pub push: Vec<String>,
}

impl Policy {
    /// May the peer pull `image` from us?
    pub fn may_pull(&self, image: &str) -> bool {
        self.pull.iter().any(|p| glob_match(p, image))
    }
    /// May the peer push `image` to us?
    pub fn may_push(&self, image: &str) -> bool {
        self.push.iter().any(|p| glob_match(p, image))
    }
}

/// Glob match with `*` and `?` (iterative, linear backtracking).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// The snapshot name that keeps a losing head: origin and stamp, so the
/// same loser always gets the same name (a valid image/snapshot name).
pub fn conflict_name(loser: &Stamp) -> String {
    format!(
        "conflict-{}-{}.{}",
        &loser.origin.to_string()[..8],
        loser.hlc.wall_ms,
        loser.hlc.counter
    )
}

/// What the driver tells the state machine.
#[derive(Clone, Debug)]
pub enum Event {
    /// A connection to the peer is up (after the handshake).
    PeerUp(NodeId),
    /// The connection to the peer is gone; its requests are void.
    PeerDown(NodeId),
    /// Local heads changed (`None`: the image is gone).
    LocalHeads(Vec<(String, Option<Stamp>)>),
    /// A response frame for request `req`.
    Frame {
        /// The peer that sent it.
        peer: NodeId,
        /// The request it answers.
        req: ReqId,
        /// The frame.
        msg: Message,
    },
    /// Request `req` failed (stream reset, connection lost).
    Failed {
        /// The peer.
        peer: NodeId,
        /// The request.
        req: ReqId,
        /// Why.
        reason: String,
    },
    /// Answer to [`Action::CheckMissing`]: the hashes the store lacks.
    Missing {
        /// Image being pulled.
        image: String,
        /// Missing hashes.
        hashes: Vec<Hash>,
    },
    /// Answer to [`Action::Store`]: the block verified and was kept (`ok`),
    /// or its bytes do not match its hash.
    Stored {
        /// Image being pulled.
        image: String,
        /// The block.
        hash: Hash,
        /// Verified and kept.
        ok: bool,
    },
    /// Answer to [`Action::Apply`].
    Applied {
        /// Image.
        image: String,
        /// What happened.
        outcome: ApplyOutcome,
    },
    /// Answer to [`Action::AcquireLease`].
    Lease {
        /// Image.
        image: String,
        /// The lease is ours.
        granted: bool,
    },
    /// Pull `image` from `peer` now, ignoring pacing (a move, or an
    /// accepted [`Message::Offer`]).
    Force {
        /// Image.
        image: String,
        /// Peer to pull from.
        peer: NodeId,
    },
}

/// Result of switching an image to a pulled version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The image is now the pulled version.
    Done,
    /// The image is open for writing here; the version waits.
    Busy,
    /// The local head is no longer `expect_local`; decide again.
    Stale,
    /// The store failed.
    Failed(String),
}

/// Everything the driver needs to switch an image in one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyPlan {
    /// Image.
    pub image: String,
    /// Where it came from.
    pub peer: NodeId,
    /// Stamp of the new head (kept as is: a version has one stamp everywhere).
    pub stamp: Stamp,
    /// Its size.
    pub size: u64,
    /// `changes` apply on top of the current head, whose blocks outside
    /// `live` become holes; otherwise `changes` is the whole map.
    pub base_known: bool,
    /// The head this plan was made against (`None`: no image here).
    pub expect_local: Option<Stamp>,
    /// Changed blocks (`None`: hole).
    pub changes: Vec<MapChange>,
    /// Extents of blocks holding data in the new head.
    pub live: Vec<(u64, u64)>,
    /// Keep the current head as this snapshot first (a conflict loser).
    pub keep_local_as: Option<String>,
}

/// Figures of one finished pull.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Stamp now at the head.
    pub stamp: Stamp,
    /// Wall time of the pull, by the driver's `now`.
    pub millis: u64,
    /// Blocks fetched over the wire.
    pub fetched: u64,
    /// Blocks the map named that the store already had (not sent).
    pub deduped: u64,
    /// Blocks rejected by verification and fetched again.
    pub rejected: u64,
    /// Payload bytes received.
    pub bytes: u64,
    /// The snapshot that kept our losing head, if both sides had changed.
    pub conflict: Option<String>,
}

/// What the state machine asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open a stream to `peer` and send `msg`; feed its replies as
    /// [`Event::Frame`] with `req`.
    Send {
        /// Peer.
        peer: NodeId,
        /// Request id.
        req: ReqId,
        /// The request.
        msg: Message,
    },
    /// Abandon request `req` (reset its stream).
    Cancel {
        /// Peer.
        peer: NodeId,
        /// Request id.
        req: ReqId,
    },
    /// Which of `hashes` does the store lack? Answer with [`Event::Missing`].
    CheckMissing {
        /// Image being pulled.
        image: String,
        /// Distinct hashes the new head names.
        hashes: Vec<Hash>,
    },
    /// Verify this block against its hash and keep it; answer with
    /// [`Event::Stored`].
    Store {
        /// Image being pulled.
        image: String,
        /// Peer it came from.
        peer: NodeId,
        /// Block name.
        hash: Hash,
        /// Codec as stored by the sender.
        codec: u8,
        /// Raw length.
        raw_len: u32,
        /// Stored bytes.
        payload: Vec<u8>,
    },
    /// Switch the image; answer with [`Event::Applied`].
    Apply(ApplyPlan),
    /// Take the store's transfer lease on `image`; answer with [`Event::Lease`].
    AcquireLease {
        /// Image.
        image: String,
    },
    /// Give the lease back.
    ReleaseLease {
        /// Image.
        image: String,
    },
    /// A pull finished.
    Done {
        /// Image.
        image: String,
        /// Peer.
        peer: NodeId,
        /// Its figures.
        report: Report,
    },
    /// A pull failed; it will be retried.
    PullFailed {
        /// Image.
        image: String,
        /// Peer.
        peer: NodeId,
        /// Why.
        reason: String,
    },
    /// The peer broke the protocol: drop the connection.
    Violation {
        /// Peer.
        peer: NodeId,
        /// What it did.
        reason: String,
    },
    /// Answer to an [`Sync::offer`]: accepted, or refused with a reason.
    OfferResult {
        /// Image.
        image: String,
        /// Peer that was asked.
        peer: NodeId,
        /// `None`: accepted.
        refused: Option<String>,
    },
}

#[derive(Debug)]
enum ReqKind {
    Catalog,
    Map(String),
    Blocks(String),
    Offer(String),
}

#[derive(Debug, Default)]
struct Peer {
    policy: Policy,
    up: bool,
    cursor: u64,
    remote: BTreeMap<String, CatalogEntry>,
    next_catalog_ms: u64,
    catalog_req: Option<ReqId>,
    catalog_deadline: u64,
    staged: Vec<CatalogEntry>,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Lease,
    Map(ReqId),
    Check,
    Fetch,
    Apply,
}

#[derive(Debug)]
struct Transfer {
    peer: NodeId,
    have: Option<Stamp>,
    started_ms: u64,
    deadline_ms: u64,
    phase: Phase,
    base_known: bool,
    stamp: Option<Stamp>,
    size: u64,
    changes: Vec<MapChange>,
    live: Vec<(u64, u64)>,
    want: VecDeque<Hash>,
    inflight: BTreeMap<ReqId, VecDeque<Hash>>,
    storing: usize,
    /// Hashes this pull fetches and has not stored yet.
    pending: BTreeSet<Hash>,
    /// Hashes another running pull is fetching: not asked for twice.
    awaiting: BTreeSet<Hash>,
    rejects: BTreeMap<Hash, u32>,
    report: Report,
    keep_local_as: Option<String>,
}

/// Per-image pacing and retry bookkeeping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pace {
    /// Not pulled again before this (unless forced).
    pub next_allowed_ms: u64,
    /// How long the last pull took.
    pub last_ms: u64,
    /// When it finished.
    pub finished_ms: u64,
}

/// One node's replication state machine.
#[derive(Debug)]
pub struct Sync {
    cfg: Config,
    rng: u64,
    next_req: ReqId,
    peers: BTreeMap<NodeId, Peer>,
    local: BTreeMap<String, Stamp>,
    transfers: BTreeMap<String, Transfer>,
    pacing: BTreeMap<String, Pace>,
    retry_at: BTreeMap<String, u64>,
    forced: BTreeSet<(String, NodeId)>,
    reqs: BTreeMap<ReqId, (NodeId, ReqKind)>,
    actions: VecDeque<Action>,
    /// The latest `now` seen: timers at or before it have fired.
    now: u64,
    /// Pulls of an image that failed in a row (the retry delay doubles).
    failures: BTreeMap<String, u32>,
}

impl Sync {
    /// A state machine with `peers` and their policies; `seed` drives the
    /// retry jitter (give each node its own).
    pub fn new(cfg: Config, peers: impl IntoIterator<Item = (NodeId, Policy)>, seed: u64) -> Sync {
        Sync {
            cfg,
            rng: seed | 1,
            next_req: 1,
            peers: peers
                .into_iter()
                .map(|(id, policy)| {
                    (
                        id,
                        Peer {
                            policy,
                            ..Peer::default()
                        },
                    )
                })
                .collect(),
            local: BTreeMap::new(),
            transfers: BTreeMap::new(),
            pacing: BTreeMap::new(),
            retry_at: BTreeMap::new(),
            forced: BTreeSet::new(),
            reqs: BTreeMap::new(),
            actions: VecDeque::new(),
            now: 0,
            failures: BTreeMap::new(),
        }
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The earliest time [`Sync::handle_timeout`] has work to do (never a
    /// timer that has already fired).
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t: Option<u64> = None;
        let floor = self.now;
        let mut at = |x: u64| {
            if x > floor {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for p in self.peers.values().filter(|p| p.up) {
            at(if p.catalog_req.is_some() {
                p.catalog_deadline
            } else {
                p.next_catalog_ms
            });
        }
        for tr in self.transfers.values().filter(|t| t.phase != Phase::Apply) {
            at(tr.deadline_ms);
        }
        for &r in self.retry_at.values() {
            at(r);
        }
        for p in self.pacing.values() {
            at(p.next_allowed_ms);
        }
        t
    }

    /// The peer's catalog as last seen (for status reports).
    pub fn remote_catalog(&self, peer: &NodeId) -> Option<&BTreeMap<String, CatalogEntry>> {
        self.peers.get(peer).map(|p| &p.remote)
    }

    /// Local heads as the state machine knows them.
    pub fn local_heads(&self) -> &BTreeMap<String, Stamp> {
        &self.local
    }

    /// Pacing of an image (when it may be pulled again).
    pub fn pace(&self, image: &str) -> Option<Pace> {
        self.pacing.get(image).copied()
    }

    /// The peer a pull of `image` is running from, if one is.
    pub fn transferring(&self, image: &str) -> Option<NodeId> {
        self.transfers.get(image).map(|t| t.peer)
    }

    /// Is the peer connected?
    pub fn peer_up(&self, peer: &NodeId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.up)
    }

    /// Ask `peer` to pull `image` from us now (a move).
    pub fn offer(&mut self, image: &str, peer: NodeId) {
        if !self.peer_up(&peer) {
            self.actions.push_back(Action::OfferResult {
                image: image.into(),
                peer,
                refused: Some("peer is not connected".into()),
            });
            return;
        }
        let req = self.request(peer, ReqKind::Offer(image.into()));
        self.actions.push_back(Action::Send {
            peer,
            req,
            msg: Message::Offer { image: image.into() },
        });
    }

    /// Feed one event.
    pub fn handle(&mut self, now: u64, ev: Event) {
        self.now = self.now.max(now);
        match ev {
            Event::PeerUp(p) => {
                if let Some(peer) = self.peers.get_mut(&p) {
                    peer.up = true;
                    peer.next_catalog_ms = now;
                    peer.catalog_req = None;
                    peer.staged.clear();
                }
            }
            Event::PeerDown(p) => self.peer_down(now, p),
            Event::LocalHeads(heads) => {
                for (name, st) in heads {
                    match st {
                        Some(s) => self.local.insert(name, s),
                        None => self.local.remove(&name),
                    };
                }
            }
            Event::Frame { peer, req, msg } => self.frame(now, peer, req, msg),
            Event::Failed { peer, req, reason } => {
                if let Some((p, kind)) = self.reqs.remove(&req) {
                    if p == peer {
                        self.request_failed(now, peer, kind, reason);
                    }
                }
            }
            Event::Missing { image, hashes } => self.missing(now, &image, hashes),
            Event::Stored { image, hash, ok } => self.stored(now, &image, hash, ok),
            Event::Applied { image, outcome } => self.applied(now, &image, outcome),
            Event::Lease { image, granted } => self.lease(now, &image, granted),
            Event::Force { image, peer } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    self.forced.insert((image.clone(), peer));
                    self.retry_at.remove(&image);
                    if p.catalog_req.is_none() {
                        p.next_catalog_ms = now;
                    }
                }
            }
        }
        self.fire(now);
        self.schedule(now);
    }

    /// Advance timers to `now`.
    pub fn handle_timeout(&mut self, now: u64) {
        self.now = self.now.max(now);
        self.fire(now);
        self.schedule(now);
    }

    /// Everything due at or before `now` (so `poll_timeout` never returns a
    /// time that has passed).
    fn fire(&mut self, now: u64) {
        // Catalog requests that took too long.
        let stuck: Vec<(NodeId, ReqId)> = self
            .peers
            .iter()
            .filter_map(|(id, p)| {
                p.catalog_req
                    .filter(|_| now >= p.catalog_deadline)
                    .map(|r| (*id, r))
            })
            .collect();
        for (peer, req) in stuck {
            self.reqs.remove(&req);
            self.actions.push_back(Action::Cancel { peer, req });
            let j = self.jitter();
            let p = self.peers.get_mut(&peer).unwrap();
            p.catalog_req = None;
            p.staged.clear();
            p.next_catalog_ms = now + j;
        }
        let late: Vec<String> = self
            .transfers
            .iter()
            .filter(|(_, t)| now >= t.deadline_ms && t.phase != Phase::Apply)
            .map(|(n, _)| n.clone())
            .collect();
        for image in late {
            self.abort(now, &image, "no progress before the request timeout".into());
        }
        self.retry_at.retain(|_, t| *t > now);
    }

    fn jitter(&mut self) -> u64 {
        // xorshift64*: deterministic per seed.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let span = self.cfg.retry_max_ms.saturating_sub(self.cfg.retry_min_ms).max(1);
        self.cfg.retry_min_ms + r % span
    }

    fn request(&mut self, peer: NodeId, kind: ReqKind) -> ReqId {
        let req = self.next_req;
        self.next_req += 1;
        self.reqs.insert(req, (peer, kind));
        req
    }

    fn peer_down(&mut self, now: u64, peer: NodeId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.up = false;
            p.catalog_req = None;
            p.staged.clear();
        }
        let dead: Vec<ReqId> = self
            .reqs
            .iter()
            .filter(|(_, (p, _))| *p == peer)
            .map(|(r, _)| *r)
            .collect();
        for r in dead {
            if let Some((_, ReqKind::Offer(image))) = self.reqs.remove(&r) {
                self.actions.push_back(Action::OfferResult {
                    image,
                    peer,
                    refused: Some("connection lost".into()),
                });
            }
        }
        let images: Vec<String> = self
            .transfers
            .iter()
            .filter(|(_, t)| t.peer == peer && t.phase != Phase::Apply)
            .map(|(n, _)| n.clone())
            .collect();
        for image in images {
            self.abort(now, &image, "peer disconnected".into());
        }
    }

    /// Decide what to pull, and poll catalogs that are due.
    fn schedule(&mut self, now: u64) {
        let ids: Vec<NodeId> = self.peers.keys().copied().collect();
        for id in ids {
            let p = &self.peers[&id];
            if p.up && p.catalog_req.is_none() && now >= p.next_catalog_ms {
                let since = p.cursor;
                let req = self.request(id, ReqKind::Catalog);
                let p = self.peers.get_mut(&id).unwrap();
                p.catalog_req = Some(req);
                p.catalog_deadline = now + self.cfg.request_timeout_ms;
                self.actions.push_back(Action::Send {
                    peer: id,
                    req,
                    msg: Message::CatalogRequest { since },
                });
            }
        }
        if self.transfers.len() >= self.cfg.max_transfers {
            return;
        }
        // Best offer per image: the newest stamp among peers allowed to push it.
        let mut best: BTreeMap<&str, (Stamp, NodeId, bool)> = BTreeMap::new();
        for (id, p) in &self.peers {
            if !p.up {
                continue;
            }
            for e in p.remote.values() {
                if e.deleted || !p.policy.may_push(&e.name) {
                    continue;
                }
                if self.local.get(&e.name).is_some_and(|l| *l >= e.stamp) {
                    continue;
                }
                let forced = self.forced.contains(&(e.name.clone(), *id));
                match best.get(e.name.as_str()) {
                    Some((s, _, f)) if (*f, *s) >= (forced, e.stamp) => {}
                    _ => {
                        best.insert(&e.name, (e.stamp, *id, forced));
                    }
                }
            }
        }
        let mut start = Vec::new();
        for (image, (_, peer, forced)) in best {
            if self.transfers.contains_key(image) || self.retry_at.contains_key(image) {
                continue;
            }
            if !forced && self.pacing.get(image).is_some_and(|p| now < p.next_allowed_ms) {
                continue;
            }
            start.push((image.to_string(), peer));
            if self.transfers.len() + start.len() >= self.cfg.max_transfers {
                break;
            }
        }
        for (image, peer) in start {
            self.transfers.insert(
                image.clone(),
                Transfer {
                    peer,
                    have: self.local.get(&image).copied(),
                    started_ms: now,
                    deadline_ms: now + self.cfg.request_timeout_ms,
                    phase: Phase::Lease,
                    base_known: false,
                    stamp: None,
                    size: 0,
                    changes: Vec::new(),
                    live: Vec::new(),
                    want: VecDeque::new(),
                    inflight: BTreeMap::new(),
                    storing: 0,
                    pending: BTreeSet::new(),
                    awaiting: BTreeSet::new(),
                    rejects: BTreeMap::new(),
                    report: Report::default(),
                    keep_local_as: None,
                },
            );
            self.actions.push_back(Action::AcquireLease { image });
        }
    }

    fn lease(&mut self, now: u64, image: &str, granted: bool) {
        let Some(t) = self.transfers.get_mut(image) else {
            if granted {
                self.actions
                    .push_back(Action::ReleaseLease { image: image.into() });
            }
            return;
        };
        if t.phase != Phase::Lease {
            return;
        }
        if !granted {
            self.transfers.remove(image);
            let j = self.jitter();
            self.retry_at.insert(image.into(), now + j);
            return;
        }
        let (peer, have) = (t.peer, t.have);
        let req = self.request(peer, ReqKind::Map(image.into()));
        let t = self.transfers.get_mut(image).unwrap();
        t.phase = Phase::Map(req);
        t.deadline_ms = now + self.cfg.request_timeout_ms;
        self.actions.push_back(Action::Send {
            peer,
            req,
            msg: Message::PullRequest {
                image: image.into(),
                have,
            },
        });
    }

    fn frame(&mut self, now: u64, peer: NodeId, req: ReqId, msg: Message) {
        let Some((p, _)) = self.reqs.get(&req) else {
            return; // a late or duplicate reply to a request we gave up on
        };
        if *p != peer {
            return;
        }
        let kind = match &self.reqs[&req].1 {
            ReqKind::Catalog => 0,
            ReqKind::Map(_) => 1,
            ReqKind::Blocks(_) => 2,
            ReqKind::Offer(_) => 3,
        };
        match kind {
            0 => self.catalog_frame(now, peer, req, msg),
            1 => self.map_frame(now, peer, req, msg),
            2 => self.block_frame(now, peer, req, msg),
            _ => {
                let Some((_, ReqKind::Offer(image))) = self.reqs.remove(&req) else {
                    unreachable!()
                };
                let refused = match msg {
                    Message::Ok => None,
                    Message::Error { code, message } => Some(format!("{message} (code {code})")),
                    other => {
                        self.violation(
                            peer,
                            format!("unexpected reply to an offer: {}", kind_name(&other)),
                        );
                        return;
                    }
                };
                self.actions
                    .push_back(Action::OfferResult { image, peer, refused });
            }
        }
    }

    fn violation(&mut self, peer: NodeId, reason: String) {
        self.actions.push_back(Action::Violation { peer, reason });
    }

    fn catalog_frame(&mut self, now: u64, peer: NodeId, req: ReqId, msg: Message) {
        match msg {
            Message::Catalog { seq, entries, more } => {
                let interval = self.cfg.catalog_interval_ms;
                let timeout = self.cfg.request_timeout_ms;
                let p = self.peers.get_mut(&peer).unwrap();
                p.staged.extend(entries);
                p.catalog_deadline = now + timeout;
                if !more {
                    self.reqs.remove(&req);
                    let p = self.peers.get_mut(&peer).unwrap();
                    for e in p.staged.drain(..) {
                        // A name the peer no longer has is forgotten (its
                        // catalog would otherwise grow with every image it
                        // ever held, and status show them in sync).
                        if e.deleted {
                            p.remote.remove(&e.name);
                        } else {
                            p.remote.insert(e.name.clone(), e);
                        }
                    }
                    p.cursor = p.cursor.max(seq);
                    p.catalog_req = None;
                    p.next_catalog_ms = now + interval;
                }
            }
            Message::Error { code, message } => {
                self.reqs.remove(&req);
                self.request_failed(now, peer, ReqKind::Catalog, format!("{message} (code {code})"));
            }
            other => {
                self.reqs.remove(&req);
                self.request_failed(now, peer, ReqKind::Catalog, "protocol violation".into());
                self.violation(
                    peer,
                    format!("{} in reply to a catalog request", kind_name(&other)),
                );
            }
        }
    }

    fn map_frame(&mut self, now: u64, peer: NodeId, req: ReqId, msg: Message) {
        let Some((_, ReqKind::Map(image))) = self.reqs.get(&req) else {
            return;
        };
        let image = image.clone();
        let t = self
            .transfers
            .get_mut(&image)
            .expect("map request without a transfer");
        match msg {
            Message::MapDiff {
                image: name,
                base_known,
                stamp,
                size,
                changes,
                live,
                more,
            } if name == image && t.stamp.is_none_or(|s| s == stamp) => {
                let why = if t.stamp.is_some() && (t.size, t.base_known) != (size, base_known) {
                    // Frames of one map agree on what they are a map of.
                    Some(format!(
                        "a frame of size {size} (base known: {base_known}) after frames of size {} ({})",
                        t.size, t.base_known
                    ))
                } else {
                    map_out_of_range(
                        self.cfg.block_size,
                        size,
                        (t.changes.len(), t.live.len()),
                        &changes,
                        &live,
                    )
                };
                if let Some(why) = why {
                    self.reqs.remove(&req);
                    self.abort(now, &image, "protocol violation".into());
                    self.violation(peer, format!("map of {image}: {why}"));
                    return;
                }
                t.stamp = Some(stamp);
                t.base_known = base_known;
                t.size = size;
                t.changes.extend(changes);
                t.live.extend(live);
                t.deadline_ms = now + self.cfg.request_timeout_ms;
                if more {
                    return;
                }
                self.reqs.remove(&req);
                let t = self.transfers.get_mut(&image).unwrap();
                if t.have.is_some_and(|h| h >= stamp) {
                    // The peer's head is no newer than ours (its catalog was
                    // ahead of what it serves, or we changed meanwhile).
                    self.finish_quietly(now, &image);
                    return;
                }
                if !base_known {
                    t.keep_local_as = t.have.as_ref().map(conflict_name);
                }
                let mut seen = BTreeSet::new();
                let hashes: Vec<Hash> = t
                    .changes
                    .iter()
                    .filter_map(|c| c.hash)
                    .filter(|h| seen.insert(*h))
                    .collect();
                t.phase = Phase::Check;
                t.report.deduped = hashes.len() as u64;
                self.actions.push_back(Action::CheckMissing { image, hashes });
            }
            Message::Error { code, message } => {
                self.reqs.remove(&req);
                if code == crate::wire::code::FORBIDDEN || code == crate::wire::code::NOT_FOUND {
                    // The peer no longer offers it (deleted, or its policy
                    // changed): forget its entry so others can be pulled from.
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.remote.remove(&image);
                    }
                }
                self.abort(now, &image, format!("peer refused: {message} (code {code})"));
            }
            other => {
                self.reqs.remove(&req);
                let what = format!("{} in reply to a pull of {image}", kind_name(&other));
                self.abort(now, &image, "protocol violation".into());
                self.violation(peer, what);
            }
        }
    }

    fn missing(&mut self, now: u64, image: &str, hashes: Vec<Hash>) {
        let Some(t) = self.transfers.get_mut(image) else {
            return;
        };
        if t.phase != Phase::Check {
            return;
        }
        t.report.deduped = t.report.deduped.saturating_sub(hashes.len() as u64);
        // A block another pull is already fetching is awaited, not fetched again.
        let (mut own, mut awaiting) = (VecDeque::new(), BTreeSet::new());
        for h in hashes {
            let elsewhere = self
                .transfers
                .iter()
                .any(|(n, o)| n != image && o.pending.contains(&h));
            if elsewhere {
                awaiting.insert(h);
            } else {
                own.push_back(h);
            }
        }
        let t = self.transfers.get_mut(image).unwrap();
        t.pending = own.iter().copied().collect();
        t.want = own;
        t.awaiting = awaiting;
        t.phase = Phase::Fetch;
        t.deadline_ms = now + self.cfg.request_timeout_ms;
        self.pump(now, image);
    }

    /// Keep `window` block requests in flight; apply when all are stored.
    fn pump(&mut self, now: u64, image: &str) {
        loop {
            let t = self.transfers.get_mut(image).unwrap();
            if t.inflight.len() >= self.cfg.window || t.want.is_empty() {
                break;
            }
            let n = t.want.len().min(self.cfg.batch);
            let batch: VecDeque<Hash> = t.want.drain(..n).collect();
            let peer = t.peer;
            let req = self.request(peer, ReqKind::Blocks(image.into()));
            let t = self.transfers.get_mut(image).unwrap();
            t.inflight.insert(req, batch.clone());
            self.actions.push_back(Action::Send {
                peer,
                req,
                msg: Message::BlockRequest { hashes: batch.into() },
            });
        }
        let t = self.transfers.get_mut(image).unwrap();
        if t.phase == Phase::Fetch
            && t.want.is_empty()
            && t.inflight.is_empty()
            && t.storing == 0
            && t.awaiting.is_empty()
        {
            t.phase = Phase::Apply;
            t.deadline_ms = now + self.cfg.request_timeout_ms;
            let plan = ApplyPlan {
                image: image.into(),
                peer: t.peer,
                stamp: t.stamp.unwrap(),
                size: t.size,
                base_known: t.base_known,
                expect_local: t.have,
                changes: std::mem::take(&mut t.changes),
                live: std::mem::take(&mut t.live),
                keep_local_as: t.keep_local_as.clone(),
            };
            self.actions.push_back(Action::Apply(plan));
        }
    }

    fn block_frame(&mut self, now: u64, peer: NodeId, req: ReqId, msg: Message) {
        let Some((_, ReqKind::Blocks(image))) = self.reqs.get(&req) else {
            return;
        };
        let image = image.clone();
        let t = self
            .transfers
            .get_mut(&image)
            .expect("block request without a transfer");
        let Some(q) = t.inflight.get_mut(&req) else {
            return;
        };
        let expected = q.pop_front();
        let done = q.is_empty();
        match (msg, expected) {
            (
                Message::Block {
                    hash,
                    codec,
                    raw_len,
                    payload,
                },
                Some(want),
            ) if hash == want => {
                t.storing += 1;
                t.report.fetched += 1;
                t.report.bytes += payload.len() as u64;
                t.deadline_ms = now + self.cfg.request_timeout_ms;
                self.actions.push_back(Action::Store {
                    image: image.clone(),
                    peer,
                    hash,
                    codec,
                    raw_len,
                    payload,
                });
            }
            (Message::Error { code, message }, Some(_)) => {
                self.reqs.remove(&req);
                self.abort(
                    now,
                    &image,
                    format!("peer could not send a block: {message} (code {code})"),
                );
                return;
            }
            (other, _) => {
                self.reqs.remove(&req);
                let what = format!("{} out of order in a block stream for {image}", kind_name(&other));
                self.abort(now, &image, "protocol violation".into());
                self.violation(peer, what);
                return;
            }
        }
        if done {
            self.reqs.remove(&req);
            self.transfers.get_mut(&image).unwrap().inflight.remove(&req);
            self.pump(now, &image);
        }
    }

    fn stored(&mut self, now: u64, image: &str, hash: Hash, ok: bool) {
        let max = self.cfg.max_rejects;
        let Some(t) = self.transfers.get_mut(image) else {
            return;
        };
        if t.phase != Phase::Fetch {
            return;
        }
        t.storing = t.storing.saturating_sub(1);
        if ok {
            t.pending.remove(&hash);
            // Pulls that were waiting for this block have it now: progress
            // for them too (a clone waits on its base's pull that long).
            let deadline = now + self.cfg.request_timeout_ms;
            let waiting: Vec<String> = self
                .transfers
                .iter_mut()
                .filter_map(|(n, o)| {
                    o.awaiting.remove(&hash).then(|| {
                        o.deadline_ms = deadline;
                        n.clone()
                    })
                })
                .collect();
            for w in waiting {
                if self.transfers[&w].phase == Phase::Fetch {
                    self.pump(now, &w);
                }
            }
        }
        let t = self.transfers.get_mut(image).unwrap();
        if !ok {
            t.report.rejected += 1;
            let n = t.rejects.entry(hash).or_default();
            *n += 1;
            if *n > max {
                self.abort(
                    now,
                    image,
                    format!("a block failed verification {} times", max + 1),
                );
                return;
            }
            t.want.push_back(hash);
        }
        self.pump(now, image);
    }

    fn applied(&mut self, now: u64, image: &str, outcome: ApplyOutcome) {
        let Some(t) = self.transfers.get(image) else {
            return;
        };
        if t.phase != Phase::Apply {
            return;
        }
        match outcome {
            ApplyOutcome::Done => {
                let t = self.transfers.remove(image).unwrap();
                let stamp = t.stamp.unwrap();
                self.local.insert(image.into(), stamp);
                let millis = now.saturating_sub(t.started_ms);
                let wait = (millis as f64 * self.cfg.pacing_factor) as u64;
                self.pacing.insert(
                    image.into(),
                    Pace {
                        next_allowed_ms: now + wait,
                        last_ms: millis,
                        finished_ms: now,
                    },
                );
                self.forced.retain(|(i, _)| i != image);
                self.failures.remove(image);
                self.actions
                    .push_back(Action::ReleaseLease { image: image.into() });
                self.actions.push_back(Action::Done {
                    image: image.into(),
                    peer: t.peer,
                    report: Report {
                        stamp,
                        millis,
                        conflict: t.keep_local_as,
                        ..t.report
                    },
                });
            }
            ApplyOutcome::Busy => self.abort(
                now,
                image,
                "image is open for writing here; the new version waits".into(),
            ),
            ApplyOutcome::Stale => self.abort(now, image, "image changed here during the pull".into()),
            ApplyOutcome::Failed(e) => self.abort(now, image, format!("switch failed: {e}")),
        }
    }

    fn request_failed(&mut self, now: u64, peer: NodeId, kind: ReqKind, reason: String) {
        match kind {
            ReqKind::Catalog => {
                let j = self.jitter();
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.catalog_req = None;
                    p.staged.clear();
                    p.next_catalog_ms = now + j;
                }
            }
            ReqKind::Map(image) | ReqKind::Blocks(image) => {
                if self.transfers.get(&image).is_some_and(|t| t.peer == peer) {
                    self.abort(now, &image, reason);
                }
            }
            ReqKind::Offer(image) => self.actions.push_back(Action::OfferResult {
                image,
                peer,
                refused: Some(reason),
            }),
        }
    }

    /// Stop a pull (its stored blocks stay) and retry after jitter.
    fn abort(&mut self, now: u64, image: &str, reason: String) {
        let Some(t) = self.transfers.remove(image) else {
            return;
        };
        // Pulls that were waiting for blocks this one was fetching fetch them.
        let mut resume = Vec::new();
        for (n, o) in self.transfers.iter_mut() {
            let mine: Vec<Hash> = o.awaiting.intersection(&t.pending).copied().collect();
            if !mine.is_empty() {
                for h in mine {
                    o.awaiting.remove(&h);
                    o.pending.insert(h);
                    o.want.push_back(h);
                }
                resume.push(n.clone());
            }
        }
        let mut reqs: Vec<ReqId> = t.inflight.keys().copied().collect();
        if let Phase::Map(r) = t.phase {
            reqs.push(r);
        }
        for req in reqs {
            if self.reqs.remove(&req).is_some() {
                self.actions.push_back(Action::Cancel { peer: t.peer, req });
            }
        }
        if t.phase != Phase::Lease {
            self.actions
                .push_back(Action::ReleaseLease { image: image.into() });
        }
        // Failures in a row back off: 1, 2, 4, 8 times the jitter (an image
        // held open for days is not pulled every few seconds).
        let n = self.failures.entry(image.to_string()).or_default();
        *n = n.saturating_add(1);
        let mult = 1u64 << (*n - 1).min(3);
        let j = self.jitter() * mult;
        self.retry_at.insert(image.into(), now + j);
        self.actions.push_back(Action::PullFailed {
            image: image.into(),
            peer: t.peer,
            reason,
        });
        for n in resume {
            if self.transfers[&n].phase == Phase::Fetch {
                self.pump(now, &n);
            }
        }
    }

    /// End a pull that turned out to be unnecessary.
    fn finish_quietly(&mut self, now: u64, image: &str) {
        // Not before the peer's catalog has had time to say something new.
        let j = self.jitter();
        self.retry_at.insert(image.into(), now + j);
        if self.transfers.remove(image).is_some() {
            self.actions
                .push_back(Action::ReleaseLease { image: image.into() });
        }
    }
}

/// The message kind, for error messages.
pub fn kind_name(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::CatalogRequest { .. } => "CatalogRequest",
        Message::Catalog { .. } => "Catalog",
        Message::PullRequest { .. } => "PullRequest",
        Message::MapDiff { .. } => "MapDiff",
        Message::BlockRequest { .. } => "BlockRequest",
        Message::Block { .. } => "Block",
        Message::Offer { .. } => "Offer",
        Message::Ok => "Ok",
        Message::Error { .. } => "Error",
    }
}

/// Why a map frame cannot be of an image of `size` bytes in `block_size`
/// blocks (`None`: it can, or the block size is unknown): a change or a
/// live extent past the last block, a reversed extent, or more changes or
/// extents in all (`before`: those already received) than the image has
/// blocks.
fn map_out_of_range(
    block_size: u64,
    size: u64,
    before: (usize, usize),
    changes: &[MapChange],
    live: &[(u64, u64)],
) -> Option<String> {
    if block_size == 0 {
        return None;
    }
    let blocks = size.div_ceil(block_size);
    if let Some(c) = changes.iter().find(|c| c.block >= blocks) {
        return Some(format!("block {} of an image of {blocks} blocks", c.block));
    }
    if let Some((a, b)) = live.iter().find(|&&(a, b)| a > b || b > blocks) {
        return Some(format!("extent {a}..{b} of an image of {blocks} blocks"));
    }
    if (before.0 + changes.len()) as u64 > blocks || (before.1 + live.len()) as u64 > blocks {
        return Some(format!("more changes or extents than its {blocks} blocks"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "vm1"));
        assert!(glob_match("vm*", "vm1"));
        assert!(glob_match("*1", "vm1"));
        assert!(glob_match("v?1", "vm1"));
        assert!(glob_match("p-*-db*", "p-42-db.img"));
        assert!(!glob_match("vm", "vm1"));
        assert!(!glob_match("x*", "vm1"));
        assert!(!glob_match("", "vm1"));
        let p = Policy {
            pull: vec!["pub-*".into()],
            push: vec![],
        };
        assert!(p.may_pull("pub-1") && !p.may_pull("priv-1") && !p.may_push("pub-1"));
    }

    #[test]
    fn conflict_names_are_valid_image_names() {
        let s = Stamp {
            hlc: crate::Hlc {
                wall_ms: 1_700_000_000_123,
                counter: 7,
            },
            origin: NodeId([0xab; 16]),
        };
        let n = conflict_name(&s);
        assert_eq!(n, "conflict-abababab-1700000000123.7");
        assert!(
            n.len() <= 128
                && n.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        );
    }
}
