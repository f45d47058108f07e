//! Control loops: the scheduling loop (snapshot → pure plan → checked,
//! committed, dispatched), the handling of agent reports, and the recovery of
//! jobs that were running when the server stopped.
//!
//! Order of effects, always: change memory, commit to the store, then tell
//! agents. An agent is never asked to start a replica whose placement is not
//! durable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_core::job::{ReplicaPlacement, ReplicaState, ReplicaStatus};
use tessera_core::node::{Node, NodeState};
use tessera_core::protocol::{ExitCause, FromAgent, ReplicaKey, StartReplica, ToAgent};
use tessera_core::quantity::{format_duration, format_memory};
use tessera_core::{Event, Job, JobId, JobState};
use tessera_store::Write;
use tokio::sync::mpsc;
use tracing::warn;

use crate::state::ClusterState;
use crate::{now_ms, Shared};

/// Longest pause between scheduling passes when nothing wakes the loop.
const IDLE_TICK: Duration = Duration::from_millis(1000);

pub async fn scheduling_loop(shared: Arc<Shared>) {
    loop {
        // A quiet tick still runs a pass: attained service grows while jobs
        // run, so the order and preemption change with time alone.
        let periodic = tokio::select! {
            _ = shared.wake.notified() => false,
            _ = tokio::time::sleep(IDLE_TICK) => true,
        };
        let began = Instant::now();
        run_cycle(&shared, periodic).await;
        // A long pass (a huge queue) is followed by an equal pause, so
        // scheduling never takes more than half a core from the API and the
        // agent.
        let spent = began.elapsed();
        if spent > Duration::from_millis(5) {
            tokio::time::sleep(spent).await;
        }
    }
}

/// One pass: plan, apply (placements and preemptions), commit, dispatch.
pub async fn run_cycle(shared: &Shared, periodic: bool) {
    let now = now_ms();
    if shared
        .shutting_down
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return;
    }
    let snapshot = {
        let mut state = shared.state.lock().expect("state lock");
        if state.queued.is_empty()
            || (!periodic && state.fresh.is_empty() && !state.capacity_changed)
            || (!periodic && !state.capacity_changed && !state.fresh_can_matter())
        {
            state.fresh.clear();
            return;
        }
        state.take_snapshot(&shared.policy, now)
    };
    let started = Instant::now();
    let plan = tessera_scheduler::schedule(&snapshot, now);
    shared
        .metrics
        .cycle_seconds
        .observe(started.elapsed().as_secs_f64());

    let mut writes = Vec::new();
    let mut placed: Vec<JobId> = Vec::new();
    let mut stops: Vec<(String, ToAgent)> = Vec::new();
    let staged = {
        let mut state = shared.state.lock().expect("state lock");
        for w in &plan.waiting {
            if let Some(j) = state.jobs.get_mut(&w.job_id) {
                if j.state == JobState::Queued && j.reason.as_deref() != Some(&*w.reason) {
                    j.reason = Some(w.reason.to_string());
                }
            }
        }
        for p in &plan.placements {
            // Only the scheduling loop places work, so capacity seen in the
            // snapshot can only have grown since; the job may have been
            // cancelled meanwhile, and then its share of the plan is free
            // again for the others.
            if state.jobs.get(&p.job_id).map(|j| j.state) != Some(JobState::Queued) {
                state.capacity_changed = true;
                shared.wake.notify_one();
                continue;
            }
            let placement: Vec<ReplicaPlacement> = p
                .assignments
                .iter()
                .map(|a| ReplicaPlacement {
                    replica: a.replica,
                    node: snapshot.nodes[a.node].name.clone(),
                    gpus: a.gpus.clone(),
                })
                .collect();
            state.update_job(p.job_id, &mut writes, |j| {
                j.state = JobState::Scheduled;
                j.attempt += 1;
                j.scheduled_at = Some(now);
                j.started_at = None;
                j.reason = None;
                j.exit_code = None;
                j.replicas = placement
                    .iter()
                    .map(|pl| ReplicaStatus {
                        replica: pl.replica,
                        state: ReplicaState::Pending,
                        pid: None,
                        exit_code: None,
                        signal: None,
                    })
                    .collect();
                let msg = describe_placement(&placement);
                j.placement = placement;
                Some(Event::new(j.id, now, "scheduled", msg))
            });
            placed.push(p.job_id);
        }
        // One wave of preemptions at a time: while victims are stopping, the
        // scheduler cannot see the room they will leave.
        let in_flight = state
            .active
            .iter()
            .any(|id| state.jobs[id].preempting.is_some());
        if !in_flight {
            for pre in &plan.preemptions {
                let Some(job) = state.jobs.get(&pre.job_id) else {
                    continue;
                };
                if !job.state.is_active() || job.cancel_requested || job.preempting.is_some() {
                    continue;
                }
                let attempt = job.attempt;
                let targets: Vec<(String, u32)> = job
                    .placement
                    .iter()
                    .map(|p| (p.node.clone(), p.replica))
                    .collect();
                state.update_job(pre.job_id, &mut writes, |j| {
                    j.preempting = Some(pre.reason.clone());
                    Some(Event::new(j.id, now, "preempting", pre.reason.clone()))
                });
                for (node, replica) in targets {
                    stops.push((
                        node,
                        ToAgent::Stop {
                            key: ReplicaKey {
                                job_id: pre.job_id,
                                attempt,
                                replica,
                            },
                            grace_ms: shared.kill_grace_ms,
                            reason: pre.reason.clone(),
                        },
                    ));
                }
            }
        }
        let staged = shared.stage(std::mem::take(&mut writes));
        let agents = shared.agents.lock().expect("agents lock");
        for (node, msg) in stops.drain(..) {
            if let Some(tx) = agents.get(&node) {
                let _ = tx.send(msg);
            }
        }
        staged
    };
    staged.durable().await;
    if placed.is_empty() {
        return;
    }
    shared.changed();
    shared.metrics.placements.inc_by(placed.len() as u64);
    dispatch_starts(shared, &placed).await;
}

