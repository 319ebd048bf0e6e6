//! The `shoal` binary's library: configuration, the agent's API (server and client), the agent
//! daemon that wires the crates together, the CLI, and the lab. `main.rs` only calls [`cli::main`].

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
