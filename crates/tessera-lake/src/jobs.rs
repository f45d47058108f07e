//! Datasets bound to jobs: inputs staged as read-only directories on local
//! disk, and a job's output directories written as new versions.
//!
//! A staged input lives at `<staging>/<team>/<name>/<version>/` and is made
//! once per version (versions never change): a table's Parquet data files
//! as of that version, or a file set's files under their paths. It is
//! built in a temporary directory and renamed into place, so a job never
//! sees half of one, and its files and directories are read-only. Files are
//! copied, not linked, so that a job cannot change the lake's own objects.
//!
//! An output is written like an upload — a table version through the same
//! ingest, a file set through the same content store — with `job` as its
//! origin. The job id makes the write idempotent: a control plane that
//! restarts mid-way finds the version the job already made.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path as FsPath, PathBuf};
use std::time::{Duration, SystemTime};

use object_store::ObjectStoreExt;
use sha2::{Digest, Sha256};
use tessera_core::lake::{
    Dataset, DatasetKind, FileEntry, JobOutputWrite, LakeError, Pruned, Upload, UploadFormat,
    Version,
};

use crate::storage::{internal, Storage};
use crate::table::Origin;

/// Where version `v` of `team.name` is staged.
pub(crate) fn staged_dir(root: &FsPath, team: &str, name: &str, v: u64) -> PathBuf {
    root.join(team).join(name).join(v.to_string())
}

/// Stages version `v` of `ds` under `root`, unless it is staged already.
pub(crate) async fn stage(
    storage: &Storage,
    root: &FsPath,
    ds: &Dataset,
    v: u64,
) -> Result<PathBuf, LakeError> {
    let dest = staged_dir(root, &ds.team, &ds.name, v);
    if dest.is_dir() {
        // Reused: not idle, for `prune`.
        let _ = std::fs::File::open(&dest).and_then(|d| d.set_modified(SystemTime::now()));
        return Ok(dest);
    }
    let parent = dest.parent().expect("a staged path has a parent");
    std::fs::create_dir_all(parent).map_err(|e| internal("staging an input", e))?;
    let mut id = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
    let tmp = parent.join(format!(".staging-{v}-{}", hex::encode(id)));
    let result = fill(storage, ds, v, &tmp).await;
    if let Err(e) = result {
        make_writable(&tmp);
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match std::fs::rename(&tmp, &dest) {
        Ok(()) => Ok(dest),
        // Staged by another job at the same time: use theirs.
        Err(_) if dest.is_dir() => {
            make_writable(&tmp);
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dest)
        }
        Err(e) => {
            make_writable(&tmp);
            let _ = std::fs::remove_dir_all(&tmp);
            Err(internal("staging an input", e))
        }
    }
}

/// Removes, under the staging `root`, every staged version not in `keep`
/// whose directory was last staged or reused (its modification time) more
/// than `idle` ago, and unfinished stagings (`.staging-*`) as old. Must not
/// run while `stage` does (the caller's lock).
pub(crate) fn prune(root: &FsPath, keep: &HashSet<PathBuf>, idle: Duration) -> Pruned {
    let mut pruned = Pruned::default();
    let now = SystemTime::now();
    let idle_since = |p: &FsPath| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).is_ok_and(|d| d >= idle))
    };
    let dirs = |p: &FsPath| {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect::<Vec<_>>()
    };
    for team in dirs(root) {
        for dataset in dirs(&team) {
            for staged in dirs(&dataset) {
                let name = staged.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let is_version = !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit());
                let unfinished = name.starts_with(".staging-");
                if !(is_version || unfinished) || keep.contains(&staged) || !idle_since(&staged) {
                    continue;
                }
                let bytes = size_of_tree(&staged);
                make_writable(&staged);
                match std::fs::remove_dir_all(&staged) {
                    Ok(()) => {
                        pruned.dirs += 1;
                        pruned.bytes += bytes;
                    }
                    Err(e) => {
                        tracing::warn!(dir = %staged.display(), error = %e, "cannot remove a staged input");
                    }
                }
            }
        }
    }
    pruned
}

/// The bytes of the files under `dir` (0 where they cannot be read).
fn size_of_tree(dir: &FsPath) -> u64 {
    walk(dir).map_or(0, |files| {
        files
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    })
}

