//! Thin rtnetlink helpers: links, FDB and neighbour entries, addresses, routes. Every function
//! takes a [`Handle`] whose socket lives in the namespace it should act on.

use std::net::{IpAddr, Ipv4Addr};

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAttribute, RouteType};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage, address::AddressAttribute};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::Error;
use crate::model::Mac;
use crate::reconcile::{Change, Entries};

pub(crate) fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let op = op.into();
    move |source| Error::Netlink { op, source }
}

/// Whether a netlink error is "no such entry" (deleting something already gone).
pub(crate) fn is_enoent(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENOENT || m.raw_code() == -libc::ENODEV)
}

/// What the driver needs to know about a link.
#[derive(Debug, Clone, Default)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<InfoKind>,
    pub controller: Option<u32>,
    pub alias: Option<String>,
    pub mtu: Option<u32>,
    pub mac: Option<Mac>,
}

fn link_of(msg: LinkMessage) -> Link {
    let mut l = Link { index: msg.header.index, ..Link::default() };
    for a in msg.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n,
            LinkAttribute::Controller(c) => l.controller = Some(c),
            LinkAttribute::IfAlias(s) => l.alias = Some(s),
            LinkAttribute::Mtu(m) => l.mtu = Some(m),
            LinkAttribute::Address(a) => l.mac = Mac::from_slice(&a),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(k);
                    }
                }
            }
            _ => {}
        }
    }
    l
}

/// All links in the handle's namespace.
pub(crate) async fn links(h: &Handle) -> Result<Vec<Link>, Error> {
    let mut out = Vec::new();
    let mut s = h.link().get().execute();
    while let Some(m) = s.try_next().await.map_err(nl("list links"))? {
        out.push(link_of(m));
    }
    Ok(out)
}

/// One link by name, if it exists.
pub(crate) async fn link(h: &Handle, name: &str) -> Result<Option<Link>, Error> {
    let mut s = h.link().get().match_name(name.to_owned()).execute();
    match s.try_next().await {
        Ok(m) => Ok(m.map(link_of)),
        Err(e) if is_enoent(&e) => Ok(None),
        Err(e) => Err(nl(format!("get link {name}"))(e)),
    }
}

/// One link by name, or an error naming it.
pub(crate) async fn need_link(h: &Handle, name: &str) -> Result<Link, Error> {
    link(h, name).await?.ok_or_else(|| Error::Kernel(format!("link {name} vanished")))
}

/// Deletes a link; a link already gone is fine.
pub(crate) async fn del_link(h: &Handle, index: u32) -> Result<(), Error> {
    match h.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_enoent(&e) => Ok(()),
        Err(e) => Err(nl(format!("delete link {index}"))(e)),
    }
}

/// Sets a link up.
pub(crate) async fn set_up(h: &Handle, index: u32) -> Result<(), Error> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("set link {index} up")))
}

/// Brings `lo` up.
pub(crate) async fn lo_up(h: &Handle) -> Result<(), Error> {
    let lo = need_link(h, "lo").await?;
    set_up(h, lo.index).await
}

/// The MTU of the link holding `addr` (the underlay), if some link holds it.
pub(crate) async fn mtu_of_address(h: &Handle, addr: Ipv4Addr) -> Result<Option<u32>, Error> {
    let mut s = h.address().get().execute();
    let mut idx = None;
    while let Some(m) = s.try_next().await.map_err(nl("list addresses"))? {
        let holds = m.attributes.iter().any(|a| {
            matches!(a, AddressAttribute::Address(IpAddr::V4(v)) | AddressAttribute::Local(IpAddr::V4(v)) if *v == addr)
        });
        if holds {
            idx = Some(m.header.index);
            break;
        }
    }
    let Some(idx) = idx else {
        return Ok(None);
    };
    Ok(links(h).await?.into_iter().find(|l| l.index == idx).and_then(|l| l.mtu))
}

/// Adds an address unless the link already has it.
pub(crate) async fn ensure_addr(
    h: &Handle,
    index: u32,
    addr: Ipv4Addr,
    prefix: u8,
) -> Result<(), Error> {
    let mut s = h.address().get().set_link_index_filter(index).execute();
    while let Some(m) = s.try_next().await.map_err(nl("list addresses"))? {
        if m.attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(v)) if *v == addr))
        {
            return Ok(());
        }
    }
    h.address()
        .add(index, IpAddr::V4(addr), prefix)
        .execute()
        .await
        .map_err(nl(format!("add address {addr}/{prefix}")))
}

