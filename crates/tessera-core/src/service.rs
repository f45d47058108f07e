//! Services: long-running replicas of a model server (or any HTTP server)
//! behind the gateway, with readiness checks and autoscaling.
//!
//! A service spec validates into a [`ServiceTemplate`]: its replica is a
//! one-replica [`JobTemplate`] that runs until stopped, listening on the port
//! it is given in `$PORT`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;
use crate::quantity;
use crate::spec::{
    clean_path, validate_name, JobSpec, JobTemplate, Quantity, ResourcesSpec, RetriesSpec,
};

/// Most replicas a service may ask for.
pub const MAX_SERVICE_REPLICAS: i64 = 1000;

/// A service as users write it (YAML or JSON). Unknown fields are errors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Service name: letters, digits, `-`; it is part of the URL
    /// (`/s/<name>/`).
    pub name: Option<String>,
    /// Owning team; defaults to the caller's team.
    pub team: Option<String>,
    /// The server program and its arguments; it must listen on `$PORT`.
    pub command: Option<Vec<String>>,
    /// A shell script run by `/bin/sh -c`, listening on `$PORT`.
    pub script: Option<String>,
    /// Container image; `port` is then the port the server listens on inside.
    pub image: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    /// Resources per replica.
    #[serde(default)]
    pub resources: ResourcesSpec,
    /// The port the server listens on inside a container (default: `$PORT`).
    pub port: Option<i64>,
    /// How many replicas: `{min, max}` (default 1 and 1).
    pub replicas: Option<ReplicasSpec>,
    /// When a replica may get traffic: an HTTP GET answering 2xx.
    pub readiness: Option<ReadinessSpec>,
    /// Concurrency-based autoscaling between `min` and `max`.
    pub autoscale: Option<AutoscaleSpec>,
    /// Higher is placed first (and may preempt lower-priority batch jobs).
    pub priority: Option<i64>,
    /// Node labels a replica's node must carry (e.g. `{region: eu}`).
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Run replicas only in this pool (shorthand for `node_selector: {pool: NAME}`).
    pub pool: Option<String>,
    /// Whether a replica waiting to start may preempt lower-priority batch
    /// jobs (give the service a higher `priority`). Default true.
    pub preempt: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicasSpec {
    pub min: Option<i64>,
    pub max: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadinessSpec {
    /// Path probed with GET (default `/`).
    pub path: Option<String>,
    /// Time between probes (default `1s`).
    #[schema(value_type = Option<String>)]
    pub interval: Option<Quantity>,
    /// Probe timeout (default `1s`).
    #[schema(value_type = Option<String>)]
    pub timeout: Option<Quantity>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AutoscaleSpec {
    /// Requests in flight one replica should carry (default 10).
    pub target_inflight_per_replica: Option<f64>,
    /// Scale to zero after this long without requests (needs `min: 0`).
    #[schema(value_type = Option<String>)]
    pub scale_to_zero_after: Option<Quantity>,
    /// Averaging window for steady scaling (default `60s`).
    #[schema(value_type = Option<String>)]
    pub stable_window: Option<Quantity>,
    /// Short window that scales up fast on a burst (default `6s`).
    #[schema(value_type = Option<String>)]
    pub panic_window: Option<Quantity>,
}

/// A validated service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServiceTemplate {
    pub name: String,
    pub team: String,
    /// What each replica runs (one replica per job, no time limit).
    pub replica: JobTemplate,
    /// Port inside a container; none: `$PORT`, chosen per replica.
    pub port: Option<u16>,
    pub min: u32,
    pub max: u32,
    pub readiness: Readiness,
    pub autoscale: Autoscale,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Autoscale {
    pub target_inflight_per_replica: f64,
    pub scale_to_zero_after_ms: Option<u64>,
    pub stable_window_ms: u64,
    pub panic_window_ms: u64,
}

/// A service as the control plane records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Service {
    pub template: ServiceTemplate,
    /// Bumped by every change of what replicas run (a rolling update).
    pub version: u32,
    /// Replicas wanted now (the autoscaler moves it between min and max).
    pub desired: u32,
    pub created_at: u64,
    pub updated_at: u64,
}

fn duration(field: &str, q: &Option<Quantity>, default_ms: u64) -> Result<u64, FieldError> {
    let Some(q) = q else { return Ok(default_ms) };
    let ms = match q {
        Quantity::Number(n) => quantity::parse_duration(&n.to_string()),
        Quantity::Text(s) => quantity::parse_duration(s),
    }
    .map_err(|e| FieldError::new(field, e.0))?;
    if ms == 0 {
        return Err(FieldError::new(field, "must be greater than zero"));
    }
    Ok(ms)
}

/// Service names become URL path segments and host labels: lowercase
/// letters, digits and `-`.
pub fn validate_service_name(name: &str) -> Result<(), FieldError> {
    validate_name("name", name)?;
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(FieldError::new(
            "name",
            format!("`{name}` may contain only lowercase letters, digits and `-`"),
        ));
    }
    Ok(())
}

