//! Where and under which names a runtime keeps its tasks, checked before anything starts.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// Longest accepted node prefix.
pub const MAX_PREFIX: usize = 32;

/// Where and under which names a runtime keeps its tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Per-node prefix of namespace names (`PREFIX-t-<short id>`), so several nodes on one
    /// machine never collide: 1-32 of `[A-Za-z0-9_-]`, not ending in `-`, without `-t-`.
    pub prefix: String,
    /// Directory for per-task files (`<state_dir>/tasks/<id>/`: the launch record, the
    /// shim's records, logs, `resolv.conf` and `hosts`). A runtime started on the same
    /// directory adopts the tasks found there ([`Runtime::adopt`](crate::Runtime::adopt)).
    pub state_dir: PathBuf,
    /// The program each task's supervisor runs as: it must call [`crate::shim::main`] when its
    /// first argument is [`crate::shim::ARG`]. The agent gives `/proc/self/exe`.
    pub shim: PathBuf,
}

impl RuntimeConfig {
    pub(super) fn validate(&self) -> Result<()> {
        let p = &self.prefix;
        let ok = !p.is_empty()
            && p.len() <= MAX_PREFIX
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
            && !p.ends_with('-')
            && !p.contains("-t-");
        if !ok {
            return Err(Error::InvalidConfig {
                field: "prefix",
                reason: format!(
                    "{p:?}: use 1-{MAX_PREFIX} of [A-Za-z0-9_-], no trailing '-', no \"-t-\""
                ),
            });
        }
        if !self.shim.is_absolute() {
            return Err(Error::InvalidConfig {
                field: "shim",
                reason: format!("{:?} must be an absolute path", self.shim),
            });
        }
        if !self.state_dir.is_absolute() {
            return Err(Error::InvalidConfig {
                field: "state_dir",
                reason: format!("{:?} must be an absolute path", self.state_dir),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(prefix: &str) -> RuntimeConfig {
        RuntimeConfig { prefix: prefix.into(), state_dir: "/tmp/x".into(), shim: "/bin/x".into() }
    }

    #[test]
    fn prefix_rules() {
        for bad in ["", "a-", "a-t-b", "has space", &"p".repeat(33)] {
            assert!(
                matches!(config(bad).validate(), Err(Error::InvalidConfig { field: "prefix", .. })),
                "{bad:?}"
            );
        }
        for good in ["n1", "lab-node1", "x_y"] {
            config(good).validate().unwrap();
        }
        let rel = RuntimeConfig { state_dir: "rel".into(), ..config("n1") };
        assert!(matches!(rel.validate(), Err(Error::InvalidConfig { field: "state_dir", .. })));
        let rel = RuntimeConfig { shim: "shoal".into(), ..config("n1") };
        assert!(matches!(rel.validate(), Err(Error::InvalidConfig { field: "shim", .. })));
    }
}
