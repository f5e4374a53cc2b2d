//! The interserver Secret: the shared credential replicas present to each other on fetches.
//! Generated once (the value is an input here) and never rotated by reconcile.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::{Names, owned_meta};
use crate::crd::ReplicatedTable;

pub const INTERSERVER_KEY: &str = "interserver";

pub fn interserver_secret(rt: &ReplicatedTable, value: &str) -> Secret {
    Secret {
        metadata: owned_meta(rt, &Names::of(rt).secret),
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(
            INTERSERVER_KEY.to_string(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// 32 random bytes as hex: enough entropy, and printable for anyone debugging with curl.
pub fn new_interserver_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures;

    #[test]
    fn secret_matches_fixture() {
        let rt = fixtures::table("table.yaml");
        fixtures::assert_golden("secret.yaml", &interserver_secret(&rt, "not-so-secret"));
    }

    #[test]
    fn generated_values_are_long_and_distinct() {
        let (a, b) = (new_interserver_secret(), new_interserver_secret());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
