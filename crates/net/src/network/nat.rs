//! Outbound masquerade and hostPort DNAT for the built-in bridge.
//!
//! With `nft` (preferred) everything lives in one table of our own, `inet <name>`:
//!
//! ```text
//! prerouting  (nat, -100)  fib daddr type local jump hostports
//! output      (nat, -100)  fib daddr type local jump hostports
//! postrouting (nat, 100)   jump masq
//! hostports                one DNAT rule per port mapping, commented "berth:pod:<id>"
//! masq                     per subnet: outbound, from localhost, and DNAT'd pod-to-pod
//! ```
//!
//! The base chains hold only our jumps, so they are rewritten whole (idempotent) in one nft
//! transaction. A pod's rules are found again by their comment (`nft -j -a list`) and
//! deleted by handle. Without `nft`, the same shape is built with `iptables`/`ip6tables`
//! chains `<NAME>-HOSTPORTS` and `<NAME>-MASQ` in the `nat` table.

use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::command::{CommandRunner, find_in_path};
use super::config::Protocol;
use super::error::NetworkError;

/// Which firewall tool is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `nft`, at this path.
    Nft(std::path::PathBuf),
    /// `iptables` (and `ip6tables`), in this directory.
    Iptables(std::path::PathBuf),
    /// Neither is installed.
    Missing,
}

impl Backend {
    /// Looks for `nft`, then `iptables`.
    pub fn detect() -> Backend {
        if let Some(p) = find_in_path("nft") {
            return Backend::Nft(p);
        }
        match find_in_path("iptables") {
            Some(p) => Backend::Iptables(p.parent().map(|d| d.to_path_buf()).unwrap_or_default()),
            None => Backend::Missing,
        }
    }
}

/// One hostPort DNAT rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPortRule {
    /// Protocol.
    pub protocol: Protocol,
    /// Only traffic to this host address (else any local address).
    pub host_ip: Option<IpAddr>,
    /// Port on the host.
    pub host_port: u16,
    /// The pod's address.
    pub pod_ip: IpAddr,
    /// Port inside the pod.
    pub container_port: u16,
}

/// The comment tagging a pod's rules.
pub fn pod_tag(pod_id: &str) -> String {
    format!("berth:pod:{pod_id}")
}

fn family_kw(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "ip" } else { "ip6" }
}

/// The nft script that (re)creates our table's base chains and masquerade rules.
/// `subnets` are all subnets pods may have addresses in.
pub fn nft_base_script(table: &str, subnets: &[IpNet], masquerade: bool) -> String {
    let t = format!("inet {table}");
    let mut s = format!(
        "add table {t}\n\
         add chain {t} prerouting {{ type nat hook prerouting priority -100; policy accept; }}\n\
         add chain {t} output {{ type nat hook output priority -100; policy accept; }}\n\
         add chain {t} postrouting {{ type nat hook postrouting priority 100; policy accept; }}\n\
         add chain {t} hostports\n\
         add chain {t} masq\n\
         flush chain {t} prerouting\n\
         flush chain {t} output\n\
         flush chain {t} postrouting\n\
         flush chain {t} masq\n\
         add rule {t} prerouting fib daddr type local jump hostports\n\
         add rule {t} output fib daddr type local jump hostports\n\
         add rule {t} postrouting jump masq\n"
    );
    for net in subnets {
        let f = family_kw(&net.addr());
        if masquerade {
            let mcast = if net.addr().is_ipv4() { "224.0.0.0/4" } else { "ff00::/8" };
            s.push_str(&format!(
                "add rule {t} masq {f} saddr {net} {f} daddr != {net} {f} daddr != {mcast} masquerade\n"
            ));
        }
        // hostPort from the host itself: 127.0.0.1 cannot be the source on the bridge.
        if net.addr().is_ipv4() {
            s.push_str(&format!(
                "add rule {t} masq ip saddr 127.0.0.0/8 ip daddr {net} masquerade\n"
            ));
        } else {
            s.push_str(&format!("add rule {t} masq ip6 saddr ::1 ip6 daddr {net} masquerade\n"));
        }
        // A pod reaching a hostPort that leads back into the subnet (even to itself):
        // without this, the reply would bypass the host and not be un-DNAT'ed.
        s.push_str(&format!(
            "add rule {t} masq ct status dnat {f} saddr {net} {f} daddr {net} masquerade\n"
        ));
    }
    s
}

