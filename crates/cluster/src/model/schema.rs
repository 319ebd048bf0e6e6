//! The store's schema version: the applied state and every snapshot carry it, and a store
//! written by an older agent is upgraded when it is read.
//!
//! - Version 1 (no `schema` field) kept services, tasks and held addresses as JSON under
//!   `entries: {table: {key: value}}`; each value already had the record's shape, so the
//!   upgrade moves the three tables to their typed homes and parses them.
//! - Version 2 is [`ClusterState`] as it is.
//!
//! A newer version than [`SCHEMA`] is refused: an older agent must not rewrite what it cannot read.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ClusterState;

/// The schema version this agent writes.
pub const SCHEMA: u32 = 2;

#[derive(Serialize)]
struct Versioned<'a> {
    schema: u32,
    #[serde(flatten)]
    state: &'a ClusterState,
}

/// The state as JSON with its schema version.
pub fn encode(s: &ClusterState) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&Versioned { schema: SCHEMA, state: s })
}

/// Reads a state written by this or an older agent.
pub fn decode(bytes: &[u8]) -> Result<ClusterState, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("the store state is not JSON: {e}"))?;
    upgrade(v)
}

/// Brings a state of any known version to [`SCHEMA`].
pub fn upgrade(mut v: serde_json::Value) -> Result<ClusterState, String> {
    let obj = v.as_object_mut().ok_or("the store state is not a JSON object")?;
    let version = match obj.remove("schema") {
        None => 1,
        Some(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("the store's schema version {n} is not a number"))?,
    };
    if version > SCHEMA {
        return Err(format!(
            "the store was written with schema version {version}, newer than this agent's \
             {SCHEMA}: run a newer agent"
        ));
    }
    if version == 1 {
        let mut entries = match obj.remove("entries") {
            Some(serde_json::Value::Object(e)) => e,
            _ => serde_json::Map::new(),
        };
        for table in ["services", "tasks", "ipam"] {
            if let Some(rows) = entries.remove(table) {
                obj.insert(table.to_owned(), rows);
            }
        }
        if let Some(other) = entries.keys().next() {
            return Err(format!("the store (schema 1) has a table {other:?} no agent writes"));
        }
    }
    serde_json::from_value(v).map_err(|e| format!("the store state (schema {version}): {e}"))
}

/// For `#[serde(with)]`: a state field written with its version and upgraded when read.
pub fn serialize<S: Serializer>(s: &ClusterState, ser: S) -> Result<S::Ok, S::Error> {
    Versioned { schema: SCHEMA, state: s }.serialize(ser)
}

/// See [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<ClusterState, D::Error> {
    upgrade(serde_json::Value::deserialize(de)?).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store as the agent before typed tables wrote it: the tables under `entries`.
    fn schema_1() -> serde_json::Value {
        let svc = serde_json::to_value(crate::simulated::service(0, 4)).expect("json");
        let task =
            serde_json::to_value(crate::simulated::task(0, 1, crate::NodeId(9), 4)).expect("json");
        serde_json::json!({
            "cluster": null, "nodes": {}, "networks": {},
            "keyring": {"keys": [], "primary": 0, "version": 0},
            "entries": {
                "services": {"svc00000": svc},
                "tasks": {"task00000x01": task},
                "ipam": {"vip/svc00000/net1": {"ip": "10.0.0.250"}},
            }
        })
    }

    #[test]
    fn a_schema_1_store_is_upgraded_and_written_as_schema_2() {
        let s = upgrade(schema_1()).expect("upgrade");
        assert_eq!(s.services["svc00000"].name, "web-0");
        assert_eq!(s.tasks["task00000x01"].task.service_id, "svc00000");
        assert_eq!(s.ipam["vip/svc00000/net1"].ip, std::net::Ipv4Addr::new(10, 0, 0, 250));
        let bytes = encode(&s).expect("encode");
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(v["schema"], SCHEMA);
        assert!(v.get("entries").is_none());
        assert_eq!(decode(&bytes).expect("decode"), s);
    }

    #[test]
    fn a_newer_or_unknown_store_is_refused() {
        let mut v = serde_json::to_value(ClusterState::default()).expect("json");
        v["schema"] = serde_json::json!(SCHEMA + 1);
        assert!(upgrade(v).unwrap_err().contains("newer than this agent's"));
        let mut old = schema_1();
        old["entries"]["acked"] = serde_json::json!({"k": 1});
        assert!(upgrade(old).unwrap_err().contains("\"acked\""));
    }
}
