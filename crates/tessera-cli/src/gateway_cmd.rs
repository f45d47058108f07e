//! `tessera gateway`: the service gateway as a process of its own, so it
//! can be scaled apart from the control plane. It polls the control plane
//! for routes (`GET /v1/gateway/routes`, every 500 ms), reports its load
//! once a second and its waiting requests at once (`POST /v1/gateway/load`),
//! and serves `/s/<service>/` like the embedded one, on one thread per core
//! (`Gateway::serve_threads`).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value};
use tessera_gateway::{Gateway, GatewayConfig, ServiceRoute, Upstream};

use crate::Globals;

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address to serve on
    #[arg(long, default_value = "127.0.0.1:7800", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Route `Host: <service>.<DOMAIN>` to the service, path unchanged
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// This gateway's name in load reports [default: the listen address]
    #[arg(long)]
    pub name: Option<String>,
    /// Threads serving requests, each with a listener of its own on the
    /// address (SO_REUSEPORT) [default: one per core]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// Turns the control plane's route table into the gateway's.
pub fn apply_routes(gw: &Gateway, table: &Value, known: &mut HashSet<String>) {
    let mut seen = HashSet::new();
    if let Some(services) = table["services"].as_object() {
        for (name, r) in services {
            let upstreams = r["upstreams"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|u| {
                    Some(Upstream {
                        id: u.get(0)?.as_str()?.to_string(),
                        addr: u.get(1)?.as_str()?.parse().ok()?,
                    })
                })
                .collect();
            let mut route = ServiceRoute::new(upstreams);
            route.key_hashes = r["key_hashes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect();
            gw.set_service(name, route);
            seen.insert(name.clone());
        }
    }
    for gone in known.difference(&seen) {
        gw.remove_service(gone);
    }
    *known = seen;
}

pub async fn gateway(g: &Globals, args: GatewayArgs) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let client = Arc::new(g.client()?);
    let name = args.name.unwrap_or_else(|| args.listen.to_string());
    let gw = Gateway::new(GatewayConfig {
        domain: args.domain,
        ..GatewayConfig::default()
    });
    // Waiting requests are reported at once: they wait for a replica.
    let (demand_tx, mut demand_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    gw.set_demand_hook(Arc::new(move |s: &str| {
        let _ = demand_tx.send(s.to_string());
    }));
    // The first route table before serving, so nothing is refused as unknown.
    let mut known = HashSet::new();
    let table: Value = client
        .get("/v1/gateway/routes", &[])
        .await
        .context("reading routes from the control plane (an admin token is needed)")?;
    apply_routes(&gw, &table, &mut known);
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let listeners = tessera_gateway::reuseport_listeners(args.listen, threads)
        .with_context(|| format!("listening on {}", args.listen))?;
    eprintln!(
        "Tessera gateway on http://{} for {} ({} services, {threads} threads)",
        listeners[0].local_addr()?,
        client.url(),
        known.len()
    );
    {
        let (gw, client) = (gw.clone(), client.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                match client.get::<Value>("/v1/gateway/routes", &[]).await {
                    Ok(table) => apply_routes(&gw, &table, &mut known),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read routes; keeping the last ones")
                    }
                }
            }
        });
    }
    {
        let (gw, client) = (gw.clone(), client.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let mut demand = Vec::new();
                tokio::select! {
                    _ = tick.tick() => {}
                    Some(s) = demand_rx.recv() => demand.push(s),
                }
                while let Ok(s) = demand_rx.try_recv() {
                    demand.push(s);
                }
                demand.sort();
                demand.dedup();
                let now = std::time::Instant::now();
                let services: BTreeMap<String, Value> = gw
                    .services()
                    .into_iter()
                    .filter_map(|s| {
                        let st = gw.stats(&s)?;
                        Some((
                            s,
                            json!({
                                "load": st.in_flight + st.held,
                                "idle_ms": st.last_request.map(|l| now.duration_since(l).as_millis() as u64),
                            }),
                        ))
                    })
                    .collect();
                let report = json!({ "gateway": name, "services": services, "demand": demand });
                if let Err(e) = client.post_json::<Value>("/v1/gateway/load", &report).await {
                    tracing::warn!(error = %e, "cannot report load");
                }
            }
        });
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    gw.serve_threads(listeners, shutdown).await?;
    Ok(())
}
