//! berth-cri: the CRI v1 gRPC services (`RuntimeService`, `ImageService`) that the kubelet and
//! crictl talk to. This crate only translates: it validates requests, maps CRI messages to the
//! domain crates (`berth-image`, `berth-runtime`) and maps their errors to gRPC status codes.
//! Cross-cutting work (tracing spans, metrics, the readiness gate) happens once, in
//! [`instrument::InstrumentLayer`], not in each handler. The two list calls send the bytes the
//! runtime keeps encoded per entry ([`RuntimeServer`]).

// No unsafe code in this crate.
#![deny(unsafe_code)]

mod container;
mod encoded_body;
mod error;
mod image_service;
pub mod instrument;
mod pod_sandbox;
mod runtime_server;
mod runtime_service;
mod streaming;

use std::sync::Arc;

use berth_image::ImageStore;
use k8s_cri::v1::image_service_server::ImageServiceServer;

pub use image_service::ImageApi;
pub use runtime_server::RuntimeServer;
pub use runtime_service::RuntimeApi;

/// The name berth reports in `Version`.
pub const RUNTIME_NAME: &str = "berth";
/// The CRI API version berth speaks.
pub const CRI_API_VERSION: &str = "v1";

/// The domain objects the CRI services are built on.
#[derive(Clone)]
pub struct Backends {
    /// Images: pull, list, remove.
    pub images: Arc<ImageStore>,
    /// Pod sandboxes and containers.
    pub runtime: Arc<berth_runtime::Runtime>,
    /// The streaming server Exec and PortForward hand out URLs on (`None`: those calls
    /// answer `Unimplemented`).
    pub stream: Option<Arc<berth_stream::StreamServer>>,
}

/// Both CRI gRPC services, ready to add to a tonic server.
pub fn services(backends: Backends) -> (RuntimeServer, ImageServiceServer<ImageApi>) {
    (
        RuntimeServer::new(RuntimeApi::new(backends.clone())),
        ImageServiceServer::new(ImageApi::new(backends)),
    )
}
