//! The sans-I/O reconciler: from the gossip tables and the set of local networks it computes,
//! per network, the kernel entries the sandbox's VXLAN device should hold, and the smallest list
//! of changes that turns what the kernel holds into that.
//!
//! Drive it like this: [`Reconciler::handle_tables`] / [`Reconciler::handle_network_up`] /
//! [`Reconciler::handle_network_down`] as things change, then for each id from
//! [`Reconciler::poll_dirty`] read the device's entries from the kernel and apply
//! [`plan`]`(&reconciler.desired(id), &observed)`. Reading the kernel each time (rather than
//! remembering what was written) is what makes an agent restart safe: nothing is re-added or
//! flushed that is already right, so live flows never see a gap.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use crate::model::{Mac, Tables};

/// The entries one sandbox's VXLAN device holds (or should hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries {
    /// Static unicast FDB entries: remote MAC → remote VTEP.
    pub fdb: BTreeMap<Mac, Ipv4Addr>,
    /// All-zeros FDB entries: where broadcast and unknown unicast are flooded to.
    pub flood: BTreeSet<Ipv4Addr>,
    /// Permanent neighbour entries: remote IP → remote MAC.
    pub neigh: BTreeMap<Ipv4Addr, Mac>,
}

/// One kernel change; [`plan`] orders them so a flow never loses its FDB entry while its
/// neighbour entry still points at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Add or replace a static FDB entry.
    FdbSet { mac: Mac, dst: Ipv4Addr },
    /// Remove a static FDB entry.
    FdbDel { mac: Mac, dst: Ipv4Addr },
    /// Append an all-zeros flood entry.
    FloodAdd { dst: Ipv4Addr },
    /// Remove an all-zeros flood entry.
    FloodDel { dst: Ipv4Addr },
    /// Add or replace a permanent neighbour entry.
    NeighSet { ip: Ipv4Addr, mac: Mac },
    /// Remove a neighbour entry.
    NeighDel { ip: Ipv4Addr },
}

/// The changes that turn `observed` into `desired`: adds first (FDB before neighbour), then
/// removals (neighbour before FDB). Identical sets give an empty plan.
pub fn plan(desired: &Entries, observed: &Entries) -> Vec<Change> {
    let mut out = Vec::new();
    for (mac, dst) in &desired.fdb {
        if observed.fdb.get(mac) != Some(dst) {
            out.push(Change::FdbSet { mac: *mac, dst: *dst });
        }
    }
    for dst in desired.flood.difference(&observed.flood) {
        out.push(Change::FloodAdd { dst: *dst });
    }
    for (ip, mac) in &desired.neigh {
        if observed.neigh.get(ip) != Some(mac) {
            out.push(Change::NeighSet { ip: *ip, mac: *mac });
        }
    }
    for ip in observed.neigh.keys() {
        if !desired.neigh.contains_key(ip) {
            out.push(Change::NeighDel { ip: *ip });
        }
    }
    for dst in observed.flood.difference(&desired.flood) {
        out.push(Change::FloodDel { dst: *dst });
    }
    for (mac, dst) in &observed.fdb {
        if !desired.fdb.contains_key(mac) {
            out.push(Change::FdbDel { mac: *mac, dst: *dst });
        }
    }
    out
}

/// A local network the reconciler programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LocalNet {
    encrypted: bool,
}

/// A WireGuard peer the node needs: a node sharing at least one encrypted network with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WgPeer {
    /// Node id.
    pub node: String,
    /// Underlay address (the WireGuard endpoint's IP).
    pub vtep: Ipv4Addr,
    /// Address inside the tunnel.
    pub tunnel: Ipv4Addr,
    /// X25519 public key.
    pub public: [u8; 32],
}

/// Sans-I/O state: local networks, the latest tables, and which networks need reconciling.
#[derive(Debug, Clone)]
pub struct Reconciler {
    local_node: String,
    networks: BTreeMap<String, LocalNet>,
    tables: Tables,
    desired: HashMap<String, Entries>,
    dirty: BTreeSet<String>,
    /// No tables yet (agent just started): reconciling now would flush live entries.
    have_tables: bool,
}

impl Reconciler {
    /// A reconciler for the node called `local_node` (its own records in the tables are skipped).
    pub fn new(local_node: impl Into<String>) -> Self {
        Reconciler {
            local_node: local_node.into(),
            networks: BTreeMap::new(),
            tables: Tables::default(),
            desired: HashMap::new(),
            dirty: BTreeSet::new(),
            have_tables: false,
        }
    }

