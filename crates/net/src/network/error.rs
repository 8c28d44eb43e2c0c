//! The error type of pod networking.

use std::path::PathBuf;

/// Everything that can go wrong while setting up or tearing down a pod's network.
///
/// Each variant names what was being done (the pod, the netlink call, the plugin, the file)
/// and carries the cause.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A pod id that cannot be used in interface names, rule comments or file names.
    #[error("invalid pod id {pod_id:?}: {reason}")]
    InvalidPodId {
        /// The id as given.
        pod_id: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A configuration value that cannot be used.
    #[error("invalid network config {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// A subnet / pod CIDR that cannot be parsed or used.
    #[error("invalid subnet {cidr:?}: {reason}")]
    InvalidSubnet {
        /// The CIDR as given.
        cidr: String,
        /// Why it was refused.
        reason: String,
    },

    /// Every address of the subnet is taken.
    #[error("no free address left in {subnet} for pod {pod_id}")]
    Exhausted {
        /// The pod that asked.
        pod_id: String,
        /// The full subnet.
        subnet: String,
    },

    /// The metadata database failed.
    #[error("network database: {action}: {source}")]
    Db {
        /// What we were doing.
        action: &'static str,
        /// The redb error (all redb error types convert into `redb::Error`).
        #[source]
        source: Box<redb::Error>,
    },

    /// A stored record could not be (de)serialised.
    #[error("network record of pod {pod_id}: {source}")]
    Record {
        /// The pod whose record it is.
        pod_id: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },

    /// A netlink request failed.
    #[error("netlink {call} for {subject}: {source}")]
    Netlink {
        /// The request, e.g. `"add veth"`.
        call: &'static str,
        /// The link, address or pod it was about.
        subject: String,
        /// The rtnetlink error.
        #[source]
        source: rtnetlink::Error,
    },

    /// A link we needed was not there.
    #[error("link {name} not found ({context})")]
    LinkNotFound {
        /// Interface name.
        name: String,
        /// Where we looked.
        context: &'static str,
    },

    /// A system call failed (opening a netlink socket, `setns`, ...).
    #[error("{call} for {subject}: {source}")]
    Sys {
        /// The call.
        call: &'static str,
        /// What it was about.
        subject: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The pod's network namespace file could not be opened.
    #[error("network namespace {path} of pod {pod_id}: {source}")]
    Netns {
        /// The pod.
        pod_id: String,
        /// The netns path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A file under the state dir or conf dir could not be read or written.
    #[error("{action} {path}: {source}")]
    File {
        /// What we were doing.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A helper program (`nft`, `iptables`, a CNI plugin) could not be started or waited for.
    #[error("run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A helper program ran too long and was killed.
    #[error("{program} did not finish within {seconds}s")]
    Timeout {
        /// The program.
        program: String,
        /// The limit.
        seconds: u64,
    },

    /// `nft` / `iptables` exited with an error.
    #[error("{program} for pod {pod_id:?} failed (exit {code}): {stderr}")]
    Firewall {
        /// `nft` or `iptables`.
        program: &'static str,
        /// The pod it was for (empty for the shared chains).
        pod_id: String,
        /// Its exit code.
        code: i32,
        /// What it printed on stderr.
        stderr: String,
    },

    /// Output of `nft -j` we could not understand.
    #[error("unexpected output of {program}: {reason}")]
    FirewallOutput {
        /// The program.
        program: &'static str,
        /// What was wrong.
        reason: String,
    },

    /// Neither `nft` nor `iptables` is installed, but masquerade or host ports were asked for.
    #[error("neither nft nor iptables found in PATH (needed for {purpose})")]
    NoFirewall {
        /// What needed it.
        purpose: &'static str,
    },

    /// No usable CNI network configuration exists.
    #[error("no CNI network configuration in {dir}: {reason}")]
    NoCniConfig {
        /// The conf dir.
        dir: PathBuf,
        /// Why none was usable.
        reason: String,
    },

    /// A CNI network configuration file is not valid.
    #[error("CNI config {path}: {reason}")]
    CniConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A CNI plugin binary was not found in any bin dir.
    #[error("CNI plugin {plugin:?} not found in {dirs:?}")]
    PluginNotFound {
        /// The plugin `type`.
        plugin: String,
        /// Where we looked.
        dirs: Vec<PathBuf>,
    },

    /// A CNI plugin reported an error (exit code != 0 or an error object).
    #[error(
        "CNI plugin {plugin} {command} for pod {pod_id} failed (code {code}): {msg}{details}",
        details = if details.is_empty() { String::new() } else { format!(" ({details})") }
    )]
    Plugin {
        /// The plugin `type`.
        plugin: String,
        /// `ADD`, `DEL` or `CHECK`.
        command: &'static str,
        /// The pod.
        pod_id: String,
        /// The CNI error code (or the exit code when the plugin printed no error object).
        code: i64,
        /// The error message.
        msg: String,
        /// The details / stderr.
        details: String,
    },

    /// A CNI plugin printed a result we could not parse.
    #[error("CNI plugin {plugin} printed an invalid result for pod {pod_id}: {reason}")]
    PluginResult {
        /// The plugin `type`.
        plugin: String,
        /// The pod.
        pod_id: String,
        /// What was wrong.
        reason: String,
    },

    /// The network plugin returned no address for the pod.
    #[error("network setup of pod {pod_id} returned no IP address")]
    NoAddress {
        /// The pod.
        pod_id: String,
    },

    /// A worker thread (netns thread or blocking task) died.
    #[error("worker thread for {subject} died: {reason}")]
    Thread {
        /// What it worked on.
        subject: String,
        /// Panic message or join error.
        reason: String,
    },
}

impl NetworkError {
    /// Wraps any redb error.
    pub(crate) fn db(action: &'static str, e: impl Into<redb::Error>) -> Self {
        NetworkError::Db { action, source: Box::new(e.into()) }
    }

    /// Wraps an rtnetlink error.
    pub(crate) fn netlink(
        call: &'static str,
        subject: impl Into<String>,
        source: rtnetlink::Error,
    ) -> Self {
        NetworkError::Netlink { call, subject: subject.into(), source }
    }
}
