//! Small simulated clusters: join, metadata, tables, withdrawal, restart, hostile input.

use std::time::Duration;

use shoal_gossip::sim::Sim;
use shoal_gossip::{
    CoreConfig, DropReason, EntryChange, EntryKey, Event, MemberState, NodeId, NodeMeta, Role,
};

fn alive_everywhere(sim: &Sim, n: usize) -> bool {
    (0..sim.len()).filter(|&i| sim.running(i)).all(|i| {
        sim.core(i).is_some_and(|c| c.member_counts().alive == n && c.member_counts().suspect == 0)
    })
}

fn joined(n: usize, seed: u64) -> Sim {
    let mut sim = Sim::new(seed, CoreConfig::lan());
    for _ in 0..n {
        sim.add_node();
    }
    for i in 1..n {
        sim.join(i, 0);
    }
    let t = sim.run_until_pred(Duration::from_millis(100), Duration::from_secs(30), |s| {
        alive_everywhere(s, n)
    });
    assert!(t.is_some(), "{n} nodes did not converge in 30 s");
    sim
}

#[test]
fn nodes_join_through_a_seed_and_learn_metadata() {
    let mut sim = joined(8, 1);
    // Every node learns every other's metadata (by gossip; push-pull repairs any miss).
    let t = sim.run_until_pred(Duration::from_millis(100), Duration::from_secs(40), |s| {
        (0..8).all(|i| s.core(i).expect("running").members().iter().all(|m| m.meta.is_some()))
    });
    println!("metadata everywhere after {t:?}");
    for i in 0..8 {
        let members = sim.core(i).expect("running").members();
        assert_eq!(members.len(), 8);
        for m in &members {
            let meta =
                m.meta.as_ref().unwrap_or_else(|| panic!("node {i} lacks meta of {:?}", m.id));
            assert_eq!(meta.name, format!("node{}", m.id.node.0 - 1));
        }
    }
    // A metadata change propagates.
    let meta = NodeMeta {
        name: "node3".into(),
        role: Role::Manager,
        wg_public_key: Some([7; 32]),
        ..NodeMeta::default()
    };
    sim.with(3, |c, now| c.update_meta(now, meta.clone()));
    let t = sim.run_until_pred(Duration::from_millis(50), Duration::from_secs(5), |s| {
        (0..8).all(|i| {
            s.core(i)
                .expect("running")
                .members()
                .iter()
                .any(|m| m.id.node == NodeId(4) && m.meta.as_ref() == Some(&meta))
        })
    });
    assert!(t.is_some(), "metadata update did not reach everyone within 5 s");
}

#[test]
fn entries_replicate_only_to_participants_and_follow_their_owner() {
    let mut sim = joined(6, 2);
    for i in 0..4 {
        sim.with(i, |c, now| c.join_network(now, "blue").expect("valid"));
    }
    sim.run_for(Duration::from_secs(2));
    let key = EntryKey::new("endpoint_table", "blue", "task1");
    sim.with(1, |c, now| c.write(now, key.clone(), &b"10.0.0.5"[..]).expect("in network"));
    sim.run_for(Duration::from_secs(3));
    for i in 0..4 {
        let got = sim.core(i).expect("running").get(&key);
        assert_eq!(
            got.map(|(o, v)| (o, v.to_vec())),
            Some((NodeId(2), b"10.0.0.5".to_vec())),
            "node {i}"
        );
    }
    for i in 4..6 {
        let c = sim.core(i).expect("running");
        assert!(c.stored().is_empty(), "node {i} holds a table of a network it is not in");
    }
    // Writing outside one's networks is refused and changes nothing.
    let err = sim.with(5, |c, now| c.write(now, key.clone(), &b"x"[..])).expect("running");
    assert!(err.is_err());
    // Deleting someone else's entry is refused.
    let err = sim.with(0, |c, now| c.delete(now, &key)).expect("running");
    assert!(err.is_err());

    // The owner crashes: its entry is withdrawn everywhere once it is declared down.
    sim.crash(1);
    let t = sim.run_until_pred(Duration::from_millis(200), Duration::from_secs(20), |s| {
        [0, 2, 3].iter().all(|&i| s.core(i).expect("running").get(&key).is_none())
    });
    assert!(t.is_some(), "dead owner's entry still visible after 20 s");
    // Still stored (hidden), so it can come back if the same process returns.
    assert!(sim.core(0).expect("running").stored().iter().any(|(k, _, _)| k == &key));

    // A restart is a new generation: the old entry is purged, the new process re-publishes.
    sim.restart(1, 0);
    sim.with(1, |c, now| c.join_network(now, "blue").expect("valid"));
    sim.run_for(Duration::from_secs(1));
    sim.with(1, |c, now| c.write(now, key.clone(), &b"10.0.0.9"[..]).expect("in network"));
    let t = sim.run_until_pred(Duration::from_millis(100), Duration::from_secs(10), |s| {
        [0, 2, 3].iter().all(|&i| {
            s.core(i).expect("running").get(&key).map(|(_, v)| v.to_vec())
                == Some(b"10.0.0.9".to_vec())
        })
    });
    assert!(t.is_some(), "restarted owner's entry did not replicate");
    let members = sim.core(0).expect("running").members();
    let m = members
        .iter()
        .find(|m| m.id.node == NodeId(2) && m.state == MemberState::Alive)
        .expect("rejoined");
    assert_eq!(m.id.generation, 2, "restart must rejoin with a new generation");
}

