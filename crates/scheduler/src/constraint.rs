//! Placement constraints: `node.role==manager`, `node.hostname!=node1`, `node.id==…`,
//! `node.labels.zone==a`. Parsed once when the service is created, so a bad one is refused then.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::model::{Node, Role};

/// One constraint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    pub key: ConstraintKey,
    pub equal: bool,
    pub value: String,
}

/// What a constraint looks at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConstraintKey {
    Role,
    Hostname,
    Id,
    Label(String),
}

/// Why a constraint did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid constraint {0:?}: expected node.role, node.hostname, node.id or node.labels.<key>, then == or !=, then a value"
)]
pub struct ConstraintError(pub String);

impl FromStr for Constraint {
    type Err = ConstraintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ConstraintError(s.to_owned());
        let (lhs, equal, rhs) = if let Some((l, r)) = s.split_once("!=") {
            (l, false, r)
        } else if let Some((l, r)) = s.split_once("==") {
            (l, true, r)
        } else {
            return Err(err());
        };
        let (lhs, value) = (lhs.trim(), rhs.trim());
        if value.is_empty() || value.contains("==") || value.contains("!=") {
            return Err(err());
        }
        let key = match lhs {
            "node.role" => {
                if !matches!(value, "manager" | "worker") {
                    return Err(err());
                }
                ConstraintKey::Role
            }
            "node.hostname" => ConstraintKey::Hostname,
            "node.id" => ConstraintKey::Id,
            l => match l.strip_prefix("node.labels.") {
                Some(k) if !k.is_empty() => ConstraintKey::Label(k.to_owned()),
                _ => return Err(err()),
            },
        };
        Ok(Constraint { key, equal, value: value.to_owned() })
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = match &self.key {
            ConstraintKey::Role => "node.role".to_owned(),
            ConstraintKey::Hostname => "node.hostname".to_owned(),
            ConstraintKey::Id => "node.id".to_owned(),
            ConstraintKey::Label(k) => format!("node.labels.{k}"),
        };
        write!(f, "{key}{}{}", if self.equal { "==" } else { "!=" }, self.value)
    }
}

impl Constraint {
    /// Whether `node` satisfies this constraint. A missing label never equals anything.
    pub fn matches(&self, node: &Node) -> bool {
        let actual = match &self.key {
            ConstraintKey::Role => Some(match node.role {
                Role::Manager => "manager",
                Role::Worker => "worker",
            }),
            ConstraintKey::Hostname => Some(node.hostname.as_str()),
            ConstraintKey::Id => Some(node.id.as_str()),
            ConstraintKey::Label(k) => node.labels.get(k).map(String::as_str),
        };
        (actual == Some(self.value.as_str())) == self.equal
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Availability, NodeStatus};

    fn node(role: Role, labels: &[(&str, &str)]) -> Node {
        Node {
            id: "n1".into(),
            hostname: "host1".into(),
            role,
            availability: Availability::Active,
            status: NodeStatus::Ready,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn parses_and_matches() {
        let m = node(Role::Manager, &[("zone", "a")]);
        let w = node(Role::Worker, &[]);
        let c: Constraint = "node.role==manager".parse().unwrap();
        assert!(c.matches(&m) && !c.matches(&w));
        let c: Constraint = "node.role != manager".parse().unwrap();
        assert!(!c.matches(&m) && c.matches(&w));
        let c: Constraint = "node.labels.zone==a".parse().unwrap();
        assert!(c.matches(&m) && !c.matches(&w), "a missing label never equals");
        let c: Constraint = "node.labels.zone!=a".parse().unwrap();
        assert!(!c.matches(&m) && c.matches(&w), "a missing label is != anything");
        let c: Constraint = "node.hostname==host1".parse().unwrap();
        assert!(c.matches(&m));
        assert_eq!(c.to_string(), "node.hostname==host1");
    }

    #[test]
    fn rejects_bad_constraints() {
        for bad in [
            "node.role=manager",
            "node.role==boss",
            "node.labels.==x",
            "engine.labels.x==y",
            "node.hostname==",
            "node.id==a==b",
            "",
        ] {
            let e = bad.parse::<Constraint>().unwrap_err();
            assert!(e.to_string().contains("invalid constraint"), "{bad}");
        }
    }
}
