//! Whole-spec tests: `container_spec`, `validate_container_config`, `exec_process`.

use super::*;
use k8s_cri::v1::{
    Capability as CriCapability, ContainerMetadata, Device, ImageSpec, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, Mount as CriMount, PodSandboxMetadata, SecurityProfile,
    security_profile::ProfileType,
};
use oci_spec::image::{ConfigBuilder, ImageConfiguration, ImageConfigurationBuilder};
use oci_spec::runtime::{Capability, LinuxNamespaceType};

struct Fixture {
    rootfs: tempfile::TempDir,
    sandbox: PodSandboxConfig,
    container: ContainerConfig,
    image: ImageConfiguration,
    pod: PodContext,
}

impl Fixture {
    fn new() -> Self {
        let rootfs = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(rootfs.path().join("etc")).unwrap();
        std::fs::write(
            rootfs.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nweb:x:33:33::/var/www:/bin/false\n",
        )
        .unwrap();
        std::fs::write(rootfs.path().join("etc/group"), "root:x:0:\nweb:x:33:\nlog:x:4:web\n")
            .unwrap();
        let image = ImageConfigurationBuilder::default()
            .config(
                ConfigBuilder::default()
                    .entrypoint(vec!["/entry".to_string()])
                    .cmd(vec!["serve".to_string()])
                    .env(vec!["PATH=/bin".to_string(), "MODE=img".to_string()])
                    .working_dir("/srv".to_string())
                    .user("web".to_string())
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let sandbox = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "pod".into(),
                uid: "uid-1".into(),
                namespace: "ns".into(),
                attempt: 0,
            }),
            hostname: "pod-host".into(),
            ..Default::default()
        };
        let container = ContainerConfig {
            metadata: Some(ContainerMetadata { name: "app".into(), attempt: 0 }),
            image: Some(ImageSpec {
                image: "sha256:abc".into(),
                user_specified_image: "docker.io/library/app:1".into(),
                ..Default::default()
            }),
            envs: vec![KeyValue { key: "MODE".into(), value: "cfg".into() }],
            annotations: [("a".to_string(), "b".to_string())].into(),
            ..Default::default()
        };
        let pod = PodContext {
            netns: Some("/run/berth/netns/x".into()),
            ipcns: Some("/run/berth/ipcns/x".into()),
            utsns: Some("/run/berth/utsns/x".into()),
            hostname: "pod-host".into(),
            sysctls: vec![("net.ipv4.ip_forward".into(), "1".into())],
            ..Default::default()
        };
        Fixture { rootfs, sandbox, container, image, pod }
    }

    fn sc(&mut self) -> &mut LinuxContainerSecurityContext {
        self.container
            .linux
            .get_or_insert_with(LinuxContainerConfig::default)
            .security_context
            .get_or_insert_with(Default::default)
    }

    fn spec(&self) -> Result<Spec, SpecError> {
        container_spec(&ContainerSpecInput {
            sandbox: &self.sandbox,
            container: &self.container,
            image_config: &self.image,
            rootfs: self.rootfs.path().to_path_buf(),
            pod: &self.pod,
            cgroups_path: "/berth/pod-x/ctr".into(),
            seccomp_profile_root: self.rootfs.path().to_path_buf(),
            sandbox_id: "sb-1",
            cgroup_v2: false,
        })
    }
}

fn process(spec: &Spec) -> &Process {
    spec.process().as_ref().unwrap()
}

fn linux(spec: &Spec) -> &Linux {
    spec.linux().as_ref().unwrap()
}

