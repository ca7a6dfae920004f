//! A userspace UDP relay that damages traffic the way a bad WAN does —
//! drop, duplicate, reorder, delay — seeded and reproducible. Kernel
//! `netem` is not available on our machines; tests put this between two
//! `syncd`s (`geosync relay` runs it by hand).
//!
//! Every client address seen on `listen` gets its own upstream socket to
//! `target`, so replies find their way back. Datagrams are delayed by
//! `delay` plus up to `jitter`; a reordered datagram is held back an extra
//! `3 × jitter + 1 ms`, so it arrives after ones sent later.

use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How to damage traffic.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Probability a datagram is dropped.
    pub drop: f64,
    /// Probability a datagram is sent twice.
    pub dup: f64,
    /// Probability a datagram is held back behind later ones.
    pub reorder: f64,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Random extra delay, up to this.
    pub jitter: Duration,
    /// RNG seed.
    pub seed: u64,
}

/// What the relay did.
#[derive(Debug, Default)]
pub struct Counts {
    /// Datagrams forwarded (either way).
    pub forwarded: AtomicU64,
    /// Dropped.
    pub dropped: AtomicU64,
    /// Duplicated.
    pub duplicated: AtomicU64,
    /// Reordered.
    pub reordered: AtomicU64,
}

/// A running relay; stops when dropped.
pub struct Relay {
    /// Address clients send to.
    pub addr: SocketAddr,
    /// What it did so far.
    pub counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct Rng(u64);
impl Rng {
    fn f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Pending {
    at: Instant,
    seq: u64,
    data: Vec<u8>,
    via: Arc<UdpSocket>,
    to: SocketAddr,
}
impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq)) // min-heap
    }
}

struct Shared {
    faults: Faults,
    rng: Mutex<Rng>,
    queue: Mutex<BinaryHeap<Pending>>,
    seq: AtomicU64,
    counts: Arc<Counts>,
}

impl Shared {
    /// Decide the fate of one datagram and queue it.
    fn submit(&self, data: &[u8], via: &Arc<UdpSocket>, to: SocketAddr) {
        let f = &self.faults;
        let (drop, dup, reorder, j1, j2) = {
            let mut r = self.rng.lock().unwrap();
            (
                r.f64() < f.drop,
                r.f64() < f.dup,
                r.f64() < f.reorder,
                r.f64(),
                r.f64(),
            )
        };
        if drop {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        let mut copies = vec![j1];
        if dup {
            self.counts.duplicated.fetch_add(1, Ordering::Relaxed);
            copies.push(j2);
        }
        let mut q = self.queue.lock().unwrap();
        for j in copies {
            let mut at = now + f.delay + f.jitter.mul_f64(j);
            if reorder {
                at += f.jitter * 3 + Duration::from_millis(1);
            }
            q.push(Pending {
                at,
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
                data: data.to_vec(),
                via: via.clone(),
                to,
            });
        }
        if reorder {
            self.counts.reordered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Relay {
    /// Relay datagrams sent to `listen` on to `target` (and replies back).
    pub fn start(listen: SocketAddr, target: SocketAddr, faults: Faults) -> std::io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind(listen)?);
        front.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = front.local_addr()?;
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            rng: Mutex::new(Rng(faults.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)),
            faults,
            queue: Mutex::new(BinaryHeap::new()),
            seq: AtomicU64::new(0),
            counts: counts.clone(),
        });
        let mut threads = Vec::new();
        // Sender: releases queued datagrams when due.
        {
            let (shared, stop) = (shared.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let due = {
                        let mut q = shared.queue.lock().unwrap();
                        let mut due = Vec::new();
                        while q.peek().is_some_and(|p| p.at <= Instant::now()) {
                            due.push(q.pop().unwrap());
                        }
                        due
                    };
                    for p in due {
                        let _ = p.via.send_to(&p.data, p.to);
                        shared.counts.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }));
        }
        // Front: client -> target, one upstream socket per client.
        {
            let (shared, stop, front) = (shared.clone(), stop.clone(), front.clone());
            threads.push(std::thread::spawn(move || {
                let upstreams: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Default::default();
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, client)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    let up = {
                        let mut u = upstreams.lock().unwrap();
                        match u.get(&client) {
                            Some(s) => s.clone(),
                            None => {
                                let bind: SocketAddr = if target.is_ipv4() {
                                    "127.0.0.1:0".parse().unwrap()
                                } else {
                                    "[::1]:0".parse().unwrap()
                                };
                                let Ok(s) = UdpSocket::bind(bind) else { continue };
                                let s = Arc::new(s);
                                let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
                                u.insert(client, s.clone());
                                // Back: target -> this client.
                                let (shared, stop, front, s2) =
                                    (shared.clone(), stop.clone(), front.clone(), s.clone());
                                std::thread::spawn(move || {
                                    let mut buf = vec![0u8; 65536];
                                    while !stop.load(Ordering::Relaxed) {
                                        if let Ok((n, _)) = s2.recv_from(&mut buf) {
                                            shared.submit(&buf[..n], &front, client);
                                        }
                                    }
                                });
                                s
                            }
                        }
                    };
                    shared.submit(&buf[..n], &up, target);
                }
            }));
        }
        Ok(Relay {
            addr,
            counts,
            stop,
            threads,
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
