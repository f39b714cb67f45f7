//! The path canonicaliser: whatever it accepts is canonical, and canonical
//! stays canonical.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::error::GatewayError;

/// The one call to adapt when the canonicaliser's signature changes.
fn canonical(path: &str) -> Result<String, GatewayError> {
    portcullis::guard::canonical_path(path)
}

fuzz_target!(|data: &[u8]| {
    // The request target reaches the guard as a `&str`.
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = canonical(path) else {
        return;
    };
    assert!(c.starts_with('/'), "{path:?} -> {c:?}: not absolute");
    assert!(!c.contains("//"), "{path:?} -> {c:?}: empty segment");
    // Every segment but a trailing empty one is neither empty nor a dot segment.
    let segs: Vec<&str> = c[1..].split('/').collect();
    for (i, s) in segs.iter().enumerate() {
        assert!(!matches!(*s, "." | ".."), "{path:?} -> {c:?}: dot segment");
        assert!(
            !s.is_empty() || i + 1 == segs.len(),
            "{path:?} -> {c:?}: empty segment"
        );
    }
    let b = c.as_bytes();
    for (i, &x) in b.iter().enumerate() {
        assert!(x > 0x20 && x != 0x7f, "{path:?} -> {c:?}: control byte");
        if x == b'%' {
            assert!(
                b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit),
                "{path:?} -> {c:?}: % not followed by two hex digits"
            );
        }
    }
    match canonical(&c) {
        Ok(again) => assert_eq!(again, c, "{path:?}: not idempotent"),
        Err(e) => panic!("{path:?} -> {c:?}: the canonical form is refused: {e}"),
    }
});
