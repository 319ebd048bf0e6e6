//! nftables over netlink, for exactly the rules shoal uses, with no `nft` binary and no C
//! library: the agent builds its tables itself and the kernel checks them.
//!
//! # Layers
//!
//! - [`Expr`] and friends: the expressions of a rule (payload and meta loads, conntrack state
//!   and mark, setting the conntrack and packet marks, bitwise, compare, set and map lookups,
//!   adding to and deleting from a set on the packet path, counters (anonymous and named),
//!   attaching a conntrack timeout policy, immediate values and verdicts, random numbers, DNAT,
//!   reject) as typed values.
//! - [`Batch`]: one transaction, built in memory: new and deleted tables, chains (base chains
//!   with a hook) and flushing them, named and anonymous sets and maps, sets that rules fill
//!   with expiring elements (a bounded number of them), their elements, named counters,
//!   conntrack timeout policies, rules. Nothing touches the kernel until [`Batch::commit`].
//! - [`Batch::commit`] sends the batch as one `send` on a netfilter netlink socket of the calling
//!   thread's network namespace. The kernel applies all of it or, if any part fails, none of it.
//!   [`rules`] dumps a table's rules back, with their counters; [`counters`] reads its named
//!   counters.
//! - [`conntrack`]: the kernel's connection tracking table over ctnetlink (same socket family):
//!   its IPv4 TCP and UDP flows, and deleting chosen ones.
//!
//! # Driving it
//!
//! ```no_run
//! use shoal_nft::{Batch, BaseChain, ChainType, Expr, Family, Hook, Verdict};
//! # fn f() -> Result<(), shoal_nft::Error> {
//! let mut b = Batch::new();
//! // Deleting a table that may not exist: create it (no-op if present), then delete it.
//! b.add_table(Family::Inet, "t");
//! b.del_table(Family::Inet, "t");
//! b.add_table(Family::Inet, "t");
//! let input = BaseChain { kind: ChainType::Filter, hook: Hook::Input, priority: 0 };
//! b.add_chain(Family::Inet, "t", "input", Some(input));
//! b.add_rule(Family::Inet, "t", "input", &[Expr::Counter, Expr::Verdict(Verdict::Accept)]);
//! b.commit()?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod conntrack;
mod expr;
mod socket;
mod wire;

pub use expr::{CmpOp, Expr, MetaKey, PayloadBase, Reject, Verdict};
pub use socket::{DumpedExpr, DumpedRule, Error, counters, rules};

use wire::{F_ACK, F_CREATE, F_REQUEST, SUBSYS_NFTABLES, Writer};

/// nf_tables message types (`NFT_MSG_*`).
const MSG_NEWTABLE: u16 = 0;
const MSG_DELTABLE: u16 = 2;
const MSG_NEWCHAIN: u16 = 3;
const MSG_NEWRULE: u16 = 6;
const MSG_GETRULE: u16 = 7;
const MSG_DELRULE: u16 = 8;
const MSG_NEWSET: u16 = 9;
const MSG_NEWSETELEM: u16 = 12;
const MSG_NEWOBJ: u16 = 18;
const MSG_GETOBJ: u16 = 19;
/// `NFT_OBJECT_COUNTER`: the type of a named counter.
pub(crate) const OBJECT_COUNTER: u32 = 1;
/// `NFT_OBJECT_CT_TIMEOUT`: the type of a conntrack timeout policy.
pub(crate) const OBJECT_CT_TIMEOUT: u32 = 7;

/// A set element list is closed and a new message begun past this many bytes, well under the
/// 64 KiB an attribute can hold.
const ELEMENTS_PER_MESSAGE_BYTES: usize = 32 * 1024;

/// The address family of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `inet`: IPv4 and IPv6.
    Inet,
    /// `ip`: IPv4.
    Ip,
}

impl Family {
    fn proto(self) -> u8 {
        // NFPROTO_INET, NFPROTO_IPV4.
        match self {
            Family::Inet => 1,
            Family::Ip => 2,
        }
    }

