//! CNI: network configuration files, plugin invocation (spec 1.0) and the result cache.
//!
//! A network is the first valid file of the conf dir in lexical order (`.conflist`,
//! `.conf`, `.json`; a single-plugin `.conf` is treated as a list of one). ADD runs the
//! plugins in order, each getting the previous one's result as `prevResult`; DEL runs them
//! in reverse with the cached ADD result. The config and result of each pod are cached at
//! `<state>/cni/<pod id>.json` (written before ADD, completed after), so DEL after a restart
//! or a config change uses what ADD used.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::command::{CommandRunner, is_executable};
use super::config::{PodNetwork, PodNetworkStatus};
use super::error::NetworkError;
use super::veth::POD_IFNAME;

/// A parsed network configuration list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetConfList {
    /// `cniVersion`, if the file gives one.
    pub cni_version: Option<String>,
    /// Network name.
    pub name: String,
    /// `disableCheck`.
    pub disable_check: bool,
    /// The plugin configurations, in order (each has a string `type`).
    pub plugins: Vec<Map<String, Value>>,
    /// The file it came from.
    pub source: PathBuf,
}

impl NetConfList {
    /// Parses a `.conflist` (with `plugins`) or a single-plugin `.conf`/`.json`.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, NetworkError> {
        let bad = |reason: String| NetworkError::CniConfig { path: path.to_path_buf(), reason };
        let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("no \"name\"".into()))?
            .to_owned();
        let cni_version = match obj.get("cniVersion") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(bad("\"cniVersion\" is not a string".into())),
        };
        let disable_check = obj.get("disableCheck").and_then(Value::as_bool).unwrap_or(false);
        let plugins: Vec<Map<String, Value>> = match obj.get("plugins") {
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    p.as_object()
                        .cloned()
                        .ok_or_else(|| bad(format!("plugins[{i}] is not an object")))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("\"plugins\" is not an array".into())),
            // A single plugin config: the whole object is the plugin.
            None => vec![obj.clone()],
        };
        if plugins.is_empty() {
            return Err(bad("no plugins".into()));
        }
        for (i, p) in plugins.iter().enumerate() {
            match p.get("type").and_then(Value::as_str) {
                Some(t) if !t.is_empty() && !t.contains('/') && t != ".." && t != "." => {}
                _ => return Err(bad(format!("plugins[{i}] has no valid \"type\""))),
            }
        }
        Ok(NetConfList { cni_version, name, disable_check, plugins, source: path.to_path_buf() })
    }

    /// The `type` of plugin `i`.
    fn plugin_type(&self, i: usize) -> &str {
        self.plugins[i].get("type").and_then(Value::as_str).unwrap_or_default()
    }
}

/// Candidate config files of `dir`, in lexical order.
pub fn config_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Loads the first valid network config of `dir` (invalid files are skipped, with a warning).
pub fn load_first(dir: &Path) -> Result<NetConfList, NetworkError> {
    let files = config_files(dir).map_err(|e| NetworkError::NoCniConfig {
        dir: dir.to_path_buf(),
        reason: format!("cannot read directory: {e}"),
    })?;
    let mut errors = Vec::new();
    for f in files {
        let parsed = std::fs::read(&f)
            .map_err(|source| NetworkError::File {
                action: "read CNI config",
                path: f.clone(),
                source,
            })
            .and_then(|b| NetConfList::parse(&f, &b));
        match parsed {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!(error = %e, "skipping invalid CNI config");
                errors.push(e.to_string());
            }
        }
    }
    Err(NetworkError::NoCniConfig {
        dir: dir.to_path_buf(),
        reason: if errors.is_empty() {
            "no .conflist/.conf/.json file".into()
        } else {
            errors.join("; ")
        },
    })
}

/// `"1.0.0"` -> `(1, 0, 0)`; missing parts are 0, an unparsable version is 0.1.0 (the
/// oldest, which is what plugins assume for a missing version).
pub fn parse_version(v: Option<&str>) -> (u32, u32, u32) {
    let Some(v) = v.filter(|v| !v.is_empty()) else {
        return (0, 1, 0);
    };
    let mut parts = v.split('.').map(|p| p.parse::<u32>());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(a)), b, c) => {
            (a, b.and_then(Result::ok).unwrap_or(0), c.and_then(Result::ok).unwrap_or(0))
        }
        _ => (0, 1, 0),
    }
}

/// The `CNI_ARGS` value for a pod.
pub fn cni_args(pod: &PodNetwork) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        pod.namespace, pod.name, pod.pod_id, pod.uid
    )
}