fn describe_placement(p: &[ReplicaPlacement]) -> String {
    let parts: Vec<String> = p
        .iter()
        .map(|r| {
            if r.gpus.is_empty() {
                format!("replica {} on {}", r.replica, r.node)
            } else {
                let g: Vec<String> = r.gpus.iter().map(|g| g.to_string()).collect();
                format!("replica {} on {} (GPU {})", r.replica, r.node, g.join(","))
            }
        })
        .collect();
    parts.join("; ")
}

/// Sends Start for every replica of freshly placed jobs, unless a cancel got
/// there first (then the job is cancelled without running), the server is
/// shutting down, or a node has no agent (then the job is lost and retried
/// per its policy instead of waiting for a report that never comes).
async fn dispatch_starts(shared: &Shared, placed: &[JobId]) {
    let now = now_ms();
    let mut writes = Vec::new();
    let shutting_down = shared
        .shutting_down
        .load(std::sync::atomic::Ordering::SeqCst);
    let staged = {
        let mut state = shared.state.lock().expect("state lock");
        let agents = shared.agents.lock().expect("agents lock");
        for id in placed {
            let Some(job) = state.jobs.get(id) else {
                continue;
            };
            if job.state != JobState::Scheduled {
                continue;
            }
            let ended = if job.cancel_requested {
                Some((
                    JobState::Cancelled,
                    "cancelled before it started".to_string(),
                ))
            } else if shutting_down {
                Some((
                    JobState::Lost,
                    "lost: the server shut down before the job started".to_string(),
                ))
            } else {
                job.placement
                    .iter()
                    .find(|p| !agents.contains_key(&p.node))
                    .map(|p| {
                        (
                            JobState::Lost,
                            format!("lost: node {} has no connected agent", p.node),
                        )
                    })
            };
            if let Some((outcome, reason)) = ended {
                finish(
                    &mut state,
                    *id,
                    outcome,
                    None,
                    reason,
                    now,
                    &mut writes,
                    shared,
                );
                continue;
            }
            for p in &job.placement {
                if let Some(tx) = agents.get(&p.node) {
                    if tx.send(ToAgent::Start(start_message(job, p))).is_err() {
                        warn!(job = id, node = %p.node, "the node's agent has gone");
                    }
                }
            }
        }
        shared.stage(writes)
    };
    staged.durable().await;
    shared.changed();
}

