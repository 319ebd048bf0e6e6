//! East-west service VIPs for shoal tasks: a connection from a task to a service's virtual IP is
//! DNAT-ed by the kernel, inside the task's own network namespace, to one of the service's
//! healthy task addresses.
//!
//! Swarm does this with IPVS in a per-node load-balancer namespace and SNATs the caller away; this
//! kernel has no IPVS, and nftables in the caller's namespace needs neither an extra hop nor SNAT,
//! so backends see the real client task address.
//!
//! # Layers
//!
//! - [`render`]: the pure part. [`VipRule`]s in, the text of table `ip shoal-vip` out: sorted,
//!   deduplicated, validated, byte-for-byte the same for the same input. No I/O.
//! - [`apply`] / [`clear`]: pipe that text to `nft -f -` spawned from a thread inside the task's
//!   namespace (a child process inherits the thread's namespace). One `nft -f -` run is one
//!   kernel transaction, so the old table is deleted and the new one created atomically: there is
//!   never a moment without rules, and a failed run changes nothing.
//!
//! # The ruleset
//!
//! A nat chain on the `output` hook (the traffic originates in the namespace) looks the
//! destination up in the verdict map `vips`, one entry per VIP, and jumps to that VIP's chain:
//!
//! - with backends: `dnat to numgen random mod N map { 0 : a, 1 : b, … }` (one backend: `dnat to a`).
//!   Only the address is rewritten, so any port of the VIP reaches the same port of a backend.
//! - without backends: `reject with tcp reset` for TCP and an ICMP port-unreachable `reject` for
//!   the rest, so clients fail at once instead of waiting for a timeout. (A locally sent UDP
//!   datagram that the output hook rejects makes `send` fail with `EPERM`.)
//!
//! Only a connection's first packet passes a nat chain; conntrack keeps an established
//! connection on its backend when the rules change, and new connections use the new set. The
//! chain's `ct state new` match is load-bearing: nftables turns conntrack on in a namespace only
//! for `ct` and `nat` expressions, not for nat chains, so a table whose VIPs all lacked backends
//! would otherwise see no packets at all and strand established connections. (Kernel 6.18.)
//!
//! # Driving it (the agent)
//!
//! ```no_run
//! # fn f(ns: &shoal_netns::NetNs) -> Result<(), shoal_vip::Error> {
//! use shoal_vip::VipRule;
//! // Whenever the endpoint tables change, for every task namespace: the VIPs of the services on
//! // that task's networks, each with the addresses of its healthy tasks.
//! let rules = [VipRule {
//!     vip: "10.0.1.2".parse().expect("literal"),
//!     backends: vec!["10.0.1.7".parse().expect("literal"), "10.0.1.9".parse().expect("literal")],
//! }];
//! shoal_vip::apply(ns, &rules)?;
//! // When the task leaves (deleting its namespace removes the table too):
//! shoal_vip::clear(ns)?;
//! # Ok(()) }
//! ```
//!
//! The VIP must be routable in the namespace, or `connect` fails with `ENETUNREACH` before the
//! output hook runs. Swarm takes VIPs from the network's subnet, whose connected route covers
//! them. The `nft` binary is `nft` from `PATH`, or the path in the environment variable
//! `SHOAL_NFT`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::process::{Command, ExitStatus, Stdio};

use shoal_netns::NetNs;

/// The nftables table (family `ip`) this crate owns in each namespace.
pub const TABLE: &str = "shoal-vip";

/// The most backends one VIP may have (the size of its `numgen` map).
pub const MAX_BACKENDS: usize = 4096;

/// The environment variable that overrides the path of the `nft` binary.
pub const NFT_ENV: &str = "SHOAL_NFT";

/// One service VIP as seen from a task: its virtual address and the addresses of its healthy tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipRule {
    /// The service's virtual address (not assigned to any interface).
    pub vip: Ipv4Addr,
    /// The addresses of the service's healthy tasks; empty means connections are refused.
    pub backends: Vec<Ipv4Addr>,
}

