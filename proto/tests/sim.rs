//! Deterministic simulation of three sites running the sync state machine
//! over a faulty network, with a model store behind each (the serving side
//! is the real `proto::serve`). Seeded: a failing seed replays exactly.
//!
//! Faults, during a chaos phase:
//! - **loss**: a frame is lost; its stream either resets (the requester
//!   hears `Failed`) or goes silent (the requester's timeout fires);
//! - **duplication**: a request is answered twice (a retransmitted request;
//!   QUIC never duplicates frames inside a stream, so the copy arrives
//!   after the original stream);
//! - **reordering**: every stream has its own random latency, so replies to
//!   different requests overtake each other;
//! - **partitions** of single links, and **restarts** of a node's daemon
//!   (its state machine is lost; its store and leases persist, and leases
//!   only expire);
//! - **clock skew** of up to ±5 minutes per node (HLC stamps absorb it);
//! - **corruption**: a block's bytes are damaged in flight;
//! - local **writes** on every site to the same images, and writers that
//!   keep an image open (the switch must wait).
//!
//! Then the network heals, writers close, and the sites must converge:
//! the same head (stamp and content) everywhere, and every version ever
//! committed is still reachable — as a head, a conflict snapshot, or an
//! ancestor of one of them.
//!
//! `GEOSYNC_SIM_SEEDS=N` runs N seeds (default 24).

use std::collections::{BTreeMap, BTreeSet};

use geosync_proto::serve::{serve, MapView, Source, StoredBlock};
use geosync_proto::sync::{Action, ApplyOutcome, ApplyPlan, Config, Event, Policy, ReqId, Sync};
use geosync_proto::wire::{CatalogEntry, Hash, MapChange, Message};
use geosync_proto::{Hlc, NodeId, Stamp};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Content-addressing of the model: a block's content is a u64; its hash
/// and payload follow from it, so a damaged payload is detectable.
fn hash_of(v: u64) -> Hash {
    let mut h = [0x5a; 32];
    h[..8].copy_from_slice(&v.to_le_bytes());
    h
}
fn payload_of(h: &Hash) -> Vec<u8> {
    h[..8].repeat(4)
}

type Content = BTreeMap<u64, Hash>;

#[derive(Clone, Debug)]
struct Img {
    stamp: Stamp,
    size: u64,
    blocks: BTreeMap<u64, (Hash, u64)>, // block -> (hash, born)
    version: u64,
    history: Vec<(Stamp, u64)>,
    seq: u64,
    writer_open: bool,
}

impl Img {
    fn content(&self) -> Content {
        self.blocks.iter().map(|(b, (h, _))| (*b, *h)).collect()
    }
}

#[derive(Default)]
struct Model {
    hlc: Hlc,
    seq: u64,
    images: BTreeMap<String, Img>,
    snapshots: BTreeMap<(String, String), (Stamp, Content)>,
    blocks: BTreeSet<Hash>,
    /// Blocks that arrived from a peer (a second arrival is a wasted fetch).
    fetched: BTreeSet<Hash>,
    leases: BTreeMap<String, (u64, u64)>, // image -> (incarnation, expires at global ms)
}

