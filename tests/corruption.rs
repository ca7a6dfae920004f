//! Corrupted-store fixtures: damage made on disk the way disks and people
//! damage things, which reads, `scrub` and `repair --reindex` must diagnose
//! (naming image and block) and, where an intact copy exists, fix.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use geosync_fs::store::BlockLoc;
use geosync_fs::{Error, OpenMode, Store};
use geosync_suite::kit::noise;

const BS: u64 = 4096;

/// A store with image `a` (8 blocks of noise) and image `b` (4 blocks).
fn fixture() -> (tempfile::TempDir, Store, Vec<u8>, Vec<u8>) {
    let (dir, s) = geosync_suite::kit::disk_store(BS as u32);
    let a = noise(1, 8 * BS as usize);
    let b = noise(2, 4 * BS as usize);
    for (name, data) in [("a", &a), ("b", &b)] {
        s.create_image(name, data.len() as u64).unwrap();
        let mut h = s.open_image(name).unwrap();
        h.write(0, data).unwrap();
        h.commit().unwrap();
    }
    (dir, s, a, b)
}

fn pack_path(dir: &Path, pack: u64) -> PathBuf {
    dir.join("packs").join(format!("{pack:016x}.pack"))
}

fn loc_of(s: &Store, image: &str, block: u64) -> BlockLoc {
    s.live_map(image)
        .unwrap()
        .into_iter()
        .find(|(b, _, _)| *b == block)
        .unwrap()
        .2
        .unwrap()
}

fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
}

fn read_block(s: &Store, image: &str, block: u64) -> Result<Vec<u8>, Error> {
    let h = s.open_image(image).unwrap();
    let mut buf = vec![0u8; BS as usize];
    h.read(block * BS, &mut buf).map(|_| buf)
}

