//! Typed state machines for pod sandboxes and containers: every transition is checked here.

use k8s_cri::v1::{ContainerState as CriContainerState, PodSandboxState};
use serde::{Deserialize, Serialize};

/// A pod sandbox's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    /// Namespaces and files in place; containers may be created.
    Ready,
    /// Stopped (or being removed).
    NotReady,
}

impl SandboxState {
    /// The CRI enum value.
    pub fn to_cri(self) -> PodSandboxState {
        match self {
            SandboxState::Ready => PodSandboxState::SandboxReady,
            SandboxState::NotReady => PodSandboxState::SandboxNotready,
        }
    }

    /// Whether containers may be created in it.
    pub fn can_create_containers(self) -> bool {
        self == SandboxState::Ready
    }
}

/// A container's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ContainerState {
    /// Created by the runtime, not started.
    #[default]
    Created,
    /// Its process runs.
    Running,
    /// Its process has exited.
    Exited,
    /// Not known (e.g. lost while berthd was down and not recoverable).
    Unknown,
}

impl ContainerState {
    /// The CRI enum value.
    pub fn to_cri(self) -> CriContainerState {
        match self {
            ContainerState::Created => CriContainerState::ContainerCreated,
            ContainerState::Running => CriContainerState::ContainerRunning,
            ContainerState::Exited => CriContainerState::ContainerExited,
            ContainerState::Unknown => CriContainerState::ContainerUnknown,
        }
    }

    /// A lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ContainerState::Created => "created",
            ContainerState::Running => "running",
            ContainerState::Exited => "exited",
            ContainerState::Unknown => "unknown",
        }
    }

    /// Only a created container can be started.
    pub fn can_start(self) -> bool {
        self == ContainerState::Created
    }

    /// Whether there may be a process to signal.
    pub fn can_stop(self) -> bool {
        matches!(self, ContainerState::Created | ContainerState::Running | ContainerState::Unknown)
    }

    /// Whether exec and resource updates make sense.
    pub fn is_running(self) -> bool {
        self == ContainerState::Running
    }

    /// Whether an exit may be recorded (a second exit for the same container is ignored).
    pub fn can_exit(self) -> bool {
        self != ContainerState::Exited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        assert!(ContainerState::Created.can_start());
        assert!(!ContainerState::Running.can_start());
        assert!(!ContainerState::Exited.can_start());
        assert!(ContainerState::Running.can_stop());
        assert!(!ContainerState::Exited.can_stop());
        assert!(!ContainerState::Exited.can_exit());
        assert!(SandboxState::Ready.can_create_containers());
        assert!(!SandboxState::NotReady.can_create_containers());
    }
}
