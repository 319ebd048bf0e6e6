//! Maglev on the kernel path (`--lb-algorithm maglev` with `mesh=kernel`): a port's DNAT rule
//! looks the client up in the service's Maglev lookup table, programmed as an nft map.
//!
//! ```text
//! dnat to jhash ip saddr mod 65537 seed 0x53484f41 map { 0: 10.0.0.7, 1: 10.0.0.5, … } : 8000
//! ```
//!
//! The table is the proxy's own ([`shoal_ingress::maglev`]): the same size, built from the same
//! names (the backends' ingress addresses, which both paths know), and the proxy computes the
//! same slot for a client ([`MaglevTable::lookup_client`]: the kernel's `jhash`, scaled as nft
//! scales it). So every node sends a client to the same task, and a client that falls back to
//! the proxy (an unanswered SYN's retry, a connection made on the node itself) keeps it too.
//!
//! The map has one element per slot and is written whole with the node's rules, in the same
//! transaction; only a flow's first packet is looked up, so established flows keep their task
//! when a backend comes or goes, and new flows move only from the slots Maglev moved.

use std::net::Ipv4Addr;

use shoal_ingress::maglev::{CLIENT_SEED, MaglevTable};
use shoal_nft::{Batch, Elem, ElemData, Expr, Family, PayloadBase, SetData, SetKey};

use crate::kernel::TABLE;

/// The Maglev table of `backends`, as the proxy builds it for the same backends.
pub fn table(backends: &[Ipv4Addr]) -> MaglevTable {
    let names: Vec<String> = backends.iter().map(Ipv4Addr::to_string).collect();
    MaglevTable::build(&names)
}

/// The map's elements: each slot (a host-order u32, as `jhash` leaves it) to its backend's
/// address. Empty for no backend.
pub fn elements(backends: &[Ipv4Addr]) -> Vec<Elem> {
    let t = table(backends);
    (0u32..)
        .zip(t.slots())
        .filter_map(|(slot, &i)| {
            let addr = backends.get(i as usize)?;
            Some(Elem {
                key: slot.to_ne_bytes().to_vec(),
                data: Some(ElemData::Value(addr.octets().to_vec())),
            })
        })
        .collect()
}

