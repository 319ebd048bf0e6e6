//! Property tests of the request path and the core: hostile bytes and names never panic, and
//! every answer comes from the snapshot and the asking task's networks.

mod common;

use std::net::IpAddr;
use std::sync::OnceLock;

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use shoal_dns::{DnsService, Lookup, Scope, Zone};

struct World {
    rt: tokio::runtime::Runtime,
    dns: DnsService,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let (rt, dns) = shoal_dns::fuzzing::offline_service(3);
        dns.update(snapshot(5, 60));
        World { rt, dns }
    })
}

fn snap() -> &'static Zone {
    static S: OnceLock<Zone> = OnceLock::new();
    S.get_or_init(|| snapshot(5, 60))
}

fn all_addrs() -> Vec<IpAddr> {
    let c = cluster(5, 60);
    let mut v: Vec<IpAddr> = c
        .services
        .iter()
        .flat_map(|s| {
            s.tasks
                .iter()
                .flat_map(|t| t.attachments.iter().map(|a| a.addr))
                .chain(s.networks.iter().filter_map(|n| n.vip))
        })
        .chain(c.standalone.iter().flat_map(|s| s.attachments.iter().map(|a| a.addr)))
        .collect();
    v.sort();
    v
}

fn qtype() -> impl Strategy<Value = RecordType> {
    prop_oneof![
        Just(RecordType::A),
        Just(RecordType::AAAA),
        Just(RecordType::PTR),
        Just(RecordType::ANY),
        Just(RecordType::TXT),
        any::<u16>().prop_map(RecordType::from),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes: no panic; any reply parses, has the request's id and fits in 512 bytes
    /// (no EDNS in random bytes is likely; with it, 1232).
    #[test]
    fn raw_requests_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let w = world();
        if let Some(reply) = w.rt.block_on(w.dns.answer_raw(Scope::new([NET]), &bytes)) {
            prop_assert!(reply.len() <= 1232);
            let m = Message::from_vec(&reply).expect("our reply parses");
            prop_assert_eq!(m.metadata.id, u16::from_be_bytes([bytes[0], bytes[1]]));
        }
    }

    /// Well-formed queries with hostile names and types: an rcode we chose, answers only from
    /// the cluster's addresses.
    #[test]
    fn well_formed_queries_get_sane_answers(
        name in "[a-zA-Z0-9.-]{1,60}|tasks\\.(web|big|WEB)|(web|big|myredis)(\\.appnet)?\\.?",
        t in qtype(),
        edns in proptest::option::of(0u16..5000),
    ) {
        let Ok(bytes) = std::panic::catch_unwind(|| query_bytes(&name, t, edns)) else {
            return Ok(());
        };
        let w = world();
        let reply = w.rt.block_on(w.dns.answer_raw(Scope::new([NET]), &bytes))
            .expect("a parsable query gets a reply");
        let m = Message::from_vec(&reply).expect("parses");
        prop_assert!(matches!(
            m.metadata.response_code,
            ResponseCode::NoError | ResponseCode::NXDomain | ResponseCode::ServFail
                | ResponseCode::Refused | ResponseCode::NotImp | ResponseCode::FormErr
        ), "{:?}", m.metadata.response_code);
        let known = all_addrs();
        for ip in ips(&m) {
            prop_assert!(known.binary_search(&ip).is_ok(), "{ip} is not in the cluster");
        }
        if m.metadata.truncation {
            prop_assert!(edns.is_none_or(|e| e < 1232));
        }
    }

    /// The UDP fast path and the hickory path give the same reply to a plain query.
    #[test]
    fn fast_path_agrees_with_hickory(
        name in "(tasks\\.)?(web|big|myredis|nope)(\\.appnet)?|web\\.[1-5]\\.w[0-4]",
        upper in proptest::collection::vec(any::<bool>(), 30),
        aaaa in any::<bool>(),
    ) {
        let name: String = name
            .chars()
            .zip(upper.iter().cycle())
            .map(|(c, u)| if *u { c.to_ascii_uppercase() } else { c })
            .collect();
        let t = if aaaa { RecordType::AAAA } else { RecordType::A };
        let bytes = query_bytes(&name, t, None);
        let w = world();
        let mut out = Vec::new();
        let fast = w.dns.answer_fast(Scope::new([NET]), &bytes, &mut out);
        let slow = w.rt.block_on(w.dns.answer_hickory(Scope::new([NET]), &bytes))
            .expect("reply");
        let slow = Message::from_vec(&slow).expect("parses");
        if !fast {
            // Only names without addresses of that type are left to hickory.
            prop_assert!(ips(&slow).is_empty());
            return Ok(());
        }
        let fast = Message::from_vec(&out).expect("fast reply parses");
        prop_assert_eq!(fast.metadata.id, slow.metadata.id);
        prop_assert_eq!(fast.metadata.response_code, slow.metadata.response_code);
        prop_assert_eq!(fast.metadata.authoritative, slow.metadata.authoritative);
        prop_assert_eq!(fast.metadata.truncation, slow.metadata.truncation);
        prop_assert_eq!(fast.metadata.recursion_desired, slow.metadata.recursion_desired);
        prop_assert_eq!(fast.metadata.recursion_available, slow.metadata.recursion_available);
        prop_assert_eq!(&fast.queries, &slow.queries);
        // hickory's encoder stops one record early when it truncates (it fits 29 16-byte
        // records where 30 make 508 bytes); the fast path fills the 512 bytes.
        prop_assert!(out.len() <= 512);
        if fast.metadata.truncation {
            prop_assert!(fast.answers.len() >= slow.answers.len());
        } else {
            prop_assert_eq!(fast.answers.len(), slow.answers.len());
            let key = |m: &Message| {
                let mut v: Vec<String> = m.answers.iter().map(|r| r.to_string()).collect();
                v.sort();
                v
            };
            prop_assert_eq!(key(&fast), key(&slow));
        }
    }

    /// The core: case and trailing dot never change the answer set; answers are addresses of
    /// the snapshot.
    #[test]
    fn lookup_is_case_insensitive(
        name in "(tasks\\.)?(web|big|myredis)(\\.appnet)?|[a-z]{1,8}(\\.[a-z]{1,8}){0,2}",
        upper in proptest::collection::vec(any::<bool>(), 40),
        dot in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let s = snap();
        let scope = Scope::new([NET]);
        let mixed: String = name
            .chars()
            .zip(upper.iter().cycle())
            .map(|(c, u)| if *u { c.to_ascii_uppercase() } else { c })
            .collect();
        let mixed = if dot { format!("{mixed}.") } else { mixed };
        let mut r1 = SmallRng::seed_from_u64(seed);
        let mut r2 = SmallRng::seed_from_u64(seed);
        let a = s.lookup(&scope, &name, RecordType::A, &mut r1);
        let b = s.lookup(&scope, &mixed, RecordType::A, &mut r2);
        prop_assert_eq!(&a, &b);
        if let Lookup::Addrs(v) = a {
            let known = all_addrs();
            prop_assert!(v.iter().all(|ip| known.binary_search(ip).is_ok()));
        }
    }
}
