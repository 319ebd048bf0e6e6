//! [`ClusterState::apply`]: every command validated against the store, then applied; a refused
//! command changes nothing. What must be unique (names, published ports, addresses) is decided
//! here, so two writers that each checked the store first cannot both land.

use super::*;

/// Why the state machine refused a command; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// A name or published port that another record has.
    #[error("{0}")]
    Conflict(String),
    /// The network (or the pool of subnets) has no free address left.
    #[error("{0}")]
    Exhausted(String),
    /// Any other rule: a record not found, a write a node may not make, a malformed value.
    #[error("{0}")]
    Invalid(String),
}

impl From<String> for Refusal {
    fn from(m: String) -> Refusal {
        Refusal::Invalid(m)
    }
}

impl From<&str> for Refusal {
    fn from(m: &str) -> Refusal {
        Refusal::Invalid(m.to_owned())
    }
}

fn assigned_to(t: &TaskRecord, node: NodeId) -> bool {
    t.task.node_id.as_deref() == Some(node.to_string().as_str())
}

/// A standalone task a node writes: its own, of no service, keyed by its id, and small.
fn check_standalone(key: &str, t: &TaskRecord, owner: NodeId) -> Result<(), String> {
    if !(assigned_to(t, owner) && t.task.service_id.is_empty() && t.task.id == key) {
        return Err(format!("standalone task {key} must name node {owner}, itself and no service"));
    }
    // Our records always serialise; the size is that of the JSON the store keeps.
    let size = serde_json::to_vec(t).map_or(usize::MAX, |v| v.len());
    if size > MAX_STANDALONE {
        return Err(format!("standalone task {key} is larger than {MAX_STANDALONE} bytes"));
    }
    Ok(())
}

impl ClusterState {
    /// A service's name is its DNS name and a published port belongs to one service: both are
    /// decided here, so two concurrent creates that each checked first cannot both land.
    fn check_service_unique(&self, svc: &Service) -> Result<(), Refusal> {
        // Two host-mode ports of one number may both exist (the scheduler keeps their tasks on
        // different nodes); an ingress port is every node's.
        let taken = |p: &shoal_model::PublishedPort, other: &Service| {
            other.ports.iter().any(|o| {
                o.published == p.published
                    && o.protocol == p.protocol
                    && (o.is_ingress() || p.is_ingress())
            })
        };
        for (k, other) in self.services.iter().filter(|(k, _)| **k != svc.id) {
            if other.name == svc.name {
                return Err(Refusal::Conflict(format!(
                    "service with name {} already exists",
                    other.name
                )));
            }
            if let Some(p) = svc.ports.iter().find(|p| taken(p, other)) {
                return Err(Refusal::Conflict(format!(
                    "port '{}' is already in use by service '{}' ({k})",
                    p.published, other.name
                )));
            }
        }
        Ok(())
    }

    /// A network's name is its own, and there is one ingress network: two creates that each
    /// checked first cannot both land.
    pub(super) fn check_network_name(
        &self,
        id: &str,
        name: &str,
        ingress: bool,
    ) -> Result<(), Refusal> {
        let others = || self.networks.values().filter(|x| x.id != id);
        if others().any(|x| x.name == name) {
            return Err(Refusal::Conflict(format!("network with name {name} already exists")));
        }
        if let Some(x) = others().find(|x| x.ingress && ingress) {
            return Err(Refusal::Conflict(format!(
                "ingress network ({}, {}) is already present",
                x.name, x.id
            )));
        }
        Ok(())
    }

    /// A network's name, subnet and VNI are its own (see [`Self::check_network_name`]). A
    /// network the store made passes by construction; one written whole (`PutNetwork`) is
    /// checked here.
    pub(super) fn check_network_unique(&self, n: &NetworkRecord) -> Result<(), Refusal> {
        self.check_network_name(&n.id, &n.name, n.ingress)?;
        for x in self.networks.values().filter(|x| x.id != n.id) {
            if x.vni == n.vni {
                return Err(Refusal::Invalid(format!(
                    "VNI {} is already used by network {}",
                    n.vni, x.name
                )));
            }
            if x.subnet.contains(&n.subnet.network()) || n.subnet.contains(&x.subnet.network()) {
                return Err(Refusal::Invalid(format!(
                    "subnet {} overlaps {} of network {}",
                    n.subnet, x.subnet, x.name
                )));
            }
        }
        Ok(())
    }

    /// The standalone task (a `shoal run` container or a CNI attachment) called `name`.
    fn standalone_named(&self, name: &str) -> Option<&TaskRecord> {
        self.tasks
            .values()
            .map(Arc::as_ref)
            .find(|t| t.standalone.as_ref().is_some_and(|s| s.name == name))
    }

