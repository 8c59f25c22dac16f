//! Service load balancing: the [`LoadBalancerPort`] every backend implements, the pure model it
//! takes ([`model`]), and the nftables layout as data ([`nft_render`]).
//!
//! One load-balancing point per node per network: the port acts on the overlay network's
//! namespace (`NsRef::Owned(net-<id>)`), where every local sandbox of that network reaches the
//! VIPs through the bridge; nothing is installed in task sandboxes, so state grows with
//! services + backends, never with services × containers. The ingress network is balanced in
//! the node's ingress sandbox instead (`NsRef::Owned(sb-ingress-sbox)`, where published ports
//! arrive; see `crate::desired::DesiredRouter`), so its own namespace only bridges.
//!
//! Backends:
//! - nftables (`crate::linux::nft::NftLoadBalancer`): one owned table per namespace, changed by
//!   netlink batches, one transaction per `apply`;
//! - the in-memory fake (`crate::fake::lb::FakeLoadBalancer`), which models which backend a new
//!   connection can reach;
//! - IPVS (`crate::linux::ipvs::IpvsLoadBalancer`): virtual services over generic netlink,
//!   no transactions, so each round is ordered to never show a service without its backends,
//!   with a companion nftables table for the reject of empty services and hairpin;
//! - later a connect-time eBPF balancer (cgroup `connect4`/`sendmsg4` rewriting VIP:port to a
//!   backend): all take the same [`LbSpec`], which says what must be reachable, not how
//!   packets are rewritten.
//!
//! Invariants: `apply` is given the whole desired state of a namespace and changes only the
//! difference from what it applied last (kept in memory, never read back from the kernel);
//! one `apply` is one atomic kernel transaction where the kernel has them; `observe` is cheap
//! (no listing of rules) and tells whether the kernel still holds what was applied.

pub mod model;
pub mod nft_render;

pub use model::{
    Affinity, BackendState, IdleTimeouts, LbSpec, Proto, ServiceChange, ServiceKey, ServiceSpec,
};

use crate::port::{NsRef, PortResult};

/// Which implementation a port is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbKind {
    Nftables,
    Ipvs,
    Ebpf,
    Fake,
}

/// What one `apply` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Services added, removed or changed.
    pub services_changed: usize,
    /// Kernel objects changed: for nftables the netlink messages of the batch, without the
    /// batch begin/end markers; for the fake the objects it changed. The measure of
    /// "O(1) per endpoint change".
    pub messages: usize,
    /// Bytes sent to the kernel (0 for the fake).
    pub bytes: usize,
    /// Kernel transactions: 0 when nothing changed, otherwise 1.
    pub transactions: usize,
    /// Whether the namespace was programmed from scratch (first apply, or after drift).
    pub full: bool,
}

/// What `observe` found in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbObserved {
    /// Nothing of ours is there and nothing was applied (or it was flushed).
    Absent,
    /// The kernel holds what was applied last.
    InSync,
    /// Our objects are missing or were changed by someone else; the next `apply` reprograms
    /// the namespace from scratch.
    Drifted,
}

/// A node's load balancer, one point per network namespace.
///
/// Semantics every implementation follows (the contract suite checks them):
/// - a new connection to `vip:port/proto` of a service reaches one of its healthy backends, with
///   the client's own source address (hairpin connections that land on their own source are
///   the only ones masqueraded);
/// - a service without a healthy backend refuses at once (TCP reset, ICMP port-unreachable);
/// - a draining backend gets no new connection; established ones continue (after its removal,
///   which ends the grace period, they may end: IPVS ends them, nftables does not);
/// - with client-IP affinity, one client's connections go to one backend while the healthy set
///   is unchanged; without it they spread;
/// - `apply` changes only the difference, in one transaction (IPVS: in an order that never
///   shows a service without its backends); the kernel work of an endpoint change does not
///   depend on the number of other services;
/// - removal (`flush`) of a namespace's state is Ok when there is none.
pub trait LoadBalancerPort: Send {
    fn kind(&self) -> LbKind;
    /// Makes the load balancer of `ns` serve exactly `spec`.
    fn apply(&mut self, ns: &NsRef, spec: &LbSpec) -> PortResult<ApplyStats>;
    /// A cheap drift check of `ns` (no rule listing). After `Drifted`, the next `apply` to that
    /// namespace reprograms it whole.
    fn observe(&mut self, ns: &NsRef) -> PortResult<LbObserved>;
    /// Removes everything of ours from `ns` and forgets it; missing is Ok. Established
    /// connections keep their conntrack state.
    fn flush(&mut self, ns: &NsRef) -> PortResult<()>;
    /// Namespaces this port has applied state to and not flushed.
    fn namespaces(&self) -> Vec<NsRef>;
    /// Flushes every namespace this port has applied state to.
    fn flush_all(&mut self) -> PortResult<()> {
        for ns in self.namespaces() {
            self.flush(&ns)?;
        }
        Ok(())
    }
}
