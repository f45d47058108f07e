//! Rendering: one function per page, from the view structs in `view` to
//! HTML. No state, no locks, no I/O: fast, and testable on plain values.

use std::fmt::Write;

use tessera_core::JobState;

use super::history::{per_minute_svg, utilisation_svg};
use super::html::{
    ago, badge, bar, begin, cores, csrf_field, end, gib, gpus, money, pct, span, url_enc, utc, Esc,
    Session,
};
use super::view::{JobPage, Jobs, Nodes, Overview, Teams, JOBS_PER_PAGE, NODES_PER_PAGE, PERIODS};
use crate::service_api::ServiceSummary;

/// The sign-in page. `error` is shown above the form.
pub fn login(next: &str, error: Option<&str>) -> String {
    let mut o = String::with_capacity(8 * 1024);
    begin(&mut o, "Sign in", "", None);
    o.push_str("<section class=\"signin card\"><h1>Sign in to Tessera</h1>");
    if let Some(e) = error {
        let _ = write!(o, "<p class=\"error\" id=\"signin-error\">{}</p>", Esc(e));
    }
    let _ = write!(
        o,
        "<form method=\"post\" action=\"/ui/login\">\
         <label for=\"token\">API token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" \
         placeholder=\"tsr_…\" required autofocus>\
         <input type=\"hidden\" name=\"next\" value=\"{}\">\
         <button class=\"primary\" id=\"signin\">Sign in</button></form>\
         <p class=\"hint\">Use a token from <code>tessera token create</code>; an admin's is in \
         <code>$TESSERA_HOME/admin.token</code>. Pages show what the API shows this token: its \
         team's work, or everything for an admin of the <code>admin</code> team.</p></section>",
        Esc(next)
    );
    end(&mut o);
    o
}

/// A page that says what went wrong, in the API's words.
pub fn error(session: Option<&Session>, status: u16, message: &str) -> String {
    let mut o = String::with_capacity(8 * 1024);
    begin(&mut o, "Error", "", session);
    let _ = write!(
        o,
        "<section class=\"card\"><h1>{}</h1><p class=\"error\" id=\"error\">{}</p>\
         <p><a href=\"javascript:history.back()\" id=\"back\">Back</a> · <a href=\"/ui\">Overview</a></p></section>",
        match status {
            400 | 422 => "That request is not valid",
            403 => "Not allowed",
            404 => "Not found",
            _ => "Something went wrong",
        },
        Esc(message)
    );
    end(&mut o);
    o
}

fn stat(o: &mut String, label: &str, value: &str, sub: &str) {
    let _ = write!(
        o,
        "<div class=\"stat\"><div class=\"label\">{}</div><div class=\"value\">{}</div><div class=\"sub\">{}</div></div>",
        Esc(label),
        Esc(value),
        Esc(sub)
    );
}

