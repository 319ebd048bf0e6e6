//! The `shoal` command line: Docker's verbs and flags where Docker has them.
//! Every verb but `agent` and `lab` talks to an agent over its API socket.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::api::client::Host;
use crate::api::{NodeInfo, VersionInfo};
use crate::config::{AgentArgs, AgentConfig, DEFAULT_SOCKET, FileConfig, LogFormat};
use crate::lab;

/// Exit code for a configuration error (EX_USAGE), as `shoal agent --check-config` promises.
pub const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "shoal",
    version,
    about = "Swarm-style overlay networking, service DNS and a routing mesh for Linux hosts"
)]
pub struct Cli {
    /// Agent to talk to, like DOCKER_HOST [default: unix:///run/shoal/shoal.sock].
    #[arg(short = 'H', long, env = "SHOAL_HOST", global = true)]
    host: Option<String>,
    /// Talk to this node of the lab (e.g. node2) instead of the local agent.
    #[arg(long, global = true)]
    node: Option<String>,
    /// The lab that `--node` and the `lab` verbs mean.
    #[arg(long, env = "SHOAL_LAB", global = true, default_value = lab::DEFAULT_LAB)]
    lab: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the host daemon.
    Agent(AgentArgs),
    /// Show the client's and the agent's versions.
    Version,
    /// Show what the agent knows about its node.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create, join and leave a swarm.
    Swarm {
        #[command(subcommand)]
        cmd: SwarmCmd,
    },
    /// Manage the swarm's nodes (on a manager).
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Overlay networks.
    Network {
        #[command(subcommand)]
        cmd: crate::verbs::NetworkCmd,
    },
    /// Replicated and global services.
    Service {
        #[command(subcommand)]
        cmd: crate::verbs::ServiceCmd,
    },
    /// Named volumes of this node (tasks mount them with `--mount type=volume,src=NAME,...`).
    Volume {
        #[command(subcommand)]
        cmd: crate::volume_verbs::VolumeCmd,
    },
    /// Run a standalone task on this node, on an attachable network, reachable by its name.
    Run(crate::verbs::RunArgs),
    /// List standalone tasks that run (`-a`: ended ones too).
    Ps {
        /// Show all tasks, also those that ended.
        #[arg(short, long)]
        all: bool,
        /// Print task ids only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Stop standalone tasks of this node.
    Stop {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove standalone tasks of this node.
    Rm {
        /// Stop it first if it runs.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Print a standalone task's output.
    Logs {
        /// Keep printing new output until the task ends.
        #[arg(short, long)]
        follow: bool,
        name: String,
    },
    /// Print a shell completion script (e.g. `shoal completion bash > /etc/bash_completion.d/shoal`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The CNI plugin: with CNI_COMMAND set, one call as the CNI spec has it (runtimes run this
    /// binary as `shoal` from their plugin directory, with no arguments).
    Cni {
        #[command(subcommand)]
        cmd: Option<CniCmd>,
    },
    /// Built-in demo programs to run as tasks.
    Demo {
        #[command(subcommand)]
        cmd: DemoCmd,
    },
    /// A whole cluster in network namespaces on this machine (needs root).
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
}

#[derive(Debug, Subcommand)]
enum SwarmCmd {
    /// Make this node the first manager of a new swarm.
    Init {
        /// Address other nodes reach this node's control plane at: ADDR|IFACE[:PORT]
        /// [default: the address of the only interface, else of the default-route one].
        #[arg(long)]
        advertise_addr: Option<String>,
        /// Where the control plane listens: ADDR|IFACE[:PORT] [default: 0.0.0.0:2377].
        #[arg(long)]
        listen_addr: Option<String>,
        /// Address VXLAN and WireGuard traffic uses: ADDR|IFACE [default: the advertise address].
        #[arg(long)]
        data_path_addr: Option<String>,
        /// VXLAN data-path port for the whole swarm, 1024-49151 [default: 4789].
        #[arg(long)]
        data_path_port: Option<u16>,
        /// Pool that overlay subnets are cut from [default: 10.0.0.0/8].
        #[arg(long)]
        default_addr_pool: Option<ipnet::IpNet>,
        /// Validity of node certificates, e.g. 2160h; nodes renew theirs after two thirds of it
        /// [default: 2160h (90 days)].
        #[arg(long)]
        cert_expiry: Option<String>,
    },
    /// Join a swarm as a worker or a manager, as the token says.
    Join {
        #[arg(long)]
        token: String,
        /// Address other nodes reach this node's control plane at: ADDR|IFACE[:PORT]
        /// [default: the address of the only interface, else of the default-route one].
        #[arg(long)]
        advertise_addr: Option<String>,
        /// Where this node's control plane listens: ADDR|IFACE[:PORT] [default: 0.0.0.0:2377].
        #[arg(long)]
        listen_addr: Option<String>,
        /// Address VXLAN and WireGuard traffic uses: ADDR|IFACE [default: the advertise address].
        #[arg(long)]
        data_path_addr: Option<String>,
        /// A manager, HOST:PORT.
        remote: String,
    },
    /// Show (or rotate) the join token for workers or managers.
    JoinToken {
        /// Print the token only.
        #[arg(short, long)]
        quiet: bool,
        /// Replace the token; the old one no longer admits anyone.
        #[arg(long)]
        rotate: bool,
        /// worker or manager.
        role: String,
    },
    /// Leave the swarm.
    Leave {
        /// Leave even if this is the last manager or quorum would be lost.
        #[arg(short, long)]
        force: bool,
    },
    /// Rotate the swarm's gossip key now (the leader also does every `gossip_key_rotation`,
    /// and when a node is removed or demoted).
    RotateGossipKey,
    /// Change the swarm's settings (on a manager).
    Update {
        /// Validity of node certificates, e.g. 2160h; every node renews a longer one at once.
        #[arg(long)]
        cert_expiry: Option<String>,
        /// How often the leader replaces the gossip key, e.g. 12h (overrides each agent's
        /// `gossip_key_rotation`).
        #[arg(long)]
        gossip_key_rotation: Option<String>,
    },
    /// Print the swarm's CA certificate, or replace the CA (on a manager).
    Ca {
        /// Make a new CA: every node trusts it, gets a certificate from it, then stops trusting
        /// the old one. Join tokens change with it.
        #[arg(long)]
        rotate: bool,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// List the swarm's nodes.
    Ls {
        /// Print node ids only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show nodes (JSON), or with --pretty what an operator needs when something is wrong:
    /// each one's gossip view, WireGuard peers, forwarding entries, mesh backends and DNS names.
    Inspect {
        /// Readable text, with the node's data path asked of the node itself.
        #[arg(long)]
        pretty: bool,
        // Not named `node`: that id is the global `--node` (which lab node to talk to).
        #[arg(id = "target", value_name = "NODE", required = true)]
        nodes: Vec<String>,
    },
    /// Change a node's availability or labels.
    Update {
        #[arg(long, value_parser = ["active", "pause", "drain"])]
        availability: Option<String>,
        /// Add or change a label, key=value.
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        /// Remove a label.
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
        #[arg(id = "target", value_name = "NODE")]
        node: String,
    },
    /// Make workers managers.
    Promote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make managers workers.
    Demote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Remove nodes from the swarm.
    Rm {
        /// Remove even a node that is not Down.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        nodes: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CniCmd {
    /// Link this binary into a CNI plugin directory as `shoal`.
    Install {
        /// The runtime's plugin directory (containerd's and podman's `bin_dir`; Debian's
        /// plugins live in /usr/lib/cni).
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DemoCmd {
    /// The tutorial's hello-world: `GET /visitor` counts visitors in Redis at myredis:6379.
    Visitor(crate::demo::VisitorArgs),
}

#[derive(Debug, Subcommand)]
enum LabCmd {
    /// Create the hosts, the bridge, and start one agent per host.
    Up {
        /// How many hosts (node1..nodeN).
        #[arg(long, default_value_t = 3)]
        nodes: u8,
        /// Underlay /24 inside 198.18.0.0/15; the host gets .254.
        #[arg(long, default_value = lab::DEFAULT_SUBNET)]
        subnet: String,
        /// A second underlay /24 inside 198.18.0.0/15 on `eth1` of every node (bridge LAB-bd),
        /// for `swarm init/join --data-path-addr`.
        #[arg(long)]
        data_subnet: Option<String>,
        /// Run standalone gossip (a shared key, seeded through node1) instead of waiting for
        /// `shoal swarm init/join`.
        #[arg(long)]
        gossip: bool,
        /// Also run the tutorial: a swarm of all nodes, `myhelloworld` on port 8100, the
        /// encrypted `my-overlay` and `myredis` on the last node; prints the curl lines to try.
        #[arg(long, conflicts_with = "gossip")]
        demo: bool,
        /// Make only the hosts, with no agents: to install shoal on them by hand (each node is
        /// a network namespace; give it its own mount namespace to keep /etc and /var apart).
        #[arg(long, conflicts_with_all = ["gossip", "demo"])]
        no_agents: bool,
        /// The agents' upstream resolvers for names outside the cluster (a resolv.conf file)
        /// [default: this host's /etc/resolv.conf].
        #[arg(long)]
        dns_resolv_conf: Option<PathBuf>,
        /// The agents' control-plane timings: `fast` (short heartbeats and elections, to see
        /// failover happen) or `default` (the production timings of `shoal agent`).
        #[arg(long, value_enum, default_value = "fast")]
        cluster_tuning: crate::config::ClusterTuning,
    },
    /// Stop the agents and remove everything the lab made.
    Down,
    /// Show the lab's nodes and whether their agents answer.
    Status,
    /// Stop one node's agent (SIGTERM; `--kill` sends SIGKILL, like a crash).
    Stop {
        #[arg(id = "target", value_name = "NODE")]
        node: String,
        #[arg(long)]
        kill: bool,
    },
    /// Start one node's agent again, with its data.
    Start {
        #[arg(id = "target", value_name = "NODE")]
        node: String,
    },
    /// Run a command inside a node's network namespace.
    Exec {
        /// The node, e.g. node1.
        #[arg(id = "target", value_name = "NODE")]
        node: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    // A CNI runtime runs the plugin with no arguments and CNI_COMMAND set.
    if std::env::args_os().len() == 1 && std::env::var_os("CNI_COMMAND").is_some() {
        return crate::cni::main();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // A bad flag or SHOAL_* value for the agent is a configuration error: exit 64.
            let is_agent = std::env::args().nth(1).is_some_and(|a| a == "agent");
            if is_agent && e.use_stderr() {
                let _ = e.print();
                return ExitCode::from(EXIT_CONFIG);
            }
            e.exit();
        }
    };
    if let Cmd::Agent(args) = &cli.cmd {
        return run_agent(args);
    }
    quiet_on_closed_stdout();
    match &cli.cmd {
        Cmd::Cni { cmd: None } => return crate::cni::main(),
        Cmd::Cni { cmd: Some(CniCmd::Install { bin_dir }) } => {
            return match crate::cni::install(bin_dir) {
                Ok(link) => {
                    println!("{}", link.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("Error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Cmd::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(*shell, &mut Cli::command(), "shoal", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let rt =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("Error: starting the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", crate::verbs::describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// `shoal service ls | head -1`: when the reader of stdout goes away, `println!` panics with
/// "failed printing to stdout: Broken pipe" (Rust ignores SIGPIPE). A CLI should then stop
/// quietly with the status a shell gives a process killed by SIGPIPE (128 + 13), as docker
/// does. Only output can break a pipe in a CLI process (its requests to the agent go over a
/// socket, whose errors are values); every other panic still goes to the default hook.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.contains("Broken pipe") || text.contains("BrokenPipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn run_agent(args: &AgentArgs) -> ExitCode {
    let config =
        FileConfig::load(args.config.as_deref()).and_then(|f| AgentConfig::resolve(args, f));
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        match toml::to_string(&config) {
            Ok(t) => print!("{t}"),
            Err(e) => eprintln!("Error: printing the config: {e}"),
        }
        println!("# configuration OK");
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "starting the runtime");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(crate::agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &AgentConfig) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log_level);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

impl Cli {
    /// The agent this invocation talks to: `--node` (a lab node), else `-H`/`SHOAL_HOST`, else
    /// the default socket.
    fn target(&self) -> anyhow::Result<Host> {
        if let Some(node) = &self.node {
            lab::validate_name(&self.lab)?;
            let socket = lab::node_socket(&self.lab, node);
            if !socket.exists()
                && lab::LabState::load(&self.lab).is_ok_and(|s| s.node(node).is_err())
            {
                lab::LabState::load(&self.lab)?.node(node)?;
            }
            return Ok(Host { socket });
        }
        match &self.host {
            Some(h) => Host::parse(h),
            None => Ok(Host { socket: PathBuf::from(DEFAULT_SOCKET) }),
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.cmd {
        Cmd::Agent(_) | Cmd::Completion { .. } | Cmd::Cni { .. } => {
            unreachable!("handled before the runtime starts")
        }
        Cmd::Version => {
            let me = VersionInfo::current();
            println!(
                "Client:\n Version:      {}\n API version:  {}\n OS/Arch:      {}/{}",
                me.version, me.api_version, me.os, me.arch
            );
            let agent: VersionInfo = cli.target()?.get_json("/version").await?;
            println!(
                "\nAgent:\n Version:      {}\n API version:  {}\n OS/Arch:      {}/{}",
                agent.version, agent.api_version, agent.os, agent.arch
            );
        }
        Cmd::Info { json } => {
            let info: NodeInfo = cli.target()?.get_json("/info").await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_info(&info);
            }
        }
        Cmd::Lab { cmd } => return run_lab(&cli.lab, cmd).await,
        Cmd::Swarm { cmd } => run_swarm(&cli.target()?, cmd).await?,
        Cmd::Node { cmd } => return run_node(&cli.target()?, cmd).await,
        Cmd::Network { cmd } => return crate::verbs::run_network(&cli.target()?, cmd).await,
        Cmd::Service { cmd } => return crate::verbs::run_service(&cli.target()?, cmd).await,
        Cmd::Run(args) => return crate::verbs::run_container(&cli.target()?, args).await,
        Cmd::Volume { cmd } => crate::volume_verbs::run_volume(&cli.target()?, cmd).await?,
        Cmd::Ps { all, quiet } => crate::verbs::ps(&cli.target()?, *all, *quiet).await?,
        Cmd::Stop { names } => {
            let host = cli.target()?;
            let mut each = crate::verbs::EachName::default();
            for n in names {
                let r = async {
                    host.post_json::<_, ()>(
                        &format!("/containers/{}/stop", container_segment(n)?),
                        &(),
                    )
                    .await
                };
                if each.check(r.await).is_some() {
                    println!("{n}");
                }
            }
            return Ok(each.exit_code());
        }
        Cmd::Rm { force, names } => {
            let host = cli.target()?;
            let mut each = crate::verbs::EachName::default();
            for n in names {
                let r = async {
                    host.delete(&format!("/containers/{}?force={force}", container_segment(n)?))
                        .await
                };
                if each.check(r.await).is_some() {
                    println!("{n}");
                }
            }
            return Ok(each.exit_code());
        }
        Cmd::Logs { follow: true, name } => {
            crate::attach::follow_logs(&cli.target()?, container_segment(name)?).await?;
        }
        Cmd::Logs { follow: false, name } => {
            let text = cli
                .target()?
                .get(&format!("/containers/{}/logs", container_segment(name)?))
                .await?;
            print!("{}", String::from_utf8_lossy(&text));
        }
        Cmd::Demo { cmd: DemoCmd::Visitor(args) } => crate::demo::run_visitor(args.clone()).await?,
    }
    Ok(ExitCode::SUCCESS)
}

fn print_info(i: &NodeInfo) {
    println!("Node:            {}", i.node_name);
    match i.advertise_addr {
        Some(a) => println!("Advertise addr:  {a}"),
        None => println!("Advertise addr:  (chosen at swarm init/join)"),
    }
    if let Some(a) = i.swarm.as_ref().and_then(|s| s.data_path_addr) {
        println!("Data path addr:  {a}");
    }
    println!(
        "Ports:           control {}/udp, gossip {}/tcp+udp, data path {}/udp, wireguard {}/udp",
        i.ports.control, i.ports.gossip, i.ports.data_path, i.ports.wireguard
    );
    println!("Uptime:          {:.0}s", i.uptime_seconds);
    println!("Agent pid:       {}", i.pid);
    println!("Data dir:        {}", i.data_dir);
    println!("API socket:      unix://{}", i.socket);
    println!("Version:         {}", i.version);
    if let Some(g) = &i.gossip {
        println!(
            "Gossip:          {} members, {} entries, keys {:?}",
            g.members.len(),
            g.entries,
            g.key_ids
        );
        println!("  {:<12} {:<22} {:<8} GENERATION", "MEMBER", "ADDRESS", "STATE");
        for m in &g.members {
            println!("  {:<12} {:<22} {:<8} {}", m.name, m.addr, m.state, m.generation);
        }
    }
}

async fn run_lab(name: &str, cmd: &LabCmd) -> anyhow::Result<ExitCode> {
    lab::validate_name(name)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("`shoal lab` needs root: it creates network namespaces (try sudo)");
    }
    match cmd {
        LabCmd::Up {
            nodes,
            subnet,
            data_subnet,
            gossip,
            demo,
            no_agents,
            dns_resolv_conf,
            cluster_tuning,
        } => {
            let subnet = lab::parse_subnet(subnet)?;
            let data_subnet = data_subnet.as_deref().map(lab::parse_subnet).transpose()?;
            let exe = std::env::current_exe().context("finding the shoal binary")?;
            let resolv = match dns_resolv_conf {
                Some(p) => Some(std::path::absolute(p)?),
                None => None,
            };
            let s = if *no_agents {
                lab::up_hosts(name, *nodes, subnet).await?
            } else {
                lab::up(name, *nodes, subnet, data_subnet, *gossip, resolv, *cluster_tuning, &exe)
                    .await?
            };
            println!(
                "lab {} is up: {} nodes on {} (bridge {}, this host is {})",
                s.name,
                s.nodes.len(),
                s.subnet,
                s.bridge,
                s.host_addr
            );
            if let Some(d) = s.data_subnet {
                println!(
                    "data path underlay {d} on eth1 of every node (bridge {})",
                    s.data_bridge()
                );
            }
            println!("{:<8} {:<15} {:<8} SOCKET", "NODE", "ADDRESS", "PID");
            for n in &s.nodes {
                let addr = match n.data_addr {
                    Some(d) => format!("{} {d}", n.addr),
                    None => n.addr.to_string(),
                };
                println!(
                    "{:<8} {:<15} {:<8} unix://{}",
                    n.name,
                    addr,
                    n.pid.unwrap_or(0),
                    n.socket.display()
                );
            }
            let lab_flag =
                if name == lab::DEFAULT_LAB { String::new() } else { format!(" --lab {name}") };
            if *demo {
                println!("\nDeploying the tutorial (swarm init, joins, services)...");
                let d = match lab::demo::deploy(&s, &exe).await {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!(
                            "the demo failed: {e:#}\nthe lab stays up; `shoal{lab_flag} lab down` removes it"
                        );
                        return Ok(ExitCode::FAILURE);
                    }
                };
                let n = |i: usize| s.nodes[i].addr;
                let last = s.nodes.len() - 1;
                println!(
                    "myhelloworld runs 3 replicas behind port 8100 on every node; each writes \
                     {}/info.log,\nwhere the volume myhelloworld of its node is mounted.",
                    crate::demo::DEFAULT_LOG_DIR
                );
                if d.redis {
                    println!(
                        "myredis runs on {} on the encrypted overlay my-overlay.\n",
                        s.nodes[last].name
                    );
                } else {
                    println!(
                        "redis-server is not installed, so there is no myredis: the page says so.\n"
                    );
                }
                println!("Try:");
                for i in 0..s.nodes.len().min(3) {
                    println!("  curl {}:8100/visitor", n(i));
                }
                println!(
                    "  shoal{lab_flag} --node node1 volume ls\n  less {}",
                    lab::demo::info_log(&s, 0).display()
                );
                println!(
                    "  shoal{lab_flag} --node node1 service ps myhelloworld\n  shoal{lab_flag} --node node1 service scale myhelloworld=5\n  shoal{lab_flag} --node node1 node update --availability drain node1\n  shoal{lab_flag} --node node1 network inspect my-overlay\n  open http://{}:8089/ for the visualizer\n  shoal{lab_flag} lab down",
                    n(0)
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "\nTry:\n  shoal{lab_flag} --node node1 info\n  shoal{lab_flag} lab exec node1 -- ip -br addr\n  shoal{lab_flag} lab down"
            );
        }
        LabCmd::Down => {
            let r = lab::down(name).await?;
            if r.namespaces.is_empty() && r.links.is_empty() && !r.dir && r.processes == 0 {
                println!("lab {name}: nothing to remove");
            } else {
                println!(
                    "lab {name} is down: stopped {} processes, removed {} namespaces, {} links{}",
                    r.processes,
                    r.namespaces.len(),
                    r.links.len(),
                    if r.dir { " and its state directory" } else { "" }
                );
            }
        }
        LabCmd::Status => {
            let (s, nodes) = lab::status(name).await?;
            println!(
                "lab {} on {} (bridge {}, this host is {})",
                s.name, s.subnet, s.bridge, s.host_addr
            );
            println!("{:<8} {:<15} {:<6} {:<8} AGENT", "NODE", "ADDRESS", "NETNS", "PID");
            for n in nodes {
                let pid = n.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                println!(
                    "{:<8} {:<15} {:<6} {:<8} {}",
                    n.node,
                    n.addr,
                    if n.netns { "yes" } else { "MISSING" },
                    pid,
                    n.agent
                );
            }
        }
        LabCmd::Stop { node, kill } => {
            lab::stop_node(name, node, *kill).await?;
            println!("{node}: agent stopped");
        }
        LabCmd::Start { node } => {
            let exe = std::env::current_exe().context("finding the shoal binary")?;
            let pid = lab::start_node(name, node, &exe).await?;
            println!("{node}: agent started (pid {pid})");
        }
        LabCmd::Exec { node, command } => {
            let code = lab::exec(name, node, command)?;
            return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn container_segment(s: &str) -> anyhow::Result<&str> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        bail!("invalid container name {s:?}");
    }
    Ok(s)
}

fn path_segment(s: &str) -> anyhow::Result<&str> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        bail!("invalid node {s:?}: use its id, an id prefix or its host name");
    }
    Ok(s)
}

async fn run_swarm(host: &Host, cmd: &SwarmCmd) -> anyhow::Result<()> {
    use crate::api::swarm::{
        InitRequest, JoinRequest, JoinToken, LeaveRequest, SwarmJoined, Warnings,
    };
    match cmd {
        SwarmCmd::Init {
            advertise_addr,
            listen_addr,
            data_path_addr,
            data_path_port,
            default_addr_pool,
            cert_expiry,
        } => {
            let req = InitRequest {
                advertise_addr: advertise_addr.clone(),
                listen_addr: listen_addr.clone(),
                data_path_addr: data_path_addr.clone(),
                data_path_port: *data_path_port,
                default_addr_pool: *default_addr_pool,
                cert_expiry: cert_expiry.clone(),
            };
            let r: SwarmJoined = host.post_json("/swarm/init", &req).await?;
            println!("Swarm initialized: current node ({}) is now a manager.\n", r.node_id);
            if let Some(cmd) = r.worker_command {
                println!(
                    "To add a worker to this swarm, run the following command:\n\n    {cmd}\n"
                );
            }
            println!(
                "To add a manager to this swarm, run 'shoal swarm join-token manager' and follow the instructions."
            );
        }
        SwarmCmd::Join { token, advertise_addr, listen_addr, data_path_addr, remote } => {
            let req = JoinRequest {
                token: token.clone(),
                remote_addr: remote.clone(),
                advertise_addr: advertise_addr.clone(),
                listen_addr: listen_addr.clone(),
                data_path_addr: data_path_addr.clone(),
            };
            let r: SwarmJoined = host.post_json("/swarm/join", &req).await?;
            println!("This node joined a swarm as a {}.", r.role);
        }
        SwarmCmd::JoinToken { quiet, rotate, role } => {
            if !matches!(role.as_str(), "worker" | "manager") {
                bail!("unknown role {role:?}: use worker or manager");
            }
            let t: JoinToken =
                host.get_json(&format!("/swarm/join-token/{role}?rotate={rotate}")).await?;
            if *quiet {
                println!("{}", t.token);
            } else {
                if *rotate {
                    println!("Successfully rotated {role} join token.\n");
                }
                println!(
                    "To add a {role} to this swarm, run the following command:\n\n    {}\n",
                    t.command
                );
            }
        }
        SwarmCmd::Leave { force } => {
            let () = host.post_json("/swarm/leave", &LeaveRequest { force: *force }).await?;
            println!("Node left the swarm.");
        }
        SwarmCmd::RotateGossipKey => {
            let w: Warnings = host.post_json("/swarm/rotate-gossip-key", &()).await?;
            for warning in w.warnings {
                eprintln!("WARNING: {warning}");
            }
            println!("Gossip key rotated.");
        }
        SwarmCmd::Update { cert_expiry, gossip_key_rotation } => {
            let req = crate::api::swarm_ca::UpdateRequest {
                cert_expiry: cert_expiry.clone(),
                gossip_key_rotation: gossip_key_rotation.clone(),
            };
            let () = host.post_json("/swarm/update", &req).await?;
            println!("Swarm updated.");
        }
        SwarmCmd::Ca { rotate } => {
            let ca: crate::api::swarm_ca::CaCert = if *rotate {
                host.post_json("/swarm/ca?rotate=true", &()).await?
            } else {
                host.get_json("/swarm/ca").await?
            };
            for warning in ca.warnings {
                eprintln!("WARNING: {warning}");
            }
            print!("{}", ca.cert_pem);
        }
    }
    Ok(())
}

async fn run_node(host: &Host, cmd: &NodeCmd) -> anyhow::Result<ExitCode> {
    use crate::api::swarm::Warnings;
    use shoal_cluster::NodeView;
    let mut each = crate::verbs::EachName::default();
    match cmd {
        NodeCmd::Ls { quiet } => {
            let nodes: Vec<NodeView> = host.get_json("/nodes").await?;
            let me = host
                .get_json::<NodeInfo>("/info")
                .await
                .ok()
                .and_then(|i| i.swarm)
                .map(|s| s.node_id);
            if *quiet {
                for n in &nodes {
                    println!("{}", n.record.id);
                }
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<16} {:<16} {:<8} {:<14} {:<16} ENGINE VERSION",
                "ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS"
            );
            for n in &nodes {
                let r = &n.record;
                let id = r.id.to_string();
                let mark = if me.as_deref() == Some(id.as_str()) { " *" } else { "" };
                println!(
                    "{:<16} {:<16} {:<8} {:<14} {:<16} {}",
                    format!("{id}{mark}"),
                    r.hostname,
                    r.status.to_string(),
                    r.availability.to_string(),
                    n.manager_status.map(|m| m.to_string()).unwrap_or_default(),
                    r.engine_version
                );
            }
        }
        NodeCmd::Inspect { nodes, pretty: false } => {
            let mut found = Vec::new();
            for node in nodes {
                let n = async {
                    host.get_json::<serde_json::Value>(&format!("/nodes/{}", path_segment(node)?))
                        .await
                };
                found.extend(each.check(n.await));
            }
            println!("{}", serde_json::to_string_pretty(&found)?);
        }
        NodeCmd::Inspect { nodes, pretty: true } => {
            for (i, node) in nodes.iter().enumerate() {
                let nd = async {
                    let n: NodeView =
                        host.get_json(&format!("/nodes/{}", path_segment(node)?)).await?;
                    let d: serde_json::Value = host
                        .get_json(&format!("/nodes/{}/diagnostics", path_segment(node)?))
                        .await?;
                    anyhow::Ok((n, d))
                };
                if let Some((n, d)) = each.check(nd.await) {
                    if i > 0 {
                        println!();
                    }
                    crate::verbs::print_node_pretty(&n, &d);
                }
            }
        }
        NodeCmd::Update { availability, label_add, label_rm, node } => {
            let mut update = shoal_cluster::NodeUpdate {
                availability: availability
                    .as_deref()
                    .map(str::parse)
                    .transpose()
                    .map_err(|_| anyhow::anyhow!("invalid availability"))?,
                label_add: Vec::new(),
                label_rm: label_rm.clone(),
            };
            for kv in label_add {
                let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
                if k.is_empty() {
                    bail!("invalid label {kv:?}: use key=value");
                }
                update.label_add.push((k.to_owned(), v.to_owned()));
            }
            let () =
                host.post_json(&format!("/nodes/{}/update", path_segment(node)?), &update).await?;
            println!("{node}");
        }
        NodeCmd::Promote { nodes } | NodeCmd::Demote { nodes } => {
            let promote = matches!(cmd, NodeCmd::Promote { .. });
            for node in nodes {
                let verb = if promote { "promote" } else { "demote" };
                let w = async {
                    host.post_json::<_, Warnings>(
                        &format!("/nodes/{}/{verb}", path_segment(node)?),
                        &(),
                    )
                    .await
                };
                let Some(w) = each.check(w.await) else { continue };
                for warning in w.warnings {
                    eprintln!("WARNING: {warning}");
                }
                if promote {
                    println!("Node {node} promoted to a manager in the swarm.");
                } else {
                    println!("Manager {node} demoted in the swarm.");
                }
            }
        }
        NodeCmd::Rm { force, nodes } => {
            for node in nodes {
                let r = async {
                    host.delete(&format!("/nodes/{}?force={force}", path_segment(node)?)).await
                };
                if each.check(r.await).is_some() {
                    println!("{node}");
                }
            }
        }
    }
    Ok(each.exit_code())
}
