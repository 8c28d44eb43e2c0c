//! The `RuntimeService` gRPC server: the generated one, except that ListContainers and
//! ListPodSandbox answer with bytes the runtime keeps encoded per container and pod, sent
//! as they are ([`EncodedBody`]), so a list of a thousand containers is one copy rather than
//! building and encoding a thousand messages. Both still pass the instrumentation layer
//! like every call.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use berth_runtime::{Encoded, ListLayout};
use bytes::Bytes;
use k8s_cri::v1::runtime_service_server::{RuntimeServiceServer, SERVICE_NAME};
use k8s_cri::v1::{ListContainersRequest, ListPodSandboxRequest};
use tonic::Status;
use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::codegen::{BoxFuture, StdError};
use tonic::metadata::GRPC_CONTENT_TYPE;
use tonic::server::NamedService;
use tonic_prost::ProstDecoder;
use tower::Service;

use crate::encoded_body::{EncodedBody, message_bytes};
use crate::runtime_service::RuntimeApi;

const LIST_CONTAINERS: &str = "/runtime.v1.RuntimeService/ListContainers";
const LIST_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/ListPodSandbox";
/// The request header naming a compression.
const GRPC_ENCODING: &str = "grpc-encoding";

/// The CRI `RuntimeService`, ready to add to a tonic server.
#[derive(Clone)]
pub struct RuntimeServer {
    api: Arc<RuntimeApi>,
    generated: RuntimeServiceServer<RuntimeApi>,
}

impl RuntimeServer {
    /// The server over `api`.
    pub fn new(api: RuntimeApi) -> Self {
        let api = Arc::new(api);
        Self { generated: RuntimeServiceServer::from_arc(api.clone()), api }
    }
}

impl NamedService for RuntimeServer {
    const NAME: &'static str = SERVICE_NAME;
}

/// Serves `request` with `list`, sending the list's bytes as they are. The request side is
/// what tonic's `Grpc::unary` does; the response side skips tonic's encoder, which would
/// copy the whole message into a buffer of its own.
fn serve_encoded<B, Req, Resp>(
    api: Arc<RuntimeApi>,
    list: fn(&RuntimeApi, Req) -> Encoded<Resp>,
    request: http::Request<B>,
) -> BoxFuture<http::Response<Body>, Infallible>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
    Req: prost::Message + Default + Send + 'static,
    Resp: ListLayout + prost::Message + Default + Send + 'static,
{
    Box::pin(async move {
        let response = match read_request::<B, Req>(request).await {
            Ok(req) => respond(message_bytes(list(&api, req))),
            Err(status) => status.into_http(),
        };
        Ok(response)
    })
}

/// The one request message of a unary call.
async fn read_request<B, Req>(request: http::Request<B>) -> Result<Req, Status>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
    Req: prost::Message + Default + Send + 'static,
{
    // berthd compresses nothing and accepts nothing compressed, as tonic's own services.
    if let Some(encoding) = request.headers().get(GRPC_ENCODING)
        && encoding != "identity"
    {
        return Err(Status::unimplemented(format!(
            "Content is compressed with `{}` which isn't supported",
            encoding.to_str().unwrap_or("?")
        )));
    }
    let mut stream =
        Streaming::new_request(ProstDecoder::<Req>::default(), request.into_body(), None, None);
    stream.message().await?.ok_or_else(|| Status::internal("Missing request message."))
}

/// The response carrying `message`.
fn respond(message: Bytes) -> http::Response<Body> {
    match EncodedBody::new(message) {
        Ok(body) => {
            let mut response = http::Response::new(Body::new(body));
            response.headers_mut().insert(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
            response
        }
        Err(e) => Status::internal(e.to_string()).into_http(),
    }
}

impl<B> Service<http::Request<B>> for RuntimeServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match request.uri().path() {
            LIST_CONTAINERS => serve_encoded(
                self.api.clone(),
                |api, req: ListContainersRequest| {
                    api.runtime().list_containers_encoded(req.filter.as_ref())
                },
                request,
            ),
            LIST_POD_SANDBOX => serve_encoded(
                self.api.clone(),
                |api, req: ListPodSandboxRequest| {
                    api.runtime().list_pod_sandbox_encoded(req.filter.as_ref())
                },
                request,
            ),
            _ => self.generated.call(request),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_cri::v1::{ListContainersResponse, ListPodSandboxResponse};

    use super::*;

    #[test]
    fn paths_match_the_generated_service() {
        assert_eq!(LIST_CONTAINERS, format!("/{SERVICE_NAME}/ListContainers"));
        assert_eq!(LIST_POD_SANDBOX, format!("/{SERVICE_NAME}/ListPodSandbox"));
    }

    /// The response types the lists are encoded as are the ones the generated client decodes.
    #[test]
    fn layouts_name_the_response_types() {
        fn layout<T: ListLayout>() -> (u32, u32) {
            (T::ENTRIES, T::STATE)
        }
        assert_eq!(layout::<ListContainersResponse>(), (1, 6));
        assert_eq!(layout::<ListPodSandboxResponse>(), (1, 3));
    }

    /// A gRPC request carrying `message`, its frame's compression flag `flag`.
    fn grpc_request(
        message: &impl prost::Message,
        flag: u8,
    ) -> http::Request<http_body_util::Full<Bytes>> {
        let payload = message.encode_to_vec();
        let mut frame = vec![flag];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        http::Request::post(LIST_CONTAINERS)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(http_body_util::Full::new(Bytes::from(frame)))
            .unwrap()
    }

    fn filtered() -> ListContainersRequest {
        ListContainersRequest {
            filter: Some(k8s_cri::v1::ContainerFilter {
                id: "abc".into(),
                label_selector: [("app".to_string(), "web".to_string())].into(),
                ..Default::default()
            }),
        }
    }

    #[tokio::test]
    async fn reads_the_request_message() {
        let got: ListContainersRequest = read_request(grpc_request(&filtered(), 0)).await.unwrap();
        assert_eq!(got, filtered());
        let empty = ListContainersRequest::default();
        let got: ListContainersRequest = read_request(grpc_request(&empty, 0)).await.unwrap();
        assert_eq!(got, empty);
    }

    #[tokio::test]
    async fn refuses_compressed_requests() {
        let mut request = grpc_request(&filtered(), 1);
        request.headers_mut().insert(GRPC_ENCODING, http::HeaderValue::from_static("gzip"));
        let err = read_request::<_, ListContainersRequest>(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        // A compressed frame without a grpc-encoding is a protocol error.
        let err = read_request::<_, ListContainersRequest>(grpc_request(&filtered(), 1))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
    }

    #[test]
    fn responds_with_grpc_content_type() {
        let response = respond(Bytes::from_static(b"\x0a\x00"));
        assert_eq!(response.headers().get(http::header::CONTENT_TYPE).unwrap(), "application/grpc");
        assert!(response.headers().get("grpc-status").is_none(), "status comes in trailers");
    }
}