#[test]
fn basic_spec() {
    let f = Fixture::new();
    let spec = f.spec().unwrap();
    let p = process(&spec);
    assert_eq!(p.args().as_ref().unwrap(), &["/entry", "serve"]);
    assert_eq!(p.cwd(), Path::new("/srv"));
    assert_eq!(p.env().as_ref().unwrap(), &["PATH=/bin", "HOSTNAME=pod-host", "MODE=cfg"]);
    assert_eq!((p.user().uid(), p.user().gid()), (33, 33));
    assert_eq!(p.user().additional_gids().as_ref().unwrap(), &[33, 4]);
    assert_eq!(p.terminal(), Some(false));
    assert!(p.rlimits().is_none());
    assert_eq!(p.no_new_privileges(), Some(false));
    assert!(p.oom_score_adj().is_none());
    let caps = p.capabilities().as_ref().unwrap();
    assert_eq!(caps.effective().as_ref().unwrap().len(), caps::DEFAULT.len());

    assert_eq!(spec.hostname().as_deref(), Some("pod-host"));
    assert_eq!(spec.version(), OCI_VERSION);
    let root = spec.root().as_ref().unwrap();
    assert_eq!(root.path(), f.rootfs.path());
    assert_eq!(root.readonly(), Some(false));

    let l = linux(&spec);
    assert_eq!(l.cgroups_path().as_deref(), Some(Path::new("/berth/pod-x/ctr")));
    let ns: Vec<LinuxNamespaceType> =
        l.namespaces().as_ref().unwrap().iter().map(|n| n.typ()).collect();
    assert!(!ns.contains(&LinuxNamespaceType::Cgroup));
    assert!(ns.contains(&LinuxNamespaceType::Network));
    assert_eq!(
        l.sysctl().as_ref().unwrap().get("net.ipv4.ip_forward").map(String::as_str),
        Some("1")
    );
    assert!(l.seccomp().is_none(), "no seccomp field and no legacy path: unconfined");
    assert!(l.masked_paths().as_ref().unwrap().contains(&"/proc/kcore".to_string()));
    assert!(l.readonly_paths().as_ref().unwrap().contains(&"/proc/sys".to_string()));
    let rules = l.resources().as_ref().unwrap().devices().as_ref().unwrap();
    assert!(!rules[0].allow());
    assert!(l.devices().is_none());

    let ann = spec.annotations().as_ref().unwrap();
    assert_eq!(ann["a"], "b");
    assert_eq!(ann[ANNOTATION_CONTAINER_TYPE], "container");
    assert_eq!(ann[ANNOTATION_SANDBOX_ID], "sb-1");
    assert_eq!(ann[ANNOTATION_CONTAINER_NAME], "app");
    assert_eq!(ann[ANNOTATION_IMAGE_NAME], "docker.io/library/app:1");
    assert_eq!(ann[ANNOTATION_SANDBOX_NAMESPACE], "ns");

    // The JSON runc reads has the camelCase fields.
    let json = serde_json::to_value(&spec).unwrap();
    assert_eq!(json["ociVersion"], OCI_VERSION);
    assert_eq!(json["linux"]["cgroupsPath"], "/berth/pod-x/ctr");
}

#[test]
fn host_network_has_no_hostname() {
    let mut f = Fixture::new();
    f.pod.utsns = None;
    f.pod.netns = None;
    let spec = f.spec().unwrap();
    assert!(spec.hostname().is_none());
    let ns = linux(&spec).namespaces().as_ref().unwrap();
    assert!(ns.iter().all(|n| n.typ() != LinuxNamespaceType::Uts));
    assert!(ns.iter().all(|n| n.typ() != LinuxNamespaceType::Network));
}

