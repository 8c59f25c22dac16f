//! `swarmnet`, the command-line tool: a local lab in one command, cluster, node, network and
//! service management against the managers' gRPC API, and `inspect`.
//!
//! Layout:
//! - [`args`]: the command line (clap derive) and the pure parsers of compound values;
//! - [`render`]: view types and their table / JSON renderings (golden-tested);
//! - [`error`]: the one error type, its messages (each says what to do) and exit codes;
//! - [`api`]: the managers' gRPC API with failover, and conversions to views;
//! - [`commands`]: the commands that talk to the managers;
//! - [`context`]: how the CLI finds a cluster's managers (written by `lab up`);
//! - [`lab`]: the lab, built on `swarmnet-labkit`;
//! - [`progress`]: live progress lines on stderr;
//! - [`demo`]: `lab demo`;
//! - [`task`]: finding a task and its process (`task exec`);
//! - [`inspect`]: intent beside each node's desired and kernel state, drift flagged.
//!
//! [`run`] executes a parsed command line and returns what to print and the exit code; the
//! binary only parses, calls it and prints.

use std::io::Write as _;

pub mod api;
pub mod args;
pub mod cluster;
pub mod commands;
pub mod context;
pub mod demo;
pub mod error;
pub mod inspect;
pub mod lab;
pub mod labs;
pub mod progress;
pub mod render;
pub mod task;

use clap::CommandFactory;

use crate::args::{Cli, ClusterCmd, Cmd, LabCmd, NodeCmd, TaskCmd};
use crate::context::Context;
use crate::error::Result;
use crate::progress::Progress;
use crate::render::Format;

/// What a command printed on stdout, and its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub code: i32,
}

