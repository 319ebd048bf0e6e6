//! `shoal agent`: the configuration merged and checked, logging set up, and the daemon
//! (`crate::agent`) run until it stops.

use std::process::ExitCode;

use crate::config::{AgentArgs, AgentConfig, FileConfig, LogFormat};

use super::EXIT_CONFIG;

/// Runs the agent with these flags (and its file and environment) until it stops.
pub(super) fn run(args: &AgentArgs) -> ExitCode {
    let config =
        FileConfig::load(args.config.as_deref()).and_then(|f| AgentConfig::resolve(args, f));
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        match toml::to_string(&config) {
            Ok(t) => print!("{t}"),
            Err(e) => eprintln!("Error: printing the config: {e}"),
        }
        println!("# configuration OK");
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "starting the runtime");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(crate::agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &AgentConfig) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log_level);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
