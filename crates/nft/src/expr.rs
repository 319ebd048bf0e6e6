//! The rule expressions shoal uses, and their netlink encoding. Every expression that loads a
//! value writes register 1 (16 bytes, enough for an interface name) and every one that reads a
//! value reads it there: shoal's rules are straight lines of load, compare or look up, act. (The
//! exceptions: a translated port, which [`Expr::PortImmediate`] puts in register 2 beside the
//! address in register 1 for [`Expr::DnatIpv4Port`]; and the second field of a concatenated key,
//! which [`Expr::PayloadNext`] puts in the word after the first field's.)

use crate::wire::Writer;

/// `NFTA_LIST_ELEM`: one element of a nested list.
pub(crate) const LIST_ELEM: u16 = 1;
/// `NFT_REG_VERDICT`, `NFT_REG_1` and `NFT_REG_2`.
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_2: u32 = 2;
/// `NFT_REG32_01`: the second 32-bit word of register 1 (`NFT_REG32_00` is its first).
const REG32_01: u32 = 9;
/// `NFTA_DATA_VALUE`, `NFTA_DATA_VERDICT`, `NFTA_VERDICT_CODE`, `NFTA_VERDICT_CHAIN`.
const DATA_VALUE: u16 = 1;
const DATA_VERDICT: u16 = 2;
const VERDICT_CODE: u16 = 1;
const VERDICT_CHAIN: u16 = 2;

/// Where a payload load starts counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadBase {
    /// The link-layer (Ethernet) header.
    LinkLayer,
    /// The IP header.
    Network,
    /// The transport (TCP/UDP) header.
    Transport,
}

/// What a meta load reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKey {
    /// The layer-4 protocol number (one byte).
    L4Proto,
    /// The name of the interface the packet came in on (16 bytes, NUL padded).
    IifName,
    /// The packet's mark (`fwmark`, a host-order u32).
    Mark,
}

/// How a comparison tests register 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// Equal.
    Eq,
    /// Not equal.
    Neq,
}

/// A verdict: an immediate one, or the data of a verdict map's element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let the packet through.
    Accept,
    /// Drop the packet.
    Drop,
    /// Continue in the named chain and do not come back.
    Goto(String),
}

/// How a rejected packet is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// A TCP reset (the packet must be TCP).
    TcpReset,
    /// An ICMP destination-unreachable with this code (3: port unreachable).
    IcmpUnreachable(u8),
}

