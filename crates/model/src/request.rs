//! `service create` and `service update` as they arrive at the API, already typed by the CLI
//! (a port is a [`PublishedPort`] from the first keystroke on), and how each becomes a
//! [`Service`] with Docker's defaults.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use shoal_scheduler::{
    Constraint, DEFAULT_UPDATE_MONITOR_MS, Mode, RestartCondition, RestartPolicy, UpdateOrder,
    UpdatePolicy,
};

use crate::service::{EndpointMode, FailureAction, Health, LbAlgorithm, Service};
use crate::{Error, MeshPolicy, MeshPolicyChange, MountSpec, PublishedPort, mount, parse_env};

/// What the model cannot decide alone: names in the store, and the node's rules for mounts
/// and signals.
pub trait Context {
    /// The id of the network that `what` (an id, a name or an id prefix) names.
    fn network_id(&self, what: &str) -> Result<String, Error>;
    /// The mounts as the store keeps them, after the node's checks.
    fn check_mounts(&self, mounts: &[MountSpec]) -> Result<Vec<MountSpec>, Error>;
    /// Whether `signal` names a signal.
    fn check_signal(&self, signal: &str) -> Result<(), Error>;
}

/// Docker's defaults for what `service create` leaves out.
pub mod defaults {
    pub const RESTART_DELAY_MS: u64 = 5_000;
    pub const HEALTH_INTERVAL_MS: u64 = 30_000;
    pub const HEALTH_TIMEOUT_MS: u64 = 30_000;
    pub const HEALTH_RETRIES: u32 = 3;
    /// The shortest health interval or timeout honoured.
    pub const HEALTH_MIN_MS: u64 = 100;
    pub const STOP_GRACE_MS: u64 = 10_000;
}

/// Docker's `--update-*` flags, the same on `service create` and `service update`: how a
/// rolling update replaces tasks. A flag left out is `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutChange {
    /// `--update-parallelism` (0: all at once).
    #[serde(default)]
    pub update_parallelism: Option<u64>,
    #[serde(default)]
    pub update_delay_ms: Option<u64>,
    #[serde(default)]
    pub update_failure_action: Option<FailureAction>,
    #[serde(default)]
    pub update_monitor_ms: Option<u64>,
}

impl RolloutChange {
    /// The update policy of a new service: Docker's defaults for what is left out.
    fn policy(&self) -> UpdatePolicy {
        UpdatePolicy {
            parallelism: self.update_parallelism.unwrap_or(1),
            delay_ms: self.update_delay_ms.unwrap_or(0),
            monitor_ms: self.update_monitor_ms.unwrap_or(DEFAULT_UPDATE_MONITOR_MS),
        }
    }

    /// Changes what is given on `svc`, and only that.
    fn apply(&self, svc: &mut Service) {
        if let Some(n) = self.update_parallelism {
            svc.update.parallelism = n;
        }
        if let Some(ms) = self.update_delay_ms {
            svc.update.delay_ms = ms;
        }
        if let Some(a) = self.update_failure_action {
            svc.update_failure_action = a;
        }
        if let Some(ms) = self.update_monitor_ms {
            svc.update.monitor_ms = ms;
        }
    }
}