fn start_message(job: &Job, p: &ReplicaPlacement) -> StartReplica {
    StartReplica {
        key: ReplicaKey {
            job_id: job.id,
            attempt: job.attempt,
            replica: p.replica,
        },
        num_replicas: job.spec.replicas,
        argv: job.spec.argv.clone(),
        env: job
            .spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(crate::job_data::input_env(job))
            .collect(),
        workdir: job.spec.workdir.clone(),
        inputs: crate::job_data::mounts(job),
        outputs: if p.replica == 0 {
            job.spec.outputs.iter().map(|o| o.from.clone()).collect()
        } else {
            Vec::new()
        },
        gpus: p.gpus.clone(),
        cpu_milli: job.spec.resources.cpu_milli,
        memory_bytes: job.spec.resources.memory_bytes,
        max_runtime_ms: job.spec.max_runtime_ms,
        image: job.spec.image.clone(),
    }
}

/// Ends the current attempt of a job: final state, or back to the queue when
/// its retry policy allows. Appends writes; bumps metrics.
#[allow(clippy::too_many_arguments)]
pub fn finish(
    state: &mut ClusterState,
    id: JobId,
    outcome: JobState,
    exit_code: Option<i32>,
    reason: String,
    now: u64,
    writes: &mut Vec<Write>,
    shared: &Shared,
) {
    let Some(job) = state.jobs.get(&id) else {
        return;
    };
    let cost = state.attempt_cost(id, now);
    let retry = match outcome {
        JobState::Failed => job.failures < job.spec.retries.on_failure && !job.cancel_requested,
        JobState::Lost => job.node_losses < job.spec.retries.on_node_loss && !job.cancel_requested,
        _ => false,
    };
    let what = if retry { "requeued" } else { outcome.as_str() };
    let ended = crate::usage::end_attempt(shared, state, id, now, what);
    if retry {
        state.update_job(id, writes, |j| {
            let (kind_count, limit, what) = if outcome == JobState::Lost {
                j.node_losses += 1;
                (j.node_losses, j.spec.retries.on_node_loss, "node loss")
            } else {
                j.failures += 1;
                (j.failures, j.spec.retries.on_failure, "failure")
            };
            back_to_queue(j, now, cost);
            j.attempts.extend(ended);
            j.exit_code = exit_code;
            j.reason = Some(format!("requeued after {what}: {reason}"));
            Some(Event::new(
                id,
                now,
                "requeued",
                format!("{reason}; retry {kind_count} of {limit} on {what}"),
            ))
        });
        shared.wake.notify_one();
        return;
    }
    state.update_job(id, writes, |j| {
        if outcome == JobState::Lost {
            j.node_losses += 1;
        } else if outcome == JobState::Failed {
            j.failures += 1;
        }
        j.state = outcome;
        j.cost += cost;
        j.attempts.extend(ended);
        j.finished_at = Some(now);
        j.exit_code = exit_code;
        j.reason = Some(reason.clone());
        Some(Event::new(id, now, outcome.as_str(), reason))
    });
    if let Some(j) = state.jobs.get(&id) {
        shared.metrics.job_finished(j.team(), outcome);
    }
    shared.wake.notify_one();
}

/// Ends a job's current attempt and puts it back in the queue, keeping its
/// place (submit time): the attempt's run time counts as attained service
/// and its cost is added. Returns the attempt's run time.
fn back_to_queue(j: &mut Job, now: u64, cost: f64) -> u64 {
    let ran = j.run_ms(now);
    j.attained_ms += ran;
    j.cost += cost;
    j.state = JobState::Queued;
    j.placement.clear();
    j.replicas.clear();
    j.preempting = None;
    j.outputs_dir = None;
    ran
}

