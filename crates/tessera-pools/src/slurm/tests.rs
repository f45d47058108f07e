//! The Slurm driver against output captured from a real Slurm 22.05
//! (`squeue_jobs.txt`: failed jobs, one cancelled while pending forever on a
//! partition limit, timeouts, completed, cancelled, running and pending
//! jobs; `scontrol_show_node.txt`: a node with one CPU and all memory
//! allocated),
//! through a runner that answers with that text and records the commands.

use std::sync::{Arc, Mutex};

use super::*;

const JOBS: &str = include_str!("squeue_jobs.txt");
const NODES: &str = include_str!("scontrol_show_node.txt");

type Calls = Arc<Mutex<Vec<(String, Vec<String>, Option<String>)>>>;

/// Answers each program with a fixed output; records every call.
struct Canned {
    answers: Vec<(&'static str, CommandOutput)>,
    calls: Calls,
}

#[async_trait]
impl CommandRunner for Canned {
    async fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&[u8]>,
    ) -> std::io::Result<CommandOutput> {
        self.calls.lock().unwrap().push((
            program.to_string(),
            args.to_vec(),
            stdin.map(|s| String::from_utf8_lossy(s).into_owned()),
        ));
        self.answers
            .iter()
            .find(|(p, _)| *p == program)
            .map(|(_, o)| o.clone())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such program"))
    }
}

fn ok(stdout: &str) -> CommandOutput {
    CommandOutput {
        code: Some(0),
        stdout: stdout.into(),
        stderr: String::new(),
    }
}

fn err(stderr: &str) -> CommandOutput {
    CommandOutput {
        code: Some(1),
        stdout: String::new(),
        stderr: stderr.into(),
    }
}

fn driver(answers: Vec<(&'static str, CommandOutput)>) -> (SlurmDriver, Calls) {
    let calls: Calls = Arc::default();
    let dir = std::env::temp_dir().join(format!("tessera-slurm-unit-{}", std::process::id()));
    let d = SlurmDriver::new(
        SlurmConfig {
            partition: Some("debug".into()),
            output_dir: dir,
        },
        Box::new(Canned {
            answers,
            calls: calls.clone(),
        }),
    );
    (d, calls)
}

fn job(replicas: u32) -> PoolJob {
    PoolJob {
        key: "tessera-7-2".into(),
        job_id: 7,
        attempt: 2,
        name: "train".into(),
        team: "ml".into(),
        argv: vec!["python3".into(), "-c".into(), "print('it''s')".into()],
        image: None,
        env: vec![("GREETING".into(), "a b'c\"$HOME".into())],
        workdir: Some("/data/run".into()),
        replicas,
        cpu_milli: 1500,
        memory_bytes: 1536 << 20,
        gpus: 0,
        gpu_models: vec![],
        max_runtime_ms: Some(90_000),
        node_selector: Default::default(),
    }
}

fn id(s: &str) -> RemoteId {
    RemoteId(s.into())
}

#[tokio::test]
async fn status_maps_every_state_of_the_captured_listing_in_one_call() {
    let (d, calls) = driver(vec![("squeue", ok(JOBS))]);
    let ids: Vec<RemoteId> = ["1", "2", "4", "5", "10", "24", "26", "42"]
        .iter()
        .map(|s| id(s))
        .collect();
    let s = d.status(&ids).await.unwrap();
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 1, "one call for all jobs");
    assert!(
        calls[0]
            .1
            .contains(&"--jobs=1,2,4,5,10,24,26,42".to_string()),
        "{calls:?}"
    );
    assert_eq!(
        s[&id("1")],
        RemoteState::Failed {
            failure: Failure::Exited,
            exit_code: Some(3),
            message: "Slurm: FAILED, exit code 3:0 (NonZeroExitCode)".into()
        }
    );
    // Cancelled while pending on a partition limit: Slurm's own cancel.
    assert_eq!(s[&id("2")], RemoteState::Cancelled);
    match &s[&id("4")] {
        RemoteState::Failed {
            failure: Failure::TimedOut,
            exit_code: Some(143),
            message,
        } => assert!(message.contains("TIMEOUT"), "{message}"),
        other => panic!("job 4 timed out, not {other:?}"),
    }
    assert_eq!(s[&id("5")], RemoteState::Succeeded);
    assert!(matches!(
        s[&id("10")],
        RemoteState::Failed {
            exit_code: Some(4),
            ..
        }
    ));
    assert_eq!(s[&id("24")], RemoteState::Running);
    assert_eq!(
        s[&id("26")],
        RemoteState::Queued {
            reason: Some("Resources".into())
        }
    );
    assert_eq!(s[&id("42")], RemoteState::NotFound);
}

