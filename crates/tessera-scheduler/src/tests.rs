//! Scheduler tests: examples first, then property tests of the invariants.

use super::*;
use proptest::prelude::*;

const GI: u64 = 1 << 30;

fn res(cpu: u64, mem_gi: u64, gpu: u32) -> Resources {
    Resources {
        cpu_milli: cpu * 1000,
        memory_bytes: mem_gi * GI,
        gpu,
        gpu_models: vec![],
    }
}

fn job(id: JobId, priority: i32, r: Resources, replicas: u32) -> PendingJob {
    PendingJob {
        id,
        team: "t".into(),
        priority,
        submitted_at: id,
        resources: r,
        replicas,
    }
}

fn placed(plan: &Plan, id: JobId) -> Option<&Placement> {
    plan.placements.iter().find(|p| p.job_id == id)
}

fn reason(plan: &Plan, id: JobId) -> &str {
    &plan.waiting.iter().find(|w| w.job_id == id).unwrap().reason
}

#[test]
fn priority_then_submit_order() {
    let snap = Snapshot {
        nodes: vec![NodeView::new("a", 2000, 4 * GI)],
        queue: vec![
            job(1, 0, res(2, 1, 0), 1),
            job(2, 5, res(2, 1, 0), 1),
            job(3, 5, res(2, 1, 0), 1),
        ],
    };
    let plan = schedule(&snap, 0);
    assert_eq!(plan.placements.len(), 1);
    assert!(
        placed(&plan, 2).is_some(),
        "highest priority, earliest submit wins"
    );
    assert!(reason(&plan, 3).contains("not enough free CPU"));
    assert!(
        reason(&plan, 1).contains("1 job ahead"),
        "{}",
        reason(&plan, 1)
    );
}

#[test]
fn best_fit_packs_the_tightest_node() {
    let mut big = NodeView::new("big", 16000, 64 * GI);
    big.free_cpu_milli = 16000;
    let mut small = NodeView::new("small", 4000, 16 * GI);
    small.free_cpu_milli = 2000;
    let snap = Snapshot {
        nodes: vec![big, small],
        queue: vec![job(1, 0, res(2, 1, 0), 1)],
    };
    let plan = schedule(&snap, 0);
    assert_eq!(placed(&plan, 1).unwrap().assignments[0].node, 1);
}

#[test]
fn cpu_jobs_avoid_gpu_nodes_and_gpus_follow_models() {
    let snap = Snapshot {
        nodes: vec![
            NodeView::new("gpu", 8000, 32 * GI).with_gpus(4, "NVIDIA H100 80GB HBM3"),
            NodeView::new("cpu", 8000, 32 * GI),
            NodeView::new("a100", 8000, 32 * GI).with_gpus(4, "NVIDIA A100"),
        ],
        queue: vec![
            job(1, 0, res(1, 1, 0), 1),
            job(
                2,
                0,
                Resources {
                    gpu_models: vec!["h100".into()],
                    ..res(1, 1, 2)
                },
                1,
            ),
        ],
    };
    let plan = schedule(&snap, 0);
    assert_eq!(placed(&plan, 1).unwrap().assignments[0].node, 1);
    let p2 = placed(&plan, 2).unwrap();
    assert_eq!(p2.assignments[0].node, 0);
    assert_eq!(p2.assignments[0].gpus, vec![0, 1]);
}

#[test]
fn unhealthy_and_busy_gpus_are_not_given_out() {
    let mut n = NodeView::new("n", 8000, 32 * GI).with_gpus(4, "H100");
    n.gpus[0].healthy = false;
    n.gpus[1].free = false;
    let snap = Snapshot {
        nodes: vec![n],
        queue: vec![job(1, 0, res(1, 1, 2), 1), job(2, 0, res(1, 1, 1), 1)],
    };
    let plan = schedule(&snap, 0);
    assert_eq!(placed(&plan, 1).unwrap().assignments[0].gpus, vec![2, 3]);
    assert!(reason(&plan, 2).contains("GPU"), "{}", reason(&plan, 2));
}

