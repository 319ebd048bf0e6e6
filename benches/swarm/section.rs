//! The "Docker Swarm, side by side" section: per round a fresh lab of each system (Docker
//! Swarm, shoal with the lab's fast timings, shoal with production timings), the tutorial on
//! each, then one row per step and shoal variant with both figures, one row per capability,
//! and the CLI's columns compared in the notes.

use std::path::Path;

use anyhow::Context;

use super::columns;
use super::docker::{self, DockerLab};
use super::scenario::{self, Feature, Outcome, Step};
use super::shoal_lab::ShoalLab;
use crate::common::{self, Row, Status};
use crate::report::Section;
use crate::{Args, Spec};

const PEER: &str = "Docker Swarm";

/// Which system a lab is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Docker,
    ShoalFast,
    ShoalProduction,
}

/// One system's outcomes over the rounds (or why it could not run).
#[derive(Default)]
struct Runs {
    outcomes: Vec<Outcome>,
    failures: Vec<String>,
}

/// Measures the section.
pub fn measure(spec: &Spec, args: &Args) -> anyhow::Result<Section> {
    for tool in ["curl", "dig", "python3", "nsenter"] {
        if !common::have(tool) {
            anyhow::bail!("{tool} is not installed");
        }
    }
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { spec.full_rounds });
    let work = crate::target_dir().join("bench").join(format!("swarm-{}", std::process::id()));
    let www = work.join("www");
    web_root(&www)?;
    let docker_missing = docker::missing();
    let mut runs: [Runs; 3] = Default::default();
    let order = [System::Docker, System::ShoalFast, System::ShoalProduction];
    for round in 0..rounds {
        for k in 0..order.len() {
            // The order rotates per round: no system always runs first on a cold machine.
            let system = order[(k + round) % order.len()];
            let slot = order.iter().position(|s| *s == system).unwrap_or(0);
            if system == System::Docker && docker_missing.is_some() {
                continue;
            }
            println!("[swarm] round {round}: {system:?}");
            match one(system, &work, &www, round, args.quick) {
                Ok(o) => runs[slot].outcomes.push(o),
                Err(e) => {
                    eprintln!("[swarm] {system:?}: {e:#}");
                    runs[slot].failures.push(format!("{e:#}"));
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let [docker_runs, fast, production] = runs;
    let docker_why = docker_missing.clone().or_else(|| docker_runs.failures.first().cloned());
    let mut rows = Vec::new();
    for (shoal, label) in
        [(&fast, "shoal with lab timings"), (&production, "shoal with production timings")]
    {
        for step in Step::ALL {
            rows.push(step_row(
                step,
                label,
                shoal,
                &docker_runs,
                docker_missing.is_some(),
                docker_why.as_deref(),
            ));
        }
    }
    for (shoal, label) in [(&fast, "lab timings"), (&production, "production timings")] {
        for f in Feature::ALL {
            rows.push(feature_row(
                f,
                label,
                shoal,
                &docker_runs,
                docker_missing.as_deref(),
                docker_why.as_deref(),
            ));
        }
    }
    let mut notes = vec![format!(
        "{rounds} round(s); per round a fresh 3-node lab of each system, one after the other (the \
         order rotates per round); capabilities from the first round"
    )];
    notes.extend(parity_notes(&docker_runs, &fast, docker_why.as_deref()));
    notes.push(
        "Docker Swarm: Debian's docker.io, one dockerd (with its own containerd) per network \
         namespace on one bridge, no default route, busybox imported as an image; shoal: \
         `shoal lab up`, the host's static busybox as the tasks' program"
            .to_owned(),
    );
    let mut section = crate::section_of(spec, rounds, "none", tools(), notes, rows);
    section.peers = vec![(
        PEER.to_owned(),
        match &docker_missing {
            Some(_) => common::NOT_INSTALLED.to_owned(),
            None => docker::version().unwrap_or_else(|| "unknown".to_owned()),
        },
    )];
    Ok(section)
}

/// The tutorial on a fresh lab of `system`.
fn one(
    system: System,
    work: &Path,
    www: &Path,
    round: usize,
    quick: bool,
) -> anyhow::Result<Outcome> {
    match system {
        System::Docker => {
            let dir = work.join(format!("docker-{round}"));
            let prefix = format!("dsw{}", std::process::id() % 100_000);
            let lab = DockerLab::up(&dir, &prefix)?;
            scenario::play(&lab, quick)
        }
        System::ShoalFast | System::ShoalProduction => {
            let lab = ShoalLab::up(system == System::ShoalProduction, www)?;
            scenario::play(&lab, quick)
        }
    }
}

/// The web root shoal's httpd tasks serve: the same page and CGI script as Docker's image.
fn web_root(www: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let cgi = www.join("cgi-bin");
    std::fs::create_dir_all(&cgi).with_context(|| format!("creating {}", cgi.display()))?;
    std::fs::write(www.join("index.html"), "ok\n")?;
    let ip = cgi.join("ip");
    std::fs::write(
        &ip,
        "#!/bin/sh\necho \"Content-Type: text/plain\"\necho\necho \"$REMOTE_ADDR\"\n",
    )?;
    std::fs::set_permissions(&ip, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn samples(runs: &Runs, step: Step) -> Vec<f64> {
    runs.outcomes.iter().filter_map(|o| o.figures.get(&step).copied()).collect()
}

/// Why a system has no figure for a step.
fn why_not(runs: &Runs, step: Step) -> String {
    runs.outcomes
        .iter()
        .find_map(|o| o.missing.get(&step).cloned())
        .or_else(|| runs.failures.first().cloned())
        .unwrap_or_else(|| "no figure".to_owned())
}

fn step_row(
    step: Step,
    label: &str,
    shoal: &Runs,
    peer: &Runs,
    peer_missing: bool,
    peer_why: Option<&str>,
) -> Row {
    let (metric, unit) = step.metric();
    let metric = format!("{metric}, {label}");
    let mine = samples(shoal, step);
    let theirs = samples(peer, step);
    let mut row = Row::new(
        metric,
        unit,
        true,
        &mine,
        PEER,
        (!peer_missing).then_some(&theirs[..]),
        step.how(),
    );
    if peer_missing {
        return row;
    }
    let peer_words = || {
        if peer.outcomes.is_empty() {
            peer_why.unwrap_or("did not run").to_owned()
        } else {
            why_not(peer, step)
        }
    };
    if row.status == Status::Failed {
        if mine.is_empty() {
            let mut why = format!("shoal: {}", why_not(shoal, step));
            if theirs.is_empty() {
                why.push_str(&format!("; {PEER}: {}", peer_words()));
            }
            row.note = Some(why);
        } else {
            // shoal did it and the peer did not: the peer's words, not a failed measurement.
            return Row::peer_failed(row.metric, unit, true, &mine, PEER, peer_words(), step.how());
        }
    }
    row
}

fn feature_row(
    f: Feature,
    label: &str,
    shoal: &Runs,
    peer: &Runs,
    peer_missing: Option<&str>,
    peer_why: Option<&str>,
) -> Row {
    let metric = format!("{}, {label}", f.metric());
    let first = |r: &Runs| -> Result<f64, String> {
        match r.outcomes.first() {
            Some(o) => o.features.get(&f).cloned().unwrap_or_else(|| Err("not tried".to_owned())),
            None => Err(r.failures.first().cloned().unwrap_or_else(|| "did not run".to_owned())),
        }
    };
    let mine = first(shoal);
    if peer_missing.is_some() {
        return match mine {
            Ok(v) => Row::new(metric, "s", true, &[v], PEER, None, f.how()),
            Err(e) => Row::failed(metric, "s", PEER, format!("shoal: {e}")),
        };
    }
    let theirs = if peer.outcomes.is_empty() {
        Err(peer_why.unwrap_or("did not run").to_owned())
    } else {
        first(peer)
    };
    match (mine, theirs) {
        (Ok(m), Ok(t)) => Row::new(metric, "s", true, &[m], PEER, Some(&[t]), f.how()),
        (Ok(m), Err(t)) => Row::peer_failed(metric, "s", true, &[m], PEER, t, f.how()),
        (Err(m), Ok(_)) => Row::failed(metric, "s", PEER, format!("shoal: {m} ({PEER} works)")),
        (Err(m), Err(t)) => Row::failed(metric, "s", PEER, format!("shoal: {m}; {PEER}: {t}")),
    }
}

fn parity_notes(docker: &Runs, shoal: &Runs, docker_why: Option<&str>) -> Vec<String> {
    let Some(d) = docker.outcomes.first() else {
        return vec![format!(
            "CLI columns not compared: {PEER} did not run ({})",
            docker_why.unwrap_or("unknown")
        )];
    };
    let Some(s) = shoal.outcomes.first() else {
        return vec!["CLI columns not compared: shoal's lab did not run".to_owned()];
    };
    let mut v = Vec::new();
    for ((what, dh), (_, sh)) in d.headers.iter().zip(&s.headers) {
        let (lacks, extra) = columns::compare(dh, sh);
        v.push(format!(
            "CLI `{what}`: docker prints {}; shoal {}{}",
            columns::columns(dh).join(" | "),
            if lacks.is_empty() {
                "has all of them".to_owned()
            } else {
                format!("lacks {}", lacks.join(", "))
            },
            if extra.is_empty() {
                String::new()
            } else {
                format!(", and adds {}", extra.join(" "))
            }
        ));
    }
    v
}

fn tools() -> Vec<(String, String)> {
    let mut t = Vec::new();
    for (name, cmd, args) in [
        ("curl", "curl", &["-V"][..]),
        ("dig", "dig", &["-v"][..]),
        ("python3", "python3", &["--version"][..]),
    ] {
        if let Some(v) = common::peer_version(cmd, args) {
            t.push((name.to_owned(), v));
        }
    }
    t
}
