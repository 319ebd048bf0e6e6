//! What every system benchmark shares: command-line options (`--quick`, `--rounds`, `--out`),
//! rounds with warm-up, median and spread, the result row (shoal, peer, ratio, unit,
//! conditions, status), machine conditions and peer versions, the printed table and the JSON
//! file that `cargo bench -p shoal --bench system` gathers into BENCHMARKS.md.
//!
//! Every row says what it is: both figures and their ratio ([`Status::Compared`]), shoal's
//! figure alone because there is nothing to compare it with ([`Status::NoPeer`]), shoal's
//! figure and a peer that cannot run here ([`Status::PeerNotInstalled`]), shoal's figure and
//! the peer's own words where it was tried and cannot do it ([`Status::PeerFailed`]), or a
//! measurement that failed, with the reason ([`Status::Failed`]). A report never silently loses a
//! comparison.
//!
//! The crate benchmarks (`crates/*/benches/*.rs`) include this file with `#[path]`, so it
//! depends on nothing but std, serde, serde_json and anyhow.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Options every system benchmark understands (unknown arguments, such as cargo's `--bench`,
/// are ignored).
#[derive(Debug, Clone)]
pub struct Options {
    /// Smoke mode for CI: fewer sizes, short rounds; checks the report is produced.
    pub quick: bool,
    /// Measured rounds (after the warm-up round).
    pub rounds: usize,
    /// Whether `--rounds` was given (crate benches then ignore their `ROUNDS` variable).
    pub rounds_given: bool,
    /// Where the JSON goes.
    pub out: PathBuf,
    /// Whether `--out` was given (crate benches write JSON only then).
    pub out_given: bool,
}

impl Options {
    /// Parses `std::env::args()`; `name` names the default JSON file `target/bench/NAME.json`.
    pub fn from_args(name: &str, full_rounds: usize, quick_rounds: usize) -> Options {
        let args: Vec<String> = std::env::args().skip(1).collect();
        Options::parse(&args, name, full_rounds, quick_rounds)
    }

    /// Parses `args` (without the program name).
    pub fn parse(args: &[String], name: &str, full_rounds: usize, quick_rounds: usize) -> Options {
        let quick = args.iter().any(|a| a == "--quick")
            || std::env::var("SHOAL_BENCH_QUICK").is_ok_and(|v| v == "1");
        let value =
            |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
        let given_rounds = value("--rounds").and_then(|r| r.parse::<usize>().ok());
        let rounds = given_rounds.unwrap_or(if quick { quick_rounds } else { full_rounds }).max(1);
        let given_out = value("--out").map(PathBuf::from);
        let out_given = given_out.is_some();
        let out = given_out.unwrap_or_else(|| {
            // cargo bench runs with the package root as working directory.
            let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned());
            PathBuf::from(target).join("bench").join(format!("{name}.json"))
        });
        Options { quick, rounds, rounds_given: given_rounds.is_some(), out, out_given }
    }

    /// Rounds for a crate bench: `--rounds`, else its `ROUNDS` variable, else the default.
    pub fn rounds_or_env(&self) -> usize {
        if self.rounds_given {
            return self.rounds;
        }
        std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(self.rounds).max(1)
    }
}

