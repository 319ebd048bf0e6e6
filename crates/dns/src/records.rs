//! The resolver core: plain input types describing what the cluster runs, an immutable
//! [`Zone`] built from them, and [`Zone::lookup`], the pure answer logic. No sockets, no
//! clock; the shuffle takes the caller's RNG.

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::rr::{Name, RecordType};
use ipnet::IpNet;
use rand::Rng;
use rand::seq::SliceRandom;

/// Default TTL of every answer we own, in seconds: short, so moved tasks are never cached long.
pub const DEFAULT_TTL: u32 = 5;

/// Longest name we accept, in presentation form without the trailing dot.
const MAX_NAME: usize = 253;

/// How a service is reached by its own name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndpointMode {
    /// `<service>` answers the service's virtual IP on that network.
    #[default]
    Vip,
    /// `<service>` answers the healthy task IPs (DNS round robin).
    Dnsrr,
}

/// An overlay network: the scope within which names resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// Stable network id; scopes and attachments refer to it.
    pub id: String,
    /// Network name, also the suffix of `<name>.<network>`.
    pub name: String,
    /// The network's subnets: reverse lookups inside them that match nothing get an authoritative
    /// NXDOMAIN instead of being forwarded upstream.
    pub subnets: Vec<IpNet>,
}

/// A service's presence on one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceNetwork {
    /// Network id.
    pub network: String,
    /// The service's virtual IP on this network (vip mode).
    pub vip: Option<IpAddr>,
    /// Extra names of the service on this network; each also gets `tasks.<alias>`.
    pub aliases: Vec<String>,
}

/// One address of a task or standalone container on one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Network id.
    pub network: String,
    /// The task's address on that network.
    pub addr: IpAddr,
    /// Network aliases of this task on that network (resolve to its address).
    pub aliases: Vec<String>,
}

/// A task of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    /// Replica slot, or the node id for a global service (the middle label of the task name).
    pub slot: String,
    /// Task id (the last label of the task name).
    pub id: String,
    /// Whether the task is running and healthy; only healthy tasks appear behind service names.
    pub healthy: bool,
    /// The task's addresses.
    pub attachments: Vec<Attachment>,
}

/// A service with its tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Service name.
    pub name: String,
    /// Endpoint mode.
    pub mode: EndpointMode,
    /// Networks the service is on.
    pub networks: Vec<ServiceNetwork>,
    /// The service's tasks.
    pub tasks: Vec<TaskSpec>,
}

/// A standalone task (`shoal run --name`) on attachable networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandaloneSpec {
    /// Container name.
    pub name: String,
    /// Task id.
    pub id: String,
    /// Its addresses.
    pub attachments: Vec<Attachment>,
}

/// Everything the records are built from: what the agent derives from the gossip endpoint tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterRecords {
    /// Networks.
    pub networks: Vec<NetworkSpec>,
    /// Services and their tasks.
    pub services: Vec<ServiceSpec>,
    /// Standalone tasks.
    pub standalone: Vec<StandaloneSpec>,
}

/// Cluster-wide answer policy, carried inside each snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordsConfig {
    /// TTL of our answers, seconds.
    pub ttl: u32,
    /// Forward single-label names we do not know upstream. Off by default: a bare name that is
    /// not a service is answered NXDOMAIN at once and never leaks to the host's resolvers.
    pub forward_single_label: bool,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        RecordsConfig { ttl: DEFAULT_TTL, forward_single_label: false }
    }
}

/// An input entry left out of a snapshot, and why. The rest of the snapshot is still built, so
/// one bad gossip record never freezes every other name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildProblem {
    /// A name that is not a valid DNS name (labels 1-63 of `[a-z0-9_-]`, 253 bytes in all).
    #[error("{what}: invalid DNS name {name:?}")]
    InvalidName {
        /// The entry that carried it.
        what: String,
        /// The offending name.
        name: String,
    },
    /// An attachment or service network that names a network we do not have.
    #[error("{what}: unknown network id {network:?}")]
    UnknownNetwork {
        /// The entry that named it.
        what: String,
        /// The unknown network id.
        network: String,
    },
    /// Two networks with the same id or name; the later one is ignored.
    #[error("duplicate network {0:?}")]
    DuplicateNetwork(String),
}

/// The set of networks a querying task is attached to, in search order: an unsuffixed name is
/// answered from the first of these networks that has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    networks: Vec<Arc<str>>,
}

impl Scope {
    /// A scope over the given network ids, searched in this order.
    pub fn new<I, S>(networks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Scope { networks: networks.into_iter().map(|s| Arc::from(s.as_ref())).collect() }
    }

    /// The network ids, in search order.
    pub fn networks(&self) -> impl Iterator<Item = &str> {
        self.networks.iter().map(|s| &**s)
    }
}