/// Sends a preempted job back to the queue, keeping its place (submit time)
/// and counting the run time it loses; retries are not used up.
fn requeue_preempted(
    state: &mut ClusterState,
    id: JobId,
    why: String,
    now: u64,
    writes: &mut Vec<Write>,
    shared: &Shared,
) {
    let cost = state.attempt_cost(id, now);
    let ended = crate::usage::end_attempt(shared, state, id, now, "preempted");
    state.update_job(id, writes, |j| {
        let ran = back_to_queue(j, now, cost);
        j.attempts.extend(ended);
        j.preemptions += 1;
        j.preempted_ms += ran;
        j.exit_code = None;
        j.reason = Some(format!("requeued after preemption: {why}"));
        Some(Event::new(
            id,
            now,
            "preempted",
            format!(
                "{why}; {} of run time lost; back in the queue in its place",
                format_duration(ran)
            ),
        ))
    });
    shared.metrics.preemptions.inc();
    shared.wake.notify_one();
}

/// A report and the node whose connection carried it (none: the local
/// agent of `tessera up`, which is trusted).
#[derive(Debug, Clone)]
pub struct AgentReport {
    pub from: Option<Arc<str>>,
    pub event: FromAgent,
}

impl From<FromAgent> for AgentReport {
    fn from(event: FromAgent) -> AgentReport {
        AgentReport { from: None, event }
    }
}

/// Applies agent reports in batches: one lock, one commit per batch.
pub async fn agent_events_loop<T: Into<AgentReport>>(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<T>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first.into()];
        while let Ok(more) = rx.try_recv() {
            batch.push(more.into());
            if batch.len() >= 1024 {
                break;
            }
        }
        apply_reports(&shared, batch, None).await;
    }
}

/// Applies a batch of reports under one lock and one commit. With
/// `connect`, the batch is a remote agent's handshake, and its connection
/// becomes the node's only after the batch is applied: no placement can
/// reach the agent before the server has reconciled what it runs.
pub async fn apply_reports(
    shared: &Shared,
    batch: Vec<AgentReport>,
    connect: Option<(String, mpsc::UnboundedSender<ToAgent>)>,
) {
    let mut writes = Vec::new();
    let mut stops = Vec::new();
    let staged = {
        let mut state = shared.state.lock().expect("state lock");
        let now = now_ms();
        for r in batch {
            if let Some(from) = &r.from {
                // Any word from an agent renews its lease (server clock:
                // agents' clocks may disagree with ours).
                if let Some(n) = state.nodes.get_mut(&**from) {
                    n.last_heartbeat = now;
                }
            }
            handle_agent_event(
                shared,
                &mut state,
                r.from.as_deref(),
                r.event,
                &mut writes,
                &mut stops,
            );
        }
        if let Some((node, tx)) = connect {
            // A newer connection replaces an older one, whose task then ends.
            shared
                .agents
                .lock()
                .expect("agents lock")
                .insert(node.clone(), tx);
            state.connected.insert(node);
            state.capacity_changed = true;
            shared.wake.notify_one();
        }
        let staged = shared.stage(writes);
        crate::fleet::send_all(shared, stops);
        staged
    };
    staged.durable().await;
    shared.changed();
}

/// Whether `from` may report on replica `key` of `job`: the local agent
/// always; a remote agent only on replicas placed on its node.
fn placed_on(job: &Job, key: &ReplicaKey, from: Option<&str>) -> bool {
    from.is_none_or(|node| {
        job.placement
            .iter()
            .any(|p| p.replica == key.replica && p.node == node)
    })
}

