//! How low a container's `oom_score_adj` may go. Lowering a process's `oom_score_adj` below
//! its parent's needs CAP_SYS_RESOURCE; without it (an unprivileged or restricted node, like
//! containerd's `restrict_oom_score_adj`) the runtime's write fails and so would every
//! container the kubelet gives a negative score (Guaranteed pods get -997). berth clamps such
//! values to its own score instead of failing the container.

/// CAP_SYS_RESOURCE's bit in the capability sets.
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether the effective set in a `/proc/<pid>/status` text holds CAP_SYS_RESOURCE.
fn has_sys_resource(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// The lowest `oom_score_adj` containers can be given: berthd's own when it lacks
/// CAP_SYS_RESOURCE, `None` (no limit) when it has it or the facts cannot be read.
pub(crate) fn floor() -> Option<i32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    if has_sys_resource(&status) {
        return None;
    }
    let own = std::fs::read_to_string("/proc/self/oom_score_adj").ok()?;
    own.trim().parse().ok()
}

/// `requested` raised to `floor` where it would go below it.
pub(crate) fn clamp(requested: i32, floor: Option<i32>) -> i32 {
    match floor {
        Some(floor) if requested < floor => floor,
        _ => requested,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_set() {
        assert!(has_sys_resource("Name:\tx\nCapEff:\t000001ffffffffff\n"));
        assert!(!has_sys_resource("Name:\tx\nCapEff:\t000001fffeffffff\n"));
        assert!(!has_sys_resource("Name:\tx\n"));
    }

    #[test]
    fn clamps_only_below_the_floor() {
        assert_eq!(clamp(-997, Some(0)), 0);
        assert_eq!(clamp(1000, Some(0)), 1000);
        assert_eq!(clamp(-997, None), -997);
        assert_eq!(clamp(-999, Some(-500)), -500);
    }
}
