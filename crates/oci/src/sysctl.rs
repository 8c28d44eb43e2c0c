//! Pod sysctls: the namespaced allowlist, the host-namespace conflicts, and values that cannot
//! smuggle in a second setting (CVE-2022-0811 wrote `kernel.core_pattern` through a `+` in a
//! value of an allowed key).

use k8s_cri::v1::{NamespaceMode, PodSandboxConfig};

use crate::SpecError;

/// IPC-namespaced sysctls allowed by name.
const IPC_EXACT: &[&str] = &[
    "kernel.shm_rmid_forced",
    "kernel.shmmax",
    "kernel.shmall",
    "kernel.shmmni",
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
];
/// IPC-namespaced sysctls allowed by prefix.
const IPC_PREFIX: &str = "fs.mqueue.";
/// Network-namespaced sysctls allowed by prefix.
const NET_PREFIX: &str = "net.";

/// Which namespace a sysctl belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SysctlNamespace {
    Ipc,
    Network,
}

fn namespace_of(key: &str) -> Option<SysctlNamespace> {
    if IPC_EXACT.contains(&key) || key.starts_with(IPC_PREFIX) {
        Some(SysctlNamespace::Ipc)
    } else if key.starts_with(NET_PREFIX) {
        Some(SysctlNamespace::Network)
    } else {
        None
    }
}

/// Converts a key to the dotted form. As in the kubelet, a key whose first separator is `/`
/// uses `/` as separator and `.` inside names (`net/ipv4/conf/eth0.100/rp_filter`), so the two
/// swap (`net.ipv4.conf.eth0/100.rp_filter`).
pub fn normalize_key(key: &str) -> String {
    let first_sep = key.find(['.', '/']);
    match first_sep {
        Some(i) if key.as_bytes()[i] == b'/' => key
            .chars()
            .map(|c| match c {
                '/' => '.',
                '.' => '/',
                c => c,
            })
            .collect(),
        _ => key.to_string(),
    }
}

/// A dotted key is made of non-empty segments of `[A-Za-z0-9_-]`, where a `/` may stand for a
/// dot inside a name but never starts, ends or doubles (so no `..` path components).
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.split('.').all(|seg| {
            !seg.is_empty()
                && seg.split('/').all(|part| {
                    !part.is_empty()
                        && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                })
        })
}

/// A value is printable ASCII (spaces and tabs allowed, as `kernel.sem` and
/// `net.ipv4.ip_local_port_range` need) without `+`, `=`, `,` — the separators of the
/// `key=value+key=value` lists runtimes hand to helper tools.
fn valid_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| (b == b'\t' || (0x20..0x7f).contains(&b)) && !matches!(b, b'+' | b'=' | b','))
}

/// Checks one sysctl against the allowlist and the pod's host namespaces; returns its
/// normalised key.
pub fn check_sysctl(
    key: &str,
    value: &str,
    host_ipc: bool,
    host_network: bool,
) -> Result<String, SpecError> {
    let norm = normalize_key(key);
    if !valid_key(&norm) {
        return Err(SpecError::InvalidSysctlKey { key: key.to_string() });
    }
    match namespace_of(&norm) {
        None => return Err(SpecError::SysctlNotAllowed { key: norm }),
        Some(SysctlNamespace::Ipc) if host_ipc => {
            return Err(SpecError::SysctlHostNamespace { key: norm, namespace: "ipc" });
        }
        Some(SysctlNamespace::Network) if host_network => {
            return Err(SpecError::SysctlHostNamespace { key: norm, namespace: "network" });
        }
        Some(_) => {}
    }
    if !valid_value(value) {
        return Err(SpecError::InvalidSysctlValue { key: norm, value: value.to_string() });
    }
    Ok(norm)
}

