//! What the kernel VM lane (`scripts/vm-lane.sh`, docs/vm-lane.md) tells the tests it runs.
//!
//! The lane boots Debian's stock kernel under qemu, mostly in software emulation (TCG), where
//! starting a process or a netd round takes several times longer than on the host. Bounds that
//! are behaviour ("a refusal comes at once", not "within a connect timeout") stay meaningful
//! only if they grow with the emulation: the lane sets `SWARMNET_TIME_SCALE` and tests apply
//! [`scaled`] to such bounds. Outside the lane the scale is 1 and every bound is the issue's.

use std::time::Duration;

fn set(k: &str) -> bool {
    std::env::var(k)
        .map(|v| !v.is_empty() && v != "0" && v != "false")
        .unwrap_or(false)
}

/// Whether this process runs inside the lane's VM (`SWARMNET_IN_VM`).
pub fn in_vm() -> bool {
    set("SWARMNET_IN_VM")
}

/// Whether the kernel must have IPVS (`SWARMNET_REQUIRE_IPVS`, set by the lane): tests that
/// would skip without it fail instead.
pub fn ipvs_required() -> bool {
    set("SWARMNET_REQUIRE_IPVS")
}

/// The factor for time bounds, `SWARMNET_TIME_SCALE` (1 to 20; 1 when unset or invalid).
pub fn time_scale() -> u32 {
    parse_scale(std::env::var("SWARMNET_TIME_SCALE").ok().as_deref())
}

fn parse_scale(v: Option<&str>) -> u32 {
    v.and_then(|v| v.trim().parse::<u32>().ok())
        .map_or(1, |s| s.clamp(1, 20))
}

/// `bound` times [`time_scale`].
pub fn scaled(bound: Duration) -> Duration {
    bound * time_scale()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_parses_and_stays_within_1_to_20() {
        assert_eq!(parse_scale(None), 1);
        assert_eq!(parse_scale(Some("4")), 4);
        assert_eq!(parse_scale(Some(" 6 ")), 6);
        assert_eq!(parse_scale(Some("0")), 1);
        assert_eq!(parse_scale(Some("500")), 20);
        assert_eq!(parse_scale(Some("slow")), 1);
    }
}
