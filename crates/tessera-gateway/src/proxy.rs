//! The request path: resolve the service (path or Host), check the key,
//! hold while no replica is ready, pick the least-loaded replica, forward
//! with streamed bodies, retry only when connecting failed, and count.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::uri::{PathAndQuery, Scheme, Uri};
use axum::http::{request, StatusCode, Version};
use axum::response::Response;
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use prometheus_client::metrics::gauge::Gauge;

use crate::error::error_response;
use crate::server::UpstreamConns;
use crate::{Attempts, Gateway, Route, Service};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers (RFC 9110 §7.6.1) and `Expect`, which this hop has
/// already answered. Never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
];

impl Gateway {
    /// The gateway's routes: `/s/{service}`, `/s/{service}/` and
    /// `/s/{service}/{*path}`; with `GatewayConfig::domain` set, also a
    /// fallback that routes `Host: <service>.<domain>` with any path. (A
    /// router that already has a fallback should instead divert such
    /// requests to `Gateway::proxy` itself.) Serve it with
    /// `into_make_service_with_connect_info::<SocketAddr>()` so that
    /// `X-Forwarded-For` can be set, and with TCP_NODELAY on accepted
    /// sockets. Requests through the router share one pool of upstream
    /// connections; `Gateway::serve` is the faster path (no router, and
    /// upstream connections owned by each client connection).
    pub fn router(self: Arc<Self>) -> Router {
        let router = Router::new()
            .route("/s/{service}", any(handle))
            .route("/s/{service}/", any(handle))
            .route("/s/{service}/{*path}", any(handle));
        let router = if self.config.domain.is_some() {
            router.fallback(handle)
        } else {
            router
        };
        router.with_state(self)
    }

    /// The service a request's `Host` names under `GatewayConfig::domain`.
    pub fn host_service<'a>(&self, headers: &'a HeaderMap, uri: &'a Uri) -> Option<&'a str> {
        self.host_service_of(request_host(headers, uri)?)
    }

