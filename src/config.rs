//! The agent's configuration: one typed struct, merged one way from defaults, then the TOML file,
//! then `SHOAL_*` environment variables, then flags (the later wins). The file rejects unknown keys;
//! every error names the field, and `shoal agent` exits 64 on it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default place of the agent's config file; used only when it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/shoal/agent.toml";
/// Default data directory (lock file, state).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/shoal";
/// Default port of the visualizer page.
pub const DEFAULT_UI_PORT: u16 = 8089;
/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/shoal/shoal.sock";
/// The file in the data dir holding this node's last gossip generation.
pub const GOSSIP_GENERATION_FILE: &str = "gossip-generation";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Control-plane timings: Swarm's (5 s heartbeats) or fast ones for labs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClusterTuning {
    #[default]
    Default,
    Fast,
}

impl ClusterTuning {
    /// The control plane's timings for this choice.
    pub fn tuning(self) -> shoal_cluster::Tuning {
        match self {
            ClusterTuning::Default => shoal_cluster::Tuning::default(),
            ClusterTuning::Fast => shoal_cluster::Tuning::fast(),
        }
    }

    /// The value of `--cluster-tuning` that selects it.
    pub fn as_arg(self) -> &'static str {
        match self {
            ClusterTuning::Default => "default",
            ClusterTuning::Fast => "fast",
        }
    }
}

/// The agent's resolved, validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentConfig {
    /// This node's name (`node ls` HOSTNAME); defaults to the host name.
    pub node_name: String,
    /// Where the agent keeps its state and lock file.
    pub data_dir: PathBuf,
    /// The unix socket the API listens on.
    pub socket: PathBuf,
    pub log_format: LogFormat,
    /// A tracing filter, e.g. `info` or `shoal=debug`.
    pub log_level: String,
    /// The address other nodes reach this node at, when set: the default of `swarm init/join
    /// --advertise-addr` and standalone gossip's address. Unset, those use the host's address
    /// (its only interface's, else the default route's).
    pub advertise_addr: Option<IpAddr>,
    /// Control plane, QUIC (udp).
    pub control_port: u16,
    /// Gossip, SWIM over udp and bulk sync over tcp.
    pub gossip_port: u16,
    /// VXLAN data path (udp).
    pub data_path_port: u16,
    /// WireGuard for encrypted overlays (udp).
    pub wireguard_port: u16,
    /// The range of WireGuard tunnel addresses (each node's: the range plus the low bits of its
    /// data-path address). The same on every node; it must hold no address in use on the hosts.
    pub wireguard_tunnel_prefix: ipnet::Ipv4Net,
    /// Also serve `/metrics` over TCP here, for a Prometheus scraper.
    pub metrics_addr: Option<SocketAddr>,
    /// The gossip key (64 hex digits in a file). With it the agent joins gossip at start; without
    /// it gossip waits for the control plane to hand out keys.
    pub gossip_key_file: Option<PathBuf>,
    /// Gossip peers to join at start, `IP:PORT`.
    pub gossip_seeds: Vec<SocketAddr>,
    /// Control-plane timings.
    pub cluster_tuning: ClusterTuning,
    /// How often the leader replaces the gossip key (it also does at once on `node rm` and
    /// `node demote`).
    #[serde(serialize_with = "as_humantime")]
    pub gossip_key_rotation: std::time::Duration,
    /// Where a manager serves the visualizer page (None: off).
    pub ui_addr: Option<SocketAddr>,
    /// Prefix of the network namespaces this node makes (tasks `PREFIX-t-…`, overlay sandboxes
    /// `PREFIX-ov-…`, the ingress sandbox `PREFIX-ingress`).
    pub netns_prefix: String,
    /// Where the tasks' resolver reads the upstream servers for names that are not the
    /// cluster's (re-read when it changes).
    pub dns_resolv_conf: PathBuf,
    /// A group whose members may use the API socket besides root (None: root alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
}

