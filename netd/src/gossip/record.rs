//! Compact gossip records (pure): what one node publishes in its chitchat state.
//!
//! | key | value |
//! |---|---|
//! | `ep/<network>/<task>` | `1 <ip> <mac> <service or -> <health>` |
//! | `vtep` | `1 <underlay ip>` |
//!
//! The leading `1` is the record format version; a value with another version is refused
//! (counted by the table merge), so a newer format can be rolled out by publishing both keys.
//! Fields are separated by one space; every field is a validated model type whose alphabet has
//! no space or `/`, so the encoding is unambiguous. Health is `h` (healthy), `u` (unhealthy)
//! or `s` (starting).

use std::fmt;
use std::net::IpAddr;

use swarmnet_model::{MacAddr, Name, TaskId, ValueError};

/// Prefix of endpoint keys.
pub const EP_PREFIX: &str = "ep/";
/// Key of the node's VTEP record.
pub const VTEP_KEY: &str = "vtep";
const VERSION: &str = "1";

/// A task's health as its node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    Healthy,
    Unhealthy,
    Starting,
}

impl Health {
    fn code(self) -> &'static str {
        match self {
            Health::Healthy => "h",
            Health::Unhealthy => "u",
            Health::Starting => "s",
        }
    }
}

/// One live endpoint: a task attached to a network on the publishing node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointRecord {
    pub network: Name,
    pub task: TaskId,
    pub ip: IpAddr,
    pub mac: MacAddr,
    pub service: Option<Name>,
    pub health: Health,
}

/// Why a key/value pair is not a valid record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("key {key:?} is not `ep/<network>/<task>` or `vtep`")]
    BadKey { key: String },
    #[error("record {key:?} has format version {version:?}; this node reads version 1")]
    UnknownVersion { key: String, version: String },
    #[error("record {key:?}: expected {expected} fields, got {got}")]
    FieldCount {
        key: String,
        expected: usize,
        got: usize,
    },
    #[error("record {key:?}: bad {field} {value:?}")]
    BadField {
        key: String,
        field: &'static str,
        value: String,
    },
    #[error("record {key:?}: bad address {value:?}")]
    BadAddr {
        key: String,
        value: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("record {key:?}: {source}")]
    BadValue {
        key: String,
        #[source]
        source: ValueError,
    },
}

impl EndpointRecord {
    /// The chitchat key of this endpoint.
    pub fn key(&self) -> String {
        endpoint_key(&self.network, &self.task)
    }

    /// The chitchat value of this endpoint.
    pub fn value(&self) -> String {
        format!(
            "{VERSION} {} {} {} {}",
            self.ip,
            self.mac,
            self.service.as_ref().map(Name::as_str).unwrap_or("-"),
            self.health.code()
        )
    }

    /// Decodes a key/value pair; `Ok(None)` when the key is not an endpoint key.
    pub fn decode(key: &str, value: &str) -> Result<Option<Self>, RecordError> {
        let Some(rest) = key.strip_prefix(EP_PREFIX) else {
            return Ok(None);
        };
        let bad_key = || RecordError::BadKey { key: key.into() };
        let (network, task) = rest.split_once('/').ok_or_else(bad_key)?;
        let bad_value = |source| RecordError::BadValue {
            key: key.into(),
            source,
        };
        let network = Name::new(network).map_err(bad_value)?;
        let task = TaskId::new(task).map_err(bad_value)?;
        let fields: Vec<&str> = value.split(' ').collect();
        check_version(key, &fields)?;
        if fields.len() != 5 {
            return Err(RecordError::FieldCount {
                key: key.into(),
                expected: 5,
                got: fields.len(),
            });
        }
        let bad_field = |field: &'static str, value: &str| RecordError::BadField {
            key: key.into(),
            field,
            value: value.into(),
        };
        let ip = fields[1].parse().map_err(|source| RecordError::BadAddr {
            key: key.into(),
            value: fields[1].into(),
            source,
        })?;
        let mac = fields[2].parse().map_err(bad_value)?;
        let service = match fields[3] {
            "-" => None,
            s => Some(Name::new(s).map_err(bad_value)?),
        };
        let health = match fields[4] {
            "h" => Health::Healthy,
            "u" => Health::Unhealthy,
            "s" => Health::Starting,
            other => return Err(bad_field("health", other)),
        };
        Ok(Some(EndpointRecord {
            network,
            task,
            ip,
            mac,
            service,
            health,
        }))
    }
}

/// The key of an endpoint.
pub fn endpoint_key(network: &Name, task: &TaskId) -> String {
    format!("{EP_PREFIX}{network}/{task}")
}

/// The value of the `vtep` key.
pub fn encode_vtep(addr: IpAddr) -> String {
    format!("{VERSION} {addr}")
}

/// Decodes the value of the `vtep` key.
pub fn decode_vtep(value: &str) -> Result<IpAddr, RecordError> {
    let fields: Vec<&str> = value.split(' ').collect();
    check_version(VTEP_KEY, &fields)?;
    if fields.len() != 2 {
        return Err(RecordError::FieldCount {
            key: VTEP_KEY.into(),
            expected: 2,
            got: fields.len(),
        });
    }
    fields[1].parse().map_err(|source| RecordError::BadAddr {
        key: VTEP_KEY.into(),
        value: fields[1].into(),
        source,
    })
}

fn check_version(key: &str, fields: &[&str]) -> Result<(), RecordError> {
    match fields.first() {
        Some(&VERSION) => Ok(()),
        v => Err(RecordError::UnknownVersion {
            key: key.into(),
            version: v.copied().unwrap_or("").into(),
        }),
    }
}

impl fmt::Display for EndpointRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key(), self.value())
    }
}