    /// A standalone task's name is its DNS name: a new name, or a changed one, must be no other
    /// standalone task's and no service's. `service create` does not look at containers' names,
    /// as in Docker.
    fn check_standalone_unique(&self, key: &str, t: &TaskRecord) -> Result<(), Refusal> {
        let Some(name) = t.standalone.as_ref().map(|s| s.name.as_str()) else { return Ok(()) };
        let old = self.tasks.get(key).and_then(|o| o.standalone.as_ref());
        if old.is_some_and(|o| o.name == name) {
            return Ok(());
        }
        let container = self.standalone_named(name).is_some_and(|o| o.task.id != key);
        if container || self.services.values().any(|s| s.name == name) {
            return Err(Refusal::Conflict(format!(
                "Conflict. The container name \"/{name}\" is already in use"
            )));
        }
        Ok(())
    }

    /// Applies a command: validates, then changes; on error nothing changed.
    pub fn apply(&mut self, cmd: &Command, now_ms: u64) -> Result<Vec<ClusterEvent>, Refusal> {
        if self.cluster.is_none() && !matches!(cmd, Command::Init { .. }) {
            return Err("the cluster is not initialised".into());
        }
        let mut ev = Vec::new();
        match cmd {
            Command::Init { info, node, keyring, ingress } => {
                if self.cluster.is_some() {
                    return Err("the cluster is already initialised".into());
                }
                // Built aside: the ingress network's subnet is cut from the pool `info` names,
                // and a refusal must leave the store uninitialised.
                let mut next = ClusterState { cluster: Some(info.clone()), ..Default::default() };
                next.nodes.insert(node.id, Arc::new(node.clone()));
                next.keyring = keyring.clone();
                next.create_network(ingress)?;
                *self = next;
                ev.push(ClusterEvent::NodeAdded { id: node.id, hostname: node.hostname.clone() });
                ev.push(ClusterEvent::Keyring { version: keyring.version });
            }
            Command::AddNode(n) => {
                self.nodes.insert(n.id, Arc::new(n.clone()));
                ev.push(ClusterEvent::NodeAdded { id: n.id, hostname: n.hostname.clone() });
            }
            Command::UpdateNode { id, availability, label_add, label_rm } => {
                let n = self.node_mut(*id)?;
                if let Some(a) = availability {
                    if n.availability != *a {
                        ev.push(ClusterEvent::NodeAvailability { id: *id, availability: *a });
                    }
                    n.availability = *a;
                }
                for k in label_rm {
                    n.labels.remove(k);
                }
                n.labels.extend(label_add.iter().map(|(k, v)| (k.clone(), v.clone())));
                n.updated_ms = now_ms;
            }
            Command::SetRole { id, role } => {
                let n = self.node_mut(*id)?;
                if n.role != *role {
                    ev.push(ClusterEvent::NodeRole { id: *id, role: *role });
                }
                n.role = *role;
                n.updated_ms = now_ms;
            }
            Command::SetStatus { id, status, message } => {
                let n = self.node_mut(*id)?;
                if n.status != *status {
                    ev.push(ClusterEvent::NodeStatus {
                        id: *id,
                        hostname: n.hostname.clone(),
                        from: n.status,
                        to: *status,
                    });
                }
                n.status = *status;
                n.status_message = message.clone();
                n.updated_ms = now_ms;
            }
            Command::SetAddr { id, addr } => {
                let n = self.node_mut(*id)?;
                n.addr = *addr;
                n.updated_ms = now_ms;
            }
            Command::SetWgKey { id, key } => {
                let n = self.node_mut(*id)?;
                n.wg_public_key = Some(*key);
                n.updated_ms = now_ms;
            }
            Command::RemoveNode(id) => {
                if self.nodes.remove(id).is_none() {
                    return Err(Refusal::Invalid(format!("node {id} not found")));
                }
                ev.push(ClusterEvent::NodeRemoved { id: *id });
            }
            Command::SetJoinSecret { role, secret } => {
                let c = self.cluster.as_mut().ok_or("the cluster is not initialised")?;
                let old = match role {
                    Role::Worker => std::mem::replace(&mut c.worker_secret, *secret),
                    Role::Manager => std::mem::replace(&mut c.manager_secret, *secret),
                };
                c.retired_secrets.push(old);
                if c.retired_secrets.len() > 16 {
                    c.retired_secrets.remove(0);
                }
            }
            Command::Security(step) => {
                let c = self.cluster.as_mut().ok_or("the cluster is not initialised")?;
                super::security::apply(c, step)?;
            }
            Command::AddGossipKey(k) => {
                if self.keyring.keys.iter().any(|x| x.id == k.id) {
                    return Err(Refusal::Invalid(format!("gossip key {} already exists", k.id)));
                }
                self.keyring.keys.push(k.clone());
                self.keyring.version += 1;
                ev.push(ClusterEvent::Keyring { version: self.keyring.version });
            }
            Command::SetPrimaryGossipKey(id) => {
                if !self.keyring.keys.iter().any(|x| x.id == *id) {
                    return Err(Refusal::Invalid(format!("gossip key {id} is not in the keyring")));
                }
                self.keyring.primary = *id;
                self.keyring.version += 1;
                ev.push(ClusterEvent::Keyring { version: self.keyring.version });
            }
            Command::RetireGossipKey(id) => {
                if self.keyring.primary == *id {
                    return Err(Refusal::Invalid(format!(
                        "gossip key {id} is the primary key and cannot be retired"
                    )));
                }
                let before = self.keyring.keys.len();
                self.keyring.keys.retain(|k| k.id != *id);
                if self.keyring.keys.len() == before {
                    return Err(Refusal::Invalid(format!("gossip key {id} is not in the keyring")));
                }
                self.keyring.version += 1;
                ev.push(ClusterEvent::Keyring { version: self.keyring.version });
            }
            Command::PutNetwork(n) => {
                self.check_network_unique(n)?;
                self.networks.insert(n.id.clone(), Arc::new(n.clone()));
            }
            Command::CreateNetwork(spec) => self.create_network(spec)?,
            Command::RemoveNetwork(id) => {
                if self.networks.remove(id).is_none() {
                    return Err(Refusal::Invalid(format!("network {id} not found")));
                }
            }
            Command::PutService(svc) => {
                self.check_service_unique(svc)?;
                self.services.insert(svc.id.clone(), Arc::new((**svc).clone()));
            }
            Command::RemoveService(id) => {
                self.services.remove(id).ok_or_else(|| format!("service {id} not found"))?;
            }
            Command::PutTask(t) => {
                let mut t = (**t).clone();
                self.address_task(&mut t)?;
                self.put_task(t);
            }
            Command::RemoveTask(id) => {
                self.remove_task(id).ok_or_else(|| format!("task {id} not found"))?;
            }
            Command::PutAddress { key, ip } => self.hold_address(key, *ip),
            Command::AllocateAddress { key, network } => self.allocate_address(key, network)?,
            Command::RemoveAddress(key) => {
                self.release_address(key).ok_or_else(|| format!("address {key} not found"))?;
            }
            Command::ReportTask { owner, key, report } => {
                report.check()?;
                let t = self.tasks.get(key).ok_or_else(|| format!("task {key} not found"))?;
                if !assigned_to(t, *owner) {
                    return Err(Refusal::Invalid(format!(
                        "task {key} is not assigned to node {owner}"
                    )));
                }
                self.change_task(key, |t| report.apply_to(t));
            }
            Command::PutStandalone { owner, key, value } => {
                if let Some(old) = self.tasks.get(key) {
                    if !(assigned_to(old, *owner) && old.task.service_id.is_empty()) {
                        return Err(Refusal::Invalid(format!(
                            "task {key} is not a standalone task of node {owner}"
                        )));
                    }
                } else if value.is_none() {
                    return Err(Refusal::Invalid(format!("task {key} not found")));
                }
                match value {
                    Some(t) => {
                        check_standalone(key, t, *owner)?;
                        self.check_standalone_unique(key, t)?;
                        // Addresses are the store's to give: a node keeps those it was given,
                        // and the others are picked here.
                        let mut t = (**t).clone();
                        let given = self.tasks.get(key).map(|o| &o.addresses);
                        t.addresses = given.map_or_else(Default::default, |g| {
                            g.iter()
                                .filter(|(net, _)| t.networks.contains(net))
                                .map(|(net, ip)| (net.clone(), *ip))
                                .collect()
                        });
                        self.address_task(&mut t)?;
                        self.put_task(t);
                    }
                    None => {
                        self.remove_task(key);
                    }
                }
            }
        }
        Ok(ev)
    }

