//! The path canonicaliser: whatever it accepts is canonical (upper-case
//! escapes of reserved or non-ASCII bytes only, no `;`, `#`, dot segments
//! or `//`), and canonical stays canonical.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::error::GatewayError;

/// The one call to adapt when the canonicaliser's signature changes.
fn canonical(path: &str) -> Result<String, GatewayError> {
    portcullis::guard::canonical_path(path, false)
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
        assert!(
            x < 0x80 && x != b';' && x != b'#',
            "{path:?} -> {c:?}: raw {x:#x}"
        );
        if x == b'%' {
            let hex = |j: usize| {
                b.get(j)
                    .copied()
                    .filter(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h))
            };
            let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2)) else {
                panic!("{path:?} -> {c:?}: % not followed by two upper-case hex digits");
            };
            let d =
                u8::from_str_radix(std::str::from_utf8(&[h, l]).unwrap_or("00"), 16).unwrap_or(0);
            assert!(
                !(d.is_ascii_alphanumeric() || b"-._~/\\".contains(&d)),
                "{path:?} -> {c:?}: an escape of {d:#x} left in"
            );
        }
    }
    match canonical(&c) {
        Ok(again) => assert_eq!(again, c, "{path:?}: not idempotent"),
        Err(e) => panic!("{path:?} -> {c:?}: the canonical form is refused: {e}"),
    }
});
