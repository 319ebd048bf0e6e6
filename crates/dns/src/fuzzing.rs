//! Fuzzing entry points (not for the agent): each function is one fuzz target's body, called
//! both by the cargo-fuzz binary in `fuzz/` and by `tests/fuzz_corpus.rs`, which replays the
//! committed corpus on stable. Each panics if an invariant breaks.

use std::sync::OnceLock;

use hickory_proto::rr::{DNSClass, Name, RecordType};
use hickory_proto::serialize::binary::BinEncodable;

use crate::forward::{Question, check_reply};
use crate::{
    Attachment, ClusterRecords, DnsConfig, DnsService, EndpointMode, ForwardConfig, Metrics,
    NetworkSpec, RecordsConfig, Scope, ServiceNetwork, ServiceSpec, TaskSpec, Zone,
};

/// The query id [`forward_reply`] expects; the corpus's replies carry it.
pub const FORWARD_ID: u16 = 0x5a17;

struct World {
    rt: tokio::runtime::Runtime,
    dns: DnsService,
}

/// A running service on a current-thread runtime, with RNG seed `seed` and no upstream (its
/// resolv.conf does not exist), so a name that is not ours ends in SERVFAIL without I/O. It
/// serves no names until it is given a [`Zone`].
pub fn offline_service(seed: u64) -> (tokio::runtime::Runtime, DnsService) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dns = rt.block_on(async {
        let config = DnsConfig {
            forward: ForwardConfig {
                resolv_conf: "/nonexistent/shoal-offline-resolv.conf".into(),
                ..ForwardConfig::default()
            },
            seed: Some(seed),
            ..DnsConfig::default()
        };
        DnsService::start(config, Metrics::new()).expect("start")
    });
    (rt, dns)
}

/// A running service with one network, one VIP service and 60 tasks (some unhealthy), and no
/// upstream.
fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let (rt, dns) = offline_service(1);
        let tasks = (0..60u8)
            .map(|i| TaskSpec {
                slot: i.to_string(),
                id: format!("t{i}"),
                healthy: i % 7 != 0,
                attachments: vec![Attachment {
                    network: "n1".into(),
                    addr: [10, 0, 1, i + 10].into(),
                    aliases: vec!["al".into()],
                }],
            })
            .collect();
        let view = ClusterRecords {
            networks: vec![NetworkSpec {
                id: "n1".into(),
                name: "net".into(),
                subnets: vec!["10.0.0.0/16".parse().expect("subnet")],
            }],
            services: vec![ServiceSpec {
                name: "web".into(),
                mode: EndpointMode::Vip,
                networks: vec![ServiceNetwork {
                    network: "n1".into(),
                    vip: Some([10, 0, 1, 2].into()),
                    aliases: vec![],
                }],
                tasks,
            }],
            standalone: vec![],
        };
        dns.update(Zone::build(&view, RecordsConfig::default()));
        World { rt, dns }
    })
}

/// The request path: arbitrary bytes through the fast path, hickory's request parser and our
/// handler (records lookup, scoping, response building, truncation). A reply is always a
/// well-formed message no larger than the UDP limit it was given.
pub fn request(data: &[u8]) {
    let w = world();
    if let Some(reply) = w.rt.block_on(w.dns.answer_raw(Scope::new(["n1"]), data)) {
        assert!(reply.len() >= 12);
        assert!(reply.len() <= 1232);
    }
}

/// What an upstream resolver sends back to a forwarded query for `example.com. IN A` with id
/// [`FORWARD_ID`]: the forwarder's reply check, then the relay's re-encoding of what it
/// accepted (under the client's id, as the server does). Nothing may panic, and an accepted
/// reply answers exactly the question asked.
pub fn forward_reply(data: &[u8]) {
    let question = Question {
        name: Name::from_ascii("example.com.").expect("literal"),
        qtype: RecordType::A,
        qclass: DNSClass::IN,
    };
    let server = "192.0.2.53:53".parse().expect("literal");
    if let Ok(Some(mut reply)) = check_reply(server, data, FORWARD_ID, &question) {
        assert_eq!(reply.metadata.id, FORWARD_ID);
        assert_eq!(reply.queries.len(), 1);
        reply.metadata.id = 0x0101;
        reply.metadata.recursion_available = true;
        reply.metadata.truncation = false;
        let _ = reply.to_bytes();
    }
}
