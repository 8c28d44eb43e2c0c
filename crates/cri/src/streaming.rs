//! Exec, Attach, PortForward: validate, then hand out a URL on the streaming server.

use berth_stream::Request as StreamRequest;
use k8s_cri::v1::*;
use tonic::Status;

use crate::error::{error_chain, missing, runtime_status};
use crate::runtime_service::RuntimeApi;

impl RuntimeApi {
    fn stream_url(&self, request: StreamRequest) -> Result<String, Status> {
        let server = self
            .backends
            .stream
            .as_ref()
            .ok_or_else(|| Status::unimplemented("the streaming server is not running"))?;
        server.url_for(request).map_err(|e| Status::unavailable(error_chain(&e)))
    }

    pub(crate) fn do_exec(&self, r: ExecRequest) -> Result<ExecResponse, Status> {
        if r.container_id.is_empty() {
            return Err(missing("container_id"));
        }
        if r.cmd.is_empty() {
            return Err(missing("cmd"));
        }
        if !(r.stdin || r.stdout || r.stderr) {
            return Err(Status::invalid_argument("one of stdin, stdout and stderr must be set"));
        }
        if r.tty && r.stderr {
            return Err(Status::invalid_argument("tty and stderr cannot both be set"));
        }
        self.runtime().check_running(&r.container_id).map_err(runtime_status)?;
        Ok(ExecResponse { url: self.stream_url(StreamRequest::Exec(r))? })
    }

    pub(crate) fn do_attach(&self, r: AttachRequest) -> Result<AttachResponse, Status> {
        if r.container_id.is_empty() {
            return Err(missing("container_id"));
        }
        if !(r.stdin || r.stdout || r.stderr) {
            return Err(Status::invalid_argument("one of stdin, stdout and stderr must be set"));
        }
        let target = self.runtime().attach_target(&r.container_id).map_err(runtime_status)?;
        if r.stdin && !target.stdin {
            return Err(Status::invalid_argument(format!(
                "container {} was not created with stdin",
                r.container_id
            )));
        }
        Ok(AttachResponse { url: self.stream_url(StreamRequest::Attach(r))? })
    }

    pub(crate) fn do_port_forward(
        &self,
        r: PortForwardRequest,
    ) -> Result<PortForwardResponse, Status> {
        if r.pod_sandbox_id.is_empty() {
            return Err(missing("pod_sandbox_id"));
        }
        if let Some(bad) = r.port.iter().find(|&&p| !(1..=65535).contains(&p)) {
            return Err(Status::invalid_argument(format!("invalid port {bad}")));
        }
        self.runtime().pod_network(&r.pod_sandbox_id).map_err(runtime_status)?;
        Ok(PortForwardResponse { url: self.stream_url(StreamRequest::PortForward(r))? })
    }
}
