//! Pod networking for the e2e tests: per-daemon unique bridge names, subnets and nft tables
//! (so parallel daemons never share host network state), the `[network]` TOML for them, and
//! a guard that removes what a daemon made on the host (bridge, veths, nft table, CNI's
//! iptables rules) even when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The host-side names one daemon's pod network uses.
#[derive(Debug, Clone)]
pub struct NetNames {
    /// Bridge name (at most 15 bytes).
    pub bridge: String,
    /// The first three octets of the subnet, `10.a.b`.
    pub prefix: String,
    /// Prefix length of the subnet (24, or smaller subnets for exhaustion tests).
    pub prefix_len: u8,
    /// nftables table name (also the iptables chain prefix).
    pub table: String,
}

/// Four random bytes from the kernel.
fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u32::from_le_bytes(b) ^ std::process::id().rotate_left(16)
}

/// Output of a command, or empty when it fails.
fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Runs a command, ignoring failures (cleanup is best effort).
fn run_quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).output().is_ok_and(|o| o.status.success())
}

impl NetNames {
    /// Fresh names and a `10.<201-254>.<0-255>.0/<prefix_len>` subnet no host address or
    /// route uses yet.
    pub fn unique(prefix_len: u8) -> Self {
        let in_use =
            format!("{}{}", output("ip", &["-4", "-o", "addr"]), output("ip", &["-4", "route"]));
        loop {
            let r = random_u32();
            let prefix = format!("10.{}.{}", 201 + (r % 54), (r >> 8) & 0xff);
            // "10.a.b." with the dot: 10.201.3 must not match 10.201.34.
            if in_use.contains(&format!("{prefix}.")) {
                continue;
            }
            let tag = format!("{:08x}", random_u32());
            return NetNames {
                bridge: format!("bt{tag}"),
                prefix,
                prefix_len,
                table: format!("bt{tag}"),
            };
        }
    }

    /// The subnet, e.g. `10.210.7.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}.0/{}", self.prefix, self.prefix_len)
    }

    /// The gateway (the bridge's address): the subnet's first host.
    pub fn gateway(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// Whether `ip` is in the subnet (for a /24 or smaller).
    pub fn contains(&self, ip: &str) -> bool {
        let Some(last) = ip.strip_prefix(&format!("{}.", self.prefix)) else { return false };
        let Ok(last) = last.parse::<u32>() else { return false };
        let size = 1u32 << (32 - u32::from(self.prefix_len));
        last > 0 && last < size - 1
    }

    /// `[network]` for the built-in bridge.
    pub fn bridge_toml(&self) -> String {
        format!(
            "[network]\nmode = \"bridge\"\nbridge = \"{}\"\nsubnet = \"{}\"\nnat_table = \"{}\"\n",
            self.bridge,
            self.subnet(),
            self.table
        )
    }

    /// `[network]` for CNI with `conf_dir`, plugins from Debian's containernetworking-plugins.
    pub fn cni_toml(&self, conf_dir: &Path) -> String {
        format!(
            "[network]\nmode = \"cni\"\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"/usr/lib/cni\", \"/opt/cni/bin\"]\n\
             bridge = \"{}\"\nnat_table = \"{}\"\n",
            conf_dir.display(),
            self.bridge,
            self.table
        )
    }

    /// A conflist: CNI `bridge` (our bridge name and subnet, host-local IPAM keeping its
    /// state in `ipam_dir`) and `portmap`.
    pub fn cni_conflist(&self, ipam_dir: &Path) -> String {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("{}-net", self.bridge),
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": self.subnet() }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                        "dataDir": ipam_dir,
                    }
                },
                { "type": "portmap", "capabilities": { "portMappings": true } }
            ]
        })
        .to_string()
    }

    /// Names of the links enslaved to our bridge (the host ends of pod veths).
    pub fn bridge_ports(&self) -> Vec<String> {
        output("ip", &["-o", "link", "show", "master", &self.bridge])
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            .filter(|n| !n.is_empty())
            .collect()
    }

    /// Whether our bridge exists.
    pub fn bridge_exists(&self) -> bool {
        run_quiet("ip", &["link", "show", "dev", &self.bridge])
    }

    /// Our nft table as `nft list table` prints it (empty when there is none).
    pub fn nft_table(&self) -> String {
        output("nft", &["list", "table", "inet", &self.table])
    }

    /// The iptables NAT rules (as `iptables -t nat -S`) mentioning our subnet.
    pub fn iptables_rules(&self) -> Vec<String> {
        let needle = format!("{}.", self.prefix);
        output("iptables", &["-w", "-t", "nat", "-S"])
            .lines()
            .filter(|l| l.starts_with("-A ") && l.contains(&needle))
            .map(str::to_string)
            .collect()
    }

    /// Removes everything of ours from the host; safe to call repeatedly.
    pub fn cleanup(&self) {
        for port in self.bridge_ports() {
            run_quiet("ip", &["link", "del", "dev", &port]);
        }
        if self.bridge_exists() {
            run_quiet("ip", &["link", "del", "dev", &self.bridge]);
        }
        if !self.nft_table().is_empty() {
            run_quiet("nft", &["delete", "table", "inet", &self.table]);
        }
        self.cleanup_portmap();
        // Other CNI rules left by a failed test: delete the rules naming our subnet.
        for rule in self.iptables_rules() {
            let mut args: Vec<String> = vec!["-w".into(), "-t".into(), "nat".into(), "-D".into()];
            args.extend(shell_words(&rule[3..]));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            run_quiet("iptables", &refs);
        }
    }
}

