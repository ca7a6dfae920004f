//! A map that cannot be of the image it claims (blocks past its size) is
//! refused when it arrives: the pull fails, the peer is reported for a
//! protocol violation, and no block of it is fetched.

use geosync_proto::sync::{Action, Config, Event};
use geosync_proto::wire::{CatalogEntry, MapChange, Message};
use geosync_proto::NodeId;

mod common;

const BS: u64 = 65536;

/// Pull "img" (4 blocks) from a peer whose map reply is `changes`, `live`;
/// returns (block requests sent, violations reported, pull failures).
fn pull_with_map(changes: Vec<MapChange>, live: Vec<(u64, u64)>) -> (usize, usize, usize) {
    pull_with_frames(vec![(4 * BS, changes, live)])
}

/// One `MapDiff` frame: size, changes, live extents.
type Frame = (u64, Vec<MapChange>, Vec<(u64, u64)>);

/// [`pull_with_map`] with a map in several frames.
fn pull_with_frames(frames: Vec<Frame>) -> (usize, usize, usize) {
    let peer = NodeId([7; 16]);
    let cfg = Config {
        block_size: BS,
        ..Config::default()
    };
    let (mut sm, stamp) = common::one_peer(peer, cfg, 3, 9);
    let (mut blocks, mut violations, mut failures, mut catalogs) = (0, 0, 0, 0);
    let mut now = 0;
    sm.handle(now, Event::PeerUp(peer));
    for _ in 0..50 {
        while let Some(a) = sm.poll_action() {
            match a {
                Action::Send { req, msg, .. } => {
                    let replies = match msg {
                        Message::CatalogRequest { .. } => {
                            catalogs += 1;
                            let entries = if catalogs == 1 {
                                vec![CatalogEntry {
                                    name: "img".into(),
                                    version: 1,
                                    stamp,
                                    size: 4 * BS,
                                    deleted: false,
                                }]
                            } else {
                                vec![]
                            };
                            vec![Message::Catalog {
                                seq: 1,
                                entries,
                                more: false,
                            }]
                        }
                        Message::PullRequest { image, .. } => frames
                            .iter()
                            .enumerate()
                            .map(|(i, (size, changes, live))| Message::MapDiff {
                                image: image.clone(),
                                base_known: false,
                                stamp,
                                size: *size,
                                changes: changes.clone(),
                                live: live.clone(),
                                more: i + 1 < frames.len(),
                            })
                            .collect(),
                        Message::BlockRequest { .. } => {
                            blocks += 1;
                            continue;
                        }
                        other => panic!("unexpected request {other:?}"),
                    };
                    common::reply(&mut sm, now, peer, req, replies);
                }
                Action::AcquireLease { image } => sm.handle(now, Event::Lease { image, granted: true }),
                Action::CheckMissing { image, hashes } => sm.handle(now, Event::Missing { image, hashes }),
                Action::Violation { .. } => violations += 1,
                Action::PullFailed { .. } => failures += 1,
                _ => {}
            }
        }
        if failures > 0 || blocks > 0 {
            break;
        }
        now += 1000;
        sm.handle_timeout(now);
    }
    (blocks, violations, failures)
}

fn change(block: u64) -> MapChange {
    MapChange {
        block,
        hash: Some([block as u8 + 1; 32]),
    }
}

#[test]
fn a_map_within_the_image_is_fetched() {
    let (blocks, violations, failures) = pull_with_map(vec![change(0), change(3)], vec![(0, 1), (3, 4)]);
    assert!(blocks > 0, "its blocks were not requested");
    assert_eq!((violations, failures), (0, 0));
}

#[test]
fn maps_past_the_image_size_are_refused_before_fetching() {
    for (changes, live) in [
        (vec![change(0), change(4)], vec![(0, 1)]),          // block 4 of 4
        (vec![change(0)], vec![(0, 1), (2, 9)]),             // extent past the end
        (vec![change(0)], vec![(3, 2)]),                     // reversed extent
        ((0..5).map(|_| change(1)).collect(), vec![(1, 2)]), // 5 changes, 4 blocks
    ] {
        let what = format!("{changes:?} {live:?}");
        let (blocks, violations, failures) = pull_with_map(changes, live);
        assert_eq!(blocks, 0, "blocks requested for {what}");
        assert_eq!((violations, failures), (1, 1), "{what}");
    }
}

#[test]
fn frames_of_one_map_that_disagree_on_its_size_are_refused() {
    // The first frame's blocks fit only the first frame's size.
    let (blocks, violations, failures) = pull_with_frames(vec![
        (64 * BS, vec![change(40)], vec![(40, 41)]),
        (4 * BS, vec![change(0)], vec![(0, 1)]),
    ]);
    assert_eq!(blocks, 0);
    assert_eq!((violations, failures), (1, 1));
    // Agreeing frames are one map.
    let (blocks, violations, failures) = pull_with_frames(vec![
        (4 * BS, vec![change(0)], vec![(0, 1)]),
        (4 * BS, vec![change(3)], vec![(3, 4)]),
    ]);
    assert!(blocks > 0);
    assert_eq!((violations, failures), (0, 0));
}
