//! The scheduler as it was before the pass was made incremental (team and
//! shape indexes, the fair-share fast path, flat free capacity), kept
//! verbatim as an oracle: the property tests check that the current
//! [`crate::schedule`] returns exactly the plan this one returns.

#![allow(dead_code)]

mod order;
mod place;

use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;

use tessera_core::quantity::{format_cpu, format_memory};
use tessera_core::{JobId, Resources};

use self::order::{Key, Orderer};
use self::place::{Cluster, Demand};
use crate::policy::Policy;
use crate::{NodeView, PendingJob, Placement, Plan, Preemption, Quota, Snapshot, Waiting};

/// A request shape: within one pass, jobs of the same shape fit or fail
/// together while free capacity only shrinks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Shape<'a> {
    cpu: u64,
    mem: u64,
    gpu: u32,
    gpu_milli: u32,
    models: &'a [String],
    replicas: u32,
}

impl<'a> Shape<'a> {
    fn of(j: &'a PendingJob) -> Shape<'a> {
        Shape {
            cpu: j.resources.cpu_milli,
            mem: j.resources.memory_bytes,
            gpu: j.resources.gpu,
            gpu_milli: j.resources.gpu_milli,
            models: &j.resources.gpu_models,
            replicas: j.replicas,
        }
    }
}

/// Computes a plan. Pure: the same snapshot and time give the same plan.
pub fn schedule(snapshot: &Snapshot, now: u64) -> Plan {
    let policy = &snapshot.policy;
    let mut cluster = Cluster::new(
        &snapshot.nodes,
        &snapshot.queue,
        &snapshot.running,
        policy.packing,
    );
    let mut orderer = Orderer::new(snapshot, now);
    let mut plan = Plan::default();
    let mut failed: HashMap<(Shape, bool, bool), Arc<str>> = HashMap::default();
    // The reservation of the first job that could not start (backfill), or
    // the job that blocks all others (strict FIFO).
    let mut reservation: Option<place::Reservation> = None;
    let mut blocked_by: Option<Arc<str>> = None;
    let mut tried_reservation = false;
    let mut waiting_keys: Vec<(usize, Key)> = Vec::new();
    let mut usage = team_usage(snapshot);
    let team_quotas = quotas(snapshot);

    while let Some((qi, key)) = orderer.next() {
        let job = &snapshot.queue[qi];
        if let Some(reason) = over_limit(&team_quotas, &usage, job) {
            plan.waiting.push(Waiting {
                job_id: job.id,
                reason: reason.into(),
            });
            waiting_keys.push((qi, key));
            continue;
        }
        if let Some(reason) = &blocked_by {
            plan.waiting.push(Waiting {
                job_id: job.id,
                reason: reason.clone(),
            });
            waiting_keys.push((qi, key));
            continue;
        }
        // Whether this job would be gone before the reserved one could start.
        let in_time = reservation.as_ref().is_some_and(|r| {
            bound(job, policy).is_some_and(|b| now.saturating_add(b) <= r.start_at)
        });
        // Same shape, same outcome within a pass (free capacity only shrinks,
        // the reservation does not change once made).
        let cache_key = (Shape::of(job), reservation.is_some(), in_time);
        if let Some(reason) = failed.get(&cache_key) {
            plan.waiting.push(Waiting {
                job_id: job.id,
                reason: reason.clone(),
            });
            waiting_keys.push((qi, key));
            continue;
        }
        let demand = Demand::of(job);
        let placed = match &reservation {
            None => cluster.place(&demand, None),
            // Outside what the reserved job needs, or anywhere when this job
            // is sure to be gone before that job could start.
            Some(r) => cluster.place(&demand, Some(r)).or_else(|| {
                if in_time {
                    cluster.place(&demand, None)
                } else {
                    None
                }
            }),
        };
        match placed {
            Some(assignments) => {
                orderer.placed(qi);
                let d = job_amounts(job);
                let u = usage.entry(job.team.as_str()).or_insert([0; 3]);
                for r in 0..3 {
                    u[r] += d[r];
                }
                plan.placements.push(Placement {
                    job_id: job.id,
                    assignments,
                });
            }
            None => {
                let mut reason = explain(&snapshot.nodes, &cluster, &job.resources, job.replicas);
                if let Some(r) = &reservation {
                    reason.push_str(&format!(
                        "; capacity it could use is held for job {}, which waits ahead of it",
                        r.job_id
                    ));
                }
                if policy.strict {
                    blocked_by = Some(Arc::from(format!(
                        "behind job {}: under strict FIFO no job passes the first one waiting",
                        job.id
                    )));
                } else if policy.backfill && !tried_reservation {
                    tried_reservation = true;
                    reservation =
                        cluster.reserve(job, &demand, &snapshot.running, now, |j| bound(j, policy));
                    if reservation.is_some() {
                        reason.push_str("; capacity is held for it as running jobs end");
                    }
                }
                let reason: Arc<str> = reason.into();
                failed.insert(cache_key, reason.clone());
                plan.waiting.push(Waiting {
                    job_id: job.id,
                    reason,
                });
                waiting_keys.push((qi, key));
            }
        }
    }

    let mut used = vec![false; snapshot.running.len()];
    if policy.preempt && !snapshot.running.is_empty() {
        preempt(
            snapshot,
            now,
            &mut cluster,
            &orderer,
            &waiting_keys,
            reservation.as_ref(),
            &usage,
            &mut used,
            &mut plan,
        );
    }
    if snapshot.teams.iter().any(|t| t.quota.is_some()) && !snapshot.running.is_empty() {
        reclaim(
            snapshot,
            now,
            &mut cluster,
            &waiting_keys,
            &mut usage,
            &mut used,
            &mut plan,
        );
    }
    plan
}

const RESOURCE_NAMES: [&str; 3] = ["CPU", "memory", "GPU"];

/// A job's total demand: CPU millicores, memory bytes, GPU thousandths.
fn job_amounts(job: &PendingJob) -> [u64; 3] {
    let n = job.replicas as u64;
    [
        job.resources.cpu_milli * n,
        job.resources.memory_bytes * n,
        job.resources.gpu_demand_milli() * n,
    ]
}

/// What each team's running jobs hold.
fn team_usage(snapshot: &Snapshot) -> HashMap<&str, [u64; 3]> {
    let mut usage: HashMap<&str, [u64; 3]> = HashMap::default();
    for r in &snapshot.running {
        let d = job_amounts(&r.job);
        let u = usage.entry(r.job.team.as_str()).or_insert([0; 3]);
        for k in 0..3 {
            u[k] += d[k];
        }
    }
    usage
}

/// Team quotas by name, looked up once per job.
type Quotas<'a> = HashMap<&'a str, &'a Quota>;

fn quotas(snapshot: &Snapshot) -> Quotas<'_> {
    snapshot
        .teams
        .iter()
        .filter_map(|t| t.quota.as_ref().map(|q| (t.name.as_str(), q)))
        .collect()
}

