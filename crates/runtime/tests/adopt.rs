//! Tasks outlive the runtime that started them: a new runtime on the same state directory
//! adopts them, running or ended, with their pids, logs and real exit codes. Root only.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Lab, assert_state, config, eventually, text, wait_done, wait_line};
use shoal_netns::testing::require_root;
use shoal_runtime::{Health, HealthCheck, Runtime, TaskSpec, TaskState};

/// A shell task that says `up`, waits for `go` to exist, says `bye` and exits with `code`.
fn waiter(lab: &Lab, name: &str, go: &Path, code: i32) -> TaskSpec {
    let script = format!(
        "echo up; while [ ! -e {go} ]; do sleep 0.05; done; echo bye; echo oops >&2; exit {code}",
        go = go.display()
    );
    lab.spec(name, &["sh", "-c", &script])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_outlive_the_runtime_and_are_adopted_with_their_exit_codes() {
    if !require_root("tasks_outlive_the_runtime_and_are_adopted_with_their_exit_codes") {
        return;
    }
    let mut lab = Lab::new("ad");
    let go_live = lab.state_dir.join("go-live");
    let go_dead = lab.state_dir.join("go-dead");
    let live = waiter(&lab, "live", &go_live, 7);
    let dead = waiter(&lab, "dead", &go_dead, 3);
    let mut sleeper = lab.spec("sleeper", &["sleep", "300"]);
    let mut check = HealthCheck::shell("true");
    check.interval = Duration::from_secs(60);
    check.start_interval = Duration::from_millis(100);
    check.start_period = Duration::from_secs(60);
    sleeper.health = Some(check);
    let ids = [live.id.clone(), dead.id.clone(), sleeper.id.clone()];
    for id in &ids {
        lab.guard.adopt_netns(&lab.rt.netns_name_for(id));
    }

    // The first "agent": its own tokio runtime, shut down (tasks, timers, everything) once the
    // tasks run, as an agent that exits or is killed.
    let first = Runtime::new(config(&lab.prefix, &lab.state_dir)).unwrap();
    let pids = std::thread::spawn(move || {
        let tokio_rt = tokio::runtime::Runtime::new().unwrap();
        let pids = tokio_rt.block_on(async {
            let mut pids = Vec::new();
            for spec in [live, dead, sleeper] {
                let id = spec.id.clone();
                first.create(spec).await.unwrap();
                pids.push(first.start(&id).await.unwrap().pid.unwrap());
            }
            wait_line(&first, &ids[0], "up").await;
            eventually(Duration::from_secs(20), "the sleeper healthy", || {
                let h = first.inspect(&ids[2]).unwrap().health;
                async move { (h == Some(Health::Healthy)).then_some(()) }
            })
            .await;
            pids
        });
        tokio_rt.shutdown_timeout(Duration::from_secs(5));
        pids
    })
    .join()
    .unwrap();

    // With no runtime at all, one task ends: its shim keeps the exit status.
    std::fs::write(&go_dead, b"").unwrap();
    let dead_dir = lab.state_dir.join("tasks").join(&lab.spec("dead", &["x"]).id);
    eventually(Duration::from_secs(20), "the shim's exit record", || {
        let there = dead_dir.join("exit.json").exists();
        async move { there.then_some(()) }
    })
    .await;

    // The second "agent" adopts all three.
    let adopted = lab.rt.adopt().await.unwrap();
    assert_eq!(adopted.len(), 3, "{adopted:#?}");
    let [live, dead, sleeper] =
        [0, 1, 2].map(|i| lab.spec(["live", "dead", "sleeper"][i], &["x"]).id);
    let st = lab.rt.inspect(&live).unwrap();
    assert_eq!((st.state, st.pid), (TaskState::Running, Some(pids[0])), "same process");
    let st = lab.rt.inspect(&sleeper).unwrap();
    assert_eq!(st.pid, Some(pids[2]));
    // Healthy before, healthy at once after (its next probe is a minute away): still serving.
    assert!(st.is_serving(), "{st:#?}");
    let st = lab.rt.inspect(&dead).unwrap();
    assert_state(&st, TaskState::Failed, Some(3));
    assert!(st.started_at.is_some() && st.finished_at.is_some(), "{st:#?}");
    // Logs written before, during and after the gap are all there, in order.
    eventually(Duration::from_secs(10), "the ended task's log", || {
        let t = text(&lab.rt, &dead);
        async move { (t.len() == 3).then_some(()) }
    })
    .await;
    assert_eq!(text(&lab.rt, &dead), ["up", "bye", "oops"]);
    assert!(lab.rt.logs(&dead).unwrap().is_closed());

    // The adopted running task: followed to its end with its real exit code and output.
    let mut follow = lab.rt.logs(&live).unwrap().follow();
    assert_eq!(follow.next().await.unwrap().line, "up");
    std::fs::write(&go_live, b"").unwrap();
    let st = wait_done(&lab.rt, &live).await;
    assert_state(&st, TaskState::Failed, Some(7));
    assert_eq!(follow.next().await.unwrap().line, "bye");
    assert_eq!(follow.next().await.unwrap().line, "oops");
    assert_eq!(follow.next().await, None, "the log ends with the task");

    // An adopted task stops like any other (SIGTERM to its group).
    let st = lab.rt.stop(&sleeper, Some(Duration::from_secs(10))).await.unwrap();
    assert_state(&st, TaskState::Shutdown, Some(143));
    assert!(!Path::new(&format!("/proc/{}", pids[2])).exists(), "the sleeper is gone");
    lab.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shim_fails_its_task_and_kills_it() {
    if !require_root("a_killed_shim_fails_its_task_and_kills_it") {
        return;
    }
    let mut lab = Lab::new("ak");
    let id = lab.run(lab.spec("k", &["sleep", "300"])).await;
    let task_pid = lab.rt.inspect(&id).unwrap().pid.unwrap();
    let dir = lab.state_dir.join("tasks").join(&id);
    let running: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("running.json")).unwrap()).unwrap();
    let shim = running["shim_pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let st = wait_done(&lab.rt, &id).await;
    assert_eq!((st.state, st.exit_code), (TaskState::Failed, None), "{st:#?}");
    assert!(st.error.unwrap().contains("supervisor"));
    eventually(Duration::from_secs(10), "the orphaned task killed", || {
        let gone = !Path::new(&format!("/proc/{task_pid}")).exists();
        async move { gone.then_some(()) }
    })
    .await;
    lab.finish().await;
}