    /// The name `nft` uses.
    pub fn name(self) -> &'static str {
        match self {
            Family::Inet => "inet",
            Family::Ip => "ip",
        }
    }
}

/// The netfilter hook of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Packets as they arrive, before the routing decision.
    Prerouting,
    /// Packets for this host.
    Input,
    /// Packets this host routes onwards.
    Forward,
    /// Packets this host sends.
    Output,
}

/// The type of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    /// Filtering.
    Filter,
    /// Address translation (sees the first packet of each connection).
    Nat,
    /// Like filter on the output hook, but a packet whose mark a rule changes is routed again.
    Route,
}

/// What makes a chain a base chain: the hook it sits on (policy accept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseChain {
    /// The chain type.
    pub kind: ChainType,
    /// The hook.
    pub hook: Hook,
    /// Lower runs first.
    pub priority: i32,
}

/// The key of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKey {
    /// An IPv4 address (`ipv4_addr`).
    Ipv4Addr,
    /// An integer of this many bytes in network order (loaded from a packet).
    Integer(u32),
    /// An integer of this many bytes in host order (made by the host, e.g. a random number).
    HostInteger(u32),
    /// An IPv4 address and a port (`ipv4_addr . inet_service`): loaded by an
    /// [`Expr::Payload`] and an [`Expr::PayloadNext`].
    Ipv4AddrPort,
}

/// The data of a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetData {
    /// A verdict (a verdict map).
    Verdict,
    /// An IPv4 address.
    Ipv4Addr,
}

/// A set in a batch, for lookups and elements. Anonymous sets are found by `id` (the kernel names
/// them), named ones by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetRef {
    name: String,
    id: u32,
    data: Option<SetData>,
}

/// The data of a map element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElemData {
    /// A value (an address for [`SetData::Ipv4Addr`]).
    Value(Vec<u8>),
    /// A verdict.
    Verdict(Verdict),
}

/// One set element: the key and, for a map, the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elem {
    /// The key bytes, as long as the set's key.
    pub key: Vec<u8>,
    /// The data, for maps.
    pub data: Option<ElemData>,
}

/// A TCP state of conntrack whose timeout a policy sets ([`Batch::add_tcp_timeout`]), as nft's
/// `policy = { syn_sent: 1 }` names them; the discriminant is its `CTA_TIMEOUT_TCP_*` number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpTimeoutState {
    /// A SYN went out, no answer yet (`syn_sent`).
    SynSent = 1,
    /// The SYN was answered, the handshake's last ACK not seen yet (`syn_recv`).
    SynRecv = 2,
    /// The handshake completed (`established`).
    Established = 3,
    /// `fin_wait`.
    FinWait = 4,
    /// `close_wait`.
    CloseWait = 5,
    /// `last_ack`.
    LastAck = 6,
    /// `time_wait`.
    TimeWait = 7,
    /// `close`.
    Close = 8,
    /// A simultaneous open (`syn_sent2`).
    SynSent2 = 9,
    /// Too many retransmissions (`retrans`).
    Retrans = 10,
    /// Data sent and not acknowledged (`unack`).
    Unack = 11,
}