#[test]
fn states_and_reasons_map_onto_tessera_failures() {
    let f = |s, r, e| map_state(s, r, e);
    assert!(matches!(
        f("OUT_OF_MEMORY", "OutOfMemory", "0:125"),
        RemoteState::Failed {
            failure: Failure::OutOfMemory,
            ..
        }
    ));
    assert!(matches!(
        f("NODE_FAIL", "NodeDown", "0:0"),
        RemoteState::Failed {
            failure: Failure::NodeFailure,
            ..
        }
    ));
    // Pending forever on a Slurm that does not enforce partition limits.
    assert!(matches!(
        f("PENDING", "PartitionConfig", "0:0"),
        RemoteState::Failed {
            failure: Failure::Rejected,
            ..
        }
    ));
    // Completing: the job has not let go of its node yet.
    assert_eq!(f("COMPLETING", "None", "0:0"), RemoteState::Running);
    assert_eq!(f("CANCELLED+", "None", "0:15"), RemoteState::Cancelled);
    assert!(matches!(
        f("FAILED", "NonZeroExitCode", "0:9"),
        RemoteState::Failed {
            exit_code: Some(137),
            ..
        }
    ));
}

#[test]
fn capacity_of_the_captured_node() {
    let c = parse_capacity(NODES, Some("debug"));
    assert_eq!(c.nodes, 1);
    assert_eq!(c.cpu_milli, 2000);
    assert_eq!(c.memory_bytes, 18078 << 20);
    assert_eq!(c.used_cpu_milli, 1000);
    assert_eq!(c.used_memory_bytes, 18078 << 20);
    assert_eq!(c.largest_node, (2000, 18078 << 20, 0));
    assert_eq!(c.labels["slurm.partition"], "debug");
    // Another partition has none of it.
    assert_eq!(parse_capacity(NODES, Some("gpu")).nodes, 0);
}

#[test]
fn gpus_and_unusable_nodes() {
    let text = "NodeName=a CPUTot=64 RealMemory=512000 AllocMem=0 CPUAlloc=8 Gres=gpu:h100:8(S:0-1) AllocTRES=cpu=8,gres/gpu=2,gres/gpu:h100=2 State=MIXED Partitions=gpu,all\n\
                NodeName=b CPUTot=64 RealMemory=512000 Gres=gpu:h100:8 State=DOWN* Partitions=gpu\n\
                NodeName=c CPUTot=32 RealMemory=256000 Gres=gpu:4 State=IDLE+DRAIN Partitions=gpu\n\
                NodeName=d CPUTot=16 RealMemory=64000 Gres=(null) State=IDLE Partitions=gpu\n";
    let c = parse_capacity(text, Some("gpu"));
    assert_eq!(c.nodes, 2, "down and drained nodes are left out");
    assert_eq!(c.cpu_milli, 80_000);
    assert_eq!(
        c.gpus,
        vec![GpuCount {
            model: "h100".into(),
            count: 8
        }]
    );
    assert_eq!(c.used_gpus, 2);
    assert_eq!(c.largest_node, (64_000, 512000 << 20, 8));
}

#[tokio::test]
async fn submit_looks_the_key_up_first_and_returns_the_existing_job() {
    let (d, calls) = driver(vec![("squeue", ok("8\n")), ("sbatch", ok("99\n"))]);
    assert_eq!(d.submit(&job(1)).await.unwrap(), id("8"));
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 1, "nothing submitted: {calls:?}");
    assert_eq!(calls[0].0, "squeue");
    assert!(calls[0].1.contains(&"--name=tessera-7-2".to_string()));
    assert!(calls[0].1.contains(&"--states=all".to_string()));
}

#[tokio::test]
async fn submit_new_skips_the_lookup() {
    let (d, calls) = driver(vec![("squeue", ok("8\n")), ("sbatch", ok("99\n"))]);
    assert_eq!(d.submit_new(&job(1)).await.unwrap(), id("99"));
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].0, "sbatch");
}

#[tokio::test]
async fn submit_maps_resources_and_quotes_the_script() {
    let (d, calls) = driver(vec![("squeue", ok("")), ("sbatch", ok("12;cluster\n"))]);
    assert_eq!(d.submit(&job(1)).await.unwrap(), id("12"));
    let calls = calls.lock().unwrap();
    let (prog, args, stdin) = &calls[1];
    assert_eq!(prog, "sbatch");
    for want in [
        "--parsable",
        "--job-name=tessera-7-2",
        "--chdir=/data/run",
        "--cpus-per-task=2",
        "--mem=1536M",
        "--time=2",
        "--partition=debug",
    ] {
        assert!(args.contains(&want.to_string()), "{want} in {args:?}");
    }
    assert!(args
        .iter()
        .any(|a| a.starts_with("--output=") && a.ends_with("/slurm-%j.out")));
    let script = stdin.as_deref().unwrap();
    assert!(script.starts_with("#!/bin/sh\n"), "{script}");
    assert!(
        script.contains("export GREETING='a b'\\''c\"$HOME'\n"),
        "{script}"
    );
    assert!(
        script.contains("\n'python3' '-c' 'print('\\''it'\\'''\\''s'\\'')'\nrc=$?\n"),
        "{script}"
    );
    assert!(
        script.ends_with("/ended'/\"$SLURM_JOB_ID\" 2>/dev/null\nexit \"$rc\"\n"),
        "{script}"
    );
}

