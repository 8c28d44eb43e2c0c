//! ImageService end to end: a real berthd pulls fixture images from a private registry.
//!
//! Every test starts its own registry and daemon. Run as root (`cargo test -p berth-e2e`):
//! berthd mounts overlays and sets trusted.* xattrs.

#[path = "support/podkit.rs"]
mod podkit;

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_e2e::cri::images::{self, Client};
use berth_e2e::fixtures::{self, MARKER_ENV, Malice};
use berth_e2e::oci::{Format, chain_ids};
use berth_e2e::registry::{AUTH_PASSWORD, AUTH_USER};
use berth_e2e::{Berthd, Options, Pushed, Registry, image_spec, metric_value};
use k8s_cri::v1::{AuthConfig, StatusRequest, VersionRequest};
use tonic::Code;

/// A registry, a daemon and an image client on it.
async fn setup_with(options: Options) -> (Registry, Berthd, Client) {
    assert!(berth_e2e::is_root(), "the e2e tests need root");
    let reg = Registry::start().await.expect("registry");
    let d = Berthd::start_with(options).await.expect("berthd");
    let c = d.images().await.expect("image client");
    (reg, d, c)
}

async fn setup() -> (Registry, Berthd, Client) {
    setup_with(Options::default()).await
}

/// Every path below `dir` (not following symlinks), `dir` itself excluded.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// The unpacked files of layer snapshot `chain_id`.
fn layer_fs(d: &Berthd, chain_id: &str) -> PathBuf {
    let hex = chain_id.trim_start_matches("sha256:");
    d.root().join("snapshots/layers").join(hex).join("fs")
}

