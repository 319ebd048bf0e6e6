//! The addresses the store holds, per network: what `alloc` picks a free address from without
//! reading every task. The index is derived from the `tasks` and `ipam` tables and never
//! stored: [`ClusterState::apply`] keeps it as it changes them, and a state read from disk or a
//! snapshot, or a copy, starts without one and builds it at its first allocation.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

use super::{ClusterState, HeldAddress, TaskRecord};

/// The network an `ipam` key's address is on: `vip/<service>/<network>`, or, for `sbox/<node>`,
/// whichever network is the ingress network (as [`shoal_model::vip_key`] and
/// [`shoal_model::sandbox_key`] write them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Home<'a> {
    /// A VIP's network.
    Network(&'a str),
    /// A node's sandbox, on the ingress network.
    Ingress,
}

impl Home<'_> {
    /// Where `key` is counted; `None` for a key of neither shape, which holds nothing.
    pub(super) fn of(key: &str) -> Option<Home<'_>> {
        match key.split('/').collect::<Vec<_>>()[..] {
            ["vip", _, net] => Some(Home::Network(net)),
            ["sbox", _] => Some(Home::Ingress),
            _ => None,
        }
    }
}

/// How many records name one address of one network.
#[derive(Debug, Clone, Copy, Default)]
struct Count {
    /// Tasks the store remembers, whatever their state, and `ipam` entries.
    named: u32,
    /// Tasks that hold their addresses (see [`TaskRecord::holds_addresses`]) and `ipam` entries.
    held: u32,
}

/// Per network, the addresses the store's records name.
#[derive(Debug, Default)]
pub struct AddressIndex {
    /// Whether the index has been built from the tables; until then nothing is counted.
    built: bool,
    networks: BTreeMap<String, BTreeMap<Ipv4Addr, Count>>,
    /// Sandbox addresses, on whichever network is the ingress network.
    sandboxes: BTreeMap<Ipv4Addr, Count>,
}

/// A copy starts unbuilt: copies of the store are made to be read, and copying the index would
/// cost every read what it saves an allocation.
impl Clone for AddressIndex {
    fn clone(&self) -> AddressIndex {
        AddressIndex::default()
    }
}

/// Derived from the tables, so two states with equal tables are equal whatever their indexes.
impl PartialEq for AddressIndex {
    fn eq(&self, _: &AddressIndex) -> bool {
        true
    }
}

impl AddressIndex {
    /// The index of `tasks` and `ipam`.
    fn of<'a>(
        tasks: impl Iterator<Item = &'a TaskRecord>,
        ipam: &BTreeMap<String, HeldAddress>,
    ) -> AddressIndex {
        let mut index = AddressIndex { built: true, ..Default::default() };
        for t in tasks {
            index.task(t, 1);
        }
        for (key, h) in ipam {
            index.address(key, h.ip, 1);
        }
        index
    }

    fn bump(&mut self, home: Home<'_>, ip: Ipv4Addr, named: i32, held: i32) {
        let on = match home {
            Home::Network(net) => self.networks.entry(net.to_owned()).or_default(),
            Home::Ingress => &mut self.sandboxes,
        };
        let c = on.entry(ip).or_default();
        c.named = c.named.saturating_add_signed(named);
        c.held = c.held.saturating_add_signed(held);
        if c.named == 0 && c.held == 0 {
            on.remove(&ip);
        }
    }

    /// Counts (`sign` 1) or uncounts (-1) a task's addresses.
    fn task(&mut self, t: &TaskRecord, sign: i32) {
        if self.built {
            let held = sign * i32::from(t.holds_addresses());
            for (net, ip) in &t.addresses {
                self.bump(Home::Network(net), *ip, sign, held);
            }
        }
    }

    /// Counts (`sign` 1) or uncounts (-1) an `ipam` entry.
    fn address(&mut self, key: &str, ip: Ipv4Addr, sign: i32) {
        if let Some(home) = Home::of(key).filter(|_| self.built) {
            self.bump(home, ip, sign, sign);
        }
    }

    /// The lowest usable address of network `net` on `subnet` (not its first host, which is
    /// the gateway) that `taken` does not say is in use.
    fn lowest(
        &self,
        net: &str,
        subnet: Ipv4Net,
        ingress: bool,
        taken: impl Fn(&Count) -> bool,
    ) -> Option<Ipv4Addr> {
        // Counted past the ends of the address space, so no subnet overflows; the first host
        // is the gateway's, the last address the broadcast.
        let at = |a: Ipv4Addr| u64::from(u32::from(a));
        let (first, broadcast) = (at(subnet.network()) + 2, at(subnet.broadcast()));
        let empty = BTreeMap::new();
        // The network's addresses in order, walked beside the candidate: a dense subnet costs
        // one step per address below the first free one.
        let mut used = self
            .networks
            .get(net)
            .unwrap_or(&empty)
            .range(Ipv4Addr::from(u32::try_from(first).unwrap_or(u32::MAX))..)
            .filter(|(_, c)| taken(c))
            .map(|(ip, _)| at(*ip))
            .peekable();
        let sandbox = |ip: Ipv4Addr| ingress && self.sandboxes.get(&ip).is_some_and(&taken);
        for candidate in first..broadcast {
            while used.next_if(|a| *a < candidate).is_some() {}
            // Below the broadcast address of a subnet of the IPv4 space: a u32.
            let ip = Ipv4Addr::from(candidate as u32);
            if used.peek() != Some(&candidate) && !sandbox(ip) {
                return Some(ip);
            }
        }
        None
    }
}