impl Source for Model {
    fn catalog_since(&self, since: u64) -> Result<(u64, Vec<CatalogEntry>), String> {
        let entries = self
            .images
            .iter()
            .filter(|(_, i)| i.seq > since)
            .map(|(n, i)| CatalogEntry {
                name: n.clone(),
                version: i.version,
                stamp: i.stamp,
                size: i.size,
                deleted: false,
            })
            .collect();
        Ok((self.seq, entries))
    }
    fn map(&self, image: &str, have: Option<Stamp>) -> Result<Option<MapView>, String> {
        let Some(img) = self.images.get(image) else {
            return Ok(None);
        };
        let base = have.and_then(|h| img.history.iter().find(|(s, _)| *s == h).map(|(_, v)| *v));
        let changes = img
            .blocks
            .iter()
            .filter(|(_, (_, born))| base.is_none_or(|x| *born > x))
            .map(|(b, (h, _))| MapChange {
                block: *b,
                hash: Some(*h),
            })
            .collect();
        let mut live: Vec<(u64, u64)> = Vec::new();
        for b in img.blocks.keys() {
            match live.last_mut() {
                Some(e) if e.1 == *b => e.1 += 1,
                _ => live.push((*b, b + 1)),
            }
        }
        Ok(Some(MapView {
            base_known: base.is_some(),
            stamp: img.stamp,
            size: img.size,
            changes,
            live,
        }))
    }
    fn block(&self, hash: &Hash) -> Result<Option<StoredBlock>, String> {
        Ok(self.blocks.contains(hash).then(|| StoredBlock {
            codec: 0,
            raw_len: 32,
            payload: payload_of(hash),
        }))
    }
}

struct Node {
    id: NodeId,
    skew: i64,
    incarnation: u64,
    sm: Sync,
    store: Model,
    down_until: Option<u64>,
}

#[derive(Debug)]
enum Net {
    /// A request reaches `to`.
    Request {
        from: usize,
        from_inc: u64,
        to: usize,
        req: ReqId,
        msg: Message,
        dup: bool,
    },
    /// A reply frame reaches `to`.
    Reply {
        from: usize,
        to: usize,
        to_inc: u64,
        req: ReqId,
        msg: Message,
    },
    /// The stream of `req` resets.
    Reset {
        to: usize,
        to_inc: u64,
        from: usize,
        req: ReqId,
    },
}

#[derive(Default, Debug)]
struct Counters {
    lost: u64,
    duplicated: u64,
    partitions: u64,
    restarts: u64,
    corrupted: u64,
    rejected: u64,
    busy: u64,
    conflicts: u64,
    pulls: u64,
    writes: u64,
    /// A block fetched that an earlier fetch had already stored.
    fetched_twice: u64,
}

struct Sim {
    rng: Rng,
    t: u64,
    nodes: Vec<Node>,
    queue: BTreeMap<(u64, u64), Net>,
    qseq: u64,
    links_down: BTreeMap<(usize, usize), u64>,
    cancelled: BTreeSet<(usize, u64, ReqId)>,
    /// Streams that lost a frame: a duplicate of their request is not
    /// answered (QUIC cannot deliver a second reply stream under one id).
    broken: BTreeSet<(usize, u64, ReqId)>,
    truth: BTreeMap<Stamp, Content>,
    parent: BTreeMap<Stamp, Option<Stamp>>,
    chaos: bool,
    c: Counters,
}

const IMAGES: [&str; 3] = ["alpha", "beta", "gamma"];

fn sim_config() -> Config {
    Config {
        catalog_interval_ms: 200,
        request_timeout_ms: 2_000,
        pacing_factor: 2.0,
        retry_min_ms: 100,
        retry_max_ms: 1_000,
        batch: 4,
        window: 2,
        max_transfers: 2,
        max_rejects: 3,
        block_size: 1 << 16,
    }
}

