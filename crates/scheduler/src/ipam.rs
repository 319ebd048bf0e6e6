//! Addresses for overlay networks: a /24 (by default) per network from the cluster's pool, and
//! within a network the lowest free address. The allocator is plain data. The cluster's state
//! machine rebuilds one from the store to cut a new network's subnet (`shoal-cluster`'s
//! `model::alloc`); it picks task addresses and VIPs from its own index of held addresses,
//! whose picks its tests check against this allocator's (the pick every replica of an older
//! agent made from the same log).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Why an allocation failed. Nothing changed when an error is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error(
        "invalid address pool {pool}: the per-network mask /{mask} must be longer than the pool's and at most /29"
    )]
    InvalidPool { pool: Ipv4Net, mask: u8 },
    #[error("the address pool {0} has no free subnet left")]
    PoolExhausted(Ipv4Net),
    #[error("subnet {requested} overlaps network {network:?} ({existing})")]
    Overlap { requested: Ipv4Net, network: String, existing: Ipv4Net },
    #[error("subnet {0} is too small: overlay networks need at least a /29")]
    TooSmall(Ipv4Net),
    #[error("network {0:?} already has a subnet")]
    Exists(String),
    #[error("no network {0:?}")]
    NoNetwork(String),
    #[error("network {network:?} ({subnet}) has no free address left")]
    SubnetExhausted { network: String, subnet: Ipv4Net },
    #[error("{addr} is not a usable address of network {network:?} ({subnet})")]
    OutOfSubnet { network: String, subnet: Ipv4Net, addr: Ipv4Addr },
    #[error("{addr} in network {network:?} is already taken by {owner}")]
    Taken { network: String, addr: Ipv4Addr, owner: String },
    #[error("network {network:?} still has {count} addresses in use")]
    InUse { network: String, count: usize },
}

/// One network's subnet and the addresses handed out in it, by owner (a task or service id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPool {
    pub subnet: Ipv4Net,
    /// The subnet's first host address, kept for the network's gateway.
    pub gateway: Ipv4Addr,
    pub used: BTreeMap<Ipv4Addr, String>,
}

/// The cluster's allocator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipam {
    pool: Ipv4Net,
    mask: u8,
    networks: BTreeMap<String, NetworkPool>,
}

impl Ipam {
    /// An allocator over `pool` (default 10.0.0.0/8) cutting `/mask` subnets (default 24).
    pub fn new(pool: Ipv4Net, mask: u8) -> Result<Ipam, IpamError> {
        if mask <= pool.prefix_len() || mask > 29 {
            return Err(IpamError::InvalidPool { pool, mask });
        }
        Ok(Ipam { pool: pool.trunc(), mask, networks: BTreeMap::new() })
    }

    /// The pool subnets are cut from.
    pub fn pool(&self) -> Ipv4Net {
        self.pool
    }

    /// A network's allocation, if it has one.
    pub fn network(&self, name: &str) -> Option<&NetworkPool> {
        self.networks.get(name)
    }

    fn overlap(&self, net: Ipv4Net) -> Option<(&String, Ipv4Net)> {
        self.networks
            .iter()
            .find(|(_, p)| p.subnet.contains(&net.network()) || net.contains(&p.subnet.network()))
            .map(|(n, p)| (n, p.subnet))
    }

    /// Gives a network a subnet: the one asked for, or the first free one of the pool.
    pub fn add_network(
        &mut self,
        name: &str,
        requested: Option<Ipv4Net>,
    ) -> Result<Ipv4Net, IpamError> {
        if self.networks.contains_key(name) {
            return Err(IpamError::Exists(name.to_owned()));
        }
        let subnet = match requested {
            Some(r) => {
                let r = r.trunc();
                if r.prefix_len() > 29 {
                    return Err(IpamError::TooSmall(r));
                }
                if let Some((network, existing)) = self.overlap(r) {
                    return Err(IpamError::Overlap {
                        requested: r,
                        network: network.clone(),
                        existing,
                    });
                }
                r
            }
            None => self
                .pool
                .subnets(self.mask)
                .map_err(|_| IpamError::InvalidPool { pool: self.pool, mask: self.mask })?
                .find(|s| self.overlap(*s).is_none())
                .ok_or(IpamError::PoolExhausted(self.pool))?,
        };
        let gateway = first_host(subnet);
        self.networks
            .insert(name.to_owned(), NetworkPool { subnet, gateway, used: BTreeMap::new() });
        Ok(subnet)
    }

