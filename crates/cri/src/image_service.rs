//! `ImageService`: PullImage, ListImages, ImageStatus, RemoveImage, ImageFsInfo.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use berth_image::{Credentials, Image};
use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::{
    AuthConfig, FilesystemIdentifier, FilesystemUsage, ImageFsInfoRequest, ImageFsInfoResponse,
    ImageSpec, ImageStatusRequest, ImageStatusResponse, Int64Value, ListImagesRequest,
    ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse, UInt64Value,
};
use tonic::{Request, Response, Status};

use crate::Backends;
use crate::error::{image_status, missing};

/// The CRI `ImageService` over berth's image store.
pub struct ImageApi {
    backends: Backends,
}

impl ImageApi {
    /// The service over `backends`.
    pub fn new(backends: Backends) -> Self {
        Self { backends }
    }
}

/// The image reference a request names, or InvalidArgument.
fn image_ref(spec: Option<&ImageSpec>) -> Result<&str, Status> {
    match spec.map(|s| s.image.trim()) {
        Some(image) if !image.is_empty() => Ok(image),
        _ => Err(missing("image.image")),
    }
}

/// Turns the kubelet's `AuthConfig` into registry credentials.
fn credentials(auth: Option<&AuthConfig>) -> Result<Option<Credentials>, Status> {
    let Some(auth) = auth else { return Ok(None) };
    if !auth.registry_token.is_empty() {
        return Ok(Some(Credentials::RegistryToken(auth.registry_token.clone())));
    }
    if !auth.identity_token.is_empty() {
        return Ok(Some(Credentials::IdentityToken(auth.identity_token.clone())));
    }
    if !auth.username.is_empty() || !auth.password.is_empty() {
        return Ok(Some(Credentials::Basic {
            username: auth.username.clone(),
            password: auth.password.clone(),
        }));
    }
    if !auth.auth.is_empty() {
        // `auth` is base64("user:password"), as in a Docker config.json.
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .map_err(|e| Status::invalid_argument(format!("auth.auth is not base64: {e}")))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| Status::invalid_argument("auth.auth is not UTF-8"))?;
        let Some((username, password)) = text.split_once(':') else {
            return Err(Status::invalid_argument("auth.auth must encode user:password"));
        };
        return Ok(Some(Credentials::Basic {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    Ok(None)
}

/// The CRI view of an image, as containerd reports it.
pub(crate) fn cri_image(image: &Image) -> k8s_cri::v1::Image {
    // USER "1000" or "1000:1000" gives a uid; a name gives a username.
    let user = image.user.as_deref().unwrap_or("");
    let user_part = user.split(':').next().unwrap_or("");
    let (uid, username) = match user_part.parse::<i64>() {
        Ok(uid) => (Some(Int64Value { value: uid }), String::new()),
        Err(_) if user_part.is_empty() => (None, String::new()),
        Err(_) => (None, user_part.to_string()),
    };
    k8s_cri::v1::Image {
        id: image.id.clone(),
        repo_tags: image.repo_tags.clone(),
        repo_digests: image.repo_digests.clone(),
        size: image.size,
        uid,
        username,
        spec: Some(ImageSpec { image: image.id.clone(), ..Default::default() }),
        pinned: image.pinned,
    }
}

/// `ImageStatus`' verbose info: the image config and where its rootfs comes from.
fn verbose_info(image: &Image) -> HashMap<String, String> {
    let config: serde_json::Value =
        serde_json::from_str(&image.config_json).unwrap_or(serde_json::Value::Null);
    let info = serde_json::json!({
        "id": image.id,
        "chainID": image.chain_id,
        "imageSpec": config,
    });
    HashMap::from([("info".to_string(), info.to_string())])
}

fn now_nanos() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

#[tonic::async_trait]
impl ImageService for ImageApi {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let filter = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.is_empty());
        let images = match filter {
            Some(reference) => {
                self.backends.images.get(&reference).map(|i| i.into_iter().collect())
            }
            None => self.backends.images.list(),
        }
        .map_err(image_status)?;
        Ok(Response::new(ListImagesResponse { images: images.iter().map(cri_image).collect() }))
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let reference = image_ref(request.image.as_ref())?;
        let image = self.backends.images.get(reference).map_err(image_status)?;
        let info = match (&image, request.verbose) {
            (Some(image), true) => verbose_info(image),
            _ => HashMap::new(),
        };
        Ok(Response::new(ImageStatusResponse { image: image.as_ref().map(cri_image), info }))
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let request = request.into_inner();
        let reference = image_ref(request.image.as_ref())?;
        let credentials = credentials(request.auth.as_ref())?;
        let (image, stats) = self
            .backends
            .images
            .pull_with_stats(reference, credentials)
            .await
            .map_err(image_status)?;
        // A caller that joined another's pull downloaded nothing itself.
        if !stats.joined {
            let metrics = berth_metrics::metrics();
            metrics.pull_bytes.inc_by(stats.bytes_downloaded);
            metrics.pull_duration.observe(stats.duration.as_secs_f64());
        }
        Ok(Response::new(PullImageResponse { image_ref: image.id }))
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let request = request.into_inner();
        let reference = image_ref(request.image.as_ref())?;
        // Removing an image that is already gone succeeds, as the CRI asks.
        self.backends.images.remove(reference).map_err(image_status)?;
        Ok(Response::new(RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        let images = self.backends.images.clone();
        let usage = tokio::task::spawn_blocking(move || images.fs_usage())
            .await
            .map_err(|e| Status::internal(format!("image fs usage task failed: {e}")))?
            .map_err(image_status)?;
        let fs = FilesystemUsage {
            timestamp: now_nanos(),
            fs_id: Some(FilesystemIdentifier {
                mountpoint: usage.mountpoint.to_string_lossy().into_owned(),
            }),
            used_bytes: Some(UInt64Value { value: usage.bytes }),
            inodes_used: Some(UInt64Value { value: usage.inodes }),
        };
        Ok(Response::new(ImageFsInfoResponse {
            image_filesystems: vec![fs.clone()],
            container_filesystems: vec![fs],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_field_decodes_to_basic() {
        let auth = AuthConfig { auth: "dXNlcjpwYXNz".into(), ..Default::default() };
        assert_eq!(
            credentials(Some(&auth)).ok().flatten(),
            Some(Credentials::Basic { username: "user".into(), password: "pass".into() })
        );
    }

    #[test]
    fn bad_auth_field_is_invalid_argument() {
        let auth = AuthConfig { auth: "%%%".into(), ..Default::default() };
        assert_eq!(
            credentials(Some(&auth)).err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
    }

    #[test]
    fn numeric_user_reports_uid_and_named_user_reports_username() {
        let mut image = Image {
            id: "sha256:aa".into(),
            repo_tags: vec![],
            repo_digests: vec![],
            size: 1,
            config_json: "{}".into(),
            diff_ids: vec![],
            chain_id: String::new(),
            user: Some("1000:1000".into()),
            pinned: false,
        };
        assert_eq!(cri_image(&image).uid, Some(Int64Value { value: 1000 }));
        image.user = Some("nobody".into());
        let cri = cri_image(&image);
        assert_eq!((cri.uid, cri.username.as_str()), (None, "nobody"));
    }
}
