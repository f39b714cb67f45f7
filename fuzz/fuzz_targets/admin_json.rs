//! The admin API's JSON bodies (create, patch, rotate; self-service creates
//! with the same body as admin create): any body gives a value or a 400.
//! A JSON object that does not deserialise names one of its own members; one
//! that does either validates or names the field at fault.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::admin::api::{RotateBody, parse_grace};
use portcullis::admin::http::{ApiError, parse_json};
use portcullis::admin::ops::{KeyPatch, NewKey, OpsError, apply_patch, build_record};
use portcullis::config::Config;
use portcullis::keys::KeyRecord;
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::LazyLock;

const NEW_KEY_FIELDS: &[&str] = &[
    "workspace",
    "name",
    "kind",
    "environment",
    "permissions",
    "plan",
    "expires_at",
    "expires_in",
    "allowed_ips",
    "allowed_origins",
    "allowed_routes",
    "metadata",
];
const PATCH_FIELDS: &[&str] = &[
    "name",
    "permissions",
    "plan",
    "status",
    "expires_at",
    "allowed_ips",
    "allowed_origins",
    "allowed_routes",
    "metadata",
];

static CONFIG: LazyLock<Config> = LazyLock::new(|| {
    let text = include_str!("../../config/portcullis.toml");
    portcullis::config::parse(Path::new("portcullis.toml"), text, |_| Some("x".into()))
        .expect("the shipped config is valid")
});

static RECORD: LazyLock<KeyRecord> = LazyLock::new(|| {
    let n = NewKey {
        workspace: Some("ws".into()),
        permissions: vec!["sms.send".into()],
        ..NewKey::default()
    };
    build_record(&CONFIG, n).expect("a minimal key is valid")
});

/// A body that failed to parse: a 400, naming a member when the body is a
/// JSON object.
fn refused(body: Option<&Map<String, Value>>, e: &ApiError) {
    assert_eq!(e.status.as_u16(), 400, "{e:?}");
    if let Some(obj) = body {
        let field = e
            .field
            .as_deref()
            .unwrap_or_else(|| panic!("a JSON object refused without naming a member: {e:?}"));
        assert!(
            obj.contains_key(field),
            "{e:?}: names no member of the body"
        );
    }
}

/// A body that parsed but did not validate: the error names a known field.
fn invalid(e: OpsError, fields: &[&str]) {
    match e {
        OpsError::Invalid { field, .. } => {
            assert!(fields.contains(&field), "{field:?} is not a body field");
        }
        other => panic!("validation gave {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let obj: Option<Map<String, Value>> = serde_json::from_slice(data).ok();
    let obj = obj.as_ref();

    match parse_json::<NewKey>(data, false) {
        Ok(n) => {
            if let Err(e) = build_record(&CONFIG, n) {
                invalid(e, NEW_KEY_FIELDS);
            }
        }
        Err(e) => refused(obj, &e),
    }

    match parse_json::<KeyPatch>(data, true) {
        Ok(p) => {
            let mut rec = RECORD.clone();
            if let Err(e) = apply_patch(&CONFIG, &mut rec, p) {
                invalid(e, PATCH_FIELDS);
            }
        }
        Err(e) => refused(obj, &e),
    }

    match parse_json::<RotateBody>(data, true) {
        Ok(b) => {
            if let Err(e) = parse_grace(&b) {
                assert_eq!(e.field.as_deref(), Some("grace"), "{e:?}");
            }
        }
        Err(e) => refused(obj, &e),
    }
});
