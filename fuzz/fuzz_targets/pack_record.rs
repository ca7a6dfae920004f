//! Pack record headers and payloads from disk: decoding and opening never
//! panic, and a payload that opens hashes to the name it was opened for.
#![no_main]
use geosync_fs::pack::{self, RecordHeader, RECORD_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < RECORD_HEADER_LEN {
        return;
    }
    let (h, payload) = data.split_at(RECORD_HEADER_LEN);
    if let Ok(hdr) = RecordHeader::decode(h.try_into().unwrap()) {
        if hdr.raw_len <= pack::MAX_BLOCK {
            if let Ok(raw) = pack::open(payload, hdr.codec, hdr.raw_len, &hdr.hash) {
                assert_eq!(pack::hash_block(&raw), hdr.hash);
            }
        }
    }
});
