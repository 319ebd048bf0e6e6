//! Named network namespaces, the way iproute2 keeps them (`/run/netns/NAME`, a bind mount of a
//! thread's `ns/net`), so `ip netns exec` and `ip -n` see what shoal makes and the other way round.
//!
//! The one rule: never `setns` a thread that something else relies on. [`NetNs::run`] does the
//! work on a short-lived scoped thread that enters the namespace, runs the closure and exits, so a
//! tokio worker never changes namespace. Sockets and netlink connections keep the namespace they
//! were created in, so a socket made inside `run` and handed back can be driven by the main
//! runtime (that is how DNS listens on 127.0.0.11 in every task and how the mesh dials into the
//! ingress sandbox).
//!
//! [`testing`] holds what the root-only tests of every crate share: the root check that fails
//! under `CI=true`, unique short prefixes, and a guard that removes namespaces, links and
//! processes in `Drop`.

pub mod testing;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// Where iproute2 keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// What went wrong with a namespace operation. Nothing is left half-made: a failed
/// [`NetNs::create`] removes the file it made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid namespace name {0:?}: use 1-64 of [A-Za-z0-9_.-]")]
    InvalidName(String),
    #[error("network namespace {0:?} already exists")]
    Exists(String),
    #[error("network namespace {0:?} does not exist")]
    NotFound(String),
    #[error("network namespace {name:?}: {op}: {source}")]
    Io { name: String, op: &'static str, source: io::Error },
    #[error("the helper thread for namespace {0:?} panicked")]
    ThreadPanicked(String),
}

impl Error {
    fn io(name: &str, op: &'static str, source: impl Into<io::Error>) -> Self {
        Error::Io { name: name.to_owned(), op, source: source.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An open handle on a named network namespace. Dropping it closes the handle; the namespace
/// lives on until [`NetNs::delete`].
#[derive(Debug)]
pub struct NetNs {
    name: String,
    fd: OwnedFd,
}

fn validate(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok { Ok(()) } else { Err(Error::InvalidName(name.to_owned())) }
}

/// The path of a named namespace.
pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

impl NetNs {
    /// Creates a new, empty network namespace (only `lo`, down) named `name`.
    pub fn create(name: &str) -> Result<NetNs> {
        validate(name)?;
        prepare_dir().map_err(|e| Error::io(name, "prepare /run/netns", e))?;
        let path = path_of(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::Exists(name.to_owned()));
            }
            Err(e) => return Err(Error::io(name, "create namespace file", e)),
        }
        let mounted = std::thread::scope(|s| {
            s.spawn(|| -> Result<()> {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::io(name, "unshare(CLONE_NEWNET)", e))?;
                nix::mount::mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| Error::io(name, "bind-mount ns/net", e))
            })
            .join()
            .map_err(|_| Error::ThreadPanicked(name.to_owned()))?
        });
        if let Err(e) = mounted {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        NetNs::open(name)
    }

    /// Opens an existing named namespace.
    pub fn open(name: &str) -> Result<NetNs> {
        validate(name)?;
        let path = path_of(name);
        let file = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::NotFound(name.to_owned()),
            _ => Error::io(name, "open", e),
        })?;
        // An unmounted leftover file is a plain file on tmpfs, not an nsfs inode.
        if !is_nsfs(&file) {
            return Err(Error::NotFound(name.to_owned()));
        }
        Ok(NetNs { name: name.to_owned(), fd: file.into() })
    }

    /// Removes a named namespace: unmounts and deletes its file. The namespace itself goes away
    /// once no process and no open handle keeps it. Deleting a missing name is not an error.
    pub fn delete(name: &str) -> Result<()> {
        validate(name)?;
        let path = path_of(name);
        match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(Error::io(name, "umount", e)),
        }
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(name, "remove namespace file", e)),
        }
    }

    /// Whether a namespace of that name exists (its file is a mounted namespace).
    pub fn exists(name: &str) -> bool {
        NetNs::open(name).is_ok()
    }

    /// The names under [`NETNS_DIR`], sorted.
    pub fn list() -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(NETNS_DIR)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        v.sort();
        v
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The inode that identifies this namespace (the number in `/proc/PID/ns/net -> net:[N]`).
    pub fn inode(&self) -> u64 {
        fs::metadata(format!("/proc/self/fd/{}", self.fd.as_raw_fd())).map(|m| m.ino()).unwrap_or(0)
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its result.
    /// Sockets, netlink connections and child processes made in `f` belong to this namespace.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        std::thread::scope(|s| {
            s.spawn(|| -> Result<R> {
                nix::sched::setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::io(&self.name, "setns", e))?;
                Ok(f())
            })
            .join()
            .map_err(|_| Error::ThreadPanicked(self.name.clone()))?
        })
    }

    /// A netlink handle whose socket lives in this namespace, driven by the current tokio
    /// runtime. Must be called from within a runtime.
    pub fn netlink(&self) -> Result<rtnetlink::Handle> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _) = self
            .run(|| {
                let _guard = rt.enter();
                rtnetlink::new_connection()
            })?
            .map_err(|e| Error::io(&self.name, "netlink socket", e))?;
        tokio::spawn(conn);
        Ok(handle)
    }

    /// The pids of processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        pids_in_netns(self.inode())
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Makes `/run/netns` a shared mount of its own, as iproute2 does before its first namespace.
/// Were it a plain directory, the first `ip netns add` run later would bind-mount it onto itself
/// and bury our namespace mounts underneath, where they can be neither unmounted nor removed.
fn prepare_dir() -> io::Result<()> {
    static READY: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if READY.get().is_some() {
        return Ok(());
    }
    fs::create_dir_all(NETNS_DIR)?;
    let shared = || {
        nix::mount::mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => {}
        // Not a mount point yet: make it one, then shared.
        Err(nix::errno::Errno::EINVAL) => {
            nix::mount::mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            shared()?;
        }
        Err(e) => return Err(e.into()),
    }
    let _ = READY.set(());
    Ok(())
}

fn is_nsfs(file: &File) -> bool {
    nix::sys::statfs::fstatfs(file)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

/// Pids of processes in the network namespace with inode `ino`.
pub fn pids_in_netns(ino: u64) -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino() == ino).unwrap_or(false)
        })
        .collect()
}

/// Sends SIGKILL to every process in the namespace and waits (up to `timeout`) until none is left.
pub fn kill_all_in(ns: &NetNs, timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let pids = ns.pids();
        if pids.is_empty() || std::time::Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Looks up a link's index by name on a netlink handle.
pub async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Option<u32> {
    use futures::TryStreamExt;
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Some(msg.header.index),
        _ => None,
    }
}

/// Names of all links visible on a netlink handle.
pub async fn link_names(handle: &rtnetlink::Handle) -> Result<Vec<String>, rtnetlink::Error> {
    use futures::TryStreamExt;
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut out = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await? {
        for attr in msg.attributes {
            if let LinkAttribute::IfName(n) = attr {
                out.push(n);
            }
        }
    }
    Ok(out)
}
