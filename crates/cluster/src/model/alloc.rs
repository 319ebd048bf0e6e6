//! Addresses are picked inside the state machine: a network's subnet and VNI, a task's address
//! on each of its networks, a service's VIP and a node's ingress sandbox address are chosen by
//! [`ClusterState::apply`] from the state it applies to. Every replica picks the same from the
//! same log, and two commands of one batch (or of two leaders' overlapping passes) never get
//! the same one: the second sees what the first took.
//!
//! An address is held while the store holds it: by a task that has not ended or is still
//! desired running, or by an entry of the `ipam` table. Among the free ones, those that no
//! remembered task (the history `service ps` shows) had are handed out first, so a task's address
//! is not given to its successor while the old one's connections may still be draining, unless
//! the subnet has nothing else. The lowest such address is found in the index of held addresses
//! apply keeps (`held`), not by reading every task.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::IpNet;
use shoal_scheduler::{DesiredState, Ipam, IpamError};

use super::held::Home;
use super::{ClusterState, NetworkRecord, NetworkSpec, Refusal, TaskRecord};

/// The VNI of the first network (the ingress network `swarm init` makes).
pub const FIRST_VNI: u32 = 4096;

/// The largest VNI a VXLAN header carries (24 bits).
const LAST_VNI: u32 = (1 << 24) - 1;

impl From<IpamError> for Refusal {
    fn from(e: IpamError) -> Refusal {
        match e {
            IpamError::SubnetExhausted { .. } | IpamError::PoolExhausted(_) => {
                Refusal::Exhausted(e.to_string())
            }
            _ => Refusal::Invalid(e.to_string()),
        }
    }
}

/// The network an `ipam` key's address is on (see [`Home`]).
fn held_network<'a>(state: &'a ClusterState, key: &'a str) -> Option<&'a str> {
    match Home::of(key)? {
        Home::Network(net) => Some(net),
        Home::Ingress => state.networks.values().find(|n| n.ingress).map(|n| n.id.as_str()),
    }
}

/// An allocator over the cluster's pool holding `state`'s networks: what a new network's subnet
/// is cut from.
fn subnets(state: &ClusterState) -> Result<Ipam, IpamError> {
    let (pool, mask) = state
        .cluster
        .as_ref()
        .and_then(|c| match c.default_addr_pool.first() {
            Some(IpNet::V4(p)) => Some((*p, c.subnet_size)),
            _ => None,
        })
        .unwrap_or((ipnet::Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8).expect("a /8"), 24));
    let mut ipam = Ipam::new(pool, mask)?;
    for n in state.networks.values() {
        if let IpNet::V4(s) = n.subnet {
            ipam.add_network(&n.id, Some(s))?;
        }
    }
    Ok(ipam)
}

/// The VNI a new network gets: past the highest in use, so the VNI of a network just removed,
/// whose devices nodes may still be taking down, is not handed out again at once; from the
/// bottom again once the top is reached.
fn next_vni(state: &ClusterState) -> Result<u32, Refusal> {
    let used: BTreeSet<u32> = state.networks.values().map(|n| n.vni).collect();
    match used.last().map_or(FIRST_VNI, |v| v + 1) {
        v if (FIRST_VNI..=LAST_VNI).contains(&v) => Ok(v),
        _ => (FIRST_VNI..=LAST_VNI)
            .find(|v| !used.contains(v))
            .ok_or_else(|| Refusal::Exhausted("no free VNI left".into())),
    }
}

impl ClusterState {
    /// Creates the network `spec` asks for, with a subnet from the pool unless it names one
    /// (which must overlap no other network's) and the next VNI.
    pub(super) fn create_network(&mut self, spec: &NetworkSpec) -> Result<(), Refusal> {
        if let Some(n) = self.networks.get(&spec.id) {
            if n.name == spec.name {
                return Ok(());
            }
            return Err(Refusal::Invalid(format!(
                "network id {} is already network {}'s",
                spec.id, n.name
            )));
        }
        self.check_network_name(&spec.id, &spec.name, spec.ingress)?;
        let subnet = match spec.subnet {
            // There is no pool of IPv6 subnets: one asked for is taken as it is, if it
            // overlaps no other network's (checked below).
            Some(IpNet::V6(s)) => IpNet::V6(s),
            Some(IpNet::V4(s)) => IpNet::V4(subnets(self)?.add_network(&spec.id, Some(s))?),
            None => IpNet::V4(subnets(self)?.add_network(&spec.id, None)?),
        };
        let n = NetworkRecord {
            id: spec.id.clone(),
            name: spec.name.clone(),
            driver: shoal_model::network::OVERLAY.into(),
            subnet,
            // The subnet's first host, which the IPAM never hands out.
            gateway: subnet.hosts().next().unwrap_or(subnet.network()),
            vni: next_vni(self)?,
            ingress: spec.ingress,
            attachable: spec.attachable,
            encrypted: spec.encrypted,
            labels: spec.labels.clone(),
        };
        self.check_network_unique(&n)?;
        self.networks.insert(n.id.clone(), Arc::new(n));
        Ok(())
    }

