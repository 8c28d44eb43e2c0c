//! Cgroup limits from `LinuxContainerResources`, and the ranges they must lie in.
//!
//! Out-of-range values are refused here, naming the field, rather than handed to the OCI
//! runtime, which fails the container later with its own words and the host's cgroup
//! paths. The ranges are the kernel's (and runc's), checked on this host with runc: a value
//! outside them never works, on any node.

use std::ops::RangeInclusive;

use k8s_cri::v1::LinuxContainerResources;
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxHugepageLimitBuilder, LinuxMemoryBuilder, LinuxResources,
    LinuxResourcesBuilder,
};

use crate::SpecError;
use crate::error::build_err;

/// `cpu.shares` (v1; runc maps it onto `cpu.weight` on v2): the kernel clamps to this range
/// and runc refuses what it did not get back. The kubelet never sends less than 2.
pub const CPU_SHARES: RangeInclusive<i64> = 2..=262_144;
/// The CFS period in µs: the kernel takes 1 ms to 1 s.
pub const CPU_PERIOD_US: RangeInclusive<i64> = 1_000..=1_000_000;
/// The CFS quota in µs: at least 1 ms (the kubelet's `MinQuotaPeriod`), at most the
/// kernel's `max_cfs_runtime` (2^44 - 1 µs).
pub const CPU_QUOTA_US: RangeInclusive<i64> = 1_000..=(1 << 44) - 1;
/// The smallest memory limit: `runc init` alone holds about 2 MiB when the limit is applied
/// (runc refuses limits below its usage, and 2 MiB gets it OOM-killed on the spot); Docker's
/// floor of 6 MiB leaves room for the process to start.
pub const MEMORY_LIMIT_MIN: i64 = 6 << 20;
/// `oom_score_adj`, as the kernel has it.
pub const OOM_SCORE_ADJ: RangeInclusive<i64> = -1000..=1000;
/// Highest CPU number a list may name: the kernel's largest `NR_CPUS` is 8192.
const MAX_CPU: u32 = 8191;
/// Highest memory node a list may name: `MAX_NUMNODES` is at most 1024.
const MAX_NODE: u32 = 1023;

/// A non-negative value as `u64`; 0 means "not specified" in the CRI.
fn positive(value: i64) -> Option<u64> {
    u64::try_from(value).ok().filter(|v| *v > 0)
}

/// `value` must be 0 (unset) or in `range`.
fn unset_or_in(
    field: &'static str,
    value: i64,
    range: &RangeInclusive<i64>,
    allowed: &'static str,
) -> Result<(), SpecError> {
    if value == 0 || range.contains(&value) {
        return Ok(());
    }
    Err(SpecError::InvalidResource { field, value, allowed })
}

/// A value for a message: quoted, and cut when it is long (requests can be megabytes).
fn shown(text: &str) -> String {
    const MAX: usize = 64;
    if text.len() <= MAX {
        return format!("{text:?}");
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &text[..end], text.len())
}

fn bad_text(field: &'static str, value: &str, reason: impl Into<String>) -> SpecError {
    SpecError::InvalidResourceText { field, value: shown(value), reason: reason.into() }
}

/// Parses a kernel CPU or memory-node list (`0-3,8,10-11`; a range may carry a stride,
/// `0-7:2/4`, as `bitmap_parselist` allows) into its inclusive ranges, each number at most
/// `max`. The reason is in words for an error message.
pub fn parse_cpu_list(text: &str, max: u32) -> Result<Vec<(u32, u32)>, String> {
    let number = |s: &str| -> Result<u32, String> {
        if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{} is not a number", shown(s)));
        }
        let n: u32 = s.parse().map_err(|_| format!("{} is not a number", shown(s)))?;
        if n > max {
            return Err(format!("{n} is above {max}"));
        }
        Ok(n)
    };
    let mut ranges = Vec::new();
    for item in text.split(',') {
        let (range, stride) = match item.split_once(':') {
            Some((range, stride)) => (range, Some(stride)),
            None => (item, None),
        };
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(range)?;
                (n, n)
            }
        };
        if first > last {
            return Err(format!("the range {first}-{last} runs backwards"));
        }
        if let Some(stride) = stride {
            let (used, group) = stride
                .split_once('/')
                .ok_or_else(|| format!("stride {} needs used/group", shown(stride)))?;
            let (used, group) = (number(used)?, number(group)?);
            if used == 0 || group == 0 || used > group {
                return Err(format!("stride {used}/{group} is not 1 <= used <= group"));
            }
        }
        ranges.push((first, last));
    }
    Ok(ranges)
}

