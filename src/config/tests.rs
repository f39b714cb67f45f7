//! Every validation rule, with the message it prints.

use super::*;

fn load_str(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new("/tmp/portcullis-test.toml"), text, |k| match k {
        "ADMIN_TOKEN" => Some("tok".into()),
        _ => None,
    })
}

fn errors(text: &str) -> String {
    load_str(text).unwrap_err().to_string()
}

const BASE: &str = r#"[server]
listen = "127.0.0.1:0"

[upstreams.sms]
targets = ["http://127.0.0.1:7001"]
"#;

fn with(extra: &str) -> String {
    format!("{BASE}{extra}")
}

#[test]
fn the_design_example_shape_parses_with_defaults() {
    let c = load_str(&with(
        r#"
[admin]
token = "${ADMIN_TOKEN}"
[cache]
ttl = "30s"
[plans.default]
limits = [{ scope = "key", requests = 60, per = "1m" }, { scope = "workspace", requests = 1000, per = "1d" }]
[[routes]]
name = "sms.send"
methods = ["POST"]
path = "/v1/sms/send"
upstream = "sms"
permissions = ["sms.send"]
key_kinds = ["secret", "public"]
limits = [{ scope = "route", requests = 10, per = "1s" }]
"#,
    ))
    .unwrap();
    assert_eq!(c.admin.token.as_deref(), Some("tok"));
    assert_eq!(c.plan_limits(None).len(), 2);
    assert_eq!(
        c.plan_limits(Some("nope")).len(),
        2,
        "unknown plan falls back to default"
    );
    assert_eq!(c.routes[0].limits[0].per, Duration::from_secs(1));
    assert_eq!(c.cache.negative_ttl, Duration::from_secs(5));
    assert_eq!(c.server.max_header_bytes, 16 * 1024);
}

#[test]
fn unknown_key_names_line_and_column() {
    let e = errors("[server]\nlisten = \"127.0.0.1:0\"\nlistne = \"oops\"\n");
    assert!(e.starts_with("/tmp/portcullis-test.toml:3:1: "), "{e}");
    assert!(e.contains("listne"), "{e}");
}

#[test]
fn route_to_unknown_upstream() {
    let e = errors(&with(
        "[[routes]]\nname = \"x\"\npath = \"/x\"\nupstream = \"nowhere\"\n",
    ));
    assert!(
        e.contains(":9:12: route x: upstream \"nowhere\" is not defined in [upstreams]"),
        "{e}"
    );
}

#[test]
fn duplicate_method_and_path() {
    let e = errors(&with(
        "[[routes]]\nname = \"a\"\nmethods = [\"GET\"]\npath = \"/x\"\nupstream = \"sms\"\n[[routes]]\nname = \"b\"\nmethods = [\"GET\"]\npath = \"/x\"\nupstream = \"sms\"\n",
    ));
    assert!(
        e.contains("route b: another route already serves GET /x"),
        "{e}"
    );
    assert!(e.contains(":14:8:"), "{e}");
}

#[test]
fn malformed_path_pattern() {
    let e = errors(&with(
        "[[routes]]\nname = \"a\"\npath = \"/x/*rest/y\"\nupstream = \"sms\"\n",
    ));
    assert!(
        e.contains("route a: path \"/x/*rest/y\": a /*tail must be the last segment"),
        "{e}"
    );
}

#[test]
fn upstream_url_must_be_http() {
    let e =
        errors("[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.x]\ntargets = [\"ftp://h:1\"]\n");
    assert!(
        e.contains(":4:12: upstream x: target \"ftp://h:1\" must be an http:// or https:// URL"),
        "{e}"
    );
}

#[test]
fn missing_cert_file() {
    let e = errors(
        "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\ncert = \"/nope/cert.pem\"\nkey = \"/nope/key.pem\"\n",
    );
    assert!(
        e.contains(":4:8: TLS certificate file /nope/cert.pem does not exist"),
        "{e}"
    );
    assert!(
        e.contains(":5:7: TLS key file /nope/key.pem does not exist"),
        "{e}"
    );
}