    /// The service `host` (a `Host` value, port allowed) names under
    /// `GatewayConfig::domain`.
    pub(crate) fn host_service_of<'a>(&self, host: &'a str) -> Option<&'a str> {
        let domain = self.config.domain.as_deref()?;
        let host = match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        let cut = host.len().checked_sub(domain.len() + 1)?;
        if cut == 0
            || !host.is_char_boundary(cut)
            || host.as_bytes()[cut] != b'.'
            || !host[cut + 1..].eq_ignore_ascii_case(domain)
        {
            return None;
        }
        let name = &host[..cut];
        (!name.contains('.')).then_some(name)
    }

    /// The service name and how many leading bytes of the path to strip.
    /// Host names are case-insensitive, so a Host-routed name is lowercased.
    fn resolve<'a>(&self, host: Option<&'a str>, path: &'a str) -> Option<(Cow<'a, str>, usize)> {
        if let Some(name) = host.and_then(|h| self.host_service_of(h)) {
            let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(name.to_ascii_lowercase())
            } else {
                Cow::Borrowed(name)
            };
            return Some((name, 0));
        }
        let rest = path.strip_prefix("/s/")?;
        let name = rest.split('/').next().unwrap_or("");
        (!name.is_empty()).then_some((Cow::Borrowed(name), 3 + name.len()))
    }

    /// Resolves and admits a request: its service (counted as a request),
    /// the route to forward it on (held until the service has a ready
    /// replica, when it has none) and how many leading path bytes to strip;
    /// or the gateway's answer, already counted. `host` is the request's
    /// `Host` (or its URI's authority), `path` its URI's path.
    pub(crate) async fn admit(
        &self,
        host: Option<&str>,
        path: &str,
        authorization: Option<&[u8]>,
        start: Instant,
    ) -> Result<(Arc<Service>, Arc<Route>, usize), Response> {
        let Some((name, strip)) = self.resolve(host, path) else {
            return Err(error_response(
                StatusCode::NOT_FOUND,
                "unknown_service",
                "no service named: use /s/<service>/<path>",
            ));
        };
        let Some(svc) = self.service(&name) else {
            return Err(error_response(
                StatusCode::NOT_FOUND,
                "unknown_service",
                &format!("no service named {name:?}"),
            ));
        };
        svc.requests_total.fetch_add(1, Ordering::Relaxed);
        let since = start.saturating_duration_since(self.epoch).as_nanos() as u64;
        svc.last_request.store(since + 1, Ordering::Relaxed);

        let mut route = svc.route.read().unwrap_or_else(|e| e.into_inner()).clone();
        if !route.authorized(authorization) {
            svc.m.count(401);
            svc.m.observe(start);
            return Err(error_response(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this service needs a key: Authorization: Bearer <key>",
            ));
        }
        if route.replicas.is_empty() {
            match self.hold(&svc, &route, start).await {
                Ok(ready) => route = ready,
                Err(resp) => {
                    svc.m.count(resp.status().as_u16());
                    svc.m.observe(start);
                    return Err(resp);
                }
            }
        }
        Ok((svc, route, strip))
    }

    /// Handles one request as the gateway's routes do. For a server that
    /// routes Host-based requests itself.
    pub async fn proxy(self: &Arc<Self>, req: Request) -> Response {
        let client = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .and_then(|c| HeaderValue::try_from(c.0.ip().to_string()).ok());
        let (parts, body) = req.into_parts();
        let resp = self
            .handle(parts, InBody::Axum(body), client.as_ref(), Via::Pool)
            .await;
        resp.map(RespBody::into_axum)
    }

    /// The request path shared by `proxy` (pooled upstream connections)
    /// and `serve` (upstream connections owned by the client connection).
    /// `client` is the client's IP address as text.
    pub(crate) async fn handle(
        self: &Arc<Self>,
        parts: request::Parts,
        body: InBody,
        client: Option<&HeaderValue>,
        via: Via<'_>,
    ) -> hyper::Response<RespBody> {
        let start = Instant::now();
        let admitted = self
            .admit(
                request_host(&parts.headers, &parts.uri),
                parts.uri.path(),
                parts
                    .headers
                    .get(header::AUTHORIZATION)
                    .map(HeaderValue::as_bytes),
                start,
            )
            .await;
        let (svc, route, strip) = match admitted {
            Ok(admitted) => admitted,
            Err(resp) => return answer(resp),
        };
        if let Some(protocol) = upgrade_protocol(&parts.headers) {
            return self
                .forward_upgrade(svc, &route, strip, parts, protocol, client, start)
                .await;
        }
        self.forward(svc, &route, strip, parts, body, client, via, start)
            .await
    }

    /// The upstream path and the headers to send (hop-by-hop headers gone,
    /// forwarding headers set); `None` (counted as a 400) for a path that
    /// is not valid.
    fn outgoing(
        &self,
        guard: &InFlight,
        route: &Route,
        strip: usize,
        parts: &mut request::Parts,
        client: Option<&HeaderValue>,
    ) -> Option<(PathAndQuery, HeaderMap)> {
        let Some(path) = out_path(&parts.uri, strip) else {
            guard.svc.m.count(400);
            return None;
        };
        let mut headers = std::mem::take(&mut parts.headers);
        prepare_request_headers(
            &mut headers,
            client,
            self.config.forwarded_proto,
            route.require_key,
        );
        Some((path, headers))
    }

    /// Forwards a protocol upgrade (WebSocket): the request goes to a
    /// replica on a connection of its own; when the replica switches
    /// protocols, both connections are handed over and bytes are copied
    /// both ways until either side closes. The request counts as in flight
    /// (for balancing and the autoscaler) until then.
    #[allow(clippy::too_many_arguments)]
    async fn forward_upgrade(
        &self,
        svc: Arc<Service>,
        route: &Route,
        strip: usize,
        mut parts: request::Parts,
        protocol: HeaderValue,
        client: Option<&HeaderValue>,
        start: Instant,
    ) -> hyper::Response<RespBody> {
        let mut guard = InFlight::new(svc, start);
        let Some(client_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            guard.svc.m.count(400);
            return answer(error_response(
                StatusCode::BAD_REQUEST,
                "upgrade_unsupported",
                "this connection cannot be upgraded (HTTP/1.1 with `Connection: upgrade` is needed)",
            ));
        };
        let Some((path, mut headers)) = self.outgoing(&guard, route, strip, &mut parts, client)
        else {
            return answer(error_response(
                StatusCode::BAD_REQUEST,
                "bad_path",
                "the path is not valid",
            ));
        };
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
        let deadline = tokio::time::Instant::from_std(start) + route.request_timeout;
        let mut attempts = Attempts::new(route, self.config.max_attempts);
        while let Some(i) = attempts.next_replica(route, &guard.svc.rr) {
            let replica = &route.replicas[i];
            guard.set_replica(&replica.in_flight);
            let connected = tokio::time::timeout_at(
                deadline,
                crate::server::connect(replica.addr, self.config.connect_timeout, true),
            )
            .await;
            let mut tx = match connected {
                Ok(Ok(tx)) => tx,
                Ok(Err(e)) => {
                    tracing::debug!(service = &*guard.svc.name, error = %e, "connect failed; trying another replica");
                    continue;
                }
                Err(_) => break,
            };
            let mut h = headers.clone();
            h.insert(header::HOST, replica.host.clone());
            let mut out_req = hyper::Request::new(OutBody::Empty);
            *out_req.method_mut() = parts.method.clone();
            *out_req.uri_mut() = Uri::from(path.clone());
            *out_req.version_mut() = Version::HTTP_11;
            *out_req.headers_mut() = h;
            let mut resp = match tokio::time::timeout_at(deadline, tx.send_request(out_req)).await {
                Ok(Ok(resp)) => resp,
                Ok(Err(e)) => {
                    tracing::debug!(service = &*guard.svc.name, error = %e, "upstream failed");
                    guard.svc.m.count(502);
                    return answer(upstream_error(&guard.svc));
                }
                Err(_) => break,
            };
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                // The replica declined the upgrade: its answer goes back as is.
                return respond(resp, guard);
            }
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let (mut parts, _) = resp.into_parts();
            let upgrade = parts.headers.get(header::UPGRADE).cloned();
            remove_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(u) = upgrade {
                parts.headers.insert(header::UPGRADE, u);
            }
            guard.svc.m.count(101);
            tokio::spawn(async move {
                let (Ok(down), Ok(up)) = (client_upgrade.await, upstream_upgrade.await) else {
                    tracing::debug!(service = &*guard.svc.name, "an upgrade did not complete");
                    return;
                };
                relay(
                    hyper_util::rt::TokioIo::new(down),
                    hyper_util::rt::TokioIo::new(up),
                )
                .await;
                drop(guard);
            });
            return hyper::Response::from_parts(parts, RespBody::Axum(Body::empty()));
        }
        guard.svc.m.count(502);
        answer(error_response(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            &format!(
                "no replica of service {:?} accepted the upgrade in time",
                &*guard.svc.name
            ),
        ))
    }

    /// Waits, bounded by `max_held` and `hold_timeout`, for a route update
    /// that brings a ready replica; asks the control plane for one first.
    async fn hold(
        &self,
        svc: &Arc<Service>,
        route: &Route,
        arrived: Instant,
    ) -> Result<Arc<Route>, Response> {
        let before = svc.m.held.inc();
        let _held = Held(&svc.m.held);
        if before.max(0) as usize >= route.max_held {
            return Err(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "hold_queue_full",
                &format!(
                    "service {:?} has no ready replica and {} requests already wait for one; retry later",
                    &*svc.name, route.max_held
                ),
            ));
        }
        if let Some(hook) = self.demand_hook() {
            hook(&svc.name);
        }
        let deadline = tokio::time::Instant::from_std(arrived + route.hold_timeout);
        loop {
            let notified = svc.ready.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if svc.removed.load(Ordering::Acquire) {
                return Err(error_response(
                    StatusCode::NOT_FOUND,
                    "unknown_service",
                    &format!("service {:?} was removed", &*svc.name),
                ));
            }
            let current = svc.route.read().unwrap_or_else(|e| e.into_inner()).clone();
            if !current.replicas.is_empty() {
                return Ok(current);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no_ready_replica",
                    &format!(
                        "service {:?} has no ready replica: none became ready within {:?} (it may still be starting; retry later)",
                        &*svc.name, route.hold_timeout
                    ),
                ));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        svc: Arc<Service>,
        route: &Route,
        strip: usize,
        mut parts: request::Parts,
        body: InBody,
        client: Option<&HeaderValue>,
        via: Via<'_>,
        start: Instant,
    ) -> hyper::Response<RespBody> {
        let mut guard = InFlight::new(svc, start);
        let Some((path, mut headers)) = self.outgoing(&guard, route, strip, &mut parts, client)
        else {
            return answer(error_response(
                StatusCode::BAD_REQUEST,
                "bad_path",
                "the path is not valid",
            ));
        };

        let mut attempts = Attempts::new(route, self.config.max_attempts);
        // A body can be sent again only if it was never read: with more than
        // one attempt, the client gets a handle that takes it on first poll.
        let hint = body.size_hint();
        let (mut direct, slot) = if body.is_end_stream() {
            (None, None)
        } else if attempts.total > 1 {
            (None, Some(Arc::new(Mutex::new(Some(body)))))
        } else {
            (Some(body), None)
        };
        let deadline = tokio::time::Instant::from_std(start) + route.request_timeout;
        let mut connect_failed = false;
        while let Some(i) = attempts.next_replica(route, &guard.svc.rr) {
            let replica = &route.replicas[i];
            guard.set_replica(&replica.in_flight);
            let svc = &*guard.svc;
            let last = attempts.last();
            let mut h = if last {
                std::mem::take(&mut headers)
            } else {
                headers.clone()
            };
            h.insert(header::HOST, replica.host.clone());
            let uri = match via {
                // The pooled client needs the absolute form to find a
                // connection; a connection of our own takes the origin form.
                Via::Pool => {
                    let mut uri = axum::http::uri::Parts::default();
                    uri.scheme = Some(Scheme::HTTP);
                    uri.authority = Some(replica.authority.clone());
                    uri.path_and_query = Some(path.clone());
                    Uri::from_parts(uri).expect("scheme, authority and path make a URI")
                }
                Via::Conn(_) => Uri::from(path.clone()),
            };
            let out = match (direct.take(), &slot) {
                (Some(b), _) => OutBody::Body(b),
                (None, Some(s)) => OutBody::Shared {
                    slot: s.clone(),
                    body: None,
                    hint,
                },
                (None, None) => OutBody::Empty,
            };
            let mut out_req = hyper::Request::new(out);
            *out_req.method_mut() = parts.method.clone();
            *out_req.uri_mut() = uri;
            *out_req.version_mut() = Version::HTTP_11;
            *out_req.headers_mut() = h;

            let sent = match via {
                Via::Pool => {
                    let sent = self.client.request(out_req);
                    match tokio::time::timeout_at(deadline, sent).await {
                        Ok(Ok(resp)) => Ok(Ok(resp)),
                        Ok(Err(e)) if e.is_connect() => Ok(Err(SendError::Connect(e.into()))),
                        Ok(Err(e)) => Ok(Err(SendError::Failed(e.into()))),
                        Err(elapsed) => Err(elapsed),
                    }
                }
                Via::Conn(conn) => {
                    let sent = conn.send(self, route, replica, out_req);
                    tokio::time::timeout_at(deadline, sent).await
                }
            };
            match sent {
                Ok(Ok(resp)) => return respond(resp, guard),
                Err(_) => {
                    svc.m.count(504);
                    return answer(error_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        &format!(
                            "service {:?} did not answer within {:?}",
                            &*svc.name, route.request_timeout
                        ),
                    ));
                }
                Ok(Err(SendError::Connect(e))) => {
                    let unsent = slot
                        .as_ref()
                        .is_none_or(|s| s.lock().unwrap_or_else(|e| e.into_inner()).is_some());
                    if unsent {
                        connect_failed = true;
                        tracing::debug!(service = &*svc.name, error = %e, "connect failed; trying another replica");
                        continue;
                    }
                    tracing::debug!(service = &*svc.name, error = %e, "upstream failed");
                    svc.m.count(502);
                    return answer(upstream_error(svc));
                }
                Ok(Err(SendError::Failed(e))) => {
                    tracing::debug!(service = &*svc.name, error = %e, "upstream failed");
                    svc.m.count(502);
                    return answer(upstream_error(svc));
                }
            }
        }
        debug_assert!(connect_failed);
        guard.svc.m.count(502);
        answer(error_response(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            &format!(
                "no replica of service {:?} accepted a connection ({} tried)",
                &*guard.svc.name, attempts.total
            ),
        ))
    }
}

