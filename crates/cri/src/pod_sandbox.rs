//! Pod sandbox RPCs: RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus,
//! ListPodSandbox, PodSandboxStats, ListPodSandboxStats.

use k8s_cri::v1::*;
use tonic::Status;

use crate::error::{missing, runtime_status};
use crate::runtime_service::RuntimeApi;

/// Records the pod id into the call's span.
fn record_pod(id: &str) {
    tracing::Span::current().record("pod_id", id);
}

impl RuntimeApi {
    pub(crate) async fn do_run_pod_sandbox(
        &self,
        req: RunPodSandboxRequest,
    ) -> Result<RunPodSandboxResponse, Status> {
        let id = self.runtime().run_pod_sandbox(req).await.map_err(runtime_status)?;
        record_pod(&id);
        Ok(RunPodSandboxResponse { pod_sandbox_id: id })
    }

    pub(crate) async fn do_stop_pod_sandbox(
        &self,
        req: StopPodSandboxRequest,
    ) -> Result<StopPodSandboxResponse, Status> {
        if req.pod_sandbox_id.is_empty() {
            return Err(missing("pod_sandbox_id"));
        }
        record_pod(&req.pod_sandbox_id);
        self.runtime().stop_pod_sandbox(&req.pod_sandbox_id).await.map_err(runtime_status)?;
        Ok(StopPodSandboxResponse {})
    }

    pub(crate) async fn do_remove_pod_sandbox(
        &self,
        req: RemovePodSandboxRequest,
    ) -> Result<RemovePodSandboxResponse, Status> {
        if req.pod_sandbox_id.is_empty() {
            return Err(missing("pod_sandbox_id"));
        }
        record_pod(&req.pod_sandbox_id);
        self.runtime().remove_pod_sandbox(&req.pod_sandbox_id).await.map_err(runtime_status)?;
        Ok(RemovePodSandboxResponse {})
    }

    pub(crate) fn do_pod_sandbox_status(
        &self,
        req: PodSandboxStatusRequest,
    ) -> Result<PodSandboxStatusResponse, Status> {
        if req.pod_sandbox_id.is_empty() {
            return Err(missing("pod_sandbox_id"));
        }
        record_pod(&req.pod_sandbox_id);
        self.runtime().pod_sandbox_status(&req.pod_sandbox_id, req.verbose).map_err(runtime_status)
    }

    pub(crate) fn do_list_pod_sandbox(&self, req: ListPodSandboxRequest) -> ListPodSandboxResponse {
        ListPodSandboxResponse { items: self.runtime().list_pod_sandbox(req.filter.as_ref()) }
    }

    pub(crate) fn do_pod_sandbox_stats(
        &self,
        req: PodSandboxStatsRequest,
    ) -> Result<PodSandboxStatsResponse, Status> {
        if req.pod_sandbox_id.is_empty() {
            return Err(missing("pod_sandbox_id"));
        }
        record_pod(&req.pod_sandbox_id);
        let stats =
            self.runtime().pod_sandbox_stats(&req.pod_sandbox_id).map_err(runtime_status)?;
        Ok(PodSandboxStatsResponse { stats: Some(stats) })
    }

    pub(crate) fn do_list_pod_sandbox_stats(
        &self,
        req: ListPodSandboxStatsRequest,
    ) -> ListPodSandboxStatsResponse {
        ListPodSandboxStatsResponse {
            stats: self.runtime().list_pod_sandbox_stats(req.filter.as_ref()),
        }
    }
}
