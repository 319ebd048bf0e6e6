//! What a task sees besides the host's files: [`Mount`]s, host paths bind-mounted into its mount
//! namespace at start, and `Binds`, the same list made ready for the forked child.
//!
//! A task has no root file system of its own: it sees the host's, so a mount's target is a host
//! path. The target is made (an empty directory, or an empty file for a file source) before the
//! task starts when it does not exist, as Docker makes it in a container's root; the mount
//! itself happens only in the task's private mount namespace, so the host never sees it and it
//! is gone with the namespace when the task's last process ends.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Paths a task may not mount over: its view of the kernel lives there.
pub const FORBIDDEN_TARGETS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// One host path bind-mounted into a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Host path (absolute) the task sees at `target`: a volume's `_data` or a bind source.
    pub source: PathBuf,
    /// Where the task sees it (absolute, not `/` nor under [`FORBIDDEN_TARGETS`]).
    pub target: PathBuf,
    /// Writes under `target` fail with `EROFS` inside the task.
    #[serde(default)]
    pub readonly: bool,
}

impl Mount {
    /// Checks the paths; the error says which mount and why.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |reason: String| Err(Error::InvalidSpec { field: "mounts", reason });
        for p in [&self.source, &self.target] {
            if !p.is_absolute() || p.as_os_str().as_bytes().contains(&0) {
                return bad(format!("{p:?} must be an absolute path without NUL"));
            }
            if p.components().any(|c| c == Component::ParentDir) {
                return bad(format!("{p:?} must not contain '..'"));
            }
        }
        if let Some(reason) = target_problem(&self.target) {
            return bad(reason);
        }
        Ok(())
    }
}

/// Why a task cannot have a mount at `target` (an absolute, `..`-free path), in runc's and
/// Docker's words; `None` if it can.
pub fn target_problem(target: &Path) -> Option<String> {
    if target.parent().is_none() {
        return Some("invalid specification: destination can't be '/'".into());
    }
    FORBIDDEN_TARGETS.iter().find(|f| target.starts_with(f)).map(|f| {
        format!("{:?} cannot be mounted because it is inside {f}", target.display().to_string())
    })
}

/// A task's mounts ready for the forked child: paths as C strings, parents before children.
#[derive(Debug, Default)]
pub(crate) struct Binds(Vec<(CString, CString, bool)>);

impl Binds {
    /// Checks that every source exists and makes every missing target on the host (a
    /// directory, or an empty file when the source is a file).
    pub(crate) fn prepare(mounts: &[Mount]) -> io::Result<Binds> {
        let mut sorted: Vec<&Mount> = mounts.iter().collect();
        sorted.sort_by_key(|m| m.target.components().count());
        let mut out = Vec::with_capacity(sorted.len());
        for m in sorted {
            let meta = std::fs::metadata(&m.source).map_err(|e| {
                io::Error::new(e.kind(), format!("mount source path {}: {e}", m.source.display()))
            })?;
            if meta.is_dir() {
                std::fs::create_dir_all(&m.target)?;
            } else if !m.target.exists() {
                if let Some(dir) = m.target.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::OpenOptions::new().append(true).create(true).open(&m.target)?;
            }
            out.push((c_path(&m.source)?, c_path(&m.target)?, m.readonly));
        }
        Ok(Binds(out))
    }

    /// Bind-mounts each source over its target (recursively, as Docker's binds are), read-only
    /// where asked. Async-signal-safe: only `mount(2)` on strings built by [`Binds::prepare`];
    /// call it in the child after its mount namespace was made private.
    pub(crate) fn apply(&self) -> io::Result<()> {
        for (src, dst, readonly) in &self.0 {
            nix::mount::mount(
                Some(src.as_c_str()),
                dst.as_c_str(),
                None::<&std::ffi::CStr>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&std::ffi::CStr>,
            )?;
            if *readonly {
                // A bind mount takes its own flags only on a remount.
                nix::mount::mount(
                    None::<&std::ffi::CStr>,
                    dst.as_c_str(),
                    None::<&std::ffi::CStr>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&std::ffi::CStr>,
                )?;
            }
        }
        Ok(())
    }
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn m(source: &str, target: &str) -> Mount {
        Mount { source: source.into(), target: target.into(), readonly: false }
    }

    #[test]
    fn targets_the_task_cannot_have_are_refused() {
        for bad in ["/", "/proc", "/proc/sys", "/sys/fs", "/dev", "rel/x", "/a/../proc"] {
            assert!(m("/tmp", bad).validate().is_err(), "{bad}");
        }
        assert!(m("relative", "/x").validate().is_err());
        for good in ["/opt/applications/helloworld/logs", "/devices", "/procfs", "/data/"] {
            m("/tmp", good).validate().unwrap();
        }
        let e = target_problem(Path::new("/proc/x")).unwrap();
        assert_eq!(e, "\"/proc/x\" cannot be mounted because it is inside /proc");
    }

    #[test]
    fn prepare_makes_targets_and_orders_parents_first() {
        let dir = std::env::temp_dir().join(format!("shoal-binds-{}", std::process::id()));
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        let mounts = vec![
            Mount { source: src.join("f"), target: dir.join("t/a/f"), readonly: true },
            Mount { source: src.clone(), target: dir.join("t"), readonly: false },
        ];
        let b = Binds::prepare(&mounts).unwrap();
        assert!(dir.join("t").is_dir() && dir.join("t/a/f").is_file());
        assert_eq!(b.0[0].1.to_bytes(), dir.join("t").as_os_str().as_bytes());
        let missing = [m(dir.join("nope").to_str().unwrap(), "/x")];
        let e = Binds::prepare(&missing).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