fn show_amount(r: usize, v: u64) -> String {
    if v == u64::MAX {
        return "unlimited".into();
    }
    match r {
        1 => format_memory(v),
        // CPU millicores and GPU thousandths read the same way.
        _ => format_cpu(v),
    }
}

/// Why placing `job` would take its team past its borrowing limit.
fn over_limit(
    quotas: &Quotas,
    usage: &HashMap<&str, [u64; 3]>,
    job: &PendingJob,
) -> Option<String> {
    let q = quotas.get(job.team.as_str())?;
    let used = usage.get(job.team.as_str()).copied().unwrap_or([0; 3]);
    let need = job_amounts(job);
    let limit = q.limit.as_array();
    let guaranteed = q.guaranteed.as_array();
    (0..3).find(|r| need[*r] > 0 && used[*r].saturating_add(need[*r]) > limit[*r]).map(|r| {
        format!(
            "team quota: team `{}` holds {} {} and this job needs {} more; its limit is {} (guaranteed {})",
            job.team,
            show_amount(r, used[r]),
            RESOURCE_NAMES[r],
            show_amount(r, need[r]),
            show_amount(r, limit[r]),
            show_amount(r, guaranteed[r]),
        )
    })
}

/// Reclaims guaranteed quota: a waiting job whose team stays within its
/// guarantee (counting the job) and has waited past the grace period gets
/// room by preempting jobs of teams that borrow beyond their guarantee —
/// lowest priority first, then the most recently started.
fn reclaim<'a>(
    snapshot: &'a Snapshot,
    now: u64,
    cluster: &mut Cluster,
    waiting: &[(usize, Key)],
    usage: &mut HashMap<&'a str, [u64; 3]>,
    used: &mut [bool],
    plan: &mut Plan,
) {
    let grace = snapshot.policy.reclaim_after_ms;
    let quotas = quotas(snapshot);
    let already: std::collections::HashSet<JobId> =
        plan.preemptions.iter().map(|p| p.for_job).collect();
    let mut reasons: HashMap<JobId, String> = HashMap::default();
    for (qi, _) in waiting {
        let job = &snapshot.queue[*qi];
        if already.contains(&job.id) || now.saturating_sub(job.submitted_at) < grace {
            continue;
        }
        let Some(q) = quotas.get(job.team.as_str()) else {
            continue;
        };
        let need = job_amounts(job);
        let mine = usage.get(job.team.as_str()).copied().unwrap_or([0; 3]);
        let guaranteed = q.guaranteed.as_array();
        if (0..3).any(|r| need[r] > 0 && mine[r] + need[r] > guaranteed[r]) {
            continue;
        }
        // Borrowers: teams above their guarantee in a resource this job needs.
        let borrowing = |team: &str| {
            let u = usage.get(team).copied().unwrap_or([0; 3]);
            let g = quotas
                .get(team)
                .map(|q| q.guaranteed.as_array())
                .unwrap_or([0; 3]);
            (0..3).any(|r| need[r] > 0 && u[r] > g[r])
        };
        let mut pool: Vec<usize> = (0..snapshot.running.len())
            .filter(|i| {
                let r = &snapshot.running[*i];
                !used[*i] && r.preemptible && r.job.team != job.team && borrowing(&r.job.team)
            })
            .collect();
        if pool.is_empty() {
            continue;
        }
        pool.sort_by_key(|i| {
            let r = &snapshot.running[*i];
            (r.job.priority, std::cmp::Reverse(r.started_at), r.job.id)
        });
        let demand = Demand::of(job);
        let Some(chosen) = cluster.make_room(&demand, &pool, &snapshot.running, None) else {
            continue;
        };
        let mut names = Vec::new();
        for i in chosen {
            used[i] = true;
            let v = &snapshot.running[i];
            let d = job_amounts(&v.job);
            if let Some(u) = usage.get_mut(v.job.team.as_str()) {
                for r in 0..3 {
                    u[r] = u[r].saturating_sub(d[r]);
                }
            }
            names.push(v.job.id.to_string());
            plan.preemptions.push(Preemption {
                job_id: v.job.id,
                for_job: job.id,
                reason: format!(
                    "reclaimed: team `{}` borrows beyond its guaranteed quota, and team `{}` needs its guarantee for job {}",
                    v.job.team, job.team, job.id
                ),
            });
        }
        let u = usage.entry(job.team.as_str()).or_insert([0; 3]);
        for r in 0..3 {
            u[r] += need[r];
        }
        reasons.insert(
            job.id,
            format!(
                "reclaiming team `{}`'s guaranteed quota: starting once job(s) {} of borrowing teams have stopped",
                job.team,
                names.join(", ")
            ),
        );
    }
    for w in plan.waiting.iter_mut() {
        if let Some(r) = reasons.remove(&w.job_id) {
            w.reason = r.into();
        }
    }
}

