//! The store's side of replication, without a network: received blocks are
//! verified before they are kept (a padded payload that would verify but
//! make an unreadable record is refused too, and so is a block of another
//! block size), and a pulled version switches
//! in one transaction, refusing an image open for writing or whose head moved.

use geosync_fs::pack::{hash_block, seal, Compression, RECORD_HEADER_LEN};
use geosync_fs::store::replica::{IncomingBlock, ReplicaOutcome};
use geosync_fs::{InitOptions, Store};
use geosync_proto::sync::ApplyPlan;
use geosync_proto::wire::MapChange;
use geosync_proto::{Hlc, NodeId, Stamp};

#[test]
fn received_blocks_are_verified_and_padded_payloads_refused() {
    let t = tempfile::tempdir().unwrap();
    let s = Store::init(t.path(), &InitOptions::default()).unwrap();
    let raw: Vec<u8> = b"replica ".iter().cycle().take(65536).copied().collect();
    let h = hash_block(&raw);
    let z = seal(&raw, h, Compression::Zstd(3)).record[RECORD_HEADER_LEN..].to_vec();
    // A zstd payload followed by a large skippable frame still decodes to
    // the right bytes, but its record would be longer than any reader takes.
    let mut padded = z.clone();
    padded.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    padded.extend_from_slice(&70_000u32.to_le_bytes());
    padded.extend(vec![0u8; 70_000]);
    let mut flipped = raw.clone();
    flipped[100] ^= 1;
    // A whole, valid block of another store's block size.
    let small = raw[..4096].to_vec();
    let v = s
        .put_stored(vec![
            IncomingBlock {
                hash: hash_block(&small),
                codec: 0,
                raw_len: 4096,
                payload: small,
            },
            IncomingBlock {
                hash: h,
                codec: 1,
                raw_len: 65536,
                payload: padded,
            },
            IncomingBlock {
                hash: h,
                codec: 0,
                raw_len: 65536,
                payload: flipped,
            },
        ])
        .unwrap();
    assert_eq!(v, vec![false, false, false]);
    assert_eq!(s.lacking(&[h]).unwrap(), vec![h], "nothing bad was kept");
    let v = s
        .put_stored(vec![IncomingBlock {
            hash: h,
            codec: 1,
            raw_len: 65536,
            payload: z,
        }])
        .unwrap();
    assert_eq!(v, vec![true]);
    assert!(s.lacking(&[h]).unwrap().is_empty());
    assert_eq!(s.read_block(&h).unwrap(), raw);

    // A version naming it switches in; one naming a missing block does not.
    let stamp = Stamp {
        hlc: Hlc {
            wall_ms: 1_000,
            counter: 0,
        },
        origin: NodeId([9; 16]),
    };
    let plan = ApplyPlan {
        image: "vm".into(),
        peer: NodeId([9; 16]),
        stamp,
        size: 4 * 65536,
        base_known: false,
        expect_local: None,
        changes: vec![MapChange {
            block: 2,
            hash: Some(h.0),
        }],
        live: vec![(2, 3)],
        keep_local_as: None,
    };
    assert_eq!(s.apply_replica(&plan).unwrap(), ReplicaOutcome::Applied(1));
    let mut buf = vec![0u8; 65536];
    s.open_image("vm").unwrap().read(2 * 65536, &mut buf).unwrap();
    assert_eq!(buf, raw);
    assert_eq!(
        s.image_info("vm").unwrap().stamp,
        stamp,
        "the stamp travels unchanged"
    );
    // The head moved since the plan was made: stale, nothing changes.
    assert_eq!(s.apply_replica(&plan).unwrap(), ReplicaOutcome::Stale);
    // Open for writing: busy, nothing changes.
    let mut w = s.open_image("vm").unwrap();
    w.acquire().unwrap();
    let newer = Stamp {
        hlc: Hlc {
            wall_ms: 2_000,
            counter: 0,
        },
        ..stamp
    };
    let next = ApplyPlan {
        stamp: newer,
        expect_local: Some(stamp),
        base_known: true,
        changes: vec![],
        live: vec![],
        ..plan.clone()
    };
    assert_eq!(s.apply_replica(&next).unwrap(), ReplicaOutcome::Busy);
    drop(w);
    assert_eq!(s.apply_replica(&next).unwrap(), ReplicaOutcome::Applied(2));
    assert_eq!(
        s.image_info("vm").unwrap().referenced,
        0,
        "outside `live`, blocks became holes"
    );
    let missing = ApplyPlan {
        stamp: Stamp {
            hlc: Hlc {
                wall_ms: 3_000,
                counter: 0,
            },
            ..stamp
        },
        expect_local: Some(newer),
        changes: vec![MapChange {
            block: 0,
            hash: Some([1; 32]),
        }],
        ..plan
    };
    assert!(s.apply_replica(&missing).is_err());
    assert_eq!(s.image_info("vm").unwrap().stamp, newer);
}

