//! The embedded SQLite store: one database file, one writer thread, group
//! commit.
//!
//! Records are stored as JSON documents with the columns needed to find them
//! (`id`, `team`, `state`); the schema version lives in `PRAGMA user_version`.
//! The database runs in WAL mode with `synchronous=FULL`, so a committed
//! batch survives a crash of the process or of the machine.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use rusqlite::{params, Connection, OpenFlags};
use tokio::sync::oneshot;
use tracing::{debug, error};

use crate::{Loaded, Store, StoreError, Write};

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS teams(name TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens(id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs(
    id INTEGER PRIMARY KEY,
    team TEXT NOT NULL,
    state TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_team_state ON jobs(team, state);
CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    time INTEGER NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id);
CREATE TABLE IF NOT EXISTS nodes(name TEXT PRIMARY KEY, body TEXT NOT NULL);
";

/// Most requests folded into one transaction.
const MAX_GROUP: usize = 4096;

type Request = (Vec<Write>, oneshot::Sender<Result<(), StoreError>>);

/// The embedded store. Cloning is not needed: share it behind an `Arc`.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    tx: mpsc::Sender<Request>,
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database at `path` and
    /// starts its writer thread.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let conn = open(&path)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Other(format!(
                "database {} has schema version {version}, newer than this binary's {SCHEMA_VERSION}; upgrade tessera",
                path.display()
            )));
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        let (tx, rx) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("tessera-store".into())
            .spawn(move || writer(conn, rx))
            .map_err(|e| StoreError::Other(format!("cannot start the store thread: {e}")))?;
        Ok(SqliteStore { path, tx })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn writer(mut conn: Connection, rx: mpsc::Receiver<Request>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let n = group.len();
        match apply_group(&mut conn, group.iter().map(|(w, _)| w.as_slice())) {
            Ok(()) => {
                debug!(requests = n, "store group committed");
                for (_, reply) in group {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                // One bad batch must not fail its neighbours: retry each alone.
                error!(error = %e, requests = n, "group commit failed; retrying one by one");
                for (writes, reply) in group {
                    let r = apply_group(&mut conn, std::iter::once(writes.as_slice()));
                    let _ = reply.send(r);
                }
            }
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Other(format!("cannot encode record: {e}")))
}

fn apply_group<'a>(
    conn: &mut Connection,
    batches: impl Iterator<Item = &'a [Write]>,
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    for batch in batches {
        for w in batch {
            apply(&tx, w)?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn apply(tx: &rusqlite::Transaction<'_>, w: &Write) -> Result<(), StoreError> {
    match w {
        Write::Team(t) => {
            tx.prepare_cached("INSERT OR REPLACE INTO teams(name, body) VALUES (?1, ?2)")?
                .execute(params![t.name, json(t)?])?;
        }
        Write::Token(t) => {
            tx.prepare_cached("INSERT INTO tokens(id, hash, body) VALUES (?1, ?2, ?3) ON CONFLICT(id) DO UPDATE SET hash = excluded.hash, body = excluded.body")?
                .execute(params![t.id, t.hash, json(t)?])?;
        }
        Write::DeleteToken(id) => {
            tx.prepare_cached("DELETE FROM tokens WHERE id = ?1")?
                .execute(params![id])?;
        }
        Write::Job(j) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO jobs(id, team, state, body) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                j.id as i64,
                j.spec.team,
                j.state.as_str(),
                json(j)?
            ])?;
        }
        Write::Event(e) => {
            tx.prepare_cached(
                "INSERT INTO events(job_id, time, kind, message) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![e.job_id as i64, e.time as i64, e.kind, e.message])?;
        }
        Write::Node(n) => {
            tx.prepare_cached("INSERT OR REPLACE INTO nodes(name, body) VALUES (?1, ?2)")?
                .execute(params![n.inventory.name, json(n)?])?;
        }
        Write::DeleteNode(name) => {
            tx.prepare_cached("DELETE FROM nodes WHERE name = ?1")?
                .execute(params![name])?;
        }
        Write::Meta(k, v) => {
            tx.prepare_cached("INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)")?
                .execute(params![k, v])?;
        }
        Write::DeleteMeta(k) => {
            tx.prepare_cached("DELETE FROM meta WHERE key = ?1")?
                .execute(params![k])?;
        }
    }
    Ok(())
}

fn load_bodies<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    table: &'static str,
    sql: &str,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for row in rows {
        let body = row?;
        out.push(
            serde_json::from_str(&body).map_err(|e| StoreError::Corrupt {
                table,
                message: e.to_string(),
            })?,
        );
    }
    Ok(out)
}

