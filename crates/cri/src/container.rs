//! Container RPCs: CreateContainer, StartContainer, StopContainer, RemoveContainer,
//! ContainerStatus, ListContainers, UpdateContainerResources, ReopenContainerLog, ExecSync,
//! ContainerStats, ListContainerStats, GetContainerEvents.

use k8s_cri::v1::*;
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;

use crate::error::{missing, runtime_status};
use crate::runtime_service::{EventStream, RuntimeApi};

/// Records the container id into the call's span.
fn record_container(id: &str) {
    tracing::Span::current().record("container_id", id);
}

fn require_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(missing("container_id"));
    }
    record_container(id);
    Ok(())
}

impl RuntimeApi {
    pub(crate) async fn do_create_container(
        &self,
        req: CreateContainerRequest,
    ) -> Result<CreateContainerResponse, Status> {
        tracing::Span::current().record("pod_id", req.pod_sandbox_id.as_str());
        let id = self.runtime().create_container(req).await.map_err(runtime_status)?;
        record_container(&id);
        Ok(CreateContainerResponse { container_id: id })
    }

    pub(crate) async fn do_start_container(
        &self,
        req: StartContainerRequest,
    ) -> Result<StartContainerResponse, Status> {
        require_id(&req.container_id)?;
        self.runtime().start_container(&req.container_id).await.map_err(runtime_status)?;
        Ok(StartContainerResponse {})
    }

    pub(crate) async fn do_stop_container(
        &self,
        req: StopContainerRequest,
    ) -> Result<StopContainerResponse, Status> {
        require_id(&req.container_id)?;
        self.runtime()
            .stop_container(&req.container_id, req.timeout)
            .await
            .map_err(runtime_status)?;
        Ok(StopContainerResponse {})
    }

    pub(crate) async fn do_remove_container(
        &self,
        req: RemoveContainerRequest,
    ) -> Result<RemoveContainerResponse, Status> {
        require_id(&req.container_id)?;
        self.runtime().remove_container(&req.container_id).await.map_err(runtime_status)?;
        Ok(RemoveContainerResponse {})
    }

    pub(crate) fn do_container_status(
        &self,
        req: ContainerStatusRequest,
    ) -> Result<ContainerStatusResponse, Status> {
        require_id(&req.container_id)?;
        self.runtime().container_status(&req.container_id, req.verbose).map_err(runtime_status)
    }

    pub(crate) fn do_list_containers(&self, req: ListContainersRequest) -> ListContainersResponse {
        ListContainersResponse { containers: self.runtime().list_containers(req.filter.as_ref()) }
    }

    pub(crate) async fn do_update_container_resources(
        &self,
        req: UpdateContainerResourcesRequest,
    ) -> Result<UpdateContainerResourcesResponse, Status> {
        require_id(&req.container_id)?;
        self.runtime()
            .update_container_resources(&req.container_id, req.linux)
            .await
            .map_err(runtime_status)?;
        Ok(UpdateContainerResourcesResponse {})
    }

    pub(crate) async fn do_reopen_container_log(
        &self,
        req: ReopenContainerLogRequest,
    ) -> Result<ReopenContainerLogResponse, Status> {
        require_id(&req.container_id)?;
        self.runtime().reopen_container_log(&req.container_id).await.map_err(runtime_status)?;
        Ok(ReopenContainerLogResponse {})
    }

    pub(crate) async fn do_exec_sync(
        &self,
        req: ExecSyncRequest,
    ) -> Result<ExecSyncResponse, Status> {
        require_id(&req.container_id)?;
        self.runtime()
            .exec_sync(&req.container_id, req.cmd, req.timeout)
            .await
            .map_err(runtime_status)
    }

    pub(crate) fn do_container_stats(
        &self,
        req: ContainerStatsRequest,
    ) -> Result<ContainerStatsResponse, Status> {
        require_id(&req.container_id)?;
        let stats = self.runtime().container_stats(&req.container_id).map_err(runtime_status)?;
        Ok(ContainerStatsResponse { stats: Some(stats) })
    }

    pub(crate) fn do_list_container_stats(
        &self,
        req: ListContainerStatsRequest,
    ) -> ListContainerStatsResponse {
        ListContainerStatsResponse {
            stats: self.runtime().list_container_stats(req.filter.as_ref()),
        }
    }

    pub(crate) fn do_get_container_events(&self) -> EventStream {
        let rx = self.runtime().subscribe_events();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((Ok(event), rx)),
                    // A slow client misses events rather than stalling the runtime.
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "container event subscriber lagged");
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        });
        Box::pin(stream)
    }
}
