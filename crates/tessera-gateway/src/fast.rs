//! The HTTP/1.1 path of `Gateway::serve` for plain requests, without an
//! HTTP library in between.
//!
//! A client connection's request heads are parsed in place (httparse),
//! admitted as `handle` admits them (service, key, hold, counters), and
//! sent to the least-loaded replica on a plain TCP connection that the
//! client connection owns (reused while idle, as `server` does). The
//! upstream head is written from the client's with the same edits as the
//! general path (hop-by-hop headers dropped, `Host` and `X-Forwarded-*`
//! set) and the body copied through as it arrives (`Content-Length`, or
//! chunked with its framing passed on unchanged). The response head is
//! parsed the same way, its hop-by-hop headers dropped, and its body
//! copied back read by read, so server-sent events go out token by token.
//! The request timeout is checked with one timer per client connection
//! that moves only when it would fire late.
//!
//! What this saves per request, against hyper's server and client: the
//! header maps, the client's dispatch channel and the task that drives its
//! connection, the per-request timer, and most allocations.
//!
//! Anything else — HTTP/1.0, `Upgrade` (WebSocket), `Expect`, a target
//! that is not a plain origin-form path, a head hyper would reject or that
//! does not fit `MAX_HEAD` — hands the connection, with the bytes already
//! read, to hyper's server and the general path for the rest of its life.
//! One difference in kind: the request body is sent before the response is
//! read, so a replica that answers before reading a large body it does not
//! want gets it all the same (or the request times out).

use std::cell::RefCell;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use axum::http::StatusCode;
use axum::response::Response;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::error::error_response;
use crate::proxy::{upstream_error, InFlight};
use crate::server::Idle;
use crate::{Attempts, Gateway};

/// The largest request or response head read here; a larger request goes
/// to hyper (which has its own limit), a larger response is a 502.
const MAX_HEAD: usize = 64 * 1024;
/// Headers per head, as hyper's default.
const MAX_HEADERS: usize = 100;
/// Read buffers grow by this much.
const READ_CHUNK: usize = 16 * 1024;
/// A read asks for at least this much room.
const READ_MIN: usize = 4 * 1024;

/// A byte range of the client buffer.
type Span = (usize, usize);

fn at(buf: &[u8], (a, b): Span) -> &[u8] {
    &buf[a..b]
}

/// Serves `tcp` until the client closes, an error ends it or `stop` says
/// to (after the request in progress); returns the connection (with what
/// was read of its next request) when hyper must take it over.
pub(crate) async fn serve(
    gw: &Arc<Gateway>,
    tcp: TcpStream,
    peer: SocketAddr,
    stop: &mut tokio::sync::watch::Receiver<()>,
) -> Option<Rewind> {
    let mut c = Conn {
        gw,
        tcp,
        buf: BytesMut::with_capacity(READ_CHUNK),
        rbuf: BytesMut::new(),
        out: Vec::with_capacity(1024),
        idle: Idle::default(),
        client_ip: peer.ip().to_string(),
        timer: Box::pin(tokio::time::sleep(Duration::from_secs(86_400))),
    };
    let mut head = ReqHead::default();
    // Checks for a stop between requests without waiting on it.
    let probe = stop.clone();
    let hand_over = {
        let mut stopped = pin!(stop.changed());
        let mut stopping = false;
        loop {
            match c
                .read_head(&mut head, stopped.as_mut(), &mut stopping)
                .await
            {
                Next::Request => {}
                Next::Closed => break false,
                Next::Fallback => break !stopping,
            }
            stopping = stopping || probe.has_changed().unwrap_or(true);
            if !c.exchange(&head, stopping).await || stopping {
                break false;
            }
        }
    };
    hand_over.then(|| Rewind {
        pre: c.buf.freeze(),
        io: c.tcp,
    })
}

enum Next {
    Request,
    Closed,
    Fallback,
}

struct Conn<'g> {
    gw: &'g Arc<Gateway>,
    tcp: TcpStream,
    /// Read from the client, not yet handled.
    buf: BytesMut,
    /// Read from the replica, not yet handled.
    rbuf: BytesMut,
    /// The next head to write (and the body bytes that came with it).
    out: Vec<u8>,
    idle: Idle<TcpStream>,
    client_ip: String,
    /// Armed at or before the current request's deadline (see `until`).
    timer: Pin<Box<Sleep>>,
}

