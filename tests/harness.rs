//! Checks of the test harness itself that need no berthd: the registry starts, every fixture
//! pushes, and what the registry then serves is what the fixtures say.

use berth_e2e::fixtures::{self, Malice};
use berth_e2e::http::HttpClient;
use berth_e2e::oci::{Format, sha256_digest};
use berth_e2e::registry::{AUTH_PASSWORD, AUTH_USER};
use berth_e2e::{Pushed, Registry};
use http::{Method, StatusCode};

async fn get_manifest(reg: &Registry, p: &Pushed, reference: &str) -> (String, bytes::Bytes) {
    let url = format!("{}/v2/{}/manifests/{reference}", reg.url(), p.repo);
    let accept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
        application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";
    let r = HttpClient::new()
        .send(Method::GET, &url, &[("accept", accept)], bytes::Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{url}: {}", r.text());
    (r.header("content-type").unwrap_or_default().to_string(), r.body)
}

async fn get_blob(reg: &Registry, p: &Pushed, digest: &str) -> bytes::Bytes {
    let url = format!("{}/v2/{}/blobs/{digest}", reg.url(), p.repo);
    let r = HttpClient::new().get(&url).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{url}: {}", r.text());
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_push_and_read_back() {
    let reg = Registry::start().await.unwrap();
    let pushed = vec![
        fixtures::push_busybox(&reg).await.unwrap(),
        fixtures::push_whiteouts(&reg).await.unwrap(),
        fixtures::push_zstd(&reg).await.unwrap(),
        fixtures::push_malicious(&reg, Malice::DotDot, "/tmp/x").await.unwrap(),
        fixtures::push_malicious(&reg, Malice::SymlinkWriteThrough, "/tmp/x").await.unwrap(),
        fixtures::push_malicious(&reg, Malice::HardlinkEscape, "/tmp/x").await.unwrap(),
    ];
    for p in &pushed {
        let (ct, body) = get_manifest(&reg, p, &p.tag).await;
        assert_eq!(ct, p.image.manifest.media_type);
        assert_eq!(sha256_digest(&body), p.digest);
        let (_, by_digest) = get_manifest(&reg, p, &p.digest).await;
        assert_eq!(body, by_digest);
        let cfg = get_blob(&reg, p, p.id()).await;
        assert_eq!(sha256_digest(&cfg), p.id());
        for l in &p.image.layers {
            assert_eq!(sha256_digest(&get_blob(&reg, p, &l.blob.digest).await), l.blob.digest);
        }
    }
    // Docker schema 2 manifest list and OCI index.
    for format in [Format::Docker, Format::Oci] {
        let reg = Registry::start().await.unwrap();
        let p = fixtures::push_multiarch(&reg, format).await.unwrap();
        let (ct, body) = get_manifest(&reg, &p, &p.tag).await;
        assert!(ct.contains("index") || ct.contains("list"), "{ct}");
        let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(index["manifests"][0]["platform"]["architecture"], "amd64");
        assert_eq!(index["manifests"][1]["platform"]["architecture"], "arm64");
        assert_eq!(index["manifests"][0]["digest"], p.image.manifest.digest.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_fixture_pushes() {
    let reg = Registry::start().await.unwrap();
    let p = fixtures::push_big(&reg).await.unwrap();
    let len = std::fs::metadata(reg.blob_data_path(&p.image.layers[0].blob.digest)).unwrap().len();
    assert!(len > fixtures::BIG_FILE_SIZE as u64, "{len}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_blob_is_served_with_wrong_content() {
    let reg = Registry::start().await.unwrap();
    let p = fixtures::push_tampered(&reg).await.unwrap();
    let layer = &p.image.layers[0].blob;
    let served = get_blob(&reg, &p, &layer.digest).await;
    assert_eq!(served.len(), layer.data.len());
    assert_ne!(sha256_digest(&served), layer.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_registry_wants_credentials() {
    let reg = Registry::start_with_auth().await.unwrap();
    let p = fixtures::push_busybox(&reg).await.unwrap();
    let url = format!("{}/v2/{}/manifests/{}", reg.url(), p.repo, p.tag);
    let r = HttpClient::new().get(&url).await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    use base64::Engine;
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{AUTH_USER}:{AUTH_PASSWORD}"))
    );
    let accept = p.image.manifest.media_type.clone();
    let r = HttpClient::new()
        .send(
            Method::GET,
            &url,
            &[("authorization", &auth), ("accept", &accept)],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_registry_refuses_connections() {
    let mut reg = Registry::start().await.unwrap();
    let url = format!("{}/v2/", reg.url());
    reg.stop();
    assert!(HttpClient::new().get(&url).await.is_err());
}
