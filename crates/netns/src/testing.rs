//! Shared pieces of the root-only tests: every crate's namespace tests use these so that tests
//! running in parallel never collide and never leave anything behind.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::NetNs;

/// Whether a root-only test can run. Under `CI=true` a test that cannot run is a failure, so
/// this panics there; elsewhere it prints a loud SKIPPED line and returns false.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("root-only test `{test}` cannot run: not root, and CI=true forbids skipping");
    }
    eprintln!(
        "\n*** SKIPPED `{test}`: needs root (network namespaces). Run as root to test it. ***\n"
    );
    false
}

/// A short prefix unique to this process and call, `tag` + 4 hex digits, for namespace and link
/// names. Link names have 15 bytes at most, so keep `tag` to 2-3 letters.
pub fn unique_prefix(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mix = std::process::id().wrapping_mul(2_654_435_761).wrapping_add(n.wrapping_mul(40_503));
    format!("{tag}{:04x}", (mix ^ (mix >> 16)) & 0xffff)
}

/// Owns test namespaces (and root-namespace links) by name and removes them in `Drop`, also
/// when the test panics: processes inside are killed first, then links, then namespaces.
#[derive(Debug, Default)]
pub struct Cleanup {
    namespaces: Vec<String>,
    host_links: Vec<String>,
}

impl Cleanup {
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a namespace and registers it for removal.
    pub fn netns(&mut self, name: &str) -> crate::Result<NetNs> {
        let ns = NetNs::create(name)?;
        self.namespaces.push(name.to_owned());
        Ok(ns)
    }

    /// Registers a namespace made elsewhere.
    pub fn adopt_netns(&mut self, name: &str) {
        self.namespaces.push(name.to_owned());
    }

    /// Registers a link in the root namespace for removal.
    pub fn host_link(&mut self, name: &str) {
        self.host_links.push(name.to_owned());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in &self.namespaces {
            if let Ok(ns) = NetNs::open(name) {
                crate::kill_all_in(&ns, Duration::from_secs(5));
            }
        }
        if !self.host_links.is_empty() {
            let links = std::mem::take(&mut self.host_links);
            // Drop may run inside a runtime; a runtime cannot start there, a fresh thread can.
            let _ = std::thread::spawn(move || delete_host_links(&links)).join();
        }
        for name in self.namespaces.iter().rev() {
            if let Err(e) = NetNs::delete(name) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

fn delete_host_links(names: &[String]) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return;
    };
    rt.block_on(async {
        let Ok((conn, handle, _)) = rtnetlink::new_connection() else {
            return;
        };
        tokio::spawn(conn);
        for name in names {
            if let Some(idx) = crate::link_index(&handle, name).await {
                let _ = handle.link().del(idx).execute().await;
            }
        }
    });
}

/// Replays every committed fuzz input of `target_name` (`<manifest_dir>/fuzz/corpus/<name>/`)
/// through the function its fuzz target calls, so corpora run in an ordinary `cargo test`;
/// fails if the corpus is missing or empty.
pub fn replay_corpus(manifest_dir: &str, name: &str, target: fn(&[u8])) {
    let dir = std::path::Path::new(manifest_dir).join("fuzz/corpus").join(name);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut count = 0;
    for entry in entries {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Printed only when the test fails: names the input that broke an invariant.
        eprintln!("replaying {}", path.display());
        target(&data);
        count += 1;
    }
    assert!(count > 0, "{} holds no inputs", dir.display());
}