/// A request head, parsed in place: spans of the client buffer.
#[derive(Default)]
struct ReqHead {
    len: usize,
    method: Span,
    target: Span,
    headers: Vec<(Span, Span)>,
    /// Indexes into `headers` of the first `Host`, `Authorization` and
    /// `X-Forwarded-For`.
    host: Option<usize>,
    authorization: Option<usize>,
    forwarded_for: Option<usize>,
    /// `Connection` names headers other than its own tokens.
    names_headers: bool,
    /// The client asked to close after this request.
    close: bool,
    is_head: bool,
    body: Framing,
}

enum Parsed {
    Complete,
    Partial,
    Fallback,
}

/// Parses the head at the start of `buf` into `h`, if it is complete and
/// a request this path serves.
fn parse_request(buf: &[u8], h: &mut ReqHead) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::Fallback,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Fallback;
    };
    // Only a plain origin-form target (no fragment, nothing that the URI
    // parser of the general path could reject).
    if !target.starts_with('/') || !target.bytes().all(|b| b > 0x20 && b < 0x7f && b != b'#') {
        return Parsed::Fallback;
    }
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let a = s.as_ptr() as usize - base;
        (a, a + s.len())
    };
    h.len = len;
    h.method = span(method.as_bytes());
    h.target = span(target.as_bytes());
    h.headers.clear();
    h.host = None;
    h.authorization = None;
    h.forwarded_for = None;
    h.names_headers = false;
    h.close = false;
    h.is_head = method == "HEAD";
    let mut length = None;
    let mut chunked = false;
    for (i, hd) in req.headers.iter().enumerate() {
        let (name, value) = (hd.name.as_bytes(), hd.value);
        h.headers.push((span(name), span(value)));
        match classify(name) {
            Kind::Upgrade | Kind::Expect => return Parsed::Fallback,
            Kind::TransferEncoding => {
                if chunked || !trim(value).eq_ignore_ascii_case(b"chunked") {
                    return Parsed::Fallback;
                }
                chunked = true;
            }
            Kind::ContentLength => match (length, parse_length(value)) {
                (None, Some(n)) => length = Some(n),
                _ => return Parsed::Fallback,
            },
            Kind::Connection => {
                for t in value.split(|&b| b == b',').map(trim) {
                    if t.eq_ignore_ascii_case(b"close") {
                        h.close = true;
                    } else if !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive") {
                        h.names_headers = true;
                    }
                }
            }
            Kind::Host => {
                h.host.get_or_insert(i);
            }
            Kind::Authorization => {
                h.authorization.get_or_insert(i);
            }
            Kind::ForwardedFor => {
                h.forwarded_for.get_or_insert(i);
            }
            _ => {}
        }
    }
    h.body = match (chunked, length) {
        (true, None) => Framing::Chunked(Chunked::Size(0, false)),
        (true, Some(_)) => return Parsed::Fallback,
        (false, None | Some(0)) => Framing::Empty,
        (false, Some(n)) => Framing::Length(n),
    };
    Parsed::Complete
}

/// Why a request got no response from its replica.
enum Failed {
    /// The replica failed or closed (502).
    Upstream(String),
    /// The client's chunked body is malformed (400).
    BadBody,
    /// The client went away while sending its body.
    Client,
}