/// One nftables transaction, built in memory. See the crate docs. Two batches are equal when
/// they would send the same bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch {
    w: Writer,
    /// What each message does, by sequence number - 1, for error messages.
    what: Vec<String>,
    /// Where the last command starts.
    last: usize,
    next_set_id: u32,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    /// An empty transaction.
    pub fn new() -> Batch {
        let mut w = Writer::default();
        // Sequence 0 is the batch's begin message; commands count from 1.
        w.begin_msg(wire::MSG_BATCH_BEGIN, F_REQUEST, 0, 0, SUBSYS_NFTABLES);
        w.end_msg();
        Batch { w, what: Vec::new(), last: 0, next_set_id: 1 }
    }

    fn begin(&mut self, msg: u16, flags: u16, family: Family, what: String) {
        self.what.push(what);
        self.last = self.w.bytes().len();
        let seq = u32::try_from(self.what.len()).unwrap_or(u32::MAX);
        self.w.begin_msg((SUBSYS_NFTABLES << 8) | msg, F_REQUEST | flags, seq, family.proto(), 0);
    }

    /// What each command does, in words and in order (as errors name them).
    pub fn commands(&self) -> &[String] {
        &self.what
    }

    /// Creates the table, or leaves it as it is if it exists.
    pub fn add_table(&mut self, family: Family, table: &str) {
        self.begin(MSG_NEWTABLE, F_CREATE, family, format!("add table {} {table}", family.name()));
        self.w.str(1, table); // NFTA_TABLE_NAME
        self.w.end_msg();
    }

    /// Deletes the table and everything in it (an error if it does not exist).
    pub fn del_table(&mut self, family: Family, table: &str) {
        self.begin(MSG_DELTABLE, 0, family, format!("delete table {} {table}", family.name()));
        self.w.str(1, table);
        self.w.end_msg();
    }

    /// Adds a chain, a base chain when `base` says where it hooks in.
    pub fn add_chain(&mut self, family: Family, table: &str, chain: &str, base: Option<BaseChain>) {
        let kind = match base {
            Some(b) => format!(" ({:?} hook {:?})", b.kind, b.hook).to_lowercase(),
            None => String::new(),
        };
        self.begin(MSG_NEWCHAIN, F_CREATE, family, format!("add chain {chain}{kind}"));
        // NFTA_CHAIN_TABLE, _NAME, _HOOK {NFTA_HOOK_HOOKNUM, _PRIORITY}, _POLICY, _TYPE.
        self.w.str(1, table);
        self.w.str(3, chain);
        if let Some(b) = base {
            self.w.begin_nest(4);
            // NF_INET_PRE_ROUTING 0, NF_INET_LOCAL_IN 1, NF_INET_FORWARD 2, NF_INET_LOCAL_OUT 3.
            let hooknum = match b.hook {
                Hook::Prerouting => 0,
                Hook::Input => 1,
                Hook::Forward => 2,
                Hook::Output => 3,
            };
            self.w.u32(1, hooknum);
            self.w.attr(2, &b.priority.to_be_bytes());
            self.w.end_nest();
            self.w.u32(5, 1); // NF_ACCEPT
            let kind = match b.kind {
                ChainType::Filter => "filter",
                ChainType::Nat => "nat",
                ChainType::Route => "route",
            };
            self.w.str(7, kind);
        }
        self.w.end_msg();
    }

    /// Deletes every rule of a chain (and the anonymous sets they hold); the chain stays.
    pub fn flush_chain(&mut self, family: Family, table: &str, chain: &str) {
        self.begin(MSG_DELRULE, 0, family, format!("flush chain {chain}"));
        // NFTA_RULE_TABLE, _CHAIN, and no handle: all of the chain's rules.
        self.w.str(1, table);
        self.w.str(2, chain);
        self.w.end_msg();
    }

    /// Adds a named counter ([`Expr::CounterRef`] counts into it), or leaves one that exists as
    /// it is, with its counts: rules may come and go around it.
    pub fn add_counter(&mut self, family: Family, table: &str, name: &str) {
        self.begin(MSG_NEWOBJ, F_CREATE, family, format!("add counter {name}"));
        // NFTA_OBJ_TABLE, _NAME, _TYPE, _DATA (no initial counts).
        self.w.str(1, table);
        self.w.str(2, name);
        self.w.u32(3, OBJECT_COUNTER);
        self.w.begin_nest(4);
        self.w.end_nest();
        self.w.end_msg();
    }

    /// Adds a conntrack timeout policy for IPv4 TCP flows ([`Expr::CtTimeoutRef`] attaches it to
    /// a new flow), as nft's `ct timeout NAME { protocol tcp; l3proto ip; policy = { ... } }`:
    /// each state of `policy` gets its timeout in seconds, every other state the namespace's
    /// default (`net.netfilter.nf_conntrack_tcp_timeout_*`) as it is when the kernel makes the
    /// policy. One that exists is left as it is (the kernel cannot update a policy, and rules
    /// may refer to it), so a different policy needs a different name.
    pub fn add_tcp_timeout(
        &mut self,
        family: Family,
        table: &str,
        name: &str,
        policy: &[(TcpTimeoutState, u32)],
    ) {
        self.begin(MSG_NEWOBJ, F_CREATE, family, format!("add ct timeout {name}"));
        // NFTA_OBJ_TABLE, _NAME, _TYPE, _DATA.
        self.w.str(1, table);
        self.w.str(2, name);
        self.w.u32(3, OBJECT_CT_TIMEOUT);
        self.w.begin_nest(4);
        // NFTA_CT_TIMEOUT_L3PROTO (a big-endian u16: NFPROTO_IPV4), _L4PROTO (a u8: IPPROTO_TCP),
        // _DATA holding CTA_TIMEOUT_TCP_* (big-endian u32s, in seconds).
        self.w.attr(1, &u16::from(Family::Ip.proto()).to_be_bytes());
        self.w.attr(2, &[6]);
        self.w.begin_nest(3);
        for (state, seconds) in policy {
            self.w.u32(*state as u16, *seconds);
        }
        self.w.end_nest();
        self.w.end_nest();
        self.w.end_msg();
    }

    /// Adds a set or map. A `name` of `None` makes an anonymous, constant set that lives as long
    /// as the rule that looks it up (its elements must come in this batch).
    pub fn add_set(
        &mut self,
        family: Family,
        table: &str,
        name: Option<&str>,
        key: SetKey,
        data: Option<SetData>,
    ) -> SetRef {
        self.set(family, table, name, key, data, None)
    }

    /// Adds a named set that rules fill from the packet path ([`Expr::AddToSet`]), each element
    /// expiring `timeout` after it was added, and holding at most `size` elements; one that
    /// exists keeps its elements.
    pub fn add_dynamic_set(
        &mut self,
        family: Family,
        table: &str,
        name: &str,
        key: SetKey,
        timeout: std::time::Duration,
        size: u32,
    ) -> SetRef {
        self.set(family, table, Some(name), key, None, Some((timeout, size)))
    }

    fn set(
        &mut self,
        family: Family,
        table: &str,
        name: Option<&str>,
        key: SetKey,
        data: Option<SetData>,
        dynamic: Option<(std::time::Duration, u32)>,
    ) -> SetRef {
        let id = self.next_set_id;
        self.next_set_id += 1;
        let set_name = name.unwrap_or(if data.is_some() { "__map%d" } else { "__set%d" });
        self.begin(MSG_NEWSET, F_CREATE, family, format!("add set {set_name}"));
        // NFT_SET_ANONYMOUS 0x1, _CONSTANT 0x2, _MAP 0x8, _TIMEOUT 0x10, _EVAL 0x20.
        let mut flags = if name.is_none() { 0x1 | 0x2 } else { 0 };
        if data.is_some() {
            flags |= 0x8;
        }
        if dynamic.is_some() {
            flags |= 0x10 | 0x20;
        }
        // Key and data types are what `nft list` prints them as (ipv4_addr 7, integer 4).
        // A concatenation's type is its fields' types, 6 bits each (inet_service 13); each
        // field takes a whole 32-bit word.
        let (key_type, key_len) = match key {
            SetKey::Ipv4Addr => (7, 4),
            SetKey::Integer(len) | SetKey::HostInteger(len) => (4, len),
            SetKey::Ipv4AddrPort => ((7 << 6) | 13, 8),
        };
        // NFTA_SET_TABLE, _NAME, _FLAGS, _KEY_TYPE, _KEY_LEN, _DATA_TYPE, _DATA_LEN, _ID.
        self.w.str(1, table);
        self.w.str(2, set_name);
        self.w.u32(3, flags);
        self.w.u32(4, key_type);
        self.w.u32(5, key_len);
        match data {
            Some(SetData::Verdict) => self.w.u32(6, 0xffff_ff00), // NFT_DATA_VERDICT
            Some(SetData::Ipv4Addr) => {
                self.w.u32(6, 7);
                self.w.u32(7, 4);
            }
            None => {}
        }
        if let Some((_, size)) = dynamic {
            // NFTA_SET_DESC { NFTA_SET_DESC_SIZE }.
            self.w.begin_nest(9);
            self.w.u32(1, size);
            self.w.end_nest();
        }
        self.w.u32(10, id);
        if let Some((t, _)) = dynamic {
            // NFTA_SET_TIMEOUT, in milliseconds.
            let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
            self.w.attr(11, &ms.to_be_bytes());
        }
        // NFTA_SET_USERDATA, read only by `nft list`: the key's byte order (udata type
        // NFTNL_UDATA_SET_KEYBYTEORDER, length 4, BYTEORDER_HOST_ENDIAN 1 or _BIG_ENDIAN 2).
        let order: u32 = if matches!(key, SetKey::HostInteger(_)) { 1 } else { 2 };
        let mut udata = vec![0, 4];
        udata.extend_from_slice(&order.to_ne_bytes());
        self.w.attr(13, &udata);
        self.w.end_msg();
        SetRef { name: set_name.to_owned(), id, data }
    }

    /// Adds elements to a set made in this batch (split over as many messages as they need).
    pub fn add_elements(&mut self, family: Family, table: &str, set: &SetRef, elems: &[Elem]) {
        let mut rest = elems;
        while !rest.is_empty() {
            self.begin(
                MSG_NEWSETELEM,
                F_CREATE,
                family,
                format!("add elements to set {}", set.name),
            );
            // NFTA_SET_ELEM_LIST_TABLE, _SET, _ELEMENTS, _SET_ID.
            self.w.str(1, table);
            self.w.str(2, &set.name);
            self.w.u32(4, set.id);
            self.w.begin_nest(3);
            let start = self.w.bytes().len();
            while let Some((e, tail)) = rest.split_first() {
                if self.w.bytes().len() - start > ELEMENTS_PER_MESSAGE_BYTES {
                    break;
                }
                // NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA.
                self.w.begin_nest(expr::LIST_ELEM);
                expr::value(&mut self.w, 1, &e.key);
                match &e.data {
                    Some(ElemData::Value(v)) => expr::value(&mut self.w, 2, v),
                    Some(ElemData::Verdict(v)) => expr::verdict(&mut self.w, 2, v),
                    None => {}
                }
                self.w.end_nest();
                rest = tail;
            }
            self.w.end_nest();
            self.w.end_msg();
        }
    }

    /// Appends a rule to a chain.
    pub fn add_rule(&mut self, family: Family, table: &str, chain: &str, exprs: &[Expr]) {
        let names: Vec<&str> = exprs.iter().map(Expr::name).collect();
        let what = format!("add rule to chain {chain} ({})", names.join(" "));
        // NLM_F_APPEND: after the chain's other rules.
        self.begin(MSG_NEWRULE, F_CREATE | 0x800, family, what);
        // NFTA_RULE_TABLE, _CHAIN, _EXPRESSIONS.
        self.w.str(1, table);
        self.w.str(2, chain);
        self.w.begin_nest(4);
        for e in exprs {
            e.write(&mut self.w);
        }
        self.w.end_nest();
        self.w.end_msg();
    }

    /// The batch's messages framed by begin and end, with an ack asked for the last command:
    /// errors come back unasked, so that one ack says the kernel has read everything.
    fn finish(mut self) -> (Vec<u8>, Vec<String>) {
        let n = u32::try_from(self.what.len()).unwrap_or(u32::MAX);
        self.w.add_flags(self.last, F_ACK);
        self.w.begin_msg(wire::MSG_BATCH_END, F_REQUEST, n + 1, 0, SUBSYS_NFTABLES);
        self.w.end_msg();
        (self.w.bytes().to_vec(), self.what)
    }

    /// Sends the transaction from the calling thread's network namespace and waits for the
    /// kernel's verdict: on `Ok` all of it is in force, on [`Error::Rejected`] none of it is.
    pub fn commit(self) -> Result<(), Error> {
        if self.what.is_empty() {
            return Ok(());
        }
        let (bytes, what) = self.finish();
        socket::commit(&bytes, &what)
    }
}

