#![allow(clippy::unwrap_used, clippy::expect_used)]
use shoal_netns::NetNs;
use shoal_netns::testing::{Cleanup, require_root, unique_prefix};

#[test]
fn rejects_bad_names() {
    for bad in ["", "a/b", "..", "x y", &"n".repeat(65)] {
        assert!(matches!(NetNs::create(bad), Err(shoal_netns::Error::InvalidName(_))), "{bad:?}");
    }
}

#[test]
fn prefixes_are_unique_and_short() {
    let a = unique_prefix("nt");
    let b = unique_prefix("nt");
    assert_ne!(a, b);
    assert_eq!(a.len(), 6);
}

#[tokio::test]
async fn create_run_netlink_delete() {
    if !require_root("create_run_netlink_delete") {
        return;
    }
    let name = format!("{}-a", unique_prefix("nt"));
    {
        let mut guard = Cleanup::new();
        let ns = guard.netns(&name).unwrap();
        assert!(matches!(NetNs::create(&name), Err(shoal_netns::Error::Exists(_))));
        assert!(NetNs::list().contains(&name));
        // A fresh namespace sees only `lo`, and a different inode than ours.
        let own = std::fs::metadata("/proc/self/ns/net").map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        });
        assert_ne!(own.unwrap(), ns.inode());
        let h = ns.netlink().unwrap();
        assert_eq!(shoal_netns::link_names(&h).await.unwrap(), vec!["lo".to_string()]);
        // A socket made in `run` stays in the namespace: bind 127.0.0.11 would fail on an
        // address nobody has, but `lo` owns all of 127/8 once it is up.
        let idx = shoal_netns::link_index(&h, "lo").await.unwrap();
        h.link()
            .set(rtnetlink::LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .unwrap();
        let sock = ns.run(|| std::net::UdpSocket::bind("127.0.0.11:0")).unwrap().unwrap();
        assert!(sock.local_addr().unwrap().port() > 0);
    }
    assert!(!NetNs::exists(&name), "guard must remove the namespace");
    assert!(!std::path::Path::new(&shoal_netns::path_of(&name)).exists());
}