    /// Gives a task that is to run an address on each of its networks it has none on. The
    /// addresses it has are kept: they are the ones this store gave it before.
    pub(super) fn address_task(&mut self, t: &mut TaskRecord) -> Result<(), Refusal> {
        if t.addressed() || t.task.desired != DesiredState::Running {
            return Ok(());
        }
        let missing: BTreeSet<String> =
            t.networks.iter().filter(|n| !t.addresses.contains_key(*n)).cloned().collect();
        let mut given = Vec::new();
        for net in missing {
            let ip = self.free_on(&net)?;
            given.push((net, ip));
        }
        t.addresses.extend(given);
        Ok(())
    }

    /// An address for the `ipam` key, on `network`; a key that holds one in the network's
    /// subnet keeps it, so asking twice gives one address.
    pub(super) fn allocate_address(&mut self, key: &str, network: &str) -> Result<(), Refusal> {
        if held_network(self, key) != Some(network) {
            return Err(Refusal::Invalid(format!(
                "address {key} does not belong on network {network}"
            )));
        }
        let subnet = self
            .networks
            .get(network)
            .map(|n| n.subnet)
            .ok_or_else(|| Refusal::Invalid(format!("network {network} not found")))?;
        if self.ipam.get(key).is_some_and(|h| subnet.contains(&IpAddr::V4(h.ip))) {
            return Ok(());
        }
        let ip = self.free_on(network)?;
        self.hold_address(key, ip);
        Ok(())
    }