/// The TOML file: every key optional, unknown keys rejected.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_name: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub advertise_addr: Option<IpAddr>,
    pub control_port: Option<u16>,
    pub gossip_port: Option<u16>,
    pub data_path_port: Option<u16>,
    pub wireguard_port: Option<u16>,
    pub wireguard_tunnel_prefix: Option<ipnet::Ipv4Net>,
    pub metrics_addr: Option<SocketAddr>,
    pub gossip_key_file: Option<PathBuf>,
    pub gossip_seeds: Option<Vec<SocketAddr>>,
    pub cluster_tuning: Option<ClusterTuning>,
    pub gossip_key_rotation: Option<String>,
    pub ui_addr: Option<String>,
    pub netns_prefix: Option<String>,
    pub dns_resolv_conf: Option<PathBuf>,
    pub api_group: Option<String>,
}

/// Flags and environment: clap fills these (each flag also reads `SHOAL_<NAME>`).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct AgentArgs {
    /// Config file (TOML); default /etc/shoal/agent.toml when it exists.
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the merged configuration, print it, and exit (64 on error).
    #[arg(long)]
    pub check_config: bool,
    /// This node's name [default: host name].
    #[arg(long, env = "SHOAL_NODE_NAME")]
    pub node_name: Option<String>,
    /// Data directory [default: /var/lib/shoal].
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// API socket [default: /run/shoal/shoal.sock].
    #[arg(long, env = "SHOAL_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter [default: info].
    #[arg(long, env = "SHOAL_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Default of `swarm init/join --advertise-addr`, and standalone gossip's address [default:
    /// the address of the host's only interface, else of its default-route interface].
    #[arg(long, env = "SHOAL_ADVERTISE_ADDR")]
    pub advertise_addr: Option<IpAddr>,
    /// Control plane port, udp [default: 2377].
    #[arg(long, env = "SHOAL_CONTROL_PORT")]
    pub control_port: Option<u16>,
    /// Gossip port, udp+tcp [default: 7946].
    #[arg(long, env = "SHOAL_GOSSIP_PORT")]
    pub gossip_port: Option<u16>,
    /// Default of `swarm init --data-path-port`: the swarm's VXLAN port, udp [default: 4789].
    #[arg(long, env = "SHOAL_DATA_PATH_PORT")]
    pub data_path_port: Option<u16>,
    /// WireGuard port for encrypted overlays, udp [default: 51820].
    #[arg(long, env = "SHOAL_WIREGUARD_PORT")]
    pub wireguard_port: Option<u16>,
    /// Range of the WireGuard tunnel addresses; the same on every node [default: 240.0.0.0/4].
    #[arg(long, env = "SHOAL_WIREGUARD_TUNNEL_PREFIX")]
    pub wireguard_tunnel_prefix: Option<ipnet::Ipv4Net>,
    /// Also serve /metrics over TCP at this address.
    #[arg(long, env = "SHOAL_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// File holding the gossip key (64 hex digits); joins gossip at start.
    #[arg(long, env = "SHOAL_GOSSIP_KEY_FILE")]
    pub gossip_key_file: Option<PathBuf>,
    /// Gossip peer to join at start, IP:PORT (repeat, or comma-separate in SHOAL_GOSSIP_SEEDS).
    #[arg(long = "gossip-seed", env = "SHOAL_GOSSIP_SEEDS", value_delimiter = ',')]
    pub gossip_seeds: Vec<SocketAddr>,
    /// Control-plane timings: default (Swarm's) or fast (labs, tests) [default: default].
    #[arg(long, env = "SHOAL_CLUSTER_TUNING", value_enum)]
    pub cluster_tuning: Option<ClusterTuning>,
    /// How often the leader replaces the gossip key, e.g. 12h, 30m (at least 1m) [default: 12h].
    #[arg(long, env = "SHOAL_GOSSIP_KEY_ROTATION")]
    pub gossip_key_rotation: Option<String>,
    /// Where managers serve the visualizer page; '' turns it off [default: 127.0.0.1:8089].
    #[arg(long, env = "SHOAL_UI_ADDR")]
    pub ui_addr: Option<String>,
    /// Prefix of the network namespaces this node makes [default: shoal].
    #[arg(long, env = "SHOAL_NETNS_PREFIX")]
    pub netns_prefix: Option<String>,
    /// Upstream resolvers of the tasks' DNS, for names outside the cluster [default: /etc/resolv.conf].
    #[arg(long, env = "SHOAL_DNS_RESOLV_CONF")]
    pub dns_resolv_conf: Option<PathBuf>,
    /// A group whose members may use the API socket besides root [default: root alone].
    #[arg(long, env = "SHOAL_API_GROUP")]
    pub api_group: Option<String>,
}