    /// A local sandbox for `network` exists (again); it will be reconciled.
    pub fn handle_network_up(&mut self, network: &str, encrypted: bool) {
        self.networks.insert(network.to_owned(), LocalNet { encrypted });
        self.recompute(network);
        self.dirty.insert(network.to_owned());
    }

    /// The local sandbox for `network` is gone; nothing more to program there.
    pub fn handle_network_down(&mut self, network: &str) {
        self.networks.remove(network);
        self.desired.remove(network);
        self.dirty.remove(network);
    }

    /// New gossip tables. Networks whose desired entries changed become dirty.
    pub fn handle_tables(&mut self, tables: Tables) {
        self.tables = tables;
        self.have_tables = true;
        let ids: Vec<String> = self.networks.keys().cloned().collect();
        for id in ids {
            let before = self.desired.get(&id).cloned();
            self.recompute(&id);
            if self.desired.get(&id) != before.as_ref() {
                self.dirty.insert(id);
            }
        }
    }

    /// Marks a network dirty so it is re-read and re-applied (after an error, or periodically).
    pub fn mark_dirty(&mut self, network: &str) {
        if self.networks.contains_key(network) {
            self.dirty.insert(network.to_owned());
        }
    }

    /// The next network that needs reconciling. Nothing is dirty until the first tables have
    /// arrived: after an agent restart the kernel's entries are the best knowledge there is,
    /// and an empty desired set would withdraw them from live flows.
    pub fn poll_dirty(&mut self) -> Option<String> {
        if !self.have_tables {
            return None;
        }
        self.dirty.pop_first()
    }

    /// What `network`'s VXLAN device should hold (empty for an unknown network).
    pub fn desired(&self, network: &str) -> Entries {
        self.desired.get(network).cloned().unwrap_or_default()
    }

    /// The WireGuard peers this node needs, sorted by node id.
    pub fn wg_peers(&self) -> Vec<WgPeer> {
        let encrypted: BTreeSet<&str> =
            self.networks.iter().filter(|(_, n)| n.encrypted).map(|(id, _)| id.as_str()).collect();
        let nodes: BTreeSet<&str> = self
            .tables
            .endpoints
            .iter()
            .filter(|e| e.node != self.local_node && encrypted.contains(e.network.as_str()))
            .map(|e| e.node.as_str())
            .collect();
        let mut out: Vec<WgPeer> = Vec::new();
        for p in &self.tables.peers {
            if !nodes.contains(p.node.as_str()) || out.iter().any(|q| q.node == p.node) {
                continue;
            }
            if let (Some(tunnel), Some(public)) = (p.tunnel, p.wg_public) {
                out.push(WgPeer { node: p.node.clone(), vtep: p.vtep, tunnel, public });
            }
        }
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }

