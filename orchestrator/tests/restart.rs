//! Restart policy and health reports: a task its node reports failed (exited, unhealthy) or
//! complete is replaced per the service's restart policy, and `ps` keeps the replaced one with
//! its reason.

mod common;

use common::*;
use swarmnet_model::spec::{HealthCheck, HealthStatus, RestartPolicy};
use swarmnet_model::{HumanDuration, Intent};
use swarmnet_orchestrator::project::project;
use swarmnet_orchestrator::state::{ClusterState, Command, CommandError, Task, TaskState};

fn checked(replicas: u32) -> swarmnet_orchestrator::state::ServiceDef {
    let mut def = service("web", replicas, &["app"]);
    def.health = Some(Box::new(HealthCheck {
        cmd: vec!["/bin/sh".into(), "-c".into(), "test -f /tmp/ok".into()],
        interval: HumanDuration::from_millis(200),
        timeout: HumanDuration::from_millis(500),
        retries: 2,
        start_period: HumanDuration::default(),
    }));
    def
}

fn setup(def: swarmnet_orchestrator::state::ServiceDef) -> ClusterState {
    let mut s = cluster(3);
    apply(&mut s, network("app"));
    apply(&mut s, Command::CreateService(def));
    report_all_running(&mut s);
    s
}

fn report(s: &mut ClusterState, t: &Task, state: TaskState, msg: &str, h: Option<HealthStatus>) {
    apply(
        s,
        Command::ReportTask {
            node: t.node.clone().unwrap(),
            task: t.id.clone(),
            state,
            message: msg.into(),
            health: h,
        },
    );
}

fn slot(s: &ClusterState, slot: u32) -> Task {
    s.tasks.values().find(|t| t.slot == slot).unwrap().clone()
}

#[test]
fn an_unhealthy_task_is_replaced_and_kept_in_the_history_with_why() {
    let mut s = setup(checked(2));
    let t = slot(&s, 1);
    report(
        &mut s,
        &t,
        TaskState::Running,
        "",
        Some(HealthStatus::Healthy),
    );
    assert_eq!(s.tasks[&t.id].health, Some(HealthStatus::Healthy));
    let why = "unhealthy: health check failed 2 times in a row (last: exit 1)";
    report(
        &mut s,
        &t,
        TaskState::Failed,
        why,
        Some(HealthStatus::Unhealthy),
    );
    assert!(!s.tasks.contains_key(&t.id), "the unhealthy task left");
    let new = slot(&s, 1);
    assert_ne!(new.id, t.id, "a replacement took slot 1");
    assert_eq!(new.status.state, TaskState::Assigned);
    assert_eq!(s.tasks.len(), 2);
    let h = &s.history[&name("web")];
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].id, t.id);
    assert_eq!(h[0].status.message, why);
    assert_eq!(h[0].health, Some(HealthStatus::Unhealthy));
    // The replaced task is gone from the nodes' intent; the replacement is in it.
    let spec = project(&s);
    assert!(spec.tasks.iter().all(|x| x.id != t.id));
    assert!(spec.tasks.iter().any(|x| x.id == new.id));
    // The check reaches netd, which never restarts on its own: this side replaces.
    let svc = spec
        .services
        .iter()
        .find(|x| x.name.as_str() == "web")
        .unwrap();
    assert_eq!(svc.health.as_ref(), checked(2).health.as_deref());
    assert_eq!(svc.restart, RestartPolicy::Never);
    Intent::new(spec).expect("the projection validates");
}

#[test]
fn exits_follow_the_restart_policy() {
    // always: failed and complete are replaced.
    let mut s = setup(service("web", 1, &["app"]));
    let t = slot(&s, 1);
    report(&mut s, &t, TaskState::Complete, "exit code 0", None);
    assert_ne!(slot(&s, 1).id, t.id);
    let t = slot(&s, 1);
    report_all_running(&mut s);
    report(&mut s, &t, TaskState::Failed, "exit code 3", None);
    assert_ne!(slot(&s, 1).id, t.id);
    assert_eq!(s.history[&name("web")].len(), 2);

    // on_failure: complete stays, failed is replaced.
    let mut def = service("web", 1, &["app"]);
    def.restart = RestartPolicy::OnFailure;
    let mut s = setup(def);
    let t = slot(&s, 1);
    report(&mut s, &t, TaskState::Complete, "exit code 0", None);
    assert_eq!(slot(&s, 1).id, t.id);
    assert_eq!(slot(&s, 1).status.state, TaskState::Complete);
    report(&mut s, &t, TaskState::Failed, "exit code 1", None);
    assert_ne!(slot(&s, 1).id, t.id);

    // never: a failed task stays failed, with its reason.
    let mut def = service("web", 1, &["app"]);
    def.restart = RestartPolicy::Never;
    let mut s = setup(def);
    let t = slot(&s, 1);
    report(&mut s, &t, TaskState::Failed, "killed by signal 9", None);
    assert_eq!(slot(&s, 1).id, t.id);
    assert_eq!(slot(&s, 1).status.message, "killed by signal 9");
}