const LEASE_MS: u64 = 10_000;

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let ids: Vec<NodeId> = (0..3u8).map(|i| NodeId([i + 1; 16])).collect();
        let nodes = (0..3)
            .map(|i| {
                let peers = (0..3).filter(|&j| j != i).map(|j| (ids[j], everything()));
                Node {
                    id: ids[i],
                    skew: rng.below(600_000) as i64 - 300_000,
                    incarnation: 0,
                    sm: Sync::new(sim_config(), peers, seed ^ i as u64),
                    store: Model::default(),
                    down_until: None,
                }
            })
            .collect();
        let mut s = Sim {
            rng,
            t: 1_000_000,
            nodes,
            queue: BTreeMap::new(),
            qseq: 0,
            links_down: BTreeMap::new(),
            cancelled: BTreeSet::new(),
            broken: BTreeSet::new(),
            truth: BTreeMap::new(),
            parent: BTreeMap::new(),
            chaos: true,
            c: Counters::default(),
        };
        for i in 0..3 {
            for j in 0..3 {
                if i != j {
                    let id = s.nodes[j].id;
                    s.event(i, Event::PeerUp(id));
                }
            }
        }
        s
    }

    fn local_now(&self, i: usize) -> u64 {
        (self.t as i64 + self.nodes[i].skew + 400_000) as u64
    }

    fn link_up(&self, a: usize, b: usize) -> bool {
        let k = (a.min(b), a.max(b));
        !self.links_down.contains_key(&k)
            && self.nodes[a].down_until.is_none()
            && self.nodes[b].down_until.is_none()
    }

    fn push(&mut self, at: u64, n: Net) {
        self.qseq += 1;
        self.queue.insert((at, self.qseq), n);
    }

    fn event(&mut self, i: usize, ev: Event) {
        let now = self.local_now(i);
        self.nodes[i].sm.handle(now, ev);
        self.drain(i);
    }

    fn index_of(&self, id: NodeId) -> usize {
        self.nodes.iter().position(|n| n.id == id).unwrap()
    }

    /// Carry out node `i`'s actions.
    fn drain(&mut self, i: usize) {
        while let Some(a) = self.nodes[i].sm.poll_action() {
            let now = self.local_now(i);
            match a {
                Action::Send { peer, req, msg } => {
                    let to = self.index_of(peer);
                    let lat = 1 + self.rng.below(40);
                    if !self.link_up(i, to) {
                        let inc = self.nodes[i].incarnation;
                        self.push(
                            self.t + lat,
                            Net::Reset {
                                to: i,
                                to_inc: inc,
                                from: to,
                                req,
                            },
                        );
                        continue;
                    }
                    if self.chaos && self.rng.chance(0.02) {
                        self.c.lost += 1;
                        if self.rng.chance(0.5) {
                            let inc = self.nodes[i].incarnation;
                            self.push(
                                self.t + lat,
                                Net::Reset {
                                    to: i,
                                    to_inc: inc,
                                    from: to,
                                    req,
                                },
                            );
                        }
                        continue;
                    }
                    let inc = self.nodes[i].incarnation;
                    let dup = self.chaos && self.rng.chance(0.03);
                    self.push(
                        self.t + lat,
                        Net::Request {
                            from: i,
                            from_inc: inc,
                            to,
                            req,
                            msg: msg.clone(),
                            dup: false,
                        },
                    );
                    if dup {
                        self.c.duplicated += 1;
                        self.push(
                            self.t + lat + 500,
                            Net::Request {
                                from: i,
                                from_inc: inc,
                                to,
                                req,
                                msg,
                                dup: true,
                            },
                        );
                    }
                }
                Action::Cancel { req, .. } => {
                    let inc = self.nodes[i].incarnation;
                    self.cancelled.insert((i, inc, req));
                }
                Action::CheckMissing { image, hashes } => {
                    let st = &self.nodes[i].store;
                    let missing = hashes.into_iter().filter(|h| !st.blocks.contains(h)).collect();
                    self.nodes[i].sm.handle(
                        now,
                        Event::Missing {
                            image,
                            hashes: missing,
                        },
                    );
                }
                Action::Store {
                    image, hash, payload, ..
                } => {
                    let ok = payload == payload_of(&hash);
                    if ok {
                        if !self.nodes[i].store.fetched.insert(hash) {
                            self.c.fetched_twice += 1;
                        }
                        self.nodes[i].store.blocks.insert(hash);
                    } else {
                        self.c.rejected += 1;
                    }
                    self.nodes[i].sm.handle(now, Event::Stored { image, hash, ok });
                }
                Action::Apply(plan) => {
                    let image = plan.image.clone();
                    let outcome = self.apply(i, plan);
                    if outcome == ApplyOutcome::Busy {
                        self.c.busy += 1;
                    }
                    self.nodes[i].sm.handle(now, Event::Applied { image, outcome });
                }
                Action::AcquireLease { image } => {
                    let inc = self.nodes[i].incarnation;
                    let t = self.t;
                    let l = &mut self.nodes[i].store.leases;
                    let granted = match l.get(&image) {
                        Some((holder, exp)) if *holder != inc && *exp > t => false,
                        _ => {
                            l.insert(image.clone(), (inc, t + LEASE_MS));
                            true
                        }
                    };
                    self.nodes[i].sm.handle(now, Event::Lease { image, granted });
                }
                Action::ReleaseLease { image } => {
                    let inc = self.nodes[i].incarnation;
                    let l = &mut self.nodes[i].store.leases;
                    if l.get(&image).is_some_and(|(h, _)| *h == inc) {
                        l.remove(&image);
                    }
                }
                Action::Done { report, .. } => {
                    self.c.pulls += 1;
                    if report.conflict.is_some() {
                        self.c.conflicts += 1;
                    }
                }
                Action::PullFailed { .. } | Action::OfferResult { .. } => {}
                Action::Violation { peer, reason } => {
                    panic!("node {i} saw a protocol violation from {peer}: {reason}")
                }
            }
        }
    }

    fn apply(&mut self, i: usize, plan: ApplyPlan) -> ApplyOutcome {
        let node = &mut self.nodes[i];
        let st = &mut node.store;
        let cur = st.images.get(&plan.image);
        if cur.is_some_and(|c| c.writer_open) {
            return ApplyOutcome::Busy;
        }
        if cur.map(|c| c.stamp) != plan.expect_local {
            return ApplyOutcome::Stale;
        }
        let old: Content = cur.map(|c| c.content()).unwrap_or_default();
        let mut new: Content = if plan.base_known {
            old.iter()
                .filter(|(b, _)| plan.live.iter().any(|(s, e)| (*s..*e).contains(*b)))
                .map(|(b, h)| (*b, *h))
                .collect()
        } else {
            Content::new()
        };
        for c in &plan.changes {
            match c.hash {
                Some(h) => new.insert(c.block, h),
                None => new.remove(&c.block),
            };
        }
        if let Some(h) = new.values().find(|h| !st.blocks.contains(*h)) {
            return ApplyOutcome::Failed(format!("block {:x?} missing", &h[..4]));
        }
        assert_eq!(
            Some(&new),
            self.truth.get(&plan.stamp),
            "node {i}: {} at {} does not have the content of that version (base_known {})",
            plan.image,
            plan.stamp,
            plan.base_known
        );
        if let (Some(name), Some(c)) = (&plan.keep_local_as, cur) {
            st.snapshots
                .entry((plan.image.clone(), name.clone()))
                .or_insert((c.stamp, old.clone()));
        }
        st.seq += 1;
        st.hlc = st.hlc.observe(plan.stamp.hlc, 0);
        let seq = st.seq;
        let img = st.images.entry(plan.image.clone()).or_insert_with(|| Img {
            stamp: plan.stamp,
            size: 0,
            blocks: BTreeMap::new(),
            version: 0,
            history: vec![],
            seq,
            writer_open: false,
        });
        img.version += 1;
        let v = img.version;
        let mut blocks = BTreeMap::new();
        for (b, h) in new {
            let born = match img.blocks.get(&b) {
                Some((oh, ob)) if *oh == h => *ob,
                _ => v,
            };
            blocks.insert(b, (h, born));
        }
        img.blocks = blocks;
        img.stamp = plan.stamp;
        img.size = plan.size;
        img.history.push((plan.stamp, v));
        img.seq = seq;
        ApplyOutcome::Done
    }

    fn local_write(&mut self, i: usize) {
        let name = IMAGES[self.rng.below(3) as usize].to_string();
        let now = self.local_now(i);
        let nblocks = 1 + self.rng.below(4);
        let mut edits = Vec::new();
        for _ in 0..nblocks {
            let b = self.rng.below(24);
            // Half the contents come from a small pool: blocks shared within
            // and across images, as clones and common files make them.
            let v = if self.rng.chance(0.15) {
                None
            } else if self.rng.chance(0.5) {
                Some(self.rng.below(40))
            } else {
                Some(self.rng.next())
            };
            edits.push((b, v));
        }
        let origin = self.nodes[i].id;
        let st = &mut self.nodes[i].store;
        st.hlc = st.hlc.tick(now);
        let stamp = Stamp { hlc: st.hlc, origin };
        st.seq += 1;
        let seq = st.seq;
        let img = st.images.entry(name.clone()).or_insert_with(|| Img {
            stamp,
            size: 24 << 16,
            blocks: BTreeMap::new(),
            version: 0,
            history: vec![],
            seq,
            writer_open: false,
        });
        let parent = (img.version > 0).then_some(img.stamp);
        img.version += 1;
        let ver = img.version;
        for (b, v) in edits {
            match v {
                Some(v) => {
                    let h = hash_of(v);
                    st.blocks.insert(h);
                    img.blocks.insert(b, (h, ver));
                }
                None => {
                    img.blocks.remove(&b);
                }
            }
        }
        img.stamp = stamp;
        img.history.push((stamp, ver));
        img.seq = seq;
        let content = img.content();
        self.truth.insert(stamp, content);
        self.parent.insert(stamp, parent);
        self.c.writes += 1;
        let heads = vec![(name, Some(stamp))];
        self.event(i, Event::LocalHeads(heads));
    }

    fn deliver(&mut self, n: Net) {
        match n {
            Net::Request {
                from,
                from_inc,
                to,
                req,
                msg,
                dup,
            } => {
                if !self.link_up(from, to) || (dup && self.broken.contains(&(from, from_inc, req))) {
                    return;
                }
                let policy = everything();
                let mut frames = Vec::new();
                serve(&policy, &msg, &self.nodes[to].store, &mut |m| frames.push(m))
                    .unwrap_or_else(|v| panic!("the state machine sent a non-request: {v}"));
                let mut at = self.t + 1 + self.rng.below(60);
                if dup {
                    at += 200;
                }
                for mut f in frames {
                    at += 1;
                    if self.chaos && self.rng.chance(0.005) {
                        self.c.lost += 1;
                        self.broken.insert((from, from_inc, req));
                        if self.rng.chance(0.5) {
                            self.push(
                                at,
                                Net::Reset {
                                    to: from,
                                    to_inc: from_inc,
                                    from: to,
                                    req,
                                },
                            );
                        }
                        return; // the stream is broken from here on
                    }
                    if let Message::Block { payload, .. } = &mut f {
                        if self.chaos && self.rng.chance(0.01) {
                            payload[0] ^= 0xff;
                            self.c.corrupted += 1;
                        }
                    }
                    self.push(
                        at,
                        Net::Reply {
                            from: to,
                            to: from,
                            to_inc: from_inc,
                            req,
                            msg: f,
                        },
                    );
                }
            }
            Net::Reply {
                from,
                to,
                to_inc,
                req,
                msg,
            } => {
                if to_inc != self.nodes[to].incarnation
                    || !self.link_up(from, to)
                    || self.cancelled.contains(&(to, to_inc, req))
                {
                    return;
                }
                let peer = self.nodes[from].id;
                self.event(to, Event::Frame { peer, req, msg });
            }
            Net::Reset {
                to,
                to_inc,
                from,
                req,
            } => {
                if to_inc != self.nodes[to].incarnation || self.nodes[to].down_until.is_some() {
                    return;
                }
                let peer = self.nodes[from].id;
                self.event(
                    to,
                    Event::Failed {
                        peer,
                        req,
                        reason: "stream reset".into(),
                    },
                );
            }
        }
    }

    fn set_link(&mut self, a: usize, b: usize, up: bool) {
        let (ida, idb) = (self.nodes[a].id, self.nodes[b].id);
        if up {
            self.event(a, Event::PeerUp(idb));
            self.event(b, Event::PeerUp(ida));
        } else {
            self.event(a, Event::PeerDown(idb));
            self.event(b, Event::PeerDown(ida));
        }
    }

    fn chaos_step(&mut self) {
        let r = &mut self.rng;
        if r.chance(0.004) {
            let i = r.below(3) as usize;
            self.local_write(i);
        }
        let r = &mut self.rng;
        if r.chance(0.0005) {
            // Partition one link for a while.
            let a = r.below(3) as usize;
            let b = (a + 1 + r.below(2) as usize) % 3;
            let k = (a.min(b), a.max(b));
            let until = self.t + 500 + r.below(8_000);
            if !self.links_down.contains_key(&k)
                && self.nodes[a].down_until.is_none()
                && self.nodes[b].down_until.is_none()
            {
                self.c.partitions += 1;
                self.set_link(a, b, false);
                self.links_down.insert(k, until);
            }
        }
        let r = &mut self.rng;
        if r.chance(0.0002) {
            // Restart a daemon: its state machine is gone; the store stays.
            let i = r.below(3) as usize;
            let until = self.t + 200 + r.below(3_000);
            if self.nodes[i].down_until.is_none() {
                self.c.restarts += 1;
                for j in 0..3 {
                    if j != i && self.link_up(i, j) {
                        let id = self.nodes[i].id;
                        self.event(j, Event::PeerDown(id));
                    }
                }
                self.nodes[i].down_until = Some(until);
            }
        }
        let r = &mut self.rng;
        if r.chance(0.0005) {
            // A writer opens (or closes) an image somewhere.
            let i = r.below(3) as usize;
            let name = IMAGES[r.below(3) as usize];
            if let Some(img) = self.nodes[i].store.images.get_mut(name) {
                img.writer_open = !img.writer_open;
            }
        }
    }

    fn heal_links(&mut self, all: bool) {
        let t = self.t;
        let due: Vec<(usize, usize)> = self
            .links_down
            .iter()
            .filter(|(_, until)| all || **until <= t)
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            self.links_down.remove(&k);
            if self.nodes[k.0].down_until.is_none() && self.nodes[k.1].down_until.is_none() {
                self.set_link(k.0, k.1, true);
            }
        }
        for i in 0..3 {
            if self.nodes[i].down_until.is_some_and(|u| all || u <= t) {
                self.restart(i);
            }
        }
    }

    fn restart(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.down_until = None;
        n.incarnation += 1;
        let ids: Vec<NodeId> = (0..3).map(|j| NodeId([j as u8 + 1; 16])).collect();
        let peers = (0..3).filter(|&j| j != i).map(|j| (ids[j], everything()));
        n.sm = Sync::new(sim_config(), peers, self.rng.next());
        let heads: Vec<(String, Option<Stamp>)> = n
            .store
            .images
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.stamp)))
            .collect();
        self.event(i, Event::LocalHeads(heads));
        for j in 0..3 {
            if j != i && self.link_up(i, j) {
                self.set_link(i, j, true);
            }
        }
    }

    fn step(&mut self) {
        self.t += 5;
        while let Some(e) = self.queue.first_entry() {
            if e.key().0 > self.t {
                break;
            }
            let n = e.remove();
            self.deliver(n);
        }
        for i in 0..3 {
            if self.nodes[i].down_until.is_some() {
                continue;
            }
            let now = self.local_now(i);
            if self.nodes[i].sm.poll_timeout().is_some_and(|t| t <= now) {
                self.nodes[i].sm.handle_timeout(now);
                self.drain(i);
            }
            // A timer that has fired is never offered again (no busy loop).
            if let Some(t) = self.nodes[i].sm.poll_timeout() {
                assert!(t > now, "node {i}: poll_timeout {t} is not after now {now}");
            }
        }
        self.heal_links(false);
        if self.chaos {
            self.chaos_step();
        }
    }

    fn converged(&self) -> bool {
        let heads = |n: &Node| -> BTreeMap<String, (Stamp, Content)> {
            n.store
                .images
                .iter()
                .map(|(k, v)| (k.clone(), (v.stamp, v.content())))
                .collect()
        };
        let first = heads(&self.nodes[0]);
        self.nodes.iter().all(|n| heads(n) == first)
    }

    /// Every committed version is a head, a snapshot, or an ancestor of one.
    fn lost_versions(&self) -> Vec<Stamp> {
        let mut reach = BTreeSet::new();
        let mut stack: Vec<Stamp> = Vec::new();
        for n in &self.nodes {
            stack.extend(n.store.images.values().map(|i| i.stamp));
            stack.extend(n.store.snapshots.values().map(|(s, _)| *s));
        }
        while let Some(s) = stack.pop() {
            if reach.insert(s) {
                if let Some(Some(p)) = self.parent.get(&s) {
                    stack.push(*p);
                }
            }
        }
        self.truth
            .keys()
            .filter(|s| !reach.contains(s))
            .copied()
            .collect()
    }
}

