use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::{Name, RecordType};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn att(net: &str, addr: &str) -> Attachment {
    Attachment { network: net.into(), addr: ip(addr), aliases: vec![] }
}

fn task(slot: u32, id: &str, healthy: bool, atts: Vec<Attachment>) -> TaskSpec {
    TaskSpec { slot: slot.to_string(), id: id.into(), healthy, attachments: atts }
}

fn net(id: &str, name: &str, subnet: &str) -> NetworkSpec {
    NetworkSpec {
        id: id.into(),
        name: name.into(),
        subnets: vec![subnet.parse().expect("test subnet")],
    }
}

/// Two networks: `front` (n1, 10.0.1.0/24) and `back` (n2, 10.0.2.0/24).
fn cluster() -> ClusterRecords {
    ClusterRecords {
        networks: vec![net("n1", "front", "10.0.1.0/24"), net("n2", "back", "10.0.2.0/24")],
        services: vec![
            ServiceSpec {
                name: "web".into(),
                mode: EndpointMode::Vip,
                networks: vec![ServiceNetwork {
                    network: "n1".into(),
                    vip: Some(ip("10.0.1.2")),
                    aliases: vec!["www".into()],
                }],
                tasks: vec![
                    task(1, "aaa", true, vec![att("n1", "10.0.1.10")]),
                    task(2, "bbb", true, vec![att("n1", "10.0.1.11")]),
                    task(3, "ccc", false, vec![att("n1", "10.0.1.12")]),
                ],
            },
            ServiceSpec {
                name: "db".into(),
                mode: EndpointMode::Dnsrr,
                networks: vec![
                    ServiceNetwork { network: "n1".into(), vip: None, aliases: vec![] },
                    ServiceNetwork { network: "n2".into(), vip: None, aliases: vec![] },
                ],
                tasks: vec![
                    task(1, "d1", true, vec![att("n1", "10.0.1.20"), att("n2", "10.0.2.20")]),
                    task(2, "d2", true, vec![att("n1", "10.0.1.21"), att("n2", "10.0.2.21")]),
                    task(3, "d3", false, vec![att("n2", "10.0.2.22")]),
                ],
            },
        ],
        standalone: vec![StandaloneSpec {
            name: "myredis".into(),
            id: "r1".into(),
            attachments: vec![Attachment {
                network: "n2".into(),
                addr: ip("10.0.2.30"),
                aliases: vec!["cache".into()],
            }],
        }],
    }
}

fn snap() -> Zone {
    let s = Zone::build(&cluster(), RecordsConfig::default());
    assert!(s.problems().is_empty(), "{:?}", s.problems());
    s
}

fn rng() -> SmallRng {
    SmallRng::seed_from_u64(7)
}

fn addrs(l: Lookup) -> HashSet<IpAddr> {
    match l {
        Lookup::Addrs(a) => a.into_iter().collect(),
        other => panic!("expected addresses, got {other:?}"),
    }
}

fn set(v: &[&str]) -> HashSet<IpAddr> {
    v.iter().map(|s| ip(s)).collect()
}

fn a(s: &Zone, scope: &Scope, name: &str) -> Lookup {
    s.lookup(scope, name, RecordType::A, &mut rng())
}

#[test]
fn vip_service_answers_its_vip() {
    let s = snap();
    let front = Scope::new(["n1"]);
    assert_eq!(addrs(a(&s, &front, "web")), set(&["10.0.1.2"]));
}

#[test]
fn dnsrr_service_answers_healthy_task_ips() {
    let s = snap();
    assert_eq!(addrs(a(&s, &Scope::new(["n2"]), "db")), set(&["10.0.2.20", "10.0.2.21"]));
}

#[test]
fn tasks_name_answers_healthy_task_ips_only() {
    let s = snap();
    assert_eq!(addrs(a(&s, &Scope::new(["n1"]), "tasks.web")), set(&["10.0.1.10", "10.0.1.11"]));
}

