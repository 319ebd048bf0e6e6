//! Starting processes inside a task's namespaces: the one place with `unsafe` (`pre_exec`).
//!
//! # Why `pre_exec`
//!
//! The task's process is forked by its shim (see `crate::shim`, a fresh single-threaded
//! process), and the setup it needs is a handful of raw system calls (`setns`, `unshare`,
//! `mount`, `umount2`, `sethostname`), all of which are async-signal-safe, so it runs in the
//! forked child between `fork` and `exec`, under these rules:
//!
//! - everything the child needs (paths as `CString`, the hostname, the namespace fds, buffers
//!   for reading its mount table) is allocated in the parent before `spawn`;
//! - the closure only calls nix wrappers that take `&CStr`/`AsFd` and pass them straight to libc
//!   (no allocation, no locks, no logging) and returns `io::Error::from_raw_os_error`-style errors,
//!   which std reports back to the parent through its exec-error pipe, so `spawn` fails cleanly;
//! - the child is single-threaded after `fork`, which `unshare(CLONE_NEWNS)` and
//!   `setns(mnt)` require.
//!
//! # What the child does
//!
//! 1. `setns(netns, CLONE_NEWNET)`: the task's network namespace, made by the runtime;
//! 2. `unshare(CLONE_NEWNS | CLONE_NEWUTS)`: a mount and UTS namespace of its own;
//! 3. `mount --make-rprivate /`: from here on nothing it mounts propagates to the host, and the
//!    host's later mounts do not reach it;
//! 4. lazily unmount every `nsfs` mount it inherited (`/run/netns/*` of other tasks, overlay
//!    sandboxes, labs): a copy in a long-lived mount namespace would otherwise keep those
//!    network namespaces (and the VXLAN devices in them) alive after the agent deletes them. The
//!    child reads its own `/proc/self/mountinfo` after step 3 into a preallocated buffer, so a
//!    namespace created while the task was being forked is not missed;
//! 5. bind-mount the task's own `resolv.conf` and `hosts` (files in the task's state directory)
//!    over `/etc/resolv.conf` and `/etc/hosts`, then the task's own mounts (`mounts`);
//! 6. `sethostname`; std then sets the process group (the task leads its own), and execs.
//!
//! A health probe enters the running task's net, mount and UTS namespaces through
//! `/proc/<pid>/ns/*`, so it sees what the task sees.

use std::ffi::{CStr, CString, OsString};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::mounts::Binds;
use crate::spec::TaskSpec;

const ETC_RESOLV: &std::ffi::CStr = c"/etc/resolv.conf";
const ETC_HOSTS: &std::ffi::CStr = c"/etc/hosts";

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Finds the program a task would exec: `prog` itself if it has a `/`, else the first match on
/// `path_env`. The error says why in Docker's words.
pub(crate) fn resolve_executable(prog: &str, path_env: &str) -> Result<PathBuf, String> {
    let executable = |p: &Path| {
        p.metadata().is_ok_and(|m| m.is_file())
            && nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok()
    };
    if prog.contains('/') {
        let p = Path::new(prog);
        if !p.exists() {
            return Err(format!("exec: {prog:?}: no such file or directory"));
        }
        if !executable(p) {
            return Err(format!("exec: {prog:?}: permission denied (not an executable file)"));
        }
        return Ok(p.to_path_buf());
    }
    path_env
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(prog))
        .find(|p| executable(p))
        .ok_or_else(|| format!("exec: {prog:?}: executable file not found in $PATH"))
}

/// Calls `f` with the mount point of every `nsfs` mount in a `/proc/*/mountinfo` text. Does
/// not allocate: each path is unescaped (mountinfo writes `\\040` for a space, and so on) into
/// `scratch` and NUL-terminated there, so the forked child can use it. Paths that do not fit
/// in `scratch` or contain NUL are skipped.
pub(crate) fn for_each_nsfs_mount(mountinfo: &[u8], scratch: &mut [u8], mut f: impl FnMut(&CStr)) {
    for line in mountinfo.split(|&b| b == b'\n') {
        let Some(sep) = line.windows(3).position(|w| w == b" - ") else { continue };
        let (left, right) = (&line[..sep], &line[sep + 3..]);
        if right.split(|&b| b == b' ').next() != Some(b"nsfs".as_slice()) {
            continue;
        }
        let Some(mount_point) = left.split(|&b| b == b' ').nth(4) else { continue };
        let (mut i, mut n) = (0, 0);
        while i < mount_point.len() && n + 1 < scratch.len() {
            let esc = &mount_point[i..];
            if esc.len() >= 4
                && esc[0] == b'\\'
                && esc[1..4].iter().all(|c| (b'0'..=b'7').contains(c))
            {
                let v = esc[1..4].iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                scratch[n] = u8::try_from(v).unwrap_or(b'?');
                i += 4;
            } else {
                scratch[n] = esc[0];
                i += 1;
            }
            n += 1;
        }
        if i < mount_point.len() || n + 1 > scratch.len() {
            continue;
        }
        scratch[n] = 0;
        if let Ok(path) = CStr::from_bytes_with_nul(&scratch[..=n]) {
            f(path);
        }
    }
}

