//! `shoal service`: create, list, inspect, change, roll back, scale and remove services, their
//! tasks and their output. Without `--detach`, a change waits for the service to converge.

mod args;
mod converge;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use shoal_model::ServiceUpdate;

use crate::api::client::Host;
use crate::api::services::{ServiceView, TaskView};

use self::args::{CreateArgs, UpdateArgs};
use super::{EachName, segment, task_table};

#[derive(Debug, Subcommand)]
pub(super) enum ServiceCmd {
    /// Create a service.
    Create(CreateArgs),
    /// List services.
    Ls {
        #[arg(short, long)]
        quiet: bool,
    },
    /// List services' tasks, with history.
    Ps {
        /// Print task ids only.
        #[arg(short, long)]
        quiet: bool,
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Show services (JSON).
    Inspect {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Change a service: replicas, networks, environment, command, ports, constraints.
    Update(UpdateArgs),
    /// Put back the spec a service had before its last update (a second rollback undoes it).
    Rollback {
        #[arg(short, long)]
        detach: bool,
        service: String,
    },
    /// Set replica counts: `shoal service scale web=5 api=2`.
    Scale {
        #[arg(short, long)]
        detach: bool,
        #[arg(required = true)]
        scales: Vec<String>,
    },
    /// Remove services.
    Rm {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Print a service's output, from every node that runs its tasks.
    Logs {
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// Print lines without the task prefix.
        #[arg(long)]
        no_task_ids: bool,
        service: String,
    },
}

/// Runs one `shoal service` verb against the agent at `host`; exit 1 if any service named
/// failed.
pub(super) async fn run(host: &Host, cmd: &ServiceCmd) -> anyhow::Result<ExitCode> {
    let mut each = EachName::default();
    match cmd {
        ServiceCmd::Create(a) => {
            let req = a.request()?;
            let r: serde_json::Value = host.post_json("/services", &req).await?;
            let id = r["id"].as_str().unwrap_or_default().to_owned();
            println!("{id}");
            if !a.detach {
                converge::converge(host, &id).await?;
            }
        }
        ServiceCmd::Ls { quiet } => {
            let svcs: Vec<ServiceView> = host.get_json("/services").await?;
            if !quiet {
                println!(
                    "{:<26} {:<20} {:<11} {:<9} {:<20} PORTS",
                    "ID", "NAME", "MODE", "REPLICAS", "IMAGE"
                );
            }
            for v in svcs {
                let s = &v.service;
                if *quiet {
                    println!("{}", s.id);
                    continue;
                }
                let mode = match s.mode {
                    shoal_scheduler::Mode::Replicated { .. } => "replicated",
                    shoal_scheduler::Mode::Global => "global",
                };
                let ports: Vec<String> = s
                    .ports
                    .iter()
                    .map(|p| format!("*:{}->{}/{}", p.published, p.target, p.protocol.as_str()))
                    .collect();
                println!(
                    "{:<26} {:<20} {:<11} {:<9} {:<20} {}",
                    s.id,
                    s.name,
                    mode,
                    format!("{}/{}", v.running, v.desired),
                    task_table::image(&s.argv),
                    ports.join(", ")
                );
            }
        }
        ServiceCmd::Ps { quiet, services } => {
            let mut tasks = Vec::new();
            let mut extras = BTreeMap::new();
            for s in services {
                let v = async {
                    host.get_json::<ServiceView>(&format!("/services/{}", segment("service", s)?))
                        .await
                };
                if let Ok(v) = v.await {
                    extras.insert(v.service.id.clone(), task_table::TaskExtras::of(&v.service));
                }
                let t = async {
                    host.get_json::<Vec<TaskView>>(&format!(
                        "/services/{}/tasks",
                        segment("service", s)?
                    ))
                    .await
                };
                tasks.extend(each.check(t.await).into_iter().flatten());
            }
            // Docker prints no table when no service was found.
            if *quiet {
                tasks.iter().for_each(|t| println!("{}", t.task.task.id));
            } else if !tasks.is_empty() || !each.failed {
                task_table::print(&tasks, &extras);
            }
        }
        ServiceCmd::Inspect { services } => {
            let path = |s: &str| Ok(format!("/services/{}", segment("service", s)?));
            each.inspect(host, services, path).await?;
        }
        ServiceCmd::Update(a) => {
            let req = a.request()?;
            let v: ServiceView = host
                .post_json(&format!("/services/{}/update", segment("service", &a.service)?), &req)
                .await?;
            println!("{}", a.service);
            if !a.detach {
                converge::converge(host, &v.service.id).await?;
            }
        }
        ServiceCmd::Rollback { detach, service } => {
            let v: ServiceView = host
                .post_json(&format!("/services/{}/rollback", segment("service", service)?), &())
                .await?;
            println!("{service}");
            if !detach {
                converge::converge(host, &v.service.id).await?;
            }
        }
        ServiceCmd::Scale { detach, scales } => {
            let mut parsed = Vec::new();
            for s in scales {
                let Some((name, n)) = s.split_once('=') else {
                    bail!("invalid scale specifier {s:?}: want SERVICE=REPLICAS");
                };
                let n: u64 = n.parse().map_err(|_| {
                    anyhow::anyhow!("invalid replicas value for service {name}: {n:?}")
                })?;
                parsed.push((segment("service", name)?, n));
            }
            for (name, n) in parsed {
                let req = ServiceUpdate { replicas: Some(n), ..ServiceUpdate::default() };
                let path = format!("/services/{name}/update");
                let Some(v) = each.check(host.post_json::<_, ServiceView>(&path, &req).await)
                else {
                    continue;
                };
                println!("{name} scaled to {n}");
                if !detach {
                    converge::converge(host, &v.service.id).await?;
                }
            }
        }
        ServiceCmd::Logs { follow, no_task_ids, service } => {
            use crate::api::services::{LogsRequest, LogsResponse};
            let path = format!("/services/{}/logs", segment("service", service)?);
            let mut req = LogsRequest::default();
            let mut warned = std::collections::BTreeSet::new();
            loop {
                let r: LogsResponse = host.post_json(&path, &req).await?;
                for e in &r.entries {
                    if *no_task_ids {
                        println!("{}", e.line);
                    } else {
                        println!("{}    | {}", e.source, e.line);
                    }
                }
                for n in r.unreachable {
                    if warned.insert(n.clone()) {
                        eprintln!("WARNING: node {n} did not answer; its tasks' lines are missing");
                    }
                }
                req.cursors.extend(r.cursors);
                if !follow {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        ServiceCmd::Rm { services } => {
            let path = |s: &str| Ok(format!("/services/{}", segment("service", s)?));
            each.remove(host, services, path).await;
        }
    }
    Ok(each.exit_code())
}