/// The nft script adding a pod's hostPort rules (after deleting the handles of its old ones).
pub fn nft_pod_script(
    table: &str,
    pod_id: &str,
    rules: &[HostPortRule],
    delete_handles: &[u64],
) -> String {
    let t = format!("inet {table}");
    let tag = pod_tag(pod_id);
    let mut s = String::new();
    for h in delete_handles {
        s.push_str(&format!("delete rule {t} hostports handle {h}\n"));
    }
    for r in rules {
        let f = family_kw(&r.pod_ip);
        let nfproto = if r.pod_ip.is_ipv4() { "ipv4" } else { "ipv6" };
        let dst = match r.host_ip {
            Some(ip) => format!("{} daddr {ip}", family_kw(&ip)),
            None => format!("meta nfproto {nfproto}"),
        };
        let to = match r.pod_ip {
            IpAddr::V4(a) => format!("{a}:{}", r.container_port),
            IpAddr::V6(a) => format!("[{a}]:{}", r.container_port),
        };
        s.push_str(&format!(
            "add rule {t} hostports {dst} {p} dport {hp} dnat {f} to {to} comment \"{tag}\"\n",
            p = r.protocol.as_str(),
            hp = r.host_port,
        ));
    }
    s
}

/// The handles of the rules tagged for `pod_id` in `nft -j -a list chain ...` output.
pub fn nft_handles_for(json: &str, pod_id: &str) -> Result<Vec<u64>, NetworkError> {
    let bad = |reason: String| NetworkError::FirewallOutput { program: "nft", reason };
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(format!("not JSON: {e}")))?;
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .ok_or_else(|| bad("no \"nftables\" array".into()))?;
    let tag = pod_tag(pod_id);
    let mut handles = Vec::new();
    for item in items {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        if rule.get("comment").and_then(|c| c.as_str()) == Some(tag.as_str()) {
            let h = rule
                .get("handle")
                .and_then(|h| h.as_u64())
                .ok_or_else(|| bad("rule without handle".into()))?;
            handles.push(h);
        }
    }
    Ok(handles)
}