/// Lazily unmounts every `nsfs` mount of the calling process's mount namespace, reading
/// `/proc/self/mountinfo` into `buf` (no allocation: safe in a forked child). Returns false if
/// the table could not be read whole.
///
/// A namespace mount can be buried: when iproute2 bind-mounts `/run/netns` onto itself after a
/// namespace was mounted there, the older mount sits under the new bind and its path names the
/// bind, so unmounting the path fails. Then the mount covering its directory is detached (only
/// in this task's own mount namespace) and the next pass reaches the buried mount.
fn detach_nsfs_mounts(buf: &mut [u8], scratch: &mut [u8]) -> bool {
    let mut parent = [0u8; 4096];
    for _pass in 0..4 {
        let Some(len) = read_mountinfo(buf) else { return false };
        let mut found = false;
        for_each_nsfs_mount(&buf[..len], scratch, |path| {
            found = true;
            // Mounts stacked on one another need more than one unmount.
            let mut detached = false;
            for _ in 0..4 {
                if nix::mount::umount2(path, MntFlags::MNT_DETACH).is_err() {
                    break;
                }
                detached = true;
            }
            if !detached {
                let bytes = path.to_bytes();
                if let Some(slash) = bytes.iter().rposition(|&b| b == b'/')
                    && slash > 0
                    && slash < parent.len()
                {
                    parent[..slash].copy_from_slice(&bytes[..slash]);
                    parent[slash] = 0;
                    if let Ok(dir) = CStr::from_bytes_with_nul(&parent[..=slash]) {
                        let _ = nix::mount::umount2(dir, MntFlags::MNT_DETACH);
                    }
                }
            }
        });
        if !found {
            return true;
        }
    }
    true
}

