//! Image references (`spec.output.image`): parsing never panics, and a
//! parsed reference prints back to one that parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tripod::reference::ImageRef;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = ImageRef::parse(text) {
        let again = ImageRef::parse(&r.to_string()).expect("a printed reference parses");
        assert_eq!(r.to_string(), again.to_string());
        let _ = r.with_tag("1.0");
    }
});
