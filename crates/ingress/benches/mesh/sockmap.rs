//! The sockmap experiment's system for `benches/mesh.rs`: a second shoal mesh on the same
//! runtimes, publishing the same backend on ports 55201/58080 with
//! `ForwardMode::Sockmap` (the sk_skb redirect of `src/sockmap.rs`), measured in the same
//! rounds as the splice mesh and reported as "shoal sockmap" against "shoal" (splice).
//!
//! The BPF object is compiled here with clang (scripts/install-test-deps.sh installs clang,
//! llvm and libbpf-dev); without them the experiment is left out with a note, not a failure.
//! Its proxy-CPU figures count only this process; the redirect's work runs in softirq and a
//! kernel worker, which only the whole-machine CPU per request sees.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_ingress::{BackendSpec, ForwardMode, Mesh, MeshConfig, PortSpec, ServiceSpec, sockmap};
use shoal_netns::NetNs;

/// The experiment's (bulk, HTTP) ports on the proxy.
pub const PORTS: (u16, u16) = (55201, 58080);

/// Loads the program and starts one sockmap mesh per runtime, or says why it cannot.
pub fn start(
    handles: &[tokio::runtime::Handle],
    ns: &Arc<NetNs>,
    listen: Option<IpAddr>,
    backend: IpAddr,
    reuse_port: bool,
) -> Result<Vec<Mesh>, String> {
    let object = sockmap::compile_object().map_err(|e| e.to_string())?;
    sockmap::install(&object).map_err(|e| e.to_string())?;
    handles
        .iter()
        .map(|h| {
            let _g = h.enter();
            let mesh = Mesh::new(MeshConfig {
                ingress_ns: Some(ns.clone()),
                listen_ns: Some(ns.clone()),
                forward: ForwardMode::Sockmap,
                reuse_port,
                ..MeshConfig::default()
            })
            .map_err(|e| e.to_string())?;
            for (name, port, target) in [("bulk", PORTS.0, 5201u16), ("http", PORTS.1, 8080)] {
                let mut p = PortSpec::tcp(port, target);
                p.listen = listen;
                let mut spec = ServiceSpec::new(name, vec![p]);
                spec.health.interval = Duration::from_secs(2);
                mesh.set_service(spec, vec![BackendSpec::new("be", backend)])
                    .map_err(|e| e.to_string())?;
            }
            Ok(mesh)
        })
        .collect()
}

/// The report's note on the experiment.
pub fn note(outcome: &Result<Vec<Mesh>, String>) -> String {
    match outcome {
        Ok(_) => "shoal sockmap: the same mesh with ForwardMode::Sockmap (an sk_skb stream-verdict program redirects each socket's bytes to its pair through a SOCKHASH; userspace only links the pair and waits for FIN), compared with shoal (splice/copy) in the same rounds; its proxy CPU counts this process only, the redirect's softirq and kernel-worker time shows in the whole-machine CPU".to_owned(),
        Err(e) => format!("shoal sockmap experiment not run: {e}"),
    }
}
