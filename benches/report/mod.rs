//! The suite's report: every section's rows (benches/common's [`Row`]) gathered into one
//! [`Suite`], written as `BENCHMARKS.md` (tables, conditions, the command that made it, SVG
//! charts beside it in `benches/charts/`) and `BENCHMARKS.json` (the same, plus every row
//! flattened with its conditions: cores, kernel, the peer's version, pinning).
//!
//! The writer keeps the report's one promise: every row has both figures and their ratio, or
//! says explicitly "no peer", "peer not installed", the peer's own words where it was tried and
//! cannot do it, or why it failed. A row that claims otherwise (say "compared" without a peer
//! figure) is written as failed, with the reason.
//!
//! Charts are drawn with plotters' SVG backend only: text is SVG `<text>` with a generic font
//! family, so nothing looks up system fonts and nothing needs the network.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::common::{Conditions, NO_PEER, NOT_INSTALLED, Row, Stats, Status, precision};

/// One comparison group: a benchmark run (e.g. the routing mesh with the backend on another
/// node) and its rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Section {
    /// Short name, as `--only` takes it.
    pub name: String,
    /// Heading in the report.
    pub title: String,
    /// What is measured and how, in a sentence or two.
    pub what: String,
    /// The command that runs this section alone.
    pub rerun: String,
    /// Recorded rounds per figure.
    pub rounds: usize,
    /// CPU pinning of the system under test and the load generator, or "none".
    pub pinning: String,
    /// Peers and their versions (or "peer not installed").
    pub peers: Vec<(String, String)>,
    /// Load generators and tools, with versions.
    pub tools: Vec<(String, String)>,
    /// Set-up facts.
    pub notes: Vec<String>,
    /// The comparisons.
    pub rows: Vec<Row>,
    /// Wall-clock seconds the section took.
    pub seconds: f64,
    /// Why the section's benchmark did not run to the end, if it did not.
    pub error: Option<String>,
}

impl Section {
    /// A section that could not run: one failed row that says why.
    pub fn failed(name: &str, title: &str, what: &str, rerun: &str, why: &str) -> Section {
        Section {
            name: name.to_owned(),
            title: title.to_owned(),
            what: what.to_owned(),
            rerun: rerun.to_owned(),
            rounds: 0,
            pinning: "none".to_owned(),
            peers: Vec::new(),
            tools: Vec::new(),
            notes: Vec::new(),
            rows: vec![Row::failed(format!("{title} (benchmark did not run)"), "-", "-", why)],
            seconds: 0.0,
            error: Some(why.to_owned()),
        }
    }
}

/// One row with everything needed to read it alone (BENCHMARKS.json's `rows`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlatRow {
    /// Section name.
    pub section: String,
    /// What is measured.
    pub metric: String,
    /// "compared", "no_peer", "peer_not_installed" or "failed".
    pub status: Status,
    /// shoal's median.
    pub shoal: Option<f64>,
    /// shoal's smallest and largest sample.
    pub shoal_range: Option<(f64, f64)>,
    /// The peer.
    pub peer_name: String,
    /// Its version, "peer not installed", or "no peer".
    pub peer_version: String,
    /// The peer's median.
    pub peer: Option<f64>,
    /// The peer's smallest and largest sample.
    pub peer_range: Option<(f64, f64)>,
    /// shoal / peer.
    pub ratio: Option<f64>,
    /// How much better shoal is (the ratio, inverted when lower is better).
    pub shoal_advantage: Option<f64>,
    /// Unit of both figures.
    pub unit: String,
    /// Whether lower is better.
    pub lower_is_better: bool,
    /// Recorded rounds.
    pub rounds: usize,
    /// Logical CPUs.
    pub cores: usize,
    /// CPU model.
    pub cpu: String,
    /// Kernel release.
    pub kernel: String,
    /// CPU pinning used.
    pub pinning: String,
    /// How this row was measured.
    pub setup: String,
    /// "no peer", "peer not installed", or the reason of a failure.
    pub note: Option<String>,
}

