//! The benchmark report's promise, checked on the writer itself (benches/report, benches/common):
//! every row has shoal's figure and the peer's with their ratio, or says explicitly "no peer",
//! "peer not installed", the peer's own words where it was tried and failed, or why it failed; a row that claims more than it holds is written as
//! failed; the Markdown, the JSON (every row with its conditions) and the SVG charts are
//! produced, without fonts or network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../benches/common/mod.rs"]
mod common;
#[path = "../benches/report/mod.rs"]
mod report;

use common::{Conditions, NO_PEER, NOT_INSTALLED, Options, Row, Stats, Status};
use report::{Section, Suite};

fn section(name: &str, rows: Vec<Row>) -> Section {
    Section {
        name: name.to_owned(),
        title: format!("Section {name}"),
        what: "what it measures".to_owned(),
        rerun: format!("cargo bench --bench {name}"),
        rounds: 3,
        pinning: "load generator on CPU 0, system under test on CPU 1".to_owned(),
        peers: vec![
            ("HAProxy".to_owned(), "HAProxy version 2.6.12".to_owned()),
            ("nginx stream".to_owned(), NOT_INSTALLED.to_owned()),
        ],
        tools: vec![("wrk".to_owned(), "wrk 4.1.0".to_owned())],
        notes: vec!["a note".to_owned()],
        rows,
        seconds: 12.0,
        error: None,
    }
}

fn suite(sections: Vec<Section>) -> Suite {
    let mut machine = Conditions::detect();
    machine.peers.push(("HAProxy".to_owned(), "HAProxy version 2.6.12".to_owned()));
    Suite {
        schema: 1,
        command: "cargo bench -p shoal --bench system".to_owned(),
        quick: false,
        started_unix: 1_795_000_000,
        seconds: 600.0,
        build_seconds: 60.0,
        commit: "abc1234".to_owned(),
        machine,
        notes: vec!["2.0 GiB of memory".to_owned()],
        sections,
    }
}

/// One row of every kind.
fn mixed_rows() -> Vec<Row> {
    vec![
        Row::new(
            "bulk TCP throughput",
            "Gbit/s",
            false,
            &[9.0, 10.0, 11.0],
            "HAProxy",
            Some(&[6.0, 6.5, 7.0]),
            "iperf3",
        ),
        Row::new(
            "1 KiB HTTP p99 latency",
            "ms",
            true,
            &[1.0, 1.2, 0.9],
            "HAProxy",
            Some(&[2.0, 2.1, 1.9]),
            "wrk",
        ),
        Row::new(
            "bulk TCP throughput",
            "Gbit/s",
            false,
            &[9.0, 10.0, 11.0],
            "nginx stream",
            None,
            "iperf3",
        ),
        Row::no_peer("agent VmRSS at rest, node1", "MiB", true, &[21.0, 21.5], "sampled"),
        Row::new(
            "new connections/s",
            "conn/s",
            false,
            &[5000.0],
            "socat",
            Some(&[f64::NAN]),
            "wrk",
        ),
        Row::failed("DNS benchmark", "-", "unbound", "dnsperf is not installed"),
        Row::peer_failed(
            "routing mesh answers on every node",
            "s",
            true,
            &[0.9],
            "Docker Swarm",
            "curl: (7) Failed to connect to 198.19.65.1 port 8081: Couldn't connect to server",
            "curl",
        ),
        Row::new(
            "bulk TCP throughput",
            "Gbit/s",
            false,
            &[10.0],
            "direct (no proxy)",
            Some(&[15.0]),
            "iperf3",
        ),
    ]
}

fn tmpdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("shoal-benchreport-{tag}")).tempdir().expect("tmp")
}