#[test]
fn flipped_byte_is_an_integrity_error_naming_image_and_block() {
    let (d, s, a, b) = fixture();
    let loc = loc_of(&s, "a", 3);
    flip_byte(&pack_path(d.path(), loc.pack), loc.offset + 52 + 100);

    let e = read_block(&s, "a", 3).unwrap_err();
    assert!(matches!(e, Error::Integrity { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("image \"a\" block 3"), "{msg}");
    assert_eq!(e.errno(), libc::EIO);
    // Nothing else is affected.
    for blk in [0, 1, 2, 4, 5, 6, 7] {
        assert_eq!(
            read_block(&s, "a", blk).unwrap(),
            a[(blk * BS) as usize..((blk + 1) * BS) as usize]
        );
    }
    let h = s.open_image("b").unwrap();
    let mut buf = vec![0u8; b.len()];
    h.read(0, &mut buf).unwrap();
    assert_eq!(buf, b);

    let r = s.scrub(&|_| {}).unwrap();
    assert_eq!(r.blocks_checked, 12);
    assert_eq!(r.damaged.len(), 1, "{:?}", r.damaged);
    assert_eq!(r.damaged[0].location, Some((loc.pack, loc.offset)));
    assert_eq!(r.damaged[0].users, vec![("a".to_string(), 3, true)]);

    // No intact copy exists: reindex reports the block as missing, keeps the rest.
    let r = s.reindex(&|_| {}).unwrap();
    assert_eq!(r.records_damaged.len(), 1);
    assert_eq!(r.missing.len(), 1);
    assert_eq!(r.missing[0].users, vec![("a".to_string(), 3, true)]);
    assert!(matches!(read_block(&s, "a", 3), Err(Error::MissingBlock { .. })));
    assert_eq!(
        read_block(&s, "a", 4).unwrap(),
        a[(4 * BS) as usize..(5 * BS) as usize]
    );
}

#[test]
fn lost_or_wrong_index_is_rebuilt_from_packs() {
    let (d, s, a, _b) = fixture();
    drop(s);
    {
        let c = rusqlite::Connection::open(d.path().join("meta.db")).unwrap();
        // Half the index is gone, and one entry points at the wrong offset.
        let n = c
            .execute(
                "DELETE FROM blocks WHERE hash IN (SELECT hash FROM blocks ORDER BY hash LIMIT 6)",
                [],
            )
            .unwrap();
        assert_eq!(n, 6);
        c.execute(
            "UPDATE blocks SET offset = offset + 1 WHERE hash = (SELECT hash FROM blocks LIMIT 1)",
            [],
        )
        .unwrap();
    }
    let s = Store::open(d.path(), OpenMode::ReadWrite).unwrap();
    let r = s.scrub(&|_| {}).unwrap();
    assert_eq!(r.damaged.len(), 7, "{:#?}", r.damaged);
    assert!(r.damaged.iter().any(|x| x.what.contains("not in the index")));

    let r = s.reindex(&|_| {}).unwrap();
    assert_eq!(r.records_ok, 12);
    assert!(r.records_damaged.is_empty());
    assert!(r.missing.is_empty());
    assert_eq!(r.indexed_after, 12);
    assert!(s.scrub(&|_| {}).unwrap().damaged.is_empty());
    let h = s.open_image("a").unwrap();
    let mut buf = vec![0u8; a.len()];
    h.read(0, &mut buf).unwrap();
    assert_eq!(buf, a);
}

#[test]
fn reindex_finds_an_intact_second_copy() {
    let (d, s, a, _b) = fixture();
    let bad = loc_of(&s, "a", 5);
    let hash = s.live_map("a").unwrap()[5].1;
    // A second copy of the block lands in another record (as after a GC swept
    // the first and the block was written again).
    drop(s);
    {
        let c = rusqlite::Connection::open(d.path().join("meta.db")).unwrap();
        c.execute("DELETE FROM blocks WHERE hash = ?1", [&hash.0[..]])
            .unwrap();
    }
    let s = Store::open(d.path(), OpenMode::ReadWrite).unwrap();
    s.create_image("copy", BS).unwrap();
    let mut h = s.open_image("copy").unwrap();
    h.write(0, &a[(5 * BS) as usize..(6 * BS) as usize]).unwrap();
    h.commit().unwrap();
    let good = s.lookup(&hash).unwrap().unwrap();
    assert_ne!(good.offset, bad.offset);
    // Now the first copy rots, and the index is rebuilt from scratch.
    flip_byte(&pack_path(d.path(), bad.pack), bad.offset + 60);
    let r = s.reindex(&|_| {}).unwrap();
    assert_eq!(r.records_damaged.len(), 1);
    assert!(r.missing.is_empty());
    assert_eq!(
        read_block(&s, "a", 5).unwrap(),
        a[(5 * BS) as usize..(6 * BS) as usize]
    );
    assert!(s.scrub(&|_| {}).unwrap().damaged.is_empty());
}

#[test]
fn torn_header_mid_pack_is_skipped_and_the_rest_recovered() {
    let (d, s, a, b) = fixture();
    let loc = loc_of(&s, "a", 2);
    flip_byte(&pack_path(d.path(), loc.pack), loc.offset + 37); // inside raw_len
    let e = read_block(&s, "a", 2).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    let r = s.reindex(&|_| {}).unwrap();
    assert_eq!(r.records_damaged.len(), 1, "{:?}", r.records_damaged);
    assert_eq!(r.records_ok, 11);
    assert_eq!(r.missing.len(), 1);
    // Every other block, before and after the torn record, is intact.
    assert_eq!(read_block(&s, "a", 7).unwrap(), a[(7 * BS) as usize..]);
    let h = s.open_image("b").unwrap();
    let mut buf = vec![0u8; b.len()];
    h.read(0, &mut buf).unwrap();
    assert_eq!(buf, b);
}

#[test]
fn truncated_pack_is_reported_not_silently_served() {
    let (d, s, a, _b) = fixture();
    let loc = loc_of(&s, "b", 3); // "b" was written last: its last block ends the pack
    drop(s);
    let path = pack_path(d.path(), loc.pack);
    // Cut inside the last record (the page padding after it is not data).
    let cut = loc.offset + 52 + loc.stored_len as u64 - 100;
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut)
        .unwrap();

    let s = Store::open(d.path(), OpenMode::ReadWrite).unwrap();
    let e = read_block(&s, "b", 3).expect_err("reading a truncated record must fail");
    assert!(e.to_string().contains("truncated"), "{e}");
    assert!(e.to_string().contains("image \"b\" block 3"), "{e}");
    // As one request: the read-ahead's span ends short of the cut record,
    // which is then read alone and reported.
    let mut buf = vec![0u8; 4 * BS as usize];
    let e = s.open_image("b").unwrap().read(0, &mut buf).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    assert!(e.to_string().contains("image \"b\" block 3"), "{e}");
    // A sector write into it: the merge reads the old record past the page
    // cache, and meets the cut the same way.
    let mut h = s.open_image("b").unwrap();
    h.write(3 * BS + 512, &[9; 512]).unwrap();
    let e = h.commit().unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    assert!(e.to_string().contains("image \"b\" block 3"), "{e}");
    drop(h);
    let r = s.scrub(&|_| {}).unwrap();
    assert_eq!(r.damaged.len(), 1);
    assert_eq!(r.damaged[0].users, vec![("b".to_string(), 3, true)]);
    assert_eq!(read_block(&s, "a", 0).unwrap(), a[..BS as usize]);
    // New writes after the damage land safely (the pack tail is not reused blindly).
    s.create_image("c", BS).unwrap();
    let mut h = s.open_image("c").unwrap();
    h.write(0, &noise(3, BS as usize)).unwrap();
    h.commit().unwrap();
    assert_eq!(read_block(&s, "c", 0).unwrap(), noise(3, BS as usize));
}

/// A sector-aligned write into a damaged block is taken (the old block is
/// not read then); merging it at commit meets the damage: the commit fails
/// with the integrity error naming image and block, and the committed
/// version is untouched.
#[test]
fn partial_write_into_a_damaged_block_fails_the_commit() {
    let (d, s, a, _) = fixture();
    let loc = loc_of(&s, "a", 3);
    flip_byte(&pack_path(d.path(), loc.pack), loc.offset + 52 + 100);
    let mut h = s.open_image("a").unwrap();
    h.write(3 * BS + 512, &[9; 512]).unwrap();
    h.write(0, &[7; 512]).unwrap();
    match h.commit() {
        Err(Error::Integrity { image, block, .. }) => {
            assert_eq!(image.as_deref(), Some("a"));
            assert_eq!(block, Some(3));
        }
        other => panic!("expected an integrity error, got {other:?}"),
    }
    drop(h);
    assert_eq!(read_block(&s, "a", 0).unwrap(), a[..BS as usize]);
    assert!(matches!(read_block(&s, "a", 3), Err(Error::Integrity { .. })));
}

/// Through the mount: a sector write into a damaged block is acknowledged;
/// the seal job that merges it meets the damage and drops the image's
/// uncommitted writes, and the next fsync fails with EIO naming image and
/// block (once) instead of calling them durable.
#[test]
fn mount_reports_a_failed_merge_at_the_next_fsync() {
    use geosync_fs::vfs::{Vfs, VfsConfig, ROOT_INO};
    let (d, s, a, _) = fixture();
    let loc = loc_of(&s, "a", 3);
    flip_byte(&pack_path(d.path(), loc.pack), loc.offset + 52 + 100);
    let v = Vfs::new(
        s,
        VfsConfig {
            seal_at: BS as usize, // the first write's block is sealed at once
            ..Default::default()
        },
    );
    let ino = v.lookup(ROOT_INO, "a").unwrap().ino;
    let fh = v.open(ino, true).unwrap();
    assert_eq!(v.write(fh, 3 * BS + 512, &[9; 512]).unwrap(), 512);
    let e = v.fsync(fh).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("integrity error") && msg.contains("block 3"),
        "{msg}"
    );
    v.fsync(fh).unwrap();
    assert_eq!(v.read(fh, 0, BS as u32).unwrap(), a[..BS as usize]);
    v.release(fh).unwrap();
}

