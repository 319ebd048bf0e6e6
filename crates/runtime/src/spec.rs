//! What a task is: [`TaskSpec`] and its [`HealthCheck`], their validation, and the files the
//! task sees at `/etc/resolv.conf` and `/etc/hosts`.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::mounts::Mount;

/// The resolv.conf a task gets unless its spec says otherwise: the per-task DNS at 127.0.0.11.
pub const DEFAULT_RESOLV_CONF: &str = "nameserver 127.0.0.11\noptions ndots:0\n";
/// Docker's default stop grace period.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// Default cap of a task's kept log, in bytes (text plus a fixed per-line overhead).
pub const DEFAULT_LOG_CAP: usize = 1024 * 1024;
/// Smallest accepted log cap.
pub const MIN_LOG_CAP: usize = 1024;
/// Largest accepted log cap.
pub const MAX_LOG_CAP: usize = 1024 * 1024 * 1024;
/// `PATH` given to a task whose env does not set one (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The stop signal of a spec that names none.
pub const DEFAULT_STOP_SIGNAL: &str = "SIGTERM";

fn default_stop_signal() -> String {
    DEFAULT_STOP_SIGNAL.to_owned()
}

/// A signal as Docker's `--stop-signal` takes it: a name with or without `SIG`, in any case
/// (`SIGQUIT`, `quit`), or its number (`3`).
pub fn parse_signal(s: &str) -> std::result::Result<nix::sys::signal::Signal, String> {
    use nix::sys::signal::Signal;
    let t = s.trim();
    let found = match t.parse::<i32>() {
        Ok(n) => Signal::try_from(n).ok(),
        Err(_) => {
            let up = t.to_ascii_uppercase();
            let name = if up.starts_with("SIG") { up } else { format!("SIG{up}") };
            name.parse::<Signal>().ok()
        }
    };
    found.ok_or_else(|| format!("{s:?} is not a signal (e.g. SIGTERM, QUIT, 3)"))
}

/// One task: a command run in its own network, mount and UTS namespaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Task id, 1-64 of `[A-Za-z0-9_.-]` with at least one letter or digit; unique per runtime.
    pub id: String,
    /// Human name (e.g. `myhelloworld.1.x7b2`), reported in status; not used by the kernel.
    pub name: String,
    /// UTS hostname and the name `/etc/hosts` gives the task's addresses.
    pub hostname: String,
    /// Program and arguments; the program is looked up on the task's `PATH` unless it has a `/`.
    pub argv: Vec<String>,
    /// Environment (the task starts from an empty one plus `PATH`, `HOSTNAME` and `HOME`).
    pub env: Vec<(String, String)>,
    /// Working directory (absolute); the agent's own when `None`.
    pub workdir: Option<PathBuf>,
    /// Optional health command, run periodically inside the task's namespaces.
    pub health: Option<HealthCheck>,
    /// The signal a stop sends first (Docker's `--stop-signal`), by name: `SIGTERM`, `QUIT`,
    /// or a number; see [`parse_signal`].
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    /// Time between the stop signal and SIGKILL on stop.
    pub stop_grace: Duration,
    /// Cap of the kept log in bytes.
    pub log_cap: usize,
    /// Content of the task's `/etc/resolv.conf`; [`DEFAULT_RESOLV_CONF`] when `None`.
    pub resolv_conf: Option<String>,
    /// The task's own addresses, written to `/etc/hosts` with its hostname (settable until start).
    pub addresses: Vec<IpAddr>,
    /// Further `/etc/hosts` lines: an address and the names it carries.
    pub extra_hosts: Vec<(IpAddr, Vec<String>)>,
    /// Host paths bind-mounted into the task's mount namespace at start.
    #[serde(default)]
    pub mounts: Vec<Mount>,
}

impl TaskSpec {
    /// A spec with Docker's defaults: hostname = the first 12 characters of the id.
    pub fn new(id: impl Into<String>, argv: Vec<String>) -> TaskSpec {
        let id = id.into();
        let hostname = short_id(&id);
        TaskSpec {
            name: id.clone(),
            id,
            hostname,
            argv,
            env: Vec::new(),
            workdir: None,
            health: None,
            stop_signal: default_stop_signal(),
            stop_grace: DEFAULT_STOP_GRACE,
            log_cap: DEFAULT_LOG_CAP,
            resolv_conf: None,
            addresses: Vec::new(),
            extra_hosts: Vec::new(),
            mounts: Vec::new(),
        }
    }

