//! Address management for the built-in bridge, persistent in redb.
//!
//! Two tables: `net.ipam` maps an address to the pod holding it, `net.pods` maps a pod id to
//! its [`PodRecord`] (JSON). Each allocation and each release is one write transaction, so an
//! address is never handed out twice and a crash leaves either the old or the new state.
//! `net.meta` keeps the kubelet's pod CIDR and, per subnet, where the last allocation ended
//! (like CNI's host-local, we continue after it instead of reusing a just-released address
//! at once: a stale connection to an old pod should not reach a new one).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::config::{PortMapping, check_subnet};
use super::error::NetworkError;

/// Address -> pod id.
const IPAM: TableDefinition<&str, &str> = TableDefinition::new("net.ipam");
/// Pod id -> [`PodRecord`] as JSON.
const PODS: TableDefinition<&str, &str> = TableDefinition::new("net.pods");
/// Small settings: `pod_cidr`, `cursor/<subnet>`.
const META: TableDefinition<&str, &str> = TableDefinition::new("net.meta");

/// How many candidates one allocation looks at before giving up. Bounds the work for huge
/// (IPv6) subnets; a /12 of IPv4 is still scanned completely.
const SCAN_LIMIT: u128 = 1 << 20;

/// What the built-in bridge allocated and configured for one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// The pod.
    pub pod_id: String,
    /// Its addresses, with the prefix length of their subnet.
    pub addresses: Vec<IpNet>,
    /// The gateway for each address (same order).
    pub gateways: Vec<IpAddr>,
    /// The bridge its veth is attached to.
    pub bridge: String,
    /// Host end of its veth pair.
    pub host_veth: String,
    /// Its network namespace.
    pub netns: PathBuf,
    /// Its hostPort mappings (to rebuild NAT rules).
    pub port_mappings: Vec<PortMapping>,
    /// Set once the links, addresses and NAT rules are all in place.
    pub complete: bool,
}

/// Parses the kubelet's pod CIDR (`"10.244.1.0/24"` or dual stack `"10.244.1.0/24,fd00::/64"`).
pub(crate) fn parse_pod_cidr(cidr: &str) -> Result<Vec<IpNet>, NetworkError> {
    let mut nets = Vec::new();
    for part in cidr.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let net: IpNet = part.parse().map_err(|e| NetworkError::InvalidSubnet {
            cidr: part.to_owned(),
            reason: format!("{e}"),
        })?;
        let net = net.trunc();
        check_subnet(&net)?;
        if nets.iter().any(|n: &IpNet| n.addr().is_ipv4() == net.addr().is_ipv4()) {
            return Err(NetworkError::InvalidSubnet {
                cidr: cidr.to_owned(),
                reason: "more than one CIDR of the same family".into(),
            });
        }
        nets.push(net);
    }
    Ok(nets)
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v4: bool, n: u128) -> IpAddr {
    if v4 { IpAddr::V4(Ipv4Addr::from(n as u32)) } else { IpAddr::V6(Ipv6Addr::from(n)) }
}

/// The gateway of a subnet: its first host address.
pub fn gateway(subnet: &IpNet) -> IpAddr {
    from_u128(subnet.addr().is_ipv4(), to_u128(subnet.network()) + 1)
}

/// The range of addresses given to pods: from the second host to the last one before
/// the broadcast address (for IPv6 we keep the same shape; it costs one address).
fn pod_range(subnet: &IpNet) -> (u128, u128) {
    (to_u128(subnet.network()) + 2, to_u128(subnet.broadcast()) - 1)
}

/// The persistent allocator.
pub struct Ipam {
    db: Arc<Database>,
}

impl Ipam {
    /// Opens (creating if needed) the tables in `db`.
    pub fn open(db: Arc<Database>) -> Result<Self, NetworkError> {
        let txn = db.begin_write().map_err(|e| NetworkError::db("begin write", e))?;
        for def in [IPAM, PODS, META] {
            txn.open_table(def).map_err(|e| NetworkError::db("create table", e))?;
        }
        txn.commit().map_err(|e| NetworkError::db("commit", e))?;
        Ok(Ipam { db })
    }

    /// The record of a pod, if it has one.
    pub fn get(&self, pod_id: &str) -> Result<Option<PodRecord>, NetworkError> {
        let txn = self.db.begin_read().map_err(|e| NetworkError::db("begin read", e))?;
        let pods = txn.open_table(PODS).map_err(|e| NetworkError::db("open net.pods", e))?;
        let Some(v) = pods.get(pod_id).map_err(|e| NetworkError::db("read net.pods", e))? else {
            return Ok(None);
        };
        decode(pod_id, v.value()).map(Some)
    }

