//! Name reservation: one pod (or container) per name, as the kubelet relies on. A name is
//! reserved before anything is created and released when the object is removed (or its
//! creation fails).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use k8s_cri::v1::{ContainerMetadata, PodSandboxMetadata};

/// The reserved name of a pod: `<name>_<namespace>_<uid>_<attempt>`.
pub fn sandbox_name(m: &PodSandboxMetadata) -> String {
    format!("{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt)
}

/// The reserved name of a container: `<name>_<pod name>_<namespace>_<uid>_<attempt>`.
pub fn container_name(c: &ContainerMetadata, pod: &PodSandboxMetadata) -> String {
    format!("{}_{}_{}_{}_{}", c.name, pod.name, pod.namespace, pod.uid, c.attempt)
}

/// Reserved names and their holders.
#[derive(Debug, Default)]
pub(crate) struct Names {
    held: Mutex<HashMap<String, String>>,
    /// Objects whose create finished after its caller had given up (the kubelet's deadline
    /// passed): name -> id. The caller's retry is handed the finished object instead of
    /// "name is reserved" (CRI-O's resource store); one retry claims it.
    unclaimed: Mutex<HashMap<String, String>>,
}

impl Names {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // Each critical section is one map operation: a panic cannot tear the map.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves `name` for `id`; `Err(holder)` if someone else holds it.
    pub(crate) fn reserve(&self, name: &str, id: &str) -> Result<(), String> {
        let mut held = self.lock();
        match held.get(name) {
            Some(holder) if holder != id => Err(holder.clone()),
            _ => {
                held.insert(name.to_owned(), id.to_owned());
                Ok(())
            }
        }
    }

    /// Releases `name` if `id` holds it.
    pub(crate) fn release(&self, name: &str, id: &str) {
        let mut held = self.lock();
        if held.get(name).is_some_and(|h| h == id) {
            held.remove(name);
        }
        drop(held);
        self.unclaimed_lock().remove(name);
    }

    fn unclaimed_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.unclaimed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that the create of `id` under `name` finished; it stays unclaimed until the
    /// caller that asked for it takes the answer ([`Names::delivered`]).
    pub(crate) fn finished(&self, name: &str, id: &str) {
        self.unclaimed_lock().insert(name.to_owned(), id.to_owned());
    }

    /// The caller of the create received its answer: nothing is left to hand out.
    pub(crate) fn delivered(&self, name: &str, id: &str) {
        let mut unclaimed = self.unclaimed_lock();
        if unclaimed.get(name).is_some_and(|h| h == id) {
            unclaimed.remove(name);
        }
    }

    /// Guards the reservation of `name` by `id` for the create running in the background:
    /// unless [`PendingCreate::finish`] is called, the name is released when the guard is
    /// dropped, whether the create failed, panicked, or its caller had already gone (the
    /// kubelet's deadline passed), so a failed create never keeps a name from the retry.
    pub(crate) fn pending<'a>(&'a self, name: &str, id: &str) -> PendingCreate<'a> {
        PendingCreate { names: self, name: name.to_owned(), id: id.to_owned(), done: false }
    }

    /// Hands a retry the object whose create finished after its caller gave up, if `holder`
    /// (the current holder of `name`) is one.
    pub(crate) fn claim(&self, name: &str, holder: &str) -> bool {
        let mut unclaimed = self.unclaimed_lock();
        if unclaimed.get(name).is_some_and(|h| h == holder) {
            unclaimed.remove(name);
            return true;
        }
        false
    }
}

/// See [`Names::pending`].
pub(crate) struct PendingCreate<'a> {
    names: &'a Names,
    name: String,
    id: String,
    done: bool,
}

impl PendingCreate<'_> {
    /// The create succeeded: the name stays held (the retry finds the object by other
    /// means, as CreateContainer does by comparing configs).
    pub(crate) fn keep(mut self) {
        self.done = true;
    }

    /// The create succeeded: the name stays held, and the object waits, unclaimed, for the
    /// caller (or its retry) to take it.
    pub(crate) fn finish(mut self) {
        self.done = true;
        self.names.finished(&self.name, &self.id);
    }
}

impl Drop for PendingCreate<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.names.release(&self.name, &self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_create_nobody_received_is_claimed_once() {
        let names = Names::default();
        names.reserve("pod", "a").expect("free");
        names.finished("pod", "a");
        assert!(names.claim("pod", "a"));
        assert!(!names.claim("pod", "a"));
        names.finished("pod", "a");
        names.delivered("pod", "a");
        assert!(!names.claim("pod", "a"));
    }

    #[test]
    fn a_failed_or_panicked_create_releases_its_name() {
        let names = Names::default();
        names.reserve("pod", "a").expect("free");
        drop(names.pending("pod", "a"));
        names.reserve("pod", "b").expect("released after the failure");
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _guard = names.pending("pod", "b");
            panic!("create panicked");
        }));
        assert!(unwound.is_err());
        names.reserve("pod", "c").expect("released after the panic");
        names.pending("pod", "c").finish();
        assert_eq!(names.reserve("pod", "d"), Err("c".to_string()));
        assert!(names.claim("pod", "c"));
    }

    #[test]
    fn reserve_and_release() {
        let names = Names::default();
        names.reserve("a", "1").expect("free");
        names.reserve("a", "1").expect("same holder again");
        assert_eq!(names.reserve("a", "2"), Err("1".to_string()));
        names.release("a", "2");
        assert_eq!(names.reserve("a", "2"), Err("1".to_string()));
        names.release("a", "1");
        names.reserve("a", "2").expect("released");
    }

    #[test]
    fn name_formats() {
        let pod = PodSandboxMetadata {
            name: "web".into(),
            uid: "u1".into(),
            namespace: "default".into(),
            attempt: 3,
        };
        assert_eq!(sandbox_name(&pod), "web_default_u1_3");
        let c = ContainerMetadata { name: "app".into(), attempt: 1 };
        assert_eq!(container_name(&c, &pod), "app_web_default_u1_1");
    }
}
