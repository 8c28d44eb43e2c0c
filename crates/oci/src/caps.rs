//! Linux capabilities: containerd's default set, privileged's full set, and the kubelet's
//! add/drop lists.

use std::collections::HashSet;

use k8s_cri::v1::Capability as CriCapability;
use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities};

use crate::SpecError;

/// Every capability oci-spec knows, with its kernel number (for `cap_last_cap` filtering).
const ALL: &[(Capability, u32)] = &[
    (Capability::Chown, 0),
    (Capability::DacOverride, 1),
    (Capability::DacReadSearch, 2),
    (Capability::Fowner, 3),
    (Capability::Fsetid, 4),
    (Capability::Kill, 5),
    (Capability::Setgid, 6),
    (Capability::Setuid, 7),
    (Capability::Setpcap, 8),
    (Capability::LinuxImmutable, 9),
    (Capability::NetBindService, 10),
    (Capability::NetBroadcast, 11),
    (Capability::NetAdmin, 12),
    (Capability::NetRaw, 13),
    (Capability::IpcLock, 14),
    (Capability::IpcOwner, 15),
    (Capability::SysModule, 16),
    (Capability::SysRawio, 17),
    (Capability::SysChroot, 18),
    (Capability::SysPtrace, 19),
    (Capability::SysPacct, 20),
    (Capability::SysAdmin, 21),
    (Capability::SysBoot, 22),
    (Capability::SysNice, 23),
    (Capability::SysResource, 24),
    (Capability::SysTime, 25),
    (Capability::SysTtyConfig, 26),
    (Capability::Mknod, 27),
    (Capability::Lease, 28),
    (Capability::AuditWrite, 29),
    (Capability::AuditControl, 30),
    (Capability::Setfcap, 31),
    (Capability::MacOverride, 32),
    (Capability::MacAdmin, 33),
    (Capability::Syslog, 34),
    (Capability::WakeAlarm, 35),
    (Capability::BlockSuspend, 36),
    (Capability::AuditRead, 37),
    (Capability::Perfmon, 38),
    (Capability::Bpf, 39),
    (Capability::CheckpointRestore, 40),
];

/// containerd's (and Docker's) default capability set.
pub const DEFAULT: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// The capabilities berthd itself holds: its bounding set intersected with its effective
/// set (`/proc/self/status`). A container can get no others: the OCI runtime, a child of
/// berthd, fails with `unable to apply caps: operation not permitted` on any capability
/// outside its own bounding set (as on VMs whose bounding set lacks `CAP_SYS_RESOURCE`).
/// Privileged and `add: [ALL]` containers get exactly this set, as containerd gives them the
/// capabilities of its own process. Falls back to every capability the kernel knows when
/// the file cannot be read. Read once: a process's bounding set only ever shrinks, and
/// berthd drops none of its capabilities after start.
pub fn held_capabilities() -> &'static Capabilities {
    static HELD: std::sync::OnceLock<Capabilities> = std::sync::OnceLock::new();
    HELD.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| held_from_status(&status))
            .unwrap_or_else(kernel_capabilities)
    })
}

/// The held set from the text of `/proc/<pid>/status`; `None` when a mask is missing.
pub fn held_from_status(status: &str) -> Option<Capabilities> {
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    let held = mask("CapBnd:")? & mask("CapEff:")?;
    Some(ALL.iter().filter(|(_, n)| held & (1u64 << n) != 0).map(|(c, _)| *c).collect())
}

/// All capabilities the running kernel knows (`/proc/sys/kernel/cap_last_cap`; all of ours
/// when that file cannot be read).
fn kernel_capabilities() -> Capabilities {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(u32::MAX);
    all_up_to(last)
}

/// All capabilities numbered up to `last`.
pub fn all_up_to(last: u32) -> Capabilities {
    ALL.iter().filter(|(_, n)| *n <= last).map(|(c, _)| *c).collect()
}

/// Parses a kubelet capability name: any case, with or without `CAP_`.
pub fn parse_capability(name: &str) -> Result<Capability, SpecError> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    bare.parse::<Capability>().map_err(|_| SpecError::UnknownCapability { name: name.to_string() })
}

fn is_all(name: &str) -> bool {
    name.trim().eq_ignore_ascii_case("ALL")
}