pub fn overview(s: &Session, v: &Overview) -> String {
    let mut o = String::with_capacity(64 * 1024);
    begin(&mut o, "Overview", "/ui", Some(s));
    o.push_str("<div class=\"head\"><h1>Overview</h1><span class=\"live-note\">updates every 5 s</span></div>");
    o.push_str("<div id=\"live\" data-live>");
    let c = &v.current;
    let ready = v.nodes_by_state.get("ready").copied().unwrap_or(0);
    let total: u32 = v.nodes_by_state.values().sum();
    o.push_str("<section class=\"stats\">");
    let others: Vec<String> = v
        .nodes_by_state
        .iter()
        .filter(|(k, _)| **k != "ready")
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    stat(
        &mut o,
        "Nodes ready",
        &format!("{ready} / {total}"),
        &others.join(", "),
    );
    stat(
        &mut o,
        "GPUs allocated",
        &format!("{} / {}", gpus(c.gpu_alloc), gpus(c.gpu_total)),
        &match c.gpu_util {
            Some(u) => format!("{u:.0}% busy (live)"),
            None => "no live utilisation reported".into(),
        },
    );
    stat(
        &mut o,
        "CPU allocated",
        &format!("{} / {} cores", cores(c.cpu_alloc), cores(c.cpu_total)),
        &c.cpu_frac().map(pct).unwrap_or_default(),
    );
    stat(
        &mut o,
        "Memory allocated",
        &format!("{} / {}", gib(c.mem_alloc), gib(c.mem_total)),
        &c.mem_frac().map(pct).unwrap_or_default(),
    );
    let (qsum, rsum) = v
        .queues
        .iter()
        .fold((0, 0), |a, q| (a.0 + q.queued, a.1 + q.running));
    stat(
        &mut o,
        "Jobs",
        &format!("{rsum} running"),
        &format!("{qsum} queued"),
    );
    o.push_str("</section>");

    // Utilisation chart.
    let from = v.now.saturating_sub(v.window_ms);
    o.push_str(
        "<section class=\"card\"><div class=\"card-head\"><h2>Utilisation</h2><div class=\"seg\">",
    );
    for (label, ms) in [("1h", 3_600_000u64), ("6h", 6 * 3_600_000)] {
        let on = if v.window_ms == ms {
            " class=\"on\""
        } else {
            ""
        };
        let _ = write!(o, "<a href=\"/ui?window={label}\"{on}>{label}</a>");
    }
    o.push_str("</div></div>");
    utilisation_svg(&mut o, &v.history, from, v.now);
    o.push_str(
        "<div class=\"legend\"><span class=\"k cpu\"></span>CPU allocated\
         <span class=\"k mem\"></span>Memory allocated<span class=\"k gpu\"></span>GPU allocated\
         <span class=\"k util\"></span>GPU utilisation (live)</div></section>",
    );

    // Capacity by pool and GPU model.
    o.push_str("<section class=\"card wide\"><h2>Capacity by pool and GPU model</h2><table id=\"capacity\"><thead><tr>\
        <th>Pool</th><th>GPU model</th><th class=\"num\">Nodes</th><th>GPUs allocated</th><th class=\"num\">GPU busy</th>\
        <th>CPU allocated</th><th>Memory allocated</th></tr></thead><tbody>");
    if v.capacity.is_empty() {
        o.push_str("<tr><td colspan=\"7\" class=\"empty\">No nodes have joined yet.</td></tr>");
    }
    for r in &v.capacity {
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>",
            Esc(&r.pool),
            if r.model.is_empty() {
                "<span class=\"muted\">no GPUs</span>".to_string()
            } else {
                Esc(&r.model).to_string()
            },
            r.nodes
        );
        if r.gpus > 0 {
            let unhealthy = r.gpus - r.gpus_healthy;
            let mut label = format!("{} / {}", gpus(r.gpu_alloc_milli), r.gpus);
            if unhealthy > 0 {
                label.push_str(&format!(" ({unhealthy} unhealthy)"));
            }
            bar(
                &mut o,
                r.gpu_alloc_milli as f64,
                r.gpus as f64 * 1000.0,
                &label,
            );
        } else {
            o.push_str("<span class=\"muted\">—</span>");
        }
        let _ = write!(
            o,
            "</td><td class=\"num\">{}</td><td>",
            r.gpu_util
                .map(|u| format!("{u:.0}%"))
                .unwrap_or_else(|| "—".into())
        );
        if r.nodes > 0 {
            bar(
                &mut o,
                r.cpu_alloc as f64,
                r.cpu_milli as f64,
                &format!("{} / {}", cores(r.cpu_alloc), cores(r.cpu_milli)),
            );
            o.push_str("</td><td>");
            bar(
                &mut o,
                r.memory_alloc as f64,
                r.memory as f64,
                &format!("{} / {}", gib(r.memory_alloc), gib(r.memory)),
            );
        } else {
            o.push_str("<span class=\"muted\">(counted above)</span></td><td>");
        }
        o.push_str("</td></tr>");
    }
    o.push_str("</tbody></table></section><div class=\"cols\">");

    // Queue per team.
    o.push_str("<section class=\"card\"><h2>Queue by team</h2><table id=\"queues\"><thead><tr><th>Team</th>\
        <th class=\"num\">Queued</th><th class=\"num\">Running</th><th class=\"num\">GPUs asked</th><th class=\"num\">Longest wait</th></tr></thead><tbody>");
    for q in &v.queues {
        let _ = write!(
            o,
            "<tr><td><a href=\"/ui/jobs?team={}\">{}</a></td><td class=\"num\"><a href=\"/ui/jobs?team={}&amp;state=queued\">{}</a></td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            url_enc(&q.team),
            Esc(&q.team),
            url_enc(&q.team),
            q.queued,
            q.running,
            gpus(q.queued_gpu_milli),
            q.oldest_wait_ms.map(span).unwrap_or_else(|| "—".into())
        );
    }
    o.push_str("</tbody></table></section>");

    // Started / finished per minute.
    let last = v.per_minute.last().copied().unwrap_or((0, 0));
    let hour: (u64, u64) = v
        .per_minute
        .iter()
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let _ = write!(
        o,
        "<section class=\"card\"><div class=\"card-head\"><h2>Jobs started and finished per minute</h2>\
         <span class=\"muted\" id=\"rates\">last minute: {} started, {} finished · last hour: {} started, {} finished</span></div>",
        last.0, last.1, hour.0, hour.1
    );
    per_minute_svg(&mut o, &v.per_minute, v.now);
    o.push_str("<div class=\"legend\"><span class=\"k started\"></span>started<span class=\"k finished\"></span>finished</div></section>");
    o.push_str("</div></div>");
    end(&mut o);
    o
}

fn select(o: &mut String, name: &str, label: &str, options: &[String], current: Option<&str>) {
    let _ = write!(
        o,
        "<label>{label}<select name=\"{name}\" id=\"f-{name}\"><option value=\"\">any</option>"
    );
    for opt in options {
        let sel = if current == Some(opt.as_str()) {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            o,
            "<option value=\"{}\"{sel}>{}</option>",
            Esc(opt),
            Esc(opt)
        );
    }
    o.push_str("</select></label>");
}

/// The query string of the Jobs page for these filters and page.
fn jobs_href(v: &Jobs, before: Option<u64>) -> String {
    let q = &v.query;
    let mut parts = Vec::new();
    for (k, val) in [
        ("team", q.team()),
        ("state", q.state()),
        ("pool", q.pool()),
        ("name", q.name()),
    ] {
        if let Some(val) = val {
            parts.push(format!("{k}={}", url_enc(val)));
        }
    }
    if let Some(b) = before {
        parts.push(format!("before={b}"));
    }
    if parts.is_empty() {
        "/ui/jobs".into()
    } else {
        format!("/ui/jobs?{}", parts.join("&"))
    }
}

