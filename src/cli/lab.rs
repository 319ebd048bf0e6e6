//! `shoal lab`: a whole cluster in network namespaces on this machine (`crate::lab` makes it);
//! here its verbs and what they print.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::lab;

#[derive(Debug, Subcommand)]
pub(super) enum LabCmd {
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

/// Runs one `shoal lab` verb on the lab `name`.
pub(super) async fn run(name: &str, cmd: &LabCmd) -> anyhow::Result<ExitCode> {
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
