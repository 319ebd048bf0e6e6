//! Who may use the API socket. The file mode is the first gate (0600, or 0660 with the socket's
//! group set to `api_group`); every connection is then checked by the kernel's word on who is
//! at the other end (SO_PEERCRED): root, the agent's own user, or a member of `api_group`. The
//! API can start and stop processes as root on every node, so a socket whose mode was loosened
//! by hand must not open it to everyone.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use nix::unistd::{Gid, Group, Uid};
use tokio::net::UnixListener;

/// The credentials of the process at the other end of an API connection, as the kernel gave
/// them when it connected (None when it would not say).
#[derive(Debug, Clone, Copy)]
pub struct Peer(Option<tokio::net::unix::UCred>);

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        Peer(stream.io().peer_cred().ok())
    }
}

/// Who is let in.
#[derive(Debug, Clone)]
pub struct Access {
    agent_uid: u32,
    group: Option<(String, u32)>,
}

impl Access {
    /// Root, this process's user, and the members of `group` (a name that must exist).
    pub fn new(group: Option<&str>) -> anyhow::Result<Access> {
        let group = match group {
            None => None,
            Some(name) => {
                let g = Group::from_name(name)
                    .with_context(|| format!("looking up group {name:?}"))?
                    .with_context(|| format!("api_group: no group named {name:?}"))?;
                Some((name.to_owned(), g.gid.as_raw()))
            }
        };
        Ok(Access { agent_uid: Uid::current().as_raw(), group })
    }

    /// Sets the socket's mode (0600, or 0660 owned by the group) once it is bound.
    pub fn restrict(&self, socket: &Path) -> anyhow::Result<()> {
        let mode = match &self.group {
            Some((name, gid)) => {
                nix::unistd::chown(socket, None, Some(Gid::from_raw(*gid)))
                    .with_context(|| format!("giving {} to group {name}", socket.display()))?;
                0o660
            }
            None => 0o600,
        };
        fs::set_permissions(socket, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", socket.display()))
    }

    fn allows(&self, peer: Peer) -> bool {
        let Some(cred) = peer.0 else { return false };
        if cred.uid() == 0 || cred.uid() == self.agent_uid {
            return true;
        }
        let Some((_, gid)) = self.group else { return false };
        cred.gid() == gid || cred.pid().is_some_and(|pid| supplementary_groups(pid).contains(&gid))
    }
}

/// The supplementary groups of a process, from the `Groups:` line of /proc/PID/status (none
/// when it cannot be read: the process is gone, or it is not ours to see).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    parse_groups(&status)
}

fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default()
}

/// The middleware: a connection from anyone else gets 403 and nothing else.
pub async fn check(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<Peer>>().map_or(Peer(None), |c| c.0);
    if access.allows(peer) {
        return next.run(req).await;
    }
    let who =
        peer.0.map_or_else(|| "an unknown process".to_owned(), |c| format!("uid {}", c.uid()));
    let allowed = match &access.group {
        Some((name, _)) => format!("root and the members of group {name}"),
        None => "root (set api_group to let a group in)".to_owned(),
    };
    let body = serde_json::json!({
        "message": format!("permission denied: the shoal API is for {allowed}, not {who}")
    });
    (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_groups_line() {
        let status =
            "Name:\tcurl\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 27 1000 \nVmPeak:\t1 kB\n";
        assert_eq!(parse_groups(status), vec![4, 27, 1000]);
        assert!(parse_groups("Name:\tx\n").is_empty());
        assert!(parse_groups("Groups:\n").is_empty());
    }
}
