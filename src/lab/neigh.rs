//! The host's neighbour-table thresholds while labs run.
//!
//! Every network namespace on a host shares one kernel ARP table, limited by
//! `net.ipv4.neigh.default.gc_thresh1/2/3` (128/512/1024 by default). A lab puts a whole
//! cluster's sandboxes and tasks in that one table: a 10-node lab with a 50-replica published
//! service needs more than 1024 entries, and at the limit the kernel drops new flows with
//! "neighbor table overflow". So `lab up` raises the thresholds, and `lab down` of the last lab
//! on the host puts back the values it found. The values found are kept in a file, so labs
//! brought up and down in any order (or by different `shoal` processes) restore them once.

use std::fs;
use std::path::Path;

use anyhow::Context;

const SYSCTLS: [(&str, u64); 3] = [
    ("/proc/sys/net/ipv4/neigh/default/gc_thresh1", 8192),
    ("/proc/sys/net/ipv4/neigh/default/gc_thresh2", 32768),
    ("/proc/sys/net/ipv4/neigh/default/gc_thresh3", 65536),
];

/// The thresholds found before the first lab raised them: one value per line, in `SYSCTLS` order.
const SAVED: &str = "/run/shoal/lab-neigh-thresholds";

fn read(path: &str) -> anyhow::Result<u64> {
    let s = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    s.trim().parse().with_context(|| format!("{path} holds {s:?}"))
}

fn write(path: &str, v: u64) -> anyhow::Result<()> {
    fs::write(path, format!("{v}\n")).with_context(|| format!("writing {v} to {path}"))
}

/// Raises the thresholds to at least the lab's values, first saving what the host had (unless
/// another lab already did).
pub fn raise() -> anyhow::Result<()> {
    if !Path::new(SAVED).exists() {
        let found: Vec<String> = SYSCTLS
            .iter()
            .map(|(p, _)| read(p).map(|v| v.to_string()))
            .collect::<Result<_, _>>()?;
        if let Some(dir) = Path::new(SAVED).parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(SAVED, found.join("\n") + "\n").with_context(|| format!("writing {SAVED}"))?;
    }
    // gc_thresh3 first when raising: the kernel keeps 1 <= 2 <= 3 meaningful at every step.
    for (path, want) in SYSCTLS.iter().rev() {
        if read(path)? < *want {
            write(path, *want)?;
        }
    }
    Ok(())
}

/// Puts back the thresholds saved by [`raise`], when no lab is left on the host.
pub fn restore_if_last(labs_left: usize) -> anyhow::Result<()> {
    if labs_left > 0 {
        return Ok(());
    }
    let Ok(saved) = fs::read_to_string(SAVED) else {
        return Ok(());
    };
    let values: Vec<u64> = saved.lines().filter_map(|l| l.trim().parse().ok()).collect();
    if values.len() != SYSCTLS.len() {
        // Unreadable: leave the raised values, which are harmless, and drop the file.
        let _ = fs::remove_file(SAVED);
        anyhow::bail!("{SAVED} holds {saved:?}; the neighbour thresholds were left raised");
    }
    // gc_thresh1 first when lowering, for the same reason.
    for ((path, _), v) in SYSCTLS.iter().zip(values) {
        write(path, v)?;
    }
    fs::remove_file(SAVED).with_context(|| format!("removing {SAVED}"))
}
