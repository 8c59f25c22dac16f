//! `task exec` and the lookups `inspect` shares: which task a user means (`web.1` or an id), on
//! which node it runs, where that node's netd keeps its state, and the task's live process.
//!
//! netd runs each task's process in the task's sandbox network namespace and in a private mount
//! namespace that bind-mounts the sandbox's resolv.conf; it records the process in
//! `<run_dir>/tasks/<task>.json` as `{pid, start_time, ...}`. `task exec` enters both namespaces of
//! that process (`nsenter --target PID --net --mount`), so the command sees the task's interfaces
//! and its resolver, 127.0.0.11.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use swarmnet_labkit::start_ticks as start_time;

use crate::context::Context;
use crate::error::{CliError, Result};
use crate::lab::LabState;
use crate::render::TaskView;

/// Where netd keeps its state when not in a lab (netd's default `--run-dir`).
pub const DEFAULT_RUN_DIR: &str = "/run/swarmnet";

/// Finds the task `key` names: a task id, or `<service>.<slot>` (pure).
pub fn find<'a>(tasks: &'a [TaskView], key: &str) -> Result<&'a TaskView> {
    if let Some(t) = tasks.iter().find(|t| t.id == key) {
        return Ok(t);
    }
    // A replaced task (kept for `service ps`) shares its slot's name: the name means the
    // live one.
    let by_name: Vec<&TaskView> = tasks
        .iter()
        .filter(|t| t.name == key && t.desired_state != "shutdown")
        .collect();
    match by_name.as_slice() {
        [one] => Ok(one),
        [] => {
            let mut names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            Err(CliError::Refused {
                code: crate::error::RefusalKind::NotFound,
                message: format!(
                    "no task {key:?}; tasks are named <service>.<slot> ({}) or by id",
                    if names.is_empty() {
                        "none exist".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            })
        }
        // Global services have one task per node in the same slot.
        many => Err(CliError::usage(
            format!("{key:?} names {} tasks", many.len()),
            format!(
                "use a task id: {}",
                many.iter()
                    .map(|t| t.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// netd's run directory on `node`: the lab's node dir; on a host that `swarmnet cluster
/// init|join` made `node` (its `host.json` in `SWARMNET_DATA_DIR`, default
/// `/var/lib/swarmnet`), `<data-dir>/netd`; else netd's default.
pub fn node_run_dir(ctx: &Context, node: &str) -> Result<PathBuf> {
    if let Some(lab) = &ctx.lab {
        return Ok(LabState::load(lab)?.node(node)?.run_dir.clone());
    }
    let data_dir = std::env::var_os("SWARMNET_DATA_DIR").map_or_else(
        || PathBuf::from(crate::cluster::DEFAULT_DATA_DIR),
        PathBuf::from,
    );
    Ok(match crate::cluster::HostState::load(&data_dir) {
        Ok(Some(h)) if h.node_id == node => data_dir.join("netd"),
        _ => PathBuf::from(DEFAULT_RUN_DIR),
    })
}

#[derive(Debug, Deserialize)]
struct Record {
    pid: u32,
    start_time: u64,
}

/// The live process of `task` as netd recorded it under `run_dir`.
pub fn live_pid(run_dir: &Path, task: &TaskView) -> Result<u32> {
    let path = run_dir.join("tasks").join(format!("{}.json", task.id));
    let not_running = |why: String| CliError::Refused {
        code: crate::error::RefusalKind::FailedPrecondition,
        message: format!(
            "task {} ({}) has no running process here: {why}",
            task.name, task.id
        ),
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| not_running(format!("{}: {e}", path.display())))?;
    let rec: Record = serde_json::from_str(&text)
        .map_err(|e| not_running(format!("{} is damaged: {e}", path.display())))?;
    // A pid alone may have been reused by another process since.
    match start_time(rec.pid) {
        Some(t) if t == rec.start_time => Ok(rec.pid),
        _ => Err(not_running(format!(
            "its process {} has exited (state {})",
            rec.pid, task.state
        ))),
    }
}

/// Runs `cmd` in the network and mount namespaces of process `pid`, with our stdio; returns its
/// exit code.
pub fn exec(pid: u32, cmd: &[String]) -> Result<i32> {
    let status = Command::new("nsenter")
        .arg(format!("--target={pid}"))
        .args(["--net", "--mount", "--"])
        .args(cmd)
        .status()
        .map_err(|e| CliError::io("running nsenter (apt-get install util-linux)", e))?;
    Ok(status.code().unwrap_or_else(|| {
        128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, service: &str, slot: u32, node: &str) -> TaskView {
        TaskView {
            id: id.into(),
            name: format!("{service}.{slot}"),
            service: service.into(),
            slot,
            node: node.into(),
            state: "running".into(),
            desired_state: "running".into(),
            health: String::new(),
            message: String::new(),
            addresses: Default::default(),
        }
    }

    #[test]
    fn by_id_then_by_name() {
        let tasks = [task("t1", "web", 1, "n1"), task("t2", "web", 2, "n2")];
        assert_eq!(find(&tasks, "t2").unwrap().id, "t2");
        assert_eq!(find(&tasks, "web.1").unwrap().id, "t1");
        let e = find(&tasks, "web.3").unwrap_err().to_string();
        assert!(e.contains("web.1, web.2"), "{e}");
    }

    #[test]
    fn ambiguous_names_ask_for_an_id() {
        let tasks = [task("a", "agent", 1, "n1"), task("b", "agent", 1, "n2")];
        let e = find(&tasks, "agent.1").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("a, b"), "{e}");
    }

    #[test]
    fn our_own_start_time_is_read() {
        assert!(start_time(std::process::id()).is_some());
        assert!(start_time(u32::MAX).is_none());
    }
}
