//! The config loader: any text either compiles into a config or gives
//! diagnostics that point into the text; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    // Config files are read as UTF-8 text.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // `${VAR}`: some names are set (to a value with TOML-significant
    // characters), the others are unset, which is an error to report.
    let env = |name: &str| match name.len() % 3 {
        0 => None,
        1 => Some("x".to_string()),
        _ => Some("\"]\n[x".to_string()),
    };
    match portcullis::config::parse(Path::new("fuzz.toml"), text, env) {
        Ok(c) => {
            assert_eq!(
                c.source_hash,
                portcullis::config::content_hash(text.as_bytes())
            );
        }
        Err(e) => {
            assert!(!e.diagnostics.is_empty(), "an error without a diagnostic");
            let lines = text.split('\n').count();
            for d in &e.diagnostics {
                assert!(d.line >= 1 && d.col >= 1, "{d:?}: positions are 1-based");
                assert!(d.line <= lines, "{d:?}: past the last line ({lines})");
                assert!(!d.message.is_empty(), "{d:?}: no message");
            }
            let _ = e.to_string();
        }
    }
});
