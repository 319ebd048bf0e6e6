//! What the data path believes of gossip. Every holder of the gossip key can write to gossip, so
//! its claims are checked against the store, where each fact has one owner:
//!
//! - A peer's VTEP (data-path address) and WireGuard public key come from its node record, which
//!   the leader writes from the node's own authenticated session (join, heartbeat). Gossip only
//!   says which peers are alive; a member whose claims disagree with the record is ignored.
//! - An endpoint record is used only if the store agrees with it: the task is assigned to the
//!   node the record names, the gossip entry's owner is that node, and the address, service and
//!   slot are the ones the store gave the task (an ingress sandbox: the address the store holds
//!   for that node's sandbox).
//!
//! A claim about something the store does not know yet (a task or node newer than this node's
//! copy of the store) is left out without counting: it is used once the store catches up. A
//! claim the store contradicts is dropped and counted, once for as long as it stays in gossip.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use shoal_cluster::model::ClusterState;
use shoal_gossip::{MemberState, Snapshot};
use shoal_vxlan as vx;

use super::records::{self, ENDPOINT_TABLE, EndpointRecord};

/// What kind of gossip claim was dropped (the `kind` label on `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClaimKind {
    /// A member's VTEP, WireGuard key or identity.
    Peer,
    /// An endpoint record (a task or an ingress sandbox).
    Endpoint,
}

impl ClaimKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimKind::Peer => "peer",
            ClaimKind::Endpoint => "endpoint",
        }
    }
}

/// One claim the store contradicts, described well enough to tell two apart.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dropped {
    pub kind: ClaimKind,
    pub what: String,
}

/// The gossip claims the data path may use, and those it must not.
#[derive(Debug, Default)]
pub struct Verified {
    /// Endpoint records by network id.
    pub endpoints: Vec<(String, EndpointRecord)>,
    /// Live peers, with the store's VTEP and WireGuard key, sorted by node id.
    pub peers: Vec<vx::PeerRecord>,
    pub dropped: BTreeSet<Dropped>,
}

/// Checks gossip snapshot `snap` against the store `state`; `tunnels` is the WireGuard tunnel
/// range a peer's tunnel address is made in.
pub fn verify(state: &ClusterState, snap: &Snapshot, tunnels: ipnet::Ipv4Net) -> Verified {
    let mut out = Verified::default();
    peers(state, snap, tunnels, &mut out);
    endpoints(state, snap, &mut out);
    out
}

fn peers(state: &ClusterState, snap: &Snapshot, tunnels: ipnet::Ipv4Net, out: &mut Verified) {
    let mut drop = |what: String| out.dropped.insert(Dropped { kind: ClaimKind::Peer, what });
    let mut alive: BTreeMap<String, vx::PeerRecord> = BTreeMap::new();
    for m in snap.members.iter().filter(|m| m.state != MemberState::Down) {
        let Some(meta) = &m.meta else { continue };
        let Ok(id) = meta.id.parse::<shoal_cluster::NodeId>() else {
            drop(format!("member {} names no node ({:?})", m.id.addr, meta.id));
            continue;
        };
        let Some(rec) = state.nodes.get(&id) else { continue };
        let IpAddr::V4(vtep) = rec.data_addr else { continue };
        let claim = format!(
            "member {} ({:?}) as node {id}: underlay {:?}, key {:?}",
            m.id.addr,
            m.id.node,
            meta.underlay,
            meta.wg_public_key.map(hex::encode)
        );
        // A node's gossip runs under the id made from its node id, on its control address
        // (`crate::swarm`); its metadata repeats what its record says.
        let impostor = m.id.node != shoal_gossip::NodeId::from_name(&meta.id)
            || m.id.addr.ip() != rec.addr.ip()
            || meta.underlay != Some(rec.data_addr)
            || (meta.wg_public_key.is_some()
                && rec.wg_public_key.is_some()
                && meta.wg_public_key != rec.wg_public_key);
        if impostor {
            drop(claim);
            continue;
        }
        alive.insert(
            meta.id.clone(),
            vx::PeerRecord {
                node: meta.id.clone(),
                vtep,
                tunnel: Some(vx::tunnel_addr(tunnels, vtep)),
                // Until the node's first heartbeat records its key, it has none: its encrypted
                // traffic waits rather than trusting a key nobody vouched for.
                wg_public: rec.wg_public_key,
            },
        );
    }
    out.peers = alive.into_values().collect();
}