/// With a restart delay, an ended task keeps its slot (and addresses) until the leader's
/// `RestartTasks`; meanwhile nothing of it is in the nodes' intent and no replacement exists.
#[test]
fn an_ended_task_waits_for_its_restart_delay() {
    let mut def = service("web", 2, &["app"]);
    def.restart_delay_ms = 5_000;
    let mut s = setup(def);
    let t = slot(&s, 1);
    let ip = t.networks[0].ip;
    report(&mut s, &t, TaskState::Failed, "exit code 3", None);
    assert_eq!(slot(&s, 1).id, t.id, "no replacement before the delay");
    assert_eq!(s.tasks[&t.id].status.state, TaskState::Failed);
    assert_eq!(s.tasks[&t.id].networks[0].ip, ip, "it keeps its address");
    assert_eq!(s.tasks.len(), 2);
    assert_eq!(s.awaiting_restart(), vec![(t.id.clone(), 5_000)]);
    let spec = project(&s);
    assert!(
        spec.tasks.iter().all(|x| x.id != t.id),
        "an ended task is not in the nodes' intent"
    );
    Intent::new(spec).expect("the projection validates");

    // A RestartTasks for a task that runs is ignored.
    let other = slot(&s, 2);
    apply(
        &mut s,
        Command::RestartTasks {
            tasks: vec![other.id.clone()],
        },
    );
    assert_eq!(slot(&s, 2).id, other.id);

    // The delay is over: replaced in its slot, the ended one in the history.
    apply(
        &mut s,
        Command::RestartTasks {
            tasks: vec![t.id.clone()],
        },
    );
    let new = slot(&s, 1);
    assert_ne!(new.id, t.id);
    assert_eq!(new.status.state, TaskState::Assigned);
    assert!(s.awaiting_restart().is_empty());
    assert_eq!(s.history[&name("web")][0].id, t.id);
    // Sent twice (a new leader): nothing more happens.
    apply(
        &mut s,
        Command::RestartTasks {
            tasks: vec![t.id.clone()],
        },
    );
    assert_eq!(slot(&s, 1).id, new.id);

    // never: an ended task does not wait for anything.
    let mut def = service("web", 1, &["app"]);
    def.restart = RestartPolicy::Never;
    def.restart_delay_ms = 5_000;
    let mut s = setup(def);
    let t = slot(&s, 1);
    report(&mut s, &t, TaskState::Failed, "exit code 3", None);
    assert!(s.awaiting_restart().is_empty());
    assert!(project(&s).tasks.iter().all(|x| x.id != t.id));
}

#[test]
fn the_history_is_bounded_and_leaves_with_the_service() {
    let mut s = setup(service("web", 1, &["app"]));
    for i in 0..(swarmnet_orchestrator::state::HISTORY_LEN + 5) {
        let t = slot(&s, 1);
        report_all_running(&mut s);
        report(
            &mut s,
            &t,
            TaskState::Failed,
            &format!("exit code {i}"),
            None,
        );
    }
    let h = &s.history[&name("web")];
    assert_eq!(h.len(), swarmnet_orchestrator::state::HISTORY_LEN);
    assert_eq!(
        h.last().unwrap().status.message,
        "exit code 14",
        "newest last"
    );
    apply(&mut s, Command::RemoveService { name: name("web") });
    assert!(s.history.is_empty());
}

#[test]
fn bad_health_checks_are_refused() {
    let mut s = cluster(1);
    apply(&mut s, network("app"));
    let mut def = checked(1);
    def.health.as_mut().unwrap().retries = 0;
    let e = s.apply(&Command::CreateService(def)).unwrap_err();
    assert!(matches!(e, CommandError::Invalid { .. }), "{e:?}");
    assert!(e.to_string().contains("health.retries"), "{e}");
    let mut def = checked(1);
    def.health.as_mut().unwrap().cmd.clear();
    let e = s.apply(&Command::CreateService(def)).unwrap_err();
    assert!(e.to_string().contains("health.cmd"), "{e}");
}