/// Names of our iptables chains.
fn ipt_chains(table: &str) -> (String, String) {
    let up = table.to_ascii_uppercase();
    (format!("{up}-HOSTPORTS"), format!("{up}-MASQ"))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Argument lists of iptables commands (without the program).
pub type IptCmds = Vec<Vec<String>>;

/// The iptables commands that create our chains, the jumps to them (chain + rule spec, to
/// be used with `-C` and then `-A`), and the masquerade rules.
/// Returns `(create_chains, jumps, masq_rules)`.
pub fn ipt_base_cmds(
    table: &str,
    subnets: &[IpNet],
    masquerade: bool,
) -> (IptCmds, IptCmds, IptCmds) {
    let (hp, masq) = ipt_chains(table);
    let create =
        vec![args(&["-w", "-t", "nat", "-N", &hp]), args(&["-w", "-t", "nat", "-N", &masq])];
    let jumps = vec![
        args(&["PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", &hp]),
        args(&["OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL", "-j", &hp]),
        args(&["POSTROUTING", "-j", &masq]),
    ];
    let mut rules = vec![args(&["-w", "-t", "nat", "-F", &masq])];
    for net in subnets {
        let n = net.to_string();
        if masquerade {
            rules.push(args(&[
                "-w",
                "-t",
                "nat",
                "-A",
                &masq,
                "-s",
                &n,
                "!",
                "-d",
                &n,
                "-j",
                "MASQUERADE",
            ]));
        }
        let lo = if net.addr().is_ipv4() { "127.0.0.0/8" } else { "::1" };
        rules.push(args(&["-w", "-t", "nat", "-A", &masq, "-s", lo, "-d", &n, "-j", "MASQUERADE"]));
        rules.push(args(&[
            "-w",
            "-t",
            "nat",
            "-A",
            &masq,
            "-m",
            "conntrack",
            "--ctstate",
            "DNAT",
            "-s",
            &n,
            "-d",
            &n,
            "-j",
            "MASQUERADE",
        ]));
    }
    (create, jumps, rules)
}

/// The iptables commands adding a pod's hostPort rules.
pub fn ipt_pod_cmds(table: &str, pod_id: &str, rules: &[HostPortRule]) -> Vec<Vec<String>> {
    let (hp, _) = ipt_chains(table);
    let tag = pod_tag(pod_id);
    rules
        .iter()
        .map(|r| {
            let mut a = args(&["-w", "-t", "nat", "-A", &hp]);
            if let Some(ip) = r.host_ip {
                a.extend(args(&["-d", &ip.to_string()]));
            }
            let p = r.protocol.as_str();
            let to = match r.pod_ip {
                IpAddr::V4(x) => format!("{x}:{}", r.container_port),
                IpAddr::V6(x) => format!("[{x}]:{}", r.container_port),
            };
            a.extend(args(&[
                "-p",
                p,
                "-m",
                p,
                "--dport",
                &r.host_port.to_string(),
                "-m",
                "comment",
                "--comment",
                &tag,
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ]));
            a
        })
        .collect()
}

/// From `iptables -t nat -S <chain>` output, the commands deleting the pod's rules.
pub fn ipt_delete_cmds(listing: &str, pod_id: &str) -> Vec<Vec<String>> {
    let tag = pod_tag(pod_id);
    listing
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let tagged =
                words.windows(2).any(|w| w[0] == "--comment" && w[1].trim_matches('"') == tag);
            if words.first() != Some(&"-A") || !tagged {
                return None;
            }
            let mut a = args(&["-w", "-t", "nat", "-D"]);
            a.extend(words[1..].iter().map(|w| w.trim_matches('"').to_string()));
            Some(a)
        })
        .collect()
}

/// Applies NAT rules with whichever tool is installed.
pub struct Nat {
    backend: Backend,
    table: String,
    runner: Arc<dyn CommandRunner>,
    timeout: Duration,
}

impl Nat {
    /// A NAT manager for table/chain prefix `table`.
    pub fn new(
        backend: Backend,
        table: String,
        runner: Arc<dyn CommandRunner>,
        timeout: Duration,
    ) -> Self {
        Nat { backend, table, runner, timeout }
    }

    /// Whether any firewall tool is available.
    pub fn available(&self) -> bool {
        self.backend != Backend::Missing
    }

