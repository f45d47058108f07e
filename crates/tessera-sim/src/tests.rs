use clap::Parser;
use tessera_core::Resources;
use tessera_scheduler::Policy;

use super::*;
use crate::engine::simulate;
use crate::trace::{
    parse_nodes, parse_openb_pods, parse_philly, parse_timestamp, prepare, uniform_nodes,
};
use std::collections::BTreeSet;

const PHILLY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/traces/philly/philly.csv"
);
const OPENB_PODS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/traces/alibaba-openb/openb_pod_list_default.csv"
);
const OPENB_NODES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/traces/alibaba-openb/openb_node_list_gpu_node.csv"
);
const SMALL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/small.jsonl");

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A job of `gpus` whole GPUs (1 core, 1 GiB per GPU), times in seconds.
fn job(submit_s: u64, duration_s: u64, gpus: u32, team: &str) -> SimJob {
    let (resources, replicas) = trace::philly_shape(gpus, 8);
    SimJob {
        id: 0,
        row: 0,
        team: team.into(),
        priority: 0,
        submit_ms: submit_s * 1000,
        duration_ms: duration_s * 1000,
        resources,
        replicas,
        max_runtime_ms: None,
    }
}

fn numbered(jobs: Vec<SimJob>) -> Vec<SimJob> {
    let jobs: Vec<SimJob> = jobs
        .into_iter()
        .enumerate()
        .map(|(i, j)| SimJob { row: i, ..j })
        .collect();
    prepare(jobs, 1.0, None).unwrap()
}

/// JCT of each job in seconds, by id.
fn jcts(jobs: &[SimJob], nodes: &[tessera_scheduler::NodeView], policy: &str) -> Vec<u64> {
    let run = simulate(jobs, nodes, Policy::named(policy).unwrap()).unwrap();
    assert_eq!(run.unfinished, 0);
    run.outcomes
        .iter()
        .map(|o| (o.finish_ms - o.submit_ms) / 1000)
        .collect()
}

fn philly_subset(limit: usize, nodes: u32) -> (Vec<SimJob>, Vec<tessera_scheduler::NodeView>) {
    let mut args = SimArgs::new(PHILLY, Format::Philly);
    args.nodes = nodes;
    args.limit = Some(limit);
    let loaded = load(&args).unwrap();
    (loaded.jobs, loaded.nodes)
}

#[test]
fn timestamps_are_utc_seconds() {
    assert_eq!(parse_timestamp("1970-01-01 00:00:00").unwrap(), 0);
    assert_eq!(parse_timestamp("2000-03-01 00:00:00").unwrap(), 951_868_800);
    assert_eq!(
        parse_timestamp("2016-12-31 23:59:59").unwrap(),
        1_483_228_799
    );
    assert_eq!(
        parse_timestamp("2017-09-04 10:30:41").unwrap(),
        1_504_521_041
    );
    assert!(parse_timestamp("2017-13-04 10:30:41").is_err());
    assert!(parse_timestamp("2017-09-04T10:30:41").is_err());
}

#[test]
fn philly_parses_whole() {
    let jobs = parse_philly(&read(PHILLY), 8).unwrap();
    assert_eq!(jobs.len(), 82_247);
    // First data row: 2017-10-09 07:01:55,66.0,1,66.0,11cb48; the earliest
    // job was submitted 2017-09-04 10:30:41.
    let first = &jobs[0];
    assert_eq!(first.team, "11cb48");
    assert_eq!(first.duration_ms, 66_000);
    assert_eq!((first.resources.gpu, first.replicas), (1, 1));
    assert_eq!(first.submit_ms, 3_011_474_000);
    assert_eq!(jobs[1].team, "6214e9");
    assert_eq!(jobs[1].duration_ms, 2_951_000);
    assert_eq!(jobs.iter().filter(|j| j.submit_ms == 0).count(), 1);
    assert_eq!(
        jobs.iter()
            .map(|j| j.team.as_str())
            .collect::<BTreeSet<_>>()
            .len(),
        15
    );
    // GPU counts as the README lists them; wider than a node become gangs.
    let count = |g: u64| jobs.iter().filter(|j| j.gpu_milli() == g * 1000).count();
    assert_eq!(count(1), 76_627);
    assert_eq!(count(8), 1_643);
    assert_eq!(count(12), 7);
    assert_eq!(count(128), 3);
    let big = jobs.iter().find(|j| j.gpu_milli() == 128_000).unwrap();
    assert_eq!((big.replicas, big.resources.gpu), (16, 8));
    let twelve = jobs.iter().find(|j| j.gpu_milli() == 12_000).unwrap();
    assert_eq!((twelve.replicas, twelve.resources.gpu), (2, 6));
}