    /// Releases a network's subnet; refused while any address in it is in use.
    pub fn remove_network(&mut self, name: &str) -> Result<(), IpamError> {
        let p = self.networks.get(name).ok_or_else(|| IpamError::NoNetwork(name.to_owned()))?;
        if !p.used.is_empty() {
            return Err(IpamError::InUse { network: name.to_owned(), count: p.used.len() });
        }
        self.networks.remove(name);
        Ok(())
    }

    /// The lowest free address of the network for `owner`.
    pub fn allocate(&mut self, network: &str, owner: &str) -> Result<Ipv4Addr, IpamError> {
        let p = self
            .networks
            .get_mut(network)
            .ok_or_else(|| IpamError::NoNetwork(network.to_owned()))?;
        let addr = hosts(p.subnet)
            .find(|a| *a != p.gateway && !p.used.contains_key(a))
            .ok_or(IpamError::SubnetExhausted { network: network.to_owned(), subnet: p.subnet })?;
        p.used.insert(addr, owner.to_owned());
        Ok(addr)
    }

    /// A specific address for `owner`; refused if taken or outside the usable range.
    pub fn allocate_exact(
        &mut self,
        network: &str,
        addr: Ipv4Addr,
        owner: &str,
    ) -> Result<(), IpamError> {
        let p = self
            .networks
            .get_mut(network)
            .ok_or_else(|| IpamError::NoNetwork(network.to_owned()))?;
        if addr == p.gateway || !hosts(p.subnet).any(|a| a == addr) {
            return Err(IpamError::OutOfSubnet {
                network: network.to_owned(),
                subnet: p.subnet,
                addr,
            });
        }
        if let Some(o) = p.used.get(&addr) {
            return Err(IpamError::Taken { network: network.to_owned(), addr, owner: o.clone() });
        }
        p.used.insert(addr, owner.to_owned());
        Ok(())
    }

    /// Returns an address; releasing one that is not held is a no-op.
    pub fn release(&mut self, network: &str, addr: Ipv4Addr) {
        if let Some(p) = self.networks.get_mut(network) {
            p.used.remove(&addr);
        }
    }

    /// Returns every address `owner` holds, in every network (a task or service going away).
    pub fn release_owner(&mut self, owner: &str) -> usize {
        let mut n = 0;
        for p in self.networks.values_mut() {
            let before = p.used.len();
            p.used.retain(|_, o| o != owner);
            n += before - p.used.len();
        }
        n
    }

    /// Addresses in use, per network.
    pub fn in_use(&self) -> BTreeSet<(String, Ipv4Addr)> {
        self.networks
            .iter()
            .flat_map(|(n, p)| p.used.keys().map(move |a| (n.clone(), *a)))
            .collect()
    }
}

fn first_host(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + 1)
}

