//! [`ClusterState::apply`]: every command validated against the store, then applied; a refused
//! command changes nothing.

use super::*;

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
    fn check_service_unique(&self, svc: &Service) -> Result<(), String> {
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
                return Err(format!("service with name {} already exists", other.name));
            }
            if let Some(p) = svc.ports.iter().find(|p| taken(p, other)) {
                return Err(format!(
                    "port '{}' is already in use by service '{}' ({k})",
                    p.published, other.name
                ));
            }
        }
        Ok(())
    }

    /// Applies a command: validates, then changes; on error nothing changed.
    pub fn apply(&mut self, cmd: &Command, now_ms: u64) -> Result<Vec<ClusterEvent>, String> {
        if self.cluster.is_none() && !matches!(cmd, Command::Init { .. }) {
            return Err("the cluster is not initialised".into());
        }
        let mut ev = Vec::new();
        match cmd {
            Command::Init { info, node, keyring, ingress } => {
                if self.cluster.is_some() {
                    return Err("the cluster is already initialised".into());
                }
                self.cluster = Some(info.clone());
                self.nodes.insert(node.id, Arc::new(node.clone()));
                self.keyring = keyring.clone();
                self.networks.insert(ingress.id.clone(), Arc::new(ingress.clone()));
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
                    return Err(format!("node {id} not found"));
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
                    return Err(format!("gossip key {} already exists", k.id));
                }
                self.keyring.keys.push(k.clone());
                self.keyring.version += 1;
                ev.push(ClusterEvent::Keyring { version: self.keyring.version });
            }
            Command::SetPrimaryGossipKey(id) => {
                if !self.keyring.keys.iter().any(|x| x.id == *id) {
                    return Err(format!("gossip key {id} is not in the keyring"));
                }
                self.keyring.primary = *id;
                self.keyring.version += 1;
                ev.push(ClusterEvent::Keyring { version: self.keyring.version });
            }
            Command::RetireGossipKey(id) => {
                if self.keyring.primary == *id {
                    return Err(format!(
                        "gossip key {id} is the primary key and cannot be retired"
                    ));
                }
                let before = self.keyring.keys.len();
                self.keyring.keys.retain(|k| k.id != *id);
                if self.keyring.keys.len() == before {
                    return Err(format!("gossip key {id} is not in the keyring"));
                }
                self.keyring.version += 1;
                ev.push(ClusterEvent::Keyring { version: self.keyring.version });
            }
            Command::PutNetwork(n) => {
                // Decided here, not by the writer: two creates that read the same store and
                // picked the same subnet or VNI must not both land.
                for x in self.networks.values().filter(|x| x.id != n.id) {
                    if x.name == n.name {
                        return Err(format!("network with name {} already exists", n.name));
                    }
                    if x.vni == n.vni {
                        return Err(format!("VNI {} is already used by network {}", n.vni, x.name));
                    }
                    if x.subnet.contains(&n.subnet.network())
                        || n.subnet.contains(&x.subnet.network())
                    {
                        return Err(format!(
                            "subnet {} overlaps {} of network {}",
                            n.subnet, x.subnet, x.name
                        ));
                    }
                }
                self.networks.insert(n.id.clone(), Arc::new(n.clone()));
            }
            Command::RemoveNetwork(id) => {
                if self.networks.remove(id).is_none() {
                    return Err(format!("network {id} not found"));
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
                self.tasks.insert(t.task.id.clone(), Arc::new((**t).clone()));
            }
            Command::RemoveTask(id) => {
                self.tasks.remove(id).ok_or_else(|| format!("task {id} not found"))?;
            }
            Command::PutAddress { key, ip } => {
                self.ipam.insert(key.clone(), HeldAddress { ip: *ip });
            }
            Command::RemoveAddress(key) => {
                self.ipam.remove(key).ok_or_else(|| format!("address {key} not found"))?;
            }
            Command::ReportTask { owner, key, report } => {
                report.check()?;
                let t = self.tasks.get_mut(key).ok_or_else(|| format!("task {key} not found"))?;
                if !assigned_to(t, *owner) {
                    return Err(format!("task {key} is not assigned to node {owner}"));
                }
                report.apply_to(Arc::make_mut(t));
            }
            Command::PutStandalone { owner, key, value } => {
                if let Some(old) = self.tasks.get(key) {
                    if !(assigned_to(old, *owner) && old.task.service_id.is_empty()) {
                        return Err(format!("task {key} is not a standalone task of node {owner}"));
                    }
                } else if value.is_none() {
                    return Err(format!("task {key} not found"));
                }
                match value {
                    Some(t) => {
                        check_standalone(key, t, *owner)?;
                        self.tasks.insert(key.clone(), Arc::new((**t).clone()));
                    }
                    None => {
                        self.tasks.remove(key);
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