#[test]
fn philly_shapes_split_evenly() {
    let shape = |n, g| {
        let (r, k) = trace::philly_shape(n, g);
        (k, r.gpu, r.cpu_milli, r.memory_bytes >> 30)
    };
    assert_eq!(shape(1, 8), (1, 1, 1000, 1));
    assert_eq!(shape(8, 8), (1, 8, 8000, 8));
    assert_eq!(shape(16, 8), (2, 8, 8000, 8));
    assert_eq!(shape(24, 8), (3, 8, 8000, 8));
    assert_eq!(shape(12, 8), (2, 6, 6000, 6));
    assert_eq!(shape(6, 4), (2, 3, 3000, 3));
}

#[test]
fn openb_parses_whole() {
    let pods = parse_openb_pods(&read(OPENB_PODS)).unwrap();
    assert_eq!(pods.len(), 8_152);
    // openb-pod-0000,12000,16384,1,1000,,LS,Running,0,12537496,0
    let p0 = &pods[0];
    assert_eq!(p0.resources.cpu_milli, 12_000);
    assert_eq!(p0.resources.memory_bytes, 16_384 << 20);
    assert_eq!((p0.resources.gpu, p0.resources.gpu_milli), (1, 0));
    assert!(p0.resources.gpu_models.is_empty());
    assert_eq!(p0.team, "LS");
    assert_eq!(p0.duration_ms, 12_537_496_000);
    // openb-pod-0001,6000,12288,1,460,,LS,Running,427061,12902960,427061
    let p1 = &pods[1];
    assert_eq!((p1.resources.gpu, p1.resources.gpu_milli), (0, 460));
    assert_eq!(p1.submit_ms, 427_061_000);
    let shares = pods.iter().filter(|p| p.resources.gpu_milli > 0).count();
    let cpu_only = pods.iter().filter(|p| !p.resources.wants_gpu()).count();
    assert_eq!((shares, cpu_only), (3_078, 1_088));
    let asked: u64 = pods.iter().map(|p| p.gpu_milli()).sum();
    assert_eq!(asked, 6_086_800);

    let nodes = parse_nodes(&read(OPENB_NODES)).unwrap();
    assert_eq!(nodes.len(), 1_213);
    assert_eq!(nodes.iter().map(|n| n.gpus.len()).sum::<usize>(), 6_212);
    // openb-node-0000,64000,262144,2,P100
    assert_eq!(nodes[0].name, "openb-node-0000");
    assert_eq!(
        (nodes[0].cpu_milli, nodes[0].memory_bytes),
        (64_000, 262_144 << 20)
    );
    assert_eq!(nodes[0].gpus.len(), 2);
    assert_eq!(nodes[0].gpus[0].model, "P100");
}

