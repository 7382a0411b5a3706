//! Arbitrary text as a configuration file: parsing and validation return
//! a config or an error that names the file, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsrelay_core::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(text, "fuzz.toml", std::path::PathBuf::from("/nonexistent")) {
        assert!(e.to_string().contains("fuzz.toml"), "{e}");
    }
});
