//! `tessera usage` (GPU-hours, CPU-hours and cost per team, pool or job,
//! as a table, JSON or CSV) and the price flags of `tessera up` and
//! `tessera server`.

use anyhow::Result;
use clap::Args;
use tessera_server::usage::{GroupBy, UsageReport, UsageRow};

use crate::output::{self, format_time, Output};
use crate::Globals;

/// Default prices: a rough all-in hourly rate of owned hardware (purchase
/// spread over its life, power, space), so on-premises capacity is never
/// shown as free. Set your own.
pub const DEFAULT_CPU_CORE_HOUR: f64 = 0.04;
pub const DEFAULT_MEMORY_GIB_HOUR: f64 = 0.005;
pub const DEFAULT_GPU_HOUR: f64 = 2.0;

/// What the nodes cost per resource-hour, for cost accounting and
/// cost-aware placement (in your currency).
#[derive(Debug, Clone, Args)]
pub struct PriceArgs {
    /// Price of one CPU core per hour on this control plane's nodes
    #[arg(long, default_value_t = DEFAULT_CPU_CORE_HOUR, value_name = "PRICE")]
    pub price_cpu_hour: f64,
    /// Price of one GiB of memory per hour
    #[arg(long, default_value_t = DEFAULT_MEMORY_GIB_HOUR, value_name = "PRICE")]
    pub price_memory_gib_hour: f64,
    /// Price of one GPU per hour
    #[arg(long, default_value_t = DEFAULT_GPU_HOUR, value_name = "PRICE")]
    pub price_gpu_hour: f64,
}

impl PriceArgs {
    /// The prices, or which flag is not a price.
    pub fn prices(&self) -> Result<tessera_core::node::Prices> {
        for (flag, v) in [
            ("--price-cpu-hour", self.price_cpu_hour),
            ("--price-memory-gib-hour", self.price_memory_gib_hour),
            ("--price-gpu-hour", self.price_gpu_hour),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                anyhow::bail!("{flag} must be a non-negative number");
            }
        }
        Ok(tessera_core::node::Prices {
            cpu_core_hour: self.price_cpu_hour,
            memory_gib_hour: self.price_memory_gib_hour,
            gpu_hour: self.price_gpu_hour,
        })
    }
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Only this team [default: all teams for admins, else your own]
    #[arg(long, value_name = "TEAM")]
    pub team: Option<String>,
    /// Start: a duration before now (`30d`, `12h`), a date (`2026-11-01`),
    /// an RFC 3339 time (`2026-11-01T12:00:00Z`) or ms since the Unix epoch
    #[arg(long, default_value = "30d", value_name = "WHEN")]
    pub since: String,
    /// End, in the same forms [default: now]
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,
    /// Group by team, pool or job
    #[arg(long, default_value = "team", value_parser = ["team", "pool", "job"])]
    pub by: String,
}

pub async fn usage(g: &Globals, args: &UsageArgs) -> Result<()> {
    let client = g.client()?;
    let mut query = vec![("since", args.since.clone()), ("by", args.by.clone())];
    if let Some(t) = &args.team {
        query.push(("team", t.clone()));
    }
    if let Some(u) = &args.until {
        query.push(("until", u.clone()));
    }
    let report: UsageReport = client.get("/v1/usage", &query).await?;
    match g.output {
        Output::Json => output::print_json(&report),
        Output::Csv => Ok(output::print(&csv(&report))?),
        Output::Table => Ok(output::print(&table(&report))?),
    }
}

fn key_headers(by: GroupBy) -> &'static [&'static str] {
    match by {
        GroupBy::Team => &["team"],
        GroupBy::Pool => &["pool"],
        GroupBy::Job => &["job", "name", "team"],
    }
}

fn key_cells(by: GroupBy, r: &UsageRow) -> Vec<String> {
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    match by {
        GroupBy::Team => vec![s(&r.team)],
        GroupBy::Pool => vec![s(&r.pool)],
        GroupBy::Job => vec![
            r.job_id.map(|i| i.to_string()).unwrap_or_default(),
            s(&r.job_name),
            s(&r.team),
        ],
    }
}

/// One CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

/// RFC 4180 CSV: a header line, then one line per row (no total line).
pub fn csv(r: &UsageReport) -> String {
    let mut out = key_headers(r.by).join(",");
    out.push_str(",gpu_hours,cpu_hours,memory_gib_hours,cost,jobs,attempts\r\n");
    for row in &r.rows {
        let mut cells: Vec<String> = key_cells(r.by, row).iter().map(|c| csv_field(c)).collect();
        let a = &row.amounts;
        // Full precision (the shortest text that reads back the same number).
        cells.extend([
            a.gpu_hours.to_string(),
            a.cpu_hours.to_string(),
            a.memory_gib_hours.to_string(),
            a.cost.to_string(),
            a.jobs.to_string(),
            a.attempts.to_string(),
        ]);
        out.push_str(&cells.join(","));
        out.push_str("\r\n");
    }
    out
}

fn table(r: &UsageReport) -> String {
    let mut headers: Vec<String> = key_headers(r.by).iter().map(|h| h.to_uppercase()).collect();
    headers.extend(
        [
            "GPU-HOURS",
            "CPU-HOURS",
            "MEM-GIB-HOURS",
            "COST",
            "JOBS",
            "ATTEMPTS",
        ]
        .map(String::from),
    );
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut t = output::Table::new(&headers);
    let amounts = |a: &tessera_server::usage::Amounts| {
        vec![
            format!("{:.2}", a.gpu_hours),
            format!("{:.2}", a.cpu_hours),
            format!("{:.2}", a.memory_gib_hours),
            format!("{:.2}", a.cost),
            a.jobs.to_string(),
            a.attempts.to_string(),
        ]
    };
    for row in &r.rows {
        let mut cells = key_cells(r.by, row);
        cells.extend(amounts(&row.amounts));
        t.row(cells);
    }
    let mut total = vec!["TOTAL".to_string()];
    total.resize(key_headers(r.by).len(), String::new());
    total.extend(amounts(&r.total));
    t.row(total);
    format!(
        "Usage from {} to {}{}\n{}",
        format_time(r.since, false),
        format_time(r.until, false),
        r.team
            .as_deref()
            .map(|t| format!(", team {t}"))
            .unwrap_or_default(),
        t.render()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_server::usage::Amounts;

    fn report(by: GroupBy, rows: Vec<UsageRow>) -> UsageReport {
        UsageReport {
            since: 0,
            until: 3_600_000,
            by,
            team: None,
            rows,
            total: Amounts::default(),
        }
    }

    #[test]
    fn csv_has_a_header_and_quotes_what_needs_quoting() {
        let row = UsageRow {
            team: Some("ml".into()),
            pool: None,
            job_id: Some(7),
            job_name: Some("a,\"b\"".into()),
            amounts: Amounts {
                gpu_hours: 1.5,
                cpu_hours: 3.0,
                memory_gib_hours: 0.25,
                cost: 4.125,
                jobs: 1,
                attempts: 2,
            },
        };
        let text = csv(&report(GroupBy::Job, vec![row]));
        assert_eq!(
            text,
            "job,name,team,gpu_hours,cpu_hours,memory_gib_hours,cost,jobs,attempts\r\n\
             7,\"a,\"\"b\"\"\",ml,1.5,3,0.25,4.125,1,2\r\n"
        );
        let text = csv(&report(GroupBy::Pool, vec![]));
        assert_eq!(
            text,
            "pool,gpu_hours,cpu_hours,memory_gib_hours,cost,jobs,attempts\r\n"
        );
    }
}