/// A read of many blocks fetches their records together (one read of the
/// pack): a damaged record among them is still an error naming its block,
/// and its neighbours come back intact.
#[test]
fn a_damaged_record_inside_a_fetched_span_is_still_reported() {
    let (d, s, a, _b) = fixture();
    let loc = loc_of(&s, "a", 3);
    flip_byte(&pack_path(d.path(), loc.pack), loc.offset + 52 + 100);
    drop(s);
    let s = Store::open(d.path(), OpenMode::ReadWrite).unwrap(); // a cold read cache
    let h = s.open_image("a").unwrap();
    let mut buf = vec![0u8; a.len()];
    let e = h.read(0, &mut buf).unwrap_err();
    assert!(matches!(e, Error::Integrity { .. }), "{e}");
    assert!(e.to_string().contains("image \"a\" block 3"), "{e}");
    for range in [0..3u64, 4..8] {
        let mut buf = vec![0u8; ((range.end - range.start) * BS) as usize];
        h.read(range.start * BS, &mut buf).unwrap();
        assert_eq!(buf, a[(range.start * BS) as usize..(range.end * BS) as usize]);
    }
}

#[test]
fn a_truncate_that_cannot_read_the_new_last_block_changes_nothing() {
    // Cutting an image mid-block keeps that block's head: if the block
    // cannot be read (damaged), the truncate fails with EIO and the image
    // stays as it was, through the next commit too.
    let (d, s, a, _b) = fixture();
    let loc = loc_of(&s, "a", 3);
    flip_byte(&pack_path(d.path(), loc.pack), loc.offset + 52 + 100);
    let mut h = s.open_image("a").unwrap();
    let e = h.set_size(3 * BS + 100).unwrap_err();
    assert!(matches!(e, Error::Integrity { .. }), "{e}");
    assert_eq!(e.errno(), libc::EIO);
    assert_eq!(h.size(), 8 * BS);
    h.commit().unwrap();
    drop(h);
    assert_eq!(s.open_image("a").unwrap().size(), 8 * BS);
    for blk in [0, 1, 2, 4, 5, 6, 7] {
        assert_eq!(
            read_block(&s, "a", blk).unwrap(),
            a[(blk * BS) as usize..((blk + 1) * BS) as usize],
            "block {blk}"
        );
    }
}

