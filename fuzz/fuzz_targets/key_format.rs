//! The key parser: a presented credential is accepted only when it has a
//! configured prefix, that prefix's length, a base62 body and a matching
//! checksum; generated keys parse back; one changed character is refused.
//!
//! Input, by its first byte:
//! - `0x00 k p c rest`: generate a key of rule `k`, check it parses, then set
//!   its character `p` to `c` (and append `rest`): it must be refused.
//! - `0x01 hi lo prefix \n key`: a `[key_kinds]` entry with that prefix
//!   and length (`hi lo`, big-endian), through the config validator; when
//!   valid, its keys round-trip and `key` is checked against it.
//! - anything else: the whole input is a presented key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::keys::format::{KeyFormat, MAX_KEY_LEN};
use portcullis::keys::{Environment, digest_of};
use std::path::Path;
use std::sync::LazyLock;

/// The shipped config plus kinds with other prefix shapes and lengths.
const BASE: &str = include_str!("../../config/portcullis.toml");
const EXTRA_KINDS: &str = r#"
[key_kinds.internal]
prefixes = { live = "ik-live-", test = "ik-test-" }
length = 64
[key_kinds.short]
prefixes = { live = "v", test = "w" }
length = 29
"#;

fn format_of(text: &str) -> Option<KeyFormat> {
    portcullis::config::parse(Path::new("fuzz.toml"), text, |_| Some("x".into()))
        .ok()
        .map(|c| c.key_format)
}

static FORMAT: LazyLock<KeyFormat> =
    LazyLock::new(|| format_of(&format!("{BASE}{EXTRA_KINDS}")).expect("the fuzz config is valid"));

/// Checks one presented credential against the format.
fn check(f: &KeyFormat, key: &str) {
    let Some(p) = f.parse(key) else {
        return;
    };
    assert!(key.len() <= MAX_KEY_LEN, "{key:?}: longer than any key");
    assert!(key.starts_with(&p.rule.prefix), "{key:?}: wrong rule");
    assert_eq!(key.len(), p.rule.length, "{key:?}: wrong length");
    assert!(
        key[p.rule.prefix.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric()),
        "{key:?}: not base62"
    );
    assert_eq!(p.digest, digest_of(key), "{key:?}: digest");
    // No longer prefix may match: the rule is the longest matching one.
    assert!(
        f.rules()
            .iter()
            .all(|r| !key.starts_with(&r.prefix) || r.prefix.len() <= p.rule.prefix.len()),
        "{key:?}: a longer prefix matches"
    );
}

/// Generates a key of each environment of `kind`: it parses back to its rule.
fn round_trip(f: &KeyFormat, kind: &str, env: Environment) -> Option<String> {
    let (secret, digest) = f.generate(kind, env)?;
    let p = f
        .parse(&secret)
        .unwrap_or_else(|| panic!("{secret:?}: a generated key is refused"));
    assert_eq!(&*p.rule.kind, kind);
    assert_eq!(p.rule.environment, env);
    assert_eq!(p.digest, digest);
    Some(secret)
}

fuzz_target!(|data: &[u8]| {
    match data {
        [0, k, pos, c, rest @ ..] => {
            let f = &*FORMAT;
            let rule = &f.rules()[usize::from(*k) % f.rules().len()];
            let (kind, env) = (rule.kind.clone(), rule.environment);
            let secret = round_trip(f, &kind, env).expect("every rule generates");
            let mut b = secret.clone().into_bytes();
            let i = usize::from(*pos) % b.len();
            b[i] = *c & 0x7f;
            b.extend_from_slice(rest);
            let Ok(changed) = std::str::from_utf8(&b) else {
                return;
            };
            check(f, changed);
            if changed != secret {
                // A forged checksum matches one time in 62^6: this would
                // take the fuzzer about 2^35 tries.
                assert!(
                    f.parse(changed).is_none(),
                    "{secret:?} changed to {changed:?} is accepted"
                );
            }
        }
        [1, hi, lo, rest @ ..] => {
            let len = u16::from_be_bytes([*hi, *lo]);
            let Ok(rest) = std::str::from_utf8(rest) else {
                return;
            };
            let (prefix, key) = rest.split_once('\n').unwrap_or((rest, ""));
            // A test prefix the live one neither starts nor is started by
            // (overlapping prefixes are refused).
            let text = format!(
                "{BASE}\n[key_kinds.fuzzed]\nprefixes = {{ live = {prefix:?}, test = \"t{prefix}\" }}\nlength = {len}\n"
            );
            let Some(f) = format_of(&text) else {
                return;
            };
            for env in [Environment::Live, Environment::Test] {
                round_trip(&f, "fuzzed", env).expect("a configured kind generates");
            }
            check(&f, key);
        }
        _ => {
            if let Ok(key) = std::str::from_utf8(data) {
                check(&FORMAT, key);
            }
        }
    }
});
