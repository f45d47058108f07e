//! Inputs and outputs for a remote agent that does not share the control
//! plane's disk.
//!
//! A job's inputs are staged on the control plane's disk, and a
//! [`StartReplica`] names them by that path. A remote agent that cannot see
//! a path fetches the version once, as a tar stream over HTTP from
//! `GET /v1/agents/inputs/{job}/{index}` with its node credential (the
//! server serves only inputs of jobs placed on that node), into
//! `<home>/inputs/<team>/<name>/<version>/` — built in a temporary
//! directory and renamed into place, read-only — and starts the replica
//! with the local copy. Versions never change, so a copy is reused by every
//! later job that reads the same version.
//!
//! Outputs go the other way: when replica 0 of a job with outputs exits 0,
//! its output directories are sent as one tar stream to
//! `PUT /v1/agents/outputs/{job}/{attempt}` before its exit is reported, so
//! the control plane writes the versions from its own copy.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use tessera_core::protocol::{ExitCause, FromAgent, StartReplica, ToAgent};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// What a remote agent needs to fetch inputs.
pub(crate) struct Fetcher {
    pub http: reqwest::Client,
    /// `http(s)://host:port` of the control plane.
    pub server: String,
    pub credential: String,
    pub home: PathBuf,
    /// The agent's report channel (a failed fetch is reported as a replica
    /// that could not start).
    pub events: mpsc::UnboundedSender<FromAgent>,
}

/// Whether `start` names an input this machine cannot see.
pub(crate) fn needs_fetch(start: &StartReplica) -> bool {
    start.inputs.iter().any(|i| !Path::new(&i.path).is_dir())
}

/// Where a staged path (`.../<team>/<name>/<version>`) is kept here.
fn local_copy(home: &Path, staged: &str) -> PathBuf {
    let parts: Vec<&str> = staged.trim_end_matches('/').rsplit('/').take(3).collect();
    let mut p = home.join("inputs");
    for part in parts.iter().rev() {
        p.push(part);
    }
    p
}

impl Fetcher {
    /// Fetches what `start` needs, then hands it (with local paths) to the
    /// agent; a fetch that fails ends the replica before it starts, saying
    /// why.
    pub async fn start(&self, mut start: StartReplica, agent: mpsc::UnboundedSender<ToAgent>) {
        for (i, input) in start.inputs.iter_mut().enumerate() {
            if Path::new(&input.path).is_dir() {
                continue;
            }
            let local = local_copy(&self.home, &input.path);
            if !local.is_dir() {
                if let Err(e) = self.fetch(start.key.job_id, i, &local).await {
                    warn!(replica = %start.key, input = %input.name, error = %e, "cannot fetch an input");
                    let _ = self.events.send(FromAgent::Exited {
                        key: start.key,
                        code: None,
                        signal: None,
                        cause: ExitCause::SpawnFailed(format!(
                            "input `{}`: cannot fetch it from the server: {e}",
                            input.name
                        )),
                        at: crate::now_ms(),
                        workdir: None,
                    });
                    return;
                }
                info!(replica = %start.key, input = %input.name, path = %local.display(), "fetched an input");
            }
            input.path = local.display().to_string();
        }
        let _ = agent.send(ToAgent::Start(start));
    }

    async fn fetch(&self, job: u64, index: usize, dest: &Path) -> anyhow::Result<()> {
        let url = format!(
            "{}/v1/agents/inputs/{job}/{index}",
            self.server.trim_end_matches('/')
        );
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.credential)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}", crate::tls::error_chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            anyhow::bail!("{status}: {body}");
        }
        let parent = dest.parent().expect("an inputs path has a parent");
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(".fetch-{}-{}", std::process::id(), crate::now_ms()));
        let tar_path = tmp.with_extension("tar");
        let result = async {
            let mut f = tokio::io::BufWriter::new(tokio::fs::File::create(&tar_path).await?);
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                f.write_all(&chunk?).await?;
            }
            f.flush().await?;
            let (tar_path, tmp) = (tar_path.clone(), tmp.clone());
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let mut ar = tar::Archive::new(std::fs::File::open(&tar_path)?);
                std::fs::create_dir_all(&tmp)?;
                ar.unpack(&tmp)?;
                read_only(&tmp)?;
                Ok(())
            })
            .await??;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        let _ = std::fs::remove_file(&tar_path);
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if std::fs::rename(&tmp, dest).is_err() {
            // Fetched by another replica meanwhile: keep theirs.
            let _ = std::fs::remove_dir_all(&tmp);
            anyhow::ensure!(dest.is_dir(), "cannot put the input at {}", dest.display());
        }
        Ok(())
    }
}