/// What a name resolves to, per network. Rank decides between two sources of one name:
/// a service beats a task name, which beats a standalone name, which beats an alias; aliases
/// shared by several tasks are merged (Docker's alias round robin).
#[derive(Debug, Clone)]
struct NameEntry {
    rank: u8,
    addrs: Vec<IpAddr>,
}

const RANK_SERVICE: u8 = 0;
const RANK_TASK: u8 = 1;
const RANK_STANDALONE: u8 = 2;
const RANK_ALIAS: u8 = 3;

/// FxHash (rustc's hasher): the keys are the cluster's own names, only lookups see hostile
/// input, so SipHash's flood resistance buys nothing here and costs a fifth of a lookup.
#[derive(Debug, Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

#[derive(Debug, Default)]
struct NetTable {
    name: String,
    subnets: Vec<IpNet>,
    names: FxMap<Box<str>, NameEntry>,
    ptr: FxMap<IpAddr, Name>,
}

impl NetTable {
    fn insert(&mut self, key: &str, rank: u8, addrs: &[IpAddr]) {
        for key in [key.to_owned(), format!("{key}.{}", self.name)] {
            match self.names.entry(key.into_boxed_str()) {
                MapEntry::Vacant(v) => {
                    v.insert(NameEntry { rank, addrs: addrs.to_vec() });
                }
                MapEntry::Occupied(mut o) => {
                    let e = o.get_mut();
                    if rank < e.rank {
                        *e = NameEntry { rank, addrs: addrs.to_vec() };
                    } else if rank == e.rank {
                        for a in addrs {
                            if !e.addrs.contains(a) {
                                e.addrs.push(*a);
                            }
                        }
                    }
                }
            }
        }
    }

    fn insert_ptr(&mut self, addr: IpAddr, label: &str) {
        if let MapEntry::Vacant(v) = self.ptr.entry(addr)
            && let Ok(name) = Name::from_ascii(format!("{label}.{}.", self.name))
        {
            v.insert(name);
        }
    }
}

/// An immutable, indexed view of every name the cluster serves; rebuilt off the hot path and
/// swapped in whole.
#[derive(Debug, Default)]
pub struct Zone {
    config: RecordsConfig,
    nets: FxMap<Box<str>, NetTable>,
    problems: Vec<BuildProblem>,
}

/// The outcome of a lookup in a [`Zone`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Addresses for the name, of the asked family (both for ANY), shuffled.
    Addrs(Vec<IpAddr>),
    /// The reverse name of one of our addresses.
    Ptr(Name),
    /// The name is ours but has no record of that type (or no healthy task): empty NOERROR.
    NoData,
    /// The name is in our space (a known network suffix, a bare name, or a reverse name inside a
    /// network's subnet) and does not exist.
    NxDomain,
    /// Not ours: forward it upstream.
    NotOurs,
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Lowercases and checks a name made of one or more labels.
fn normalize_input(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME || !name.split('.').all(valid_label) {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// Lowercases `name` into `buf` without its trailing dot; `None` when it cannot be one of ours.
fn normalize_query<'b>(name: &str, buf: &'b mut [u8; MAX_NAME]) -> Option<&'b str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME {
        return None;
    }
    let out = &mut buf[..name.len()];
    out.copy_from_slice(name.as_bytes());
    out.make_ascii_lowercase();
    std::str::from_utf8(out).ok()
}

/// Parses a reverse-lookup name (`4.3.2.1.in-addr.arpa`, nibbles `.ip6.arpa`) into an address.
pub fn parse_reverse(name: &str) -> Option<IpAddr> {
    let lower = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if let Some(rest) = lower.strip_suffix(".in-addr.arpa") {
        let parts: Vec<&str> = rest.split('.').collect();
        if parts.len() != 4 {
            return None;
        }
        let mut octets = [0u8; 4];
        for (i, p) in parts.iter().rev().enumerate() {
            if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            if p.len() > 1 && p.starts_with('0') {
                return None;
            }
            octets[i] = p.parse().ok()?;
        }
        return Some(IpAddr::from(octets));
    }
    if let Some(rest) = lower.strip_suffix(".ip6.arpa") {
        let nibbles: Vec<&str> = rest.split('.').collect();
        if nibbles.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (i, n) in nibbles.iter().rev().enumerate() {
            let [c] = n.as_bytes() else { return None };
            let v = (*c as char).to_digit(16)? as u8;
            bytes[i / 2] |= if i % 2 == 0 { v << 4 } else { v };
        }
        return Some(IpAddr::from(bytes));
    }
    None
}

/// Whether a name lies in the reverse trees at all.
fn is_reverse_tree(name: &str) -> bool {
    name.ends_with("in-addr.arpa") || name.ends_with("ip6.arpa")
}