    fn node_mut(&mut self, id: NodeId) -> Result<&mut NodeRecord, String> {
        self.nodes.get_mut(&id).map(Arc::make_mut).ok_or_else(|| format!("node {id} not found"))
    }

    /// Finds a node by full id, unique id prefix or host name (as `docker node inspect` does).
    pub fn find_node(&self, what: &str) -> Result<&NodeRecord, String> {
        if let Ok(id) = what.parse::<NodeId>()
            && let Some(n) = self.nodes.get(&id)
        {
            return Ok(n);
        }
        let by_name: Vec<&NodeRecord> =
            self.nodes.values().map(Arc::as_ref).filter(|n| n.hostname == what).collect();
        if by_name.len() == 1 {
            return Ok(by_name[0]);
        }
        if by_name.len() > 1 {
            return Err(format!("node {what} is ambiguous ({} matches)", by_name.len()));
        }
        let by_prefix: Vec<&NodeRecord> = self
            .nodes
            .values()
            .map(Arc::as_ref)
            .filter(|n| !what.is_empty() && n.id.to_string().starts_with(what))
            .collect();
        match by_prefix.len() {
            1 => Ok(by_prefix[0]),
            0 => Err(format!("No such node: {what}")),
            k => Err(format!("node {what} is ambiguous ({k} matches)")),
        }
    }

    /// The managers (desired role).
    pub fn managers(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values().map(Arc::as_ref).filter(|n| n.role == Role::Manager)
    }
}
