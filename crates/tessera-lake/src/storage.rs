//! Where the lake's objects live, and the local spool for uploads in flight.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use tessera_core::lake::{ByteStream, LakeError, Upload, UploadFormat};
use tokio::io::AsyncWriteExt;
use url::Url;

/// The lake's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local directory.
    Local(PathBuf),
    /// `s3://bucket/prefix` on AWS or any S3-compatible server. Endpoint,
    /// region and credentials come from `options` (object_store's S3 keys,
    /// e.g. `aws_endpoint`, `aws_access_key_id`, `aws_allow_http`) and the
    /// standard `AWS_*` environment variables.
    S3 {
        url: String,
        options: Vec<(String, String)>,
    },
}

impl Location {
    /// `s3://...` is a bucket; anything else is a local directory.
    pub fn parse(text: &str) -> Location {
        if text.starts_with("s3://") {
            Location::S3 {
                url: text.trim_end_matches('/').to_string(),
                options: Vec::new(),
            }
        } else {
            Location::Local(PathBuf::from(text))
        }
    }
}

/// The object store and where the lake starts in it.
pub(crate) struct Storage {
    /// The store from its root (the filesystem root, the bucket).
    pub store: Arc<dyn ObjectStore>,
    /// The lake's root as a URL, ending in `/`.
    pub base_url: Url,
    /// The lake's root inside `store`.
    pub base: String,
    /// The lake's root directory, when it is on local disk.
    pub local: Option<PathBuf>,
}

impl Storage {
    pub fn open(location: &Location) -> anyhow::Result<Storage> {
        match location {
            Location::Local(dir) => {
                std::fs::create_dir_all(dir)?;
                let dir = dir.canonicalize()?;
                let base_url = Url::from_directory_path(&dir)
                    .map_err(|_| anyhow::anyhow!("{} is not an absolute path", dir.display()))?;
                let base = Path::from_absolute_path(&dir)?.to_string();
                Ok(Storage {
                    store: Arc::new(object_store::local::LocalFileSystem::new()),
                    base_url,
                    base,
                    local: Some(dir),
                })
            }
            Location::S3 { url, options } => {
                let parsed = Url::parse(url)?;
                let bucket = parsed
                    .host_str()
                    .ok_or_else(|| anyhow::anyhow!("{url}: no bucket"))?
                    .to_string();
                let mut builder =
                    object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&bucket);
                for (k, v) in options {
                    let key = k.to_ascii_lowercase().parse().map_err(|e| {
                        anyhow::anyhow!("lake storage option {k:?} is not an S3 option: {e}")
                    })?;
                    builder = builder.with_config(key, v);
                }
                let store = builder.build()?;
                let base = parsed.path().trim_matches('/').to_string();
                let base_url = Url::parse(&format!("s3://{bucket}/{base}/"))?;
                Ok(Storage {
                    store: Arc::new(store),
                    base_url,
                    base,
                    local: None,
                })
            }
        }
    }

    /// An object's path, relative to the lake's root.
    pub fn path(&self, rel: &str) -> Path {
        if self.base.is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{}/{rel}", self.base))
        }
    }

    /// Makes a directory on local disk (object stores need none).
    pub fn ensure_dir(&self, rel: &str) -> Result<(), LakeError> {
        if let Some(root) = &self.local {
            std::fs::create_dir_all(root.join(rel))
                .map_err(|e| internal("creating the table's directory", e))?;
        }
        Ok(())
    }

    /// Whether any object lies under `rel`.
    pub async fn any_under(&self, rel: &str) -> Result<bool, LakeError> {
        let prefix = self.path(rel);
        let mut list = self.store.list(Some(&prefix));
        match list.next().await {
            None => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(e)) => Err(internal("listing the lake", e)),
        }
    }

    /// A directory's URL, relative to the lake's root (ends in `/`).
    pub fn url(&self, rel: &str) -> Url {
        self.base_url
            .join(&format!("{}/", rel.trim_end_matches('/')))
            .expect("a relative path joins")
    }
}

pub(crate) fn internal(what: &str, e: impl std::fmt::Display) -> LakeError {
    LakeError::Internal(format!("{what}: {e}"))
}

/// A received upload on local disk; removed when dropped.
pub(crate) struct Spool {
    path: PathBuf,
}

impl Spool {
    pub fn path(&self) -> &FsPath {
        &self.path
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Receives `body` into a file in `dir`. An interrupted body is an error,
/// and nothing of it stays behind.
pub(crate) async fn spool(
    dir: &FsPath,
    mut body: ByteStream,
    upload: &Upload,
) -> Result<Spool, LakeError> {
    let ext = match upload.format {
        UploadFormat::Csv => "csv",
        UploadFormat::Parquet => "parquet",
        UploadFormat::Jsonl => "json",
        UploadFormat::Tar => "tar",
    };
    let mut id = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
    let spool = Spool {
        path: dir.join(format!("upload-{}.{ext}", hex::encode(id))),
    };
    let file = tokio::fs::File::create(&spool.path)
        .await
        .map_err(|e| internal("creating the upload's spool file", e))?;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let started = std::time::Instant::now();
    let mut received = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            LakeError::BadData(format!(
                "the upload was cut off after {received} bytes ({e}); nothing was stored"
            ))
        })?;
        received += chunk.len() as u64;
        out.write_all(&chunk)
            .await
            .map_err(|e| internal("writing the upload's spool file", e))?;
    }
    out.flush()
        .await
        .map_err(|e| internal("writing the upload's spool file", e))?;
    if received == 0 {
        return Err(LakeError::BadData(
            "the upload is empty; nothing was stored".into(),
        ));
    }
    tracing::info!(
        bytes = received,
        seconds = started.elapsed().as_secs_f64(),
        "upload received"
    );
    Ok(spool)
}
