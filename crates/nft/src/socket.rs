//! The netfilter netlink socket: sending a batch and reading the kernel's verdict on it, and
//! dumping a table's rules.
//!
//! A netlink message to the kernel is handled inside `send`, so when `send` returns, every answer
//! to a batch is already queued on the socket: they are read without waiting until none is left.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::Family;
use crate::wire::{self, F_DUMP, F_REQUEST, NLMSG_DONE, NLMSG_ERROR, Writer};

/// The largest datagram read (a truncated error reply still yields its errno).
const RECV_BYTES: usize = 256 * 1024;
/// How long a dump may go without a reply.
const DUMP_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking nftables to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The netlink socket could not be opened or the batch could not be sent; nothing was changed.
    /// `EPERM` means the caller lacks `CAP_NET_ADMIN`.
    #[error("{op} on a netfilter netlink socket: {errno}; nothing was changed")]
    Socket {
        /// The system call.
        op: &'static str,
        /// Its error.
        errno: Errno,
    },
    /// The kernel refused a part of the transaction and rolled all of it back: nothing was
    /// changed. Sending the same batch again fails the same way.
    #[error("the kernel refused to {what}: {errno}{hint}; nothing was changed")]
    Rejected {
        /// The refused command (or `start a transaction` / `commit`), in words.
        what: String,
        /// The kernel's errno.
        errno: Errno,
        /// What the errno usually means here (empty if nothing useful).
        hint: &'static str,
    },
    /// The batch was sent but its outcome could not be read: it may or may not be in force, and
    /// committing it again settles that.
    #[error("no verdict from the kernel on the transaction ({0}); it may or may not be in force")]
    NoVerdict(String),
}

/// Opens a netfilter netlink socket in the calling thread's namespace, with buffers for a batch
/// of `batch_bytes`.
fn open(batch_bytes: usize) -> Result<OwnedFd, Error> {
    let sock = |op| move |errno| Error::Socket { op, errno };
    let fd = nix::sys::socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(sock("socket"))?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(sock("bind"))?;
    // A batch is one datagram, so the send buffer must hold it; the forced variants pass the
    // sysctl limits (shoal runs with CAP_NET_ADMIN), the plain ones are the fallback.
    let sndbuf = batch_bytes.saturating_mul(2).max(256 * 1024);
    if setsockopt(&fd, sockopt::SndBufForce, &sndbuf).is_err() {
        let _ = setsockopt(&fd, sockopt::SndBuf, &sndbuf);
    }
    if setsockopt(&fd, sockopt::RcvBufForce, &(1 << 20)).is_err() {
        let _ = setsockopt(&fd, sockopt::RcvBuf, &(1 << 20));
    }
    let timeout = TimeVal::milliseconds(DUMP_TIMEOUT.as_millis() as i64);
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).map_err(sock("setsockopt"))?;
    Ok(fd)
}

/// What an errno from nf_tables usually means, for the error message.
fn hint(what: &str, errno: Errno) -> &'static str {
    match errno {
        Errno::ENOENT | Errno::EOPNOTSUPP if what.starts_with("add rule") => {
            " (is a kernel module for one of these expressions missing?)"
        }
        Errno::ENOENT | Errno::EOPNOTSUPP if what.starts_with("add chain") => {
            " (is the kernel module for this chain type missing?)"
        }
        Errno::EOPNOTSUPP | Errno::EPROTONOSUPPORT if what == "start a transaction" => {
            " (is nf_tables in the kernel?)"
        }
        Errno::EPERM => " (CAP_NET_ADMIN is needed)",
        _ => "",
    }
}

/// Sends a framed batch (begin at sequence 0, commands 1..=n with an ack asked on n, end at
/// n + 1) and reads the kernel's answers.
pub(crate) fn commit(batch: &[u8], what: &[String]) -> Result<(), Error> {
    let last = u32::try_from(what.len()).unwrap_or(u32::MAX);
    let mut acked = false;
    // The first refused message is the cause; later ones usually only follow from it.
    let mut refused: Option<(u32, i32)> = None;
    for (seq, code) in requests(batch)? {
        match code {
            0 => acked |= seq == last,
            code if refused.is_none_or(|(first, _)| seq < first) => refused = Some((seq, code)),
            _ => {}
        }
    }
    if let Some((seq, code)) = refused {
        let what = match seq {
            0 => "start a transaction".to_owned(),
            s if s > last => "commit".to_owned(),
            s => what.get(s as usize - 1).cloned().unwrap_or_default(),
        };
        let errno = Errno::from_raw(code);
        return Err(Error::Rejected { hint: hint(&what, errno), what, errno });
    }
    if !acked {
        return Err(Error::NoVerdict("the kernel did not acknowledge the batch".to_owned()));
    }
    Ok(())
}