/// A page size as the kubelet names hugepages: digits and `KB`, `MB`, `GB`, `TB` or `PB`
/// (`2MB`, `1GB`). runc puts it into a file name, so nothing else may pass.
fn valid_page_size(size: &str) -> bool {
    let digits = size.trim_end_matches(['K', 'M', 'G', 'T', 'P', 'B']);
    let unit = &size[digits.len()..];
    matches!(unit, "KB" | "MB" | "GB" | "TB" | "PB")
        && !digits.is_empty()
        && digits.len() <= 8
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// A cgroup v2 file name for `unified`: `<controller>.<name>`, never a path.
fn valid_unified_key(key: &str) -> bool {
    key.contains('.')
        && !key.starts_with('.')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks every field of `r` against the ranges the kernel and the OCI runtime accept
/// (0 leaves a number unset, as the kubelet sends it). Host-specific checks (are the CPUs
/// online?) are the caller's.
pub fn validate(r: &LinuxContainerResources) -> Result<(), SpecError> {
    unset_or_in("cpu_shares", r.cpu_shares, &CPU_SHARES, "2..=262144, or 0 for unset")?;
    unset_or_in("cpu_period", r.cpu_period, &CPU_PERIOD_US, "1000..=1000000 µs, or 0 for unset")?;
    if r.cpu_quota != -1 {
        unset_or_in(
            "cpu_quota",
            r.cpu_quota,
            &CPU_QUOTA_US,
            "1000..=17592186044415 µs, -1 for no limit, or 0 for unset",
        )?;
    }
    if r.memory_limit_in_bytes != 0 && r.memory_limit_in_bytes < MEMORY_LIMIT_MIN {
        return Err(SpecError::InvalidResource {
            field: "memory_limit_in_bytes",
            value: r.memory_limit_in_bytes,
            allowed: "at least 6291456 (6 MiB), or 0 for unset",
        });
    }
    // memory+swap: -1 is unlimited; a limit must hold the memory limit it adds to (the
    // kubelet sends the memory limit itself for "no swap", and 0 for both when unset).
    let swap = r.memory_swap_limit_in_bytes;
    if swap < -1 {
        return Err(SpecError::InvalidResource {
            field: "memory_swap_limit_in_bytes",
            value: swap,
            allowed: "-1 for unlimited, 0 for unset, or at least memory_limit_in_bytes",
        });
    }
    if swap > 0 && (r.memory_limit_in_bytes <= 0 || swap < r.memory_limit_in_bytes) {
        return Err(SpecError::InvalidResource {
            field: "memory_swap_limit_in_bytes",
            value: swap,
            allowed: "memory+swap needs memory_limit_in_bytes and must be at least it",
        });
    }
    unset_or_in("oom_score_adj", r.oom_score_adj, &OOM_SCORE_ADJ, "-1000..=1000")?;
    if !r.cpuset_cpus.is_empty() {
        parse_cpu_list(&r.cpuset_cpus, MAX_CPU)
            .map_err(|why| bad_text("cpuset_cpus", &r.cpuset_cpus, why))?;
    }
    if !r.cpuset_mems.is_empty() {
        parse_cpu_list(&r.cpuset_mems, MAX_NODE)
            .map_err(|why| bad_text("cpuset_mems", &r.cpuset_mems, why))?;
    }
    for h in &r.hugepage_limits {
        if !valid_page_size(&h.page_size) {
            return Err(bad_text(
                "hugepage_limits.page_size",
                &h.page_size,
                "want a size such as 2MB or 1GB",
            ));
        }
        if i64::try_from(h.limit).is_err() {
            return Err(bad_text(
                "hugepage_limits.limit",
                &h.limit.to_string(),
                "above 9223372036854775807",
            ));
        }
    }
    for key in r.unified.keys() {
        if !valid_unified_key(key) {
            return Err(bad_text("unified", key, "not a cgroup file name (<controller>.<name>)"));
        }
    }
    Ok(())
}

/// The OCI resources for `r`. Only what the kubelet set is written; devices are added by the
/// caller. Memory swap is set only when `memory_swap_limit_in_bytes` is given (so the
/// runtime's default applies otherwise). `unified` is refused on cgroup v1, where runc would
/// refuse it later with a vaguer message.
pub fn resources(
    r: &LinuxContainerResources,
    cgroup_v2: bool,
) -> Result<LinuxResources, SpecError> {
    validate(r)?;
    let mut cpu = LinuxCpuBuilder::default();
    let mut cpu_set = false;
    if let Some(shares) = positive(r.cpu_shares) {
        cpu = cpu.shares(shares);
        cpu_set = true;
    }
    if r.cpu_quota != 0 {
        cpu = cpu.quota(r.cpu_quota);
        cpu_set = true;
    }
    if let Some(period) = positive(r.cpu_period) {
        cpu = cpu.period(period);
        cpu_set = true;
    }
    if !r.cpuset_cpus.is_empty() {
        cpu = cpu.cpus(r.cpuset_cpus.clone());
        cpu_set = true;
    }
    if !r.cpuset_mems.is_empty() {
        cpu = cpu.mems(r.cpuset_mems.clone());
        cpu_set = true;
    }

    let mut mem = LinuxMemoryBuilder::default();
    let mut mem_set = false;
    if r.memory_limit_in_bytes > 0 {
        mem = mem.limit(r.memory_limit_in_bytes);
        mem_set = true;
    }
    if r.memory_swap_limit_in_bytes != 0 {
        mem = mem.swap(r.memory_swap_limit_in_bytes);
        mem_set = true;
    }

    let mut hugepages = Vec::with_capacity(r.hugepage_limits.len());
    for h in &r.hugepage_limits {
        // `validate` checked that the limit fits.
        let limit = i64::try_from(h.limit).unwrap_or(i64::MAX);
        hugepages.push(
            LinuxHugepageLimitBuilder::default()
                .page_size(h.page_size.clone())
                .limit(limit)
                .build()
                .map_err(build_err("hugepage limit"))?,
        );
    }

    let mut out = LinuxResourcesBuilder::default();
    if cpu_set {
        out = out.cpu(cpu.build().map_err(build_err("cpu resources"))?);
    }
    if mem_set {
        out = out.memory(mem.build().map_err(build_err("memory resources"))?);
    }
    if !hugepages.is_empty() {
        out = out.hugepage_limits(hugepages);
    }
    if !r.unified.is_empty() {
        if !cgroup_v2 {
            let mut keys: Vec<&String> = r.unified.keys().collect();
            keys.sort();
            return Err(SpecError::UnifiedOnCgroupV1 { key: keys[0].clone() });
        }
        out = out.unified(r.unified.clone());
    }
    out.build().map_err(build_err("resources"))
}

/// `oom_score_adj` as the OCI `process.oomScoreAdj`; `None` leaves it to the runtime.
pub fn oom_score_adj(r: &LinuxContainerResources) -> Result<Option<i32>, SpecError> {
    unset_or_in("oom_score_adj", r.oom_score_adj, &OOM_SCORE_ADJ, "-1000..=1000")?;
    Ok(i32::try_from(r.oom_score_adj).ok().filter(|v| *v != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::HugepageLimit;

    #[test]
    fn maps_everything() {
        let r = LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            memory_limit_in_bytes: 256 << 20,
            oom_score_adj: 999,
            cpuset_cpus: "0-1".into(),
            cpuset_mems: "0".into(),
            hugepage_limits: vec![HugepageLimit { page_size: "2MB".into(), limit: 4 << 20 }],
            unified: [("memory.high".to_string(), "1000000".to_string())].into(),
            memory_swap_limit_in_bytes: 512 << 20,
        };
        let out = resources(&r, true).unwrap();
        let cpu = out.cpu().as_ref().unwrap();
        assert_eq!(cpu.shares(), Some(512));
        assert_eq!(cpu.quota(), Some(50_000));
        assert_eq!(cpu.period(), Some(100_000));
        assert_eq!(cpu.cpus().as_deref(), Some("0-1"));
        assert_eq!(cpu.mems().as_deref(), Some("0"));
        let mem = out.memory().as_ref().unwrap();
        assert_eq!(mem.limit(), Some(256 << 20));
        assert_eq!(mem.swap(), Some(512 << 20));
        let hp = out.hugepage_limits().as_ref().unwrap();
        assert_eq!(hp[0].page_size(), "2MB");
        assert_eq!(hp[0].limit(), 4 << 20);
        assert_eq!(
            out.unified().as_ref().unwrap().get("memory.high").map(String::as_str),
            Some("1000000")
        );
        assert_eq!(oom_score_adj(&r).unwrap(), Some(999));
    }

    #[test]
    fn unset_stays_unset() {
        let out = resources(&LinuxContainerResources::default(), false).unwrap();
        assert!(out.cpu().is_none());
        assert!(out.memory().is_none());
        assert!(out.hugepage_limits().is_none());
        assert!(out.unified().is_none());
        let r = LinuxContainerResources { memory_limit_in_bytes: 64 << 20, ..Default::default() };
        let out = resources(&r, false).unwrap();
        assert_eq!(out.memory().as_ref().unwrap().swap(), None);
        assert_eq!(oom_score_adj(&r).unwrap(), None);
    }

    #[test]
    fn bad_values() {
        let r = LinuxContainerResources { cpu_shares: -2, ..Default::default() };
        assert!(matches!(
            resources(&r, true),
            Err(SpecError::InvalidResource { field: "cpu_shares", value: -2, .. })
        ));
        let r = LinuxContainerResources {
            unified: [("cpu.max".to_string(), "max".to_string())].into(),
            ..Default::default()
        };
        assert!(matches!(
            resources(&r, false),
            Err(SpecError::UnifiedOnCgroupV1 { key }) if key == "cpu.max"
        ));
        let r = LinuxContainerResources { oom_score_adj: 1001, ..Default::default() };
        assert!(matches!(
            oom_score_adj(&r),
            Err(SpecError::InvalidResource { field: "oom_score_adj", .. })
        ));
    }

    /// The field `validate` names for `r`, or `None` when it accepts it.
    fn refused(r: LinuxContainerResources) -> Option<&'static str> {
        match validate(&r) {
            Ok(()) => None,
            Err(SpecError::InvalidResource { field, .. }) => Some(field),
            Err(SpecError::InvalidResourceText { field, .. }) => Some(field),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    /// The edges runc and the kernel showed on a real host: the last good value passes, the
    /// first bad one is refused by name.
    #[test]
    fn numbers_are_held_to_the_kernel_ranges() {
        let r = LinuxContainerResources::default;
        assert_eq!(refused(r()), None);
        for (shares, ok) in
            [(1, false), (2, true), (262_144, true), (262_145, false), (1 << 62, false)]
        {
            let got = refused(LinuxContainerResources { cpu_shares: shares, ..r() });
            assert_eq!(got.is_none(), ok, "cpu_shares {shares}");
            assert!(ok || got == Some("cpu_shares"));
        }
        for (period, ok) in [
            (1, false),
            (999, false),
            (1000, true),
            (1_000_000, true),
            (1_000_001, false),
            (-5, false),
        ] {
            let got = refused(LinuxContainerResources { cpu_period: period, ..r() });
            assert_eq!(got.is_none(), ok, "cpu_period {period}");
        }
        for (quota, ok) in [
            (-1, true),
            (-2, false),
            (i64::MIN, false),
            (1, false),
            (999, false),
            (1000, true),
            ((1 << 44) - 1, true),
            (1 << 44, false),
        ] {
            let got = refused(LinuxContainerResources { cpu_quota: quota, ..r() });
            assert_eq!(got.is_none(), ok, "cpu_quota {quota}");
        }
        for (limit, ok) in
            [(1, false), (4 << 20, false), (6 << 20, true), (i64::MAX, true), (-1, false)]
        {
            let got = refused(LinuxContainerResources { memory_limit_in_bytes: limit, ..r() });
            assert_eq!(got.is_none(), ok, "memory_limit_in_bytes {limit}");
        }
        for (oom, ok) in
            [(-1000, true), (1000, true), (-1001, false), (1001, false), (i64::MAX, false)]
        {
            let got = refused(LinuxContainerResources { oom_score_adj: oom, ..r() });
            assert_eq!(got.is_none(), ok, "oom_score_adj {oom}");
        }
    }

    #[test]
    fn swap_must_hold_the_memory_limit() {
        let mem = |limit: i64, swap: i64| LinuxContainerResources {
            memory_limit_in_bytes: limit,
            memory_swap_limit_in_bytes: swap,
            ..Default::default()
        };
        // What the kubelet sends: swap = limit ("no swap"), -1, or both unset.
        assert_eq!(refused(mem(64 << 20, 64 << 20)), None);
        assert_eq!(refused(mem(64 << 20, -1)), None);
        assert_eq!(refused(mem(0, 0)), None);
        assert_eq!(refused(mem(0, -1)), None);
        assert_eq!(refused(mem(64 << 20, 128 << 20)), None);
        for (limit, swap) in [(64 << 20, 32 << 20), (0, 16 << 20), (64 << 20, -2)] {
            assert_eq!(refused(mem(limit, swap)), Some("memory_swap_limit_in_bytes"), "{swap}");
        }
    }

    #[test]
    fn cpu_lists_follow_the_kernel_syntax() {
        assert_eq!(parse_cpu_list("0", 7), Ok(vec![(0, 0)]));
        assert_eq!(parse_cpu_list("0-3,8,10-11", 15), Ok(vec![(0, 3), (8, 8), (10, 11)]));
        assert_eq!(parse_cpu_list("0-7:2/4", 7), Ok(vec![(0, 7)]));
        for bad in [
            "", "../../", "0-99999", "3-1", "1,", ",1", "0-", "-1", " 1", "1 ", "0x1", "0-7:3/2",
            "0-7:0/1", "0-7:2", "9",
        ] {
            assert!(parse_cpu_list(bad, 8).is_err(), "{bad:?}");
        }
        let cpus =
            |s: &str| LinuxContainerResources { cpuset_cpus: s.into(), ..Default::default() };
        assert_eq!(refused(cpus("0-1")), None);
        assert_eq!(refused(cpus("0-99999")), Some("cpuset_cpus"));
        assert_eq!(refused(cpus("../../")), Some("cpuset_cpus"));
        let mems = LinuxContainerResources { cpuset_mems: "0,1x".into(), ..Default::default() };
        assert_eq!(refused(mems), Some("cpuset_mems"));
        // A long value is not echoed whole.
        let long = "7".repeat(1 << 20);
        let err = validate(&cpus(&long)).unwrap_err().to_string();
        assert!(err.len() < 400, "{} bytes", err.len());
    }

    #[test]
    fn page_sizes_and_unified_keys_are_names_not_paths() {
        let hp = |size: &str, limit: u64| LinuxContainerResources {
            hugepage_limits: vec![HugepageLimit { page_size: size.into(), limit }],
            ..Default::default()
        };
        for ok in ["2MB", "1GB", "64KB", "16GB"] {
            assert_eq!(refused(hp(ok, 0)), None, "{ok}");
        }
        for bad in ["", "MB", "2mb", "02MB", "2MB/../../x", "../2MB", "2 MB", "2M"] {
            assert_eq!(refused(hp(bad, 0)), Some("hugepage_limits.page_size"), "{bad:?}");
        }
        assert_eq!(refused(hp("2MB", u64::MAX)), Some("hugepage_limits.limit"));
        let unified = |key: &str| LinuxContainerResources {
            unified: [(key.to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(refused(unified("memory.high")), None);
        for bad in ["../../etc/passwd", "memory", ".memory", "memory.high/x", "cpu.max\n"] {
            assert_eq!(refused(unified(bad)), Some("unified"), "{bad:?}");
        }
    }
}
