//! Tessera's persistence boundary.
//!
//! This crate owns the [`Store`] trait — the one narrow interface through
//! which the control plane makes its state durable — and its implementations:
//! [`SqliteStore`], the embedded default (one file under `$TESSERA_HOME`),
//! and [`MemStore`], an in-memory fake for tests.
//!
//! The control plane keeps its working state in memory and writes through:
//! a batch of [`Write`]s is durable when [`Store::submit`]'s receiver answers
//! `Ok`. The SQLite store commits batches from many callers together in one
//! transaction with one fsync (group commit), so durable acknowledgement
//! stays cheap under load. IDs and timestamps come from the caller, never
//! from the store. This crate knows nothing of HTTP, scheduling or agents.

mod sqlite;

use std::collections::BTreeMap;
use std::sync::Mutex;

use tessera_core::auth::{Team, TokenRecord};
use tessera_core::node::Node;
use tessera_core::{Event, Job};
use tokio::sync::oneshot;

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("corrupt record in {table}: {message}")]
    Corrupt {
        table: &'static str,
        message: String,
    },
    #[error("the store has shut down")]
    Closed,
    #[error("{0}")]
    Other(String),
}

/// One change to durable state.
#[derive(Debug, Clone)]
pub enum Write {
    Team(Team),
    Token(TokenRecord),
    DeleteToken(String),
    Job(Box<Job>),
    Event(Event),
    Node(Box<Node>),
    DeleteNode(String),
    Meta(String, String),
    DeleteMeta(String),
}

/// Everything loaded at start-up.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    pub teams: Vec<Team>,
    pub tokens: Vec<TokenRecord>,
    pub jobs: Vec<Job>,
    /// In the order they were written.
    pub events: Vec<Event>,
    pub nodes: Vec<Node>,
    pub meta: BTreeMap<String, String>,
}

/// The durable store. Implementations must apply each batch atomically and
/// in the order batches were submitted.
pub trait Store: Send + Sync + 'static {
    /// Reads the whole durable state (at start-up).
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Queues a batch; the receiver answers once it is durable (or failed,
    /// in which case none of it was applied).
    fn submit(&self, batch: Vec<Write>) -> oneshot::Receiver<Result<(), StoreError>>;
}

/// Makes `batch` durable, waiting for the commit.
pub async fn commit(store: &dyn Store, batch: Vec<Write>) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    store.submit(batch).await.map_err(|_| StoreError::Closed)?
}

/// An in-memory store for tests: same contract, no disk.
#[derive(Debug, Default)]
pub struct MemStore {
    state: Mutex<Loaded>,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }
}

fn apply_to(state: &mut Loaded, w: Write) {
    match w {
        Write::Team(t) => {
            state.teams.retain(|x| x.name != t.name);
            state.teams.push(t);
        }
        Write::Token(t) => {
            state.tokens.retain(|x| x.id != t.id);
            state.tokens.push(t);
        }
        Write::DeleteToken(id) => state.tokens.retain(|x| x.id != id),
        Write::Job(j) => match state.jobs.iter_mut().find(|x| x.id == j.id) {
            Some(slot) => *slot = *j,
            None => state.jobs.push(*j),
        },
        Write::Event(e) => state.events.push(e),
        Write::Node(n) => {
            state.nodes.retain(|x| x.inventory.name != n.inventory.name);
            state.nodes.push(*n);
        }
        Write::DeleteNode(name) => state.nodes.retain(|x| x.inventory.name != name),
        Write::Meta(k, v) => {
            state.meta.insert(k, v);
        }
        Write::DeleteMeta(k) => {
            state.meta.remove(&k);
        }
    }
}

impl Store for MemStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let mut l = self
            .state
            .lock()
            .map_err(|e| StoreError::Other(e.to_string()))?
            .clone();
        l.jobs.sort_by_key(|j| j.id);
        Ok(l)
    }

    fn submit(&self, batch: Vec<Write>) -> oneshot::Receiver<Result<(), StoreError>> {
        let (tx, rx) = oneshot::channel();
        let result = match self.state.lock() {
            Ok(mut s) => {
                for w in batch {
                    apply_to(&mut s, w);
                }
                Ok(())
            }
            Err(e) => Err(StoreError::Other(e.to_string())),
        };
        let _ = tx.send(result);
        rx
    }
}