/// The batch script, run as Slurm would run it, leaves its command's exit
/// status where `ended_locally` finds it: status 0 ends the job there and
/// then (the marker is taken away), any other status is left to `status`.
#[tokio::test]
async fn exit_markers_end_succeeded_jobs_without_asking_slurm() {
    let dir = tempfile::tempdir().unwrap();
    let d = SlurmDriver::new(
        SlurmConfig {
            partition: None,
            output_dir: dir.path().to_path_buf(),
        },
        Box::new(Canned {
            answers: vec![],
            calls: Calls::default(),
        }),
    );
    std::fs::create_dir_all(d.ended_dir()).unwrap();
    for (slurm_id, argv) in [
        ("501", vec!["true"]),
        ("502", vec!["sh", "-c", "echo out; exit 3"]),
    ] {
        let mut j = job(1);
        j.argv = argv.into_iter().map(String::from).collect();
        let script = batch_script(&j, &d.ended_dir());
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .env("SLURM_JOB_ID", slurm_id)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(if slurm_id == "501" { 0 } else { 3 }),
            "the script exits with its command's status"
        );
    }
    let ids = [id("501"), id("502"), id("503")];
    let ended = d.ended_locally(&ids);
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[&id("501")], RemoteState::Succeeded);
    assert!(
        !d.ended_dir().join("501").exists(),
        "a marker read is removed"
    );
    assert!(d.ended_dir().join("502").exists(), "left to `status`");
    assert!(d.ended_locally(&ids).is_empty(), "each end is told once");
    // A marker being written (no newline yet) is not read.
    std::fs::write(d.ended_dir().join("503"), "0").unwrap();
    assert!(d.ended_locally(&ids).is_empty());
}

#[tokio::test]
async fn a_gang_is_one_job_of_n_tasks_each_told_its_replica() {
    let (d, calls) = driver(vec![("squeue", ok("")), ("sbatch", ok("13"))]);
    let mut j = job(3);
    j.gpus = 1;
    j.gpu_models = vec!["H100".into()];
    d.submit(&j).await.unwrap();
    let calls = calls.lock().unwrap();
    let (_, args, stdin) = &calls[1];
    for want in ["--ntasks=3", "--mem-per-cpu=768M", "--gpus-per-task=H100:1"] {
        assert!(args.contains(&want.to_string()), "{want} in {args:?}");
    }
    let script = stdin.as_deref().unwrap();
    assert!(script.contains("\nsrun --ntasks=3"), "{script}");
    assert!(script.contains("TESSERA_REPLICA=$SLURM_PROCID"), "{script}");
}

#[tokio::test]
async fn refusals_name_the_field_and_unreachable_slurm_is_unavailable() {
    let (d, _) = driver(vec![
        ("squeue", ok("")),
        (
            "sbatch",
            err("sbatch: error: Batch job submission failed: Requested node configuration is not available\n"),
        ),
    ]);
    match d.submit(&job(1)).await {
        Err(PoolError::Rejected(m)) => {
            assert!(
                m.contains("Requested node configuration is not available"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    let mut j = job(1);
    j.image = Some("python:3.12".into());
    assert!(matches!(d.submit(&j).await, Err(PoolError::Rejected(m)) if m.starts_with("image:")));
    j.image = None;
    j.gpu_models = vec!["A100".into(), "H100".into()];
    assert!(
        matches!(d.submit(&j).await, Err(PoolError::Rejected(m)) if m.starts_with("gpu_models:"))
    );

    // sbatch alone cannot reach the controller (squeue did a moment ago).
    let (flaky, _) = driver(vec![
        ("squeue", ok("")),
        (
            "sbatch",
            err("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n"),
        ),
    ]);
    assert!(matches!(
        flaky.submit(&job(1)).await,
        Err(PoolError::Unavailable(_))
    ));
    let (down, _) = driver(vec![
        (
            "sbatch",
            err("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n"),
        ),
        (
            "squeue",
            err("slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"),
        ),
    ]);
    assert!(matches!(
        down.submit(&job(1)).await,
        Err(PoolError::Unavailable(_))
    ));
    assert!(matches!(
        down.status(&[id("1")]).await,
        Err(PoolError::Unavailable(_))
    ));
    let (missing, _) = driver(vec![]);
    assert!(
        matches!(missing.capacity().await, Err(PoolError::Unavailable(m)) if m.contains("scontrol"))
    );
}

#[tokio::test]
async fn jobs_slurm_has_forgotten_are_not_found() {
    let (d, _) = driver(vec![(
        "squeue",
        err("slurm_load_jobs error: Invalid job id specified\n"),
    )]);
    let s = d.status(&[id("99999")]).await.unwrap();
    assert_eq!(s[&id("99999")], RemoteState::NotFound);
}

#[tokio::test]
async fn cancelling_an_ended_job_is_not_an_error() {
    let (d, _) = driver(vec![(
        "scancel",
        err("scancel: error: Kill job error on job id 5: Job/step already completing or completed\n"),
    )]);
    d.cancel(&id("5")).await.unwrap();
}