/// Reads `/proc/self/mountinfo` whole into `buf` without allocating; `None` if it does not fit
/// or cannot be read.
fn read_mountinfo(buf: &mut [u8]) -> Option<usize> {
    let fd = nix::fcntl::open(
        c"/proc/self/mountinfo",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .ok()?;
    let mut len = 0;
    loop {
        if len == buf.len() {
            return None;
        }
        match nix::unistd::read(&fd, &mut buf[len..]) {
            Ok(0) => return Some(len),
            Ok(n) => len += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
}

/// Size of the buffer the child reads its mount table into (about 10 000 mounts).
const MOUNTINFO_BUF: usize = 1 << 20;

/// Builds the command that starts a task: its program, environment and pipes, in its own process
/// group, entering the namespaces described in the module docs.
pub(crate) fn task_command(
    spec: &TaskSpec,
    exe: &Path,
    netns: OwnedFd,
    resolv: &Path,
    hosts: &Path,
) -> io::Result<tokio::process::Command> {
    let resolv = cstring(resolv)?;
    let hosts = cstring(hosts)?;
    let hostname = OsString::from(&spec.hostname);
    // The child reads its own mount table after `unshare`, so a namespace created meanwhile
    // is not missed; if that table is too big for the buffer, it falls back to this list.
    let mountinfo = std::fs::read("/proc/self/mountinfo")?;
    let mut fallback: Vec<CString> = Vec::new();
    let mut scratch = vec![0u8; libc::PATH_MAX as usize + 1];
    for_each_nsfs_mount(&mountinfo, &mut scratch, |p| fallback.push(p.to_owned()));
    let mut buf = vec![0u8; MOUNTINFO_BUF];
    let binds = Binds::prepare(&spec.mounts)?;

    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg0(&spec.argv[0])
        .args(&spec.argv[1..])
        .env_clear()
        .envs(spec.full_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(dir) = &spec.workdir {
        cmd.current_dir(dir);
    }
    let setup = move || -> io::Result<()> {
        nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET)?;
        nix::sched::unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS)?;
        nix::mount::mount(
            None::<&std::ffi::CStr>,
            c"/",
            None::<&std::ffi::CStr>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&std::ffi::CStr>,
        )?;
        if !detach_nsfs_mounts(&mut buf, &mut scratch) {
            for p in &fallback {
                for _ in 0..4 {
                    if nix::mount::umount2(p.as_c_str(), MntFlags::MNT_DETACH).is_err() {
                        break;
                    }
                }
            }
        }
        for (src, dst) in [(&resolv, ETC_RESOLV), (&hosts, ETC_HOSTS)] {
            nix::mount::mount(
                Some(src.as_c_str()),
                dst,
                None::<&std::ffi::CStr>,
                MsFlags::MS_BIND,
                None::<&std::ffi::CStr>,
            )?;
        }
        binds.apply()?;
        nix::unistd::sethostname(&hostname)?;
        Ok(())
    };
    // SAFETY: `setup` runs in the child between fork and exec. It only calls nix wrappers that
    // hand already-built `CStr`s, an `OsStr` and a borrowed fd straight to the system calls
    // setns/unshare/mount/umount2/sethostname, which are async-signal-safe; it allocates nothing,
    // takes no lock and touches no state shared with other threads of the parent.
    unsafe {
        cmd.pre_exec(setup);
    }
    Ok(cmd)
}

/// The namespaces of a running task, opened from `/proc/<pid>/ns`.
#[derive(Debug)]
pub(crate) struct TaskNamespaces {
    net: OwnedFd,
    mnt: OwnedFd,
    uts: OwnedFd,
}

impl TaskNamespaces {
    /// Opens the namespaces of process `pid`.
    pub(crate) fn of_pid(pid: u32) -> io::Result<TaskNamespaces> {
        let open = |kind: &str| File::open(format!("/proc/{pid}/ns/{kind}")).map(OwnedFd::from);
        Ok(TaskNamespaces { net: open("net")?, mnt: open("mnt")?, uts: open("uts")? })
    }
}

/// Builds a health probe: `argv` with the task's environment, entering `ns`.
pub(crate) fn probe_command(
    spec: &TaskSpec,
    argv: &[String],
    ns: TaskNamespaces,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(spec.full_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let setup = move || -> io::Result<()> {
        nix::sched::setns(&ns.net, CloneFlags::CLONE_NEWNET)?;
        nix::sched::setns(&ns.mnt, CloneFlags::CLONE_NEWNS)?;
        nix::sched::setns(&ns.uts, CloneFlags::CLONE_NEWUTS)?;
        Ok(())
    };
    // SAFETY: runs in the single-threaded child between fork and exec and only calls setns with
    // fds opened in the parent: async-signal-safe, no allocation, no locks.
    unsafe {
        cmd.pre_exec(setup);
    }
    cmd
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn finds_nsfs_mounts() {
        let info = b"\
22 1 0:21 / /proc rw,nosuid - proc proc rw
612 29 0:4 net:[4026532300] /run/netns/a\\040b\\011c\\ rw - nsfs nsfs rw
613 29 0:4 net:[4026532301] /run/netns/rt-t-abc rw shared:5 - nsfs nsfs rw
614 29 0:4 net:[4026532302] /run/netns/nul\\000x rw - nsfs nsfs rw
615 29 0:4 net:[4026532303] /run/netns/this-one-is-far-too-long rw - nsfs nsfs rw
616 29 0:4 fake - nsfs nsfs rw
bad line - nsfs";
        let mut found = Vec::new();
        let mut scratch = [0u8; 24];
        for_each_nsfs_mount(info, &mut scratch, |p| found.push(p.to_owned()));
        assert_eq!(found, [c"/run/netns/a b\tc\\".to_owned(), c"/run/netns/rt-t-abc".to_owned()]);
    }

    proptest::proptest! {
        #[test]
        fn nsfs_scan_never_panics(info in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), n in 0usize..40) {
            let mut scratch = vec![0u8; n];
            for_each_nsfs_mount(&info, &mut scratch, |p| assert!(p.to_bytes().len() < n));
        }
    }

    #[test]
    fn reads_own_mount_table() {
        let mut buf = vec![0u8; 16];
        let mut scratch = [0u8; 64];
        assert!(!detach_nsfs_mounts(&mut buf, &mut scratch), "a too-small buffer is reported");
    }

    #[test]
    fn resolves_programs_like_exec() {
        assert_eq!(
            resolve_executable("sh", "/nonexistent:/bin:/usr/bin").unwrap().file_name().unwrap(),
            "sh"
        );
        let e = resolve_executable("no-such-prog-xyz", "/bin:/usr/bin").unwrap_err();
        assert!(e.contains("executable file not found in $PATH"), "{e}");
        let e = resolve_executable("/no/such/file", "").unwrap_err();
        assert!(e.contains("no such file"), "{e}");
        let e = resolve_executable("/etc/passwd", "").unwrap_err();
        assert!(e.contains("permission denied"), "{e}");
        assert!(resolve_executable("/bin/sh", "").is_ok());
    }
}
