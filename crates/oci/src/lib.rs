//! berth-oci: turns the kubelet's `PodSandboxConfig` and `ContainerConfig`, plus the image
//! config, into an OCI runtime spec (`config.json`) for runc and friends. Pure logic apart
//! from reading the container's own `/etc/passwd` and `/etc/group`, stat'ing mount sources
//! and devices, and reading Localhost seccomp profiles.
//!
//! The behaviour follows containerd's CRI plugin: Kubernetes command/args semantics, env
//! merge, user resolution inside the rootfs, standard mounts then pod files then volumes,
//! namespaces from the pod, cgroup limits, capabilities, masked paths, seccomp, devices,
//! sysctls. AppArmor and SELinux fields are ignored: berth applies neither.

// No unsafe code in this crate.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use k8s_cri::v1::{
    ContainerConfig, LinuxContainerSecurityContext, PodSandboxConfig, SupplementalGroupsPolicy,
};
use oci_spec::runtime::{Linux, LinuxResources, Process, Root, Spec, User};

pub mod args;
pub mod caps;
pub mod checks;
pub mod devices;
pub mod env;
mod error;
pub mod host_cgroups;
pub mod mounts;
pub mod namespaces;
pub mod paths;
pub mod resources;
mod rootfs;
pub mod seccomp;
pub mod seccomp_default;
pub mod sysctl;
pub mod user;

pub use checks::{container_log_path, validate_pod_paths};
pub use error::SpecError;
pub use host_cgroups::{Controller, HostCgroups};
pub use namespaces::detect_cgroup_v2;

/// Annotation: `container` for every container spec (the sandbox has none of its own).
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// Annotation: the pod sandbox id.
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Annotation: the pod's name.
pub const ANNOTATION_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// Annotation: the pod's namespace.
pub const ANNOTATION_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// Annotation: the pod's UID.
pub const ANNOTATION_SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
/// Annotation: the container's name.
pub const ANNOTATION_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
/// Annotation: the image as the user named it.
pub const ANNOTATION_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

/// The OCI runtime spec version we write.
pub const OCI_VERSION: &str = "1.1.0";

/// What the pod contributes to each of its containers' specs.
#[derive(Debug, Clone, Default)]
pub struct PodContext {
    /// Pinned network namespace (`None`: host network).
    pub netns: Option<PathBuf>,
    /// Pinned IPC namespace (`None`: host IPC).
    pub ipcns: Option<PathBuf>,
    /// Pinned UTS namespace (`None`: host UTS, i.e. host network).
    pub utsns: Option<PathBuf>,
    /// PID namespace to join (`/proc/<pod init>/ns/pid` for PID mode POD, or the target
    /// container's for mode TARGET); `None` with `host_pid` false means a fresh namespace per
    /// container (mode CONTAINER).
    pub pidns: Option<PathBuf>,
    /// Share the host's PID namespace.
    pub host_pid: bool,
    /// The pod's `/dev/shm` (a tmpfs mounted in the pod dir), bind-mounted into containers;
    /// `None` gives each container its own tmpfs.
    pub shm: Option<PathBuf>,
    /// The pod's `/etc/hosts`.
    pub hosts: Option<PathBuf>,
    /// The pod's resolv.conf.
    pub resolv_conf: Option<PathBuf>,
    /// The pod's hostname file.
    pub hostname_file: Option<PathBuf>,
    /// The pod's hostname (also `HOSTNAME` in the environment; pass the node's for host
    /// network pods).
    pub hostname: String,
    /// Sysctls applied to every container of the pod (already validated).
    pub sysctls: Vec<(String, String)>,
}