/// Refuses a report about a replica that is not the current attempt's (or
/// not this node's): counts it, records it on the job, and stops such a
/// replica if the report says it runs.
#[allow(clippy::too_many_arguments)]
fn refuse_stale(
    shared: &Shared,
    state: &mut ClusterState,
    from: Option<&str>,
    key: ReplicaKey,
    running: bool,
    now: u64,
    writes: &mut Vec<Write>,
    stops: &mut Vec<(String, ToAgent)>,
) {
    shared.metrics.stale_reports.inc();
    let node = from.unwrap_or("the local node");
    let current = state.jobs.get(&key.job_id).map(|j| j.attempt);
    warn!(replica = %key, %node, ?current, "refused a report about a replica that is not current");
    if state.jobs.contains_key(&key.job_id) {
        state.add_event(
            Event::new(
                key.job_id,
                now,
                "refused",
                format!(
                    "refused a report from {node} about attempt {} (current attempt {}){}",
                    key.attempt,
                    current.unwrap_or(0),
                    if running {
                        "; that copy is being stopped"
                    } else {
                        ""
                    }
                ),
            ),
            writes,
        );
    }
    if running {
        if let Some(node) = from {
            stops.push((
                node.to_string(),
                ToAgent::Stop {
                    key,
                    grace_ms: shared.kill_grace_ms,
                    reason: "stale attempt: the job was rescheduled".into(),
                },
            ));
        }
    }
}

