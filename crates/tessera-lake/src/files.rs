//! File sets: each file stored once by its SHA-256 under
//! `objects/sha256/`, and one manifest per version under
//! `datasets/<team>/<name>/files/<N>.json`, written last and only if absent.

use std::io::Read;
use std::path::Path as FsPath;

use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tessera_core::lake::{Dataset, FileEntry, LakeError, Version};

use crate::storage::{internal, Storage};
use crate::table::Origin;

/// A version of a file set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub version: u64,
    pub created_at: u64,
    pub origin: Origin,
    pub files: Vec<FileEntry>,
}

fn manifest_path(storage: &Storage, team: &str, name: &str, v: u64) -> object_store::path::Path {
    storage.path(&format!("datasets/{team}/{name}/files/{v}.json"))
}

pub(crate) fn object_path(storage: &Storage, sha256: &str) -> object_store::path::Path {
    storage.path(&format!("objects/sha256/{sha256}"))
}

async fn numbers(storage: &Storage, team: &str, name: &str) -> Result<Vec<u64>, LakeError> {
    let prefix = storage.path(&format!("datasets/{team}/{name}/files"));
    let mut v: Vec<u64> = storage
        .store
        .list(Some(&prefix))
        .try_filter_map(|m| async move {
            Ok(m.location
                .filename()
                .and_then(|f| f.strip_suffix(".json"))
                .and_then(|n| n.parse::<u64>().ok()))
        })
        .try_collect()
        .await
        .map_err(|e| internal("listing the file set's versions", e))?;
    v.sort_unstable();
    Ok(v)
}

pub(crate) async fn latest(
    storage: &Storage,
    team: &str,
    name: &str,
) -> Result<Option<u64>, LakeError> {
    Ok(numbers(storage, team, name).await?.last().copied())
}

pub(crate) async fn manifest(
    storage: &Storage,
    team: &str,
    name: &str,
    v: u64,
) -> Result<Manifest, LakeError> {
    let bytes = storage
        .store
        .get(&manifest_path(storage, team, name, v))
        .await
        .map_err(|e| match e {
            object_store::Error::NotFound { .. } => {
                LakeError::NotFound(format!("{team}.{name} has no version {v}"))
            }
            e => internal("reading the manifest", e),
        })?
        .bytes()
        .await
        .map_err(|e| internal("reading the manifest", e))?;
    serde_json::from_slice(&bytes).map_err(|e| internal("reading the manifest", e))
}

fn version_of(m: &Manifest) -> Version {
    Version {
        version: m.version,
        created_at: m.created_at,
        operation: m.origin.operation.clone(),
        detail: m.origin.detail.clone(),
        rows: None,
        files: m.files.len() as u64,
        bytes: m.files.iter().map(|f| f.size).sum(),
        inputs: m.origin.inputs.clone(),
        job: m.origin.job,
    }
}

pub(crate) async fn versions(
    storage: &Storage,
    team: &str,
    name: &str,
) -> Result<Vec<Version>, LakeError> {
    let mut out = Vec::new();
    for v in numbers(storage, team, name).await? {
        out.push(version_of(&manifest(storage, team, name, v).await?));
    }
    Ok(out)
}