    /// A free address on network `net` (see [`ClusterState::free_address`]).
    fn free_on(&mut self, net: &str) -> Result<Ipv4Addr, Refusal> {
        let Some(IpNet::V4(subnet)) = self.networks.get(net).map(|n| n.subnet) else {
            return Err(IpamError::NoNetwork(net.to_owned()).into());
        };
        self.free_address(net, subnet).ok_or_else(|| {
            IpamError::SubnetExhausted { network: net.to_owned(), subnet: subnet.trunc() }.into()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::tests::{init_state, task};
    use super::super::{Command, NodeId};
    use super::*;

    /// An attachable network `a` on 10.0.1.0/`prefix` beside the ingress network `ing`.
    fn with_network(prefix: u8) -> ClusterState {
        let mut s = init_state();
        let a = NetworkRecord {
            id: "a".into(),
            name: "a".into(),
            driver: "overlay".into(),
            subnet: format!("10.0.1.0/{prefix}").parse().expect("net"),
            gateway: "10.0.1.1".parse().expect("ip"),
            vni: 4097,
            ingress: false,
            attachable: true,
            encrypted: false,
            labels: BTreeMap::new(),
        };
        s.apply(&Command::PutNetwork(a), 1).expect("network a");
        s
    }

    /// A task of service `svc` to run on `networks`, with no address yet (as a pass writes it).
    fn new_task(id: &str, networks: &[&str]) -> Command {
        let mut t = task(id, NodeId(1), "svc");
        t.networks = networks.iter().map(|n| n.to_string()).collect();
        t.addresses.clear();
        Command::PutTask(Box::new(t))
    }

    /// Every held address: (network, address) → holder, failing on one held twice.
    fn holders(s: &ClusterState) -> BTreeMap<(String, Ipv4Addr), String> {
        let mut out = BTreeMap::new();
        let mut hold = |net: &str, ip: Ipv4Addr, who: &str| {
            let subnet = s.networks[net].subnet;
            assert!(subnet.contains(&IpAddr::V4(ip)), "{who}: {ip} outside {subnet}");
            assert_ne!(IpAddr::V4(ip), s.networks[net].gateway, "{who} got the gateway");
            let old = out.insert((net.to_owned(), ip), who.to_owned());
            assert!(old.is_none(), "{ip} on {net} given to {old:?} and {who}");
        };
        for t in s.tasks.values().filter(|t| t.holds_addresses()) {
            for (net, ip) in &t.addresses {
                hold(net, *ip, &t.task.id);
            }
        }
        for (key, h) in &s.ipam {
            hold(held_network(s, key).expect("a known key"), h.ip, key);
        }
        out
    }

    /// One leader pass's worth of writes, applied as one Raft batch: 60 tasks on two networks,
    /// 20 VIPs, 5 sandboxes.
    fn batch() -> Vec<Command> {
        let mut log = Vec::new();
        for i in 0..60 {
            log.push(new_task(&format!("t{i:02}"), &["ing", "a"]));
            if i % 3 == 0 {
                let key = shoal_model::vip_key(&format!("s{i}"), "a");
                log.push(Command::AllocateAddress { key, network: "a".into() });
            }
            if i % 12 == 0 {
                let key = shoal_model::sandbox_key(&format!("n{i}"));
                log.push(Command::AllocateAddress { key, network: "ing".into() });
            }
        }
        log
    }

    /// A create of network `name` (its id too), with `subnet` asked for when given.
    fn create(name: &str, subnet: Option<&str>) -> Command {
        Command::CreateNetwork(NetworkSpec {
            id: name.into(),
            name: name.into(),
            subnet: subnet.map(|s| s.parse().expect("net")),
            ingress: false,
            attachable: true,
            encrypted: false,
            labels: BTreeMap::new(),
        })
    }

    /// Each network's (subnet, gateway, VNI), by id.
    fn picks(s: &ClusterState) -> BTreeMap<String, (String, String, u32)> {
        let pick = |n: &NetworkRecord| (n.subnet.to_string(), n.gateway.to_string(), n.vni);
        s.networks.iter().map(|(id, n)| (id.clone(), pick(n))).collect()
    }

    #[test]
    fn creates_of_one_batch_get_their_own_subnets_and_vnis() {
        let mut s = init_state();
        let log = [create("a", None), create("b", None), create("c", Some("10.0.9.0/24"))];
        for c in log.iter().chain([&create("d", None)]) {
            s.apply(c, 1).expect("created");
        }
        let want = |net: &str, gw: &str, vni| (net.to_owned(), gw.to_owned(), vni);
        assert_eq!(
            picks(&s).into_values().collect::<Vec<_>>(),
            [
                want("10.0.1.0/24", "10.0.1.1", 4097),
                want("10.0.2.0/24", "10.0.2.1", 4098),
                want("10.0.9.0/24", "10.0.9.1", 4099),
                want("10.0.3.0/24", "10.0.3.1", 4100),
                want("10.0.0.0/24", "10.0.0.1", FIRST_VNI),
            ]
        );
        // The same create applied again leaves the network it made.
        let before = s.clone();
        s.apply(&log[0], 2).expect("again");
        assert_eq!(s, before);
        // A taken name is a conflict; an asked-for subnet that overlaps, or is too small, is
        // refused; neither changes anything.
        let mut named_a = create("a", None);
        if let Command::CreateNetwork(spec) = &mut named_a {
            spec.id = "a2".into();
        }
        assert!(matches!(s.apply(&named_a, 3), Err(Refusal::Conflict(_))));
        for (asked, why) in [("10.0.0.0/16", "overlaps"), ("10.0.2.128/25", "overlaps")] {
            let e = s.apply(&create("e", Some(asked)), 3).unwrap_err();
            assert!(matches!(&e, Refusal::Invalid(m) if m.contains(why)), "{asked}: {e}");
        }
        assert!(s.apply(&create("e", Some("10.1.0.0/30")), 3).is_err());
        assert_eq!(s, before);
    }

    #[test]
    fn replicas_fed_one_log_pick_the_same_networks() {
        let mut log: Vec<Command> = (0..6).map(|i| create(&format!("n{i}"), None)).collect();
        // A removed network's subnet is cut again; its VNI is not handed out at once.
        log.push(Command::RemoveNetwork("n2".into()));
        log.extend([create("n6", None), create("n7", Some("10.0.200.0/24")), create("n8", None)]);
        let (mut one, mut two) = (init_state(), init_state());
        for (i, c) in log.iter().enumerate() {
            one.apply(c, 10 + i as u64).expect("one");
            two.apply(c, 77_000 + i as u64).expect("two");
        }
        assert_eq!(picks(&one), picks(&two));
        assert_eq!(picks(&one)["n6"], ("10.0.3.0/24".into(), "10.0.3.1".into(), 4103));
    }

    #[test]
    fn an_exhausted_pool_or_vni_range_is_a_clean_refusal() {
        let mut s = init_state();
        // A /22 holds four /24s; the ingress network has the first.
        s.cluster.as_mut().expect("info").default_addr_pool =
            vec!["10.0.0.0/22".parse().expect("pool")];
        for n in ["a", "b", "c"] {
            s.apply(&create(n, None), 1).expect("fits");
        }
        let before = s.clone();
        let e = s.apply(&create("d", None), 2).unwrap_err();
        assert!(matches!(&e, Refusal::Exhausted(m) if m.contains("no free subnet")), "{e}");
        assert_eq!(s, before);
        // Past the highest VNI a VXLAN header carries, the lowest free one is given.
        s.apply(&Command::RemoveNetwork("c".into()), 3).expect("rm");
        let mut top = NetworkRecord::clone(&s.networks["b"]);
        (top.id, top.name, top.vni) = ("top".into(), "top".into(), LAST_VNI);
        top.subnet = "10.9.0.0/24".parse().expect("net");
        s.apply(&Command::PutNetwork(top), 4).expect("top");
        s.apply(&create("d", None), 5).expect("d");
        assert_eq!(s.networks["d"].vni, 4099);
    }

    #[test]
    fn an_init_an_older_agent_wrote_still_applies() {
        // Its ingress network is a whole record; what the store picks agrees with it.
        let s = init_state();
        let mut old = serde_json::to_value(Command::Init {
            info: s.cluster.clone().expect("info"),
            node: (*s.nodes[&NodeId(1)]).clone(),
            keyring: s.keyring.clone(),
            ingress: s.networks["ing"].spec(),
        })
        .expect("json");
        old["Init"]["ingress"] = serde_json::to_value(&*s.networks["ing"]).expect("record");
        assert_eq!(old["Init"]["ingress"]["vni"], FIRST_VNI);
        let old: Command = serde_json::from_value(old).expect("an old Init parses");
        let mut replayed = ClusterState::default();
        replayed.apply(&old, 0).expect("applies");
        assert_eq!(replayed, s);
    }

    #[test]
    fn one_batch_of_allocations_never_collides() {
        let mut s = with_network(24);
        for c in batch() {
            s.apply(&c, 2).expect("allocated");
        }
        assert!(s.tasks.values().all(|t| t.addressed()));
        assert_eq!(holders(&s).len(), 60 * 2 + 20 + 5);
        // Asking again for a held key keeps its address.
        let vip = s.ipam["vip/s0/a"];
        s.apply(&Command::AllocateAddress { key: "vip/s0/a".into(), network: "a".into() }, 3)
            .expect("again");
        assert_eq!(s.ipam["vip/s0/a"], vip);
        // A key that names another network is refused.
        let wrong = Command::AllocateAddress { key: "vip/s1/a".into(), network: "ing".into() };
        assert!(matches!(s.apply(&wrong, 3), Err(Refusal::Invalid(_))));
    }

    #[test]
    fn replicas_fed_one_log_pick_the_same_addresses() {
        let (mut one, mut two) = (with_network(24), with_network(24));
        let mut log = batch();
        // Tasks end and others start: what is freed is handed out again the same way.
        log.push(Command::RemoveTask("t07".into()));
        log.push(Command::RemoveAddress("vip/s3/a".into()));
        log.extend((60..70).map(|i| new_task(&format!("t{i}"), &["a"])));
        for (i, c) in log.iter().enumerate() {
            // The replicas apply at different wall-clock times.
            one.apply(c, 10 + i as u64).expect("one");
            two.apply(c, 99_000 + i as u64).expect("two");
        }
        assert_eq!((&one.tasks, &one.ipam), (&two.tasks, &two.ipam));
        holders(&one);
    }

    #[test]
    fn a_full_subnet_is_a_clean_refusal() {
        // A /29: .1 is the gateway, .2 to .6 are the five usable addresses.
        let mut s = with_network(29);
        for i in 0..5 {
            s.apply(&new_task(&format!("t{i}"), &["a"]), 2).expect("fits");
        }
        let before = s.clone();
        let e = s.apply(&new_task("t5", &["ing", "a"]), 3).unwrap_err();
        assert!(matches!(&e, Refusal::Exhausted(m) if m.contains("no free address")), "{e}");
        let vip = Command::AllocateAddress { key: "vip/s/a".into(), network: "a".into() };
        assert!(matches!(s.apply(&vip, 3), Err(Refusal::Exhausted(_))));
        assert_eq!(s, before, "a refused allocation changed the store");
        // A task that ended frees its address.
        s.apply(&Command::RemoveTask("t2".into()), 4).expect("rm");
        s.apply(&new_task("t5", &["a"]), 5).expect("fits again");
        assert_eq!(s.tasks["t5"].addresses["a"], Ipv4Addr::new(10, 0, 1, 4));
    }

    #[test]
    fn addresses_no_remembered_task_had_go_first() {
        use shoal_scheduler::TaskState;
        let mut s = with_network(24);
        for i in 0..3 {
            s.apply(&new_task(&format!("t{i}"), &["a"]), 2).expect("task");
        }
        // t1 (10.0.1.3) ended and is remembered: its address is handed out last.
        let mut ended = TaskRecord::clone(&s.tasks["t1"]);
        (ended.task.state, ended.task.desired) = (TaskState::Failed, DesiredState::Shutdown);
        s.apply(&Command::PutTask(Box::new(ended)), 3).expect("ended");
        s.apply(&new_task("t3", &["a"]), 4).expect("t3");
        assert_eq!(s.tasks["t3"].addresses["a"], Ipv4Addr::new(10, 0, 1, 5));
        for i in 4..253 {
            s.apply(&new_task(&format!("t{i}"), &["a"]), 5).expect("fill");
        }
        s.apply(&new_task("last", &["a"]), 6).expect("the remembered one");
        assert_eq!(s.tasks["last"].addresses["a"], Ipv4Addr::new(10, 0, 1, 3));
        assert!(s.apply(&new_task("full", &["a"]), 7).is_err());
    }

    #[test]
    fn names_of_containers_and_services_are_decided_by_the_store() {
        let mut s = with_network(24);
        let run = |owner: u64, key: &str, name: &str| {
            let mut t = task(key, NodeId(owner), "");
            t.networks = vec!["a".into()];
            t.addresses.clear();
            t.standalone = Some(shoal_model::Standalone {
                name: name.into(),
                argv: vec!["sleep".into()],
                env: vec![],
                auto_remove: false,
                mounts: vec![],
                cni: None,
            });
            t
        };
        let put = |owner: u64, t: TaskRecord| Command::PutStandalone {
            owner: NodeId(owner),
            key: t.task.id.clone(),
            value: Some(Box::new(t)),
        };
        // Two nodes that each found the name free: the first lands, the second is a conflict.
        s.apply(&put(1, run(1, "c1", "x")), 2).expect("first x");
        let before = s.clone();
        let e = s.apply(&put(2, run(2, "c2", "x")), 2).unwrap_err();
        assert_eq!(
            e,
            Refusal::Conflict("Conflict. The container name \"/x\" is already in use".into())
        );
        assert_eq!(s, before);
        // Rewriting one's own record (a stop) keeps its name and its address.
        let mut stop = TaskRecord::clone(&s.tasks["c1"]);
        stop.task.desired = DesiredState::Shutdown;
        s.apply(&put(1, stop), 3).expect("stop");
        assert_eq!(s.tasks["c1"].addresses, before.tasks["c1"].addresses);
        // A container may not take a service's name.
        let mut svc = crate::simulated::service(1, 4);
        svc.name = "web".into();
        s.apply(&Command::PutService(Box::new(svc)), 4).expect("web");
        assert!(matches!(s.apply(&put(2, run(2, "c3", "web")), 5), Err(Refusal::Conflict(_))));
        // A second ingress network is a conflict too.
        let mut ing = NetworkRecord::clone(&s.networks["ing"]);
        (ing.id, ing.name, ing.vni, ing.subnet) =
            ("ing2".into(), "ing2".into(), 5000, "10.0.9.0/24".parse().expect("net"));
        assert!(matches!(s.apply(&Command::PutNetwork(ing), 6), Err(Refusal::Conflict(_))));
    }
}