    async fn exec(
        &self,
        program: &std::path::Path,
        args: &[String],
        stdin: Vec<u8>,
    ) -> Result<super::command::CommandOutput, NetworkError> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        let name = program.display().to_string();
        self.runner.run(cmd, stdin, self.timeout).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::TimedOut {
                NetworkError::Timeout { program: name, seconds: self.timeout.as_secs() }
            } else {
                NetworkError::Spawn { program: name, source }
            }
        })
    }

    async fn nft_script(
        &self,
        nft: &std::path::Path,
        script: String,
        pod_id: &str,
    ) -> Result<(), NetworkError> {
        let out = self.exec(nft, &args(&["-f", "-"]), script.into_bytes()).await?;
        if out.code != 0 {
            return Err(NetworkError::Firewall {
                program: "nft",
                pod_id: pod_id.to_owned(),
                code: out.code,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }

    async fn ipt(
        &self,
        dir: &std::path::Path,
        v6: bool,
        a: &[String],
        pod_id: &str,
    ) -> Result<super::command::CommandOutput, NetworkError> {
        let prog = dir.join(if v6 { "ip6tables" } else { "iptables" });
        let out = self.exec(&prog, a, Vec::new()).await?;
        if out.code != 0 {
            return Err(NetworkError::Firewall {
                program: if v6 { "ip6tables" } else { "iptables" },
                pod_id: pod_id.to_owned(),
                code: out.code,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(out)
    }

    /// Creates our table/chains and the masquerade rules for `subnets`. Idempotent.
    pub async fn ensure_base(
        &self,
        subnets: &[IpNet],
        masquerade: bool,
    ) -> Result<(), NetworkError> {
        match &self.backend {
            Backend::Nft(nft) => {
                self.nft_script(nft, nft_base_script(&self.table, subnets, masquerade), "").await
            }
            Backend::Iptables(dir) => {
                for v6 in [false, true] {
                    let fam: Vec<IpNet> =
                        subnets.iter().filter(|n| n.addr().is_ipv6() == v6).copied().collect();
                    if v6 && fam.is_empty() {
                        continue;
                    }
                    let (create, jumps, rules) = ipt_base_cmds(&self.table, &fam, masquerade);
                    for c in create {
                        // Exit 1 = the chain exists already.
                        let _ = self.ipt(dir, v6, &c, "").await;
                    }
                    for j in jumps {
                        let mut check = args(&["-w", "-t", "nat", "-C"]);
                        check.extend(j.iter().cloned());
                        if self.ipt(dir, v6, &check, "").await.is_err() {
                            let mut add = args(&["-w", "-t", "nat", "-A"]);
                            add.extend(j);
                            self.ipt(dir, v6, &add, "").await?;
                        }
                    }
                    for r in rules {
                        self.ipt(dir, v6, &r, "").await?;
                    }
                }
                Ok(())
            }
            Backend::Missing => Err(NetworkError::NoFirewall { purpose: "masquerade" }),
        }
    }

    /// Replaces the hostPort rules of a pod with `rules`.
    pub async fn set_pod(&self, pod_id: &str, rules: &[HostPortRule]) -> Result<(), NetworkError> {
        match &self.backend {
            Backend::Nft(nft) => self.nft_set_pod(nft, pod_id, rules).await,
            Backend::Iptables(dir) => {
                self.remove_pod(pod_id).await?;
                for v6 in [false, true] {
                    let fam: Vec<HostPortRule> =
                        rules.iter().filter(|r| r.pod_ip.is_ipv6() == v6).cloned().collect();
                    for c in ipt_pod_cmds(&self.table, pod_id, &fam) {
                        self.ipt(dir, v6, &c, pod_id).await?;
                    }
                }
                Ok(())
            }
            Backend::Missing if rules.is_empty() => Ok(()),
            Backend::Missing => Err(NetworkError::NoFirewall { purpose: "hostPort mappings" }),
        }
    }

    /// Deletes the pod's rules and adds `rules`, in one nft transaction.
    async fn nft_set_pod(
        &self,
        nft: &std::path::Path,
        pod_id: &str,
        rules: &[HostPortRule],
    ) -> Result<(), NetworkError> {
        let old = self.nft_pod_handles(nft, pod_id).await?;
        if old.is_empty() && rules.is_empty() {
            return Ok(());
        }
        let script = nft_pod_script(&self.table, pod_id, rules, &old);
        self.nft_script(nft, script, pod_id).await
    }

    async fn nft_pod_handles(
        &self,
        nft: &std::path::Path,
        pod_id: &str,
    ) -> Result<Vec<u64>, NetworkError> {
        let out = self
            .exec(
                nft,
                &args(&["-j", "-a", "list", "chain", "inet", &self.table, "hostports"]),
                Vec::new(),
            )
            .await?;
        if out.code != 0 {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // No table or chain: no rules to find.
            if stderr.contains("No such file or directory") {
                return Ok(Vec::new());
            }
            return Err(NetworkError::Firewall {
                program: "nft",
                pod_id: pod_id.to_owned(),
                code: out.code,
                stderr: stderr.trim().to_owned(),
            });
        }
        nft_handles_for(&String::from_utf8_lossy(&out.stdout), pod_id)
    }

    /// Deletes the hostPort rules of a pod. Idempotent.
    pub async fn remove_pod(&self, pod_id: &str) -> Result<(), NetworkError> {
        match &self.backend {
            Backend::Nft(nft) => self.nft_set_pod(nft, pod_id, &[]).await,
            Backend::Iptables(dir) => {
                let (hp, _) = ipt_chains(&self.table);
                for v6 in [false, true] {
                    let Ok(out) =
                        self.ipt(dir, v6, &args(&["-w", "-t", "nat", "-S", &hp]), pod_id).await
                    else {
                        // No chain (or no ip6tables): nothing of ours there.
                        continue;
                    };
                    for c in ipt_delete_cmds(&String::from_utf8_lossy(&out.stdout), pod_id) {
                        self.ipt(dir, v6, &c, pod_id).await?;
                    }
                }
                Ok(())
            }
            Backend::Missing => Ok(()),
        }
    }

    /// Deletes our whole table (nft) or chains (iptables). For tests and uninstall.
    pub async fn remove_all(&self) -> Result<(), NetworkError> {
        match &self.backend {
            Backend::Nft(nft) => {
                let out = self
                    .exec(nft, &args(&["delete", "table", "inet", &self.table]), Vec::new())
                    .await?;
                let stderr = String::from_utf8_lossy(&out.stderr);
                if out.code != 0 && !stderr.contains("No such file or directory") {
                    return Err(NetworkError::Firewall {
                        program: "nft",
                        pod_id: String::new(),
                        code: out.code,
                        stderr: stderr.trim().to_owned(),
                    });
                }
                Ok(())
            }
            Backend::Iptables(dir) => {
                let (hp, masq) = ipt_chains(&self.table);
                for v6 in [false, true] {
                    let jumps = [
                        args(&["PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", &hp]),
                        args(&["OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL", "-j", &hp]),
                        args(&["POSTROUTING", "-j", &masq]),
                    ];
                    for j in jumps {
                        let mut del = args(&["-w", "-t", "nat", "-D"]);
                        del.extend(j);
                        let _ = self.ipt(dir, v6, &del, "").await;
                    }
                    for c in [&hp, &masq] {
                        let _ = self.ipt(dir, v6, &args(&["-w", "-t", "nat", "-F", c]), "").await;
                        let _ = self.ipt(dir, v6, &args(&["-w", "-t", "nat", "-X", c]), "").await;
                    }
                }
                Ok(())
            }
            Backend::Missing => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(host_ip: Option<&str>, pod_ip: &str) -> HostPortRule {
        HostPortRule {
            protocol: Protocol::Tcp,
            host_ip: host_ip.map(|s| s.parse().unwrap()),
            host_port: 8080,
            pod_ip: pod_ip.parse().unwrap(),
            container_port: 80,
        }
    }

    #[test]
    fn base_script() {
        let s = nft_base_script("berth", &["10.88.0.0/16".parse().unwrap()], true);
        assert!(s.starts_with("add table inet berth\n"));
        assert!(s.contains(
            "add chain inet berth prerouting { type nat hook prerouting priority -100; policy accept; }"
        ));
        assert!(s.contains("flush chain inet berth masq\n"));
        assert!(s.contains("add rule inet berth prerouting fib daddr type local jump hostports\n"));
        assert!(s.contains(
            "add rule inet berth masq ip saddr 10.88.0.0/16 ip daddr != 10.88.0.0/16 ip daddr != 224.0.0.0/4 masquerade\n"
        ));
        assert!(s.contains("ip saddr 127.0.0.0/8 ip daddr 10.88.0.0/16 masquerade"));
        // Never flush the hostports chain: it holds other pods' rules.
        assert!(!s.contains("flush chain inet berth hostports"));
        let no_masq = nft_base_script("b", &["fd00::/64".parse().unwrap()], false);
        assert!(!no_masq.contains("daddr != fd00::/64"));
        assert!(
            no_masq.contains("ct status dnat ip6 saddr fd00::/64 ip6 daddr fd00::/64 masquerade")
        );
    }

    #[test]
    fn pod_script() {
        let s = nft_pod_script(
            "berth",
            "pod1",
            &[
                rule(None, "10.88.0.2"),
                HostPortRule { protocol: Protocol::Udp, ..rule(Some("127.0.0.1"), "10.88.0.2") },
                rule(None, "fd00::2"),
            ],
            &[7, 9],
        );
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(
            lines,
            [
                "delete rule inet berth hostports handle 7",
                "delete rule inet berth hostports handle 9",
                "add rule inet berth hostports meta nfproto ipv4 tcp dport 8080 dnat ip to 10.88.0.2:80 comment \"berth:pod:pod1\"",
                "add rule inet berth hostports ip daddr 127.0.0.1 udp dport 8080 dnat ip to 10.88.0.2:80 comment \"berth:pod:pod1\"",
                "add rule inet berth hostports meta nfproto ipv6 tcp dport 8080 dnat ip6 to [fd00::2]:80 comment \"berth:pod:pod1\"",
            ]
        );
    }

    #[test]
    fn handles_from_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"chain": {"family": "inet", "table": "berth", "name": "hostports", "handle": 4}},
          {"rule": {"family": "inet", "table": "berth", "chain": "hostports", "handle": 11, "comment": "berth:pod:a", "expr": []}},
          {"rule": {"family": "inet", "table": "berth", "chain": "hostports", "handle": 12, "comment": "berth:pod:ab", "expr": []}},
          {"rule": {"family": "inet", "table": "berth", "chain": "hostports", "handle": 13, "comment": "berth:pod:a", "expr": []}}]}"#;
        assert_eq!(nft_handles_for(json, "a").unwrap(), vec![11, 13]);
        assert!(nft_handles_for(json, "zzz").unwrap().is_empty());
        assert!(nft_handles_for("garbage", "a").is_err());
    }

    #[test]
    fn iptables_commands() {
        let (create, jumps, rules) =
            ipt_base_cmds("berth", &["10.88.0.0/16".parse().unwrap()], true);
        assert_eq!(create[0].join(" "), "-w -t nat -N BERTH-HOSTPORTS");
        assert_eq!(jumps[2].join(" "), "POSTROUTING -j BERTH-MASQ");
        assert_eq!(rules[0].join(" "), "-w -t nat -F BERTH-MASQ");
        assert_eq!(
            rules[1].join(" "),
            "-w -t nat -A BERTH-MASQ -s 10.88.0.0/16 ! -d 10.88.0.0/16 -j MASQUERADE"
        );
        let add = ipt_pod_cmds("berth", "p1", &[rule(Some("192.168.1.5"), "10.88.0.9")]);
        assert_eq!(
            add[0].join(" "),
            "-w -t nat -A BERTH-HOSTPORTS -d 192.168.1.5 -p tcp -m tcp --dport 8080 -m comment --comment berth:pod:p1 -j DNAT --to-destination 10.88.0.9:80"
        );
        let listing = "-N BERTH-HOSTPORTS\n\
            -A BERTH-HOSTPORTS -d 192.168.1.5/32 -p tcp -m tcp --dport 8080 -m comment --comment berth:pod:p1 -j DNAT --to-destination 10.88.0.9:80\n\
            -A BERTH-HOSTPORTS -p tcp -m tcp --dport 81 -m comment --comment berth:pod:p10 -j DNAT --to-destination 10.88.0.10:80\n";
        let del = ipt_delete_cmds(listing, "p1");
        assert_eq!(del.len(), 1);
        assert_eq!(
            del[0].join(" "),
            "-w -t nat -D BERTH-HOSTPORTS -d 192.168.1.5/32 -p tcp -m tcp --dport 8080 -m comment --comment berth:pod:p1 -j DNAT --to-destination 10.88.0.9:80"
        );
    }
}
