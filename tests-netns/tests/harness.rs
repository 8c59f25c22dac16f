//! Tests of the netns harness itself (no real netd needed): the underlay works, a netd is
//! started in its node namespace and cgroup, convergence waits cannot pass on stale status, and
//! nothing is left behind by teardown or escapes the sweep.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use swarmnet_tests_netns::gate;
use swarmnet_tests_netns::topo::{self, Topology, host_cmd, retry};

/// A stand-in for netd: records where it runs, starts one "task" in its cgroup dir, and writes a
/// converged status.json whose generation rises whenever the intent file's content changes.
const FAKE_NETD: &str = r#"#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in
    --node-id) NODE="$2"; shift;;
    --intent) INTENT="$2"; shift;;
    --run-dir) RUN="$2"; shift;;
    --cgroup-dir) CG="$2"; shift;;
  esac
  shift
done
readlink /proc/self/ns/net > "$RUN/fake-netns"
cat /proc/self/cgroup > "$RUN/fake-cgroup"
mkdir -p "$CG/task-t1"
sh -c "echo \$\$ > '$CG/task-t1/cgroup.procs'; exec sleep 600" &
gen=0; last=""; i=0
while [ $i -lt 6000 ]; do
  cur=$(sha256sum < "$INTENT")
  if [ "$cur" != "$last" ]; then gen=$((gen+1)); last="$cur"; fi
  printf '{"node":"%s","pid":%d,"round":%d,"full":true,"intent_generation":%d,"intent_error":null,"converged":true,"objects":{}}' \
    "$NODE" $$ $i $gen > "$RUN/status.tmp" && mv "$RUN/status.tmp" "$RUN/status.json"
  sleep 0.1
  i=$((i+1))
done
"#;