#[test]
fn security_context_applied() {
    let mut f = Fixture::new();
    let sc = f.sc();
    sc.run_as_user = Some(Int64Value { value: 1234 });
    sc.run_as_group = Some(Int64Value { value: 5678 });
    sc.supplemental_groups = vec![9];
    sc.readonly_rootfs = true;
    sc.no_new_privs = true;
    sc.capabilities = Some(CriCapability {
        add_capabilities: vec!["NET_ADMIN".into()],
        drop_capabilities: vec!["CHOWN".into()],
        add_ambient_capabilities: vec![],
    });
    sc.masked_paths = vec!["/proc/custom".into()];
    sc.seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    f.container.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
        cpu_shares: 256,
        memory_limit_in_bytes: 1 << 30,
        oom_score_adj: -500,
        ..Default::default()
    });
    f.container.tty = true;
    let spec = f.spec().unwrap();
    let p = process(&spec);
    assert_eq!((p.user().uid(), p.user().gid()), (1234, 5678));
    assert_eq!(p.user().additional_gids().as_ref().unwrap(), &[5678, 9]);
    assert_eq!(p.no_new_privileges(), Some(true));
    assert_eq!(p.terminal(), Some(true));
    assert!(p.env().as_ref().unwrap().contains(&"TERM=xterm".to_string()));
    assert_eq!(p.oom_score_adj(), Some(-500));
    let eff = p.capabilities().as_ref().unwrap().effective().clone().unwrap();
    assert!(eff.contains(&Capability::NetAdmin));
    assert!(!eff.contains(&Capability::Chown));
    assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
    let l = linux(&spec);
    assert_eq!(l.masked_paths().as_ref().unwrap(), &["/proc/custom"]);
    let seccomp = l.seccomp().as_ref().unwrap();
    assert_eq!(seccomp.default_action(), oci_spec::runtime::LinuxSeccompAction::ScmpActErrno);
    let res = l.resources().as_ref().unwrap();
    assert_eq!(res.cpu().as_ref().unwrap().shares(), Some(256));
    assert_eq!(res.memory().as_ref().unwrap().limit(), Some(1 << 30));
    // Pod files are read-only with a read-only rootfs.
    f.pod.hosts = Some(f.rootfs.path().join("hosts"));
    let spec = f.spec().unwrap();
    let hosts = spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.destination() == Path::new("/etc/hosts"))
        .unwrap();
    assert!(hosts.options().as_ref().unwrap().contains(&"ro".to_string()));
}

#[test]
fn privileged() {
    let mut f = Fixture::new();
    f.sc().privileged = true;
    f.sc().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    assert!(matches!(f.spec(), Err(SpecError::PrivilegedNotAllowed)));
    f.sandbox.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let spec = f.spec().unwrap();
    let l = linux(&spec);
    assert!(l.masked_paths().is_none());
    assert!(l.readonly_paths().is_none());
    assert!(l.seccomp().is_none());
    let rules = l.resources().as_ref().unwrap().devices().as_ref().unwrap();
    assert_eq!(rules.len(), 1);
    assert!(rules[0].allow());
    assert!(l.devices().as_ref().unwrap().iter().any(|d| d.path() == Path::new("/dev/null")));
    let eff = process(&spec).capabilities().as_ref().unwrap().effective().clone().unwrap();
    assert!(eff.contains(&Capability::SysAdmin));
    let sys = spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.destination() == Path::new("/sys"))
        .unwrap();
    assert!(sys.options().as_ref().unwrap().contains(&"rw".to_string()));
}

#[test]
fn volumes_devices_and_seccomp_file() {
    let mut f = Fixture::new();
    let vol = tempfile::tempdir().unwrap();
    f.container.mounts = vec![CriMount {
        container_path: "/data".into(),
        host_path: vol.path().to_string_lossy().into_owned(),
        readonly: true,
        ..Default::default()
    }];
    f.container.devices = vec![Device {
        container_path: "/dev/xnull".into(),
        host_path: "/dev/null".into(),
        permissions: "rw".into(),
    }];
    std::fs::write(f.rootfs.path().join("prof.json"), r#"{"defaultAction":"SCMP_ACT_LOG"}"#)
        .unwrap();
    f.sc().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::Localhost as i32,
        localhost_ref: "prof.json".into(),
    });
    let spec = f.spec().unwrap();
    let mounts = spec.mounts().as_ref().unwrap();
    let last = mounts.last().unwrap();
    assert_eq!(last.destination(), Path::new("/data"));
    assert_eq!(last.options().as_ref().unwrap(), &["rbind", "rprivate", "ro"]);
    let l = linux(&spec);
    assert_eq!(l.devices().as_ref().unwrap()[0].path(), Path::new("/dev/xnull"));
    let rules = l.resources().as_ref().unwrap().devices().as_ref().unwrap();
    let last_rule = rules.last().unwrap();
    assert_eq!((last_rule.major(), last_rule.minor()), (Some(1), Some(3)));
    assert_eq!(last_rule.access().as_deref(), Some("rw"));
    assert_eq!(
        l.seccomp().as_ref().unwrap().default_action(),
        oci_spec::runtime::LinuxSeccompAction::ScmpActLog
    );
}