impl Conn<'_> {
    async fn read_head(
        &mut self,
        head: &mut ReqHead,
        mut stopped: Pin<&mut impl Future>,
        stopping: &mut bool,
    ) -> Next {
        loop {
            if !self.buf.is_empty() {
                match parse_request(&self.buf, head) {
                    Parsed::Complete => return Next::Request,
                    Parsed::Fallback => return Next::Fallback,
                    Parsed::Partial => {}
                }
            } else if *stopping {
                return Next::Closed;
            }
            reserve(&mut self.buf);
            tokio::select! {
                biased;
                read = self.tcp.read_buf(&mut self.buf) => match read {
                    Ok(0) | Err(_) => return Next::Closed,
                    Ok(_) => {}
                },
                _ = stopped.as_mut(), if !*stopping => *stopping = true,
            }
        }
    }

    /// Serves one request whose head `h` is at the start of the client
    /// buffer; whether the connection stays open.
    async fn exchange(&mut self, h: &ReqHead, stopping: bool) -> bool {
        let start = Instant::now();
        let gw = self.gw;
        let mut close = h.close || stopping;
        let admitted = {
            let buf = &self.buf[..];
            let host = h
                .host
                .and_then(|i| std::str::from_utf8(at(buf, h.headers[i].1)).ok());
            let target = at(buf, h.target);
            let path = target.split(|&b| b == b'?').next().unwrap_or(b"/");
            // The target is visible ASCII (`parse_request`).
            let path = std::str::from_utf8(path).unwrap_or("/");
            let auth = h.authorization.map(|i| at(buf, h.headers[i].1));
            gw.admit(host, path, auth, start).await
        };
        let (svc, route, strip) = match admitted {
            Ok(a) => a,
            Err(resp) => {
                self.buf.advance(h.len);
                // The body, if any, is not read: close after answering.
                let close = close || !h.body.done();
                return self.answer(resp, h.is_head, close).await;
            }
        };
        let mut guard = InFlight::new(svc, start);
        let deadline = tokio::time::Instant::from_std(start) + route.request_timeout;
        let mut attempts = Attempts::new(&route, gw.config.max_attempts);
        let mut picked = None;
        while let Some(i) = attempts.next_replica(&route, &guard.svc.rr) {
            let replica = &route.replicas[i];
            guard.set_replica(&replica.in_flight);
            if let Some(up) =
                self.idle
                    .take(&route, replica, gw.config.pool_idle_timeout, still_open)
            {
                picked = Some((i, up, true));
                break;
            }
            let connected = until(
                &mut self.timer,
                deadline,
                connect(replica.addr, gw.config.connect_timeout),
            )
            .await;
            match connected {
                Some(Ok(up)) => {
                    picked = Some((i, up, false));
                    break;
                }
                Some(Err(e)) => {
                    tracing::debug!(service = &*guard.svc.name, error = %e, "connect failed; trying another replica");
                }
                None => {
                    guard.svc.m.count(504);
                    let resp = timed_out(&guard.svc.name, route.request_timeout);
                    self.buf.advance(h.len);
                    return self.answer(resp, h.is_head, close || !h.body.done()).await;
                }
            }
        }
        let Some((i, mut up, reused)) = picked else {
            guard.svc.m.count(502);
            let resp = error_response(
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                &format!(
                    "no replica of service {:?} accepted a connection ({} tried)",
                    &*guard.svc.name, attempts.total
                ),
            );
            self.buf.advance(h.len);
            return self.answer(resp, h.is_head, close || !h.body.done()).await;
        };
        let replica = &route.replicas[i];

        self.out.clear();
        request_head(
            &mut self.out,
            &self.buf,
            h,
            strip,
            replica.host.as_bytes(),
            self.client_ip.as_bytes(),
            gw.config.forwarded_proto,
            route.require_key,
        );
        self.buf.advance(h.len);
        let mut body = h.body;
        let sent = {
            let Conn {
                tcp,
                buf,
                rbuf,
                out,
                timer,
                ..
            } = &mut *self;
            let exchange = async {
                let n = body.feed(buf).map_err(|()| Failed::BadBody)?;
                out.extend_from_slice(&buf[..n]);
                buf.advance(n);
                if let Err(e) = up.write_all(out).await {
                    if !reused {
                        return Err(Failed::Upstream(e.to_string()));
                    }
                    // The idle connection closed in between: a new one.
                    up = connect(replica.addr, gw.config.connect_timeout)
                        .await
                        .map_err(|e| Failed::Upstream(e.to_string()))?;
                    up.write_all(out)
                        .await
                        .map_err(|e| Failed::Upstream(e.to_string()))?;
                }
                while !body.done() {
                    reserve(buf);
                    match tcp.read_buf(buf).await {
                        Ok(0) | Err(_) => return Err(Failed::Client),
                        Ok(_) => {}
                    }
                    let n = body.feed(buf).map_err(|()| Failed::BadBody)?;
                    up.write_all(&buf[..n])
                        .await
                        .map_err(|e| Failed::Upstream(e.to_string()))?;
                    buf.advance(n);
                }
                read_response(&mut up, rbuf, out, h.is_head, close).await
            };
            until(timer, deadline, exchange).await
        };
        let resp = match sent {
            Some(Ok(resp)) => resp,
            Some(Err(Failed::Client)) => return false,
            Some(Err(Failed::BadBody)) => {
                guard.svc.m.count(400);
                let resp = error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    "the chunked request body is malformed",
                );
                return self.answer(resp, h.is_head, true).await;
            }
            Some(Err(Failed::Upstream(e))) => {
                tracing::debug!(service = &*guard.svc.name, error = %e, "upstream failed");
                guard.svc.m.count(502);
                self.rbuf.clear();
                let resp = upstream_error(&guard.svc);
                return self.answer(resp, h.is_head, close || !body.done()).await;
            }
            None => {
                guard.svc.m.count(504);
                self.rbuf.clear();
                let resp = timed_out(&guard.svc.name, route.request_timeout);
                return self.answer(resp, h.is_head, close || !body.done()).await;
            }
        };

        // The response: its head (built in `out`) with the body bytes read
        // along with it, then the rest of the body as it comes.
        guard.svc.m.count(resp.status);
        close |= resp.close_client;
        let mut framing = resp.body;
        let Ok(n) = framing.feed(&self.rbuf) else {
            return false;
        };
        self.out.extend_from_slice(&self.rbuf[..n]);
        self.rbuf.advance(n);
        if self.tcp.write_all(&self.out).await.is_err() {
            self.rbuf.clear();
            return false;
        }
        while !framing.done() {
            reserve(&mut self.rbuf);
            match up.read_buf(&mut self.rbuf).await {
                Ok(0) if framing == Framing::UntilClose => break,
                Ok(0) | Err(_) => {
                    // Cut short: so is the client's response.
                    self.rbuf.clear();
                    return false;
                }
                Ok(_) => {}
            }
            let Ok(n) = framing.feed(&self.rbuf) else {
                self.rbuf.clear();
                return false;
            };
            if self.tcp.write_all(&self.rbuf[..n]).await.is_err() {
                self.rbuf.clear();
                return false;
            }
            self.rbuf.advance(n);
        }
        drop(guard);
        if resp.reusable && self.rbuf.is_empty() {
            self.idle.put(replica.addr, up);
        }
        self.rbuf.clear();
        !close
    }

    /// Writes one of the gateway's own answers; whether the connection
    /// stays open.
    async fn answer(&mut self, resp: Response, is_head: bool, close: bool) -> bool {
        let (parts, body) = resp.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parts.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            push_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
        let _ = write!(out, "content-length: {}\r\n", body.len());
        push_date(out);
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !is_head {
            out.extend_from_slice(&body);
        }
        self.tcp.write_all(out).await.is_ok() && !close
    }
}

