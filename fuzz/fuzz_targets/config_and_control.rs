//! The daemon's text inputs: `syncd.toml` and control socket requests.
//! Parsing never panics; a config that loads has valid peers.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = geosync_syncd::config::Config::parse(text, "fuzz") {
        assert!(cfg.peer_list().is_ok());
    }
    let _ = serde_json::from_str::<geosync_syncd::control::Request>(text);
});