impl Zone {
    /// Builds a snapshot. Entries that cannot be served (invalid names, unknown networks) are
    /// left out and listed in [`Zone::problems`]; everything else is served.
    pub fn build(input: &ClusterRecords, config: RecordsConfig) -> Zone {
        let mut problems = Vec::new();
        let mut nets: FxMap<Box<str>, NetTable> = FxMap::default();
        let mut net_names: Vec<String> = Vec::new();
        for n in &input.networks {
            let Some(name) = normalize_input(&n.name) else {
                problems.push(BuildProblem::InvalidName {
                    what: format!("network {}", n.id),
                    name: n.name.clone(),
                });
                continue;
            };
            if nets.contains_key(n.id.as_str()) || net_names.contains(&name) {
                problems.push(BuildProblem::DuplicateNetwork(n.id.clone()));
                continue;
            }
            net_names.push(name.clone());
            nets.insert(
                n.id.clone().into_boxed_str(),
                NetTable { name, subnets: n.subnets.clone(), ..NetTable::default() },
            );
        }

        let check_net = |what: &dyn Fn() -> String, id: &str, problems: &mut Vec<_>| {
            if nets.contains_key(id) {
                true
            } else {
                problems
                    .push(BuildProblem::UnknownNetwork { what: what(), network: id.to_owned() });
                false
            }
        };
        let valid = |what: &dyn Fn() -> String, name: &str, problems: &mut Vec<_>| {
            let n = normalize_input(name);
            if n.is_none() {
                problems.push(BuildProblem::InvalidName { what: what(), name: name.to_owned() });
            }
            n
        };

        // Work out every insertion first, then apply (the closures above borrow `nets`).
        let mut inserts: Vec<(String, String, u8, Vec<IpAddr>)> = Vec::new();
        let mut ptrs: Vec<(String, IpAddr, String)> = Vec::new();

        for svc in &input.services {
            let Some(sname) = valid(&|| "service".into(), &svc.name, &mut problems) else {
                continue;
            };
            for sn in &svc.networks {
                if !check_net(&|| format!("service {sname}"), &sn.network, &mut problems) {
                    continue;
                }
                let healthy: Vec<IpAddr> = svc
                    .tasks
                    .iter()
                    .filter(|t| t.healthy)
                    .flat_map(|t| t.attachments.iter())
                    .filter(|a| a.network == sn.network)
                    .map(|a| a.addr)
                    .collect();
                let front = match (svc.mode, sn.vip) {
                    (EndpointMode::Vip, Some(vip)) => vec![vip],
                    (EndpointMode::Vip, None) => Vec::new(),
                    (EndpointMode::Dnsrr, _) => healthy.clone(),
                };
                let mut names = vec![sname.clone()];
                for alias in &sn.aliases {
                    if let Some(a) =
                        valid(&|| format!("alias of service {sname}"), alias, &mut problems)
                    {
                        names.push(a);
                    }
                }
                for n in names {
                    let tasks_name = format!("tasks.{n}");
                    if tasks_name.len() <= MAX_NAME {
                        inserts.push((
                            sn.network.clone(),
                            tasks_name,
                            RANK_SERVICE,
                            healthy.clone(),
                        ));
                    }
                    inserts.push((sn.network.clone(), n, RANK_SERVICE, front.clone()));
                }
                if let Some(vip) = sn.vip {
                    ptrs.push((sn.network.clone(), vip, sname.clone()));
                }
            }
            for t in &svc.tasks {
                let Some(tname) = valid(
                    &|| format!("task {} of service {sname}", t.id),
                    &format!("{sname}.{}.{}", t.slot, t.id),
                    &mut problems,
                ) else {
                    continue;
                };
                for a in &t.attachments {
                    if !check_net(&|| format!("task {tname}"), &a.network, &mut problems) {
                        continue;
                    }
                    inserts.push((a.network.clone(), tname.clone(), RANK_TASK, vec![a.addr]));
                    ptrs.push((a.network.clone(), a.addr, tname.clone()));
                    for alias in &a.aliases {
                        if let Some(al) =
                            valid(&|| format!("alias of task {tname}"), alias, &mut problems)
                        {
                            inserts.push((a.network.clone(), al, RANK_ALIAS, vec![a.addr]));
                        }
                    }
                }
            }
        }
        for st in &input.standalone {
            let Some(name) = valid(&|| format!("standalone {}", st.id), &st.name, &mut problems)
            else {
                continue;
            };
            for a in &st.attachments {
                if !check_net(&|| format!("standalone {name}"), &a.network, &mut problems) {
                    continue;
                }
                inserts.push((a.network.clone(), name.clone(), RANK_STANDALONE, vec![a.addr]));
                ptrs.push((a.network.clone(), a.addr, name.clone()));
                for alias in &a.aliases {
                    if let Some(al) =
                        valid(&|| format!("alias of standalone {name}"), alias, &mut problems)
                    {
                        inserts.push((a.network.clone(), al, RANK_ALIAS, vec![a.addr]));
                    }
                }
            }
        }

        for (net, name, rank, addrs) in inserts {
            if let Some(t) = nets.get_mut(net.as_str()) {
                t.insert(&name, rank, &addrs);
            }
        }
        for (net, addr, label) in ptrs {
            if let Some(t) = nets.get_mut(net.as_str()) {
                t.insert_ptr(addr, &label);
            }
        }
        Zone { config, nets, problems }
    }