fn timed_out(service: &str, timeout: Duration) -> Response {
    error_response(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream_timeout",
        &format!("service {service:?} did not answer within {timeout:?}"),
    )
}

/// Runs `fut` until `deadline` (`None` past it). The timer is the client
/// connection's: it stays armed at or before the deadline and is moved
/// only when it would fire late or has fired, so most requests leave the
/// timer wheel alone (request timeouts are long and arrive in order).
async fn until<F: Future>(
    timer: &mut Pin<Box<Sleep>>,
    deadline: tokio::time::Instant,
    fut: F,
) -> Option<F::Output> {
    if timer.is_elapsed() || timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    let mut fut = pin!(fut);
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return Some(out),
            () = timer.as_mut() => {
                if tokio::time::Instant::now() >= deadline {
                    return None;
                }
                timer.as_mut().reset(deadline);
            }
        }
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out after {timeout:?}"),
            )
        })??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Whether an idle upstream connection can take a request: nothing has
/// arrived on it (an idle HTTP/1.1 connection that became readable was
/// closed, or sent what it should not have).
fn still_open(up: &mut TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match up.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => matches!(
            up.try_read(&mut [0u8; 1]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        ),
    }
}

/// Makes room for a read.
fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_MIN {
        // Half the chunk, so that a buffer emptied by its reader is reused
        // rather than grown.
        buf.reserve(READ_CHUNK / 2);
    }
}

