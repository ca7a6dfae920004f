//! Hostile replies: a peer answers the state machine's requests with any
//! frames at all (decoded from the input), in any order, to any request
//! id. The machine must never panic, and must keep its timers sane.
#![no_main]
use geosync_proto::sync::{Action, Config, Event, Policy, Sync};
use geosync_proto::wire::Message;
use geosync_proto::NodeId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let peer = NodeId([7; 16]);
    let all = Policy {
        pull: vec!["*".into()],
        push: vec!["*".into()],
    };
    let mut sm = Sync::new(Config::default(), [(peer, all)], 1);
    let mut now = 1_000;
    sm.handle(now, Event::PeerUp(peer));
    let mut rest = data;
    while rest.len() > 2 {
        let (req, step) = (rest[0] as u64 % 16, rest[1] as u64);
        rest = &rest[2..];
        now += step * 10;
        let msg = match Message::decode(rest) {
            Ok(Some((m, used))) => {
                rest = &rest[used..];
                m
            }
            _ => break,
        };
        sm.handle(now, Event::Frame { peer, req, msg });
        // Answer store requests as a store with nothing in it would.
        while let Some(a) = sm.poll_action() {
            match a {
                Action::CheckMissing { image, hashes } => sm.handle(now, Event::Missing { image, hashes }),
                Action::Store { image, hash, .. } => sm.handle(now, Event::Stored { image, hash, ok: step % 3 != 0 }),
                Action::AcquireLease { image } => sm.handle(now, Event::Lease { image, granted: true }),
                Action::Apply(p) => sm.handle(
                    now,
                    Event::Applied {
                        image: p.image,
                        outcome: geosync_proto::sync::ApplyOutcome::Done,
                    },
                ),
                _ => {}
            }
        }
        sm.handle_timeout(now);
        if let Some(t) = sm.poll_timeout() {
            assert!(t > now);
        }
    }
});
