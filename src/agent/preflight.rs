//! The kernel preflight: before the agent serves anything it checks, for real, that this kernel
//! has what the data path needs, so a missing feature is one clear message at start instead of
//! a failure deep inside the first `network create` or service.
//!
//! In a throwaway network namespace (unique per process, deleted again also when a check
//! fails, which takes every link and table made in it along) it makes a VXLAN link, a macvlan
//! link on it, a TUN device, and the real nftables tables of the encrypted-network guard and
//! of service VIPs, so every nf_tables expression the agent uses is loaded and accepted. It
//! takes a few tens of milliseconds.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::net::Ipv4Addr;
use std::sync::Arc;

use rtnetlink::packet_route::link::MacVlanMode;
use rtnetlink::{LinkMacVlan, LinkVxlan};
use shoal_netns::NetNs;
use shoal_vip::VipRule;
use shoal_vxlan::NodeNs;

/// A kernel feature the agent needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Network namespaces (tasks, sandboxes and the lab live in them).
    NetNs,
    /// VXLAN links (the overlay).
    Vxlan,
    /// macvlan links (tasks' and the gateway's interfaces on an overlay).
    Macvlan,
    /// TUN devices (the WireGuard data path of encrypted networks).
    Tun,
    /// nf_tables with the expressions of the guard and of service VIPs.
    NfTables,
}

impl Feature {
    /// What the feature is, with the kernel options and modules that provide it.
    pub fn describe(self) -> &'static str {
        match self {
            Feature::NetNs => "network namespaces (CONFIG_NET_NS)",
            Feature::Vxlan => "VXLAN links (CONFIG_VXLAN, module vxlan)",
            Feature::Macvlan => "macvlan links (CONFIG_MACVLAN, module macvlan)",
            Feature::Tun => "TUN devices (/dev/net/tun; CONFIG_TUN, module tun)",
            Feature::NfTables => {
                "nf_tables with conntrack, NAT, numgen, reject and sets (CONFIG_NF_TABLES, \
                 CONFIG_NFT_CT, CONFIG_NFT_NAT, CONFIG_NFT_NUMGEN, CONFIG_NFT_REJECT, \
                 CONFIG_NFT_COUNTER where separate)"
            }
        }
    }
}

/// A feature the kernel lacks (or refused), and what it said.
#[derive(Debug, thiserror::Error)]
#[error("this kernel cannot run the shoal agent: {} is not usable: {detail}", .feature.describe())]
pub struct Missing {
    /// The feature.
    pub feature: Feature,
    /// The error the check met.
    pub detail: String,
}

fn missing(feature: Feature) -> impl FnOnce(&dyn Display) -> Missing {
    move |e| Missing { feature, detail: e.to_string() }
}

/// Deletes the throwaway namespace when the preflight ends, however it ends.
struct Throwaway(String);

impl Drop for Throwaway {
    fn drop(&mut self) {
        if let Err(e) = NetNs::delete(&self.0) {
            tracing::warn!(netns = %self.0, error = %e, "removing the preflight namespace");
        }
    }
}

/// The throwaway namespace's name for this process.
pub fn netns_name() -> String {
    format!("shoal-preflight-{}", std::process::id())
}

/// Whether this process has CAP_NET_ADMIN and CAP_SYS_ADMIN (bits 12 and 21 of `CapEff`), which
/// the data path (and so the preflight) needs: root has them, and so has the packaged service.
fn privileged() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let need = (1 << 12) | (1 << 21);
    eff & need == need
}

/// The agent's start: [`check`] when the agent is privileged. Without the privileges nothing of
/// the data path can work anyway (and the checks would only report that), so the agent says so
/// and goes on: its API still answers.
pub async fn at_start() -> Result<(), Missing> {
    if !privileged() {
        tracing::warn!(
            "without CAP_NET_ADMIN and CAP_SYS_ADMIN: kernel preflight skipped; \
             networks and services will fail"
        );
        return Ok(());
    }
    let started = std::time::Instant::now();
    check().await?;
    tracing::debug!(took = ?started.elapsed(), "kernel preflight passed");
    Ok(())
}

/// Checks every [`Feature`]; the first one missing is the error. Must run in a tokio runtime.
pub async fn check() -> Result<(), Missing> {
    let name = netns_name();
    // A namespace of this name can only be left over by a killed process that had our pid.
    let _ = NetNs::delete(&name);
    let ns = NetNs::create(&name).map_err(|e| missing(Feature::NetNs)(&e))?;
    let _delete = Throwaway(name);
    in_namespace(Arc::new(ns)).await
}

async fn in_namespace(ns: Arc<NetNs>) -> Result<(), Missing> {
    let nl = ns.netlink().map_err(|e| missing(Feature::NetNs)(&e))?;
    nl.link()
        .add(LinkVxlan::new("pf-vxlan", 4242).port(4789).learning(false).build())
        .execute()
        .await
        .map_err(|e| missing(Feature::Vxlan)(&e))?;
    let vx = shoal_netns::link_index(&nl, "pf-vxlan")
        .await
        .ok_or_else(|| missing(Feature::Vxlan)(&"the new link is not listed"))?;
    nl.link()
        .add(LinkMacVlan::new("pf-macvlan", vx, MacVlanMode::Bridge).build())
        .execute()
        .await
        .map_err(|e| missing(Feature::Macvlan)(&e))?;
    drop(nl);

    let tun = "pf-tun";
    ns.run(|| shoal_vxlan::wg::check_tun(tun))
        .map_err(|e| missing(Feature::NetNs)(&e))?
        .map_err(|e| missing(Feature::Tun)(&e))?;

    let vnis: BTreeSet<u32> = [4242].into_iter().collect();
    shoal_vxlan::guard::apply(&NodeNs::Named(ns.clone()), 4789, tun, &vnis)
        .map_err(|e| missing(Feature::NfTables)(&e))?;
    let ip = |d| Ipv4Addr::new(10, 0, 0, d);
    let vips = [
        VipRule { vip: ip(2), backends: vec![ip(10), ip(11)] },
        VipRule { vip: ip(3), backends: vec![ip(10)] },
        VipRule { vip: ip(4), backends: Vec::new() },
    ];
    shoal_vip::apply(&ns, &vips).map_err(|e| missing(Feature::NfTables)(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_feature_is_named_with_its_kernel_option() {
        let e = Missing { feature: Feature::Tun, detail: "No such file or directory".into() };
        let text = e.to_string();
        assert!(text.contains("cannot run the shoal agent"), "{text}");
        assert!(text.contains("TUN devices (/dev/net/tun; CONFIG_TUN"), "{text}");
        assert!(text.ends_with("not usable: No such file or directory"), "{text}");
        for f in [Feature::NetNs, Feature::Vxlan, Feature::Macvlan, Feature::NfTables] {
            assert!(f.describe().contains("CONFIG_"), "{f:?}");
        }
    }

    /// Root only: on this kernel every feature is there, and the throwaway namespace is gone
    /// afterwards.
    #[tokio::test]
    async fn passes_here_and_leaves_nothing_behind() {
        if !shoal_netns::testing::require_root("passes_here_and_leaves_nothing_behind") {
            return;
        }
        assert!(privileged(), "root has CAP_NET_ADMIN and CAP_SYS_ADMIN");
        check().await.expect("this kernel has every feature");
        assert!(!NetNs::exists(&netns_name()), "preflight namespace left behind");
        assert!(!NetNs::list().contains(&netns_name()));
    }
}