#[test]
fn rows_hold_what_their_status_says() {
    let r = Row::new("m", "x", false, &[2.0, 4.0, 3.0], "p", Some(&[1.0, 2.0, 1.5]), "");
    assert_eq!((r.status, r.ratio), (Status::Compared, Some(2.0)));
    assert_eq!(r.shoal_stats.as_ref().map(|s| (s.min, s.max)), Some((2.0, 4.0)));
    assert!(r.check().is_ok());
    // Lower is better: a ratio of 0.5 is twice as good.
    let r = Row::new("lat", "ms", true, &[1.0], "p", Some(&[2.0]), "");
    assert_eq!(r.advantage(), Some(2.0));
    assert_eq!(report::verdict(&r), "2.00× better");
    let r = Row::new("m", "x", false, &[2.0], "p", None, "");
    assert_eq!((r.status, r.note.as_deref()), (Status::PeerNotInstalled, Some(NOT_INSTALLED)));
    assert!(r.check().is_ok());
    let r = Row::no_peer("m", "x", true, &[2.0], "");
    assert_eq!(
        (r.status, r.note.as_deref(), r.peer_name.as_str()),
        (Status::NoPeer, Some(NO_PEER), NO_PEER)
    );
    assert!(r.check().is_ok());
    // A peer that was tried and cannot do it: shoal's figure and the peer's own words.
    let r = Row::peer_failed("m", "s", true, &[2.0], "p", "connection refused", "");
    assert_eq!((r.status, r.note.as_deref()), (Status::PeerFailed, Some("connection refused")));
    assert!(r.check().is_ok());
    assert_eq!(report::verdict(&r), "works; the peer fails");
    // shoal failing too is a failure, not the peer's.
    let r = Row::peer_failed("m", "s", true, &[], "p", "connection refused", "");
    assert_eq!(r.status, Status::Failed);
    // A side that gave no figure (NaN marks a failed sample) makes the row a failure.
    let r = Row::new("m", "x", false, &[f64::NAN], "p", Some(&[1.0]), "");
    assert_eq!(r.status, Status::Failed);
    assert!(r.note.as_deref().is_some_and(|n| n.contains("shoal")));
    let r = Row::new("m", "x", false, &[1.0], "p", Some(&[]), "");
    assert_eq!(r.status, Status::Failed);
    assert!(r.note.as_deref().is_some_and(|n| n.contains("p gave no figure")));
    // A row claiming a comparison it does not hold is caught.
    let mut bad = Row::new("m", "x", false, &[1.0], "p", Some(&[1.0]), "");
    bad.peer = None;
    assert!(bad.check().is_err());
    let mut bad = Row::no_peer("m", "x", true, &[1.0], "");
    bad.note = None;
    assert!(bad.check().is_err());
}

#[test]
fn stats_are_median_and_spread_of_finite_samples() {
    let s = Stats::of(&[3.0, 1.0, f64::NAN, 2.0, 10.0]).expect("samples");
    assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
    assert_eq!(s.samples, vec![3.0, 1.0, 2.0, 10.0]);
    assert!(Stats::of(&[f64::NAN]).is_none());
    assert_eq!(Stats::of(&[4.0]).expect("one").show(1), "4.0");
}

#[test]
fn options_parse_quick_rounds_and_out() {
    let args: Vec<String> =
        ["--quick", "--out", "/tmp/x.json", "--bench"].iter().map(|s| s.to_string()).collect();
    let o = Options::parse(&args, "mesh", 5, 1);
    assert!(o.quick && o.out_given && !o.rounds_given);
    assert_eq!((o.rounds, o.out.to_str()), (1, Some("/tmp/x.json")));
    let args: Vec<String> = ["--rounds", "4"].iter().map(|s| s.to_string()).collect();
    let o = Options::parse(&args, "mesh", 5, 1);
    assert!(o.rounds_given && !o.out_given);
    assert_eq!(o.rounds_or_env(), 4);
}