pub fn jobs(s: &Session, v: &Jobs) -> String {
    let mut o = String::with_capacity(64 * 1024);
    begin(&mut o, "Jobs", "/ui/jobs", Some(s));
    o.push_str("<div class=\"head\"><h1>Jobs</h1>");
    if v.can_submit {
        o.push_str(
            "<a class=\"button primary\" href=\"/ui/jobs/new\" id=\"new-job\">Submit a job</a>",
        );
    }
    o.push_str(
        "</div><form class=\"filters card\" method=\"get\" action=\"/ui/jobs\" id=\"job-filters\">",
    );
    select(&mut o, "team", "Team", &v.teams, v.query.team());
    let states: Vec<String> = JobState::ALL.iter().map(|s| s.as_str().into()).collect();
    select(&mut o, "state", "State", &states, v.query.state());
    select(&mut o, "pool", "Pool", &v.pools, v.query.pool());
    let _ = write!(
        o,
        "<label>Name<input name=\"name\" id=\"f-name\" value=\"{}\" placeholder=\"part of a name\"></label>\
         <button>Filter</button><a href=\"/ui/jobs\">Clear</a></form>",
        Esc(v.query.name().unwrap_or(""))
    );
    o.push_str("<section class=\"card\" id=\"live\" data-live>");
    let first = v.rows.first().map(|r| r.job.id);
    let last = v.rows.last().map(|r| r.job.id);
    let _ = write!(
        o,
        "<div class=\"card-head\"><span class=\"muted\" id=\"matched\">{} job{} match{}</span>",
        v.matched,
        if v.matched == 1 { "" } else { "s" },
        if v.matched == 1 { "es" } else { "" },
    );
    if let (Some(f), Some(l)) = (first, last) {
        let _ = write!(o, "<span class=\"muted\">showing ids {f}…{l}</span>");
    }
    o.push_str("</div><table id=\"jobs\"><thead><tr><th class=\"num\">ID</th><th>Name</th><th>Team</th><th>State</th>\
        <th>Resources</th><th>Node</th><th>Submitted</th><th class=\"num\">Run time</th><th class=\"num\">Exit</th>\
        <th class=\"num\">Cost</th><th>Reason</th></tr></thead><tbody>");
    if v.rows.is_empty() {
        o.push_str("<tr><td colspan=\"11\" class=\"empty\">No jobs match.</td></tr>");
    }
    for r in &v.rows {
        let j = &r.job;
        let _ = write!(
            o,
            "<tr data-job=\"{id}\"><td class=\"num\"><a href=\"/ui/jobs/{id}\">{id}</a></td>\
             <td><a href=\"/ui/jobs/{id}\" class=\"jobname\">{}</a></td><td>{}</td><td>",
            Esc(&j.spec.name),
            Esc(j.team()),
            id = j.id
        );
        badge(&mut o, j.state.as_str());
        let res = if j.spec.replicas > 1 {
            format!("{} × {}", j.spec.replicas, j.spec.resources.summary())
        } else {
            j.spec.resources.summary()
        };
        let _ = write!(
            o,
            "</td><td>{}</td><td>{}</td><td>",
            Esc(&res),
            Esc(&j.nodes_summary())
        );
        ago(&mut o, j.submitted_at, v.now);
        let run = match (j.started_at, j.finished_at) {
            (Some(st), Some(f)) => span(f.saturating_sub(st)),
            (Some(st), None) => span(v.now.saturating_sub(st)),
            _ => "—".into(),
        };
        let _ = write!(
            o,
            "</td><td class=\"num\">{run}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"reason\">{}</td></tr>",
            j.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            money(r.cost),
            Esc(j.reason.as_deref().unwrap_or(""))
        );
    }
    o.push_str("</tbody></table><div class=\"pager\">");
    if v.query.before.is_some() {
        let _ = write!(
            o,
            "<a href=\"{}\" id=\"first-page\">« Newest</a>",
            Esc(&jobs_href(v, None))
        );
    }
    if let Some(n) = v.next {
        let _ = write!(
            o,
            "<a href=\"{}\" id=\"next-page\">Older {JOBS_PER_PAGE} »</a>",
            Esc(&jobs_href(v, Some(n)))
        );
    }
    o.push_str("</div></section>");
    end(&mut o);
    o
}

/// The submit form; `spec` is put back after an error.
pub fn new_job(s: &Session, spec: &str, error: Option<(&str, Option<&str>)>) -> String {
    let mut o = String::with_capacity(16 * 1024);
    begin(&mut o, "Submit a job", "/ui/jobs", Some(s));
    o.push_str("<div class=\"head\"><h1>Submit a job</h1></div><section class=\"card\">");
    if let Some((msg, field)) = error {
        let _ = write!(o, "<p class=\"error\" id=\"submit-error\">");
        if let Some(f) = field {
            let _ = write!(o, "<code>{}</code>: ", Esc(f));
        }
        let _ = write!(o, "{}</p>", Esc(msg));
    }
    o.push_str("<form method=\"post\" action=\"/ui/jobs\" id=\"submit-form\">");
    csrf_field(&mut o, s);
    let _ = write!(
        o,
        "<label for=\"spec\">Job spec (YAML or JSON), as <code>tessera submit</code> takes it</label>\
         <textarea id=\"spec\" name=\"spec\" rows=\"16\" spellcheck=\"false\">{}</textarea>\
         <div class=\"form-actions\"><button class=\"primary\" id=\"submit\">Submit</button>\
         <a href=\"/ui/jobs\">Cancel</a></div></form></section>",
        Esc(spec)
    );
    end(&mut o);
    o
}

pub const EXAMPLE_SPEC: &str = "name: hello\n\
command: [\"python3\", \"-c\", \"print('hello from tessera')\"]\n\
resources: {cpu: 1, memory: 256Mi}\n";