#[test]
fn service_alias_answers_vip_and_tasks_alias_the_tasks() {
    let s = snap();
    let front = Scope::new(["n1"]);
    assert_eq!(addrs(a(&s, &front, "www")), set(&["10.0.1.2"]));
    assert_eq!(addrs(a(&s, &front, "tasks.www")), set(&["10.0.1.10", "10.0.1.11"]));
}

#[test]
fn task_names_resolve_including_unhealthy_ones() {
    let s = snap();
    let front = Scope::new(["n1"]);
    assert_eq!(addrs(a(&s, &front, "web.1.aaa")), set(&["10.0.1.10"]));
    assert_eq!(addrs(a(&s, &front, "web.3.ccc")), set(&["10.0.1.12"]));
}

#[test]
fn standalone_names_and_network_aliases() {
    let s = snap();
    let back = Scope::new(["n2"]);
    assert_eq!(addrs(a(&s, &back, "myredis")), set(&["10.0.2.30"]));
    assert_eq!(addrs(a(&s, &back, "cache")), set(&["10.0.2.30"]));
}

#[test]
fn shared_alias_merges_addresses() {
    let mut c = cluster();
    c.standalone.push(StandaloneSpec {
        name: "other".into(),
        id: "o1".into(),
        attachments: vec![Attachment {
            network: "n2".into(),
            addr: ip("10.0.2.31"),
            aliases: vec!["cache".into()],
        }],
    });
    let s = Zone::build(&c, RecordsConfig::default());
    assert_eq!(addrs(a(&s, &Scope::new(["n2"]), "cache")), set(&["10.0.2.30", "10.0.2.31"]));
}

#[test]
fn service_beats_alias_of_the_same_name() {
    let mut c = cluster();
    c.standalone[0].attachments[0].aliases.push("db".into());
    let s = Zone::build(&c, RecordsConfig::default());
    assert_eq!(addrs(a(&s, &Scope::new(["n2"]), "db")), set(&["10.0.2.20", "10.0.2.21"]));
}

#[test]
fn scope_hides_names_on_other_networks() {
    let s = snap();
    // myredis lives on `back` only; a task on `front` cannot see it, and the bare miss is
    // answered NXDOMAIN rather than leaked upstream.
    assert_eq!(a(&s, &Scope::new(["n1"]), "myredis"), Lookup::NxDomain);
    // A task on no network of ours sees nothing of the cluster.
    assert_eq!(a(&s, &Scope::new(["nX"]), "web"), Lookup::NxDomain);
}

#[test]
fn scope_order_decides_between_networks_and_suffix_picks_one() {
    let s = snap();
    let both = Scope::new(["n1", "n2"]);
    let rev = Scope::new(["n2", "n1"]);
    assert_eq!(addrs(a(&s, &both, "db")), set(&["10.0.1.20", "10.0.1.21"]));
    assert_eq!(addrs(a(&s, &rev, "db")), set(&["10.0.2.20", "10.0.2.21"]));
    assert_eq!(addrs(a(&s, &both, "db.back")), set(&["10.0.2.20", "10.0.2.21"]));
    assert_eq!(addrs(a(&s, &both, "tasks.db.front")), set(&["10.0.1.20", "10.0.1.21"]));
    assert_eq!(addrs(a(&s, &both, "web.2.bbb.front")), set(&["10.0.1.11"]));
    // The suffix of a network the task is not on does not resolve.
    assert_eq!(a(&s, &Scope::new(["n1"]), "db.back"), Lookup::NotOurs);
    // An unknown name under a network the task is on is an authoritative miss.
    assert_eq!(a(&s, &both, "nope.front"), Lookup::NxDomain);
}

#[test]
fn case_insensitive_and_trailing_dot() {
    let s = snap();
    let front = Scope::new(["n1"]);
    for n in ["WEB", "Web.", "web.", "TASKS.Web"] {
        assert!(matches!(a(&s, &front, n), Lookup::Addrs(_)), "{n}");
    }
}