/// The whole suite's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Suite {
    /// Format version of BENCHMARKS.json.
    pub schema: u32,
    /// The command that made the report.
    pub command: String,
    /// Whether it was a `--quick` run (smoke figures, not for quoting).
    pub quick: bool,
    /// Seconds since the Unix epoch at the start.
    pub started_unix: u64,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
    /// Of which building the benchmark binaries.
    #[serde(default)]
    pub build_seconds: f64,
    /// `git describe`-like commit of the tree measured.
    pub commit: String,
    /// Machine: cores, CPU, kernel, shoal; the peers and tools of every section.
    pub machine: Conditions,
    /// Machine-wide facts (memory, load at the start).
    pub notes: Vec<String>,
    /// The sections in run order.
    pub sections: Vec<Section>,
}

/// What [`write`] made.
#[derive(Debug, Clone)]
pub struct Written {
    /// BENCHMARKS.md.
    pub markdown: PathBuf,
    /// BENCHMARKS.json.
    pub json: PathBuf,
    /// The SVG charts.
    pub charts: Vec<PathBuf>,
    /// Rows that claimed more than they held and were written as failed.
    pub repaired: Vec<String>,
}

/// Where the charts go, relative to the report's directory.
pub const CHART_DIR: &str = "benches/charts";

impl Suite {
    /// Makes every row honest: a row whose contents do not match its status becomes a failed
    /// row that says what was wrong. Returns the problems found.
    pub fn normalize(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for s in &mut self.sections {
            if s.rows.is_empty() {
                let why = s.error.clone().unwrap_or_else(|| "the benchmark gave no rows".into());
                s.rows.push(Row::failed(format!("{} (no figures)", s.title), "-", "-", why));
            }
            for r in &mut s.rows {
                if let Err(e) = r.check() {
                    problems.push(format!("{}: {e}", s.name));
                    r.status = Status::Failed;
                    r.note = Some(format!("invalid row, not reported: {e}"));
                    r.ratio = None;
                }
            }
        }
        problems
    }

    /// Every row, flattened with its conditions.
    pub fn flat_rows(&self) -> Vec<FlatRow> {
        let mut out = Vec::new();
        for s in &self.sections {
            for r in &s.rows {
                let version = match r.status {
                    Status::NoPeer => NO_PEER.to_owned(),
                    Status::PeerNotInstalled => NOT_INSTALLED.to_owned(),
                    _ => peer_version(s, &r.peer_name),
                };
                let range = |st: &Option<Stats>| st.as_ref().map(|s| (s.min, s.max));
                out.push(FlatRow {
                    section: s.name.clone(),
                    metric: r.metric.clone(),
                    status: r.status,
                    shoal: r.shoal,
                    shoal_range: range(&r.shoal_stats),
                    peer_name: r.peer_name.clone(),
                    peer_version: version,
                    peer: r.peer,
                    peer_range: range(&r.peer_stats),
                    ratio: r.ratio,
                    shoal_advantage: r.advantage(),
                    unit: r.unit.clone(),
                    lower_is_better: r.lower_is_better,
                    rounds: s.rounds,
                    cores: self.machine.cores,
                    cpu: self.machine.cpu.clone(),
                    kernel: self.machine.kernel.clone(),
                    pinning: s.pinning.clone(),
                    setup: r.conditions.clone(),
                    note: r.note.clone(),
                });
            }
        }
        out
    }
}

/// The version a section recorded for a peer ("direct (no proxy)" and the like have none).
fn peer_version(s: &Section, peer: &str) -> String {
    let key = short(peer).to_ascii_lowercase();
    s.peers
        .iter()
        .find(|(n, _)| {
            let n = n.to_ascii_lowercase();
            n == peer.to_ascii_lowercase() || n == key || short(&n) == key
        })
        .map_or_else(|| "-".to_owned(), |(_, v)| v.clone())
}

/// Whether a "peer" is a baseline rather than a competitor: no proxy, no overlay. shoal cannot
/// beat those; the ratio shows its cost. The overview chart leaves them out.
pub fn is_baseline(peer_name: &str) -> bool {
    peer_name.contains("(no ")
}