/// The upstream request head: the client's, with the path less `strip`
/// bytes, hop-by-hop headers dropped, `Host` the replica's and the
/// forwarding headers set (as `prepare_request_headers` does).
#[allow(clippy::too_many_arguments)]
fn request_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    h: &ReqHead,
    strip: usize,
    host: &[u8],
    client_ip: &[u8],
    proto: &str,
    key_consumed: bool,
) {
    out.extend_from_slice(at(buf, h.method));
    out.push(b' ');
    let rest = &at(buf, h.target)[strip..];
    if !rest.starts_with(b"/") {
        out.push(b'/');
    }
    out.extend_from_slice(rest);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    push_header(out, b"host", host);
    for &(n, v) in &h.headers {
        let name = at(buf, n);
        let skip = match classify(name) {
            k if k.hop_by_hop() => true,
            Kind::Host | Kind::ForwardedFor | Kind::ForwardedProto => true,
            Kind::ForwardedHost => h.host.is_some(),
            Kind::Authorization => key_consumed,
            _ => {
                h.names_headers
                    && connection_names(
                        h.headers
                            .iter()
                            .filter(|(n, _)| classify(at(buf, *n)) == Kind::Connection)
                            .map(|(_, v)| at(buf, *v)),
                        name,
                    )
            }
        };
        if !skip {
            push_header(out, name, at(buf, v));
        }
    }
    if let Some(i) = h.host {
        push_header(out, b"x-forwarded-host", at(buf, h.headers[i].1));
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(i) = h.forwarded_for {
        out.extend_from_slice(at(buf, h.headers[i].1));
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client_ip);
    out.extend_from_slice(b"\r\n");
    push_header(out, b"x-forwarded-proto", proto.as_bytes());
    if matches!(h.body, Framing::Chunked(_)) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A replica's response head, as it goes to the client.
struct RespHead {
    status: u16,
    body: Framing,
    /// The upstream connection can take another request after this one.
    reusable: bool,
    /// The client connection closes after this response.
    close_client: bool,
}

/// Reads the response head from `up` (skipping interim 1xx responses) and
/// writes the client's into `out`; the head is consumed from `rbuf`.
async fn read_response(
    up: &mut TcpStream,
    rbuf: &mut BytesMut,
    out: &mut Vec<u8>,
    is_head: bool,
    close_client: bool,
) -> Result<RespHead, Failed> {
    loop {
        if !rbuf.is_empty() {
            match parse_response(rbuf, out, is_head, close_client)? {
                Some((n, resp)) => {
                    rbuf.advance(n);
                    return Ok(resp);
                }
                None if rbuf.len() >= MAX_HEAD => {
                    return Err(Failed::Upstream("response head too large".into()))
                }
                None => {}
            }
        }
        reserve(rbuf);
        match up.read_buf(rbuf).await {
            Ok(0) => {
                return Err(Failed::Upstream(
                    "connection closed before a response".into(),
                ))
            }
            Err(e) => return Err(Failed::Upstream(e.to_string())),
            Ok(_) => {}
        }
    }
}

/// Parses a complete final response head at the start of `rbuf` into the
/// client's head in `out`; its length and what it says. Interim (1xx)
/// responses are consumed and skipped.
fn parse_response(
    rbuf: &mut BytesMut,
    out: &mut Vec<u8>,
    is_head: bool,
    close_client: bool,
) -> Result<Option<(usize, RespHead)>, Failed> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(rbuf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Failed::Upstream(format!("bad response head: {e}"))),
        };
        let status = resp.code.unwrap_or(0);
        if status == 101 {
            return Err(Failed::Upstream("switching protocols unasked".into()));
        }
        if (100..200).contains(&status) {
            rbuf.advance(n);
            continue;
        }
        let mut length = None;
        let mut chunked = None;
        let mut close = resp.version != Some(1);
        let mut names_headers = false;
        let mut has_date = false;
        for hd in resp.headers.iter() {
            match classify(hd.name.as_bytes()) {
                Kind::ContentLength => match (length, parse_length(hd.value)) {
                    (None, Some(l)) => length = Some(l),
                    (Some(a), Some(b)) if a == b => {}
                    _ => return Err(Failed::Upstream("bad content-length".into())),
                },
                Kind::TransferEncoding => {
                    // The last coding decides: chunked, or until close.
                    let last = hd.value.split(|&b| b == b',').map(trim).next_back();
                    chunked = Some(last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")));
                }
                Kind::Connection => {
                    for t in hd.value.split(|&b| b == b',').map(trim) {
                        if t.eq_ignore_ascii_case(b"close") {
                            close = true;
                        } else if !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive") {
                            names_headers = true;
                        }
                    }
                }
                Kind::Date => has_date = true,
                _ => {}
            }
        }
        let body = if is_head || status == 204 || status == 304 {
            Framing::Empty
        } else {
            match (chunked, length) {
                (Some(true), _) => Framing::Chunked(Chunked::Size(0, false)),
                (Some(false), _) | (None, None) => Framing::UntilClose,
                (None, Some(0)) => Framing::Empty,
                (None, Some(l)) => Framing::Length(l),
            }
        };
        let until_close = body == Framing::UntilClose;
        let close_client = close_client || until_close;

        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        let _ = write!(out, "{status:03}");
        out.push(b' ');
        out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for hd in resp.headers.iter() {
            let name = hd.name.as_bytes();
            let skip = match classify(name) {
                k if k.hop_by_hop() => true,
                Kind::ContentLength => chunked.is_some(),
                _ => {
                    names_headers
                        && connection_names(
                            resp.headers
                                .iter()
                                .filter(|h| classify(h.name.as_bytes()) == Kind::Connection)
                                .map(|h| h.value),
                            name,
                        )
                }
            };
            if !skip {
                push_header(out, name, hd.value);
            }
        }
        if matches!(body, Framing::Chunked(_)) || (is_head && chunked == Some(true)) {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if !has_date {
            push_date(out);
        }
        if close_client {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        return Ok(Some((
            n,
            RespHead {
                status,
                body,
                reusable: !close && !until_close,
                close_client,
            },
        )));
    }
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends a `Date` header (formatted once a second per thread).
fn push_date(out: &mut Vec<u8>) {
    thread_local!(static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) });
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs || d.1.is_empty() {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        push_header(out, b"date", d.1.as_bytes());
    });
}

