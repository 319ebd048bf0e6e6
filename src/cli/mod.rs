//! The `shoal` command line: Docker's verbs and flags where Docker has them. One module per noun
//! holds its clap arguments and what its verbs ask of the agent's API; this one holds the
//! top-level commands, the global flags, and how a command's failure reads and exits. Every verb
//! but `agent` and `lab` talks to an agent over its API socket.

mod agent;
mod container;
mod info;
mod lab;
mod network;
mod node;
mod service;
mod swarm;
mod task_table;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Parser, Subcommand};

use crate::api::client::{ApiError, Host};
use crate::config::{AgentArgs, DEFAULT_SOCKET};

/// Exit code for a configuration error (EX_USAGE), as `shoal agent --check-config` promises.
pub const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "shoal",
    version,
    about = "Swarm-style overlay networking, service DNS and a routing mesh for Linux hosts"
)]
pub struct Cli {
    /// Agent to talk to, like DOCKER_HOST [default: unix:///run/shoal/shoal.sock].
    #[arg(short = 'H', long, env = "SHOAL_HOST", global = true)]
    host: Option<String>,
    /// Talk to this node of the lab (e.g. node2) instead of the local agent.
    #[arg(long, global = true)]
    node: Option<String>,
    /// The lab that `--node` and the `lab` verbs mean.
    #[arg(long, env = "SHOAL_LAB", global = true, default_value = crate::lab::DEFAULT_LAB)]
    lab: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the host daemon.
    Agent(AgentArgs),
    /// Show the client's and the agent's versions.
    Version,
    /// Show what the agent knows about its node.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create, join and leave a swarm.
    Swarm {
        #[command(subcommand)]
        cmd: swarm::SwarmCmd,
    },
    /// Manage the swarm's nodes (on a manager).
    Node {
        #[command(subcommand)]
        cmd: node::NodeCmd,
    },
    /// Overlay networks.
    Network {
        #[command(subcommand)]
        cmd: network::NetworkCmd,
    },
    /// Replicated and global services.
    Service {
        #[command(subcommand)]
        cmd: service::ServiceCmd,
    },
    /// Named volumes of this node (tasks mount them with `--mount type=volume,src=NAME,...`).
    Volume {
        #[command(subcommand)]
        cmd: volume::VolumeCmd,
    },
    /// Run a standalone task on this node, on an attachable network, reachable by its name.
    Run(container::RunArgs),
    /// List standalone tasks that run (`-a`: ended ones too).
    Ps {
        /// Show all tasks, also those that ended.
        #[arg(short, long)]
        all: bool,
        /// Print task ids only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Stop standalone tasks of this node.
    Stop {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove standalone tasks of this node.
    Rm {
        /// Stop it first if it runs.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Print a standalone task's output.
    Logs {
        /// Keep printing new output until the task ends.
        #[arg(short, long)]
        follow: bool,
        name: String,
    },
    /// Print a shell completion script (e.g. `shoal completion bash > /etc/bash_completion.d/shoal`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The CNI plugin: with CNI_COMMAND set, one call as the CNI spec has it (runtimes run this
    /// binary as `shoal` from their plugin directory, with no arguments).
    Cni {
        #[command(subcommand)]
        cmd: Option<CniCmd>,
    },
    /// Built-in demo programs to run as tasks.
    Demo {
        #[command(subcommand)]
        cmd: DemoCmd,
    },
    /// A whole cluster in network namespaces on this machine (needs root).
    Lab {
        #[command(subcommand)]
        cmd: lab::LabCmd,
    },
}

#[derive(Debug, Subcommand)]
enum CniCmd {
    /// Link this binary into a CNI plugin directory as `shoal`.
    Install {
        /// The runtime's plugin directory (containerd's and podman's `bin_dir`; Debian's
        /// plugins live in /usr/lib/cni).
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DemoCmd {
    /// The tutorial's hello-world: `GET /visitor` counts visitors in Redis at myredis:6379.
    Visitor(crate::demo::VisitorArgs),
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    // A CNI runtime runs the plugin with no arguments and CNI_COMMAND set.
    if std::env::args_os().len() == 1 && std::env::var_os("CNI_COMMAND").is_some() {
        return crate::cni::main();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // A bad flag or SHOAL_* value for the agent is a configuration error: exit 64.
            let is_agent = std::env::args().nth(1).is_some_and(|a| a == "agent");
            if is_agent && e.use_stderr() {
                let _ = e.print();
                return ExitCode::from(EXIT_CONFIG);
            }
            e.exit();
        }
    };
    if let Cmd::Agent(args) = &cli.cmd {
        return agent::run(args);
    }
    quiet_on_closed_stdout();
    match &cli.cmd {
        Cmd::Cni { cmd: None } => return crate::cni::main(),
        Cmd::Cni { cmd: Some(CniCmd::Install { bin_dir }) } => {
            return match crate::cni::install(bin_dir) {
                Ok(link) => {
                    println!("{}", link.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("Error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Cmd::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(*shell, &mut Cli::command(), "shoal", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let rt =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("Error: starting the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// `shoal service ls | head -1`: when the reader of stdout goes away, `println!` panics with
/// "failed printing to stdout: Broken pipe" (Rust ignores SIGPIPE). A CLI should then stop
/// quietly with the status a shell gives a process killed by SIGPIPE (128 + 13), as docker
/// does. Only output can break a pipe in a CLI process (its requests to the agent go over a
/// socket, whose errors are values); every other panic still goes to the default hook.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.contains("Broken pipe") || text.contains("BrokenPipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

impl Cli {
    /// The agent this invocation talks to: `--node` (a lab node), else `-H`/`SHOAL_HOST`, else
    /// the default socket.
    fn target(&self) -> anyhow::Result<Host> {
        if let Some(node) = &self.node {
            crate::lab::validate_name(&self.lab)?;
            let socket = crate::lab::node_socket(&self.lab, node);
            if !socket.exists()
                && crate::lab::LabState::load(&self.lab).is_ok_and(|s| s.node(node).is_err())
            {
                crate::lab::LabState::load(&self.lab)?.node(node)?;
            }
            return Ok(Host { socket });
        }
        match &self.host {
            Some(h) => Host::parse(h),
            None => Ok(Host { socket: PathBuf::from(DEFAULT_SOCKET) }),
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.cmd {
        Cmd::Agent(_) | Cmd::Completion { .. } | Cmd::Cni { .. } => {
            unreachable!("handled before the runtime starts")
        }
        Cmd::Version => info::version(&cli.target()?).await?,
        Cmd::Info { json } => info::info(&cli.target()?, *json).await?,
        Cmd::Lab { cmd } => return lab::run(&cli.lab, cmd).await,
        Cmd::Swarm { cmd } => swarm::run(&cli.target()?, cmd).await?,
        Cmd::Node { cmd } => return node::run(&cli.target()?, cmd).await,
        Cmd::Network { cmd } => return network::run(&cli.target()?, cmd).await,
        Cmd::Service { cmd } => return service::run(&cli.target()?, cmd).await,
        Cmd::Run(args) => return container::run(&cli.target()?, args).await,
        Cmd::Volume { cmd } => volume::run(&cli.target()?, cmd).await?,
        Cmd::Ps { all, quiet } => container::ps(&cli.target()?, *all, *quiet).await?,
        Cmd::Stop { names } => return container::stop(&cli.target()?, names).await,
        Cmd::Rm { force, names } => return container::rm(&cli.target()?, *force, names).await,
        Cmd::Logs { follow, name } => container::logs(&cli.target()?, *follow, name).await?,
        Cmd::Demo { cmd: DemoCmd::Visitor(args) } => crate::demo::run_visitor(args.clone()).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// How an error reads on stderr, in Docker's words: `Error: No such service: x` for a name the
/// agent does not know, `Error response from daemon: ...` for any other refusal.
pub fn describe(e: &anyhow::Error) -> String {
    match e.downcast_ref::<ApiError>() {
        Some(a)
            if e.chain().count() == 1 && a.is_not_found() && a.message.starts_with("No such ") =>
        {
            format!("Error: {}", a.message)
        }
        Some(a) if e.chain().count() == 1 => format!("Error response from daemon: {}", a.message),
        _ => format!("Error: {e:#}"),
    }
}

/// Docker's way with several names: act on each, report each failure on stderr and go on;
/// the command fails (exit 1) if any did.
#[derive(Debug, Default)]
pub struct EachName {
    failed: bool,
}

impl EachName {
    /// The value of a success; a failure is reported and remembered.
    pub fn check<T>(&mut self, r: anyhow::Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("{}", describe(&e));
                self.failed = true;
                None
            }
        }
    }

    /// Exit 1 if any name failed.
    pub fn exit_code(&self) -> ExitCode {
        if self.failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
    }
}

impl EachName {
    /// Docker's `inspect` of several names: each one's JSON as the agent has it, all in one
    /// array on stdout; `path(name)` is where the agent has it. A name that fails is reported
    /// and the others still printed.
    pub async fn inspect(
        &mut self,
        host: &Host,
        names: &[String],
        path: impl Fn(&str) -> anyhow::Result<String>,
    ) -> anyhow::Result<()> {
        let mut found = Vec::new();
        for name in names {
            let v = async { host.get_json::<serde_json::Value>(&path(name)?).await };
            found.extend(self.check(v.await));
        }
        println!("{}", serde_json::to_string_pretty(&found)?);
        Ok(())
    }

    /// Docker's `rm` of several names: DELETE each at `path(name)`, printing the name of each
    /// one removed; a name that fails is reported and the others still removed.
    pub async fn remove(
        &mut self,
        host: &Host,
        names: &[String],
        path: impl Fn(&str) -> anyhow::Result<String>,
    ) {
        for name in names {
            let r = async { host.delete(&path(name)?).await };
            if self.check(r.await).is_some() {
                println!("{name}");
            }
        }
    }
}

/// A name or id from the command line, checked before it goes into a URL path; `what` names it
/// in the error.
fn segment<'a>(what: &str, s: &'a str) -> anyhow::Result<&'a str> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        bail!("invalid {what} {s:?}");
    }
    Ok(s)
}

/// `--label KEY=VALUE`, repeated, as `network create` and `volume create` take it.
#[derive(Debug, clap::Args)]
struct Labels {
    /// Label KEY=VALUE.
    #[arg(long = "label", value_name = "LABEL", value_parser = label)]
    labels: Vec<(String, String)>,
}

/// A label as `--label`/`--label-add` take it, Docker's way: `KEY=VALUE`, or `KEY` alone for an
/// empty value; an empty key is refused (by clap, before anything is sent).
fn label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').unwrap_or((s, ""));
    if k.is_empty() {
        return Err(format!("invalid label {s:?}: want KEY=VALUE"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_as_dockers() {
        assert_eq!(label("zone=a=b"), Ok(("zone".to_owned(), "a=b".to_owned())));
        assert_eq!(label("zone"), Ok(("zone".to_owned(), String::new())));
        assert_eq!(label("zone="), Ok(("zone".to_owned(), String::new())));
        assert!(label("=a").is_err());
        assert!(label("").is_err());
        // Through the command line: the flag's name and the reason, nothing run.
        let err = Cli::try_parse_from(["shoal", "volume", "create", "--label", "=a", "v"])
            .expect_err("an empty key is refused");
        assert!(err.to_string().contains("--label") && err.to_string().contains("want KEY=VALUE"));
    }

    #[test]
    fn the_command_tree_is_consistent() {
        // clap checks its own rules here (one id per flag, short flags unique within a command,
        // groups and conflicts that name real arguments), across every noun's module at once.
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn errors_read_as_dockers() {
        let api = |status, message: &str| {
            anyhow::Error::new(ApiError { status, message: message.to_owned() })
        };
        assert_eq!(describe(&api(404, "No such service: x")), "Error: No such service: x");
        assert_eq!(
            describe(&api(409, "network with name n already exists")),
            "Error response from daemon: network with name n already exists"
        );
        assert_eq!(
            describe(&api(404, "no such endpoint: GET /x")),
            "Error response from daemon: no such endpoint: GET /x"
        );
        assert_eq!(
            describe(&anyhow::anyhow!("invalid service \"a/b\"")),
            "Error: invalid service \"a/b\""
        );
        let wrapped = api(404, "No such service: x").context("asking");
        assert_eq!(describe(&wrapped), "Error: asking: No such service: x");
    }
}