/// A peer's name without its parenthesised explanation: "direct (no proxy)" → "direct".
pub fn short(name: &str) -> &str {
    name.split(" (").next().unwrap_or(name).trim()
}

/// A figure with a sensible number of decimals.
pub fn num(v: f64) -> String {
    format!("{v:.p$}", p = precision(v))
}

/// "median (min–max)", or the median alone for one sample.
fn figure(st: &Option<Stats>) -> String {
    match st {
        None => "-".to_owned(),
        Some(s) if s.samples.len() < 2 || s.min == s.max => num(s.median),
        Some(s) => {
            let p = precision(s.median);
            format!("{:.p$} ({:.p$}–{:.p$})", s.median, s.min, s.max)
        }
    }
}

/// "1.23× better" / "1.25× worse" / "same".
pub fn verdict(r: &Row) -> String {
    match (r.status, r.advantage()) {
        (Status::Compared, Some(a)) if (a - 1.0).abs() < 0.005 => "same".to_owned(),
        (Status::Compared, Some(a)) if a >= 1.0 => format!("{a:.2}× better"),
        (Status::Compared, Some(a)) if a > 0.0 => format!("{:.2}× worse", 1.0 / a),
        (Status::Compared, _) => "-".to_owned(),
        (Status::NoPeer, _) => NO_PEER.to_owned(),
        (Status::PeerNotInstalled, _) => NOT_INSTALLED.to_owned(),
        (Status::PeerFailed, _) => "works; the peer fails".to_owned(),
        (Status::Failed, _) => "failed".to_owned(),
    }
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The Markdown report.
pub fn markdown(suite: &Suite, charts: &[(String, String)]) -> String {
    let mut m = String::new();
    let when = unix_to_utc(suite.started_unix);
    let _ = writeln!(m, "# shoal benchmarks\n");
    let _ = writeln!(
        m,
        "Made by `{}` (as root) on {when} UTC, commit {}: {:.0} minutes of measuring{}.{}\n",
        suite.command,
        suite.commit,
        (suite.seconds - suite.build_seconds) / 60.0,
        if suite.build_seconds >= 1.0 {
            format!(" after {:.0} minutes of building the benchmarks", suite.build_seconds / 60.0)
        } else {
            String::new()
        },
        if suite.quick {
            " **Quick mode: one short round per figure, a smoke test; do not quote these figures.**"
        } else {
            ""
        }
    );
    let c = &suite.machine;
    let _ = writeln!(
        m,
        "Machine: {} cores ({}), kernel {}, shoal {}.{}\n",
        c.cores,
        c.cpu,
        c.kernel,
        c.shoal,
        suite.notes.iter().map(|n| format!(" {n}.")).collect::<String>()
    );
    let _ = writeln!(
        m,
        "How to read it: shoal and its peer run in the same run, one after the other (the order \
         rotates per round), in network namespaces on this one machine. Each figure is the median \
         of the recorded rounds, after a warm-up, with the smallest and largest in brackets; \
         ratio = shoal / peer; \"better\" accounts for whether lower is better. On a small shared \
         machine absolute figures move with other load; the same-run ratios are what carry over. \
         Every row has both figures, or says \"{NO_PEER}\" (nothing to compare with), \
         \"{NOT_INSTALLED}\", \"fails:\" with the peer's own words (it was tried and cannot do \
         it here), or why it failed.\n"
    );
    if !c.peers.is_empty() {
        let peers: Vec<String> = c.peers.iter().map(|(n, v)| format!("{n}: {v}")).collect();
        let _ = writeln!(m, "Peers: {}.\n", md_escape(&peers.join("; ")));
    }
    if !c.tools.is_empty() {
        let tools: Vec<String> = c.tools.iter().map(|(n, v)| format!("{n}: {v}")).collect();
        let _ = writeln!(m, "Load generators and tools: {}.\n", md_escape(&tools.join("; ")));
    }
    if let Some((_, file)) = charts.iter().find(|(k, _)| k == "overview") {
        let _ = writeln!(m, "## At a glance\n");
        let _ = writeln!(
            m,
            "How many times better (green, right) or worse (red, left) shoal is than each peer, \
             per compared row, on a log scale (the no-proxy and no-overlay baselines are in the \
             tables only).\n"
        );
        let _ = writeln!(m, "![shoal against its peers]({file})\n");
    }
    let _ = writeln!(
        m,
        "| section | rows | vs a peer | shoal better | vs a baseline | no peer | peer not installed | peer fails | failed | time |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|");
    for s in &suite.sections {
        let count = |st: Status| s.rows.iter().filter(|r| r.status == st).count();
        let vs_peer = |r: &&Row| r.status == Status::Compared && !is_baseline(&r.peer_name);
        let peers = s.rows.iter().filter(vs_peer).count();
        let better = s
            .rows
            .iter()
            .filter(vs_peer)
            .filter(|r| r.advantage().is_some_and(|a| a >= 1.0))
            .count();
        let _ = writeln!(
            m,
            "| [{}](#{}) | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} s |",
            s.title,
            anchor(&s.title),
            s.rows.len(),
            peers,
            better,
            count(Status::Compared) - peers,
            count(Status::NoPeer),
            count(Status::PeerNotInstalled),
            count(Status::PeerFailed),
            count(Status::Failed),
            s.seconds
        );
    }
    let _ = writeln!(m);
    for s in &suite.sections {
        let _ = writeln!(m, "## {}\n", s.title);
        let _ = writeln!(m, "{}\n", s.what);
        if let Some(e) = &s.error {
            let _ = writeln!(m, "**The benchmark did not complete:** {}\n", md_escape(e));
        }
        if let Some((_, file)) = charts.iter().find(|(k, _)| *k == s.name) {
            let _ = writeln!(m, "![{}]({file})\n", s.title);
        }
        let _ = writeln!(m, "| metric | peer | shoal | peer's figure | unit | ratio | shoal is |");
        let _ = writeln!(m, "|---|---|---|---|---|---|---|");
        for r in &s.rows {
            let peer_fig = match r.status {
                Status::Compared => figure(&r.peer_stats),
                Status::NoPeer => NO_PEER.to_owned(),
                Status::PeerNotInstalled => NOT_INSTALLED.to_owned(),
                Status::PeerFailed => format!("fails: {}", r.note.as_deref().unwrap_or("")),
                Status::Failed => format!("failed: {}", r.note.as_deref().unwrap_or("")),
            };
            let shoal_fig = match (&r.shoal_stats, r.status) {
                (Some(_), _) => figure(&r.shoal_stats),
                (None, _) => "-".to_owned(),
            };
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} | {} |",
                md_escape(&r.metric),
                md_escape(&r.peer_name),
                shoal_fig,
                md_escape(&peer_fig),
                md_escape(&r.unit),
                r.ratio.map_or("-".to_owned(), |x| format!("{x:.2}")),
                verdict(r)
            );
        }
        let _ = writeln!(m);
        let _ = writeln!(m, "- Rounds: {} recorded per figure; pinning: {}.", s.rounds, s.pinning);
        if !s.peers.is_empty() {
            let v: Vec<String> = s.peers.iter().map(|(n, v)| format!("{n} {v}")).collect();
            let _ = writeln!(m, "- Peers: {}.", md_escape(&v.join("; ")));
        }
        if !s.tools.is_empty() {
            let v: Vec<String> = s.tools.iter().map(|(n, v)| format!("{n} {v}")).collect();
            let _ = writeln!(m, "- Tools: {}.", md_escape(&v.join("; ")));
        }
        // How each figure was measured, once per distinct set-up.
        let mut setups: Vec<(String, Vec<String>)> = Vec::new();
        for r in &s.rows {
            if r.conditions.is_empty() {
                continue;
            }
            match setups.iter_mut().find(|(c, _)| *c == r.conditions) {
                Some((_, metrics)) if metrics.contains(&r.metric) => {}
                Some((_, metrics)) => metrics.push(r.metric.clone()),
                None => setups.push((r.conditions.clone(), vec![r.metric.clone()])),
            }
        }
        for (cond, metrics) in setups {
            let _ = writeln!(m, "- {}: {}.", md_escape(&metrics.join("; ")), md_escape(&cond));
        }
        for n in &s.notes {
            let _ = writeln!(m, "- {}.", md_escape(n.trim_end_matches('.')));
        }
        let _ = writeln!(m, "- Alone: `{}` ({:.0} s here).\n", s.rerun, s.seconds);
    }
    let _ = writeln!(
        m,
        "Micro-benchmarks of the hot functions (criterion; not part of this report): \
         `cargo bench -p shoal-vxlan --bench micro`, `-p shoal-gossip --bench micro`, \
         `-p shoal-ingress --bench micro`, `-p shoal-dns --bench micro`."
    );
    m
}