#[test]
fn a_falsely_suspected_node_keeps_or_regains_its_entries() {
    let mut sim = joined(5, 3);
    sim.record_events();
    for i in 0..5 {
        sim.with(i, |c, now| c.join_network(now, "red").expect("valid"));
    }
    let key = EntryKey::new("t", "red", "k");
    sim.with(4, |c, now| c.write(now, key.clone(), &b"v"[..]).expect("in network"));
    sim.run_for(Duration::from_secs(3));
    // Cut node 4 off long enough to be declared down, then heal.
    sim.partition(|i| u8::from(i == 4));
    let gone = sim.run_until_pred(Duration::from_millis(200), Duration::from_secs(30), |s| {
        (0..4).all(|i| s.core(i).expect("running").get(&key).is_none())
    });
    assert!(gone.is_some(), "partitioned owner's entry not withdrawn");
    sim.heal();
    let back = sim.run_until_pred(Duration::from_millis(200), Duration::from_secs(60), |s| {
        (0..4).all(|i| s.core(i).expect("running").get(&key).is_some())
    });
    assert!(back.is_some(), "entry not restored after the owner came back");
    let deleted = sim.events().iter().filter(|(_, i, e)| {
        *i == 0 && matches!(e, Event::Entry { change: EntryChange::Deleted { .. }, .. })
    });
    assert!(deleted.count() >= 1, "consumers were not told about the withdrawal");
}

#[test]
fn hostile_datagrams_are_dropped_and_counted() {
    let mut sim = joined(3, 4);
    let from = sim.addr(1);
    let before = sim.core(0).expect("running").counters();
    // Sealed with a key the cluster does not hold.
    let mut stranger = shoal_gossip::Keyring::new(&[[9; 32]], 1).expect("key");
    let foreign = stranger.seal(shoal_gossip::wire::Kind::Swim, b"hello");
    sim.with(0, |c, now| {
        c.handle_udp(now, from, &foreign);
        c.handle_udp(now, from, &foreign[..10]);
        c.handle_udp(now, from, &[0xff; 300]);
        c.handle_udp(now, from, &vec![0u8; 70_000]);
        let mut tampered = foreign.clone();
        tampered[0] = b'X';
        c.handle_udp(now, from, &tampered);
    });
    // A validly sealed frame whose content is garbage.
    let mut ours = shoal_gossip::Keyring::new(&[[0x5a; 32]], 2).expect("key");
    let garbage = ours.seal(shoal_gossip::wire::Kind::Swim, &[0xee; 64]);
    let wrong_kind = ours.seal(shoal_gossip::wire::Kind::SyncReply, b"x");
    let swim_over_tcp = ours.seal(shoal_gossip::wire::Kind::Swim, &[0xee; 64]);
    sim.with(0, |c, now| {
        c.handle_udp(now, from, &garbage);
        c.handle_udp(now, from, &wrong_kind);
        assert!(c.handle_sync(now, from, &swim_over_tcp).is_none());
        // The same authentic frame again is a replay, whatever it holds.
        c.handle_udp(now, from, &garbage);
    });
    let after = sim.core(0).expect("running").counters();
    let d = |r: DropReason| after.dropped(r) - before.dropped(r);
    assert_eq!(d(DropReason::UnknownKey), 1);
    assert_eq!(d(DropReason::Truncated), 1);
    assert_eq!(d(DropReason::BadHeader), 2);
    assert_eq!(d(DropReason::TooBig), 1);
    assert_eq!(d(DropReason::Malformed), 1);
    assert_eq!(d(DropReason::WrongKind), 2);
    assert_eq!(d(DropReason::Replayed), 1);
    // And the cluster is unharmed.
    sim.run_for(Duration::from_secs(5));
    assert!(alive_everywhere(&sim, 3));
}

