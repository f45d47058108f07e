//! The subcommands that call the REST API: submit, jobs, job, logs, cancel,
//! nodes, teams and tokens.

use std::io::Read;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tessera_core::auth::Team;
use tessera_core::quantity::format_duration;
use tessera_core::{Event, Job};

use crate::output::{self, format_age, format_time, key_values, now_ms, Output, Table};
use crate::{Globals, JobsArgs, LogsArgs};

/// A page of `GET /v1/jobs`.
#[derive(Debug, Deserialize)]
struct JobPage {
    jobs: Vec<Value>,
    #[serde(default)]
    next_cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
struct EventList {
    events: Vec<Event>,
}

/// A node as `GET /v1/nodes` shows it.
#[derive(Debug, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub cpu_milli: u64,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub allocated_cpu_milli: u64,
    #[serde(default)]
    pub allocated_memory_bytes: u64,
    #[serde(default)]
    pub gpus: Vec<NodeGpu>,
    #[serde(default)]
    pub limits_enforced: bool,
    #[serde(default)]
    pub limits_note: String,
    #[serde(default)]
    pub last_heartbeat: u64,
    #[serde(default)]
    pub usage: Option<tessera_core::node::NodeUsage>,
}

#[derive(Debug, Deserialize)]
pub struct NodeGpu {
    #[serde(default)]
    pub model: String,
    #[serde(default = "yes")]
    pub healthy: bool,
    #[serde(default)]
    pub job_id: Option<u64>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
struct TokenInfo {
    id: String,
    #[serde(default)]
    name: String,
    team: String,
    role: String,
    #[serde(default)]
    created_at: u64,
}

fn decode_job(v: Value) -> Result<Job> {
    serde_json::from_value(v).context("unexpected job record from the server")
}

pub async fn submit(g: &Globals, file: &str) -> Result<()> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the job spec from stdin")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?
    };
    let content_type = if text.trim_start().starts_with('{') {
        "application/json"
    } else {
        "application/yaml"
    };
    let client = g.client()?;
    let job: Value = client.post_raw("/v1/jobs", text, content_type).await?;
    match g.output {
        Output::Json => output::print_json(&job)?,
        Output::Table | Output::Csv => {
            let id = job.get("id").and_then(Value::as_u64).unwrap_or_default();
            output::print(&format!("job {id} submitted"))?
        }
    }
    Ok(())
}

/// One row of the jobs table.
pub fn job_row(job: &Job, now: u64) -> Vec<String> {
    vec![
        job.id.to_string(),
        job.spec.name.clone(),
        job.spec.team.clone(),
        job.state.as_str().to_string(),
        format_age(now, job.submitted_at),
        output::job_resources(&job.spec),
        job.nodes_summary(),
    ]
}

pub async fn jobs(g: &Globals, args: &JobsArgs) -> Result<()> {
    let client = g.client()?;
    let mut query: Vec<(&str, String)> = vec![("limit", args.limit.to_string())];
    for (key, value) in [
        ("team", &args.team),
        ("state", &args.state),
        ("name", &args.name),
    ] {
        if let Some(v) = value {
            query.push((key, v.clone()));
        }
    }
    let mut all = Vec::new();
    let mut more = false;
    let mut cursor: Option<String> = None;
    loop {
        let mut q = query.clone();
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let page: JobPage = client.get("/v1/jobs", &q).await?;
        all.extend(page.jobs);
        cursor = page.next_cursor.filter(|c| !c.is_empty());
        if cursor.is_none() {
            break;
        }
        if !args.all {
            more = true;
            break;
        }
    }
    if g.output == Output::Json {
        return output::print_json(&all);
    }
    if all.is_empty() {
        eprintln!("no jobs");
        return Ok(());
    }
    let now = now_ms();
    let mut table = Table::new(&["ID", "NAME", "TEAM", "STATE", "AGE", "RESOURCES", "NODE"]);
    for v in all {
        table.row(job_row(&decode_job(v)?, now));
    }
    output::print(&table.render())?;
    if more {
        eprintln!("(more jobs: use --all, or a larger --limit)");
    }
    Ok(())
}

