//! The Pod status the runner reports, and its patch.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::launch::LOOPBACK;

/// Current time as RFC 3339 with whole seconds, as Kubernetes writes it.
pub(crate) fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or_else(|_| jiff::Timestamp::now())
        .to_string()
}

/// `status.phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }
}

/// A container's `state`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: String,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        message: Option<String>,
        started_at: Option<String>,
        finished_at: String,
    },
}

impl State {
    fn to_json(&self) -> Value {
        match self {
            State::Waiting { reason, message } => {
                json!({"waiting": {"reason": reason, "message": message}})
            }
            State::Running { started_at } => json!({"running": {"startedAt": started_at}}),
            State::Terminated {
                exit_code,
                reason,
                message,
                started_at,
                finished_at,
            } => json!({"terminated": {
                "exitCode": exit_code,
                "reason": reason,
                "message": message,
                "startedAt": started_at,
                "finishedAt": finished_at,
            }}),
        }
    }
}

/// One entry of `initContainerStatuses` or `containerStatuses`.
#[derive(Debug, Clone)]
pub(crate) struct ContainerModel {
    pub name: String,
    pub image: String,
    /// An init container with `restartPolicy: Always`.
    pub sidecar: bool,
    pub state: State,
    /// `tripod://<pid>` once started.
    pub container_id: Option<String>,
}

impl ContainerModel {
    pub(crate) fn new(name: &str, image: &str, sidecar: bool, waiting: &str) -> Self {
        ContainerModel {
            name: name.to_string(),
            image: image.to_string(),
            sidecar,
            state: State::Waiting {
                reason: waiting.to_string(),
                message: None,
            },
            container_id: None,
        }
    }

    /// Running counts as ready (and started): the runner runs no probes.
    fn ready(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "containerID": self.container_id,
            "ready": self.ready(),
            "started": self.ready(),
            "restartCount": 0,
            "state": self.state.to_json(),
        })
    }
}

/// Everything the runner writes into a Pod's status.
#[derive(Debug)]
pub(crate) struct PodModel {
    pub phase: Phase,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub start_time: String,
    pub init: Vec<ContainerModel>,
    pub main: Vec<ContainerModel>,
    /// Whether to write `PodScheduled=True` (the scheduler did not: the Pod
    /// came with `nodeName`).
    pub add_scheduled: bool,
    /// Initialized stays True once it was.
    initialized: bool,
    /// Condition type → (status, lastTransitionTime) last written.
    transitions: HashMap<&'static str, (bool, String)>,
}

impl PodModel {
    pub(crate) fn new(
        init: Vec<ContainerModel>,
        main: Vec<ContainerModel>,
        add_scheduled: bool,
    ) -> Self {
        PodModel {
            phase: Phase::Pending,
            reason: None,
            message: None,
            start_time: now(),
            init,
            main,
            add_scheduled,
            initialized: false,
            transitions: HashMap::new(),
        }
    }

    /// The container of slot `slot`: init containers first, then the main
    /// ones.
    pub(crate) fn container_mut(&mut self, slot: usize) -> Option<&mut ContainerModel> {
        let n = self.init.len();
        if slot < n {
            self.init.get_mut(slot)
        } else {
            self.main.get_mut(slot - n)
        }
    }