/// One expression of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// Load `len` bytes at byte `offset` from `base` into register 1.
    Payload {
        /// Where the offset counts from.
        base: PayloadBase,
        /// Byte offset.
        offset: u32,
        /// Byte length.
        len: u32,
    },
    /// Load packet metadata into register 1.
    Meta(MetaKey),
    /// Load the connection's conntrack state bits into register 1 (turns conntrack on).
    CtState,
    /// Load the connection's conntrack mark (a host-order u32) into register 1.
    CtMark,
    /// Set the connection's conntrack mark from register 1.
    SetCtMark,
    /// Set the packet's mark from register 1 (in a route chain, the packet is routed again).
    SetMetaMark,
    /// Register 1 = (register 1 & `mask`) ^ `xor`, over `mask.len()` bytes (same as `xor`).
    Bitwise {
        /// AND mask.
        mask: Vec<u8>,
        /// XOR value.
        xor: Vec<u8>,
    },
    /// Compare register 1 with `data`; a false comparison ends the rule.
    Cmp {
        /// The test.
        op: CmpOp,
        /// The bytes to compare with (the comparison's length).
        data: Vec<u8>,
    },
    /// Look register 1 up in a set: end the rule if absent; for a map, put the element's data
    /// in register 1, or for a verdict map take the element's verdict.
    Lookup {
        /// The set, as [`crate::Batch::add_set`] returned it.
        set: crate::SetRef,
    },
    /// Count the packets and bytes that reach it.
    Counter,
    /// Count the packets and bytes that reach it in the table's named counter (made with
    /// [`crate::Batch::add_counter`]), which outlives the rule.
    CounterRef(String),
    /// Attach the table's conntrack timeout policy of this name (made with
    /// [`crate::Batch::add_tcp_timeout`]) to the packet's flow, if the flow is of the policy's
    /// protocol and not yet confirmed: in a chain that runs before conntrack confirms a new flow
    /// (any prerouting, input, forward or output chain, not after a flow's first packet). Its
    /// current timeout becomes the policy's for the flow's state.
    CtTimeoutRef(String),
    /// Load `len` (at most 4) bytes at byte `offset` from `base` into the 32-bit word after
    /// register 1's first: the second field of a concatenated key, after an [`Expr::Payload`]
    /// of 4 bytes.
    PayloadNext {
        /// Where the offset counts from.
        base: PayloadBase,
        /// Byte offset.
        offset: u32,
        /// Byte length.
        len: u32,
    },
    /// Add the key in register 1 to a set made with [`crate::Batch::add_dynamic_set`], from the
    /// packet path (an element already there keeps its timeout). When the set is full the rule
    /// stops here.
    AddToSet {
        /// The set.
        set: crate::SetRef,
    },
    /// Delete the key in register 1 from a set made with [`crate::Batch::add_dynamic_set`], from
    /// the packet path (a key that is not there is no error).
    DeleteFromSet {
        /// The set.
        set: crate::SetRef,
    },
    /// Put `data` into register 1.
    Immediate(Vec<u8>),
    /// A verdict for the packet.
    Verdict(Verdict),
    /// Put a random number in `0..modulus` into register 1 (a 32-bit host-order integer).
    NumgenRandom {
        /// The modulus.
        modulus: u32,
    },
    /// Put the next number of a per-rule counter, modulo `modulus`, into register 1 (a 32-bit
    /// host-order integer): strict rotation.
    NumgenInc {
        /// The modulus.
        modulus: u32,
    },
    /// Register 1 = Jenkins hash of its first `len` bytes with `seed`, modulo `modulus` (a
    /// 32-bit host-order integer): the same input always gives the same number.
    Jhash {
        /// How many bytes of register 1 are hashed.
        len: u32,
        /// The modulus.
        modulus: u32,
        /// The seed.
        seed: u32,
    },
    /// Load the routing type of the packet's destination address (`fib daddr type`, a
    /// host-order u32: 2 is `local`) into register 1.
    FibDaddrType,
    /// Put a port (network byte order) into register 2, where [`Expr::DnatIpv4Port`] reads it.
    PortImmediate(u16),
    /// Rewrite the destination IPv4 address to the one in register 1.
    DnatIpv4,
    /// Rewrite the destination IPv4 address to the one in register 1 and the destination port
    /// to the one in register 2.
    DnatIpv4Port,
    /// Reject the packet.
    Reject(Reject),
    /// Leave the packet out of connection tracking (in a chain that runs before conntrack's
    /// own hooks: priority below -200, prerouting or output).
    Notrack,
}

