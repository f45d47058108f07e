//! The `ray` and `kubernetes` pool kinds: their options, checked when a
//! pool is added (errors name the option), and the drivers built from
//! them. [`crate::pools::driver_for`] dispatches here; everything else
//! about a pool (its node, its task, persistence) is kind-agnostic.
//!
//! Both also take the options every kind takes
//! ([`crate::pools::GENERIC_OPTIONS`], checked by `driver_for`).
//!
//! - `ray`: `address` (required), the Ray dashboard's URL, e.g.
//!   `http://head:8265`.
//! - `kubernetes`: `kubeconfig` (required, an absolute path), `context`
//!   (default: the kubeconfig's current one), `namespace` (default: the
//!   context's, else `default`) and `image` (for jobs that name none).

use std::path::Path;
use std::sync::Arc;

use tessera_core::error::FieldError;
use tessera_pools::{PoolDriver, PoolError};

use crate::pools::PoolConfig;

fn allow(config: &PoolConfig, known: &[&str]) -> Result<(), FieldError> {
    match config
        .options
        .keys()
        .filter(|k| !crate::pools::GENERIC_OPTIONS.contains(&k.as_str()))
        .find(|k| !known.contains(&k.as_str()))
    {
        Some(k) => Err(FieldError::new(
            format!("options.{k}"),
            format!(
                "a {} pool has no option `{k}`; it takes: {}",
                config.kind,
                known.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// A driver's refusal (`field: why`) as an error on that option.
fn option_error(e: PoolError) -> FieldError {
    let m = match e {
        PoolError::Rejected(m) | PoolError::Unavailable(m) | PoolError::NotFound(m) => m,
    };
    match m.split_once(": ") {
        Some((field, why)) if !field.contains(' ') => {
            FieldError::new(format!("options.{field}"), why.to_string())
        }
        _ => FieldError::new("options", m),
    }
}

/// `tessera pool add ray NAME --address URL`.
pub fn ray(config: &PoolConfig) -> Result<Arc<dyn PoolDriver>, FieldError> {
    allow(config, &["address"])?;
    let Some(address) = config.options.get("address") else {
        return Err(FieldError::new(
            "options.address",
            "a ray pool needs the Ray dashboard's URL (--address http://HEAD:8265)",
        ));
    };
    let driver = tessera_pools::ray::RayDriver::new(address).map_err(option_error)?;
    Ok(Arc::new(driver))
}

/// `tessera pool add kubernetes NAME --kubeconfig FILE [--namespace NS]`.
pub fn kubernetes(config: &PoolConfig) -> Result<Arc<dyn PoolDriver>, FieldError> {
    allow(config, &["kubeconfig", "context", "namespace", "image"])?;
    let Some(kubeconfig) = config.options.get("kubeconfig") else {
        return Err(FieldError::new(
            "options.kubeconfig",
            "a kubernetes pool needs a kubeconfig file (--kubeconfig FILE)",
        ));
    };
    if !Path::new(kubeconfig).is_absolute() {
        return Err(FieldError::new(
            "options.kubeconfig",
            format!("`{kubeconfig}` must be an absolute path"),
        ));
    }
    let opt = |k: &str| config.options.get(k).map(String::as_str);
    let pool = tessera_pool_k8s::KubePool::new(
        Path::new(kubeconfig),
        opt("context"),
        opt("namespace"),
        opt("image"),
    )
    .map_err(option_error)?;
    Ok(Arc::new(pool))
}