fn handle_agent_event(
    shared: &Shared,
    state: &mut ClusterState,
    from: Option<&str>,
    ev: FromAgent,
    writes: &mut Vec<Write>,
    stops: &mut Vec<(String, ToAgent)>,
) {
    let now = now_ms();
    match ev {
        FromAgent::Heartbeat { node, .. } => {
            // Kept in memory only: a heartbeat is not worth an fsync.
            if let Some(n) = state.nodes.get_mut(&node) {
                n.last_heartbeat = now;
            }
        }
        FromAgent::Usage { node, usage } => {
            if from.is_some_and(|f| f != node) {
                return;
            }
            // A GPU that turns unhealthy leaves scheduling (and comes back
            // when it reports healthy again); only changes are written.
            if let Some(n) = state.nodes.get_mut(&node) {
                let mut changed = false;
                for g in &usage.gpus {
                    if let Some(inv) = n.inventory.gpus.iter_mut().find(|x| x.index == g.index) {
                        if inv.healthy != g.healthy {
                            warn!(%node, gpu = g.index, healthy = g.healthy, "GPU health changed");
                            inv.healthy = g.healthy;
                            changed = true;
                        }
                    }
                }
                if changed {
                    writes.push(Write::Node(Box::new(n.clone())));
                    state.capacity_changed = true;
                    shared.wake.notify_one();
                }
            }
            state.usage.insert(node, usage);
        }
        FromAgent::Sync { node, running } => {
            reconcile(shared, state, &node, &running, now, writes, stops);
        }
        FromAgent::Register(inv) => {
            let node = match state.nodes.get(&inv.name) {
                Some(n) => Node {
                    inventory: inv,
                    prices: shared.prices,
                    state: if n.state == NodeState::Lost {
                        NodeState::Ready
                    } else {
                        n.state
                    },
                    registered_at: n.registered_at,
                    last_heartbeat: now,
                    drain_deadline: n.drain_deadline,
                },
                None => Node {
                    inventory: inv,
                    prices: shared.prices,
                    state: NodeState::Ready,
                    registered_at: now,
                    last_heartbeat: now,
                    drain_deadline: None,
                },
            };
            writes.push(Write::Node(Box::new(node.clone())));
            state.nodes.insert(node.inventory.name.clone(), node);
            state.capacity_changed = true;
            shared.wake.notify_one();
        }
        FromAgent::Started { key, pid, at } => {
            let current = state.jobs.get(&key.job_id).is_some_and(|job| {
                job.attempt == key.attempt && job.state.is_active() && placed_on(job, &key, from)
            });
            if !current {
                refuse_stale(shared, state, from, key, true, now, writes, stops);
                return;
            }
            let job = &state.jobs[&key.job_id];
            let first = job.state == JobState::Scheduled;
            let replicas = job.spec.replicas;
            let submitted_at = job.submitted_at;
            state.update_job(key.job_id, writes, |j| {
                if let Some(r) = j.replicas.iter_mut().find(|r| r.replica == key.replica) {
                    r.state = ReplicaState::Running;
                    r.pid = Some(pid);
                }
                if first {
                    j.state = JobState::Running;
                    j.started_at = Some(at);
                    // A pool's "queued in <engine>" no longer holds.
                    j.reason = None;
                }
                let node = j
                    .placement
                    .iter()
                    .find(|p| p.replica == key.replica)
                    .map(|p| p.node.clone())
                    .unwrap_or_default();
                if replicas > 1 {
                    Some(Event::new(
                        j.id,
                        at,
                        "started",
                        format!("replica {} started on {node} (pid {pid})", key.replica),
                    ))
                } else {
                    Some(Event::new(
                        j.id,
                        at,
                        "started",
                        format!("started on {node} (pid {pid})"),
                    ))
                }
            });
            if first {
                shared
                    .metrics
                    .submit_to_start_seconds
                    .observe(at.saturating_sub(submitted_at) as f64 / 1000.0);
            }
        }
        FromAgent::Exited {
            key,
            code,
            signal,
            cause,
            at,
            workdir,
        } => {
            let current = state.jobs.get(&key.job_id).is_some_and(|job| {
                job.attempt == key.attempt && job.state.is_active() && placed_on(job, &key, from)
            });
            if !current {
                refuse_stale(shared, state, from, key, false, now, writes, stops);
                return;
            }
            if matches!(cause, ExitCause::Disconnected | ExitCause::Unknown) {
                let node = from.unwrap_or("the local node").to_string();
                let reason = if cause == ExitCause::Disconnected {
                    format!("node {node} stopped the job after losing contact with the server")
                } else {
                    format!(
                        "node {node}'s agent restarted and the job's end could not be recovered"
                    )
                };
                crate::fleet::lose_job(
                    shared, state, key.job_id, &node, &reason, now, writes, stops,
                );
                return;
            }
            let job = &state.jobs[&key.job_id];
            let ok = cause == ExitCause::Exited && code == Some(0);
            let what = describe_exit(job, key.replica, code, signal, &cause);
            let mut ev = None;
            if !ok || job.spec.replicas > 1 {
                ev = Some(Event::new(key.job_id, at, "exited", what.clone()));
            }
            let first_failure = !ok
                && job
                    .replicas
                    .iter()
                    .all(|r| r.exit_code.unwrap_or(0) == 0 && r.signal.is_none());
            let job_exit = code.or(signal.map(|s| 128 + s)).or(match cause {
                ExitCause::SpawnFailed(_) => Some(127),
                _ => None,
            });
            let outputs_dir = (key.replica == 0 && !job.spec.outputs.is_empty())
                .then_some(workdir)
                .flatten();
            state.update_job(key.job_id, writes, |j| {
                if let Some(r) = j.replicas.iter_mut().find(|r| r.replica == key.replica) {
                    r.state = ReplicaState::Exited;
                    r.exit_code = job_exit;
                    r.signal = signal;
                }
                if outputs_dir.is_some() {
                    j.outputs_dir = outputs_dir;
                }
                if first_failure && !j.cancel_requested {
                    j.reason = Some(what.clone());
                    j.exit_code = job_exit;
                }
                ev
            });
            let job = &state.jobs[&key.job_id];
            // A gang fails together: stop the replicas still running.
            if first_failure && !job.cancel_requested {
                for r in &job.replicas {
                    if r.state != ReplicaState::Exited {
                        if let Some(p) = job.placement.iter().find(|p| p.replica == r.replica) {
                            stops.push((
                                p.node.clone(),
                                ToAgent::Stop {
                                    key: ReplicaKey {
                                        job_id: job.id,
                                        attempt: job.attempt,
                                        replica: r.replica,
                                    },
                                    grace_ms: shared.kill_grace_ms,
                                    reason: format!("replica {} failed", key.replica),
                                },
                            ));
                        }
                    }
                }
            }
            if job.replicas.iter().all(|r| r.state == ReplicaState::Exited) {
                let failed = job.replicas.iter().any(|r| r.exit_code != Some(0));
                let shutting_down = shared
                    .shutting_down
                    .load(std::sync::atomic::Ordering::SeqCst);
                let (outcome, exit, reason) = if job.cancel_requested {
                    (
                        JobState::Cancelled,
                        job.exit_code.or(job_exit),
                        "cancelled on request".to_string(),
                    )
                } else if job.preempting.is_some() && cause == ExitCause::Stopped {
                    let why = job.preempting.clone().unwrap_or_default();
                    requeue_preempted(state, key.job_id, why, now, writes, shared);
                    return;
                } else if shutting_down && cause == ExitCause::Stopped {
                    (
                        JobState::Lost,
                        None,
                        "lost: the server shut down while the job was running".to_string(),
                    )
                } else if failed {
                    (
                        JobState::Failed,
                        job.exit_code,
                        job.reason.clone().unwrap_or(what),
                    )
                } else if crate::job_data::writing(job) {
                    crate::job_data::start_writing(shared, state, key.job_id, writes, now);
                    return;
                } else {
                    let msg = if job.spec.replicas > 1 {
                        format!("all {} replicas exited with code 0", job.spec.replicas)
                    } else {
                        "exited with code 0".to_string()
                    };
                    (JobState::Succeeded, Some(0), msg)
                };
                finish(
                    state, key.job_id, outcome, exit, reason, now, writes, shared,
                );
            }
        }
    }
}

