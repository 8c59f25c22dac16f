//! End-to-end tests of netd's task runtime: a crashed task process is restarted in the same
//! sandbox; an external runtime's namespace is plugged in and out through the attach API.
//! Real clients only (`ping`, `ip`, `kill`, `swarmnet-netd attach`), waits on conditions.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::json;
use swarmnet_tests_netns::gate;
use swarmnet_tests_netns::topo::{
    self, Bg, CMD_TIMEOUT, CONVERGE_TIMEOUT, NETNS_DIR, nsenter_cmd, retry,
};

const SLEEP: &[&str] = &["sleep", "infinity"];
const REACH: Duration = Duration::from_secs(20);

fn ping(netns: &Path, ip: &str) -> Result<()> {
    let out = topo::run(
        nsenter_cmd(netns, &["ping", "-c", "1", "-W", "1", ip]),
        None,
        CMD_TIMEOUT,
    )?;
    ensure!(
        out.success(),
        "ping {ip} from {} failed: {out}",
        netns.display()
    );
    Ok(())
}

fn attach_cmd(run_dir: &Path, args: &[&str]) -> Result<topo::Output> {
    let mut cmd = std::process::Command::new(topo::netd_binary()?);
    cmd.arg("--run-dir").arg(run_dir).args(args);
    topo::run(cmd, None, CMD_TIMEOUT)
}

#[test]
fn a_crashed_task_is_restarted_in_its_sandbox() {
    if !gate::privileged("a_crashed_task_is_restarted_in_its_sandbox") {
        return;
    }
    topo::with_topology(2, |topo| {
        let intent = topo
            .cluster_intent()
            .network("app", "10.10.0.0/24", 4097)
            .task("a1", "web", "n1", &[("app", "10.10.0.2")], SLEEP)
            .task("b1", "web", "n2", &[("app", "10.10.0.3")], SLEEP)
            .build();
        topo.write_intent(&intent)?;
        topo.start_netd(&[])?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        let sandbox = topo.node("n1").sandbox_netns("a1");
        let before = topo::pids_in_netns(&sandbox);
        ensure!(
            before.len() == 1,
            "expected one process in a1's sandbox: {before:?}"
        );
        // The task dies (netd started it; we end it by its pid, as a crash would).
        topo::host_cmd(&["kill", "-9", &before[0].to_string()])?.check()?;
        retry("netd restarts a1 with a new process", REACH, || {
            let now = topo::pids_in_netns(&sandbox);
            ensure!(
                now.len() == 1 && now != before,
                "processes in a1's sandbox: {now:?}"
            );
            Ok(())
        })?;
        // Same sandbox, same address: still reachable from the other node.
        retry("b1 reaches a1 after the restart", REACH, || {
            ping(&topo.node("n2").sandbox_netns("b1"), "10.10.0.2")
        })?;
        Ok(())
    });
}

#[test]
fn an_external_runtime_attaches_and_detaches_its_namespace() {
    if !gate::privileged("an_external_runtime_attaches_and_detaches_its_namespace") {
        return;
    }
    topo::with_topology(2, |topo| {
        let mut intent = topo
            .cluster_intent()
            .network("app", "10.10.0.0/24", 4097)
            .task("b1", "web", "n2", &[("app", "10.10.0.3")], SLEEP)
            .task("ext1", "web", "n1", &[("app", "10.10.0.7")], &[])
            .build();
        for t in intent["tasks"].as_array_mut().expect("tasks") {
            if t["id"] == "ext1" {
                t["runtime"] = json!("external");
                t.as_object_mut().expect("object").remove("argv");
            }
        }
        topo.write_intent(&intent)?;
        topo.start_netd(&[])?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;

        // The "container runtime": its own namespace with a process holding it.
        let name = format!("{}-ext", topo.name);
        topo::netns_add(&name)?;
        let ns = Path::new(NETNS_DIR).join(&name);
        let mut container = Bg::spawn(nsenter_cmd(&ns, &["sleep", "infinity"]), None)?;
        let run_dir = topo.node("n1").run_dir.clone();

        // Refusals name what is wrong.
        let wrong = attach_cmd(&run_dir, &["attach", "b1", ns.to_str().expect("utf-8")])?;
        ensure!(
            !wrong.success() && wrong.stderr.contains("not on this node"),
            "{wrong}"
        );
        let missing = attach_cmd(&run_dir, &["attach", "ext1", "/nonexistent/ns"])?;
        ensure!(
            !missing.success() && missing.stderr.contains("does not exist"),
            "{missing}"
        );

        let ok = attach_cmd(&run_dir, &["attach", "ext1", ns.to_str().expect("utf-8")])?;
        ensure!(ok.success(), "attach failed: {ok}");
        let addr = topo::run(
            nsenter_cmd(&ns, &["ip", "-o", "-4", "addr", "show", "eth0"]),
            None,
            CMD_TIMEOUT,
        )?;
        ensure!(
            addr.stdout.contains("10.10.0.7/24"),
            "eth0 of the attached namespace: {addr}"
        );
        retry("the attached container reaches b1 on n2", REACH, || {
            ping(&ns, "10.10.0.3")
        })?;
        retry("b1 reaches the attached container", REACH, || {
            ping(&topo.node("n2").sandbox_netns("b1"), "10.10.0.7")
        })?;

        let off = attach_cmd(&run_dir, &["detach", "ext1"])?;
        ensure!(off.success(), "detach failed: {off}");
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        retry(
            "the container's interfaces are gone, the namespace lives on",
            REACH,
            || {
                let links = topo::run(nsenter_cmd(&ns, &["ip", "-o", "link"]), None, CMD_TIMEOUT)?;
                ensure!(links.success(), "the runtime's namespace is gone: {links}");
                ensure!(
                    !links.stdout.contains("eth0"),
                    "eth0 is still there: {links}"
                );
                Ok(())
            },
        )?;
        ensure!(
            !container.exited(),
            "the container's process died on detach"
        );
        ensure!(
            !topo
                .node("n1")
                .netns_files()?
                .iter()
                .any(|f| f == "sb-ext1"),
            "netd still holds a reference to the detached namespace"
        );
        drop(container);
        Ok(())
    });
}
