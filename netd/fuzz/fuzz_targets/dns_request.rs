//! Fuzz target: arbitrary bytes through the resolver's request entry point, over UDP and TCP,
//! with a forwarding and a denying policy. Properties: no panic (including none caught inside
//! hickory's parser), every reply carries the request's ID, UDP replies stay within 4096 bytes.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use swarmnet_model::{Intent, TaskId};
use swarmnet_netd::dns::{
    DenyAnswer, DnsView, ForwardPolicy, Outcome, Responder, Transport, ViewOptions, caught_panics,
};

fn view() -> &'static DnsView {
    static VIEW: OnceLock<DnsView> = OnceLock::new();
    VIEW.get_or_init(|| {
        let intent = Intent::from_json(
            r#"{"version": 1, "nodes": [{"id": "n1", "addr": "198.18.0.1"}],
            "networks": [{"name": "app", "subnet": "10.10.0.0/24", "vni": 4097}],
            "services": [
              {"name": "web", "ports": [{"name": "http", "target": 80}],
               "networks": [{"network": "app", "vip": "10.10.0.2", "aliases": ["www"]}]},
              {"name": "api", "endpoint_mode": "dnsrr", "networks": [{"network": "app"}]}],
            "tasks": [
              {"id": "w1", "service": "web", "slot": 1, "node": "n1", "argv": ["x"],
               "networks": [{"network": "app", "ip": "10.10.0.10"}]},
              {"id": "a1", "service": "api", "slot": 1, "node": "n1", "argv": ["x"],
               "networks": [{"network": "app", "ip": "10.10.0.20"}]},
              {"id": "a2", "service": "api", "slot": 2, "node": "n1", "argv": ["x"],
               "networks": [{"network": "app", "ip": "10.10.0.21"}]}]}"#,
        )
        .expect("fuzz intent is valid");
        DnsView::build(
            &intent,
            &TaskId::new("w1").expect("valid id"),
            &ViewOptions::default(),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let mut r = Responder::with_seed(0);
    let policies = [
        ForwardPolicy::forward(["198.18.1.1:53".parse().expect("addr")]),
        ForwardPolicy::Deny(DenyAnswer::Refused),
    ];
    for p in &policies {
        for t in [Transport::Udp, Transport::Tcp] {
            if let Outcome::Reply(b) = r.answer(view(), p, data, t) {
                assert!(b.len() >= 12);
                assert_eq!(b[..2], data[..2]);
                if t == Transport::Udp {
                    assert!(b.len() <= 4096);
                }
            }
        }
    }
    assert_eq!(caught_panics(), 0);
});