    /// Ids of all pods holding addresses (for reconciliation after a restart).
    pub fn pods(&self) -> Result<Vec<String>, NetworkError> {
        let txn = self.db.begin_read().map_err(|e| NetworkError::db("begin read", e))?;
        let pods = txn.open_table(PODS).map_err(|e| NetworkError::db("open net.pods", e))?;
        let mut out = Vec::new();
        for item in pods.iter().map_err(|e| NetworkError::db("iterate net.pods", e))? {
            let (k, _) = item.map_err(|e| NetworkError::db("iterate net.pods", e))?;
            out.push(k.value().to_owned());
        }
        Ok(out)
    }

    /// Gives `template.pod_id` one address from each of `subnets`, and stores the record
    /// (with `addresses`/`gateways` filled in) in the same transaction. If the pod already
    /// has a record, that one is returned unchanged.
    pub fn allocate(
        &self,
        mut template: PodRecord,
        subnets: &[IpNet],
    ) -> Result<PodRecord, NetworkError> {
        let pod_id = template.pod_id.clone();
        let txn = self.db.begin_write().map_err(|e| NetworkError::db("begin write", e))?;
        {
            let mut pods =
                txn.open_table(PODS).map_err(|e| NetworkError::db("open net.pods", e))?;
            if let Some(v) =
                pods.get(pod_id.as_str()).map_err(|e| NetworkError::db("read net.pods", e))?
            {
                return decode(&pod_id, v.value());
            }
            let mut ipam =
                txn.open_table(IPAM).map_err(|e| NetworkError::db("open net.ipam", e))?;
            let mut meta =
                txn.open_table(META).map_err(|e| NetworkError::db("open net.meta", e))?;
            template.addresses.clear();
            template.gateways.clear();
            for subnet in subnets {
                let ip = pick_free(&ipam, &meta, subnet, &pod_id)?;
                let key = ip.to_string();
                ipam.insert(key.as_str(), pod_id.as_str())
                    .map_err(|e| NetworkError::db("write net.ipam", e))?;
                meta.insert(cursor_key(subnet).as_str(), key.as_str())
                    .map_err(|e| NetworkError::db("write net.meta", e))?;
                let net = IpNet::new(ip, subnet.prefix_len()).map_err(|e| {
                    NetworkError::InvalidSubnet { cidr: subnet.to_string(), reason: e.to_string() }
                })?;
                template.addresses.push(net);
                template.gateways.push(gateway(subnet));
            }
            let json = encode(&template)?;
            pods.insert(pod_id.as_str(), json.as_str())
                .map_err(|e| NetworkError::db("write net.pods", e))?;
        }
        txn.commit().map_err(|e| NetworkError::db("commit", e))?;
        Ok(template)
    }

    /// Replaces the record of a pod (e.g. to mark it complete).
    pub fn update(&self, record: &PodRecord) -> Result<(), NetworkError> {
        let json = encode(record)?;
        let txn = self.db.begin_write().map_err(|e| NetworkError::db("begin write", e))?;
        {
            let mut pods =
                txn.open_table(PODS).map_err(|e| NetworkError::db("open net.pods", e))?;
            pods.insert(record.pod_id.as_str(), json.as_str())
                .map_err(|e| NetworkError::db("write net.pods", e))?;
        }
        txn.commit().map_err(|e| NetworkError::db("commit", e))
    }

    /// Frees the addresses of a pod and forgets its record. Returns the record it had.
    pub fn release(&self, pod_id: &str) -> Result<Option<PodRecord>, NetworkError> {
        let txn = self.db.begin_write().map_err(|e| NetworkError::db("begin write", e))?;
        let record = {
            let mut pods =
                txn.open_table(PODS).map_err(|e| NetworkError::db("open net.pods", e))?;
            let record = match pods
                .remove(pod_id)
                .map_err(|e| NetworkError::db("delete from net.pods", e))?
            {
                Some(v) => Some(decode(pod_id, v.value())?),
                None => None,
            };
            if let Some(rec) = &record {
                let mut ipam =
                    txn.open_table(IPAM).map_err(|e| NetworkError::db("open net.ipam", e))?;
                for net in &rec.addresses {
                    let key = net.addr().to_string();
                    // Only free what this pod holds: never someone else's address.
                    let owned = ipam
                        .get(key.as_str())
                        .map_err(|e| NetworkError::db("read net.ipam", e))?
                        .is_some_and(|v| v.value() == pod_id);
                    if owned {
                        ipam.remove(key.as_str())
                            .map_err(|e| NetworkError::db("delete from net.ipam", e))?;
                    }
                }
            }
            record
        };
        txn.commit().map_err(|e| NetworkError::db("commit", e))?;
        Ok(record)
    }