/// Copies the files of version `v` into `dir` and makes them read-only.
async fn fill(storage: &Storage, ds: &Dataset, v: u64, dir: &FsPath) -> Result<(), LakeError> {
    std::fs::create_dir_all(dir).map_err(|e| internal("staging an input", e))?;
    let mut copies: Vec<(object_store::path::Path, Option<PathBuf>, PathBuf)> = Vec::new();
    match ds.kind {
        Some(DatasetKind::Table) => {
            let table = crate::table::table_rel(&ds.team, &ds.name);
            for rel in crate::table::live_files(storage, &ds.team, &ds.name, v).await? {
                let name = rel.rsplit('/').next().unwrap_or(&rel).to_string();
                let object = storage.path(&format!("{table}/{rel}"));
                let local = storage.local.as_ref().map(|r| r.join(&table).join(&rel));
                copies.push((object, local, dir.join(name)));
            }
        }
        Some(DatasetKind::Files) => {
            let m = crate::files::manifest(storage, &ds.team, &ds.name, v).await?;
            for f in m.files {
                let rel = format!("objects/sha256/{}", f.sha256);
                let local = storage.local.as_ref().map(|r| r.join(&rel));
                copies.push((storage.path(&rel), local, dir.join(&f.path)));
            }
        }
        None => {
            return Err(LakeError::NotFound(format!(
                "{}.{} has no versions yet",
                ds.team, ds.name
            )))
        }
    }
    for (object, local, dest) in copies {
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p).map_err(|e| internal("staging an input", e))?;
        }
        match local {
            Some(src) => {
                let dest2 = dest.clone();
                tokio::task::spawn_blocking(move || std::fs::copy(&src, &dest2))
                    .await
                    .map_err(|e| internal("staging an input", e))?
                    .map_err(|e| internal("staging an input", e))?;
            }
            None => download(storage, &object, &dest).await?,
        }
    }
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || read_only(&dir))
        .await
        .map_err(|e| internal("staging an input", e))?
        .map_err(|e| internal("staging an input", e))
}

async fn download(
    storage: &Storage,
    object: &object_store::path::Path,
    dest: &FsPath,
) -> Result<(), LakeError> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let got = storage
        .store
        .get(object)
        .await
        .map_err(|e| internal("staging an input", e))?;
    let mut stream = got.into_stream();
    let mut f = tokio::io::BufWriter::new(
        tokio::fs::File::create(dest)
            .await
            .map_err(|e| internal("staging an input", e))?,
    );
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| internal("staging an input", e))?;
        f.write_all(&chunk)
            .await
            .map_err(|e| internal("staging an input", e))?;
    }
    f.flush().await.map_err(|e| internal("staging an input", e))
}

/// Files 0444, directories 0555, depth first.
fn read_only(dir: &FsPath) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let t = entry.file_type()?;
        if t.is_dir() {
            read_only(&entry.path())?;
        } else if t.is_file() {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o444))?;
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555))
}

/// Undoes [`read_only`] so a failed staging directory can be removed.
fn make_writable(dir: &FsPath) {
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&entry.path());
            }
        }
    }
}

/// The upload format of a table output: the one named, else the one the
/// directory's files share.
fn table_format(out: &JobOutputWrite, files: &[PathBuf]) -> Result<UploadFormat, LakeError> {
    if let Some(f) = out.format.filter(|f| *f != UploadFormat::Tar) {
        return Ok(f);
    }
    let mut found: Option<UploadFormat> = None;
    for f in files {
        if let Some(fmt) = f.to_str().and_then(UploadFormat::from_path) {
            match found {
                Some(prev) if prev != fmt => {
                    return Err(LakeError::BadData(format!(
                    "{} holds both {} and {} files; a table output takes one format (set `format`)",
                    out.from,
                    crate::format_name(prev),
                    crate::format_name(fmt)
                )))
                }
                _ => found = Some(fmt),
            }
        }
    }
    found.ok_or_else(|| {
        LakeError::BadData(format!(
            "{} holds no .csv, .parquet or .jsonl files to add to table {}.{}",
            out.from, out.team, out.name
        ))
    })
}

