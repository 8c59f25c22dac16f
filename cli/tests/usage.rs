//! Every usage error exits 2 with a message, every failure exits 1 with a message saying what to
//! do, success exits 0: run through the real binary.

use std::process::Command;

fn swarmnet(args: &[&str]) -> (i32, String, String) {
    // An empty context directory: nothing here may depend on labs of the machine.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_swarmnet"))
        .args(args)
        .env("SWARMNET_CONFIG_DIR", dir.path())
        .env_remove("SWARMNET_CONTEXT")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn usage_error(args: &[&str], needle: &str) {
    let (code, _, err) = swarmnet(args);
    assert_eq!(code, 2, "{args:?} should be a usage error; stderr: {err}");
    assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
}

#[test]
fn usage_errors_exit_2() {
    usage_error(&[], "Usage");
    usage_error(&["frobnicate"], "unrecognized subcommand");
    usage_error(
        &["--format", "yaml", "lab", "status"],
        "possible values: table, json",
    );
    usage_error(&["lab", "up", "--nodes", "0"], "--nodes");
    usage_error(
        &["lab", "up", "--nodes", "2", "--managers", "3"],
        "more than --nodes",
    );
    usage_error(
        &["lab", "up", "--name", "Bad_Name"],
        "lower-case letters or digits",
    );
    usage_error(&["lab", "up", "--name", "contexts"], "pick another name");
    usage_error(&["lab", "exec", "n1"], "CMD");
    usage_error(&["completion", "powershell2"], "possible values");
}

#[test]
fn failures_exit_1_with_a_hint() {
    let (code, _, err) = swarmnet(&["lab", "status", "--name", "nosuchlab"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("swarmnet lab up --name nosuchlab"), "{err}");
    let (code, _, err) = swarmnet(&["lab", "down", "--name", "nosuchlab"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no such lab") && err.contains("hint:"),
        "{err}"
    );
    let (code, _, err) = swarmnet(&["lab", "exec", "--name", "nosuchlab", "n1", "--", "true"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("hint:"), "{err}");
}

#[test]
fn cluster_commands_without_a_context_say_how_to_get_one() {
    for args in [
        &["node", "ls"][..],
        &["service", "ls"],
        &["network", "rm", "x"],
    ] {
        let (code, _, err) = swarmnet(args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains("swarmnet lab up"), "{args:?}: {err}");
    }
    // A named context that does not exist.
    let (code, _, err) = swarmnet(&["--context", "nope", "node", "ls"]);
    assert_eq!(code, 1);
    assert!(err.contains("\"nope\" does not exist"), "{err}");
}

#[test]
fn bad_values_are_usage_errors() {
    usage_error(
        &["network", "create", "--subnet", "10.0.0.0/33", "x"],
        "--subnet",
    );
    usage_error(
        &["service", "create", "--name", "w", "-p", "80", "--", "x"],
        "PUBLISHED:TARGET",
    );
    usage_error(
        &[
            "service",
            "create",
            "--name",
            "w",
            "--constraint",
            "node.zone==a",
            "--",
            "x",
        ],
        "unknown key",
    );
    usage_error(&["service", "scale", "web"], "SERVICE=REPLICAS");
    usage_error(
        &["node", "update", "--availability", "gone", "n1"],
        "possible values",
    );
}

#[test]
fn completions_for_every_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = swarmnet(&["completion", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        for word in ["swarmnet", "lab", "exec", "format"] {
            assert!(out.contains(word), "{shell} completion lacks {word:?}");
        }
    }
}

#[test]
fn help_and_version_exit_0() {
    let (code, out, _) = swarmnet(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("lab"), "{out}");
    let (code, out, _) = swarmnet(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("swarmnet "), "{out}");
}
