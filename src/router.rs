//! Stage three: method + canonical path → route. Built once per config with
//! `matchit` (static beats `{param}` beats `/*tail`), never rebuilt per
//! request. Runs after the guard, so it only ever sees a canonical path.

use crate::config::Route;
use crate::error::GatewayError;
use http::{HeaderValue, Method};
use std::sync::Arc;

/// The compiled route table.
#[derive(Clone, Debug, Default)]
pub struct Router {
    /// Exact and `{param}` patterns.
    paths: matchit::Router<usize>,
    /// `/*tail` patterns, tried when `paths` has nothing for the request:
    /// matchit will not mix a catch-all with a parameter at one level.
    tails: matchit::Router<usize>,
    entries: Vec<PathEntry>,
}

#[derive(Clone, Debug)]
struct PathEntry {
    by_method: Vec<(Method, Arc<Route>)>,
    any: Option<Arc<Route>>,
    allow: HeaderValue,
}

/// Checks a route path pattern as written in the config: `/exact`,
/// `{param}` for one whole segment, `/*tail` as the last segment.
pub fn check_pattern(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with /"));
    }
    let segs: Vec<&str> = path[1..].split('/').collect();
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        if seg.is_empty() && !last {
            return Err(format!("path {path:?} has an empty segment (//)"));
        }
        if let Some(name) = seg.strip_prefix('*') {
            if !last {
                return Err(format!("path {path:?}: a /*tail must be the last segment"));
            }
            check_name(path, name)?;
        } else if let Some(inner) = seg.strip_prefix('{') {
            let Some(name) = inner.strip_suffix('}') else {
                return Err(format!(
                    "path {path:?}: a {{param}} must be a whole segment"
                ));
            };
            check_name(path, name)?;
        } else if !seg
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~'))
        {
            // Only unreserved characters: requests are matched in their
            // canonical form, where any other character may stand escaped,
            // and an upstream decodes both spellings alike.
            return Err(format!(
                "path {path:?}: segment {seg:?} may hold only letters, digits, -, ., _ and ~"
            ));
        } else if *seg == "." || *seg == ".." {
            return Err(format!("path {path:?} must not contain . or .. segments"));
        }
    }
    Ok(())
}

fn check_name(path: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || !name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
        return Err(format!(
            "path {path:?}: parameter name {name:?} must be letters, digits or _"
        ));
    }
    Ok(())
}

/// Our pattern syntax to matchit's: `/*tail` becomes `/{*tail}`.
fn to_matchit(path: &str) -> String {
    match path.rfind("/*") {
        Some(i) => format!("{}/{{{}}}", &path[..i], &path[i + 1..]),
        None => path.to_string(),
    }
}

