//! Every lab on this machine, including the ones nobody took down: `swarmnet lab ls` and
//! `swarmnet lab down --all`.
//!
//! A lab is found by any of its traces, not only by its `lab.json`: a `lab up` killed half-way
//! (or a machine whose CLI crashed) leaves namespaces `snl-<name>-*`, a run directory under
//! [`LAB_ROOT`] or a cgroup under `<cgroup2>/swarmnet-lab/` without a state file, and those must
//! still be listed and removable. Lab names hold no `-` ([`crate::args::parse_lab_name`]), so
//! the name of a namespace `snl-<name>-<rest>` is unambiguous.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use serde::Serialize;
use swarmnet_labkit as kit;

use crate::lab::{LAB_ROOT, LabState, NETNS_PREFIX};
use crate::render::Table;

/// One lab as found on the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabListing {
    pub name: String,
    /// `up` (state file, every process alive), `degraded` (state file, some process gone) or
    /// `leftover` (traces without a usable state file: a crashed or interrupted `lab up`).
    pub state: String,
    /// Nodes in the state file (0 without one).
    pub nodes: usize,
    /// Namespaces of the lab that exist.
    pub namespaces: usize,
    /// Processes still running in the lab's cgroup.
    pub processes: usize,
}

/// Names of every lab with any trace on this machine, sorted.
pub fn names() -> Vec<String> {
    let mut names = BTreeSet::new();
    for ns in kit::netns_with_prefix(NETNS_PREFIX) {
        if let Some(name) = name_of_netns(&ns) {
            names.insert(name.to_owned());
        }
    }
    for d in kit::list_dir(Path::new(LAB_ROOT)) {
        if d != "contexts" && crate::args::parse_lab_name(&d).is_ok() {
            names.insert(d);
        }
    }
    if let Ok(cg2) = kit::cgroup2_mount() {
        for d in kit::list_dir(&cg2.join("swarmnet-lab")) {
            if crate::args::parse_lab_name(&d).is_ok() {
                names.insert(d);
            }
        }
    }
    names.into_iter().collect()
}

/// The lab a namespace belongs to: `snl-<name>-<rest>` → `<name>`.
pub fn name_of_netns(ns: &str) -> Option<&str> {
    let rest = ns.strip_prefix(NETNS_PREFIX)?;
    let (name, tail) = rest.split_once('-')?;
    (!name.is_empty() && !tail.is_empty()).then_some(name)
}

/// Every lab with its state.
pub fn list() -> Vec<LabListing> {
    names().into_iter().map(|n| describe(&n)).collect()
}

fn describe(name: &str) -> LabListing {
    let fp = LabState::footprint(name);
    let namespaces = kit::netns_with_prefix(&fp.netns_prefix).len();
    let processes = fp.cgroup.as_deref().map(cgroup_procs).unwrap_or(0);
    let (state, nodes) = match LabState::load(name) {
        Ok(lab) => {
            // netd on every node, and the manager on managers.
            let alive = |p: Option<u32>| p.is_some_and(kit::pid_alive);
            let all_alive = lab
                .nodes
                .iter()
                .all(|n| alive(n.netd_pid) && (!n.manager || alive(n.manager_pid)))
                && namespaces == lab.nodes.len() + 1;
            let state = if all_alive { "up" } else { "degraded" };
            (state, lab.nodes.len())
        }
        Err(_) => ("leftover", 0),
    };
    LabListing {
        name: name.to_owned(),
        state: state.into(),
        nodes,
        namespaces,
        processes,
    }
}

/// Processes in a cgroup tree.
fn cgroup_procs(cg: &Path) -> usize {
    let mut n = fs::read_to_string(cg.join("cgroup.procs"))
        .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0);
    for child in kit::list_dir(cg) {
        let p = cg.join(child);
        if p.is_dir() {
            n += cgroup_procs(&p);
        }
    }
    n
}

/// `lab ls` as a table.
pub fn table(labs: &[LabListing]) -> String {
    if labs.is_empty() {
        return "no labs on this machine\n".into();
    }
    let mut t = Table::new(&["NAME", "STATE", "NODES", "NAMESPACES", "PROCESSES"]);
    for l in labs {
        t.row(vec![
            l.name.clone(),
            l.state.clone(),
            l.nodes.to_string(),
            l.namespaces.to_string(),
            l.processes.to_string(),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_name_from_namespace() {
        assert_eq!(name_of_netns("snl-lab-ul"), Some("lab"));
        assert_eq!(name_of_netns("snl-demo2-n12"), Some("demo2"));
        assert_eq!(name_of_netns("snl-lab"), None);
        assert_eq!(name_of_netns("snl--n1"), None);
        assert_eq!(name_of_netns("snl-lab-"), None);
        assert_eq!(name_of_netns("sn-lab-n1"), None);
    }
}