impl ServiceSpec {
    /// Parses YAML or JSON.
    pub fn parse(text: &str) -> Result<ServiceSpec, FieldError> {
        if text.trim().is_empty() {
            return Err(FieldError::new("", "the service spec is empty"));
        }
        let de = serde_yaml::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            FieldError::new(clean_path(&path), format!("invalid spec: {}", e.inner()))
        })
    }

    pub fn validate(&self, default_team: &str) -> Result<ServiceTemplate, FieldError> {
        let name = self
            .name
            .clone()
            .ok_or_else(|| FieldError::new("name", "is required"))?;
        validate_service_name(&name)?;
        let job = JobSpec {
            name: Some(name.clone()),
            team: self.team.clone(),
            command: self.command.clone(),
            script: self.script.clone(),
            image: self.image.clone(),
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            resources: self.resources.clone(),
            replicas: None,
            priority: self.priority,
            max_runtime: None,
            retries: Some(RetriesSpec::Count(0)),
            node_selector: self.node_selector.clone(),
            pool: self.pool.clone(),
            preempt: self.preempt,
            inputs: Vec::new(),
            outputs: Vec::new(),
        };
        let replica = job.validate(default_team)?;
        let port = match self.port {
            None => None,
            Some(p) if (1..=65535).contains(&p) => Some(p as u16),
            Some(p) => {
                return Err(FieldError::new(
                    "port",
                    format!("{p} is not a port (1-65535)"),
                ))
            }
        };
        if self.image.is_some() && port.is_none() {
            return Err(FieldError::new(
                "port",
                "is required with an image: the port the server listens on inside the container",
            ));
        }
        let r = self.replicas.clone().unwrap_or_default();
        let min = r.min.unwrap_or(1);
        let max = r.max.unwrap_or(min.max(1));
        if !(0..=MAX_SERVICE_REPLICAS).contains(&min) {
            return Err(FieldError::new(
                "replicas.min",
                format!("must be between 0 and {MAX_SERVICE_REPLICAS}"),
            ));
        }
        if !(1..=MAX_SERVICE_REPLICAS).contains(&max) || max < min {
            return Err(FieldError::new(
                "replicas.max",
                format!("must be between max(1, min) and {MAX_SERVICE_REPLICAS}"),
            ));
        }
        let rd = self.readiness.clone().unwrap_or_default();
        let path = rd.path.unwrap_or_else(|| "/".into());
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(FieldError::new(
                "readiness.path",
                format!("`{path}` must be an absolute URL path"),
            ));
        }
        let readiness = Readiness {
            path,
            interval_ms: duration("readiness.interval", &rd.interval, 1000)?,
            timeout_ms: duration("readiness.timeout", &rd.timeout, 1000)?,
        };
        let a = self.autoscale.clone().unwrap_or_default();
        let target = a.target_inflight_per_replica.unwrap_or(10.0);
        if !(target.is_finite() && target > 0.0) {
            return Err(FieldError::new(
                "autoscale.target_inflight_per_replica",
                "must be a number greater than zero",
            ));
        }
        let scale_to_zero_after_ms = match &a.scale_to_zero_after {
            None => None,
            Some(_) => Some(duration(
                "autoscale.scale_to_zero_after",
                &a.scale_to_zero_after,
                0,
            )?),
        };
        if scale_to_zero_after_ms.is_some() && min > 0 {
            return Err(FieldError::new(
                "autoscale.scale_to_zero_after",
                "needs replicas.min: 0",
            ));
        }
        let autoscale = Autoscale {
            target_inflight_per_replica: target,
            scale_to_zero_after_ms,
            stable_window_ms: duration("autoscale.stable_window", &a.stable_window, 60_000)?,
            panic_window_ms: duration("autoscale.panic_window", &a.panic_window, 6_000)?,
        };
        Ok(ServiceTemplate {
            name,
            team: replica.team.clone(),
            replica,
            port,
            min: min as u32,
            max: max as u32,
            readiness,
            autoscale,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_spec_validates() {
        let s = ServiceSpec::parse(
            "name: chat\nscript: python3 -m http.server $PORT\nresources: {cpu: 0.5, memory: 256Mi}\n\
             replicas: {min: 0, max: 4}\nreadiness: {path: /health, interval: 500ms}\n\
             autoscale: {target_inflight_per_replica: 4, scale_to_zero_after: 30s}\n",
        )
        .unwrap();
        let t = s.validate("ml").unwrap();
        assert_eq!(t.team, "ml");
        assert_eq!((t.min, t.max), (0, 4));
        assert_eq!(t.readiness.path, "/health");
        assert_eq!(t.readiness.interval_ms, 500);
        assert_eq!(t.autoscale.scale_to_zero_after_ms, Some(30_000));
        assert_eq!(t.autoscale.stable_window_ms, 60_000);
        assert_eq!(t.replica.replicas, 1);
        assert_eq!(t.replica.max_runtime_ms, None);
        assert!(
            t.replica.preempt,
            "services preempt lower priorities by default"
        );
        assert!(t.replica.resources.node_selector.is_empty());
    }

    #[test]
    fn preemption_and_placement_are_configurable() {
        let t = ServiceSpec::parse(
            "name: chat\nscript: serve\npriority: 50\npreempt: false\npool: gpu-a\nnode_selector: {region: eu}\n",
        )
        .unwrap()
        .validate("ml")
        .unwrap();
        assert!(!t.replica.preempt);
        assert_eq!(t.replica.priority, 50);
        assert_eq!(t.replica.resources.node_selector.len(), 2);
        let e = ServiceSpec::parse("name: chat\nscript: serve\npreempt: maybe\n").unwrap_err();
        assert_eq!(e.field, "preempt");
    }

    #[test]
    fn bad_fields_are_named() {
        for (yaml, field) in [
            ("script: x", "name"),
            ("name: Chat\nscript: x", "name"),
            (
                "name: c\nscript: x\nreplicas: {min: 3, max: 2}",
                "replicas.max",
            ),
            ("name: c\nscript: x\nreplicas: {min: -1}", "replicas.min"),
            ("name: c\nscript: x\nport: 70000", "port"),
            ("name: c\nimage: srv", "port"),
            (
                "name: c\nscript: x\nreadiness: {path: health}",
                "readiness.path",
            ),
            (
                "name: c\nscript: x\nautoscale: {scale_to_zero_after: 1m}",
                "autoscale.scale_to_zero_after",
            ),
            (
                "name: c\nscript: x\nautoscale: {target_inflight_per_replica: 0}",
                "autoscale.target_inflight_per_replica",
            ),
            ("name: c\nscript: x\nbogus: 1", ""),
        ] {
            let e = ServiceSpec::parse(yaml)
                .and_then(|s| s.validate("ml").map(|_| ()))
                .unwrap_err();
            assert!(
                e.field == field || (field.is_empty() && e.message.contains("bogus")),
                "{yaml}: {e:?}"
            );
        }
    }
}