/// Stores the files of a tar archive and commits them as the next version.
pub(crate) async fn ingest(
    storage: &Storage,
    ds: &Dataset,
    archive: &FsPath,
    origin: Origin,
) -> Result<Version, LakeError> {
    // Unpack into scratch files beside the archive, hashing as we go.
    let archive = archive.to_path_buf();
    let scratch = archive.with_extension("d");
    let unpacked = tokio::task::spawn_blocking({
        let scratch = scratch.clone();
        move || unpack(&archive, &scratch)
    })
    .await
    .map_err(|e| internal("unpacking the upload", e))?;
    let result = async {
        let entries = unpacked?;
        let mut files = Vec::new();
        for (entry, local) in entries {
            store_object(storage, &local, &entry.sha256).await?;
            files.push(entry);
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok::<_, LakeError>(files)
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    commit(storage, ds, result?, origin).await
}

/// Stores the local file `local` as the object of its hash, unless the
/// lake holds that content already.
pub(crate) async fn store_object(
    storage: &Storage,
    local: &FsPath,
    sha256: &str,
) -> Result<(), LakeError> {
    let dest = object_path(storage, sha256);
    if storage.store.head(&dest).await.is_err() {
        put_file(storage, local, &dest).await?;
    }
    Ok(())
}

/// Writes the manifest of the next version: the commit.
pub(crate) async fn commit(
    storage: &Storage,
    ds: &Dataset,
    files: Vec<FileEntry>,
    origin: Origin,
) -> Result<Version, LakeError> {
    let v = latest(storage, &ds.team, &ds.name).await?.unwrap_or(0) + 1;
    let m = Manifest {
        version: v,
        created_at: crate::now_ms(),
        origin,
        files,
    };
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let body = PutPayload::from(serde_json::to_vec_pretty(&m).expect("a manifest serializes"));
    match storage
        .store
        .put_opts(&manifest_path(storage, &ds.team, &ds.name, v), body, opts)
        .await
    {
        Ok(_) => Ok(version_of(&m)),
        Err(object_store::Error::AlreadyExists { .. }) => Err(LakeError::Conflict(format!(
            "version {v} of {}.{} was written by another upload at the same time; try again",
            ds.team, ds.name
        ))),
        Err(e) => Err(internal("committing the version", e)),
    }
}

async fn put_file(
    storage: &Storage,
    local: &FsPath,
    dest: &object_store::path::Path,
) -> Result<(), LakeError> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(local)
        .await
        .map_err(|e| internal("reading an unpacked file", e))?;
    let mut w = object_store::buffered::BufWriter::new(storage.store.clone(), dest.clone());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .await
            .map_err(|e| internal("reading an unpacked file", e))?;
        if n == 0 {
            break;
        }
        tokio::io::AsyncWriteExt::write_all(&mut w, &buf[..n])
            .await
            .map_err(|e| internal("storing a file", e))?;
    }
    tokio::io::AsyncWriteExt::shutdown(&mut w)
        .await
        .map_err(|e| internal("storing a file", e))
}

/// Reads every regular file out of a tar archive into `scratch`, hashing it.
fn unpack(
    archive: &FsPath,
    scratch: &FsPath,
) -> Result<Vec<(FileEntry, std::path::PathBuf)>, LakeError> {
    let bad = |e: std::io::Error| {
        LakeError::BadData(format!(
            "the upload is not a complete tar archive of a directory ({e}); no version was created"
        ))
    };
    std::fs::create_dir_all(scratch).map_err(|e| internal("unpacking", e))?;
    let f = std::fs::File::open(archive).map_err(|e| internal("unpacking", e))?;
    let mut ar = tar::Archive::new(f);
    let mut out = Vec::new();
    for (i, entry) in ar.entries().map_err(bad)?.enumerate() {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./").to_string();
        if path.split('/').any(|c| c == "..") || path.starts_with('/') {
            return Err(LakeError::BadData(format!(
                "the archive names {path:?}, outside its directory; no version was created"
            )));
        }
        let local = scratch.join(format!("{i}"));
        let mut out_file = std::fs::File::create(&local).map_err(|e| internal("unpacking", e))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf).map_err(bad)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            std::io::Write::write_all(&mut out_file, &buf[..n])
                .map_err(|e| internal("unpacking", e))?;
            size += n as u64;
        }
        let expected = entry.header().size().map_err(bad)?;
        if size != expected {
            return Err(bad(std::io::Error::other(format!(
                "{path} ends after {size} of its {expected} bytes"
            ))));
        }
        out.push((
            FileEntry {
                path,
                size,
                sha256: hex::encode(hasher.finalize()),
            },
            local,
        ));
    }
    if out.is_empty() {
        return Err(LakeError::BadData(
            "the directory holds no files; no version was created".into(),
        ));
    }
    Ok(out)
}