/// Everything `container_spec` needs.
#[derive(Debug, Clone)]
pub struct ContainerSpecInput<'a> {
    /// The pod's config, as the kubelet sent it.
    pub sandbox: &'a PodSandboxConfig,
    /// The container's config, as the kubelet sent it.
    pub container: &'a ContainerConfig,
    /// The image config blob (OCI image config JSON).
    pub image_config: &'a oci_spec::image::ImageConfiguration,
    /// The mounted rootfs (for resolving users and groups; written as `root.path`).
    pub rootfs: PathBuf,
    /// Namespaces and files from the pod.
    pub pod: &'a PodContext,
    /// `cgroupsPath` for the container (cgroupfs style, e.g. `/berth/pod-<id>/<ctr-id>`).
    pub cgroups_path: String,
    /// Directory of Localhost seccomp profiles (relative paths resolve here).
    pub seccomp_profile_root: PathBuf,
    /// The pod sandbox id (for the `io.kubernetes.cri.sandbox-id` annotation).
    pub sandbox_id: &'a str,
    /// Whether the host runs cgroup v2 ([`detect_cgroup_v2`]): decides the cgroup namespace
    /// and whether `resources.unified` is allowed.
    pub cgroup_v2: bool,
}

/// The container's Linux security context, or the empty one.
fn security_context(config: &ContainerConfig) -> LinuxContainerSecurityContext {
    config.linux.as_ref().and_then(|l| l.security_context.clone()).unwrap_or_default()
}