impl Outcome {
    fn ok(stdout: String) -> Self {
        Self { stdout, code: 0 }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<Outcome> {
    let format = cli.format;
    let mut progress = Progress::new(false);
    // The lab of the context the CLI points at, if any: `lab status|down|exec` default to it,
    // and `node promote|demote` move managers in it. Read only by those commands.
    let current_lab = || {
        Context::load(&cli.config_dir, cli.context.as_deref())
            .ok()
            .and_then(|c| c.lab)
    };
    match cli.cmd {
        Cmd::Completion { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "swarmnet", &mut buf);
            Ok(Outcome::ok(String::from_utf8_lossy(&buf).into_owned()))
        }
        Cmd::Lab(LabCmd::Up(up)) => {
            let lab = lab::up(&up.lab.or_default(), up.nodes, up.managers, &mut progress)?;
            let ctx = lab_context(&lab);
            ctx.save_current(&cli.config_dir)?;
            progress.step(&format!(
                "lab {} is up; context {:?} is current",
                lab.name, ctx.name
            ));
            let view = lab::status(&lab.name)?;
            Ok(Outcome::ok(match format {
                Format::Table => lab::status_table(&view),
                Format::Json => render::json(&view),
            }))
        }
        Cmd::Lab(LabCmd::Demo { lab, down }) => {
            let r = demo::run(&lab.or_default(), down, &cli.config_dir, &mut progress)?;
            Ok(Outcome::ok(match format {
                Format::Table => demo::text(&r),
                Format::Json => render::json(&r),
            }))
        }
        Cmd::Lab(LabCmd::Status(l)) => {
            let view = lab::status(&l.or_current(current_lab()))?;
            Ok(Outcome::ok(match format {
                Format::Table => lab::status_table(&view),
                Format::Json => render::json(&view),
            }))
        }
        Cmd::Lab(LabCmd::Down(d)) => {
            let names = if d.all {
                labs::names()
            } else {
                vec![d.lab.or_current(current_lab())]
            };
            let mut out = String::new();
            for name in &names {
                let notes = lab::down(name, &mut progress)?;
                Context::remove(&cli.config_dir, name);
                for n in notes {
                    progress.step(&format!("note: {n}"));
                }
                out.push_str(&format!("lab {name} removed\n"));
            }
            lab::remove_empty_parents();
            if names.is_empty() {
                out.push_str("no labs on this machine\n");
            }
            Ok(Outcome::ok(out))
        }
        Cmd::Lab(LabCmd::Ls) => {
            let found = labs::list();
            Ok(Outcome::ok(match format {
                Format::Table => labs::table(&found),
                Format::Json => render::json(&found),
            }))
        }
        Cmd::Cluster(ClusterCmd::Init(i)) => {
            let j = cluster::init(
                &i.host.options(),
                &cli.config_dir,
                &i.context_name,
                &mut progress,
            )?;
            Ok(Outcome::ok(match format {
                Format::Table => cluster::joined_text(&j),
                Format::Json => render::json(&j),
            }))
        }
        Cmd::Cluster(ClusterCmd::Join(j)) => {
            let joined = cluster::join(&j.host.options(), &j.token, &j.manager, &mut progress)?;
            Ok(Outcome::ok(match format {
                Format::Table => cluster::joined_text(&joined),
                Format::Json => render::json(&joined),
            }))
        }
        Cmd::Cluster(ClusterCmd::Leave { force, data_dir }) => {
            let left = cluster::leave(&data_dir, force, &cli.config_dir, &mut progress)?;
            Ok(Outcome::ok(match format {
                Format::Table => cluster::left_text(&left),
                Format::Json => render::json(&left),
            }))
        }
        Cmd::Cluster(ClusterCmd::Managers(c)) => {
            with_managers(&cli.config_dir, cli.context.as_deref(), |m| {
                Box::pin(commands::cluster(m, c, format))
            })
        }
        // In a lab, a promoted node gets a running manager and a demoted one loses it (the
        // lab knows how to start one there); elsewhere the role changes in the managers'
        // record (see `node_role_note`).
        Cmd::Node(NodeCmd::Promote { node }) => change_role(
            &cli.config_dir,
            cli.context.as_deref(),
            current_lab(),
            node,
            true,
            format,
        ),
        Cmd::Node(NodeCmd::Demote { node }) => change_role(
            &cli.config_dir,
            cli.context.as_deref(),
            current_lab(),
            node,
            false,
            format,
        ),
        Cmd::Node(c) => with_managers(&cli.config_dir, cli.context.as_deref(), |m| {
            Box::pin(commands::node(m, c, format))
        }),
        Cmd::Network(c) => with_managers(&cli.config_dir, cli.context.as_deref(), |m| {
            Box::pin(commands::network(m, c, format))
        }),
        Cmd::Service(c) => with_managers(&cli.config_dir, cli.context.as_deref(), |m| {
            Box::pin(async move {
                let mut progress = Progress::new(false);
                commands::service(m, c, format, &mut progress).await
            })
        }),
        Cmd::Task(TaskCmd::Exec { task, cmd }) => {
            let ctx = Context::load(&cli.config_dir, cli.context.as_deref())?;
            let mut managers = api::Managers::new(ctx.managers.clone());
            let tasks = runtime()?.block_on(commands::tasks_of(&mut managers, ""))?;
            let t = task::find(&tasks, &task)?;
            if t.node.is_empty() {
                return Err(error::CliError::Refused {
                    code: error::RefusalKind::FailedPrecondition,
                    message: format!("task {} is {} on no node: {}", t.name, t.state, t.message),
                });
            }
            let pid = task::live_pid(&task::node_run_dir(&ctx, &t.node)?, t)?;
            let code = task::exec(pid, &cmd)?;
            Ok(Outcome {
                stdout: String::new(),
                code,
            })
        }
        Cmd::Inspect(a) => {
            let ctx = Context::load(&cli.config_dir, cli.context.as_deref())?;
            let mut managers = api::Managers::new(ctx.managers.clone());
            let (intent, tasks, target, nodes) =
                runtime()?.block_on(commands::inspect_intent(&mut managers, a.kind, &a.name))?;
            let nodes: Vec<inspect::NodeInspect> = nodes
                .iter()
                .map(|node| {
                    let asked = task::node_run_dir(&ctx, node)
                        .map_err(|e| e.to_string())
                        .and_then(|dir| {
                            // The kernel view and drift come from `inspect`, the per-object
                            // reconcile status and self-test from `status`.
                            let sock = dir.join("netd.sock");
                            let call = |op: &str| {
                                lab::netd_call(&sock, &serde_json::json!({ "op": op }))
                                    .map_err(|e| format!("{e:#}"))
                            };
                            let mut inspect = call("inspect")?["inspect"].take();
                            inspect["status"] = call("status")?["status"].take();
                            Ok(inspect)
                        });
                    match asked {
                        Ok(answer) => inspect::select(node, &target, &answer),
                        Err(e) => inspect::NodeInspect {
                            node: node.clone(),
                            error: Some(e),
                            desired: Default::default(),
                            kernel: Default::default(),
                            drift: vec![],
                            status: Default::default(),
                            published: Default::default(),
                            dns: Default::default(),
                        },
                    }
                })
                .collect();
            let drift = nodes
                .iter()
                .any(|n| n.error.is_some() || !n.drift.is_empty());
            let report = inspect::Report {
                kind: format!("{:?}", a.kind).to_lowercase(),
                name: a.name,
                intent,
                tasks,
                nodes,
                drift,
            };
            Ok(Outcome::ok(match format {
                Format::Table => inspect::text(&report),
                Format::Json => render::json(&report),
            }))
        }
        Cmd::Lab(LabCmd::Exec { lab, node, cmd }) => {
            let code = lab::exec(&lab.or_current(current_lab()), &node, &cmd)?;
            Ok(Outcome {
                stdout: String::new(),
                code,
            })
        }
    }
}

/// The context of a lab: its managers, reached from inside their nodes' namespaces.
pub fn lab_context(lab: &lab::LabState) -> Context {
    Context {
        name: lab.name.clone(),
        managers: lab
            .nodes
            .iter()
            .filter(|n| n.manager)
            .map(lab::LabNode::manager_endpoint)
            .collect(),
        lab: Some(lab.name.clone()),
    }
}

/// The lab context's managers after a promotion or demotion, written back (not made current).
fn refresh_lab_context(config_dir: &std::path::Path, lab: &str) -> Result<()> {
    let state = lab::LabState::load(lab)?;
    lab_context(&state).save(config_dir)
}

/// Waits (bounded) until the Raft group lists manager `id` as a voter, or no longer lists it.
async fn wait_voter(m: &mut api::Managers, id: u64, present: bool) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        if m.votes(id).await? == present {
            return Ok(());
        }
        if start.elapsed() > std::time::Duration::from_secs(30) {
            return Err(error::CliError::Unavailable {
                tried: format!("manager {id}"),
                last: format!(
                    "the Raft group {} it after 30 s",
                    if present {
                        "did not add"
                    } else {
                        "still lists"
                    }
                ),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `node promote|demote NODE`: the managers' record, then, in a lab, the node's manager
/// process (the lab context follows, so the CLI fails over to the managers as they are now).
fn change_role(
    config_dir: &std::path::Path,
    context: Option<&str>,
    lab: Option<String>,
    node: String,
    promote: bool,
    format: Format,
) -> Result<Outcome> {
    let out = with_managers(config_dir, context, |m| {
        Box::pin(change_role_in(m, node, promote, lab.clone(), format))
    })?;
    if let Some(l) = &lab {
        refresh_lab_context(config_dir, l)?;
    }
    Ok(out)
}

async fn change_role_in(
    m: &mut api::Managers,
    node: String,
    promote: bool,
    lab: Option<String>,
    format: Format,
) -> Result<String> {
    let cmd = if promote {
        NodeCmd::Promote { node: node.clone() }
    } else {
        NodeCmd::Demote { node: node.clone() }
    };
    let text = commands::node(m, cmd, format).await?;
    let note = match (lab, promote) {
        (None, _) => node_role_note(&node, promote),
        (Some(lab), true) => start_lab_manager(m, &lab, &node).await?,
        (Some(lab), false) => stop_lab_manager(m, &lab, &node).await?,
    };
    Ok(format!("{text}{note}"))
}

/// A promoted lab node's manager: started, and waited for until it votes.
async fn start_lab_manager(m: &mut api::Managers, lab: &str, node: &str) -> Result<String> {
    let tokens = m
        .call(|ch| async move {
            swarmnet_api::cluster_client::ClusterClient::new(ch)
                .join_tokens(swarmnet_api::Empty {})
                .await
        })
        .await?;
    let id = lab::start_promoted_manager(lab, node, &tokens.manager)?;
    wait_voter(m, id, true).await?;
    Ok(format!(
        "its manager (Raft id {id}) runs on {node} and votes\n"
    ))
}

/// A demoted lab node's manager: out of the Raft group, then stopped.
async fn stop_lab_manager(m: &mut api::Managers, lab: &str, node: &str) -> Result<String> {
    let state = lab::LabState::load(lab)?;
    let Some(i) = state.nodes.iter().position(|n| n.id == node) else {
        return Ok(String::new());
    };
    let id = i as u64 + 1;
    if state.nodes[i].manager_pid.is_some() {
        m.call(|ch| async move {
            swarmnet_api::cluster_client::ClusterClient::new(ch)
                .remove_manager(swarmnet_api::RemoveManagerRequest { id })
                .await
        })
        .await?;
        wait_voter(m, id, false).await?;
    }
    Ok(match lab::stop_demoted_manager(lab, node)? {
        Some(id) => format!("its manager (Raft id {id}) left the Raft group and stopped\n"),
        None => String::new(),
    })
}

/// Outside a lab: what a role change means for the manager process on that host.
fn node_role_note(node: &str, promoted: bool) -> String {
    if promoted {
        format!(
            "note: the managers count {node} as a manager node; to run a manager there, run on \
             that host `swarmnet cluster join --token <manager token> <a manager's address>` \
             (a worker of this cluster starts its manager in place)\n"
        )
    } else {
        format!(
            "note: a manager process on {node} stays in the Raft group until it leaves \
             (`swarmnet cluster leave --force` on that host)\n"
        )
    }
}

/// A runtime for one command's calls to the managers.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| error::CliError::io("starting the async runtime", e))
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + 'a>>;

/// Runs `f` on the managers of the chosen context, in a runtime made for this one command.
fn with_managers(
    config_dir: &std::path::Path,
    context: Option<&str>,
    f: impl for<'m> FnOnce(&'m mut api::Managers) -> BoxFuture<'m, Result<String>>,
) -> Result<Outcome> {
    let ctx = Context::load(config_dir, context)?;
    let rt = runtime()?;
    let mut managers = api::Managers::new(ctx.managers);
    if let Some(note) = rt.block_on(managers.renew_admin_if_due(std::time::SystemTime::now())) {
        // Best effort, and said on stderr (stdout stays the command's output).
        drop(writeln!(std::io::stderr(), "note: {note}"));
    }
    let out = rt.block_on(f(&mut managers))?;
    Ok(Outcome::ok(out))
}