#[test]
fn aaaa_and_other_types_for_existing_names_are_nodata() {
    let s = snap();
    let front = Scope::new(["n1"]);
    for t in [RecordType::AAAA, RecordType::MX, RecordType::TXT, RecordType::SRV, RecordType::CNAME]
    {
        assert_eq!(s.lookup(&front, "web", t, &mut rng()), Lookup::NoData, "{t}");
    }
}

#[test]
fn any_returns_all_families() {
    let mut c = cluster();
    c.standalone[0].attachments.push(Attachment {
        network: "n2".into(),
        addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x30)),
        aliases: vec![],
    });
    let s = Zone::build(&c, RecordsConfig::default());
    let back = Scope::new(["n2"]);
    assert_eq!(
        addrs(s.lookup(&back, "myredis", RecordType::ANY, &mut rng())),
        set(&["10.0.2.30", "fd00::30"])
    );
    assert_eq!(addrs(s.lookup(&back, "myredis", RecordType::AAAA, &mut rng())), set(&["fd00::30"]));
}

#[test]
fn service_with_no_healthy_tasks_is_nodata_not_forwarded() {
    let mut c = cluster();
    for t in &mut c.services[1].tasks {
        t.healthy = false;
    }
    let s = Zone::build(&c, RecordsConfig::default());
    let back = Scope::new(["n2"]);
    assert_eq!(a(&s, &back, "db"), Lookup::NoData);
    assert_eq!(a(&s, &back, "tasks.db"), Lookup::NoData);
}

#[test]
fn ptr_for_task_ips_vips_and_standalone() {
    let s = snap();
    let both = Scope::new(["n1", "n2"]);
    let ptr = |q: &str| s.lookup(&both, q, RecordType::PTR, &mut rng());
    let name = |n: &str| Lookup::Ptr(Name::from_ascii(n).expect("name"));
    assert_eq!(ptr("2.1.0.10.in-addr.arpa."), name("web.front."));
    assert_eq!(ptr("10.1.0.10.in-addr.arpa"), name("web.1.aaa.front."));
    assert_eq!(ptr("30.2.0.10.IN-ADDR.ARPA."), name("myredis.back."));
    // Inside our subnet but unused: authoritative NXDOMAIN, never forwarded.
    assert_eq!(ptr("99.1.0.10.in-addr.arpa."), Lookup::NxDomain);
    // Outside every subnet: not ours.
    assert_eq!(ptr("8.8.8.8.in-addr.arpa."), Lookup::NotOurs);
    // A task on `front` only does not see `back` addresses.
    assert_eq!(
        s.lookup(&Scope::new(["n1"]), "30.2.0.10.in-addr.arpa.", RecordType::PTR, &mut rng()),
        Lookup::NotOurs
    );
    // Another type on a reverse name of ours: NODATA.
    assert_eq!(
        s.lookup(&both, "2.1.0.10.in-addr.arpa.", RecordType::TXT, &mut rng()),
        Lookup::NoData
    );
}

#[test]
fn ptr_ipv6() {
    let mut c = cluster();
    c.networks[1].subnets.push("fd00::/64".parse().expect("subnet"));
    c.standalone[0].attachments.push(Attachment {
        network: "n2".into(),
        addr: ip("fd00::30"),
        aliases: vec![],
    });
    let s = Zone::build(&c, RecordsConfig::default());
    let q = "0.3.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
    assert_eq!(parse_reverse(q), Some(ip("fd00::30")));
    assert_eq!(
        s.lookup(&Scope::new(["n2"]), q, RecordType::PTR, &mut rng()),
        Lookup::Ptr(Name::from_ascii("myredis.back.").expect("name"))
    );
}

#[test]
fn parse_reverse_rejects_garbage() {
    for q in [
        "1.2.3.in-addr.arpa",
        "1.2.3.4.5.in-addr.arpa",
        "256.2.3.4.in-addr.arpa",
        "01.2.3.4.in-addr.arpa",
        "a.2.3.4.in-addr.arpa",
        "1..3.4.in-addr.arpa",
        "0.ip6.arpa",
        "example.com",
    ] {
        assert_eq!(parse_reverse(q), None, "{q}");
    }
    assert_eq!(parse_reverse("4.3.2.1.in-addr.arpa"), Some(IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4))));
}