/// Whether one of the `Connection` values names the header `name`.
fn connection_names<'a>(mut values: impl Iterator<Item = &'a [u8]>, name: &[u8]) -> bool {
    values.any(|v| {
        v.split(|&b| b == b',')
            .any(|t| trim(t).eq_ignore_ascii_case(name))
    })
}

fn trim(s: &[u8]) -> &[u8] {
    s.trim_ascii()
}

/// A `Content-Length` value: digits only.
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The headers this path looks at, by name (case-insensitive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Connection,
    KeepAlive,
    ProxyConnection,
    ProxyAuthenticate,
    ProxyAuthorization,
    Te,
    Trailer,
    TransferEncoding,
    Upgrade,
    Expect,
    ContentLength,
    Host,
    Date,
    Authorization,
    ForwardedFor,
    ForwardedHost,
    ForwardedProto,
    Other,
}

impl Kind {
    /// Hop-by-hop headers (RFC 9110 §7.6.1) and `Expect`, never forwarded
    /// (the general path's `HOP_BY_HOP`).
    fn hop_by_hop(self) -> bool {
        matches!(
            self,
            Kind::Connection
                | Kind::KeepAlive
                | Kind::ProxyConnection
                | Kind::ProxyAuthenticate
                | Kind::ProxyAuthorization
                | Kind::Te
                | Kind::Trailer
                | Kind::TransferEncoding
                | Kind::Upgrade
                | Kind::Expect
        )
    }
}

fn classify(name: &[u8]) -> Kind {
    let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    match name.len() {
        2 if is("te") => Kind::Te,
        4 if is("host") => Kind::Host,
        4 if is("date") => Kind::Date,
        6 if is("expect") => Kind::Expect,
        7 if is("upgrade") => Kind::Upgrade,
        7 if is("trailer") => Kind::Trailer,
        10 if is("connection") => Kind::Connection,
        10 if is("keep-alive") => Kind::KeepAlive,
        13 if is("authorization") => Kind::Authorization,
        14 if is("content-length") => Kind::ContentLength,
        15 if is("x-forwarded-for") => Kind::ForwardedFor,
        16 if is("proxy-connection") => Kind::ProxyConnection,
        16 if is("x-forwarded-host") => Kind::ForwardedHost,
        17 if is("transfer-encoding") => Kind::TransferEncoding,
        17 if is("x-forwarded-proto") => Kind::ForwardedProto,
        18 if is("proxy-authenticate") => Kind::ProxyAuthenticate,
        19 if is("proxy-authorization") => Kind::ProxyAuthorization,
        _ => Kind::Other,
    }
}

/// How a message body ends, and how much of it is still to come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Framing {
    #[default]
    Empty,
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunked),
    /// Ends when the connection closes (responses only).
    UntilClose,
}

impl Framing {
    fn done(&self) -> bool {
        matches!(
            self,
            Framing::Empty | Framing::Length(0) | Framing::Chunked(Chunked::Done)
        )
    }