pub fn job(s: &Session, v: &JobPage, replica: u32) -> String {
    let j = &v.job;
    let mut o = String::with_capacity(32 * 1024);
    begin(
        &mut o,
        &format!("Job {} · {}", j.id, j.spec.name),
        "/ui/jobs",
        Some(s),
    );
    let _ = write!(
        o,
        "<div class=\"head\"><h1><span class=\"muted\">Job {}</span> {}</h1>",
        j.id,
        Esc(&j.spec.name)
    );
    if v.can_cancel {
        let _ = write!(
            o,
            "<form method=\"post\" action=\"/ui/jobs/{}/cancel\" data-confirm=\"Cancel job {}?\">",
            j.id, j.id
        );
        csrf_field(&mut o, s);
        o.push_str("<button class=\"danger\" id=\"cancel\">Cancel job</button></form>");
    }
    o.push_str("</div>");
    // The live part: state, facts, reason, placement, events.
    let _ = write!(
        o,
        "<div id=\"job-live\" data-live data-state=\"{}\">",
        j.state.as_str()
    );
    o.push_str("<section class=\"card facts\"><div class=\"fact\"><div class=\"label\">State</div><div id=\"job-state\">");
    badge(&mut o, j.state.as_str());
    if j.cancel_requested && !j.state.is_terminal() {
        o.push_str(" <span class=\"muted\">cancelling</span>");
    }
    o.push_str("</div></div>");
    let fact = |o: &mut String, label: &str, id: &str, value: &str| {
        let _ = write!(
            o,
            "<div class=\"fact\"><div class=\"label\">{}</div><div id=\"{id}\">{}</div></div>",
            Esc(label),
            Esc(value)
        );
    };
    fact(&mut o, "Team", "job-team", j.team());
    fact(&mut o, "Submitted by", "job-by", &j.submitted_by);
    fact(&mut o, "Submitted", "job-submitted", &utc(j.submitted_at));
    fact(
        &mut o,
        "Started",
        "job-started",
        &j.started_at.map(utc).unwrap_or_else(|| "—".into()),
    );
    fact(
        &mut o,
        "Finished",
        "job-finished",
        &j.finished_at.map(utc).unwrap_or_else(|| "—".into()),
    );
    let run = match (j.started_at, j.finished_at) {
        (Some(st), Some(f)) => span(f.saturating_sub(st)),
        (Some(st), None) => span(v.now.saturating_sub(st)),
        _ => "—".into(),
    };
    fact(&mut o, "Run time", "job-runtime", &run);
    fact(
        &mut o,
        "Exit code",
        "job-exit",
        &j.exit_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "—".into()),
    );
    fact(&mut o, "Cost", "job-cost", &money(v.cost));
    fact(&mut o, "Attempt", "job-attempt", &j.attempt.to_string());
    fact(
        &mut o,
        "Retries used",
        "job-retries",
        &format!(
            "{} failure{}, {} node loss{}",
            j.failures,
            if j.failures == 1 { "" } else { "s" },
            j.node_losses,
            if j.node_losses == 1 { "" } else { "es" }
        ),
    );
    if j.preemptions > 0 {
        fact(
            &mut o,
            "Preempted",
            "job-preempted",
            &format!("{} times, {} lost", j.preemptions, span(j.preempted_ms)),
        );
    }
    o.push_str("</section>");
    if let Some(reason) = &j.reason {
        let (cls, title) = if j.state == JobState::Queued {
            ("wait", "Why it waits")
        } else if j.state.is_terminal() {
            ("ended", "Why it ended")
        } else {
            ("ended", "Note")
        };
        let _ = write!(
            o,
            "<section class=\"callout {cls}\" id=\"job-reason\"><strong>{title}</strong> {}</section>",
            Esc(reason)
        );
    }
    if let Some(p) = &j.preempting {
        let _ = write!(
            o,
            "<section class=\"callout wait\"><strong>Being preempted</strong> {}</section>",
            Esc(p)
        );
    }
    o.push_str("<div class=\"cols\"><section class=\"card\"><h2>Placement</h2><table id=\"placement\"><thead><tr>\
        <th class=\"num\">Replica</th><th>Node</th><th>GPUs</th><th>State</th><th class=\"num\">PID</th><th class=\"num\">Exit</th></tr></thead><tbody>");
    if j.placement.is_empty() {
        o.push_str("<tr><td colspan=\"6\" class=\"empty\">Not placed.</td></tr>");
    }
    for p in &j.placement {
        let st = j.replicas.iter().find(|r| r.replica == p.replica);
        let models = v.gpu_models.get(&p.replica).cloned().unwrap_or_default();
        let gpus_text = if p.gpus.is_empty() {
            "—".to_string()
        } else {
            let idx: Vec<String> = p.gpus.iter().map(|g| g.to_string()).collect();
            let mut m = models.clone();
            m.dedup();
            format!("{} ({})", idx.join(", "), m.join(", "))
        };
        let _ = write!(
            o,
            "<tr><td class=\"num\">{}</td><td><a href=\"/ui/nodes?name={}\">{}</a></td><td>{}</td><td>",
            p.replica,
            url_enc(&p.node),
            Esc(&p.node),
            Esc(&gpus_text)
        );
        match st {
            Some(r) => {
                let state = match r.state {
                    tessera_core::job::ReplicaState::Pending => "pending",
                    tessera_core::job::ReplicaState::Running => "running",
                    tessera_core::job::ReplicaState::Exited => "exited",
                };
                badge(&mut o, state);
                let exit = match (r.exit_code, r.signal) {
                    (Some(c), _) => c.to_string(),
                    (None, Some(sig)) => format!("signal {sig}"),
                    _ => String::new(),
                };
                let _ = write!(
                    o,
                    "</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                    r.pid.map(|p| p.to_string()).unwrap_or_default(),
                    exit
                );
            }
            None => o.push_str("</td><td></td><td></td></tr>"),
        }
    }
    o.push_str("</tbody></table></section>");
    // Events timeline.
    o.push_str("<section class=\"card\"><h2>Events</h2><ol class=\"timeline\" id=\"events\">");
    for e in &v.events {
        let _ = write!(
            o,
            "<li class=\"ev-{}\"><time title=\"{}\">{}</time> <span class=\"kind\">{}</span> {}</li>",
            Esc(&e.kind),
            utc(e.time),
            super::html::hhmm(e.time) + &format!(":{:02}", e.time / 1000 % 60),
            Esc(&e.kind),
            Esc(&e.message)
        );
    }
    o.push_str("</ol></section></div></div>");

    // Logs: followed live by the script; not part of the refreshed area.
    o.push_str("<section class=\"card\"><div class=\"card-head\"><h2>Logs</h2>");
    if j.spec.replicas > 1 {
        o.push_str("<div class=\"seg\">");
        for r in 0..j.spec.replicas.min(64) {
            let on = if r == replica { " class=\"on\"" } else { "" };
            let _ = write!(
                o,
                "<a href=\"/ui/jobs/{}?replica={r}\"{on}>replica {r}</a>",
                j.id
            );
        }
        o.push_str("</div>");
    }
    let _ = write!(
        o,
        "<span class=\"muted\" id=\"log-status\">{}</span></div>\
         <pre class=\"log\" id=\"log\" data-src=\"/ui/jobs/{}/logs?replica={replica}\" data-active=\"{}\"></pre></section>",
        if j.state.is_terminal() {
            "complete"
        } else {
            "following"
        },
        j.id,
        !j.state.is_terminal()
    );

    // Spec.
    let r = &j.spec.resources;
    o.push_str("<section class=\"card\"><h2>Spec</h2><dl class=\"spec\" id=\"spec\">");
    let dd = |o: &mut String, k: &str, v: &str| {
        let _ = write!(o, "<dt>{}</dt><dd>{}</dd>", Esc(k), Esc(v));
    };
    if let Some(script) = &j.spec.script {
        let _ = write!(o, "<dt>script</dt><dd><pre>{}</pre></dd>", Esc(script));
    } else {
        dd(&mut o, "command", &shell_words(&j.spec.argv));
    }
    if let Some(img) = &j.spec.image {
        dd(&mut o, "image", img);
    }
    dd(&mut o, "resources", &r.summary());
    dd(&mut o, "replicas", &j.spec.replicas.to_string());
    dd(&mut o, "priority", &j.spec.priority.to_string());
    dd(
        &mut o,
        "max runtime",
        &j.spec
            .max_runtime_ms
            .map(span)
            .unwrap_or_else(|| "none".into()),
    );
    dd(
        &mut o,
        "retries",
        &format!(
            "on failure {}, on node loss {}",
            j.spec.retries.on_failure, j.spec.retries.on_node_loss
        ),
    );
    if let Some(w) = &j.spec.workdir {
        dd(&mut o, "workdir", w);
    }
    for i in &j.spec.inputs {
        let v = i.version.map(|v| format!("@{v}")).unwrap_or_default();
        dd(
            &mut o,
            "reads",
            &format!("{}{v} as {}/", i.dataset, i.mount),
        );
    }
    for out in &j.spec.outputs {
        dd(
            &mut o,
            "output",
            &format!("{}/ → {}", out.from, out.dataset),
        );
    }
    if !j.wrote.is_empty() {
        dd(&mut o, "wrote", &j.wrote.join(", "));
    }
    if !j.spec.env.is_empty() {
        o.push_str("<dt>env</dt><dd><table class=\"kv\">");
        for (k, val) in &j.spec.env {
            let _ = write!(
                o,
                "<tr><td><code>{}</code></td><td><code>{}</code></td></tr>",
                Esc(k),
                Esc(val)
            );
        }
        o.push_str("</table></dd>");
    }
    let json = serde_json::to_string_pretty(&j.spec).unwrap_or_default();
    let _ = write!(
        o,
        "</dl><details><summary>As JSON</summary><pre>{}</pre></details></section>",
        Esc(&json)
    );
    end(&mut o);
    o
}