/// The process capabilities.
///
/// Starts from the default set (all of `held` when privileged), then applies the kubelet's
/// lists in containerd's order: add `ALL`, drop `ALL`, add each, drop each; so a drop always
/// wins over an add of the same name, and `add: [X], drop: [ALL]` leaves only X.
/// `held` is what berthd itself holds ([`held_capabilities`]): `ALL` means all of those, the
/// defaults berthd lacks are left out, and naming one it lacks in `add` or `ambient` is
/// [`SpecError::CapabilityNotHeld`] (a privileged container gets all berthd has, so there a
/// missing one is left out instead of refused).
/// Bounding, effective and permitted get the result; inheritable stays empty (CVE-2022-24769)
/// except for ambient capabilities, which go into every set.
pub fn capabilities(
    requested: Option<&CriCapability>,
    privileged: bool,
    held: &Capabilities,
) -> Result<LinuxCapabilities, SpecError> {
    let mut set: HashSet<Capability> = if privileged {
        held.clone()
    } else {
        DEFAULT.iter().copied().filter(|c| held.contains(c)).collect()
    };
    let mut ambient: Capabilities = HashSet::new();
    let held_or_refused = |name: &str| -> Result<Option<Capability>, SpecError> {
        let cap = parse_capability(name)?;
        if held.contains(&cap) {
            Ok(Some(cap))
        } else if privileged {
            Ok(None)
        } else {
            Err(SpecError::CapabilityNotHeld { name: name.to_string() })
        }
    };
    if let Some(req) = requested {
        if req.add_capabilities.iter().any(|c| is_all(c)) {
            set.extend(held.iter().copied());
        }
        if req.drop_capabilities.iter().any(|c| is_all(c)) {
            set.clear();
        }
        for c in req.add_capabilities.iter().filter(|c| !is_all(c)) {
            set.extend(held_or_refused(c)?);
        }
        let mut dropped = HashSet::new();
        for c in req.drop_capabilities.iter().filter(|c| !is_all(c)) {
            let cap = parse_capability(c)?;
            set.remove(&cap);
            dropped.insert(cap);
        }
        for c in &req.add_ambient_capabilities {
            if let Some(cap) = held_or_refused(c)?
                && !dropped.contains(&cap)
            {
                ambient.insert(cap);
            }
        }
        set.extend(ambient.iter().copied());
    }
    // Not the builder: it fills unset fields from `LinuxCapabilities::default()`, which has
    // inheritable and ambient sets of its own.
    let mut out = LinuxCapabilities::default();
    out.set_bounding(Some(set.clone()));
    out.set_effective(Some(set.clone()));
    out.set_permitted(Some(set));
    let ambient = (!ambient.is_empty()).then_some(ambient);
    out.set_inheritable(ambient.clone());
    out.set_ambient(ambient);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(add: &[&str], drop: &[&str]) -> CriCapability {
        CriCapability {
            add_capabilities: add.iter().map(|s| s.to_string()).collect(),
            drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
            add_ambient_capabilities: vec![],
        }
    }

    fn eff(c: &LinuxCapabilities) -> HashSet<Capability> {
        c.effective().clone().unwrap_or_default()
    }

    #[test]
    fn defaults() {
        let all = all_up_to(40);
        let c = capabilities(None, false, &all).unwrap();
        assert_eq!(eff(&c), DEFAULT.iter().copied().collect());
        assert_eq!(c.bounding(), c.permitted());
        assert!(c.inheritable().is_none());
        assert!(c.ambient().is_none());
        let c = capabilities(None, true, &all).unwrap();
        assert_eq!(eff(&c).len(), 41);
    }

    #[test]
    fn add_drop() {
        let all = all_up_to(40);
        let c = capabilities(
            Some(&req(&["SYS_ADMIN", "cap_net_admin"], &["CAP_CHOWN", "kill"])),
            false,
            &all,
        )
        .unwrap();
        let e = eff(&c);
        assert!(e.contains(&Capability::SysAdmin));
        assert!(e.contains(&Capability::NetAdmin));
        assert!(!e.contains(&Capability::Chown));
        assert!(!e.contains(&Capability::Kill));
        assert_eq!(e.len(), DEFAULT.len());

        // drop ALL then add one
        let c = capabilities(Some(&req(&["NET_BIND_SERVICE"], &["ALL"])), false, &all).unwrap();
        assert_eq!(eff(&c), [Capability::NetBindService].into());
        // add ALL then drop one
        let c = capabilities(Some(&req(&["all"], &["CHOWN"])), false, &all).unwrap();
        assert_eq!(eff(&c).len(), 40);
        assert!(!eff(&c).contains(&Capability::Chown));
        // drop wins over add
        let c = capabilities(Some(&req(&["SYS_TIME"], &["SYS_TIME"])), false, &all).unwrap();
        assert!(!eff(&c).contains(&Capability::SysTime));
        // privileged with a drop
        let c = capabilities(Some(&req(&[], &["SYS_ADMIN"])), true, &all).unwrap();
        assert_eq!(eff(&c).len(), 40);
    }

    #[test]
    fn ambient_and_unknown() {
        let all = all_up_to(40);
        let mut r = req(&[], &[]);
        r.add_ambient_capabilities = vec!["NET_ADMIN".into()];
        let c = capabilities(Some(&r), false, &all).unwrap();
        assert_eq!(c.ambient().clone().unwrap(), [Capability::NetAdmin].into());
        assert_eq!(c.inheritable().clone().unwrap(), [Capability::NetAdmin].into());
        assert!(eff(&c).contains(&Capability::NetAdmin));
        let err = capabilities(Some(&req(&["FLY"], &[])), false, &all);
        assert!(matches!(err, Err(SpecError::UnknownCapability { name }) if name == "FLY"));
        assert_eq!(all_up_to(37).len(), 38);
        assert!(!held_capabilities().is_empty());
    }

    /// This VM's set: everything but CAP_SYS_RESOURCE (24).
    fn without_sys_resource() -> Capabilities {
        let status = "Name:\tberthd\nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\n\
                      CapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\n";
        held_from_status(status).unwrap()
    }

    #[test]
    fn held_set_from_status() {
        let held = without_sys_resource();
        assert_eq!(held.len(), 40);
        assert!(!held.contains(&Capability::SysResource));
        assert!(held.contains(&Capability::SysAdmin));
        assert!(held.contains(&Capability::CheckpointRestore));
        // Effective narrower than bounding: only what is in both.
        let status = "CapEff:\t0000000000000001\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(held_from_status(status).unwrap(), [Capability::Chown].into());
        assert!(held_from_status("CapEff:\t1\n").is_none());
    }

    #[test]
    fn only_what_berthd_holds() {
        let held = without_sys_resource();
        // Privileged and ALL: what berthd holds, nothing more.
        let c = capabilities(None, true, &held).unwrap();
        assert_eq!(eff(&c), held);
        let c = capabilities(Some(&req(&["ALL"], &[])), false, &held).unwrap();
        assert_eq!(eff(&c), held);
        // Privileged asking for one berthd lacks: left out, not refused.
        let c = capabilities(Some(&req(&["SYS_RESOURCE"], &[])), true, &held).unwrap();
        assert!(!eff(&c).contains(&Capability::SysResource));
        // Otherwise a clear error naming it.
        let err = capabilities(Some(&req(&["CAP_SYS_RESOURCE"], &[])), false, &held);
        assert!(
            matches!(&err, Err(SpecError::CapabilityNotHeld { name }) if name == "CAP_SYS_RESOURCE"),
            "{err:?}"
        );
        let mut r = req(&[], &[]);
        r.add_ambient_capabilities = vec!["SYS_RESOURCE".into()];
        assert!(matches!(
            capabilities(Some(&r), false, &held),
            Err(SpecError::CapabilityNotHeld { .. })
        ));
        // Dropping one berthd lacks is fine.
        let c = capabilities(Some(&req(&[], &["SYS_RESOURCE"])), false, &held).unwrap();
        assert_eq!(eff(&c), DEFAULT.iter().copied().collect());
        // Defaults berthd lacks are left out.
        let only_chown: Capabilities = [Capability::Chown].into();
        let c = capabilities(None, false, &only_chown).unwrap();
        assert_eq!(eff(&c), only_chown);
    }
}
