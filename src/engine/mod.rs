//! Services, tasks and networks end to end: the leader's scheduling loop and every node's
//! reconcile loop, over the records both read from the store and the gossip tables.

pub mod leader;
pub mod mesh_policy;
pub mod node;
pub mod records;
pub mod rollout;
pub mod trust;

pub use node::{CniState, NodeEngine};