/// An argv as a shell would need it typed.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn nodes(s: &Session, v: &Nodes) -> String {
    let mut o = String::with_capacity(128 * 1024);
    begin(&mut o, "Nodes", "/ui/nodes", Some(s));
    o.push_str("<div class=\"head\"><h1>Nodes</h1><span class=\"chips\">");
    for (st, n) in &v.by_state {
        let _ = write!(
            o,
            "<a href=\"/ui/nodes?state={st}\" class=\"chip\">{n} {st}</a>"
        );
    }
    o.push_str("</span></div><form class=\"filters card\" method=\"get\" action=\"/ui/nodes\">");
    let states: Vec<String> = ["ready", "cordoned", "draining", "lost"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    select(&mut o, "state", "State", &states, v.query.state.as_deref());
    select(&mut o, "pool", "Pool", &v.pools, v.query.pool.as_deref());
    let _ = write!(
        o,
        "<label>Name<input name=\"name\" value=\"{}\" placeholder=\"part of a name\"></label>\
         <button>Filter</button><a href=\"/ui/nodes\">Clear</a></form>",
        Esc(v.query.name.as_deref().unwrap_or(""))
    );
    o.push_str("<section class=\"card\" id=\"live\" data-live>");
    let _ = write!(
        o,
        "<div class=\"card-head\"><span class=\"muted\">{} node{}</span></div>",
        v.matched,
        if v.matched == 1 { "" } else { "s" }
    );
    o.push_str("<table id=\"nodes\"><thead><tr><th>Node</th><th>State</th><th>CPU allocated</th><th>Memory allocated</th>\
        <th>GPUs: allocation, live utilisation, memory, temperature</th><th class=\"num\">Replicas</th><th>Heartbeat</th>");
    if v.admin {
        o.push_str("<th>Actions</th>");
    }
    o.push_str("</tr></thead><tbody>");
    if v.rows.is_empty() {
        o.push_str("<tr><td colspan=\"8\" class=\"empty\">No nodes match.</td></tr>");
    }
    for n in &v.rows {
        let _ = write!(
            o,
            "<tr data-node=\"{}\"><td><strong>{}</strong><div class=\"muted small\">{}",
            Esc(&n.name),
            Esc(&n.name),
            Esc(&n.pool)
        );
        for (k, val) in &n.labels {
            if k != "pool" {
                let _ = write!(o, " · {}={}", Esc(k), Esc(val));
            }
        }
        o.push_str("</div></td><td>");
        badge(&mut o, n.state);
        if !n.connected && n.state != "lost" {
            o.push_str(" <span class=\"badge s-lost\" title=\"its agent is not connected now\">disconnected</span>");
        }
        if let Some(d) = n.drain_deadline {
            let _ = write!(
                o,
                "<div class=\"muted small\">stops work at {}</div>",
                utc(d)
            );
        }
        o.push_str("</td><td>");
        bar(
            &mut o,
            n.cpu_alloc as f64,
            n.cpu_milli as f64,
            &format!("{} / {}", cores(n.cpu_alloc), cores(n.cpu_milli)),
        );
        if let Some(u) = n.cpu_used {
            let _ = write!(
                o,
                "<div class=\"muted small\">{} cores in use</div>",
                cores(u)
            );
        }
        o.push_str("</td><td>");
        bar(
            &mut o,
            n.memory_alloc as f64,
            n.memory as f64,
            &format!("{} / {}", gib(n.memory_alloc), gib(n.memory)),
        );
        if let Some(u) = n.memory_used {
            let _ = write!(o, "<div class=\"muted small\">{} in use</div>", gib(u));
        }
        o.push_str("</td><td><div class=\"gpus\">");
        if n.gpus.is_empty() {
            o.push_str("<span class=\"muted\">none</span>");
        }
        for g in &n.gpus {
            let cls = if !g.healthy {
                "gtile bad"
            } else if g.alloc_milli >= 1000 {
                "gtile full"
            } else if g.alloc_milli > 0 {
                "gtile part"
            } else {
                "gtile"
            };
            let mut title = format!("GPU {} · {} · {}", g.index, g.model, gib(g.memory_bytes));
            if !g.jobs.is_empty() {
                let ids: Vec<String> = g.jobs.iter().map(|j| j.to_string()).collect();
                title.push_str(&format!(" · jobs {}", ids.join(", ")));
            }
            if let Some(p) = g.power_watts {
                title.push_str(&format!(" · {p:.0} W"));
            }
            if !g.healthy {
                title.push_str(" · unhealthy: not scheduled");
            }
            let _ = write!(
                o,
                "<div class=\"{cls}\" title=\"{}\"><b>{}</b><span>{}</span><span>{}</span><span>{}</span></div>",
                Esc(&title),
                g.index,
                g.util.map(|u| format!("{u}%")).unwrap_or_else(|| "–".into()),
                g.memory_used
                    .map(|m| format!("{}/{}", gib(m), gib(g.memory_bytes)))
                    .unwrap_or_else(|| gib(g.memory_bytes)),
                g.temperature
                    .map(|t| format!("{t}°C"))
                    .unwrap_or_default(),
            );
        }
        let _ = write!(o, "</div></td><td class=\"num\">{}</td><td>", n.replicas);
        ago(&mut o, n.last_heartbeat, v.now);
        o.push_str("</td>");
        if v.admin {
            o.push_str("<td class=\"actions\">");
            let action = |o: &mut String, what: &str, label: &str, confirm: Option<String>| {
                let _ = write!(
                    o,
                    "<form method=\"post\" action=\"/ui/nodes/{}/{what}\"",
                    url_enc(&n.name)
                );
                if let Some(c) = confirm {
                    let _ = write!(o, " data-confirm=\"{}\"", Esc(&c));
                }
                o.push('>');
                csrf_field(o, s);
                let _ = write!(o, "<button class=\"small\">{label}</button></form>");
            };
            match n.state {
                "ready" => {
                    action(&mut o, "cordon", "Cordon", None);
                    action(
                        &mut o,
                        "drain",
                        "Drain",
                        Some(format!(
                            "Drain {}? No new work is placed; running work may finish.",
                            n.name
                        )),
                    );
                }
                "cordoned" => {
                    action(&mut o, "uncordon", "Uncordon", None);
                    action(
                        &mut o,
                        "drain",
                        "Drain",
                        Some(format!(
                            "Drain {}? No new work is placed; running work may finish.",
                            n.name
                        )),
                    );
                }
                "draining" => action(&mut o, "uncordon", "Uncordon", None),
                _ => {}
            }
            o.push_str("</td>");
        }
        o.push_str("</tr>");
    }
    o.push_str("</tbody></table><div class=\"pager\">");
    let href = |page: usize| {
        let mut parts = vec![format!("page={page}")];
        for (k, val) in [
            ("name", &v.query.name),
            ("state", &v.query.state),
            ("pool", &v.query.pool),
        ] {
            if let Some(val) = val.as_deref().filter(|x| !x.is_empty()) {
                parts.push(format!("{k}={}", url_enc(val)));
            }
        }
        format!("/ui/nodes?{}", parts.join("&"))
    };
    if v.page > 1 {
        let _ = write!(o, "<a href=\"{}\">« Previous</a>", Esc(&href(v.page - 1)));
    }
    if v.pages > 1 {
        let _ = write!(
            o,
            "<span class=\"muted\">page {} of {} ({NODES_PER_PAGE} a page)</span>",
            v.page, v.pages
        );
    }
    if v.page < v.pages {
        let _ = write!(o, "<a href=\"{}\">Next »</a>", Esc(&href(v.page + 1)));
    }
    o.push_str("</div></section>");
    end(&mut o);
    o
}