    /// The strategic-merge patch of the status subresource: conditions
    /// merge by type, the container-status lists are replaced whole.
    pub(crate) fn next_patch(&mut self) -> Value {
        let now = now();
        let incomplete: Vec<&str> = self
            .init
            .iter()
            .filter(|c| match &c.state {
                State::Terminated { exit_code, .. } => !c.sidecar && *exit_code != 0,
                State::Running { .. } => !c.sidecar,
                State::Waiting { .. } => true,
            })
            .map(|c| c.name.as_str())
            .collect();
        self.initialized |= incomplete.is_empty();
        let unready: Vec<&str> = self
            .init
            .iter()
            .filter(|c| c.sidecar)
            .chain(&self.main)
            .filter(|c| !c.ready())
            .map(|c| c.name.as_str())
            .collect();
        let list = |names: &[&str]| format!("[{}]", names.join(" "));
        let (ready_reason, ready_message) = match self.phase {
            Phase::Succeeded => (Some("PodCompleted".to_string()), None),
            _ if unready.is_empty() => (None, None),
            _ => (
                Some("ContainersNotReady".to_string()),
                Some(format!(
                    "containers with unready status: {}",
                    list(&unready)
                )),
            ),
        };
        let ready = unready.is_empty() && self.phase == Phase::Running;
        let initialized = (
            self.initialized,
            (!self.initialized).then(|| "ContainersNotInitialized".to_string()),
            (!self.initialized)
                .then(|| format!("containers with incomplete status: {}", list(&incomplete))),
        );
        let mut conditions = Vec::new();
        if self.add_scheduled {
            conditions.push(self.condition("PodScheduled", true, None, None, &now));
        }
        conditions.push(self.condition(
            "Initialized",
            initialized.0,
            initialized.1,
            initialized.2,
            &now,
        ));
        for type_ in ["ContainersReady", "Ready"] {
            conditions.push(self.condition(
                type_,
                ready,
                ready_reason.clone(),
                ready_message.clone(),
                &now,
            ));
        }
        json!({"status": {
            "phase": self.phase.as_str(),
            "reason": self.reason,
            "message": self.message,
            "startTime": self.start_time,
            "hostIP": LOOPBACK,
            "hostIPs": [{"ip": LOOPBACK}],
            "podIP": LOOPBACK,
            "podIPs": [{"ip": LOOPBACK}],
            "conditions": conditions,
            "initContainerStatuses": self.init.iter().map(ContainerModel::to_json).collect::<Vec<_>>(),
            "containerStatuses": self.main.iter().map(ContainerModel::to_json).collect::<Vec<_>>(),
        }})
    }

    fn condition(
        &mut self,
        type_: &'static str,
        status: bool,
        reason: Option<String>,
        message: Option<String>,
        now: &str,
    ) -> Value {
        let since = match self.transitions.get(type_) {
            Some((old, since)) if *old == status => since.clone(),
            _ => {
                self.transitions.insert(type_, (status, now.to_string()));
                now.to_string()
            }
        };
        json!({
            "type": type_,
            "status": if status { "True" } else { "False" },
            "reason": reason,
            "message": message,
            "lastProbeTime": null,
            "lastTransitionTime": since,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition<'a>(patch: &'a Value, type_: &str) -> &'a Value {
        patch["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap()
    }

    #[test]
    fn conditions_follow_the_containers() {
        let mut m = PodModel::new(
            vec![
                ContainerModel::new("side", "img", true, "PodInitializing"),
                ContainerModel::new("init", "img", false, "PodInitializing"),
            ],
            vec![ContainerModel::new("main", "img", false, "PodInitializing")],
            true,
        );
        let p = m.next_patch();
        assert_eq!(p["status"]["phase"], "Pending");
        assert_eq!(condition(&p, "PodScheduled")["status"], "True");
        assert_eq!(condition(&p, "Initialized")["status"], "False");
        assert_eq!(
            condition(&p, "Initialized")["message"],
            "containers with incomplete status: [side init]"
        );
        let running = State::Running { started_at: now() };
        m.init[0].state = running.clone();
        m.init[1].state = State::Terminated {
            exit_code: 0,
            reason: "Completed".into(),
            message: None,
            started_at: None,
            finished_at: now(),
        };
        m.main[0].state = running;
        m.phase = Phase::Running;
        let p = m.next_patch();
        assert_eq!(condition(&p, "Initialized")["status"], "True");
        assert_eq!(condition(&p, "Ready")["status"], "True");
        assert_eq!(condition(&p, "Ready")["reason"], Value::Null);
        assert_eq!(p["status"]["containerStatuses"][0]["ready"], true);
        assert_eq!(p["status"]["initContainerStatuses"][0]["started"], true);
        m.init[0].state = State::Terminated {
            exit_code: 143,
            reason: "Error".into(),
            message: None,
            started_at: None,
            finished_at: now(),
        };
        m.main[0].state = m.init[0].state.clone();
        m.phase = Phase::Succeeded;
        let p = m.next_patch();
        assert_eq!(condition(&p, "Initialized")["status"], "True");
        assert_eq!(condition(&p, "Ready")["status"], "False");
        assert_eq!(condition(&p, "Ready")["reason"], "PodCompleted");
        assert_eq!(
            p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"],
            143
        );
    }
}
