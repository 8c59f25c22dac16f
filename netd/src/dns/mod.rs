//! The embedded DNS resolver every sandbox sees at 127.0.0.11:53 (UDP and TCP).
//!
//! Layout:
//! - [`view`]: pure; the names one sandbox may resolve ([`DnsView`]), built from the intent.
//! - [`wire`]: allocation-free reading of the common query shape.
//! - [`fast`]: the inline answer path for cluster A/AAAA lookups.
//! - [`full`]: everything else, through hickory-proto (PTR, SRV, errors, truncation).
//! - [`forward`]: the forwarding policy, resolv.conf parsing and upstream exchanges.
//! - [`server`]: the tokio runtime: per-sandbox sockets, loops, caps, atomic view swaps.
//! - [`Responder`]: the request entry point both the server and the fuzz tests drive.
//!
//! Invariants: the view of a sandbox is immutable and replaced whole; the fast and full paths
//! give byte-identical answers for every query the fast path takes; no input panics; a
//! sandbox's queries never leave through another namespace (`linux::dns_socket`).

pub mod fast;
pub mod forward;
pub mod full;
pub mod redirect;
pub mod server;
pub mod view;
pub mod wire;

use std::net::Ipv4Addr;

use rand::SeedableRng;
use rand::rngs::SmallRng;

pub use forward::{DenyAnswer, ForwardConfig, ForwardPolicy, node_upstreams, parse_resolv_conf};
pub use server::{DnsServer, DnsServerConfig, SandboxDns, SandboxDnsError, SandboxDnsInspect};
pub use view::{DnsView, Lookup, ViewOptions};

/// The resolver's address inside every sandbox (Docker's).
pub const RESOLVER_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);

/// Largest UDP answer we send whatever the client advertises. Loopback never fragments, but a
/// bound keeps the reused buffers fixed and the 300-task answers honest about TC.
pub const MAX_UDP_PAYLOAD: usize = 4096;

/// The EDNS payload size we advertise (DNS flag day 2020's 1232).
pub const OUR_EDNS_PAYLOAD: u16 = 1232;

/// How a query arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Send these bytes.
    Reply(&'a [u8]),
    /// Forward the request; a UDP client takes at most `udp_limit` bytes back.
    Forward { udp_limit: usize },
    /// Send nothing (not a query).
    Drop,
}

/// Panics caught inside hickory's parser since the process started (expected: 0).
pub fn caught_panics() -> u64 {
    full::CAUGHT_PANICS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Per-loop answer state: buffers reused across queries and a fast generator for DNSRR
/// shuffles (not security-relevant; query IDs toward upstreams use the thread CSPRNG).
#[derive(Debug)]
pub struct Responder {
    fast: fast::FastPath,
    rng: SmallRng,
    scratch: Vec<Ipv4Addr>,
    fast_out: Box<[u8; MAX_UDP_PAYLOAD]>,
    out: Vec<u8>,
}

impl Default for Responder {
    fn default() -> Self {
        Self::new()
    }
}

impl Responder {
    pub fn new() -> Self {
        Self::with_rng(rand::make_rng())
    }

    /// Deterministic shuffles, for tests that compare two responders.
    pub fn with_seed(seed: u64) -> Self {
        Self::with_rng(SmallRng::seed_from_u64(seed))
    }

    fn with_rng(rng: SmallRng) -> Self {
        Self {
            fast: fast::FastPath::new(),
            rng,
            scratch: Vec::new(),
            fast_out: Box::new([0; MAX_UDP_PAYLOAD]),
            out: Vec::with_capacity(MAX_UDP_PAYLOAD),
        }
    }

    /// The entry point: fast path for UDP cluster A/AAAA lookups, full path otherwise.
    pub fn answer(
        &mut self,
        view: &DnsView,
        policy: &ForwardPolicy,
        req: &[u8],
        transport: Transport,
    ) -> Outcome<'_> {
        if transport == Transport::Udp
            && let Some(n) = self.fast.try_answer(
                view,
                policy.recursion_available(),
                req,
                &mut self.rng,
                &mut self.fast_out[..],
            )
        {
            return Outcome::Reply(&self.fast_out[..n]);
        }
        self.answer_full(view, policy, req, transport)
    }

    /// The fast path alone (`None`: it does not take this query).
    pub fn answer_fast(
        &mut self,
        view: &DnsView,
        policy: &ForwardPolicy,
        req: &[u8],
    ) -> Option<&[u8]> {
        let n = self.fast.try_answer(
            view,
            policy.recursion_available(),
            req,
            &mut self.rng,
            &mut self.fast_out[..],
        )?;
        Some(&self.fast_out[..n])
    }

    /// The full path alone.
    pub fn answer_full(
        &mut self,
        view: &DnsView,
        policy: &ForwardPolicy,
        req: &[u8],
        transport: Transport,
    ) -> Outcome<'_> {
        match full::respond(
            view,
            policy,
            req,
            transport,
            &mut self.rng,
            &mut self.scratch,
            &mut self.out,
        ) {
            full::FullOutcome::Reply => Outcome::Reply(&self.out),
            full::FullOutcome::Forward { udp_limit } => Outcome::Forward { udp_limit },
            full::FullOutcome::Drop => Outcome::Drop,
        }
    }
}
