//! The pods whose network is being torn down in the background, so that a second teardown
//! returns at once, address allocation can wait for addresses about to come free, and
//! berthd's shutdown can wait for the work to finish.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// The set of pods with a background teardown under way. Clones share the set.
#[derive(Default, Clone)]
pub(crate) struct Releasing {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    pods: Mutex<HashSet<String>>,
    /// Signalled whenever a pod leaves the set.
    done: Notify,
}

impl Inner {
    fn pods(&self) -> MutexGuard<'_, HashSet<String>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A pod's place in the set; dropping it (task finished, failed or was cancelled) takes
/// the pod out.
pub(crate) struct Ticket {
    inner: Arc<Inner>,
    pod_id: String,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.inner.pods().remove(&self.pod_id);
        self.inner.done.notify_waiters();
    }
}

impl Releasing {
    /// Puts `pod_id` in the set until the returned ticket is dropped.
    pub(crate) fn start(&self, pod_id: &str) -> Ticket {
        self.inner.pods().insert(pod_id.to_owned());
        Ticket { inner: self.inner.clone(), pod_id: pod_id.to_owned() }
    }

    /// Whether a teardown of `pod_id` is under way.
    pub(crate) fn contains(&self, pod_id: &str) -> bool {
        self.inner.pods().contains(pod_id)
    }

    /// Whether no teardown is under way.
    pub(crate) fn is_empty(&self) -> bool {
        self.inner.pods().is_empty()
    }

    /// Waits until the set is empty.
    pub(crate) async fn settled(&self) {
        loop {
            // Registered before the check, so a ticket dropped in between still wakes us.
            let notified = self.inner.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn tickets_track_pods_and_settled_waits_for_the_last() {
        let r = Releasing::default();
        r.settled().await; // empty: returns at once
        let a = r.start("a");
        let b = r.start("b");
        assert!(r.contains("a") && r.contains("b") && !r.contains("c"));
        drop(a);
        assert!(!r.contains("a") && !r.is_empty());
        let waiter = async {
            r.settled().await;
            true
        };
        let dropper = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(b);
            false
        };
        let (settled, _) = tokio::join!(waiter, dropper);
        assert!(settled && r.is_empty());
    }
}