#[test]
fn keys_rotate_at_runtime_without_a_gap() {
    let mut sim = joined(5, 5);
    let new_key = [0x77; 32];
    let id = shoal_gossip::key_id(&new_key);
    let old = shoal_gossip::key_id(&[0x5a; 32]);
    // Step 1: every node accepts the new key; step 2: every node seals with it; step 3: the
    // old key is removed. Traffic flows between every step and nothing is dropped.
    for i in 0..5 {
        sim.with(i, |c, _| c.keyring_mut().add(&new_key).expect("room"));
        sim.run_for(Duration::from_millis(300));
    }
    for i in 0..5 {
        sim.with(i, |c, _| c.keyring_mut().make_primary(id).expect("present"));
        sim.run_for(Duration::from_millis(300));
    }
    for i in 0..5 {
        sim.with(i, |c, _| c.keyring_mut().remove(old).expect("not primary"));
        sim.run_for(Duration::from_millis(300));
    }
    sim.run_for(Duration::from_secs(5));
    for i in 0..5 {
        let c = sim.core(i).expect("running");
        assert_eq!(c.keyring().key_ids(), vec![id]);
        let d = c.counters();
        assert_eq!(
            d.dropped(DropReason::UnknownKey) + d.dropped(DropReason::AuthFailed),
            0,
            "node {i}"
        );
    }
    assert!(alive_everywhere(&sim, 5));
    // A node still on the removed key alone is cut off: its packets are dropped as unknown.
    sim.with(4, |c, _| {
        c.keyring_mut().add(&[0x5a; 32]).expect("room");
        c.keyring_mut().make_primary(old).expect("present");
    });
    sim.run_for(Duration::from_secs(3));
    let unknown: u64 = (0..4)
        .map(|i| sim.core(i).expect("running").counters().dropped(DropReason::UnknownKey))
        .sum();
    assert!(unknown > 0);
}

#[test]
fn graceful_leave_is_seen_at_once_and_withdraws_entries() {
    let mut sim = joined(4, 6);
    for i in 0..4 {
        sim.with(i, |c, now| c.join_network(now, "n").expect("valid"));
    }
    let key = EntryKey::new("t", "n", "k");
    sim.with(2, |c, now| c.write(now, key.clone(), &b"v"[..]).expect("in network"));
    sim.run_for(Duration::from_secs(2));
    assert!(sim.core(0).expect("running").get(&key).is_some());
    sim.with(2, |c, now| c.leave(now));
    let t = sim.run_until_pred(Duration::from_millis(10), Duration::from_secs(5), |s| {
        [0, 1, 3].iter().all(|&i| s.core(i).expect("running").get(&key).is_none())
    });
    assert!(t.is_some_and(|t| t < Duration::from_secs(1)), "leave took {t:?}");
}

#[test]
fn simulation_is_deterministic_for_a_seed() {
    let run = || {
        let mut sim = Sim::formed(30, 99, CoreConfig::lan(), &["n"]);
        sim.link.loss = 0.05;
        sim.with(3, |c, now| {
            c.write(now, EntryKey::new("t", "n", "k"), &b"v"[..]).expect("in network")
        });
        sim.crash(7);
        sim.run_for(Duration::from_secs(20));
        (sim.traffic().to_vec(), sim.downs().to_vec())
    };
    assert_eq!(run(), run());
}

