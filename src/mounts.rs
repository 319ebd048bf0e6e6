//! `--mount`: Docker's mount syntax parsed once, at the CLI and API edge, into a [`MountSpec`]
//! that the store keeps in the service (or standalone task) and each node turns into the
//! runtime's [`shoal_runtime::Mount`] when it starts a task. Errors use Docker's words: the
//! CLI's for the syntax, swarmkit's and the daemon's for what the mount may be.

use std::path::{Path, PathBuf};

pub use shoal_model::mount::{MountKind, MountSpec, clean};

use crate::volumes;

/// The mount as the store keeps it: its target cleaned, after every check a request gets (a
/// bind source must exist on the node the request is made to). `Err` is Docker's message.
pub fn checked(m: &MountSpec) -> Result<MountSpec, String> {
    let config = |e: String| format!("invalid mount config for type {:?}: {e}", m.kind.as_str());
    if m.target.contains('\0') || m.source.contains('\0') {
        return Err(config("paths must not contain NUL".into()));
    }
    if !m.target.starts_with('/') {
        return Err(format!("invalid mount target, must be an absolute path: {}", m.target));
    }
    let target = clean(&m.target);
    if let Some(problem) = shoal_runtime::mounts::target_problem(Path::new(&target)) {
        return Err(config(problem));
    }
    let mut source = m.source.clone();
    match m.kind {
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
    Ok(MountSpec { kind: m.kind, source, target, readonly: m.readonly })
}

/// The runtime's mount on a node whose volumes are `vols`, making a missing volume there as
/// Docker does.
pub fn resolve(m: &MountSpec, vols: &volumes::Volumes) -> Result<shoal_runtime::Mount, String> {
    let source = match m.kind {
        MountKind::Bind => PathBuf::from(&m.source),
        MountKind::Volume => vols.ensure(&m.source).map_err(|e| e.to_string())?,
    };
    Ok(shoal_runtime::Mount { source, target: PathBuf::from(&m.target), readonly: m.readonly })
}

/// Checks every mount of a request and that no two share a target; returns them as stored.
pub fn check_all(mounts: &[MountSpec]) -> Result<Vec<MountSpec>, String> {
    let mut out: Vec<MountSpec> = Vec::with_capacity(mounts.len());
    for m in mounts {
        let m = checked(m)?;
        if out.iter().any(|o| o.target == m.target) {
            return Err(format!("Duplicate mount point: {}", m.target));
        }
        out.push(m);
    }
    Ok(out)
}

/// `service update --mount-rm TARGET --mount-add SPEC`, the added mounts checked here.
pub fn updated(
    current: &[MountSpec],
    rm: &[String],
    add: &[MountSpec],
) -> Result<Vec<MountSpec>, String> {
    shoal_model::mount::updated(current, rm, check_all(add)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(s: &str) -> Result<MountSpec, String> {
        s.parse::<MountSpec>().and_then(|m| checked(&m))
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