fn quota_cell(o: &mut String, used: u64, guaranteed: u64, limit: u64, fmt: fn(u64) -> String) {
    if guaranteed == 0 && limit == u64::MAX {
        let _ = write!(
            o,
            "{} used<div class=\"muted small\">no quota</div>",
            fmt(used)
        );
        return;
    }
    let borrowed = used.saturating_sub(guaranteed);
    let lim = if limit == u64::MAX {
        "none".to_string()
    } else {
        fmt(limit)
    };
    let total = if limit == u64::MAX {
        guaranteed.max(used)
    } else {
        limit
    };
    bar(o, used as f64, total as f64, &format!("{} used", fmt(used)));
    let _ = write!(
        o,
        "<div class=\"muted small\">guaranteed {} · borrowed {} · limit {}</div>",
        fmt(guaranteed),
        fmt(borrowed),
        lim
    );
}

pub fn teams(s: &Session, v: &Teams) -> String {
    let mut o = String::with_capacity(32 * 1024);
    begin(&mut o, "Teams", "/ui/teams", Some(s));
    o.push_str("<div class=\"head\"><h1>Teams</h1><div class=\"seg\" id=\"periods\">");
    for (p, _) in PERIODS {
        let on = if *p == v.period { " class=\"on\"" } else { "" };
        let _ = write!(o, "<a href=\"/ui/teams?period={p}\"{on}>{p}</a>");
    }
    o.push_str("</div></div><section class=\"card\" id=\"live\" data-live>");
    let _ = write!(
        o,
        "<table id=\"teams\"><thead><tr><th>Team</th><th class=\"num\">Weight</th><th>Fair share vs actual</th>\
         <th class=\"num\">Queued</th><th class=\"num\">Running</th><th>GPU quota</th><th>CPU quota</th><th>Memory quota</th>\
         <th class=\"num\">GPU-hours ({p})</th><th class=\"num\">CPU-hours ({p})</th><th class=\"num\">Cost ({p})</th></tr></thead><tbody>",
        p = v.period
    );
    for t in &v.rows {
        let _ = write!(
            o,
            "<tr data-team=\"{}\"><td><a href=\"/ui/jobs?team={}\">{}</a></td><td class=\"num\">{}</td><td>",
            Esc(&t.name),
            url_enc(&t.name),
            Esc(&t.name),
            t.weight
        );
        let fair = t.fair_share.unwrap_or(0.0);
        let _ = write!(
            o,
            "<div class=\"share\" title=\"fair share {} · actual {}\"><i class=\"fair\" style=\"width:{:.1}%\"></i><i class=\"actual\" style=\"width:{:.1}%\"></i></div>\
             <div class=\"muted small\">fair {} · actual {}</div></td>",
            t.fair_share.map(pct).unwrap_or_else(|| "— (idle)".into()),
            pct(t.actual_share),
            fair.min(1.0) * 100.0,
            t.actual_share.min(1.0) * 100.0,
            t.fair_share.map(pct).unwrap_or_else(|| "— (idle)".into()),
            pct(t.actual_share)
        );
        let _ = write!(
            o,
            "<td class=\"num\">{}</td><td class=\"num\">{}</td>",
            t.queued, t.running
        );
        let (g, l) = match &t.quota {
            Some(q) => (q.guaranteed, q.limit),
            None => (
                tessera_core::auth::ResourceAmounts {
                    cpu_milli: 0,
                    memory_bytes: 0,
                    gpu_milli: 0,
                },
                tessera_core::auth::ResourceAmounts {
                    cpu_milli: u64::MAX,
                    memory_bytes: u64::MAX,
                    gpu_milli: u64::MAX,
                },
            ),
        };
        o.push_str("<td>");
        quota_cell(&mut o, t.used.gpu_milli, g.gpu_milli, l.gpu_milli, gpus);
        o.push_str("</td><td>");
        quota_cell(&mut o, t.used.cpu_milli, g.cpu_milli, l.cpu_milli, cores);
        o.push_str("</td><td>");
        quota_cell(
            &mut o,
            t.used.memory_bytes,
            g.memory_bytes,
            l.memory_bytes,
            gib,
        );
        let _ = write!(
            o,
            "</td><td class=\"num\">{:.2}</td><td class=\"num\">{:.2}</td><td class=\"num\">{}</td></tr>",
            t.usage.gpu_hours,
            t.usage.cpu_hours,
            money(t.usage.cost)
        );
    }
    o.push_str("</tbody></table><p class=\"hint\">Fair share: the team's weight over the weights of the teams with work queued or running. \
        Actual: its dominant share (the largest of its CPU, memory and GPU fractions of the cluster). \
        Hours and cost count what ran within the period, at each node's configured prices.</p></section>");
    end(&mut o);
    o
}