/// The CNI environment of one plugin call.
pub fn cni_env(
    command: &str,
    pod: &PodNetwork,
    netns: Option<&Path>,
    bin_dirs: &[PathBuf],
) -> Vec<(String, String)> {
    let path = bin_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":");
    vec![
        ("CNI_COMMAND".into(), command.into()),
        ("CNI_CONTAINERID".into(), pod.pod_id.clone()),
        ("CNI_NETNS".into(), netns.map(|p| p.display().to_string()).unwrap_or_default()),
        ("CNI_IFNAME".into(), POD_IFNAME.into()),
        ("CNI_PATH".into(), path),
        ("CNI_ARGS".into(), cni_args(pod)),
    ]
}

/// The runtime config a plugin gets: only the capabilities it declares.
pub fn runtime_config(plugin: &Map<String, Value>, pod: &PodNetwork) -> Option<Value> {
    let caps = plugin.get("capabilities").and_then(Value::as_object)?;
    let has = |c: &str| caps.get(c).and_then(Value::as_bool).unwrap_or(false);
    let mut rc = Map::new();
    if has("portMappings") && !pod.port_mappings.is_empty() {
        let pms: Vec<Value> = pod
            .port_mappings
            .iter()
            .map(|p| {
                let mut m = json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": p.protocol.as_str(),
                });
                if let Some(ip) = p.host_ip {
                    m["hostIP"] = json!(ip.to_string());
                }
                m
            })
            .collect();
        rc.insert("portMappings".into(), Value::Array(pms));
    }
    if let Some(b) = pod.bandwidth.as_ref().filter(|_| has("bandwidth")) {
        rc.insert(
            "bandwidth".into(),
            json!({
                "ingressRate": b.ingress_rate,
                "ingressBurst": b.ingress_burst,
                "egressRate": b.egress_rate,
                "egressBurst": b.egress_burst,
            }),
        );
    }
    if let Some(d) = pod.dns.as_ref().filter(|_| has("dns")) {
        rc.insert(
            "dns".into(),
            json!({"servers": d.servers, "searches": d.searches, "options": d.options}),
        );
    }
    (!rc.is_empty()).then_some(Value::Object(rc))
}

/// The stdin of one plugin call: its config plus `name`, `cniVersion`, `prevResult`,
/// `runtimeConfig`.
pub fn plugin_stdin(
    list: &NetConfList,
    i: usize,
    pod: &PodNetwork,
    prev_result: Option<&Value>,
) -> Value {
    let mut conf = list.plugins[i].clone();
    conf.insert("name".into(), json!(list.name));
    if let Some(v) = &list.cni_version {
        conf.insert("cniVersion".into(), json!(v));
    }
    if let Some(prev) = prev_result {
        conf.insert("prevResult".into(), prev.clone());
    }
    if let Some(rc) = runtime_config(&list.plugins[i], pod) {
        conf.insert("runtimeConfig".into(), rc);
    }
    Value::Object(conf)
}

/// The pod's addresses in a CNI result (0.3+: `ips`, only those on an interface inside the
/// sandbox or without an interface; 0.1/0.2: `ip4`/`ip6`).
pub fn result_ips(result: &Value) -> Result<Vec<IpAddr>, String> {
    let parse = |s: &str| -> Result<IpAddr, String> {
        let addr = s.split('/').next().unwrap_or(s);
        addr.parse().map_err(|e| format!("bad address {s:?}: {e}"))
    };
    let mut out = Vec::new();
    if let Some(ips) = result.get("ips").and_then(Value::as_array) {
        let interfaces =
            result.get("interfaces").and_then(Value::as_array).cloned().unwrap_or_default();
        for ip in ips {
            let in_sandbox = match ip.get("interface").and_then(Value::as_u64) {
                None => true,
                Some(idx) => interfaces
                    .get(idx as usize)
                    .and_then(|i| i.get("sandbox"))
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty()),
            };
            if !in_sandbox {
                continue;
            }
            let a =
                ip.get("address").and_then(Value::as_str).ok_or("ips[] entry without address")?;
            out.push(parse(a)?);
        }
    } else {
        for key in ["ip4", "ip6"] {
            if let Some(a) = result.get(key).and_then(|v| v.get("ip")).and_then(Value::as_str) {
                out.push(parse(a)?);
            }
        }
    }
    Ok(out)
}

