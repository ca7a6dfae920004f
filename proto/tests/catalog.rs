//! A peer's catalog as the state machine keeps it: a name the peer reports
//! gone (removed, renamed away) is forgotten, so the kept catalog does not
//! grow with every image the peer ever held and status does not show it.

use geosync_proto::sync::{Action, Config, Event};
use geosync_proto::wire::{CatalogEntry, Message};
use geosync_proto::NodeId;

mod common;

#[test]
fn names_the_peer_reports_gone_are_forgotten() {
    let peer = NodeId([9; 16]);
    let cfg = Config {
        catalog_interval_ms: 100,
        ..Config::default()
    };
    let (mut sm, stamp) = common::one_peer(peer, cfg, 5, 3);
    let entry = |name: &str, deleted: bool| CatalogEntry {
        name: name.into(),
        version: 1,
        stamp,
        size: 1 << 20,
        deleted,
    };
    let replies = [
        vec![entry("x", false), entry("y", false)],
        vec![entry("x", true), entry("z", true)],
    ];
    let mut seen: Vec<Vec<String>> = Vec::new();
    let mut now = 0;
    sm.handle(now, Event::PeerUp(peer));
    while seen.len() < replies.len() && now < 10_000 {
        while let Some(a) = sm.poll_action() {
            match a {
                Action::Send {
                    req,
                    msg: Message::CatalogRequest { .. },
                    ..
                } if seen.len() < replies.len() => {
                    let msg = Message::Catalog {
                        seq: seen.len() as u64 + 1,
                        entries: replies[seen.len()].clone(),
                        more: false,
                    };
                    common::reply(&mut sm, now, peer, req, vec![msg]);
                    let names = sm.remote_catalog(&peer).unwrap().keys().cloned().collect();
                    seen.push(names);
                }
                // No pulls here: the lease is always taken.
                Action::AcquireLease { image } => sm.handle(
                    now,
                    Event::Lease {
                        image,
                        granted: false,
                    },
                ),
                _ => {}
            }
        }
        now += 100;
        sm.handle_timeout(now);
    }
    assert_eq!(seen, [vec!["x", "y"], vec!["y"]]);
}
