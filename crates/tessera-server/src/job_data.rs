//! Jobs that read and write datasets.
//!
//! At submission ([`bind`]) each input is resolved through the [`Lake`]
//! trait — the caller must be allowed to read it — pinned to an exact
//! version and staged read-only on local disk; a dataset's labels (its
//! residency, e.g. `region=eu`) join the job's node selector, so the
//! scheduler places the job only where the data may go. Each output is
//! checked for write access and kind. Nothing is accepted on any error.
//!
//! While a job runs its inputs appear in every replica's working directory
//! under their `as` names ([`mounts`], [`input_env`]). When every replica
//! has exited 0, the job stays `running` while the output writer
//! ([`outputs_loop`]) turns each output directory of replica 0 into a new
//! version; the job succeeds once all are written and names them in
//! `wrote`, and fails, naming the output, when one cannot be written. The
//! writer is resumed after a restart ([`resume`]); the lake finds versions
//! a job already wrote by its id, so nothing is written twice.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tessera_core::auth::Principal;
use tessera_core::job::ReplicaState;
use tessera_core::lake::{JobOutputWrite, Lake, LakeError};
use tessera_core::protocol::InputMount;
use tessera_core::{Event, Job, JobId, JobState, JobTemplate};
use tessera_store::Write;
use tracing::{info, warn};

use crate::error::ApiError;
use crate::state::ClusterState;
use crate::Shared;

fn split(dataset: &str) -> (&str, &str) {
    dataset.split_once('.').unwrap_or(("", dataset))
}

/// A lake error about `inputs[i]` or `outputs[i]`, naming that field.
fn about(prefix: &str, e: LakeError) -> ApiError {
    let (field, message) = match &e {
        LakeError::Invalid(fe) if fe.field == "version" => {
            (format!("{prefix}.version"), fe.message.clone())
        }
        LakeError::Invalid(fe) if fe.field == "format" => {
            (format!("{prefix}.format"), fe.message.clone())
        }
        LakeError::Invalid(fe) => (format!("{prefix}.dataset"), fe.message.clone()),
        other => (format!("{prefix}.dataset"), other.to_string()),
    };
    let mut err = ApiError::from(e).with_field(field.clone());
    if !matches!(err.status.as_u16(), 500..=599) {
        err.message = format!("{field}: {message}");
    }
    err
}

/// Resolves, checks and stages a job's datasets, and adds their residency
/// to its node selector. A job without inputs or outputs is left alone.
pub(crate) async fn bind(
    shared: &Shared,
    who: &Principal,
    t: &mut JobTemplate,
) -> Result<(), ApiError> {
    if t.inputs.is_empty() && t.outputs.is_empty() {
        return Ok(());
    }
    let Some(lake) = shared.lake.clone() else {
        let field = if t.inputs.is_empty() {
            "outputs"
        } else {
            "inputs"
        };
        return Err(ApiError::invalid(
            field,
            "this server runs without a data lake, so jobs cannot read or write datasets",
        ));
    };
    for i in 0..t.inputs.len() {
        let prefix = format!("inputs[{i}]");
        let (team, name) = split(&t.inputs[i].dataset);
        let staged = lake
            .stage_input(who, team, name, t.inputs[i].version)
            .await
            .map_err(|e| about(&prefix, e))?;
        for (k, v) in &staged.dataset.labels {
            match t.resources.node_selector.get(k) {
                Some(w) if w != v => {
                    return Err(ApiError::invalid(
                        &format!("{prefix}.dataset"),
                        format!(
                            "{} may only be read where {k}={v}, but the job asks for {k}={w}",
                            t.inputs[i].dataset
                        ),
                    ))
                }
                _ => {
                    t.resources.node_selector.insert(k.clone(), v.clone());
                }
            }
        }
        t.inputs[i].version = Some(staged.version);
        t.inputs[i].path = Some(staged.path.display().to_string());
    }
    for (i, out) in t.outputs.iter().enumerate() {
        let (team, name) = split(&out.dataset);
        lake.check_output(who, team, name, out.format)
            .await
            .map_err(|e| about(&format!("outputs[{i}]"), e))?;
    }
    Ok(())
}

