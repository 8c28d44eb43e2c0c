//! Which cgroup controllers the host has, and fitting a container's resources to them.
//!
//! The kubelet sends what the node *could* limit, not what its cgroups can: a
//! `hugepage_limits` entry for every page size in `/sys/kernel/mm/hugepages` even where no
//! hugetlb controller is mounted (cgroup v1 hosts often lack it), and runc then fails every
//! container with `cannot set hugetlb limit`. containerd drops hugepage limits when the
//! controller is missing (`tolerate_missing_hugetlb_controller`, on by default); berth does
//! that for every controller the CRI's resources touch, and the caller warns once per
//! controller.

use std::path::Path;

use oci_spec::runtime::{LinuxMemory, LinuxResources};

/// A cgroup controller that CRI resources can need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Controller {
    /// `cpu`: shares, CFS quota and period, realtime.
    Cpu,
    /// `cpuset`: cpus and mems.
    Cpuset,
    /// `memory`: the limit (and everything under `memory`).
    Memory,
    /// Swap accounting (`memory.memsw.*` on v1, `memory.swap.max` on v2).
    MemorySwap,
    /// `hugetlb`: hugepage limits.
    Hugetlb,
    /// `pids`: the pids limit.
    Pids,
    /// `blkio` (v1) / `io` (v2): block I/O weights and throttles.
    Blkio,
}

impl Controller {
    /// Every controller, in a fixed order.
    pub const ALL: [Controller; 7] = [
        Controller::Cpu,
        Controller::Cpuset,
        Controller::Memory,
        Controller::MemorySwap,
        Controller::Hugetlb,
        Controller::Pids,
        Controller::Blkio,
    ];

    /// The controller's name as cgroup v1 spells it (`memory.memsw` for swap).
    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuset => "cpuset",
            Controller::Memory => "memory",
            Controller::MemorySwap => "memory.memsw",
            Controller::Hugetlb => "hugetlb",
            Controller::Pids => "pids",
            Controller::Blkio => "blkio",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// The host's cgroup setup: v1 or v2, and which controllers are there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCgroups {
    v2: bool,
    present: u8,
}

impl HostCgroups {
    /// Every controller present (what tests and unreadable hosts assume).
    pub fn all(v2: bool) -> Self {
        Self { v2, present: Controller::ALL.iter().fold(0, |m, c| m | c.bit()) }
    }

    /// Exactly `present`.
    pub fn with(v2: bool, present: &[Controller]) -> Self {
        Self { v2, present: present.iter().fold(0, |m, c| m | c.bit()) }
    }

    /// Reads the host: on cgroup v2 the root's `cgroup.controllers`; on v1 (and hybrid
    /// hosts, where runc uses the v1 hierarchies) the controllers `/proc/cgroups` shows
    /// attached to a hierarchy, and `memory.memsw.limit_in_bytes` for swap accounting.
    /// What cannot be read is assumed present: a missing limit is refused by the runtime
    /// with its own message rather than dropped silently here.
    pub fn detect(cgroup_root: &Path, v2: bool) -> Self {
        if v2 {
            return match std::fs::read_to_string(cgroup_root.join("cgroup.controllers")) {
                Ok(text) => Self::from_v2_controllers(&text),
                Err(_) => Self::all(true),
            };
        }
        let Ok(text) = std::fs::read_to_string("/proc/cgroups") else {
            return Self::all(false);
        };
        let swap = cgroup_root.join("memory").join("memory.memsw.limit_in_bytes").exists();
        Self::from_proc_cgroups(&text, swap)
    }

    /// The v2 set from the text of a `cgroup.controllers` file.
    pub fn from_v2_controllers(text: &str) -> Self {
        let mut present = Vec::new();
        for word in text.split_whitespace() {
            match word {
                "cpu" => present.push(Controller::Cpu),
                "cpuset" => present.push(Controller::Cpuset),
                // Swap accounting is part of the v2 memory controller.
                "memory" => present.extend([Controller::Memory, Controller::MemorySwap]),
                "hugetlb" => present.push(Controller::Hugetlb),
                "pids" => present.push(Controller::Pids),
                "io" => present.push(Controller::Blkio),
                _ => {}
            }
        }
        Self::with(true, &present)
    }