pub fn services(s: &Session, rows: &[ServiceSummary]) -> String {
    let mut o = String::with_capacity(16 * 1024);
    begin(&mut o, "Services", "/ui/services", Some(s));
    o.push_str("<div class=\"head\"><h1>Services</h1></div><section class=\"card\" id=\"live\" data-live>\
        <table id=\"services\"><thead><tr><th>Service</th><th>Team</th><th class=\"num\">Version</th><th>Replicas ready</th>\
        <th class=\"num\">Min..max</th><th class=\"num\">Requests/s</th><th class=\"num\">p99</th><th>URL</th></tr></thead><tbody>");
    if rows.is_empty() {
        o.push_str("<tr><td colspan=\"8\" class=\"empty\">No services. Create one with <code>tessera serve svc.yaml</code>.</td></tr>");
    }
    for r in rows {
        let _ = write!(
            o,
            "<tr data-service=\"{}\"><td><strong>{}</strong></td><td>{}</td><td class=\"num\">{}</td><td>",
            Esc(&r.name),
            Esc(&r.name),
            Esc(&r.team),
            r.version
        );
        bar(
            &mut o,
            r.ready as f64,
            r.desired.max(1) as f64,
            &format!("{} / {}", r.ready, r.desired),
        );
        let _ = write!(
            o,
            "</td><td class=\"num\">{}..{}</td><td class=\"num\">{:.1}</td><td class=\"num\">{}</td><td><code>{}</code></td></tr>",
            r.min,
            r.max,
            r.requests_per_s,
            r.p99_ms
                .map(|p| format!("{p:.0} ms"))
                .unwrap_or_else(|| "—".into()),
            Esc(&r.url)
        );
    }
    o.push_str("</tbody></table></section>");
    end(&mut o);
    o
}

