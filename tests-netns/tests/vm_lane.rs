//! The kernel VM lane's own tests (`scripts/vm-lane.sh`, docs/vm-lane.md).
//!
//! - `probe::*` run inside the lane's VM (its `probe` entry) and on the host alike: whether the
//!   kernel exposes the IPVS generic-netlink family (required in the VM), which load balancer
//!   `--lb auto` picks on this kernel, and a small self-check whose expected count can be made
//!   wrong on purpose (`SWARMNET_VM_LANE_WRONG_COUNT=1`).
//! - `host::*` run on the host only: they boot the lane with this very binary and a fault — a
//!   test asserting a wrong count, a result lost on the way out, a VM that dies mid-run — and
//!   assert that the lane reports a failure. The lane must not be able to go green by losing
//!   output. They need qemu and Debian's kernel (scripts/install-deps.sh): without them they
//!   skip loudly, and fail under CI.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use swarmnet_tests_netns::topo::{self, host_cmd};
use swarmnet_tests_netns::{gate, vm};

mod probe {
    use super::*;

    /// Whether the generic-netlink family "IPVS" resolves, asked through iproute2's `genl`
    /// (the kernel registers it when ip_vs loads; it is what netd's IPVS backend talks to).
    fn ipvs_family() -> Result<bool> {
        let out = host_cmd(&["genl", "ctrl", "get", "name", "IPVS"])?;
        if out.success() {
            ensure!(out.stdout.contains("IPVS"), "unexpected answer: {out}");
            return Ok(true);
        }
        // The controller answers ENOENT for a family it does not know.
        if out.stderr.contains("No such file or directory") {
            return Ok(false);
        }
        bail!("cannot ask the kernel for the IPVS family: {out}")
    }

    #[test]
    fn the_ipvs_generic_netlink_family_is_there_exactly_when_the_kernel_has_ip_vs() {
        if !gate::privileged(
            "the_ipvs_generic_netlink_family_is_there_exactly_when_the_kernel_has_ip_vs",
        ) {
            return;
        }
        let family = ipvs_family().unwrap();
        let proc_file = std::path::Path::new("/proc/net/ip_vs").exists();
        assert_eq!(
            family,
            proc_file,
            "genl says the IPVS family is {}, /proc/net/ip_vs {}",
            if family { "there" } else { "missing" },
            if proc_file { "exists" } else { "does not" }
        );
        if vm::ipvs_required() {
            assert!(
                family,
                "SWARMNET_REQUIRE_IPVS is set but this kernel ({}) has no IPVS family: is ip_vs in tests-netns/vm/modules?",
                kernel_release()
            );
            let table = std::fs::read_to_string("/proc/net/ip_vs").unwrap();
            assert!(table.starts_with("IP Virtual Server version"), "{table}");
        } else if !family {
            eprintln!(
                "note: kernel {} has no IPVS; the kernel VM lane (scripts/vm-lane.sh) covers it",
                kernel_release()
            );
        }
    }

    fn kernel_release() -> String {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("unknown: {e}"))
    }

    /// `lb` and `reason` of netd's "load balancer chosen" log line.
    fn chosen(log: &str) -> Option<(String, String)> {
        let line = log.lines().find(|l| l.contains("load balancer chosen"))?;
        let lb = line
            .split_once(" lb=")?
            .1
            .trim_start_matches('"')
            .split(['"', ' '])
            .next()?
            .to_string();
        let reason = line
            .split_once(" reason=")
            .map_or("", |(_, r)| r)
            .to_string();
        Some((lb, reason))
    }

    /// DESIGN.md: "`--lb auto` picks IPVS where the kernel has it and nftables elsewhere": a
    /// netd started with the default (`auto`) in a node namespace says which it took.
    #[test]
    fn lb_auto_picks_ipvs_where_the_kernel_has_it_and_nftables_elsewhere() {
        if !gate::privileged("lb_auto_picks_ipvs_where_the_kernel_has_it_and_nftables_elsewhere") {
            return;
        }
        let has_ipvs = ipvs_family().unwrap();
        topo::with_topology(1, |topo| {
            topo.write_intent(topo.cluster_intent().build())?;
            topo.start_netd(&[])?;
            let mut found = None;
            topo::retry(
                "netd logs its load-balancer choice",
                vm::scaled(Duration::from_secs(30)),
                || {
                    let log = std::fs::read_to_string(topo.node("n1").log_path())
                        .context("reading netd.log")?;
                    found = chosen(&log);
                    ensure!(found.is_some(), "not yet:\n{log}");
                    Ok(())
                },
            )?;
            let (lb, reason) = found.expect("retry succeeded");
            let expected = if has_ipvs { "ipvs" } else { "nftables" };
            ensure!(
                lb == expected,
                "--lb auto took {lb} on a kernel {} IPVS (expected {expected}): {reason}",
                if has_ipvs { "with" } else { "without" }
            );
            Ok(())
        });
    }

    /// A self-check with a count that a lane run can make wrong on purpose: three "backend"
    /// veth ports on a bridge in a node namespace, counted through `ip`. With
    /// `SWARMNET_VM_LANE_WRONG_COUNT=1` it expects four and fails, which the host-side test
    /// `host::a_vm_test_asserting_a_wrong_count_fails_the_lane` needs to see reported.
    #[test]
    fn lane_self_check_counts_backend_ports() {
        if !gate::privileged("lane_self_check_counts_backend_ports") {
            return;
        }
        let wrong = std::env::var("SWARMNET_VM_LANE_WRONG_COUNT").is_ok_and(|v| v == "1");
        topo::with_topology(1, |topo| {
            let n = topo.node("n1");
            n.exec_ok(&["ip", "link", "add", "snbr0", "type", "bridge"])?;
            for i in 0..3 {
                let (a, b) = (format!("snbe{i}"), format!("snbp{i}"));
                n.exec_ok(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])?;
                n.exec_ok(&["ip", "link", "set", &a, "master", "snbr0", "up"])?;
            }
            let ports = n.exec_ok(&["ip", "-o", "link", "show", "master", "snbr0"])?;
            let count = ports.lines().filter(|l| !l.trim().is_empty()).count();
            let expected = if wrong { 4 } else { 3 };
            ensure!(
                count == expected,
                "backend ports on the bridge: {count}, expected {expected}{}:\n{ports}",
                if wrong {
                    " (SWARMNET_VM_LANE_WRONG_COUNT=1: wrong on purpose)"
                } else {
                    ""
                }
            );
            Ok(())
        });
    }
}