fn fake_netd(topo: &Topology) -> Result<PathBuf> {
    let path = topo.dir.join("fake-netd.sh");
    fs::write(&path, FAKE_NETD)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

fn root_links() -> Result<Vec<String>> {
    let out = host_cmd(&["ip", "-o", "link", "show"])?.check()?.stdout;
    let mut names: Vec<String> = out
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    Ok(names)
}

#[test]
fn underlay_connects_nodes_and_teardown_leaves_nothing() -> Result<()> {
    if !gate::privileged("underlay_connects_nodes_and_teardown_leaves_nothing") {
        return Ok(());
    }
    let before = root_links()?;
    let mut topo = Topology::new(3)?;
    let name = topo.name.clone();
    assert!(
        name.starts_with(&format!("snt{}x", std::process::id())),
        "{name}"
    );
    let n1 = topo.node("n1");
    let link = n1.exec_ok(&["ip", "-o", "link", "show", "eth0"])?;
    assert!(link.contains("mtu 1500"), "{link}");
    for peer in ["n2", "n3"] {
        let addr = topo.node(peer).addr.to_string();
        retry(
            &format!("n1 pings {peer} ({addr}) over the underlay"),
            Duration::from_secs(10),
            || {
                n1.exec(&["ping", "-c", "1", "-W", "1", &addr])?
                    .check()
                    .map(drop)
            },
        )?;
    }
    assert_eq!(root_links()?, before, "the root namespace's links changed");
    assert!(
        !topo::leftovers(&name).is_empty(),
        "leftovers() sees a live topology"
    );

    let notes = topo.cleanup();
    assert!(notes.is_empty(), "cleanup had to force things: {notes:?}");
    assert_eq!(topo::leftovers(&name), Vec::<String>::new());
    Ok(())
}

#[test]
fn fake_netd_runs_in_node_namespace_and_cgroup() -> Result<()> {
    if !gate::privileged("fake_netd_runs_in_node_namespace_and_cgroup") {
        return Ok(());
    }
    let mut topo = Topology::new(2)?;
    let name = topo.name.clone();
    let fake = fake_netd(&topo)?;
    let intent = topo.cluster_intent().build();
    assert_eq!(
        topo.write_intent(&intent)?,
        None,
        "the builder's empty intent is valid"
    );
    let path = topo.intent_path.clone();
    for n in &mut topo.nodes {
        n.spawn_netd_bin(&fake, &path, &[])?;
    }
    let st = topo.wait_converged(Duration::from_secs(20))?;
    assert_eq!(st.len(), 2);

    for n in &topo.nodes {
        let ino = fs::metadata(n.netns_path())?.ino();
        let seen = fs::read_to_string(n.run_dir.join("fake-netns"))?;
        assert_eq!(
            seen.trim(),
            format!("net:[{ino}]"),
            "netd must run in {}",
            n.netns
        );
        let cg = fs::read_to_string(n.run_dir.join("fake-cgroup"))?;
        assert!(
            cg.contains(&format!("swarmnet-test/{name}/netd-{}", n.id)),
            "{cg}"
        );
    }

    // A new valid intent: the old status (generation 1) must not count as converged.
    let intent2 = topo
        .cluster_intent()
        .network("app", "10.10.0.0/24", 4097)
        .build();
    topo.write_intent(&intent2)?;
    let st = topo.wait_converged(Duration::from_secs(20))?;
    assert!(st.values().all(|s| s.intent_generation >= 2), "{st:?}");

    // An invalid intent is reported as such and does not raise the expected generation.
    let verdict = topo.write_intent(r#"{"version": 1, "bogus": 1}"#)?;
    assert!(
        verdict.as_deref().is_some_and(|e| e.contains("bogus")),
        "{verdict:?}"
    );
    // The fake counts every content change, valid or not (the real netd counts valid ones):
    // wait until both saw the invalid file, or rewriting intent2 below could look unchanged to
    // one that never polled in between, and its generation would never rise.
    for n in &topo.nodes {
        retry(
            &format!("fake netd on {} to see the invalid intent", n.id),
            Duration::from_secs(20),
            || {
                let g = n.status()?.context("status")?.intent_generation;
                anyhow::ensure!(g >= 3, "intent_generation {g}");
                Ok(())
            },
        )?;
    }

    // Restart: the status of the killed process is stale until the new one writes.
    let old = topo.node("n1").netd_pid();
    topo.node_mut("n1").restart_netd()?;
    assert_ne!(topo.node("n1").netd_pid(), old);
    topo.write_intent(&intent2)?;
    topo.wait_converged(Duration::from_secs(20))?;
    let st = topo.node("n1").status()?.context("status")?;
    assert_eq!(Some(st.pid), topo.node("n1").netd_pid());

    topo.node_mut("n2").kill_netd(Signal::SIGTERM)?;
    assert_eq!(topo.node("n2").netd_pid(), None);

    let notes = topo.cleanup();
    assert!(notes.is_empty(), "cleanup had to force things: {notes:?}");
    assert_eq!(topo::leftovers(&name), Vec::<String>::new());
    Ok(())
}

#[test]
fn sweep_removes_only_leftovers_of_dead_creators() -> Result<()> {
    if !gate::privileged("sweep_removes_only_leftovers_of_dead_creators") {
        return Ok(());
    }
    // A pid that just died: the leftovers "of" it are fair game.
    let mut child = std::process::Command::new("true").spawn()?;
    let dead = child.id();
    child.wait()?;
    let dead_topo = format!("snt{dead}x0");
    let live_topo = format!("snt{}x99999", std::process::id());
    let foreign = format!("xsnt{dead}x0-n1");
    for ns in [
        format!("{dead_topo}-n1"),
        format!("{live_topo}-n1"),
        foreign.clone(),
    ] {
        topo::netns_add(&ns)?;
    }
    let dead_dir = Path::new(topo::RUN_ROOT).join(&dead_topo).join("n1/netns");
    fs::create_dir_all(&dead_dir)?;
    let dead_cg = topo::cgroup2_mount()?
        .join("swarmnet-test")
        .join(&dead_topo)
        .join("n1/task");
    fs::create_dir_all(&dead_cg)?;

    let swept = topo::sweep();
    let netns = fs::read_dir(topo::NETNS_DIR)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let result = (|| {
        anyhow::ensure!(
            swept.iter().any(|s| s.contains(&dead_topo)),
            "sweep reported {swept:?}"
        );
        anyhow::ensure!(
            topo::leftovers(&dead_topo).is_empty(),
            "{:?}",
            topo::leftovers(&dead_topo)
        );
        anyhow::ensure!(
            netns.contains(&format!("{live_topo}-n1")),
            "a live creator's netns was swept"
        );
        anyhow::ensure!(
            netns.contains(&foreign),
            "a netns without the prefix was swept"
        );
        Ok(())
    })();
    for ns in [format!("{live_topo}-n1"), foreign] {
        host_cmd(&["ip", "netns", "del", &ns])?;
    }
    result
}

#[test]
fn a_dead_netd_fails_the_wait_at_once() -> Result<()> {
    if !gate::privileged("a_dead_netd_fails_the_wait_at_once") {
        return Ok(());
    }
    let mut topo = Topology::new(1)?;
    topo.write_intent(topo.cluster_intent().build())?;
    let path = topo.intent_path.clone();
    topo.nodes[0].spawn_netd_bin(Path::new("/bin/false"), &path, &[])?;
    let started = std::time::Instant::now();
    let err = topo
        .wait_converged(Duration::from_secs(60))
        .expect_err("netd is dead");
    assert!(err.is::<topo::NetdExited>(), "{err:#}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    // Still reported after the first check.
    assert!(topo.wait_converged(Duration::from_secs(1)).is_err());
    Ok(())
}
