//! Pull failures against a scripted registry: each gives a precise error, leaves no
//! half-written blob and records nothing.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use berth_image::{ErrorClass, ImageConfig, ImageError, ImageStore, RegistryConfig};
use berth_snapshot::Snapshotter;
use support::{FakeRegistry, Route, closed_port, sha};

/// The error with its sources, as crates/cri reports it.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(" <- {cause}"));
        source = cause.source();
    }
    text
}

struct Env {
    _dir: tempfile::TempDir,
    store: ImageStore,
    content: std::path::PathBuf,
    snapshots: std::path::PathBuf,
}

fn env(registry: RegistryConfig) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(dir.path().join("meta.redb")).unwrap());
    let snapshots = Arc::new(Snapshotter::open(dir.path().join("snapshots")).unwrap());
    let content = dir.path().join("content");
    let config =
        ImageConfig { content_dir: content.clone(), registry, max_concurrent_downloads: 3 };
    let store = ImageStore::open(db, snapshots, config).unwrap();
    let snapshots = dir.path().join("snapshots");
    Env { _dir: dir, store, content, snapshots }
}

impl Env {
    /// No blob other than `allowed` present, nothing in ingest, no image recorded.
    fn assert_clean(&self, allowed: &[&str]) {
        let ingest: Vec<_> = std::fs::read_dir(self.content.join("ingest")).unwrap().collect();
        assert!(ingest.is_empty(), "ingest not empty: {ingest:?}");
        for entry in std::fs::read_dir(self.content.join("blobs/sha256")).unwrap() {
            let name = format!("sha256:{}", entry.unwrap().file_name().to_string_lossy());
            assert!(allowed.contains(&name.as_str()), "unexpected blob {name}");
        }
        assert!(self.store.list().unwrap().is_empty());
        // No layer snapshot, finished or half-unpacked.
        let layers: Vec<_> = std::fs::read_dir(self.snapshots.join("layers")).unwrap().collect();
        assert!(layers.is_empty(), "layers not empty: {layers:?}");
    }
}

#[tokio::test]
async fn invalid_reference() {
    let env = env(RegistryConfig::default());
    let err = env.store.pull("Upper/Case", None).await.unwrap_err();
    eprintln!("{}", chain(&err));
    assert!(matches!(err, ImageError::InvalidReference { .. }), "{err}");
    assert_eq!(err.grpc_class(), ErrorClass::InvalidArgument);
}

#[tokio::test]
async fn manifest_not_found() {
    let reg = FakeRegistry::start().await;
    let env = env(RegistryConfig::default());
    let reference = format!("{}/nothing:here", reg.host());
    let err = env.store.pull(&reference, None).await.unwrap_err();
    eprintln!("{}", chain(&err));
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    assert_eq!(err.grpc_class(), ErrorClass::NotFound);
    assert!(err.to_string().contains(&reference), "{err}");
    env.assert_clean(&[]);
}

#[tokio::test]
async fn unauthorized() {
    let reg = FakeRegistry::start().await;
    reg.route(
        "/v2/private/manifests/latest",
        Route::Status(
            401,
            vec![("WWW-Authenticate".into(), "Basic realm=\"r\"".into())],
            br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#.to_vec(),
        ),
    );
    let env = env(RegistryConfig::default());
    let err = env.store.pull(&format!("{}/private", reg.host()), None).await.unwrap_err();
    eprintln!("{}", chain(&err));
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
    assert_eq!(err.grpc_class(), ErrorClass::Unauthenticated);
    env.assert_clean(&[]);
}

#[tokio::test]
async fn connection_refused() {
    let env = env(RegistryConfig::default());
    let port = closed_port();
    let err = env.store.pull(&format!("127.0.0.1:{port}/x:1"), None).await.unwrap_err();
    eprintln!("{}", chain(&err));
    match &err {
        ImageError::Unreachable { registry, .. } => {
            assert_eq!(*registry, format!("127.0.0.1:{port}"))
        }
        other => panic!("{other}"),
    }
    assert_eq!(err.grpc_class(), ErrorClass::Unavailable);
    env.assert_clean(&[]);
}

