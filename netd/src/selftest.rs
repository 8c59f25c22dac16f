//! The published-port self-test (ANCHORS pain #7: "published port unreachable on some nodes"):
//! after every full round, netd connects from its own node to each TCP port the node publishes,
//! through the same DNAT path an outside client takes, and reports the result in its status.
//! The checks run on a thread of their own so a slow backend never stalls reconciliation.
//!
//! UDP ports are listed as not testable: there is no generic request a UDP service answers.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use swarmnet_model::spec::Protocol;

use crate::desired::{PublishTarget, PublishedPort};

/// How long one check may take.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// The outcome of one published port's last check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortCheck {
    pub service: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Unix time of the check, seconds.
    pub checked_at: u64,
}

/// Results by `"<port>/<proto>"`, shared with the status writer.
#[derive(Debug, Clone, Default)]
pub struct SelfTest {
    results: Arc<Mutex<BTreeMap<String, PortCheck>>>,
    running: Arc<Mutex<bool>>,
}

impl SelfTest {
    pub fn results(&self) -> BTreeMap<String, PortCheck> {
        self.results
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Starts checking `ports` on `addr` (the node's advertise address) in the background,
    /// unless a check is still running.
    pub fn start(&self, addr: Ipv4Addr, ports: Vec<PublishedPort>) {
        {
            let mut running = self
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *running {
                return;
            }
            *running = true;
        }
        let results = Arc::clone(&self.results);
        let running = Arc::clone(&self.running);
        let spawned = std::thread::Builder::new()
            .name("netd-selftest".into())
            .spawn(move || {
                let mut out = BTreeMap::new();
                for p in ports {
                    out.insert(format!("{}/{}", p.port, p.proto), check(addr, &p));
                }
                *results
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = out;
                *running
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = false;
            });
        if spawned.is_err() {
            *self
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = false;
        }
    }
}

fn check(addr: Ipv4Addr, p: &PublishedPort) -> PortCheck {
    let checked_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let service = p.service.to_string();
    if p.proto == Protocol::Udp {
        return PortCheck {
            service,
            ok: true,
            error: Some("udp: not testable generically; not checked".into()),
            latency_ms: None,
            checked_at,
        };
    }
    let started = Instant::now();
    if matches!(&p.target, PublishTarget::Local(to) if to.is_empty()) {
        // Local traffic policy and no task here: the port must refuse, at once.
        let outcome =
            TcpStream::connect_timeout(&SocketAddr::V4(SocketAddrV4::new(addr, p.port)), TIMEOUT);
        let refused =
            matches!(&outcome, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
        return PortCheck {
            service,
            ok: refused,
            error: Some(match outcome {
                _ if refused => "no local task (local traffic policy): refused, as it must".into(),
                Ok(_) => "no local task (local traffic policy), yet the port accepted a connection"
                    .into(),
                Err(e) => {
                    format!("no local task (local traffic policy): expected a refusal, got {e}")
                }
            }),
            latency_ms: None,
            checked_at,
        };
    }
    match TcpStream::connect_timeout(&SocketAddr::V4(SocketAddrV4::new(addr, p.port)), TIMEOUT) {
        Ok(_) => PortCheck {
            service,
            ok: true,
            error: None,
            latency_ms: Some(started.elapsed().as_millis() as u64),
            checked_at,
        },
        Err(e) => PortCheck {
            service,
            ok: false,
            error: Some(format!(
                "connect {addr}:{} through the routing mesh: {e}",
                p.port
            )),
            latency_ms: None,
            checked_at,
        },
    }
}