impl Expr {
    /// The kernel's name of the expression type.
    pub fn name(&self) -> &'static str {
        match self {
            Expr::Payload { .. } | Expr::PayloadNext { .. } => "payload",
            Expr::AddToSet { .. } | Expr::DeleteFromSet { .. } => "dynset",
            Expr::Meta(_) => "meta",
            Expr::CtState | Expr::CtMark | Expr::SetCtMark => "ct",
            Expr::SetMetaMark => "meta",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Cmp { .. } => "cmp",
            Expr::Lookup { .. } => "lookup",
            Expr::Counter => "counter",
            Expr::CounterRef(_) | Expr::CtTimeoutRef(_) => "objref",
            Expr::Immediate(_) | Expr::Verdict(_) => "immediate",
            Expr::NumgenRandom { .. } | Expr::NumgenInc { .. } => "numgen",
            Expr::Jhash { .. } => "hash",
            Expr::FibDaddrType => "fib",
            Expr::PortImmediate(_) => "immediate",
            Expr::DnatIpv4 | Expr::DnatIpv4Port => "nat",
            Expr::Reject(_) => "reject",
            Expr::Notrack => "notrack",
        }
    }

    /// Writes the expression as one `NFTA_LIST_ELEM` of a rule's expression list.
    pub(crate) fn write(&self, w: &mut Writer) {
        // NFTA_EXPR_NAME, NFTA_EXPR_DATA.
        w.begin_nest(LIST_ELEM);
        w.str(1, self.name());
        w.begin_nest(2);
        match self {
            Expr::Payload { base, offset, len } => payload(w, REG_1, *base, *offset, *len),
            Expr::PayloadNext { base, offset, len } => {
                payload(w, REG32_01, *base, *offset, *len);
            }
            Expr::AddToSet { set } | Expr::DeleteFromSet { set } => {
                // NFTA_DYNSET_SET_NAME, _SET_ID, _OP (NFT_DYNSET_OP_ADD 0, _DELETE 2), _SREG_KEY.
                let op = if matches!(self, Expr::AddToSet { .. }) { 0 } else { 2 };
                w.str(1, &set.name);
                w.u32(2, set.id);
                w.u32(3, op);
                w.u32(4, REG_1);
            }
            Expr::Meta(key) => {
                // NFTA_META_DREG, NFTA_META_KEY; NFT_META_MARK 3, NFT_META_IIFNAME 6,
                // NFT_META_L4PROTO 16.
                w.u32(1, REG_1);
                let key = match key {
                    MetaKey::Mark => 3,
                    MetaKey::IifName => 6,
                    MetaKey::L4Proto => 16,
                };
                w.u32(2, key);
            }
            Expr::CtState => {
                // NFTA_CT_DREG, NFTA_CT_KEY = NFT_CT_STATE (0).
                w.u32(1, REG_1);
                w.u32(2, 0);
            }
            Expr::CtMark => {
                // NFTA_CT_DREG, NFTA_CT_KEY = NFT_CT_MARK (3).
                w.u32(1, REG_1);
                w.u32(2, 3);
            }
            Expr::SetCtMark => {
                // NFTA_CT_KEY = NFT_CT_MARK, NFTA_CT_SREG.
                w.u32(2, 3);
                w.u32(4, REG_1);
            }
            Expr::SetMetaMark => {
                // NFTA_META_KEY = NFT_META_MARK, NFTA_META_SREG.
                w.u32(2, 3);
                w.u32(3, REG_1);
            }
            Expr::Bitwise { mask, xor } => {
                // NFTA_BITWISE_SREG, _DREG, _LEN, _MASK, _XOR (the boolean operation).
                w.u32(1, REG_1);
                w.u32(2, REG_1);
                w.u32(3, u32::try_from(mask.len()).unwrap_or(u32::MAX));
                value(w, 4, mask);
                value(w, 5, xor);
            }
            Expr::Cmp { op, data } => {
                // NFTA_CMP_SREG, _OP (NFT_CMP_EQ 0, NFT_CMP_NEQ 1), _DATA.
                w.u32(1, REG_1);
                w.u32(2, if *op == CmpOp::Eq { 0 } else { 1 });
                value(w, 3, data);
            }
            Expr::Lookup { set } => {
                // NFTA_LOOKUP_SET, _SREG, _DREG, _SET_ID.
                w.str(1, &set.name);
                w.u32(2, REG_1);
                match set.data {
                    Some(crate::SetData::Verdict) => w.u32(3, REG_VERDICT),
                    Some(crate::SetData::Ipv4Addr) => w.u32(3, REG_1),
                    None => {}
                }
                w.u32(4, set.id);
            }
            Expr::Counter | Expr::Notrack => {}
            Expr::CounterRef(name) => {
                // NFTA_OBJREF_IMM_TYPE, NFTA_OBJREF_IMM_NAME.
                w.u32(1, crate::OBJECT_COUNTER);
                w.str(2, name);
            }
            Expr::CtTimeoutRef(name) => {
                w.u32(1, crate::OBJECT_CT_TIMEOUT);
                w.str(2, name);
            }
            Expr::Immediate(data) => {
                // NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA.
                w.u32(1, REG_1);
                value(w, 2, data);
            }
            Expr::Verdict(v) => {
                w.u32(1, REG_VERDICT);
                verdict(w, 2, v);
            }
            Expr::NumgenRandom { modulus } => {
                // NFTA_NG_DREG, _MODULUS, _TYPE = NFT_NG_RANDOM.
                w.u32(1, REG_1);
                w.u32(2, *modulus);
                w.u32(3, 1);
            }
            Expr::NumgenInc { modulus } => {
                // NFTA_NG_DREG, _MODULUS, _TYPE = NFT_NG_INCREMENTAL.
                w.u32(1, REG_1);
                w.u32(2, *modulus);
                w.u32(3, 0);
            }
            Expr::Jhash { len, modulus, seed } => {
                // NFTA_HASH_SREG, _DREG, _LEN, _MODULUS, _SEED, _TYPE = NFT_HASH_JENKINS.
                w.u32(1, REG_1);
                w.u32(2, REG_1);
                w.u32(3, *len);
                w.u32(4, *modulus);
                w.u32(5, *seed);
                w.u32(7, 0);
            }
            Expr::FibDaddrType => {
                // NFTA_FIB_DREG, _RESULT = NFT_FIB_RESULT_ADDRTYPE, _FLAGS = NFTA_FIB_F_DADDR.
                w.u32(1, REG_1);
                w.u32(2, 3);
                w.u32(3, 2);
            }
            Expr::PortImmediate(port) => {
                w.u32(1, REG_2);
                value(w, 2, &port.to_be_bytes());
            }
            Expr::DnatIpv4 => {
                // NFTA_NAT_TYPE = NFT_NAT_DNAT, _FAMILY = NFPROTO_IPV4, _REG_ADDR_MIN.
                w.u32(1, 1);
                w.u32(2, 2);
                w.u32(3, REG_1);
            }
            Expr::DnatIpv4Port => {
                // The same, and NFTA_NAT_REG_PROTO_MIN: the port.
                w.u32(1, 1);
                w.u32(2, 2);
                w.u32(3, REG_1);
                w.u32(5, REG_2);
            }
            Expr::Reject(r) => {
                // NFTA_REJECT_TYPE (NFT_REJECT_ICMP_UNREACH 0, NFT_REJECT_TCP_RST 1), _ICMP_CODE.
                match r {
                    Reject::TcpReset => w.u32(1, 1),
                    Reject::IcmpUnreachable(code) => {
                        w.u32(1, 0);
                        w.attr(2, &[*code]);
                    }
                }
            }
        }
        w.end_nest();
        w.end_nest();
    }
}

