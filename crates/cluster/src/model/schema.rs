//! The store's schema version: the applied state and every snapshot carry it, and a store
//! written by an older agent is upgraded when it is read.
//!
//! - Version 1 (no `schema` field) kept services, tasks and held addresses as JSON under
//!   `entries: {table: {key: value}}`; each value already had the record's shape, so the
//!   upgrade moves the three tables to their typed homes and parses them.
//! - Version 2 is [`ClusterState`] as it is. Snapshots carry it as one JSON document; the state
//!   machine on disk keeps the same records a row each (`raft/tables.rs`), and rewrites into
//!   rows a whole document of version 1 or 2 that an older agent stored.
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

/// Reads a Raft log entry written by this or an older agent. Entries from before typed tables
/// carry `PutEntry`, `DeleteEntry` and `ReportTask { fields }`; they are rewritten to the typed
/// commands they meant, so a log not yet compacted into a snapshot replays after an upgrade.
///
/// An entry that does not read is refused, never skipped: most likely a newer agent wrote a
/// command this one does not know, and applying the log without it would give another state.
pub fn decode_entry<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes)?;
    if let Some(cmd) = v.pointer_mut("/payload/Normal") {
        upgrade_command(cmd);
    }
    serde_json::from_value(v).map_err(|e| {
        serde::de::Error::custom(format!(
            "a Raft log entry this agent cannot read, likely written by a newer agent (run a \
             newer agent): {e}"
        ))
    })
}

