//! What encrypted networks add to a node: the WireGuard device, up only while a local network
//! is encrypted, and the nftables guard that drops their cleartext, with its counters.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use rtnetlink::{Handle, LinkUnspec};

use crate::kernel::{self, nl};
use crate::model::WG_OVERHEAD;
use crate::reconcile::WgPeer;
use crate::wg;
use crate::{EncryptionConfig, Error, NodeNs, OverlayConfig, guard};

/// The WireGuard device and the guard's counters of one overlay driver.
#[derive(Debug, Default)]
pub(super) struct Encryption {
    /// The WireGuard device, while a local network is encrypted. Swapped only with the
    /// overlay's state locked; read without it by the statistics.
    wg: ArcSwapOption<wg::Device>,
    /// Times the guard was found gone or wrong and applied again.
    guard_reapplied: AtomicU64,
    /// Drops counted by guard tables that were since replaced (a new table counts from 0).
    guard_drops_before: AtomicU64,
    /// The drops of the guard table in force at its last check: what a table deleted by hand
    /// had counted (at least).
    guard_drops_checked: AtomicU64,
}

impl Encryption {
    /// Makes the guard in force for `vnis` unless it already is, and checks the result. A
    /// guard that was in force for these VNIs and is no longer (someone deleted or flushed
    /// the table) counts as re-applied. Returns whether it applied anything. Without
    /// encryption configured there is no guard.
    pub(super) fn ensure_guard(
        &self,
        node: &NodeNs,
        cfg: &OverlayConfig,
        applied: &mut Option<BTreeSet<u32>>,
        vnis: &BTreeSet<u32>,
    ) -> Result<bool, Error> {
        let Some(enc) = &cfg.encryption else {
            return Ok(false);
        };
        let (port, tun) = (cfg.data_port, enc.tun_name.as_str());
        let (ok, dropped) = guard::in_force(node, port, tun, vnis)?;
        if ok {
            *applied = Some(vnis.clone());
            self.guard_drops_checked.store(dropped, Ordering::Relaxed);
            return Ok(false);
        }
        if applied.as_ref() == Some(vnis) {
            self.guard_reapplied.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                ?vnis,
                "the encrypted networks' guard was gone or altered; applying it again"
            );
        }
        *applied = None;
        let counted = self.guard_drops_checked.swap(0, Ordering::Relaxed).max(dropped);
        self.guard_drops_before.fetch_add(counted, Ordering::Relaxed);
        guard::apply(node, port, tun, vnis)?;
        if !guard::in_force(node, port, tun, vnis)?.0 {
            return Err(Error::Kernel(format!(
                "the nftables guard for VNIs {vnis:?} is not in force right after applying it"
            )));
        }
        *applied = Some(vnis.clone());
        Ok(true)
    }

    /// Brings the WireGuard device up when `wanted` and it is not, or takes it down (removing
    /// the TUN and closing the socket) when not `wanted`. Called with the state locked.
    pub(super) async fn ensure_wg(
        &self,
        node: &NodeNs,
        node_nl: &Handle,
        cfg: &OverlayConfig,
        underlay_mtu: u32,
        wanted: bool,
    ) -> Result<(), Error> {
        match (wanted, self.wg.load().is_some(), &cfg.encryption) {
            (true, false, Some(enc)) => {
                let dev = start_wg(node, node_nl, enc, cfg, underlay_mtu).await?;
                tracing::info!(tun = %enc.tun_name, addr = %enc.tunnel_addr, "WireGuard up");
                self.wg.store(Some(Arc::new(dev)));
            }
            (false, true, Some(enc)) => {
                // Dropping the device stops its threads and closes the TUN, which removes it.
                drop(self.wg.swap(None));
                tracing::info!(tun = %enc.tun_name, "WireGuard down: no encrypted network here");
            }
            _ => {}
        }
        Ok(())
    }

    /// Hands the WireGuard device (if up) the current peers and the VNIs it admits.
    pub(super) fn update_wg(&self, peers: &[WgPeer], vnis: &BTreeSet<u32>) {
        if let Some(wg) = self.wg.load().as_ref() {
            wg.set_peers(peers, vnis);
        }
    }

    /// The WireGuard device, while it is up.
    pub(super) fn device(&self) -> Option<Arc<wg::Device>> {
        self.wg.load_full()
    }

    /// Takes the WireGuard device down.
    pub(super) fn stop_wg(&self) {
        drop(self.wg.swap(None));
    }

    /// Node-wide encrypted data-path counters with the guard's (`None` while WireGuard is
    /// down).
    pub(super) fn device_stats(&self, node: &NodeNs) -> Option<wg::DeviceStats> {
        self.wg.load().as_ref().map(|w| {
            let mut s = w.device_stats();
            s.guard_dropped_cleartext =
                self.guard_drops_before.load(Ordering::Relaxed) + guard::drops(node);
            s.guard_reapplied = self.guard_reapplied.load(Ordering::Relaxed);
            s
        })
    }
}

async fn start_wg(
    node: &NodeNs,
    node_nl: &Handle,
    enc: &EncryptionConfig,
    cfg: &OverlayConfig,
    underlay_mtu: u32,
) -> Result<wg::Device, Error> {
    let tun_mtu = underlay_mtu - WG_OVERHEAD;
    if let Some(l) = kernel::link(node_nl, &enc.tun_name).await? {
        // A TUN left by a previous process cannot be re-opened by name unless persistent.
        kernel::del_link(node_nl, l.index).await?;
    }
    let dev = wg::Device::start(node, enc, cfg.data_port, tun_mtu)?;
    let tun = kernel::need_link(node_nl, &enc.tun_name).await?;
    node_nl
        .link()
        // A longer queue than the default 500 rides out bursts between two reads of the tx thread.
        .set(LinkUnspec::new_with_index(tun.index).mtu(tun_mtu).txqueuelen(4096).build())
        .execute()
        .await
        .map_err(nl("set TUN mtu"))?;
    kernel::ensure_addr(node_nl, tun.index, enc.tunnel_addr, enc.tunnel_prefix).await?;
    kernel::set_up(node_nl, tun.index).await?;
    Ok(dev)
}