/// An environment variable parsed, or `default`.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Median and spread of a set of samples.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    /// Stats of the finite `samples`; `None` when there are none (NaN marks a failed sample).
    pub fn of(samples: &[f64]) -> Option<Stats> {
        let samples: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.clone();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
        Some(Stats { median, min: s[0], max: s[n - 1], samples })
    }

    /// "median (min-max)" with `prec` decimals.
    pub fn show(&self, prec: usize) -> String {
        if self.samples.len() == 1 {
            format!("{:.prec$}", self.median)
        } else {
            format!("{:.prec$} ({:.prec$}-{:.prec$})", self.median, self.min, self.max)
        }
    }

    /// Spread as a share of the median: (max - min) / median.
    pub fn spread(&self) -> f64 {
        if self.median == 0.0 { 0.0 } else { (self.max - self.min) / self.median.abs() }
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Conditions {
    /// Logical CPUs available to the benchmark.
    pub cores: usize,
    /// CPU model from /proc/cpuinfo.
    pub cpu: String,
    /// The running kernel's release.
    pub kernel: String,
    /// shoal's version (the package version of this build).
    pub shoal: String,
    /// Peer name to its version, or "peer not installed".
    pub peers: Vec<(String, String)>,
    /// Load generators and other tools the figures depend on, with versions.
    #[serde(default)]
    pub tools: Vec<(String, String)>,
    /// Which CPUs the system under test and the load generator were pinned to, or "none".
    #[serde(default)]
    pub pinning: String,
    /// Free-form facts about the set-up (profile, sizes, durations).
    pub notes: Vec<String>,
}

impl Conditions {
    /// Detects cores, CPU model and kernel. Cores are the machine's online CPUs, not this
    /// process's affinity (a benchmark pins itself).
    pub fn detect() -> Conditions {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let online = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
        let cores = if online > 0 {
            online
        } else {
            std::thread::available_parallelism().map_or(1, usize::from)
        };
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        Conditions {
            cores,
            cpu,
            kernel,
            shoal: env!("CARGO_PKG_VERSION").to_owned(),
            peers: Vec::new(),
            tools: Vec::new(),
            pinning: "none".to_owned(),
            notes: Vec::new(),
        }
    }

    /// Records a peer's version (first line `cmd args` prints), or "peer not installed";
    /// returns whether it is installed.
    pub fn peer(&mut self, name: &str, cmd: &str, args: &[&str]) -> bool {
        let v = peer_version(cmd, args);
        let installed = v.is_some();
        self.peers.push((name.to_owned(), v.unwrap_or_else(|| NOT_INSTALLED.to_owned())));
        installed
    }

    /// Records a tool's version (a load generator); returns whether it is installed.
    pub fn tool(&mut self, name: &str, cmd: &str, args: &[&str]) -> bool {
        let v = peer_version(cmd, args);
        let installed = v.is_some();
        self.tools.push((name.to_owned(), v.unwrap_or_else(|| "not installed".to_owned())));
        installed
    }

    /// One line for the table's footer.
    pub fn line(&self) -> String {
        let peers: Vec<String> = self.peers.iter().map(|(n, v)| format!("{n} {v}")).collect();
        format!(
            "{} cores ({}), kernel {}, shoal {}, {}; pinning: {}",
            self.cores,
            self.cpu,
            self.kernel,
            self.shoal,
            peers.join(", "),
            self.pinning
        )
    }
}

/// What a row says when its peer cannot run here.
pub const NOT_INSTALLED: &str = "peer not installed";
/// The peer name of a figure nothing is compared with (deploy time, agent memory).
pub const NO_PEER: &str = "no peer";

/// A program's version: the first of its first lines (stdout, else stderr) that holds a digit,
/// shortened to 70 characters; `None` when it cannot be started. Some print their version on
/// stderr (`nginx -v`), after a banner line (`socat -V`, `dnsperf -h`) or exit non-zero after
/// printing it (`wrk -v`); starting at all is what "installed" means.
pub fn peer_version(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let pick = |b: &[u8]| {
        let text = String::from_utf8_lossy(b).into_owned();
        let lines: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .take(5)
            .map(str::to_owned)
            .collect();
        lines.iter().find(|l| l.chars().any(|c| c.is_ascii_digit())).or(lines.first()).cloned()
    };
    let line = pick(&out.stdout).or_else(|| pick(&out.stderr)).unwrap_or_default();
    Some(if line.chars().count() > 70 {
        let cut: String = line.chars().take(69).collect();
        format!("{}…", cut.trim_end())
    } else {
        line
    })
}

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(tool);
            f.is_file()
        })
    })
}

/// What a row holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// shoal's figure, the peer's, and their ratio.
    Compared,
    /// shoal's figure alone: there is no peer for it.
    NoPeer,
    /// shoal's figure; the peer is not installed on this machine.
    PeerNotInstalled,
    /// shoal's figure; the peer was tried and cannot do it here: `note` holds its own words.
    PeerFailed,
    /// A measurement failed; `note` says why.
    Failed,
}

impl Status {
    /// How the status reads in the report.
    pub fn label(self) -> &'static str {
        match self {
            Status::Compared => "compared",
            Status::NoPeer => NO_PEER,
            Status::PeerNotInstalled => NOT_INSTALLED,
            Status::PeerFailed => "peer failed",
            Status::Failed => "failed",
        }
    }
}

/// One comparison: shoal's figure, the peer's, and shoal/peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// What is measured, e.g. "failure detection, 8 nodes" (the same for every peer).
    pub metric: String,
    /// What the row holds.
    pub status: Status,
    /// shoal's median.
    pub shoal: Option<f64>,
    /// The peer's median; `None` unless compared.
    pub peer: Option<f64>,
    /// The peer compared with ([`NO_PEER`] for shoal-only figures).
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
    /// "peer not installed", "no peer", or why a measurement failed.
    pub note: Option<String>,
}

