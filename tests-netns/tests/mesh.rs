//! End-to-end tests of the routing mesh (issue 5) through real netd processes: ports published
//! by services, reached from an outside client on the underlay through every node, including
//! nodes that run no task of the service.
//!
//! The outside client is the underlay namespace itself: its bridge `ul0` gets the address
//! `198.18.<k>.250/24`, so it is a host on the nodes' network that is no node (like the demo).
//! Clients are real (`curl`, `socat`, `nc`); backends are the demo server `swarmnet-whoami`
//! (answers with its task id and the client address it saw) or small Python servers (a UDP echo,
//! a slow stream of a file).
//!
//! Through a node with a task of the service, that task's share is reached straight from the
//! node namespace and the rest through the ingress sandbox (`netd/src/mesh.rs`): the last two
//! tests check the spread and that the direct path follows health and drain.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use swarmnet_tests_netns::gate;
use swarmnet_tests_netns::topo::{self, Answer, CONVERGE_TIMEOUT, Output, Topology, retry};

/// Limit for a published port to answer after the intent that publishes it converged.
const READY: Duration = Duration::from_secs(20);
/// A closed port must refuse at once (a RST, not a timeout).
const REFUSAL: Duration = Duration::from_secs(1);
/// From writing an intent without the service to every node refusing the port: one incremental
/// round (the intent file is polled every 100 ms) with a generous margin for a loaded machine.
const REMOVAL_BOUND: Duration = Duration::from_secs(5);

const INGRESS: &str = "ingress";
const INGRESS_SUBNET: &str = "10.255.0.0/24";
const APP: &str = "app";

// ---------------------------------------------------------------------------------------------
// Helpers

/// A UDP echo on `0.0.0.0:<argv[1]>`: answers every datagram with
/// `task: <id> client: <ip:port> got: <data>`.
const UDP_ECHO_PY: &str = r#"
import os, socket, sys
me = os.environ.get("SWARMNET_TASK_ID", "-")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(f"task: {me} client: {peer[0]}:{peer[1]} got: ".encode() + data, peer)
"#;

/// Serves the file `argv[1]` on TCP port `argv[2]` to every connection, slowly (64 KiB every
/// 60 ms), then closes: a long download.
const SLOW_FILE_PY: &str = r#"
import socket, sys, threading, time
data = open(sys.argv[1], "rb").read()
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", int(sys.argv[2])))
ls.listen(64)
def serve(c):
    try:
        for i in range(0, len(data), 65536):
            c.sendall(data[i:i + 65536])
            time.sleep(0.06)
    except OSError:
        pass
    c.close()
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

fn python_argv(script: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["/usr/bin/python3".to_string(), "-c".into(), script.into()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

/// Node `n<i>`'s address on the ingress network.
fn ingress_ip(i: usize) -> String {
    format!("10.255.0.{}", 100 + i)
}

/// A service with a VIP on the ingress network publishing `ports` (ingress mode unless a port
/// says otherwise).
fn published_service(name: &str, vip: &str, ports: Value) -> Value {
    json!({"name": name, "networks": [{"network": INGRESS, "vip": vip}], "ports": ports})
}

/// A task of `svc` on `node`, attached to `net` with `ip`.
fn task(id: &str, svc: &str, slot: u32, node: &str, net: &str, ip: &str, argv: &[String]) -> Value {
    json!({"id": id, "service": svc, "slot": slot, "node": node, "argv": argv,
           "networks": [{"network": net, "ip": ip}]})
}

/// The cluster intent with the ingress network (every node has its `ingress_ip`), an `app`
/// network, and `services` and `tasks`.
fn mesh_intent(topo: &Topology, services: &[Value], tasks: &[Value]) -> Value {
    let mut b = topo
        .cluster_intent()
        .network_json(
            json!({"name": INGRESS, "subnet": INGRESS_SUBNET, "vni": 4096, "ingress": true}),
        )
        .network(APP, "10.20.0.0/24", 4100);
    for s in services {
        b = b.service_json(s.clone());
    }
    for t in tasks {
        b = b.task_json(t.clone());
    }
    let mut v = b.build();
    for (i, n) in v["nodes"]
        .as_array_mut()
        .expect("nodes is an array")
        .iter_mut()
        .enumerate()
    {
        n["ingress_ip"] = json!(ingress_ip(i + 1));
    }
    v
}

/// Writes `intent` (which must be valid), starts netd everywhere and waits for convergence.
fn start(topo: &mut Topology, intent: &Value) -> Result<()> {
    let verdict = topo.write_intent(intent)?;
    ensure!(verdict.is_none(), "the intent must be valid: {verdict:?}");
    topo.start_netd(&[])?;
    topo.wait_converged(CONVERGE_TIMEOUT)?;
    Ok(())
}

/// Gives the underlay bridge the outside client's address `198.18.<k>.250/24`; returns it.
fn add_outside_client(topo: &Topology) -> Result<String> {
    let addr = format!("198.18.{}.250", topo.k);
    topo::host_cmd(&[
        "ip",
        "-n",
        &topo.underlay_ns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "ul0",
    ])?
    .check()?;
    Ok(addr)
}

fn node_addr(topo: &Topology, node: &str) -> String {
    topo.node(node).addr.to_string()
}

/// Runs a shell script on the outside client (the underlay namespace), at most `timeout`.
fn outside_sh(topo: &Topology, script: &str, timeout: Duration) -> Result<Output> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &topo.underlay_ns, "sh", "-c", script]);
    topo::run(c, None, timeout)
}