/// A configuration error; it names the field (or the file) that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("config field `{field}`: {message}")]
    Field { field: &'static str, message: String },
}

/// The leader's gossip key period unless configured (Swarm rotates its data-plane keys every
/// 12 h).
pub const DEFAULT_GOSSIP_KEY_ROTATION: std::time::Duration =
    std::time::Duration::from_secs(12 * 3600);

/// The shortest configurable period: each rotation waits for every node to confirm each step.
const MIN_GOSSIP_KEY_ROTATION: std::time::Duration = std::time::Duration::from_secs(60);

fn as_humantime<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn field(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Field { field, message: message.into() }
}

impl FileConfig {
    /// Parses a TOML document; the error names the offending key or value.
    pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }

    /// Reads the file named by `--config`, or the default file when it exists.
    pub fn load(explicit: Option<&Path>) -> Result<FileConfig, ConfigError> {
        let (path, required) = match explicit {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => FileConfig::parse(&path, &text),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(FileConfig::default())
            }
            Err(e) => Err(ConfigError::File { path, message: e.to_string() }),
        }
    }
}

impl AgentConfig {
    /// The control plane's timings: the chosen profile with this node's key period.
    pub fn tuning(&self) -> shoal_cluster::Tuning {
        let mut t = self.cluster_tuning.tuning();
        t.gossip_key_rotation = self.gossip_key_rotation;
        t
    }

    /// Gossip's configuration for this agent at address `addr`, with one key: standalone as
    /// it is, or the start of a swarm node's (`crate::swarm`), which adds its keyring and
    /// identity.
    pub fn gossip(&self, addr: IpAddr, key: [u8; 32]) -> shoal_gossip::GossipConfig {
        use shoal_gossip::{GossipConfig, NodeId, NodeMeta, Role};
        let advertise = SocketAddr::new(addr, self.gossip_port);
        let mut g = GossipConfig::new(NodeId::from_name(&self.node_name), advertise, key);
        g.seeds = self.gossip_seeds.iter().copied().filter(|s| *s != advertise).collect();
        g.generation_file = Some(self.data_dir.join(GOSSIP_GENERATION_FILE));
        g.meta = NodeMeta {
            id: self.node_name.clone(),
            name: self.node_name.clone(),
            role: Role::Worker,
            underlay: Some(addr),
            data_port: self.data_path_port,
            ..NodeMeta::default()
        };
        g
    }

