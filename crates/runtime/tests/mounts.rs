//! Root-only tests of a task's mounts: a host directory bind-mounted read-write and read-only
//! into the task's own mount namespace, seen by the task and by `exec`, never by the host, and
//! gone when the task stops.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use shoal_netns::testing::require_root;
use shoal_runtime::{Error, Mount, TaskState};

/// Whether any process on this machine has a mount at `target`.
fn mounted_anywhere(target: &std::path::Path) -> bool {
    let needle = format!(" {} ", target.display());
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read_to_string(e.path().join("mountinfo")).is_ok_and(|m| m.contains(&needle))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_read_write_and_read_only_live_and_die_with_the_task() {
    if !require_root("binds_read_write_and_read_only_live_and_die_with_the_task") {
        return;
    }
    let mut lab = Lab::new("rm");
    let (src, rw, ro) =
        (lab.state_dir.join("src"), lab.state_dir.join("in/rw"), lab.state_dir.join("in/ro"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("seed"), "seed\n").unwrap();
    let script = format!(
        "cat {ro}/seed; echo a > {rw}/from-task && echo rw-ok; \
         if echo b > {ro}/nope; then echo ro-wrote; else echo ro-refused; fi; \
         echo done; exec sleep 60",
        ro = ro.display(),
        rw = rw.display()
    );
    let mut spec = lab.spec("m", &["sh", "-c", &script]);
    spec.mounts = vec![
        Mount { source: src.clone(), target: ro.clone(), readonly: true },
        Mount { source: src.clone(), target: rw.clone(), readonly: false },
    ];
    let id = lab.run(spec).await;
    wait_line(&lab.rt, &id, "done").await;
    let out = text(&lab.rt, &id);
    for want in ["seed", "rw-ok", "ro-refused"] {
        assert!(out.iter().any(|l| l == want), "{want}: {out:?}");
    }
    assert!(out.iter().any(|l| l.contains("Read-only file system")), "{out:?}");
    assert_eq!(std::fs::read_to_string(src.join("from-task")).unwrap(), "a\n");
    assert!(!src.join("nope").exists());

    // The targets were made on the host, empty; only the task's namespace has the mounts.
    assert_eq!(std::fs::read_dir(&rw).unwrap().count(), 0);
    assert!(mounted_anywhere(&rw) && mounted_anywhere(&ro));
    let argv = vec!["cat".to_owned(), rw.join("from-task").display().to_string()];
    let seen = lab.rt.exec(&id, &argv, Duration::from_secs(10)).await.unwrap();
    assert_eq!(seen.stdout, b"a\n", "exec sees the task's mounts");
    assert_eq!(lab.rt.spec(&id).unwrap().mounts.len(), 2);

    let st = lab.rt.stop(&id, Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(st.state, TaskState::Shutdown);
    assert!(!mounted_anywhere(&rw) && !mounted_anywhere(&ro), "gone with the task");
    lab.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mounts_are_refused_or_fail_the_task() {
    if !require_root("bad_mounts_are_refused_or_fail_the_task") {
        return;
    }
    let mut lab = Lab::new("rb");
    let mut spec = lab.spec("p", &["true"]);
    spec.mounts = vec![Mount { source: "/tmp".into(), target: "/proc/x".into(), readonly: false }];
    let e = lab.rt.create(spec).await.unwrap_err();
    assert!(matches!(e, Error::InvalidSpec { field: "mounts", .. }), "{e}");

    // A source gone by start: the task fails, saying which path.
    let gone = lab.state_dir.join("gone");
    let mut spec = lab.spec("g", &["true"]);
    spec.mounts =
        vec![Mount { source: gone.clone(), target: lab.state_dir.join("t"), readonly: false }];
    let id = spec.id.clone();
    lab.create(spec).await;
    let e = lab.rt.start(&id).await.unwrap_err();
    assert!(e.to_string().contains(&gone.display().to_string()), "{e}");
    assert_eq!(lab.rt.inspect(&id).unwrap().state, TaskState::Failed);
    lab.finish().await;
}