mod host {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::Mutex;

    /// One VM at a time: two TCG guests on a two-core machine only slow each other down.
    static ONE_VM: Mutex<()> = Mutex::new(());

    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/vm-lane.sh")
    }

    /// Whether the lane can run here; skips loudly, or panics where CI requires it.
    fn lane_ready(name: &str) -> bool {
        if vm::in_vm() {
            eprintln!("{name}: a host-side test; nothing to do inside the VM");
            return false;
        }
        if !gate::privileged(name) {
            return false;
        }
        let check = topo::run(
            {
                let mut c = Command::new(script());
                c.arg("--check");
                c
            },
            None,
            Duration::from_secs(30),
        )
        .expect("running vm-lane.sh --check");
        if check.success() {
            return true;
        }
        if gate::required() {
            panic!("{name}: the kernel VM lane cannot run here (CI requires it): {check}");
        }
        eprintln!("SKIP {name}: the kernel VM lane cannot run here: {check}");
        false
    }

    /// Runs the lane with `args` (its files under a scratch `--out` dir, removed after).
    fn lane(name: &str, args: &[String]) -> topo::Output {
        let _one = ONE_VM
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let out =
            std::env::temp_dir().join(format!("swarmnet-vm-lane-{}-{name}", std::process::id()));
        let mut c = Command::new(script());
        c.arg("--out").arg(&out).arg("--timeout").arg("300");
        c.args(args);
        let res = topo::run(c, None, Duration::from_secs(420)).expect("running vm-lane.sh");
        drop(std::fs::remove_dir_all(&out));
        println!("{res}");
        res
    }

    fn me() -> String {
        std::env::current_exe()
            .expect("current_exe")
            .to_string_lossy()
            .into_owned()
    }

    const SELF_CHECK: &str = "probe::lane_self_check_counts_backend_ports --exact";

    /// The deliberate bug: a test in the VM asserts a wrong count. The same test
    /// without the bug passes in the same run, so the failure is the bug's, not the lane's.
    #[test]
    fn a_vm_test_asserting_a_wrong_count_fails_the_lane() {
        let name = "a_vm_test_asserting_a_wrong_count_fails_the_lane";
        if !lane_ready(name) {
            return;
        }
        let exe = me();
        let res = lane(
            "wrong-count",
            &[
                "--bin".into(),
                format!("right {exe} {SELF_CHECK}"),
                "--bin".into(),
                format!("wrong {exe} SWARMNET_VM_LANE_WRONG_COUNT=1 {SELF_CHECK}"),
            ],
        );
        assert_eq!(res.code, Some(1), "the lane must fail: {res}");
        for needle in [
            "PASS  right: ok. 1 passed; 0 failed",
            "FAIL  wrong: FAILED. 0 passed; 1 failed",
            "  - wrong: exit code 101",
            "backend ports on the bridge: 3, expected 4",
            "kernel VM lane FAILED",
        ] {
            assert!(
                res.stdout.contains(needle),
                "missing {needle:?} in the lane's report: {res}"
            );
        }
        assert!(!res.stdout.contains("  - right:"), "{res}");
    }

    /// A test that passed but whose exit code never reached the host counts as a failure.
    #[test]
    fn a_lost_result_fails_the_lane() {
        let name = "a_lost_result_fails_the_lane";
        if !lane_ready(name) {
            return;
        }
        let exe = me();
        let res = lane(
            "lost",
            &[
                "--inject".into(),
                "lose-output".into(),
                "--bin".into(),
                format!("lost {exe} {SELF_CHECK}"),
            ],
        );
        assert_eq!(res.code, Some(1), "the lane must fail: {res}");
        assert!(res.stdout.contains("LOST  lost"), "{res}");
        assert!(res.stdout.contains("lost: no exit code"), "{res}");
    }

    /// A kernel crash after the first binary: the second never reports, the VM never reaches
    /// the end of the plan; the first binary's pass does not make the lane pass.
    #[test]
    fn a_vm_that_dies_mid_run_fails_the_lane() {
        let name = "a_vm_that_dies_mid_run_fails_the_lane";
        if !lane_ready(name) {
            return;
        }
        let exe = me();
        let res = lane(
            "crash",
            &[
                "--inject".into(),
                "crash".into(),
                "--bin".into(),
                format!("first {exe} {SELF_CHECK}"),
                "--bin".into(),
                format!("second {exe} {SELF_CHECK}"),
            ],
        );
        assert_eq!(res.code, Some(1), "the lane must fail: {res}");
        for needle in [
            "PASS  first",
            "LOST  second",
            "no done marker",
            "the kernel reported a problem",
        ] {
            assert!(res.stdout.contains(needle), "missing {needle:?}: {res}");
        }
    }
}
