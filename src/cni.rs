//! `shoal cni`: a CNI plugin (spec 1.0.0, and 0.3.x/0.4.0 as podman 4 and older runtimes
//! write them) that attaches containers to shoal networks.
//!
//! The runtime runs the plugin as `shoal` (a link to this binary in its plugin directory) with
//! the CNI_* variables in the environment and the network configuration on stdin. The plugin
//! only translates: it asks the local agent (`api::cni`, over the API socket) to do the work
//! and prints the agent's answer as a CNI result or error. Configuration fields besides the
//! spec's:
//!
//! - `network`: the shoal network (default: the configuration's `name`); it must exist and be
//!   attachable (`shoal network create --attachable`); the plugin never creates one.
//! - `socket`: the agent's API socket (default `/run/shoal/shoal.sock`).
//! - `aliases`: further DNS names of every container on this network; the runtime adds its
//!   own through the `aliases` capability (`podman run --network-alias`).
//!
//! The container's DNS name is K8S_POD_NAME from CNI_ARGS (podman puts the container name
//! there), else the first 12 characters of its id.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::client::Host;
use crate::api::cni::{CniAnswer, CniAttached, CniFailure, CniRequest, code};
use crate::config::DEFAULT_SOCKET;

/// The versions this plugin speaks (0.1.0 and 0.2.0 predate the result format it writes).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// How long one call of the plugin may take, so a runtime is never left hanging on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The network configuration on stdin: the spec's fields and ours; others are ignored, as
/// runtimes add their own.
#[derive(Debug, Clone, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    name: String,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default, rename = "runtimeConfig")]
    runtime_config: RuntimeConfig,
}

/// The capabilities a runtime fills in (`capabilities` of the conflist).
#[derive(Debug, Clone, Default, Deserialize)]
struct RuntimeConfig {
    /// Network aliases per network name (podman's `--network-alias`).
    #[serde(default)]
    aliases: BTreeMap<String, Vec<String>>,
}

/// What a call needs from the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
}

impl CniEnv {
    /// Reads the CNI_* variables.
    pub fn from_env() -> CniEnv {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        CniEnv {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        }
    }
}

/// A value of CNI_ARGS (`K1=V1;K2=V2`).
fn cni_arg<'a>(args: &'a str, key: &str) -> Option<&'a str> {
    args.split(';').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v)
}

/// Runs one call from the process's environment and stdin, prints the result or error on
/// stdout, and exits as the spec says: 0 on success, 1 with an error result.
pub fn main() -> ExitCode {
    let env = CniEnv::from_env();
    if env.command.is_empty() {
        let msg =
            "CNI_COMMAND is not set: a CNI runtime runs this plugin (see `shoal cni install`)";
        return print_error("1.0.0", &CniFailure::new(code::INVALID_ENV, msg));
    }
    let mut stdin = Vec::new();
    // VERSION needs no configuration, and a runtime may send none.
    if env.command != "VERSION"
        && let Err(e) = std::io::stdin().read_to_end(&mut stdin)
    {
        return print_error("1.0.0", &CniFailure::new(code::IO, format!("reading stdin: {e}")));
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            return print_error("1.0.0", &CniFailure::new(code::IO, format!("runtime: {e}")));
        }
    };
    let (version, out) = rt.block_on(call(&env, &stdin));
    match out {
        Ok(v) => {
            let mut o = std::io::stdout();
            if let Some(v) = v {
                let _ = writeln!(o, "{v}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => print_error(&version, &e),
    }
}

fn print_error(version: &str, e: &CniFailure) -> ExitCode {
    let out = json!({ "cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details });
    let _ = writeln!(std::io::stdout(), "{out}");
    ExitCode::FAILURE
}

/// One call: the version to answer in and what to print (nothing for DEL and CHECK).
pub async fn call(env: &CniEnv, stdin: &[u8]) -> (String, Result<Option<Value>, CniFailure>) {
    if env.command == "VERSION" {
        let v = json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS });
        return ("1.0.0".into(), Ok(Some(v)));
    }
    let conf: NetConf = match serde_json::from_slice(stdin) {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("the network configuration on stdin is not valid: {e}");
            return ("1.0.0".into(), Err(CniFailure::new(code::DECODE, msg)));
        }
    };
    let version = conf.cni_version.clone();
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        let msg = format!(
            "CNI version {version} is not supported; shoal speaks {}",
            SUPPORTED_VERSIONS.join(", ")
        );
        return ("1.0.0".into(), Err(CniFailure::new(code::INCOMPATIBLE_VERSION, msg)));
    }
    let out = match tokio::time::timeout(CALL_TIMEOUT, run(env, &conf)).await {
        Ok(r) => r,
        Err(_) => Err(CniFailure::new(
            code::TRY_AGAIN_LATER,
            format!("the shoal agent did not answer within {} s", CALL_TIMEOUT.as_secs()),
        )),
    };
    (version, out)
}

