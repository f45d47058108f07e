//! Dataset records: `datasets/<team>/<name>/dataset.json`.

use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tessera_core::lake::{Dataset, LakeError};

use crate::storage::{internal, Storage};

fn record_path(storage: &Storage, team: &str, name: &str) -> object_store::path::Path {
    storage.path(&format!("datasets/{team}/{name}/dataset.json"))
}

fn encode(ds: &Dataset) -> PutPayload {
    let mut ds = ds.clone();
    // The latest version is read from the data, never stored beside it.
    ds.latest = None;
    PutPayload::from(serde_json::to_vec_pretty(&ds).expect("a dataset serializes"))
}

/// Stores a new dataset; a conflict when one of that name exists.
pub(crate) async fn create(storage: &Storage, ds: &Dataset) -> Result<(), LakeError> {
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match storage
        .store
        .put_opts(&record_path(storage, &ds.team, &ds.name), encode(ds), opts)
        .await
    {
        Ok(_) => Ok(()),
        Err(object_store::Error::AlreadyExists { .. }) => Err(LakeError::Conflict(format!(
            "dataset {}.{} exists already",
            ds.team, ds.name
        ))),
        Err(e) => Err(internal("storing the dataset", e)),
    }
}

/// Replaces a dataset's record (kind, grants). Callers hold its lock.
pub(crate) async fn put(storage: &Storage, ds: &Dataset) -> Result<(), LakeError> {
    storage
        .store
        .put(&record_path(storage, &ds.team, &ds.name), encode(ds))
        .await
        .map(|_| ())
        .map_err(|e| internal("storing the dataset", e))
}

pub(crate) async fn get(
    storage: &Storage,
    team: &str,
    name: &str,
) -> Result<Option<Dataset>, LakeError> {
    match storage.store.get(&record_path(storage, team, name)).await {
        Ok(r) => {
            let bytes = r
                .bytes()
                .await
                .map_err(|e| internal("reading the dataset", e))?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| internal("reading the dataset", e))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(internal("reading the dataset", e)),
    }
}

/// Every dataset, by team and name.
pub(crate) async fn list(storage: &Storage) -> Result<Vec<Dataset>, LakeError> {
    let prefix = storage.path("datasets");
    let metas: Vec<_> = storage
        .store
        .list(Some(&prefix))
        .try_filter(|m| futures::future::ready(m.location.filename() == Some("dataset.json")))
        .try_collect()
        .await
        .map_err(|e| internal("listing datasets", e))?;
    let mut out = Vec::new();
    for m in metas {
        let bytes = storage
            .store
            .get(&m.location)
            .await
            .map_err(|e| internal("reading a dataset", e))?
            .bytes()
            .await
            .map_err(|e| internal("reading a dataset", e))?;
        let ds: Dataset =
            serde_json::from_slice(&bytes).map_err(|e| internal("reading a dataset", e))?;
        out.push(ds);
    }
    out.sort_by(|a, b| (&a.team, &a.name).cmp(&(&b.team, &b.name)));
    Ok(out)
}
