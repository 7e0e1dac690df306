//! `.dockerconfigjson` documents: looking up a registry's credentials never
//! panics, whatever the document (the first line is the registry).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let registry = String::from_utf8_lossy(&data[..split]);
    let json = data.get(split + 1..).unwrap_or_default();
    let _ = tripod::registry::credentials_for(json, &registry);
});