#[test]
fn spec_errors() {
    let mut f = Fixture::new();
    f.image = ImageConfiguration::default();
    assert!(matches!(f.spec(), Err(SpecError::NoCommand)));
    let mut f = Fixture::new();
    f.sc().run_as_username = "ghost".into();
    assert!(matches!(f.spec(), Err(SpecError::UserNotFound { .. })));
    let mut f = Fixture::new();
    f.container.linux.get_or_insert_with(Default::default).resources =
        Some(LinuxContainerResources {
            unified: [("memory.high".to_string(), "1".to_string())].into(),
            ..Default::default()
        });
    assert!(matches!(f.spec(), Err(SpecError::UnifiedOnCgroupV1 { .. })));
}

#[test]
fn validate() {
    let f = Fixture::new();
    assert!(validate_container_config(&f.container).is_ok());

    let mut c = f.container.clone();
    c.metadata = None;
    assert!(matches!(validate_container_config(&c), Err(SpecError::MissingMetadata)));
    let mut c = f.container.clone();
    c.metadata.as_mut().unwrap().name.clear();
    assert!(matches!(validate_container_config(&c), Err(SpecError::EmptyContainerName)));
    let mut c = f.container.clone();
    c.image.as_mut().unwrap().image.clear();
    assert!(matches!(validate_container_config(&c), Err(SpecError::MissingImage)));
    let mut c = f.container.clone();
    c.mounts = vec![CriMount {
        container_path: "/x".into(),
        host_path: "/definitely/not/here".into(),
        ..Default::default()
    }];
    assert!(matches!(validate_container_config(&c), Err(SpecError::MountSourceMissing { .. })));
    let mut c = f.container.clone();
    c.mounts = vec![CriMount {
        container_path: "/x".into(),
        host_path: "relative".into(),
        ..Default::default()
    }];
    assert!(matches!(
        validate_container_config(&c),
        Err(SpecError::RelativePath { field: "mounts.host_path", .. })
    ));
    let mut c = f.container.clone();
    c.devices = vec![Device {
        container_path: "/dev/x".into(),
        host_path: "/dev/not-a-device-here".into(),
        permissions: "rwm".into(),
    }];
    assert!(matches!(validate_container_config(&c), Err(SpecError::DeviceNotFound { .. })));

    let mut f2 = Fixture::new();
    f2.sc().run_as_group = Some(Int64Value { value: 1 });
    assert!(matches!(
        validate_container_config(&f2.container),
        Err(SpecError::RunAsGroupWithoutUser)
    ));
    let mut f3 = Fixture::new();
    f3.sc().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::Localhost as i32,
        localhost_ref: "/no/such/profile.json".into(),
    });
    assert!(matches!(
        validate_container_config(&f3.container),
        Err(SpecError::SeccompProfileRead { .. })
    ));
    let mut f4 = Fixture::new();
    f4.sc().capabilities = Some(CriCapability {
        add_capabilities: vec!["ALL".into(), "BOGUS".into()],
        ..Default::default()
    });
    assert!(matches!(
        validate_container_config(&f4.container),
        Err(SpecError::UnknownCapability { name }) if name == "BOGUS"
    ));
    let mut f5 = Fixture::new();
    f5.sc().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::Localhost as i32,
        localhost_ref: "/dev/zero".into(),
    });
    assert!(matches!(
        validate_container_config(&f5.container),
        Err(SpecError::SeccompProfileNotRegular { .. })
    ));
    // Empty command and args are fine here.
    let mut c = f.container.clone();
    c.command.clear();
    c.args.clear();
    assert!(validate_container_config(&c).is_ok());

    // Fields that used to pass here and fail at start (or lead outside the pod's dirs).
    let refused = |edit: &dyn Fn(&mut ContainerConfig), field: &str| {
        let mut c = f.container.clone();
        edit(&mut c);
        let err = validate_container_config(&c).expect_err(field);
        assert!(err.to_string().contains(field), "{field}: {err}");
    };
    refused(&|c| c.log_path = "../../etc/cron.d/x".into(), "log_path");
    refused(&|c| c.log_path = "/etc/shadow".into(), "log_path");
    refused(&|c| c.log_path = ".".into(), "log_path");
    refused(&|c| c.envs.push(KeyValue { key: String::new(), value: "x".into() }), "envs");
    refused(&|c| c.envs.push(KeyValue { key: "A=B".into(), value: "x".into() }), "envs");
    refused(&|c| c.working_dir = "srv".into(), "working_dir");
    refused(&|c| c.command = vec!["/bin/s\0h".into()], "command");
    let mount = |path: &str| CriMount {
        container_path: path.into(),
        host_path: "/tmp".into(),
        ..Default::default()
    };
    for path in ["/", "/x/../..", "rel", "/x\0"] {
        refused(&|c| c.mounts = vec![mount(path)], "mounts.container_path");
    }
}