    /// The v1 set from the text of `/proc/cgroups` (`name hierarchy num_cgroups enabled`):
    /// a controller counts when it is enabled and attached to a hierarchy (id not 0).
    pub fn from_proc_cgroups(text: &str, swap_accounting: bool) -> Self {
        let mut present = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, hierarchy, _, enabled] = fields[..] else { continue };
            if hierarchy == "0" || enabled != "1" {
                continue;
            }
            match name {
                "cpu" => present.push(Controller::Cpu),
                "cpuset" => present.push(Controller::Cpuset),
                "memory" => {
                    present.push(Controller::Memory);
                    if swap_accounting {
                        present.push(Controller::MemorySwap);
                    }
                }
                "hugetlb" => present.push(Controller::Hugetlb),
                "pids" => present.push(Controller::Pids),
                "blkio" => present.push(Controller::Blkio),
                _ => {}
            }
        }
        Self::with(false, &present)
    }

    /// Whether the host runs cgroup v2 only.
    pub fn v2(&self) -> bool {
        self.v2
    }

    /// Whether `c` is there.
    pub fn has(&self, c: Controller) -> bool {
        self.present & c.bit() != 0
    }

    /// Removes from `res` what needs a controller the host lacks, and returns those
    /// controllers (each once, in [`Controller::ALL`] order). Device rules are kept: the
    /// devices controller is what confines every container, and the runtime must refuse
    /// to run without it.
    pub fn fit(&self, res: &mut LinuxResources) -> Vec<Controller> {
        let mut dropped = Vec::new();
        let mut drop = |c: Controller, set: bool| {
            if set && !self.has(c) && !dropped.contains(&c) {
                dropped.push(c);
            }
            set && !self.has(c)
        };
        if let Some(cpu) = res.cpu().clone() {
            let mut cpu = cpu;
            let cfs = cpu.shares().is_some()
                || cpu.quota().is_some()
                || cpu.period().is_some()
                || cpu.realtime_runtime().is_some()
                || cpu.realtime_period().is_some();
            if drop(Controller::Cpu, cfs) {
                cpu.set_shares(None);
                cpu.set_quota(None);
                cpu.set_period(None);
                cpu.set_realtime_runtime(None);
                cpu.set_realtime_period(None);
            }
            let cpuset = cpu.cpus().is_some() || cpu.mems().is_some();
            if drop(Controller::Cpuset, cpuset) {
                cpu.set_cpus(None);
                cpu.set_mems(None);
            }
            res.set_cpu(Some(cpu));
        }
        if let Some(mem) = *res.memory() {
            if drop(Controller::Memory, mem != LinuxMemory::default()) {
                res.set_memory(None);
            } else if drop(Controller::MemorySwap, mem.swap().is_some()) {
                let mut mem = mem;
                mem.set_swap(None);
                res.set_memory(Some(mem));
            }
        }
        if drop(Controller::Hugetlb, res.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty()))
        {
            res.set_hugepage_limits(None);
        }
        if drop(Controller::Pids, res.pids().is_some()) {
            res.set_pids(None);
        }
        if drop(Controller::Blkio, res.block_io().is_some()) {
            res.set_block_io(None);
        }
        dropped.sort();
        dropped
    }
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxHugepageLimitBuilder, LinuxMemoryBuilder, LinuxPidsBuilder,
        LinuxResourcesBuilder,
    };

    use super::*;

    /// This machine's /proc/cgroups: hybrid, hugetlb (and others) not attached.
    const HYBRID: &str = "#subsys_name\thierarchy\tnum_cgroups\tenabled\n\
        cpuset\t3\t1\t1\ncpu\t1\t1\t1\ncpuacct\t2\t1\t1\nblkio\t7\t1\t1\nmemory\t4\t15\t1\n\
        devices\t5\t1\t1\nfreezer\t6\t1\t1\nnet_cls\t0\t1\t1\nperf_event\t0\t1\t1\n\
        net_prio\t0\t1\t1\nhugetlb\t0\t1\t1\npids\t8\t1\t1\n";

    fn kubelet_resources() -> LinuxResources {
        let hugepage = |size: &str| {
            LinuxHugepageLimitBuilder::default().page_size(size).limit(0).build().unwrap()
        };
        LinuxResourcesBuilder::default()
            .cpu(
                LinuxCpuBuilder::default()
                    .shares(102u64)
                    .quota(20_000i64)
                    .period(100_000u64)
                    .cpus("0")
                    .build()
                    .unwrap(),
            )
            .memory(LinuxMemoryBuilder::default().limit(64 << 20).swap(64 << 20).build().unwrap())
            .hugepage_limits(vec![hugepage("2MB"), hugepage("1GB")])
            .pids(LinuxPidsBuilder::default().limit(100).build().unwrap())
            .build()
            .unwrap()
    }

    #[test]
    fn reads_proc_cgroups() {
        let host = HostCgroups::from_proc_cgroups(HYBRID, true);
        assert!(!host.v2());
        for c in [Controller::Cpu, Controller::Cpuset, Controller::Memory, Controller::Pids] {
            assert!(host.has(c), "{c:?}");
        }
        assert!(host.has(Controller::MemorySwap));
        assert!(host.has(Controller::Blkio));
        assert!(!host.has(Controller::Hugetlb));
        assert!(!HostCgroups::from_proc_cgroups(HYBRID, false).has(Controller::MemorySwap));
    }

    #[test]
    fn reads_v2_controllers() {
        let host = HostCgroups::from_v2_controllers("cpuset cpu io memory pids\n");
        assert!(host.v2());
        assert!(host.has(Controller::MemorySwap));
        assert!(host.has(Controller::Blkio));
        assert!(!host.has(Controller::Hugetlb));
    }

    #[test]
    fn drops_only_what_is_missing() {
        let host = HostCgroups::from_proc_cgroups(HYBRID, true);
        let mut res = kubelet_resources();
        assert_eq!(host.fit(&mut res), vec![Controller::Hugetlb]);
        assert!(res.hugepage_limits().is_none());
        assert_eq!(res.memory().and_then(|m| m.limit()), Some(64 << 20));
        assert_eq!(res.cpu().as_ref().and_then(|c| c.shares()), Some(102));

        // Nothing to drop where everything is present.
        let mut res = kubelet_resources();
        assert!(HostCgroups::all(false).fit(&mut res).is_empty());
        assert_eq!(res, kubelet_resources());
    }

    #[test]
    fn drops_each_kind() {
        let host = HostCgroups::with(false, &[Controller::Memory]);
        let mut res = kubelet_resources();
        assert_eq!(
            host.fit(&mut res),
            vec![
                Controller::Cpu,
                Controller::Cpuset,
                Controller::MemorySwap,
                Controller::Hugetlb,
                Controller::Pids
            ]
        );
        let cpu = res.cpu().clone().unwrap();
        assert!(cpu.shares().is_none() && cpu.quota().is_none() && cpu.cpus().is_none());
        let mem = res.memory().unwrap();
        assert_eq!((mem.limit(), mem.swap()), (Some(64 << 20), None));
        assert!(res.pids().is_none());

        let mut res = kubelet_resources();
        HostCgroups::with(false, &[]).fit(&mut res);
        assert!(res.memory().is_none());
    }
}