    /// Merges flags/environment over the file over defaults, then validates.
    pub fn resolve(args: &AgentArgs, file: FileConfig) -> Result<AgentConfig, ConfigError> {
        let node_name = match args.node_name.clone().or(file.node_name) {
            Some(n) => n,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into()),
        };
        let advertise_addr = args.advertise_addr.or(file.advertise_addr);
        let cfg = AgentConfig {
            node_name,
            data_dir: args.data_dir.clone().or(file.data_dir).unwrap_or(DEFAULT_DATA_DIR.into()),
            socket: args.socket.clone().or(file.socket).unwrap_or(DEFAULT_SOCKET.into()),
            log_format: args.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
            log_level: args.log_level.clone().or(file.log_level).unwrap_or_else(|| "info".into()),
            advertise_addr,
            control_port: args.control_port.or(file.control_port).unwrap_or(2377),
            gossip_port: args.gossip_port.or(file.gossip_port).unwrap_or(7946),
            data_path_port: args.data_path_port.or(file.data_path_port).unwrap_or(4789),
            wireguard_port: args.wireguard_port.or(file.wireguard_port).unwrap_or(51820),
            wireguard_tunnel_prefix: args
                .wireguard_tunnel_prefix
                .or(file.wireguard_tunnel_prefix)
                .unwrap_or(shoal_vxlan::DEFAULT_TUNNEL_PREFIX),
            metrics_addr: args.metrics_addr.or(file.metrics_addr),
            gossip_key_file: args.gossip_key_file.clone().or(file.gossip_key_file),
            gossip_seeds: if args.gossip_seeds.is_empty() {
                file.gossip_seeds.unwrap_or_default()
            } else {
                args.gossip_seeds.clone()
            },
            cluster_tuning: args.cluster_tuning.or(file.cluster_tuning).unwrap_or_default(),
            gossip_key_rotation: match args.gossip_key_rotation.clone().or(file.gossip_key_rotation)
            {
                None => DEFAULT_GOSSIP_KEY_ROTATION,
                Some(text) => match humantime::parse_duration(&text) {
                    Ok(d) if d >= MIN_GOSSIP_KEY_ROTATION => d,
                    Ok(_) => {
                        return Err(field("gossip_key_rotation", format!("{text:?}: at least 1m")));
                    }
                    Err(e) => {
                        return Err(field(
                            "gossip_key_rotation",
                            format!("{text:?} is not a duration like 12h or 30m: {e}"),
                        ));
                    }
                },
            },
            ui_addr: match args.ui_addr.clone().or(file.ui_addr).as_deref() {
                // The page shows nodes, addresses and tasks without asking who looks: local
                // only, unless the operator says where else.
                None => Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_UI_PORT))),
                Some("") => None,
                Some(a) => Some(a.parse().map_err(|_| {
                    field("ui_addr", format!("{a:?} is not IP:PORT (or '' to turn the page off)"))
                })?),
            },
            netns_prefix: args
                .netns_prefix
                .clone()
                .or(file.netns_prefix)
                .unwrap_or_else(|| "shoal".into()),
            dns_resolv_conf: args
                .dns_resolv_conf
                .clone()
                .or(file.dns_resolv_conf)
                .unwrap_or_else(|| "/etc/resolv.conf".into()),
            api_group: args.api_group.clone().or(file.api_group),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.node_name;
        if n.is_empty()
            || n.len() > 63
            || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(field(
                "node_name",
                format!("{n:?} is not a valid node name (1-63 of [A-Za-z0-9._-])"),
            ));
        }
        if self.data_dir.as_os_str().is_empty() || !self.data_dir.is_absolute() {
            return Err(field("data_dir", "must be an absolute path"));
        }
        if self.socket.as_os_str().is_empty() || !self.socket.is_absolute() {
            return Err(field("socket", "must be an absolute path"));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if self.socket.as_os_str().len() > 107 {
            return Err(field("socket", "path longer than a unix socket allows (107 bytes)"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(field(
                "log_level",
                format!("{:?} is not a valid log filter", self.log_level),
            ));
        }
        let p = &self.netns_prefix;
        if p.is_empty()
            || p.len() > 24
            || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            || p.ends_with('-')
            || p.contains("-t-")
        {
            return Err(field(
                "netns_prefix",
                format!("{p:?}: use 1-24 of [A-Za-z0-9_-], no trailing '-', no \"-t-\""),
            ));
        }
        if let Some(g) = &self.api_group {
            match nix::unistd::Group::from_name(g) {
                Ok(Some(_)) => {}
                Ok(None) => return Err(field("api_group", format!("no group named {g:?}"))),
                Err(e) => return Err(field("api_group", format!("looking up {g:?}: {e}"))),
            }
        }
        if !self.dns_resolv_conf.is_absolute() {
            return Err(field("dns_resolv_conf", "must be an absolute path"));
        }
        if let Some(a) = self.advertise_addr
            && (a.is_unspecified() || a.is_loopback() || a.is_multicast())
        {
            return Err(field("advertise_addr", format!("{a} cannot be reached by other nodes")));
        }
        validate_tunnel_prefix(self.wireguard_tunnel_prefix)
            .map_err(|e| field("wireguard_tunnel_prefix", e))?;
        let ports = [
            ("control_port", self.control_port),
            ("gossip_port", self.gossip_port),
            ("data_path_port", self.data_path_port),
            ("wireguard_port", self.wireguard_port),
        ];
        for (name, p) in ports {
            if p == 0 {
                return Err(field(name, "port 0 is not allowed"));
            }
        }
        if let Some(f) = &self.gossip_key_file {
            load_gossip_key(f).map_err(|e| field("gossip_key_file", e))?;
        }
        // Every port here is udp; two of them on one number would fight over the socket.
        for (i, (a, pa)) in ports.iter().enumerate() {
            if let Some((b, _)) = ports[i + 1..].iter().find(|(_, pb)| pb == pa) {
                return Err(field(a, format!("port {pa} is also used by `{b}`")));
            }
        }
        Ok(())
    }
}

/// Reads a gossip key file: 64 hex digits (32 bytes), surrounding white space ignored.
pub fn load_gossip_key(path: &Path) -> Result<[u8; 32], String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key)
        .map_err(|e| format!("{}: not 64 hex digits ({e})", path.display()))?;
    Ok(key)
}

