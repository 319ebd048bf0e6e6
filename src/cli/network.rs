//! `shoal network`: create, list, inspect and remove overlay networks.

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use shoal_model::NetworkCreate;

use crate::api::client::Host;
use crate::api::networks::NetworkView;

use super::{EachName, segment};

#[derive(Debug, Subcommand)]
pub(super) enum NetworkCmd {
    /// Create an overlay network.
    Create {
        /// Driver (only `overlay`).
        #[arg(short, long, default_value = "overlay")]
        driver: String,
        /// Driver options: `encrypted` turns on WireGuard between nodes.
        #[arg(short, long = "opt")]
        opt: Vec<String>,
        /// Standalone tasks (`shoal run`) may attach.
        #[arg(long)]
        attachable: bool,
        /// The routing mesh's network (once `network rm ingress` removed the one `swarm init`
        /// made).
        #[arg(long)]
        ingress: bool,
        /// Subnet in CIDR form [default: the next free /24 of the pool].
        #[arg(long)]
        subnet: Option<ipnet::Ipv4Net>,
        #[command(flatten)]
        label: super::Labels,
        name: String,
    },
    /// List networks.
    Ls {
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show networks: subnet, VNI, VIPs, tasks and CNI containers per node, this node's peers
    /// (JSON).
    Inspect {
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove networks (refused while in use).
    Rm {
        #[arg(required = true)]
        networks: Vec<String>,
    },
}

/// Runs one `shoal network` verb against the agent at `host`; exit 1 if any network named
/// failed.
pub(super) async fn run(host: &Host, cmd: &NetworkCmd) -> anyhow::Result<ExitCode> {
    let mut each = EachName::default();
    match cmd {
        NetworkCmd::Create { driver, opt, attachable, ingress, subnet, label, name } => {
            let mut req = NetworkCreate {
                name: name.clone(),
                driver: Some(driver.clone()),
                subnet: *subnet,
                attachable: *attachable,
                ingress: *ingress,
                ..NetworkCreate::default()
            };
            for o in opt {
                match o.as_str() {
                    "encrypted" | "encrypted=true" | "encrypted=" => req.encrypted = true,
                    _ => bail!("unknown network option {o:?}: shoal overlays take 'encrypted'"),
                }
            }
            req.labels.extend(label.labels.iter().cloned());
            let r: serde_json::Value = host.post_json("/networks", &req).await?;
            println!("{}", r["id"].as_str().unwrap_or_default());
        }
        NetworkCmd::Ls { quiet } => {
            let nets: Vec<NetworkView> = host.get_json("/networks").await?;
            if !quiet {
                println!(
                    "{:<26} {:<16} {:<8} {:<8} {:<18} {:<6} FLAGS",
                    "NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNET", "VNI"
                );
            }
            for v in nets {
                let n = &v.network;
                if *quiet {
                    println!("{}", n.id);
                    continue;
                }
                let mut flags = Vec::new();
                if n.ingress {
                    flags.push("ingress");
                }
                if n.attachable {
                    flags.push("attachable");
                }
                if n.encrypted {
                    flags.push("encrypted");
                }
                println!(
                    "{:<26} {:<16} {:<8} {:<8} {:<18} {:<6} {}",
                    n.id,
                    n.name,
                    n.driver,
                    "swarm",
                    n.subnet.to_string(),
                    n.vni,
                    flags.join(",")
                );
            }
        }
        NetworkCmd::Inspect { networks } => {
            let path = |n: &str| Ok(format!("/networks/{}", segment("network", n)?));
            each.inspect(host, networks, path).await?;
        }
        NetworkCmd::Rm { networks } => {
            let path = |n: &str| Ok(format!("/networks/{}", segment("network", n)?));
            each.remove(host, networks, path).await;
        }
    }
    Ok(each.exit_code())
}
