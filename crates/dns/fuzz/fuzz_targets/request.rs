//! The request path: arbitrary bytes through hickory's request parser and our handler (records
//! lookup, scoping, response building, truncation). Forwarding has no upstream here, so a name
//! that is not ours ends in SERVFAIL without I/O.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shoal_dns::{
    Attachment, ClusterRecords, DnsConfig, DnsService, EndpointMode, ForwardConfig, Metrics,
    NetworkSpec, RecordsConfig, Scope, ServiceNetwork, ServiceSpec, Snapshot, TaskSpec,
};

struct World {
    rt: tokio::runtime::Runtime,
    dns: DnsService,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dns = rt.block_on(async {
            let config = DnsConfig {
                forward: ForwardConfig {
                    resolv_conf: "/nonexistent/shoal-fuzz-resolv.conf".into(),
                    ..ForwardConfig::default()
                },
                seed: Some(1),
                ..DnsConfig::default()
            };
            DnsService::start(config, Metrics::new()).expect("start")
        });
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
        dns.update(Snapshot::build(&view, RecordsConfig::default()));
        World { rt, dns }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    if let Some(reply) = w.rt.block_on(w.dns.answer_raw(Scope::new(["n1"]), data)) {
        // A reply is always a well-formed message no larger than the UDP limit it was given.
        assert!(reply.len() >= 12);
        assert!(reply.len() <= 1232);
    }
});
