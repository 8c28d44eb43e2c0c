//! ListPodSandbox, encoded: each pod's entry is encoded once and reused (see `encoded`).

use std::sync::Arc;

use berth_shim::Shim;
use k8s_cri::v1::{ListPodSandboxResponse, PodSandbox, PodSandboxFilter};

use crate::encoded::{Encoded, Prefab};
use crate::filters::{id_matches, labels_match};
use crate::{Runtime, SandboxEntry};

/// A pod's list entry without its state, encoded.
fn sandbox_prefab(e: &SandboxEntry) -> Prefab {
    let head = PodSandbox {
        id: e.meta.id.clone(),
        metadata: e.meta.config.metadata.clone(),
        ..Default::default()
    };
    let tail = PodSandbox {
        created_at: e.meta.created_at,
        labels: e.meta.config.labels.clone(),
        annotations: e.meta.config.annotations.clone(),
        runtime_handler: e.meta.runtime_handler.clone(),
        ..Default::default()
    };
    Prefab::new(&head, &tail)
}

impl<S: Shim + 'static> Runtime<S> {
    /// The pods `filter` selects, each with its CRI state: what ListPodSandbox lists.
    pub(crate) fn filtered_sandboxes(
        &self,
        filter: Option<&PodSandboxFilter>,
    ) -> Vec<(Arc<SandboxEntry>, i32)> {
        self.all_sandboxes()
            .into_iter()
            .filter_map(|e| {
                let state = e.status().state.to_cri() as i32;
                if let Some(f) = filter
                    && (!id_matches(&f.id, &e.meta.id)
                        || f.state.as_ref().is_some_and(|s| s.state != state)
                        || !labels_match(&f.label_selector, &e.meta.config.labels))
                {
                    return None;
                }
                Some((e, state))
            })
            .collect()
    }

    /// ListPodSandbox, encoded; the same entries and filters as [`Runtime::list_pod_sandbox`].
    pub fn list_pod_sandbox_encoded(
        &self,
        filter: Option<&PodSandboxFilter>,
    ) -> Encoded<ListPodSandboxResponse> {
        let listed = self.filtered_sandboxes(filter);
        let prefabs: Vec<_> = listed
            .iter()
            .map(|(e, state)| (e.listed.get_or_init(|| sandbox_prefab(e)), *state))
            .collect();
        Encoded::from_entries(&prefabs)
    }
}