/// Turns result addresses into a status: IPv4 first (as the kubelet expects the primary IP).
pub fn status_from_ips(
    pod_id: &str,
    mut ips: Vec<IpAddr>,
) -> Result<PodNetworkStatus, NetworkError> {
    ips.sort_by_key(|ip| ip.is_ipv6());
    ips.dedup();
    let mut it = ips.into_iter();
    let ip = it.next().ok_or_else(|| NetworkError::NoAddress { pod_id: pod_id.to_owned() })?;
    Ok(PodNetworkStatus { ip, additional_ips: it.collect(), interface: POD_IFNAME.to_owned() })
}

/// What is cached per pod under `<state>/cni/<pod id>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniCache {
    /// The pod, as given to ADD.
    pub pod: PodNetwork,
    /// The network used.
    pub network: NetConfList,
    /// The final ADD result; `None` while (or if) ADD did not finish.
    pub result: Option<Value>,
}

/// Reads and writes the cache files.
pub struct CniCacheDir {
    dir: PathBuf,
}

impl CniCacheDir {
    /// The cache under `<state_dir>/cni`.
    pub fn new(state_dir: &Path) -> Self {
        CniCacheDir { dir: state_dir.join("cni") }
    }

    /// The directory holding the cache files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, pod_id: &str) -> PathBuf {
        self.dir.join(format!("{pod_id}.json"))
    }

    /// The cache of a pod, if any.
    pub fn load(&self, pod_id: &str) -> Result<Option<CniCache>, NetworkError> {
        let path = self.path(pod_id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(NetworkError::File { action: "read CNI cache", path, source });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| NetworkError::Record { pod_id: pod_id.to_owned(), source })
    }

    /// Writes the cache of a pod atomically (temp file, fsync, rename).
    pub fn store(&self, cache: &CniCache) -> Result<(), NetworkError> {
        use std::io::Write;
        let pod_id = &cache.pod.pod_id;
        let file_err = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| NetworkError::File { action, path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(file_err("create", &self.dir))?;
        let json = serde_json::to_vec(cache)
            .map_err(|source| NetworkError::Record { pod_id: pod_id.clone(), source })?;
        let path = self.path(pod_id);
        let tmp = self.dir.join(format!(".{pod_id}.json.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(file_err("create", &tmp))?;
        f.write_all(&json).map_err(file_err("write", &tmp))?;
        f.sync_all().map_err(file_err("sync", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(file_err("rename into", &path))
    }

    /// Forgets a pod. Idempotent.
    pub fn remove(&self, pod_id: &str) -> Result<(), NetworkError> {
        let path = self.path(pod_id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NetworkError::File { action: "remove CNI cache", path, source }),
        }
    }
}

/// Runs CNI plugins.
pub struct CniExec<'a> {
    /// Where plugins are looked up.
    pub bin_dirs: &'a [PathBuf],
    /// How they are run.
    pub runner: &'a dyn CommandRunner,
    /// Per-plugin time limit.
    pub timeout: Duration,
}

impl CniExec<'_> {
    fn find(&self, plugin: &str) -> Result<PathBuf, NetworkError> {
        self.bin_dirs.iter().map(|d| d.join(plugin)).find(|p| is_executable(p)).ok_or_else(|| {
            NetworkError::PluginNotFound { plugin: plugin.to_owned(), dirs: self.bin_dirs.to_vec() }
        })
    }

    /// Runs one plugin; returns its stdout parsed (`Value::Null` when it printed nothing).
    async fn call(
        &self,
        command: &'static str,
        list: &NetConfList,
        i: usize,
        pod: &PodNetwork,
        netns: Option<&Path>,
        prev: Option<&Value>,
    ) -> Result<Value, NetworkError> {
        let plugin = list.plugin_type(i).to_owned();
        let bin = self.find(&plugin)?;
        let stdin = plugin_stdin(list, i, pod, prev);
        let mut cmd = Command::new(&bin);
        cmd.envs(cni_env(command, pod, netns, self.bin_dirs));
        let input = serde_json::to_vec(&stdin)
            .map_err(|source| NetworkError::Record { pod_id: pod.pod_id.clone(), source })?;
        tracing::debug!(pod_id = %pod.pod_id, %plugin, command, "running CNI plugin");
        let out = self.runner.run(cmd, input, self.timeout).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::TimedOut {
                NetworkError::Timeout {
                    program: bin.display().to_string(),
                    seconds: self.timeout.as_secs(),
                }
            } else {
                NetworkError::Spawn { program: bin.display().to_string(), source }
            }
        })?;
        let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        let error_obj =
            parsed.as_ref().filter(|v| v.get("code").is_some() && v.get("msg").is_some());
        if out.code != 0 || error_obj.is_some() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            let (code, msg, details) = match error_obj {
                Some(e) => (
                    e.get("code").and_then(Value::as_i64).unwrap_or(out.code as i64),
                    e.get("msg").and_then(Value::as_str).unwrap_or_default().to_owned(),
                    e.get("details").and_then(Value::as_str).map(str::to_owned).unwrap_or(stderr),
                ),
                None => (
                    out.code as i64,
                    String::from_utf8_lossy(&out.stdout).trim().to_owned(),
                    stderr,
                ),
            };
            return Err(NetworkError::Plugin {
                plugin,
                command,
                pod_id: pod.pod_id.clone(),
                code,
                msg,
                details,
            });
        }
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        parsed.ok_or_else(|| NetworkError::PluginResult {
            plugin,
            pod_id: pod.pod_id.clone(),
            reason: format!(
                "stdout is not JSON: {}",
                String::from_utf8_lossy(&out.stdout).chars().take(200).collect::<String>()
            ),
        })
    }

    /// ADD through the whole list; returns the final result.
    pub async fn add(&self, list: &NetConfList, pod: &PodNetwork) -> Result<Value, NetworkError> {
        let mut prev: Option<Value> = None;
        for i in 0..list.plugins.len() {
            let res = self.call("ADD", list, i, pod, Some(&pod.netns), prev.as_ref()).await?;
            if res.is_null() {
                return Err(NetworkError::PluginResult {
                    plugin: list.plugin_type(i).to_owned(),
                    pod_id: pod.pod_id.clone(),
                    reason: "ADD printed no result".into(),
                });
            }
            prev = Some(res);
        }
        prev.ok_or_else(|| NetworkError::NoAddress { pod_id: pod.pod_id.clone() })
    }

    /// CHECK through the whole list (CNI >= 0.4.0 and not `disableCheck`; else a no-op).
    pub async fn check(
        &self,
        list: &NetConfList,
        pod: &PodNetwork,
        result: &Value,
    ) -> Result<(), NetworkError> {
        if list.disable_check || parse_version(list.cni_version.as_deref()) < (0, 4, 0) {
            return Ok(());
        }
        for i in 0..list.plugins.len() {
            self.call("CHECK", list, i, pod, Some(&pod.netns), Some(result)).await?;
        }
        Ok(())
    }

    /// DEL through the list in reverse. `result` is the cached ADD result (passed as
    /// `prevResult` from CNI 0.4.0 on). All plugins are called even if one fails; the
    /// first error is returned.
    pub async fn del(
        &self,
        list: &NetConfList,
        pod: &PodNetwork,
        netns: Option<&Path>,
        result: Option<&Value>,
    ) -> Result<(), NetworkError> {
        let prev = result.filter(|_| parse_version(list.cni_version.as_deref()) >= (0, 4, 0));
        let mut first_err = None;
        for i in (0..list.plugins.len()).rev() {
            if let Err(e) = self.call("DEL", list, i, pod, netns, prev).await {
                tracing::warn!(pod_id = %pod.pod_id, error = %e, "CNI DEL failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::config::{BandwidthConfig, DnsConfig, PortMapping, Protocol};

    fn pod() -> PodNetwork {
        PodNetwork {
            pod_id: "abc".into(),
            name: "web".into(),
            namespace: "default".into(),
            uid: "u-1".into(),
            netns: "/run/berth/netns/abc".into(),
            port_mappings: vec![PortMapping {
                protocol: Protocol::Tcp,
                container_port: 80,
                host_port: 8080,
                host_ip: None,
            }],
            dns: Some(DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["svc.cluster.local".into()],
                options: vec![],
            }),
            bandwidth: Some(BandwidthConfig { ingress_rate: 1000, ..Default::default() }),
        }
    }

    const CONFLIST: &str = r#"{
      "cniVersion": "1.0.0", "name": "k8s",
      "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}},
        {"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}},
        {"type": "bandwidth", "capabilities": {"bandwidth": true}}
      ]}"#;

    #[test]
    fn parse_conflist_and_conf() {
        let l = NetConfList::parse(Path::new("/x/10.conflist"), CONFLIST.as_bytes()).unwrap();
        assert_eq!(l.name, "k8s");
        assert_eq!(l.cni_version.as_deref(), Some("1.0.0"));
        assert_eq!(l.plugins.len(), 3);
        assert_eq!(l.plugin_type(1), "portmap");
        let single = NetConfList::parse(
            Path::new("/x/a.conf"),
            br#"{"cniVersion":"0.3.1","name":"n","type":"bridge"}"#,
        )
        .unwrap();
        assert_eq!(single.plugins.len(), 1);
        assert_eq!(single.plugin_type(0), "bridge");
        for bad in [
            &br#"{"name":"n","plugins":[]}"#[..],
            br#"{"plugins":[{"type":"x"}]}"#,
            br#"{"name":"n","plugins":[{"type":"../evil"}]}"#,
            br#"{"name":"n","plugins":[{"notype":1}]}"#,
            b"not json",
        ] {
            assert!(NetConfList::parse(Path::new("/x/b.conf"), bad).is_err());
        }
    }

    #[test]
    fn first_valid_file_in_lexical_order() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_first(dir.path()).unwrap_err();
        assert!(matches!(err, NetworkError::NoCniConfig { .. }));
        std::fs::write(dir.path().join("99-last.conflist"), CONFLIST).unwrap();
        std::fs::write(
            dir.path().join("10-first.conf"),
            r#"{"cniVersion":"0.4.0","name":"first","type":"ptp"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("05-broken.conflist"), "{").unwrap();
        std::fs::write(dir.path().join("00-ignored.txt"), "x").unwrap();
        assert_eq!(load_first(dir.path()).unwrap().name, "first");
    }

    #[test]
    fn args_and_env() {
        let p = pod();
        assert_eq!(
            cni_args(&p),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
        );
        let env = cni_env(
            "ADD",
            &p,
            Some(Path::new("/run/ns")),
            &[PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
        );
        let get = |k: &str| env.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get("CNI_COMMAND"), "ADD");
        assert_eq!(get("CNI_CONTAINERID"), "abc");
        assert_eq!(get("CNI_NETNS"), "/run/ns");
        assert_eq!(get("CNI_IFNAME"), "eth0");
        assert_eq!(get("CNI_PATH"), "/opt/cni/bin:/usr/lib/cni");
        let env = cni_env("DEL", &p, None, &[]);
        assert_eq!(env.iter().find(|(n, _)| n == "CNI_NETNS").unwrap().1, "");
    }

    #[test]
    fn stdin_has_name_version_prev_and_only_declared_capabilities() {
        let l = NetConfList::parse(Path::new("/x/a.conflist"), CONFLIST.as_bytes()).unwrap();
        let p = pod();
        let first = plugin_stdin(&l, 0, &p, None);
        assert_eq!(first["name"], "k8s");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none());
        assert!(first.get("runtimeConfig").is_none());
        let prev = json!({"cniVersion": "1.0.0", "ips": []});
        let pm = plugin_stdin(&l, 1, &p, Some(&prev));
        assert_eq!(pm["prevResult"], prev);
        assert_eq!(
            pm["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
        );
        let bw = plugin_stdin(&l, 2, &p, Some(&prev));
        assert_eq!(bw["runtimeConfig"]["bandwidth"]["ingressRate"], 1000);
        assert!(bw["runtimeConfig"].get("portMappings").is_none());
    }

    #[test]
    fn result_parsing() {
        let r = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "cni0", "mac": "x"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/run/ns"}],
            "ips": [
                {"address": "fd00::5/64", "interface": 2},
                {"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 2},
                {"address": "10.99.0.1/16", "interface": 0}
            ]
        });
        let ips = result_ips(&r).unwrap();
        assert_eq!(ips.len(), 2);
        let st = status_from_ips("p", ips).unwrap();
        assert_eq!(st.ip, "10.22.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(st.additional_ips, vec!["fd00::5".parse::<IpAddr>().unwrap()]);
        let old = json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.2/24"}});
        assert_eq!(result_ips(&old).unwrap(), vec!["10.1.0.2".parse::<IpAddr>().unwrap()]);
        assert!(status_from_ips("p", vec![]).is_err());
        assert!(result_ips(&json!({"ips": [{"address": "nope"}]})).is_err());
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version(Some("1.0.0")), (1, 0, 0));
        assert_eq!(parse_version(Some("0.3.1")), (0, 3, 1));
        assert_eq!(parse_version(None), (0, 1, 0));
        assert!(parse_version(Some("0.4.0")) >= (0, 4, 0));
        assert!(parse_version(Some("0.3.1")) < (0, 4, 0));
    }

    #[test]
    fn cache_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CniCacheDir::new(dir.path());
        assert!(cache.load("abc").unwrap().is_none());
        let l = NetConfList::parse(Path::new("/x/a.conflist"), CONFLIST.as_bytes()).unwrap();
        let c = CniCache { pod: pod(), network: l, result: Some(json!({"ips": []})) };
        cache.store(&c).unwrap();
        assert_eq!(cache.load("abc").unwrap().unwrap(), c);
        cache.remove("abc").unwrap();
        cache.remove("abc").unwrap();
        assert!(cache.load("abc").unwrap().is_none());
    }
}