/// The inputs a replica of `job` sees in its working directory.
pub fn mounts(job: &Job) -> Vec<InputMount> {
    job.spec
        .inputs
        .iter()
        .filter_map(|i| {
            Some(InputMount {
                name: i.mount.clone(),
                path: i.path.clone()?,
            })
        })
        .collect()
}

/// `TESSERA_INPUT_<AS>` = the staged directory of each input, for programs
/// (and pools) that want a path rather than the link in the working
/// directory.
pub fn input_env(job: &Job) -> Vec<(String, String)> {
    job.spec
        .inputs
        .iter()
        .filter_map(|i| {
            let var: String = i
                .mount
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            Some((format!("TESSERA_INPUT_{var}"), i.path.clone()?))
        })
        .collect()
}

/// Whether `job` is waiting for its outputs to be written: every replica
/// of its attempt exited 0 and it has outputs.
pub fn writing(job: &Job) -> bool {
    !job.spec.outputs.is_empty()
        && job.state.is_active()
        && !job.cancel_requested
        && job.preempting.is_none()
        && !job.replicas.is_empty()
        && job
            .replicas
            .iter()
            .all(|r| r.state == ReplicaState::Exited && r.exit_code == Some(0))
}

/// Marks `id` as writing its outputs and hands it to the writer. Called
/// under the state lock when its last replica exited 0.
pub fn start_writing(
    shared: &Shared,
    state: &mut ClusterState,
    id: JobId,
    writes: &mut Vec<Write>,
    now: u64,
) {
    let names: Vec<String> = state.jobs[&id]
        .spec
        .outputs
        .iter()
        .map(|o| o.dataset.clone())
        .collect();
    let msg = format!(
        "all replicas exited with code 0; writing outputs: {}",
        names.join(", ")
    );
    state.update_job(id, writes, |j| {
        j.reason = Some("writing outputs".into());
        Some(Event::new(id, now, "writing_outputs", msg))
    });
    let _ = shared.outputs.send(id);
}

/// Hands every job that was writing its outputs when the last run stopped
/// back to the writer.
pub fn resume(shared: &Shared) {
    let mut state = shared.state.lock().expect("state lock");
    let ids: Vec<JobId> = state
        .active
        .iter()
        .copied()
        .filter(|id| state.jobs.get(id).is_some_and(writing))
        .collect();
    let mut writes = Vec::new();
    let now = crate::now_ms();
    for id in ids {
        state.add_event(
            Event::new(
                id,
                now,
                "writing_outputs",
                "the server restarted while the outputs were being written; writing them again (a version already written is kept, not written twice)",
            ),
            &mut writes,
        );
        let _ = shared.outputs.send(id);
    }
    // Only an event: the writer does not wait for it.
    let _ = shared.stage(writes);
}

/// Writes the outputs of the jobs handed to it, one job at a time.
pub(crate) async fn outputs_loop(
    shared: Arc<Shared>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<JobId>,
) {
    while let Some(id) = rx.recv().await {
        let Some(lake) = shared.lake.clone() else {
            continue;
        };
        let job = {
            let state = shared.state.lock().expect("state lock");
            match state.jobs.get(&id) {
                Some(j) if writing(j) => j.clone(),
                _ => continue,
            }
        };
        let outcome = write_all(lake.as_ref(), &job).await;
        let now = crate::now_ms();
        let staged = {
            let mut writes = Vec::new();
            let mut state = shared.state.lock().expect("state lock");
            // The job may have been handled otherwise meanwhile.
            if !state
                .jobs
                .get(&id)
                .is_some_and(|j| j.attempt == job.attempt && writing(j))
            {
                continue;
            }
            match outcome {
                Ok(wrote) => {
                    let reason = format!("exited with code 0; wrote {}", wrote.join(", "));
                    state.update_job(id, &mut writes, |j| {
                        j.wrote = wrote;
                        None
                    });
                    crate::control::finish(
                        &mut state,
                        id,
                        JobState::Succeeded,
                        Some(0),
                        reason,
                        now,
                        &mut writes,
                        &shared,
                    );
                }
                Err(why) => {
                    warn!(job = id, error = %why, "a job's output could not be written");
                    crate::control::finish(
                        &mut state,
                        id,
                        JobState::Failed,
                        Some(0),
                        why,
                        now,
                        &mut writes,
                        &shared,
                    );
                }
            }
            shared.stage(writes)
        };
        staged.durable().await;
        shared.changed();
        // An uploaded copy has served its purpose.
        let uploaded = uploaded_dir(&shared, id, job.attempt);
        if job.outputs_dir.as_deref().map(std::path::Path::new) == Some(uploaded.as_path()) {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(uploaded)).await;
        }
    }
}

