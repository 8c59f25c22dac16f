//! Test support for swarmnet: the privileged-test gate used by every crate, and (in
//! [`topo`]) a harness that builds multi-node topologies out of network namespaces; [`vm`] is what
//! the kernel VM lane (`scripts/vm-lane.sh`) tells the tests it runs.
//!
//! Invariants: nothing here touches the machine's root network namespace; every namespace
//! it creates carries the `snt` prefix and is removed on drop or swept by the next run.

pub mod gate;
pub mod golden;
pub mod topo;
pub mod vm;
