//! The one error type of the crate: every variant names the offending field or value.

use std::path::PathBuf;

/// Why a spec could not be built or a config was refused. Every variant is the caller's bad
/// input or an unreadable file, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// `ContainerConfig.metadata` is missing.
    #[error("container config has no metadata")]
    MissingMetadata,
    /// `ContainerConfig.metadata.name` is empty.
    #[error("container metadata has an empty name")]
    EmptyContainerName,
    /// `ContainerConfig.image` is missing or its `image` is empty.
    #[error("container config has no image")]
    MissingImage,
    /// Neither the config (`command`/`args`) nor the image (`Entrypoint`/`Cmd`) gives a command.
    #[error("no command specified: config command/args and image Entrypoint/Cmd are all empty")]
    NoCommand,
    /// The command's first word (the executable) is empty.
    #[error("the command's executable (its first word) is empty")]
    EmptyExecutable,
    /// A word of `command` or `args` holds a NUL byte, which no argv string can carry.
    #[error("{field} word {value:?} contains a NUL byte")]
    NulByte {
        /// `command` or `args`.
        field: &'static str,
        /// The word (cut if long).
        value: String,
    },
    /// An `envs` entry cannot be put in a process environment.
    #[error("invalid envs entry {key:?}: {reason}")]
    InvalidEnv {
        /// The entry's name (cut if long).
        key: String,
        /// Why, e.g. `the name contains '='`.
        reason: &'static str,
    },
    /// `exec_process` was called with an empty command.
    #[error("exec command is empty")]
    EmptyExecCommand,
    /// The container spec handed to `exec_process` has no process.
    #[error("container spec has no process")]
    MissingProcess,

    /// A user name (from `run_as_username` or the image `USER`) is not in the rootfs's
    /// `/etc/passwd`.
    #[error("user {user:?} not found in the container's /etc/passwd")]
    UserNotFound {
        /// The name looked up.
        user: String,
    },
    /// A group name (from the image `USER user:group`) is not in the rootfs's `/etc/group`.
    #[error("group {group:?} not found in the container's /etc/group")]
    GroupNotFound {
        /// The name looked up.
        group: String,
    },
    /// The image `USER` has a form we cannot parse (e.g. `a:b:c`, empty parts).
    #[error("invalid image user {user:?}")]
    InvalidImageUser {
        /// The image config's `User` value.
        user: String,
    },
    /// A uid or gid in the security context is out of range.
    #[error("{field} {value} is not a valid id (0..=4294967294)")]
    InvalidId {
        /// The CRI field, e.g. `run_as_user`.
        field: &'static str,
        /// The value given.
        value: i64,
    },
    /// `run_as_group` was set without `run_as_user` or `run_as_username`.
    #[error("run_as_group is set without run_as_user or run_as_username")]
    RunAsGroupWithoutUser,
    /// Both `run_as_user` and `run_as_username` were set.
    #[error("run_as_user and run_as_username are both set")]
    RunAsUserAndUsername,
    /// A file of the container's rootfs (`/etc/passwd`, `/etc/group`) could not be read.
    #[error("reading {path} in the container rootfs: {source}")]
    ReadRootfsFile {
        /// The path inside the rootfs.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A path that must be absolute is not.
    #[error("{field} {path:?} is not an absolute path")]
    RelativePath {
        /// The CRI field, e.g. `mounts.container_path`.
        field: &'static str,
        /// The path given.
        path: String,
    },
    /// A path field that is unusable or would lead outside where it must stay.
    #[error("{field} {path:?} {reason}")]
    InvalidPath {
        /// The CRI field, e.g. `log_path`.
        field: &'static str,
        /// The path given (cut if long).
        path: String,
        /// Why, e.g. `must not contain ".."`.
        reason: &'static str,
    },
    /// A mount's `host_path` does not exist (or cannot be resolved).
    #[error("mount host_path {host_path:?} (for {container_path:?}): {source}")]
    MountSourceMissing {
        /// The host path given.
        host_path: String,
        /// The container path of the mount.
        container_path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A mount has `image` set (OCI image volume source), which berth does not support yet.
    #[error("mount {container_path:?}: image volume mounts are not supported")]
    ImageVolumeUnsupported {
        /// The container path of the mount.
        container_path: String,
    },
    /// A mount's `recursive_read_only` is set without `readonly` or with a propagation other
    /// than private.
    #[error("mount {container_path:?}: recursive_read_only needs readonly and private propagation")]
    InvalidRecursiveReadOnly {
        /// The container path of the mount.
        container_path: String,
    },
    /// A mount's `propagation` is not a known `MountPropagation` value.
    #[error("mount {container_path:?}: unknown propagation {value}")]
    UnknownPropagation {
        /// The container path of the mount.
        container_path: String,
        /// The raw enum value.
        value: i32,
    },

    /// A device's `host_path` does not exist.
    #[error("device host_path {host_path:?}: {source}")]
    DeviceNotFound {
        /// The host path given.
        host_path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A device's `host_path` is neither a device node nor a directory of device nodes.
    #[error("device host_path {host_path:?} is not a device node")]
    NotADevice {
        /// The host path given.
        host_path: String,
    },
    /// A device's `permissions` holds something other than `r`, `w`, `m`.
    #[error("device {host_path:?}: invalid permissions {permissions:?} (want a subset of \"rwm\")")]
    InvalidDevicePermissions {
        /// The host path given.
        host_path: String,
        /// The permissions given.
        permissions: String,
    },

    /// A capability name in `capabilities` is unknown.
    #[error("unknown capability {name:?}")]
    UnknownCapability {
        /// The name given.
        name: String,
    },
    /// A capability in `add_capabilities`/`add_ambient_capabilities` that berthd itself does
    /// not hold, so no container of it can get it.
    #[error("capability {name:?} cannot be granted: berthd does not hold it")]
    CapabilityNotHeld {
        /// The name given.
        name: String,
    },
    /// A privileged container was asked for in a sandbox that is not privileged.
    #[error("privileged container in a sandbox that is not privileged")]
    PrivilegedNotAllowed,

    /// A seccomp profile value is not understood.
    #[error("invalid seccomp profile {value:?}")]
    InvalidSeccompProfile {
        /// The profile given (legacy path or Localhost reference).
        value: String,
    },
    /// A Localhost seccomp profile file could not be read.
    #[error("reading seccomp profile {path}: {source}")]
    SeccompProfileRead {
        /// The resolved profile path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A Localhost seccomp profile is not a regular file (a FIFO, a device, a directory):
    /// reading it could block forever or never end.
    #[error("seccomp profile {path} is {kind}, not a regular file")]
    SeccompProfileNotRegular {
        /// The resolved profile path.
        path: PathBuf,
        /// What it is instead, e.g. `a FIFO`.
        kind: &'static str,
    },
    /// A Localhost seccomp profile is larger than we read.
    #[error("seccomp profile {path} is larger than {limit} bytes")]
    SeccompProfileTooLarge {
        /// The resolved profile path.
        path: PathBuf,
        /// The limit, in bytes.
        limit: u64,
    },
    /// A Localhost seccomp profile file is not a valid profile.
    #[error("parsing seccomp profile {path}: {source}")]
    SeccompProfileParse {
        /// The resolved profile path.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },

    /// A resource value is out of the range the kernel (or the OCI runtime) accepts.
    #[error("resources.{field} {value} is out of range: {allowed}")]
    InvalidResource {
        /// The CRI field.
        field: &'static str,
        /// The value given.
        value: i64,
        /// What is accepted, in words.
        allowed: &'static str,
    },
    /// A resource value that is not a number (a CPU list, a page size, a unified key) is
    /// malformed or names what this node does not have.
    #[error("resources.{field} {value}: {reason}")]
    InvalidResourceText {
        /// The CRI field.
        field: &'static str,
        /// The value given, quoted (shortened when long).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `resources.unified` was set on a cgroup v1 host, where runc would refuse it.
    #[error("resources.unified key {key:?} needs cgroup v2, but the host runs cgroup v1")]
    UnifiedOnCgroupV1 {
        /// The first unified key.
        key: String,
    },

    /// A sysctl is not in the namespaced allowlist.
    #[error("sysctl {key:?} is not allowed (not a namespaced sysctl)")]
    SysctlNotAllowed {
        /// The sysctl key (normalised to dots).
        key: String,
    },
    /// A sysctl belongs to a namespace the pod shares with the host.
    #[error("sysctl {key:?} is not allowed with the host {namespace} namespace")]
    SysctlHostNamespace {
        /// The sysctl key (normalised to dots).
        key: String,
        /// `ipc` or `network`.
        namespace: &'static str,
    },
    /// A sysctl key has characters outside `[a-zA-Z0-9_.-/]`.
    #[error("invalid sysctl key {key:?}")]
    InvalidSysctlKey {
        /// The key as given.
        key: String,
    },
    /// A sysctl value holds a character that could smuggle in another setting
    /// (`+`, `=`, `,`, control characters; CVE-2022-0811).
    #[error("invalid value for sysctl {key:?}: {value:?}")]
    InvalidSysctlValue {
        /// The sysctl key.
        key: String,
        /// The refused value.
        value: String,
    },

    /// An oci-spec builder refused a value.
    #[error("building the OCI {what}: {source}")]
    Build {
        /// Which part of the spec.
        what: &'static str,
        /// The builder's error.
        source: oci_spec::OciSpecError,
    },
}

/// Shorthand for mapping oci-spec builder errors.
pub(crate) fn build_err(what: &'static str) -> impl FnOnce(oci_spec::OciSpecError) -> SpecError {
    move |source| SpecError::Build { what, source }
}
