//! The `shoal` binary's library: configuration, the agent's API (server and client), the agent
//! daemon, this node's part in a swarm (which wires the crates together), the CLI, and the lab.
//! `main.rs` only calls [`cli::main`]. ARCHITECTURE.md says which way the modules import.

pub mod agent;
pub mod api;
pub mod cli;
pub mod cni;
pub mod config;
pub mod demo;
pub mod engine;
pub mod from_model;
pub mod lab;
pub mod metrics;
pub mod mounts;
pub mod swarm;
pub mod ui;
pub mod volumes;
