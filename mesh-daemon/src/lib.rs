//! nodemesh's node daemon: loads the kernel hooks, holds the mesh state, and proxies captured
//! connections. `main.rs` is only the command line over these modules.

pub mod admin;
pub mod authz;
pub mod check;
pub mod config;
pub mod discovery;
pub mod drain;
pub mod ebpf;
pub mod enroll;
pub mod identity;
pub mod meshfile;
pub mod metrics;
pub mod promtext;
pub mod proxy;
pub mod socket;
pub mod state;
pub mod tap;