/// What went wrong. The rules in force are unchanged after every variant (bad input is caught
/// before `nft` runs, a failed `nft -f -` transaction is rolled back by the kernel), except when
/// waiting for an `nft` that had its whole ruleset fails ([`Error::Spawn`]): then it may have
/// committed, and applying again settles it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A VIP is among its own backends, which would loop; nothing was changed.
    #[error("VIP {vip} lists itself as a backend; nothing was changed")]
    VipIsBackend {
        /// The offending VIP.
        vip: Ipv4Addr,
    },
    /// A VIP has more distinct backends than [`MAX_BACKENDS`]; nothing was changed.
    #[error(
        "VIP {vip} has {count} backends, more than the {MAX_BACKENDS} allowed; nothing was changed"
    )]
    TooManyBackends {
        /// The offending VIP.
        vip: Ipv4Addr,
        /// Its number of distinct backends.
        count: usize,
    },
    /// The same VIP appears twice with different backend sets; nothing was changed.
    #[error("VIP {vip} is given twice with different backends; nothing was changed")]
    ConflictingVip {
        /// The duplicated VIP.
        vip: Ipv4Addr,
    },
    /// A VIP or backend is unspecified, loopback, multicast or broadcast; nothing was changed.
    #[error(
        "{role} {addr} of VIP {vip} is not a unicast task address \
         (unspecified, loopback, multicast or broadcast); nothing was changed"
    )]
    BadAddress {
        /// The VIP whose rule holds the address.
        vip: Ipv4Addr,
        /// The bad address.
        addr: Ipv4Addr,
        /// `"VIP"` or `"backend"`.
        role: &'static str,
    },
    /// The `nft` binary does not exist; nothing was changed.
    #[error(
        "the nft binary {program:?} was not found: install nftables or set {NFT_ENV}; nothing was changed"
    )]
    NftMissing {
        /// The program that was looked for.
        program: OsString,
    },
    /// `nft` could not be started, fed (it is killed then, before it can commit) or waited for.
    #[error("could not run {program:?} to {op} table ip {TABLE} in namespace {ns:?}: {source}")]
    Spawn {
        /// `"apply"` or `"clear"`.
        op: &'static str,
        /// The namespace.
        ns: String,
        /// The `nft` program.
        program: OsString,
        /// The I/O error.
        source: io::Error,
    },
    /// `nft -f -` rejected the transaction; the kernel rolled it back. Retrying the same
    /// ruleset will fail the same way.
    #[error(
        "`nft -f -` to {op} table ip {TABLE} in namespace {ns:?} failed ({status}), nothing was changed: {stderr}"
    )]
    Nft {
        /// `"apply"` or `"clear"`.
        op: &'static str,
        /// The namespace.
        ns: String,
        /// How `nft` exited.
        status: ExitStatus,
        /// What `nft` wrote to stderr, trimmed.
        stderr: String,
    },
    /// Entering the namespace failed; nothing was changed.
    #[error(transparent)]
    Netns(#[from] shoal_netns::Error),
}

/// Checks the rules and brings them to one canonical form: VIPs in order, each with its backends
/// sorted and deduplicated. Identical duplicates of a rule collapse into one.
fn normalise(rules: &[VipRule]) -> Result<BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>, Error> {
    let unusable =
        |a: Ipv4Addr| a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast();
    let mut out = BTreeMap::new();
    for rule in rules {
        let vip = rule.vip;
        if unusable(vip) {
            return Err(Error::BadAddress { vip, addr: vip, role: "VIP" });
        }
        let mut backends = rule.backends.clone();
        backends.sort_unstable();
        backends.dedup();
        if let Some(&addr) = backends.iter().find(|&&a| unusable(a)) {
            return Err(Error::BadAddress { vip, addr, role: "backend" });
        }
        if backends.binary_search(&vip).is_ok() {
            return Err(Error::VipIsBackend { vip });
        }
        if backends.len() > MAX_BACKENDS {
            return Err(Error::TooManyBackends { vip, count: backends.len() });
        }
        match out.get(&vip) {
            Some(seen) if *seen != backends => return Err(Error::ConflictingVip { vip }),
            Some(_) => {}
            None => {
                out.insert(vip, backends);
            }
        }
    }
    Ok(out)
}

/// The name of a VIP's chain: `v10_0_1_2` for 10.0.1.2.
fn chain_name(vip: Ipv4Addr) -> String {
    let [a, b, c, d] = vip.octets();
    format!("v{a}_{b}_{c}_{d}")
}

/// The transaction prefix that makes the table exist and then deletes it, so the commands that
/// follow start from nothing whether or not the table was there.
fn delete_table() -> String {
    format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n")
}

