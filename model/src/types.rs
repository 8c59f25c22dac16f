//! Validated newtypes. Each one parses from its raw form (a string or a number) and refuses
//! anything the kernel or the cluster would refuse later, so an invalid value cannot exist.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a single value was refused. Carries the offending input so the message can name it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {input:?} is invalid: {reason}")]
pub struct ValueError {
    pub what: &'static str,
    pub input: String,
    pub reason: String,
}

impl ValueError {
    fn new(what: &'static str, input: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            what,
            input: input.into(),
            reason: reason.into(),
        }
    }
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident, $what:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self, ValueError> {
                let s = s.into();
                let check: fn(&str) -> Result<(), String> = $check;
                check(&s).map_err(|reason| ValueError::new($what, s.clone(), reason))?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = ValueError;
            fn try_from(s: String) -> Result<Self, ValueError> {
                Self::new(s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl FromStr for $name {
            type Err = ValueError;
            fn from_str(s: &str) -> Result<Self, ValueError> {
                Self::new(s)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

/// Names and ids share one alphabet: a DNS-friendly label of lowercase letters, digits, `-` and
/// `_`, starting with a letter or digit. They appear in DNS answers, netns file names and logs.
fn check_label(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > max {
        return Err(format!("is {} bytes long, the limit is {max}", s.len()));
    }
    let first = s.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err("must start with a lowercase letter or a digit".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(format!("contains {c:?}; allowed are a-z, 0-9, '-' and '_'"));
    }
    Ok(())
}

string_newtype!(
    /// A node's stable identifier (also used in file names under the run directory).
    NodeId,
    "node id",
    |s| check_label(s, 63)
);
string_newtype!(
    /// Name of a network, service or alias; it is what DNS answers for, so it is a DNS label.
    Name,
    "name",
    |s| check_label(s, 63)
);
string_newtype!(
    /// A task's identifier; task DNS names are `<service>.<slot>.<task-id>`.
    TaskId,
    "task id",
    |s| check_label(s, 63)
);
string_newtype!(
    /// A Linux interface name: 1..=15 bytes (IFNAMSIZ − 1), no '/', ':', whitespace, not "." or "..".
    IfName,
    "interface name",
    |s| {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > 15 {
            return Err(format!("is {} bytes long, Linux allows at most 15", s.len()));
        }
        if s == "." || s == ".." {
            return Err("is reserved".into());
        }
        if let Some(c) = s.chars().find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(format!("contains {c:?}, which Linux refuses in interface names"));
        }
        Ok(())
    }
);

/// A VXLAN network identifier: 1..=2^24−1 (0 is reserved by convention, the field is 24 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u32")]
pub struct Vni(u32);

impl Vni {
    pub const MAX: u32 = (1 << 24) - 1;
    pub fn new(v: u64) -> Result<Self, ValueError> {
        if v == 0 || v > u64::from(Self::MAX) {
            return Err(ValueError::new(
                "VNI",
                v.to_string(),
                format!("must be in 1..={}", Self::MAX),
            ));
        }
        Ok(Self(v as u32))
    }
    pub fn get(self) -> u32 {
        self.0
    }
}
impl TryFrom<u64> for Vni {
    type Error = ValueError;
    fn try_from(v: u64) -> Result<Self, ValueError> {
        Self::new(v)
    }
}
impl From<Vni> for u32 {
    fn from(v: Vni) -> u32 {
        v.0
    }
}
impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An interface MTU. 68 is the IPv4 minimum (RFC 791); 65535 is what the field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Mtu(u16);

impl Mtu {
    pub fn new(v: u32) -> Result<Self, ValueError> {
        if !(68..=65535).contains(&v) {
            return Err(ValueError::new(
                "MTU",
                v.to_string(),
                "must be in 68..=65535",
            ));
        }
        Ok(Self(v as u16))
    }
    pub fn get(self) -> u16 {
        self.0
    }
}
impl TryFrom<u32> for Mtu {
    type Error = ValueError;
    fn try_from(v: u32) -> Result<Self, ValueError> {
        Self::new(v)
    }
}
impl From<Mtu> for u32 {
    fn from(v: Mtu) -> u32 {
        u32::from(v.0)
    }
}
impl fmt::Display for Mtu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An Ethernet address, written `02:42:0a:00:00:02`. Must be unicast.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    pub fn new(octets: [u8; 6]) -> Result<Self, ValueError> {
        let m = Self(octets);
        if octets[0] & 1 == 1 {
            return Err(ValueError::new(
                "MAC address",
                m.to_string(),
                "is a multicast address",
            ));
        }
        if octets == [0; 6] {
            return Err(ValueError::new(
                "MAC address",
                m.to_string(),
                "is all zeros",
            ));
        }
        Ok(m)
    }
    /// Docker's convention: `02:42` followed by the IPv4 address. Locally administered, unicast,
    /// and unique wherever the address is.
    pub fn from_ipv4(ip: std::net::Ipv4Addr) -> Self {
        let o = ip.octets();
        Self([0x02, 0x42, o[0], o[1], o[2], o[3]])
    }
    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}
impl FromStr for MacAddr {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bad = || {
            ValueError::new(
                "MAC address",
                s,
                "expected six hex octets like 02:42:0a:00:00:02",
            )
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_parse| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Self::new(out)
    }
}
impl TryFrom<String> for MacAddr {
    type Error = ValueError;
    fn try_from(s: String) -> Result<Self, ValueError> {
        s.parse()
    }
}
impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}
impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            o[0], o[1], o[2], o[3], o[4], o[5]
        )
    }
}
impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A duration written the way operators write them: `500ms`, `5s`, `1m30s`, `1.5s`, `2h`
/// (units `ms`, `s`, `m`, `h`; a bare `0` is zero). Serialized in the same form.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct HumanDuration(std::time::Duration);

