//! `shoal version` and `shoal info`: what the client and the agent say about themselves.

use crate::api::client::Host;
use crate::api::{NodeInfo, VersionInfo};

/// `shoal version`: the client's version, then the agent's.
pub(super) async fn version(host: &Host) -> anyhow::Result<()> {
    let me = VersionInfo::current();
    println!(
        "Client:\n Version:      {}\n API version:  {}\n OS/Arch:      {}/{}",
        me.version, me.api_version, me.os, me.arch
    );
    let agent: VersionInfo = host.get_json("/version").await?;
    println!(
        "\nAgent:\n Version:      {}\n API version:  {}\n OS/Arch:      {}/{}",
        agent.version, agent.api_version, agent.os, agent.arch
    );
    Ok(())
}

/// `shoal info`: what the agent knows about its node, as text or (`json`) as the API has it.
pub(super) async fn info(host: &Host, json: bool) -> anyhow::Result<()> {
    let info: NodeInfo = host.get_json("/info").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print_info(&info);
    }
    Ok(())
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