/// The ruleset text for a namespace (table `ip shoal-vip`), starting with the deletion of the old
/// table: the same input (in any order, with duplicates) always gives the same text.
pub fn render(rules: &[VipRule]) -> Result<String, Error> {
    let vips = normalise(rules)?;
    // `write!` into a String cannot fail.
    let mut s = delete_table();
    let _ = writeln!(s, "table ip {TABLE} {{");
    s.push_str("\tmap vips {\n\t\ttype ipv4_addr : verdict\n");
    if !vips.is_empty() {
        let entries: Vec<String> =
            vips.keys().map(|&vip| format!("{vip} : goto {}", chain_name(vip))).collect();
        let _ = writeln!(s, "\t\telements = {{ {} }}", entries.join(", "));
    }
    s.push_str("\t}\n");
    // `ct state` is what keeps conntrack on in the namespace: a nat chain alone does not, and
    // without conntrack the chain is never consulted and established connections lose their
    // translation. (A nat chain only sees a connection's first packet, so the match is exact.)
    s.push_str("\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n");
    s.push_str("\t\tct state new ip daddr vmap @vips\n\t}\n");
    for (&vip, backends) in &vips {
        let _ = writeln!(s, "\tchain {} {{", chain_name(vip));
        match backends.as_slice() {
            [] => {
                s.push_str("\t\tip protocol tcp reject with tcp reset\n");
                s.push_str("\t\treject with icmp type port-unreachable\n");
            }
            [one] => {
                let _ = writeln!(s, "\t\tdnat to {one}");
            }
            many => {
                let map: Vec<String> =
                    many.iter().enumerate().map(|(i, a)| format!("{i} : {a}")).collect();
                let _ = writeln!(
                    s,
                    "\t\tdnat to numgen random mod {} map {{ {} }}",
                    many.len(),
                    map.join(", ")
                );
            }
        }
        s.push_str("\t}\n");
    }
    s.push_str("}\n");
    Ok(s)
}

/// Replace the namespace's `ip shoal-vip` table with `rules` (one `nft -f -` transaction, run in
/// the namespace). Idempotent; on any error the previous rules stay in force.
pub fn apply(ns: &NetNs, rules: &[VipRule]) -> Result<(), Error> {
    let ruleset = render(rules)?;
    run_in(ns, "apply", &ruleset)
}

/// Remove the table (no error if absent).
pub fn clear(ns: &NetNs) -> Result<(), Error> {
    run_in(ns, "clear", &delete_table())
}

/// The `nft` program to run: `$SHOAL_NFT`, or `nft` from `PATH`.
fn nft_program() -> OsString {
    std::env::var_os(NFT_ENV).filter(|p| !p.is_empty()).unwrap_or_else(|| "nft".into())
}

fn run_in(ns: &NetNs, op: &'static str, ruleset: &str) -> Result<(), Error> {
    let program = nft_program();
    ns.run(|| nft_file(&program, op, ns.name(), ruleset))?
}

