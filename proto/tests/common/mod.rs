//! Setup shared by the state-machine tests.

use geosync_proto::sync::{Config, Event, Policy, ReqId, Sync};
use geosync_proto::wire::Message;
use geosync_proto::{Hlc, NodeId, Stamp};

/// A state machine whose one peer, `peer`, may pull and push every image,
/// and a stamp of that peer's at `wall_ms`.
pub fn one_peer(peer: NodeId, cfg: Config, seed: u64, wall_ms: u64) -> (Sync, Stamp) {
    let all = Policy {
        pull: vec!["*".into()],
        push: vec!["*".into()],
    };
    let stamp = Stamp {
        hlc: Hlc { wall_ms, counter: 0 },
        origin: peer,
    };
    (Sync::new(cfg, [(peer, all)], seed), stamp)
}

/// Deliver a whole reply to request `req`: its frames, then the end of its
/// stream (which the state machine ignores for a complete reply).
pub fn reply(sm: &mut Sync, now: u64, peer: NodeId, req: ReqId, frames: Vec<Message>) {
    for msg in frames {
        sm.handle(now, Event::Frame { peer, req, msg });
    }
    let reason = "reply ended".to_string();
    sm.handle(now, Event::Failed { peer, req, reason });
}
