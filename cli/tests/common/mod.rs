//! Running the real `swarmnet` binary against a private context directory, and a guard that
//! removes a lab if a test fails half-way.

#![allow(dead_code, reason = "each test uses its own part")]

use std::path::Path;
use std::process::Command;

use swarmnet_cli::lab::LabState;

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

impl From<std::process::Output> for Run {
    fn from(out: std::process::Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

pub fn swarmnet(config: &Path, args: &[&str]) -> Run {
    Command::new(env!("CARGO_BIN_EXE_swarmnet"))
        .args(args)
        .env("SWARMNET_CONFIG_DIR", config)
        .env_remove("SWARMNET_CONTEXT")
        .output()
        .unwrap()
        .into()
}

/// `swarmnet ARGS` that must exit 0.
pub fn ok(config: &Path, args: &[&str]) -> Run {
    let r = swarmnet(config, args);
    assert_eq!(r.code, 0, "{args:?} failed: {}\n{}", r.stdout, r.stderr);
    r
}

/// A lab name unique to this test process and `tag`.
pub fn lab_name(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 10_000_000)
}

/// Removes the lab on drop (a failed test must not leave it behind).
pub struct Guard(pub String);

impl Drop for Guard {
    fn drop(&mut self) {
        swarmnet_labkit::destroy(&LabState::footprint(&self.0));
    }
}

/// The demo server beside the CLI under test (tasks get no PATH of ours).
pub fn whoami() -> String {
    Path::new(env!("CARGO_BIN_EXE_swarmnet"))
        .with_file_name("swarmnet-whoami")
        .display()
        .to_string()
}
