//! The CLI's one error type. Every variant carries what went wrong as fields and renders a
//! message that says what to do; [`CliError::exit_code`] classifies it into the exit codes the
//! CLI promises: 0 ok, 1 the operation failed, 2 the command line was wrong (clap's own usage
//! errors exit 2 as well).

use std::path::PathBuf;

/// Exit code of a command that ran and failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit code of a command line that cannot be run as written.
pub const EXIT_USAGE: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An argument was syntactically accepted by the parser but makes no sense.
    #[error("{what}\n  hint: {hint}")]
    Usage { what: String, hint: String },

    /// No context names a manager to talk to.
    #[error(
        "no cluster to talk to: {why}\n  hint: start a local one with `swarmnet lab up`, create \
         one on this host with `swarmnet cluster init`, or name one with --context NAME (or \
         SWARMNET_CONTEXT)"
    )]
    NoContext { why: String },

    /// A context file exists but cannot be read.
    #[error("context {name:?} ({}): {source}\n  hint: remove the file or run `swarmnet lab up` again", path.display())]
    BadContext {
        name: String,
        path: PathBuf,
        #[source]
        source: anyhow::Error,
    },

    /// Every manager of the context failed to answer.
    #[error(
        "no manager answered ({tried}): {last}\n  hint: check `swarmnet lab status`; a majority of \
         managers must be up for writes"
    )]
    Unavailable { tried: String, last: String },

    /// The manager refused the request; `code` is the gRPC status class.
    #[error("{message}{}", hint_for(*code))]
    Refused { code: RefusalKind, message: String },

    /// `service create` / `scale` gave up waiting for the tasks to run.
    #[error(
        "service {service}: not every task runs after {}s: {stuck}\n  hint: the service exists \
         and keeps trying; see `swarmnet service ps {service}` and `swarmnet inspect service \
         {service}`",
        waited.as_secs()
    )]
    TasksNotRunning {
        service: String,
        waited: std::time::Duration,
        stuck: String,
    },

    /// A lab operation failed (building namespaces, starting processes, tearing down).
    #[error("lab {lab:?}: {source:#}\n  hint: {hint}")]
    Lab {
        lab: String,
        hint: String,
        #[source]
        source: anyhow::Error,
    },

    /// A node's netd could not be asked.
    #[error("netd on {node}: {source:#}\n  hint: is netd running there? see `swarmnet lab status`")]
    Netd {
        node: String,
        #[source]
        source: anyhow::Error,
    },

    /// `cluster init|join|leave` on this host failed.
    #[error("{source:#}\n  hint: {hint}")]
    Host {
        hint: String,
        #[source]
        source: anyhow::Error,
    },

    /// Writing output or another local I/O failure.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// How a manager refused a request (the gRPC status codes the API uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    Other,
}

fn hint_for(kind: RefusalKind) -> &'static str {
    match kind {
        RefusalKind::NotFound => {
            "\n  hint: list what exists with `ls` (e.g. `swarmnet service ls`)"
        }
        RefusalKind::AlreadyExists => "\n  hint: pick another name, or remove the old one first",
        RefusalKind::InvalidArgument => "\n  hint: see `swarmnet <command> --help` for the syntax",
        RefusalKind::FailedPrecondition => {
            "\n  hint: remove what still uses it first (see `swarmnet inspect`)"
        }
        RefusalKind::Other => "",
    }
}

impl CliError {
    pub fn usage(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Usage {
            what: what.into(),
            hint: hint.into(),
        }
    }

    pub fn lab(lab: &str, hint: impl Into<String>, source: anyhow::Error) -> Self {
        Self::Lab {
            lab: lab.to_owned(),
            hint: hint.into(),
            source,
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// The exit code for this error: 2 for usage mistakes (including a refusal of an argument
    /// the manager found invalid), 1 for everything that failed while running.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Usage { .. } => EXIT_USAGE,
            Self::Refused {
                code: RefusalKind::InvalidArgument,
                ..
            } => EXIT_USAGE,
            _ => EXIT_FAILED,
        }
    }
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;
