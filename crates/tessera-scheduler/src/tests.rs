//! Scheduler tests: examples first, then property tests of the invariants.

use super::*;
use proptest::prelude::*;

const GI: u64 = 1 << 30;

fn res(cpu: u64, mem_gi: u64, gpu: u32) -> Resources {
    Resources {
        cpu_milli: cpu * 1000,
        memory_bytes: mem_gi * GI,
        gpu,
        gpu_milli: 0,
        gpu_models: vec![],
        node_selector: Default::default(),
    }
}

fn frac(milli: u32) -> Resources {
    Resources {
        gpu: 0,
        gpu_milli: milli,
        ..res(1, 1, 0)
    }
}

fn job(id: JobId, priority: i32, r: Resources, replicas: u32) -> PendingJob {
    PendingJob::new(id, "t", priority, id, r, replicas)
}

fn snap(nodes: Vec<NodeView>, queue: Vec<PendingJob>, policy: &str) -> Snapshot {
    Snapshot {
        nodes,
        queue,
        policy: Policy::named(policy).unwrap(),
        ..Snapshot::default()
    }
}

/// Preemptions without their reasons (victim, the job it makes room for),
/// in order: what [`crate::schedule_without_reasons`] keeps of them.
fn victims(plan: &Plan) -> Vec<(JobId, JobId)> {
    plan.preemptions
        .iter()
        .map(|p| (p.job_id, p.for_job))
        .collect()
}

fn placed(plan: &Plan, id: JobId) -> Option<&Placement> {
    plan.placements.iter().find(|p| p.job_id == id)
}

fn reason(plan: &Plan, id: JobId) -> &str {
    &plan.waiting.iter().find(|w| w.job_id == id).unwrap().reason
}

/// Makes the placements of `plan` running jobs of `snap`, started at `at`.
fn start(snap: &mut Snapshot, plan: &Plan, at: u64) {
    for p in &plan.placements {
        let i = snap.queue.iter().position(|j| j.id == p.job_id).unwrap();
        let job = snap.queue.remove(i);
        for a in &p.assignments {
            let n = &mut snap.nodes[a.node];
            n.free_cpu_milli -= job.resources.cpu_milli;
            n.free_memory_bytes -= job.resources.memory_bytes;
            for g in n.gpus.iter_mut().filter(|g| a.gpus.contains(&g.index)) {
                g.free_milli -= if job.resources.gpu > 0 {
                    1000
                } else {
                    job.resources.gpu_milli
                };
            }
        }
        snap.running.push(RunningJob {
            job,
            started_at: at,
            assignments: p.assignments.clone(),
            preemptible: true,
        });
    }
}

/// Ends a running job: its capacity is free again.
fn end(snap: &mut Snapshot, id: JobId) {
    let i = snap.running.iter().position(|r| r.job.id == id).unwrap();
    let r = snap.running.remove(i);
    for a in &r.assignments {
        let n = &mut snap.nodes[a.node];
        n.free_cpu_milli += r.job.resources.cpu_milli;
        n.free_memory_bytes += r.job.resources.memory_bytes;
        for g in n.gpus.iter_mut().filter(|g| a.gpus.contains(&g.index)) {
            g.free_milli += if r.job.resources.gpu > 0 {
                1000
            } else {
                r.job.resources.gpu_milli
            };
        }
    }
}

#[test]
fn priority_then_submit_order() {
    let s = snap(
        vec![NodeView::new("a", 2000, 4 * GI)],
        vec![
            job(1, 0, res(2, 1, 0), 1),
            job(2, 5, res(2, 1, 0), 1),
            job(3, 5, res(2, 1, 0), 1),
        ],
        "drf",
    );
    let plan = schedule(&s, 0);
    assert_eq!(plan.placements.len(), 1);
    assert!(
        placed(&plan, 2).is_some(),
        "highest priority, earliest submit wins"
    );
    assert!(
        reason(&plan, 3).contains("not enough free CPU"),
        "{}",
        reason(&plan, 3)
    );
}

#[test]
fn best_fit_packs_the_tightest_node() {
    let big = NodeView::new("big", 16000, 64 * GI);
    let mut small = NodeView::new("small", 4000, 16 * GI);
    small.free_cpu_milli = 2000;
    let plan = schedule(
        &snap(vec![big, small], vec![job(1, 0, res(2, 1, 0), 1)], "drf"),
        0,
    );
    assert_eq!(placed(&plan, 1).unwrap().assignments[0].node, 1);
}

#[test]
fn cpu_jobs_avoid_gpu_nodes_and_gpus_follow_models() {
    let s = snap(
        vec![
            NodeView::new("gpu", 8000, 32 * GI).with_gpus(4, "NVIDIA H100 80GB HBM3"),
            NodeView::new("cpu", 8000, 32 * GI),
            NodeView::new("a100", 8000, 32 * GI).with_gpus(4, "NVIDIA A100"),
        ],
        vec![
            job(1, 0, res(1, 1, 0), 1),
            job(
                2,
                0,
                Resources {
                    gpu_models: vec!["h100".into()],
                    node_selector: Default::default(),
                    ..res(1, 1, 2)
                },
                1,
            ),
        ],
        "tessera",
    );
    let plan = schedule(&s, 0);
    assert_eq!(placed(&plan, 1).unwrap().assignments[0].node, 1);
    let p2 = placed(&plan, 2).unwrap();
    assert_eq!(p2.assignments[0].node, 0);
    assert_eq!(p2.assignments[0].gpus, vec![0, 1]);
}

#[test]
fn unhealthy_and_busy_gpus_are_not_given_out() {
    let mut n = NodeView::new("n", 8000, 32 * GI).with_gpus(4, "H100");
    n.gpus[0].healthy = false;
    n.gpus[1].free_milli = 0;
    let plan = schedule(
        &snap(
            vec![n],
            vec![job(1, 0, res(1, 1, 2), 1), job(2, 0, res(1, 1, 1), 1)],
            "drf",
        ),
        0,
    );
    assert_eq!(placed(&plan, 1).unwrap().assignments[0].gpus, vec![2, 3]);
    assert!(reason(&plan, 2).contains("GPU"), "{}", reason(&plan, 2));
}

#[test]
fn gang_is_all_or_nothing() {
    let s = snap(
        vec![
            NodeView::new("a", 4000, 8 * GI),
            NodeView::new("b", 4000, 8 * GI),
        ],
        vec![job(1, 0, res(3, 1, 0), 3), job(2, 0, res(3, 1, 0), 2)],
        "tessera",
    );
    let plan = schedule(&s, 0);
    assert!(placed(&plan, 1).is_none());
    assert!(
        reason(&plan, 1).contains("at most 2 of the 3 replicas"),
        "{}",
        reason(&plan, 1)
    );
    let p2 = placed(&plan, 2).expect("the 2-gang fits after the 3-gang is rolled back");
    assert_eq!(p2.assignments.len(), 2);
    assert_ne!(p2.assignments[0].node, p2.assignments[1].node);
}

#[test]
fn gang_waiting_for_room_says_so() {
    let mut a = NodeView::new("a", 4000, 8 * GI);
    a.free_cpu_milli = 1000;
    let plan = schedule(
        &snap(
            vec![a, NodeView::new("b", 4000, 8 * GI)],
            vec![job(1, 0, res(3, 1, 0), 2)],
            "drf",
        ),
        0,
    );
    let r = reason(&plan, 1);
    assert!(
        r.contains("gang of 2") && r.contains("1 of 2 schedulable nodes"),
        "{r}"
    );
}