    /// The pod id holding `ip`, if any.
    pub fn owner(&self, ip: IpAddr) -> Result<Option<String>, NetworkError> {
        let txn = self.db.begin_read().map_err(|e| NetworkError::db("begin read", e))?;
        let ipam = txn.open_table(IPAM).map_err(|e| NetworkError::db("open net.ipam", e))?;
        Ok(ipam
            .get(ip.to_string().as_str())
            .map_err(|e| NetworkError::db("read net.ipam", e))?
            .map(|v| v.value().to_owned()))
    }

    /// The pod CIDR the kubelet last gave us, if any.
    pub fn pod_cidr(&self) -> Result<Option<String>, NetworkError> {
        let txn = self.db.begin_read().map_err(|e| NetworkError::db("begin read", e))?;
        let meta = txn.open_table(META).map_err(|e| NetworkError::db("open net.meta", e))?;
        Ok(meta
            .get("pod_cidr")
            .map_err(|e| NetworkError::db("read net.meta", e))?
            .map(|v| v.value().to_owned()))
    }

    /// Remembers the kubelet's pod CIDR across restarts.
    pub fn set_pod_cidr(&self, cidr: &str) -> Result<(), NetworkError> {
        let txn = self.db.begin_write().map_err(|e| NetworkError::db("begin write", e))?;
        {
            let mut meta =
                txn.open_table(META).map_err(|e| NetworkError::db("open net.meta", e))?;
            meta.insert("pod_cidr", cidr).map_err(|e| NetworkError::db("write net.meta", e))?;
        }
        txn.commit().map_err(|e| NetworkError::db("commit", e))
    }
}

fn cursor_key(subnet: &IpNet) -> String {
    format!("cursor/{subnet}")
}

/// Finds a free address of `subnet`, starting after the last one handed out there.
fn pick_free(
    ipam: &impl ReadableTable<&'static str, &'static str>,
    meta: &impl ReadableTable<&'static str, &'static str>,
    subnet: &IpNet,
    pod_id: &str,
) -> Result<IpAddr, NetworkError> {
    let v4 = subnet.addr().is_ipv4();
    let (first, last) = pod_range(subnet);
    let count = last - first + 1;
    let start = meta
        .get(cursor_key(subnet).as_str())
        .map_err(|e| NetworkError::db("read net.meta", e))?
        .and_then(|v| v.value().parse::<IpAddr>().ok())
        .map(to_u128)
        .filter(|c| (first..=last).contains(c))
        .map_or(0, |c| c + 1 - first);
    for i in 0..count.min(SCAN_LIMIT) {
        let candidate = from_u128(v4, first + (start + i) % count);
        let taken = ipam
            .get(candidate.to_string().as_str())
            .map_err(|e| NetworkError::db("read net.ipam", e))?
            .is_some();
        if !taken {
            return Ok(candidate);
        }
    }
    Err(NetworkError::Exhausted { pod_id: pod_id.to_owned(), subnet: subnet.to_string() })
}

fn encode(record: &PodRecord) -> Result<String, NetworkError> {
    serde_json::to_string(record)
        .map_err(|source| NetworkError::Record { pod_id: record.pod_id.clone(), source })
}

