//! `swarmnet-netd`: the per-node daemon. A thin binary over the library: parse the config,
//! build the Linux ports, run the daemon loop until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use clap::Parser;
use swarmnet_netd::config::{LogFormat, RawConfig};
use swarmnet_netd::linux::firewall::NftFirewall;
use swarmnet_netd::linux::link::LinuxLinkPort;
use swarmnet_netd::linux::process::{LinuxProcessPort, default_cgroup_dir};
use swarmnet_netd::reconcile::{Ports, Reconciler, ReconcilerConfig};
use swarmnet_netd::{api, daemon, dns, dns_sync, firewall};

/// The swarmnet node daemon: overlay networks, sandboxes and tasks for this node.
#[derive(Debug, Parser)]
#[command(name = "swarmnet-netd", version)]
struct Args {
    /// TOML config file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id in the intent.
    #[arg(long)]
    node_id: Option<String>,
    /// Cluster intent file (JSON), watched for changes.
    #[arg(long = "intent")]
    intent_file: Option<PathBuf>,
    /// Take intent from the orchestrator: managers `host:port[,host:port..]` (any one will do).
    #[arg(long)]
    managers: Option<String>,
    /// The join token given by `swarmnet cluster join-token` (with --managers).
    #[arg(long, env = "SWARMNET_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Expected underlay address of this node (checked against the intent).
    #[arg(long)]
    advertise_addr: Option<std::net::Ipv4Addr>,
    /// State directory: namespaces, task records, status [default: /run/swarmnet].
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// VXLAN UDP port [default: 4789].
    #[arg(long)]
    vxlan_port: Option<u16>,
    /// Interval of full reconcile rounds that repair drift, e.g. 30s [default: 30s].
    #[arg(long)]
    full_reconcile_interval: Option<String>,
    /// Subnet of the node-local gateway bridge [default: 172.30.0.0/16].
    #[arg(long)]
    gw_subnet: Option<String>,
    /// cgroup2 directory for this node's tasks [default: <cgroup2 mount>/swarmnet/<node-id>].
    #[arg(long)]
    cgroup_dir: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL when a task stops, e.g. 10s.
    #[arg(long)]
    stop_grace: Option<String>,
    /// PATH that task processes and health checks get unless their environment sets one,
    /// colon-separated absolute directories [default: /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin].
    #[arg(long, env = "SWARMNET_TASK_PATH")]
    task_path: Option<String>,
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Upstream resolvers for names outside the cluster: `ip[:port],...` or `none`
    /// [default: the node's /etc/resolv.conf].
    #[arg(long)]
    dns_upstreams: Option<String>,
    /// TTL of cluster DNS answers in seconds [default: 5].
    #[arg(long)]
    dns_ttl: Option<u32>,
    /// Answer for outside names on internal networks: refused or nxdomain [default: refused].
    #[arg(long)]
    dns_internal_answer: Option<String>,
    /// Pin the resolver's threads to these CPUs, e.g. 1 or 2-3 (nothing else of netd runs
    /// on them; to keep them to itself, pin netd elsewhere with taskset) [default: unpinned].
    #[arg(long)]
    dns_cpus: Option<String>,
    /// Load balancer for service VIPs [default: auto: IPVS where the kernel has it, else nftables].
    #[arg(long, value_enum)]
    lb: Option<swarmnet_netd::config::LbChoice>,
    /// Idle timeout of established TCP connections through VIPs, e.g. 2h [default: kernel, 5 days].
    #[arg(long)]
    lb_tcp_idle_timeout: Option<String>,
    /// Idle timeout of UDP flows through VIPs, e.g. 120s [default: kernel].
    #[arg(long)]
    lb_udp_idle_timeout: Option<String>,
    /// Enables gossip of endpoint tables: the keyring file (current key + accepted keys),
    /// re-read when it changes [default: off, intent alone].
    #[arg(long)]
    gossip_key_file: Option<PathBuf>,
    /// Gossip UDP port on the advertise address [default: 7946].
    #[arg(long)]
    gossip_port: Option<u16>,
    /// A stopped node's endpoints leave DNS, LBs and FDBs within this, e.g. 10s [default: 10s].
    #[arg(long)]
    gossip_liveness_bound: Option<String>,
    /// Time between gossip rounds, e.g. 500ms [default: 500ms].
    #[arg(long)]
    gossip_interval: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

/// Talk to a running netd through its local API instead of running one.
#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Plug a container runtime's network namespace in as an external task's sandbox.
    Attach {
        /// The task id (the intent must place it on this node with runtime "external").
        task: String,
        /// The namespace, e.g. /proc/<pid>/ns/net or /run/netns/<name>.
        netns: PathBuf,
    },
    /// Unplug an external task: its interfaces go; the namespace stays with the runtime.
    Detach { task: String },
    /// Print the node's reconcile status as JSON.
    Status,
    /// Print what the node wants beside what its kernel holds, with every difference (drift),
    /// as JSON.
    Inspect,
    /// Leave the cluster: stop this node's tasks, remove everything netd made, and stop netd
    /// (`swarmnet cluster leave` does this, then ends the node's other processes).
    Leave,
}

