//! netd: one per node. Projects the cluster intent onto this node, observes the kernel, plans
//! the difference and applies it through narrow ports.
//!
//! Layout:
//! - [`port`]: the kernel-facing interfaces (links/netns, firewall, processes) and their errors.
//! - [`linux`]: the real implementations (netlink, nftables, fork/exec). The only module that
//!   touches the kernel.
//! - [`dns`]: the embedded resolver at 127.0.0.11 (views, fast/full answer paths, forwarding,
//!   the per-sandbox server runtime).
//! - [`fake`]: in-memory implementations that model kernel semantics, for tests.
//! - [`assign`]: intent from the orchestrator (join, assignment stream, heartbeats).
//! - [`mesh`]: the routing mesh's local shortcut (a published port's share of local tasks goes
//!   straight from the node namespace, the rest through the ingress sandbox).
//! - [`gossip`]: endpoint tables over authenticated chitchat (pure core + transport);
//!   [`gossip_sync`] runs it for the daemon and feeds the projection and DNS.
//!
//! Invariants: pure modules never do I/O; every kernel object netd creates carries the `sn`
//! name prefix or lives in a namespace under the run directory, and prune touches nothing else.

pub mod api;
pub mod assign;
pub mod config;
pub mod daemon;
pub mod desired;
pub mod dns;
pub mod dns_sync;
pub mod fake;
pub mod firewall;
pub mod gossip;
pub mod gossip_sync;
pub mod health;
pub mod lb;
pub mod linux;
pub mod mesh;
pub mod plan;
pub mod port;
pub mod reconcile;
pub mod selftest;
