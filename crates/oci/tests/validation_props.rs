//! Property tests of CreateContainer's validation: for any field values, the checks answer
//! (never panic), and what they accept keeps the promises the rest of berth relies on: the
//! log file stays inside the pod's log directory, env names and argv are usable by the
//! kernel, and resources are in the ranges the kernel and the OCI runtime take. A bounded
//! number of cases (`PROPTEST_CASES`, default 256 each) keeps CI fast.

use std::path::{Component, Path};

use berth_oci::{checks, container_log_path, resources, validate_container_config};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ImageSpec, KeyValue, LinuxContainerConfig,
    LinuxContainerResources,
};
use proptest::prelude::*;

/// Path-like strings, hostile ones likely: separators, dots, NUL, long runs.
fn pathish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("..".to_string()),
        Just(".".to_string()),
        Just("".to_string()),
        Just("\0".to_string()),
        Just("a".repeat(300)),
        "[a-z0-9_.-]{1,12}",
        "\\PC{0,8}",
    ];
    (any::<bool>(), prop::collection::vec(piece, 0..6))
        .prop_map(|(abs, parts)| format!("{}{}", if abs { "/" } else { "" }, parts.join("/")))
}

/// Strings for names and arguments, with the bytes that break them.
fn wordish() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[A-Za-z0-9_=\\x00 -]{0,12}", "\\PC{0,12}",]
}

/// Numbers around the edges of every range the kernel and runc have, and anywhere else.
fn number() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(-1),
        Just(1),
        Just(2),
        Just(999),
        Just(1000),
        Just(262_144),
        Just(262_145),
        Just(1_000_000),
        Just(1_000_001),
        Just(6 << 20),
        Just((6 << 20) - 1),
        Just(i64::MAX),
        Just(i64::MIN),
        any::<i64>(),
    ]
}

fn cpu_list() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("0".to_string()),
        Just("0-1".to_string()),
        Just("0-99999".to_string()),
        Just("../../".to_string()),
        "[0-9,-]{0,10}",
    ]
}

fn resources() -> impl Strategy<Value = LinuxContainerResources> {
    (number(), number(), number(), number(), number(), number(), cpu_list(), cpu_list()).prop_map(
        |(period, quota, shares, memory, swap, oom, cpus, mems)| LinuxContainerResources {
            cpu_period: period,
            cpu_quota: quota,
            cpu_shares: shares,
            memory_limit_in_bytes: memory,
            memory_swap_limit_in_bytes: swap,
            oom_score_adj: oom,
            cpuset_cpus: cpus,
            cpuset_mems: mems,
            ..Default::default()
        },
    )
}

fn config() -> impl Strategy<Value = ContainerConfig> {
    (
        pathish(),
        pathish(),
        prop::collection::vec((wordish(), wordish()), 0..4),
        prop::collection::vec(wordish(), 0..4),
        prop::collection::vec(wordish(), 0..3),
        // Mostly unset, as the kubelet sends for BestEffort pods, so that the other fields
        // get past the resource checks often enough to be judged.
        prop_oneof![2 => Just(LinuxContainerResources::default()), 1 => resources()],
    )
        .prop_map(|(log_path, working_dir, envs, command, args, r)| ContainerConfig {
            metadata: Some(ContainerMetadata { name: "c".into(), attempt: 0 }),
            image: Some(ImageSpec { image: "busybox".into(), ..Default::default() }),
            log_path,
            working_dir,
            envs: envs.into_iter().map(|(key, value)| KeyValue { key, value }).collect(),
            command,
            args,
            linux: Some(LinuxContainerConfig { resources: Some(r), ..Default::default() }),
            ..Default::default()
        })
}

proptest! {
    /// Whatever the fields, validation answers; what it accepts is confined and usable.
    #[test]
    fn accepted_container_configs_keep_their_promises(c in config()) {
        if validate_container_config(&c).is_ok() {
            // The log file lands inside the pod's log directory.
            let dir = "/var/log/pods/ns_pod_uid";
            if let Ok(Some(path)) = container_log_path(dir, &c.log_path) {
                prop_assert!(path.starts_with(dir), "{path:?}");
                prop_assert!(
                    !path.components().any(|x| x == Component::ParentDir),
                    "{path:?}"
                );
            }
            for e in &c.envs {
                prop_assert!(!e.key.is_empty() && !e.key.contains(['=', '\0']), "{e:?}");
                prop_assert!(!e.value.contains('\0'), "{e:?}");
            }
            prop_assert!(c.working_dir.is_empty() || Path::new(&c.working_dir).is_absolute());
            prop_assert!(!c.working_dir.contains('\0'));
            prop_assert!(c.command.iter().chain(&c.args).all(|a| !a.contains('\0')));
            let r = c.linux.as_ref().and_then(|l| l.resources.as_ref()).cloned().unwrap_or_default();
            prop_assert!(r.cpu_shares == 0 || (2..=262_144).contains(&r.cpu_shares));
            prop_assert!(r.cpu_period == 0 || (1000..=1_000_000).contains(&r.cpu_period));
            prop_assert!(r.cpu_quota == 0 || r.cpu_quota == -1 || r.cpu_quota >= 1000);
            prop_assert!(r.memory_limit_in_bytes == 0 || r.memory_limit_in_bytes >= 6 << 20);
            prop_assert!((-1000..=1000).contains(&r.oom_score_adj));
        }
    }

    /// The single checks answer for any input too (they run on other paths as well).
    #[test]
    fn single_checks_never_panic(p in pathish(), w in wordish(), r in resources()) {
        let _ = checks::check_log_path(&p);
        let _ = checks::check_working_dir(&p);
        let _ = checks::check_argv(std::slice::from_ref(&w), &[]);
        let _ = checks::check_envs(&[KeyValue { key: w.clone(), value: p.clone() }]);
        let _ = container_log_path(&p, &w);
        let _ = resources::validate(&r);
        let _ = resources::parse_cpu_list(&w, 1024);
    }
}