/// Runs `program -f -` with `ruleset` on stdin in the calling thread's namespace.
fn nft_file(program: &OsString, op: &'static str, ns: &str, ruleset: &str) -> Result<(), Error> {
    let spawn_err =
        |source| Error::Spawn { op, ns: ns.to_owned(), program: program.clone(), source };
    let mut child = match Command::new(program)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::NftMissing { program: program.clone() });
        }
        Err(e) => return Err(spawn_err(e)),
    };
    // nft reads all of stdin before it writes anything, so writing first cannot deadlock. If the
    // write fails, kill nft before its stdin closes: a truncated ruleset can be a valid prefix
    // (the deletion alone) and must never be committed.
    let mut stdin = child.stdin.take();
    if let Some(pipe) = stdin.as_mut()
        && let Err(e) = pipe.write_all(ruleset.as_bytes())
    {
        let _ = child.kill();
        let _ = child.wait();
        return Err(spawn_err(e));
    }
    drop(stdin);
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Nft {
        op,
        ns: ns.to_owned(),
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test literal")
    }

    fn rule(vip: &str, backends: &[&str]) -> VipRule {
        VipRule { vip: ip(vip), backends: backends.iter().map(|b| ip(b)).collect() }
    }

    #[test]
    fn render_is_deterministic_sorted_and_deduplicated() {
        let a = [
            rule("10.0.1.3", &["10.0.1.9", "10.0.1.7", "10.0.1.9"]),
            rule("10.0.1.2", &["10.0.1.20"]),
            rule("10.0.1.3", &["10.0.1.7", "10.0.1.9"]),
        ];
        let b = [rule("10.0.1.2", &["10.0.1.20"]), rule("10.0.1.3", &["10.0.1.7", "10.0.1.9"])];
        let text = render(&a).expect("valid");
        assert_eq!(text, render(&b).expect("valid"));
        assert!(
            text.contains("dnat to numgen random mod 2 map { 0 : 10.0.1.7, 1 : 10.0.1.9 }"),
            "{text}"
        );
        assert!(text.contains("\t\tdnat to 10.0.1.20\n"), "{text}");
        assert!(
            text.contains("elements = { 10.0.1.2 : goto v10_0_1_2, 10.0.1.3 : goto v10_0_1_3 }"),
            "{text}"
        );
        assert!(text.contains("ct state new ip daddr vmap @vips\n"), "{text}");
        assert!(text.contains("type nat hook output priority -100;"), "{text}");
    }

    #[test]
    fn render_starts_by_deleting_the_old_table() {
        let text = render(&[]).expect("valid");
        assert!(
            text.starts_with(
                "table ip shoal-vip {}\ndelete table ip shoal-vip\ntable ip shoal-vip {\n"
            ),
            "{text}"
        );
        assert!(!text.contains("elements"), "an empty element list is not valid nft: {text}");
        assert!(text.contains("ct state new ip daddr vmap @vips\n"), "{text}");
    }

    #[test]
    fn vip_without_backends_rejects() {
        let text = render(&[rule("10.0.1.4", &[])]).expect("valid");
        assert!(text.contains("ip protocol tcp reject with tcp reset\n"), "{text}");
        assert!(text.contains("reject with icmp type port-unreachable\n"), "{text}");
        assert!(!text.contains("dnat"), "{text}");
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(matches!(
            render(&[rule("10.0.1.2", &["10.0.1.3", "10.0.1.2"])]),
            Err(Error::VipIsBackend { .. })
        ));
        assert!(matches!(
            render(&[rule("10.0.1.2", &["10.0.1.3"]), rule("10.0.1.2", &["10.0.1.4"])]),
            Err(Error::ConflictingVip { .. })
        ));
        assert!(matches!(
            render(&[rule("127.0.0.11", &["10.0.1.3"])]),
            Err(Error::BadAddress { role: "VIP", .. })
        ));
        assert!(matches!(
            render(&[rule("10.0.1.2", &["224.0.0.1"])]),
            Err(Error::BadAddress { role: "backend", .. })
        ));
        let many: Vec<Ipv4Addr> =
            (0..=MAX_BACKENDS as u32).map(|i| Ipv4Addr::from(0x0a01_0000 + i)).collect();
        let err = render(&[VipRule { vip: ip("10.0.0.1"), backends: many.clone() }]);
        assert!(
            matches!(err, Err(Error::TooManyBackends { count, .. }) if count == MAX_BACKENDS + 1)
        );
        // Exactly the limit is fine, and duplicates do not count.
        let mut at_limit = many[..MAX_BACKENDS].to_vec();
        at_limit.extend_from_slice(&many[..10]);
        assert!(render(&[VipRule { vip: ip("10.0.0.1"), backends: at_limit }]).is_ok());
    }

    #[test]
    fn missing_nft_is_a_clear_error() {
        let program = OsString::from("/nonexistent/shoal-test/nft");
        let err = nft_file(&program, "apply", "t", "").expect_err("no such binary");
        assert!(matches!(err, Error::NftMissing { .. }), "{err}");
        assert!(err.to_string().contains(NFT_ENV), "{err}");
    }

    /// A transaction that nft rejects, after the deletion of the old table, comes back as
    /// `Error::Nft` with nft's stderr, and the kernel keeps the old rules (root only: it runs the
    /// real nft in a throwaway namespace).
    #[test]
    fn a_rejected_transaction_reports_stderr_and_keeps_the_old_table() {
        use shoal_netns::testing::{Cleanup, require_root, unique_prefix};
        if !require_root("a_rejected_transaction_reports_stderr_and_keeps_the_old_table") {
            return;
        }
        let mut c = Cleanup::new();
        let name = unique_prefix("vu");
        let ns = c.netns(&name).expect("netns");
        apply(&ns, &[rule("10.0.1.2", &["10.0.1.7", "10.0.1.9"])]).expect("apply");
        let bogus = format!(
            "{}table ip {TABLE} {{ chain output {{ no-such-statement }} }}\n",
            delete_table()
        );
        let program = nft_program();
        let res = ns.run(|| nft_file(&program, "apply", &name, &bogus)).expect("enter ns");
        match res {
            Err(Error::Nft { op: "apply", stderr, status, .. }) => {
                assert!(stderr.contains("Error"), "{stderr}");
                assert!(!status.success());
            }
            other => panic!("expected Error::Nft, got {other:?}"),
        }
        let listing = ns
            .run(|| Command::new(&program).args(["list", "table", "ip", TABLE]).output())
            .expect("enter ns")
            .expect("nft list");
        let text = String::from_utf8_lossy(&listing.stdout);
        assert!(text.contains("10.0.1.2 : goto v10_0_1_2"), "old rules gone: {text}");
        clear(&ns).expect("clear");
        clear(&ns).expect("clear of an absent table");
    }
}
