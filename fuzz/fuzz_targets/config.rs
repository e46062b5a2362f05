//! The config loader: any text gives a config or `file: key: what is wrong` lines, never a
//! panic, and no line echoes a secret's value.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match cx_proxy::Config::from_toml(text, "f.toml", None) {
        Ok(loaded) => {
            // What `check` prints reads back.
            let _ = loaded.config.render();
        }
        Err(e) => {
            for p in &e.problems {
                assert!(p.starts_with("f.toml"), "{p}");
            }
        }
    }
});
