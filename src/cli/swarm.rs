//! `shoal swarm`: create, join and leave a swarm; its join tokens, gossip key, settings and CA.

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::api::client::Host;

/// The node's addresses, as `swarm init` and `swarm join` take them.
#[derive(Debug, Args)]
pub(super) struct AddrFlags {
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
}

#[derive(Debug, Subcommand)]
pub(super) enum SwarmCmd {
    /// Make this node the first manager of a new swarm.
    Init {
        #[command(flatten)]
        addrs: AddrFlags,
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
        #[command(flatten)]
        addrs: AddrFlags,
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

/// Runs one `shoal swarm` verb against the agent at `host`.
pub(super) async fn run(host: &Host, cmd: &SwarmCmd) -> anyhow::Result<()> {
    use crate::api::swarm::{
        InitRequest, JoinRequest, JoinToken, LeaveRequest, SwarmJoined, Warnings,
    };
    match cmd {
        SwarmCmd::Init { addrs, data_path_port, default_addr_pool, cert_expiry } => {
            let req = InitRequest {
                advertise_addr: addrs.advertise_addr.clone(),
                listen_addr: addrs.listen_addr.clone(),
                data_path_addr: addrs.data_path_addr.clone(),
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
        SwarmCmd::Join { token, addrs, remote } => {
            let req = JoinRequest {
                token: token.clone(),
                remote_addr: remote.clone(),
                advertise_addr: addrs.advertise_addr.clone(),
                listen_addr: addrs.listen_addr.clone(),
                data_path_addr: addrs.data_path_addr.clone(),
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