    /// How many of `data`'s leading bytes belong to the body (passed on as
    /// they are); the rest is what follows it.
    fn feed(&mut self, data: &[u8]) -> Result<usize, ()> {
        match self {
            Framing::Empty => Ok(0),
            Framing::Length(left) => {
                let n = (*left).min(data.len() as u64);
                *left -= n;
                Ok(n as usize)
            }
            Framing::Chunked(c) => c.feed(data),
            Framing::UntilClose => Ok(data.len()),
        }
    }
}

/// Where a chunked body stands (RFC 9112 §7.1), followed byte by byte only
/// to find where it ends: its bytes pass through unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunked {
    /// In a chunk size: its value so far, and whether it has a digit yet.
    Size(u64, bool),
    /// After a chunk size, until the end of its line (extensions, CR).
    SizeLine(u64),
    /// In a chunk's data: bytes left.
    Data(u64),
    /// After a chunk's data: its CR, then its LF.
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    LineStart,
    /// In a trailer line.
    Line,
    /// The final line's LF.
    LastLf,
    Done,
}

impl Chunked {
    fn after_size(size: u64) -> Chunked {
        if size == 0 {
            Chunked::LineStart
        } else {
            Chunked::Data(size)
        }
    }

    /// How many of `data`'s bytes belong to the body; stops at its end.
    fn feed(&mut self, data: &[u8]) -> Result<usize, ()> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            *self = match *self {
                Chunked::Size(n, digits) => match (b as char).to_digit(16) {
                    Some(d) if n >> 59 == 0 => Chunked::Size(n * 16 + u64::from(d), true),
                    Some(_) => return Err(()),
                    None if !digits => return Err(()),
                    None if b == b'\n' => Chunked::after_size(n),
                    None if matches!(b, b'\r' | b';' | b' ' | b'\t') => Chunked::SizeLine(n),
                    None => return Err(()),
                },
                Chunked::SizeLine(n) if b == b'\n' => Chunked::after_size(n),
                Chunked::SizeLine(n) => Chunked::SizeLine(n),
                Chunked::Data(left) => {
                    let n = left.min((data.len() - i) as u64);
                    i += n as usize;
                    *self = if n == left {
                        Chunked::DataCr
                    } else {
                        Chunked::Data(left - n)
                    };
                    continue;
                }
                Chunked::DataCr if b == b'\r' => Chunked::DataLf,
                Chunked::DataCr | Chunked::DataLf if b == b'\n' => Chunked::Size(0, false),
                Chunked::DataCr | Chunked::DataLf => return Err(()),
                Chunked::LineStart if b == b'\r' => Chunked::LastLf,
                Chunked::LineStart if b == b'\n' => Chunked::Done,
                Chunked::LineStart | Chunked::Line if b == b'\n' => Chunked::LineStart,
                Chunked::LineStart | Chunked::Line => Chunked::Line,
                Chunked::LastLf if b == b'\n' => Chunked::Done,
                Chunked::LastLf => return Err(()),
                Chunked::Done => return Ok(i),
            };
            i += 1;
            if *self == Chunked::Done {
                break;
            }
        }
        Ok(i)
    }
}