#[test]
fn openb_gpu_specs_become_model_lists() {
    let text = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time\n\
                p0,1000,1024,2,1000,V100M16|V100M32,LS,Running,5,50,10\n\
                p1,1000,1024,0,0,,BE,Pending,7,9,\n\
                p2,1000,1024,3,500,,BE,Pending,7,9,\n";
    let err = parse_openb_pods(text).unwrap_err();
    assert!(format!("{err:#}").contains("data row 3"), "{err:#}");
    let pods = parse_openb_pods(&text.lines().take(3).collect::<Vec<_>>().join("\n")).unwrap();
    assert_eq!(pods[0].resources.gpu_models, vec!["V100M16", "V100M32"]);
    assert_eq!(pods[0].resources.gpu, 2);
    assert_eq!(pods[0].duration_ms, 40_000);
    assert_eq!(pods[1].duration_ms, 2_000);
}

#[test]
fn tessera_traces_use_the_job_spec() {
    let jobs = trace::parse_tessera(&read(SMALL)).unwrap();
    assert_eq!(jobs.len(), 6);
    let bert = jobs
        .iter()
        .find(|j| j.team == "nlp" && j.replicas == 2)
        .unwrap();
    assert_eq!(
        (bert.priority, bert.resources.gpu, bert.gpu_milli()),
        (5, 2, 4000)
    );
    let asr = jobs
        .iter()
        .find(|j| j.team == "speech" && j.resources.gpu == 8)
        .unwrap();
    assert_eq!(asr.max_runtime_ms, Some(3_600_000));
    assert_eq!(asr.run_ms(), 3_600_000);
    let eval = jobs
        .iter()
        .find(|j| j.resources.gpu_models == ["V100"])
        .unwrap();
    assert_eq!(
        eval.resources.cpu_milli,
        tessera_core::spec::DEFAULT_CPU_MILLI
    );

    let bad =
        r#"{"submit_s": 0, "duration_s": 1, "spec": {"command": ["x"], "resources": {"cpus": 2}}}"#;
    let err = format!("{:#}", trace::parse_tessera(bad).unwrap_err());
    assert!(err.contains("line 1") && err.contains("cpus"), "{err}");
    let bad = r#"{"submit_s": -1, "duration_s": 1, "spec": {"command": ["x"]}}"#;
    assert!(trace::parse_tessera(bad).is_err());
}

