//! The Linux check runner against the real kernel: a check runs in the target's network and
//! mount namespaces (here this test process's own, which root may enter), its exit and output
//! become the verdict, `kill` ends it and its process group, and a check that leaves a
//! background child holding its output does not hold up the verdict or leave the child behind.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use swarmnet_model::spec::HealthCheck;
use swarmnet_model::{HumanDuration, TaskId};
use swarmnet_netd::health::{CheckRunner, HealthTarget, RunningCheck};
use swarmnet_netd::linux::health_exec::LinuxCheckRunner;

fn target(cmd: &[&str]) -> HealthTarget {
    HealthTarget {
        task: TaskId::new("t1").unwrap(),
        pid: std::process::id(),
        netns: PathBuf::from("/proc/self/ns/net"),
        env: BTreeMap::from([("SWARMNET_TASK_ID".to_string(), "t1".to_string())]),
        check: HealthCheck {
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            interval: HumanDuration::from_millis(1000),
            timeout: HumanDuration::from_millis(1000),
            retries: 1,
            start_period: HumanDuration::default(),
        },
    }
}

fn run(cmd: &[&str]) -> swarmnet_netd::health::CheckOutcome {
    let c = LinuxCheckRunner::default().spawn(&target(cmd)).unwrap();
    c.wait()
}

#[test]
fn linux_checks_give_verdicts_are_killed_and_leave_nothing_behind() {
    if !swarmnet_tests_netns::gate::privileged("health_exec::linux_checks") {
        return;
    }
    let ok = run(&["/bin/sh", "-c", "echo fine $SWARMNET_TASK_ID"]);
    assert!(ok.passed, "{ok:?}");
    assert_eq!(ok.detail, "exit 0: fine t1");
    let bad = run(&["/bin/sh", "-c", "echo nope >&2; exit 2"]);
    assert!(!bad.passed);
    assert_eq!(bad.detail, "exit 2: nope");
    let missing = LinuxCheckRunner::default().spawn(&target(&["/nonexistent/check"]));
    assert!(missing.is_err(), "a missing program is an error at spawn");

    // A hanging check is killed with its group.
    let c = LinuxCheckRunner::default()
        .spawn(&target(&["/bin/sh", "-c", "sleep 30; true"]))
        .unwrap();
    let c: std::sync::Arc<dyn RunningCheck> = std::sync::Arc::from(c);
    let c2 = std::sync::Arc::clone(&c);
    let waiter = std::thread::spawn(move || c2.wait());
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    c.kill();
    let o = waiter.join().unwrap();
    assert!(!o.passed);
    assert_eq!(o.detail, "killed by signal 9");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // A background child holding the pipe: the verdict comes at once, the child is gone.
    let marker = format!("swarmnet-health-bg-{}", std::process::id());
    let t0 = Instant::now();
    let o = run(&[
        "/bin/sh",
        "-c",
        &format!("exec -a {marker} sleep 30 & exit 0"),
    ]);
    assert!(o.passed, "{o:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    std::thread::sleep(Duration::from_millis(100));
    let left = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .any(|c| String::from_utf8_lossy(&c) == format!("sleep\0{marker}\0"));
    assert!(!left, "the check's background child survived");
}
