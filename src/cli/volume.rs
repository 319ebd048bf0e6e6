//! `shoal volume create/ls/inspect/rm`: Docker's verbs, flags and columns for the named volumes
//! of the node the command talks to (volumes are per node; `--node`/`-H` picks another).

use anyhow::bail;
use clap::Subcommand;

use crate::api::client::Host;
use crate::api::volumes::VolumeCreate;
use crate::volumes::{self, Volume};

#[derive(Debug, Subcommand)]
pub(super) enum VolumeCmd {
    /// Create a volume on this node (`<data dir>/volumes/NAME/_data`).
    Create {
        #[command(flatten)]
        label: super::Labels,
        name: String,
    },
    /// List this node's volumes.
    Ls {
        /// Only names.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show volumes (JSON), with their mountpoints.
    Inspect {
        #[arg(required = true)]
        volumes: Vec<String>,
    },
    /// Remove volumes and their data (refused while a task of this node uses one).
    Rm {
        /// No error for a volume that does not exist.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        volumes: Vec<String>,
    },
}

/// A volume name, checked before it goes into a URL path.
fn name(s: &str) -> anyhow::Result<&str> {
    if let Err(e) = volumes::check_name(s) {
        bail!("{e}");
    }
    Ok(s)
}

/// Runs one `shoal volume` verb against the agent at `host`.
pub(super) async fn run(host: &Host, cmd: &VolumeCmd) -> anyhow::Result<()> {
    match cmd {
        VolumeCmd::Create { label, name } => {
            let mut req = VolumeCreate { name: name.clone(), ..VolumeCreate::default() };
            req.labels.extend(label.labels.iter().cloned());
            let v: Volume = host.post_json("/volumes", &req).await?;
            println!("{}", v.name);
        }
        VolumeCmd::Ls { quiet } => {
            let vols: Vec<Volume> = host.get_json("/volumes").await?;
            if *quiet {
                for v in &vols {
                    println!("{}", v.name);
                }
                return Ok(());
            }
            let node = vols.first().map(|v| v.node.clone());
            println!("{:<10} VOLUME NAME", "DRIVER");
            for v in &vols {
                println!("{:<10} {}", v.driver, v.name);
            }
            let node = match node {
                Some(n) => n,
                None => host.get_json::<crate::api::NodeInfo>("/info").await?.node_name,
            };
            eprintln!("(volumes of node {node}: volumes are per node; other nodes keep their own)");
        }
        VolumeCmd::Inspect { volumes } => {
            let mut out = Vec::new();
            for v in volumes {
                let v: serde_json::Value = host.get_json(&format!("/volumes/{}", name(v)?)).await?;
                out.push(v);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        VolumeCmd::Rm { force, volumes } => {
            // As Docker does: every volume is tried, the errors are reported together.
            let mut errors = Vec::new();
            for v in volumes {
                let path = name(v).map(|n| format!("/volumes/{n}?force={force}"));
                match async { host.delete(&path?).await }.await {
                    Ok(()) => println!("{v}"),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            if !errors.is_empty() {
                bail!("{}", errors.join("\n"));
            }
        }
    }
    Ok(())
}