#[test]
fn unknown_names_forward_and_bare_names_stay_local_by_default() {
    let s = snap();
    let front = Scope::new(["n1"]);
    assert_eq!(a(&s, &front, "example.com."), Lookup::NotOurs);
    assert_eq!(a(&s, &front, "nope"), Lookup::NxDomain);
    assert_eq!(a(&s, &front, "."), Lookup::NotOurs);
    let fwd = Zone::build(
        &cluster(),
        RecordsConfig { forward_single_label: true, ..RecordsConfig::default() },
    );
    assert_eq!(a(&fwd, &front, "nope"), Lookup::NotOurs);
}

#[test]
fn answers_are_shuffled_per_reply_and_seeded() {
    let mut c = cluster();
    c.services[0].tasks = (0..20)
        .map(|i| task(i, &format!("t{i}"), true, vec![att("n1", &format!("10.0.1.{}", 100 + i))]))
        .collect();
    let s = Zone::build(&c, RecordsConfig::default());
    let front = Scope::new(["n1"]);
    let mut r = SmallRng::seed_from_u64(1);
    let first = s.lookup(&front, "tasks.web", RecordType::A, &mut r);
    let second = s.lookup(&front, "tasks.web", RecordType::A, &mut r);
    assert_ne!(first, second, "two replies in a row must differ in order");
    let Lookup::Addrs(ref v) = first else { panic!("addresses") };
    assert_eq!(v.len(), 20);
    // Same seed, same order: the shuffle is driven by the caller's RNG only.
    let again = s.lookup(&front, "tasks.web", RecordType::A, &mut SmallRng::seed_from_u64(1));
    assert_eq!(first, again);
}

#[test]
fn ttl_is_configurable_default_five() {
    assert_eq!(snap().ttl(), 5);
    let s = Zone::build(&cluster(), RecordsConfig { ttl: 30, ..RecordsConfig::default() });
    assert_eq!(s.ttl(), 30);
}

#[test]
fn bad_entries_are_skipped_and_reported_the_rest_is_served() {
    let mut c = cluster();
    c.services.push(ServiceSpec {
        name: "bad name!".into(),
        mode: EndpointMode::Vip,
        networks: vec![],
        tasks: vec![],
    });
    c.standalone.push(StandaloneSpec {
        name: "lost".into(),
        id: "l1".into(),
        attachments: vec![att("nope", "10.9.9.9")],
    });
    c.networks.push(net("n1", "dup", "10.0.9.0/24"));
    let s = Zone::build(&c, RecordsConfig::default());
    assert_eq!(s.problems().len(), 3, "{:?}", s.problems());
    assert!(matches!(a(&s, &Scope::new(["n1"]), "web"), Lookup::Addrs(_)));
    assert_eq!(a(&s, &Scope::new(["n1"]), "lost"), Lookup::NxDomain);
}

#[test]
fn removed_task_disappears_from_a_rebuilt_snapshot() {
    let mut c = cluster();
    let front = Scope::new(["n1"]);
    c.services[0].tasks.remove(0);
    let s = Zone::build(&c, RecordsConfig::default());
    assert_eq!(addrs(a(&s, &front, "tasks.web")), set(&["10.0.1.11"]));
    // A multi-label name we no longer have is no longer ours (and carries no stale address).
    assert_eq!(a(&s, &front, "web.1.aaa"), Lookup::NotOurs);
    assert_eq!(a(&s, &front, "web.1.aaa.front"), Lookup::NxDomain);
}

#[test]
fn overlong_or_odd_query_names_are_not_ours() {
    let s = snap();
    let front = Scope::new(["n1"]);
    let long = "a.".repeat(200);
    assert_eq!(a(&s, &front, &long), Lookup::NotOurs);
    assert_eq!(a(&s, &front, ""), Lookup::NotOurs);
}
