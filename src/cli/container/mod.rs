//! `shoal run`, `ps`, `stop`, `rm` and `logs`: the standalone tasks of the node the command
//! talks to, with Docker's flags, columns and exit codes.

mod attach;

use std::collections::BTreeMap;
use std::process::ExitCode;

use crate::api::client::Host;
use crate::api::containers::RunRequest;
use crate::api::services::TaskView;
use crate::mounts::MountSpec;

use super::{EachName, describe, segment, task_table};

/// `shoal run`.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct RunArgs {
    /// Print the task's id and return at once; without it the task's output is shown until it
    /// ends, Ctrl-C stops it, and `run` exits with the task's exit code.
    #[arg(short, long)]
    detach: bool,
    /// Remove the task when it exits.
    #[arg(long)]
    rm: bool,
    #[arg(long)]
    name: String,
    /// An attachable overlay network.
    #[arg(long)]
    network: String,
    #[arg(short, long)]
    env: Vec<String>,
    /// `type=volume,src=NAME,dst=PATH[,readonly]` or `type=bind,src=HOSTPATH,dst=PATH`.
    #[arg(long)]
    mount: Vec<MountSpec>,
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `run`'s exit code when the agent refused to make the task (Docker's 125).
const EXIT_NOT_RUN: u8 = 125;

/// `shoal run`: makes the task, then prints its id (`-d`) or stays with it until it ends.
pub(super) async fn run(host: &Host, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let req = RunRequest {
        name: args.name.clone(),
        network: args.network.clone(),
        argv: args.command.clone(),
        env: args.env.clone(),
        // Attached, `run` removes the task itself once it has its exit code and output.
        auto_remove: args.rm && args.detach,
        mounts: args.mount.clone(),
    };
    // As `docker run`: 125 when the task could not even be made, so scripts can tell that
    // from the task's own exit code.
    let r: serde_json::Value = match host.post_json("/containers", &req).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}", describe(&e));
            return Ok(ExitCode::from(EXIT_NOT_RUN));
        }
    };
    if args.detach {
        println!("{}", r["id"].as_str().unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    attach::run_attached(host, &args.name, args.rm).await
}

/// `shoal ps`: standalone tasks that run (or are being started); with `all`, ended ones too.
pub(super) async fn ps(host: &Host, all: bool, quiet: bool) -> anyhow::Result<()> {
    let mut tasks: Vec<TaskView> = host.get_json("/containers").await?;
    if !all {
        tasks.retain(|t| !t.task.task.state.is_terminal());
    }
    if quiet {
        tasks.iter().for_each(|t| println!("{}", t.task.task.id));
    } else {
        task_table::print(&tasks, &BTreeMap::new());
    }
    Ok(())
}

/// `shoal stop`: stops each task named; exit 1 if any failed.
pub(super) async fn stop(host: &Host, names: &[String]) -> anyhow::Result<ExitCode> {
    let mut each = EachName::default();
    for n in names {
        let r = async {
            host.post_json::<_, ()>(
                &format!("/containers/{}/stop", segment("container name", n)?),
                &(),
            )
            .await
        };
        if each.check(r.await).is_some() {
            println!("{n}");
        }
    }
    Ok(each.exit_code())
}

/// `shoal rm`: removes each task named (`force`: stops it first); exit 1 if any failed.
pub(super) async fn rm(host: &Host, force: bool, names: &[String]) -> anyhow::Result<ExitCode> {
    let mut each = EachName::default();
    let path = |n: &str| Ok(format!("/containers/{}?force={force}", segment("container name", n)?));
    each.remove(host, names, path).await;
    Ok(each.exit_code())
}

/// `shoal logs`: the task's output so far, or (`follow`) until it ends.
pub(super) async fn logs(host: &Host, follow: bool, name: &str) -> anyhow::Result<()> {
    let name = segment("container name", name)?;
    if follow {
        return attach::follow_logs(host, name).await;
    }
    let text = host.get(&format!("/containers/{name}/logs")).await?;
    print!("{}", String::from_utf8_lossy(&text));
    Ok(())
}