#[tokio::test]
async fn truncated_blob() {
    let reg = FakeRegistry::start().await;
    let (manifest, config, _) =
        reg.serve_image("app", "v1", b"layer", "application/vnd.oci.image.layer.v1.tar+gzip");
    // The config blob breaks off half way.
    let path = format!("/v2/app/blobs/{config}");
    let Route::Ok(_, body) = reg.routes.lock().unwrap()[&path].clone() else { panic!() };
    reg.route(&path, Route::Truncate(body.len() as u64, body[..body.len() / 2].to_vec()));
    let env = env(RegistryConfig::default());
    let err = env.store.pull(&format!("{}/app:v1", reg.host()), None).await.unwrap_err();
    eprintln!("{}", chain(&err));
    assert!(matches!(err, ImageError::Truncated { .. }), "{err}");
    assert_eq!(err.grpc_class(), ErrorClass::Unavailable);
    // The manifest was complete and verified; it may stay.
    env.assert_clean(&[&manifest]);
}

#[tokio::test]
async fn corrupt_blob_is_digest_mismatch() {
    let reg = FakeRegistry::start().await;
    let (manifest, config, _) =
        reg.serve_image("app", "v1", b"layer", "application/vnd.oci.image.layer.v1.tar+gzip");
    let path = format!("/v2/app/blobs/{config}");
    let Route::Ok(ct, mut body) = reg.routes.lock().unwrap()[&path].clone() else { panic!() };
    body[3] ^= 1;
    reg.route(&path, Route::Ok(ct, body));
    let env = env(RegistryConfig::default());
    let err = env.store.pull(&format!("{}/app:v1", reg.host()), None).await.unwrap_err();
    eprintln!("{}", chain(&err));
    assert!(
        matches!(err, ImageError::DigestMismatch { ref digest, .. } if *digest == config),
        "{err}"
    );
    assert_eq!(err.grpc_class(), ErrorClass::DataLoss);
    env.assert_clean(&[&manifest]);
}

#[tokio::test]
async fn corrupt_layer_is_digest_mismatch_and_leaves_no_unpack() {
    let reg = FakeRegistry::start().await;
    let good = support::layer(&[("etc/hello", "hello")], support::Comp::None);
    let (manifest, config, layer) = reg.serve_image("app", "v1", &good.blob, good.media_type);
    // Another valid tar of the same size under the layer's digest: it unpacks, but must
    // not stay.
    let other = support::layer(&[("etc/hello", "howdy")], support::Comp::None);
    reg.route(
        &format!("/v2/app/blobs/{layer}"),
        Route::Ok("application/octet-stream", other.blob.clone()),
    );
    let env = env(RegistryConfig::default());
    let err = env.store.pull(&format!("{}/app:v1", reg.host()), None).await.unwrap_err();
    eprintln!("{}", chain(&err));
    assert!(
        matches!(err, ImageError::DigestMismatch { ref digest, .. } if *digest == layer),
        "{err}"
    );
    env.assert_clean(&[&manifest, &config]);
}

#[tokio::test]
async fn layer_diff_id_mismatch_keeps_neither_blob_nor_layer() {
    let reg = FakeRegistry::start().await;
    // serve_image's config names a diff ID the layer does not have.
    let good = support::layer(&[("etc/hello", "hello")], support::Comp::Gzip);
    let (manifest, config, layer) = reg.serve_image("app", "v1", &good.blob, good.media_type);
    let env = env(RegistryConfig::default());
    let err = env.store.pull(&format!("{}/app:v1", reg.host()), None).await.unwrap_err();
    let text = chain(&err);
    eprintln!("{text}");
    assert!(matches!(err, ImageError::Unpack { ref digest, .. } if *digest == layer), "{err}");
    assert!(text.contains("layer digest mismatch"), "{text}");
    env.assert_clean(&[&manifest, &config]);
}

#[tokio::test]
async fn wrong_manifest_for_digest() {
    let reg = FakeRegistry::start().await;
    let (_, _, _) =
        reg.serve_image("app", "v1", b"layer", "application/vnd.oci.image.layer.v1.tar+gzip");
    let wrong = sha(b"something else");
    let Route::Ok(ct, body) = reg.routes.lock().unwrap()["/v2/app/manifests/v1"].clone() else {
        panic!()
    };
    reg.route(&format!("/v2/app/manifests/{wrong}"), Route::Ok(ct, body));
    let env = env(RegistryConfig::default());
    let err = env.store.pull(&format!("{}/app@{wrong}", reg.host()), None).await.unwrap_err();
    eprintln!("{}", chain(&err));
    assert_eq!(err.grpc_class(), ErrorClass::DataLoss, "{err}");
    env.assert_clean(&[]);
}