/// The request's `Host`, or its URI's host when it has none.
fn request_host<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> Option<&'a str> {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.host())
}

pub(crate) fn upstream_error(svc: &Service) -> Response {
    error_response(
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        &format!(
            "a replica of service {:?} failed while answering",
            &*svc.name
        ),
    )
}

/// How a request reaches its replica.
#[derive(Clone, Copy)]
pub(crate) enum Via<'a> {
    /// Through the gateway's pooled client (requests from `router()`).
    Pool,
    /// Through the client connection's own upstream connections (`serve`).
    Conn(&'a UpstreamConns),
}

/// Why a request got no response from a replica.
pub(crate) enum SendError {
    /// No connection could be made: the request was not sent.
    Connect(BoxError),
    /// The request may have been sent.
    Failed(BoxError),
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn handle(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    gw.proxy(req).await
}

fn answer(resp: Response) -> hyper::Response<RespBody> {
    resp.map(RespBody::Axum)
}

/// The upstream path and query: the request's, less `strip` leading bytes
/// (`/s/<service>`), and never empty.
fn out_path(uri: &Uri, strip: usize) -> Option<PathAndQuery> {
    let Some(pq) = uri.path_and_query() else {
        return Some(PathAndQuery::from_static("/"));
    };
    if strip == 0 {
        return Some(pq.clone());
    }
    let rest = pq.as_str().get(strip..)?;
    if rest.starts_with('/') {
        PathAndQuery::try_from(rest).ok()
    } else {
        let mut s = String::with_capacity(rest.len() + 1);
        s.push('/');
        s.push_str(rest);
        PathAndQuery::try_from(s).ok()
    }
}

/// How long the other direction of an upgraded connection may go on once
/// one side has closed its own.
const HALF_CLOSED_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Copies bytes both ways between an upgraded client connection and its
/// replica's until both directions end, or one has ended and the other has
/// not within [`HALF_CLOSED_GRACE`] (a peer that never closes its side must
/// not hold the request open forever).
async fn relay<A, B>(down: A, up: B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let (mut down_r, mut down_w) = tokio::io::split(down);
    let (mut up_r, mut up_w) = tokio::io::split(up);
    let to_up = async {
        let _ = tokio::io::copy(&mut down_r, &mut up_w).await;
        let _ = up_w.shutdown().await;
    };
    let to_down = async {
        let _ = tokio::io::copy(&mut up_r, &mut down_w).await;
        let _ = down_w.shutdown().await;
    };
    let (mut to_up, mut to_down) = (std::pin::pin!(to_up), std::pin::pin!(to_down));
    tokio::select! {
        () = &mut to_up => {
            let _ = tokio::time::timeout(HALF_CLOSED_GRACE, to_down).await;
        }
        () = &mut to_down => {
            let _ = tokio::time::timeout(HALF_CLOSED_GRACE, to_up).await;
        }
    }
}

/// The protocol a request asks to switch to (`Upgrade`, with `upgrade`
/// among its `Connection` tokens), e.g. `websocket`.
fn upgrade_protocol(h: &HeaderMap) -> Option<HeaderValue> {
    let up = h.get(header::UPGRADE)?;
    let asks = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| up.clone())
}

