//! Placement constraints, in Swarm's syntax: `node.id==n1`, `node.hostname!=h`,
//! `node.role==manager`, `node.labels.zone==east`. Parsed once when a service is created or
//! updated, so a typo is refused then rather than leaving the service's tasks pending forever.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use swarmnet_model::spec::NodeRole;

use crate::state::Node;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConstraintKey {
    Id,
    Hostname,
    Role,
    Label(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Constraint {
    pub key: ConstraintKey,
    pub equal: bool,
    pub value: String,
}

/// A constraint that does not parse, with what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("constraint {input:?} is invalid: {reason}")]
pub struct ConstraintError {
    pub input: String,
    pub reason: String,
}

impl FromStr for Constraint {
    type Err = ConstraintError;

    fn from_str(input: &str) -> Result<Self, ConstraintError> {
        let err = |reason: &str| ConstraintError {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let (lhs, rhs, equal) = if let Some((l, r)) = input.split_once("!=") {
            (l, r, false)
        } else if let Some((l, r)) = input.split_once("==") {
            (l, r, true)
        } else {
            return Err(err("expected KEY==VALUE or KEY!=VALUE"));
        };
        let (lhs, value) = (lhs.trim(), rhs.trim());
        if value.is_empty() {
            return Err(err("the value is empty"));
        }
        let key = match lhs {
            "node.id" => ConstraintKey::Id,
            "node.hostname" => ConstraintKey::Hostname,
            "node.role" => {
                if value != "manager" && value != "worker" {
                    return Err(err("node.role is \"manager\" or \"worker\""));
                }
                ConstraintKey::Role
            }
            l => match l.strip_prefix("node.labels.") {
                Some(label) if !label.is_empty() => ConstraintKey::Label(label.to_string()),
                _ => {
                    return Err(err(
                        "the key is one of node.id, node.hostname, node.role, node.labels.<label>",
                    ));
                }
            },
        };
        Ok(Self {
            key,
            equal,
            value: value.to_string(),
        })
    }
}

impl TryFrom<String> for Constraint {
    type Error = ConstraintError;
    fn try_from(s: String) -> Result<Self, ConstraintError> {
        s.parse()
    }
}

impl From<Constraint> for String {
    fn from(c: Constraint) -> String {
        c.to_string()
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = match &self.key {
            ConstraintKey::Id => "node.id".to_string(),
            ConstraintKey::Hostname => "node.hostname".to_string(),
            ConstraintKey::Role => "node.role".to_string(),
            ConstraintKey::Label(l) => format!("node.labels.{l}"),
        };
        let op = if self.equal { "==" } else { "!=" };
        write!(f, "{key}{op}{}", self.value)
    }
}

impl Constraint {
    /// Whether the node satisfies this constraint. A missing label is "not equal".
    pub fn matches(&self, node: &Node) -> bool {
        let actual: Option<&str> = match &self.key {
            ConstraintKey::Id => Some(node.id.as_str()),
            ConstraintKey::Hostname => Some(node.hostname.as_str()),
            ConstraintKey::Role => Some(match node.role {
                NodeRole::Manager => "manager",
                NodeRole::Worker => "worker",
            }),
            ConstraintKey::Label(l) => node.labels.get(l).map(String::as_str),
        };
        (actual == Some(self.value.as_str())) == self.equal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print_round_trip() {
        for s in [
            "node.id==n1",
            "node.hostname!=box",
            "node.role==manager",
            "node.labels.zone==east",
        ] {
            let c: Constraint = s.parse().unwrap();
            assert_eq!(c.to_string(), s);
        }
        let c: Constraint = " node.labels.zone == east ".parse().unwrap();
        assert_eq!(c.key, ConstraintKey::Label("zone".into()));
        assert_eq!(c.value, "east");
    }

    #[test]
    fn parse_errors_say_what_is_expected() {
        let e = "node.id=n1".parse::<Constraint>().unwrap_err();
        assert!(e.to_string().contains("KEY==VALUE"), "{e}");
        let e = "node.colour==red".parse::<Constraint>().unwrap_err();
        assert!(e.to_string().contains("node.labels.<label>"), "{e}");
        let e = "node.role==boss".parse::<Constraint>().unwrap_err();
        assert!(e.to_string().contains("\"manager\" or \"worker\""), "{e}");
        assert!("node.labels.==x".parse::<Constraint>().is_err());
        assert!("node.id==".parse::<Constraint>().is_err());
    }
}
