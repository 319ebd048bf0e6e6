//! Permanent neighbour entries inside the namespaces that hold endpoints (tasks and the ingress
//! sandbox), so no endpoint resolves a remote endpoint by ARP across the overlay.
//!
//! The sandbox's VXLAN device already holds a permanent entry for every remote endpoint (the
//! reconciler's [`Entries::neigh`]); without the same entries on the endpoint's own interface,
//! each endpoint namespace still learns them one by one through ARP, as dynamic entries. In a
//! large cluster those dynamic entries fill the kernel's neighbour table (`gc_thresh3`, shared
//! by every namespace of a host in the lab) and new flows stall on "neighbor table overflow".
//! Permanent entries are exempt from that garbage-collected limit and never go stale, so a
//! remote endpoint is reachable from the first packet and after any pause.
//!
//! Local endpoints are left to ARP: their frames stay inside the node's macvlan group and never
//! cross the overlay.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use rtnetlink::packet_route::link::InfoKind;
use shoal_netns::NetNs;

use crate::Error;
use crate::kernel;
use crate::model::Mac;
use crate::reconcile::{Change, Entries, plan};

/// Brings the permanent neighbour entries of the endpoint interface carrying `alias` in the
/// namespace `ns_name` to `remote` (remote endpoint IP → MAC): adds what is missing, replaces
/// what changed, removes permanent entries for endpoints that left. A namespace or interface
/// that is gone (the task ended) is not an error. Returns how many entries were written.
pub(crate) async fn sync(
    ns_name: &str,
    alias: &str,
    remote: &BTreeMap<Ipv4Addr, Mac>,
) -> Result<usize, Error> {
    let Ok(ns) = NetNs::open(ns_name) else {
        return Ok(0);
    };
    let nl = ns.netlink()?;
    let Some(link) = kernel::links(&nl)
        .await?
        .into_iter()
        .find(|l| l.alias.as_deref() == Some(alias) && matches!(l.kind, Some(InfoKind::MacVlan)))
    else {
        return Ok(0);
    };
    // Only neighbour entries live on a macvlan; FDB and flood entries are the VXLAN device's.
    let observed =
        Entries { neigh: kernel::read_entries(&nl, link.index).await?.neigh, ..Entries::default() };
    let desired = Entries { neigh: remote.clone(), ..Entries::default() };
    let mut n = 0;
    for change in plan(&desired, &observed) {
        if matches!(change, Change::NeighSet { .. } | Change::NeighDel { .. }) {
            kernel::apply(&nl, link.index, change).await?;
            n += 1;
        }
    }
    Ok(n)
}
