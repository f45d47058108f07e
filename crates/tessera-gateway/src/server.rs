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

    /// Serves as `serve` does on several threads, one per listener, each a
    /// current-thread runtime of its own: a client connection, its upstream
    /// connections and its requests stay on one thread, and no task moves
    /// between threads (as nginx's worker processes). The listeners should
    /// share one address with SO_REUSEPORT, so that the kernel spreads new
    /// connections over them (`reuseport_listeners`). Returns once
    /// `shutdown` has completed and every thread has let its requests in
    /// flight finish.
    pub async fn serve_threads(
        self: Arc<Self>,
        listeners: Vec<std::net::TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
        let mut done = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let gw = self.clone();
            let mut stop = stop_rx.clone();
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name(format!("gateway-{i}"))
                .spawn(move || {
                    let served = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .and_then(|rt| {
                            rt.block_on(async move {
                                listener.set_nonblocking(true)?;
                                let listener = TcpListener::from_std(listener)?;
                                gw.serve(listener, async move {
                                    let _ = stop.changed().await;
                                })
                                .await
                            })
                        });
                    let _ = done_tx.send(served);
                })?;
            done.push(done_rx);
        }
        drop(stop_rx);
        shutdown.await;
        let _ = stop_tx.send(());
        let mut result = Ok(());
        for d in done {
            if let Ok(Err(e)) = d.await {
                result = Err(e);
            }
        }
        result
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

/// `n` listening sockets on `addr`, all with SO_REUSEPORT, for
/// `serve_threads` (with port 0, all get the port the first one got). Call
/// it within a tokio runtime.
pub fn reuseport_listeners(
    addr: SocketAddr,
    n: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut addr = addr;
    (0..n.max(1))
        .map(|_| {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            let listener = socket.listen(1024)?.into_std()?;
            addr = listener.local_addr()?;
            Ok(listener)
        })
        .collect()
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
