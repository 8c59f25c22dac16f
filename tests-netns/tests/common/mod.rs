//! What the orchestrated end-to-end tests share: the orchestrator binary, API calls made from
//! inside a node namespace (the managers listen on underlay addresses that exist only there),
//! and mTLS channels with the bootstrap manager's administrator certificate.

#![allow(dead_code, reason = "each test binary uses its own part")]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use swarmnet_tests_netns::topo;

/// `swarmnet-orchestrator`: `SWARMNET_ORCHESTRATOR_BIN`, else beside the netd binary.
pub fn orchestrator_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SWARMNET_ORCHESTRATOR_BIN") {
        return Ok(PathBuf::from(p));
    }
    let beside = topo::netd_binary()?.with_file_name("swarmnet-orchestrator");
    ensure!(
        beside.is_file(),
        "{} not found: build it with `cargo build -p swarmnet-orchestrator` (or set SWARMNET_ORCHESTRATOR_BIN)",
        beside.display()
    );
    Ok(beside)
}

/// Runs `f` (async) on a thread inside `netns`, with its own runtime.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>>>> + Send + 'static,
) -> Result<T> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || -> Result<T> {
        let fd = File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f())
    })
    .join()
    .map_err(|panic| anyhow!("API thread panicked: {panic:?}"))?
}

/// The administrator certificate of this process's cluster (`<bootstrap data dir>/tls/admin`).
static ADMIN_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Names the bootstrap manager's data directory, whose administrator certificate [`channel`]
/// presents. One cluster per test process: a second, different one is refused rather than
/// silently reaching it with the first cluster's certificate.
pub fn use_admin_of(bootstrap_data_dir: &Path) -> Result<()> {
    let dir = bootstrap_data_dir.join("tls").join("admin");
    let set = ADMIN_DIR.get_or_init(|| dir.clone());
    ensure!(
        *set == dir,
        "this test process already talks to the cluster of {}",
        set.display()
    );
    Ok(())
}

/// An mTLS channel to a manager with the administrator certificate.
pub async fn channel(addr: String) -> Result<tonic::transport::Channel> {
    let dir = ADMIN_DIR.get().context("no admin certificate yet")?;
    let material = swarmnet_pki::store::load(dir)?
        .with_context(|| format!("no admin certificate in {}", dir.display()))?;
    let tls = swarmnet_pki::tls::client_config(swarmnet_pki::tls::Credentials::new(material)?)?;
    Ok(swarmnet_pki::net::channel(
        &addr,
        tls,
        Duration::from_secs(1),
    )?)
}