#[test]
fn leaving_a_network_deletes_own_entries_and_drops_its_tables() {
    let mut sim = joined(4, 8);
    for i in 0..4 {
        sim.with(i, |c, now| c.join_network(now, "g").expect("valid"));
    }
    let mine = EntryKey::new("t", "g", "mine");
    let theirs = EntryKey::new("t", "g", "theirs");
    sim.with(1, |c, now| c.write(now, mine.clone(), &b"1"[..]).expect("in network"));
    sim.with(2, |c, now| c.write(now, theirs.clone(), &b"2"[..]).expect("in network"));
    sim.run_for(Duration::from_secs(2));
    sim.with(1, |c, now| c.leave_network(now, "g"));
    sim.run_for(Duration::from_secs(2));
    let c1 = sim.core(1).expect("running");
    assert!(c1.stored().is_empty(), "left network's tables still held");
    assert!(c1.networks().is_empty());
    for i in [0, 2, 3] {
        let c = sim.core(i).expect("running");
        assert!(c.get(&mine).is_none(), "node {i} still sees the leaver's entry");
        assert!(c.get(&theirs).is_some(), "node {i} lost an unrelated entry");
    }
    // The leaver's record no longer lists the network.
    let m = sim.core(0).expect("running").members();
    assert!(m.iter().any(|m| m.id.node == NodeId(2) && m.networks.is_empty()));
}

#[test]
fn replayed_old_state_is_dropped_and_counted() {
    use shoal_gossip::{Core, CoreOptions, Transmit};
    use std::time::Instant;
    let t0 = Instant::now();
    let mk = |i: u64| {
        let opts = CoreOptions {
            addr: format!("10.9.0.{i}:7946").parse().expect("literal"),
            node: NodeId(i),
            generation: 1,
            meta: NodeMeta::default(),
            keys: vec![[1; 32]],
            seed: i,
            config: CoreConfig::lan(),
        };
        Core::new(opts, t0).expect("valid")
    };
    let (mut a, mut b) = (mk(1), mk(2));
    let (ia, ib) = (a.identity().clone(), b.identity().clone());
    a.restore_members(t0, [ib.clone()]);
    b.restore_members(t0, [ia.clone()]);
    a.join_network(t0, "n").expect("valid");
    b.join_network(t0, "n").expect("valid");
    let key = EntryKey::new("t", "n", "k");
    // Runs A for a while and returns every datagram it sent to B.
    let run = |a: &mut Core, from: Duration, to: Duration| {
        let mut out = Vec::new();
        let mut t = from;
        while t < to {
            a.handle_timeout(t0 + t);
            while let Some(tx) = a.poll_transmit() {
                if let Transmit::Udp { to, data } = tx
                    && to == ib.addr
                {
                    out.push(data);
                }
            }
            t += Duration::from_millis(50);
        }
        out
    };
    a.write(t0, key.clone(), &b"v1"[..]).expect("in network");
    let old = run(&mut a, Duration::ZERO, Duration::from_secs(2));
    for d in &old {
        b.handle_udp(t0 + Duration::from_secs(2), ia.addr, d);
    }
    assert_eq!(b.get(&key).map(|(_, v)| v.to_vec()), Some(b"v1".to_vec()));
    a.write(t0 + Duration::from_secs(2), key.clone(), &b"v2"[..]).expect("in network");
    for d in run(&mut a, Duration::from_secs(2), Duration::from_secs(4)) {
        b.handle_udp(t0 + Duration::from_secs(4), ia.addr, &d);
    }
    assert_eq!(b.get(&key).map(|(_, v)| v.to_vec()), Some(b"v2".to_vec()));
    let before = b.counters().dropped(DropReason::Replayed);
    for d in &old {
        b.handle_udp(t0 + Duration::from_secs(5), ia.addr, d);
    }
    assert_eq!(
        b.get(&key).map(|(_, v)| v.to_vec()),
        Some(b"v2".to_vec()),
        "a replay rolled state back"
    );
    assert_eq!(
        b.counters().dropped(DropReason::Replayed) - before,
        old.len() as u64,
        "every replayed datagram is refused by the replay window and counted"
    );
}

#[test]
fn tombstones_are_reaped_everywhere_after_the_configured_time() {
    let cfg = CoreConfig { tombstone_reap: Duration::from_secs(10), ..CoreConfig::lan() };
    let mut sim = Sim::formed(5, 12, cfg, &["n"]);
    let key = EntryKey::new("t", "n", "gone");
    sim.with(0, |c, now| c.write(now, key.clone(), &b"v"[..]).expect("in network"));
    sim.run_for(Duration::from_secs(2));
    sim.with(0, |c, now| c.delete(now, &key).expect("own entry"));
    sim.run_for(Duration::from_secs(2));
    for i in 0..5 {
        let c = sim.core(i).expect("running");
        assert!(c.get(&key).is_none());
        let stored = c.stored();
        assert!(stored.iter().any(|(k, _, v)| k == &key && v.is_none()), "node {i}: no tombstone");
    }
    sim.run_for(Duration::from_secs(15));
    for i in 0..5 {
        assert!(
            sim.core(i).expect("running").stored().is_empty(),
            "node {i}: tombstone not reaped"
        );
    }
}

