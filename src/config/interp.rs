//! `${VAR}` interpolation: replaced from the environment inside TOML string
//! values only (comments and keys are left alone), before parsing. Values
//! are escaped for the string they land in, and carry no newline, so line
//! numbers in later error messages stay true.

/// A `${VAR}` that could not be resolved, at a byte offset of the source.
#[derive(Debug, PartialEq, Eq)]
pub struct Unresolved {
    /// Byte offset of the `$`.
    pub offset: usize,
    /// What is wrong.
    pub message: String,
}

/// Where a substitution sits in the source and in the result, so that an
/// error found in the result can be reported where the user wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Substitution {
    /// Byte range of `${NAME}` in the source.
    pub source: (usize, usize),
    /// Byte range of the value in the result.
    pub result: (usize, usize),
}

/// Maps a byte offset in the interpolated text back to the source text: an
/// offset inside a substituted value maps to its `${`.
pub fn source_offset(subs: &[Substitution], offset: usize) -> usize {
    let mut delta: isize = 0;
    for s in subs {
        if offset < s.result.0 {
            break;
        }
        if offset < s.result.1 {
            return s.source.0;
        }
        delta = (s.source.1 as isize) - (s.result.1 as isize);
    }
    (offset as isize + delta).max(0) as usize
}

/// Replaces every `${NAME}` inside string values using `lookup`.
pub fn interpolate(
    src: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<Unresolved>> {
    interpolate_mapped(src, lookup).map(|(s, _)| s)
}

/// [`interpolate`], also returning where each substitution went.
pub fn interpolate_mapped(
    src: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(String, Vec<Substitution>), Vec<Unresolved>> {
    let mut subs = Vec::new();
    #[derive(PartialEq, Clone, Copy)]
    enum St {
        Code,
        Comment,
        Basic,
        Literal,
        MultiBasic,
        MultiLiteral,
    }
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut errs = Vec::new();
    let mut st = St::Code;
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        let c = b[i];
        match st {
            St::Code => {
                if c == b'#' {
                    st = St::Comment;
                } else if b[i..].starts_with(b"\"\"\"") {
                    st = St::MultiBasic;
                    i += 3;
                    continue;
                } else if b[i..].starts_with(b"'''") {
                    st = St::MultiLiteral;
                    i += 3;
                    continue;
                } else if c == b'"' {
                    st = St::Basic;
                } else if c == b'\'' {
                    st = St::Literal;
                }
            }
            St::Comment if c == b'\n' => {
                st = St::Code;
            }
            St::Basic | St::MultiBasic if c == b'\\' => {
                i += 2;
                continue;
            }
            St::Basic if c == b'"' || c == b'\n' => st = St::Code,
            St::Literal if c == b'\'' || c == b'\n' => st = St::Code,
            St::MultiBasic if b[i..].starts_with(b"\"\"\"") => {
                st = St::Code;
                i += 3;
                continue;
            }
            St::MultiLiteral if b[i..].starts_with(b"'''") => {
                st = St::Code;
                i += 3;
                continue;
            }
            St::Basic | St::Literal | St::MultiBasic | St::MultiLiteral
                if c == b'$' && b.get(i + 1) == Some(&b'{') =>
            {
                let Some(close) = src[i + 2..].find('}') else {
                    errs.push(Unresolved {
                        offset: i,
                        message: "unterminated ${…}".into(),
                    });
                    i += 2;
                    continue;
                };
                let name = &src[i + 2..i + 2 + close];
                let valid = !name.is_empty()
                    && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
                if !valid {
                    errs.push(Unresolved {
                        offset: i,
                        message: format!("invalid variable name {name:?} in ${{…}}"),
                    });
                } else {
                    match lookup(name) {
                        Some(v) if v.contains('\n') => errs.push(Unresolved {
                            offset: i,
                            message: format!("environment variable {name} contains a newline"),
                        }),
                        Some(v) => {
                            out.push_str(&src[copied..i]);
                            let start = out.len();
                            let literal = matches!(st, St::Literal | St::MultiLiteral);
                            if literal && v.contains('\'') {
                                errs.push(Unresolved {
                                    offset: i,
                                    message: format!("environment variable {name} contains ' inside a literal string"),
                                });
                            } else if literal {
                                out.push_str(&v);
                            } else {
                                out.push_str(&v.replace('\\', "\\\\").replace('"', "\\\""));
                            }
                            subs.push(Substitution {
                                source: (i, i + 3 + close),
                                result: (start, out.len()),
                            });
                            copied = i + 3 + close;
                        }
                        None => errs.push(Unresolved {
                            offset: i,
                            message: format!("environment variable {name} is not set"),
                        }),
                    }
                }
                i += 3 + close;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out.push_str(&src[copied..]);
    if errs.is_empty() {
        Ok((out, subs))
    } else {
        Err(errs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cr\"et".into()),
            "HOST" => Some("10.0.0.1".into()),
            _ => None,
        }
    }

    #[test]
    fn replaces_inside_strings_and_escapes() {
        let out = interpolate("a = \"${HOST}:1\"\nb = \"${TOKEN}\"\n", env).unwrap();
        assert_eq!(out, "a = \"10.0.0.1:1\"\nb = \"s3cr\\\"et\"\n");
        let v: toml::Table = toml::from_str(&out).unwrap();
        assert_eq!(v["b"].as_str(), Some("s3cr\"et"));
    }

    #[test]
    fn offsets_map_back_to_the_source() {
        let src = "a = \"${HOST}\"  x\n";
        let (out, subs) = interpolate_mapped(src, env).unwrap();
        assert_eq!(out, "a = \"10.0.0.1\"  x\n");
        let x_out = out.find('x').unwrap();
        assert_eq!(source_offset(&subs, x_out), src.find('x').unwrap());
        assert_eq!(source_offset(&subs, 6), 5, "inside the value: the ${{");
        assert_eq!(source_offset(&subs, 1), 1, "before any substitution");
    }

    #[test]
    fn leaves_comments_alone_and_reports_missing_with_offset() {
        assert_eq!(
            interpolate("# ${NOPE}\na = 1\n", env).unwrap(),
            "# ${NOPE}\na = 1\n"
        );
        let e = interpolate("a = \"x\"\nb = \"${NOPE}\"\n", env).unwrap_err();
        assert_eq!(e[0].offset, 13);
        assert!(e[0].message.contains("NOPE is not set"));
    }
}
