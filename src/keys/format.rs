//! The secret key format: `<prefix><random base62><checksum>`.
//!
//! The prefix names the kind and environment (`sk_live_`, `pk_test_`, …).
//! The random part carries at least 128 bits; the last [`CHECKSUM_LEN`]
//! characters are a checksum over prefix and random part, so a mistyped or
//! forged key is refused without a store lookup.

use super::{Digest, Environment};
use sha2::{Digest as _, Sha256};
use std::sync::Arc;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Characters of checksum at the end of every key.
pub const CHECKSUM_LEN: usize = 6;
/// Fewest random characters: 22 base62 characters carry 130 bits.
pub const MIN_RANDOM_LEN: usize = 22;
/// Default random characters when a kind sets no `length`.
pub const DEFAULT_RANDOM_LEN: usize = 32;
/// Longest credential the gateway will even look at (caps work on junk).
pub const MAX_KEY_LEN: usize = 256;

/// One prefix: which kind and environment it stands for, and the key length.
#[derive(Clone, Debug)]
pub struct PrefixRule {
    /// Kind name (`secret`, `public`, …).
    pub kind: Arc<str>,
    /// Environment of keys with this prefix.
    pub environment: Environment,
    /// The prefix, e.g. `sk_live_`.
    pub prefix: String,
    /// Total key length, prefix included.
    pub length: usize,
}

/// All configured prefixes, longest first so that no prefix shadows a longer one.
#[derive(Clone, Debug, Default)]
pub struct KeyFormat {
    rules: Vec<PrefixRule>,
    /// One finder per distinct prefix, built once per config: spotting a
    /// key in a header value is then a few SIMD substring scans.
    finders: Vec<memchr::memmem::Finder<'static>>,
    /// The distinct last bytes of the prefixes, when there are at most
    /// three (`_` for the usual `sk_live_`-style ones): a value holding none
    /// of them holds no key, and most header values hold none.
    ends: Vec<u8>,
}

/// A key that passed the format and checksum checks.
#[derive(Clone, Debug)]
pub struct ParsedKey<'a> {
    /// The rule its prefix matched.
    pub rule: &'a PrefixRule,
    /// SHA-256 of the whole secret, the store's lookup key.
    pub digest: Digest,
}

impl KeyFormat {
    /// Builds the format from prefix rules (validated by `config`).
    pub fn new(mut rules: Vec<PrefixRule>) -> Self {
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let mut prefixes: Vec<&str> = rules.iter().map(|r| r.prefix.as_str()).collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        let mut ends: Vec<u8> = prefixes.iter().filter_map(|p| p.bytes().last()).collect();
        ends.sort_unstable();
        ends.dedup();
        if ends.len() > 3 {
            ends.clear();
        }
        let finders = prefixes
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(|p| memchr::memmem::Finder::new(p).into_owned())
            .collect();
        KeyFormat {
            rules,
            finders,
            ends,
        }
    }

    /// All rules.
    pub fn rules(&self) -> &[PrefixRule] {
        &self.rules
    }

    /// The rule for a kind and environment.
    pub fn rule(&self, kind: &str, env: Environment) -> Option<&PrefixRule> {
        self.rules
            .iter()
            .find(|r| &*r.kind == kind && r.environment == env)
    }

    /// Whether `s` starts with any configured prefix (used to spot keys in query strings).
    pub fn has_known_prefix(&self, s: &str) -> bool {
        self.rules.iter().any(|r| s.starts_with(&r.prefix))
    }

    /// Whether `value` carries a token in a configured key format: a
    /// configured prefix at a token boundary (the start of the value, or
    /// after a byte that is not an ASCII letter or digit) followed by a
    /// letter or digit, anywhere in the value. Neither length nor checksum
    /// is checked: a mistyped or truncated key is still a secret, and a
    /// false positive only costs the header it was found in. Linear in the
    /// value's length per prefix; allocates nothing.
    pub fn carries_key(&self, value: &[u8]) -> bool {
        let maybe = match self.ends[..] {
            [a] => memchr::memchr(a, value).is_some(),
            [a, b] => memchr::memchr2(a, b, value).is_some(),
            [a, b, c] => memchr::memchr3(a, b, c, value).is_some(),
            _ => true,
        };
        maybe
            && self.finders.iter().any(|f| {
                let n = f.needle().len();
                let mut from = 0;
                while let Some(at) = value.get(from..).and_then(|rest| f.find(rest)) {
                    let start = from + at;
                    let boundary = start == 0 || !value[start - 1].is_ascii_alphanumeric();
                    if boundary && value.get(start + n).is_some_and(u8::is_ascii_alphanumeric) {
                        return true;
                    }
                    // One byte on, not past the match: a prefix may overlap itself.
                    from = start + 1;
                }
                false
            })
    }

    /// Makes a new secret for a kind and environment; returns the secret and its digest.
    pub fn generate(&self, kind: &str, env: Environment) -> Option<(String, Digest)> {
        let rule = self.rule(kind, env)?;
        let random_len = rule.length - rule.prefix.len() - CHECKSUM_LEN;
        let mut s = String::with_capacity(rule.length);
        s.push_str(&rule.prefix);
        push_random_base62(&mut s, random_len);
        let sum = checksum(s.as_bytes());
        s.push_str(std::str::from_utf8(&sum).unwrap_or("000000"));
        let d = digest_of(&s);
        Some((s, d))
    }