async fn run(env: &CniEnv, conf: &NetConf) -> Result<Option<Value>, CniFailure> {
    let need = |name: &str, v: &str| {
        if v.is_empty() {
            Err(CniFailure::new(code::INVALID_ENV, format!("{name} is not set")))
        } else {
            Ok(())
        }
    };
    need("CNI_COMMAND", &env.command)?;
    need("CNI_CONTAINERID", &env.container_id)?;
    let network = conf.network.clone().unwrap_or_else(|| conf.name.clone());
    let name = cni_arg(&env.args, "K8S_POD_NAME")
        .filter(|n| !n.is_empty())
        .map_or_else(|| env.container_id.chars().take(12).collect(), str::to_owned);
    let mut aliases: Vec<String> = conf.aliases.clone();
    aliases.extend(conf.runtime_config.aliases.get(&conf.name).into_iter().flatten().cloned());
    aliases.retain(|a| *a != name);
    aliases.sort();
    aliases.dedup();
    let req = CniRequest {
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        network,
        name,
        aliases,
    };
    let socket = conf.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.into());
    let host = Host { socket };
    match env.command.as_str() {
        "ADD" => {
            need("CNI_NETNS", &env.netns)?;
            need("CNI_IFNAME", &env.ifname)?;
            let a: CniAttached = ask(&host, "/cni/add", &req).await?;
            Ok(Some(add_result(&conf.cni_version, &a)))
        }
        "CHECK" => {
            if conf.cni_version.starts_with("0.3.") {
                return Err(CniFailure::new(
                    code::INCOMPATIBLE_VERSION,
                    format!("CHECK needs CNI 0.4.0 or later, not {}", conf.cni_version),
                ));
            }
            need("CNI_NETNS", &env.netns)?;
            need("CNI_IFNAME", &env.ifname)?;
            ask::<()>(&host, "/cni/check", &req).await?;
            Ok(None)
        }
        "DEL" => {
            ask::<()>(&host, "/cni/del", &req).await?;
            Ok(None)
        }
        other => Err(CniFailure::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND={other:?}: shoal knows ADD, CHECK, DEL and VERSION"),
        )),
    }
}

async fn ask<T: serde::de::DeserializeOwned>(
    host: &Host,
    path: &str,
    req: &CniRequest,
) -> Result<T, CniFailure> {
    match host.post_json::<_, CniAnswer<T>>(path, req).await {
        Ok(CniAnswer::Ok(v)) => Ok(v),
        Ok(CniAnswer::Error(e)) => Err(e),
        Err(e) => Err(CniFailure::new(
            code::TRY_AGAIN_LATER,
            format!("the shoal agent at {} does not answer: {e:#}", host.url()),
        )),
    }
}

