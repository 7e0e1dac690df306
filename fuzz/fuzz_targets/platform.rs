//! Platform strings (`os/arch[/variant]`, aliases): parsing never panics,
//! and a parsed platform prints back to a string that parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tripod::platform::Platform;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = text.parse::<Platform>() {
        let again: Platform = p.to_string().parse().expect("a canonical platform parses");
        assert_eq!(p, again);
        let _ = p.label_value();
    }
});
