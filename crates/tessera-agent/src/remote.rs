//! A remote agent's side of the connection to the control plane.
//!
//! The agent joins once with a join token (`POST /v1/agents/join`) and keeps
//! the node credential it gets under its home. It then holds one WebSocket
//! open to the server (`/v1/agents/connect`, outbound, so machines behind
//! NAT can join), reconnecting with backoff whenever it drops. On every
//! connection it says who it is (`Register`), hands over the reports it held
//! back while disconnected, and says what it runs (`Sync`), so the server can
//! reconcile.
//!
//! The lease: the server's `Welcome` names how long the agent may go
//! without hearing from it. Past that, the agent stops all its replicas
//! (unless configured to keep them) and reports them as
//! [`ExitCause::Disconnected`] — by then the server is about to declare the
//! node lost and run the work elsewhere, and two copies must never overlap.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tessera_core::node::Inventory;
use tessera_core::protocol::{ExitCause, FromAgent, ReplicaKey, ToAgent};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tracing::{info, warn};

use crate::{Agent, AgentConfig};

/// How a remote agent reaches its server.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// `http://host:port` of the control plane.
    pub server: String,
    /// Needed on the first start only, to join.
    pub join_token: Option<String>,
    /// Keep replicas running when the server is unreachable past the lease
    /// (they are then reconciled on reconnect; the server may meanwhile have
    /// run the work elsewhere).
    pub keep_running_when_disconnected: bool,
    /// Which server certificate to trust on `https://`; kept in the
    /// credential at join, so later starts need no flags.
    pub trust: crate::tls::Trust,
}

/// What a joined agent keeps under its home (mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Credential {
    server: String,
    node: String,
    credential: String,
    /// The certificate trust used at join (`https://` servers).
    #[serde(default, flatten)]
    trust: crate::tls::Trust,
}

fn credential_path(home: &Path) -> PathBuf {
    home.join("agent").join("credential.json")
}

#[derive(Deserialize)]
struct Joined {
    node: String,
    credential: String,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: String,
}

/// Returns this machine's node credential, joining first when there is none.
async fn credential(config: &AgentConfig, remote: &RemoteConfig) -> anyhow::Result<Credential> {
    let path = credential_path(&config.home);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let mut c: Credential =
            serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
        // Trust given now (a new pin after the server's certificate changed)
        // replaces the one kept, and is kept in turn.
        if !remote.trust.is_empty() && remote.trust != c.trust {
            c.trust = remote.trust.clone();
            write_private(&path, &serde_json::to_string_pretty(&c)?)?;
        }
        if let Some(name) = &config.name {
            if *name != c.node {
                bail!(
                    "this agent joined as node `{}` ({}); it cannot run as `{name}` — remove that file to join again",
                    c.node,
                    path.display()
                );
            }
        }
        return Ok(c);
    }
    let Some(token) = &remote.join_token else {
        bail!(
            "this machine has not joined yet: pass --join-token (mint one with `tessera join-token create` on the server)"
        );
    };
    let node = config.name.clone().unwrap_or_else(crate::hostname);
    let url = format!("{}/v1/agents/join", remote.server.trim_end_matches('/'));
    let mut http = reqwest::Client::builder();
    if let Some(tls) = remote.trust.client_config(&remote.server)? {
        http = http.use_preconfigured_tls((*tls).clone());
    }
    let resp = http
        .build()
        .context("setting up the HTTP client")?
        .post(&url)
        .json(&serde_json::json!({ "token": token, "node": node }))
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the server at {}: {}",
                remote.server,
                crate::tls::error_chain(&e)
            )
        })?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        let msg = serde_json::from_str::<ErrorEnvelope>(&body)
            .map(|e| e.error.message)
            .unwrap_or(body);
        bail!("joining failed ({status}): {msg}");
    }
    let joined: Joined = serde_json::from_str(&body).context("reading the join answer")?;
    let c = Credential {
        server: remote.server.clone(),
        node: joined.node,
        credential: joined.credential,
        trust: remote.trust.clone(),
    };
    write_private(&path, &serde_json::to_string_pretty(&c)?)?;
    info!(node = %c.node, "joined the pool");
    Ok(c)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::write_private(path, text).with_context(|| format!("writing {}", path.display()))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Bytes of log per message.
