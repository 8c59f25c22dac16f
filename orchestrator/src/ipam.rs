//! IPAM: pure allocation of overlay subnets from an address pool, of VXLAN network identifiers,
//! of addresses inside one subnet, and of published ports. No I/O and no clock: the same calls
//! in the same order give the same answers on every manager, which is what a Raft state machine
//! needs.
//!
//! Invariants:
//! - a subnet handed out by [`carve`] overlaps no subnet in use;
//! - an address is in use at most once per network ([`Addresses`] refuses a second reservation);
//! - a released address can be allocated again (allocation walks the whole subnet, starting
//!   after the last address handed out so a just-released address is not reused at once while
//!   others are free: a task that is still stopping on its old node keeps its address a while).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Lowest VNI the orchestrator hands out (below it: reserved for static or local use, as in
/// Docker, whose overlay driver also starts at 4096).
pub const VNI_MIN: u32 = 4096;
/// Highest VNI (24 bits).
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// Published ports the orchestrator picks from when a service asks for one without a number
/// (Swarm's dynamic range).
pub const DYNAMIC_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

/// Where network subnets come from when a create names none: `base` cut into `/size` blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub base: Ipv4Net,
    pub size: u8,
}

impl Default for PoolConfig {
    /// Docker's default: 10.0.0.0/8 in /24s.
    fn default() -> Self {
        Self {
            base: Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8).expect("valid"),
            size: 24,
        }
    }
}

impl PoolConfig {
    /// Checks the pool can be carved: `size` at least the base's prefix and a usable /30 or
    /// larger, the base without host bits.
    pub fn validate(&self) -> Result<(), String> {
        if self.base != self.base.trunc() {
            return Err(format!(
                "pool {} has host bits set; did you mean {}?",
                self.base,
                self.base.trunc()
            ));
        }
        if self.size < self.base.prefix_len() || self.size > 30 {
            return Err(format!(
                "subnet size /{} must be between /{} (the pool's own prefix) and /30",
                self.size,
                self.base.prefix_len()
            ));
        }
        Ok(())
    }
}

/// Whether two subnets share any address.
pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The first `/size` block of the pool that overlaps none of `taken`, or `None` when the pool is
/// full. Costs O(taken · log taken): it jumps past each block in use instead of trying every
/// candidate.
pub fn carve(pool: &PoolConfig, taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    let mut taken: Vec<(u32, u32)> = taken
        .iter()
        .map(|n| (u32::from(n.network()), u32::from(n.broadcast())))
        .collect();
    taken.sort_unstable();
    let block = 1u64 << (32 - u32::from(pool.size));
    let end = u64::from(u32::from(pool.base.broadcast()));
    let mut start = u64::from(u32::from(pool.base.network()));
    'candidate: while start + block - 1 <= end {
        let last = start + block - 1;
        for &(lo, hi) in &taken {
            let (lo, hi) = (u64::from(lo), u64::from(hi));
            if lo <= last && hi >= start {
                // Skip to the first block boundary past this subnet.
                start = (hi + 1).div_ceil(block) * block;
                continue 'candidate;
            }
        }
        let net = Ipv4Net::new(Ipv4Addr::from(start as u32), pool.size).expect("size checked");
        return Some(net);
    }
    None
}

/// The lowest VNI in `VNI_MIN..=VNI_MAX` not in `used`.
pub fn allocate_vni(used: &BTreeSet<u32>) -> Option<u32> {
    lowest_free(used, VNI_MIN, VNI_MAX)
}

/// The lowest value in `lo..=hi` not in `used`, walking runs of used values.
fn lowest_free(used: &BTreeSet<u32>, lo: u32, hi: u32) -> Option<u32> {
    let mut want = lo;
    for &v in used.range(lo..=hi) {
        if v > want {
            break;
        }
        want = v + 1;
    }
    (want <= hi).then_some(want)
}

/// The lowest port of [`DYNAMIC_PORTS`] not in `used`.
pub fn allocate_port(used: &BTreeSet<u16>) -> Option<u16> {
    DYNAMIC_PORTS.clone().find(|p| !used.contains(p))
}

/// Why an address could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum AddressError {
    #[error("no free address in {subnet}: all {capacity} are in use")]
    Exhausted { subnet: Ipv4Net, capacity: u32 },
    #[error("{ip} is outside the subnet {subnet}")]
    OutsideSubnet { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("{ip} is the network or broadcast address of {subnet}")]
    Reserved { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("{ip} is already in use in {subnet}")]
    InUse { ip: Ipv4Addr, subnet: Ipv4Net },
}

