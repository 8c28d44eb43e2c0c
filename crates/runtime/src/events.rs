//! Container lifecycle events for `GetContainerEvents`: one broadcast channel; slow
//! subscribers lose the oldest events rather than slowing the runtime down.

use k8s_cri::v1::ContainerEventResponse;
use tokio::sync::broadcast;

/// Capacity of the event channel.
const CAPACITY: usize = 1024;

/// The event hub.
#[derive(Debug)]
pub(crate) struct Events {
    tx: broadcast::Sender<ContainerEventResponse>,
}

impl Events {
    pub(crate) fn new() -> Self {
        Self { tx: broadcast::channel(CAPACITY).0 }
    }

    /// Publishes `event` to current subscribers (none is fine).
    pub(crate) fn publish(&self, event: ContainerEventResponse) {
        let _ = self.tx.send(event);
    }

    /// Whether anyone listens (events are not built otherwise).
    pub(crate) fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// A new subscription.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ContainerEventResponse> {
        self.tx.subscribe()
    }
}