/// The human view of one job and its events.
pub fn render_job(job: &Job, events: &[Event], now: u64) -> String {
    let when = |t: Option<u64>| match t {
        Some(t) => format!("{} ({} ago)", format_time(t, false), format_age(now, t)),
        None => "-".to_string(),
    };
    let spec = &job.spec;
    let mut state = job.state.as_str().to_string();
    if job.cancel_requested && !job.state.is_terminal() {
        state.push_str(" (cancel requested)");
    }
    let mut pairs: Vec<(&str, String)> = vec![
        ("Name", spec.name.clone()),
        ("Team", spec.team.clone()),
        ("State", state),
        ("Reason", job.reason.clone().unwrap_or_else(|| "-".into())),
        (
            "Exit code",
            job.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
        ),
        (
            "Attempt",
            format!(
                "{} ({} failures, {} node losses, {} preemptions)",
                job.attempt, job.failures, job.node_losses, job.preemptions
            ),
        ),
        (
            "Submitted",
            format!("{} by {}", when(Some(job.submitted_at)), job.submitted_by),
        ),
        ("Started", when(job.started_at)),
        ("Finished", when(job.finished_at)),
    ];
    if let (Some(s), Some(f)) = (job.started_at, job.finished_at) {
        pairs.push(("Ran for", format_duration(f.saturating_sub(s))));
    }
    if job.preemptions > 0 {
        pairs.push((
            "Lost to preemption",
            format!("{} of run time", format_duration(job.preempted_ms)),
        ));
    }
    if job.cost > 0.0 {
        pairs.push(("Cost", format!("{:.4}", job.cost)));
    }
    if let Some(why) = &job.preempting {
        pairs.push(("Preempting", why.clone()));
    }
    pairs.push(("Resources", output::job_resources(spec)));
    pairs.push(("Priority", spec.priority.to_string()));
    if let Some(ms) = spec.max_runtime_ms {
        pairs.push(("Max runtime", format_duration(ms)));
    }
    pairs.push((
        "Retries",
        format!(
            "{} on failure, {} on node loss",
            spec.retries.on_failure, spec.retries.on_node_loss
        ),
    ));
    pairs.push(("Command", output::shell_join(&spec.argv)));
    if let Some(image) = &spec.image {
        pairs.push(("Image", image.clone()));
    }
    if let Some(dir) = &spec.workdir {
        pairs.push(("Workdir", dir.clone()));
    }
    if !spec.env.is_empty() {
        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.push(("Env", env.join(" ")));
    }
    if !spec.inputs.is_empty() {
        let ins: Vec<String> = spec
            .inputs
            .iter()
            .map(|i| match i.version {
                Some(v) => format!("{}@{v} as {}/", i.dataset, i.mount),
                None => format!("{} as {}/", i.dataset, i.mount),
            })
            .collect();
        pairs.push(("Reads", ins.join(", ")));
    }
    if !spec.outputs.is_empty() {
        let outs: Vec<String> = spec
            .outputs
            .iter()
            .map(|o| format!("{}/ -> {}", o.from, o.dataset))
            .collect();
        pairs.push(("Outputs", outs.join(", ")));
    }
    if !job.wrote.is_empty() {
        pairs.push(("Wrote", job.wrote.join(", ")));
    }
    let mut out = format!("Job {}\n", job.id);
    out.push_str(&key_values(&pairs));
    if !job.placement.is_empty() {
        let mut t = Table::new(&["REPLICA", "NODE", "GPUS", "STATE", "PID", "EXIT"]);
        for p in &job.placement {
            let status = job.replicas.iter().find(|r| r.replica == p.replica);
            let gpus: Vec<String> = p.gpus.iter().map(u32::to_string).collect();
            let exit = match status {
                Some(s) => match (s.exit_code, s.signal) {
                    (_, Some(sig)) => format!("signal {sig}"),
                    (Some(c), None) => c.to_string(),
                    (None, None) => "-".into(),
                },
                None => "-".into(),
            };
            t.row(vec![
                p.replica.to_string(),
                p.node.clone(),
                if gpus.is_empty() {
                    "-".into()
                } else {
                    gpus.join(",")
                },
                status.map_or("pending".into(), |s| {
                    serde_json::to_value(s.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                }),
                status
                    .and_then(|s| s.pid)
                    .map_or_else(|| "-".into(), |p| p.to_string()),
                exit,
            ]);
        }
        out.push_str("\nPlacement:\n");
        out.push_str(&t.render());
    }
    out.push_str("\nEvents:\n");
    if events.is_empty() {
        out.push_str("(none)\n");
    } else {
        let mut t = Table::new(&["TIME", "KIND", "MESSAGE"]);
        for e in events {
            t.row(vec![
                format_time(e.time, true),
                e.kind.clone(),
                e.message.clone(),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

pub async fn job(g: &Globals, id: u64) -> Result<()> {
    let client = g.client()?;
    let job_path = format!("/v1/jobs/{id}");
    let events_path = format!("/v1/jobs/{id}/events");
    let (job, events): (Value, Value) =
        futures::try_join!(client.get(&job_path, &[]), client.get(&events_path, &[]))?;
    if g.output == Output::Json {
        let events = events
            .get("events")
            .cloned()
            .unwrap_or(Value::Array(vec![]));
        return output::print_json(&serde_json::json!({ "job": job, "events": events }));
    }
    let job = decode_job(job)?;
    let events: EventList =
        serde_json::from_value(events).context("unexpected event list from the server")?;
    output::print(&render_job(&job, &events.events, now_ms()))?;
    Ok(())
}

pub async fn logs(g: &Globals, args: &LogsArgs) -> Result<()> {
    let client = g.client()?;
    let mut query = vec![
        ("replica", args.replica.to_string()),
        ("follow", args.follow.to_string()),
    ];
    if let Some(a) = args.attempt {
        query.push(("attempt", a.to_string()));
    }
    let resp = client
        .stream(&format!("/v1/jobs/{}/logs", args.id), &query)
        .await?;
    client.copy_body(resp, &mut std::io::stdout()).await
}

pub async fn cancel(g: &Globals, id: u64) -> Result<()> {
    let client = g.client()?;
    let job: Value = client
        .post_json(&format!("/v1/jobs/{id}/cancel"), &serde_json::json!({}))
        .await?;
    if g.output == Output::Json {
        return output::print_json(&job);
    }
    let job = decode_job(job)?;
    let text = if job.state.is_terminal() {
        format!("job {id} {}", job.state.as_str())
    } else {
        format!("job {id}: cancel requested (now {})", job.state.as_str())
    };
    output::print(&text)?;
    Ok(())
}

/// `used/total MODELS` for a node's GPUs, e.g. `1/8 H100`.
pub fn gpu_cell(gpus: &[NodeGpu]) -> String {
    if gpus.is_empty() {
        return "-".into();
    }
    let used = gpus.iter().filter(|g| g.job_id.is_some()).count();
    let mut models: Vec<String> = Vec::new();
    for g in gpus {
        let m = output::short_gpu_model(&g.model);
        if !m.is_empty() && !models.contains(&m) {
            models.push(m);
        }
    }
    let mut cell = format!("{used}/{}", gpus.len());
    if !models.is_empty() {
        cell.push(' ');
        cell.push_str(&models.join(","));
    }
    let unhealthy = gpus.iter().filter(|g| !g.healthy).count();
    if unhealthy > 0 {
        cell.push_str(&format!(" ({unhealthy} unhealthy)"));
    }
    cell
}

pub fn nodes_table(nodes: &[NodeInfo], now: u64) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "STATE",
        "CPU",
        "MEMORY",
        "GPUS",
        "IN USE",
        "LIMITS",
        "HEARTBEAT",
    ]);
    for n in nodes {
        t.row(vec![
            n.name.clone(),
            n.state.clone(),
            output::cpu_fraction(n.allocated_cpu_milli, n.cpu_milli),
            output::memory_fraction(n.allocated_memory_bytes, n.memory_bytes),
            gpu_cell(&n.gpus),
            match &n.usage {
                Some(u) => format!(
                    "{} cpu, {}",
                    tessera_core::quantity::format_cpu(u.cpu_used_milli),
                    tessera_core::quantity::format_memory(u.memory_used_bytes)
                ),
                None => "-".into(),
            },
            if n.limits_enforced {
                "enforced"
            } else {
                "not enforced"
            }
            .into(),
            if n.last_heartbeat == 0 {
                "-".into()
            } else {
                format!("{} ago", format_age(now, n.last_heartbeat))
            },
        ]);
    }
    t
}

/// Live GPU telemetry, one line per GPU that reported any.
pub fn gpu_notes(nodes: &[NodeInfo]) -> String {
    let mut out = String::new();
    for n in nodes {
        for g in n.usage.iter().flat_map(|u| &u.gpus) {
            let mut parts = Vec::new();
            if let Some(v) = g.utilization_percent {
                parts.push(format!("{v}% busy"));
            }
            if let Some(v) = g.memory_used_bytes {
                parts.push(format!("{} used", tessera_core::quantity::format_memory(v)));
            }
            if let Some(v) = g.temperature_celsius {
                parts.push(format!("{v} C"));
            }
            if let Some(v) = g.power_watts {
                parts.push(format!("{v:.0} W"));
            }
            parts.push(
                if g.healthy {
                    "healthy"
                } else {
                    "UNHEALTHY (not scheduled)"
                }
                .into(),
            );
            out.push_str(&format!(
                "{} gpu {}: {}\n",
                n.name,
                g.index,
                parts.join(", ")
            ));
        }
    }
    out
}

/// Why limits are not enforced, one line per node where they are not.
pub fn limits_notes(nodes: &[NodeInfo]) -> String {
    nodes
        .iter()
        .filter(|n| !n.limits_enforced)
        .map(|n| {
            // The agent's note already says `limits NOT enforced: why`.
            if n.limits_note.to_ascii_lowercase().contains("enforced") {
                format!("{}: {}\n", n.name, n.limits_note)
            } else if n.limits_note.is_empty() {
                format!("{}: limits not enforced\n", n.name)
            } else {
                format!("{}: limits not enforced: {}\n", n.name, n.limits_note)
            }
        })
        .collect()
}

pub async fn nodes(g: &Globals) -> Result<()> {
    let client = g.client()?;
    let body: Value = client.get("/v1/nodes", &[]).await?;
    let list = body.get("nodes").cloned().unwrap_or(Value::Array(vec![]));
    if g.output == Output::Json {
        return output::print_json(&list);
    }
    let nodes: Vec<NodeInfo> =
        serde_json::from_value(list).context("unexpected node list from the server")?;
    if nodes.is_empty() {
        eprintln!("no nodes");
        return Ok(());
    }
    let mut text = nodes_table(&nodes, now_ms()).render();
    let gpus = gpu_notes(&nodes);
    if !gpus.is_empty() {
        text.push('\n');
        text.push_str(&gpus);
    }
    let notes = limits_notes(&nodes);
    if !notes.is_empty() {
        text.push('\n');
        text.push_str(&notes);
    }
    output::print(&text)?;
    Ok(())
}

/// Turns `--quota gpu=4:8 --quota memory=64Gi` into the API's quota object;
/// `none` is an empty quota (no guarantee, no limit).
pub fn quota_json(flags: &[String]) -> Result<Option<Value>> {
    if flags.is_empty() {
        return Ok(None);
    }
    let mut quota = serde_json::Map::new();
    for f in flags {
        if f == "none" {
            continue;
        }
        let (resource, amounts) = f.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--quota {f}: write RESOURCE=GUARANTEED[:LIMIT], e.g. gpu=4:8")
        })?;
        if !matches!(resource, "cpu" | "memory" | "gpu") {
            anyhow::bail!("--quota {f}: the resource is cpu, memory or gpu");
        }
        let (g, l) = match amounts.split_once(':') {
            Some((g, l)) => (g, Some(l)),
            None => (amounts, None),
        };
        let mut pair = serde_json::Map::new();
        if !g.is_empty() {
            pair.insert("guaranteed".into(), Value::String(g.into()));
        }
        if let Some(l) = l.filter(|l| !l.is_empty()) {
            pair.insert("limit".into(), Value::String(l.into()));
        }
        quota.insert(resource.into(), Value::Object(pair));
    }
    Ok(Some(Value::Object(quota)))
}

pub async fn team_set(
    g: &Globals,
    name: &str,
    weight: Option<f64>,
    quota: &[String],
) -> Result<()> {
    let client = g.client()?;
    let mut body = serde_json::Map::new();
    if let Some(w) = weight {
        body.insert("weight".into(), serde_json::json!(w));
    }
    if let Some(q) = quota_json(quota)? {
        body.insert("quota".into(), q);
    }
    let team: Value = client
        .put_json(&format!("/v1/teams/{name}"), &Value::Object(body))
        .await?;
    match g.output {
        Output::Json => output::print_json(&team)?,
        Output::Table | Output::Csv => output::print(&format!("team {name} updated"))?,
    }
    Ok(())
}

pub async fn team_create(g: &Globals, name: &str, weight: f64, quota: &[String]) -> Result<()> {
    let client = g.client()?;
    let mut body = serde_json::json!({ "name": name, "weight": weight });
    if let Some(q) = quota_json(quota)? {
        body["quota"] = q;
    }
    let team: Value = client.post_json("/v1/teams", &body).await?;
    match g.output {
        Output::Json => output::print_json(&team)?,
        Output::Table | Output::Csv => {
            let weight = team.get("weight").and_then(Value::as_f64).unwrap_or(weight);
            output::print(&format!("team {name} created (weight {weight})"))?
        }
    }
    Ok(())
}

/// `gpu 4/8, memory 64Gi/-` for the resources a quota names.
pub fn quota_cell(q: &tessera_core::auth::TeamQuota) -> String {
    use tessera_core::quantity::{format_cpu, format_memory};
    let show = |v: u64, f: &dyn Fn(u64) -> String| {
        if v == u64::MAX {
            "-".to_string()
        } else {
            f(v)
        }
    };
    let (g, l) = (q.guaranteed, q.limit);
    let mut parts = Vec::new();
    for (name, gv, lv, f) in [
        (
            "cpu",
            g.cpu_milli,
            l.cpu_milli,
            &format_cpu as &dyn Fn(u64) -> String,
        ),
        ("memory", g.memory_bytes, l.memory_bytes, &format_memory),
        ("gpu", g.gpu_milli, l.gpu_milli, &format_cpu),
    ] {
        if gv > 0 || lv != u64::MAX {
            parts.push(format!("{name} {}/{}", show(gv, f), show(lv, f)));
        }
    }
    parts.join(", ")
}

pub async fn team_list(g: &Globals) -> Result<()> {
    let client = g.client()?;
    let body: Value = client.get("/v1/teams", &[]).await?;
    let list = body.get("teams").cloned().unwrap_or(Value::Array(vec![]));
    if g.output == Output::Json {
        return output::print_json(&list);
    }
    let teams: Vec<Team> =
        serde_json::from_value(list).context("unexpected team list from the server")?;
    let now = now_ms();
    let mut t = Table::new(&["NAME", "WEIGHT", "QUOTA (GUARANTEED/LIMIT)", "AGE"]);
    for team in teams {
        t.row(vec![
            team.name,
            team.weight.to_string(),
            team.quota
                .map_or_else(|| "-".to_string(), |q| quota_cell(&q)),
            format_age(now, team.created_at),
        ]);
    }
    output::print(&t.render())?;
    Ok(())
}

pub async fn token_create(g: &Globals, team: &str, role: &str, name: Option<&str>) -> Result<()> {
    let client = g.client()?;
    let mut body = serde_json::json!({ "team": team, "role": role });
    if let Some(n) = name {
        body["name"] = n.into();
    }
    let created: Value = client.post_json("/v1/tokens", &body).await?;
    if g.output == Output::Json {
        return output::print_json(&created);
    }
    let field = |k: &str| {
        created
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    eprintln!(
        "token {} created for team {} ({}); the secret below is shown only once:",
        field("id"),
        field("team"),
        field("role")
    );
    output::print(&field("token"))?;
    Ok(())
}

pub async fn token_list(g: &Globals) -> Result<()> {
    let client = g.client()?;
    let body: Value = client.get("/v1/tokens", &[]).await?;
    let list = body.get("tokens").cloned().unwrap_or(Value::Array(vec![]));
    if g.output == Output::Json {
        return output::print_json(&list);
    }
    let tokens: Vec<TokenInfo> =
        serde_json::from_value(list).context("unexpected token list from the server")?;
    let now = now_ms();
    let mut t = Table::new(&["ID", "NAME", "TEAM", "ROLE", "AGE"]);
    for tok in tokens {
        t.row(vec![
            tok.id,
            tok.name,
            tok.team,
            tok.role,
            format_age(now, tok.created_at),
        ]);
    }
    output::print(&t.render())?;
    Ok(())
}

pub async fn token_delete(g: &Globals, id: &str) -> Result<()> {
    let client = g.client()?;
    client.delete(&format!("/v1/tokens/{id}")).await?;
    match g.output {
        Output::Json => output::print_json(&serde_json::json!({ "deleted": id }))?,
        Output::Table | Output::Csv => output::print(&format!("token {id} deleted"))?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::job::{ReplicaPlacement, ReplicaState, ReplicaStatus};
    use tessera_core::JobSpec;

    fn sample_job() -> Job {
        let spec = JobSpec::parse(
            "name: train\nteam: ml\ncommand: [python3, -c, 'print(1)']\nresources: {cpu: 8, memory: 64Gi, gpu: 2}\nreplicas: 2\n",
        )
        .unwrap()
        .validate("ml")
        .unwrap();
        let mut job = Job::new(42, spec, "tok-1".into(), 1_700_000_000_000);
        job.state = tessera_core::JobState::Running;
        job.attempt = 1;
        job.started_at = Some(1_700_000_001_000);
        job.placement = vec![
            ReplicaPlacement {
                replica: 0,
                node: "gpu-1".into(),
                gpus: vec![0, 1],
            },
            ReplicaPlacement {
                replica: 1,
                node: "gpu-2".into(),
                gpus: vec![4, 5],
            },
        ];
        job.replicas = vec![ReplicaStatus {
            replica: 0,
            state: ReplicaState::Running,
            pid: Some(1234),
            exit_code: None,
            signal: None,
        }];
        job
    }

    #[test]
    fn job_rows() {
        let job = sample_job();
        let row = job_row(&job, 1_700_000_000_000 + 125_000);
        assert_eq!(
            row,
            [
                "42",
                "train",
                "ml",
                "running",
                "2m",
                "2x(8 cpu, 64Gi, 2 gpu)",
                "gpu-1,gpu-2"
            ]
        );
    }

    #[test]
    fn job_detail() {
        let job = sample_job();
        let events = [Event::new(42, 1_700_000_000_000, "submitted", "by tok-1")];
        let text = render_job(&job, &events, 1_700_000_060_000);
        assert!(text.starts_with("Job 42\nName:"), "{text}");
        assert!(text.contains("State:      running\n"), "{text}");
        assert!(
            text.contains("Command:    python3 -c 'print(1)'\n"),
            "{text}"
        );
        assert!(
            text.contains("0        gpu-1  0,1   running  1234  -"),
            "{text}"
        );
        assert!(
            text.contains("1        gpu-2  4,5   pending  -     -"),
            "{text}"
        );
        assert!(
            text.contains("2023-11-14 22:13:20.000Z  submitted  by tok-1"),
            "{text}"
        );
    }

    #[test]
    fn node_cells() {
        let nodes: Vec<NodeInfo> = serde_json::from_value(serde_json::json!([{
            "name": "n1", "state": "ready", "cpu_milli": 2000, "memory_bytes": 8u64 << 30,
            "allocated_cpu_milli": 1000, "allocated_memory_bytes": 256u64 << 20,
            "gpus": [
                {"index": 0, "uuid": "GPU-0", "model": "NVIDIA H100 80GB HBM3", "memory_bytes": 1, "healthy": true, "job_id": 3},
                {"index": 1, "uuid": "GPU-1", "model": "NVIDIA H100 80GB HBM3", "memory_bytes": 1, "healthy": false, "job_id": null}
            ],
            "gpu_source": "nvml", "limits_enforced": false, "limits_note": "/sys/fs/cgroup is read-only", "labels": {},
            "last_heartbeat": 1_000, "running_replicas": 1,
            "usage": {"at": 1_000, "cpu_used_milli": 1500, "memory_used_bytes": 1u64 << 30, "gpus": [
                {"index": 0, "utilization_percent": 97, "memory_used_bytes": 40u64 << 30, "temperature_celsius": 61, "power_watts": 412.4, "ecc_uncorrected_volatile": 0, "healthy": true},
                {"index": 1, "utilization_percent": null, "memory_used_bytes": null, "temperature_celsius": null, "power_watts": null, "ecc_uncorrected_volatile": 2, "healthy": false}
            ]}
        }]))
        .unwrap();
        let text = nodes_table(&nodes, 6_000).render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "NAME  STATE  CPU  MEMORY     GPUS                    IN USE        LIMITS        HEARTBEAT"
        );
        assert_eq!(
            lines[1],
            "n1    ready  1/2  256Mi/8Gi  1/2 H100 (1 unhealthy)  1.5 cpu, 1Gi  not enforced  5s ago"
        );
        assert_eq!(
            gpu_notes(&nodes),
            "n1 gpu 0: 97% busy, 40Gi used, 61 C, 412 W, healthy\nn1 gpu 1: UNHEALTHY (not scheduled)\n"
        );
        assert_eq!(
            limits_notes(&nodes),
            "n1: limits not enforced: /sys/fs/cgroup is read-only\n"
        );
    }
}