const LOG_CHUNK: usize = 64 * 1024;

/// Encodes a piece of a replica's log as a binary frame: job id, attempt,
/// replica and offset (big-endian), then the bytes. Writing a frame at its
/// offset is idempotent, so frames may be sent again after a reconnection.
pub fn encode_log_frame(key: ReplicaKey, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + data.len());
    out.extend_from_slice(&key.job_id.to_be_bytes());
    out.extend_from_slice(&key.attempt.to_be_bytes());
    out.extend_from_slice(&key.replica.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The inverse of [`encode_log_frame`].
pub fn decode_log_frame(frame: &[u8]) -> Option<(ReplicaKey, u64, &[u8])> {
    if frame.len() < 24 {
        return None;
    }
    let u64_at = |i: usize| u64::from_be_bytes(frame[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_be_bytes(frame[i..i + 4].try_into().expect("4 bytes"));
    Some((
        ReplicaKey {
            job_id: u64_at(0),
            attempt: u32_at(8),
            replica: u32_at(12),
        },
        u64_at(16),
        &frame[24..],
    ))
}

/// The connection's bookkeeping, kept across reconnections.
struct Link {
    home: PathBuf,
    /// How much of each replica's log the server has been sent.
    shipped: HashMap<ReplicaKey, u64>,
    inventory: Inventory,
    /// Reports made while disconnected, in order.
    held: VecDeque<FromAgent>,
    /// Replicas given to (or adopted by) the agent that have not ended.
    running: BTreeSet<ReplicaKey>,
    /// Replicas stopped because the lease ran out.
    lease_stopped: HashSet<ReplicaKey>,
    last_contact: Instant,
    /// The Unix second last written to the lease file.
    lease_written: u64,
    lease: Option<Duration>,
    heartbeat: Duration,
    grace_ms: u64,
    /// Fetches inputs this machine cannot see on its own disk, and uploads
    /// outputs.
    fetcher: std::sync::Arc<crate::fetch::Fetcher>,
    /// Replicas whose output directories go to the server before their
    /// exit is reported: their `from` directories.
    outputs: HashMap<ReplicaKey, Vec<String>>,
}

impl Link {
    /// Renews the lease: the server was heard from just now. The lease file
    /// tells replicas' watchdogs until when they may run (whole seconds,
    /// rounded down), should this process die.
    fn contact(&mut self) {
        self.last_contact = Instant::now();
        let Some(lease) = self.lease else { return };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let until = (now + lease).as_secs();
        if until > self.lease_written {
            let path = crate::lease_path(&self.home);
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, format!("{until}\n")).is_ok()
                && std::fs::rename(&tmp, &path).is_ok()
            {
                self.lease_written = until;
            }
        }
    }

    /// Log frames for what `key` has written since the last call.
    fn log_frames(&mut self, key: ReplicaKey) -> Vec<Message> {
        use std::io::{Read, Seek, SeekFrom};
        let offset = self.shipped.entry(key).or_insert(0);
        let Ok(mut f) = std::fs::File::open(crate::log_path(&self.home, key)) else {
            return Vec::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len <= *offset || f.seek(SeekFrom::Start(*offset)).is_err() {
            return Vec::new();
        }
        let mut frames = Vec::new();
        let mut buf = vec![0u8; LOG_CHUNK];
        while *offset < len {
            let want = ((len - *offset) as usize).min(LOG_CHUNK);
            match f.read(&mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    frames.push(Message::Binary(
                        encode_log_frame(key, *offset, &buf[..n]).into(),
                    ));
                    *offset += n as u64;
                }
            }
        }
        frames
    }

    /// Tracks what runs and rewrites lease stops; returns the report to send.
    fn observe(&mut self, ev: FromAgent) -> FromAgent {
        match ev {
            FromAgent::Exited {
                key,
                code,
                signal,
                cause,
                at,
                workdir,
            } => {
                self.running.remove(&key);
                let cause = if self.lease_stopped.remove(&key) && cause == ExitCause::Stopped {
                    ExitCause::Disconnected
                } else {
                    cause
                };
                FromAgent::Exited {
                    key,
                    code,
                    signal,
                    cause,
                    at,
                    workdir,
                }
            }
            other => other,
        }
    }
}

/// Runs a remote agent until the process is stopped: joins if needed,
/// adopts replicas an earlier run left, then serves the server's commands
/// over a connection it keeps open.
pub async fn run(mut config: AgentConfig, remote: RemoteConfig) -> anyhow::Result<()> {
    let cred = credential(&config, &remote).await?;
    let tls = cred.trust.client_config(&remote.server)?;
    config.name = Some(cred.node.clone());
    config.watchdog = !remote.keep_running_when_disconnected;
    let home = config.home.clone();
    let default_grace = config.kill_grace.as_millis() as u64;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut http = reqwest::Client::builder();
    if let Some(tls) = &tls {
        http = http.use_preconfigured_tls((**tls).clone());
    }
    let fetcher = std::sync::Arc::new(crate::fetch::Fetcher {
        http: http.build().context("setting up the HTTP client")?,
        server: remote.server.clone(),
        credential: cred.credential.clone(),
        home: home.clone(),
        events: ev_tx.clone(),
    });
    let mut agent = Agent::new(config, ev_tx).context("starting the agent")?;
    let adopted = agent.adopt_orphans();
    if !adopted.is_empty() {
        info!(
            count = adopted.len(),
            "adopted replicas left running by an earlier run"
        );
    }
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    tokio::spawn(agent.run(cmd_rx));
    // The agent registers first; reports of adopted replicas that ended
    // unwatched may come before it and are held.
    let mut held = VecDeque::new();
    let inventory = loop {
        match ev_rx.recv().await {
            Some(FromAgent::Register(inv)) => break inv,
            Some(other) => held.push_back(other),
            None => bail!("the agent stopped before registering"),
        }
    };
    let mut link = Link {
        home: home.clone(),
        shipped: HashMap::new(),
        inventory,
        held,
        running: adopted.into_iter().collect(),
        lease_stopped: HashSet::new(),
        last_contact: Instant::now(),
        lease_written: 0,
        lease: None,
        heartbeat: crate::HEARTBEAT,
        grace_ms: default_grace,
        fetcher,
        outputs: HashMap::new(),
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        match connect(&remote.server, &cred, tls.clone(), &mut link).await {
            Ok(ws) => {
                backoff = Duration::from_millis(100);
                info!(server = %remote.server, node = %cred.node, "connected");
                serve(ws, &mut link, &mut ev_rx, &cmd_tx, &remote).await;
                warn!(server = %remote.server, "connection to the server lost; reconnecting");
            }
            Err(e) => {
                warn!(server = %remote.server, error = %e, "cannot connect to the server");
                if e.to_string().contains("401") {
                    // A revoked credential does not come back.
                    bail!("the server refused this node's credential (was it removed with `tessera node remove`?): {e}");
                }
            }
        }
        // Wait before the next try, still holding reports and minding the lease.
        let until = Instant::now() + backoff;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        loop {
            tokio::select! {
                ev = ev_rx.recv() => match ev {
                    Some(FromAgent::Heartbeat { .. } | FromAgent::Usage { .. }) => {}
                    Some(ev) => {
                        let ev = link.observe(ev);
                        link.held.push_back(ev);
                    }
                    None => bail!("the agent stopped"),
                },
                _ = tokio::time::sleep_until(until) => break,
            }
            check_lease(&mut link, &cmd_tx, &remote);
        }
        check_lease(&mut link, &cmd_tx, &remote);
    }
}

/// Stops everything once the server has been silent past the lease.
fn check_lease(link: &mut Link, cmd_tx: &mpsc::UnboundedSender<ToAgent>, remote: &RemoteConfig) {
    let Some(lease) = link.lease else { return };
    if remote.keep_running_when_disconnected || link.last_contact.elapsed() <= lease {
        return;
    }
    let to_stop: Vec<ReplicaKey> = link
        .running
        .iter()
        .filter(|k| !link.lease_stopped.contains(k))
        .copied()
        .collect();
    if to_stop.is_empty() {
        return;
    }
    warn!(
        count = to_stop.len(),
        silent_ms = link.last_contact.elapsed().as_millis() as u64,
        "no word from the server past the lease: stopping all replicas"
    );
    link.lease_stopped.extend(to_stop);
    let _ = cmd_tx.send(ToAgent::StopAll {
        grace_ms: link.grace_ms,
        reason: "lost contact with the server for longer than the lease".into(),
    });
}

/// Opens the connection and does the handshake: Welcome in; Register, held
/// reports and Sync out.
async fn connect(
    server: &str,
    cred: &Credential,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    link: &mut Link,
) -> anyhow::Result<Ws> {
    let base = server.trim_end_matches('/');
    let ws_url = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}/v1/agents/connect")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}/v1/agents/connect")
    } else {
        bail!("the server URL must start with http:// or https://: {server}");
    };
    let mut req = ws_url.into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", cred.credential).parse()?,
    );
    let timeout = link
        .lease
        .map(|l| (l / 4).clamp(Duration::from_millis(200), Duration::from_secs(5)))
        .unwrap_or(Duration::from_secs(5));
    let connector = tls.map(tokio_tungstenite::Connector::Rustls);
    // Without Nagle's algorithm (`true`): reports are small frames sent back
    // to back (a replica's `Started`, then its `Exited`), and the second
    // would otherwise wait for the server's delayed ACK of the first, about
    // 40 ms on Linux.
    let (mut ws, _) = tokio::time::timeout(
        timeout,
        tokio_tungstenite::connect_async_tls_with_config(req, None, true, connector),
    )
    .await
    .context("connecting timed out")?
    .map_err(|e| anyhow::anyhow!(crate::tls::error_chain(&e)))?;
    let welcome = tokio::time::timeout(timeout, ws.next())
        .await
        .context("no welcome from the server")?;
    match welcome {
        Some(Ok(Message::Text(t))) => match serde_json::from_str::<ToAgent>(t.as_str())? {
            ToAgent::Welcome {
                lease_ms,
                grace_ms,
                heartbeat_ms,
                ..
            } => {
                link.lease = Some(Duration::from_millis(lease_ms));
                link.heartbeat = Duration::from_millis(heartbeat_ms.max(1));
                link.grace_ms = grace_ms;
                link.contact();
            }
            other => bail!("expected a welcome, got {other:?}"),
        },
        other => bail!("expected a welcome, got {other:?}"),
    }
    let send =
        |ev: &FromAgent| Message::Text(serde_json::to_string(ev).expect("serialisable").into());
    ws.send(send(&FromAgent::Register(link.inventory.clone())))
        .await?;
    // What was in flight when the last connection dropped may be lost:
    // send logs again from the start (frames are idempotent).
    link.shipped.clear();
    // Held reports go out one by one, each replica's log before its end;
    // on failure the rest stay held.
    while let Some(ev) = link.held.front().cloned() {
        if let FromAgent::Exited { key, .. } = &ev {
            for frame in link.log_frames(*key) {
                ws.send(frame).await?;
            }
            link.shipped.remove(key);
        }
        ws.send(send(&ev)).await?;
        link.held.pop_front();
    }
    ws.send(send(&FromAgent::Sync {
        node: cred.node.clone(),
        running: link.running.iter().copied().collect(),
    }))
    .await?;
    Ok(ws)
}

