//! `shoal node`: the swarm's nodes as a manager sees them (`ls`, `inspect`, `update`, `promote`,
//! `demote`, `rm`), and `inspect --pretty`, each node's data path as the node itself sees it.

use std::process::ExitCode;

use clap::Subcommand;

use crate::api::NodeInfo;
use crate::api::client::Host;

use super::EachName;

#[derive(Debug, Subcommand)]
pub(super) enum NodeCmd {
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
        /// Add or change a label, KEY=VALUE.
        #[arg(long = "label-add", value_parser = super::label)]
        label_add: Vec<(String, String)>,
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

/// A node's id, id prefix or host name, checked before it goes into a URL path.
fn node_segment(s: &str) -> anyhow::Result<&str> {
    super::segment("node", s).map_err(|_| {
        anyhow::anyhow!("invalid node {s:?}: use its id, an id prefix or its host name")
    })
}

/// Runs one `shoal node` verb against the agent at `host`; exit 1 if any node named failed.
pub(super) async fn run(host: &Host, cmd: &NodeCmd) -> anyhow::Result<ExitCode> {
    use crate::api::swarm::Warnings;
    use shoal_cluster::NodeView;
    let mut each = EachName::default();
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
            let path = |n: &str| Ok(format!("/nodes/{}", node_segment(n)?));
            each.inspect(host, nodes, path).await?;
        }
        NodeCmd::Inspect { nodes, pretty: true } => {
            for (i, node) in nodes.iter().enumerate() {
                let nd = async {
                    let n: NodeView =
                        host.get_json(&format!("/nodes/{}", node_segment(node)?)).await?;
                    let d: serde_json::Value = host
                        .get_json(&format!("/nodes/{}/diagnostics", node_segment(node)?))
                        .await?;
                    anyhow::Ok((n, d))
                };
                if let Some((n, d)) = each.check(nd.await) {
                    if i > 0 {
                        println!();
                    }
                    print_node_pretty(&n, &d);
                }
            }
        }
        NodeCmd::Update { availability, label_add, label_rm, node } => {
            let update = shoal_cluster::NodeUpdate {
                availability: availability
                    .as_deref()
                    .map(str::parse)
                    .transpose()
                    .map_err(|_| anyhow::anyhow!("invalid availability"))?,
                label_add: label_add.clone(),
                label_rm: label_rm.clone(),
            };
            let () =
                host.post_json(&format!("/nodes/{}/update", node_segment(node)?), &update).await?;
            println!("{node}");
        }
        NodeCmd::Promote { nodes } | NodeCmd::Demote { nodes } => {
            let promote = matches!(cmd, NodeCmd::Promote { .. });
            for node in nodes {
                let verb = if promote { "promote" } else { "demote" };
                let w = async {
                    host.post_json::<_, Warnings>(
                        &format!("/nodes/{}/{verb}", node_segment(node)?),
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
            let path = |n: &str| Ok(format!("/nodes/{}?force={force}", node_segment(n)?));
            each.remove(host, nodes, path).await;
        }
    }
    Ok(each.exit_code())
}

/// `node inspect --pretty`: the node record, then its data path as the node sees it.
fn print_node_pretty(n: &shoal_cluster::NodeView, d: &serde_json::Value) {
    let r = &n.record;
    println!("ID:                 {}", r.id);
    println!("Hostname:           {}", r.hostname);
    println!("Status:             {} {}", r.status, r.status_message);
    println!("Availability:       {}", r.availability);
    println!("Role:               {}", r.role);
    if let Some(m) = &n.manager_status {
        println!("Manager Status:     {m}");
    }
    println!("Address:            {} (control {})", r.data_addr, r.addr);
    if !r.labels.is_empty() {
        let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("Labels:             {}", labels.join(", "));
    }
    println!("Engine Version:     {}", r.engine_version);
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        v => v.to_string(),
    };
    let members = d["gossip"]["members"].as_array().cloned().unwrap_or_default();
    println!("\nGossip ({} members, {} entries):", members.len(), s(&d["gossip"]["entries"]));
    for m in &members {
        println!(
            "  {:<14} {:<22} {:<8} incarnation {}",
            s(&m["name"]),
            s(&m["addr"]),
            s(&m["state"]),
            s(&m["incarnation"])
        );
    }
    let peers = d["peers"].as_array().cloned().unwrap_or_default();
    println!("\nWireGuard peers ({}):", peers.len());
    for p in &peers {
        let age =
            p["handshake_age_secs"].as_f64().map_or("never".into(), |a| format!("{a:.0}s ago"));
        println!(
            "  {:<14} {:<22} {:<12} handshake {:<10} tx {} B rx {} B",
            s(&p["node"]),
            s(&p["endpoint"]),
            if p["established"] == true { "established" } else { "down" },
            age,
            s(&p["tx_bytes"]),
            s(&p["rx_bytes"])
        );
    }
    println!("\nNetworks and forwarding entries:");
    if let Some(nets) = d["networks"].as_object() {
        for (name, n) in nets {
            println!(
                "  {name} (VNI {}, {}{}): {} local endpoint(s)",
                s(&n["vni"]),
                s(&n["subnet"]),
                if n["encrypted"] == true { ", encrypted" } else { "" },
                n["local_endpoints"].as_array().map_or(0, Vec::len)
            );
            for e in n["remote"].as_array().into_iter().flatten() {
                println!("    {:<16} {}  -> {}", s(&e["ip"]), s(&e["mac"]), s(&e["node"]));
            }
        }
    }
    println!("\nRouting mesh:");
    for svc in d["mesh"].as_array().into_iter().flatten() {
        println!(
            "  {} (refused for want of a backend: {}; client address kept {}, fallen back {})",
            s(&svc["service"]),
            s(&svc["no_backend"]),
            s(&svc["client_addr_kept"]),
            s(&svc["client_addr_fallback"])
        );
        for b in svc["backends"].as_array().into_iter().flatten() {
            println!(
                "    {:<16} {:<6} active {} total {} errors {}",
                s(&b["addr"]),
                s(&b["health"]),
                s(&b["active"]),
                s(&b["connections"]),
                s(&b["errors"])
            );
        }
    }
    println!("\nDNS names by network:");
    if let Some(nets) = d["dns"].as_object() {
        for (net, names) in nets {
            println!("  {net}:");
            for (name, addrs) in names.as_object().into_iter().flatten() {
                let a: Vec<String> = addrs.as_array().into_iter().flatten().map(&s).collect();
                println!("    {name:<28} {}", a.join(" "));
            }
        }
    }
    let tasks = d["tasks"].as_array().cloned().unwrap_or_default();
    println!("\nTasks on this node ({}):", tasks.len());
    for t in &tasks {
        println!("  {:<28} {:<10} pid {}", s(&t["name"]), s(&t["state"]), s(&t["pid"]));
    }
}