/// `POST /services`: Docker's `service create` flags.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServiceCreate {
    pub name: String,
    pub argv: Vec<String>,
    /// `KEY=VALUE`.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    /// Default 1 (replicated).
    #[serde(default)]
    pub replicas: Option<u64>,
    #[serde(default)]
    pub global: bool,
    /// Network names or ids.
    #[serde(default)]
    pub networks: Vec<String>,
    #[serde(default)]
    pub publish: Vec<PublishedPort>,
    #[serde(default)]
    pub endpoint_mode: Option<EndpointMode>,
    #[serde(default)]
    pub lb_algorithm: Option<LbAlgorithm>,
    /// `--mesh-*` flags.
    #[serde(flatten)]
    pub mesh: MeshPolicyChange,
    /// `node.role==manager`, …
    #[serde(default)]
    pub constraints: Vec<String>,
    #[serde(default)]
    pub restart_condition: Option<RestartCondition>,
    #[serde(default)]
    pub restart_delay_ms: Option<u64>,
    #[serde(default)]
    pub restart_max_attempts: Option<u64>,
    #[serde(default)]
    pub update_order: Option<UpdateOrder>,
    #[serde(default)]
    pub health_cmd: Option<String>,
    #[serde(default)]
    pub health_interval_ms: Option<u64>,
    #[serde(default)]
    pub health_timeout_ms: Option<u64>,
    #[serde(default)]
    pub health_retries: Option<u32>,
    #[serde(default)]
    pub stop_grace_ms: Option<u64>,
    /// `--stop-signal`: a name (`SIGQUIT`, `QUIT`) or a number.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// `--update-*` flags.
    #[serde(flatten)]
    pub rollout: RolloutChange,
    /// `--mount`, parsed by the client; checked again by the node that takes the request.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
}

/// `POST /services/{id}/update`: Docker's `service update` / `scale` flags.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServiceUpdate {
    #[serde(default)]
    pub replicas: Option<u64>,
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    #[serde(default)]
    pub env_add: Vec<String>,
    /// Names of variables to remove.
    #[serde(default)]
    pub env_rm: Vec<String>,
    #[serde(default)]
    pub network_add: Vec<String>,
    #[serde(default)]
    pub network_rm: Vec<String>,
    #[serde(default)]
    pub publish_add: Vec<PublishedPort>,
    /// Published ports to remove.
    #[serde(default)]
    pub publish_rm: Vec<u16>,
    #[serde(default)]
    pub constraint_add: Vec<String>,
    #[serde(default)]
    pub constraint_rm: Vec<String>,
    #[serde(default)]
    pub update_order: Option<UpdateOrder>,
    #[serde(default)]
    pub stop_grace_ms: Option<u64>,
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// `--update-*` flags.
    #[serde(flatten)]
    pub rollout: RolloutChange,
    /// Replace every task even if nothing changed.
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub mount_add: Vec<MountSpec>,
    /// Targets of mounts to remove (`--mount-rm PATH`).
    #[serde(default)]
    pub mount_rm: Vec<String>,
    /// How the routing mesh balances: `p2c`, `round-robin` or `maglev`.
    #[serde(default)]
    pub lb_algorithm: Option<LbAlgorithm>,
    /// `--mesh-*` flags.
    #[serde(flatten)]
    pub mesh: MeshPolicyChange,
}