impl Router {
    /// Compiles the routes. On failure: the index of the offending route and why.
    pub fn build(routes: &[Arc<Route>]) -> Result<Router, (usize, String)> {
        let mut r = Router::default();
        let mut by_pattern: std::collections::HashMap<String, usize> =
            std::collections::HashMap::new();
        for (idx, route) in routes.iter().enumerate() {
            let pattern = to_matchit(&route.path);
            let table = if pattern.contains("{*") {
                &mut r.tails
            } else {
                &mut r.paths
            };
            let entry = match by_pattern.get(&pattern).copied() {
                // The same pattern text again: add methods to its entry.
                Some(id) => id,
                None => {
                    let id = r.entries.len();
                    table.insert(pattern.clone(), id).map_err(|e| {
                        (
                            idx,
                            format!(
                                "route {}: path {:?} conflicts with another route: {e}",
                                route.name, route.path
                            ),
                        )
                    })?;
                    by_pattern.insert(pattern, id);
                    r.entries.push(PathEntry {
                        by_method: Vec::new(),
                        any: None,
                        allow: HeaderValue::from_static(""),
                    });
                    id
                }
            };
            let e = &mut r.entries[entry];
            match &route.methods {
                None => {
                    if e.any.is_some() || !e.by_method.is_empty() {
                        return Err((
                            idx,
                            format!(
                                "route {}: another route already serves {:?} for any method",
                                route.name, route.path
                            ),
                        ));
                    }
                    e.any = Some(route.clone());
                }
                Some(ms) => {
                    for m in ms {
                        if e.any.is_some() || e.by_method.iter().any(|(x, _)| x == m) {
                            return Err((
                                idx,
                                format!(
                                    "route {}: another route already serves {m} {}",
                                    route.name, route.path
                                ),
                            ));
                        }
                        e.by_method.push((m.clone(), route.clone()));
                    }
                }
            }
        }
        for e in &mut r.entries {
            let allow = if e.any.is_some() {
                "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS".to_string()
            } else {
                e.by_method
                    .iter()
                    .map(|(m, _)| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            e.allow = HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static(""));
        }
        Ok(r)
    }

    /// The route for a method and canonical path: 404 when no path matches,
    /// 405 (with `Allow`) when the path matches but the method does not.
    pub fn at(&self, method: &Method, path: &str) -> Result<&Arc<Route>, GatewayError> {
        let main = self.paths.at(path).ok().map(|m| &self.entries[*m.value]);
        if let Some(r) = main.and_then(|e| e.route(method)) {
            return Ok(r);
        }
        let tail = self.tails.at(path).ok().map(|m| &self.entries[*m.value]);
        if let Some(r) = tail.and_then(|e| e.route(method)) {
            return Ok(r);
        }
        match main.or(tail) {
            Some(e) => Err(GatewayError::MethodNotAllowed {
                allow: e.allow.clone(),
            }),
            None => Err(GatewayError::NotFound),
        }
    }
}

impl PathEntry {
    fn route(&self, method: &Method) -> Option<&Arc<Route>> {
        self.by_method
            .iter()
            .find(|(x, _)| x == method)
            .map(|(_, r)| r)
            .or(self.any.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthMode, Route};

    fn route(name: &str, methods: Option<&[&str]>, path: &str) -> Arc<Route> {
        Arc::new(Route {
            name: name.into(),
            methods: methods.map(|ms| {
                ms.iter()
                    .map(|m| Method::from_bytes(m.as_bytes()).unwrap())
                    .collect()
            }),
            path: path.into(),
            upstream: "u".into(),
            permissions: vec![],
            key_kinds: vec!["secret".into()],
            auth: AuthMode::None,
            limits: vec![],
            max_body_bytes: 1024,
            websocket: false,
        })
    }

    #[test]
    fn most_specific_match_wins() {
        let r = Router::build(&[
            route("tail", Some(&["GET"]), "/v1/files/*rest"),
            route("param", Some(&["GET"]), "/v1/files/{id}/meta"),
            route("exact", Some(&["GET"]), "/v1/files/special/meta"),
            route("outer", Some(&["GET"]), "/v1/*rest"),
        ])
        .unwrap();
        assert_eq!(
            &*r.at(&Method::GET, "/v1/files/special/meta").unwrap().name,
            "exact"
        );
        assert_eq!(
            &*r.at(&Method::GET, "/v1/files/x/meta").unwrap().name,
            "param"
        );
        assert_eq!(
            &*r.at(&Method::GET, "/v1/files/x/y/z").unwrap().name,
            "tail"
        );
        assert_eq!(&*r.at(&Method::GET, "/v1/other/y").unwrap().name, "outer");
    }

    #[test]
    fn not_found_and_method_not_allowed_with_allow() {
        let r = Router::build(&[
            route("a", Some(&["POST"]), "/a"),
            route("b", Some(&["PUT"]), "/a"),
        ])
        .unwrap();
        assert!(matches!(
            r.at(&Method::GET, "/nope"),
            Err(GatewayError::NotFound)
        ));
        match r.at(&Method::GET, "/a") {
            Err(GatewayError::MethodNotAllowed { allow }) => assert_eq!(allow, "POST, PUT"),
            other => panic!("{other:?}"),
        }
        assert_eq!(&*r.at(&Method::PUT, "/a").unwrap().name, "b");
        assert!(
            matches!(r.at(&Method::POST, "/A"), Err(GatewayError::NotFound)),
            "case-sensitive"
        );
    }

    #[test]
    fn duplicate_method_and_path_is_an_error() {
        let e = Router::build(&[
            route("a", Some(&["GET"]), "/a"),
            route("b", Some(&["GET"]), "/a"),
        ])
        .unwrap_err();
        assert_eq!(e.0, 1);
        assert!(e.1.contains("already serves GET /a"), "{}", e.1);
    }

    #[test]
    fn patterns_are_checked() {
        assert!(check_pattern("/v1/{id}").is_ok());
        assert!(check_pattern("/v1/*rest").is_ok());
        assert!(
            check_pattern("v1")
                .unwrap_err()
                .contains("must start with /")
        );
        assert!(
            check_pattern("/v1/*rest/x")
                .unwrap_err()
                .contains("last segment")
        );
        assert!(
            check_pattern("/v1/a{id}")
                .unwrap_err()
                .contains("whole segment")
                || check_pattern("/v1/a{id}").is_err()
        );
        assert!(check_pattern("/v1/{i-d}").is_err());
        assert!(check_pattern("/v1//x").is_err());
    }
}
