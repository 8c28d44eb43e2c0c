//! The files a pod's containers share: `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`.

use std::path::{Path, PathBuf};

use k8s_cri::v1::DnsConfig;

use crate::error::{Result, RuntimeError};
use crate::util::write_volatile;

/// Where the pod files are.
#[derive(Debug, Clone)]
pub(crate) struct PodFiles {
    pub hosts: PathBuf,
    pub resolv_conf: PathBuf,
    pub hostname: PathBuf,
}

/// `/etc/hosts` for a pod with its own network namespace.
pub(crate) fn hosts_content(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n\
         127.0.1.1\t{hostname}\n"
    )
}

/// `resolv.conf` from the kubelet's DNS config; `None` when it says nothing (then the
/// host's file is used).
pub(crate) fn resolv_content(dns: Option<&DnsConfig>) -> Option<String> {
    let dns = dns?;
    if dns.servers.is_empty() && dns.searches.is_empty() && dns.options.is_empty() {
        return None;
    }
    let mut out = String::new();
    if !dns.searches.is_empty() {
        out.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    for server in &dns.servers {
        out.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.options.is_empty() {
        out.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    Some(out)
}

fn host_file(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

/// Writes the three files into `dir`.
pub(crate) fn write(
    dir: &Path,
    hostname: &str,
    host_network: bool,
    dns: Option<&DnsConfig>,
) -> Result<PodFiles> {
    let files = PodFiles {
        hosts: dir.join("hosts"),
        resolv_conf: dir.join("resolv.conf"),
        hostname: dir.join("hostname"),
    };
    let hosts =
        if host_network { host_file("/etc/hosts") } else { hosts_content(hostname).into_bytes() };
    write_volatile(&files.hosts, &hosts)?;
    let resolv = match resolv_content(dns) {
        Some(text) => text.into_bytes(),
        None => host_file("/etc/resolv.conf"),
    };
    write_volatile(&files.resolv_conf, &resolv)?;
    write_volatile(&files.hostname, format!("{hostname}\n").as_bytes())?;
    // Containers running as any user must be able to read them.
    for p in [&files.hosts, &files.resolv_conf, &files.hostname] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644))
            .map_err(RuntimeError::io("chmod", p))?;
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_from_dns_config() {
        assert_eq!(resolv_content(None), None);
        assert_eq!(resolv_content(Some(&DnsConfig::default())), None);
        let dns = DnsConfig {
            servers: vec!["10.0.0.10".into()],
            searches: vec!["default.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_content(Some(&dns)).expect("some"),
            "search default.svc.cluster.local svc.cluster.local\nnameserver 10.0.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn files_are_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = write(dir.path(), "web-0", false, None).expect("write");
        let hosts = std::fs::read_to_string(&f.hosts).expect("hosts");
        assert!(hosts.contains("127.0.0.1\tlocalhost"));
        assert!(hosts.contains("web-0"));
        assert_eq!(std::fs::read_to_string(&f.hostname).expect("hostname"), "web-0\n");
    }
}