/// GitHub's heading anchor: lowercase, spaces to dashes, punctuation dropped.
fn anchor(title: &str) -> String {
    title
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// "2026-11-26 07:30" from seconds since the epoch (civil-from-days, no time zone database).
pub fn unix_to_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {:02}:{:02}", rem / 3600, rem % 3600 / 60)
}

/// Normalizes the suite, draws the charts and writes BENCHMARKS.md and BENCHMARKS.json into
/// `dir` (charts into `dir/benches/charts/`).
pub fn write(suite: &mut Suite, dir: &Path) -> anyhow::Result<Written> {
    let repaired = suite.normalize();
    std::fs::create_dir_all(dir)?;
    let chart_dir = dir.join(CHART_DIR);
    std::fs::create_dir_all(&chart_dir)?;
    let mut charts = Vec::new();
    let mut links = Vec::new();
    let overview = chart_dir.join("overview.svg");
    if overview_chart(suite, &overview)? {
        links.push(("overview".to_owned(), format!("{CHART_DIR}/overview.svg")));
        charts.push(overview);
    }
    for s in &suite.sections {
        let file = chart_dir.join(format!("{}.svg", s.name));
        if section_chart(s, &file)? {
            links.push((s.name.clone(), format!("{CHART_DIR}/{}.svg", s.name)));
            charts.push(file);
        }
    }
    let markdown_path = dir.join("BENCHMARKS.md");
    std::fs::write(&markdown_path, markdown(suite, &links))?;
    let json_path = dir.join("BENCHMARKS.json");
    let json = serde_json::json!({
        "schema": suite.schema,
        "command": suite.command,
        "quick": suite.quick,
        "started_unix": suite.started_unix,
        "seconds": suite.seconds,
        "build_seconds": suite.build_seconds,
        "commit": suite.commit,
        "machine": suite.machine,
        "notes": suite.notes,
        "rows": suite.flat_rows(),
        "sections": suite.sections,
    });
    std::fs::write(&json_path, serde_json::to_vec_pretty(&json)?)?;
    Ok(Written { markdown: markdown_path, json: json_path, charts, repaired })
}