/// A client connection handed over to hyper: what was already read of it,
/// then the socket.
pub(crate) struct Rewind {
    pre: Bytes,
    io: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.pre.is_empty() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre[..n]);
            this.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked_end(parts: &[&[u8]]) -> Result<usize, ()> {
        let mut c = Chunked::Size(0, false);
        let mut total = 0;
        for p in parts {
            total += c.feed(p)?;
            if c == Chunked::Done {
                return Ok(total);
            }
        }
        Err(())
    }

    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_does_however_it_is_split() {
        let body: &[u8] =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\n";
        let next = b"GET / HTTP/1.1\r\n\r\n";
        let mut all = body.to_vec();
        all.extend_from_slice(next);
        assert_eq!(chunked_end(&[&all]), Ok(body.len()));
        for split in 1..all.len() {
            let (a, b) = all.split_at(split);
            assert_eq!(chunked_end(&[a, b]), Ok(body.len()), "split at {split}");
        }
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(chunked_end(&bytes), Ok(body.len()));
        assert_eq!(chunked_end(&[b"0\r\n\r\n"]), Ok(5));
        assert_eq!(chunked_end(&[b"0\n\n"]), Ok(3));
        assert!(chunked_end(&[b"zz\r\n"]).is_err());
        assert!(chunked_end(&[b"3\r\nabcX"]).is_err());
        assert!(chunked_end(&[b"fffffffffffffffff\r\n"]).is_err());
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(parse_length(b" 42 "), Some(42));
        assert_eq!(parse_length(b"+4"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"99999999999999999999"), None);
    }

    fn parse(req: &[u8]) -> (Parsed, ReqHead) {
        let mut h = ReqHead::default();
        (parse_request(req, &mut h), h)
    }

    #[test]
    fn unusual_requests_go_to_the_general_path() {
        for req in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"GET http://x/ HTTP/1.1\r\nhost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n",
            b"GET /\x80 HTTP/1.1\r\n\r\n",
            b"GARBAGE\r\n\r\n",
        ] {
            assert!(
                matches!(parse(req).0, Parsed::Fallback),
                "{}",
                String::from_utf8_lossy(req)
            );
        }
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nhost: x").0,
            Parsed::Partial
        ));
    }

    #[test]
    fn the_upstream_head_drops_hop_by_hop_headers_and_sets_forwarding_ones() {
        let req = b"POST /s/llm/v1/chat?x=1 HTTP/1.1\r\nHost: gw.example\r\n\
            Connection: keep-alive, x-private\r\nx-private: 1\r\nTE: trailers\r\n\
            Authorization: Bearer k\r\nX-Forwarded-For: 10.0.0.1\r\nx-forwarded-proto: ftp\r\n\
            x-keep: yes\r\ntransfer-encoding: chunked\r\n\r\n";
        let (parsed, h) = parse(req);
        assert!(matches!(parsed, Parsed::Complete));
        assert_eq!(h.len, req.len());
        let mut out = Vec::new();
        request_head(
            &mut out,
            req,
            &h,
            6,
            b"10.1.1.1:80",
            b"127.0.0.1",
            "http",
            true,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/chat?x=1 HTTP/1.1\r\nhost: 10.1.1.1:80\r\nx-keep: yes\r\n\
             x-forwarded-host: gw.example\r\nx-forwarded-for: 10.0.0.1, 127.0.0.1\r\n\
             x-forwarded-proto: http\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let req = b"GET /s/llm?stream=1 HTTP/1.1\r\nAuthorization: Bearer k\r\n\r\n";
        let (_, h) = parse(req);
        let mut out = Vec::new();
        request_head(&mut out, req, &h, 6, b"u:1", b"::1", "https", false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /?stream=1 HTTP/1.1\r\nhost: u:1\r\nAuthorization: Bearer k\r\n\
             x-forwarded-for: ::1\r\nx-forwarded-proto: https\r\n\r\n"
        );
    }

    #[test]
    fn the_client_head_drops_hop_by_hop_headers_and_frames_the_body() {
        let head = |raw: &[u8], is_head: bool, close: bool| {
            let mut rbuf = BytesMut::from(raw);
            let mut out = Vec::new();
            let Ok(Some((n, r))) = parse_response(&mut rbuf, &mut out, is_head, close) else {
                panic!("no head in {}", String::from_utf8_lossy(raw));
            };
            rbuf.advance(n);
            (String::from_utf8(out).unwrap(), r, rbuf)
        };
        let (out, r, rest) = head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ndate: d\r\nconnection: x-hop\r\nx-hop: 1\r\n\
              keep-alive: timeout=5\r\ncontent-length: 5\r\n\r\nhello",
            false,
            false,
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\ndate: d\r\ncontent-length: 5\r\n\r\n"
        );
        assert_eq!(
            (r.status, r.body, r.reusable),
            (200, Framing::Length(5), true)
        );
        assert_eq!(&rest[..], b"hello");

        let (out, r, _) = head(
            b"HTTP/1.1 200 OK\r\ndate: d\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n",
            false,
            true,
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\ndate: d\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        assert!(matches!(r.body, Framing::Chunked(_)) && r.reusable && r.close_client);

        let (out, r, _) = head(b"HTTP/1.0 200 OK\r\ndate: d\r\n\r\n", false, false);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\ndate: d\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(
            (r.body, r.reusable, r.close_client),
            (Framing::UntilClose, false, true)
        );

        let (_, r, _) = head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true, false);
        assert_eq!((r.body, r.reusable), (Framing::Empty, true));
        let (_, r, _) = head(
            b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n",
            false,
            false,
        );
        assert_eq!(
            (r.body, r.reusable, r.close_client),
            (Framing::Empty, false, false)
        );
    }
}
