//! `Gateway::serve`: the gateway as a server of its own, without a router.
//!
//! Each client connection is served by hyper's HTTP/1.1 server directly and
//! routed by hand (`/s/<service>/…`, or `Host` under the domain). It owns
//! its upstream connections: a request to a replica reuses the connection
//! the previous request on the same client connection left idle to that
//! replica, so the hot path takes no pool lock, hashes no pool key and
//! spawns no task to return a connection to a pool. HTTP/1.1 serves one
//! request at a time per client connection, so each upstream connection is
//! used by one request at a time.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::header::HeaderValue;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::{BoxError, InBody, OutBody, SendError, Via};
use crate::{Gateway, Replica, Route};

/// Idle upstream connections one client connection keeps (one per replica
/// it used last, the oldest given up first).
const MAX_IDLE_PER_CONN: usize = 16;

impl Gateway {
    /// Serves the gateway's routes (as `router()` does) on `listener` until
    /// `shutdown` completes, then lets requests in flight finish. Accepted
    /// sockets get TCP_NODELAY; `X-Forwarded-For` is set from the peer.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
        let mut shutdown = pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        accept_error(e).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(self.clone().serve_connection(tcp, peer, stop_rx.clone()));
        }
        drop(listener);
        drop(stop_rx);
        // Tell every connection to finish its request and close, and wait
        // until they all have.
        let _ = stop_tx.send(());
        stop_tx.closed().await;
        Ok(())
    }

    /// Serves one client connection: by hand while its requests are plain
    /// HTTP/1.1 (`fast`), then, from the first request that is not, with
    /// hyper's server and the general path.
    async fn serve_connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        mut stop: tokio::sync::watch::Receiver<()>,
    ) {
        let Some(rest) = crate::fast::serve(&self, tcp, peer, &mut stop).await else {
            return;
        };
        self.serve_hyper(rest, peer, stop).await;
    }

    async fn serve_hyper<I>(
        self: Arc<Self>,
        io: I,
        peer: SocketAddr,
        mut stop: tokio::sync::watch::Receiver<()>,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let conns = Arc::new(UpstreamConns::new(peer));
        let gw = self;
        let svc = service_fn(move |req: hyper::Request<Incoming>| {
            let gw = gw.clone();
            let conns = conns.clone();
            async move {
                let (parts, body) = req.into_parts();
                let client = conns.client.clone();
                let resp = gw
                    .handle(
                        parts,
                        InBody::Other(body),
                        client.as_ref(),
                        Via::Conn(&conns),
                    )
                    .await;
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        let mut conn = pin!(conn);
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::trace!(error = %e, "client connection ended");
                }
                return;
            }
            _ = stop.changed() => {}
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }
}

/// As axum's `serve`: errors of one connection are skipped; others (such as
/// running out of file descriptors) pause accepting for a second.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept error");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The upstream connections of one client connection.
pub(crate) struct UpstreamConns {
    /// The client's IP address, as `X-Forwarded-For` carries it.
    client: Option<HeaderValue>,
    idle: Mutex<Idle<SendRequest<OutBody>>>,
}

/// Idle upstream connections (of one client connection), each to the
/// replica it was opened to.
pub(crate) struct Idle<T> {
    /// The route generation the list was last checked against.
    generation: u64,
    conns: Vec<IdleConn<T>>,
}

struct IdleConn<T> {
    addr: SocketAddr,
    since: Instant,
    conn: T,
}

impl<T> Default for Idle<T> {
    fn default() -> Self {
        Idle {
            generation: 0,
            conns: Vec::new(),
        }
    }
}

impl<T> Idle<T> {
    /// Takes the idle connection to `replica`, if there is a usable one
    /// (`usable`, and idle for less than `max_idle`). Connections to
    /// replicas that left the route are closed here.
    pub(crate) fn take(
        &mut self,
        route: &Route,
        replica: &Replica,
        max_idle: Duration,
        mut usable: impl FnMut(&mut T) -> bool,
    ) -> Option<T> {
        if self.conns.is_empty() {
            return None;
        }
        if self.generation != route.generation {
            self.generation = route.generation;
            self.conns
                .retain(|c| route.replicas.iter().any(|r| r.addr == c.addr));
        }
        let now = Instant::now();
        self.conns
            .retain_mut(|c| now.duration_since(c.since) < max_idle && usable(&mut c.conn));
        let i = self.conns.iter().position(|c| c.addr == replica.addr)?;
        Some(self.conns.swap_remove(i).conn)
    }

    /// Keeps `conn` for the next request to `addr`.
    pub(crate) fn put(&mut self, addr: SocketAddr, conn: T) {
        if self.conns.len() >= MAX_IDLE_PER_CONN {
            self.conns.remove(0);
        }
        self.conns.push(IdleConn {
            addr,
            since: Instant::now(),
            conn,
        });
    }
}

impl UpstreamConns {
    fn new(peer: SocketAddr) -> UpstreamConns {
        UpstreamConns {
            client: HeaderValue::try_from(peer.ip().to_string()).ok(),
            idle: Mutex::new(Idle::default()),
        }
    }

    fn take(
        &self,
        route: &Route,
        replica: &Replica,
        max_idle: Duration,
    ) -> Option<SendRequest<OutBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.take(route, replica, max_idle, |tx| !tx.is_closed())
    }

    fn put(&self, addr: SocketAddr, tx: SendRequest<OutBody>) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(addr, tx);
    }

    /// Sends `req` to `replica` on this client connection's idle connection
    /// to it, or on a new one. A request that an idle connection closed
    /// before taking it goes on a new connection.
    pub(crate) async fn send(
        &self,
        gw: &Gateway,
        route: &Route,
        replica: &Replica,
        mut req: hyper::Request<OutBody>,
    ) -> Result<hyper::Response<Incoming>, SendError> {
        if let Some(mut tx) = self.take(route, replica, gw.config.pool_idle_timeout) {
            if tx.ready().await.is_ok() {
                match tx.try_send_request(req).await {
                    Ok(resp) => {
                        self.put(replica.addr, tx);
                        return Ok(resp);
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => req = unsent,
                        None => return Err(SendError::Failed(e.into_error().into())),
                    },
                }
            }
        }
        let mut tx = connect(replica.addr, gw.config.connect_timeout, false)
            .await
            .map_err(SendError::Connect)?;
        let resp = tx
            .send_request(req)
            .await
            .map_err(|e| SendError::Failed(e.into()))?;
        self.put(replica.addr, tx);
        Ok(resp)
    }
}

/// A new HTTP/1.1 connection to `addr`, driven by a task of its own (which,
/// with `upgrades`, hands the connection over after `101 Switching
/// Protocols`).
pub(crate) async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    upgrades: bool,
) -> Result<SendRequest<OutBody>, BoxError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out after {timeout:?}"))??;
    let _ = tcp.set_nodelay(true);
    let (tx, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(tcp))
        .await?;
    tokio::spawn(async move {
        let ended = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(e) = ended {
            tracing::trace!(error = %e, "upstream connection ended");
        }
    });
    Ok(tx)
}
