//! Push-pull sync: the full-state exchange with one peer over TCP (on join, on network join,
//! with a member back from the dead, and every `sync_interval`), which repairs whatever the
//! piggybacked gossip missed.

use std::collections::HashMap;
use std::net::SocketAddr;

use foca::{Member, State as SwimState};
use rand::RngExt;

use super::shared::lock;
use super::swim::Swim;
use super::vocab::Transmit;
use crate::metrics::DropReason;
use crate::msg::{self, WireEntry};
use crate::types::Identity;
use crate::wire::Kind;

/// Most members accepted in one sync message.
const MAX_SYNC_MEMBERS: usize = 100_000;

/// A sealed sync frame arrived over TCP: a request (returns the sealed reply to send back)
/// or the reply to our own push (returns `None`).
pub(super) fn handle(sw: &mut Swim, from: SocketAddr, frame: &[u8]) -> Option<Vec<u8>> {
    {
        let mut st = lock(&sw.state);
        st.counters.sync_in += 1;
        st.counters.sync_bytes_in += frame.len() as u64;
        if frame.len() > sw.cfg.max_sync_frame {
            st.counters.drop(DropReason::TooBig);
            return None;
        }
    }
    let (kind, plain) = match sw.keyring.open(frame) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(%from, error = %e, "dropped sync frame");
            sw.count_drop(e.into());
            return None;
        }
    };
    if kind == Kind::Swim {
        sw.count_drop(DropReason::WrongKind);
        return None;
    }
    let sync = match msg::decode_sync(&plain, sw.cfg.max_sync_frame) {
        Ok(s) if s.members.len() <= MAX_SYNC_MEMBERS => s,
        Ok(_) => {
            sw.count_drop(DropReason::TooBig);
            return None;
        }
        Err(e) => {
            tracing::debug!(%from, error = %e, "malformed sync");
            sw.count_drop(DropReason::Malformed);
            return None;
        }
    };
    // foca finds members by a linear scan, so hand it only what differs from our view:
    // a sync of a large, quiet cluster then costs O(N) instead of O(N^2).
    let changed: Vec<Member<Identity>> = {
        let known: HashMap<&Identity, (u16, SwimState)> = sw
            .foca
            .iter_membership_state()
            .map(|m| (m.id(), (m.incarnation(), m.state())))
            .collect();
        let me = sw.foca.identity();
        sync.members
            .into_iter()
            .chain(std::iter::once(Member::alive(sync.from.clone())))
            .filter(|m| m.id() == me || known.get(m.id()) != Some(&(m.incarnation(), m.state())))
            .collect()
    };
    if let Err(e) = sw.foca.apply_many(changed.into_iter(), true, &mut sw.rt) {
        tracing::debug!(%from, error = %e, "sync membership refused");
    }
    {
        let mut st = lock(&sw.state);
        for r in sync.nodes {
            st.apply_record(r, false);
        }
        for e in sync.entries {
            st.apply_entry(e, false);
        }
    }
    (kind == Kind::SyncRequest).then(|| {
        let plain = build(sw, Some(&sync.networks));
        let sealed = sw.keyring.seal(Kind::SyncReply, &plain);
        let mut st = lock(&sw.state);
        st.counters.sync_out += 1;
        st.counters.sync_bytes_out += sealed.len() as u64;
        sealed
    })
}

/// Live members that participate in `network`.
pub(super) fn peers_in(sw: &Swim, network: &str) -> Vec<SocketAddr> {
    let st = lock(&sw.state);
    st.live
        .values()
        .filter(|id| {
            st.nodes.get(&id.node).is_some_and(|r| r.networks.iter().any(|n| n == network))
        })
        .map(|id| id.addr)
        .collect()
}

/// A random live member sharing one of our networks, or any member if none does.
pub(super) fn pick_peer(sw: &mut Swim) -> Option<SocketAddr> {
    let mine: Vec<String> = lock(&sw.state).networks.iter().cloned().collect();
    let mut sharing: Vec<SocketAddr> = Vec::new();
    for n in &mine {
        sharing.extend(peers_in(sw, n));
    }
    sharing.sort();
    sharing.dedup();
    let pool = if sharing.is_empty() {
        sw.foca.iter_members().map(|m| m.id().addr).collect()
    } else {
        sharing
    };
    if pool.is_empty() {
        return None;
    }
    Some(pool[sw.rng.random_range(0..pool.len())])
}

/// Our full state as a plain sync message: members, member records, and the entries of
/// `only` these networks (all if `None`).
fn build(sw: &Swim, only: Option<&[String]>) -> Vec<u8> {
    let members: Vec<Member<Identity>> = sw.foca.iter_membership_state().cloned().collect();
    let st = lock(&sw.state);
    let wanted = |net: &str| only.is_none_or(|o| o.iter().any(|n| n == net));
    let entries = st
        .store
        .iter()
        .filter(|(k, _)| wanted(&k.network))
        .map(|(k, e)| WireEntry {
            key: k.clone(),
            version: e.version,
            value: e.value.as_ref().map(|v| v.to_vec()),
        })
        .collect();
    let sync = msg::Sync {
        from: st.me.clone(),
        members,
        nodes: st.nodes.values().cloned().collect(),
        networks: st.networks.iter().cloned().collect(),
        entries,
    };
    msg::encode(&sync)
}

/// Queues a sealed full-state push to `to`; its reply comes back through [`handle`].
pub(super) fn push(sw: &mut Swim, to: SocketAddr, only: Option<&[String]>) {
    let plain = build(sw, only);
    let data = sw.keyring.seal(Kind::SyncRequest, &plain);
    {
        let mut st = lock(&sw.state);
        st.counters.sync_out += 1;
        st.counters.sync_bytes_out += data.len() as u64;
    }
    sw.outbox.push_back(Transmit::Sync { to, data });
}
