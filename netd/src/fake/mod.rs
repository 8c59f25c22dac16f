//! In-memory ports that model kernel semantics (not call recorders), for the planner's and
//! reconciler's tests and for the contract suites.

pub mod dns_redirect;
pub mod firewall;
pub mod lb;
pub mod link;
pub mod process;
