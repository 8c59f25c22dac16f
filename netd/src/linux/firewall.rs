//! [`NftFirewall`]: the node firewall table through the `nft` command.
//!
//! `apply` feeds the rendered ruleset to `nft -f -`; the renderer makes it start with
//! `add table`, `delete table`, then the new table, so the whole replacement is one nft
//! transaction (the first `add` makes the `delete` valid when the table is missing). `nft` runs
//! in netd's own network namespace, the node namespace, as a child of the calling thread.
//!
//! This is a stopgap: a later issue replaces it with netlink batches kept in memory (the `nft`
//! command re-reads the whole ruleset on every call).

use std::io::{self, Write};
use std::process::{Command, Stdio};

use crate::port::{ErrorKind, FirewallPort, PortError, PortResult};

/// One nftables table owned by netd, e.g. family `inet`, name `swarmnet`.
#[derive(Debug, Clone)]
pub struct NftFirewall {
    family: String,
    name: String,
    nft: String,
    /// Arguments before nft's own (`nsenter --net=<file> nft` for another namespace).
    prefix: Vec<String>,
}

/// What `nft` answered.
struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl NftFirewall {
    pub fn new(family: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            family: family.into(),
            name: name.into(),
            nft: "nft".into(),
            prefix: Vec::new(),
        }
    }

    /// The same table in the namespace pinned at `netns` (e.g. the ingress sandbox's), through
    /// `nsenter --net` (util-linux): nft then talks to that namespace's nf_tables, and our own
    /// thread never changes namespace.
    pub fn in_netns(
        netns: &std::path::Path,
        family: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        Self {
            family: family.into(),
            name: name.into(),
            nft: "nsenter".into(),
            prefix: vec![format!("--net={}", netns.display()), "nft".into()],
        }
    }

    fn object(&self) -> String {
        format!("table {} {}", self.family, self.name)
    }

    fn run(&self, op: &'static str, args: &[&str], stdin: Option<&str>) -> PortResult<Output> {
        let mut cmd = Command::new(&self.nft);
        cmd.args(&self.prefix)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            let mut err = PortError::io(op, self.object(), e);
            err.detail = format!(
                "cannot run {}: {} (is nftables installed?)",
                self.nft, err.detail
            );
            err
        })?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A write error (nft exited early) shows up in its exit status and stderr below.
            let written: io::Result<()> = pipe.write_all(text.as_bytes());
            drop(pipe);
            if let Err(e) = written
                && e.kind() != io::ErrorKind::BrokenPipe
            {
                let _ignored = child.kill();
                let _ignored = child.wait();
                return Err(PortError::io(op, self.object(), e));
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|e| PortError::io(op, self.object(), e))?;
        Ok(Output {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// nft reports a missing table as "No such file or directory" in its error text.
fn is_missing(stderr: &str) -> bool {
    stderr.contains("No such file or directory") || stderr.contains("does not exist")
}

/// Classifies nft's error text (it exits 1 for everything).
fn kind_of(stderr: &str, otherwise: ErrorKind) -> ErrorKind {
    if stderr.contains("Operation not permitted") {
        ErrorKind::Permission
    } else if stderr.contains("Device or resource busy") {
        ErrorKind::Busy
    } else {
        otherwise
    }
}

impl FirewallPort for NftFirewall {
    fn list_table(&mut self) -> PortResult<Option<String>> {
        let out = self.run(
            "list table",
            &["list", "table", &self.family, &self.name],
            None,
        )?;
        if out.ok {
            return Ok(Some(out.stdout));
        }
        if is_missing(&out.stderr) {
            return Ok(None);
        }
        Err(PortError::new(
            "list table",
            self.object(),
            kind_of(&out.stderr, ErrorKind::Other),
            out.stderr,
        ))
    }

    fn apply(&mut self, ruleset: &str) -> PortResult<()> {
        let out = self.run("apply ruleset", &["-f", "-"], Some(ruleset))?;
        if out.ok {
            return Ok(());
        }
        // A syntax or semantic error in the rendered ruleset: retrying will not help.
        Err(PortError::new(
            "apply ruleset",
            self.object(),
            kind_of(&out.stderr, ErrorKind::Invalid),
            out.stderr,
        ))
    }

    fn delete_table(&mut self) -> PortResult<()> {
        let out = self.run(
            "delete table",
            &["delete", "table", &self.family, &self.name],
            None,
        )?;
        if out.ok || is_missing(&out.stderr) {
            return Ok(());
        }
        Err(PortError::new(
            "delete table",
            self.object(),
            kind_of(&out.stderr, ErrorKind::Other),
            out.stderr,
        ))
    }
}