fn describe_exit(
    job: &Job,
    replica: u32,
    code: Option<i32>,
    signal: Option<i32>,
    cause: &ExitCause,
) -> String {
    let who = if job.spec.replicas > 1 {
        format!("replica {replica} ")
    } else {
        String::new()
    };
    match cause {
        ExitCause::TimedOut => format!(
            "{who}exceeded max_runtime of {}",
            format_duration(job.spec.max_runtime_ms.unwrap_or(0))
        ),
        ExitCause::OutOfMemory => format!(
            "{who}ran out of memory (limit {})",
            format_memory(job.spec.resources.memory_bytes)
        ),
        ExitCause::SpawnFailed(msg) => format!("{who}could not start: {msg}"),
        ExitCause::Disconnected => format!("{who}stopped: its node lost contact with the server"),
        ExitCause::Unknown => format!("{who}ended while its agent was down"),
        ExitCause::Stopped => format!("{who}stopped on request"),
        ExitCause::Exited => match (code, signal) {
            (Some(c), _) => format!("{who}exited with code {c}"),
            (None, Some(s)) => format!("{who}killed by signal {s}"),
            _ => format!("{who}ended"),
        },
    }
}

/// Reconciles what a (re)connecting agent runs with what the server
/// expects there: replicas expected but not running are lost (their jobs
/// requeued per policy); running replicas the server no longer wants — a
/// stale attempt, a cancelled or preempted job — are stopped; the rest are
/// confirmed.
fn reconcile(
    shared: &Shared,
    state: &mut ClusterState,
    node: &str,
    running: &[ReplicaKey],
    now: u64,
    writes: &mut Vec<Write>,
    stops: &mut Vec<(String, ToAgent)>,
) {
    let reported: std::collections::HashSet<ReplicaKey> = running.iter().copied().collect();
    for key in running {
        let wanted = state.jobs.get(&key.job_id).is_some_and(|j| {
            j.attempt == key.attempt && j.state.is_active() && placed_on(j, key, Some(node))
        });
        if !wanted {
            refuse_stale(shared, state, Some(node), *key, true, now, writes, stops);
            continue;
        }
        let job = &state.jobs[&key.job_id];
        if job.cancel_requested || job.preempting.is_some() {
            let reason = if job.cancel_requested {
                "cancelled on request".to_string()
            } else {
                job.preempting.clone().unwrap_or_default()
            };
            stops.push((
                node.to_string(),
                ToAgent::Stop {
                    key: *key,
                    grace_ms: shared.kill_grace_ms,
                    reason,
                },
            ));
        }
    }
    let missing: Vec<JobId> = state
        .active
        .iter()
        .copied()
        .filter(|id| {
            let j = &state.jobs[id];
            j.placement.iter().any(|p| {
                p.node == node
                    && !reported.contains(&ReplicaKey {
                        job_id: j.id,
                        attempt: j.attempt,
                        replica: p.replica,
                    })
                    && j.replicas
                        .iter()
                        .find(|r| r.replica == p.replica)
                        .is_none_or(|r| r.state != ReplicaState::Exited)
            })
        })
        .collect();
    for id in missing {
        crate::fleet::lose_job(
            shared,
            state,
            id,
            node,
            &format!("node {node} reconnected without the job's replica running"),
            now,
            writes,
            stops,
        );
    }
}

