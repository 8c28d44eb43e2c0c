//! The runtime's error type and its classification (which `crates/cri` maps to gRPC codes).

use std::path::PathBuf;
use std::time::Duration;

use berth_image::ImageError;
use berth_net::NetError;
use berth_oci::SpecError;
use berth_shim::ShimError;
use berth_snapshot::SnapshotError;

/// The class of a [`RuntimeError`]: what kind of failure the caller sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request itself is wrong.
    InvalidArgument,
    /// The pod, container or image does not exist.
    NotFound,
    /// The name is taken.
    AlreadyExists,
    /// The object is in the wrong state for the request.
    FailedPrecondition,
    /// A deadline the caller set expired.
    DeadlineExceeded,
    /// Asked for something berth does not do (yet).
    Unimplemented,
    /// A resource of the node ran out (the pod subnet has no free address).
    ResourceExhausted,
    /// Something outside berth refused, without saying more (the OCI runtime could not
    /// start an exec's process; containerd answers this as Unknown too).
    Unknown,
    /// Our fault or the system's.
    Internal,
}

/// What went wrong in the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A required request field was missing or empty.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A request field has a value we cannot accept.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// `runtime_handler` names no configured handler.
    #[error("unknown runtime handler {0:?}")]
    UnknownHandler(String),
    /// The pod's sysctls were refused.
    #[error("invalid sysctls")]
    Sysctls(#[source] SpecError),
    /// The pod config's host paths were refused.
    #[error("invalid pod sandbox config")]
    PodConfig(#[source] SpecError),
    /// The container config (or the spec built from it) was refused.
    #[error("invalid container config")]
    ContainerConfig(#[source] SpecError),
    /// UpdateContainerResources' resources were refused.
    #[error("invalid resources")]
    Resources(#[source] SpecError),
    /// The name is reserved by another pod or container.
    #[error("name {name:?} is reserved for {holder}")]
    NameReserved {
        /// The name.
        name: String,
        /// The id holding it.
        holder: String,
    },
    /// No such pod sandbox.
    #[error("pod sandbox {0:?} not found")]
    SandboxNotFound(String),
    /// No such container.
    #[error("container {0:?} not found")]
    ContainerNotFound(String),
    /// The image is not present (not pulled).
    #[error("image {0:?} not found: pull it first")]
    ImageNotFound(String),
    /// The pod sandbox is not ready (stopped).
    #[error("pod sandbox {0} is not ready")]
    SandboxNotReady(String),
    /// The container is in the wrong state for the operation.
    #[error("container {id} is {state}: cannot {action}")]
    WrongState {
        /// Container id.
        id: String,
        /// Its state.
        state: &'static str,
        /// What was asked.
        action: &'static str,
    },
    /// An exec did not finish in time.
    #[error("command {command:?} timed out after {after:?}")]
    ExecTimeout {
        /// The command.
        command: Vec<String>,
        /// The timeout.
        after: Duration,
    },
    /// The OCI runtime could not start an exec's process (no such executable, permission
    /// denied, a bad working directory). The message is the runtime's own reason, without
    /// the runtime's command line.
    #[error("cannot run {command:?} in container {id}: {reason}")]
    ExecFailed {
        /// Container id.
        id: String,
        /// The command.
        command: Vec<String>,
        /// The runtime's error message.
        reason: String,
    },
    /// Looking up the image failed.
    #[error("image store")]
    Image(#[source] ImageError),
    /// The image's config blob is not valid JSON of an OCI image config.
    #[error("image {image} has an invalid config")]
    ImageConfig {
        /// The image id.
        image: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The root filesystem could not be prepared or removed.
    #[error("container root filesystem")]
    Snapshot(#[source] SnapshotError),
    /// The shim failed.
    #[error("shim")]
    Shim(#[source] ShimError),
    /// Namespaces could not be created, pinned or unpinned.
    #[error("pod namespaces")]
    Net(#[source] NetError),
    /// The pod's network could not be set up or torn down.
    #[error("pod {pod_id}: {action} network")]
    Network {
        /// The pod sandbox id.
        pod_id: String,
        /// `set up` or `tear down`.
        action: &'static str,
        /// What the network manager reported (boxed: it is large and rare).
        #[source]
        source: Box<berth_net::NetworkError>,
    },
    /// The kubelet's pod CIDR was refused or could not be stored.
    #[error("pod CIDR {cidr:?}")]
    PodCidr {
        /// The CIDR as sent.
        cidr: String,
        /// Why (boxed: it is large and rare).
        #[source]
        source: Box<berth_net::NetworkError>,
    },
    /// The metadata store failed.
    #[error("metadata store: {action}")]
    Store {
        /// What we tried.
        action: &'static str,
        /// The redb error (boxed: it is large and rare).
        #[source]
        source: Box<redb::Error>,
    },
    /// A stored record cannot be decoded (written by an incompatible berthd).
    #[error("stored record {id} is corrupt")]
    CorruptRecord {
        /// The object's id.
        id: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// A container's bundle spec (written by berthd) cannot be decoded.
    #[error("the OCI spec {path} cannot be read back")]
    BundleSpec {
        /// The `config.json`.
        path: PathBuf,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// A spec or record could not be serialised.
    #[error("serialise {what}")]
    Serialize {
        /// What.
        what: &'static str,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
    /// A file operation failed.
    #[error("{action} {path}")]
    Io {
        /// What we tried, e.g. `create directory`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{call}")]
    Sys {
        /// Which call.
        call: &'static str,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// The pod's init process (PID namespace holder) could not be started.
    #[error("cannot start the pod init process: {reason}")]
    PodInit {
        /// Why.
        reason: String,
    },
    /// A background task doing the work died.
    #[error("internal task failed: {0}")]
    TaskFailed(String),
}

impl RuntimeError {
    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        use RuntimeError::*;
        match self {
            Missing(_)
            | Invalid { .. }
            | UnknownHandler(_)
            | Sysctls(_)
            | PodConfig(_)
            | Resources(_) => ErrorClass::InvalidArgument,
            ContainerConfig(e) => match e {
                SpecError::ReadRootfsFile { .. } => ErrorClass::Internal,
                _ => ErrorClass::InvalidArgument,
            },
            NameReserved { .. } => ErrorClass::AlreadyExists,
            SandboxNotFound(_) | ContainerNotFound(_) | ImageNotFound(_) => ErrorClass::NotFound,
            SandboxNotReady(_) | WrongState { .. } => ErrorClass::FailedPrecondition,
            ExecTimeout { .. } => ErrorClass::DeadlineExceeded,
            ExecFailed { .. } => ErrorClass::Unknown,
            Shim(ShimError::NotRunning { .. }) => ErrorClass::FailedPrecondition,
            Shim(ShimError::TtyNotSupported { .. }) => ErrorClass::Unimplemented,
            // The node's log directory holds a symlink, FIFO or directory where the log goes:
            // nothing the request can fix, and nothing berth may write through.
            Shim(ShimError::LogNotRegular { .. }) => ErrorClass::FailedPrecondition,
            Net(NetError::InvalidHostname(_)) => ErrorClass::InvalidArgument,
            Network { source, .. }
                if matches!(**source, berth_net::NetworkError::Exhausted { .. }) =>
            {
                ErrorClass::ResourceExhausted
            }
            PodCidr { source, .. }
                if matches!(**source, berth_net::NetworkError::InvalidSubnet { .. }) =>
            {
                ErrorClass::InvalidArgument
            }
            Image(_)
            | ImageConfig { .. }
            | Snapshot(_)
            | Shim(_)
            | Net(_)
            | Network { .. }
            | PodCidr { .. }
            | Store { .. }
            | CorruptRecord { .. }
            | Serialize { .. }
            | BundleSpec { .. }
            | Io { .. }
            | Sys { .. }
            | PodInit { .. }
            | TaskFailed(_) => ErrorClass::Internal,
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| RuntimeError::Io { action, path, source }
    }

    pub(crate) fn store(action: &'static str) -> impl FnOnce(redb::Error) -> Self {
        move |source| RuntimeError::Store { action, source: Box::new(source) }
    }
}

/// Results of the runtime.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exhausted_pool_and_a_refused_exec_have_their_own_classes() {
        let exhausted = RuntimeError::Network {
            pod_id: "p".into(),
            action: "set up",
            source: Box::new(berth_net::NetworkError::Exhausted {
                pod_id: "p".into(),
                subnet: "10.0.0.0/30".into(),
            }),
        };
        assert_eq!(exhausted.class(), ErrorClass::ResourceExhausted);
        let exec = RuntimeError::ExecFailed {
            id: "c".into(),
            command: vec!["nope".into()],
            reason: "\"nope\": executable file not found in $PATH".into(),
        };
        assert_eq!(exec.class(), ErrorClass::Unknown);
        assert_eq!(
            exec.to_string(),
            "cannot run [\"nope\"] in container c: \"nope\": executable file not found in $PATH"
        );
        let resources = RuntimeError::Resources(SpecError::InvalidResource {
            field: "cpu_shares",
            value: 1,
            allowed: "2..=262144, or 0 for unset",
        });
        assert_eq!(resources.class(), ErrorClass::InvalidArgument);
    }
}