/// Whether the main table has an IPv4 default route.
pub(crate) async fn has_default_route(h: &Handle) -> Result<bool, Error> {
    let mut s = h.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    while let Some(r) = s.try_next().await.map_err(nl("list routes"))? {
        let has_dst = r.attributes.iter().any(|a| matches!(a, RouteAttribute::Destination(_)));
        if r.header.destination_prefix_length == 0
            && !has_dst
            && r.header.kind == RouteType::Unicast
            && r.header.table == 254
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Adds `default via gw dev index`.
pub(crate) async fn add_default_route(h: &Handle, gw: Ipv4Addr, index: u32) -> Result<(), Error> {
    h.route()
        .add(RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).output_interface(index).build())
        .execute()
        .await
        .map_err(nl(format!("add default route via {gw}")))
}

/// Reads the static FDB, flood and neighbour entries of a VXLAN device.
pub(crate) async fn read_entries(h: &Handle, vx: u32) -> Result<Entries, Error> {
    let mut e = Entries::default();
    let mut s = h.neighbours().get().set_address_family(AddressFamily::Bridge).execute();
    while let Some(m) = s.try_next().await.map_err(nl("dump fdb"))? {
        if m.header.ifindex != vx || !m.header.flags.contains(NeighbourFlags::Own) {
            continue;
        }
        let mut mac = None;
        let mut dst = None;
        for a in &m.attributes {
            match a {
                NeighbourAttribute::LinkLayerAddress(b) => mac = Mac::from_slice(b),
                // In AF_BRIDGE messages the parser cannot know NDA_DST's family.
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => dst = Some(*v),
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                    dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from);
                }
                _ => {}
            }
        }
        if let (Some(mac), Some(dst)) = (mac, dst) {
            if mac == Mac::ZERO {
                e.flood.insert(dst);
            } else {
                e.fdb.insert(mac, dst);
            }
        }
    }
    let mut s = h.neighbours().get().set_address_family(AddressFamily::Inet).execute();
    while let Some(m) = s.try_next().await.map_err(nl("dump neighbours"))? {
        if m.header.ifindex != vx || m.header.state != NeighbourState::Permanent {
            continue;
        }
        let mut mac = None;
        let mut ip = None;
        for a in &m.attributes {
            match a {
                NeighbourAttribute::LinkLayerAddress(b) => mac = Mac::from_slice(b),
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(*v),
                _ => {}
            }
        }
        if let (Some(mac), Some(ip)) = (mac, ip) {
            e.neigh.insert(ip, mac);
        }
    }
    Ok(e)
}

fn fdb_message(vx: u32, mac: Mac, dst: Ipv4Addr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = vx;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    m
}

async fn request_ack(
    h: &Handle,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = flags;
    let mut h = h.clone();
    let mut resp = h.request(req)?;
    while let Some(m) = resp.next().await {
        if let NetlinkPayload::Error(err) = m.payload {
            return Err(rtnetlink::Error::NetlinkError(err));
        }
    }
    Ok(())
}

/// Applies one reconciler change to VXLAN device `vx`.
pub(crate) async fn apply(h: &Handle, vx: u32, change: Change) -> Result<(), Error> {
    match change {
        Change::FdbSet { mac, dst } => h
            .neighbours()
            .add_bridge(vx, mac.as_bytes())
            .destination(IpAddr::V4(dst))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("fdb replace {mac} dst {dst}"))),
        Change::FloodAdd { dst } => request_ack(
            h,
            RouteNetlinkMessage::NewNeighbour(fdb_message(vx, Mac::ZERO, dst)),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
        )
        .await
        .map_err(nl(format!("fdb append 00:00:00:00:00:00 dst {dst}"))),
        Change::FdbDel { mac, dst } => fdb_del(h, vx, mac, dst).await,
        Change::FloodDel { dst } => fdb_del(h, vx, Mac::ZERO, dst).await,
        Change::NeighSet { ip, mac } => h
            .neighbours()
            .add(vx, IpAddr::V4(ip))
            .link_layer_address(mac.as_bytes())
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("neigh replace {ip} lladdr {mac}"))),
        Change::NeighDel { ip } => {
            let mut m = NeighbourMessage::default();
            m.header.family = AddressFamily::Inet;
            m.header.ifindex = vx;
            m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
            match h.neighbours().del(m).execute().await {
                Ok(()) => Ok(()),
                Err(e) if is_enoent(&e) => Ok(()),
                Err(e) => Err(nl(format!("neigh del {ip}"))(e)),
            }
        }
    }
}

async fn fdb_del(h: &Handle, vx: u32, mac: Mac, dst: Ipv4Addr) -> Result<(), Error> {
    match request_ack(
        h,
        RouteNetlinkMessage::DelNeighbour(fdb_message(vx, mac, dst)),
        NLM_F_REQUEST | NLM_F_ACK,
    )
    .await
    {
        Ok(()) => Ok(()),
        Err(e) if is_enoent(&e) => Ok(()),
        Err(e) => Err(nl(format!("fdb del {mac} dst {dst}"))(e)),
    }
}