fn remove_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            h.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        h.remove(name);
    }
}

fn prepare_request_headers(
    h: &mut HeaderMap,
    client: Option<&HeaderValue>,
    proto: &'static str,
    key_consumed: bool,
) {
    remove_hop_by_hop(h);
    if key_consumed {
        // The service key is the gateway's, not the replica's.
        h.remove(header::AUTHORIZATION);
    }
    if let Some(host) = h.remove(header::HOST) {
        h.insert(X_FORWARDED_HOST, host);
    }
    if let Some(ip) = client {
        let value = match h.get(X_FORWARDED_FOR) {
            Some(prev) => {
                let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
                v.extend_from_slice(prev.as_bytes());
                v.extend_from_slice(b", ");
                v.extend_from_slice(ip.as_bytes());
                HeaderValue::from_bytes(&v).ok()
            }
            None => Some(ip.clone()),
        };
        if let Some(v) = value {
            h.insert(X_FORWARDED_FOR, v);
        }
    }
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
}

fn respond(resp: hyper::Response<Incoming>, guard: InFlight) -> hyper::Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    guard.svc.m.count(parts.status.as_u16());
    let body = if body.is_end_stream() {
        drop(guard);
        RespBody::Axum(Body::empty())
    } else {
        RespBody::Other(GuardedBody {
            inner: body,
            guard: Some(guard),
        })
    };
    hyper::Response::from_parts(parts, body)
}