/// Sends requests (or a framed batch) and returns each answer's `(sequence, errno)` (errno 0
/// for done). A request the kernel refuses does not stop the ones after it.
pub(crate) fn requests(request: &[u8]) -> Result<Vec<(u32, i32)>, Error> {
    let fd = open(request.len())?;
    match send(fd.as_raw_fd(), request, MsgFlags::empty()) {
        Ok(n) if n == request.len() => {}
        Ok(n) => return Err(Error::NoVerdict(format!("sent {n} of {} bytes", request.len()))),
        Err(errno) => return Err(Error::Socket { op: "send", errno }),
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; RECV_BYTES];
    loop {
        let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) | Err(Errno::EAGAIN) => break,
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(Error::NoVerdict(format!("reading the answers: {errno}"))),
        };
        for m in wire::messages(&buf[..n.min(buf.len())]) {
            if m.ty == NLMSG_ERROR {
                out.extend(wire::error_code(m.payload).map(|code| (m.seq, code)));
            }
        }
    }
    Ok(out)
}

/// One rule as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpedRule {
    /// The chain that holds it.
    pub chain: String,
    /// Its expressions in order.
    pub exprs: Vec<DumpedExpr>,
}

/// One expression of a dumped rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpedExpr {
    /// The kernel's name of the expression type (`payload`, `cmp`, `counter`, ...).
    pub name: String,
    /// For a counter: packets and bytes so far.
    pub counter: Option<(u64, u64)>,
}

fn parse_rule(payload: &[u8]) -> Option<(String, DumpedRule)> {
    let attrs = payload.get(4..)?;
    // NFTA_RULE_TABLE, _CHAIN, _EXPRESSIONS; NFTA_EXPR_NAME, _DATA; NFTA_COUNTER_BYTES, _PACKETS.
    let table = wire::string(wire::attr(attrs, 1)?);
    let chain = wire::string(wire::attr(attrs, 2)?);
    let mut exprs = Vec::new();
    for (_, e) in wire::attrs(wire::attr(attrs, 4).unwrap_or(&[])) {
        let name = wire::string(wire::attr(e, 1).unwrap_or(&[]));
        let counter = match (name.as_str(), wire::attr(e, 2)) {
            ("counter", Some(data)) => Some((
                wire::attr(data, 2).and_then(wire::be64).unwrap_or(0),
                wire::attr(data, 1).and_then(wire::be64).unwrap_or(0),
            )),
            _ => None,
        };
        exprs.push(DumpedExpr { name, counter });
    }
    Some((table, DumpedRule { chain, exprs }))
}

/// The rules of a table, chain by chain in the kernel's order, read from the calling thread's
/// network namespace. A table that does not exist has no rules.
pub fn rules(family: Family, table: &str) -> Result<Vec<DumpedRule>, Error> {
    let what = format!("list the rules of table {} {table}", family.name());
    let mut w = Writer::default();
    w.begin_msg(crate::GETRULE, F_REQUEST | F_DUMP, 1, family.proto(), 0);
    w.str(1, table); // NFTA_RULE_TABLE: the kernel dumps only this table.
    w.end_msg();
    dump(w.bytes(), &what, |payload| {
        parse_rule(payload).filter(|(t, _)| t == table).map(|(_, rule)| rule)
    })
}

/// The named counters of a table as `(name, packets, bytes)`, read from the calling thread's
/// network namespace. A table that does not exist has none.
pub fn counters(family: Family, table: &str) -> Result<Vec<(String, u64, u64)>, Error> {
    let what = format!("list the counters of table {} {table}", family.name());
    let mut w = Writer::default();
    w.begin_msg(crate::GETOBJ, F_REQUEST | F_DUMP, 1, family.proto(), 0);
    // NFTA_OBJ_TABLE, NFTA_OBJ_TYPE: the kernel dumps only this table's counters.
    w.str(1, table);
    w.u32(3, crate::OBJECT_COUNTER);
    w.end_msg();
    dump(w.bytes(), &what, |payload| {
        // NFTA_OBJ_TABLE, _NAME, _DATA; NFTA_COUNTER_BYTES, _PACKETS.
        let attrs = payload.get(4..)?;
        if wire::string(wire::attr(attrs, 1)?) != table {
            return None;
        }
        let name = wire::string(wire::attr(attrs, 2)?);
        let data = wire::attr(attrs, 4)?;
        let packets = wire::attr(data, 2).and_then(wire::be64).unwrap_or(0);
        let bytes = wire::attr(data, 1).and_then(wire::be64).unwrap_or(0);
        Some((name, packets, bytes))
    })
}

/// Sends a dump request and collects what `parse` makes of each answer, until the kernel says
/// it is done.
pub(crate) fn dump<T>(
    request: &[u8],
    what: &str,
    mut parse: impl FnMut(&[u8]) -> Option<T>,
) -> Result<Vec<T>, Error> {
    let fd = open(0)?;
    send(fd.as_raw_fd(), request, MsgFlags::empty())
        .map_err(|errno| Error::Socket { op: "send", errno })?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; RECV_BYTES];
    loop {
        let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(Error::Socket { op: "recv", errno }),
        };
        if n == 0 {
            return Err(Error::NoVerdict(format!("the dump to {what} ended early")));
        }
        for m in wire::messages(&buf[..n.min(buf.len())]) {
            match m.ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => match wire::error_code(m.payload) {
                    Some(0) | None => {}
                    Some(code) => {
                        let errno = Errno::from_raw(code);
                        return Err(Error::Rejected { what: what.to_owned(), errno, hint: "" });
                    }
                },
                _ => out.extend(parse(m.payload)),
            }
        }
    }
}
