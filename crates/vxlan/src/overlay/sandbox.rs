//! A network's sandbox: the namespace holding its VXLAN device and gateway, how it is made and
//! removed, and the names and link aliases by which a restarted agent finds its sandboxes and
//! endpoints again.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};

use rtnetlink::packet_route::link::InfoKind;
use rtnetlink::packet_route::link::MacVlanMode;
use rtnetlink::{Handle, LinkMacVlan, LinkUnspec, LinkVxlan};
use shoal_netns::NetNs;

use crate::Error;
use crate::kernel::{self, nl};
use crate::model::{Mac, NetworkSpec, VNI_MIN};

/// The sandbox's own macvlan holding the network's gateway address.
const GATEWAY_LINK: &str = "gw0";
pub(super) const SANDBOX_TAG: &str = "ov-";
const NET_ALIAS: &str = "shoal-net";
const EP_ALIAS: &str = "shoal-ep";

/// One network's sandbox namespace: its VXLAN device and gateway, and the local endpoints.
#[derive(Debug)]
pub(super) struct Sandbox {
    pub(super) spec: NetworkSpec,
    pub(super) ns: NetNs,
    pub(super) nl: Handle,
    pub(super) vx: u32,
    pub(super) mtu: u32,
    /// endpoint id → the name of the task namespace that holds its macvlan
    pub(super) endpoints: BTreeMap<String, String>,
}

impl Sandbox {
    /// Makes the sandbox `name` for `spec` (replacing one left behind under that name), with
    /// a VXLAN device of `mtu` on `port` sending from `local`, created in the node's
    /// namespace (`node_nl`) and moved in.
    pub(super) async fn create(
        node_nl: &Handle,
        name: String,
        spec: &NetworkSpec,
        mtu: u32,
        local: Ipv4Addr,
        port: u16,
    ) -> Result<Sandbox, Error> {
        if NetNs::exists(&name) {
            let ns = NetNs::open(&name)?;
            let nl = ns.netlink()?;
            remove_sandbox_links(&nl).await;
            drop((nl, ns));
            NetNs::delete(&name)?;
        }
        let ns = NetNs::create(&name)?;
        let nl = match ns.netlink() {
            Ok(nl) => nl,
            Err(e) => {
                drop(ns);
                let _ = NetNs::delete(&name);
                return Err(e.into());
            }
        };
        match fill(node_nl, spec, &ns, &nl, mtu, local, port).await {
            Ok(vx) => {
                Ok(Sandbox { spec: spec.clone(), ns, nl, vx, mtu, endpoints: BTreeMap::new() })
            }
            Err(e) => {
                remove_sandbox_links(&nl).await;
                if let Ok(Some(l)) = kernel::link(node_nl, &vx_name(spec.vni)).await {
                    let _ = kernel::del_link(node_nl, l.index).await;
                }
                drop((nl, ns));
                let _ = NetNs::delete(&name);
                Err(e)
            }
        }
    }

    /// Deletes the sandbox's links (with every endpoint macvlan on its VXLAN device) and its
    /// namespace.
    pub(super) async fn destroy(self) -> Result<(), Error> {
        let name = self.ns.name().to_owned();
        remove_sandbox_links(&self.nl).await;
        drop(self);
        NetNs::delete(&name)?;
        Ok(())
    }
}

/// Fills a new sandbox: the VXLAN device (made in the node's namespace so its socket lives
/// there, then moved in) and the gateway macvlan; returns the VXLAN device's index.
async fn fill(
    node_nl: &Handle,
    spec: &NetworkSpec,
    ns: &NetNs,
    nl: &Handle,
    mtu: u32,
    local: Ipv4Addr,
    port: u16,
) -> Result<u32, Error> {
    kernel::lo_up(nl).await?;
    // Docker's pattern: create the VXLAN device in the node's namespace, so its UDP socket
    // lives there, then move it into the sandbox.
    let name = vx_name(spec.vni);
    if let Some(l) = kernel::link(node_nl, &name).await? {
        kernel::del_link(node_nl, l.index).await?;
    }
    node_nl
        .link()
        .add(
            LinkVxlan::new(&name, spec.vni)
                .port(port)
                .local(local)
                .learning(false)
                .proxy(true)
                .mtu(mtu)
                .build(),
        )
        .execute()
        .await
        .map_err(nl_err(format!("add vxlan {name} vni {}", spec.vni)))?;
    let vx = kernel::need_link(node_nl, &name).await?;
    let moved = node_nl
        .link()
        .set(LinkUnspec::new_with_index(vx.index).setns_by_fd(ns.as_fd().as_raw_fd()).build())
        .execute()
        .await;
    if let Err(e) = moved {
        let _ = kernel::del_link(node_nl, vx.index).await;
        return Err(nl_err(format!("move {name} into the sandbox"))(e));
    }
    let vx = kernel::need_link(nl, &name).await?;
    nl.link()
        .set(LinkUnspec::new_with_index(vx.index).alias(net_alias(spec)).up().build())
        .execute()
        .await
        .map_err(nl_err(format!("set {name} up")))?;
    // The gateway address answers ARP on the segment, as Docker's bridge does.
    nl.link()
        .add(
            LinkMacVlan::new(GATEWAY_LINK, vx.index, MacVlanMode::Bridge)
                .address(Mac::from_ipv4(spec.gateway).0.to_vec())
                .mtu(mtu)
                .build(),
        )
        .execute()
        .await
        .map_err(nl_err("add gateway macvlan"))?;
    let gw = kernel::need_link(nl, GATEWAY_LINK).await?;
    kernel::ensure_addr(nl, gw.index, spec.gateway, spec.subnet.prefix_len()).await?;
    kernel::set_up(nl, gw.index).await?;
    Ok(vx.index)
}