/// A job's run-time bound: its `max_runtime`, or (oracle policies) its
/// known duration less what it has run.
fn bound(job: &PendingJob, policy: &Policy) -> Option<u64> {
    job.max_runtime_ms.or(if policy.oracle_bounds {
        job.expected_runtime_ms
            .map(|e| e.saturating_sub(job.attained_ms))
    } else {
        None
    })
}

/// Chooses victims for waiting jobs, best-ordered waiting job first. A
/// victim must come later in the order than the job it makes room for, be
/// preemptible and have run long enough; each is used once.
#[allow(clippy::too_many_arguments)]
fn preempt(
    snapshot: &Snapshot,
    now: u64,
    cluster: &mut Cluster,
    orderer: &Orderer,
    waiting: &[(usize, Key)],
    reservation: Option<&place::Reservation>,
    usage: &HashMap<&str, [u64; 3]>,
    used: &mut [bool],
    plan: &mut Plan,
) {
    let policy = &snapshot.policy;
    // Under fair share, a job may take room from another team only while its
    // own team, room included, stays below that team's weighted dominant
    // share; otherwise the next pass would hand the room straight back.
    let mut total = [0u64; 3];
    for n in snapshot.nodes.iter().filter(|n| n.schedulable) {
        total[0] += n.cpu_milli;
        total[1] += n.memory_bytes;
        total[2] += n.gpus.iter().filter(|g| g.healthy).count() as u64 * 1000;
    }
    let weight = |team: &str| {
        snapshot
            .teams
            .iter()
            .find(|t| t.name == team)
            .map(|t| t.weight)
            .unwrap_or(1.0)
            .max(1e-9)
    };
    let share = |team: &str, extra: [u64; 3]| {
        let u = usage.get(team).copied().unwrap_or([0; 3]);
        let mut s: f64 = 0.0;
        for r in 0..3 {
            if total[r] > 0 {
                s = s.max((u[r] + extra[r]) as f64 / total[r] as f64);
            }
        }
        s / weight(team)
    };
    let mut victims: Vec<(Key, usize)> = snapshot
        .running
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.preemptible && now.saturating_sub(r.started_at) >= policy.min_run_before_preempt_ms
        })
        .map(|(i, r)| (orderer.running_key(r), i))
        .collect();
    // Worst first.
    victims.sort_by_key(|v| std::cmp::Reverse(v.0));
    let mut reasons: HashMap<JobId, String> = HashMap::default();
    // A shape that could not make room cannot for a later job either: later
    // jobs are worse-ordered, so fewer running jobs may yield to them.
    // By team only where the team decides which victims are eligible.
    let team_decides = policy.fair_share && !policy.level_before_share;
    let mut no_room: std::collections::HashSet<(Shape, &str, bool)> = Default::default();
    for (qi, key) in waiting {
        let job = &snapshot.queue[*qi];
        if !job.may_preempt {
            continue;
        }
        // Room only where the walk would place it: outside the reservation
        // unless it is the reserved job or gone before that one could start.
        let excluding = reservation.filter(|r| {
            r.job_id != job.id
                && bound(job, policy).is_none_or(|b| now.saturating_add(b) > r.start_at)
        });
        let fenced = excluding.is_some();
        let room_key = (
            Shape::of(job),
            if team_decides { job.team.as_str() } else { "" },
            fenced,
        );
        if no_room.contains(&room_key) {
            continue;
        }
        let mine_after = share(&job.team, job_amounts(job));
        // A victim comes later in the order; unless it is of a lower
        // priority class, it must also keep its progress when stopped, and
        // under fair share belong to this team or to a team that would
        // still hold more than this one.
        let eligible = |k: &Key, i: usize| {
            let v = &snapshot.running[i].job;
            !used[i]
                && k.ranks_after(key)
                && (k.class() > key.class()
                    || (v.resumable
                        && (!policy.fair_share
                            || policy.level_before_share
                            || v.team == job.team
                            || mine_after < share(&v.team, [0; 3]))))
        };
        let pool: Vec<usize> = victims
            .iter()
            .filter(|(k, i)| eligible(k, *i))
            .map(|(_, i)| *i)
            .collect();
        if pool.is_empty() {
            // Victims only get better-ordered from here on.
            if victims.iter().all(|(k, i)| used[*i] || !k.ranks_after(key)) {
                break;
            }
            continue;
        }
        let demand = Demand::of(job);
        let made = cluster.make_room(&demand, &pool, &snapshot.running, excluding);
        if made.is_none() {
            no_room.insert(room_key.clone());
        }
        if let Some(chosen) = made {
            let names: Vec<String> = chosen
                .iter()
                .map(|i| snapshot.running[*i].job.id.to_string())
                .collect();
            for i in &chosen {
                used[*i] = true;
                let v = &snapshot.running[*i];
                plan.preemptions.push(Preemption {
                    job_id: v.job.id,
                    for_job: job.id,
                    reason: format!(
                        "preempted for job {} ({}), which comes first under policy `{}`",
                        job.id,
                        orderer.describe(job),
                        policy.name
                    ),
                });
            }
            reasons.insert(
                job.id,
                format!(
                    "starting once preempted job(s) {} have stopped",
                    names.join(", ")
                ),
            );
        }
    }
    for w in plan.waiting.iter_mut() {
        if let Some(r) = reasons.remove(&w.job_id) {
            w.reason = r.into();
        }
    }
}

