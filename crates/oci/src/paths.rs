//! Masked and read-only paths under `/proc` and `/sys`.

/// Paths hidden from unprivileged containers (containerd's defaults).
pub const DEFAULT_MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
];

/// Paths made read-only for unprivileged containers (containerd's defaults).
pub const DEFAULT_READONLY: &[&str] =
    &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// `(masked, readonly)` paths: none for privileged containers; else the kubelet's lists when
/// it sent any (it sends containerd's defaults for `procMount: Default`), else the defaults.
///
/// Protobuf cannot tell an empty list from an absent one, so an `Unmasked` proc mount (empty
/// lists) also gets the defaults here, as it does with containerd over gRPC.
pub fn masked_and_readonly(
    privileged: bool,
    masked: &[String],
    readonly: &[String],
) -> (Vec<String>, Vec<String>) {
    if privileged {
        return (Vec::new(), Vec::new());
    }
    let pick = |given: &[String], default: &[&str]| {
        if given.is_empty() {
            default.iter().map(|s| s.to_string()).collect()
        } else {
            given.to_vec()
        }
    };
    (pick(masked, DEFAULT_MASKED), pick(readonly, DEFAULT_READONLY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_override_and_privileged() {
        let (m, r) = masked_and_readonly(false, &[], &[]);
        assert_eq!(m.len(), DEFAULT_MASKED.len());
        assert!(m.contains(&"/sys/devices/virtual/powercap".to_string()));
        assert_eq!(r, DEFAULT_READONLY);
        let (m, r) = masked_and_readonly(false, &["/proc/x".into()], &[]);
        assert_eq!(m, vec!["/proc/x"]);
        assert_eq!(r.len(), DEFAULT_READONLY.len());
        let (m, r) = masked_and_readonly(true, &["/proc/x".into()], &["/proc/y".into()]);
        assert!(m.is_empty() && r.is_empty());
    }
}