fn layers_dir_entries(d: &Berthd) -> Vec<PathBuf> {
    let dir = d.root().join("snapshots/layers");
    std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_and_status() {
    let d = Berthd::start().await.expect("berthd");
    let mut rt = d.runtime().await.unwrap();
    let v = rt.version(VersionRequest { version: "v1".into() }).await.unwrap().into_inner();
    assert_eq!(v.runtime_name, "berth");
    assert!(!v.runtime_version.is_empty());
    assert!(v.runtime_api_version.starts_with("v1"), "{v:?}");
    let s = rt.status(StatusRequest { verbose: false }).await.unwrap().into_inner();
    let conds = s.status.expect("status").conditions;
    let ready = conds.iter().find(|c| c.r#type == "RuntimeReady").expect("RuntimeReady");
    assert!(ready.status, "{conds:?}");
}

/// Images as crictl users name them: by a unique prefix of the ID, with or without
/// `sha256:` (`crictl inspecti 5f8a`, `crictl rmi 5f8a`); names win over ID prefixes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_by_id_prefix() {
    let (reg, _d, mut c) = setup().await;
    let p = fixtures::push_busybox(&reg).await.unwrap();
    images::pull(&mut c, &p.reference()).await.unwrap();
    let hex = p.id().trim_start_matches("sha256:").to_string();
    for r in [hex[..12].to_string(), format!("sha256:{}", &hex[..5]), hex[..1].to_string()] {
        let s = images::status(&mut c, &r).await.unwrap().unwrap_or_else(|| panic!("status {r}"));
        assert_eq!(s.id, p.id(), "{r}");
    }
    // A prefix no image has, and something that is no prefix at all.
    let other = if hex.starts_with('0') { "1" } else { "0" };
    assert!(images::status(&mut c, other).await.unwrap().is_none());
    assert!(images::status(&mut c, "sha256:xyz").await.unwrap().is_none());
    images::remove(&mut c, &hex[..8]).await.unwrap();
    assert!(images::status(&mut c, p.id()).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_list_status_remove() {
    let (reg, d, mut c) = setup().await;
    let p = fixtures::push_busybox(&reg).await.unwrap();
    let name_ref = p.reference();
    let digest_ref = p.digest_reference();

    let image_ref = images::pull(&mut c, &name_ref).await.unwrap();
    assert_eq!(image_ref, p.id(), "PullImage returns the image ID");

    let list = images::list(&mut c).await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let img = &list[0];
    assert_eq!(img.id, p.id());
    assert_eq!(img.repo_tags, vec![name_ref.clone()]);
    assert_eq!(img.repo_digests, vec![digest_ref.clone()]);
    assert!(img.size > 0);
    assert_eq!(img.size, p.image.size(), "size = compressed layers + config");

    // Status by name, by ID, by digest reference; verbose carries the config.
    for r in [name_ref.as_str(), p.id(), digest_ref.as_str()] {
        let s = images::status(&mut c, r).await.unwrap().unwrap_or_else(|| panic!("status {r}"));
        assert_eq!(s.id, p.id(), "{r}");
    }
    let verbose = images::status_verbose(&mut c, &name_ref, true).await.unwrap();
    let marker = format!("{MARKER_ENV}=busybox");
    assert!(verbose.info.values().any(|v| v.contains(&marker)), "verbose info: {:?}", verbose.info);

    // Pulling by digest finds the same image and keeps its tag.
    assert_eq!(images::pull(&mut c, &digest_ref).await.unwrap(), p.id());
    let list = images::list(&mut c).await.unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0].repo_tags.contains(&name_ref));

    let fs = images::fs_info(&mut c).await.unwrap();
    let usage = fs.image_filesystems.first().expect("an image filesystem");
    assert!(usage.used_bytes.as_ref().expect("used_bytes").value > 0, "{usage:?}");
    assert!(usage.inodes_used.as_ref().expect("inodes_used").value > 0, "{usage:?}");
    assert!(!usage.fs_id.as_ref().expect("fs_id").mountpoint.is_empty());

    // Remove by ID, by name, by digest; each time the image is gone and removing again is fine.
    for r in [p.id().to_string(), name_ref.clone(), digest_ref.clone()] {
        if images::status(&mut c, &name_ref).await.unwrap().is_none() {
            images::pull(&mut c, &name_ref).await.unwrap();
        }
        images::remove(&mut c, &r).await.unwrap_or_else(|e| panic!("remove {r}: {e}"));
        assert!(images::status(&mut c, &name_ref).await.unwrap().is_none(), "{r}");
        assert!(images::status(&mut c, p.id()).await.unwrap().is_none(), "{r}");
        assert!(images::list(&mut c).await.unwrap().is_empty(), "{r}");
        images::remove(&mut c, &r).await.unwrap_or_else(|e| panic!("second remove {r}: {e}"));
    }
    // Nothing of the image stays on disk.
    assert!(layers_dir_entries(&d).is_empty(), "{:?}", layers_dir_entries(&d));
    let layer_hex = p.image.layers[0].blob.digest.trim_start_matches("sha256:").to_string();
    let left: Vec<PathBuf> = walk(&d.root().join("content"))
        .into_iter()
        .filter(|f| f.to_string_lossy().contains(&layer_hex))
        .collect();
    assert!(left.is_empty(), "layer blob left: {left:?}");
}

/// Unmounts on drop.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn names_in(dir: &Path) -> HashSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whiteouts_become_overlay_whiteouts() {
    let (reg, d, mut c) = setup().await;
    let p = fixtures::push_whiteouts(&reg).await.unwrap();
    images::pull(&mut c, &p.reference()).await.unwrap();

    let chains = chain_ids(&p.image.diff_ids());
    let lower = layer_fs(&d, &chains[0]);
    let upper = layer_fs(&d, &chains[1]);
    assert!(lower.is_dir() && upper.is_dir(), "layers: {:?}", layers_dir_entries(&d));

    // The OCI whiteout file became an overlayfs whiteout: a 0:0 character device.
    let gone = std::fs::symlink_metadata(upper.join("data/gone")).expect("whiteout device");
    assert!(gone.file_type().is_char_device(), "{gone:?}");
    assert_eq!(gone.rdev(), 0);
    assert!(!upper.join("data/.wh.gone").exists());
    // The opaque marker became the opaque xattr.
    let opaque = xattr::get(upper.join("opq"), "trusted.overlay.opaque").unwrap();
    assert_eq!(opaque.as_deref(), Some(&b"y"[..]));
    assert!(!upper.join("opq/.wh..wh..opq").exists());
    // The lower layer is untouched.
    assert_eq!(std::fs::read(lower.join("data/gone")).unwrap(), b"gone\n");

    // What a container would see.
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let opts = format!("lowerdir={}:{}", upper.display(), lower.display());
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    )
    .expect("mount overlay");
    let _guard = MountGuard(merged.clone());
    assert_eq!(names_in(&merged.join("data")), HashSet::from(["keep".into(), "new".into()]));
    assert_eq!(names_in(&merged.join("opq")), HashSet::from(["upper".into()]));
    assert_eq!(std::fs::read(merged.join("opq/upper")).unwrap(), b"upper\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_and_uncompressed_layers_pull() {
    let (reg, d, mut c) = setup().await;
    let p = fixtures::push_zstd(&reg).await.unwrap();
    assert_eq!(images::pull(&mut c, &p.reference()).await.unwrap(), p.id());
    let chains = chain_ids(&p.image.diff_ids());
    let bottom = layer_fs(&d, &chains[0]);
    let busybox = std::fs::metadata(bottom.join("bin/busybox")).expect("busybox unpacked");
    assert_eq!(busybox.len(), std::fs::metadata(fixtures::HOST_BUSYBOX).unwrap().len());
    assert_eq!(busybox.mode() & 0o7777, 0o755);
    assert_eq!(std::fs::read_link(bottom.join("bin/sh")).unwrap(), Path::new("busybox"));
    assert_eq!(std::fs::read(layer_fs(&d, &chains[1]).join("etc/zstd")).unwrap(), b"zstd\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_platform_index_resolves_to_amd64() {
    for format in [Format::Oci, Format::Docker] {
        let (reg, _d, mut c) = setup().await;
        let p = fixtures::push_multiarch(&reg, format).await.unwrap();
        assert_eq!(images::pull(&mut c, &p.reference()).await.unwrap(), p.id(), "{format:?}");
        let s = images::status(&mut c, &p.reference()).await.unwrap().expect("status");
        assert_eq!(s.id, p.id(), "{format:?}: the amd64 config");
        // The repo digest is the index's, so that the kubelet's digest references match.
        assert!(s.repo_digests.contains(&p.digest_reference()), "{format:?}: {s:?}");
        let v = images::status_verbose(&mut c, &p.reference(), true).await.unwrap();
        let info = v.info.values().cloned().collect::<Vec<_>>().join("\n");
        assert!(info.contains("multiarch-amd64") && !info.contains("multiarch-arm64"), "{info}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_layer_and_concurrent_pulls_share_one_download() {
    let (reg, d, c) = setup().await;
    let p = fixtures::push_big(&reg).await.unwrap();
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (r1, r2) = (p.reference(), p.reference());
    let (a, b) = tokio::join!(images::pull(&mut c1, &r1), images::pull(&mut c2, &r2));
    assert_eq!(a.unwrap(), p.id());
    assert_eq!(b.unwrap(), p.id());
    let chains = chain_ids(&p.image.diff_ids());
    let big = std::fs::metadata(layer_fs(&d, &chains[0]).join("data/big.bin")).unwrap();
    assert_eq!(big.len(), fixtures::BIG_FILE_SIZE as u64);
    let text = berth_e2e::http::get(&d.metrics_url()).await.unwrap().text();
    let bytes = metric_value(&text, "berth_image_pull_bytes_total", &[]).expect("pull bytes");
    let layer = p.image.layers[0].blob.data.len() as f64;
    assert!(
        bytes >= layer && bytes < 1.5 * layer,
        "one download expected: {bytes} bytes for a {layer}-byte layer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_survive_restart_and_crash() {
    let (reg, mut d, mut c) = setup().await;
    let p = fixtures::push_busybox(&reg).await.unwrap();
    images::pull(&mut c, &p.reference()).await.unwrap();
    drop(c);

    assert!(d.stop(), "berthd did not exit within 10 s of SIGTERM:\n{}", d.log_tail(30));
    assert!(!d.socket().exists(), "berthd left its socket behind");
    d.start_again().await.unwrap();
    let mut c = d.images().await.unwrap();
    let list = images::list(&mut c).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, p.id());
    assert_eq!(list[0].repo_tags, vec![p.reference()]);
    assert!(images::status(&mut c, &p.reference()).await.unwrap().is_some());
    drop(c);

    // A crash leaves a stale socket; the next start copes.
    d.kill9();
    d.start_again().await.unwrap();
    let mut c = d.images().await.unwrap();
    assert_eq!(
        images::status(&mut c, &p.digest_reference()).await.unwrap().expect("status").id,
        p.id()
    );
    // And the image still unpacks into containers' layers: the snapshot is there.
    let chains = chain_ids(&p.image.diff_ids());
    assert!(layer_fs(&d, &chains[0]).join("bin/busybox").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_are_tried_first_and_dead_mirrors_fall_through() {
    let reg = Registry::start().await.unwrap();
    // Ports nobody listens on: an unreachable upstream, and a dead mirror.
    let dead_upstream = format!("127.0.0.1:{}", berth_e2e::process::free_port().unwrap());
    let dead_mirror = format!("http://127.0.0.1:{}", berth_e2e::process::free_port().unwrap());
    let options = Options {
        mirrors: vec![(dead_upstream.clone(), vec![reg.url()]), (reg.host(), vec![dead_mirror])],
        ..Default::default()
    };
    let d = Berthd::start_with(options).await.expect("berthd");
    let mut c = d.images().await.unwrap();
    let p = fixtures::push_busybox(&reg).await.unwrap();

    let via_mirror = p.on_host(&dead_upstream);
    assert_eq!(images::pull(&mut c, &via_mirror.reference()).await.unwrap(), p.id());
    let s = images::status(&mut c, &via_mirror.reference()).await.unwrap().expect("status");
    assert!(s.repo_tags.contains(&via_mirror.reference()), "named after the upstream: {s:?}");

    assert_eq!(images::pull(&mut c, &p.reference()).await.unwrap(), p.id());
    let s = images::status(&mut c, &p.reference()).await.unwrap().expect("status");
    assert!(s.repo_tags.contains(&p.reference()), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_layers_are_refused() {
    let (reg, d, mut c) = setup().await;
    // A real directory the layers aim at: following the symlink would succeed.
    let target = tempfile::Builder::new().prefix("berth-e2e-target").tempdir().unwrap();
    let target_s = target.path().to_str().unwrap().to_string();
    let passwd_links = std::fs::metadata("/etc/passwd").unwrap().nlink();
    let cases: [(Malice, &[&str]); 2] = [
        (Malice::DotDot, &["..", "escape"]),
        (Malice::HardlinkEscape, &["evil", "passwd", "hardlink"]),
    ];
    for (malice, words) in cases {
        let p = fixtures::push_malicious(&reg, malice, &target_s).await.unwrap();
        let err = images::pull(&mut c, &p.reference()).await.expect_err("malicious layer pulled");
        assert_ne!(err.code(), Code::Ok);
        let msg = err.message().to_lowercase();
        assert!(
            words.iter().any(|w| msg.contains(w)),
            "{malice:?}: {:?} {}",
            err.code(),
            err.message()
        );
        assert!(images::status(&mut c, &p.reference()).await.unwrap().is_none(), "{malice:?}");
        assert!(images::list(&mut c).await.unwrap().is_empty(), "{malice:?}");
        assert!(layers_dir_entries(&d).is_empty(), "{malice:?}: {:?}", layers_dir_entries(&d));
    }
    // No half-unpacked layer anywhere in the daemon's directories.
    let evidence: Vec<PathBuf> = walk(d.dir())
        .into_iter()
        .filter(|f| {
            let n = f.file_name().unwrap_or_default().to_string_lossy();
            ["ok.txt", "escape", "pwned", "evil", "evil2"].contains(&n.as_ref())
        })
        .collect();
    assert!(evidence.is_empty(), "{evidence:?}");

    // An absolute symlink resolves inside the image's root, as it would in the container:
    // writing through it is no escape, and lands inside the layer.
    let p = fixtures::push_malicious(&reg, Malice::SymlinkWriteThrough, &target_s).await.unwrap();
    images::pull(&mut c, &p.reference()).await.unwrap();
    let fs = layer_fs(&d, &chain_ids(&p.image.diff_ids())[0]);
    let inside = fs.join(target_s.trim_start_matches('/')).join("pwned");
    assert_eq!(std::fs::read(&inside).unwrap(), b"pwned\n");

    assert!(names_in(target.path()).is_empty(), "written outside: {:?}", names_in(target.path()));
    assert_eq!(std::fs::metadata("/etc/passwd").unwrap().nlink(), passwd_links);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_apply_onto_their_parents() {
    if podkit::skip() {
        return;
    }
    // busybox is pulled already: its layer is shared, the two above it are new.
    let mut env = podkit::Env::start().await.unwrap();
    let p = fixtures::push_layered(&env.reg).await.unwrap();
    let mut c = env.d.images().await.unwrap();
    // Both new layers end without padding or end blocks; the digests are over what was sent.
    assert_eq!(images::pull(&mut c, &p.reference()).await.unwrap(), p.id());

    let chains = chain_ids(&p.image.diff_ids());
    let top = layer_fs(&env.d, &chains[2]);
    // Written through layer 2's `lib -> usr/lib`, into layer 3.
    assert_eq!(std::fs::read(top.join("usr/lib/foo.so")).unwrap(), fixtures::LAYERED_FOO);
    assert!(!top.join("lib").exists());
    // The hard link to layer 2's file: a copy-up of it in layer 3, then the link.
    let a = std::fs::metadata(top.join("usr/bin/a")).unwrap();
    assert_eq!(std::fs::metadata(top.join("usr/bin/b")).unwrap().ino(), a.ino());
    assert_eq!(a.mode() & 0o7777, 0o755);
    let lower_a = layer_fs(&env.d, &chains[1]).join("usr/bin/a");
    assert_eq!(std::fs::metadata(lower_a).unwrap().nlink(), 1);

    // What a container sees.
    let pod_config = env.pod_config("layered");
    let pod = env.run_pod(pod_config.clone()).await.unwrap();
    let script = "cat /lib/foo.so /usr/lib/foo.so /usr/bin/b; stat -c %h /usr/bin/a";
    let mut config = env.container_config("check", &["/bin/sh", "-c", script]);
    config.image = Some(image_spec(&p.reference()));
    let ctr = env.run(&pod, &pod_config, config).await.unwrap();
    let s = env.wait_exited(&ctr, Duration::from_secs(30)).await.unwrap();
    assert_eq!(s.exit_code, 0, "{s:?}");
    let log = env.log_dir("layered").join("check/0.log");
    let want = ["foo from layer three", "foo from layer three", "layer two", "2"];
    let ok = podkit::eventually(Duration::from_secs(5), || {
        podkit::read_log(&log).map(|l| l.len() >= want.len()).unwrap_or(false)
    })
    .await;
    let lines: Vec<String> =
        podkit::read_log(&log).unwrap().into_iter().map(|(_, _, line)| line).collect();
    assert!(ok, "{lines:?}");
    assert_eq!(lines, want);
    env.remove_pod(&pod).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_blob_is_refused() {
    let (reg, d, mut c) = setup().await;
    let p = fixtures::push_tampered(&reg).await.unwrap();
    let err = images::pull(&mut c, &p.reference()).await.expect_err("tampered blob pulled");
    assert!(
        matches!(err.code(), Code::DataLoss | Code::Internal),
        "{:?} {}",
        err.code(),
        err.message()
    );
    let hex = p.image.layers[0].blob.digest.trim_start_matches("sha256:");
    assert!(err.message().contains(hex), "message names the digest: {}", err.message());
    assert!(images::status(&mut c, &p.reference()).await.unwrap().is_none());
    assert!(images::list(&mut c).await.unwrap().is_empty());
    let ingest = walk(&d.root().join("content/ingest"));
    assert!(ingest.is_empty(), "partial blobs left: {ingest:?}");
    assert!(layers_dir_entries(&d).is_empty(), "{:?}", layers_dir_entries(&d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_invalid_references() {
    let (reg, _d, mut c) = setup().await;
    let p = fixtures::push_busybox(&reg).await.unwrap();
    let unknown_repo = format!("{}/nothere:1.0", reg.host());
    let unknown_tag = format!("{}:nope", p.name());
    for r in [&unknown_repo, &unknown_tag] {
        let err = images::pull(&mut c, r).await.expect_err("pulled nothing");
        assert_eq!(err.code(), Code::NotFound, "{r}: {}", err.message());
    }
    // Not `UPPER/case`: by the reference grammar (distribution's splitDockerDomain) an
    // upper-case first component is a registry host, so that one is valid.
    let invalid = [
        String::new(),
        "UPPERCASE".to_string(),
        format!("{}/busybox/UPPER:1.0", reg.host()),
        format!("{}/busybox:bad tag", reg.host()),
        format!("{}/busybox@sha256:abc", reg.host()),
        format!("{}/-busybox:1.0", reg.host()),
    ];
    for r in &invalid {
        let err = images::pull(&mut c, r).await.expect_err("invalid reference pulled");
        assert_eq!(err.code(), Code::InvalidArgument, "{r:?}: {}", err.message());
    }
    // Unknown images have no status and removing them is not an error.
    assert!(images::status(&mut c, &unknown_repo).await.unwrap().is_none());
    images::remove(&mut c, &unknown_repo).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_registry_needs_credentials() {
    assert!(berth_e2e::is_root());
    let reg = Registry::start_with_auth().await.unwrap();
    let d = Berthd::start().await.unwrap();
    let mut c = d.images().await.unwrap();
    let p = fixtures::push_busybox(&reg).await.unwrap();
    let err = images::pull(&mut c, &p.reference()).await.expect_err("pulled without credentials");
    assert_ne!(err.code(), Code::Ok);
    let wrong =
        AuthConfig { username: AUTH_USER.into(), password: "wrong".into(), ..Default::default() };
    images::pull_with_auth(&mut c, &p.reference(), Some(wrong)).await.expect_err("wrong password");
    let auth = AuthConfig {
        username: AUTH_USER.into(),
        password: AUTH_PASSWORD.into(),
        ..Default::default()
    };
    assert_eq!(
        images::pull_with_auth(&mut c, &p.reference(), Some(auth.clone())).await.unwrap(),
        p.id()
    );
    // berthd keeps registry clients (and their tokens) between pulls, but per identity: the
    // token the right password got serves neither an anonymous pull nor a wrong password.
    images::pull(&mut c, &p.reference()).await.expect_err("anonymous pull after an authorized one");
    let wrong =
        AuthConfig { username: AUTH_USER.into(), password: "wrong".into(), ..Default::default() };
    images::pull_with_auth(&mut c, &p.reference(), Some(wrong)).await.expect_err("wrong password");
    assert_eq!(images::pull_with_auth(&mut c, &p.reference(), Some(auth)).await.unwrap(), p.id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_cri_calls_and_pulls() {
    let (reg, d, mut c) = setup().await;
    let p: Pushed = fixtures::push_busybox(&reg).await.unwrap();
    images::pull(&mut c, &p.reference()).await.unwrap();
    images::pull(&mut c, &format!("{}:nope", p.name())).await.expect_err("unknown tag");
    images::list(&mut c).await.unwrap();

    let r = berth_e2e::http::get(&d.metrics_url()).await.unwrap();
    assert!(r.status.is_success(), "{}", r.status);
    let text = r.text();
    let pull = [("method", "/runtime.v1.ImageService/PullImage")];
    let list = [("method", "/runtime.v1.ImageService/ListImages")];
    let get =
        |name: &str, labels: &[(&str, &str)]| metric_value(&text, name, labels).unwrap_or(0.0);
    assert!(get("berth_cri_requests_total", &pull) >= 2.0, "{text}");
    assert!(get("berth_cri_requests_total", &list) >= 1.0, "{text}");
    assert!(get("berth_cri_errors_total", &pull) >= 1.0, "{text}");
    assert!(get("berth_cri_request_duration_seconds_count", &pull) >= 2.0, "{text}");
    assert!(get("berth_image_pull_bytes_total", &[]) > 0.0, "{text}");
    assert!(get("berth_image_pull_duration_seconds_count", &[]) >= 1.0, "{text}");
}