/// Validates the pod's sysctls; returns them with normalised keys, sorted by key so that
/// specs are reproducible.
pub fn validate_sysctls(config: &PodSandboxConfig) -> Result<Vec<(String, String)>, SpecError> {
    let Some(linux) = &config.linux else {
        return Ok(Vec::new());
    };
    let ns = linux.security_context.as_ref().and_then(|sc| sc.namespace_options.as_ref());
    let host_ipc = ns.is_some_and(|n| n.ipc == NamespaceMode::Node as i32);
    let host_network = ns.is_some_and(|n| n.network == NamespaceMode::Node as i32);
    let mut out = Vec::with_capacity(linux.sysctls.len());
    for (k, v) in &linux.sysctls {
        out.push((check_sysctl(k, v, host_ipc, host_network)?, v.clone()));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::{LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceOption};

    fn pod(sysctls: &[(&str, &str)], ipc: NamespaceMode, net: NamespaceMode) -> PodSandboxConfig {
        PodSandboxConfig {
            linux: Some(LinuxPodSandboxConfig {
                sysctls: sysctls.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        ipc: ipc as i32,
                        network: net as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn allowlist() {
        let p = pod(
            &[
                ("kernel.shm_rmid_forced", "1"),
                ("net.ipv4.ip_local_port_range", "1024 65000"),
                ("kernel/sem", "250 32000 100 128"),
                ("fs.mqueue.msg_max", "100"),
                ("net/ipv4/conf/eth0.100/rp_filter", "1"),
            ],
            NamespaceMode::Pod,
            NamespaceMode::Pod,
        );
        let got = validate_sysctls(&p).unwrap();
        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "fs.mqueue.msg_max",
                "kernel.sem",
                "kernel.shm_rmid_forced",
                "net.ipv4.conf.eth0/100.rp_filter",
                "net.ipv4.ip_local_port_range",
            ]
        );
        for bad in ["kernel.core_pattern", "vm.swappiness", "kernel.shm", "fs.file-max"] {
            let p = pod(&[(bad, "1")], NamespaceMode::Pod, NamespaceMode::Pod);
            assert!(
                matches!(validate_sysctls(&p), Err(SpecError::SysctlNotAllowed { key }) if key == bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn host_namespaces() {
        let p = pod(&[("kernel.msgmax", "1")], NamespaceMode::Node, NamespaceMode::Pod);
        assert!(matches!(
            validate_sysctls(&p),
            Err(SpecError::SysctlHostNamespace { namespace: "ipc", .. })
        ));
        let p = pod(&[("net.core.somaxconn", "1")], NamespaceMode::Pod, NamespaceMode::Node);
        assert!(matches!(
            validate_sysctls(&p),
            Err(SpecError::SysctlHostNamespace { namespace: "network", .. })
        ));
        let p = pod(&[("net.core.somaxconn", "1")], NamespaceMode::Node, NamespaceMode::Pod);
        assert!(validate_sysctls(&p).is_ok());
    }

    #[test]
    fn injection_attempts() {
        let values = [
            "1+kernel.core_pattern=|/tmp/x",
            "1=2",
            "1,kernel.core_pattern=x",
            "1\nkernel.core_pattern=x",
            "1\0",
            "1\r",
        ];
        for v in values {
            let p = pod(&[("kernel.shm_rmid_forced", v)], NamespaceMode::Pod, NamespaceMode::Pod);
            assert!(
                matches!(validate_sysctls(&p), Err(SpecError::InvalidSysctlValue { ref key, .. }) if key == "kernel.shm_rmid_forced"),
                "{v:?}"
            );
        }
        // The CVE-2022-0811 key form: the whole injection in the key.
        for k in [
            "kernel.shm_rmid_forced=1+kernel.core_pattern=|/x",
            "net.ipv4..x",
            "net.ipv4/../../x",
            "net.ipv4.conf.a//b.x",
            "",
            "net.ipv4.x ",
        ] {
            let p = pod(&[(k, "1")], NamespaceMode::Pod, NamespaceMode::Pod);
            assert!(
                matches!(validate_sysctls(&p), Err(SpecError::InvalidSysctlKey { .. })),
                "{k:?}"
            );
        }
    }

    #[test]
    fn normalize() {
        assert_eq!(normalize_key("net/ipv4/ip_forward"), "net.ipv4.ip_forward");
        assert_eq!(normalize_key("net.ipv4.ip_forward"), "net.ipv4.ip_forward");
        assert_eq!(
            normalize_key("net/ipv4/conf/eno2.100/rp_filter"),
            "net.ipv4.conf.eno2/100.rp_filter"
        );
        assert!(validate_sysctls(&PodSandboxConfig::default()).unwrap().is_empty());
    }
}
