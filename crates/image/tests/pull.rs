//! Pulls from a real `docker-registry`: records, names, unpacking, dedup, GC, reopening.

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use berth_image::{ImageConfig, ImageStore, RegistryConfig};
use berth_snapshot::{Snapshotter, chain_ids};
use support::{Comp, RealRegistry, layer, push_image, push_index};

struct Env {
    dir: tempfile::TempDir,
    store: ImageStore,
    snapshots: Arc<Snapshotter>,
}

fn open(dir: &std::path::Path) -> (ImageStore, Arc<Snapshotter>) {
    let db = Arc::new(redb::Database::create(dir.join("meta.redb")).unwrap());
    let snapshots = Arc::new(Snapshotter::open(dir.join("snapshots")).unwrap());
    let config = ImageConfig {
        content_dir: dir.join("content"),
        registry: RegistryConfig::default(),
        max_concurrent_downloads: 2,
    };
    (ImageStore::open(db, snapshots.clone(), config).unwrap(), snapshots)
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (store, snapshots) = open(dir.path());
    Env { dir, store, snapshots }
}

impl Env {
    fn blob(&self, digest: &str) -> PathBuf {
        self.dir.path().join("content/blobs/sha256").join(digest.trim_start_matches("sha256:"))
    }
}

#[tokio::test]
async fn pull_list_get_repull_remove_reopen() {
    let regdir = tempfile::tempdir().unwrap();
    let reg = RealRegistry::start(regdir.path()).await;
    let host = reg.host();
    let layers = vec![
        layer(&[("etc/base", "base")], Comp::Gzip),
        layer(&[("etc/mid", "mid")], Comp::None),
        layer(&[("etc/top", "top")], Comp::Zstd),
    ];
    let pushed = push_image(&host, "team/app", "v1", &layers, "amd64", "1000:1000").await;
    let env = env();
    let name = format!("{host}/team/app");

    let (image, stats) = env.store.pull_with_stats(&format!("{name}:v1"), None).await.unwrap();
    assert_eq!(image.id, pushed.config_digest);
    assert_eq!(image.repo_tags, vec![format!("{name}:v1")]);
    assert_eq!(image.repo_digests, vec![format!("{name}@{}", pushed.manifest_digest)]);
    assert_eq!(image.size, pushed.layer_sizes + pushed.config_size);
    assert_eq!(image.user.as_deref(), Some("1000:1000"));
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    assert_eq!(image.diff_ids, diff_ids);
    let chains = chain_ids(&diff_ids);
    assert_eq!(image.chain_id, chains[2]);
    assert!(!stats.joined);
    assert!(stats.bytes_downloaded >= pushed.layer_sizes + pushed.config_size);
    for chain in &chains {
        assert!(env.snapshots.has(chain), "{chain} not unpacked");
    }
    for digest in
        pushed.layer_digests.iter().chain([&pushed.config_digest, &pushed.manifest_digest])
    {
        assert!(env.blob(digest).is_file(), "{digest} missing");
    }
    assert!(serde_json::from_str::<serde_json::Value>(&image.config_json).is_ok());

    // Lookups.
    let hex = pushed.config_digest.trim_start_matches("sha256:");
    for key in [
        pushed.config_digest.clone(),
        hex.to_string(),
        format!("{name}:v1"),
        format!("{name}@{}", pushed.manifest_digest),
        format!("{name}:v1@{}", pushed.manifest_digest),
    ] {
        assert_eq!(env.store.get(&key).unwrap().as_ref(), Some(&image), "{key}");
    }
    assert_eq!(env.store.get(&format!("{name}:v2")).unwrap(), None);
    assert_eq!(env.store.get("Not A Reference").unwrap(), None);
    assert_eq!(env.store.list().unwrap(), vec![image.clone()]);

    // Pulling again downloads only the manifest.
    let (again, stats) = env.store.pull_with_stats(&format!("{name}:v1"), None).await.unwrap();
    assert_eq!(again, image);
    assert_eq!(stats.bytes_downloaded, pushed.manifest.len() as u64);

    // By digest: adds nothing new.
    let by_digest =
        env.store.pull(&format!("{name}@{}", pushed.manifest_digest), None).await.unwrap();
    assert_eq!(by_digest, image);

    let usage = env.store.fs_usage().unwrap();
    assert_eq!(usage.mountpoint, env.dir.path());
    assert!(usage.bytes > 0 && usage.inodes > 0);

    // Reopen: everything is still there.
    drop(env.store);
    let (store, snapshots) = open(env.dir.path());
    assert_eq!(store.list().unwrap(), vec![image.clone()]);

    // Remove: names, record, blobs and snapshots go.
    assert!(store.remove(&format!("{name}:v1")).unwrap());
    assert!(!store.remove(&format!("{name}:v1")).unwrap());
    assert!(store.list().unwrap().is_empty());
    assert_eq!(store.get(&pushed.config_digest).unwrap(), None);
    for digest in
        pushed.layer_digests.iter().chain([&pushed.config_digest, &pushed.manifest_digest])
    {
        assert!(
            !env.dir.path().join("content/blobs/sha256").join(&digest[7..]).exists(),
            "{digest} left"
        );
    }
    for chain in &chains {
        assert!(!snapshots.has(chain), "{chain} left");
    }
    assert_eq!(store.gc().unwrap(), berth_image::GcStats::default());
    // A blob a crash orphaned (record gone, blob left) is swept by gc().
    let orphan = support::sha(b"orphan");
    let orphan_path = env.dir.path().join("content/blobs/sha256").join(&orphan[7..]);
    std::fs::write(&orphan_path, b"orphan").unwrap();
    assert_eq!(store.gc().unwrap(), berth_image::GcStats { blobs: 1, snapshots: 0 });
    assert!(!orphan_path.exists());
}

