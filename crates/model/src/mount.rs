//! `--mount`: Docker's mount syntax, `type=volume,src=NAME,dst=PATH[,readonly]`, parsed once
//! into a [`MountSpec`] that the store keeps in the service or standalone task. What a mount
//! may be on a node (a bind source that exists, a volume name, a target outside `/proc`) is
//! checked by the node's own rules in the binary (`src/mounts.rs`).

use std::fmt;
use std::path::{Component, Path};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a mount brings into the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// A named volume of the node the task runs on (made there if missing).
    Volume,
    /// A host path.
    Bind,
}

impl MountKind {
    /// `volume` or `bind`, as Docker writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            MountKind::Volume => "volume",
            MountKind::Bind => "bind",
        }
    }
}

/// One `--mount`: a volume name or host path, where the task sees it, and whether read-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    #[serde(rename = "type")]
    pub kind: MountKind,
    /// Volume name, or absolute host path for a bind.
    pub source: String,
    /// Absolute path in the task, cleaned (`/a/./b/` is `/a/b`).
    pub target: String,
    #[serde(default)]
    pub readonly: bool,
}

/// Go's `strconv.ParseBool`, which Docker's `readonly=` uses.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

impl FromStr for MountSpec {
    type Err = String;

    /// `type=volume,src=NAME,dst=PATH[,readonly]`, with Docker's key aliases (`source`,
    /// `target`, `destination`, `ro`); the type defaults to `volume`, as Docker's does.
    fn from_str(s: &str) -> Result<MountSpec, String> {
        let (mut kind, mut source, mut target, mut readonly) = (None, String::new(), None, false);
        for field in s.split(',') {
            let Some((key, value)) = field.split_once('=') else {
                match field.to_ascii_lowercase().as_str() {
                    "readonly" | "ro" => {
                        readonly = true;
                        continue;
                    }
                    _ => return Err(format!("invalid field '{field}' must be a key=value pair")),
                }
            };
            match key.to_ascii_lowercase().as_str() {
                "type" => kind = Some(value.to_ascii_lowercase()),
                "source" | "src" => source = value.to_owned(),
                "target" | "dst" | "destination" => target = Some(value.to_owned()),
                k @ ("readonly" | "ro") => {
                    readonly = parse_bool(value)
                        .ok_or_else(|| format!("invalid value for {k}: {value}"))?;
                }
                _ => return Err(format!("unexpected key '{key}' in '{field}'")),
            }
        }
        let kind = match kind.as_deref() {
            None | Some("volume") => MountKind::Volume,
            Some("bind") => MountKind::Bind,
            Some("") => return Err("type is required".into()),
            Some(other) => {
                return Err(format!(
                    "invalid mount config for type {other:?}: mount type unknown \
                     (shoal mounts a volume or a bind)"
                ));
            }
        };
        let target = target.filter(|t| !t.is_empty()).ok_or("target is required")?;
        Ok(MountSpec { kind, source, target, readonly })
    }
}

impl fmt::Display for MountSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "type={},src={},dst={}", self.kind.as_str(), self.source, self.target)?;
        if self.readonly {
            f.write_str(",readonly")?;
        }
        Ok(())
    }
}

/// `/a/./b/` → `/a/b`, `/a/../b` → `/b`, as Go's `path.Clean` does for an absolute path.
pub fn clean(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str().unwrap_or_default()),
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    format!("/{}", parts.join("/"))
}

/// `service update --mount-rm TARGET --mount-add SPEC`: the removals, then the additions (as
/// the store keeps them, already checked), an added mount replacing one with its target (as
/// Docker's update does).
pub fn updated(
    current: &[MountSpec],
    rm: &[String],
    added: Vec<MountSpec>,
) -> Result<Vec<MountSpec>, String> {
    let mut out = current.to_vec();
    for target in rm {
        let cleaned = if target.starts_with('/') { clean(target) } else { target.clone() };
        if !out.iter().any(|m| m.target == cleaned) {
            return Err(format!("the service has no mount at {target} to remove"));
        }
        out.retain(|m| m.target != cleaned);
    }
    for m in added {
        out.retain(|o| o.target != m.target);
        out.push(m);
    }
    Ok(out)
}