#[test]
fn unset_environment_variable() {
    let e = errors(&with("[admin]\ntoken = \"${NOT_SET_ANYWHERE}\"\n"));
    assert!(
        e.contains(":7:10: environment variable NOT_SET_ANYWHERE is not set"),
        "{e}"
    );
}

#[test]
fn bad_duration_and_limits() {
    let e = errors(&with("[cache]\nttl = \"soon\"\n"));
    assert!(e.contains(":7:7:"), "{e}");
    let e = errors(&with(
        "[plans.p]\nlimits = [{ scope = \"planet\", requests = 1, per = \"1s\" }]\n",
    ));
    assert!(e.contains("unknown limit scope \"planet\""), "{e}");
    let e = errors(&with(
        "[plans.p]\nlimits = [{ scope = \"key\", requests = 1, per = \"31d\" }]\n",
    ));
    assert!(e.contains("per must be between 1s and 30d"), "{e}");
}

#[test]
fn key_kinds_configurable_and_checked() {
    let c = load_str(&with(
        "[key_kinds.vonage]\nprefixes = { live = \"vlk_\", test = \"vlt_\" }\nlength = 52\n",
    ))
    .unwrap();
    let (s, _) = c.key_format.generate("vonage", Environment::Live).unwrap();
    assert!(s.starts_with("vlk_") && s.len() == 52);
    let e = errors(&with(
        "[key_kinds.short]\nprefixes = { live = \"s_\", test = \"t_\" }\nlength = 20\n",
    ));
    assert!(e.contains("length 20 is too short"), "{e}");
    let e = errors(&with(
        "[key_kinds.clash]\nprefixes = { live = \"sk_\", test = \"ct_\" }\n",
    ));
    assert!(e.contains("overlap"), "{e}");
}

#[test]
fn key_kind_length_is_one_the_key_parser_accepts() {
    let c = load_str(&with(
        "[key_kinds.long]\nprefixes = { live = \"lk_\", test = \"lt_\" }\nlength = 256\n",
    ))
    .unwrap();
    let (s, _) = c.key_format.generate("long", Environment::Test).unwrap();
    assert!(c.key_format.parse(&s).is_some(), "{s}");
    let e = errors(&with(
        "[key_kinds.long]\nprefixes = { live = \"lk_\", test = \"lt_\" }\nlength = 257\n",
    ));
    assert!(e.contains("length 257 is too long: at most 256"), "{e}");
}

#[test]
fn redis_modes_need_a_redis_store() {
    let e = errors(&with("[rate_limit]\nmode = \"redis\"\n"));
    assert!(
        e.contains("need a redis:// or redis+cluster:// store.url"),
        "{e}"
    );
}

#[test]
fn self_service_key_cap_defaults_and_is_bounded() {
    let c = load_str(&with("[self_service]\nenabled = true\n")).unwrap();
    assert_eq!(c.self_service_max_keys, DEFAULT_MAX_KEYS_PER_WORKSPACE);
    assert_eq!(c.self_service_max_keys, 100);
    let c = load_str(&with(
        "[self_service]\nenabled = true\nmax_keys_per_workspace = 3\n",
    ))
    .unwrap();
    assert_eq!(c.self_service_max_keys, 3);
    for bad in ["0", "-1", "10001", "9223372036854775807"] {
        let e = errors(&with(&format!(
            "[self_service]\nmax_keys_per_workspace = {bad}\n"
        )));
        assert!(
            e.contains(&format!(
                ":7:26: self_service.max_keys_per_workspace {bad}: use 1 to 10000"
            )),
            "{bad}: {e}"
        );
    }
    let e = errors(&with("[self_service]\nmax_keys_per_workspace = \"many\"\n"));
    assert!(e.contains(":7:"), "{e}");
    let e = errors(&with("[self_service]\nmax_keys = 3\n"));
    assert!(e.contains(":7:1:") && e.contains("max_keys"), "{e}");
}