#[test]
fn the_example_trace_runs_under_every_policy() {
    let mut args = SimArgs::new(SMALL, Format::Tessera);
    args.nodes = 2;
    args.policies = vec!["all".into()];
    let reports = run(&args).unwrap();
    assert_eq!(reports.len(), Policy::NAMES.len());
    for r in &reports {
        let Report::Events(e) = r else {
            panic!("events mode")
        };
        assert_eq!(
            (e.jobs, e.unfinished, e.infeasible),
            (6, 0, 0),
            "{}",
            e.policy
        );
        assert!(e.gpu_utilization > 0.0 && e.gpu_utilization <= 1.0);
        assert!(e.jain_fairness > 0.0 && e.jain_fairness <= 1.0);
        assert_eq!(e.teams.len(), 3);
        let share: f64 = e.teams.values().map(|t| t.gpu_share).sum();
        assert!((share - 1.0).abs() < 1e-9);
    }
    // The JSON carries every documented key.
    let v = serde_json::to_value(&reports[0]).unwrap();
    for k in [
        "policy",
        "jobs",
        "avg_jct_s",
        "p50_jct_s",
        "p99_jct_s",
        "avg_queue_s",
        "p99_queue_s",
        "makespan_s",
        "gpu_utilization",
        "preemptions",
        "slowdown_by_gpus",
        "teams",
        "jain_fairness",
        "sim_wall_s",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    let table = metrics::render(&reports);
    assert!(
        table.contains("tiresias") && table.contains("AVG SLOWDOWN BY GPUS"),
        "{table}"
    );
}

#[test]
fn fifo_and_sjf_by_hand() {
    // One GPU. A (0 s, 100 s), B (1 s, 50 s), C (2 s, 10 s).
    let jobs = numbered(vec![
        job(0, 100, 1, "a"),
        job(1, 50, 1, "a"),
        job(2, 10, 1, "b"),
    ]);
    let nodes = uniform_nodes(1, 1);
    // FIFO: A 0-100, B 100-150, C 150-160.
    assert_eq!(jcts(&jobs, &nodes, "fifo"), vec![100, 149, 158]);
    // SJF: A 0-100 (alone at 0), then C 100-110, B 110-160.
    assert_eq!(jcts(&jobs, &nodes, "sjf-oracle"), vec![100, 159, 108]);
    // SRTF: at 1 s B (50) is shorter than A's 99 left: A is preempted; at
    // 2 s C (10) preempts B (49 left): C 2-12, B 12-61, A 61-160.
    assert_eq!(jcts(&jobs, &nodes, "srtf-oracle"), vec![160, 60, 10]);

    let report = metrics::event_report(
        &simulate(&jobs, &nodes, Policy::named("fifo").unwrap()).unwrap(),
        &jobs,
        1,
        0,
        0.0,
    );
    assert!((report.avg_jct_s - 407.0 / 3.0).abs() < 1e-9);
    assert_eq!(report.p50_jct_s, 149.0);
    assert_eq!(report.makespan_s, 160.0);
    assert!((report.gpu_utilization - 1.0).abs() < 1e-9);
    // Queueing = JCT - duration: 0, 99, 148.
    assert!((report.avg_queue_s - 247.0 / 3.0).abs() < 1e-9);
}

#[test]
fn strict_fifo_blocks_where_sjf_and_backfill_do_not() {
    // Two GPUs. J0 (0 s, 100 s, 1 GPU), J1 (1 s, 10 s, 2 GPUs), J2 (2 s, 10 s, 1 GPU).
    let jobs = numbered(vec![
        job(0, 100, 1, "a"),
        job(1, 10, 2, "a"),
        job(2, 10, 1, "a"),
    ]);
    let nodes = uniform_nodes(1, 2);
    // FIFO: J1 waits for J0 (100-110) and J2 behind it (110-120).
    assert_eq!(jcts(&jobs, &nodes, "fifo"), vec![100, 109, 118]);
    // SJF: J2 passes J1, which cannot fit: 2-12; J1 100-110.
    assert_eq!(jcts(&jobs, &nodes, "sjf-oracle"), vec![100, 109, 10]);
    // Backfill: J1 reserves the GPUs from 100 s; J2 ends by 12 s, so it may use them.
    assert_eq!(jcts(&jobs, &nodes, "fifo-backfill"), vec![100, 109, 10]);
}

#[test]
fn preempted_jobs_run_exactly_their_duration() {
    let jobs = numbered(vec![job(0, 100, 1, "a"), job(10, 20, 1, "b")]);
    let nodes = uniform_nodes(1, 1);
    let run = simulate(&jobs, &nodes, Policy::named("srtf-oracle").unwrap()).unwrap();
    assert_eq!(run.preemptions, 1);
    // The room was used by the job it was made for, and the victim waited.
    assert_eq!(
        (run.restarted_at_once, run.preemptions_without_start),
        (0, 0)
    );
    let a = &run.outcomes[0];
    assert_eq!(
        (a.first_start_ms, a.last_start_ms, a.finish_ms),
        (0, 30_000, 120_000)
    );
    assert_eq!((a.ran_ms, a.run_ms, a.preemptions), (100_000, 100_000, 1));

    // On a busy Philly subset, the preemptive policies preempt, and every
    // job still runs exactly its duration in total.
    let (jobs, nodes) = philly_subset(250, 16);
    for p in ["srtf-oracle", "las", "tiresias", "tessera"] {
        let run = simulate(&jobs, &nodes, Policy::named(p).unwrap()).unwrap();
        assert_eq!((run.outcomes.len(), run.unfinished), (jobs.len(), 0), "{p}");
        assert!(run.preemptions > 0, "{p}: no preemption");
        assert_eq!(run.pass_cap_hits, 0, "{p}");
        let counted: u64 = run.outcomes.iter().map(|o| o.preemptions as u64).sum();
        assert_eq!(counted, run.preemptions, "{p}");
        for o in &run.outcomes {
            assert_eq!(o.ran_ms, o.run_ms, "{p}: job {}", o.id);
            assert!(o.finish_ms >= o.submit_ms + o.run_ms, "{p}: job {}", o.id);
        }
    }
}

#[test]
fn same_input_same_metrics() {
    let (jobs, nodes) = philly_subset(250, 8);
    for p in ["fifo-backfill", "drf", "tessera"] {
        let once = || {
            let run = simulate(&jobs, &nodes, Policy::named(p).unwrap()).unwrap();
            let mut r = metrics::event_report(&run, &jobs, 64, 0, 0.0);
            r.schedule_s = 0.0;
            (run.outcomes, r)
        };
        assert_eq!(once(), once(), "{p}");
    }
}

#[test]
fn confirmation_passes_are_no_ops() {
    // Without backfill and preemption, a pass after one that only placed
    // jobs places nothing: the simulator skips it. Check that claim.
    let (jobs, nodes) = philly_subset(250, 8);
    for p in ["fifo", "sjf-oracle", "drf"] {
        let policy = Policy::named(p).unwrap();
        assert!(engine::placements_reach_fixpoint(&policy));
        let checked = engine::simulate_with(&jobs, &nodes, policy.clone(), true).unwrap();
        assert_eq!(checked.changing_confirmations, 0, "{p}");
        let fast = simulate(&jobs, &nodes, policy).unwrap();
        assert_eq!(fast.outcomes, checked.outcomes, "{p}");
        assert!(fast.schedule_calls < checked.schedule_calls);
    }
    for p in ["fifo-backfill", "srtf-oracle", "las", "tiresias", "tessera"] {
        assert!(!engine::placements_reach_fixpoint(
            &Policy::named(p).unwrap()
        ));
    }
}

#[test]
fn shortcuts_change_no_outcome() {
    // Skipped passes, skipped confirmations (after placements alone, and
    // under preemption after placements that are no victims for the jobs
    // left waiting) and a queue kept in the scheduler's order give every job exactly the placements and times it gets without
    // them, under every policy.
    let (jobs, nodes) = philly_subset(1500, 8);
    for p in Policy::NAMES {
        let policy = Policy::named(p).unwrap();
        let checked = engine::simulate_with(&jobs, &nodes, policy.clone(), true).unwrap();
        let fast = simulate(&jobs, &nodes, policy.clone()).unwrap();
        assert_eq!(fast.outcomes, checked.outcomes, "{p}");
        assert_eq!(fast.preemptions, checked.preemptions, "{p}");
        assert_eq!(fast.restarted_at_once, checked.restarted_at_once, "{p}");
        assert_eq!(
            fast.preemptions_without_start, checked.preemptions_without_start,
            "{p}"
        );
        assert_eq!(
            fast.changing_confirmations, checked.changing_confirmations,
            "{p}"
        );
        assert_eq!(fast.pass_cap_hits, checked.pass_cap_hits, "{p}");
        assert_eq!(checked.skipped_passes, 0, "{p}");
        assert_eq!(checked.skipped_confirmations, 0, "{p}");
        if engine::arrivals_can_be_skipped(&policy)
            || engine::backfill_arrivals_can_be_decided_alone(&policy)
        {
            assert!(fast.skipped_passes > 0, "{p}");
        }
        // Under backfill, fair share and fragmentation-aware packing, the
        // scheduler proves where a pass settles the queue.
        if matches!(p, "fifo-backfill" | "tessera") {
            assert!(fast.skipped_confirmations > 0, "{p}");
            assert!(fast.schedule_calls < checked.schedule_calls, "{p}");
        }
        if engine::confirmations_can_be_skipped(&policy) {
            assert!(fast.skipped_confirmations > 0, "{p}");
            assert!(fast.schedule_calls < checked.schedule_calls, "{p}");
        }
    }
}

#[test]
fn published_ordering_on_a_philly_subset() {
    // The first 250 Philly jobs (three weeks of the trace's sparse start,
    // with jobs of up to 1,286 hours) on 16 nodes x 8 GPUs: an overloaded
    // cluster, where the published order of average JCT shows (release
    // build: fifo 2.18e6 s, sjf 8.17e5 s, srtf 5.96e5 s).
    let (jobs, nodes) = philly_subset(250, 16);
    let avg = |p: &str| {
        let run = simulate(&jobs, &nodes, Policy::named(p).unwrap()).unwrap();
        assert_eq!(run.unfinished, 0);
        metrics::event_report(&run, &jobs, 128, 0, 0.0).avg_jct_s
    };
    let (fifo, sjf, srtf) = (avg("fifo"), avg("sjf-oracle"), avg("srtf-oracle"));
    assert!(
        fifo > sjf && sjf >= srtf,
        "fifo {fifo:.0}, sjf {sjf:.0}, srtf {srtf:.0}"
    );
}

#[test]
fn infeasible_jobs_are_dropped_at_load() {
    let mut args = SimArgs::new(PHILLY, Format::Philly);
    args.nodes = 1;
    args.limit = Some(3000);
    let loaded = load(&args).unwrap();
    // Jobs wider than one 8-GPU node can never start there.
    assert!(loaded.infeasible > 0);
    assert!(loaded.jobs.iter().all(|j| j.gpu_milli() <= 8000));
    assert!(loaded
        .jobs
        .iter()
        .enumerate()
        .all(|(i, j)| j.id == i as u64));
}

#[test]
fn time_scale_and_limit() {
    let jobs = vec![
        job(10, 100, 1, "a"),
        job(0, 50, 1, "a"),
        job(30, 10, 1, "a"),
    ];
    let jobs: Vec<SimJob> = jobs
        .into_iter()
        .enumerate()
        .map(|(i, j)| SimJob { row: i, ..j })
        .collect();
    let p = prepare(jobs.clone(), 2.0, Some(2)).unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!((p[0].submit_ms, p[0].duration_ms, p[0].id), (0, 100_000, 0));
    assert_eq!(
        (p[1].submit_ms, p[1].duration_ms, p[1].id),
        (20_000, 200_000, 1)
    );
    assert!(prepare(jobs, 0.0, None).is_err());
}

#[test]
fn openb_packing_never_overallocates_and_reaches_100_percent() {
    // The first 120 openb nodes; the pods are cut to 130% of their GPUs.
    let mut nodes = parse_nodes(&read(OPENB_NODES)).unwrap();
    nodes.truncate(120);
    let gpus: u64 = nodes.iter().map(|n| n.gpus.len() as u64).sum();
    let pods = prepare(parse_openb_pods(&read(OPENB_PODS)).unwrap(), 1.0, None).unwrap();
    for policy in ["tessera", "drf"] {
        let arrivals = packing::arrivals(&pods, gpus * 1000, 1.3, Some(7));
        let asked: u64 = arrivals.iter().map(|p| p.gpu_milli()).sum();
        assert!(asked <= gpus * 1300 && asked > gpus * 1250, "{asked}");
        let run =
            packing::pack(&arrivals, &nodes, Policy::named(policy).unwrap(), Some(7)).unwrap();
        assert!(run.failed > 0);
        let mut last = 0;
        for (arrived, allocated) in &run.curve {
            assert!(*allocated <= gpus * 1000 && allocated <= arrived);
            assert!(*allocated >= last);
            last = *allocated;
        }
        let at100 = run
            .allocation_ratio_at(100)
            .expect("the 100% point is reached");
        let at130 = run
            .allocation_ratio_at(130)
            .expect("the 130% point is reached");
        assert!(
            at100 > 0.5 && at100 <= 1.0 && at130 >= at100 && at130 <= 1.0,
            "{policy}: {at100} {at130}"
        );
    }
    // Seeds change the order; no seed keeps it, and runs repeat exactly.
    let a = packing::arrivals(&pods, gpus * 1000, 1.3, None);
    let b = packing::arrivals(&pods, gpus * 1000, 1.3, None);
    assert_eq!(a, b);
    let s1 = packing::arrivals(&pods, gpus * 1000, 1.3, Some(1));
    assert_ne!(a, s1);
    assert!(
        a.windows(2).all(|w| w[0].row < w[1].row),
        "trace order kept"
    );
}

#[test]
fn openb_inflates_to_130_percent_of_the_full_cluster() {
    let nodes = parse_nodes(&read(OPENB_NODES)).unwrap();
    let pods = prepare(parse_openb_pods(&read(OPENB_PODS)).unwrap(), 1.0, None).unwrap();
    let arrivals = packing::arrivals(&pods, 6_212_000, 1.3, Some(42));
    let asked: u64 = arrivals.iter().map(|p| p.gpu_milli()).sum();
    assert!(asked <= 8_075_600 && asked > 8_060_000, "{asked}");
    assert!(arrivals.len() > pods.len());
    assert_eq!(nodes.len(), 1_213);
}

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    sim: SimArgs,
}