#[tokio::test]
async fn foreign_layer_is_refused() {
    let reg = FakeRegistry::start().await;
    let (manifest, ..) = reg.serve_image(
        "win",
        "v1",
        b"layer",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    );
    let env = env(RegistryConfig::default());
    let err = env.store.pull(&format!("{}/win:v1", reg.host()), None).await.unwrap_err();
    eprintln!("{}", chain(&err));
    assert!(matches!(err, ImageError::UnsupportedMediaType { .. }), "{err}");
    env.assert_clean(&[&manifest]);
    assert_eq!(reg.requests("/blobs/"), 0);
}

#[tokio::test]
async fn index_without_our_platform() {
    let reg = FakeRegistry::start().await;
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":10,"platform":{{"os":"linux","architecture":"mips"}}}}]}}"#,
        sha(b"m")
    );
    let index_digest = sha(index.as_bytes());
    reg.route(
        "/v2/multi/manifests/latest",
        Route::Ok("application/vnd.oci.image.index.v1+json", index.into_bytes()),
    );
    let env = env(RegistryConfig::default());
    let err = env.store.pull(&format!("{}/multi", reg.host()), None).await.unwrap_err();
    eprintln!("{}", chain(&err));
    match &err {
        ImageError::NoMatchingPlatform { available, .. } => assert_eq!(available, "linux/mips"),
        other => panic!("{other}"),
    }
    env.assert_clean(&[&index_digest]);
}

#[tokio::test]
async fn dead_mirror_falls_back_to_upstream_then_live_mirror_is_used() {
    let upstream = FakeRegistry::start().await;
    let mirror = FakeRegistry::start().await;
    // Neither has the image: the error comes from the upstream, after the mirrors.
    let registry = RegistryConfig {
        mirrors: BTreeMap::from([(
            upstream.host(),
            vec![
                format!("http://127.0.0.1:{}", closed_port()),
                format!("http://{}", mirror.host()),
            ],
        )]),
        insecure: vec![],
    };
    let env = env(registry);
    let reference = format!("{}/lib/app:v1", upstream.host());
    let err = env.store.pull(&reference, None).await.unwrap_err();
    eprintln!("{}", chain(&err));
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    assert_eq!(mirror.requests("/v2/lib/app/manifests/v1"), 1);
    assert_eq!(upstream.requests("/v2/lib/app/manifests/v1"), 1);
    // Now the mirror has it (with a corrupt config so the pull stops before unpacking):
    // the upstream is not asked again.
    let (_, config, _) =
        mirror.serve_image("lib/app", "v1", b"l", "application/vnd.oci.image.layer.v1.tar");
    mirror.route(&format!("/v2/lib/app/blobs/{config}"), Route::Ok("x", b"{}".to_vec()));
    let err = env.store.pull(&reference, None).await.unwrap_err();
    eprintln!("{}", chain(&err));
    assert!(
        matches!(err, ImageError::SizeMismatch { .. } | ImageError::DigestMismatch { .. }),
        "{err}"
    );
    assert_eq!(upstream.requests("/v2/lib/app/manifests/v1"), 1);
    assert_eq!(mirror.requests(&format!("/v2/lib/app/blobs/{config}")), 1);
}

#[tokio::test]
async fn concurrent_pulls_share_one_attempt() {
    let reg = FakeRegistry::start().await;
    reg.route(
        "/v2/slow/manifests/latest",
        Route::Delay(
            Duration::from_millis(300),
            Box::new(Route::Status(
                404,
                vec![],
                br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}"#.to_vec(),
            )),
        ),
    );
    let env = env(RegistryConfig::default());
    let reference = format!("{}/slow", reg.host());
    let tagged = format!("{reference}:latest");
    let (a, b, c) = tokio::join!(
        env.store.pull(&reference, None),
        env.store.pull(&tagged, None),
        env.store.pull(&reference, None),
    );
    for r in [a, b, c] {
        assert!(matches!(r, Err(ImageError::NotFound { .. })));
    }
    assert_eq!(reg.requests("/v2/slow/manifests/latest"), 1);
    // Once finished, a new pull asks again.
    let _ = env.store.pull(&reference, None).await;
    assert_eq!(reg.requests("/v2/slow/manifests/latest"), 2);
}