fn client(run_dir: &std::path::Path, cmd: Cmd) -> anyhow::Result<()> {
    let task = |t: String| swarmnet_model::TaskId::new(t).map_err(anyhow::Error::from);
    let req = match cmd {
        Cmd::Attach { task: t, netns } => api::Request::Attach {
            task: task(t)?,
            netns,
        },
        Cmd::Detach { task: t } => api::Request::Detach { task: task(t)? },
        Cmd::Status => api::Request::Status {},
        Cmd::Inspect => api::Request::Inspect {},
        Cmd::Leave => api::Request::Leave {},
    };
    let resp = api::call(run_dir, &req)?;
    if let Some(i) = &resp.inspect {
        let mut all = i.clone();
        all["status"] = resp.status.clone().unwrap_or_default();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if let Some(s) = &resp.status {
        println!("{}", serde_json::to_string_pretty(s)?);
    }
    match resp.error {
        Some(e) => anyhow::bail!("netd refused: {e}"),
        None => Ok(()),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(cmd) = args.cmd {
        let run_dir = args
            .run_dir
            .unwrap_or_else(|| PathBuf::from(swarmnet_netd::config::DEFAULT_RUN_DIR));
        return client(&run_dir, cmd);
    }
    let file = match &args.config {
        Some(p) => RawConfig::from_toml(
            &std::fs::read_to_string(p)
                .with_context(|| format!("reading config file {}", p.display()))?,
        )?,
        None => RawConfig::default(),
    };
    let flags = RawConfig {
        node_id: args.node_id,
        intent_file: args.intent_file,
        managers: args.managers,
        join_token: args.join_token,
        advertise_addr: args.advertise_addr,
        run_dir: args.run_dir,
        vxlan_port: args.vxlan_port,
        full_reconcile_interval: args.full_reconcile_interval,
        gw_subnet: args.gw_subnet,
        cgroup_dir: args.cgroup_dir,
        stop_grace: args.stop_grace,
        task_path: args.task_path,
        log_format: args.log_format,
        dns_upstreams: args.dns_upstreams,
        dns_ttl: args.dns_ttl,
        dns_internal_answer: args.dns_internal_answer,
        dns_cpus: args.dns_cpus,
        lb: args.lb,
        lb_tcp_idle_timeout: args.lb_tcp_idle_timeout,
        lb_udp_idle_timeout: args.lb_udp_idle_timeout,
        gossip_key_file: args.gossip_key_file,
        gossip_port: args.gossip_port,
        gossip_liveness_bound: args.gossip_liveness_bound,
        gossip_interval: args.gossip_interval,
    };
    let cfg = file.overlay(flags).validate()?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_unset| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr; colour only when a person is watching.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cfg.log_format {
        LogFormat::Text => fmt.with_ansi(ansi).init(),
        LogFormat::Json => fmt.json().init(),
    }

    raise_fd_limit();
    std::fs::create_dir_all(&cfg.run_dir)
        .with_context(|| format!("creating run directory {}", cfg.run_dir.display()))?;
    let task_dir = cfg.run_dir.join("tasks");
    let cgroup_dir = match &cfg.cgroup_dir {
        Some(d) => d.clone(),
        None => default_cgroup_dir(cfg.node_id.as_str())?,
    };
    let cgroup_for_leave = cgroup_dir.clone();
    let ports = Ports {
        links: Box::new(LinuxLinkPort::new(cfg.run_dir.clone())?),
        firewall: Box::new(NftFirewall::new(firewall::FAMILY, firewall::TABLE)),
        processes: Box::new(
            LinuxProcessPort::new(task_dir.clone(), cgroup_dir)?.with_task_path(&cfg.task_path),
        ),
        lb: load_balancer(cfg.lb, &cfg.run_dir)?,
        ingress_firewall: Box::new(NftFirewall::in_netns(
            &cfg.run_dir.join("netns").join(
                swarmnet_netd::desired::sandbox_ns(&swarmnet_netd::desired::ingress_task())
                    .as_str(),
            ),
            "ip",
            firewall::INGRESS_TABLE,
        )),
    };
    let rec = Reconciler::new(
        ports,
        ReconcilerConfig {
            node: cfg.node_id.clone(),
            vxlan_port: cfg.vxlan_port,
            gw_subnet: cfg.gw_subnet,
            task_dir,
            state_dir: cfg.run_dir.clone(),
            stop_grace: cfg.stop_grace,
            round_budget: swarmnet_netd::reconcile::DEFAULT_ROUND_BUDGET,
            lb_timeouts: cfg.lb_timeouts,
        },
    );
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&shutdown))
            .context("installing signal handler")?;
    }
    let upstreams = match &cfg.dns_upstreams {
        Some(u) => u.clone(),
        None => {
            dns::node_upstreams().context("reading the node's resolvers from /etc/resolv.conf")?
        }
    };
    let dns_server = dns::DnsServer::start(dns::DnsServerConfig {
        cpu_mask: cfg.dns_cpu_mask,
        ..dns::DnsServerConfig::default()
    })
    .context("starting the DNS server")?;
    let dns = dns_sync::DnsSync::new(
        dns_server,
        dns_sync::DnsSyncConfig {
            ttl: cfg.dns_ttl,
            upstreams,
            deny: cfg.dns_internal_answer,
        },
    );
    let (calls_tx, calls) = std::sync::mpsc::channel();
    api::serve(&cfg.run_dir, calls_tx)
        .with_context(|| format!("opening the local API socket in {}", cfg.run_dir.display()))?;
    // Task exits wake the loop; adopted tasks (not our children) are also polled every 2 s.
    let child_exited = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGCHLD, Arc::clone(&child_exited))
        .context("installing the SIGCHLD handler")?;
    let ended = daemon::run(&cfg, rec, dns, calls, shutdown, child_exited)?;
    if ended == daemon::Ended::Left {
        // The tasks' cgroup parent goes too (it is empty now; a cgroup with processes left
        // in it refuses, and stays).
        if let Err(e) = std::fs::remove_dir(&cgroup_for_leave) {
            tracing::warn!(dir = %cgroup_for_leave.display(), error = %e, "cannot remove the tasks' cgroup");
        }
    }
    Ok(())
}