/// Writes each output of `job`; the versions written, or why not.
async fn write_all(lake: &dyn Lake, job: &Job) -> Result<Vec<String>, String> {
    let Some(dir) = job.outputs_dir.clone().or_else(|| job.spec.workdir.clone()) else {
        return Err(
            "its outputs cannot be read: the node it ran on reported no working directory (give the job a `workdir` on a disk shared with the control plane)"
                .into(),
        );
    };
    if !std::path::Path::new(&dir).is_dir() {
        return Err(format!(
            "its outputs cannot be read: replica 0's working directory {dir} is not on a disk the control plane can see (run the job where that disk is shared, or give it a `workdir` on a shared disk)"
        ));
    }
    let inputs: Vec<String> = job
        .spec
        .inputs
        .iter()
        .map(|i| format!("{}@{}", i.dataset, i.version.unwrap_or(0)))
        .collect();
    let mut wrote = Vec::new();
    for (i, out) in job.spec.outputs.iter().enumerate() {
        let (team, name) = split(&out.dataset);
        let write = JobOutputWrite {
            team: team.to_string(),
            name: name.to_string(),
            dir: std::path::Path::new(&dir).join(&out.from),
            from: out.from.clone(),
            format: out.format,
            mode: out.mode,
            job: job.id,
            inputs: inputs.clone(),
        };
        match lake.write_output(write).await {
            Ok(v) => wrote.push(format!("{}@{}", out.dataset, v.version)),
            Err(e) => {
                let mut why = format!("outputs[{i}] ({}): {e}", out.dataset);
                if !wrote.is_empty() {
                    why.push_str(&format!(" (already written: {})", wrote.join(", ")));
                }
                return Err(why);
            }
        }
    }
    Ok(wrote)
}

/// `GET /v1/agents/inputs/{job}/{index}`: input `index` of `job` as a tar
/// stream, for an agent (by its node credential) that runs the job but
/// cannot see the control plane's disk.
pub async fn agent_input(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    axum::extract::Path((job, index)): axum::extract::Path<(u64, usize)>,
) -> Result<axum::response::Response, ApiError> {
    let node = crate::fleet::node_of(&shared, &headers)?;
    let (input, team) =
        {
            let state = shared.state.lock().expect("state lock");
            let j = state
                .jobs
                .get(&job)
                .ok_or_else(|| ApiError::not_found(format!("no job {job}")))?;
            if !j.state.is_active() || !j.placement.iter().any(|p| p.node == node) {
                return Err(ApiError::forbidden(format!(
                    "job {job} does not run on node {node}"
                )));
            }
            let input =
                j.spec.inputs.get(index).cloned().ok_or_else(|| {
                    ApiError::not_found(format!("job {job} has no input {index}"))
                })?;
            (input, j.spec.team.clone())
        };
    let lake = shared
        .lake
        .clone()
        .ok_or_else(|| ApiError::not_found("this server runs without a data lake"))?;
    // Read as the job's team: what it was allowed at submission, unless a
    // grant was taken back since.
    let who = Principal {
        token_id: format!("node:{node}"),
        team,
        role: tessera_core::auth::Role::Member,
    };
    let (t, name) = split(&input.dataset);
    let staged = lake.stage_input(&who, t, name, input.version).await?;
    Ok(crate::lake_api::tar_response(staged.path, staged.version))
}