#[test]
fn a_version_stamped_hours_ahead_is_refused_and_the_clock_stays() {
    // A site whose clock is wrong (years ahead) must not move every other
    // site's clock there for good: its versions are refused, loudly.
    let t = tempfile::tempdir().unwrap();
    let s = Store::init(t.path(), &InitOptions::default()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let plan = |ahead_ms: u64| ApplyPlan {
        image: "vm".into(),
        peer: NodeId([9; 16]),
        stamp: Stamp {
            hlc: Hlc {
                wall_ms: now + ahead_ms,
                counter: 0,
            },
            origin: NodeId([9; 16]),
        },
        size: 4 * 65536,
        base_known: false,
        expect_local: None,
        changes: vec![],
        live: vec![],
        keep_local_as: None,
    };
    let e = s.apply_replica(&plan(2 * 3_600_000)).unwrap_err();
    assert!(matches!(e, geosync_fs::Error::ClockAhead { .. }), "{e}");
    assert!(e.to_string().contains("ahead of this node's clock"), "{e}");
    assert!(s.list_images().unwrap().is_empty(), "applied anyway");
    // Its clock did not move: a local commit is stamped now, not hours ahead.
    s.create_image("local", 65536).unwrap();
    let mut h = s.open_image("local").unwrap();
    h.write(0, &[1; 4096]).unwrap();
    let stamp = h.commit().unwrap().stamp.unwrap();
    assert!(stamp.hlc.wall_ms < now + 600_000, "{stamp}");
    // Minutes of skew are fine.
    assert!(matches!(
        s.apply_replica(&plan(10 * 60_000)).unwrap(),
        ReplicaOutcome::Applied(_)
    ));
}

/// Catalogs tell peers about names that went away: a removed image, the old
/// name of a renamed one, and the target a rename replaced is there again.
/// A name used again is an image again, not a removal.
#[test]
fn catalogs_report_removed_and_renamed_away_names() {
    let t = tempfile::tempdir().unwrap();
    let s = Store::init(t.path(), &InitOptions::default()).unwrap();
    for n in ["a", "b", "c", "d"] {
        s.create_image(n, 1 << 20).unwrap();
    }
    let since = s.seq().unwrap();
    s.remove_image("a").unwrap();
    s.rename_image("b", "b2").unwrap();
    s.replace_image("c", "d").unwrap();
    let (seq, entries) = s.catalog_since(since).unwrap();
    assert!(seq > since);
    let mut got: Vec<(String, bool)> = entries.iter().map(|e| (e.name.clone(), e.deleted)).collect();
    got.sort();
    let want = [("a", true), ("b", true), ("b2", false), ("c", true), ("d", false)];
    assert_eq!(got, want.map(|(n, d)| (n.to_string(), d)));
    // Nothing since: nothing reported again.
    assert!(s.catalog_since(seq).unwrap().1.is_empty());
    // "a" again: an image, and no longer a removal, even from the start.
    s.create_image("a", 1 << 20).unwrap();
    let (_, all) = s.catalog_since(0).unwrap();
    let a: Vec<bool> = all.iter().filter(|e| e.name == "a").map(|e| e.deleted).collect();
    assert_eq!(a, [false]);
    // What a catalog says survives a reopen.
    drop(s);
    let s = Store::open(t.path(), geosync_fs::OpenMode::ReadWrite).unwrap();
    let (_, all) = s.catalog_since(0).unwrap();
    assert!(all.iter().any(|e| e.name == "b" && e.deleted));
}