    /// An empty snapshot with this policy: every bare name is NXDOMAIN, the rest is forwarded.
    pub fn empty(config: RecordsConfig) -> Zone {
        Zone { config, ..Zone::default() }
    }

    /// The policy this snapshot answers with.
    pub fn config(&self) -> RecordsConfig {
        self.config
    }

    /// TTL of our answers, seconds.
    pub fn ttl(&self) -> u32 {
        self.config.ttl
    }

    /// Entries of the input that were left out, and why.
    pub fn problems(&self) -> &[BuildProblem] {
        &self.problems
    }

    /// Number of names (with their suffixed forms) served on a network, for status output.
    pub fn name_count(&self, network: &str) -> usize {
        self.nets.get(network).map_or(0, |t| t.names.len())
    }

    /// Answers `qname`/`qtype` for a task attached to `scope`. Case-insensitive, with or without
    /// the trailing dot. Addresses are shuffled with `rng` on every call.
    pub fn lookup<R: Rng + ?Sized>(
        &self,
        scope: &Scope,
        qname: &str,
        qtype: RecordType,
        rng: &mut R,
    ) -> Lookup {
        let mut buf = [0u8; MAX_NAME];
        let Some(name) = normalize_query(qname, &mut buf) else {
            return Lookup::NotOurs;
        };
        let tables = || scope.networks().filter_map(|id| self.nets.get(id));

        if is_reverse_tree(name) {
            return self.lookup_reverse(scope, name, qtype);
        }

        for t in tables() {
            if let Some(e) = t.names.get(name) {
                return answer_addrs(&e.addrs, qtype, rng);
            }
        }
        // `<anything>.<network>` for a network the task is on is ours: authoritative miss.
        for t in tables() {
            if name.len() > t.name.len()
                && name.ends_with(t.name.as_str())
                && name.as_bytes()[name.len() - t.name.len() - 1] == b'.'
            {
                return Lookup::NxDomain;
            }
        }
        if !self.config.forward_single_label && !name.contains('.') {
            return Lookup::NxDomain;
        }
        Lookup::NotOurs
    }

    /// The addresses (both families, unshuffled) a forward name has in `scope`, borrowed from
    /// the snapshot: what [`Zone::lookup`] answers for A/AAAA before filtering and shuffling,
    /// without allocating. `None` for every other outcome (reverse names, misses), which
    /// `lookup` decides.
    pub(crate) fn addrs_of(&self, scope: &Scope, qname: &str) -> Option<&[IpAddr]> {
        let mut buf = [0u8; MAX_NAME];
        let name = normalize_query(qname, &mut buf)?;
        if is_reverse_tree(name) {
            return None;
        }
        scope
            .networks()
            .filter_map(|id| self.nets.get(id))
            .find_map(|t| t.names.get(name))
            .map(|e| e.addrs.as_slice())
    }

    fn lookup_reverse(&self, scope: &Scope, name: &str, qtype: RecordType) -> Lookup {
        let Some(addr) = parse_reverse(name) else {
            return Lookup::NotOurs;
        };
        let tables = || scope.networks().filter_map(|id| self.nets.get(id));
        for t in tables() {
            if let Some(target) = t.ptr.get(&addr) {
                return match qtype {
                    RecordType::PTR | RecordType::ANY => Lookup::Ptr(target.clone()),
                    _ => Lookup::NoData,
                };
            }
        }
        if tables().any(|t| t.subnets.iter().any(|s| s.contains(&addr))) {
            return Lookup::NxDomain;
        }
        Lookup::NotOurs
    }
}

fn answer_addrs<R: Rng + ?Sized>(addrs: &[IpAddr], qtype: RecordType, rng: &mut R) -> Lookup {
    let want: fn(&IpAddr) -> bool = match qtype {
        RecordType::A => IpAddr::is_ipv4,
        RecordType::AAAA => IpAddr::is_ipv6,
        RecordType::ANY => |_| true,
        _ => return Lookup::NoData,
    };
    let mut out: Vec<IpAddr> = addrs.iter().copied().filter(want).collect();
    if out.is_empty() {
        return Lookup::NoData;
    }
    out.shuffle(rng);
    Lookup::Addrs(out)
}

#[cfg(test)]
mod tests;