/// A range for tunnel addresses: a network (no host bits), /4 to /24 (each node takes one
/// address of it, keyed by its data-path address's low bits), clear of the loopback, multicast
/// and "this network" blocks, whose addresses the kernel will not route into a TUN.
pub fn validate_tunnel_prefix(net: ipnet::Ipv4Net) -> Result<(), String> {
    if net.addr() != net.network() {
        return Err(format!("{net} has host bits set; did you mean {}?", net.trunc()));
    }
    if !(4..=24).contains(&net.prefix_len()) {
        return Err(format!("{net}: the prefix length must be 4 to 24"));
    }
    for (reserved, what) in
        [("0.0.0.0/8", "this network"), ("127.0.0.0/8", "loopback"), ("224.0.0.0/4", "multicast")]
    {
        let reserved: ipnet::Ipv4Net = reserved.parse().map_err(|_| "constant".to_owned())?;
        if net.contains(&reserved.network()) || reserved.contains(&net.network()) {
            return Err(format!("{net} overlaps {reserved} ({what})"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> AgentArgs {
        AgentArgs { advertise_addr: Some("198.18.0.1".parse().unwrap()), ..Default::default() }
    }

    #[test]
    fn good_file_is_merged_under_flags() {
        let file = FileConfig::parse(
            Path::new("t.toml"),
            "node_name = \"alpha\"\ngossip_port = 8000\nlog_format = \"json\"\n",
        )
        .unwrap();
        let mut a = args();
        a.gossip_port = Some(9000);
        let cfg = AgentConfig::resolve(&a, file).unwrap();
        assert_eq!(cfg.node_name, "alpha");
        assert_eq!(cfg.gossip_port, 9000, "the flag wins over the file");
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.data_path_port, 4789);
        assert_eq!(cfg.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(
            cfg.ui_addr,
            Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_UI_PORT))),
            "the visualizer is local unless the operator opens it"
        );
    }

    #[test]
    fn gossip_key_rotation_is_a_duration_of_at_least_a_minute() {
        let cfg = AgentConfig::resolve(&args(), FileConfig::default()).unwrap();
        assert_eq!(cfg.gossip_key_rotation, DEFAULT_GOSSIP_KEY_ROTATION);
        assert_eq!(cfg.tuning().gossip_key_rotation, DEFAULT_GOSSIP_KEY_ROTATION);
        let file = FileConfig { gossip_key_rotation: Some("90m".into()), ..Default::default() };
        let cfg = AgentConfig::resolve(&args(), file).unwrap();
        assert_eq!(cfg.tuning().gossip_key_rotation, std::time::Duration::from_secs(5400));
        for bad in ["10s", "soon"] {
            let file = FileConfig { gossip_key_rotation: Some(bad.into()), ..Default::default() };
            let err = AgentConfig::resolve(&args(), file).unwrap_err();
            assert!(err.to_string().contains("gossip_key_rotation"), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let err = FileConfig::parse(Path::new("t.toml"), "gosip_port = 1\n").unwrap_err();
        assert!(err.to_string().contains("gosip_port"), "{err}");
    }

    #[test]
    fn bad_value_names_the_field() {
        let err = FileConfig::parse(Path::new("t.toml"), "gossip_port = 70000\n").unwrap_err();
        assert!(err.to_string().contains("gossip_port"), "{err}");
        let file = FileConfig { data_path_port: Some(7946), ..Default::default() };
        let err = AgentConfig::resolve(&args(), file).unwrap_err();
        assert!(err.to_string().contains("`gossip_port`"), "{err}");
        let bad = AgentArgs { node_name: Some("no spaces".into()), ..args() };
        let err = AgentConfig::resolve(&bad, FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("`node_name`"), "{err}");
        let bad = AgentArgs { advertise_addr: Some("127.0.0.1".parse().unwrap()), ..args() };
        let err = AgentConfig::resolve(&bad, FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("`advertise_addr`"), "{err}");
    }

    #[test]
    fn tunnel_prefix_is_a_clear_range() {
        let cfg = AgentConfig::resolve(&args(), FileConfig::default()).unwrap();
        assert_eq!(cfg.wireguard_tunnel_prefix.to_string(), "240.0.0.0/4");
        let file =
            FileConfig::parse(Path::new("t.toml"), "wireguard_tunnel_prefix = \"172.31.0.0/16\"\n")
                .unwrap();
        let cfg = AgentConfig::resolve(&args(), file).unwrap();
        assert_eq!(cfg.wireguard_tunnel_prefix.to_string(), "172.31.0.0/16");
        for bad in ["172.31.0.1/16", "10.0.0.0/28", "127.0.0.0/8", "224.0.0.0/4", "0.0.0.0/2"] {
            let a = AgentArgs { wireguard_tunnel_prefix: Some(bad.parse().unwrap()), ..args() };
            let err = AgentConfig::resolve(&a, FileConfig::default()).unwrap_err();
            assert!(err.to_string().contains("`wireguard_tunnel_prefix`"), "{bad}: {err}");
        }
    }

    #[test]
    fn gossip_key_file_must_hold_64_hex_digits() {
        let dir = std::env::temp_dir().join(format!("shoal-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.key");
        std::fs::write(&good, format!("{}\n", "ab".repeat(32))).unwrap();
        let bad = dir.join("bad.key");
        std::fs::write(&bad, "abc").unwrap();
        let cfg = AgentConfig::resolve(
            &AgentArgs { gossip_key_file: Some(good), ..args() },
            FileConfig::default(),
        );
        assert!(cfg.is_ok());
        let err = AgentConfig::resolve(
            &AgentArgs { gossip_key_file: Some(bad), ..args() },
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("`gossip_key_file`"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_explicit_file_is_an_error_missing_default_is_not() {
        assert!(FileConfig::load(Some(Path::new("/nonexistent/shoal.toml"))).is_err());
    }

    /// `packaging/agent.toml`, as the README's install may copy it to /etc/shoal/agent.toml.
    const SHIPPED: &str = include_str!("../packaging/agent.toml");

    #[test]
    fn the_shipped_example_is_ready_for_a_swarm_and_changes_no_default() {
        let file = FileConfig::parse(Path::new("agent.toml"), SHIPPED).unwrap();
        let cfg = AgentConfig::resolve(&args(), file).unwrap();
        assert!(cfg.gossip_key_file.is_none(), "standalone gossip refuses `swarm init`");
        assert!(cfg.gossip_seeds.is_empty());
        assert_eq!(cfg, AgentConfig::resolve(&args(), FileConfig::default()).unwrap());
    }

    #[test]
    fn every_commented_out_example_in_the_shipped_file_parses() {
        let examples: Vec<&str> = SHIPPED
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
            .collect();
        assert!(examples.len() >= 4, "{examples:?}");
        for line in examples {
            FileConfig::parse(Path::new("agent.toml"), line)
                .unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }
}