#[test]
fn infeasible_jobs_are_named_at_submit() {
    let nodes = vec![NodeView::new("a", 2000, 4 * GI).with_gpus(1, "H100")];
    let r = infeasible_reason(&nodes, &res(4, 1, 0), 1).unwrap();
    assert!(r.contains("largest node has 2 CPU"), "{r}");
    let r = infeasible_reason(
        &nodes,
        &Resources {
            gpu_models: vec!["A100".into()],
            node_selector: Default::default(),
            ..res(1, 1, 1)
        },
        1,
    )
    .unwrap();
    assert!(r.contains("0 GPU of model A100"), "{r}");
    let r = infeasible_reason(&nodes, &res(1, 1, 1), 2).unwrap();
    assert!(r.contains("at most 1 of the 2 replicas"), "{r}");
    assert!(infeasible_reason(&nodes, &res(2, 4, 1), 1).is_none());
    let big = vec![NodeView::new("b", 8000, 16 * GI).with_gpus(1, "H100")];
    assert!(
        infeasible_reason(&big, &frac(300), 3).is_none(),
        "3 x 0.3 share one GPU"
    );
    assert!(infeasible_reason(&big, &frac(600), 2).is_some());
    assert!(infeasible_reason(&[], &res(1, 1, 0), 1).is_some());
}

#[test]
fn cordoned_nodes_get_nothing_and_say_so() {
    let mut n = NodeView::new("a", 2000, 4 * GI);
    n.schedulable = false;
    let plan = schedule(
        &snap(vec![n], vec![job(1, 0, res(1, 1, 0), 1)], "tessera"),
        0,
    );
    assert!(plan.placements.is_empty());
    assert!(reason(&plan, 1).contains("no schedulable node"));
}

#[test]
fn strict_fifo_lets_nothing_pass_the_first_waiting_job() {
    let mut s = snap(
        vec![NodeView::new("a", 4000, 8 * GI)],
        vec![
            job(1, 0, res(3, 1, 0), 1),
            job(2, 0, res(2, 1, 0), 1),
            job(3, 0, res(1, 1, 0), 1),
        ],
        "fifo",
    );
    let plan = schedule(&s, 0);
    start(&mut s, &plan, 0);
    assert!(placed(&plan, 1).is_some());
    // Job 3 would fit in what is left, but job 2 is first.
    let plan = schedule(&s, 0);
    assert!(plan.placements.is_empty());
    assert!(
        reason(&plan, 3).contains("behind job 2"),
        "{}",
        reason(&plan, 3)
    );
}

#[test]
fn backfill_lets_short_jobs_pass_only_when_they_do_not_delay_the_first() {
    // Node a is busy until t=100 with job 1; job 2 needs both nodes whole.
    let mut s = snap(
        vec![
            NodeView::new("a", 4000, 8 * GI),
            NodeView::new("b", 4000, 8 * GI),
        ],
        vec![job(1, 0, res(4, 1, 0), 1)],
        "fifo-backfill",
    );
    s.queue[0].expected_runtime_ms = Some(100);
    let plan = schedule(&s, 0);
    start(&mut s, &plan, 0);
    let mut short = job(3, 0, res(2, 1, 0), 1);
    short.expected_runtime_ms = Some(50);
    let mut long = job(4, 0, res(2, 1, 0), 1);
    long.expected_runtime_ms = Some(500);
    s.queue = vec![job(2, 0, res(4, 1, 0), 2), short, long];
    let plan = schedule(&s, 10);
    assert!(placed(&plan, 2).is_none());
    assert!(
        placed(&plan, 3).is_some(),
        "ends at 60, before job 2 could start at 100"
    );
    assert!(placed(&plan, 4).is_none(), "would hold node b past 100");
    assert!(
        reason(&plan, 4).contains("held for job 2"),
        "{}",
        reason(&plan, 4)
    );
}

/// Large gangs are never starved by a stream of small jobs: however many
/// arrive, the gang starts as soon as the capacity it needs has been freed.
#[test]
fn a_stream_of_small_jobs_never_starves_a_gang() {
    for policy in ["tessera", "fifo-backfill", "fifo"] {
        let nodes: Vec<NodeView> = (0..4)
            .map(|i| NodeView::new(format!("n{i}"), 4000, 16 * GI))
            .collect();
        let mut s = snap(nodes, Vec::new(), policy);
        // Every node starts busy with one small job of unknown length.
        s.queue = (0..4).map(|i| job(100 + i, 0, res(1, 1, 0), 1)).collect();
        let plan = schedule(&s, 0);
        start(&mut s, &plan, 0);
        // The gang needs every CPU of every node.
        s.queue.push(job(1, 0, res(4, 1, 0), 4));
        let mut next_id = 1000;
        let mut started_at = None;
        for t in 1..40u64 {
            // Small jobs keep arriving, two per step, each wanting one CPU.
            for _ in 0..2 {
                s.queue
                    .push(PendingJob::new(next_id, "t", 0, t * 10, res(1, 1, 0), 1));
                next_id += 1;
            }
            // One running small job ends per step.
            if let Some(r) = s.running.iter().find(|r| r.job.id != 1).map(|r| r.job.id) {
                end(&mut s, r);
            }
            let plan = schedule(&s, t * 10);
            start(&mut s, &plan, t * 10);
            if s.running.iter().any(|r| r.job.id == 1) {
                started_at = Some(t);
                break;
            }
        }
        let t = started_at.unwrap_or_else(|| panic!("{policy}: the gang never started"));
        assert!(t <= 4, "{policy}: the gang waited {t} steps for 4 ends");
    }
}

#[test]
fn fractional_gpus_share_a_device_and_pack_together() {
    let n = NodeView::new("n", 16000, 64 * GI).with_gpus(2, "H100");
    let mut s = snap(vec![n], vec![job(1, 0, frac(500), 1)], "tessera");
    let plan = schedule(&s, 0);
    start(&mut s, &plan, 0);
    s.queue = vec![job(2, 0, frac(500), 1)];
    let plan = schedule(&s, 1);
    assert_eq!(
        placed(&plan, 2).unwrap().assignments[0].gpus,
        vec![0],
        "shares GPU 0 with job 1"
    );
    start(&mut s, &plan, 1);
    s.queue = vec![job(3, 0, frac(700), 1), job(4, 0, res(1, 1, 1), 1)];
    let plan = schedule(&s, 2);
    assert_eq!(placed(&plan, 3).unwrap().assignments[0].gpus, vec![1]);
    assert!(placed(&plan, 4).is_none(), "no whole GPU is left");
}

#[test]
fn fragmentation_packing_keeps_whole_gpus_for_whole_gpu_jobs() {
    // Node a has one GPU with 0.6 free; node b two whole GPUs. A 0.5 share
    // belongs on a, leaving b whole for the 2-GPU jobs that keep coming.
    let mut a = NodeView::new("a", 16000, 64 * GI).with_gpus(1, "H100");
    a.gpus[0].free_milli = 600;
    let b = NodeView::new("b", 16000, 64 * GI).with_gpus(2, "H100");
    let mut queue = vec![job(1, 0, frac(500), 1)];
    for i in 0..5 {
        queue.push(job(10 + i, -1, res(1, 1, 2), 1));
    }
    let plan = schedule(
        &snap(vec![a.clone(), b.clone()], queue.clone(), "tessera"),
        0,
    );
    assert_eq!(placed(&plan, 1).unwrap().assignments[0].node, 0);
    assert_eq!(
        placed(&plan, 10).unwrap().assignments[0].node,
        1,
        "b stayed whole for it"
    );
    // Plain best fit puts the share on the emptier-looking node and strands b.
    let mut s = snap(vec![a, b], queue, "tessera");
    s.policy.packing = Packing::BestFit;
    let plan = schedule(&s, 0);
    assert!(placed(&plan, 10).is_none() || placed(&plan, 1).unwrap().assignments[0].node == 0);
}