/// Removes the staged inputs (`Lake::prune_staged`) that no job which has
/// not ended reads and that nobody staged or reused for
/// `staged_inputs_idle`; looks every half of that (1 s to 10 min). A job
/// that asks for a removed version later gets it staged again.
pub(crate) async fn staged_inputs_loop(shared: Arc<Shared>) {
    let Some(lake) = shared.lake.clone() else {
        return;
    };
    let idle = shared.staged_inputs_idle;
    let every = (idle / 2).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let keep: HashSet<PathBuf> = {
            let state = shared.state.lock().expect("state lock");
            state
                .jobs
                .values()
                .filter(|j| !j.state.is_terminal())
                .flat_map(|j| j.spec.inputs.iter().filter_map(|i| i.path.as_ref()))
                .map(PathBuf::from)
                .collect()
        };
        match lake.prune_staged(&keep, idle).await {
            Ok(p) if p.dirs > 0 => {
                info!(
                    dirs = p.dirs,
                    bytes = p.bytes,
                    "removed staged inputs no job needs"
                );
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot prune staged inputs"),
        }
    }
}

/// Where the outputs an agent uploaded for one attempt are kept until they
/// are written.
fn uploaded_dir(shared: &Shared, job: JobId, attempt: u32) -> std::path::PathBuf {
    shared
        .home
        .join("job-outputs")
        .join(format!("{job}.{attempt}"))
}

/// `PUT /v1/agents/outputs/{job}/{attempt}`: the output directories of
/// replica 0 as a tar stream, from the agent (by its node credential) that
/// ran it. Unpacked whole before the job's record points at it; a retried
/// upload replaces an earlier one.
pub async fn agent_outputs(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    axum::extract::Path((job, attempt)): axum::extract::Path<(u64, u32)>,
    body: axum::body::Body,
) -> Result<axum::http::StatusCode, ApiError> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let node = crate::fleet::node_of(&shared, &headers)?;
    {
        let state = shared.state.lock().expect("state lock");
        let j = state
            .jobs
            .get(&job)
            .ok_or_else(|| ApiError::not_found(format!("no job {job}")))?;
        let here = j.placement.iter().any(|p| p.replica == 0 && p.node == node);
        if !j.state.is_active() || j.attempt != attempt || !here || j.spec.outputs.is_empty() {
            return Err(ApiError::forbidden(format!(
                "attempt {attempt} of job {job} has no outputs from node {node}"
            )));
        }
    }
    let dest = uploaded_dir(&shared, job, attempt);
    let parent = dest.parent().expect("a parent").to_path_buf();
    std::fs::create_dir_all(&parent).map_err(|e| ApiError::internal(e.to_string()))?;
    let tmp = parent.join(format!(".{job}.{attempt}.{}", crate::now_ms()));
    let tar_path = tmp.with_extension("tar");
    let received = async {
        let mut f = tokio::io::BufWriter::new(tokio::fs::File::create(&tar_path).await?);
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            f.write_all(&chunk.map_err(std::io::Error::other)?).await?;
        }
        f.flush().await?;
        let (tar_path, tmp) = (tar_path.clone(), tmp.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&tmp)?;
            let mut ar = tar::Archive::new(std::fs::File::open(&tar_path)?);
            for entry in ar.entries()? {
                // `unpack_in` refuses paths that leave the directory.
                entry?.unpack_in(&tmp)?;
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)?
    }
    .await;
    let _ = std::fs::remove_file(&tar_path);
    if let Err(e) = received {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "bad_upload",
            format!("the outputs could not be received: {e}"),
        ));
    }
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest).map_err(|e| ApiError::internal(e.to_string()))?;
    let staged = {
        let mut state = shared.state.lock().expect("state lock");
        let mut writes = Vec::new();
        let ok = state
            .jobs
            .get(&job)
            .is_some_and(|j| j.state.is_active() && j.attempt == attempt);
        if ok {
            let dir = dest.display().to_string();
            state.update_job(job, &mut writes, |j| {
                j.outputs_dir = Some(dir);
                None
            });
        }
        shared.stage(writes)
    };
    staged.durable().await;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