fn decode(pod_id: &str, json: &str) -> Result<PodRecord, NetworkError> {
    serde_json::from_str(json)
        .map_err(|source| NetworkError::Record { pod_id: pod_id.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(dir: &tempfile::TempDir) -> Arc<Database> {
        Arc::new(Database::create(dir.path().join("meta.redb")).unwrap())
    }

    fn template(pod: &str) -> PodRecord {
        PodRecord {
            pod_id: pod.into(),
            addresses: vec![],
            gateways: vec![],
            bridge: "berth0".into(),
            host_veth: "vx".into(),
            netns: "/run/netns/x".into(),
            port_mappings: vec![],
            complete: false,
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn allocates_distinct_addresses_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(db(&dir)).unwrap();
        let subnets = [net("10.9.0.0/24")];
        let a = ipam.allocate(template("a"), &subnets).unwrap();
        let b = ipam.allocate(template("b"), &subnets).unwrap();
        assert_eq!(a.addresses, vec![net("10.9.0.2/24")]);
        assert_eq!(a.gateways, vec!["10.9.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(b.addresses, vec![net("10.9.0.3/24")]);
        // Same pod again: same record, no new address.
        let a2 = ipam.allocate(template("a"), &subnets).unwrap();
        assert_eq!(a, a2);
        assert_eq!(ipam.owner("10.9.0.2".parse().unwrap()).unwrap().as_deref(), Some("a"));
        let mut pods = ipam.pods().unwrap();
        pods.sort();
        assert_eq!(pods, ["a", "b"]);
    }

    #[test]
    fn release_frees_and_cursor_moves_on() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(db(&dir)).unwrap();
        let subnets = [net("10.9.0.0/24")];
        ipam.allocate(template("a"), &subnets).unwrap();
        let rec = ipam.release("a").unwrap().unwrap();
        assert_eq!(rec.addresses, vec![net("10.9.0.2/24")]);
        assert!(ipam.owner("10.9.0.2".parse().unwrap()).unwrap().is_none());
        assert!(ipam.get("a").unwrap().is_none());
        // Releasing twice is fine.
        assert!(ipam.release("a").unwrap().is_none());
        // The next pod gets the next address, not the one just freed.
        let b = ipam.allocate(template("b"), &subnets).unwrap();
        assert_eq!(b.addresses, vec![net("10.9.0.3/24")]);
    }

    #[test]
    fn exhaustion_and_wraparound() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(db(&dir)).unwrap();
        // /29: .0 network, .1 gateway, .7 broadcast -> .2 .. .6 = 5 pods.
        let subnets = [net("10.9.1.0/29")];
        for i in 0..5 {
            ipam.allocate(template(&format!("p{i}")), &subnets).unwrap();
        }
        let err = ipam.allocate(template("p5"), &subnets).unwrap_err();
        assert!(matches!(err, NetworkError::Exhausted { .. }), "{err}");
        // Nothing half-written by the failed allocation.
        assert!(ipam.get("p5").unwrap().is_none());
        ipam.release("p2").unwrap();
        let again = ipam.allocate(template("p5"), &subnets).unwrap();
        assert_eq!(again.addresses, vec![net("10.9.1.4/29")]);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let subnets = [net("10.9.2.0/24")];
        {
            let ipam = Ipam::open(db(&dir)).unwrap();
            ipam.allocate(template("a"), &subnets).unwrap();
            ipam.set_pod_cidr("10.9.3.0/24").unwrap();
        }
        let ipam = Ipam::open(db(&dir)).unwrap();
        assert_eq!(ipam.get("a").unwrap().unwrap().addresses, vec![net("10.9.2.2/24")]);
        assert_eq!(ipam.pod_cidr().unwrap().as_deref(), Some("10.9.3.0/24"));
        let b = ipam.allocate(template("b"), &subnets).unwrap();
        assert_eq!(b.addresses, vec![net("10.9.2.3/24")]);
    }

    #[test]
    fn subnet_change_keeps_old_pods() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(db(&dir)).unwrap();
        let a = ipam.allocate(template("a"), &[net("10.9.4.0/24")]).unwrap();
        let b = ipam.allocate(template("b"), &[net("10.9.5.0/24"), net("fd00:9::/64")]).unwrap();
        assert_eq!(a.addresses, vec![net("10.9.4.2/24")]);
        assert_eq!(b.addresses, vec![net("10.9.5.2/24"), net("fd00:9::2/64")]);
        assert_eq!(b.gateways[1], "fd00:9::1".parse::<IpAddr>().unwrap());
        ipam.release("b").unwrap();
        assert!(ipam.owner("fd00:9::2".parse().unwrap()).unwrap().is_none());
        assert!(ipam.get("a").unwrap().is_some());
    }

    #[test]
    fn pod_cidr_parsing() {
        assert_eq!(parse_pod_cidr("10.1.0.0/24").unwrap(), vec![net("10.1.0.0/24")]);
        assert_eq!(
            parse_pod_cidr("10.1.0.0/24, fd00::/64").unwrap(),
            vec![net("10.1.0.0/24"), net("fd00::/64")]
        );
        // Host bits are cleared, as the kubelet may send them.
        assert_eq!(parse_pod_cidr("10.1.0.7/24").unwrap(), vec![net("10.1.0.0/24")]);
        assert!(parse_pod_cidr("").unwrap().is_empty());
        assert!(parse_pod_cidr("10.1.0.0/31").is_err());
        assert!(parse_pod_cidr("nonsense").is_err());
        assert!(parse_pod_cidr("10.1.0.0/24,10.2.0.0/24").is_err());
    }
}