/// Counts one forwarded request (service and replica) from forwarding to
/// the end of its response body, and records its duration when it ends.
pub(crate) struct InFlight {
    pub(crate) svc: Arc<Service>,
    replica: Option<Arc<AtomicU32>>,
    start: Instant,
}

impl InFlight {
    pub(crate) fn new(svc: Arc<Service>, start: Instant) -> InFlight {
        svc.m.in_flight.inc();
        InFlight {
            svc,
            replica: None,
            start,
        }
    }

    pub(crate) fn set_replica(&mut self, count: &Arc<AtomicU32>) {
        if let Some(old) = self.replica.take() {
            old.fetch_sub(1, Ordering::Relaxed);
        }
        count.fetch_add(1, Ordering::Relaxed);
        self.replica = Some(count.clone());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(r) = self.replica.take() {
            r.fetch_sub(1, Ordering::Relaxed);
        }
        self.svc.m.in_flight.dec();
        self.svc.m.observe(self.start);
    }
}

struct Held<'a>(&'a Gauge);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The upstream's response body, passed through frame by frame (each is
/// written and flushed as it comes), holding the in-flight count until the
/// last frame.
pub(crate) struct GuardedBody {
    inner: Incoming,
    guard: Option<InFlight>,
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_))))
            || (polled.is_ready() && this.inner.is_end_stream())
        {
            this.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that is either axum's (the gateway's own answers, requests that
/// came through `router()`) or hyper's (a replica's response, a request that
/// came through `serve`).
pub(crate) enum AxumOr<B> {
    Axum(Body),
    Other(B),
}

/// A response as the gateway answers it: its own (errors) or a replica's.
pub(crate) type RespBody = AxumOr<GuardedBody>;

/// A client's request body, as `router()` or `serve` received it.
pub(crate) type InBody = AxumOr<Incoming>;

impl RespBody {
    fn into_axum(self) -> Body {
        match self {
            AxumOr::Axum(b) => b,
            AxumOr::Other(b) => Body::new(b),
        }
    }
}

impl<B> HttpBody for AxumOr<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        match self.get_mut() {
            AxumOr::Axum(b) => Pin::new(b).poll_frame(cx),
            AxumOr::Other(b) => Pin::new(b).poll_frame(cx).map_err(axum::Error::new),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AxumOr::Axum(b) => b.is_end_stream(),
            AxumOr::Other(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AxumOr::Axum(b) => b.size_hint(),
            AxumOr::Other(b) => b.size_hint(),
        }
    }
}

