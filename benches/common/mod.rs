//! What every system benchmark shares: command-line options (`--quick`, `--rounds`, `--out`),
//! rounds with warm-up, median and spread, the result row (shoal, peer, ratio, unit,
//! conditions), machine conditions and peer versions, the printed table and the JSON file.
//!
//! A row whose peer is not installed is kept, with `peer: null` and a note saying so, so a
//! report never silently loses a comparison.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

/// Options every system benchmark understands (unknown arguments, such as cargo's `--bench`,
/// are ignored).
#[derive(Debug, Clone)]
pub struct Options {
    /// Smoke mode for CI: fewer sizes, one short round; checks the report is produced.
    pub quick: bool,
    /// Measured rounds (after the warm-up round).
    pub rounds: usize,
    /// Where the JSON goes.
    pub out: PathBuf,
}

impl Options {
    /// Parses `std::env::args()`; `name` names the default JSON file `target/bench/NAME.json`.
    pub fn from_args(name: &str, full_rounds: usize, quick_rounds: usize) -> Options {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let quick = args.iter().any(|a| a == "--quick")
            || std::env::var("SHOAL_BENCH_QUICK").is_ok_and(|v| v == "1");
        let value =
            |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
        let rounds = value("--rounds")
            .and_then(|r| r.parse().ok())
            .unwrap_or(if quick { quick_rounds } else { full_rounds })
            .max(1);
        let out = value("--out").map(PathBuf::from).unwrap_or_else(|| {
            // cargo bench runs with the package root as working directory.
            let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned());
            PathBuf::from(target).join("bench").join(format!("{name}.json"))
        });
        Options { quick, rounds, out }
    }
}

/// Median and spread of a set of samples.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// The median.
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Every sample, in measurement order.
    pub samples: Vec<f64>,
}

impl Stats {
    /// Stats of `samples`; `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
        Some(Stats { median, min: s[0], max: s[n - 1], samples: samples.to_vec() })
    }

    /// "median (min–max)" with `prec` decimals.
    pub fn show(&self, prec: usize) -> String {
        if self.samples.len() == 1 {
            format!("{:.prec$}", self.median)
        } else {
            format!("{:.prec$} ({:.prec$}-{:.prec$})", self.median, self.min, self.max)
        }
    }
}

/// Runs `warmup` unrecorded rounds, then `rounds` recorded ones; a round returns its samples
/// (e.g. one for shoal and one for the peer) or an error that aborts the run.
pub fn rounds<T>(
    warmup: usize,
    rounds: usize,
    mut f: impl FnMut(usize, bool) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<T>> {
    for i in 0..warmup {
        f(i, true)?;
    }
    (0..rounds).map(|i| f(i, false)).collect()
}

/// The machine and software a figure was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Conditions {
    /// Logical CPUs available to the benchmark.
    pub cores: usize,
    /// CPU model from /proc/cpuinfo.
    pub cpu: String,
    /// `uname -r`.
    pub kernel: String,
    /// shoal's version (the package version of this build).
    pub shoal: String,
    /// Peer name to its version, or "peer not installed".
    pub peers: Vec<(String, String)>,
    /// Free-form facts about the set-up (profile, pinning, sizes).
    pub notes: Vec<String>,
}