#[tokio::test]
async fn names_move_and_shared_layers_survive_removal() {
    let regdir = tempfile::tempdir().unwrap();
    let reg = RealRegistry::start(regdir.path()).await;
    let host = reg.host();
    let base = || layer(&[("bin/base", "shared")], Comp::Gzip);
    let a =
        push_image(&host, "app", "v1", &[base(), layer(&[("a", "a")], Comp::Gzip)], "amd64", "")
            .await;
    let b = push_image(
        &host,
        "app",
        "v2",
        &[base(), layer(&[("b", "b")], Comp::Gzip)],
        "amd64",
        "nobody",
    )
    .await;
    let env = env();
    let name = format!("{host}/app");

    let image_a = env.store.pull(&format!("{name}:v1"), None).await.unwrap();
    assert_eq!(image_a.user, None);
    // The same image under another name.
    let other = push_image(
        &host,
        "other",
        "latest",
        &[base(), layer(&[("a", "a")], Comp::Gzip)],
        "amd64",
        "",
    )
    .await;
    assert_eq!(other.config_digest, a.config_digest);
    let same = env.store.pull(&format!("{host}/other"), None).await.unwrap();
    assert_eq!(same.id, image_a.id);
    assert_eq!(same.repo_tags, vec![format!("{name}:v1"), format!("{host}/other:latest")]);

    // v1 now points at image b: the tag moves, a keeps its digests.
    push_image(&host, "app", "v1", &[base(), layer(&[("b", "b")], Comp::Gzip)], "amd64", "nobody")
        .await;
    let image_b = env.store.pull(&format!("{name}:v1"), None).await.unwrap();
    assert_eq!(image_b.id, b.config_digest);
    assert_eq!(image_b.user.as_deref(), Some("nobody"));
    let image_a = env.store.get(&a.config_digest).unwrap().unwrap();
    assert_eq!(image_a.repo_tags, vec![format!("{host}/other:latest")]);
    assert_eq!(image_a.repo_digests.len(), 2);
    assert_eq!(env.store.list().unwrap().len(), 2);

    // Removing a keeps the shared base layer (blob and snapshot) for b.
    assert!(env.store.remove(&a.config_digest).unwrap());
    let a_chains = chain_ids(&image_a.diff_ids);
    assert!(env.snapshots.has(&a_chains[0]), "shared base snapshot removed");
    assert!(!env.snapshots.has(&a_chains[1]), "a's own layer snapshot kept");
    assert!(env.blob(&a.layer_digests[0]).is_file());
    assert!(!env.blob(&a.layer_digests[1]).exists());
    assert!(!env.blob(&a.config_digest).exists());
    assert!(env.blob(&b.config_digest).is_file());
    assert_eq!(env.store.get(&format!("{host}/other")).unwrap(), None);
    assert_eq!(env.store.list().unwrap().len(), 1);
}

#[tokio::test]
async fn index_picks_host_platform_and_concurrent_pulls_agree() {
    let regdir = tempfile::tempdir().unwrap();
    let reg = RealRegistry::start(regdir.path()).await;
    let host = reg.host();
    let arm = push_image(
        &host,
        "multi",
        "arm64",
        &[layer(&[("arch", "arm64")], Comp::Gzip)],
        "arm64",
        "",
    )
    .await;
    let amd = push_image(
        &host,
        "multi",
        "amd64",
        &[layer(&[("arch", "amd64")], Comp::Gzip)],
        "amd64",
        "",
    )
    .await;
    let index = push_index(&host, "multi", "latest", &[(&arm, "arm64"), (&amd, "amd64")]).await;
    let env = env();
    let name = format!("{host}/multi");
    let amd_tag = format!("{name}:amd64");
    let (a, b, c) = tokio::join!(
        env.store.pull_with_stats(&name, None),
        env.store.pull_with_stats(&name, None),
        env.store.pull_with_stats(&amd_tag, None),
    );
    let ((a, sa), (b, sb), (c, _)) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert!(sa.joined != sb.joined, "exactly one of two identical pulls runs it");
    assert_eq!(a, b);
    if cfg!(target_arch = "x86_64") {
        assert_eq!(a.id, amd.config_digest);
        let mut c = env.store.get(&c.id).unwrap().unwrap();
        // The two pulls finish in either order.
        c.repo_digests.sort();
        c.repo_tags.sort();
        let mut digests =
            vec![format!("{name}@{index}"), format!("{name}@{}", amd.manifest_digest)];
        digests.sort();
        assert_eq!(c.repo_digests, digests);
        assert_eq!(c.repo_tags, vec![format!("{name}:amd64"), format!("{name}:latest")]);
        assert!(env.blob(&index).is_file());
    }
}
