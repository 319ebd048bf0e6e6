//! Prometheus export: a collector that reads the driver's latest [`Snapshot`] at scrape time.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::metrics::DropReason;
use crate::snapshot::Snapshot;

/// Exports members by state, messages and bytes in/out, drops by reason and probe RTT.
#[derive(Debug)]
pub(crate) struct GossipCollector(pub(crate) Arc<ArcSwap<Snapshot>>);

fn counters(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: &[(&[(&str, &str)], u64)],
) -> Result<(), std::fmt::Error> {
    let mut fam = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in values {
        ConstCounter::new(*v).encode(fam.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for GossipCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snap = self.0.load();
        let m = &snap.metrics;
        {
            let mut fam = enc.encode_descriptor(
                "gossip_members",
                "Gossip members by SWIM state",
                None,
                MetricType::Gauge,
            )?;
            for (state, v) in [
                ("alive", m.members.alive),
                ("suspect", m.members.suspect),
                ("down", m.members.down),
            ] {
                let labels: &[(&str, &str)] = &[("state", state)];
                ConstGauge::new(v as i64).encode(fam.encode_family(&labels)?)?;
            }
        }
        let c = &m.counters;
        counters(
            &mut enc,
            "gossip_messages",
            "Gossip messages by transport and direction",
            &[
                (&[("transport", "udp"), ("direction", "in")], c.udp_in),
                (&[("transport", "udp"), ("direction", "out")], c.udp_out),
                (&[("transport", "tcp"), ("direction", "in")], c.sync_in),
                (&[("transport", "tcp"), ("direction", "out")], c.sync_out),
            ],
        )?;
        counters(
            &mut enc,
            "gossip_bytes",
            "Gossip bytes by transport and direction",
            &[
                (&[("transport", "udp"), ("direction", "in")], c.udp_bytes_in),
                (&[("transport", "udp"), ("direction", "out")], c.udp_bytes_out),
                (&[("transport", "tcp"), ("direction", "in")], c.sync_bytes_in),
                (&[("transport", "tcp"), ("direction", "out")], c.sync_bytes_out),
            ],
        )?;
        {
            let mut fam = enc.encode_descriptor(
                "gossip_dropped",
                "Gossip messages or items dropped, by reason",
                None,
                MetricType::Counter,
            )?;
            for r in DropReason::ALL {
                let labels: &[(&str, &str)] = &[("reason", r.as_str())];
                ConstCounter::new(c.dropped(r)).encode(fam.encode_family(&labels)?)?;
            }
        }
        let rtt_mean = c.probe_rtt_mean().map_or(0.0, |d| d.as_secs_f64());
        ConstGauge::new(rtt_mean).encode(enc.encode_descriptor(
            "gossip_probe_rtt_mean_seconds",
            "Mean round trip of direct SWIM probes",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(c.probe_rtt_last_us as f64 / 1e6).encode(enc.encode_descriptor(
            "gossip_probe_rtt_last_seconds",
            "Last round trip of a direct SWIM probe",
            None,
            MetricType::Gauge,
        )?)?;
        counters(
            &mut enc,
            "gossip_suspicions",
            "Lifeguard suspicion events by kind: accusations made, checks started, refutations of ourselves",
            &[
                (&[("kind", "raised")], c.suspicions_raised),
                (&[("kind", "checked")], c.checks_sent),
                (&[("kind", "refuted")], c.refutations),
            ],
        )?;
        ConstGauge::new(i64::from(m.health_multiplier)).encode(enc.encode_descriptor(
            "gossip_health_multiplier",
            "Lifeguard local health multiplier of probe period and timeouts (1 = healthy)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(m.entries as i64).encode(enc.encode_descriptor(
            "gossip_table_entries",
            "Visible replicated table entries",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}