    /// Checks every field; the error names the field and what is wrong with it.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &'static str, reason: String| Err(Error::InvalidSpec { field, reason });
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            && !short_id(&self.id).is_empty();
        if !id_ok {
            return bad(
                "id",
                format!("{:?}: use 1-64 of [A-Za-z0-9_.-], some alphanumeric", self.id),
            );
        }
        if self.name.contains('\0') || self.name.len() > 256 {
            return bad("name", "at most 256 bytes, no NUL".into());
        }
        let host_ok = !self.hostname.is_empty()
            && self.hostname.len() <= 64
            && self.hostname.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !host_ok {
            return bad("hostname", format!("{:?}: use 1-64 of [A-Za-z0-9_.-]", self.hostname));
        }
        match self.argv.first() {
            None => return bad("argv", "empty command".into()),
            Some(p) if p.is_empty() => return bad("argv", "empty program name".into()),
            _ => {}
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return bad("argv", "an argument contains NUL".into());
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return bad("env", format!("{k:?}: names are non-empty without '=' or NUL"));
            }
        }
        if let Some(dir) = &self.workdir {
            let s = dir.to_string_lossy();
            if !dir.is_absolute() || s.contains('\0') {
                return bad("workdir", format!("{s:?} must be an absolute path"));
            }
        }
        if !(MIN_LOG_CAP..=MAX_LOG_CAP).contains(&self.log_cap) {
            return bad(
                "log_cap",
                format!("{} is outside {MIN_LOG_CAP}..={MAX_LOG_CAP}", self.log_cap),
            );
        }
        if let Err(why) = parse_signal(&self.stop_signal) {
            return bad("stop_signal", why);
        }
        if self.stop_grace > Duration::from_secs(3600) {
            return bad("stop_grace", "at most one hour".into());
        }
        if self.resolv_conf.as_deref().is_some_and(|r| r.contains('\0') || r.len() > 64 * 1024) {
            return bad("resolv_conf", "at most 64 KiB, no NUL".into());
        }
        for (_, names) in &self.extra_hosts {
            let ok = !names.is_empty()
                && names.iter().all(|n| {
                    !n.is_empty()
                        && n.len() <= 253
                        && !n.bytes().any(|b| b.is_ascii_whitespace() || b == 0 || b == b'#')
                });
            if !ok {
                return bad(
                    "extra_hosts",
                    format!("{names:?}: names are non-empty, without spaces or '#'"),
                );
            }
        }
        if let Some(h) = &self.health {
            h.validate()?;
        }
        for m in &self.mounts {
            m.validate()?;
        }
        Ok(())
    }

    /// The text of the task's `/etc/resolv.conf`.
    pub fn resolv_conf_text(&self) -> String {
        self.resolv_conf.clone().unwrap_or_else(|| DEFAULT_RESOLV_CONF.to_owned())
    }

    /// The text of the task's `/etc/hosts`: loopback lines, the task's addresses with its
    /// hostname, then the extra entries.
    pub fn hosts_text(&self) -> String {
        let mut s = String::from(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n\
             ff02::2\tip6-allrouters\n",
        );
        for ip in &self.addresses {
            let _ = writeln!(s, "{ip}\t{}", self.hostname);
        }
        for (ip, names) in &self.extra_hosts {
            let _ = writeln!(s, "{ip}\t{}", names.join(" "));
        }
        s
    }

    /// The value of `PATH` the task runs with.
    pub fn path_env(&self) -> &str {
        self.env.iter().rev().find(|(k, _)| k == "PATH").map_or(DEFAULT_PATH, |(_, v)| v.as_str())
    }

    /// The full environment of the task: defaults first, then the spec's (later wins).
    pub fn full_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
            ("HOSTNAME".to_owned(), self.hostname.clone()),
            ("HOME".to_owned(), "/root".to_owned()),
        ];
        for (k, v) in &self.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        env
    }
}

/// The first 12 letters and digits of a task id: the part used in namespace names.
pub fn short_id(id: &str) -> String {
    id.chars().filter(char::is_ascii_alphanumeric).take(12).collect()
}