fn everything() -> Policy {
    Policy {
        pull: vec!["*".into()],
        push: vec!["*".into()],
    }
}

fn run(seed: u64) -> Counters {
    let mut s = Sim::new(seed);
    // Chaos: 120 s of simulated time.
    for _ in 0..24_000 {
        s.step();
    }
    // Heal: no more faults or writes; writers close; everything reconnects.
    s.chaos = false;
    s.heal_links(true);
    for n in &mut s.nodes {
        for img in n.store.images.values_mut() {
            img.writer_open = false;
        }
    }
    let mut steps = 0;
    while !s.converged() {
        s.step();
        steps += 1;
        assert!(
            steps < 60_000,
            "seed {seed}: no convergence 300 s after healing; heads: {:#?}",
            s.nodes
                .iter()
                .map(|n| n
                    .store
                    .images
                    .iter()
                    .map(|(k, v)| (k.clone(), v.stamp))
                    .collect::<Vec<_>>())
                .collect::<Vec<_>>()
        );
    }
    let lost = s.lost_versions();
    assert!(lost.is_empty(), "seed {seed}: committed versions lost: {lost:?}");
    // Conflict snapshots hold exactly the content of the version they name.
    for n in &s.nodes {
        for ((img, snap), (stamp, content)) in &n.store.snapshots {
            assert_eq!(
                Some(content),
                s.truth.get(stamp),
                "seed {seed}: snapshot {img}/{snap}"
            );
        }
    }
    std::mem::take(&mut s.c)
}

#[test]
fn three_sites_converge_and_lose_nothing() {
    let seeds: u64 = std::env::var("GEOSYNC_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let mut total = Counters::default();
    for seed in 0..seeds {
        let c = run(seed);
        total.lost += c.lost;
        total.duplicated += c.duplicated;
        total.partitions += c.partitions;
        total.restarts += c.restarts;
        total.corrupted += c.corrupted;
        total.rejected += c.rejected;
        total.busy += c.busy;
        total.conflicts += c.conflicts;
        total.pulls += c.pulls;
        total.writes += c.writes;
        total.fetched_twice += c.fetched_twice;
    }
    eprintln!("{total:?}");
    assert_eq!(
        total.fetched_twice, 0,
        "a block was fetched again after it was stored: {total:?}"
    );
    // The faults really happened (otherwise this test proves nothing).
    if seeds >= 8 {
        assert!(
            total.lost > 0 && total.duplicated > 0 && total.partitions > 0,
            "{total:?}"
        );
        assert!(
            total.restarts > 0 && total.corrupted > 0 && total.rejected > 0,
            "{total:?}"
        );
        assert!(
            total.busy > 0 && total.conflicts > 0 && total.pulls > total.writes / 2,
            "{total:?}"
        );
    }
}
