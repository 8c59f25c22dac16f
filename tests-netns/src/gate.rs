//! One gate for privileged tests, used the same way everywhere:
//!
//! ```ignore
//! if !swarmnet_tests_netns::gate::privileged("overlay_ping") { return; }
//! ```
//!
//! It probes what the tests need (root, a new network namespace, the `ip` tool). When the probe
//! fails the test prints a loud `SKIP` line with the probe's error, unless `CI` or
//! `SWARMNET_REQUIRE_PRIVILEGED` is set, where the skip becomes a failure.

use std::sync::OnceLock;

fn probe() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root".into());
    }
    // A new network namespace on a throwaway thread: the thread's namespace dies with it.
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare(CLONE_NEWNET) failed: {e}"))
    })
    .join()
    .map_err(|_panic| "probe thread panicked".to_string())??;
    for tool in ["ip", "nft"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Err(format!(
                "`{tool}` is not installed (apt-get install iproute2 nftables)"
            ));
        }
    }
    Ok(())
}

/// Whether CI demands that privileged tests run.
pub fn required() -> bool {
    let set = |k: &str| {
        std::env::var(k)
            .map(|v| !v.is_empty() && v != "0" && v != "false")
            .unwrap_or(false)
    };
    set("CI") || set("SWARMNET_REQUIRE_PRIVILEGED")
}

/// True when the privileged test `name` can run. Otherwise prints `SKIP` (or panics under CI).
pub fn privileged(name: &str) -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    match PROBE.get_or_init(probe) {
        Ok(()) => true,
        Err(e) if required() => {
            panic!("privileged test {name} cannot run here: {e} (CI requires it)")
        }
        Err(e) => {
            eprintln!("SKIP privileged test {name}: {e}");
            false
        }
    }
}
