//! Pool commands: `tessera pool add KIND NAME ...`, `tessera pool remove
//! NAME`, `tessera pools`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::output::{self, cpu_fraction, memory_fraction, Output, Table};
use crate::Globals;

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Add a pool: an engine Tessera hands work to (`slurm`, `ray`, `kubernetes`)
    Add(Box<AddArgs>),
    /// Remove a pool that runs no Tessera job
    Remove {
        /// Pool name
        name: String,
    },
    /// List pools (as `tessera pools`)
    List,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The engine: `slurm`, `ray` or `kubernetes`
    pub kind: String,
    /// The pool's name (its node is `pool-NAME`; jobs pin it with `pool: NAME`)
    pub name: String,
    /// Slurm partition [default: the cluster's default partition]
    #[arg(long)]
    pub partition: Option<String>,
    /// Ray: the Ray dashboard's URL (`http://HEAD:8265`)
    #[arg(long, value_name = "URL")]
    pub address: Option<String>,
    /// Kubernetes: the kubeconfig file to reach the cluster with
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Kubernetes: the kubeconfig context [default: its current context]
    #[arg(long)]
    pub context: Option<String>,
    /// Kubernetes: the namespace jobs run in [default: the context's, else `default`]
    #[arg(long)]
    pub namespace: Option<String>,
    /// Kubernetes: the image of jobs that name none [default: python:3.12-slim]
    #[arg(long)]
    pub image: Option<String>,
    /// A kind-specific option KEY=VALUE (Slurm: `output_dir=/shared/dir`); repeatable
    #[arg(long = "option", value_name = "KEY=VALUE")]
    pub options: Vec<String>,
    /// Price of one CPU core for an hour
    #[arg(long, value_name = "PRICE")]
    pub price_cpu_hour: Option<f64>,
    /// Price of one GiB of memory for an hour
    #[arg(long, value_name = "PRICE")]
    pub price_memory_gib_hour: Option<f64>,
    /// Price of one GPU for an hour
    #[arg(long, value_name = "PRICE")]
    pub price_gpu_hour: Option<f64>,
    /// A label KEY=VALUE every job placed in the pool sees on its node; repeatable
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
}

fn pairs(flag: &str, items: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            bail!("--{flag} {item:?}: expected KEY=VALUE");
        };
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

pub async fn pool(g: &Globals, command: PoolCommand) -> Result<()> {
    match command {
        PoolCommand::Add(a) => add(g, *a).await,
        PoolCommand::Remove { name } => {
            g.client()?.delete(&format!("/v1/pools/{name}")).await?;
            output::print(&format!("pool {name} removed\n")).map_err(Into::into)
        }
        PoolCommand::List => pools(g).await,
    }
}

async fn add(g: &Globals, a: AddArgs) -> Result<()> {
    let mut options = pairs("option", &a.options)?;
    if let Some(p) = a.partition {
        options.insert("partition".into(), p);
    }
    if let Some(kc) = a.kubeconfig {
        // The server reads the file: give it the whole path.
        let kc = std::path::absolute(&kc).unwrap_or(kc);
        options.insert("kubeconfig".into(), kc.display().to_string());
    }
    for (k, v) in [
        ("address", a.address),
        ("context", a.context),
        ("namespace", a.namespace),
        ("image", a.image),
    ] {
        if let Some(v) = v {
            options.insert(k.into(), v);
        }
    }
    let labels = pairs("label", &a.labels)?;
    let mut prices = serde_json::Map::new();
    for (k, v) in [
        ("cpu_core_hour", a.price_cpu_hour),
        ("memory_gib_hour", a.price_memory_gib_hour),
        ("gpu_hour", a.price_gpu_hour),
    ] {
        if let Some(v) = v {
            prices.insert(k.into(), json!(v));
        }
    }
    let body = json!({
        "kind": a.kind,
        "name": a.name,
        "options": options,
        "prices": prices,
        "labels": labels,
    });
    let v: Value = g.client()?.post_json("/v1/pools", &body).await?;
    if g.output == Output::Json {
        return output::print_json(&v);
    }
    output::print(&format!(
        "pool {} added ({}): {} node(s), {} CPU, {} memory, {} GPU; jobs pin it with `pool: {}`\n",
        v["name"].as_str().unwrap_or("?"),
        v["kind"].as_str().unwrap_or("?"),
        v["nodes"],
        v["cpu_milli"].as_u64().unwrap_or(0) as f64 / 1000.0,
        tessera_core::quantity::format_memory(v["memory_bytes"].as_u64().unwrap_or(0)),
        v["gpus"],
        v["name"].as_str().unwrap_or("?"),
    ))?;
    Ok(())
}

fn price(p: &Value) -> String {
    let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
    let mut parts = Vec::new();
    if f("cpu_core_hour") > 0.0 {
        parts.push(format!("{}/cpu-h", f("cpu_core_hour")));
    }
    if f("memory_gib_hour") > 0.0 {
        parts.push(format!("{}/GiB-h", f("memory_gib_hour")));
    }
    if f("gpu_hour") > 0.0 {
        parts.push(format!("{}/gpu-h", f("gpu_hour")));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

pub async fn pools(g: &Globals) -> Result<()> {
    let v: Value = g.client()?.get("/v1/pools", &[]).await?;
    let list = v["pools"].as_array().cloned().unwrap_or_default();
    if g.output == Output::Json {
        return output::print_json(&list);
    }
    if list.is_empty() {
        eprintln!("no pools; add one with `tessera pool add slurm NAME`");
        return Ok(());
    }
    let mut t = Table::new(&[
        "NAME", "KIND", "HEALTH", "NODES", "CPU", "MEMORY", "GPU", "RUNNING", "QUEUED", "PRICE",
    ]);
    let u = |p: &Value, k: &str| p[k].as_u64().unwrap_or(0);
    for p in &list {
        let health = if p["healthy"].as_bool().unwrap_or(false) {
            "healthy".to_string()
        } else {
            format!(
                "unhealthy: {}",
                p["message"].as_str().unwrap_or("not checked yet")
            )
        };
        t.row(vec![
            p["name"].as_str().unwrap_or("").into(),
            p["kind"].as_str().unwrap_or("").into(),
            health,
            p["nodes"].to_string(),
            cpu_fraction(u(p, "allocated_cpu_milli"), u(p, "cpu_milli")),
            memory_fraction(u(p, "allocated_memory_bytes"), u(p, "memory_bytes")),
            format!("{}/{}", u(p, "allocated_gpus"), u(p, "gpus")),
            p["running"].to_string(),
            p["queued_in_engine"].to_string(),
            price(&p["prices"]),
        ]);
    }
    output::print(&t.render())?;
    Ok(())
}