/// Reads a suite back from BENCHMARKS.json.
pub fn read(path: &Path) -> anyhow::Result<Suite> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    Ok(serde_json::from_value(v)?)
}

const SHOAL_COLOR: RGBColor = RGBColor(31, 119, 180);
const PEER_COLORS: [RGBColor; 4] = [
    RGBColor(255, 127, 14),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(140, 86, 75),
];
const BETTER: RGBColor = RGBColor(44, 160, 44);
const WORSE: RGBColor = RGBColor(214, 39, 40);

type Bars<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// One bar: the median from 0, a min-max whisker when there are several samples, and the
/// median's value above it.
fn bar(
    root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    chart: &mut Bars<'_, '_>,
    (x0, x1): (f64, f64),
    st: &Stats,
    color: RGBColor,
) -> anyhow::Result<()> {
    chart
        .draw_series(std::iter::once(Rectangle::new([(x0, 0.0), (x1, st.median)], color.filled())))
        .map_err(chart_err)?;
    if st.samples.len() > 1 {
        let xm = (x0 + x1) / 2.0;
        chart
            .draw_series(std::iter::once(PathElement::new(vec![(xm, st.min), (xm, st.max)], BLACK)))
            .map_err(chart_err)?;
    }
    let (vx, vy) = chart.backend_coord(&(x0, st.median.max(st.max)));
    root.draw(&Text::new(num(st.median), (vx, vy - 13), ("sans-serif", 10).into_font()))
        .map_err(chart_err)?;
    Ok(())
}