impl HumanDuration {
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }
    pub fn get(self) -> std::time::Duration {
        self.0
    }
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl FromStr for HumanDuration {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bad = |why: &str| ValueError::new("duration", s, why);
        let t = s.trim();
        if t.is_empty() {
            return Err(bad("is empty; write it like 500ms, 5s, 1m30s"));
        }
        if t == "0" {
            return Ok(Self(std::time::Duration::ZERO));
        }
        let mut total_ms: f64 = 0.0;
        let mut rest = t;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| bad("a number needs a unit: ms, s, m or h"))?;
            if num_len == 0 {
                return Err(bad("expected a number like 5s or 1m30s"));
            }
            let n: f64 = rest[..num_len]
                .parse()
                .map_err(|e| bad(&format!("expected a number like 5s or 1m30s ({e})")))?;
            rest = &rest[num_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let scale = match &rest[..unit_len] {
                "ms" => 1.0,
                "s" => 1_000.0,
                "m" => 60_000.0,
                "h" => 3_600_000.0,
                u => {
                    return Err(bad(&format!("unknown unit {u:?}; use ms, s, m or h")));
                }
            };
            rest = &rest[unit_len..];
            total_ms += n * scale;
        }
        // A week is far beyond any health-check setting; it also keeps the arithmetic exact.
        if total_ms > 7.0 * 86_400_000.0 {
            return Err(bad("is longer than a week"));
        }
        Ok(Self(std::time::Duration::from_micros(
            (total_ms * 1000.0).round() as u64,
        )))
    }
}
impl TryFrom<String> for HumanDuration {
    type Error = ValueError;
    fn try_from(s: String) -> Result<Self, ValueError> {
        s.parse()
    }
}
impl From<HumanDuration> for String {
    fn from(d: HumanDuration) -> String {
        d.to_string()
    }
}
impl From<std::time::Duration> for HumanDuration {
    fn from(d: std::time::Duration) -> Self {
        Self(d)
    }
}
impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        let (h, m, s, r) = (
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1_000 % 60,
            ms % 1_000,
        );
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 {
            write!(f, "{s}s")?;
        }
        if r > 0 {
            write!(f, "{r}ms")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_limits() {
        assert!(IfName::new("eth0").is_ok());
        assert!(IfName::new("a234567890abcde").is_ok());
        let e = IfName::new("a234567890abcdef").unwrap_err();
        assert!(
            e.to_string()
                .contains("16 bytes long, Linux allows at most 15"),
            "{e}"
        );
        assert!(IfName::new("a/b").is_err());
        assert!(IfName::new("").is_err());
        assert!(IfName::new("..").is_err());
    }

    #[test]
    fn vni_range() {
        assert!(Vni::new(0).is_err());
        assert_eq!(Vni::new(1).unwrap().get(), 1);
        assert_eq!(Vni::new(16_777_215).unwrap().get(), 16_777_215);
        assert!(
            Vni::new(16_777_216)
                .unwrap_err()
                .to_string()
                .contains("1..=16777215")
        );
    }

    #[test]
    fn mac_parse_roundtrip() {
        let m: MacAddr = "02:42:0a:00:00:02".parse().unwrap();
        assert_eq!(m.to_string(), "02:42:0a:00:00:02");
        assert_eq!(MacAddr::from_ipv4("10.0.0.2".parse().unwrap()), m);
        assert!("01:00:5e:00:00:01".parse::<MacAddr>().is_err());
        assert!("02:42:0a:00:00".parse::<MacAddr>().is_err());
        assert!("02:42:0a:00:00:02:03".parse::<MacAddr>().is_err());
        assert!("zz:42:0a:00:00:02".parse::<MacAddr>().is_err());
    }

    #[test]
    fn durations_parse_and_print() {
        let d = |s: &str| s.parse::<HumanDuration>().map(|d| d.get().as_millis());
        assert_eq!(d("500ms").unwrap(), 500);
        assert_eq!(d("5s").unwrap(), 5000);
        assert_eq!(d("1.5s").unwrap(), 1500);
        assert_eq!(d("1m30s").unwrap(), 90_000);
        assert_eq!(d("0").unwrap(), 0);
        assert_eq!(
            "1m30s".parse::<HumanDuration>().unwrap().to_string(),
            "1m30s"
        );
        assert_eq!(
            "1500ms".parse::<HumanDuration>().unwrap().to_string(),
            "1s500ms"
        );
        for bad in ["", "5", "5x", "s", "-1s", "1..5s", "200h"] {
            let e = bad.parse::<HumanDuration>().unwrap_err();
            assert!(e.to_string().starts_with("duration"), "{bad}: {e}");
        }
        assert!(
            d("5x")
                .unwrap_err()
                .to_string()
                .contains("unknown unit \"x\"")
        );
    }

    #[test]
    fn labels() {
        assert!(Name::new("web").is_ok());
        assert!(Name::new("Web").is_err());
        assert!(Name::new("-web").is_err());
        assert!(Name::new("we.b").is_err());
        assert!(Name::new("a".repeat(64)).is_err());
    }
}