impl NetNames {
    /// The portmap plugin's rules for our CNI network (whose pods were never deleted, e.g.
    /// after a failed test): the jumps in `CNI-HOSTPORT-DNAT` commented with our network
    /// name, and the per-pod chains they lead to.
    fn cleanup_portmap(&self) {
        let hits = self.portmap_jumps();
        // Highest number first: deleting a rule renumbers the ones after it.
        for (num, _) in hits.iter().rev() {
            let num = num.to_string();
            run_quiet("iptables", &["-w", "-t", "nat", "-D", "CNI-HOSTPORT-DNAT", &num]);
        }
        for (_, chain) in &hits {
            run_quiet("iptables", &["-w", "-t", "nat", "-F", chain]);
            run_quiet("iptables", &["-w", "-t", "nat", "-X", chain]);
        }
    }

    /// The portmap plugin's jumps for pods of our CNI network: (rule number in
    /// `CNI-HOSTPORT-DNAT`, the per-pod chain it jumps to).
    pub fn portmap_jumps(&self) -> Vec<(u32, String)> {
        let network = format!("\"{}-net\"", self.bridge);
        let listing = output(
            "iptables",
            &["-w", "-t", "nat", "-L", "CNI-HOSTPORT-DNAT", "-n", "--line-numbers"],
        );
        listing
            .lines()
            .filter(|l| l.contains(&network))
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let num = words.next()?.parse().ok()?;
                Some((num, words.next()?.to_string()))
            })
            .collect()
    }
}

/// Splits an `iptables -S` line into words, keeping quoted comments together.
fn shell_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Removes a daemon's host network state on drop. Drop it after the daemon (declare it
/// after the daemon in a struct, or create it before the daemon as a local).
#[derive(Debug)]
pub struct NetGuard {
    /// The names whose objects are removed.
    pub names: NetNames,
    /// Extra paths removed on drop (CNI conf dirs and the like).
    pub paths: Vec<PathBuf>,
}

impl NetGuard {
    /// A guard for `names`.
    pub fn new(names: NetNames) -> Self {
        NetGuard { names, paths: Vec::new() }
    }
}

impl Drop for NetGuard {
    fn drop(&mut self) {
        self.names.cleanup();
        for p in &self.paths {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_and_distinct() {
        let a = NetNames::unique(24);
        let b = NetNames::unique(24);
        assert!(a.bridge.len() <= 15);
        assert_ne!(a.bridge, b.bridge);
        assert!(a.contains(&format!("{}.2", a.prefix)));
        assert!(!a.contains(&format!("{}.255", a.prefix)));
        assert!(!a.contains(&format!("{}0.2", a.prefix)));
        let small = NetNames { prefix_len: 29, ..a };
        assert!(small.contains(&format!("{}.6", small.prefix)));
        assert!(!small.contains(&format!("{}.7", small.prefix)));
    }

    #[test]
    fn iptables_lines_split() {
        assert_eq!(
            shell_words("CNI-DN-x -s 10.1.2.0/24 -m comment --comment \"dnat name: x\" -j MARK"),
            [
                "CNI-DN-x",
                "-s",
                "10.1.2.0/24",
                "-m",
                "comment",
                "--comment",
                "dnat name: x",
                "-j",
                "MARK"
            ]
        );
    }
}