impl Conditions {
    /// Detects cores, CPU model and kernel.
    pub fn detect() -> Conditions {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        Conditions {
            cores,
            cpu,
            kernel,
            shoal: env!("CARGO_PKG_VERSION").to_owned(),
            peers: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Records a peer's version (first line of `cmd args`), or "peer not installed"; returns
    /// whether it is installed.
    pub fn peer(&mut self, name: &str, cmd: &str, args: &[&str]) -> bool {
        let v = peer_version(cmd, args);
        let installed = v.is_some();
        self.peers.push((name.to_owned(), v.unwrap_or_else(|| NOT_INSTALLED.to_owned())));
        installed
    }

    /// One line for the table's footer.
    pub fn line(&self) -> String {
        let peers: Vec<String> = self.peers.iter().map(|(n, v)| format!("{n} {v}")).collect();
        format!(
            "{} cores ({}), kernel {}, shoal {}, {}",
            self.cores,
            self.cpu,
            self.kernel,
            self.shoal,
            peers.join(", ")
        )
    }
}

/// What a row says when its peer cannot run here.
pub const NOT_INSTALLED: &str = "peer not installed";

/// The first line of a peer's version output, or `None` when it does not run.
pub fn peer_version(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next().unwrap_or("").trim().to_owned())
}

/// One comparison: shoal's figure, the peer's, and shoal/peer.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What is measured, e.g. "failure detection, 8 nodes".
    pub metric: String,
    /// shoal's median.
    pub shoal: Option<f64>,
    /// The peer's median; `None` with a note when the peer is not installed.
    pub peer: Option<f64>,
    /// The peer compared with.
    pub peer_name: String,
    /// shoal / peer (medians).
    pub ratio: Option<f64>,
    /// Unit of both figures.
    pub unit: String,
    /// Whether lower is better (a ratio below 1 is then shoal's win).
    pub lower_is_better: bool,
    /// shoal's samples.
    pub shoal_stats: Option<Stats>,
    /// The peer's samples.
    pub peer_stats: Option<Stats>,
    /// Set-up specific to this row; the machine conditions are in the report.
    pub conditions: String,
    /// E.g. "peer not installed".
    pub note: Option<String>,
}

impl Row {
    /// A row from both sides' samples; an empty peer side means the peer did not run.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        metric: impl Into<String>,
        unit: &str,
        lower_is_better: bool,
        shoal: &[f64],
        peer_name: &str,
        peer: Option<&[f64]>,
        conditions: impl Into<String>,
    ) -> Row {
        let shoal_stats = Stats::of(shoal);
        let peer_stats = peer.and_then(Stats::of);
        let (s, p) =
            (shoal_stats.as_ref().map(|s| s.median), peer_stats.as_ref().map(|s| s.median));
        let ratio = match (s, p) {
            (Some(s), Some(p)) if p > 0.0 => Some(s / p),
            _ => None,
        };
        let note = match peer {
            None => Some(NOT_INSTALLED.to_owned()),
            Some(_) if peer_stats.is_none() => Some("peer gave no figure".to_owned()),
            Some(_) => None,
        };
        Row {
            metric: metric.into(),
            shoal: s,
            peer: p,
            peer_name: peer_name.to_owned(),
            ratio,
            unit: unit.to_owned(),
            lower_is_better,
            shoal_stats,
            peer_stats,
            conditions: conditions.into(),
            note,
        }
    }
}

/// The whole result of one benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Benchmark name.
    pub bench: String,
    /// Whether this was a `--quick` run.
    pub quick: bool,
    /// Recorded rounds per figure.
    pub rounds: usize,
    /// Seconds since the Unix epoch at the end of the run.
    pub finished_unix: u64,
    /// Machine and versions.
    pub conditions: Conditions,
    /// The comparisons.
    pub rows: Vec<Row>,
}

impl Report {
    /// Prints the table to stdout.
    pub fn print(&self) {
        let prec = |unit: &str| if unit == "s" { 2 } else { 0 };
        println!("\n{:<44} {:>22} {:>22} {:>7}  unit", "metric", "shoal", "peer", "ratio");
        for r in &self.rows {
            let p = prec(&r.unit);
            let shoal = r.shoal_stats.as_ref().map_or("-".to_owned(), |s| s.show(p));
            let peer = match (&r.peer_stats, &r.note) {
                (Some(s), _) => s.show(p),
                (None, Some(n)) => n.clone(),
                (None, None) => "-".to_owned(),
            };
            let ratio = r.ratio.map_or("-".to_owned(), |x| format!("{x:.2}"));
            println!(
                "{:<44} {:>22} {:>22} {:>7}  {} (vs {})",
                r.metric, shoal, peer, ratio, r.unit, r.peer_name
            );
        }
        println!("figures: median (min-max) of {} rounds; ratio = shoal / peer", self.rounds);
        println!("conditions: {}", self.conditions.line());
        for n in &self.conditions.notes {
            println!("  {n}");
        }
    }

    /// Writes the JSON next to the other benchmarks' results.
    pub fn write_json(&self, path: &std::path::Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(self)?)?;
        println!("wrote {}", path.display());
        Ok(())
    }
}

/// Seconds of a duration as f64.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