impl Row {
    /// A row from both sides' samples; `peer: None` means the peer is not installed. An empty
    /// (or all-NaN) side makes the row a failure that says which side gave no figure.
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
            (Some(s), Some(p)) if p != 0.0 => Some(s / p),
            _ => None,
        };
        let (status, note) = match (s, peer, p) {
            (None, _, _) => (Status::Failed, Some("shoal gave no figure".to_owned())),
            (Some(_), None, _) => (Status::PeerNotInstalled, Some(NOT_INSTALLED.to_owned())),
            (Some(_), Some(_), None) => {
                (Status::Failed, Some(format!("{peer_name} gave no figure")))
            }
            (Some(_), Some(_), Some(_)) if ratio.is_none() => {
                (Status::Failed, Some(format!("{peer_name}'s figure is zero: no ratio")))
            }
            _ => (Status::Compared, None),
        };
        Row {
            metric: metric.into(),
            status,
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

    /// A figure of shoal's with nothing to compare it with.
    pub fn no_peer(
        metric: impl Into<String>,
        unit: &str,
        lower_is_better: bool,
        shoal: &[f64],
        conditions: impl Into<String>,
    ) -> Row {
        let mut r = Row::new(metric, unit, lower_is_better, shoal, NO_PEER, None, conditions);
        if r.status == Status::PeerNotInstalled {
            r.status = Status::NoPeer;
            r.note = Some(NO_PEER.to_owned());
        }
        r
    }

    /// shoal's figure where the peer was tried and failed, in the peer's own `words`.
    #[allow(clippy::too_many_arguments)]
    pub fn peer_failed(
        metric: impl Into<String>,
        unit: &str,
        lower_is_better: bool,
        shoal: &[f64],
        peer_name: &str,
        words: impl Into<String>,
        conditions: impl Into<String>,
    ) -> Row {
        let mut r =
            Row::new(metric, unit, lower_is_better, shoal, peer_name, Some(&[]), conditions);
        if r.shoal.is_some() {
            r.status = Status::PeerFailed;
            r.note = Some(words.into());
        }
        r
    }

    /// A measurement that could not be made, and why.
    pub fn failed(
        metric: impl Into<String>,
        unit: &str,
        peer_name: &str,
        reason: impl Into<String>,
    ) -> Row {
        Row {
            metric: metric.into(),
            status: Status::Failed,
            shoal: None,
            peer: None,
            peer_name: peer_name.to_owned(),
            ratio: None,
            unit: unit.to_owned(),
            lower_is_better: false,
            shoal_stats: None,
            peer_stats: None,
            conditions: String::new(),
            note: Some(reason.into()),
        }
    }

    /// How much better shoal is: the ratio, inverted when lower is better (above 1 = shoal
    /// wins).
    pub fn advantage(&self) -> Option<f64> {
        let r = self.ratio?;
        if self.lower_is_better { (r > 0.0).then(|| 1.0 / r) } else { Some(r) }
    }

    /// Checks the row holds what its status says: compared rows both figures and a ratio,
    /// "no peer" and "peer not installed" rows shoal's figure and the explicit note, failed
    /// rows a reason.
    pub fn check(&self) -> Result<(), String> {
        let fig = |x: Option<f64>| x.is_some_and(f64::is_finite);
        let note = self.note.as_deref().unwrap_or("");
        let ok = match self.status {
            Status::Compared => {
                fig(self.shoal) && fig(self.peer) && fig(self.ratio) && self.peer_name != NO_PEER
            }
            Status::NoPeer => fig(self.shoal) && self.peer.is_none() && note == NO_PEER,
            Status::PeerNotInstalled => {
                fig(self.shoal) && self.peer.is_none() && note == NOT_INSTALLED
            }
            Status::PeerFailed => fig(self.shoal) && self.peer.is_none() && !note.trim().is_empty(),
            Status::Failed => !note.trim().is_empty(),
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "row {:?} (vs {}) is {:?} but holds shoal={:?} peer={:?} ratio={:?} note={:?}",
                self.metric,
                self.peer_name,
                self.status,
                self.shoal,
                self.peer,
                self.ratio,
                self.note
            ))
        }
    }
}

/// The whole result of one benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// Decimals that show a figure of this size sensibly.
pub fn precision(v: f64) -> usize {
    let a = v.abs();
    if a >= 1000.0 {
        0
    } else if a >= 100.0 {
        1
    } else if a >= 1.0 {
        2
    } else {
        3
    }
}

impl Report {
    /// A report of `rows` finished now.
    pub fn new(
        bench: &str,
        quick: bool,
        rounds: usize,
        conditions: Conditions,
        rows: Vec<Row>,
    ) -> Report {
        let finished_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Report { bench: bench.to_owned(), quick, rounds, finished_unix, conditions, rows }
    }

    /// Prints the table to stdout.
    pub fn print(&self) {
        println!("\n{:<44} {:>22} {:>22} {:>7}  unit", "metric", "shoal", "peer", "ratio");
        for r in &self.rows {
            let p = precision(r.shoal.or(r.peer).unwrap_or(0.0));
            let shoal = match (&r.shoal_stats, r.status) {
                (Some(s), _) => s.show(p),
                (None, _) => r.note.clone().unwrap_or_else(|| "-".to_owned()),
            };
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

    /// Reads a report a benchmark wrote.
    pub fn read_json(path: &std::path::Path) -> anyhow::Result<Report> {
        let text = std::fs::read(path)?;
        Ok(serde_json::from_slice(&text)?)
    }
}

/// Seconds of a duration as f64.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// CPU seconds the whole machine has spent busy since boot: every process and every interrupt
/// and softirq on every CPU (the aggregate `cpu` line of /proc/stat less idle and iowait).
/// The difference over a run, divided by the work done, is the cost of that work to the machine
/// whichever process or CPU it landed on: a proxy's own CPU leaves out the kernel's TCP and
/// forwarding work done in softirq on behalf of the traffic, and the load generator's share.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return f64::NAN;
    };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 8 {
        return f64::NAN;
    }
    // user nice system idle iowait irq softirq steal, in USER_HZ (100 per second on Linux).
    let busy = v[..8].iter().sum::<f64>() - v[3] - v[4];
    busy / 100.0
}