/// Relays commands and reports until the connection drops.
async fn serve(
    ws: Ws,
    link: &mut Link,
    ev_rx: &mut mpsc::UnboundedReceiver<FromAgent>,
    cmd_tx: &mpsc::UnboundedSender<ToAgent>,
    remote: &RemoteConfig,
) {
    let (mut sink, mut stream) = ws.split();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    // Heartbeats at the server's pace (its `Welcome` says it), whatever the
    // agent's own default: the server's node lease is computed from it.
    let mut last_beat = Instant::now();
    loop {
        tokio::select! {
            msg = stream.next() => {
                link.contact();
                match msg {
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<ToAgent>(t.as_str()) {
                        Ok(cmd) => {
                            if let ToAgent::Start(s) = &cmd {
                                link.running.insert(s.key);
                                if !s.outputs.is_empty() {
                                    link.outputs.insert(s.key, s.outputs.clone());
                                }
                            }
                            match cmd {
                                ToAgent::Welcome { .. } => {}
                                // Inputs this disk does not hold are fetched
                                // first; the replica starts once they are here.
                                ToAgent::Start(s) if crate::fetch::needs_fetch(&s) => {
                                    let (fetcher, agent) = (link.fetcher.clone(), cmd_tx.clone());
                                    tokio::spawn(async move { fetcher.start(s, agent).await });
                                }
                                cmd => {
                                    let _ = cmd_tx.send(cmd);
                                }
                            }
                        }
                        Err(e) => warn!(error = %e, "unreadable message from the server"),
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                }
            }
            ev = ev_rx.recv() => {
                let Some(ev) = ev else { return };
                // A replica with outputs that exited 0: its outputs are
                // uploaded first, then its exit comes back here to be sent.
                if let FromAgent::Exited { key, .. } = &ev {
                    if let Some(outs) = link.outputs.remove(key) {
                        if crate::fetch::uploads(&ev) {
                            let fetcher = link.fetcher.clone();
                            tokio::spawn(async move { fetcher.upload_outputs(ev, outs).await });
                            continue;
                        }
                    }
                }
                let ev = link.observe(ev);
                // A replica's whole log reaches the server before its end does.
                if let FromAgent::Exited { key, .. } = &ev {
                    let key = *key;
                    for frame in link.log_frames(key) {
                        if sink.send(frame).await.is_err() {
                            link.held.push_back(ev);
                            return;
                        }
                    }
                    link.shipped.remove(&key);
                }
                let text = Message::Text(serde_json::to_string(&ev).expect("serialisable").into());
                if sink.send(text).await.is_err() {
                    if !matches!(ev, FromAgent::Heartbeat { .. } | FromAgent::Usage { .. }) {
                        link.held.push_back(ev);
                    }
                    return;
                }
            }
            _ = tick.tick() => {
                if last_beat.elapsed() >= link.heartbeat {
                    last_beat = Instant::now();
                    let beat = FromAgent::Heartbeat {
                        node: link.inventory.name.clone(),
                        at: crate::now_ms(),
                    };
                    let text = Message::Text(serde_json::to_string(&beat).expect("serialisable").into());
                    if sink.send(text).await.is_err() {
                        return;
                    }
                }
                let keys: Vec<ReplicaKey> = link.running.iter().copied().collect();
                for key in keys {
                    for frame in link.log_frames(key) {
                        if sink.send(frame).await.is_err() {
                            return;
                        }
                    }
                }
                // The server pings every heartbeat: a silent connection is
                // dead even if TCP has not noticed (a cut cable, a partition).
                if link.last_contact.elapsed() > 3 * link.heartbeat {
                    warn!("the server has been silent for three heartbeats; reconnecting");
                    check_lease(link, cmd_tx, remote);
                    return;
                }
            }
        }
        check_lease(link, cmd_tx, remote);
    }
}