/// Runs `n` new connections from the outside client, one `cmd` each (a shell command reading
/// `$T`, the target), in one shell; returns the parsed answers and the raw text of failures.
fn outside_many(
    topo: &Topology,
    n: usize,
    cmd: &str,
    target: &str,
) -> Result<(Vec<Answer>, Vec<String>)> {
    let script = topo::many_script(n, cmd, target);
    let out = outside_sh(topo, &script, Duration::from_secs(10 + 4 * n as u64))?;
    ensure!(out.success(), "the client loop failed: {out}");
    Ok(topo::parse_many(&out.stdout))
}

/// `n` HTTP requests (each a new curl, a new connection) from outside to `addr:port`.
fn curl_many(
    topo: &Topology,
    addr: &str,
    port: u16,
    n: usize,
) -> Result<(Vec<Answer>, Vec<String>)> {
    outside_many(
        topo,
        n,
        "curl -sS -m 3 http://$T/",
        &format!("{addr}:{port}"),
    )
}

/// `n` UDP exchanges (each a new socket) from outside to `addr:port`.
fn udp_many(
    topo: &Topology,
    addr: &str,
    port: u16,
    n: usize,
) -> Result<(Vec<Answer>, Vec<String>)> {
    outside_many(
        topo,
        n,
        "echo ping-$i | socat -t 2 - UDP:$T",
        &format!("{addr}:{port}"),
    )
}

fn by_task(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry(a.task.clone()).or_insert(0) += 1;
    }
    m
}

/// Waits until one HTTP request from outside to `addr:port` is answered; returns the answer.
fn wait_http(topo: &Topology, addr: &str, port: u16) -> Result<Answer> {
    let mut got = None;
    retry(
        &format!("http://{addr}:{port}/ to answer outside"),
        READY,
        || {
            let (a, f) = curl_many(topo, addr, port, 1)?;
            ensure!(a.len() == 1, "{f:?}");
            got = a.into_iter().next();
            Ok(())
        },
    )?;
    got.context("an answer")
}

/// Waits until one UDP exchange from outside to `addr:port` is answered; returns the answer.
fn wait_udp(topo: &Topology, addr: &str, port: u16) -> Result<Answer> {
    let mut got = None;
    retry(
        &format!("udp {addr}:{port} to answer outside"),
        READY,
        || {
            let (a, f) = udp_many(topo, addr, port, 1)?;
            ensure!(a.len() == 1, "{f:?}");
            got = a.into_iter().next();
            Ok(())
        },
    )?;
    got.context("an answer")
}

/// One curl from outside to `addr:port` is refused at once: exit 7 (could not connect), not 28
/// (timeout) nor an answer.
fn check_refused(topo: &Topology, addr: &str, port: u16) -> Result<Duration> {
    let t = Instant::now();
    let out = outside_sh(
        topo,
        &format!("curl -sS -m 5 http://{addr}:{port}/"),
        Duration::from_secs(10),
    )?;
    let took = t.elapsed();
    ensure!(
        out.code == Some(7),
        "{addr}:{port} must refuse (curl exit 7), not time out (28) or answer: {out}"
    );
    ensure!(took < REFUSAL, "the refusal of {addr}:{port} took {took:?}");
    Ok(took)
}

/// The web service of the issue: 2 whoami replicas, on n1 and n2, published on 8080.
fn web(name: &str, vip: &str, published: u16) -> Result<(Value, Vec<Value>)> {
    let argv = topo::whoami_argv()?;
    let svc = published_service(name, vip, json!([{"target": 80, "published": published}]));
    let tasks = vec![
        task(
            &format!("{name}1"),
            name,
            1,
            "n1",
            INGRESS,
            "10.255.0.11",
            &argv,
        ),
        task(
            &format!("{name}2"),
            name,
            2,
            "n2",
            INGRESS,
            "10.255.0.12",
            &argv,
        ),
    ];
    Ok((svc, tasks))
}