/// One schema-1 command as its schema-2 form; any other command is left as it is.
fn upgrade_command(cmd: &mut serde_json::Value) {
    use serde_json::{Value, json};
    let Some((name, body)) = cmd.as_object().and_then(|o| o.iter().next()) else { return };
    let field = |k: &str| body.get(k).cloned().unwrap_or(Value::Null);
    let table = body.get("table").and_then(Value::as_str);
    let new = match (name.as_str(), table) {
        ("PutEntry", Some("services")) => json!({ "PutService": field("value") }),
        ("PutEntry", Some("tasks")) => json!({ "PutTask": field("value") }),
        ("PutEntry", Some("ipam")) => {
            let ip = body.pointer("/value/ip").cloned().unwrap_or(Value::Null);
            json!({ "PutAddress": { "key": field("key"), "ip": ip } })
        }
        ("DeleteEntry", Some("services")) => json!({ "RemoveService": field("key") }),
        ("DeleteEntry", Some("tasks")) => json!({ "RemoveTask": field("key") }),
        ("DeleteEntry", Some("ipam")) => json!({ "RemoveAddress": field("key") }),
        ("ReportTask", _) if body.get("fields").is_some() => json!({ "ReportTask": {
            "owner": field("owner"), "key": field("key"), "report": field("fields"),
        }}),
        _ => return,
    };
    *cmd = new;
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
    use crate::model::{Command, NodeId, TaskReport};
    use openraft::{Entry, EntryPayload, LogId};

    /// A schema-1 log entry (its command given as JSON) reads as the typed command it meant.
    fn reads_as(old: serde_json::Value, want: Command) {
        let log_id = LogId::new(openraft::CommittedLeaderId::new(3, 1), 7);
        let entry: Entry<crate::raft::TypeConfig> =
            Entry { log_id, payload: EntryPayload::Normal(want) };
        let mut json = serde_json::to_value(&entry).expect("json");
        *json.pointer_mut("/payload/Normal").expect("a normal entry") = old;
        let bytes = serde_json::to_vec(&json).expect("bytes");
        let read: Entry<crate::raft::TypeConfig> = decode_entry(&bytes).expect("upgraded");
        assert_eq!(read.log_id, entry.log_id);
        assert_eq!(format!("{:?}", read.payload), format!("{:?}", entry.payload));
    }

    #[test]
    fn a_log_entry_of_a_newer_agent_is_refused_with_its_reason() {
        let entry: Entry<crate::raft::TypeConfig> = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(3, 1), 7),
            payload: EntryPayload::Normal(Command::RemoveTask("t".into())),
        };
        let mut json = serde_json::to_value(&entry).expect("json");
        *json.pointer_mut("/payload/Normal").expect("normal") =
            serde_json::json!({ "SplitNetwork": { "id": "n" } });
        let bytes = serde_json::to_vec(&json).expect("bytes");
        let e = decode_entry::<Entry<crate::raft::TypeConfig>>(&bytes).unwrap_err().to_string();
        assert!(e.contains("newer agent") && e.contains("SplitNetwork"), "{e}");
    }

    #[test]
    fn log_entries_from_before_typed_tables_replay_as_typed_commands() {
        let svc = crate::simulated::service(0, 4);
        let svc_json = serde_json::to_value(&svc).expect("json");
        let table = |t: &str, k: &str, v: serde_json::Value| serde_json::json!({"PutEntry": {"table": t, "key": k, "value": v}});
        reads_as(table("services", &svc.id, svc_json), Command::PutService(Box::new(svc)));
        let task = crate::simulated::task(0, 1, NodeId(9), 4);
        let task_json = serde_json::to_value(&task).expect("json");
        reads_as(table("tasks", "t1", task_json), Command::PutTask(Box::new(task)));
        reads_as(
            table("ipam", "vip/s/n", serde_json::json!({"ip": "10.0.0.250"})),
            Command::PutAddress { key: "vip/s/n".into(), ip: "10.0.0.250".parse().unwrap() },
        );
        for (t, want) in [
            ("services", Command::RemoveService("k".into())),
            ("tasks", Command::RemoveTask("k".into())),
            ("ipam", Command::RemoveAddress("k".into())),
        ] {
            reads_as(serde_json::json!({"DeleteEntry": {"table": t, "key": "k"}}), want);
        }
        let fields = serde_json::json!({
            "state": "running", "state_since_ms": 5, "exit_code": null, "health": null,
            "message": "started",
        });
        let report: TaskReport = serde_json::from_value(fields.clone()).expect("a report");
        reads_as(
            serde_json::json!({"ReportTask": {"owner": NodeId(9), "key": "t1", "fields": fields}}),
            Command::ReportTask { owner: NodeId(9), key: "t1".into(), report },
        );
        // A command of this schema passes through unchanged.
        reads_as(serde_json::json!({"RemoveNetwork": "n1"}), Command::RemoveNetwork("n1".into()));
    }

    /// Before the store picked addresses, the leader wrote them into `PutTask` and `PutAddress`;
    /// such a log replays to the addresses it carried, on every replica alike.
    #[test]
    fn log_entries_from_before_store_allocation_keep_their_addresses() {
        let vip = serde_json::json!({"PutAddress": {"key": "vip/s/ing", "ip": "10.0.0.250"}});
        let mut task = super::super::tests::task("t1", NodeId(1), "s");
        task.networks = vec!["ing".into()];
        task.addresses = [("ing".to_owned(), "10.0.0.77".parse().unwrap())].into();
        let put = serde_json::json!({"PutTask": serde_json::to_value(&task).expect("json")});
        let alloc = Command::AllocateAddress { key: "sbox/n".into(), network: "ing".into() };
        let new = serde_json::to_value(&alloc).expect("json");
        let mut s = super::super::tests::init_state();
        for (old, want) in [
            (vip, Command::PutAddress { key: "vip/s/ing".into(), ip: [10, 0, 0, 250].into() }),
            (put, Command::PutTask(Box::new(task))),
            (new, alloc),
        ] {
            reads_as(old, want.clone());
            s.apply(&want, 1).expect("replays");
        }
        assert_eq!(s.ipam["vip/s/ing"].ip, std::net::Ipv4Addr::new(10, 0, 0, 250));
        assert_eq!(s.tasks["t1"].addresses["ing"], std::net::Ipv4Addr::new(10, 0, 0, 77));
        assert_eq!(s.ipam["sbox/n"].ip, std::net::Ipv4Addr::new(10, 0, 0, 2));
    }

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