    /// Checks a presented credential: known prefix, length, alphabet and
    /// checksum. `None` means INVALID_API_KEY without a store lookup.
    pub fn parse<'a>(&'a self, key: &str) -> Option<ParsedKey<'a>> {
        if key.len() > MAX_KEY_LEN {
            return None;
        }
        let rule = self.rules.iter().find(|r| key.starts_with(&r.prefix))?;
        if key.len() != rule.length {
            return None;
        }
        let body = &key.as_bytes()[rule.prefix.len()..];
        if !body.iter().all(u8::is_ascii_alphanumeric) {
            return None;
        }
        let (head, sum) = key.as_bytes().split_at(key.len() - CHECKSUM_LEN);
        let want = checksum(head);
        // Not secret-dependent in a useful way (the checksum is public
        // arithmetic), but compare in constant time anyway.
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&want[..], sum)) {
            return None;
        }
        Some(ParsedKey {
            rule,
            digest: digest_of(key),
        })
    }
}

/// SHA-256 of a secret.
pub fn digest_of(secret: &str) -> Digest {
    Sha256::digest(secret.as_bytes()).into()
}

/// Six base62 characters from the SHA-256 of the key's head.
fn checksum(head: &[u8]) -> [u8; CHECKSUM_LEN] {
    let h = Sha256::digest(head);
    let mut n = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
    let mut out = [0u8; CHECKSUM_LEN];
    for c in out.iter_mut().rev() {
        *c = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Appends `n` random base62 characters (rejection sampling: no bias).
pub fn push_random_base62(s: &mut String, n: usize) {
    let mut pushed = 0;
    let mut buf = [0u8; 64];
    while pushed < n {
        rand::fill(&mut buf[..]);
        for b in buf {
            // 248 = 4 * 62: values at or above it would bias the alphabet.
            if b < 248 && pushed < n {
                s.push(BASE62[(b % 62) as usize] as char);
                pushed += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt() -> KeyFormat {
        KeyFormat::new(vec![
            PrefixRule {
                kind: "secret".into(),
                environment: Environment::Live,
                prefix: "sk_live_".into(),
                length: 8 + 32 + 6,
            },
            PrefixRule {
                kind: "secret".into(),
                environment: Environment::Test,
                prefix: "sk_test_".into(),
                length: 46,
            },
            PrefixRule {
                kind: "vl".into(),
                environment: Environment::Live,
                prefix: "vlk_".into(),
                length: 52,
            },
        ])
    }

    #[test]
    fn generated_keys_parse_back_to_their_rule() {
        let f = fmt();
        let (s, d) = f.generate("secret", Environment::Test).unwrap();
        assert!(s.starts_with("sk_test_"));
        assert_eq!(s.len(), 46);
        let p = f.parse(&s).unwrap();
        assert_eq!(p.digest, d);
        assert_eq!(p.rule.environment, Environment::Test);
        let (s, _) = f.generate("vl", Environment::Live).unwrap();
        assert_eq!(s.len(), 52);
        assert!(f.parse(&s).is_some());
    }

    #[test]
    fn a_mistyped_key_fails_the_checksum() {
        let f = fmt();
        let (s, _) = f.generate("secret", Environment::Live).unwrap();
        let mut b = s.clone().into_bytes();
        b[12] = if b[12] == b'a' { b'b' } else { b'a' };
        assert!(f.parse(std::str::from_utf8(&b).unwrap()).is_none());
        assert!(f.parse(&s[..s.len() - 1]).is_none(), "wrong length");
        assert!(
            f.parse(&format!("xx_live_{}", &s[8..])).is_none(),
            "unknown prefix"
        );
        assert!(f.parse(&"a".repeat(10_000)).is_none(), "oversized");
    }

    #[test]
    fn a_key_is_spotted_anywhere_in_a_header_value() {
        let f = fmt();
        let (k, _) = f.generate("secret", Environment::Live).unwrap();
        for v in [
            k.clone(),
            format!("Bearer {k}"),
            format!("bearer  {k}"),
            format!("Bearer\t{k}"),
            format!("Token {k}"),
            format!("session=abc; api_key={k}; theme=dark"),
            format!("{k},{k}"),
            format!("\"{k}\""),
            format!("x_{k}"),
            "sk_live_short".into(),
            "sk_test_not-a-real-key".into(),
            "vlk_1".into(),
            "xsk_live_sk_live_1".into(),
        ] {
            assert!(f.carries_key(v.as_bytes()), "{v:?}");
        }
    }

    #[test]
    fn other_values_are_left_alone() {
        let f = fmt();
        for v in [
            "",
            "Basic dXNlcjpwYXNz",
            "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x",
            "mask_live_abc",
            "sk_live_",
            "sk_live_-abc",
            "sk_live",
            "SK_LIVE_abc",
            "text/html, application/json",
            "risk_test_1",
        ] {
            assert!(!f.carries_key(v.as_bytes()), "{v:?}");
        }
        assert!(!KeyFormat::default().carries_key(b"sk_live_abc"));
    }

    #[test]
    fn prefixes_ending_in_many_bytes_are_all_found() {
        let rule = |prefix: &str| PrefixRule {
            kind: prefix.into(),
            environment: Environment::Live,
            prefix: prefix.into(),
            length: 40,
        };
        // Up to three last bytes are looked for first; past that, every value is searched.
        for prefixes in [&["tok", "sk_"][..], &["tok", "sk_", "a-", "q."]] {
            let f = KeyFormat::new(prefixes.iter().map(|p| rule(p)).collect());
            for p in prefixes {
                assert!(f.carries_key(format!("Bearer {p}1").as_bytes()), "{p}");
            }
            assert!(!f.carries_key(b"Bearer xyz"));
        }
    }

    #[test]
    fn random_part_has_at_least_128_bits() {
        assert!((MIN_RANDOM_LEN as f64) * 62f64.log2() >= 128.0);
    }
}
