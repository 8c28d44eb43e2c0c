//! The undo journal of a create (RunPodSandbox, CreateContainer), in the shape of CRI-O's
//! `resourcecleaner.go` and containerd's `sandbox_run.go`: each step that acquires something
//! registers its undo right away ([`Journal::push`]); a create that succeeds disarms them
//! ([`Journal::commit`]); one that fails runs them newest-first ([`Journal::rollback`]).
//!
//! An undo that fails is logged and does not stop the others. What it left behind has no
//! record (records are written last on create), so it is the startup repair's to finish
//! (`repair.rs` removes every pod directory, bundle, writable layer, pin and cgroup no
//! record owns); [`Rollback::left_for_repair`] says what that is, for the log and tests.

use std::future::Future;
use std::pin::Pin;

use crate::error::Result;

/// An undo: run once, on rollback.
type Undo<'a> =
    Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> + Send + 'a>;

/// The undos of one create, newest last.
pub(crate) struct Journal<'a> {
    /// The object being created (pod or container id), for the log.
    object: String,
    steps: Vec<(String, Undo<'a>)>,
}

/// What a rollback did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Rollback {
    /// Undos that ran and succeeded, newest first.
    pub(crate) undone: Vec<String>,
    /// Undos that failed, newest first: what they should have freed waits for the repair.
    pub(crate) left_for_repair: Vec<String>,
}

impl<'a> Journal<'a> {
    /// An empty journal for the object `object`.
    pub(crate) fn new(object: impl Into<String>) -> Self {
        Self { object: object.into(), steps: Vec::new() }
    }

    /// Registers the undo of a step that acquired something (`description` names what).
    pub(crate) fn push<F, Fut>(&mut self, description: impl Into<String>, undo: F)
    where
        F: FnOnce() -> Fut + Send + 'a,
        Fut: Future<Output = Result<()>> + Send + 'a,
    {
        self.steps.push((description.into(), Box::new(move || Box::pin(undo()))));
    }

    /// Registers an undo that cannot fail (or whose failure it logs itself).
    pub(crate) fn push_infallible<F>(&mut self, description: impl Into<String>, undo: F)
    where
        F: FnOnce() + Send + 'a,
    {
        self.push(description, move || {
            undo();
            std::future::ready(Ok(()))
        });
    }

    /// Moves `other`'s undos after this one's (they are undone first), e.g. those of a
    /// step that ran concurrently with its own journal.
    pub(crate) fn append(&mut self, mut other: Journal<'a>) {
        self.steps.append(&mut other.steps);
    }

    /// The create succeeded: nothing is undone.
    pub(crate) fn commit(mut self) {
        self.steps.clear();
    }

    /// The create failed: runs every undo, newest first, each one even if another failed.
    pub(crate) async fn rollback(mut self) -> Rollback {
        let mut report = Rollback::default();
        while let Some((description, undo)) = self.steps.pop() {
            match undo().await {
                Ok(()) => report.undone.push(description),
                Err(e) => {
                    tracing::error!(
                        object = %self.object,
                        step = %description,
                        error = %e,
                        "undo failed: left for the startup repair"
                    );
                    report.left_for_repair.push(description);
                }
            }
        }
        report
    }
}

impl Drop for Journal<'_> {
    /// Neither committed nor rolled back (a panic in the create): the undos cannot run
    /// here (they are async); what they would have freed has no record, so the startup
    /// repair removes it.
    fn drop(&mut self) {
        if !self.steps.is_empty() {
            let steps: Vec<&str> = self.steps.iter().map(|(d, _)| d.as_str()).collect();
            tracing::error!(object = %self.object, ?steps, "create abandoned: left for the startup repair");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::error::RuntimeError;

    fn recorder() -> (Arc<Mutex<Vec<&'static str>>>, impl Fn(&'static str) + Clone) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        (log, move |s| l.lock().expect("lock").push(s))
    }

    #[tokio::test]
    async fn rollback_runs_newest_first_and_goes_on_after_a_failure() {
        let (log, rec) = recorder();
        let mut j = Journal::new("pod-1");
        let r = rec.clone();
        j.push_infallible("directory", move || r("directory"));
        let r = rec.clone();
        j.push("pins", move || async move {
            r("pins");
            Err(RuntimeError::Missing("pins"))
        });
        let mut side = Journal::new("pod-1");
        let r = rec.clone();
        side.push_infallible("shm", move || r("shm"));
        j.append(side);
        let report = j.rollback().await;
        assert_eq!(*log.lock().expect("lock"), ["shm", "pins", "directory"]);
        assert_eq!(report.undone, ["shm", "directory"]);
        assert_eq!(report.left_for_repair, ["pins"]);
    }

    #[tokio::test]
    async fn commit_disarms() {
        let (log, rec) = recorder();
        let mut j = Journal::new("c");
        j.push_infallible("bundle", move || rec("bundle"));
        j.commit();
        assert!(log.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn undos_may_borrow() {
        let made = Mutex::new(vec!["a"]);
        let mut j = Journal::new("c");
        j.push_infallible("a", || {
            made.lock().expect("lock").clear();
        });
        assert_eq!(j.rollback().await.undone, ["a"]);
        assert!(made.lock().expect("lock").is_empty());
    }
}
