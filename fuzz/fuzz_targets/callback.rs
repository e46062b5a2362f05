//! A callback body and its query: the members read from the raw JSON, the baseString built
//! from them, the signature checked. Never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

use cx_proxy::relay::verify::{base_string, members, sign, Signed};

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (query, body) = data.split_at(split);
    let query = std::str::from_utf8(query).ok();
    if let Ok(signed) = Signed::from_query(query) {
        if let Ok(m) = members(body) {
            let base = base_string(&m, &signed);
            let _ = sign(b"key", &base);
        }
    }
    let _ = members(body);
});
