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
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl NetworkCreate {
    /// The rules a new network keeps on its own (its name and subnet among the others are the
    /// store's to decide).
    pub fn validate(&self) -> Result<(), Error> {
        crate::check_name("network", &self.name)?;
        match self.driver.as_deref() {
            None | Some(OVERLAY) => Ok(()),
            Some(d) => Err(Error::UnsupportedDriver(d.to_owned())),
        }
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
        let bad = NetworkCreate { name: "a.b".into(), ..ok };
        assert!(matches!(bad.validate(), Err(Error::InvalidName { .. })));
    }
}