#[test]
fn every_written_row_has_both_figures_or_says_why_not() {
    let dir = tmpdir("w");
    let mut s = suite(vec![
        section("mesh", mixed_rows()),
        section("rss", vec![Row::no_peer("agent VmRSS peak", "MiB", true, &[30.0, 31.0], "wrk")]),
    ]);
    let written = report::write(&mut s, dir.path()).expect("write");
    assert!(written.repaired.is_empty(), "{:?}", written.repaired);

    // The JSON: every row flattened with its conditions, each one honest.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&written.json).expect("json")).expect("parse");
    let rows = json["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 9);
    for r in rows {
        let status = r["status"].as_str().expect("status");
        let has = |k: &str| r[k].as_f64().is_some_and(f64::is_finite);
        match status {
            "compared" => assert!(has("shoal") && has("peer") && has("ratio"), "{r}"),
            "no_peer" => {
                assert!(has("shoal") && r["note"] == NO_PEER && r["peer"].is_null(), "{r}")
            }
            "peer_not_installed" => {
                assert!(has("shoal") && r["note"] == NOT_INSTALLED && r["peer"].is_null(), "{r}")
            }
            "peer_failed" => assert!(
                has("shoal")
                    && r["peer"].is_null()
                    && r["note"].as_str().is_some_and(|n| n.contains("Couldn't connect")),
                "{r}"
            ),
            "failed" => assert!(!r["note"].as_str().unwrap_or("").is_empty(), "{r}"),
            other => panic!("unknown status {other}"),
        }
        // Conditions on every row.
        assert!(r["cores"].as_u64().is_some_and(|c| c >= 1), "{r}");
        assert!(!r["kernel"].as_str().unwrap_or("").is_empty(), "{r}");
        assert!(r["pinning"].as_str().is_some_and(|p| p.contains("CPU")), "{r}");
        assert!(r["unit"].is_string() && r["rounds"] == 3, "{r}");
    }
    let haproxy = rows.iter().find(|r| r["peer_name"] == "HAProxy").expect("a HAProxy row");
    assert_eq!(haproxy["peer_version"], "HAProxy version 2.6.12");
    let nginx = rows.iter().find(|r| r["peer_name"] == "nginx stream").expect("an nginx row");
    assert_eq!(nginx["peer_version"], NOT_INSTALLED);
    // And it reads back.
    let back = report::read(&written.json).expect("read back");
    assert_eq!(back.sections.len(), 2);
    for r in back.sections.iter().flat_map(|s| &s.rows) {
        r.check().expect("every row read back is consistent");
    }

    // The Markdown: the command, the conditions, and for each row its figures or the words.
    let md = std::fs::read_to_string(&written.markdown).expect("md");
    assert!(md.contains("`cargo bench -p shoal --bench system`"), "{md}");
    assert!(md.contains("kernel") && md.contains("cores"), "{md}");
    assert!(md.contains("HAProxy version 2.6.12"));
    let table_rows: Vec<&str> = md
        .lines()
        .filter(|l| {
            l.starts_with("| ")
                && !l.starts_with("| metric")
                && !l.starts_with("| section")
                && !l.starts_with("| [")
        })
        .collect();
    assert_eq!(table_rows.len(), 9, "{md}");
    for line in &table_rows {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(cells.len(), 7, "{line}");
        let (shoal, peer, ratio) = (cells[2], cells[3], cells[5]);
        let numeric =
            |c: &str| c.split_whitespace().next().is_some_and(|x| x.parse::<f64>().is_ok());
        let ok = (numeric(shoal) && numeric(peer) && numeric(ratio))
            || (numeric(shoal) && (peer == NO_PEER || peer == NOT_INSTALLED))
            || (numeric(shoal) && peer.starts_with("fails: "))
            || peer.starts_with("failed: ");
        assert!(ok, "row without both figures or an explicit word: {line}");
    }
    assert!(
        md.contains("| 10.00 (9.00–11.00) | 6.50 (6.00–7.00) | Gbit/s | 1.54 | 1.54× better |"),
        "{md}"
    );
    assert!(md.contains("failed: dnsperf is not installed"));
    assert!(md.contains("failed: socat gave no figure"));

    // The charts: one overview, one per section, SVG with the metrics' names as text.
    assert_eq!(written.charts.len(), 3, "{:?}", written.charts);
    for c in &written.charts {
        let svg = std::fs::read_to_string(c).expect("svg");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{}", c.display());
        let link = c.strip_prefix(dir.path()).expect("inside the report dir").display().to_string();
        assert!(md.contains(&format!("]({link})")), "{link} not embedded");
    }
    let mesh =
        std::fs::read_to_string(dir.path().join("benches/charts/mesh.svg")).expect("mesh chart");
    assert!(mesh.contains("bulk TCP throughput") && mesh.contains("not installed"), "{mesh}");
    assert!(mesh.contains("<rect"), "bars drawn");
    let overview =
        std::fs::read_to_string(dir.path().join("benches/charts/overview.svg")).expect("overview");
    assert!(overview.contains("1.54×") && overview.contains("2.00×"), "{overview}");
    // Baselines (no proxy, no overlay) are in the tables, not in the shoal-vs-peers overview.
    assert!(md.contains("| direct (no proxy) | 10.00 | 15.00 |"), "{md}");
    assert!(!overview.contains("vs direct"), "{overview}");
}

#[test]
fn a_row_that_claims_more_than_it_holds_is_written_as_failed() {
    let dir = tmpdir("r");
    let mut lying = Row::new("req/s", "req/s", false, &[100.0], "HAProxy", Some(&[50.0]), "");
    lying.peer = None;
    lying.peer_stats = None;
    let mut s = suite(vec![section("mesh", vec![lying]), section("empty", Vec::new())]);
    let written = report::write(&mut s, dir.path()).expect("write");
    assert_eq!(written.repaired.len(), 1, "{:?}", written.repaired);
    let back = report::read(&written.json).expect("read");
    let r = &back.sections[0].rows[0];
    assert_eq!(r.status, Status::Failed);
    assert!(r.note.as_deref().is_some_and(|n| n.starts_with("invalid row")), "{r:?}");
    assert_eq!(r.ratio, None);
    // A section that produced nothing still has a row saying so.
    assert_eq!(back.sections[1].rows.len(), 1);
    assert_eq!(back.sections[1].rows[0].status, Status::Failed);
    let md = std::fs::read_to_string(&written.markdown).expect("md");
    assert!(md.contains("failed: invalid row"), "{md}");
}

#[test]
fn a_section_that_did_not_run_says_why() {
    let s = Section::failed(
        "dns",
        "Service DNS",
        "what",
        "cargo bench",
        "needs root (network namespaces)",
    );
    assert_eq!(s.rows.len(), 1);
    assert_eq!(s.rows[0].status, Status::Failed);
    assert!(s.rows[0].check().is_ok());
    assert_eq!(s.error.as_deref(), Some("needs root (network namespaces)"));
}

#[test]
fn dates_are_utc() {
    assert_eq!(report::unix_to_utc(0), "1970-01-01 00:00");
    assert_eq!(report::unix_to_utc(1_795_000_000), "2026-11-18 11:06");
}