#[test]
fn once_a_block_was_read_whole_damage_fails_only_the_reads_of_its_damaged_piece() {
    // A raw block read whole leaves its piece proof: small reads of it then
    // read and verify only the 4 KiB pieces they need. Damage to one piece
    // is an integrity error for reads that include it, whatever was read
    // before; reads of its other pieces return their proven bytes.
    const BIG: u64 = 16 * 1024;
    let (d, s) = geosync_suite::kit::disk_store(BIG as u32);
    let a = noise(3, 4 * BIG as usize);
    s.create_image("a", a.len() as u64).unwrap();
    let mut h = s.open_image("a").unwrap();
    h.write(0, &a).unwrap();
    h.commit().unwrap();
    s.set_read_cache(0); // every read goes to the pack
    let piece = |h: &geosync_fs::ImageHandle, at: u64, len: usize| {
        let mut buf = vec![0u8; len];
        h.read(at, &mut buf).map(|_| buf)
    };
    // Read whole once (its first piece asked for): the proof is kept.
    assert_eq!(piece(&h, BIG, 4096).unwrap(), a[BIG as usize..][..4096]);
    // (Another block read between: the damage is not served from a cache.)
    assert_eq!(piece(&h, 3 * BIG, 4096).unwrap(), a[3 * BIG as usize..][..4096]);
    let loc = loc_of(&s, "a", 1);
    flip_byte(&pack_path(d.path(), loc.pack), loc.offset + 52 + 2 * 4096 + 10);
    for round in 0..2 {
        let e = piece(&h, BIG + 2 * 4096 + 7, 100).unwrap_err();
        assert!(matches!(e, Error::Integrity { .. }), "round {round}: {e}");
        assert!(e.to_string().contains("image \"a\" block 1"), "{e}");
        assert_eq!(e.errno(), libc::EIO);
        for (at, len) in [(BIG + 4096, 4096), (BIG + 3 * 4096 + 5, 4091), (BIG + 100, 3000)] {
            assert_eq!(
                piece(&h, at, len).unwrap(),
                a[at as usize..][..len],
                "round {round}: {len} bytes at {at}"
            );
        }
        // A read spanning the damaged piece fails.
        assert!(piece(&h, BIG + 4096, 2 * 4096).is_err());
        assert!(piece(&h, BIG, BIG as usize).is_err());
    }
    // Not read whole before the damage: reading any of it fails.
    let loc = loc_of(&s, "a", 2);
    flip_byte(&pack_path(d.path(), loc.pack), loc.offset + 52 + 10);
    assert!(piece(&h, 2 * BIG + 3 * 4096, 4096).is_err());
    assert_eq!(s.scrub(&|_| {}).unwrap().damaged.len(), 2);
}