/// The value axis of a bar panel: no vertical grid, five labelled ticks in `unit`.
fn value_axis(chart: &mut Bars<'_, '_>, unit: &str) -> anyhow::Result<()> {
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(5)
        .y_desc(unit)
        .y_label_formatter(&|v| num(*v))
        .label_style(("sans-serif", 10))
        .draw()
        .map_err(chart_err)
}

fn chart_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e:?}")
}

/// The compared rows as horizontal bars of shoal's advantage on a log scale. `false` when
/// there is nothing to draw.
fn overview_chart(suite: &Suite, file: &Path) -> anyhow::Result<bool> {
    let items: Vec<(String, f64)> = suite
        .sections
        .iter()
        .flat_map(|s| {
            s.rows
                .iter()
                .filter(|r| r.status == Status::Compared && !is_baseline(&r.peer_name))
                .filter_map(move |r| {
                    let a = r.advantage().filter(|a| a.is_finite() && *a > 0.0)?;
                    Some((format!("{}: {} vs {}", s.name, r.metric, short(&r.peer_name)), a))
                })
        })
        .collect();
    if items.is_empty() {
        return Ok(false);
    }
    let (lo, hi) = items.iter().fold((1.0f64, 1.0f64), |(lo, hi), (_, a)| (lo.min(*a), hi.max(*a)));
    // Room on the right for the largest bar's label.
    let (lo, hi) = (lo / 1.5, hi * 4.0);
    let row_h = 20u32;
    let height = 70 + row_h * items.len() as u32;
    let label_w = 470u32;
    let root = SVGBackend::new(file, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let n = items.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "shoal vs its peers: times better (right of 1) or worse (left of 1)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(label_w)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..n)
        .map_err(chart_err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_labels(8)
        .x_label_formatter(&|x| format!("{x:.2}×"))
        .label_style(("sans-serif", 11))
        .draw()
        .map_err(chart_err)?;
    for (i, (label, a)) in items.iter().enumerate() {
        let y0 = n - i as f64 - 0.85;
        let y1 = n - i as f64 - 0.15;
        let color = if *a >= 1.0 { BETTER } else { WORSE };
        chart
            .draw_series(std::iter::once(Rectangle::new([(1.0, y0), (*a, y1)], color.filled())))
            .map_err(chart_err)?;
        let (px, py) = chart.backend_coord(&(lo, (y0 + y1) / 2.0));
        root.draw(&Text::new(
            clip(label, 72),
            (px - label_w as i32 + 4, py - 6),
            ("sans-serif", 11).into_font(),
        ))
        .map_err(chart_err)?;
        let (vx, vy) = chart.backend_coord(&(a.max(1.0), (y0 + y1) / 2.0));
        root.draw(&Text::new(format!("{a:.2}×"), (vx + 4, vy - 6), ("sans-serif", 11).into_font()))
            .map_err(chart_err)?;
    }
    chart
        .draw_series(std::iter::once(PathElement::new(vec![(1.0, 0.0), (1.0, n)], BLACK)))
        .map_err(chart_err)?;
    root.present().map_err(chart_err)?;
    Ok(true)
}

fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// One panel per metric: shoal's bar and each peer's, with min–max whiskers; peers that are
/// not installed or failed are named in the panel instead of a bar.
fn section_chart(s: &Section, file: &Path) -> anyhow::Result<bool> {
    if s.rows.iter().all(|r| matches!(r.status, Status::NoPeer | Status::Failed)) {
        return shoal_only_chart(s, file);
    }
    // Metrics in order, each with shoal's stats and the peers' rows.
    let mut metrics: Vec<(&str, &str, Vec<&Row>)> = Vec::new();
    for r in &s.rows {
        if r.shoal_stats.is_none() && r.status != Status::Failed {
            continue;
        }
        match metrics.iter_mut().find(|(m, u, _)| *m == r.metric && *u == r.unit) {
            Some((_, _, rows)) => rows.push(r),
            None => metrics.push((&r.metric, &r.unit, vec![r])),
        }
    }
    metrics.retain(|(_, _, rows)| rows.iter().any(|r| r.shoal_stats.is_some()));
    if metrics.is_empty() {
        return Ok(false);
    }
    let cols = metrics.len().min(3);
    let rows_n = metrics.len().div_ceil(cols);
    let (pw, ph) = (360u32, 250u32);
    let root =
        SVGBackend::new(file, (pw * cols as u32, ph * rows_n as u32 + 30)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let (title, body) = root.split_vertically(30);
    title
        .draw(&Text::new(
            format!("{}: shoal (blue) and its peers, median with min-max", s.title),
            (10, 8),
            ("sans-serif", 15).into_font(),
        ))
        .map_err(chart_err)?;
    let panels = body.split_evenly((rows_n, cols));
    for ((metric, unit, rows), panel) in metrics.iter().zip(panels.iter()) {
        // Bars: shoal first, then each peer row in order.
        let mut bars: Vec<(String, Option<&Stats>, RGBColor, Option<String>)> = Vec::new();
        let shoal = rows.iter().find_map(|r| r.shoal_stats.as_ref());
        bars.push(("shoal".to_owned(), shoal, SHOAL_COLOR, None));
        for (i, r) in rows.iter().enumerate() {
            let color = PEER_COLORS[i % PEER_COLORS.len()];
            match r.status {
                Status::Compared => {
                    bars.push((short(&r.peer_name).to_owned(), r.peer_stats.as_ref(), color, None))
                }
                Status::NoPeer => {}
                Status::PeerNotInstalled => bars.push((
                    short(&r.peer_name).to_owned(),
                    None,
                    color,
                    Some("not installed".to_owned()),
                )),
                Status::Failed => bars.push((
                    short(&r.peer_name).to_owned(),
                    None,
                    color,
                    Some("failed".to_owned()),
                )),
                Status::PeerFailed => bars.push((
                    short(&r.peer_name).to_owned(),
                    None,
                    color,
                    Some("fails".to_owned()),
                )),
            }
        }
        let top = bars
            .iter()
            .filter_map(|(_, st, _, _)| st.map(|s| s.max.max(s.median)))
            .fold(0.0f64, f64::max);
        let top = if top > 0.0 { top * 1.18 } else { 1.0 };
        let nb = bars.len() as f64;
        let lower = rows.first().is_some_and(|r| r.lower_is_better);
        let mut chart = ChartBuilder::on(panel)
            .caption(
                clip(
                    &format!(
                        "{metric} ({})",
                        if lower { "lower is better" } else { "higher is better" }
                    ),
                    52,
                ),
                ("sans-serif", 12),
            )
            .margin(8)
            .x_label_area_size(22)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..nb, 0f64..top)
            .map_err(chart_err)?;
        value_axis(&mut chart, unit)?;
        for (i, (label, st, color, missing)) in bars.iter().enumerate() {
            let (x0, x1) = (i as f64 + 0.15, i as f64 + 0.85);
            let (lx, ly) = chart.backend_coord(&(x0, 0.0));
            root.draw(&Text::new(clip(label, 11), (lx, ly + 4), ("sans-serif", 10).into_font()))
                .map_err(chart_err)?;
            match st {
                Some(st) => bar(&root, &mut chart, (x0, x1), st, *color)?,
                None => {
                    let (vx, vy) = chart.backend_coord(&(x0, top * 0.1));
                    root.draw(&Text::new(
                        missing.clone().unwrap_or_default(),
                        (vx, vy),
                        ("sans-serif", 9).into_font(),
                    ))
                    .map_err(chart_err)?;
                }
            }
        }
    }
    root.present().map_err(chart_err)?;
    Ok(true)
}

/// Words `text` into lines of at most `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(l) if l.chars().count() + 1 + word.chars().count() <= width => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_owned()),
        }
    }
    lines
}