#[test]
fn gang_is_all_or_nothing() {
    let snap = Snapshot {
        nodes: vec![
            NodeView::new("a", 4000, 8 * GI),
            NodeView::new("b", 4000, 8 * GI),
        ],
        queue: vec![job(1, 0, res(3, 1, 0), 3), job(2, 0, res(3, 1, 0), 2)],
    };
    let plan = schedule(&snap, 0);
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
fn infeasible_jobs_are_named_at_submit() {
    let nodes = vec![NodeView::new("a", 2000, 4 * GI).with_gpus(1, "H100")];
    let r = infeasible_reason(&nodes, &res(4, 1, 0), 1).unwrap();
    assert!(r.contains("largest node has 2 CPU"), "{r}");
    let r = infeasible_reason(
        &nodes,
        &Resources {
            gpu_models: vec!["A100".into()],
            ..res(1, 1, 1)
        },
        1,
    )
    .unwrap();
    assert!(r.contains("0 GPU of model A100"), "{r}");
    let r = infeasible_reason(&nodes, &res(1, 1, 1), 2).unwrap();
    assert!(r.contains("at most 1 of the 2 replicas"), "{r}");
    assert!(infeasible_reason(&nodes, &res(2, 4, 1), 1).is_none());
    assert!(infeasible_reason(&[], &res(1, 1, 0), 1).is_some());
}

#[test]
fn cordoned_nodes_get_nothing_and_say_so() {
    let mut n = NodeView::new("a", 2000, 4 * GI);
    n.schedulable = false;
    let plan = schedule(
        &Snapshot {
            nodes: vec![n],
            queue: vec![job(1, 0, res(1, 1, 0), 1)],
        },
        0,
    );
    assert!(plan.placements.is_empty());
    assert!(reason(&plan, 1).contains("no schedulable node"));
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
                g.free = !(g.index as u64 * 37 + used_pct).is_multiple_of(3);
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
    )
        .prop_map(
            move |(cpu, mem, gpu, replicas, priority, models)| PendingJob {
                id,
                team: format!("t{}", id % 3),
                priority,
                submitted_at: 1000 + id * 7 % 13,
                resources: Resources {
                    cpu_milli: cpu,
                    memory_bytes: mem * GI / 2,
                    gpu,
                    gpu_models: match (gpu, models) {
                        (0, _) | (_, 0) => vec![],
                        (_, 1) => vec!["H100".into()],
                        _ => vec!["A100".into(), "H100".into()],
                    },
                },
                replicas,
            },
        )
}

fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    (1usize..8, 0usize..40).prop_flat_map(|(n, j)| {
        (
            (0..n).map(arb_node).collect::<Vec<_>>(),
            (0..j as u64).map(arb_job).collect::<Vec<_>>(),
        )
            .prop_map(|(nodes, queue)| Snapshot { nodes, queue })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// No node is over-allocated; GPUs given out are free, healthy, allowed
    /// and given once; cordoned nodes get nothing.
    #[test]
    fn no_node_over_allocated(snap in arb_snapshot()) {
        let plan = schedule(&snap, 0);
        let mut cpu = vec![0u64; snap.nodes.len()];
        let mut mem = vec![0u64; snap.nodes.len()];
        let mut gpus: Vec<Vec<u32>> = vec![vec![]; snap.nodes.len()];
        for p in &plan.placements {
            let job = snap.queue.iter().find(|j| j.id == p.job_id).unwrap();
            for a in &p.assignments {
                let node = &snap.nodes[a.node];
                prop_assert!(node.schedulable);
                cpu[a.node] += job.resources.cpu_milli;
                mem[a.node] += job.resources.memory_bytes;
                prop_assert_eq!(a.gpus.len() as u32, job.resources.gpu);
                for g in &a.gpus {
                    let slot = node.gpus.iter().find(|s| s.index == *g).unwrap();
                    prop_assert!(slot.free && slot.healthy);
                    prop_assert!(job.resources.gpu_model_allowed(&slot.model));
                    prop_assert!(!gpus[a.node].contains(g), "GPU given twice");
                    gpus[a.node].push(*g);
                }
            }
        }
        for (i, n) in snap.nodes.iter().enumerate() {
            prop_assert!(cpu[i] <= n.free_cpu_milli);
            prop_assert!(mem[i] <= n.free_memory_bytes);
        }
    }

    /// Every job is either placed whole (one assignment per replica) or
    /// waiting with a reason; never both, never neither.
    #[test]
    fn gangs_all_or_nothing_and_every_job_accounted(snap in arb_snapshot()) {
        let plan = schedule(&snap, 0);
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

    /// The scheduler is a function: same input, same plan.
    #[test]
    fn deterministic(snap in arb_snapshot()) {
        prop_assert_eq!(schedule(&snap, 5), schedule(&snap, 5));
    }

    /// A job never overtakes an earlier-ordered job with the same request.
    #[test]
    fn same_shape_keeps_order(snap in arb_snapshot()) {
        let plan = schedule(&snap, 0);
        for w in &plan.waiting {
            let wj = snap.queue.iter().find(|j| j.id == w.job_id).unwrap();
            for p in &plan.placements {
                let pj = snap.queue.iter().find(|j| j.id == p.job_id).unwrap();
                let same = pj.resources == wj.resources && pj.replicas == wj.replicas;
                let later = (pj.priority, std::cmp::Reverse(pj.submitted_at), std::cmp::Reverse(pj.id))
                    < (wj.priority, std::cmp::Reverse(wj.submitted_at), std::cmp::Reverse(wj.id));
                prop_assert!(!(same && later), "job {} overtook {}", pj.id, wj.id);
            }
        }
    }
}

#[test]
fn gang_waiting_for_room_says_so() {
    let mut a = NodeView::new("a", 4000, 8 * GI);
    a.free_cpu_milli = 1000;
    let snap = Snapshot {
        nodes: vec![a, NodeView::new("b", 4000, 8 * GI)],
        queue: vec![job(1, 0, res(3, 1, 0), 2)],
    };
    let plan = schedule(&snap, 0);
    let r = reason(&plan, 1);
    assert!(
        r.contains("gang of 2") && r.contains("1 of 2 schedulable nodes"),
        "{r}"
    );
}

/// Applies a plan to the nodes: what it placed is no longer free.
fn apply(snap: &Snapshot, plan: &Plan) -> Vec<NodeView> {
    let mut nodes = snap.nodes.clone();
    for p in &plan.placements {
        let job = snap.queue.iter().find(|j| j.id == p.job_id).unwrap();
        for a in &p.assignments {
            let n = &mut nodes[a.node];
            n.free_cpu_milli -= job.resources.cpu_milli;
            n.free_memory_bytes -= job.resources.memory_bytes;
            for g in n.gpus.iter_mut() {
                if a.gpus.contains(&g.index) {
                    g.free = false;
                }
            }
        }
    }
    nodes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The server's incremental pass: when no capacity was freed since a
    /// pass, the jobs that waited in it cannot fit now either, so a pass over
    /// only the newly queued jobs places exactly what a full pass would.
    #[test]
    fn a_pass_over_new_jobs_equals_a_full_pass_when_nothing_was_freed(
        snap in arb_snapshot(),
        fresh in proptest::collection::vec(arb_job(0), 0..10),
    ) {
        let first = schedule(&snap, 0);
        let nodes = apply(&snap, &first);
        let fresh: Vec<PendingJob> = fresh
            .into_iter()
            .enumerate()
            .map(|(i, mut j)| { j.id = 1000 + i as u64; j.submitted_at = 5000 + i as u64; j })
            .collect();
        let waiting: Vec<PendingJob> = snap
            .queue
            .iter()
            .filter(|j| first.waiting.iter().any(|w| w.job_id == j.id))
            .cloned()
            .collect();
        let full = Snapshot { nodes: nodes.clone(), queue: waiting.into_iter().chain(fresh.clone()).collect() };
        let incremental = Snapshot { nodes, queue: fresh };
        prop_assert_eq!(schedule(&full, 1).placements, schedule(&incremental, 1).placements);
    }
}