/// A health command and its timing, with Docker's meaning and defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Command run inside the task's namespaces; exit 0 = healthy.
    pub argv: Vec<String>,
    /// Time between probes (default 30 s).
    pub interval: Duration,
    /// A probe running longer is killed and counts as failed (default 30 s).
    pub timeout: Duration,
    /// Consecutive failures that make the task unhealthy (default 3; 0 counts as 1).
    pub retries: u32,
    /// Failures in this time after start do not count while the task is still starting.
    pub start_period: Duration,
    /// Time between probes during the start period (default 5 s, never above `interval`).
    pub start_interval: Duration,
}

impl HealthCheck {
    /// A check running `argv` with Docker's default timing.
    pub fn new(argv: Vec<String>) -> HealthCheck {
        HealthCheck {
            argv,
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
            retries: 3,
            start_period: Duration::ZERO,
            start_interval: Duration::from_secs(5),
        }
    }

    /// A check running `cmd` with `/bin/sh -c`, as Docker's `--health-cmd` does.
    pub fn shell(cmd: &str) -> HealthCheck {
        HealthCheck::new(vec!["/bin/sh".into(), "-c".into(), cmd.into()])
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |reason: &str| Err(Error::InvalidSpec { field: "health", reason: reason.into() });
        if self.argv.first().is_none_or(|p| p.is_empty()) {
            return bad("empty health command");
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return bad("a health argument contains NUL");
        }
        if self.interval.is_zero() || self.timeout.is_zero() || self.start_interval.is_zero() {
            return bad("interval, timeout and start_interval must be above zero");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> TaskSpec {
        TaskSpec::new("abcdef0123456789xyz", vec!["sleep".into(), "1".into()])
    }

    #[test]
    fn stop_signals_by_name_or_number() {
        use nix::sys::signal::Signal;
        assert_eq!(parse_signal("SIGQUIT"), Ok(Signal::SIGQUIT));
        assert_eq!(parse_signal("quit"), Ok(Signal::SIGQUIT));
        assert_eq!(parse_signal("15"), Ok(Signal::SIGTERM));
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("0").is_err());
        let mut s = spec();
        s.stop_signal = "bogus".into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn defaults_follow_docker() {
        let s = spec();
        assert_eq!(s.hostname, "abcdef012345");
        assert_eq!(s.stop_grace, Duration::from_secs(10));
        assert_eq!(s.resolv_conf_text(), "nameserver 127.0.0.11\noptions ndots:0\n");
        s.validate().unwrap();
        let h = HealthCheck::shell("true");
        assert_eq!(
            (h.interval, h.timeout, h.retries),
            (Duration::from_secs(30), Duration::from_secs(30), 3)
        );
    }

    #[test]
    fn bad_fields_are_named() {
        type Mutation = Box<dyn Fn(&mut TaskSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("id", Box::new(|s| s.id = "a/b".into())),
            ("id", Box::new(|s| s.id = "---".into())),
            ("argv", Box::new(|s| s.argv.clear())),
            ("argv", Box::new(|s| s.argv = vec!["a\0b".into()])),
            ("hostname", Box::new(|s| s.hostname = "has space".into())),
            ("env", Box::new(|s| s.env = vec![("A=B".into(), "c".into())])),
            ("workdir", Box::new(|s| s.workdir = Some("relative".into()))),
            ("log_cap", Box::new(|s| s.log_cap = 10)),
            ("health", Box::new(|s| s.health = Some(HealthCheck::new(vec![])))),
            (
                "extra_hosts",
                Box::new(|s| {
                    s.extra_hosts = vec![("10.0.0.1".parse().unwrap(), vec!["a b".into()])]
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut s = spec();
            mutate(&mut s);
            match s.validate() {
                Err(Error::InvalidSpec { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn hosts_and_env() {
        let mut s = spec();
        s.hostname = "web1".into();
        s.addresses = vec!["10.0.1.5".parse().unwrap()];
        s.extra_hosts = vec![("10.0.1.9".parse().unwrap(), vec!["db".into(), "db.local".into()])];
        s.env = vec![("PATH".into(), "/opt/bin".into()), ("X".into(), "1".into())];
        let h = s.hosts_text();
        assert!(h.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(h.contains("\n10.0.1.5\tweb1\n"));
        assert!(h.ends_with("10.0.1.9\tdb db.local\n"));
        assert_eq!(s.path_env(), "/opt/bin");
        let env = s.full_env();
        assert_eq!(env.iter().filter(|(k, _)| k == "PATH").count(), 1);
        assert!(env.contains(&("HOSTNAME".into(), "web1".into())));
        assert!(env.contains(&("X".into(), "1".into())));
    }
}