/// Every regular file under `dir`, with its path relative to `dir`, sorted.
fn walk(dir: &FsPath) -> std::io::Result<Vec<(String, PathBuf)>> {
    fn go(base: &FsPath, dir: &FsPath, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let meta = std::fs::metadata(&path)?;
            if meta.is_dir() {
                go(base, &path, out)?;
            } else if meta.is_file() {
                let rel = path
                    .strip_prefix(base)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, path));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn sha256_of(path: &FsPath) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(h.finalize()), size))
}

/// The version this job already wrote to the dataset, if any.
pub(crate) async fn written_by(
    storage: &Storage,
    ds: &Dataset,
    job: u64,
) -> Result<Option<Version>, LakeError> {
    let versions = match ds.kind {
        None => return Ok(None),
        Some(DatasetKind::Table) => crate::table::versions(storage, &ds.team, &ds.name).await?,
        Some(DatasetKind::Files) => crate::files::versions(storage, &ds.team, &ds.name).await?,
    };
    Ok(versions
        .into_iter()
        .rev()
        .find(|v| v.job == Some(job) && v.operation == "job"))
}

/// The kind an output makes of a dataset that has none yet.
pub(crate) fn kind_for(format: Option<UploadFormat>) -> DatasetKind {
    match format {
        Some(UploadFormat::Csv | UploadFormat::Parquet | UploadFormat::Jsonl) => DatasetKind::Table,
        _ => DatasetKind::Files,
    }
}

/// Writes `out.dir` as the next version of `ds` (whose kind is settled).
pub(crate) async fn write(
    storage: &Storage,
    scratch: &FsPath,
    ds: &Dataset,
    out: &JobOutputWrite,
) -> Result<Version, LakeError> {
    let dir = out.dir.clone();
    if !dir.is_dir() {
        return Err(LakeError::BadData(format!(
            "the job left no directory {} in replica 0's working directory",
            out.from
        )));
    }
    let files = tokio::task::spawn_blocking(move || walk(&dir))
        .await
        .map_err(|e| internal("reading the output", e))?
        .map_err(|e| LakeError::BadData(format!("cannot read {}: {e}", out.from)))?;
    let origin = Origin {
        operation: "job".into(),
        detail: format!("job {} wrote {}/", out.job, out.from),
        inputs: out.inputs.clone(),
        job: Some(out.job),
    };
    match ds.kind.unwrap_or(DatasetKind::Files) {
        DatasetKind::Files => {
            let mut entries = Vec::with_capacity(files.len());
            for (rel, path) in files {
                let p = path.clone();
                let (sha, size) = tokio::task::spawn_blocking(move || sha256_of(&p))
                    .await
                    .map_err(|e| internal("reading the output", e))?
                    .map_err(|e| LakeError::BadData(format!("cannot read {rel}: {e}")))?;
                crate::files::store_object(storage, &path, &sha).await?;
                entries.push(FileEntry {
                    path: rel,
                    size,
                    sha256: sha,
                });
            }
            crate::files::commit(storage, ds, entries, origin).await
        }
        DatasetKind::Table => {
            let paths: Vec<PathBuf> = files.iter().map(|(_, p)| p.clone()).collect();
            let format = table_format(out, &paths)?;
            // The files of that format, under one extension in a scratch
            // directory: what the table ingest reads as one input.
            let ext = match format {
                UploadFormat::Csv => "csv",
                UploadFormat::Parquet => "parquet",
                _ => "json",
            };
            let mut id = [0u8; 8];
            rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
            let gather = scratch.join(format!("output-{}", hex::encode(id)));
            std::fs::create_dir_all(&gather).map_err(|e| internal("reading the output", e))?;
            let mut n = 0;
            for p in &paths {
                if p.to_str().and_then(UploadFormat::from_path) != Some(format) {
                    continue;
                }
                let dest = gather.join(format!("part-{n:05}.{ext}"));
                if std::fs::hard_link(p, &dest).is_err() {
                    std::fs::copy(p, &dest).map_err(|e| internal("reading the output", e))?;
                }
                n += 1;
            }
            let result = if n == 0 {
                Err(LakeError::BadData(format!(
                    "{} holds no .{ext} files to add to table {}.{}",
                    out.from, out.team, out.name
                )))
            } else {
                let upload = Upload {
                    format,
                    mode: out.mode,
                    source: format!("{}/", out.from),
                };
                crate::table::ingest(storage, ds, &gather, &upload, origin).await
            };
            let _ = std::fs::remove_dir_all(&gather);
            result
        }
    }
}
