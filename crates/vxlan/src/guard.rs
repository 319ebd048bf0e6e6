//! The nftables guard of encrypted networks: a kernel VXLAN device accepts cleartext frames for
//! its VNI from anyone who reaches the data-path port, so frames for an encrypted VNI that did
//! not come out of the WireGuard TUN are dropped (and counted) before the VXLAN socket sees them.
//! Applied atomically as a text ruleset through `nft -f -` inside the node's namespace.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::{Error, NodeNs};

/// Name of the nftables table (family `inet`).
pub const TABLE: &str = "shoal_guard";

/// The ruleset that makes the guard match `vnis` (an empty set removes the table).
pub fn ruleset(data_port: u16, tun: &str, vnis: &BTreeSet<u32>) -> String {
    // Declaring the table first makes the delete succeed whether or not it existed.
    let mut s = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    if vnis.is_empty() {
        return s;
    }
    let elems: Vec<String> = vnis.iter().map(u32::to_string).collect();
    s.push_str(&format!(
        "table inet {TABLE} {{\n  set encrypted_vnis {{ typeof @th,96,24; elements = {{ {} }} }}\n  chain input {{ type filter hook input priority -200; policy accept;\n    udp dport {data_port} iifname != \"{tun}\" @th,96,24 @encrypted_vnis counter drop\n  }}\n}}\n",
        elems.join(", ")
    ));
    s
}

fn nft(node: &NodeNs, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let input = stdin.map(str::to_owned);
    node.run(move || -> Result<String, Error> {
        let mut child = Command::new("nft")
            .args(&args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Nft(format!("cannot run nft: {e}")))?;
        if let (Some(text), Some(mut w)) = (input, child.stdin.take()) {
            w.write_all(text.as_bytes())
                .map_err(|e| Error::Nft(format!("writing the ruleset to nft: {e}")))?;
        }
        let out =
            child.wait_with_output().map_err(|e| Error::Nft(format!("waiting for nft: {e}")))?;
        if !out.status.success() {
            return Err(Error::Nft(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })?
}

/// Applies the guard for `vnis` in the node's namespace (atomically replacing the old one).
pub fn apply(node: &NodeNs, data_port: u16, tun: &str, vnis: &BTreeSet<u32>) -> Result<(), Error> {
    nft(node, &["-f", "-"], Some(&ruleset(data_port, tun, vnis))).map(|_| ())
}

/// Packets the guard has dropped so far (0 when the table is absent).
pub fn drops(node: &NodeNs) -> u64 {
    let Ok(text) = nft(node, &["list", "table", "inet", TABLE], None) else {
        return 0;
    };
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_lists_vnis_and_port() {
        let v: BTreeSet<u32> = [4097, 4242].into_iter().collect();
        let r = ruleset(4789, "shoal-wg", &v);
        assert!(r.contains("elements = { 4097, 4242 }"));
        assert!(r.contains("udp dport 4789 iifname != \"shoal-wg\""));
        assert!(r.starts_with("table inet shoal_guard\ndelete table inet shoal_guard\n"));
    }

    #[test]
    fn empty_set_only_removes() {
        let r = ruleset(4789, "shoal-wg", &BTreeSet::new());
        assert_eq!(r, "table inet shoal_guard\ndelete table inet shoal_guard\n");
    }
}
