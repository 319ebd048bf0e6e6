//! `network create` as it arrives at the API. The network itself, once created, is the store's
//! own record (`shoal_cluster::model::NetworkRecord`), since the store decides its subnet and
//! VNI.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The only driver shoal has.
pub const OVERLAY: &str = "overlay";

/// `POST /networks`: Docker's `network create` flags.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NetworkCreate {
    pub name: String,
    /// `overlay`, or left out.
    #[serde(default)]
    pub driver: Option<String>,
    /// Picked from the swarm's pool when left out.
    #[serde(default)]
    pub subnet: Option<ipnet::Ipv4Net>,
    #[serde(default)]
    pub attachable: bool,
    /// WireGuard between the nodes for this network's traffic.
    #[serde(default)]
    pub encrypted: bool,
    /// The routing mesh's network, replacing the one `swarm init` made (which must be removed
    /// first: there is one at a time).
    #[serde(default)]
    pub ingress: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl NetworkCreate {
    /// The rules a new network keeps on its own (its name and subnet among the others are the
    /// store's to decide).
    pub fn validate(&self) -> Result<(), Error> {
        crate::check_name("network", &self.name)?;
        if let Some(d) = self.driver.as_deref().filter(|d| *d != OVERLAY) {
            return Err(Error::UnsupportedDriver(d.to_owned()));
        }
        if self.ingress && self.attachable {
            return Err(Error::IngressAttachable);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_overlay_networks_with_dns_names() {
        let ok = NetworkCreate { name: "my-overlay".into(), ..NetworkCreate::default() };
        assert_eq!(ok.validate(), Ok(()));
        let bridge = NetworkCreate { driver: Some("bridge".into()), ..ok.clone() };
        assert_eq!(
            bridge.validate().unwrap_err().to_string(),
            "driver \"bridge\" is not supported: shoal networks are overlay networks"
        );
        let bad = NetworkCreate { name: "a.b".into(), ..ok.clone() };
        assert!(matches!(bad.validate(), Err(Error::InvalidName { .. })));
        let ingress = NetworkCreate { ingress: true, encrypted: true, ..ok.clone() };
        assert_eq!(ingress.validate(), Ok(()));
        let both = NetworkCreate { attachable: true, ..ingress };
        assert_eq!(
            both.validate().unwrap_err().to_string(),
            "an ingress network cannot be attachable: standalone tasks do not join the routing mesh"
        );
    }
}