    fn recompute(&mut self, network: &str) {
        let Some(net) = self.networks.get(network).copied() else {
            return;
        };
        // Node id → the address its VXLAN frames go to: the VTEP, or the tunnel address.
        let mut dst_of: HashMap<&str, Ipv4Addr> = HashMap::new();
        for p in &self.tables.peers {
            if p.node == self.local_node || dst_of.contains_key(p.node.as_str()) {
                continue;
            }
            let dst = if net.encrypted {
                match (p.tunnel, p.wg_public) {
                    (Some(t), Some(_)) => t,
                    _ => continue,
                }
            } else {
                p.vtep
            };
            dst_of.insert(p.node.as_str(), dst);
        }
        let mut e = Entries::default();
        for ep in &self.tables.endpoints {
            if ep.network != network || ep.node == self.local_node {
                continue;
            }
            let Some(dst) = dst_of.get(ep.node.as_str()).copied() else {
                continue;
            };
            // Several endpoints claiming one IP or one MAC: the first one in the table wins
            // (Swarm's "transient condition"), so a table in flux never flaps the kernel.
            if e.neigh.contains_key(&ep.ip) || e.fdb.contains_key(&ep.mac) {
                continue;
            }
            e.fdb.insert(ep.mac, dst);
            e.neigh.insert(ep.ip, ep.mac);
            e.flood.insert(dst);
        }
        self.desired.insert(network.to_owned(), e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PeerRecord, RemoteEndpoint};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn ep(net: &str, addr: &str, node: &str) -> RemoteEndpoint {
        RemoteEndpoint {
            network: net.into(),
            ip: ip(addr),
            mac: Mac::from_ipv4(ip(addr)),
            node: node.into(),
        }
    }

    fn peer(node: &str, vtep: &str, tunnel: &str) -> PeerRecord {
        PeerRecord {
            node: node.into(),
            vtep: ip(vtep),
            tunnel: Some(ip(tunnel)),
            wg_public: Some([node.len() as u8; 32]),
        }
    }

    fn tables() -> Tables {
        Tables {
            endpoints: vec![
                ep("a", "10.0.0.2", "n1"),
                ep("a", "10.0.0.3", "n2"),
                ep("a", "10.0.0.4", "n3"),
                ep("a", "10.0.0.5", "n3"),
                ep("b", "10.1.0.2", "n2"),
            ],
            peers: vec![
                peer("n1", "198.19.0.1", "100.64.0.1"),
                peer("n2", "198.19.0.2", "100.64.0.2"),
                peer("n3", "198.19.0.3", "100.64.0.3"),
            ],
        }
    }

    #[test]
    fn desired_skips_local_node_and_other_networks() {
        let mut r = Reconciler::new("n1");
        r.handle_network_up("a", false);
        r.handle_tables(tables());
        let d = r.desired("a");
        assert_eq!(d.fdb.len(), 3);
        assert_eq!(d.fdb.get(&Mac::from_ipv4(ip("10.0.0.4"))), Some(&ip("198.19.0.3")));
        assert!(!d.neigh.contains_key(&ip("10.0.0.2")), "local endpoint");
        assert!(!d.neigh.contains_key(&ip("10.1.0.2")), "other network");
        assert_eq!(d.flood, [ip("198.19.0.2"), ip("198.19.0.3")].into_iter().collect());
    }

    #[test]
    fn encrypted_network_points_at_tunnel_addresses() {
        let mut r = Reconciler::new("n1");
        r.handle_network_up("a", true);
        r.handle_tables(tables());
        let d = r.desired("a");
        assert!(d.flood.contains(&ip("100.64.0.2")));
        assert!(d.fdb.values().all(|v| v.octets()[0] == 100));
        let peers = r.wg_peers();
        assert_eq!(peers.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(), ["n2", "n3"]);
        // A peer without a key cannot carry an encrypted network.
        let mut t = tables();
        t.peers[2].wg_public = None;
        r.handle_tables(t);
        assert!(!r.desired("a").flood.contains(&ip("100.64.0.3")));
        assert_eq!(r.wg_peers().len(), 1);
    }

    #[test]
    fn plain_network_needs_no_wg_peers() {
        let mut r = Reconciler::new("n1");
        r.handle_network_up("a", false);
        r.handle_tables(tables());
        assert!(r.wg_peers().is_empty());
    }

    #[test]
    fn plan_of_equal_sets_is_empty() {
        let mut r = Reconciler::new("n1");
        r.handle_network_up("a", false);
        r.handle_tables(tables());
        let d = r.desired("a");
        assert!(plan(&d, &d).is_empty());
    }

    #[test]
    fn plan_from_empty_adds_fdb_before_neighbours() {
        let mut r = Reconciler::new("n1");
        r.handle_network_up("a", false);
        r.handle_tables(tables());
        let p = plan(&r.desired("a"), &Entries::default());
        assert_eq!(p.len(), 3 + 2 + 3);
        let first_neigh =
            p.iter().position(|c| matches!(c, Change::NeighSet { .. })).expect("has neighbours");
        assert!(
            p[..first_neigh]
                .iter()
                .all(|c| matches!(c, Change::FdbSet { .. } | Change::FloodAdd { .. }))
        );
    }

    #[test]
    fn removal_withdraws_exactly_that_endpoint() {
        let mut r = Reconciler::new("n1");
        r.handle_network_up("a", false);
        r.handle_tables(tables());
        assert_eq!(r.poll_dirty().as_deref(), Some("a"));
        assert_eq!(r.poll_dirty(), None);
        let before = r.desired("a");
        let mut t = tables();
        t.endpoints.retain(|e| e.ip != ip("10.0.0.5"));
        r.handle_tables(t);
        assert_eq!(r.poll_dirty().as_deref(), Some("a"));
        let p = plan(&r.desired("a"), &before);
        let mac = Mac::from_ipv4(ip("10.0.0.5"));
        assert_eq!(
            p,
            vec![
                Change::NeighDel { ip: ip("10.0.0.5") },
                Change::FdbDel { mac, dst: ip("198.19.0.3") },
            ]
        );
        // n3 still has 10.0.0.4, so its flood entry stays.
        assert!(r.desired("a").flood.contains(&ip("198.19.0.3")));
    }

    #[test]
    fn last_endpoint_of_a_node_removes_its_flood_entry() {
        let mut r = Reconciler::new("n1");
        r.handle_network_up("a", false);
        r.handle_tables(tables());
        let before = r.desired("a");
        let mut t = tables();
        t.endpoints.retain(|e| e.node != "n2");
        r.handle_tables(t);
        let p = plan(&r.desired("a"), &before);
        assert!(p.contains(&Change::FloodDel { dst: ip("198.19.0.2") }));
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn moved_endpoint_is_replaced_not_deleted() {
        let mut r = Reconciler::new("n1");
        r.handle_network_up("a", false);
        r.handle_tables(tables());
        let before = r.desired("a");
        let mut t = tables();
        t.endpoints[1].node = "n3".into();
        r.handle_tables(t);
        let p = plan(&r.desired("a"), &before);
        let mac = Mac::from_ipv4(ip("10.0.0.3"));
        assert!(p.contains(&Change::FdbSet { mac, dst: ip("198.19.0.3") }));
        assert!(!p.iter().any(|c| matches!(c, Change::FdbDel { .. })));
        assert!(p.contains(&Change::FloodDel { dst: ip("198.19.0.2") }));
    }

    #[test]
    fn duplicate_ip_keeps_first_claim() {
        let mut r = Reconciler::new("n1");
        r.handle_network_up("a", false);
        let mut t = tables();
        t.endpoints.push(RemoteEndpoint { node: "n2".into(), ..ep("a", "10.0.0.4", "n2") });
        r.handle_tables(t);
        assert_eq!(
            r.desired("a").fdb.get(&Mac::from_ipv4(ip("10.0.0.4"))),
            Some(&ip("198.19.0.3"))
        );
    }

    #[test]
    fn unchanged_tables_leave_nothing_dirty() {
        let mut r = Reconciler::new("n1");
        r.handle_network_up("a", false);
        r.handle_tables(tables());
        while r.poll_dirty().is_some() {}
        r.handle_tables(tables());
        assert_eq!(r.poll_dirty(), None);
        r.handle_network_down("a");
        r.handle_tables(Tables::default());
        assert_eq!(r.poll_dirty(), None);
        assert_eq!(r.desired("a"), Entries::default());
    }

    #[test]
    fn nothing_is_reconciled_before_the_first_tables() {
        let mut r = Reconciler::new("n1");
        r.handle_network_up("a", false);
        assert_eq!(r.poll_dirty(), None, "restart: keep the kernel's entries");
        r.handle_tables(tables());
        assert_eq!(r.poll_dirty().as_deref(), Some("a"));
    }

    #[test]
    fn unknown_node_is_skipped() {
        let mut r = Reconciler::new("n1");
        r.handle_network_up("a", false);
        let mut t = tables();
        t.endpoints.push(ep("a", "10.0.0.9", "ghost"));
        r.handle_tables(t);
        assert!(!r.desired("a").neigh.contains_key(&ip("10.0.0.9")));
    }

    proptest::proptest! {
        // Applying the plan to the observed set always yields the desired set.
        #[test]
        fn plan_converges(
            d_fdb in proptest::collection::btree_map(0u8..8, 0u8..4, 0..8),
            o_fdb in proptest::collection::btree_map(0u8..8, 0u8..4, 0..8),
            d_flood in proptest::collection::btree_set(0u8..4, 0..4),
            o_flood in proptest::collection::btree_set(0u8..4, 0..4),
            d_neigh in proptest::collection::btree_map(0u8..8, 0u8..8, 0..8),
            o_neigh in proptest::collection::btree_map(0u8..8, 0u8..8, 0..8),
        ) {
            let mk = |fdb: &BTreeMap<u8, u8>, flood: &BTreeSet<u8>, neigh: &BTreeMap<u8, u8>| Entries {
                fdb: fdb.iter().map(|(m, d)| (Mac([2, 0, 0, 0, 0, *m]), Ipv4Addr::new(198, 19, 0, *d))).collect(),
                flood: flood.iter().map(|d| Ipv4Addr::new(198, 19, 0, *d)).collect(),
                neigh: neigh.iter().map(|(i, m)| (Ipv4Addr::new(10, 0, 0, *i), Mac([2, 0, 0, 0, 0, *m]))).collect(),
            };
            let desired = mk(&d_fdb, &d_flood, &d_neigh);
            let mut state = mk(&o_fdb, &o_flood, &o_neigh);
            for c in plan(&desired, &state) {
                match c {
                    Change::FdbSet { mac, dst } => { state.fdb.insert(mac, dst); }
                    Change::FdbDel { mac, .. } => { state.fdb.remove(&mac); }
                    Change::FloodAdd { dst } => { state.flood.insert(dst); }
                    Change::FloodDel { dst } => { state.flood.remove(&dst); }
                    Change::NeighSet { ip, mac } => { state.neigh.insert(ip, mac); }
                    Change::NeighDel { ip } => { state.neigh.remove(&ip); }
                }
            }
            proptest::prop_assert_eq!(&state, &desired);
            proptest::prop_assert!(plan(&desired, &state).is_empty());
        }
    }
}
