//! Shared helpers of the integration tests: a cluster view with a service of N tasks, and raw
//! DNS clients over UDP and TCP built on hickory-proto.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use shoal_dns::{
    Attachment, ClusterRecords, EndpointMode, NetworkSpec, RecordsConfig, ServiceNetwork,
    ServiceSpec, StandaloneSpec, TaskSpec, Zone,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const NET: &str = "net1";

/// `web` (vip 10.0.1.2, `tasks` healthy tasks 10.0.1.10..), `big` (dnsrr, `big` tasks from
/// 10.0.2.1) and standalone `myredis` (10.0.1.250), all on network `appnet` (id `net1`).
pub fn cluster(tasks: u32, big: u32) -> ClusterRecords {
    let mk = |name: &str, n: u32, base: [u8; 3], start: u32| -> Vec<TaskSpec> {
        (0..n)
            .map(|i| TaskSpec {
                slot: (i + 1).to_string(),
                id: format!("{name}{i}"),
                healthy: true,
                attachments: vec![Attachment {
                    network: NET.into(),
                    addr: IpAddr::V4(Ipv4Addr::new(
                        base[0],
                        base[1],
                        base[2] + ((start + i) / 250) as u8,
                        ((start + i) % 250) as u8 + 1,
                    )),
                    aliases: vec![],
                }],
            })
            .collect()
    };
    ClusterRecords {
        networks: vec![NetworkSpec {
            id: NET.into(),
            name: "appnet".into(),
            subnets: vec!["10.0.0.0/16".parse().expect("subnet")],
        }],
        services: vec![
            ServiceSpec {
                name: "web".into(),
                mode: EndpointMode::Vip,
                networks: vec![ServiceNetwork {
                    network: NET.into(),
                    vip: Some("10.0.1.2".parse().expect("vip")),
                    aliases: vec![],
                }],
                tasks: mk("w", tasks, [10, 0, 1], 9),
            },
            ServiceSpec {
                name: "big".into(),
                mode: EndpointMode::Dnsrr,
                networks: vec![ServiceNetwork { network: NET.into(), vip: None, aliases: vec![] }],
                tasks: mk("b", big, [10, 0, 2], 0),
            },
        ],
        standalone: vec![StandaloneSpec {
            name: "myredis".into(),
            id: "r1".into(),
            attachments: vec![Attachment {
                network: NET.into(),
                addr: "10.0.1.250".parse().expect("addr"),
                aliases: vec![],
            }],
        }],
    }
}

pub fn snapshot(tasks: u32, big: u32) -> Zone {
    Zone::build(&cluster(tasks, big), RecordsConfig::default())
}

pub fn query_bytes(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().expect("encode")
}

fn rand_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static N: AtomicU16 = AtomicU16::new(1000);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Sends raw bytes over UDP and waits for one reply.
pub async fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Result<Message> {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    s.connect(server).await?;
    s.send(bytes).await?;
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf))
        .await
        .context("no UDP reply within 3 s")??;
    Ok(Message::from_vec(&buf[..n])?)
}

pub async fn udp(server: SocketAddr, name: &str, qtype: RecordType) -> Result<Message> {
    udp_raw(server, &query_bytes(name, qtype, None)).await
}

/// Sends raw bytes over TCP (length-prefixed) and reads one reply.
pub async fn tcp_raw(server: SocketAddr, bytes: &[u8]) -> Result<Message> {
    let mut s =
        tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(server))
            .await
            .context("TCP connect timed out")??;
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    s.write_all(&out).await?;
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut len))
        .await
        .context("no TCP reply within 3 s")??;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await?;
    Ok(Message::from_vec(&buf)?)
}

pub async fn tcp(server: SocketAddr, name: &str, qtype: RecordType) -> Result<Message> {
    tcp_raw(server, &query_bytes(name, qtype, None)).await
}

/// The A/AAAA addresses of a reply's answer section.
pub fn ips(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            hickory_proto::rr::RData::A(a) => Some(IpAddr::V4(a.0)),
            hickory_proto::rr::RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// Runs a command and returns its stdout; fails on a non-zero exit.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        bail!("{cmd} {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