#[test]
fn exec() {
    let f = Fixture::new();
    let spec = f.spec().unwrap();
    let cmd = vec!["ls".to_string(), "-l".to_string()];
    let p = exec_process(&spec, &cmd, true).unwrap();
    assert_eq!(p.args().as_ref().unwrap(), &cmd);
    assert_eq!(p.terminal(), Some(true));
    assert!(p.env().as_ref().unwrap().contains(&"TERM=xterm".to_string()));
    assert_eq!(p.user(), process(&spec).user());
    assert_eq!(p.cwd(), process(&spec).cwd());
    assert_eq!(p.capabilities(), process(&spec).capabilities());
    let p = exec_process(&spec, &cmd, false).unwrap();
    assert_eq!(p.env(), process(&spec).env());
    assert!(matches!(exec_process(&spec, &[], false), Err(SpecError::EmptyExecCommand)));
    let mut empty = spec.clone();
    empty.set_process(None);
    assert!(matches!(exec_process(&empty, &cmd, false), Err(SpecError::MissingProcess)));
}

#[test]
#[ignore = "manual: dumps a spec for a runc smoke test"]
fn dump_for_runc() {
    let Ok(out) = std::env::var("BERTH_OCI_DUMP") else {
        return;
    };
    let bundle = Path::new(&out);
    let mut f = Fixture::new();
    f.pod = PodContext { hostname: "h".into(), ..Default::default() };
    f.container.command = vec!["/bin/busybox".into()];
    f.container.args = vec!["sh".into(), "-c".into(), "id; cat /proc/self/status | grep -E 'Cap|Seccomp|NoNewPrivs'; ls /dev; mount | head -20; echo ok".into()];
    f.sc().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    f.sc().run_as_username = "web".into();
    f.sc().supplemental_groups = vec![1000];
    f.container.devices = vec![Device {
        container_path: "/dev/mynull".into(),
        host_path: "/dev/null".into(),
        permissions: "rwm".into(),
    }];
    let rootfs = bundle.join("rootfs");
    let spec = container_spec(&ContainerSpecInput {
        sandbox: &f.sandbox,
        container: &f.container,
        image_config: &f.image,
        rootfs: rootfs.clone(),
        pod: &f.pod,
        cgroups_path: "/berth-test/ctr1".into(),
        seccomp_profile_root: rootfs,
        sandbox_id: "sb",
        cgroup_v2: detect_cgroup_v2(),
    })
    .unwrap();
    spec.save(bundle.join("config.json")).unwrap();
}