#[test]
fn the_command_line_parses() {
    let cli = Cli::try_parse_from([
        "sim",
        "--trace",
        "t.csv",
        "--format",
        "openb",
        "--policy",
        "fifo,sjf-oracle",
        "--policy",
        "all",
        "--limit",
        "5",
        "--seeds",
        "10",
    ])
    .unwrap();
    assert_eq!(cli.sim.format, Format::Openb);
    assert_eq!(cli.sim.limit, Some(5));
    assert_eq!(cli.sim.mode(), Mode::Packing);
    let ps = policies(&cli.sim.policies).unwrap();
    assert_eq!(ps.len(), Policy::NAMES.len());
    assert_eq!(ps[0].name, "fifo");
    assert_eq!(ps[1].name, "sjf-oracle");
    assert!(policies(&["nope".into()]).is_err());
    let cli = Cli::try_parse_from(["sim", "--trace", "t.csv"]).unwrap();
    assert_eq!(cli.sim.mode(), Mode::Events);
    assert_eq!(cli.sim.policies, vec!["tessera"]);
}

#[test]
fn rng_is_deterministic_and_uniform_enough() {
    let mut a = rng::SplitMix64::new(42);
    let mut b = rng::SplitMix64::new(42);
    let xs: Vec<u64> = (0..100).map(|_| a.below(10)).collect();
    let ys: Vec<u64> = (0..100).map(|_| b.below(10)).collect();
    assert_eq!(xs, ys);
    let mut counts = [0u32; 10];
    let mut r = rng::SplitMix64::new(1);
    for _ in 0..10_000 {
        counts[r.below(10) as usize] += 1;
    }
    assert!(counts.iter().all(|c| (900..1100).contains(c)), "{counts:?}");
    let mut v: Vec<u32> = (0..50).collect();
    r.shuffle(&mut v);
    let mut sorted = v.clone();
    sorted.sort();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    assert_ne!(v, sorted);
}

#[test]
fn metrics_helpers() {
    assert_eq!(metrics::percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.0);
    assert_eq!(metrics::percentile(&[1.0, 2.0, 3.0, 4.0], 99.0), 4.0);
    assert_eq!(metrics::percentile(&[], 99.0), 0.0);
    assert_eq!(metrics::jain(&[2.0, 2.0, 2.0]), 1.0);
    assert!((metrics::jain(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
    assert_eq!(metrics::slowdown(10_000, 5_000), 2.0);
    assert_eq!(metrics::slowdown(100, 0), 1.0);
    let r = Resources {
        cpu_milli: 1,
        memory_bytes: 1,
        gpu: 0,
        gpu_milli: 300,
        gpu_models: vec![],
        node_selector: Default::default(),
    };
    assert_eq!(r.gpu_demand_milli(), 300);
}