/// netd keeps one netlink socket per namespace it manages (a node with a thousand sandboxes
/// needs over a thousand descriptors), so lift the soft descriptor limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// Picks the load balancer, saying once which and why.
fn load_balancer(
    choice: swarmnet_netd::config::LbChoice,
    run_dir: &std::path::Path,
) -> anyhow::Result<Box<dyn swarmnet_netd::lb::LoadBalancerPort>> {
    use swarmnet_netd::config::LbChoice;
    let nft = || -> anyhow::Result<Box<dyn swarmnet_netd::lb::LoadBalancerPort>> {
        Ok(Box::new(swarmnet_netd::linux::nft::NftLoadBalancer::new(
            run_dir,
        )?))
    };
    let ipvs = || -> anyhow::Result<Box<dyn swarmnet_netd::lb::LoadBalancerPort>> {
        Ok(Box::new(swarmnet_netd::linux::ipvs::IpvsLoadBalancer::new(
            run_dir,
        )?))
    };
    use swarmnet_netd::linux::ipvs::{IpvsProbe, probe};
    match choice {
        LbChoice::Auto => match probe() {
            IpvsProbe::Present { family } => {
                tracing::info!(
                    lb = "ipvs",
                    reason = %format!("--lb auto: the kernel has the generic-netlink family \"IPVS\" (id {family})"),
                    "load balancer chosen"
                );
                ipvs()
            }
            IpvsProbe::Absent(why) => {
                tracing::info!(
                    lb = "nftables",
                    reason = %format!("--lb auto: {why}; nftables works on every kernel with nf_tables"),
                    "load balancer chosen"
                );
                nft()
            }
        },
        LbChoice::Nftables => {
            tracing::info!(
                lb = "nftables",
                reason = "--lb nftables",
                "load balancer chosen"
            );
            nft()
        }
        LbChoice::Ipvs => match probe() {
            IpvsProbe::Present { family } => {
                tracing::info!(
                    lb = "ipvs",
                    reason = %format!("--lb ipvs (generic-netlink family \"IPVS\", id {family})"),
                    "load balancer chosen"
                );
                ipvs()
            }
            IpvsProbe::Absent(why) => anyhow::bail!(
                "--lb ipvs: this kernel lacks ip_vs ({why}); load the ip_vs module, or start with --lb nftables or --lb auto"
            ),
        },
        LbChoice::Ebpf => anyhow::bail!(
            "--lb ebpf: the eBPF socket load balancer is not built yet; use --lb nftables or auto"
        ),
    }
}
