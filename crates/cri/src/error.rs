//! The one place where domain errors become gRPC status codes.

use berth_image::{ErrorClass, ImageError};
use tonic::{Code, Status};

/// Maps an image error to the status the kubelet expects (containerd's codes).
pub(crate) fn image_status(err: ImageError) -> Status {
    let code = match err.grpc_class() {
        ErrorClass::InvalidArgument => Code::InvalidArgument,
        ErrorClass::NotFound => Code::NotFound,
        ErrorClass::Unauthenticated => Code::Unauthenticated,
        ErrorClass::Unavailable => Code::Unavailable,
        ErrorClass::DataLoss => Code::DataLoss,
        ErrorClass::FailedPrecondition => Code::FailedPrecondition,
        ErrorClass::Internal => Code::Internal,
    };
    Status::new(code, error_chain(&err))
}

/// The error and its sources, so the message names the root cause too.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// A request field the kubelet must send was missing or empty.
pub(crate) fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}

/// Maps a runtime error to the status the kubelet expects (containerd's codes).
pub(crate) fn runtime_status(err: berth_runtime::RuntimeError) -> Status {
    use berth_runtime::ErrorClass;
    let code = match err.class() {
        ErrorClass::InvalidArgument => Code::InvalidArgument,
        ErrorClass::NotFound => Code::NotFound,
        ErrorClass::AlreadyExists => Code::AlreadyExists,
        ErrorClass::FailedPrecondition => Code::FailedPrecondition,
        ErrorClass::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorClass::Unimplemented => Code::Unimplemented,
        ErrorClass::ResourceExhausted => Code::ResourceExhausted,
        ErrorClass::Unknown => Code::Unknown,
        ErrorClass::Internal => Code::Internal,
    };
    Status::new(code, error_chain(&err))
}
