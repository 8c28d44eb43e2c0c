//! Cgroup limits from `LinuxContainerResources`.

use k8s_cri::v1::LinuxContainerResources;
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxHugepageLimitBuilder, LinuxMemoryBuilder, LinuxResources,
    LinuxResourcesBuilder,
};

use crate::SpecError;
use crate::error::build_err;

/// A non-negative value as `u64`; 0 means "not specified" in the CRI.
fn positive(field: &'static str, value: i64) -> Result<Option<u64>, SpecError> {
    match value {
        0 => Ok(None),
        v if v > 0 => Ok(Some(v.unsigned_abs())),
        v => Err(SpecError::InvalidResource { field, value: v }),
    }
}

/// The OCI resources for `r`. Only what the kubelet set is written; devices are added by the
/// caller. Memory swap is set only when `memory_swap_limit_in_bytes` is given (so the
/// runtime's default applies otherwise). `unified` is refused on cgroup v1, where runc would
/// refuse it later with a vaguer message.
pub fn resources(
    r: &LinuxContainerResources,
    cgroup_v2: bool,
) -> Result<LinuxResources, SpecError> {
    let mut cpu = LinuxCpuBuilder::default();
    let mut cpu_set = false;
    if let Some(shares) = positive("cpu_shares", r.cpu_shares)? {
        cpu = cpu.shares(shares);
        cpu_set = true;
    }
    if r.cpu_quota != 0 {
        // -1 is "no limit" for the CFS quota; other negatives are nonsense.
        if r.cpu_quota < -1 {
            return Err(SpecError::InvalidResource { field: "cpu_quota", value: r.cpu_quota });
        }
        cpu = cpu.quota(r.cpu_quota);
        cpu_set = true;
    }
    if let Some(period) = positive("cpu_period", r.cpu_period)? {
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
    if let Some(limit) = positive("memory_limit_in_bytes", r.memory_limit_in_bytes)? {
        mem = mem.limit(limit as i64);
        mem_set = true;
    }
    if r.memory_swap_limit_in_bytes != 0 {
        if r.memory_swap_limit_in_bytes < -1 {
            return Err(SpecError::InvalidResource {
                field: "memory_swap_limit_in_bytes",
                value: r.memory_swap_limit_in_bytes,
            });
        }
        mem = mem.swap(r.memory_swap_limit_in_bytes);
        mem_set = true;
    }

    let mut hugepages = Vec::with_capacity(r.hugepage_limits.len());
    for h in &r.hugepage_limits {
        let limit = i64::try_from(h.limit).map_err(|_| SpecError::InvalidResource {
            field: "hugepage_limits.limit",
            value: i64::MAX,
        })?;
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
    if r.oom_score_adj == 0 {
        return Ok(None);
    }
    if !(-1000..=1000).contains(&r.oom_score_adj) {
        return Err(SpecError::InvalidResource { field: "oom_score_adj", value: r.oom_score_adj });
    }
    Ok(Some(r.oom_score_adj as i32))
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
        let r = LinuxContainerResources { memory_limit_in_bytes: 1 << 20, ..Default::default() };
        let out = resources(&r, false).unwrap();
        assert_eq!(out.memory().as_ref().unwrap().swap(), None);
        assert_eq!(oom_score_adj(&r).unwrap(), None);
    }

    #[test]
    fn bad_values() {
        let r = LinuxContainerResources { cpu_shares: -2, ..Default::default() };
        assert!(matches!(
            resources(&r, true),
            Err(SpecError::InvalidResource { field: "cpu_shares", value: -2 })
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
}