/// Usable host addresses: not the network address, not the broadcast address.
fn hosts(net: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let first = u32::from(net.network()) + 1;
    let last = u32::from(net.broadcast()).saturating_sub(1);
    (first..=last).map(Ipv4Addr::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ipam() -> Ipam {
        Ipam::new("10.0.0.0/8".parse().unwrap(), 24).unwrap()
    }

    #[test]
    fn subnets_come_from_the_pool_in_order_and_never_overlap() {
        let mut i = ipam();
        assert_eq!(
            i.add_network("ingress", None).unwrap(),
            "10.0.0.0/24".parse::<Ipv4Net>().unwrap()
        );
        assert_eq!(
            i.add_network("a", Some("10.0.1.0/24".parse().unwrap())).unwrap().to_string(),
            "10.0.1.0/24"
        );
        assert_eq!(
            i.add_network("b", None).unwrap().to_string(),
            "10.0.2.0/24",
            "skips the taken one"
        );
        let e = i.add_network("c", Some("10.0.2.128/25".parse().unwrap())).unwrap_err();
        assert!(matches!(e, IpamError::Overlap { .. }), "{e}");
        assert!(matches!(i.add_network("a", None), Err(IpamError::Exists(_))));
        assert!(matches!(
            i.add_network("d", Some("192.168.9.0/30".parse().unwrap())),
            Err(IpamError::TooSmall(_))
        ));
        assert!(Ipam::new("10.0.0.0/8".parse().unwrap(), 8).is_err());
        assert!(Ipam::new("10.0.0.0/8".parse().unwrap(), 30).is_err());
        let mut tiny = Ipam::new("10.9.0.0/23".parse().unwrap(), 24).unwrap();
        tiny.add_network("x", None).unwrap();
        tiny.add_network("y", None).unwrap();
        assert!(matches!(tiny.add_network("z", None), Err(IpamError::PoolExhausted(_))));
    }

    #[test]
    fn addresses_skip_network_gateway_and_broadcast() {
        let mut i = ipam();
        i.add_network("n", Some("10.5.0.0/29".parse().unwrap())).unwrap();
        let got: Vec<_> =
            (0..5).map(|k| i.allocate("n", &format!("t{k}")).unwrap().to_string()).collect();
        assert_eq!(got, ["10.5.0.2", "10.5.0.3", "10.5.0.4", "10.5.0.5", "10.5.0.6"]);
        assert!(matches!(i.allocate("n", "t9"), Err(IpamError::SubnetExhausted { .. })));
        i.release("n", "10.5.0.4".parse().unwrap());
        assert_eq!(i.allocate("n", "t10").unwrap().to_string(), "10.5.0.4");
        assert!(matches!(
            i.allocate_exact("n", "10.5.0.7".parse().unwrap(), "x"),
            Err(IpamError::OutOfSubnet { .. })
        ));
        assert!(matches!(
            i.allocate_exact("n", "10.5.0.1".parse().unwrap(), "x"),
            Err(IpamError::OutOfSubnet { .. })
        ));
        assert!(matches!(
            i.allocate_exact("n", "10.5.0.2".parse().unwrap(), "x"),
            Err(IpamError::Taken { .. })
        ));
        assert!(matches!(i.remove_network("n"), Err(IpamError::InUse { count: 5, .. })));
        assert_eq!(i.release_owner("t0"), 1);
        assert!(matches!(i.allocate("nope", "t"), Err(IpamError::NoNetwork(_))));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u8),
        Release(u8),
        ReleaseOwner(u8),
    }

    proptest! {
        /// Whatever the sequence, no address is ever held twice, and every held address is a
        /// usable one of its subnet.
        #[test]
        fn never_twice(ops in proptest::collection::vec(
            prop_oneof![
                (0u8..40).prop_map(Op::Alloc),
                (0u8..40).prop_map(Op::Release),
                (0u8..40).prop_map(Op::ReleaseOwner),
            ], 0..300)) {
            let mut i = ipam();
            i.add_network("n", Some("10.7.0.0/27".parse().unwrap())).unwrap();
            let mut held: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Alloc(o) => {
                        if let Ok(a) = i.allocate("n", &format!("o{o}")) {
                            prop_assert!(held.insert(a, format!("o{o}")).is_none(), "{a} handed out twice");
                            prop_assert!(a != "10.7.0.1".parse::<Ipv4Addr>().unwrap());
                            prop_assert!("10.7.0.0/27".parse::<Ipv4Net>().unwrap().contains(&a));
                            prop_assert!(a != "10.7.0.0".parse::<Ipv4Addr>().unwrap() && a != "10.7.0.31".parse::<Ipv4Addr>().unwrap());
                        } else {
                            prop_assert_eq!(held.len(), 29, "exhausted only when all 29 are held");
                        }
                    }
                    Op::Release(k) => {
                        if let Some(a) = held.keys().nth(usize::from(k)).copied() {
                            i.release("n", a);
                            held.remove(&a);
                        }
                    }
                    Op::ReleaseOwner(o) => {
                        let owner = format!("o{o}");
                        let n = i.release_owner(&owner);
                        let before = held.len();
                        held.retain(|_, v| *v != owner);
                        prop_assert_eq!(n, before - held.len());
                    }
                }
                prop_assert_eq!(i.network("n").unwrap().used.clone(), held.clone());
            }
        }
    }
}
