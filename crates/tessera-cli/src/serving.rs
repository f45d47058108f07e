//! Service commands: `tessera serve`, `services`, `service`, `scale`,
//! `service-key create`.

use std::io::Read;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::output::{self, format_age, format_time, now_ms, Output, Table};
use crate::Globals;

#[derive(Debug, Subcommand)]
pub enum ServiceKeyCommand {
    /// Mint a key that may call the service through the gateway; shown once
    Create {
        /// Service name
        service: String,
    },
}

pub async fn serve(g: &Globals, file: &str, delete: bool) -> Result<()> {
    let client = g.client()?;
    if delete {
        client.delete(&format!("/v1/services/{file}")).await?;
        return output::print(&format!("service {file} deleted\n")).map_err(Into::into);
    }
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?
    };
    let v: Value = client
        .post_raw("/v1/services", text.into_bytes(), "application/yaml")
        .await?;
    if g.output == Output::Json {
        return output::print_json(&v);
    }
    output::print(&format!(
        "service {} (version {}): {} ready of {} wanted; call it at {}{}\n",
        v["name"].as_str().unwrap_or("?"),
        v["version"],
        v["ready"],
        v["desired"],
        client.url(),
        v["url"].as_str().unwrap_or("")
    ))?;
    Ok(())
}

pub async fn services(g: &Globals) -> Result<()> {
    let client = g.client()?;
    let v: Value = client.get("/v1/services", &[]).await?;
    let list = v["services"].as_array().cloned().unwrap_or_default();
    if g.output == Output::Json {
        return output::print_json(&list);
    }
    if list.is_empty() {
        eprintln!("no services");
        return Ok(());
    }
    let mut t = Table::new(&[
        "NAME", "TEAM", "VERSION", "READY", "REPLICAS", "REQ/S", "P99", "URL",
    ]);
    for s in &list {
        t.row(vec![
            s["name"].as_str().unwrap_or("").into(),
            s["team"].as_str().unwrap_or("").into(),
            s["version"].to_string(),
            format!("{}/{}", s["ready"], s["desired"]),
            format!("{}..{}", s["min"], s["max"]),
            format!("{:.1}", s["requests_per_s"].as_f64().unwrap_or(0.0)),
            match s["p99_ms"].as_f64() {
                Some(ms) if ms < 1000.0 => format!("<={ms:.1}ms"),
                Some(ms) => format!("<={:.1}s", ms / 1000.0),
                None => "-".into(),
            },
            format!("{}{}", client.url(), s["url"].as_str().unwrap_or("")),
        ]);
    }
    output::print(&t.render())?;
    Ok(())
}

pub async fn service(g: &Globals, name: &str) -> Result<()> {
    let client = g.client()?;
    let v: Value = client.get(&format!("/v1/services/{name}"), &[]).await?;
    if g.output == Output::Json {
        return output::print_json(&v);
    }
    let s = &v["summary"];
    let mut text = format!(
        "service {} (team {}), version {}: {} ready of {} wanted, replicas {}..{}\nURL: {}{}\n\nREPLICAS\n",
        s["name"].as_str().unwrap_or(""),
        s["team"].as_str().unwrap_or(""),
        s["version"],
        s["ready"],
        s["desired"],
        s["min"],
        s["max"],
        client.url(),
        s["url"].as_str().unwrap_or("")
    );
    let mut t = Table::new(&["JOB", "VERSION", "STATE", "NODE", "ADDRESS"]);
    for r in v["replicas"].as_array().into_iter().flatten() {
        t.row(vec![
            r["job_id"].to_string(),
            r["version"].to_string(),
            r["state"].as_str().unwrap_or("").into(),
            r["node"].as_str().unwrap_or("-").into(),
            r["address"].as_str().unwrap_or("-").into(),
        ]);
    }
    text.push_str(&t.render());
    text.push_str("\nEVENTS\n");
    let now = now_ms();
    for e in v["events"].as_array().into_iter().flatten() {
        let time = e["time"].as_u64().unwrap_or(0);
        text.push_str(&format!(
            "{}  ({} ago)  {:<15} {}\n",
            format_time(time, true),
            format_age(now, time),
            e["kind"].as_str().unwrap_or(""),
            e["message"].as_str().unwrap_or("")
        ));
    }
    output::print(&text)?;
    Ok(())
}

pub async fn scale(g: &Globals, name: &str, min: Option<i64>, max: Option<i64>) -> Result<()> {
    let client = g.client()?;
    let v: Value = client
        .post_json(
            &format!("/v1/services/{name}/scale"),
            &json!({ "min": min, "max": max }),
        )
        .await?;
    if g.output == Output::Json {
        return output::print_json(&v);
    }
    output::print(&format!(
        "service {name}: replicas {}..{}, {} wanted\n",
        v["min"], v["max"], v["desired"]
    ))?;
    Ok(())
}

pub async fn service_key(g: &Globals, command: ServiceKeyCommand) -> Result<()> {
    let ServiceKeyCommand::Create { service } = command;
    let client = g.client()?;
    let v: Value = client
        .post_json(&format!("/v1/services/{service}/keys"), &json!({}))
        .await?;
    if g.output == Output::Json {
        return output::print_json(&v);
    }
    output::print(&format!(
        "key {} for service {service}: {}\n(shown once; send it as `Authorization: Bearer <key>` to {}/s/{service}/)\n",
        v["id"].as_str().unwrap_or(""),
        v["key"].as_str().unwrap_or(""),
        client.url()
    ))?;
    Ok(())
}