/// The words every one of `names` starts with.
fn common_words<'a>(names: &[&'a str]) -> Vec<&'a str> {
    let Some(first) = names.first().filter(|_| names.len() > 1) else { return Vec::new() };
    let mut common: Vec<&str> = first.split_whitespace().collect();
    for n in &names[1..] {
        let words: Vec<&str> = n.split_whitespace().collect();
        let k = common.iter().zip(&words).take_while(|(a, b)| a == b).count();
        common.truncate(k);
    }
    // Keep at least one word of each name.
    let shortest = names.iter().map(|n| n.split_whitespace().count()).min().unwrap_or(0);
    common.truncate(shortest.saturating_sub(1));
    common
}

/// A section of shoal-only figures: one panel per unit, a bar per row, labelled by what sets
/// the rows apart.
fn shoal_only_chart(s: &Section, file: &Path) -> anyhow::Result<bool> {
    let mut groups: Vec<(&str, Vec<&Row>)> = Vec::new();
    for r in s.rows.iter().filter(|r| r.shoal_stats.is_some()) {
        match groups.iter_mut().find(|(u, _)| *u == r.unit) {
            Some((_, rows)) => rows.push(r),
            None => groups.push((&r.unit, vec![r])),
        }
    }
    if groups.is_empty() {
        return Ok(false);
    }
    let (w, ph) = (1000u32, 290u32);
    let root = SVGBackend::new(file, (w, ph * groups.len() as u32 + 30)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let (title, body) = root.split_vertically(30);
    title
        .draw(&Text::new(
            format!("{}: shoal's figures (no peer), median with min-max", s.title),
            (10, 8),
            ("sans-serif", 15).into_font(),
        ))
        .map_err(chart_err)?;
    let panels = body.split_evenly((groups.len(), 1));
    for ((unit, rows), panel) in groups.iter().zip(panels.iter()) {
        let names: Vec<&str> = rows.iter().map(|r| r.metric.as_str()).collect();
        let common = common_words(&names);
        let caption = if common.is_empty() {
            (*unit).to_owned()
        } else {
            format!("{} ({unit})", common.join(" ").trim_end_matches(','))
        };
        let lower = rows.first().is_some_and(|r| r.lower_is_better);
        let caption =
            format!("{caption}, {}", if lower { "lower is better" } else { "higher is better" });
        let top = rows
            .iter()
            .filter_map(|r| r.shoal_stats.as_ref().map(|s| s.max.max(s.median)))
            .fold(0.0f64, f64::max);
        let top = if top > 0.0 { top * 1.18 } else { 1.0 };
        let nb = rows.len() as f64;
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 12))
            .margin(8)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..nb, 0f64..top)
            .map_err(chart_err)?;
        value_axis(&mut chart, unit)?;
        let chars = ((f64::from(w) - 80.0) / nb / 6.0).max(8.0) as usize;
        for (i, r) in rows.iter().enumerate() {
            let Some(st) = r.shoal_stats.as_ref() else { continue };
            let (x0, x1) = (i as f64 + 0.2, i as f64 + 0.8);
            bar(&root, &mut chart, (x0, x1), st, SHOAL_COLOR)?;
            let label: Vec<&str> = r.metric.split_whitespace().skip(common.len()).collect();
            let (lx, ly) = chart.backend_coord(&(i as f64 + 0.05, 0.0));
            for (k, line) in wrap(&label.join(" "), chars).iter().take(3).enumerate() {
                root.draw(&Text::new(
                    line.clone(),
                    (lx, ly + 4 + 12 * k as i32),
                    ("sans-serif", 10).into_font(),
                ))
                .map_err(chart_err)?;
            }
        }
    }
    root.present().map_err(chart_err)?;
    Ok(true)
}
