//! netd: one per node. Projects the cluster intent onto this node, observes the kernel, plans
//! the difference and applies it through narrow ports.
//!
//! Layout:
//! - [`port`]: the kernel-facing interfaces (links/netns, firewall, processes) and their errors.
//! - [`linux`]: the real implementations (netlink, nftables, fork/exec). The only module that
//!   touches the kernel.
//! - [`fake`]: in-memory implementations that model kernel semantics, for tests.
//!
//! Invariants: pure modules never do I/O; every kernel object netd creates carries the `sn`
//! name prefix or lives in a namespace under the run directory, and prune touches nothing else.

pub mod fake;
pub mod linux;
pub mod port;
pub mod desired;
pub mod firewall;
pub mod plan;
pub mod reconcile;
pub mod config;
pub mod daemon;