/// The OCI spec for a container.
pub fn container_spec(input: &ContainerSpecInput<'_>) -> Result<Spec, SpecError> {
    let config = input.container;
    validate_container_config(config)?;
    let sc = security_context(config);
    let privileged = sc.privileged;
    let sandbox_privileged = input
        .sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .is_some_and(|s| s.privileged);
    if privileged && !sandbox_privileged {
        return Err(SpecError::PrivilegedNotAllowed);
    }
    let image = input.image_config.config().clone().unwrap_or_default();
    let pod = input.pod;

    // Process: argv, cwd, env, user, capabilities.
    let argv = args::process_args(
        &config.command,
        &config.args,
        image.entrypoint().as_deref().unwrap_or_default(),
        image.cmd().as_deref().unwrap_or_default(),
    )?;
    let cwd = args::working_dir(&config.working_dir, image.working_dir().as_deref());
    let config_env: Vec<(String, String)> =
        config.envs.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect();
    let env = env::build_env(
        image.env().as_deref().unwrap_or_default(),
        &config_env,
        &pod.hostname,
        config.tty,
    );
    let resolved = user::resolve_user(
        &input.rootfs,
        &user::UserRequest {
            run_as_user: sc.run_as_user.map(|v| v.value),
            run_as_username: &sc.run_as_username,
            run_as_group: sc.run_as_group.map(|v| v.value),
            image_user: image.user().as_deref().unwrap_or_default(),
            supplemental_groups: &sc.supplemental_groups,
            strict_groups: sc.supplemental_groups_policy == SupplementalGroupsPolicy::Strict as i32,
        },
    )?;
    let mut oci_user = User::default();
    oci_user.set_uid(resolved.uid);
    oci_user.set_gid(resolved.gid);
    oci_user.set_additional_gids(Some(resolved.additional_gids));

    let held_caps = caps::held_capabilities();
    let capabilities = caps::capabilities(sc.capabilities.as_ref(), privileged, held_caps)?;
    let effective = capabilities.effective().clone().unwrap_or_default();

    let linux_resources =
        config.linux.as_ref().and_then(|l| l.resources.clone()).unwrap_or_default();

    let mut process = Process::default();
    process.set_terminal(Some(config.tty));
    process.set_console_size(None);
    process.set_user(oci_user);
    process.set_args(Some(argv));
    process.set_env(Some(env));
    process.set_cwd(PathBuf::from(cwd));
    process.set_capabilities(Some(capabilities));
    // No rlimits: the runtime's (and so the node's) defaults apply, as with containerd.
    process.set_rlimits(None);
    process.set_no_new_privileges(Some(sc.no_new_privs));
    process.set_oom_score_adj(resources::oom_score_adj(&linux_resources)?);
    process.set_apparmor_profile(None);
    process.set_selinux_label(None);

    // Mounts.
    let plan = mounts::build_mounts(&config.mounts, pod, privileged, sc.readonly_rootfs)?;

    // Linux: namespaces, resources, devices, security.
    let mut res: LinuxResources = resources::resources(&linux_resources, input.cgroup_v2)?;
    let (cri_nodes, cri_rules) = devices::cri_devices(&config.devices)?;
    let (mut nodes, rules) = if privileged {
        (devices::host_devices(Path::new("/dev")), devices::allow_all_rules()?)
    } else {
        let mut rules = devices::default_device_rules()?;
        rules.extend(cri_rules);
        (Vec::new(), rules)
    };
    // A kubelet device replaces a host device at the same container path.
    nodes.retain(|n| cri_nodes.iter().all(|c| c.path() != n.path()));
    nodes.extend(cri_nodes);
    res.set_devices(Some(rules));

    let choice = seccomp::seccomp_choice(&sc, &input.seccomp_profile_root)?;
    let seccomp = seccomp::seccomp_for(&choice, privileged, &effective)?;
    let (masked, readonly) =
        paths::masked_and_readonly(privileged, &sc.masked_paths, &sc.readonly_paths);

    let mut linux = Linux::default();
    linux.set_uid_mappings(None);
    linux.set_gid_mappings(None);
    linux.set_namespaces(Some(namespaces::namespaces(pod, input.cgroup_v2)?));
    linux.set_resources(Some(res));
    linux.set_cgroups_path(
        (!input.cgroups_path.is_empty()).then(|| PathBuf::from(&input.cgroups_path)),
    );
    linux.set_devices((!nodes.is_empty()).then_some(nodes));
    linux.set_seccomp(seccomp);
    linux.set_masked_paths((!masked.is_empty()).then_some(masked));
    linux.set_readonly_paths((!readonly.is_empty()).then_some(readonly));
    linux.set_sysctl(
        (!pod.sysctls.is_empty()).then(|| pod.sysctls.iter().cloned().collect::<HashMap<_, _>>()),
    );
    linux.set_rootfs_propagation(plan.rootfs_propagation.map(str::to_string));
    linux.set_mount_label(None);

    let mut root = Root::default();
    root.set_path(input.rootfs.clone());
    root.set_readonly(Some(sc.readonly_rootfs));

    let mut spec = Spec::default();
    spec.set_version(OCI_VERSION.to_string());
    spec.set_root(Some(root));
    spec.set_mounts(Some(plan.mounts));
    spec.set_process(Some(process));
    // The hostname can only be set in a UTS namespace of our own (the pod's).
    spec.set_hostname(
        (pod.utsns.is_some() && !pod.hostname.is_empty()).then(|| pod.hostname.clone()),
    );
    spec.set_domainname(None);
    spec.set_hooks(None);
    spec.set_annotations(Some(annotations(input)));
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// The container's annotations plus the CRI ones containerd writes (ours win).
fn annotations(input: &ContainerSpecInput<'_>) -> HashMap<String, String> {
    let config = input.container;
    let mut out = config.annotations.clone();
    let mut put = |k: &str, v: &str| {
        out.insert(k.to_string(), v.to_string());
    };
    put(ANNOTATION_CONTAINER_TYPE, "container");
    put(ANNOTATION_SANDBOX_ID, input.sandbox_id);
    if let Some(m) = &config.metadata {
        put(ANNOTATION_CONTAINER_NAME, &m.name);
    }
    if let Some(i) = &config.image {
        let name =
            if i.user_specified_image.is_empty() { &i.image } else { &i.user_specified_image };
        put(ANNOTATION_IMAGE_NAME, name);
    }
    if let Some(m) = &input.sandbox.metadata {
        put(ANNOTATION_SANDBOX_NAME, &m.name);
        put(ANNOTATION_SANDBOX_NAMESPACE, &m.namespace);
        put(ANNOTATION_SANDBOX_UID, &m.uid);
    }
    out
}

/// Checks a container config before anything is created: metadata and image present, the
/// log path inside the pod's log directory, environment names, working directory and argv
/// usable by the kernel, volume targets confined to the container and volume and device
/// sources existing, capability names known, the user fields coherent, an absolute Localhost
/// seccomp profile a regular file. An empty command is fine here (the image may supply one;
/// `container_spec` refuses it if none does).
pub fn validate_container_config(config: &ContainerConfig) -> Result<(), SpecError> {
    let meta = config.metadata.as_ref().ok_or(SpecError::MissingMetadata)?;
    if meta.name.is_empty() {
        return Err(SpecError::EmptyContainerName);
    }
    if config.image.as_ref().is_none_or(|i| i.image.is_empty()) {
        return Err(SpecError::MissingImage);
    }
    checks::check_log_path(&config.log_path)?;
    checks::check_envs(&config.envs)?;
    checks::check_working_dir(&config.working_dir)?;
    checks::check_argv(&config.command, &config.args)?;
    // Before any work is done for the container: out-of-range limits would only fail in
    // the OCI runtime, with its words and the host's cgroup paths.
    if let Some(r) = config.linux.as_ref().and_then(|l| l.resources.as_ref()) {
        resources::validate(r)?;
    }
    for m in &config.mounts {
        mounts::check_cri_mount(m)?;
    }
    for d in &config.devices {
        devices::check_device(d)?;
    }
    let sc = security_context(config);
    let has_user = sc.run_as_user.is_some() || !sc.run_as_username.is_empty();
    if sc.run_as_group.is_some() && !has_user {
        return Err(SpecError::RunAsGroupWithoutUser);
    }
    if sc.run_as_user.is_some() && !sc.run_as_username.is_empty() {
        return Err(SpecError::RunAsUserAndUsername);
    }
    if let Some(c) = &sc.capabilities {
        for name in c
            .add_capabilities
            .iter()
            .chain(&c.drop_capabilities)
            .filter(|n| !n.trim().eq_ignore_ascii_case("ALL"))
            .chain(&c.add_ambient_capabilities)
        {
            caps::parse_capability(name)?;
        }
    }
    // Relative references need the profile root, which only `container_spec` knows.
    if let seccomp::SeccompChoice::Localhost(path) = seccomp::seccomp_choice(&sc, Path::new(""))?
        && path.is_absolute()
    {
        seccomp::check_profile_file(&path)?;
    }
    Ok(())
}

/// Checks the pod's sysctls against the namespaced allowlist and its namespace options, and
/// that no value can smuggle in another setting (CVE-2022-0811). Returns them sorted by key,
/// keys normalised to dots.
pub fn validate_sysctls(config: &PodSandboxConfig) -> Result<Vec<(String, String)>, SpecError> {
    sysctl::validate_sysctls(config)
}

/// The process for an exec in a running container: the container's own process settings
/// (user, env, cwd, capabilities, rlimits, no_new_privs, oom score) with `cmd` as args.
/// With a tty, `TERM=xterm` is set, as containerd does.
pub fn exec_process(container: &Spec, cmd: &[String], tty: bool) -> Result<Process, SpecError> {
    if cmd.is_empty() {
        return Err(SpecError::EmptyExecCommand);
    }
    let mut p = container.process().clone().ok_or(SpecError::MissingProcess)?;
    p.set_args(Some(cmd.to_vec()));
    p.set_terminal(Some(tty));
    p.set_console_size(None);
    if tty {
        let mut env = p.env().clone().unwrap_or_default();
        env::replace_or_append(&mut env, "TERM=xterm".to_string());
        p.set_env(Some(env));
    }
    Ok(p)
}

#[cfg(test)]
mod tests;