#[test]
fn fair_share_serves_the_team_with_the_smaller_share_first() {
    let mut s = snap(vec![NodeView::new("n", 5000, 16 * GI)], Vec::new(), "drf");
    s.queue = vec![
        PendingJob::new(1, "ads", 0, 0, res(2, 1, 0), 1),
        PendingJob::new(2, "vision", 0, 0, res(1, 1, 0), 1),
    ];
    let plan = schedule(&s, 0);
    start(&mut s, &plan, 0);
    // Ads holds 2 of 5 CPUs, vision 1; 2 are left. Ads submitted first.
    s.queue = vec![
        PendingJob::new(3, "ads", 0, 1, res(2, 1, 0), 1),
        PendingJob::new(4, "vision", 0, 2, res(2, 1, 0), 1),
    ];
    let plan = schedule(&s, 3);
    assert!(placed(&plan, 4).is_some(), "vision has the smaller share");
    assert!(placed(&plan, 3).is_none());
    // With four times the weight, ads' share counts a quarter: ads goes first.
    s.teams = vec![TeamView {
        name: "ads".into(),
        weight: 4.0,
        quota: None,
        recent_share: 0.0,
    }];
    let plan = schedule(&s, 3);
    assert!(placed(&plan, 3).is_some());
    assert!(placed(&plan, 4).is_none());
}

/// Four one-CPU slots, teams weighing 1 and 2, holding 1 and 2: their
/// weighted shares tie (1/4 = 2/4 / 2). The free slot goes to the heavier
/// team (1:3 is nearer 1:2 than 2:2 is), not to the team whose job queued
/// first — under a steady load the lighter team always has the oldest
/// waiting job, and that tie-break alone gave 50/50.
#[test]
fn a_fair_share_tie_goes_to_the_split_nearer_the_weights() {
    let nodes = vec![
        NodeView::new("local", 2000, 8 * GI),
        NodeView::new("pool-slurm", 2000, 8 * GI).with_label("pool", "slurm"),
    ];
    let mut s = snap(nodes, Vec::new(), "tessera");
    s.teams = vec![TeamView::new("light", 1.0), TeamView::new("heavy", 2.0)];
    s.queue = vec![
        PendingJob::new(1, "light", 0, 1, res(1, 0, 0), 1),
        PendingJob::new(2, "heavy", 0, 2, res(1, 0, 0), 1),
        PendingJob::new(3, "heavy", 0, 3, res(1, 0, 0), 1),
    ];
    let plan = schedule(&s, 10);
    start(&mut s, &plan, 10);
    assert_eq!(s.running.len(), 3);
    s.queue = vec![
        PendingJob::new(4, "light", 0, 4, res(1, 0, 0), 1),
        PendingJob::new(5, "heavy", 0, 5, res(1, 0, 0), 1),
    ];
    let plan = schedule(&s, 20);
    assert!(placed(&plan, 5).is_some(), "{plan:?}");
    assert!(placed(&plan, 4).is_none());
    // Recent history moves the rounding: a heavy team that has lately had
    // more than its weight yields the tie.
    s.teams[0].recent_share = 0.2;
    s.teams[1].recent_share = 0.4;
    let plan = schedule(&s, 20);
    assert!(placed(&plan, 4).is_some(), "{plan:?}");
    assert!(placed(&plan, 5).is_none());
}

/// Runs two teams with always-full queues of one-CPU jobs of 2–4 s on
/// `nodes` for an hour of virtual time, the way the server does (a pass
/// whenever a job ends, recent shares averaged by [`RecentShares`] when
/// `history`), and returns the heavier team's share of CPU-time after the
/// first ten minutes.
fn steady_share(nodes: Vec<NodeView>, weights: (f64, f64), history: bool) -> f64 {
    let mut s = snap(nodes, Vec::new(), "tessera");
    s.teams = vec![
        TeamView::new("light", weights.0),
        TeamView::new("heavy", weights.1),
    ];
    let mut recent = RecentShares::default();
    let mut next_id = 1;
    let mut ends: Vec<(u64, JobId)> = Vec::new();
    let mut cpu_ms = [0u64; 2];
    let (warmup, stop) = (600_000u64, 4_200_000u64);
    let mut t = 0u64;
    recent.observe(0, &BTreeMap::new());
    while t < stop {
        for team in ["light", "heavy"] {
            while s.queue.iter().filter(|j| j.team == team).count() < 6 {
                s.queue
                    .push(PendingJob::new(next_id, team, 0, t, res(1, 0, 0), 1));
                next_id += 1;
            }
        }
        if history {
            for tv in s.teams.iter_mut() {
                tv.recent_share = recent.get(&tv.name);
            }
        }
        let plan = schedule(&s, t);
        for p in &plan.placements {
            // 2 to 4 s, spread by the id.
            ends.push((t + 2000 + (p.job_id * 7919) % 2001, p.job_id));
        }
        start(&mut s, &plan, t);
        let next = ends.iter().map(|e| e.0).min().expect("something runs");
        recent.observe(next, &weighted_shares(&s, |_| true));
        for r in &s.running {
            let i = usize::from(r.job.team == "heavy");
            let from = t.max(warmup);
            if next > from {
                cpu_ms[i] += (next - from) * r.job.resources.cpu_milli / 1000;
            }
        }
        t = next;
        let done: Vec<JobId> = ends.iter().filter(|e| e.0 <= t).map(|e| e.1).collect();
        ends.retain(|e| e.0 > t);
        for id in done {
            end(&mut s, id);
        }
    }
    cpu_ms[1] as f64 / (cpu_ms[0] + cpu_ms[1]) as f64
}

/// Over time, two teams with full queues get CPU-time in the ratio of their
/// weights within 2 points even where whole jobs cannot split the cluster
/// in that ratio (4 or 5 slots for 1:2), because the rounding follows the
/// recent shares; without history the same fleets stay at 3/4 and 3/5.
#[test]
fn fair_share_over_time_follows_the_weights_on_small_fleets() {
    let fleet = |cpus: &[u64]| -> Vec<NodeView> {
        cpus.iter()
            .enumerate()
            .map(|(i, c)| NodeView::new(format!("n{i}"), c * 1000, 8 * GI))
            .collect()
    };
    for (cpus, weights) in [
        (vec![2, 2], (1.0, 2.0)),
        (vec![3, 2], (1.0, 2.0)),
        (vec![4, 2], (1.0, 2.0)),
        (vec![2, 2], (1.0, 3.0)),
        (vec![5, 2], (1.0, 3.0)),
    ] {
        let want = weights.1 / (weights.0 + weights.1);
        let got = steady_share(fleet(&cpus), weights, true);
        assert!(
            (got - want).abs() < 0.02,
            "{cpus:?} CPUs, weights {weights:?}: heavy team got {got:.3}, want {want:.3}"
        );
    }
    let without = steady_share(fleet(&[2, 2]), (1.0, 2.0), false);
    assert!((without - 0.75).abs() < 0.02, "{without}");
    let without = steady_share(fleet(&[3, 2]), (1.0, 2.0), false);
    assert!((without - 0.6).abs() < 0.02, "{without}");
}