/// A payload load into `reg`.
fn payload(w: &mut Writer, reg: u32, base: PayloadBase, offset: u32, len: u32) {
    // NFTA_PAYLOAD_DREG, _BASE, _OFFSET, _LEN; NFT_PAYLOAD_LL/NETWORK/TRANSPORT_HEADER.
    w.u32(1, reg);
    let base = match base {
        PayloadBase::LinkLayer => 0,
        PayloadBase::Network => 1,
        PayloadBase::Transport => 2,
    };
    w.u32(2, base);
    w.u32(3, offset);
    w.u32(4, len);
}

/// A nested `nft_data` holding a value (`NFTA_DATA_VALUE`).
pub(crate) fn value(w: &mut Writer, ty: u16, bytes: &[u8]) {
    w.begin_nest(ty);
    w.attr(DATA_VALUE, bytes);
    w.end_nest();
}

/// A nested `nft_data` holding a verdict (`NFTA_DATA_VERDICT`).
pub(crate) fn verdict(w: &mut Writer, ty: u16, v: &Verdict) {
    // NF_DROP 0, NF_ACCEPT 1, NFT_GOTO -4.
    let (code, chain): (i32, Option<&str>) = match v {
        Verdict::Accept => (1, None),
        Verdict::Drop => (0, None),
        Verdict::Goto(chain) => (-4, Some(chain)),
    };
    w.begin_nest(ty);
    w.begin_nest(DATA_VERDICT);
    w.attr(VERDICT_CODE, &code.to_be_bytes());
    if let Some(chain) = chain {
        w.str(VERDICT_CHAIN, chain);
    }
    w.end_nest();
    w.end_nest();
}