/// When each survivor first saw `subject` suspected and declared down, after `since`.
fn suspected_then_down(
    sim: &Sim,
    subject: NodeId,
    since: Duration,
) -> Vec<(usize, Option<Duration>, Option<Duration>)> {
    let first = |i: usize, down: bool| {
        sim.events().iter().find_map(|(at, j, e)| {
            let v = match e {
                Event::MemberSuspected(v) if !down => v,
                Event::MemberDown(v) if down => v,
                _ => return None,
            };
            (*j == i && v.id.node == subject && *at >= since).then(|| *at - since)
        })
    };
    (0..sim.len())
        .filter(|&i| sim.running(i))
        .map(|i| (i, first(i, false), first(i, true)))
        .collect()
}

#[test]
fn a_crashed_member_is_suspected_everywhere_before_it_is_declared_down() {
    // The lab's figures (CoreConfig::lan) at the lab's size, over a few seeds: consumers that
    // act on a suspicion (the mesh's kernel path) learn of a crash this long before the death.
    let (mut all_suspect, mut all_down) = (Vec::new(), Vec::new());
    for seed in 20..26 {
        let mut sim = joined(10, seed);
        sim.record_events();
        sim.run_for(Duration::from_secs(3));
        sim.crash(9);
        let crashed = sim.elapsed();
        sim.run_for(Duration::from_secs(15));
        let seen = suspected_then_down(&sim, NodeId(10), crashed);
        for (i, suspected, down) in &seen {
            let (Some(s), Some(d)) = (suspected, down) else {
                panic!("seed {seed}: node {i} saw suspected {suspected:?}, down {down:?}");
            };
            assert!(s < d, "seed {seed}: node {i} suspected at {s:?}, down at {d:?}");
        }
        all_suspect.push(seen.iter().filter_map(|s| s.1).max().expect("survivors"));
        all_down.push(seen.iter().filter_map(|s| s.2).max().expect("survivors"));
    }
    println!(
        "10 nodes, crash: every survivor suspects after {all_suspect:?}, down after {all_down:?}"
    );
    // A death is seen by all in about a probe period and two probe timeouts (CoreConfig::lan);
    // the suspicion comes before it.
    assert!(all_suspect.iter().all(|d| *d < Duration::from_secs(3)), "{all_suspect:?}");
}

#[test]
fn a_refuted_suspicion_is_told_and_no_death_follows() {
    // A fixed suspicion timeout (4 s) and no checks: a member cut off for 3 s is suspected
    // and, once it hears of it, refutes.
    let mut sim = Sim::new(8, CoreConfig::lan_fixed_suspicion());
    for _ in 0..5 {
        sim.add_node();
    }
    for i in 1..5 {
        sim.join(i, 0);
    }
    let formed = sim.run_until_pred(Duration::from_millis(100), Duration::from_secs(30), |s| {
        alive_everywhere(s, 5)
    });
    assert!(formed.is_some(), "5 nodes did not converge");
    sim.record_events();
    let cut = sim.elapsed();
    sim.partition(|i| u8::from(i == 4));
    sim.run_for(Duration::from_secs(3));
    sim.heal();
    sim.run_for(Duration::from_secs(6));
    // Node 4 is NodeId(5).
    let of_4 = |i: usize| {
        sim.events()
            .iter()
            .filter(move |(at, j, _)| *j == i && *at >= cut)
            .filter_map(|(_, _, e)| match e {
                Event::MemberSuspected(v) if v.id.node == NodeId(5) => Some("suspected"),
                Event::MemberRefuted(v) if v.id.node == NodeId(5) => Some("refuted"),
                Event::MemberDown(v) if v.id.node == NodeId(5) => Some("down"),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    for i in 0..4 {
        assert_eq!(of_4(i), ["suspected", "refuted"], "node {i}");
    }
    assert!(alive_everywhere(&sim, 5), "node 4 is not alive everywhere after refuting");
}