/// ADD's result in the layout of `version` (before 1.0.0 each address names its IP version).
fn add_result(version: &str, a: &CniAttached) -> Value {
    let mut ip = json!({
        "address": format!("{}/{}", a.ip, a.prefix_len),
        "gateway": a.gateway.to_string(),
        "interface": 0,
    });
    if version.starts_with("0.") {
        ip["version"] = "4".into();
    }
    json!({
        "cniVersion": version,
        "interfaces": [{ "name": a.ifname, "mac": a.mac, "sandbox": a.netns }],
        "ips": [ip],
        "dns": { "nameservers": [a.nameserver.to_string()] },
    })
}

/// `shoal cni install`: links this binary into a CNI plugin directory under the name `shoal`,
/// where runtimes look for the plugin a configuration's `"type": "shoal"` names.
pub fn install(bin_dir: &Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let exe = std::env::current_exe().context("finding this binary")?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    std::fs::create_dir_all(bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    let link = bin_dir.join("shoal");
    match std::fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?
        }
        Ok(_) => anyhow::bail!("{} exists and is not a link; remove it first", link.display()),
        Err(_) => {}
    }
    std::os::unix::fs::symlink(&exe, &link)
        .with_context(|| format!("linking {} to {}", link.display(), exe.display()))?;
    Ok(link)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> CniEnv {
        CniEnv {
            command: cmd.into(),
            container_id: "abc123".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            args: String::new(),
        }
    }

    #[test]
    fn cni_args_are_read_by_key() {
        let a =
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=web1;K8S_POD_NAME=web1;K8S_POD_INFRA_CONTAINER_ID=c";
        assert_eq!(cni_arg(a, "K8S_POD_NAME"), Some("web1"));
        assert_eq!(cni_arg(a, "MISSING"), None);
        assert_eq!(cni_arg("", "K8S_POD_NAME"), None);
    }

    #[test]
    fn results_follow_the_asked_version() {
        let a = CniAttached {
            ifname: "eth0".into(),
            mac: "02:42:0a:00:01:03".into(),
            netns: "/run/netns/x".into(),
            ip: "10.0.1.3".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.0.1.1".parse().unwrap(),
            nameserver: "127.0.0.11".parse().unwrap(),
        };
        let v1 = add_result("1.0.0", &a);
        assert_eq!(v1["ips"][0]["address"], "10.0.1.3/24");
        assert!(v1["ips"][0].get("version").is_none());
        assert_eq!(v1["interfaces"][0]["sandbox"], "/run/netns/x");
        assert_eq!(v1["dns"]["nameservers"][0], "127.0.0.11");
        assert_eq!(add_result("0.4.0", &a)["ips"][0]["version"], "4");
    }

    #[tokio::test]
    async fn bad_input_is_refused_before_the_agent_is_asked() {
        let (v, r) = call(&env("VERSION"), b"").await;
        assert_eq!(v, "1.0.0");
        assert_eq!(r.unwrap().unwrap()["supportedVersions"][3], "1.0.0");
        let (_, r) = call(&env("ADD"), b"{not json").await;
        assert_eq!(r.unwrap_err().code, code::DECODE);
        let conf = br#"{"cniVersion":"9.9.9","name":"n","type":"shoal"}"#;
        assert_eq!(call(&env("ADD"), conf).await.1.unwrap_err().code, code::INCOMPATIBLE_VERSION);
        let conf = br#"{"cniVersion":"0.3.1","name":"n","type":"shoal"}"#;
        assert_eq!(call(&env("CHECK"), conf).await.1.unwrap_err().code, code::INCOMPATIBLE_VERSION);
        let conf = br#"{"cniVersion":"1.0.0","name":"n","type":"shoal","socket":"/nonexistent/s"}"#;
        let mut e = env("ADD");
        e.container_id.clear();
        assert_eq!(call(&e, conf).await.1.unwrap_err().code, code::INVALID_ENV);
        assert_eq!(call(&env("FROB"), conf).await.1.unwrap_err().code, code::INVALID_ENV);
        let r = call(&env("ADD"), conf).await.1.unwrap_err();
        assert_eq!(r.code, code::TRY_AGAIN_LATER, "{}", r.msg);
        assert!(r.msg.contains("/nonexistent/s"), "{}", r.msg);
    }
}
