//! CRI gRPC clients over berthd's unix socket.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// A gRPC channel to the CRI socket at `socket`. The URI is a placeholder: every connection
/// goes to the unix socket.
pub async fn connect(socket: &Path) -> Result<Channel> {
    let socket: PathBuf = socket.to_path_buf();
    Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .context("connecting to the CRI socket")
}

/// An `ImageService` client on `socket`.
pub async fn image_client(socket: &Path) -> Result<ImageServiceClient<Channel>> {
    Ok(ImageServiceClient::new(connect(socket).await?))
}

/// A `RuntimeService` client on `socket`.
pub async fn runtime_client(socket: &Path) -> Result<RuntimeServiceClient<Channel>> {
    Ok(RuntimeServiceClient::new(connect(socket).await?))
}

/// Short forms of the ImageService calls the tests make over and over.
pub mod images {
    use k8s_cri::v1::image_service_client::ImageServiceClient;
    use k8s_cri::v1::{
        AuthConfig, Image, ImageFsInfoRequest, ImageFsInfoResponse, ImageStatusRequest,
        ImageStatusResponse, ListImagesRequest, PullImageRequest, RemoveImageRequest,
    };
    use tonic::Status;
    use tonic::transport::Channel;

    use crate::image_spec;

    /// The client type.
    pub type Client = ImageServiceClient<Channel>;

    /// PullImage; returns `image_ref`.
    pub async fn pull(c: &mut Client, image: &str) -> Result<String, Status> {
        pull_with_auth(c, image, None).await
    }

    /// PullImage with credentials.
    pub async fn pull_with_auth(
        c: &mut Client,
        image: &str,
        auth: Option<AuthConfig>,
    ) -> Result<String, Status> {
        let req = PullImageRequest { image: Some(image_spec(image)), auth, sandbox_config: None };
        Ok(c.pull_image(req).await?.into_inner().image_ref)
    }

    /// ImageStatus (not verbose): the image, or `None` if berthd does not know it.
    pub async fn status(c: &mut Client, image: &str) -> Result<Option<Image>, Status> {
        Ok(status_verbose(c, image, false).await?.image)
    }

    /// ImageStatus with `verbose`.
    pub async fn status_verbose(
        c: &mut Client,
        image: &str,
        verbose: bool,
    ) -> Result<ImageStatusResponse, Status> {
        let req = ImageStatusRequest { image: Some(image_spec(image)), verbose };
        Ok(c.image_status(req).await?.into_inner())
    }

    /// ListImages without filter.
    pub async fn list(c: &mut Client) -> Result<Vec<Image>, Status> {
        Ok(c.list_images(ListImagesRequest { filter: None }).await?.into_inner().images)
    }

    /// RemoveImage.
    pub async fn remove(c: &mut Client, image: &str) -> Result<(), Status> {
        c.remove_image(RemoveImageRequest { image: Some(image_spec(image)) }).await?;
        Ok(())
    }

    /// ImageFsInfo.
    pub async fn fs_info(c: &mut Client) -> Result<ImageFsInfoResponse, Status> {
        Ok(c.image_fs_info(ImageFsInfoRequest {}).await?.into_inner())
    }
}
