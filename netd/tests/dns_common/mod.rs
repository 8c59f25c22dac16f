//! Shared helpers of the DNS tests: intents, query builders, answer readers.

#![allow(dead_code, reason = "each test file uses a different subset")]

use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use swarmnet_model::{Intent, TaskId};

/// Networks app (10.10.0.0/24), db (internal), big (/23 with a 300-task DNSRR service).
pub fn intent(big_tasks: usize) -> Intent {
    let mut tasks = vec![
        serde_json::json!({"id": "w1", "service": "web", "slot": 1, "node": "n1", "argv": ["x"],
            "networks": [{"network": "app", "ip": "10.10.0.10", "aliases": ["front"]}]}),
        serde_json::json!({"id": "a1", "service": "api", "slot": 1, "node": "n1", "argv": ["x"],
            "networks": [{"network": "app", "ip": "10.10.0.20"}, {"network": "db", "ip": "10.11.0.20"}]}),
        serde_json::json!({"id": "a2", "service": "api", "slot": 2, "node": "n1", "argv": ["x"],
            "networks": [{"network": "app", "ip": "10.10.0.21"}, {"network": "db", "ip": "10.11.0.21"}]}),
        serde_json::json!({"id": "p1", "service": "pg", "slot": 1, "node": "n1", "argv": ["x"],
            "networks": [{"network": "db", "ip": "10.11.0.30", "aliases": ["primary"]}]}),
        serde_json::json!({"id": "c1", "service": "client", "slot": 1, "node": "n1", "argv": ["x"],
            "networks": [{"network": "big", "ip": "10.20.0.5"}]}),
    ];
    for i in 0..big_tasks {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 20, 0, 10)) + i as u32);
        tasks.push(
            serde_json::json!({"id": format!("b{i}"), "service": "many", "slot": i + 1,
            "node": "n1", "argv": ["x"], "networks": [{"network": "big", "ip": ip.to_string()}]}),
        );
    }
    let doc = serde_json::json!({
        "version": 1,
        "nodes": [{"id": "n1", "addr": "198.18.0.1"}],
        "networks": [
            {"name": "app", "subnet": "10.10.0.0/24", "vni": 4097},
            {"name": "db", "subnet": "10.11.0.0/24", "vni": 4098, "internal": true},
            {"name": "big", "subnet": "10.20.0.0/23", "vni": 4099}
        ],
        "services": [
            {"name": "web", "ports": [{"name": "http", "target": 80}],
             "networks": [{"network": "app", "vip": "10.10.0.2", "aliases": ["www"]}]},
            {"name": "api", "endpoint_mode": "dnsrr", "ports": [{"name": "grpc", "target": 9000}],
             "networks": [{"network": "app"}, {"network": "db"}]},
            {"name": "pg", "networks": [{"network": "db", "vip": "10.11.0.2"}]},
            {"name": "client", "endpoint_mode": "dnsrr", "networks": [{"network": "big"}]},
            {"name": "many", "endpoint_mode": "dnsrr", "networks": [{"network": "big"}]}
        ],
        "tasks": tasks
    });
    Intent::from_json(&doc.to_string()).unwrap()
}

pub fn tid(s: &str) -> TaskId {
    TaskId::new(s).unwrap()
}

/// A query for `name` (as written, case kept) of `qtype`; `edns`: payload and DO.
pub fn query(id: u16, name: &str, qtype: RecordType, edns: Option<(u16, bool)>) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let mut q = Query::query(Name::from_ascii(name).unwrap(), qtype);
    q.set_query_class(DNSClass::IN);
    m.add_query(q);
    if let Some((payload, dnssec_ok)) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        e.set_dnssec_ok(dnssec_ok);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

pub fn parse(b: &[u8]) -> Message {
    Message::from_vec(b).unwrap_or_else(|e| panic!("answer does not parse: {e}: {b:02x?}"))
}

pub fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}