/// Over nodes with a multiplicity (alike nodes counted once, weighted).
fn infeasible_among(live: &[(&NodeView, u64)], r: &Resources, replicas: u32) -> Option<String> {
    if live.is_empty() {
        return Some("the cluster has no nodes".into());
    }
    let slots: u64 = live
        .iter()
        .map(|(n, count)| place::slots_when_empty(n, r).saturating_mul(*count))
        .fold(0u64, |a, b| a.saturating_add(b));
    if slots == 0 {
        return Some(format!(
            "no node can ever fit one replica: each needs {}; {}",
            describe(r),
            largest_node(live, r)
        ));
    }
    if slots < replicas as u64 {
        return Some(format!(
            "the cluster can hold at most {slots} of the {replicas} replicas at once (each needs {}), and a gang starts all replicas together",
            describe(r)
        ));
    }
    None
}

fn describe(r: &Resources) -> String {
    let mut s = format!(
        "{} CPU, {} memory",
        format_cpu(r.cpu_milli),
        format_memory(r.memory_bytes)
    );
    if r.gpu > 0 {
        s.push_str(&format!(", {} GPU", r.gpu));
    } else if r.gpu_milli > 0 {
        s.push_str(&format!(", {} of a GPU", r.gpu_milli as f64 / 1000.0));
    }
    if r.wants_gpu() && !r.gpu_models.is_empty() {
        s.push_str(&format!(" ({})", r.gpu_models.join(" or ")));
    }
    s
}