#[test]
fn least_attained_service_preempts_the_job_that_has_had_most() {
    let mut s = snap(
        vec![NodeView::new("n", 2000, 8 * GI).with_gpus(1, "H100")],
        Vec::new(),
        "las",
    );
    s.queue = vec![job(1, 0, res(1, 1, 1), 1)];
    let plan = schedule(&s, 0);
    start(&mut s, &plan, 0);
    s.queue = vec![job(2, 0, res(1, 1, 1), 1)];
    // A job that would lose its progress is not preempted for the order.
    assert!(schedule(&s, 3_600_000).preemptions.is_empty());
    s.running[0].job.resumable = true;
    let plan = schedule(&s, 3_600_000);
    assert!(
        plan.placements.is_empty(),
        "room is made first, the job starts next pass"
    );
    assert_eq!(plan.preemptions.len(), 1);
    assert_eq!(
        (plan.preemptions[0].job_id, plan.preemptions[0].for_job),
        (1, 2)
    );
    assert!(
        reason(&plan, 2).contains("preempted job(s) 1"),
        "{}",
        reason(&plan, 2)
    );
    // Non-preemptive policies never do it.
    s.policy = Policy::named("sjf-oracle").unwrap();
    assert!(schedule(&s, 3_600_000).preemptions.is_empty());
}

#[test]
fn no_room_is_made_where_the_reservation_keeps_the_job_out() {
    let node = |name: &str| NodeView::new(name, 64_000, 512 * GI).with_gpus(8, "H100");
    let mut s = snap(vec![node("a"), node("b")], Vec::new(), "tessera");
    // One node full, two 1-GPU jobs on the other.
    s.queue = vec![
        job(1, 0, res(1, 1, 8), 1),
        job(2, 0, res(1, 1, 1), 1),
        job(3, 0, res(1, 1, 1), 1),
    ];
    let plan = schedule(&s, 0);
    assert_eq!(plan.placements.len(), 3);
    start(&mut s, &plan, 0);
    for r in s.running.iter_mut() {
        r.preemptible = r.job.id == 2;
        r.job.resumable = true;
    }
    // Without run-time bounds a reservation counts running jobs in the
    // snapshot's order: the full node's job last.
    s.running.rotate_left(1);
    assert_eq!(s.running[2].job.id, 1);
    // Job 4 needs a whole node and makes no room: it waits with capacity
    // held for it on the node of jobs 2 and 3, which is all job 5 could
    // use.
    let mut wide = job(4, 0, res(1, 1, 8), 1);
    wide.may_preempt = false;
    s.queue = vec![wide, job(5, 0, res(1, 1, 2), 1)];
    let plan = schedule(&s, 36_000_000);
    assert!(plan.placements.is_empty());
    // Stopping job 2 would free a GPU the reservation holds: job 5 would
    // still not start, and job 2 would take its room back.
    assert_eq!(victims(&plan), vec![]);
    // Without the reservation (job 4 gone) job 5 fits already.
    s.queue.remove(0);
    let plan = schedule(&s, 36_000_000);
    assert!(placed(&plan, 5).is_some());
}

#[test]
fn preemption_respects_priority_and_minimum_run_time() {
    let mut s = snap(
        vec![NodeView::new("n", 2000, 8 * GI)],
        Vec::new(),
        "tessera",
    );
    s.queue = vec![job(1, 10, res(2, 1, 0), 1)];
    let plan = schedule(&s, 0);
    start(&mut s, &plan, 0);
    // A lower-priority job never preempts a higher one.
    s.queue = vec![job(2, 0, res(2, 1, 0), 1)];
    assert!(schedule(&s, 10_000_000).preemptions.is_empty());
    // A higher-priority one does, once the victim has run its minimum.
    s.queue = vec![job(3, 20, res(2, 1, 0), 1)];
    assert!(schedule(&s, 1_000).preemptions.is_empty());
    assert_eq!(schedule(&s, 120_000).preemptions[0].job_id, 1);
    // Unless it is told not to preempt: then it waits for free capacity.
    s.queue[0].may_preempt = false;
    let plan = schedule(&s, 120_000);
    assert!(plan.preemptions.is_empty());
    assert!(
        reason(&plan, 3).starts_with("waiting for capacity"),
        "{}",
        reason(&plan, 3)
    );
    s.queue[0].may_preempt = true;
    // And never a job marked not preemptible.
    s.running[0].preemptible = false;
    assert!(schedule(&s, 120_000).preemptions.is_empty());
}

fn gpus(n: u64) -> Amounts {
    Amounts {
        cpu_milli: u64::MAX,
        memory_bytes: u64::MAX,
        gpu_milli: n * 1000,
    }
}

#[test]
fn borrowing_limits_hold_and_say_so() {
    let mut s = snap(
        vec![NodeView::new("n", 16000, 64 * GI).with_gpus(8, "H100")],
        Vec::new(),
        "tessera",
    );
    s.teams = vec![TeamView {
        name: "ads".into(),
        weight: 1.0,
        quota: Some(Quota {
            guaranteed: gpus(1),
            limit: gpus(2),
        }),
        recent_share: 0.0,
    }];
    s.queue = vec![PendingJob::new(1, "ads", 0, 0, res(1, 1, 1), 1)];
    let plan = schedule(&s, 0);
    start(&mut s, &plan, 0);
    s.queue = vec![
        PendingJob::new(2, "ads", 0, 1, res(1, 1, 2), 1),
        PendingJob::new(3, "ads", 0, 2, res(1, 1, 1), 1),
    ];
    let plan = schedule(&s, 5);
    assert!(
        placed(&plan, 2).is_none(),
        "1 + 2 GPUs is over the limit of 2"
    );
    assert!(
        reason(&plan, 2).contains("team quota") && reason(&plan, 2).contains("limit is 2"),
        "{}",
        reason(&plan, 2)
    );
    assert!(placed(&plan, 3).is_some(), "1 + 1 borrows within the limit");
}

#[test]
fn guarantees_are_reclaimed_from_borrowers_after_the_grace_period() {
    let mut s = snap(
        vec![NodeView::new("n", 16000, 64 * GI).with_gpus(8, "H100")],
        Vec::new(),
        "tessera",
    );
    s.teams = vec![TeamView {
        name: "own".into(),
        weight: 1.0,
        quota: Some(Quota {
            guaranteed: gpus(4),
            limit: gpus(8),
        }),
        recent_share: 0.0,
    }];
    // Team `bor` has no quota: all it runs is borrowed. It fills the node.
    s.queue = (0..8)
        .map(|i| {
            PendingJob::new(
                10 + i,
                "bor",
                if i == 3 { 5 } else { 0 },
                i,
                res(1, 1, 1),
                1,
            )
        })
        .collect();
    let plan = schedule(&s, 0);
    for (i, p) in plan.placements.iter().enumerate() {
        start(
            &mut s,
            &Plan {
                placements: vec![p.clone()],
                ..Plan::default()
            },
            i as u64 * 1000,
        );
    }
    assert_eq!(s.running.len(), 8);
    s.queue = vec![PendingJob::new(1, "own", 0, 100_000, res(1, 1, 2), 1)];
    let plan = schedule(&s, 110_000);
    assert!(
        plan.preemptions.is_empty(),
        "within the grace period nothing is reclaimed"
    );
    let plan = schedule(&s, 130_000);
    let victims: Vec<u64> = plan.preemptions.iter().map(|p| p.job_id).collect();
    // Lowest priority first (job 13 has priority 5), then most recently started.
    assert_eq!(victims, vec![17, 16]);
    assert!(plan
        .preemptions
        .iter()
        .all(|p| p.for_job == 1 && p.reason.contains("reclaimed")));
    assert!(
        reason(&plan, 1).contains("reclaiming"),
        "{}",
        reason(&plan, 1)
    );
    // Beyond its guarantee a team does not reclaim: it borrows like anyone.
    s.queue = vec![PendingJob::new(2, "own", 0, 100_000, res(1, 1, 5), 1)];
    assert!(schedule(&s, 130_000).preemptions.is_empty());
}

