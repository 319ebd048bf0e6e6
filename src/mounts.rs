//! `--mount`: Docker's mount syntax parsed once, at the CLI and API edge, into a [`MountSpec`]
//! that the store keeps in the service (or standalone task) and each node turns into the
//! runtime's [`shoal_runtime::Mount`] when it starts a task. Errors use Docker's words: the
//! CLI's for the syntax, swarmkit's and the daemon's for what the mount may be.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::volumes;

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
fn clean(p: &str) -> String {
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

impl MountSpec {
    /// The mount as the store keeps it: its target cleaned, after every check a request gets
    /// (a bind source must exist on the node the request is made to). `Err` is Docker's
    /// message.
    pub fn checked(&self) -> Result<MountSpec, String> {
        let config =
            |e: String| format!("invalid mount config for type {:?}: {e}", self.kind.as_str());
        if self.target.contains('\0') || self.source.contains('\0') {
            return Err(config("paths must not contain NUL".into()));
        }
        if !self.target.starts_with('/') {
            return Err(format!("invalid mount target, must be an absolute path: {}", self.target));
        }
        let target = clean(&self.target);
        if let Some(problem) = shoal_runtime::mounts::target_problem(Path::new(&target)) {
            return Err(config(problem));
        }
        let mut source = self.source.clone();
        match self.kind {
            MountKind::Bind => {
                if source.is_empty() {
                    return Err(config("field Source must not be empty".into()));
                }
                if !source.starts_with('/') {
                    return Err(format!(
                        "invalid bind mount source, must be an absolute path: {source}"
                    ));
                }
                source = clean(&source);
                if !Path::new(&source).exists() {
                    return Err(config(format!("bind source path does not exist: {source}")));
                }
            }
            MountKind::Volume => {
                if source.starts_with('/') {
                    return Err(format!(
                        "invalid volume mount source, must not be an absolute path: {source}"
                    ));
                }
                if source.is_empty() {
                    return Err(config("shoal needs the volume's name: src=NAME".into()));
                }
                volumes::check_name(&source)?;
            }
        }
        Ok(MountSpec { kind: self.kind, source, target, readonly: self.readonly })
    }

    /// The runtime's mount on a node whose volumes are `vols`, making a missing volume there
    /// as Docker does.
    pub fn resolve(&self, vols: &volumes::Volumes) -> Result<shoal_runtime::Mount, String> {
        let source = match self.kind {
            MountKind::Bind => PathBuf::from(&self.source),
            MountKind::Volume => vols.ensure(&self.source).map_err(|e| e.to_string())?,
        };
        Ok(shoal_runtime::Mount {
            source,
            target: PathBuf::from(&self.target),
            readonly: self.readonly,
        })
    }
}

/// Checks every mount of a request and that no two share a target; returns them as stored.
pub fn check_all(mounts: &[MountSpec]) -> Result<Vec<MountSpec>, String> {
    let mut out: Vec<MountSpec> = Vec::with_capacity(mounts.len());
    for m in mounts {
        let m = m.checked()?;
        if out.iter().any(|o| o.target == m.target) {
            return Err(format!("Duplicate mount point: {}", m.target));
        }
        out.push(m);
    }
    Ok(out)
}

/// `service update --mount-rm TARGET --mount-add SPEC`: the removals, then the additions,
/// an added mount replacing one with its target (as Docker's update does). Only the added
/// mounts are checked again.
pub fn updated(
    current: &[MountSpec],
    rm: &[String],
    add: &[MountSpec],
) -> Result<Vec<MountSpec>, String> {
    let mut out = current.to_vec();
    for target in rm {
        let cleaned = if target.starts_with('/') { clean(target) } else { target.clone() };
        if !out.iter().any(|m| m.target == cleaned) {
            return Err(format!("the service has no mount at {target} to remove"));
        }
        out.retain(|m| m.target != cleaned);
    }
    for m in check_all(add)? {
        out.retain(|o| o.target != m.target);
        out.push(m);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(s: &str) -> Result<MountSpec, String> {
        s.parse::<MountSpec>().and_then(|m| m.checked())
    }

    #[test]
    fn docker_syntax_and_aliases() {
        let m =
            parse("type=volume,src=myhelloworld,dst=/opt/applications/helloworld/logs").unwrap();
        assert_eq!(
            (m.kind, m.source.as_str(), m.target.as_str(), m.readonly),
            (MountKind::Volume, "myhelloworld", "/opt/applications/helloworld/logs", false)
        );
        let m = parse("type=bind,source=/tmp,destination=/data/./x/,ro=true").unwrap();
        assert_eq!((m.kind, m.target.as_str(), m.readonly), (MountKind::Bind, "/data/x", true));
        let m = parse("source=v1,target=/d,readonly").unwrap();
        assert_eq!((m.kind, m.readonly), (MountKind::Volume, true));
        assert!(!parse("src=v1,target=/d,readonly=0").unwrap().readonly);
        assert_eq!(m.to_string(), "type=volume,src=v1,dst=/d,readonly");
        assert_eq!(m.to_string().parse::<MountSpec>().unwrap(), m);
    }

    #[test]
    fn bad_input_gets_dockers_words() {
        let cases = [
            ("type=volume,src=v,dst=x", "invalid mount target, must be an absolute path: x"),
            (
                "type=bind,src=/no/such/dir,dst=/x",
                "invalid mount config for type \"bind\": bind source path does not exist: /no/such/dir",
            ),
            ("type=volume,src=v,dst=/x,foo=bar", "unexpected key 'foo' in 'foo=bar'"),
            ("type=volume,src=v,dst=/x,bogus", "invalid field 'bogus' must be a key=value pair"),
            ("type=volume,src=v,dst=/x,ro=maybe", "invalid value for ro: maybe"),
            ("type=volume,src=v", "target is required"),
            (
                "type=volume,src=v,dst=/",
                "invalid mount config for type \"volume\": invalid specification: destination can't be '/'",
            ),
            (
                "type=bind,src=/tmp,dst=/proc",
                "invalid mount config for type \"bind\": \"/proc\" cannot be mounted because it is inside /proc",
            ),
            (
                "type=bind,src=/tmp,dst=/x/../sys/fs",
                "invalid mount config for type \"bind\": \"/sys/fs\" cannot be mounted because it is inside /sys",
            ),
            (
                "type=bind,src=tmp,dst=/x",
                "invalid bind mount source, must be an absolute path: tmp",
            ),
            (
                "type=volume,src=/tmp,dst=/x",
                "invalid volume mount source, must not be an absolute path: /tmp",
            ),
            (
                "type=volume,src=../etc,dst=/x",
                "\"../etc\" includes invalid characters for a local volume name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed. If you intended to pass a host directory, use absolute path",
            ),
            (
                "type=tmpfs,dst=/x",
                "invalid mount config for type \"tmpfs\": mount type unknown (shoal mounts a volume or a bind)",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input).unwrap_err(), want, "{input}");
        }
        let twice = ["src=a1,dst=/d".parse().unwrap(), "src=b1,dst=/d/".parse().unwrap()];
        assert_eq!(check_all(&twice).unwrap_err(), "Duplicate mount point: /d");
    }

    #[test]
    fn update_removes_then_adds_by_target() {
        let cur = check_all(&["src=v1,dst=/a".parse().unwrap(), "src=v2,dst=/b".parse().unwrap()])
            .unwrap();
        let add = ["src=v3,dst=/b/".parse().unwrap(), "src=v4,dst=/c".parse().unwrap()];
        let next = updated(&cur, &["/a/".into()], &add).unwrap();
        let got: Vec<String> = next.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["type=volume,src=v3,dst=/b", "type=volume,src=v4,dst=/c"]);
        assert!(updated(&cur, &["/zz".into()], &[]).unwrap_err().contains("no mount at /zz"));
        let bad = ["src=v5,dst=rel".parse().unwrap()];
        assert!(updated(&cur, &[], &bad).is_err());
    }
}
