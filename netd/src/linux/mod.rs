//! Linux implementations of the ports. All kernel access of netd lives under this module.

pub mod conntrack;
pub mod dns_socket;
pub mod firewall;
pub mod health_exec;
pub mod ipvs;
pub mod link;
pub mod netns;
pub mod nft;
pub mod process;
pub mod udp_batch;