pub fn pools(s: &Session, rows: &[crate::pools::PoolView], now: u64) -> String {
    let mut o = String::with_capacity(8 * 1024);
    begin(&mut o, "Pools", "/ui/pools", Some(s));
    o.push_str("<div class=\"head\"><h1>Pools</h1></div><section class=\"card\" id=\"live\" data-live>\
        <table id=\"pools\"><thead><tr><th>Pool</th><th>Kind</th><th>Health</th><th class=\"num\">Nodes</th>\
        <th>CPU allocated</th><th>Memory allocated</th><th>GPUs allocated</th><th class=\"num\">Running</th>\
        <th class=\"num\">Queued in engine</th><th class=\"num\">GPU-hour</th><th>Checked</th></tr></thead><tbody>");
    if rows.is_empty() {
        o.push_str("<tr><td colspan=\"11\" class=\"empty\">No pools. Add a Slurm, Ray or Kubernetes cluster with <code>tessera pool add</code>.</td></tr>");
    }
    for r in rows {
        let _ = write!(
            o,
            "<tr data-pool=\"{}\"><td><strong>{}</strong></td><td>{}</td><td>",
            Esc(&r.name),
            Esc(&r.name),
            Esc(&r.kind)
        );
        badge(&mut o, if r.healthy { "healthy" } else { "unhealthy" });
        if let Some(m) = &r.message {
            let _ = write!(o, " <span class=\"muted\">{}</span>", Esc(m));
        }
        let _ = write!(o, "</td><td class=\"num\">{}</td><td>", r.nodes);
        bar(
            &mut o,
            r.allocated_cpu_milli as f64,
            r.cpu_milli.max(1) as f64,
            &format!("{} / {}", cores(r.allocated_cpu_milli), cores(r.cpu_milli)),
        );
        o.push_str("</td><td>");
        bar(
            &mut o,
            r.allocated_memory_bytes as f64,
            r.memory_bytes.max(1) as f64,
            &format!(
                "{} / {}",
                gib(r.allocated_memory_bytes),
                gib(r.memory_bytes)
            ),
        );
        o.push_str("</td><td>");
        bar(
            &mut o,
            r.allocated_gpus as f64,
            r.gpus.max(1) as f64,
            &format!("{} / {}", r.allocated_gpus, r.gpus),
        );
        let _ = write!(
            o,
            "</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>",
            r.running,
            r.queued_in_engine,
            money(r.prices.gpu_hour)
        );
        ago(&mut o, r.checked_at, now);
        o.push_str("</td></tr>");
    }
    o.push_str("</tbody></table></section>");
    end(&mut o);
    o
}

/// `list` is `None` when the server runs without a data lake.
pub fn datasets(s: &Session, list: Option<&[tessera_core::lake::Dataset]>, now: u64) -> String {
    let mut o = String::with_capacity(8 * 1024);
    begin(&mut o, "Datasets", "/ui/datasets", Some(s));
    o.push_str("<div class=\"head\"><h1>Datasets</h1></div><section class=\"card\">\
        <table id=\"datasets\"><thead><tr><th>Dataset</th><th>Kind</th><th class=\"num\">Latest version</th>\
        <th>Labels</th><th>Readable by</th><th>Created</th></tr></thead><tbody>");
    match list {
        None => o.push_str("<tr><td colspan=\"6\" class=\"empty\">This server runs without a data lake.</td></tr>"),
        Some([]) => o.push_str("<tr><td colspan=\"6\" class=\"empty\">No datasets you may read. Create one with <code>tessera data create NAME</code>.</td></tr>"),
        Some(list) => {
            for d in list {
                let kind = match &d.kind {
                    Some(k) => serde_json::to_value(k)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    None => "empty".to_string(),
                };
                let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = write!(
                    o,
                    "<tr data-dataset=\"{}.{}\"><td><strong>{}.{}</strong></td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>",
                    Esc(&d.team),
                    Esc(&d.name),
                    Esc(&d.team),
                    Esc(&d.name),
                    Esc(&kind),
                    d.latest.map(|v| v.to_string()).unwrap_or_else(|| "—".into()),
                    Esc(&labels.join(", ")),
                    Esc(&std::iter::once(d.team.as_str())
                        .chain(d.grants.iter().map(String::as_str))
                        .collect::<Vec<_>>()
                        .join(", ")),
                );
                ago(&mut o, d.created_at, now);
                o.push_str("</td></tr>");
            }
        }
    }
    o.push_str("</tbody></table></section>");
    end(&mut o);
    o
}