// ---- properties ----

fn arb_node(i: usize) -> impl Strategy<Value = NodeView> {
    (
        1u64..=16,
        1u64..=64,
        0u32..=8,
        any::<bool>(),
        0u64..=100,
        any::<bool>(),
    )
        .prop_map(move |(cpu, mem, gpus, h100, used_pct, schedulable)| {
            let mut n = NodeView::new(format!("n{i}"), cpu * 1000, mem * GI)
                .with_gpus(gpus, if h100 { "H100" } else { "A100" });
            n.free_cpu_milli = n.cpu_milli * (100 - used_pct) / 100;
            n.free_memory_bytes = n.memory_bytes * (100 - used_pct) / 100;
            for g in n.gpus.iter_mut() {
                g.free_milli = match (g.index as u64 * 37 + used_pct) % 4 {
                    0 => 0,
                    1 => 400,
                    _ => 1000,
                };
                g.healthy = !(g.index as u64 + used_pct).is_multiple_of(11);
            }
            n.schedulable = schedulable || i == 0;
            n
        })
}

fn arb_job(id: u64) -> impl Strategy<Value = PendingJob> {
    (
        1u64..=8000,
        1u64..=16,
        0u32..=4,
        1u32..=4,
        -2i32..=2,
        0u8..3,
        0u32..3,
        1u64..100_000,
    )
        .prop_map(
            move |(cpu, mem, gpu, replicas, priority, models, share, runtime)| {
                let mut j = PendingJob::new(
                    id,
                    format!("t{}", id % 3),
                    priority,
                    1000 + id * 7 % 13,
                    Resources {
                        cpu_milli: cpu,
                        memory_bytes: mem * GI / 2,
                        gpu: if share == 0 { gpu } else { 0 },
                        gpu_milli: if share == 0 { 0 } else { 250 * share },
                        gpu_models: match (gpu, models) {
                            (0, _) | (_, 0) => vec![],
                            (_, 1) => vec!["H100".into()],
                            _ => vec!["A100".into(), "H100".into()],
                        },
                        node_selector: Default::default(),
                    },
                    replicas,
                );
                j.expected_runtime_ms = Some(runtime);
                j.attained_ms = runtime * id % 5_000;
                j.resumable = id.is_multiple_of(2);
                j.may_preempt = id % 5 != 3;
                j
            },
        )
}

