//! Streaming a replica's log file to a client, following it while the job
//! runs. The stream ends when the file is read to its end and the attempt it
//! belongs to is over.

use std::io::SeekFrom;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tessera_core::protocol::ReplicaKey;
use tessera_core::JobId;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::Shared;

const CHUNK: usize = 64 * 1024;
const POLL: Duration = Duration::from_millis(50);

/// Where the attempt being read stands.
enum Phase {
    /// Not placed yet (only when following): wait for an attempt.
    Waiting,
    Reading,
    Done,
}

struct Follow {
    shared: Arc<Shared>,
    job: JobId,
    replica: u32,
    attempt: Option<u32>,
    follow: bool,
    current: u32,
    offset: u64,
    phase: Phase,
    changes: tokio::sync::watch::Receiver<u64>,
}

impl Follow {
    /// (latest attempt of the job, whether the job has ended).
    fn status(&self) -> (u32, bool) {
        let state = self.shared.state.lock().expect("state lock");
        match state.jobs.get(&self.job) {
            Some(job) => (job.attempt, job.state.is_terminal()),
            None => (0, true),
        }
    }

    async fn wait_for_change(&mut self) {
        let _ = tokio::time::timeout(POLL, self.changes.changed()).await;
    }

    async fn read_more(&mut self, attempt: u32) -> std::io::Result<Option<Bytes>> {
        let path = tessera_agent::log_path(
            &self.shared.home,
            ReplicaKey {
                job_id: self.job,
                attempt,
                replica: self.replica,
            },
        );
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(self.offset)).await?;
        let mut buf = vec![0u8; CHUNK];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        self.offset += n as u64;
        Ok(Some(Bytes::from(buf)))
    }

    async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        loop {
            let (latest, ended) = self.status();
            // On shutdown, followers stop at the end of what is written, so
            // the server can close their connections.
            let ended = ended
                || self
                    .shared
                    .shutting_down
                    .load(std::sync::atomic::Ordering::SeqCst);
            match self.phase {
                Phase::Done => return None,
                Phase::Waiting => {
                    if latest > 0 {
                        self.current = self.attempt.unwrap_or(latest);
                        self.phase = Phase::Reading;
                    } else if ended || !self.follow {
                        self.phase = Phase::Done;
                    } else {
                        self.wait_for_change().await;
                    }
                }
                Phase::Reading => {
                    // The status is read before the file, so bytes written
                    // before the end are always read before we stop.
                    match self.read_more(self.current).await {
                        Err(e) => return Some(Err(e)),
                        Ok(Some(b)) => return Some(Ok(b)),
                        Ok(None) if !self.follow => self.phase = Phase::Done,
                        Ok(None) if self.current < latest => {
                            if self.attempt.is_some() {
                                self.phase = Phase::Done;
                            } else {
                                // Retried: follow the next attempt.
                                self.current = latest;
                                self.offset = 0;
                                let note = format!("--- tessera: attempt {latest} ---\n");
                                return Some(Ok(Bytes::from(note)));
                            }
                        }
                        Ok(None) if ended => self.phase = Phase::Done,
                        Ok(None) => self.wait_for_change().await,
                    }
                }
            }
        }
    }
}

pub fn stream(
    shared: Arc<Shared>,
    job: JobId,
    replica: u32,
    attempt: Option<u32>,
    follow: bool,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    let changes = shared.changes.subscribe();
    let f = Follow {
        shared,
        job,
        replica,
        attempt,
        follow,
        current: 0,
        offset: 0,
        phase: Phase::Waiting,
        changes,
    };
    futures::stream::unfold(
        f,
        |mut f| async move { f.next().await.map(|item| (item, f)) },
    )
}