impl ClusterState {
    /// The index, built from the tables if this state has none yet.
    fn index(&mut self) -> &AddressIndex {
        if !self.held.built {
            self.held = AddressIndex::of(self.tasks.values().map(Arc::as_ref), &self.ipam);
        }
        &self.held
    }

    /// A free address on network `net`, on `subnet`: the lowest no record names, else the
    /// lowest none holds (one a remembered task had, whose connections may have drained).
    pub(super) fn free_address(&mut self, net: &str, subnet: Ipv4Net) -> Option<Ipv4Addr> {
        let ingress = self.networks.values().find(|n| n.ingress).is_some_and(|n| n.id == net);
        let index = self.index();
        index
            .lowest(net, subnet, ingress, |c| c.named > 0)
            .or_else(|| index.lowest(net, subnet, ingress, |c| c.held > 0))
    }

    /// Puts `t` in the `tasks` table.
    pub(super) fn put_task(&mut self, t: TaskRecord) {
        self.held.task(&t, 1);
        if let Some(old) = self.tasks.insert(t.task.id.clone(), Arc::new(t)) {
            self.held.task(&old, -1);
        }
    }

    /// Takes task `id` out of the `tasks` table.
    pub(super) fn remove_task(&mut self, id: &str) -> Option<Arc<TaskRecord>> {
        let old = self.tasks.remove(id)?;
        self.held.task(&old, -1);
        Some(old)
    }

    /// Changes task `id` in place with `change`; `None` if there is no such task.
    pub(super) fn change_task(
        &mut self,
        id: &str,
        change: impl FnOnce(&mut TaskRecord),
    ) -> Option<()> {
        let t = self.tasks.get_mut(id)?;
        self.held.task(t, -1);
        change(Arc::make_mut(t));
        self.held.task(t, 1);
        Some(())
    }

    /// Holds `ip` under `key` in the `ipam` table.
    pub(super) fn hold_address(&mut self, key: &str, ip: Ipv4Addr) {
        self.held.address(key, ip, 1);
        if let Some(old) = self.ipam.insert(key.to_owned(), HeldAddress { ip }) {
            self.held.address(key, old.ip, -1);
        }
    }