pub(super) fn fnv32(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

pub(super) fn vx_name(vni: u32) -> String {
    format!("vx-{vni:06x}")
}

pub(super) fn validate_id(what: &str, id: &str) -> Result<(), Error> {
    if id.is_empty()
        || id.len() > 64
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(Error::Invalid(format!("{what} {id:?}: use 1-64 of [A-Za-z0-9_.-]")));
    }
    Ok(())
}

pub(super) fn validate_spec(spec: &NetworkSpec) -> Result<(), Error> {
    validate_id("network id", &spec.id)?;
    if !(VNI_MIN..=crate::wire::VNI_MAX).contains(&spec.vni) {
        return Err(Error::Invalid(format!(
            "network {}: VNI {} outside {VNI_MIN}..=16777215",
            spec.id, spec.vni
        )));
    }
    if !spec.subnet.contains(&spec.gateway)
        || spec.gateway == spec.subnet.network()
        || spec.gateway == spec.subnet.broadcast()
    {
        return Err(Error::Invalid(format!(
            "network {}: gateway {} is not a host address of {}",
            spec.id, spec.gateway, spec.subnet
        )));
    }
    Ok(())
}

pub(super) fn net_alias(spec: &NetworkSpec) -> String {
    format!(
        "{NET_ALIAS} {} {} {} {} {}",
        spec.id,
        spec.vni,
        spec.subnet,
        spec.gateway,
        u8::from(spec.encrypted)
    )
}

pub(super) fn parse_net_alias(s: &str) -> Option<NetworkSpec> {
    let mut w = s.split_whitespace();
    if w.next()? != NET_ALIAS {
        return None;
    }
    let spec = NetworkSpec {
        id: w.next()?.to_owned(),
        vni: w.next()?.parse().ok()?,
        subnet: w.next()?.parse().ok()?,
        gateway: w.next()?.parse().ok()?,
        encrypted: w.next()? == "1",
    };
    validate_spec(&spec).ok()?;
    Some(spec)
}

fn nl_err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    nl(op)
}

/// Deletes the links of a sandbox, so that nothing keeps receiving for its VNI even if
/// something still holds the namespace open. Deleting the VXLAN device also deletes every
/// endpoint macvlan on it, wherever they are. (Veths and bridges are what older versions made.)
pub(super) async fn remove_sandbox_links(nl: &Handle) {
    let Ok(links) = kernel::links(nl).await else {
        return;
    };
    for l in links {
        if matches!(
            l.kind,
            Some(InfoKind::Vxlan | InfoKind::MacVlan | InfoKind::Veth | InfoKind::Bridge)
        ) {
            let _ = kernel::del_link(nl, l.index).await;
        }
    }
}

/// The alias an endpoint's macvlan carries in its task: names the sandbox and the endpoint,
/// so a restarted agent finds its endpoints (and never takes another agent's).
pub(super) fn endpoint_alias(sandbox: &str, id: &str) -> String {
    format!("{EP_ALIAS} {sandbox} {id}")
}

/// The (sandbox, endpoint id) pairs of the endpoint macvlans in one namespace.
pub(super) async fn endpoint_aliases(ns_name: &str) -> Vec<(String, String)> {
    let Ok(ns) = NetNs::open(ns_name) else {
        return Vec::new();
    };
    let Ok(nl) = ns.netlink() else {
        return Vec::new();
    };
    let links = kernel::links(&nl).await.unwrap_or_default();
    links
        .into_iter()
        .filter(|l| matches!(l.kind, Some(InfoKind::MacVlan)))
        .filter_map(|l| {
            let mut w = l.alias.as_deref()?.strip_prefix(EP_ALIAS)?.split_whitespace();
            let (sandbox, id) = (w.next()?, w.next()?);
            w.next().is_none().then(|| (sandbox.to_owned(), id.to_owned()))
        })
        .collect()
}

/// Deletes an endpoint's macvlan from the task namespace holding it; a namespace or interface
/// that is already gone (the task ended) is not an error.
pub(super) async fn remove_endpoint_link(ns_name: &str, alias: &str) -> Result<(), Error> {
    let Ok(ns) = NetNs::open(ns_name) else {
        return Ok(());
    };
    let nl = ns.netlink()?;
    for l in kernel::links(&nl).await? {
        if l.alias.as_deref() == Some(alias) {
            kernel::del_link(&nl, l.index).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> NetworkSpec {
        NetworkSpec {
            id: "net-1".into(),
            vni: 4097,
            subnet: "10.0.1.0/24".parse().expect("subnet"),
            gateway: Ipv4Addr::new(10, 0, 1, 1),
            encrypted: true,
        }
    }

    #[test]
    fn alias_round_trips() {
        assert_eq!(parse_net_alias(&net_alias(&spec())), Some(spec()));
        assert_eq!(parse_net_alias("something else"), None);
        assert_eq!(parse_net_alias("shoal-net x 12 10.0.0.0/24 10.0.0.1 0"), None);
    }

    #[test]
    fn spec_validation_names_the_problem() {
        let mut s = spec();
        s.vni = 100;
        assert!(validate_spec(&s).unwrap_err().to_string().contains("VNI 100"));
        let mut s = spec();
        s.gateway = Ipv4Addr::new(10, 0, 2, 1);
        assert!(validate_spec(&s).unwrap_err().to_string().contains("gateway"));
        let mut s = spec();
        s.id = "a b".into();
        assert!(validate_spec(&s).is_err());
        assert!(validate_spec(&spec()).is_ok());
    }
}