/// The message type of a rule dump request.
pub(crate) const GETRULE: u16 = (SUBSYS_NFTABLES << 8) | MSG_GETRULE;
/// The message type of an object dump request.
pub(crate) const GETOBJ: u16 = (SUBSYS_NFTABLES << 8) | MSG_GETOBJ;

#[cfg(test)]
mod tests {
    use super::*;

    /// The attributes of the batch's only command (after the begin message and `nfgenmsg`).
    fn only_command(b: Batch) -> (u16, Vec<u8>) {
        let (bytes, what) = b.finish();
        assert_eq!(what.len(), 1, "{what:?}");
        let m = wire::messages(&bytes).nth(1).expect("the command");
        (m.ty, m.payload[4..].to_vec())
    }

    /// What nft 1.0.6 sends for `add ct timeout ip t syn1 { protocol tcp; l3proto ip; policy =
    /// { syn_sent: 1 }; }`, less the other states nft fills in from its own defaults.
    #[test]
    fn a_tcp_timeout_policy_is_written_as_nft_writes_it() {
        let mut b = Batch::new();
        b.add_tcp_timeout(Family::Ip, "t", "syn1", &[(TcpTimeoutState::SynSent, 1)]);
        let (ty, attrs) = only_command(b);
        assert_eq!(ty, (SUBSYS_NFTABLES << 8) | MSG_NEWOBJ);
        assert_eq!(wire::attr(&attrs, 1).map(wire::string).as_deref(), Some("t"));
        assert_eq!(wire::attr(&attrs, 2).map(wire::string).as_deref(), Some("syn1"));
        assert_eq!(wire::attr(&attrs, 3), Some(&[0, 0, 0, 7][..]));
        let data = wire::attr(&attrs, 4).expect("NFTA_OBJ_DATA");
        #[rustfmt::skip]
        let want: &[u8] = &[
            6, 0, 1, 0, 0, 2, 0, 0, // L3PROTO: NFPROTO_IPV4, a big-endian u16, padded
            5, 0, 2, 0, 6, 0, 0, 0, // L4PROTO: IPPROTO_TCP, a u8, padded
            12, 0, 3, 0x80, // DATA, nested
            8, 0, 1, 0, 0, 0, 0, 1, // CTA_TIMEOUT_TCP_SYN_SENT: 1 s
        ];
        assert_eq!(data, want);
    }

    #[test]
    fn a_timeout_reference_is_an_objref_of_the_timeout_type() {
        let mut b = Batch::new();
        b.add_rule(Family::Ip, "t", "c", &[Expr::CtTimeoutRef("syn1".into())]);
        let (_, attrs) = only_command(b);
        let exprs = wire::attr(&attrs, 4).expect("NFTA_RULE_EXPRESSIONS");
        let e = wire::attr(exprs, expr::LIST_ELEM).expect("one expression");
        assert_eq!(wire::attr(e, 1).map(wire::string).as_deref(), Some("objref"));
        let data = wire::attr(e, 2).expect("NFTA_EXPR_DATA");
        // NFTA_OBJREF_IMM_TYPE = NFT_OBJECT_CT_TIMEOUT, NFTA_OBJREF_IMM_NAME.
        assert_eq!(wire::attr(data, 1), Some(&[0, 0, 0, 7][..]));
        assert_eq!(wire::attr(data, 2).map(wire::string).as_deref(), Some("syn1"));
    }
}