/// Adds the map of `backends` (at least one) to `b` and returns the expressions that
/// leave the client's backend in register 1: hash the source address into a slot, look it up.
pub fn pick(b: &mut Batch, backends: &[Ipv4Addr]) -> Vec<Expr> {
    let elems = elements(backends);
    let modulus = u32::try_from(elems.len()).unwrap_or(u32::MAX);
    let map = b.add_set(Family::Ip, TABLE, None, SetKey::HostInteger(4), Some(SetData::Ipv4Addr));
    b.add_elements(Family::Ip, TABLE, &map, &elems);
    vec![
        Expr::Payload { base: PayloadBase::Network, offset: 12, len: 4 },
        Expr::Jhash { len: 4, modulus, seed: CLIENT_SEED },
        Expr::Lookup { set: map },
    ]
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use shoal_ingress::maglev::table_size;

    use super::*;

    fn addrs(n: u8) -> Vec<Ipv4Addr> {
        (0..n).map(|i| Ipv4Addr::new(10, 0, 0, 5 + 2 * i)).collect()
    }

    fn slot_of(e: &Elem) -> usize {
        u32::from_ne_bytes(e.key.clone().try_into().expect("4 bytes")) as usize
    }

    fn backend_of(e: &Elem) -> Ipv4Addr {
        match &e.data {
            Some(ElemData::Value(v)) => {
                Ipv4Addr::from(<[u8; 4]>::try_from(v.as_slice()).expect("4"))
            }
            other => panic!("not an address: {other:?}"),
        }
    }

    #[test]
    fn every_slot_maps_to_the_backend_the_proxy_picks() {
        let backends = addrs(4);
        let elems = elements(&backends);
        assert_eq!(elems.len(), table_size(4));
        let proxy = table(&backends);
        for (i, e) in elems.iter().enumerate() {
            assert_eq!(slot_of(e), i);
            assert_eq!(backend_of(e), backends[proxy.slots()[i] as usize]);
        }
        // A client's slot in the kernel is the proxy's slot for it.
        for c in 0..500u32 {
            let client = Ipv4Addr::from(0xc612_0000 + c * 7919);
            let slot = shoal_ingress::maglev::scale(
                shoal_ingress::maglev::jhash_ipv4(client, CLIENT_SEED),
                elems.len(),
            );
            let by_proxy = proxy.lookup_client(IpAddr::V4(client)).expect("backends");
            assert_eq!(backend_of(&elems[slot]), backends[by_proxy], "{client}");
        }
    }

    #[test]
    fn the_map_is_the_same_whatever_the_order_and_shares_are_even() {
        let backends = addrs(3);
        let mut shuffled = backends.clone();
        shuffled.reverse();
        // Placement depends on the names only (the proxy lists its backends by task id), so an
        // unsorted list gives the same map.
        assert_eq!(elements(&backends), elements(&shuffled));
        let mut share = [0usize; 3];
        for e in elements(&backends) {
            share[backends.iter().position(|b| *b == backend_of(&e)).expect("known")] += 1;
        }
        let (lo, hi) = (share.iter().min().expect("3"), share.iter().max().expect("3"));
        assert!(hi - lo <= 1, "{share:?}");
    }

    #[test]
    fn one_backend_leaving_moves_only_about_its_share_of_slots() {
        let before = elements(&addrs(4));
        let rest: Vec<Ipv4Addr> = addrs(4).into_iter().filter(|a| *a != addrs(4)[1]).collect();
        let after = elements(&rest);
        assert_eq!(before.len(), after.len(), "the size must not change with the backends");
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let own = before.iter().filter(|e| backend_of(e) == addrs(4)[1]).count();
        assert!(moved >= own && moved <= own + before.len() / 100, "{moved} moved, {own} own");
    }

    #[test]
    fn the_rule_hashes_the_source_with_the_shared_seed() {
        let mut b = Batch::new();
        b.add_table(Family::Ip, TABLE);
        let exprs = pick(&mut b, &addrs(2));
        let names: Vec<&str> = exprs.iter().map(Expr::name).collect();
        assert_eq!(names, ["payload", "hash", "lookup"]);
        match &exprs[1] {
            Expr::Jhash { len, modulus, seed } => {
                assert_eq!((*len, *modulus as usize, *seed), (4, table_size(2), CLIENT_SEED));
            }
            other => panic!("{other:?}"),
        }
        assert!(b.commands().iter().filter(|c| c.starts_with("add elements")).count() > 1);
    }

    /// The kernel sends each client where the proxy would (root): clients in one namespace send
    /// a UDP datagram to a node namespace's published port, whose real table (written by
    /// [`crate::kernel::apply_ports`]) DNATs it to one of three backend addresses held by a
    /// third namespace; the socket that receives it names the backend.
    #[test]
    fn the_kernel_sends_each_client_where_the_proxy_would() {
        use std::net::UdpSocket;
        use std::time::{Duration, Instant};

        use shoal_netns::testing::{Cleanup, require_root, unique_prefix};

        use crate::kernel::{KernelPort, Pick, apply_ports};

        if !require_root("the_kernel_sends_each_client_where_the_proxy_would") {
            return;
        }
        let mut c = Cleanup::new();
        let node = c.netns(&unique_prefix("mn")).expect("netns");
        let clients_ns = c.netns(&unique_prefix("mc")).expect("netns");
        let backends_ns = c.netns(&unique_prefix("mb")).expect("netns");
        let ip = |ns: &shoal_netns::NetNs, args: &str| {
            let mut full = vec!["-n", ns.name()];
            full.extend(args.split_whitespace());
            let out = std::process::Command::new("ip").args(&full).output().expect("run ip");
            assert!(out.status.success(), "ip {full:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let (cn, bn) = (clients_ns.name(), backends_ns.name());
        ip(&node, &format!("link add nc type veth peer name cv netns {cn}"));
        ip(&node, &format!("link add nb type veth peer name bv netns {bn}"));
        for cmd in ["addr add 198.18.4.1/24 dev nc", "addr add 198.18.6.1/24 dev nb"] {
            ip(&node, cmd);
        }
        for dev in ["lo", "nc", "nb"] {
            ip(&node, &format!("link set {dev} up"));
        }
        ip(&node, "route add 10.0.0.0/24 via 198.18.6.2");
        node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
            .expect("enter")
            .expect("ip_forward");
        let backends = addrs(3);
        ip(&backends_ns, "addr add 198.18.6.2/24 dev bv");
        for b in &backends {
            ip(&backends_ns, &format!("addr add {b}/32 dev bv"));
        }
        ip(&backends_ns, "link set bv up");
        let clients: Vec<Ipv4Addr> = (0..40).map(|i| Ipv4Addr::new(198, 18, 4, 100 + i)).collect();
        for a in &clients {
            ip(&clients_ns, &format!("addr add {a}/24 dev cv"));
        }
        ip(&clients_ns, "link set cv up");

        let port = KernelPort {
            published: 8100,
            target: 8000,
            udp: true,
            pick: Pick::ClientHash,
            backends: backends.clone(),
        };
        let started = Instant::now();
        apply_ports(Some(&node), 4789, std::slice::from_ref(&port)).expect("ports");
        let took = started.elapsed();
        eprintln!("maglev: a table of {} slots written in {took:?}", table_size(3));
        // Generous: the machine may be busy, and a rewrite happens only when backends change.
        assert!(took < Duration::from_secs(10), "writing the table took {took:?}");
        // The real nft, where installed, reads the rule as meant.
        let listed = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                node.name(),
                "nft",
                "list",
                "table",
                "ip",
                crate::kernel::TABLE,
            ])
            .output();
        match listed {
            Ok(o) if o.status.success() => {
                let text = String::from_utf8_lossy(&o.stdout);
                let want = format!(
                    "dnat to jhash ip saddr mod {} seed {CLIENT_SEED:#x} map",
                    table_size(3)
                );
                assert!(text.contains(&want), "{want:?} not in the listing");
            }
            other => eprintln!("*** nft not runnable ({other:?}): not comparing its listing"),
        }

        let listening: Vec<UdpSocket> = backends_ns
            .run(|| {
                backends
                    .iter()
                    .map(|b| {
                        let s = UdpSocket::bind((*b, 8000)).expect("bind backend");
                        s.set_nonblocking(true).expect("nonblocking");
                        s
                    })
                    .collect()
            })
            .expect("enter");
        let proxy = table(&backends);
        let mut reached = std::collections::BTreeSet::new();
        for client in &clients {
            let sock =
                clients_ns.run(|| UdpSocket::bind((*client, 0))).expect("enter").expect("bind");
            let want = backends[proxy.lookup_client(IpAddr::V4(*client)).expect("backends")];
            let deadline = Instant::now() + Duration::from_secs(10);
            let got = loop {
                sock.send_to(client.to_string().as_bytes(), ("198.18.4.1", 8100)).expect("send");
                let hit = listening.iter().zip(&backends).find_map(|(s, b)| {
                    let mut buf = [0u8; 64];
                    let n = s.recv(&mut buf).ok()?;
                    (buf[..n] == *client.to_string().as_bytes()).then_some(*b)
                });
                if let Some(b) = hit {
                    break b;
                }
                assert!(Instant::now() < deadline, "{client}: no backend got its datagram");
                std::thread::sleep(Duration::from_millis(50));
            };
            assert_eq!(got, want, "{client}: the kernel and the proxy disagree");
            reached.insert(got);
        }
        assert_eq!(reached.len(), 3, "forty clients reached only {reached:?}");
    }
}