/// The mesh's kernel state on `node`, for failure messages only (assertions are on traffic): the
/// node table, the ingress sandbox's rules and conntrack, the ingress network's neighbours.
fn mesh_state(topo: &Topology, node: &str) -> String {
    let n = topo.node(node);
    let run = |ns: PathBuf, args: &[&str]| match topo::run(
        topo::nsenter_cmd(&ns, args),
        None,
        Duration::from_secs(10),
    ) {
        Ok(o) => format!("$ {}\n{}{}", args.join(" "), o.stdout, o.stderr),
        Err(e) => format!("$ {}: {e:#}\n", args.join(" ")),
    };
    let sbox = n.sandbox_netns("ingress-sbox");
    let net = n.network_netns(INGRESS);
    // One connection from outside while the node's interfaces are captured: where the packets
    // of a failing connection stop.
    let capture = |ns: PathBuf| {
        topo::Bg::spawn(
            topo::nsenter_cmd(
                &ns,
                &[
                    "timeout", "4", "tcpdump", "-lnni", "any", "tcp", "and", "not", "port", "4789",
                ],
            ),
            None,
        )
    };
    let caps = [
        capture(n.netns_path()),
        capture(sbox.clone()),
        capture(net.clone()),
    ];
    std::thread::sleep(Duration::from_millis(800));
    let probe = outside_sh(
        topo,
        &format!("curl -sS -m 2 http://{}:8080/", n.addr),
        Duration::from_secs(5),
    );
    let mut captured = format!("$ probe from outside: {probe:?}\n");
    for (what, c) in ["node", "ingress sandbox", "ingress network"]
        .iter()
        .zip(caps)
    {
        match c.and_then(|c| c.wait(Duration::from_secs(6))) {
            Ok(o) => captured += &format!("$ tcpdump in the {what} ns\n{}{}", o.stdout, o.stderr),
            Err(e) => captured += &format!("$ tcpdump in the {what} ns: {e:#}\n"),
        }
    }
    [
        captured,
        run(
            n.netns_path(),
            &["nft", "list", "table", "inet", "swarmnet"],
        ),
        run(n.netns_path(), &["ip", "route"]),
        run(n.netns_path(), &["conntrack", "-L"]),
        run(sbox.clone(), &["nft", "list", "ruleset"]),
        run(sbox.clone(), &["ip", "-br", "addr"]),
        run(sbox.clone(), &["ip", "route"]),
        run(sbox.clone(), &["ip", "neigh"]),
        run(n.netns_path(), &["ip", "-d", "link", "show", "sngw0"]),
        run(sbox.clone(), &["sysctl", "net.ipv4.ip_forward"]),
        run(sbox, &["conntrack", "-L"]),
        run(net.clone(), &["nft", "list", "ruleset"]),
        run(net.clone(), &["conntrack", "-L"]),
        run(net.clone(), &["ip", "neigh"]),
        run(net, &["bridge", "fdb", "show"]),
    ]
    .join("")
}