impl Store for SqliteStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        // A separate read connection: WAL lets it read while the writer works.
        let conn = open(&self.path)?;
        let mut loaded = Loaded {
            teams: load_bodies(&conn, "teams", "SELECT body FROM teams ORDER BY name")?,
            tokens: load_bodies(&conn, "tokens", "SELECT body FROM tokens ORDER BY id")?,
            jobs: load_bodies(&conn, "jobs", "SELECT body FROM jobs ORDER BY id")?,
            nodes: load_bodies(&conn, "nodes", "SELECT body FROM nodes ORDER BY name")?,
            ..Loaded::default()
        };
        let mut stmt =
            conn.prepare("SELECT job_id, time, kind, message FROM events ORDER BY seq")?;
        let rows = stmt.query_map([], |r| {
            Ok(tessera_core::Event {
                job_id: r.get::<_, i64>(0)? as u64,
                time: r.get::<_, i64>(1)? as u64,
                kind: r.get(2)?,
                message: r.get(3)?,
            })
        })?;
        for e in rows {
            loaded.events.push(e?);
        }
        let mut stmt = conn.prepare("SELECT key, value FROM meta")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for kv in rows {
            let (k, v) = kv?;
            loaded.meta.insert(k, v);
        }
        Ok(loaded)
    }

    fn submit(&self, batch: Vec<Write>) -> oneshot::Receiver<Result<(), StoreError>> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::SendError((_, reply))) = self.tx.send((batch, tx)) {
            let _ = reply.send(Err(StoreError::Closed));
        }
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit;
    use tessera_core::auth::{Role, Team, TokenRecord};
    use tessera_core::spec::JobSpec;
    use tessera_core::{Event, Job, JobState};

    fn job(id: u64) -> Job {
        let spec = JobSpec::parse("command: [\"true\"]")
            .unwrap()
            .validate("ml")
            .unwrap();
        Job::new(id, spec, "tok".into(), 1000 + id)
    }

    #[tokio::test]
    async fn committed_writes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            let mut j = job(1);
            commit(
                &s,
                vec![
                    Write::Team(Team {
                        name: "ml".into(),
                        weight: 1.0,
                        created_at: 1,
                        quota: None,
                    }),
                    Write::Token(TokenRecord {
                        id: "t1".into(),
                        name: "a".into(),
                        team: "ml".into(),
                        role: Role::Member,
                        hash: "h".into(),
                        created_at: 1,
                        kind: Default::default(),
                    }),
                    Write::Job(Box::new(j.clone())),
                    Write::Event(Event::new(1, 5, "submitted", "by t1")),
                    Write::Meta("k".into(), "v".into()),
                ],
            )
            .await
            .unwrap();
            j.state = JobState::Succeeded;
            j.exit_code = Some(0);
            commit(
                &s,
                vec![
                    Write::Job(Box::new(j)),
                    Write::Event(Event::new(1, 9, "succeeded", "exit 0")),
                ],
            )
            .await
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let l = s.load().unwrap();
        assert_eq!(l.teams.len(), 1);
        assert_eq!(l.tokens[0].role, Role::Member);
        assert_eq!(l.jobs.len(), 1);
        assert_eq!(l.jobs[0].state, JobState::Succeeded);
        assert_eq!(l.jobs[0].exit_code, Some(0));
        assert_eq!(
            l.events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            ["submitted", "succeeded"]
        );
        assert_eq!(l.meta["k"], "v");
    }

    #[tokio::test]
    async fn concurrent_batches_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(SqliteStore::open(dir.path().join("t.db")).unwrap());
        let mut handles = Vec::new();
        for i in 0..200u64 {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                commit(
                    s.as_ref(),
                    vec![
                        Write::Job(Box::new(job(i))),
                        Write::Event(Event::new(i, i, "submitted", "")),
                    ],
                )
                .await
            }));
        }
        for h in handles {
            h.await.unwrap().unwrap();
        }
        let l = s.load().unwrap();
        assert_eq!(l.jobs.len(), 200);
        assert_eq!(l.events.len(), 200);
    }

    #[tokio::test]
    async fn a_failing_batch_does_not_fail_its_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path().join("t.db")).unwrap();
        let tok = |id: &str| TokenRecord {
            id: id.into(),
            name: "n".into(),
            team: "ml".into(),
            role: Role::Viewer,
            hash: "same-hash".into(),
            created_at: 1,
            kind: Default::default(),
        };
        commit(&s, vec![Write::Token(tok("a"))]).await.unwrap();
        // Same hash, other id: violates UNIQUE(hash), applies nothing.
        let bad = s.submit(vec![Write::Job(Box::new(job(7))), Write::Token(tok("b"))]);
        let good = s.submit(vec![Write::Job(Box::new(job(8)))]);
        assert!(bad.await.unwrap().is_err());
        good.await.unwrap().unwrap();
        let l = s.load().unwrap();
        assert_eq!(l.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), [8]);
    }
}
