//! foca's custom broadcast handler: foca owns it and hands it every piggybacked item in the
//! middle of a foca call, so it holds the two pieces of state items go to, each behind a lock
//! the core and Lifeguard also hold: the table state, and Lifeguard's book of accusations.

use std::sync::{Arc, Mutex};

use super::accusations::Accusations;
use super::shared::{BKey, State, lock};
use crate::metrics::DropReason;
use crate::msg::{self, Item};
use crate::types::Identity;

/// foca's custom broadcast handler: decodes items and merges them into the table state, or
/// records them in Lifeguard's book of accusations.
pub(super) struct Handler {
    pub(super) state: Arc<Mutex<State>>,
    pub(super) accusations: Arc<Mutex<Accusations>>,
}

/// Never returned: malformed items are counted and skipped so the rest of a packet still counts.
#[derive(Debug, thiserror::Error)]
#[error("unreachable broadcast error")]
pub(super) struct NoError;

impl foca::BroadcastHandler<Identity> for Handler {
    type Key = BKey;
    type Error = NoError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&Identity>,
    ) -> Result<Option<BKey>, NoError> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        match msg::decode_item(data, st.cfg.max_datagram) {
            Ok(Item::Entry(e)) => Ok(st.apply_entry(e, true)),
            Ok(Item::Node(r)) => Ok(st.apply_record(r, sender.is_none())),
            Ok(Item::Suspect(s)) => {
                Ok(lock(&self.accusations).hear(s, &st.me, st.now, &mut st.counters))
            }
            Err(_) => {
                st.counters.drop(DropReason::Malformed);
                Ok(None)
            }
        }
    }
}
