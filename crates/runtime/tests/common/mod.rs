//! Shared pieces of the runtime's root-only tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use shoal_netns::NetNs;
use shoal_netns::testing::{Cleanup, unique_prefix};
use shoal_runtime::{LogLine, Runtime, RuntimeConfig, TaskSpec, TaskState, TaskStatus};

/// One test's runtime with a unique prefix and state dir, plus the netns guard.
pub struct Lab {
    pub prefix: String,
    pub state_dir: PathBuf,
    pub rt: Runtime,
    pub guard: Cleanup,
    dir: DirGuard,
}

/// Removes the test's state directory, also when the test panics (after the netns guard ran).
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        let prefix = unique_prefix(tag);
        let state_dir = std::env::temp_dir().join(format!("shoal-rt-test-{prefix}"));
        let rt = Runtime::new(config(&prefix, &state_dir)).expect("runtime");
        Lab {
            prefix,
            state_dir: state_dir.clone(),
            rt,
            guard: Cleanup::new(),
            dir: DirGuard(state_dir),
        }
    }

    /// A second runtime on the same state directory, as a restarted agent makes.
    pub fn restarted(&self) -> Runtime {
        Runtime::new(config(&self.prefix, &self.state_dir)).expect("runtime")
    }

    /// A spec whose id starts with the prefix (so its namespace and files carry it).
    pub fn spec(&self, name: &str, argv: &[&str]) -> TaskSpec {
        TaskSpec::new(
            format!("{}{name}", self.prefix),
            argv.iter().map(|s| s.to_string()).collect(),
        )
    }

    /// `create` + register the namespace with the guard.
    pub async fn create(&mut self, spec: TaskSpec) -> TaskStatus {
        self.guard.adopt_netns(&self.rt.netns_name_for(&spec.id));
        self.rt.create(spec).await.expect("create")
    }

    /// `create` + `start`.
    pub async fn run(&mut self, spec: TaskSpec) -> String {
        let id = spec.id.clone();
        self.create(spec).await;
        self.rt.start(&id).await.expect("start");
        id
    }

    /// Removes every task, then checks that nothing carrying the prefix is left: no
    /// namespace, no mount, no task directory.
    pub async fn finish(self) {
        self.rt.remove_all().await.expect("remove_all");
        assert!(self.rt.list().is_empty());
        drop(self.guard);
        let left = leftovers(&self.prefix);
        let dirs: Vec<_> =
            std::fs::read_dir(self.state_dir.join("tasks")).unwrap().flatten().collect();
        drop(self.dir);
        assert!(left.is_empty(), "left behind: {left:?}");
        assert!(dirs.is_empty(), "task dirs left: {dirs:?}");
    }
}

/// The runtime config of a test: its prefix and state dir, this crate's task shim.
pub fn config(prefix: &str, state_dir: &std::path::Path) -> RuntimeConfig {
    RuntimeConfig {
        prefix: prefix.to_owned(),
        state_dir: state_dir.to_owned(),
        shim: env!("CARGO_BIN_EXE_shoal-task-shim").into(),
    }
}

/// Namespaces and mount lines carrying `prefix`.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = NetNs::list().into_iter().filter(|n| n.starts_with(prefix)).collect();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    v.extend(mountinfo.lines().filter(|l| l.contains(prefix)).map(str::to_owned));
    v
}

/// Polls `f` until it returns `Some`, up to `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the task's log has a line equal to `text`.
pub async fn wait_line(rt: &Runtime, id: &str, text: &str) -> LogLine {
    let logs = rt.logs(id).unwrap();
    eventually(Duration::from_secs(20), text, || {
        let hit = logs.lines().into_iter().find(|l| l.line == text);
        async move { hit }
    })
    .await
}

/// Waits (bounded) for the task to finish.
pub async fn wait_done(rt: &Runtime, id: &str) -> TaskStatus {
    let st = tokio::time::timeout(Duration::from_secs(30), rt.wait(id))
        .await
        .expect("task finishes")
        .unwrap();
    assert!(st.state.is_terminal());
    st
}

/// The text of all kept lines.
pub fn text(rt: &Runtime, id: &str) -> Vec<String> {
    rt.logs(id).unwrap().lines().into_iter().map(|l| l.line).collect()
}

/// Whether `state` is what the test expects, with the status in the message.
pub fn assert_state(st: &TaskStatus, state: TaskState, code: Option<i32>) {
    assert_eq!((st.state, st.exit_code), (state, code), "{st:#?}");
}

/// Runs a command and panics with its output unless it succeeds.
pub fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
