//! Pulls of images that share blocks (clones of one base image): a pull
//! whose blocks another pull is fetching waits for them, however long the
//! whole takes, as long as they keep coming; it does not time out.

use std::collections::VecDeque;

use geosync_proto::sync::{Action, ApplyOutcome, Config, Event, ReqId};
use geosync_proto::wire::{CatalogEntry, Hash, MapChange, Message};
use geosync_proto::NodeId;

mod common;

#[test]
fn a_pull_waiting_for_another_pulls_blocks_waits_while_they_come() {
    let peer = NodeId([1; 16]);
    let cfg = Config {
        request_timeout_ms: 1_000,
        batch: 1,
        window: 1,
        max_transfers: 2,
        ..Config::default()
    };
    let (mut sm, stamp) = common::one_peer(peer, cfg, 1, 5);
    // Both images are the same six blocks (two clones of one base).
    let blocks: Vec<Hash> = (0..6u8).map(|i| [i + 1; 32]).collect();
    let entry = |name: &str| CatalogEntry {
        name: name.into(),
        version: 1,
        stamp,
        size: 6 * 65536,
        deleted: false,
    };
    let mut now = 0u64;
    let mut catalogs = 0;
    let mut slow: VecDeque<(ReqId, Vec<Hash>)> = VecDeque::new();
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    sm.handle(now, Event::PeerUp(peer));
    while done.len() < 2 && now < 60_000 {
        while let Some(a) = sm.poll_action() {
            match a {
                Action::Send { req, msg, .. } => {
                    let reply = match msg {
                        Message::CatalogRequest { .. } => {
                            catalogs += 1;
                            let entries = if catalogs == 1 {
                                vec![entry("a"), entry("b")]
                            } else {
                                vec![]
                            };
                            vec![Message::Catalog {
                                seq: 1,
                                entries,
                                more: false,
                            }]
                        }
                        Message::PullRequest { image, .. } => vec![Message::MapDiff {
                            image,
                            base_known: false,
                            stamp,
                            size: 6 * 65536,
                            changes: blocks
                                .iter()
                                .enumerate()
                                .map(|(i, h)| MapChange {
                                    block: i as u64,
                                    hash: Some(*h),
                                })
                                .collect(),
                            live: vec![(0, 6)],
                            more: false,
                        }],
                        Message::BlockRequest { hashes } => {
                            // A slow link: each block takes 0.8 s.
                            slow.push_back((req, hashes));
                            continue;
                        }
                        other => panic!("unexpected request {other:?}"),
                    };
                    common::reply(&mut sm, now, peer, req, reply);
                }
                Action::AcquireLease { image } => sm.handle(now, Event::Lease { image, granted: true }),
                Action::CheckMissing { image, hashes } => sm.handle(now, Event::Missing { image, hashes }),
                Action::Store { image, hash, .. } => sm.handle(
                    now,
                    Event::Stored {
                        image,
                        hash,
                        ok: true,
                    },
                ),
                Action::Apply(plan) => sm.handle(
                    now,
                    Event::Applied {
                        image: plan.image,
                        outcome: ApplyOutcome::Done,
                    },
                ),
                Action::Done { image, .. } => done.push(image),
                Action::PullFailed { image, reason, .. } => failed.push((image, reason)),
                _ => {}
            }
        }
        now += 800;
        sm.handle_timeout(now);
        if let Some((req, hashes)) = slow.pop_front() {
            for hash in hashes {
                let msg = Message::Block {
                    hash,
                    codec: 0,
                    raw_len: 8,
                    payload: vec![0; 8],
                };
                sm.handle(now, Event::Frame { peer, req, msg });
            }
            let reason = "reply ended".to_string();
            sm.handle(now, Event::Failed { peer, req, reason });
        }
    }
    assert!(failed.is_empty(), "pulls failed: {failed:?}");
    done.sort();
    assert_eq!(done, ["a", "b"]);
    assert!(
        now > 4_000,
        "the blocks took {now} ms: longer than the request timeout"
    );
}
