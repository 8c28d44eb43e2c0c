//! Tells image garbage collection which layer snapshots containers still build on.

use std::sync::{Arc, Weak};

use berth_image::SnapshotUsers;
use berth_shim::Shim;

use crate::Runtime;

struct Users<S: Shim> {
    runtime: Weak<Runtime<S>>,
}

impl<S: Shim + 'static> SnapshotUsers for Users<S> {
    fn in_use(&self, chain_id: &str) -> bool {
        let Some(rt) = self.runtime.upgrade() else { return false };
        rt.all_containers().iter().any(|c| {
            // Walk from the container's top layer down through its parents.
            let mut next = Some(c.meta.chain_id.clone()).filter(|s| !s.is_empty());
            let mut depth = 0;
            while let Some(chain) = next {
                if chain == chain_id {
                    return true;
                }
                depth += 1;
                if depth > 1024 {
                    break; // a cycle would be corruption; don't loop forever
                }
                next = rt.snapshots.parent(&chain).ok().flatten();
            }
            false
        })
    }
}

impl<S: Shim + 'static> Runtime<S> {
    /// The [`SnapshotUsers`] to hand to `ImageStore::set_snapshot_users`.
    pub fn snapshot_users(self: &Arc<Self>) -> Arc<dyn SnapshotUsers> {
        Arc::new(Users { runtime: Arc::downgrade(self) })
    }
}