/// The addresses in use in one subnet. Usable are all but the network and broadcast addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addresses {
    subnet: Ipv4Net,
    used: BTreeSet<Ipv4Addr>,
    /// The address after the one last allocated: the next search starts here.
    cursor: u32,
}

impl Addresses {
    /// An empty allocator. The subnet must be a /30 or larger (callers validate).
    pub fn new(subnet: Ipv4Net) -> Self {
        let subnet = subnet.trunc();
        Self {
            subnet,
            used: BTreeSet::new(),
            cursor: u32::from(subnet.network()) + 1,
        }
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    fn first(&self) -> u32 {
        u32::from(self.subnet.network()) + 1
    }

    fn last(&self) -> u32 {
        u32::from(self.subnet.broadcast()) - 1
    }

    /// How many addresses the subnet can hand out in all.
    pub fn capacity(&self) -> u32 {
        self.last() - self.first() + 1
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }

    pub fn is_used(&self, ip: Ipv4Addr) -> bool {
        self.used.contains(&ip)
    }

    pub fn used(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.used.iter().copied()
    }

    /// Takes the next free address, searching from the cursor to the end, then from the start.
    pub fn allocate(&mut self) -> Result<Ipv4Addr, AddressError> {
        let (first, last) = (self.first(), self.last());
        let cursor = self.cursor.clamp(first, last);
        let found = Self::free_in(&self.used, cursor, last)
            .or_else(|| Self::free_in(&self.used, first, cursor.saturating_sub(1).max(first)));
        let Some(ip) = found else {
            return Err(AddressError::Exhausted {
                subnet: self.subnet,
                capacity: self.capacity(),
            });
        };
        self.used.insert(ip);
        let next = u32::from(ip) + 1;
        self.cursor = if next > last { first } else { next };
        Ok(ip)
    }

    /// The lowest free address in `lo..=hi`, walking runs of used addresses in the ordered set.
    fn free_in(used: &BTreeSet<Ipv4Addr>, lo: u32, hi: u32) -> Option<Ipv4Addr> {
        let mut want = lo;
        for &ip in used.range(Ipv4Addr::from(lo)..=Ipv4Addr::from(hi)) {
            let ip = u32::from(ip);
            if ip > want {
                break;
            }
            want = ip + 1;
        }
        (want <= hi).then(|| Ipv4Addr::from(want))
    }

    /// Takes a given address (a gateway, a VIP or task address the user chose).
    pub fn reserve(&mut self, ip: Ipv4Addr) -> Result<(), AddressError> {
        if !self.subnet.contains(&ip) {
            return Err(AddressError::OutsideSubnet {
                ip,
                subnet: self.subnet,
            });
        }
        let n = u32::from(ip);
        if n < self.first() || n > self.last() {
            return Err(AddressError::Reserved {
                ip,
                subnet: self.subnet,
            });
        }
        if !self.used.insert(ip) {
            return Err(AddressError::InUse {
                ip,
                subnet: self.subnet,
            });
        }
        Ok(())
    }

    /// Gives an address back; returns whether it was in use.
    pub fn release(&mut self, ip: Ipv4Addr) -> bool {
        self.used.remove(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn carve_skips_taken_blocks_and_larger_subnets() {
        let pool = PoolConfig::default();
        assert_eq!(carve(&pool, &[]), Some(net("10.0.0.0/24")));
        assert_eq!(
            carve(&pool, &[net("10.0.0.0/24"), net("10.0.1.0/24")]),
            Some(net("10.0.2.0/24"))
        );
        // A user-given /16 inside the pool takes 256 blocks at once.
        assert_eq!(
            carve(&pool, &[net("10.0.0.0/16"), net("10.1.0.0/24")]),
            Some(net("10.1.1.0/24"))
        );
        // A small subnet in the middle of a block makes the whole block unusable.
        assert_eq!(
            carve(&pool, &[net("10.0.0.128/29")]),
            Some(net("10.0.1.0/24"))
        );
        // Subnets outside the pool do not matter.
        assert_eq!(
            carve(&pool, &[net("192.168.0.0/16")]),
            Some(net("10.0.0.0/24"))
        );
    }

    #[test]
    fn carve_reports_a_full_pool() {
        let pool = PoolConfig {
            base: net("10.9.0.0/23"),
            size: 24,
        };
        assert_eq!(
            carve(&pool, &[net("10.9.0.0/24")]),
            Some(net("10.9.1.0/24"))
        );
        assert_eq!(
            carve(&pool, &[net("10.9.0.0/24"), net("10.9.1.0/24")]),
            None
        );
        assert_eq!(carve(&pool, &[net("10.0.0.0/8")]), None);
    }

    #[test]
    fn pool_validation() {
        assert!(PoolConfig::default().validate().is_ok());
        let bad = PoolConfig {
            base: net("10.0.0.0/16"),
            size: 8,
        };
        assert!(bad.validate().unwrap_err().contains("between /16"));
        let host_bits = PoolConfig {
            base: net("10.0.0.1/16"),
            size: 24,
        };
        assert!(host_bits.validate().unwrap_err().contains("10.0.0.0/16"));
    }

    #[test]
    fn overlap_is_symmetric() {
        assert!(overlaps(&net("10.0.0.0/8"), &net("10.1.2.0/24")));
        assert!(overlaps(&net("10.1.2.0/24"), &net("10.0.0.0/8")));
        assert!(!overlaps(&net("10.1.2.0/24"), &net("10.1.3.0/24")));
    }

    #[test]
    fn vnis_fill_gaps_and_end() {
        let mut used = BTreeSet::new();
        assert_eq!(allocate_vni(&used), Some(4096));
        used.extend([4096, 4097, 4099, 12]);
        assert_eq!(allocate_vni(&used), Some(4098));
        used.insert(4098);
        assert_eq!(allocate_vni(&used), Some(4100));
        // The end of the range, on a small range (the real one holds 16M values).
        let full: BTreeSet<u32> = (10..=20).collect();
        assert_eq!(lowest_free(&full, 10, 20), None);
        assert_eq!(lowest_free(&full, 10, 21), Some(21));
    }

    #[test]
    fn ports_from_the_dynamic_range() {
        let mut used: BTreeSet<u16> = [8080, 30000, 30001].into();
        assert_eq!(allocate_port(&used), Some(30002));
        used.extend(DYNAMIC_PORTS);
        assert_eq!(allocate_port(&used), None);
    }

    #[test]
    fn addresses_exhaust_and_reuse() {
        let mut a = Addresses::new(net("10.0.0.0/29"));
        assert_eq!(a.capacity(), 6);
        a.reserve(ip("10.0.0.1")).unwrap();
        let got: Vec<_> = (0..5).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(got[0], ip("10.0.0.2"));
        assert_eq!(got[4], ip("10.0.0.6"));
        assert_eq!(
            a.allocate().unwrap_err(),
            AddressError::Exhausted {
                subnet: net("10.0.0.0/29"),
                capacity: 6
            }
        );
        assert!(a.release(ip("10.0.0.4")));
        assert!(!a.release(ip("10.0.0.4")));
        assert_eq!(a.allocate().unwrap(), ip("10.0.0.4"));
    }

    #[test]
    fn allocation_does_not_reuse_a_released_address_at_once() {
        let mut a = Addresses::new(net("10.0.0.0/24"));
        let x = a.allocate().unwrap();
        let y = a.allocate().unwrap();
        a.release(x);
        let z = a.allocate().unwrap();
        assert_ne!(z, x);
        assert_eq!(u32::from(z), u32::from(y) + 1);
    }

    #[test]
    fn reserve_refuses_what_cannot_be_had() {
        let mut a = Addresses::new(net("10.0.0.0/30"));
        assert!(matches!(
            a.reserve(ip("10.0.1.1")),
            Err(AddressError::OutsideSubnet { .. })
        ));
        assert!(matches!(
            a.reserve(ip("10.0.0.0")),
            Err(AddressError::Reserved { .. })
        ));
        assert!(matches!(
            a.reserve(ip("10.0.0.3")),
            Err(AddressError::Reserved { .. })
        ));
        a.reserve(ip("10.0.0.2")).unwrap();
        assert!(matches!(
            a.reserve(ip("10.0.0.2")),
            Err(AddressError::InUse { .. })
        ));
        assert_eq!(a.allocate().unwrap(), ip("10.0.0.1"));
        assert!(a.allocate().is_err());
    }
}