/// On shutdown: stops every running replica (SIGTERM, then SIGKILL after the
/// grace period) and waits until the agents report them gone, so nothing
/// keeps running unseen. Their jobs are requeued per their node-loss policy.
pub async fn stop_all(shared: &Shared, wait: Duration) {
    shared
        .shutting_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    {
        let state = shared.state.lock().expect("state lock");
        let agents = shared.agents.lock().expect("agents lock");
        for id in &state.active {
            let job = &state.jobs[id];
            for p in &job.placement {
                // Work in a pool keeps running in its engine; the next
                // start finds it again.
                if crate::pools::is_pool_node(&state, &p.node) {
                    continue;
                }
                if let Some(tx) = agents.get(&p.node) {
                    let _ = tx.send(ToAgent::Stop {
                        key: ReplicaKey {
                            job_id: job.id,
                            attempt: job.attempt,
                            replica: p.replica,
                        },
                        grace_ms: shared.kill_grace_ms,
                        reason: "the server is shutting down".into(),
                    });
                }
            }
        }
    }
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let outside_pools = {
            let state = shared.state.lock().expect("state lock");
            state.active.iter().any(|id| {
                state.jobs[id]
                    .placement
                    .iter()
                    .any(|p| !crate::pools::is_pool_node(&state, &p.node))
            })
        };
        if !outside_pools {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the last reports reach the store: the writer applies batches in
    // order, so an empty batch behind them is a barrier.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = shared.store.submit(Vec::new()).await;
}

/// At start-up: jobs that were placed when the server stopped lost their
/// processes with it (the agent reaps them). Mark them lost and requeue them
/// per their retry policy.
pub fn recover_interrupted(shared: &Shared, state: &mut ClusterState, now: u64) -> Vec<Write> {
    let mut writes = Vec::new();
    // Jobs in pools run in their engines, not in this process: each pool's
    // task finds them again.
    let interrupted: Vec<JobId> = state
        .active
        .iter()
        .copied()
        .filter(|id| !crate::job_data::writing(&state.jobs[id]))
        .filter(|id| {
            !state.jobs[id]
                .placement
                .iter()
                .all(|p| crate::pools::is_pool_node(state, &p.node))
                || state.jobs[id].placement.is_empty()
        })
        .collect();
    for id in interrupted {
        let cancel = state.jobs[&id].cancel_requested;
        if cancel {
            finish(
                state,
                id,
                JobState::Cancelled,
                None,
                "cancelled; the server restarted while it was stopping".into(),
                now,
                &mut writes,
                shared,
            );
        } else {
            state.add_event(
                Event::new(
                    id,
                    now,
                    "lost",
                    "the server restarted while the job was running; its processes were stopped",
                ),
                &mut writes,
            );
            finish(
                state,
                id,
                JobState::Lost,
                None,
                "lost: the server restarted while the job was running".into(),
                now,
                &mut writes,
                shared,
            );
        }
    }
    writes
}