fn all_nodes(topo: &Topology) -> Vec<(String, String)> {
    topo.nodes
        .iter()
        .map(|n| (n.id.clone(), n.addr.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn a_published_port_answers_on_every_node_and_spreads_over_both_replicas() {
    if !gate::privileged("a_published_port_answers_on_every_node_and_spreads_over_both_replicas") {
        return;
    }
    topo::with_topology(3, |topo| {
        let (svc, tasks) = web("web", "10.255.0.2", 8080)?;
        start(topo, &mesh_intent(topo, &[svc], &tasks))?;
        add_outside_client(topo)?;
        for (node, addr) in all_nodes(topo) {
            wait_http(topo, &addr, 8080)?;
            let (answers, failed) = curl_many(topo, &addr, 8080, 30)?;
            ensure!(
                failed.is_empty(),
                "{} of 30 connections to {node} ({addr}:8080) failed: {failed:#?}",
                failed.len()
            );
            let counts = by_task(&answers);
            let peers: BTreeSet<&str> = answers.iter().map(|a| a.client_ip.as_str()).collect();
            eprintln!("30 connections to {node} ({addr}:8080): {counts:?}, seen as {peers:?}");
            ensure!(
                counts.keys().map(String::as_str).collect::<BTreeSet<_>>()
                    == BTreeSet::from(["web1", "web2"]),
                "connections through {node} must reach both replicas: {counts:?}"
            );
        }
        Ok(())
    });
}

#[test]
fn a_udp_published_port_answers_on_every_node() {
    if !gate::privileged("a_udp_published_port_answers_on_every_node") {
        return;
    }
    topo::with_topology(3, |topo| {
        let argv = python_argv(UDP_ECHO_PY, &["7000"]);
        let svc = published_service(
            "echo",
            "10.255.0.3",
            json!([{"target": 7000, "published": 5300, "protocol": "udp"}]),
        );
        let tasks = [
            task("echo1", "echo", 1, "n1", INGRESS, "10.255.0.21", &argv),
            task("echo2", "echo", 2, "n2", INGRESS, "10.255.0.22", &argv),
        ];
        start(topo, &mesh_intent(topo, &[svc], &tasks))?;
        add_outside_client(topo)?;
        for (node, addr) in all_nodes(topo) {
            wait_udp(topo, &addr, 5300)?;
            let (answers, failed) = udp_many(topo, &addr, 5300, 10)?;
            ensure!(
                failed.is_empty(),
                "{} of 10 UDP exchanges with {node} ({addr}:5300) failed: {failed:#?}",
                failed.len()
            );
            let counts = by_task(&answers);
            eprintln!("10 UDP flows to {node} ({addr}:5300): {counts:?}");
            ensure!(
                counts.keys().all(|t| t.starts_with("echo")),
                "UDP through {node} must reach the echo tasks: {counts:?}"
            );
        }
        Ok(())
    });
}

#[test]
fn a_removed_service_closes_its_port_on_every_node_and_another_can_publish_it() {
    if !gate::privileged(
        "a_removed_service_closes_its_port_on_every_node_and_another_can_publish_it",
    ) {
        return;
    }
    topo::with_topology(3, |topo| {
        let (svc, tasks) = web("web", "10.255.0.2", 8080)?;
        start(topo, &mesh_intent(topo, &[svc], &tasks))?;
        add_outside_client(topo)?;
        for (_, addr) in all_nodes(topo) {
            wait_http(topo, &addr, 8080)?;
        }

        // The service goes (its tasks with it): the port must refuse on every node.
        topo.write_intent(mesh_intent(topo, &[], &[]))?;
        let written = Instant::now();
        for (node, addr) in all_nodes(topo) {
            retry(
                &format!("{node} ({addr}:8080) to refuse after the service was removed"),
                REMOVAL_BOUND.saturating_sub(written.elapsed()),
                || check_refused(topo, &addr, 8080).map(drop),
            )?;
        }
        eprintln!(
            "8080 refused on every node {:?} after the intent without `web` was written",
            written.elapsed()
        );
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        for (_, addr) in all_nodes(topo) {
            check_refused(topo, &addr, 8080)?;
        }

        // Another service publishes the same port, with one task on n3.
        let argv = topo::whoami_argv()?;
        let other = published_service(
            "other",
            "10.255.0.4",
            json!([{"target": 80, "published": 8080}]),
        );
        let t = task("other1", "other", 1, "n3", INGRESS, "10.255.0.31", &argv);
        topo.write_intent(mesh_intent(topo, &[other], &[t]))?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        for (node, addr) in all_nodes(topo) {
            let a = wait_http(topo, &addr, 8080)
                .with_context(|| format!("mesh state on {node}:\n{}", mesh_state(topo, &node)))?;
            ensure!(
                a.task == "other1",
                "8080 on {node} must now be served by `other`: {a:?}"
            );
        }
        Ok(())
    });
}

#[test]
fn host_mode_answers_only_where_a_task_runs_and_keeps_the_client_address() {
    if !gate::privileged("host_mode_answers_only_where_a_task_runs_and_keeps_the_client_address") {
        return;
    }
    topo::with_topology(3, |topo| {
        let argv = topo::whoami_argv()?;
        let svc = json!({"name": "hweb", "networks": [{"network": APP}],
                         "ports": [{"target": 80, "published": 8081, "publish_mode": "host"}]});
        let tasks = [
            task("hweb1", "hweb", 1, "n1", APP, "10.20.0.11", &argv),
            task("hweb2", "hweb", 2, "n2", APP, "10.20.0.12", &argv),
        ];
        start(topo, &mesh_intent(topo, &[svc], &tasks))?;
        let outside = add_outside_client(topo)?;
        for (node, want) in [("n1", "hweb1"), ("n2", "hweb2")] {
            let addr = node_addr(topo, node);
            wait_http(topo, &addr, 8081)?;
            let (answers, failed) = curl_many(topo, &addr, 8081, 10)?;
            ensure!(
                failed.is_empty(),
                "connections to {node} ({addr}:8081) failed: {failed:#?}"
            );
            for a in &answers {
                ensure!(
                    a.task == want,
                    "host mode on {node} must go to the local task {want}: {a:?}"
                );
                ensure!(
                    a.client_ip == outside,
                    "host mode must keep the client's address {outside}: the task saw {a:?}"
                );
            }
        }
        let addr = node_addr(topo, "n3");
        check_refused(topo, &addr, 8081)?;
        Ok(())
    });
}

#[test]
fn local_traffic_policy_serves_from_local_tasks_with_the_client_address_and_refuses_elsewhere() {
    if !gate::privileged(
        "local_traffic_policy_serves_from_local_tasks_with_the_client_address_and_refuses_elsewhere",
    ) {
        return;
    }
    topo::with_topology(3, |topo| {
        let argv = topo::whoami_argv()?;
        // Two tasks on n1, one on n2, none on n3; attached to the ingress network like any
        // ingress-published service, so only the policy differs from the routing mesh.
        let svc = published_service(
            "lweb",
            "10.255.0.2",
            json!([{"target": 80, "published": 8082, "traffic_policy": "local"}]),
        );
        let tasks = [
            task("lweb1", "lweb", 1, "n1", INGRESS, "10.255.0.11", &argv),
            task("lweb2", "lweb", 2, "n1", INGRESS, "10.255.0.12", &argv),
            task("lweb3", "lweb", 3, "n2", INGRESS, "10.255.0.13", &argv),
        ];
        start(topo, &mesh_intent(topo, &[svc], &tasks))?;
        let outside = add_outside_client(topo)?;
        for (node, want) in [("n1", &["lweb1", "lweb2"][..]), ("n2", &["lweb3"][..])] {
            let addr = node_addr(topo, node);
            wait_http(topo, &addr, 8082)?;
            let (answers, failed) = curl_many(topo, &addr, 8082, 30)?;
            ensure!(
                failed.is_empty(),
                "connections to {node} ({addr}:8082) failed: {failed:#?}\n{}",
                mesh_state(topo, node)
            );
            let seen = by_task(&answers);
            ensure!(
                seen.keys().map(String::as_str).eq(want.iter().copied()),
                "the local policy on {node} must spread over its own tasks {want:?} only: {seen:?}"
            );
            for a in &answers {
                ensure!(
                    a.client_ip == outside,
                    "the local policy must keep the client's address {outside}: the task saw {a:?}"
                );
            }
        }
        // n3 runs no task: it refuses at once rather than forwarding or timing out.
        let addr = node_addr(topo, "n3");
        check_refused(topo, &addr, 8082)?;
        Ok(())
    });
}

#[test]
fn a_duplicate_publish_is_rejected_naming_the_other_service_and_the_same_port_on_udp_is_not() {
    if !gate::privileged(
        "a_duplicate_publish_is_rejected_naming_the_other_service_and_the_same_port_on_udp_is_not",
    ) {
        return;
    }
    topo::with_topology(3, |topo| {
        let (svc, tasks) = web("web", "10.255.0.2", 8080)?;
        start(topo, &mesh_intent(topo, std::slice::from_ref(&svc), &tasks))?;
        add_outside_client(topo)?;
        for (_, addr) in all_nodes(topo) {
            wait_http(topo, &addr, 8080)?;
        }

        // `api` also publishes 8080/tcp: refused, naming `web`.
        let echo_argv = python_argv(UDP_ECHO_PY, &["7000"]);
        let api = |protocol: &str| {
            published_service(
                "api",
                "10.255.0.5",
                json!([{"target": 7000, "published": 8080, "protocol": protocol}]),
            )
        };
        let api_task = task("api1", "api", 1, "n3", INGRESS, "10.255.0.41", &echo_argv);
        let mut with_api = tasks.clone();
        with_api.push(api_task);
        let dup = mesh_intent(topo, &[svc.clone(), api("tcp")], &with_api);
        let verdict = topo.write_intent(&dup)?;
        let needle = "8080/tcp is already published by service \"web\"";
        ensure!(
            verdict.as_deref().is_some_and(|v| v.contains(needle)),
            "the model must refuse the duplicate naming `web`: {verdict:?}"
        );
        let errors = topo.wait_intent_error(needle, CONVERGE_TIMEOUT)?;
        eprintln!("intent errors: {errors:#?}");
        // The previous intent stays in force: the port still answers, from `web`.
        for (node, addr) in all_nodes(topo) {
            let (answers, failed) = curl_many(topo, &addr, 8080, 5)?;
            ensure!(
                failed.is_empty() && answers.iter().all(|a| a.task.starts_with("web")),
                "8080 on {node} must still be served by `web`: {answers:?} {failed:#?}"
            );
        }

        // The same number on UDP is another port: accepted, and both answer.
        let ok = mesh_intent(topo, &[svc, api("udp")], &with_api);
        let verdict = topo.write_intent(&ok)?;
        ensure!(
            verdict.is_none(),
            "8080/udp beside 8080/tcp is valid: {verdict:?}"
        );
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        for (node, addr) in all_nodes(topo) {
            let a = wait_udp(topo, &addr, 8080)?;
            ensure!(a.task == "api1", "8080/udp on {node} must be `api`: {a:?}");
            let a = wait_http(topo, &addr, 8080)?;
            ensure!(
                a.task.starts_with("web"),
                "8080/tcp on {node} must still be `web`: {a:?}"
            );
        }
        Ok(())
    });
}

/// Deterministic pseudo-random bytes (xorshift64), so a corrupted download cannot match.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn sha256(path: &Path) -> Result<String> {
    let out = topo::host_cmd(&["sha256sum", &path.to_string_lossy()])?.check()?;
    Ok(out
        .stdout
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

#[test]
fn a_download_through_a_published_port_survives_a_netd_restart_on_the_entry_node() {
    if !gate::privileged(
        "a_download_through_a_published_port_survives_a_netd_restart_on_the_entry_node",
    ) {
        return;
    }
    // Through n3 (no task): the ingress sandbox path.
    download_survives_a_netd_restart_on("n3");
}

#[test]
fn a_download_through_the_node_with_the_task_survives_a_netd_restart_there() {
    if !gate::privileged("a_download_through_the_node_with_the_task_survives_a_netd_restart_there")
    {
        return;
    }
    // Through n1, which runs the task: the direct path from the node namespace.
    download_survives_a_netd_restart_on("n1");
}

/// A long download from outside through `entry`'s published port to the task on n1, with
/// netd on `entry` restarted in the middle: it completes, byte for byte.
fn download_survives_a_netd_restart_on(entry_node: &str) {
    topo::with_topology(3, |topo| {
        // 8 MiB in 64 KiB steps every 60 ms: about 8 s, through `entry_node` to the task on n1.
        let big = topo.dir.join("big");
        fs::write(&big, noise(8 << 20, 0x5eed))?;
        let want = sha256(&big)?;
        let argv = python_argv(SLOW_FILE_PY, &[&big.to_string_lossy(), "9000"]);
        let svc = published_service(
            "files",
            "10.255.0.6",
            json!([{"target": 9000, "published": 9000}]),
        );
        let t = task("files1", "files", 1, "n1", INGRESS, "10.255.0.51", &argv);
        start(topo, &mesh_intent(topo, &[svc], &[t]))?;
        add_outside_client(topo)?;
        let entry = node_addr(topo, entry_node);
        retry(&format!("{entry}:9000 to accept outside"), READY, || {
            outside_sh(
                topo,
                &format!("nc -z -w 1 {entry} 9000"),
                Duration::from_secs(5),
            )?
            .check()
            .map(drop)
        })?;

        let got = topo.dir.join("got");
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &topo.underlay_ns,
            "sh",
            "-c",
            &format!("socat -u TCP:{entry}:9000 - > {}", got.display()),
        ]);
        let mut download = topo::Bg::spawn(c, None)?;
        retry("the download to start", Duration::from_secs(5), || {
            let len = fs::metadata(&got).map(|m| m.len()).unwrap_or(0);
            ensure!(len > 0, "nothing received yet");
            Ok(())
        })?;
        std::thread::sleep(Duration::from_millis(500));
        ensure!(
            !download.exited(),
            "the download ended before the restart: make it longer"
        );
        let at_restart = fs::metadata(&got)?.len();
        topo.node_mut(entry_node).restart_netd()?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        let after_converged = fs::metadata(&got)?.len();
        eprintln!(
            "netd on {entry_node} restarted with {at_restart} bytes received; converged again at {after_converged}"
        );
        let out = download.wait(Duration::from_secs(60))?;
        ensure!(out.success(), "the download failed: {out}");
        let len = fs::metadata(&got)?.len();
        ensure!(
            len == 8 << 20,
            "the download is {len} bytes, not {}",
            8 << 20
        );
        ensure!(
            sha256(&got)? == want,
            "the downloaded file differs from the served one"
        );
        Ok(())
    });
}

#[test]
fn a_published_port_on_the_node_loopback_refuses() {
    if !gate::privileged("a_published_port_on_the_node_loopback_refuses") {
        return;
    }
    topo::with_topology(1, |topo| {
        let argv = topo::whoami_argv()?;
        let svc = published_service(
            "web",
            "10.255.0.2",
            json!([{"target": 80, "published": 8080}]),
        );
        let t = task("web1", "web", 1, "n1", INGRESS, "10.255.0.11", &argv);
        start(topo, &mesh_intent(topo, &[svc], &[t]))?;
        add_outside_client(topo)?;
        let addr = node_addr(topo, "n1");
        // Positive control: the port is published and answers from outside.
        wait_http(topo, &addr, 8080)?;
        // Documented: no route_localnet, so 127.0.0.1:8080 is not served; it refuses at once.
        let t = Instant::now();
        let out = topo
            .node("n1")
            .exec(&["curl", "-sS", "-m", "5", "http://127.0.0.1:8080/"])?;
        let took = t.elapsed();
        ensure!(
            out.code == Some(7),
            "127.0.0.1:8080 on the node must refuse (curl exit 7): {out}"
        );
        ensure!(took < REFUSAL, "the loopback refusal took {took:?}");
        Ok(())
    });
}

/// Through a node that runs a task of the service, new connections are spread over the local
/// task (reached straight from the node namespace, so it sees the client's own address) and
/// the remote ones (through the ingress sandbox, seen as that sandbox's address): every
/// healthy task keeps its share, wherever it runs.
#[test]
fn a_node_with_a_local_task_spreads_over_local_and_remote_tasks() {
    if !gate::privileged("a_node_with_a_local_task_spreads_over_local_and_remote_tasks") {
        return;
    }
    topo::with_topology(3, |topo| {
        let argv = topo::whoami_argv()?;
        let svc = published_service(
            "web",
            "10.255.0.2",
            json!([{"target": 80, "published": 8080}]),
        );
        let tasks = [
            task("web1", "web", 1, "n1", INGRESS, "10.255.0.11", &argv),
            task("web2", "web", 2, "n2", INGRESS, "10.255.0.12", &argv),
            task("web3", "web", 3, "n3", INGRESS, "10.255.0.13", &argv),
        ];
        start(topo, &mesh_intent(topo, &[svc], &tasks))?;
        let client = add_outside_client(topo)?;
        let n1 = node_addr(topo, "n1");
        wait_http(topo, &n1, 8080)?;
        let (answers, failed) = curl_many(topo, &n1, 8080, 60)?;
        ensure!(
            failed.is_empty(),
            "{} of 60 connections through n1 failed: {failed:#?}\n{}",
            failed.len(),
            mesh_state(topo, "n1")
        );
        let counts = by_task(&answers);
        eprintln!("60 connections through n1 (runs web1): {counts:?}");
        ensure!(
            counts.keys().map(String::as_str).collect::<BTreeSet<_>>()
                == BTreeSet::from(["web1", "web2", "web3"]),
            "the local task and both remote ones must be reached: {counts:?}"
        );
        // A third each on average (binomial, sd ≈ 3.7): far outside this band only if the local
        // task got no share of its own or every share.
        let local = counts["web1"];
        ensure!(
            (6..=40).contains(&local),
            "the local task's share of 60 is about 20: {counts:?}"
        );
        for a in &answers {
            let want = if a.task == "web1" {
                client.clone()
            } else {
                ingress_ip(1)
            };
            ensure!(
                a.client_ip == want,
                "{} must see {want} (local: the client; remote: n1's ingress sandbox): {a:?}",
                a.task
            );
        }
        check_ipvs_in_the_ingress_sandbox(topo)
    });
}

/// Where the kernel has IPVS (the VM lane: `--lb auto` picks it), n1's ingress sandbox
/// balances the web VIP (10.255.0.2:80) with IPVS: web2 and web3 (remote) take new
/// connections, web1 (local, reached straight from the node) is a weight-0 destination.
/// Without IPVS (this host) the sandbox balances with nftables and there is nothing to read,
/// unless the lane requires IPVS.
fn check_ipvs_in_the_ingress_sandbox(topo: &Topology) -> Result<()> {
    let sbox = topo.node("n1").sandbox_netns("ingress-sbox");
    let out = topo::run(
        topo::nsenter_cmd(&sbox, &["cat", "/proc/net/ip_vs"]),
        None,
        Duration::from_secs(10),
    )?;
    if !out.success() {
        ensure!(
            !swarmnet_tests_netns::vm::ipvs_required(),
            "IPVS is required here, but n1's ingress sandbox has no /proc/net/ip_vs: {out}"
        );
        eprintln!("no IPVS in this kernel: the ingress sandbox balances with nftables");
        return Ok(());
    }
    // /proc/net/ip_vs: a service line `TCP  0AFF0002:0050 rr`, then its destinations
    // `  -> 0AFF000B:0050      Masq    0      0          0` (address, forward, weight, ...).
    let mut weights = BTreeMap::new();
    let mut in_web = false;
    for line in out.stdout.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["->", dest, _fwd, weight, ..] if in_web => {
                weights.insert(dest.to_string(), weight.to_string());
            }
            [proto, addr, ..] if *proto == "TCP" || *proto == "UDP" => {
                in_web = *proto == "TCP" && *addr == "0AFF0002:0050";
            }
            _ => {}
        }
    }
    eprintln!("IPVS in n1's ingress sandbox, 10.255.0.2:80 destinations: {weights:?}");
    let want: BTreeMap<String, String> = [
        ("0AFF000B:0050", "0"),
        ("0AFF000C:0050", "1"),
        ("0AFF000D:0050", "1"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    ensure!(
        weights == want,
        "IPVS in n1's ingress sandbox must hold web2 and web3 at weight 1 and the local web1 at \
         weight 0: {weights:?}\n{}",
        out.stdout
    );
    Ok(())
}

/// The local task's direct path follows health and drain: a local task whose check fails, and
/// one that drains, gets no new connection through its node (the remote one takes them all);
/// a passing check brings it back.
#[test]
fn an_unhealthy_or_draining_local_task_gets_no_new_connections_through_its_node() {
    if !gate::privileged(
        "an_unhealthy_or_draining_local_task_gets_no_new_connections_through_its_node",
    ) {
        return;
    }
    topo::with_topology(2, |topo| {
        let flags = topo.dir.join("health-flags");
        fs::create_dir_all(&flags)?;
        fs::write(flags.join("ok-web1"), "")?;
        fs::write(flags.join("ok-web2"), "")?;
        let argv = topo::whoami_argv()?;
        let check = format!("test -f {}/ok-$SWARMNET_TASK_ID", flags.display());
        let mut svc = published_service(
            "web",
            "10.255.0.2",
            json!([{"target": 80, "published": 8080}]),
        );
        svc["health"] = json!({"cmd": ["/bin/sh", "-c", check], "interval": "300ms",
                               "timeout": "2s", "retries": 2});
        let tasks = vec![
            task("web1", "web", 1, "n1", INGRESS, "10.255.0.11", &argv),
            task("web2", "web", 2, "n2", INGRESS, "10.255.0.12", &argv),
        ];
        start(topo, &mesh_intent(topo, &[svc.clone()], &tasks))?;
        add_outside_client(topo)?;
        let n1 = node_addr(topo, "n1");
        // Both serve through n1 once both checks passed.
        retry("web1 and web2 through n1", READY, || {
            let (a, f) = curl_many(topo, &n1, 8080, 20)?;
            ensure!(f.is_empty(), "{f:?}");
            let counts = by_task(&a);
            ensure!(counts.len() == 2, "{counts:?}");
            Ok(())
        })?;
        // web1's check fails: its node stops sending it new connections.
        fs::remove_file(flags.join("ok-web1"))?;
        only_web2(topo, &n1, "web1 unhealthy")?;
        // It passes again: back.
        fs::write(flags.join("ok-web1"), "")?;
        retry("web1 back through n1", READY, || {
            let (a, f) = curl_many(topo, &n1, 8080, 20)?;
            ensure!(f.is_empty(), "{f:?}");
            ensure!(by_task(&a).contains_key("web1"), "{:?}", by_task(&a));
            Ok(())
        })?;

        // web1 drains (the first phase of its removal): no new connection through n1.
        let mut draining = tasks.clone();
        draining[0]["desired_state"] = json!("draining");
        topo.write_intent(mesh_intent(topo, &[svc], &draining))?;
        only_web2(topo, &n1, "web1 draining")?;
        Ok(())
    });
}

/// Only web2 serves through `n1`: every connection of a batch of 20 (each a new one), waited
/// for, then once more (not a lucky batch).
fn only_web2(topo: &Topology, n1: &str, what: &str) -> Result<()> {
    let took = retry(&format!("{what}: only web2 through n1"), READY, || {
        let (a, f) = curl_many(topo, n1, 8080, 20)?;
        ensure!(f.is_empty(), "{f:?}");
        let counts = by_task(&a);
        ensure!(counts.keys().all(|t| t == "web2"), "{counts:?}");
        Ok(())
    })?;
    eprintln!("{what}: only web2 through n1 after {took:?}");
    let (a, f) = curl_many(topo, n1, 8080, 20)?;
    ensure!(f.is_empty(), "{what}: {f:?}");
    let counts = by_task(&a);
    ensure!(
        counts.keys().all(|t| t == "web2"),
        "{what}: web1 must get no new connection: {counts:?}"
    );
    Ok(())
}