fn endpoints(state: &ClusterState, snap: &Snapshot, out: &mut Verified) {
    let tasks = records::tasks(state);
    let held = records::held(state);
    let ingress = records::ingress(state).map(|n| n.id.as_str());
    for (k, owner, v) in snap.entries.iter().filter(|(k, _, _)| k.table == ENDPOINT_TABLE) {
        let mut drop = |why: &str| {
            out.dropped.insert(Dropped {
                kind: ClaimKind::Endpoint,
                what: format!("{}/{} from {owner:?}: {why}", k.network, k.key),
            })
        };
        let Ok(e) = serde_json::from_slice::<EndpointRecord>(v) else {
            drop("malformed");
            continue;
        };
        // What the store says the record must be: the node that owns it and its address.
        let expected: Option<(&str, Ipv4Addr)> = if let Some(node) = k.key.strip_prefix("sbox-") {
            held.get(&records::sandbox_key(node)).map(|ip| (node, *ip))
        } else {
            tasks.get(&k.key).and_then(|t| {
                let node = t.task.node_id.as_deref()?;
                let ip = t.addresses.get(&k.network).copied().unwrap_or(Ipv4Addr::UNSPECIFIED);
                Some((node, ip))
            })
        };
        let Some((node, ip)) = expected else { continue };
        if *owner != shoal_gossip::NodeId::from_name(node) {
            drop(&format!("written by another node than {node}, which owns it"));
            continue;
        }
        if e.node != node || e.ip != ip {
            drop(&format!("says {} on {}, the store says {ip} on {node}", e.ip, e.node));
            continue;
        }
        let consistent = match tasks.get(&k.key) {
            Some(t) => {
                e.task == t.task.id
                    && e.service == t.task.service_id
                    && e.slot == t.slot_label()
                    && e.name == t.standalone.as_ref().map(|s| s.name.as_str()).unwrap_or("")
            }
            None => {
                Some(k.network.as_str()) == ingress
                    && e.task.is_empty()
                    && e.service.is_empty()
                    && e.name.is_empty()
            }
        };
        if !consistent {
            drop("its task, service, slot or name differ from the store's");
            continue;
        }
        out.endpoints.push((k.network.clone(), e));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use shoal_cluster::NodeId;
    use shoal_cluster::model::{Availability, NodeRecord, NodeStatus, Role};
    use shoal_gossip::{EntryKey, Identity, MemberView, NodeMeta};
    use shoal_scheduler as sched;

    use super::*;
    use crate::engine::records::TaskRecord;

    const A: u64 = 0xA;
    const B: u64 = 0xB;

    fn node(id: u64, last: u8, key: Option<[u8; 32]>) -> NodeRecord {
        NodeRecord {
            id: NodeId(id),
            hostname: format!("n{id}"),
            role: Role::Worker,
            availability: Availability::Active,
            labels: BTreeMap::new(),
            addr: format!("198.18.9.{last}:2377").parse().unwrap(),
            data_addr: format!("198.18.9.{last}").parse().unwrap(),
            wg_public_key: key,
            status: NodeStatus::Ready,
            status_message: String::new(),
            engine_version: String::new(),
            created_ms: 0,
            updated_ms: 0,
        }
    }

    fn name(id: u64) -> String {
        NodeId(id).to_string()
    }

    /// A store with nodes A and B, task `t1` of service `s` on B with 10.0.1.5 on network `n`.
    fn store() -> ClusterState {
        let mut s = ClusterState::default();
        s.nodes.insert(NodeId(A), node(A, 1, Some([1; 32])).into());
        s.nodes.insert(NodeId(B), node(B, 2, Some([2; 32])).into());
        let task = sched::Task {
            id: "t1".into(),
            service_id: "s".into(),
            slot: 1,
            node_id: Some(name(B)),
            spec_version: 1,
            desired: sched::DesiredState::Running,
            state: sched::TaskState::Running,
            state_since_ms: 0,
            created_ms: 0,
            attempt: 0,
        };
        let rec = TaskRecord {
            task,
            addresses: BTreeMap::from([("n".to_owned(), "10.0.1.5".parse().unwrap())]),
            networks: vec!["n".into()],
            message: String::new(),
            exit_code: None,
            health: None,
            standalone: None,
        };
        s.tasks.insert("t1".into(), rec.into());
        s
    }

    fn member(id: u64, gossip_name: &str, last: u8, underlay: u8, key: [u8; 32]) -> MemberView {
        MemberView {
            id: Identity {
                addr: format!("198.18.9.{last}:7946").parse().unwrap(),
                node: shoal_gossip::NodeId::from_name(gossip_name),
                generation: 1,
                bump: 0,
            },
            state: MemberState::Alive,
            incarnation: 0,
            meta: Some(NodeMeta {
                id: name(id),
                underlay: Some(format!("198.18.9.{underlay}").parse().unwrap()),
                wg_public_key: Some(key),
                ..NodeMeta::default()
            }),
            networks: Vec::new(),
        }
    }

    fn endpoint(node: u64, ip: &str) -> Vec<u8> {
        let e = EndpointRecord {
            node: name(node),
            ip: ip.parse().unwrap(),
            service: "s".into(),
            task: "t1".into(),
            slot: "1".into(),
            name: String::new(),
            serving: true,
            aliases: Vec::new(),
        };
        serde_json::to_vec(&e).unwrap()
    }

    fn tunnels() -> ipnet::Ipv4Net {
        "100.96.0.0/11".parse().unwrap()
    }

    #[test]
    fn peers_take_the_store_s_address_and_key_and_impostors_are_dropped() {
        let s = store();
        let mut snap = Snapshot {
            identity: None,
            members: vec![member(A, &name(A), 1, 1, [1; 32]), member(B, &name(B), 2, 2, [2; 32])],
            entries: Vec::new(),
            networks: Vec::new(),
            key_ids: Vec::new(),
            metrics: Default::default(),
        };
        let v = verify(&s, &snap, tunnels());
        assert_eq!(v.peers.len(), 2);
        assert!(v.dropped.is_empty(), "{:?}", v.dropped);
        assert_eq!(v.peers[1].wg_public, Some([2; 32]));

        // Someone with the gossip key claims to be B from its own address, or from B's with
        // another key or VTEP: each is dropped, and B stays as the store says.
        snap.members.push(member(B, &name(B), 254, 254, [9; 32]));
        snap.members.push(member(B, "rogue", 2, 2, [2; 32]));
        snap.members.push(member(B, &name(B), 2, 2, [9; 32]));
        let v = verify(&s, &snap, tunnels());
        assert_eq!(v.dropped.len(), 3, "{:?}", v.dropped);
        assert!(v.dropped.iter().all(|d| d.kind == ClaimKind::Peer));
        let b = v.peers.iter().find(|p| p.node == name(B)).unwrap();
        assert_eq!((b.vtep, b.wg_public), ("198.18.9.2".parse().unwrap(), Some([2; 32])));

        // A node the store does not know (yet) is no peer, and not counted.
        snap.members = vec![member(0xC, &name(0xC), 3, 3, [3; 32])];
        let v = verify(&s, &snap, tunnels());
        assert!(v.peers.is_empty() && v.dropped.is_empty());
    }

    #[test]
    fn endpoints_only_from_the_owner_with_the_store_s_address() {
        let s = store();
        let key = EntryKey::new(ENDPOINT_TABLE, "n", "t1");
        let from = |id: u64| shoal_gossip::NodeId::from_name(&name(id));
        let mut snap = Snapshot {
            identity: None,
            members: Vec::new(),
            entries: vec![(key.clone(), from(B), endpoint(B, "10.0.1.5").into())],
            networks: Vec::new(),
            key_ids: Vec::new(),
            metrics: Default::default(),
        };
        let v = verify(&s, &snap, tunnels());
        assert_eq!(v.endpoints.len(), 1);
        assert!(v.dropped.is_empty());

        let forged = [
            // A writes B's task as its own, B's task with A's name, another address.
            (from(A), endpoint(A, "10.0.1.5")),
            (from(A), endpoint(B, "10.0.1.5")),
            (from(B), endpoint(B, "10.0.1.66")),
            (from(B), b"{not json".to_vec()),
        ];
        for (owner, value) in forged {
            snap.entries = vec![(key.clone(), owner, value.clone().into())];
            let v = verify(&s, &snap, tunnels());
            assert!(v.endpoints.is_empty(), "{value:?} was believed");
            assert_eq!(v.dropped.len(), 1, "{value:?}");
        }

        // A task the store does not know (yet) is left out without counting.
        snap.entries = vec![(
            EntryKey::new(ENDPOINT_TABLE, "n", "t2"),
            from(B),
            endpoint(B, "10.0.1.7").into(),
        )];
        let v = verify(&s, &snap, tunnels());
        assert!(v.endpoints.is_empty() && v.dropped.is_empty());
    }
}