fn largest_node(nodes: &[(&NodeView, u64)], r: &Resources) -> String {
    let max_cpu = nodes.iter().map(|(n, _)| n.cpu_milli).max().unwrap_or(0);
    let max_mem = nodes.iter().map(|(n, _)| n.memory_bytes).max().unwrap_or(0);
    let max_gpu = nodes
        .iter()
        .map(|(n, _)| {
            n.gpus
                .iter()
                .filter(|g| g.healthy && r.gpu_model_allowed(&g.model))
                .count()
        })
        .max()
        .unwrap_or(0);
    let mut s = format!(
        "the largest node has {} CPU, {} memory",
        format_cpu(max_cpu),
        format_memory(max_mem)
    );
    if r.wants_gpu() {
        if r.gpu_models.is_empty() {
            s.push_str(&format!(", {max_gpu} GPU"));
        } else {
            s.push_str(&format!(
                ", {max_gpu} GPU of model {}",
                r.gpu_models.join(" or ")
            ));
        }
    }
    s
}

/// A reason for a job that did not fit in this pass.
fn explain(nodes: &[NodeView], cluster: &Cluster, r: &Resources, replicas: u32) -> String {
    // Alike nodes answer alike: look at one node of each class, weighted.
    let live: Vec<(&NodeView, u64)> = cluster
        .classes()
        .filter(|(n, _)| nodes[*n].schedulable)
        .map(|(n, count)| (&nodes[n], count as u64))
        .collect();
    let schedulable: u64 = live.iter().map(|(_, c)| c).sum();
    if schedulable == 0 {
        return format!(
            "no schedulable node: all {} node(s) are cordoned, draining or lost",
            nodes.len()
        );
    }
    if let Some(why) = infeasible_among(&live, r, replicas) {
        return format!("cannot run on the schedulable nodes: {why}");
    }
    let need = describe(r);
    let short = cluster.short_of(r);
    let fit_now = cluster.nodes_fitting(r);
    let binding = if short.is_empty() && fit_now > 0 {
        "not enough room for all replicas at once".to_string()
    } else if short.is_empty() {
        "no single node has all of it free at once".to_string()
    } else {
        format!("not enough free {} on any node", short.join(" and "))
    };
    if replicas > 1 {
        format!(
            "waiting for capacity: a gang of {replicas} replicas, each needing {need}, starts all together; {fit_now} of {schedulable} schedulable nodes fit a replica now ({binding})"
        )
    } else {
        format!("waiting for capacity: needs {need}; {binding}")
    }
}