/// The request body as the upstream client sees it.
pub(crate) enum OutBody {
    Empty,
    Body(InBody),
    /// Taken out of `slot` on first poll, so that a request whose connection
    /// never opened can be sent again with its body intact.
    Shared {
        slot: Arc<Mutex<Option<InBody>>>,
        body: Option<InBody>,
        hint: SizeHint,
    },
}

impl HttpBody for OutBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        match self.get_mut() {
            OutBody::Empty => Poll::Ready(None),
            OutBody::Body(b) => Pin::new(b).poll_frame(cx),
            OutBody::Shared { slot, body, .. } => {
                if body.is_none() {
                    *body = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                }
                match body {
                    Some(b) => Pin::new(b).poll_frame(cx),
                    None => Poll::Ready(Some(Err(axum::Error::new(
                        "the request body was already sent",
                    )))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Empty => true,
            OutBody::Body(b) => b.is_end_stream(),
            OutBody::Shared { body, .. } => body.as_ref().is_some_and(|b| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Empty => SizeHint::with_exact(0),
            OutBody::Body(b) => b.size_hint(),
            OutBody::Shared { body, hint, .. } => body.as_ref().map_or(*hint, |b| b.size_hint()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_lose_the_service_prefix_and_keep_the_query() {
        let p = |u: &str, strip| {
            out_path(&u.parse::<Uri>().unwrap(), strip)
                .unwrap()
                .to_string()
        };
        assert_eq!(p("/s/llm/v1/chat?x=1&y=2", 6), "/v1/chat?x=1&y=2");
        assert_eq!(p("/s/llm", 6), "/");
        assert_eq!(p("/s/llm/", 6), "/");
        assert_eq!(p("/s/llm?stream=1", 6), "/?stream=1");
        assert_eq!(p("/v1/x?q", 0), "/v1/x?q");
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_forwarding_headers_set() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::HOST, HeaderValue::from_static("gw.example"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        prepare_request_headers(
            &mut h,
            Some(&HeaderValue::from_static("127.0.0.1")),
            "http",
            true,
        );
        assert!(h.get("x-private").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert!(h.get(header::HOST).is_none());
        assert_eq!(h["x-forwarded-host"], "gw.example");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-keep"], "yes");
    }
}