    /// Releases the address `key` holds.
    pub(super) fn release_address(&mut self, key: &str) -> Option<HeldAddress> {
        let old = self.ipam.remove(key)?;
        self.held.address(key, old.ip, -1);
        Some(old)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use shoal_scheduler::{DesiredState, Ipam, TaskState};

    use super::super::tests::{init_state, task};
    use super::super::{Command, NetworkSpec, NodeId};
    use super::*;

    /// What the index counts, network by network, as (named, held) per address.
    fn counts(i: &AddressIndex) -> Vec<(String, Ipv4Addr, u32, u32)> {
        let on = |net: &str, m: &BTreeMap<Ipv4Addr, Count>| {
            m.iter().map(|(ip, c)| (net.to_owned(), *ip, c.named, c.held)).collect::<Vec<_>>()
        };
        let nets = i.networks.iter().flat_map(|(net, m)| on(net, m));
        nets.chain(on("sandboxes", &i.sandboxes)).collect()
    }

    #[test]
    fn the_index_apply_keeps_is_the_one_the_tables_give() {
        let mut s = init_state();
        let put = |s: &mut ClusterState, c: Command| s.apply(&c, 1).expect("applied");
        let new = |id: &str| {
            let mut t = task(id, NodeId(1), "svc");
            (t.networks, t.addresses) = (vec!["ing".into()], Default::default());
            Command::PutTask(Box::new(t))
        };
        for i in 0..8 {
            put(&mut s, new(&format!("t{i}")));
        }
        let sbox = shoal_model::sandbox_key("n1");
        put(&mut s, Command::AllocateAddress { key: sbox.clone(), network: "ing".into() });
        put(&mut s, Command::PutAddress { key: sbox, ip: Ipv4Addr::new(10, 0, 0, 200) });
        put(&mut s, Command::RemoveTask("t3".into()));
        let mut ended = TaskRecord::clone(&s.tasks["t5"]);
        (ended.task.state, ended.task.desired) = (TaskState::Failed, DesiredState::Shutdown);
        put(&mut s, Command::PutTask(Box::new(ended)));
        put(&mut s, new("t8"));
        let report = serde_json::from_value(serde_json::json!({ "state": "complete" }));
        let report = report.expect("report");
        put(&mut s, Command::ReportTask { owner: NodeId(1), key: "t1".into(), report });
        let rebuilt = AddressIndex::of(s.tasks.values().map(Arc::as_ref), &s.ipam);
        assert!(s.held.built);
        assert_eq!(counts(&s.held), counts(&rebuilt));
        // t3's address went first; t5's, which a remembered task names, is not given again.
        assert_eq!(s.tasks["t8"].addresses["ing"], Ipv4Addr::new(10, 0, 0, 5));
        // A copy builds its own, the same.
        let mut copy = s.clone();
        assert!(!copy.held.built);
        copy.index();
        assert_eq!(counts(&copy.held), counts(&s.held));
    }

    /// The address the store gave before it kept an index, from two allocators built from every
    /// task: the pick every replica of an older agent makes from the same log.
    fn reference(s: &ClusterState, net: &str) -> Option<Ipv4Addr> {
        let ipnet::IpNet::V4(subnet) = s.networks[net].subnet else { return None };
        let ingress = s.networks.values().find(|n| n.ingress).is_some_and(|n| n.id == net);
        let view = |history: bool| {
            let mut ipam = Ipam::new("10.0.0.0/8".parse().expect("pool"), 24).expect("ipam");
            ipam.add_network(net, Some(subnet)).expect("subnet");
            let tasks = s.tasks.values().filter(|t| history || t.holds_addresses());
            for ip in tasks.filter_map(|t| t.addresses.get(net)) {
                let _ = ipam.allocate_exact(net, *ip, "task");
            }
            for (key, h) in &s.ipam {
                match Home::of(key) {
                    Some(Home::Network(n)) if n == net => {}
                    Some(Home::Ingress) if ingress => {}
                    _ => continue,
                }
                let _ = ipam.allocate_exact(net, h.ip, key);
            }
            ipam
        };
        view(true).allocate(net, "new").or_else(|_| view(false).allocate(net, "new")).ok()
    }

    #[derive(Debug, Clone)]
    enum Step {
        Start(u8),
        End(u8),
        Remove(u8),
        Report(u8, bool),
        Vip(u8),
        Unvip(u8),
        Sandbox(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        let i = 0u8..40;
        prop_oneof![
            4 => i.clone().prop_map(Step::Start),
            2 => i.clone().prop_map(Step::End),
            2 => i.clone().prop_map(Step::Remove),
            1 => (i.clone(), any::<bool>()).prop_map(|(i, up)| Step::Report(i, up)),
            1 => i.clone().prop_map(Step::Vip),
            1 => i.clone().prop_map(Step::Unvip),
            1 => i.prop_map(Step::Sandbox),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Over any history of a small network (a /27, full at times) and the ingress network,
        /// the index picks what the full scan picked, and stays what the tables give.
        #[test]
        fn the_index_picks_what_a_scan_of_every_task_picked(steps in prop::collection::vec(step(), 1..120)) {
            let mut s = init_state();
            let a = NetworkSpec { id: "a".into(), name: "a".into(), subnet: Some("10.0.1.0/27".parse().expect("net")), ingress: false, attachable: true, encrypted: false, labels: Default::default() };
            s.apply(&Command::CreateNetwork(a), 1).expect("a");
            for st in steps {
                let id = |i: u8| format!("t{i}");
                let cmd = match st {
                    Step::Start(i) => {
                        let mut t = task(&id(i), NodeId(1), "svc");
                        (t.networks, t.addresses) = (vec!["a".into(), "ing".into()], Default::default());
                        let want = (reference(&s, "a"), reference(&s, "ing"));
                        let got = s.apply(&Command::PutTask(Box::new(t)), 2).ok().map(|_| {
                            let t = &s.tasks[&id(i)];
                            (t.addresses.get("a").copied(), t.addresses.get("ing").copied())
                        });
                        match want {
                            (Some(a), Some(ing)) => prop_assert_eq!(got, Some((Some(a), Some(ing)))),
                            _ => prop_assert_eq!(got, None),
                        }
                        continue;
                    }
                    Step::End(i) => match s.tasks.get(&id(i)) {
                        Some(t) => {
                            let mut t = TaskRecord::clone(t);
                            (t.task.state, t.task.desired) = (TaskState::Failed, DesiredState::Shutdown);
                            Command::PutTask(Box::new(t))
                        }
                        None => continue,
                    },
                    Step::Remove(i) => Command::RemoveTask(id(i)),
                    Step::Report(i, up) => {
                        let state = if up { "running" } else { "failed" };
                        let report = serde_json::from_value(serde_json::json!({ "state": state })).expect("report");
                        Command::ReportTask { owner: NodeId(1), key: id(i), report }
                    }
                    Step::Vip(i) => Command::AllocateAddress { key: shoal_model::vip_key(&format!("s{i}"), "a"), network: "a".into() },
                    Step::Unvip(i) => Command::RemoveAddress(shoal_model::vip_key(&format!("s{i}"), "a")),
                    Step::Sandbox(i) => Command::AllocateAddress { key: shoal_model::sandbox_key(&format!("n{i}")), network: "ing".into() },
                };
                let _ = s.apply(&cmd, 3);
            }
            let rebuilt = AddressIndex::of(s.tasks.values().map(Arc::as_ref), &s.ipam);
            prop_assert_eq!(counts(&s.held), counts(&rebuilt));
        }
    }
}