/// A snapshot with some jobs already running (placed by the scheduler
/// itself), and a policy.
fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    (
        1usize..8,
        0usize..40,
        0usize..15,
        0usize..Policy::NAMES.len(),
    )
        .prop_flat_map(|(n, j, r, p)| {
            (
                (0..n).map(arb_node).collect::<Vec<_>>(),
                (0..(j + r) as u64).map(arb_job).collect::<Vec<_>>(),
            )
                .prop_map(move |(nodes, mut queue)| {
                    let later = queue.split_off(r.min(queue.len()));
                    let mut s = Snapshot {
                        nodes,
                        queue,
                        policy: Policy::named("drf").unwrap(),
                        ..Snapshot::default()
                    };
                    let plan = schedule(&s, 0);
                    start(&mut s, &plan, 0);
                    s.queue = later;
                    s.policy = Policy::named(Policy::NAMES[p]).unwrap();
                    s
                })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// No node is over-allocated; GPUs given out are healthy, allowed and
    /// have room; cordoned nodes get nothing.
    #[test]
    fn no_node_over_allocated(snap in arb_snapshot()) {
        let plan = schedule(&snap, 10_000);
        let mut cpu = vec![0u64; snap.nodes.len()];
        let mut mem = vec![0u64; snap.nodes.len()];
        let mut gpu: Vec<std::collections::HashMap<u32, u32>> = vec![Default::default(); snap.nodes.len()];
        for p in &plan.placements {
            let job = snap.queue.iter().find(|j| j.id == p.job_id).unwrap();
            for a in &p.assignments {
                let node = &snap.nodes[a.node];
                prop_assert!(node.schedulable);
                cpu[a.node] += job.resources.cpu_milli;
                mem[a.node] += job.resources.memory_bytes;
                let want = if job.resources.gpu > 0 { job.resources.gpu as usize } else { usize::from(job.resources.gpu_milli > 0) };
                prop_assert_eq!(a.gpus.len(), want);
                for g in &a.gpus {
                    let slot = node.gpus.iter().find(|s| s.index == *g).unwrap();
                    prop_assert!(slot.healthy);
                    prop_assert!(job.resources.gpu_model_allowed(&slot.model));
                    *gpu[a.node].entry(*g).or_default() += if job.resources.gpu > 0 { 1000 } else { job.resources.gpu_milli };
                }
            }
        }
        for (i, n) in snap.nodes.iter().enumerate() {
            prop_assert!(cpu[i] <= n.free_cpu_milli);
            prop_assert!(mem[i] <= n.free_memory_bytes);
            for (g, used) in &gpu[i] {
                let slot = n.gpus.iter().find(|s| s.index == *g).unwrap();
                prop_assert!(*used <= slot.free_milli, "GPU {} over-allocated", g);
            }
        }
    }

    /// Every job is either placed whole (one assignment per replica) or
    /// waiting with a reason; never both, never neither.
    #[test]
    fn gangs_all_or_nothing_and_every_job_accounted(snap in arb_snapshot()) {
        let plan = schedule(&snap, 10_000);
        prop_assert_eq!(plan.placements.len() + plan.waiting.len(), snap.queue.len());
        for job in &snap.queue {
            let p = plan.placements.iter().find(|p| p.job_id == job.id);
            let w = plan.waiting.iter().find(|w| w.job_id == job.id);
            prop_assert!(p.is_some() != w.is_some());
            if let Some(p) = p {
                prop_assert_eq!(p.assignments.len() as u32, job.replicas);
                let mut replicas: Vec<u32> = p.assignments.iter().map(|a| a.replica).collect();
                replicas.sort();
                prop_assert_eq!(replicas, (0..job.replicas).collect::<Vec<_>>());
            }
            if let Some(w) = w {
                prop_assert!(!w.reason.is_empty());
            }
        }
    }

    /// Preemption only under preemptive policies, only of preemptible
    /// running jobs, each once, and always for a job that is waiting.
    #[test]
    fn preemptions_are_sound(snap in arb_snapshot()) {
        let plan = schedule(&snap, 10_000_000);
        if !snap.policy.preempt {
            prop_assert!(plan.preemptions.is_empty());
        }
        let mut seen = std::collections::HashSet::new();
        for p in &plan.preemptions {
            prop_assert!(snap.running.iter().any(|r| r.job.id == p.job_id && r.preemptible));
            prop_assert!(seen.insert(p.job_id), "job {} preempted twice", p.job_id);
            prop_assert!(plan.waiting.iter().any(|w| w.job_id == p.for_job));
        }
    }

    /// A team never goes past its borrowing limit through the plan.
    #[test]
    fn borrowing_limits_hold(snap in arb_snapshot()) {
        let plan = schedule(&snap, 10_000);
        for t in &snap.teams {
            let Some(q) = t.quota else { continue };
            let add = |used: &mut [u64; 3], j: &PendingJob| {
                let n = j.replicas as u64;
                used[0] += j.resources.cpu_milli * n;
                used[1] += j.resources.memory_bytes * n;
                used[2] += j.resources.gpu_demand_milli() * n;
            };
            let mut used = [0u64; 3];
            for r in snap.running.iter().filter(|r| r.job.team == t.name) {
                add(&mut used, &r.job);
            }
            let before = used;
            for p in &plan.placements {
                let j = snap.queue.iter().find(|j| j.id == p.job_id).unwrap();
                if j.team == t.name {
                    add(&mut used, j);
                }
            }
            let limit = [q.limit.cpu_milli, q.limit.memory_bytes, q.limit.gpu_milli];
            for r in 0..3 {
                prop_assert!(used[r] <= limit[r].max(before[r]), "team {} resource {} over its limit", t.name, r);
            }
        }
    }

    /// The scheduler is a function: same input, same plan.
    #[test]
    fn jobs_told_not_to_preempt_only_reclaim_their_guarantee(snap in arb_snapshot()) {
        let plan = schedule(&snap, 10_000);
        for p in &plan.preemptions {
            let job = snap.queue.iter().find(|j| j.id == p.for_job).unwrap();
            prop_assert!(
                job.may_preempt || p.reason.starts_with("reclaimed"),
                "job {} may not preempt, yet: {}", job.id, p.reason
            );
        }
    }

    #[test]
    fn deterministic(snap in arb_snapshot()) {
        prop_assert_eq!(schedule(&snap, 5), schedule(&snap, 5));
    }
}

#[test]
fn among_equal_placements_the_cheaper_node_wins() {
    let mut dear = NodeView::new("dear", 8000, 32 * GI).with_gpus(4, "H100");
    dear.price_per_hour = [0.1, 0.01, 4.0];
    let mut cheap = NodeView::new("cheap", 8000, 32 * GI).with_gpus(4, "H100");
    cheap.price_per_hour = [0.1, 0.01, 2.0];
    for policy in ["tessera", "drf"] {
        let plan = schedule(
            &snap(
                vec![dear.clone(), cheap.clone()],
                vec![job(1, 0, res(1, 1, 1), 1)],
                policy,
            ),
            0,
        );
        assert_eq!(placed(&plan, 1).unwrap().assignments[0].node, 1, "{policy}");
    }
}

/// Regression: under fair share, preempting another team's job for a team
/// that would then hold more than it made the next pass hand the room
/// straight back (found in the Philly replay: 94% of preemptions wasted).
/// Under `tessera` (adjusted by `policy`), on one node of 2 GPUs: resumable
/// one-GPU jobs of teams a and b started at time 0, and a third resumable
/// job of team a queued at 1 s.
fn two_teams_running_and_a_third_job_queued(policy: impl FnOnce(&mut Snapshot)) -> Snapshot {
    let mut s = snap(
        vec![NodeView::new("n", 8000, 32 * GI).with_gpus(2, "H100")],
        Vec::new(),
        "tessera",
    );
    policy(&mut s);
    s.queue = vec![
        PendingJob::new(1, "a", 0, 0, res(1, 1, 1), 1),
        PendingJob::new(2, "b", 0, 0, res(1, 1, 1), 1),
    ];
    for j in s.queue.iter_mut() {
        j.resumable = true;
    }
    let plan = schedule(&s, 0);
    start(&mut s, &plan, 0);
    let mut w = PendingJob::new(3, "a", 0, 1_000, res(1, 1, 1), 1);
    w.resumable = true;
    s.queue = vec![w];
    s
}

#[test]
fn fair_share_never_preempts_a_team_that_would_then_hold_less() {
    let s = two_teams_running_and_a_third_job_queued(|s| {
        // Shares before levels (`tessera` ranks levels first: see below).
        s.policy.level_before_share = false;
    });
    // Much later: both running jobs are levels above the new one.
    let plan = schedule(&s, 100 * 3_600_000);
    assert!(
        plan.preemptions.iter().all(|p| p.job_id != 2),
        "team b's job was preempted for team a, which would then hold both GPUs: {:?}",
        plan.preemptions
    );
    assert_eq!(
        plan.preemptions
            .iter()
            .map(|p| p.job_id)
            .collect::<Vec<_>>(),
        vec![1]
    );
}

/// Under `tessera`, levels of run time come before the teams' shares: a
/// job that has run less goes first whatever its team's share, the team
/// with the smaller share goes first among jobs of one level, and a job is
/// preempted only for one at a lower level — then whatever the teams'
/// shares, since the next pass still ranks the new job first.
#[test]
fn tessera_ranks_levels_of_run_time_before_shares() {
    let s = two_teams_running_and_a_third_job_queued(|_| {});
    // Much later: both running jobs are levels above the new one, which
    // takes the room of one of them (the one that ranks last: the same
    // time run, submitted at the same time, the greater id).
    let plan = schedule(&s, 100 * 3_600_000);
    assert_eq!(victims(&plan), vec![(2, 3)]);
    // The next pass does not hand the room back: job 2 is at a higher
    // level than job 3, and at the same level as job 1.
    let mut s2 = s.clone();
    end(&mut s2, 2);
    let mut back = PendingJob::new(2, "b", 0, 0, res(1, 1, 1), 1);
    back.resumable = true;
    back.attained_ms = 100 * 3_600_000;
    s2.queue.push(back);
    let plan = schedule(&s2, 100 * 3_600_000);
    assert!(placed(&plan, 3).is_some());
    assert!(plan.preemptions.is_empty(), "{:?}", plan.preemptions);
    // Within one level, not even across teams.
    let mut s3 = s.clone();
    s3.queue[0].attained_ms = 100 * 3_600_000 - 60_000;
    assert!(schedule(&s3, 100 * 3_600_000).preemptions.is_empty());

    // A short job passes another team's longer one however their shares
    // stand; among jobs of one level, the smaller share goes first.
    let node = NodeView::new("n", 8000, 32 * GI).with_gpus(2, "H100");
    let mut s = snap(vec![node], Vec::new(), "tessera");
    s.queue = vec![PendingJob::new(1, "a", 0, 0, res(1, 1, 1), 1)];
    let plan = schedule(&s, 0);
    start(&mut s, &plan, 0);
    let mut long = PendingJob::new(2, "b", 0, 0, res(1, 1, 1), 1);
    long.attained_ms = 3_600_000;
    s.queue = vec![long, PendingJob::new(3, "a", 0, 5, res(1, 1, 1), 1)];
    let plan = schedule(&s, 10);
    assert!(placed(&plan, 3).is_some(), "team a's new job has run less");
    assert!(placed(&plan, 2).is_none());
    s.queue[0].attained_ms = 0;
    let plan = schedule(&s, 10);
    assert!(placed(&plan, 2).is_some(), "same level: team b holds less");
    assert!(placed(&plan, 3).is_none());
}

// ---- the fast pass chooses exactly what the reference pass chooses ----

/// A richer snapshot for comparing against [`crate::reference`]: more teams
/// (some weighted, some under quota, one listed twice), jobs started at
/// different times (some not preemptible, some with a `max_runtime`), the
/// queue in any order, and a time at which minimum run times and reclaim
/// grace periods may or may not have passed.
fn arb_rich_snapshot() -> impl Strategy<Value = (Snapshot, u64)> {
    (
        arb_snapshot(),
        proptest::collection::vec((0u8..4, 1u8..4, 0u64..6, 0u64..6), 0..6),
        any::<u64>(),
        0u64..200_000,
        0u8..5,
    )
        .prop_map(|(mut s, teams, seed, now, runtime_every)| {
            let mut x = seed | 1;
            let mut rnd = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            for j in s
                .queue
                .iter_mut()
                .chain(s.running.iter_mut().map(|r| &mut r.job))
            {
                j.team = format!("t{}", rnd() % 5);
                if runtime_every > 0 && rnd() % u64::from(runtime_every) == 0 {
                    j.max_runtime_ms = Some(rnd() % 300_000);
                }
            }
            for r in s.running.iter_mut() {
                r.started_at = rnd() % 150_000;
                r.preemptible = rnd() % 5 != 0;
            }
            // Shuffle the queue: the plan must not depend on its order
            // beyond what the reference also depends on.
            for i in (1..s.queue.len()).rev() {
                let k = (rnd() % (i as u64 + 1)) as usize;
                s.queue.swap(i, k);
            }
            s.teams = teams
                .iter()
                .map(|(t, w, g, l)| TeamView {
                    name: format!("t{t}"),
                    weight: f64::from(*w) / 2.0,
                    quota: (g + l > 0).then(|| Quota {
                        guaranteed: Amounts {
                            gpu_milli: g * 1000,
                            cpu_milli: g * 4000,
                            ..Amounts::ZERO
                        },
                        limit: Amounts {
                            gpu_milli: (g + l) * 1000,
                            ..Amounts::UNLIMITED
                        },
                    }),
                    recent_share: if rnd() % 2 == 0 {
                        0.0
                    } else {
                        (rnd() % 9) as f64 / 8.0
                    },
                })
                .collect();
            (s, now)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    /// Same plan as the reference scheduler — placements, their order, every
    /// waiting job's reason (in the same order), preemptions — for every
    /// policy, queue order, team weights and quotas.
    #[test]
    fn same_plan_as_the_reference((snap, now) in arb_rich_snapshot()) {
        prop_assert_eq!(schedule(&snap, now), crate::reference::schedule(&snap, now));
    }

    /// A plan said to settle its snapshot does: with it applied, a pass at
    /// the same time places and preempts nothing. (Checked with the teams'
    /// quotas and without them, as quotas alone rule the claim out.)
    #[test]
    fn a_settling_plan_leaves_nothing_for_the_next_pass((snap, now) in arb_rich_snapshot()) {
        let mut unlimited = snap.clone();
        for t in unlimited.teams.iter_mut() {
            t.quota = None;
        }
        // Backfill under fair share, where the next pass may reserve for
        // another job: the policy that has both, one that adds fair share
        // to plain backfill, and one where the shares decide which running
        // jobs may be preempted (shares before levels).
        let mut variants = vec![snap, unlimited.clone()];
        let mut fair_backfill = Policy::named("fifo-backfill").unwrap();
        fair_backfill.fair_share = true;
        let mut shares_first = Policy::tessera();
        shares_first.level_before_share = false;
        shares_first.min_run_before_preempt_ms = 0;
        for policy in [Policy::tessera(), fair_backfill, shares_first] {
            variants.push(Snapshot { policy, ..unlimited.clone() });
        }
        for snap in variants {
            let (plan, settles) = crate::schedule_and_settle(&snap, now);
            let full = schedule(&snap, now);
            prop_assert_eq!(&plan.placements, &full.placements);
            prop_assert_eq!(victims(&plan), victims(&full));
            if settles {
                prop_assert!(!plan.placements.is_empty() && plan.preemptions.is_empty());
                let mut after = snap.clone();
                start(&mut after, &plan, now);
                let next = schedule(&after, now);
                prop_assert!(
                    next.placements.is_empty() && next.preemptions.is_empty(),
                    "policy {}: the pass after a settling plan placed {:?} and preempted {:?}",
                    snap.policy.name,
                    next.placements.iter().map(|p| p.job_id).collect::<Vec<_>>(),
                    victims(&next)
                );
            }
        }
    }

    /// Without reasons: the same placements and preemptions, no waiting list.
    #[test]
    fn without_reasons_same_placements((snap, now) in arb_rich_snapshot()) {
        let full = schedule(&snap, now);
        let lean = crate::schedule_without_reasons(&snap, now);
        prop_assert!(lean.waiting.is_empty());
        prop_assert_eq!(&lean.placements, &full.placements);
        prop_assert_eq!(victims(&lean), victims(&full));
        prop_assert!(lean.preemptions.iter().all(|p| p.reason.is_empty()));
    }
}

/// The same on large synthetic snapshots (thousands of jobs, many teams
/// under quota, some of the cluster busy), where the fast paths — stopping
/// early, skipping shapes known not to fit, the fair-share run — do most of
/// the work.
#[test]
fn same_plan_as_the_reference_at_scale() {
    for (seed, policy) in Policy::NAMES.iter().enumerate() {
        let mut x = seed as u64 * 7919 + 1;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let nodes: Vec<NodeView> = (0..60)
            .map(|i| {
                NodeView::new(format!("n{i}"), 64_000, 512 * GI).with_gpus(
                    if i % 10 == 9 { 0 } else { 8 },
                    if i % 3 == 0 { "A100" } else { "H100" },
                )
            })
            .collect();
        let queue: Vec<PendingJob> = (0..3000u64)
            .map(|id| {
                let kind = rnd(100);
                let (r, replicas) = if kind < 65 {
                    let g = [1, 1, 2, 4, 8][rnd(5) as usize];
                    let mut r = res(u64::from(g) * 6, u64::from(g) * 48, g);
                    if rnd(4) == 0 {
                        r.gpu_models = vec!["H100".into()];
                    }
                    (r, 1)
                } else if kind < 75 {
                    (frac(250 * (1 + rnd(3) as u32)), 1)
                } else if kind < 95 {
                    (res(1 + rnd(16), 2 + rnd(60), 0), 1)
                } else {
                    (res(48, 384, 8), 2 + rnd(3) as u32)
                };
                let mut j = PendingJob::new(
                    id + 1,
                    format!("team-{}", rnd(12)),
                    if rnd(10) == 0 { 5 } else { 0 },
                    rnd(10_000),
                    r,
                    replicas,
                );
                j.expected_runtime_ms = Some(1 + rnd(4_000_000));
                j.attained_ms = if rnd(3) == 0 { rnd(2_000_000) } else { 0 };
                j.resumable = true;
                j
            })
            .collect();
        let teams: Vec<TeamView> = (0..12)
            .map(|t| TeamView {
                name: format!("team-{t}"),
                weight: 1.0 + (t % 3) as f64,
                quota: (t % 4 != 3).then_some(Quota {
                    guaranteed: gpus(15),
                    limit: gpus(20 + t * 2),
                }),
                recent_share: 0.0,
            })
            .collect();
        // Fill part of the cluster with the first jobs, then queue the rest.
        let mut s = Snapshot {
            nodes,
            queue: queue[..400].to_vec(),
            teams,
            policy: Policy::named("drf").unwrap(),
            ..Snapshot::default()
        };
        let plan = schedule(&s, 0);
        start(&mut s, &plan, 0);
        s.queue = queue[400..].to_vec();
        s.policy = Policy::named(policy).unwrap();
        for now in [0, 45_000, 200_000, 5_000_000] {
            let full = schedule(&s, now);
            assert_eq!(
                full,
                crate::reference::schedule(&s, now),
                "policy {policy} at {now}"
            );
            let lean = crate::schedule_without_reasons(&s, now);
            assert!(lean.waiting.is_empty());
            assert_eq!(lean.placements, full.placements, "policy {policy} at {now}");
            assert_eq!(victims(&lean), victims(&full), "policy {policy} at {now}");
        }
    }
}

// ---- node selectors ----

fn select(mut r: Resources, pairs: &[(&str, &str)]) -> Resources {
    for (k, v) in pairs {
        r.node_selector.insert(k.to_string(), v.to_string());
    }
    r
}

#[test]
fn node_selectors_place_only_on_labelled_nodes_and_say_why_not() {
    // Alike but for their labels: the first node would win any tie.
    let us = NodeView::new("us", 8000, 32 * GI).with_label("region", "us");
    let eu = NodeView::new("eu", 8000, 32 * GI)
        .with_label("region", "eu")
        .with_label("pool", "lab");
    let jobs = vec![
        job(1, 0, select(res(1, 1, 0), &[("region", "eu")]), 1),
        job(
            2,
            0,
            select(res(1, 1, 0), &[("region", "eu"), ("pool", "lab")]),
            1,
        ),
        job(
            3,
            0,
            select(res(1, 1, 0), &[("region", "us"), ("pool", "lab")]),
            1,
        ),
        job(4, 0, res(1, 1, 0), 1),
    ];
    for policy in Policy::NAMES {
        let plan = schedule(&snap(vec![us.clone(), eu.clone()], jobs.clone(), policy), 0);
        assert_eq!(placed(&plan, 1).unwrap().assignments[0].node, 1, "{policy}");
        assert_eq!(placed(&plan, 2).unwrap().assignments[0].node, 1, "{policy}");
        assert!(placed(&plan, 3).is_none(), "{policy}");
        assert!(
            reason(&plan, 3).contains("region=us, pool=lab")
                || reason(&plan, 3).contains("pool=lab, region=us"),
            "{policy}: {}",
            reason(&plan, 3)
        );
        // Strict FIFO stops at the first job that waits.
        assert_eq!(placed(&plan, 4).is_some(), policy != "fifo", "{policy}");
    }
    // Refused at submission when no node that exists has the labels...
    let nodes = [us.clone(), eu.clone()];
    let why = infeasible_reason(&nodes, &select(res(1, 1, 0), &[("region", "asia")]), 1).unwrap();
    assert!(why.contains("region=asia"), "{why}");
    // ...and judged only against the labelled nodes otherwise.
    let big = select(res(6, 1, 0), &[("region", "eu")]);
    assert!(infeasible_reason(&nodes, &big, 1).is_none());
    let why = infeasible_reason(&nodes, &big, 2).unwrap();
    assert!(why.contains("at most 1 of the 2"), "{why}");
    // A cordoned labelled node: the job waits, and the reason names the labels.
    let mut cordoned = eu.clone();
    cordoned.schedulable = false;
    let plan = schedule(&snap(vec![us, cordoned], jobs[..1].to_vec(), "fifo"), 0);
    assert!(
        reason(&plan, 1).contains("region=eu"),
        "{}",
        reason(&plan, 1)
    );
}

/// Labels every node and gives selectors to a share of the queued jobs.
fn with_selectors(mut s: Snapshot) -> Snapshot {
    for (i, n) in s.nodes.iter_mut().enumerate() {
        if i % 3 != 2 {
            n.labels.insert("region".into(), ["eu", "us"][i % 2].into());
        }
        if i % 2 == 0 {
            n.labels.insert("pool".into(), "a".into());
        }
    }
    for j in s.queue.iter_mut() {
        match j.id % 4 {
            0 => {
                j.resources
                    .node_selector
                    .insert("region".into(), "eu".into());
            }
            1 => {
                j.resources
                    .node_selector
                    .insert("region".into(), "us".into());
                j.resources.node_selector.insert("pool".into(), "a".into());
            }
            2 => {
                j.resources.node_selector.insert("pool".into(), "a".into());
            }
            _ => {}
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Under every policy, a job runs only on nodes carrying every label it
    /// selects, even when alike nodes without them come first.
    #[test]
    fn selected_labels_always_hold(snap in arb_snapshot().prop_map(with_selectors)) {
        let plan = schedule(&snap, 10_000);
        for p in &plan.placements {
            let job = snap.queue.iter().find(|j| j.id == p.job_id).unwrap();
            for a in &p.assignments {
                let labels = &snap.nodes[a.node].labels;
                prop_assert!(
                    job.resources.selects(labels),
                    "job {} selects {:?} but went to {:?}",
                    job.id, job.resources.node_selector, labels
                );
            }
        }
        prop_assert_eq!(&plan, &schedule(&snap, 10_000));
        let fast = schedule_without_reasons(&snap, 10_000);
        prop_assert_eq!(&plan.placements, &fast.placements);
    }
}

/// The recent share is the mean of what was observed, also in the first
/// minutes after a start (the moving average is not pulled towards 0 by
/// the time before anything was seen), and forgets with its time constant.
#[test]
fn recent_shares_average_what_was_seen_from_the_start() {
    let mut recent = RecentShares::new(300_000);
    let held = |s: f64| BTreeMap::from([("a".to_string(), s)]);
    assert_eq!(recent.get("a"), 0.0, "nothing seen yet");
    recent.observe(0, &BTreeMap::new());
    recent.observe(10_000, &held(0.5));
    assert!((recent.get("a") - 0.5).abs() < 1e-9, "{}", recent.get("a"));
    assert_eq!(recent.get("b"), 0.0, "a team that held nothing");
    // Half of 20 s at 0.5, the other half at 0.1: about their mean.
    recent.observe(20_000, &held(0.1));
    assert!((recent.get("a") - 0.3).abs() < 0.01, "{}", recent.get("a"));
    // Long after, the old value is forgotten.
    recent.observe(20_000 + 3_000_000, &held(0.2));
    assert!((recent.get("a") - 0.2).abs() < 1e-3, "{}", recent.get("a"));
}

/// A job that can start now on a node does not take room in an engine's
/// queue instead (a pool's queue-ahead), however much cheaper the engine:
/// queue-ahead room is used only where no node can start the job now, and
/// under both packings.
#[test]
fn a_job_starts_now_rather_than_queue_in_an_engine_to_save_a_price() {
    for policy in ["fifo", "tessera"] {
        // The engine: 2 CPUs, all running, plus room for one job ahead;
        // free of charge. The own node: one CPU free, at a price.
        let mut engine = NodeView::new("engine", 2000, 8 * GI);
        engine.free_cpu_milli = 1000;
        engine.free_memory_bytes = GI;
        engine.ahead_cpu_milli = 1000;
        engine.ahead_memory_bytes = GI;
        let mut own = NodeView::new("own", 2000, 8 * GI);
        own.free_cpu_milli = 1000;
        own.price_per_hour = [1.0, 0.1, 0.0];
        let jobs = (1..=3)
            .map(|id| PendingJob::new(id, "t", 0, id, res(1, 0, 0), 1))
            .collect();
        let plan = schedule(&snap(vec![engine, own], jobs, policy), 10);
        let node_of = |id| placed(&plan, id).map(|p| p.assignments[0].node);
        assert_eq!(
            node_of(1),
            Some(1),
            "{policy}: the first starts on its own node now"
        );
        assert_eq!(
            node_of(2),
            Some(0),
            "{policy}: the next waits in the engine"
        );
        assert_eq!(node_of(3), None, "{policy}: no room left anywhere");
        // With the engine's room real (not ahead), the cheaper engine wins.
        let mut engine = NodeView::new("engine", 2000, 8 * GI);
        engine.free_cpu_milli = 1000;
        let mut own = NodeView::new("own", 2000, 8 * GI);
        own.free_cpu_milli = 1000;
        own.price_per_hour = [1.0, 0.1, 0.0];
        let jobs = vec![PendingJob::new(1, "t", 0, 1, res(1, 0, 0), 1)];
        let plan = schedule(&snap(vec![engine, own], jobs, policy), 10);
        assert_eq!(
            placed(&plan, 1).map(|p| p.assignments[0].node),
            Some(0),
            "{policy}"
        );
    }
}
