//! Any bytes: decoding never panics, never over-allocates, and whatever
//! decodes re-encodes to the same frame.
#![no_main]
use geosync_proto::wire::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((m, used))) = Message::decode(rest) {
        let mut again = Vec::new();
        m.encode(&mut again);
        assert_eq!(&again[..], &rest[..used], "re-encoding differs");
        rest = &rest[used..];
    }
});