/// Whether `ev` is the exit of a replica whose outputs are to be uploaded:
/// it exited 0 and says where it ran.
pub(crate) fn uploads(ev: &FromAgent) -> bool {
    matches!(
        ev,
        FromAgent::Exited {
            code: Some(0),
            cause: ExitCause::Exited,
            workdir: Some(_),
            ..
        }
    )
}

impl Fetcher {
    /// Sends the output directories `outs` of the replica whose exit is
    /// `ev` to the server as one tar stream, then reports the exit. The
    /// server then reads the outputs from its own copy; if the upload keeps
    /// failing, the exit is reported as it is, and the server says it
    /// cannot read the outputs.
    pub async fn upload_outputs(&self, ev: FromAgent, outs: Vec<String>) {
        let FromAgent::Exited {
            key,
            code,
            signal,
            cause,
            at,
            workdir: Some(dir),
        } = ev
        else {
            let _ = self.events.send(ev);
            return;
        };
        let tar_path = self.home.join("agent").join(format!("outputs-{key}.tar"));
        let packed = {
            let (tar_path, dir, outs) = (tar_path.clone(), PathBuf::from(&dir), outs.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut b = tar::Builder::new(std::fs::File::create(&tar_path)?);
                b.mode(tar::HeaderMode::Deterministic);
                for o in &outs {
                    let p = dir.join(o);
                    if p.is_dir() {
                        b.append_dir_all(o, &p)?;
                    }
                }
                b.into_inner()?.sync_all()
            })
            .await
        };
        let mut sent = false;
        match packed {
            Ok(Ok(())) => {
                let url = format!(
                    "{}/v1/agents/outputs/{}/{}",
                    self.server.trim_end_matches('/'),
                    key.job_id,
                    key.attempt
                );
                let mut wait = std::time::Duration::from_millis(500);
                for _ in 0..5 {
                    match self.put_file(&url, &tar_path).await {
                        Ok(()) => {
                            sent = true;
                            break;
                        }
                        Err(e) => {
                            warn!(replica = %key, error = %e, "cannot upload the outputs; retrying");
                            tokio::time::sleep(wait).await;
                            wait *= 2;
                        }
                    }
                }
            }
            Ok(Err(e)) => warn!(replica = %key, error = %e, "cannot pack the outputs"),
            Err(e) => warn!(replica = %key, error = %e, "cannot pack the outputs"),
        }
        let _ = std::fs::remove_file(&tar_path);
        if sent {
            info!(replica = %key, "uploaded the outputs");
        }
        let _ = self.events.send(FromAgent::Exited {
            key,
            code,
            signal,
            cause,
            at,
            // Uploaded: the server reads its own copy.
            workdir: (!sent).then_some(dir),
        });
    }

    async fn put_file(&self, url: &str, path: &Path) -> anyhow::Result<()> {
        let file = tokio::fs::File::open(path).await?;
        let len = file.metadata().await?.len();
        let resp = self
            .http
            .put(url)
            .bearer_auth(&self.credential)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::from(file))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}", crate::tls::error_chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            anyhow::bail!("{status}: {body}");
        }
        Ok(())
    }
}

/// Files 0444, directories 0555.
fn read_only(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            read_only(&entry.path())?;
        } else {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o444))?;
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_kept_by_team_name_and_version() {
        assert_eq!(
            local_copy(Path::new("/h"), "/srv/tessera/lake-inputs/ads/clicks/3"),
            PathBuf::from("/h/inputs/ads/clicks/3")
        );
        assert_eq!(
            local_copy(Path::new("/h"), "/x/ads/clicks/3/"),
            PathBuf::from("/h/inputs/ads/clicks/3")
        );
    }
}