fn network_ids(ctx: &impl Context, names: &[String]) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for n in names {
        let id = ctx.network_id(n)?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

fn constraints(list: &[String]) -> Result<Vec<Constraint>, Error> {
    Ok(list.iter().map(|c| c.parse()).collect::<Result<Vec<_>, _>>()?)
}

/// The signal as given, once the node knows it.
fn stop_signal(ctx: &impl Context, s: Option<&str>) -> Result<Option<String>, Error> {
    s.map(|s| ctx.check_signal(s).map(|()| s.trim().to_owned())).transpose()
}

impl ServiceCreate {
    /// The service it asks for, called `id`, created at `now_ms`: defaulted and validated
    /// alone (its place among the other services is [`Service::check_against`]'s).
    pub fn into_service(
        self,
        ctx: &impl Context,
        id: String,
        now_ms: u64,
    ) -> Result<Service, Error> {
        let mode = match (self.global, self.replicas) {
            (true, Some(_)) => return Err(Error::ReplicasWithGlobal),
            (true, None) => Mode::Global,
            (false, r) => Mode::Replicated { replicas: r.unwrap_or(1) },
        };
        let health = self.health_cmd.map(|cmd| Health {
            cmd,
            interval_ms: self
                .health_interval_ms
                .unwrap_or(defaults::HEALTH_INTERVAL_MS)
                .max(defaults::HEALTH_MIN_MS),
            timeout_ms: self
                .health_timeout_ms
                .unwrap_or(defaults::HEALTH_TIMEOUT_MS)
                .max(defaults::HEALTH_MIN_MS),
            retries: self.health_retries.unwrap_or(defaults::HEALTH_RETRIES),
        });
        let svc = Service {
            id,
            name: self.name,
            version: 1,
            mode,
            argv: self.argv,
            env: parse_env(&self.env)?,
            workdir: self.workdir,
            networks: network_ids(ctx, &self.networks)?,
            ports: self.publish,
            dnsrr: self.endpoint_mode == Some(EndpointMode::Dnsrr),
            lb_algorithm: self.lb_algorithm.unwrap_or_default(),
            mesh: MeshPolicy::default().changed(&self.mesh).map_err(Error::MeshPolicy)?,
            constraints: constraints(&self.constraints)?,
            restart: RestartPolicy {
                condition: self.restart_condition.unwrap_or(RestartCondition::Any),
                delay_ms: self.restart_delay_ms.unwrap_or(defaults::RESTART_DELAY_MS),
                max_attempts: self.restart_max_attempts.unwrap_or(0),
            },
            update_order: self.update_order.unwrap_or_default(),
            update: self.rollout.policy(),
            update_failure_action: self.rollout.update_failure_action.unwrap_or_default(),
            update_status: None,
            health,
            mounts: ctx.check_mounts(&self.mounts)?,
            stop_grace_ms: self.stop_grace_ms.unwrap_or(defaults::STOP_GRACE_MS),
            stop_signal: stop_signal(ctx, self.stop_signal.as_deref())?,
            previous: None,
            created_ms: now_ms,
            updated_ms: now_ms,
        };
        svc.validate()?;
        Ok(svc)
    }
}

impl ServiceUpdate {
    /// `svc` with the changes applied and validated alone; its version, history and times are
    /// the caller's to set, since whether tasks must be replaced is the rollout's rule.
    pub fn apply(&self, svc: &Service, ctx: &impl Context) -> Result<Service, Error> {
        let mut svc = svc.clone();
        if let Some(r) = self.replicas {
            match &mut svc.mode {
                Mode::Replicated { replicas } => *replicas = r,
                Mode::Global => return Err(Error::ScaleGlobal(svc.name)),
            }
        }
        if let Some(argv) = &self.argv {
            svc.argv = argv.clone();
        }
        let env_rm: BTreeSet<&str> = self.env_rm.iter().map(String::as_str).collect();
        svc.env.retain(|(k, _)| !env_rm.contains(k.as_str()));
        for (k, v) in parse_env(&self.env_add)? {
            svc.env.retain(|(x, _)| *x != k);
            svc.env.push((k, v));
        }
        for id in network_ids(ctx, &self.network_rm)? {
            if !svc.networks.contains(&id) {
                return Err(Error::NotAttached { service: svc.name, network: id });
            }
            svc.networks.retain(|n| *n != id);
        }
        for id in network_ids(ctx, &self.network_add)? {
            if svc.networks.contains(&id) {
                return Err(Error::AlreadyAttached { service: svc.name, network: id });
            }
            svc.networks.push(id);
        }
        for p in &self.publish_rm {
            if !svc.ports.iter().any(|x| x.published == *p) {
                return Err(Error::NotPublished(*p, svc.name));
            }
            svc.ports.retain(|x| x.published != *p);
        }
        svc.ports.extend_from_slice(&self.publish_add);
        for c in constraints(&self.constraint_rm)? {
            svc.constraints.retain(|x| *x != c);
        }
        svc.constraints.extend(constraints(&self.constraint_add)?);
        if let Some(o) = self.update_order {
            svc.update_order = o;
        }
        self.rollout.apply(&mut svc);
        // A new update starts afresh, whatever stopped the last one.
        svc.update_status = None;
        if let Some(ms) = self.stop_grace_ms {
            svc.stop_grace_ms = ms;
        }
        if let Some(s) = stop_signal(ctx, self.stop_signal.as_deref())? {
            svc.stop_signal = Some(s);
        }
        if let Some(a) = self.lb_algorithm {
            svc.lb_algorithm = a;
        }
        svc.mesh = svc.mesh.changed(&self.mesh).map_err(Error::MeshPolicy)?;
        let added = ctx.check_mounts(&self.mount_add)?;
        svc.mounts = mount::updated(&svc.mounts, &self.mount_rm, added).map_err(Error::Mount)?;
        svc.validate()?;
        Ok(svc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorKind, PortMode};

    /// A store with one network, `my-overlay` (id `net1`), on a node that knows `SIGQUIT`.
    struct Fake;

    impl Context for Fake {
        fn network_id(&self, what: &str) -> Result<String, Error> {
            match what {
                "my-overlay" | "net1" => Ok("net1".into()),
                _ => Err(Error::NotFound { kind: "network", name: what.into() }),
            }
        }
        fn check_mounts(&self, mounts: &[MountSpec]) -> Result<Vec<MountSpec>, Error> {
            Ok(mounts.to_vec())
        }
        fn check_signal(&self, signal: &str) -> Result<(), Error> {
            match signal.trim() {
                "SIGQUIT" | "QUIT" => Ok(()),
                s => Err(Error::StopSignal(format!("{s:?} is not a signal"))),
            }
        }
    }

    fn create(name: &str) -> ServiceCreate {
        ServiceCreate { name: name.into(), argv: vec!["true".into()], ..ServiceCreate::default() }
    }

    #[test]
    fn create_fills_in_dockers_defaults() {
        let svc = create("web").into_service(&Fake, "id1".into(), 42).unwrap();
        assert_eq!(svc.mode, Mode::Replicated { replicas: 1 });
        assert_eq!(svc.restart, RestartPolicy::default());
        assert_eq!(svc.update, UpdatePolicy { parallelism: 1, delay_ms: 0, monitor_ms: 5_000 });
        assert_eq!(svc.stop_grace_ms, defaults::STOP_GRACE_MS);
        assert_eq!((svc.version, svc.created_ms, svc.updated_ms), (1, 42, 42));
        let mut req = create("web");
        req.health_cmd = Some("true".into());
        req.health_interval_ms = Some(1);
        let h = req.into_service(&Fake, "id1".into(), 0).unwrap().health.unwrap();
        assert_eq!((h.interval_ms, h.timeout_ms, h.retries), (100, 30_000, 3));
    }

    #[test]
    fn create_refuses_what_a_service_cannot_be() {
        let mut req = create("web");
        req.global = true;
        req.replicas = Some(2);
        assert_eq!(req.into_service(&Fake, "i".into(), 0).unwrap_err(), Error::ReplicasWithGlobal);
        let mut req = create("web");
        req.endpoint_mode = Some(EndpointMode::Dnsrr);
        req.publish = vec!["8100:80".parse().unwrap()];
        assert_eq!(req.into_service(&Fake, "i".into(), 0).unwrap_err(), Error::DnsrrWithIngress);
        let mut req = create("web");
        req.networks = vec!["nope".into()];
        let e = req.into_service(&Fake, "i".into(), 0).unwrap_err();
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (ErrorKind::NotFound, "No such network: nope")
        );
        let mut req = create("web");
        req.stop_signal = Some("SIGNOPE".into());
        assert!(matches!(req.into_service(&Fake, "i".into(), 0), Err(Error::StopSignal(_))));
        let mut req = create("web");
        req.env = vec!["=x".into()];
        assert_eq!(
            req.into_service(&Fake, "i".into(), 0).unwrap_err(),
            Error::InvalidEnv("=x".into())
        );
        let mut req = create("web");
        req.constraints = vec!["node.colour==red".into()];
        assert!(matches!(req.into_service(&Fake, "i".into(), 0), Err(Error::Constraint(_))));
        let mut req = create("web");
        req.health_cmd = Some(" ".into());
        assert_eq!(req.into_service(&Fake, "i".into(), 0).unwrap_err(), Error::EmptyHealthCommand);
    }

    #[test]
    fn update_changes_only_what_it_names() {
        let mut req = create("web");
        req.publish = vec!["8100:80".parse().unwrap()];
        req.env = vec!["A=1".into(), "B=2".into()];
        let svc = req.into_service(&Fake, "i".into(), 0).unwrap();
        let up = ServiceUpdate {
            env_rm: vec!["A".into()],
            env_add: vec!["B=3".into()],
            network_add: vec!["my-overlay".into()],
            publish_rm: vec![8100],
            publish_add: vec!["published=53,target=53,protocol=udp,mode=host".parse().unwrap()],
            stop_signal: Some("QUIT".into()),
            ..ServiceUpdate::default()
        };
        let next = up.apply(&svc, &Fake).unwrap();
        assert_eq!(next.env, [("B".to_owned(), "3".to_owned())]);
        assert_eq!(next.networks, ["net1"]);
        assert_eq!(next.ports.len(), 1);
        assert_eq!(next.ports[0].mode, PortMode::Host);
        assert_eq!(next.stop_signal.as_deref(), Some("QUIT"));
        assert_eq!((next.version, &next.argv), (svc.version, &svc.argv));
        let again = ServiceUpdate { network_add: vec!["net1".into()], ..ServiceUpdate::default() };
        assert!(matches!(again.apply(&next, &Fake), Err(Error::AlreadyAttached { .. })));
        let gone = ServiceUpdate { publish_rm: vec![9], ..ServiceUpdate::default() };
        assert_eq!(gone.apply(&next, &Fake).unwrap_err(), Error::NotPublished(9, "web".into()));
        let mut rr = next.clone();
        rr.dnsrr = true;
        rr.ports.clear();
        let ingress = ServiceUpdate {
            publish_add: vec!["8200:80".parse().unwrap()],
            ..ServiceUpdate::default()
        };
        assert_eq!(ingress.apply(&rr, &Fake).unwrap_err(), Error::DnsrrWithIngress);
        let too_many = ServiceUpdate { replicas: Some(10_001), ..ServiceUpdate::default() };
        assert_eq!(too_many.apply(&next, &Fake).unwrap_err(), Error::TooManyReplicas(10_001));
    }

    #[test]
    fn rollout_flags_travel_as_top_level_fields() {
        // The API's JSON names each `--update-*` flag at the top level, as before they had a
        // type of their own; an older client's request reads the same.
        let json = serde_json::json!({
            "name": "web", "argv": ["true"],
            "update_parallelism": 2, "update_delay_ms": 1500,
            "update_failure_action": "rollback", "update_monitor_ms": 700,
        });
        let req: ServiceCreate = serde_json::from_value(json).unwrap();
        let want = RolloutChange {
            update_parallelism: Some(2),
            update_delay_ms: Some(1500),
            update_failure_action: Some(FailureAction::Rollback),
            update_monitor_ms: Some(700),
        };
        assert_eq!(req.rollout, want);
        let svc = req.into_service(&Fake, "i".into(), 0).unwrap();
        assert_eq!(
            (svc.update.parallelism, svc.update.delay_ms, svc.update.monitor_ms),
            (2, 1500, 700)
        );
        assert_eq!(svc.update_failure_action, FailureAction::Rollback);
        let up = ServiceUpdate {
            rollout: RolloutChange { update_delay_ms: Some(9), ..RolloutChange::default() },
            ..ServiceUpdate::default()
        };
        let sent = serde_json::to_value(&up).unwrap();
        assert_eq!(sent["update_delay_ms"], 9);
        assert!(sent.get("rollout").is_none(), "{sent}");
        let next = up.apply(&svc, &Fake).unwrap();
        assert_eq!((next.update.parallelism, next.update.delay_ms), (2, 9));
    }
}
