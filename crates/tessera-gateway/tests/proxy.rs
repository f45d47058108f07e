//! The gateway on real loopback sockets in front of real upstream servers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Router;
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::registry::Registry;
use tessera_gateway::{hash_key, Gateway, GatewayConfig, ServiceRoute, Upstream};

async fn serve_upstream(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// An upstream that answers with what it received, as JSON.
async fn echo_upstream(name: &'static str) -> SocketAddr {
    serve_upstream(Router::new().fallback(any(move |req: Request| async move {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let header = |h: &str| {
            parts
                .headers
                .get(h)
                .map(|v| v.to_str().unwrap().to_string())
        };
        axum::Json(serde_json::json!({
            "replica": name,
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "host": header("host"),
            "authorization": header("authorization"),
            "x_forwarded_for": header("x-forwarded-for"),
            "x_forwarded_proto": header("x-forwarded-proto"),
            "x_forwarded_host": header("x-forwarded-host"),
            "body": String::from_utf8_lossy(&body),
        }))
    })))
    .await
}

async fn start_gateway(config: GatewayConfig) -> (Arc<Gateway>, SocketAddr) {
    let gw = Gateway::new(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gw.clone().serve(listener, std::future::pending()));
    (gw, addr)
}

fn replica(id: &str, addr: SocketAddr) -> Upstream {
    Upstream {
        id: id.to_string(),
        addr,
    }
}

/// A port with nothing listening on it.
async fn dead_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(
    method: Method,
    url: String,
    headers: &[(&str, &str)],
    body: Body,
) -> (StatusCode, HeaderMap, serde_json::Value) {
    let mut req = axum::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client().request(req.body(body).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (parts.status, parts.headers, json)
}

async fn get(url: String) -> (StatusCode, serde_json::Value) {
    let (status, _, json) = send(Method::GET, url, &[], Body::empty()).await;
    (status, json)
}

#[tokio::test]
async fn routes_by_path_and_strips_the_service_prefix() {
    let up = echo_upstream("a").await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    gw.set_service("echo", ServiceRoute::new(vec![replica("a", up)]));

    let (status, headers, json) = send(
        Method::POST,
        format!("http://{addr}/s/echo/v1/chat/completions?stream=true&n=2"),
        &[("x-custom", "kept")],
        Body::from("hello"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(json["method"], "POST");
    assert_eq!(json["uri"], "/v1/chat/completions?stream=true&n=2");
    assert_eq!(json["body"], "hello");
    assert_eq!(json["host"], up.to_string());
    assert_eq!(json["x_forwarded_for"], "127.0.0.1");
    assert_eq!(json["x_forwarded_proto"], "http");
    assert_eq!(json["x_forwarded_host"], addr.to_string());

    for (path, want) in [
        ("/s/echo", "/"),
        ("/s/echo/", "/"),
        ("/s/echo?x=1", "/?x=1"),
    ] {
        let (status, json) = get(format!("http://{addr}{path}")).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(json["uri"], want, "{path}");
    }

    let (status, json) = get(format!("http://{addr}/s/nope/x")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json["error"]["code"], "unknown_service");
    assert!(json["error"]["message"].as_str().unwrap().contains("nope"));

    gw.remove_service("echo");
    let (status, _) = get(format!("http://{addr}/s/echo/x")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(gw.stats("echo").is_none());
}

#[tokio::test]
async fn routes_by_host_under_the_domain() {
    let up = echo_upstream("a").await;
    let (gw, addr) = start_gateway(GatewayConfig {
        domain: Some("svc.example".into()),
        ..GatewayConfig::default()
    })
    .await;
    gw.set_service("llm", ServiceRoute::new(vec![replica("a", up)]));

    let host = format!("llm.svc.example:{}", addr.port());
    let (status, _, json) = send(
        Method::GET,
        format!("http://{addr}/v1/models?x=1"),
        &[("host", &host)],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["uri"], "/v1/models?x=1");
    assert_eq!(json["x_forwarded_host"], host.as_str());

    // A path that looks like a gateway path is left alone under Host routing.
    let (_, _, json) = send(
        Method::GET,
        format!("http://{addr}/s/llm/x"),
        &[("host", "LLM.SVC.EXAMPLE")],
        Body::empty(),
    )
    .await;
    assert_eq!(json["uri"], "/s/llm/x");

    let (status, _, json) = send(
        Method::GET,
        format!("http://{addr}/v1/models"),
        &[("host", "other.svc.example")],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json["error"]["code"], "unknown_service");

    // Other hosts still route by path.
    let (status, json) = get(format!("http://{addr}/s/llm/p")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["uri"], "/p");
}

#[tokio::test]
async fn a_slow_replica_gets_fewer_requests() {
    let slow_hits = Arc::new(AtomicUsize::new(0));
    let fast_hits = Arc::new(AtomicUsize::new(0));
    let s = slow_hits.clone();
    let slow = serve_upstream(Router::new().fallback(any(move || {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            "slow"
        }
    })))
    .await;
    let f = fast_hits.clone();
    let fast = serve_upstream(Router::new().fallback(any(move || {
        let f = f.clone();
        async move {
            f.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(2)).await;
            "fast"
        }
    })))
    .await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    gw.set_service(
        "m",
        ServiceRoute::new(vec![replica("slow", slow), replica("fast", fast)]),
    );

    let workers: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                for _ in 0..15 {
                    let resp = client()
                        .get(format!("http://{addr}/s/m/").parse().unwrap())
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), StatusCode::OK);
                    resp.into_body().collect().await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let (slow_n, fast_n) = (
        slow_hits.load(Ordering::Relaxed),
        fast_hits.load(Ordering::Relaxed),
    );
    assert_eq!(slow_n + fast_n, 120);
    assert!(slow_n * 4 < fast_n, "slow {slow_n}, fast {fast_n}");
    let stats = gw.stats("m").unwrap();
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.requests_total, 120);
}

#[tokio::test]
async fn server_sent_events_stream_token_by_token() {
    let finished = Arc::new(AtomicBool::new(false));
    let done = finished.clone();
    let up = serve_upstream(Router::new().fallback(any(move || {
        let done = done.clone();
        async move {
            let tokens = futures::stream::unfold(0u32, move |i| {
                let done = done.clone();
                async move {
                    if i == 4 {
                        done.store(true, Ordering::SeqCst);
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Some((
                        Ok::<_, Infallible>(Bytes::from(format!("data: tok{i}\n\n"))),
                        i + 1,
                    ))
                }
            });
            (
                [("content-type", "text/event-stream")],
                Body::from_stream(tokens),
            )
                .into_response()
        }
    })))
    .await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    gw.set_service("llm", ServiceRoute::new(vec![replica("a", up)]));

    let start = Instant::now();
    let resp = client()
        .get(format!("http://{addr}/s/llm/v1/stream").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first_at = start.elapsed();
    assert_eq!(&first[..], b"data: tok0\n\n");
    assert!(
        !finished.load(Ordering::SeqCst),
        "the first token came only after the upstream finished"
    );
    // tok1 comes 250 ms after tok0: tok0 must not wait for it.
    assert!(
        first_at < Duration::from_millis(240),
        "first token after {first_at:?}"
    );
    assert_eq!(
        gw.stats("llm").unwrap().in_flight,
        1,
        "a streaming response is in flight"
    );

    let mut got = vec![String::from_utf8(first.to_vec()).unwrap()];
    let mut arrivals = vec![first_at];
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            got.push(String::from_utf8(data.to_vec()).unwrap());
            arrivals.push(start.elapsed());
        }
    }
    assert_eq!(
        got.concat(),
        "data: tok0\n\ndata: tok1\n\ndata: tok2\n\ndata: tok3\n\n"
    );
    assert!(arrivals.len() >= 4, "tokens were merged: {got:?}");
    // Each token arrives on its own, about 250 ms after the one before.
    assert!(arrivals[1] >= Duration::from_millis(200), "{arrivals:?}");
    assert!(arrivals[3] >= Duration::from_millis(700), "{arrivals:?}");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(gw.stats("llm").unwrap().in_flight, 0);
}

#[tokio::test]
async fn a_large_upload_streams_through_without_buffering() {
    let first_seen = Arc::new(tokio::sync::Notify::new());
    let seen = first_seen.clone();
    let up = serve_upstream(Router::new().fallback(any(move |req: Request| {
        let seen = seen.clone();
        async move {
            let mut stream = req.into_body().into_data_stream();
            let first = stream.next().await.unwrap().unwrap();
            seen.notify_one();
            let mut total = first.len();
            while let Some(chunk) = stream.next().await {
                total += chunk.unwrap().len();
            }
            total.to_string()
        }
    })))
    .await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    // Two replicas: the body goes through the path that can retry a connect.
    gw.set_service(
        "up",
        ServiceRoute::new(vec![replica("a", up), replica("b", up)]),
    );

    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, Infallible>>(1);
    let req = axum::http::Request::post(format!("http://{addr}/s/up/upload"))
        .body(Body::from_stream(rx))
        .unwrap();
    let pending = tokio::spawn(client().request(req));
    tx.send(Ok(Bytes::from(vec![b'x'; 64 * 1024])))
        .await
        .unwrap();
    // The upstream reads the first chunk while the client has not finished
    // (has not even sent the rest): the gateway does not buffer the body.
    tokio::time::timeout(Duration::from_secs(5), first_seen.notified())
        .await
        .expect("the upstream never saw the first chunk before the upload finished");
    for _ in 0..63 {
        tx.send(Ok(Bytes::from(vec![b'y'; 64 * 1024])))
            .await
            .unwrap();
    }
    drop(tx);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], (64 * 64 * 1024).to_string().as_bytes());
}

#[tokio::test]
async fn keys_are_checked_by_hash() {
    let up = echo_upstream("a").await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    let mut route = ServiceRoute::new(vec![replica("a", up)]);
    route.key_hashes = vec![hash_key("k-one"), hash_key("k-two")];
    gw.set_service("secure", route);
    let url = format!("http://{addr}/s/secure/x");

    let (status, _, json) = send(Method::GET, url.clone(), &[], Body::empty()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json["error"]["code"], "unauthorized");
    let (status, _, _) = send(
        Method::GET,
        url.clone(),
        &[("authorization", "Bearer wrong")],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, json) = send(
        Method::GET,
        url.clone(),
        &[("authorization", "Bearer k-two")],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json["authorization"],
        serde_json::Value::Null,
        "the key is not passed on"
    );

    // An open service passes Authorization through untouched.
    gw.set_service("open", ServiceRoute::new(vec![replica("a", up)]));
    let (_, _, json) = send(
        Method::GET,
        format!("http://{addr}/s/open/x"),
        &[("authorization", "Bearer upstream-token")],
        Body::empty(),
    )
    .await;
    assert_eq!(json["authorization"], "Bearer upstream-token");
}

#[tokio::test]
async fn a_slow_upstream_times_out_with_504() {
    let up = serve_upstream(Router::new().fallback(any(|| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        "late"
    })))
    .await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    let mut route = ServiceRoute::new(vec![replica("a", up)]);
    route.request_timeout = Duration::from_millis(200);
    gw.set_service("slow", route);

    let start = Instant::now();
    let (status, json) = get(format!("http://{addr}/s/slow/")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(json["error"]["code"], "upstream_timeout");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(gw.stats("slow").unwrap().in_flight, 0);
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_another_replica() {
    let up = echo_upstream("live").await;
    let dead = dead_addr().await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    gw.set_service(
        "m",
        ServiceRoute::new(vec![replica("dead", dead), replica("live", up)]),
    );
    for i in 0..10 {
        let (status, _, json) = send(
            Method::POST,
            format!("http://{addr}/s/m/p"),
            &[],
            Body::from(format!("body {i}")),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json["replica"], "live");
        assert_eq!(
            json["body"],
            format!("body {i}"),
            "the body survives the retry"
        );
    }

    gw.set_service(
        "gone",
        ServiceRoute::new(vec![replica("d1", dead), replica("d2", dead_addr().await)]),
    );
    let (status, json) = get(format!("http://{addr}/s/gone/p")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(json["error"]["code"], "upstream_unavailable");
}

#[tokio::test]
async fn scale_from_zero_holds_the_request_until_a_replica_is_ready() {
    let up = echo_upstream("a").await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    let demanded = Arc::new(Mutex::new(Vec::<String>::new()));
    let d = demanded.clone();
    gw.set_demand_hook(Arc::new(move |name: &str| {
        d.lock().unwrap().push(name.to_string())
    }));
    gw.set_service("cold", ServiceRoute::new(vec![]));

    let start = Instant::now();
    let pending = tokio::spawn(get(format!("http://{addr}/s/cold/v1/x")));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(*demanded.lock().unwrap(), vec!["cold".to_string()]);
    assert_eq!(gw.stats("cold").unwrap().held, 1);
    assert_eq!(gw.concurrency("cold"), Some(1));
    tokio::time::sleep(Duration::from_millis(150)).await;
    gw.set_service("cold", ServiceRoute::new(vec![replica("a", up)]));

    let (status, json) = pending.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["uri"], "/v1/x");
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(demanded.lock().unwrap().len(), 1, "the hook fired once");
    let stats = gw.stats("cold").unwrap();
    assert_eq!(
        (stats.held, stats.in_flight, stats.requests_total),
        (0, 0, 1)
    );
    assert!(stats.last_request.is_some());
}

#[tokio::test]
async fn the_hold_queue_is_bounded() {
    let up = echo_upstream("a").await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    let mut route = ServiceRoute::new(vec![]);
    route.max_held = 1;
    gw.set_service("cold", route.clone());

    let first = tokio::spawn(get(format!("http://{addr}/s/cold/")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.stats("cold").unwrap().held, 1);
    let (status, json) = get(format!("http://{addr}/s/cold/")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["error"]["code"], "hold_queue_full");

    route.replicas = vec![replica("a", up)];
    gw.set_service("cold", route);
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
}

#[tokio::test]
async fn a_hold_that_outlasts_its_timeout_gets_503() {
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    let mut route = ServiceRoute::new(vec![]);
    route.hold_timeout = Duration::from_millis(200);
    gw.set_service("cold", route);
    let start = Instant::now();
    let (status, json) = get(format!("http://{addr}/s/cold/")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["error"]["code"], "no_ready_replica");
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no ready replica"));
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!(gw.stats("cold").unwrap().held, 0);
}

#[tokio::test]
async fn route_updates_keep_counters_and_requests_in_flight() {
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let slow = serve_upstream(Router::new().fallback(any(move || {
        let r = r.clone();
        async move {
            r.notified().await;
            "done"
        }
    })))
    .await;
    let other = echo_upstream("b").await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    gw.set_service("m", ServiceRoute::new(vec![replica("a", slow)]));
    let pending = tokio::spawn(async move {
        let resp = client()
            .get(format!("http://{addr}/s/m/").parse().unwrap())
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.stats("m").unwrap().in_flight, 1);
    // Replace the replica set while the request is in flight.
    gw.set_service("m", ServiceRoute::new(vec![replica("b", other)]));
    let (status, json) = get(format!("http://{addr}/s/m/")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["replica"], "b");
    let stats = gw.stats("m").unwrap();
    assert_eq!((stats.in_flight, stats.requests_total), (1, 2));
    release.notify_one();
    let (status, body) = pending.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"done");
    assert_eq!(gw.stats("m").unwrap().in_flight, 0);
}

#[tokio::test]
async fn metrics_carry_the_gateway_series() {
    let up = echo_upstream("a").await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    let mut registry = Registry::with_prefix("tessera");
    gw.register_metrics(&mut registry);
    gw.set_service("echo", ServiceRoute::new(vec![replica("a", up)]));
    for _ in 0..2 {
        assert_eq!(
            get(format!("http://{addr}/s/echo/")).await.0,
            StatusCode::OK
        );
    }
    let mut route = ServiceRoute::new(vec![replica("a", up)]);
    route.key_hashes = vec![hash_key("k")];
    gw.set_service("echo", route);
    assert_eq!(
        get(format!("http://{addr}/s/echo/")).await.0,
        StatusCode::UNAUTHORIZED
    );
    // Unknown services are not recorded.
    get(format!("http://{addr}/s/unknown/")).await;

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for want in [
        "tessera_gateway_requests_total{service=\"echo\",code=\"2xx\"} 2",
        "tessera_gateway_requests_total{service=\"echo\",code=\"4xx\"} 1",
        "tessera_gateway_request_duration_seconds_count{service=\"echo\"} 3",
        "tessera_gateway_request_duration_seconds_bucket{le=",
        "tessera_gateway_in_flight{service=\"echo\"} 0",
        "tessera_gateway_held{service=\"echo\"} 0",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    assert!(!text.contains("unknown"), "{text}");
}

/// An upstream served by hyper directly that counts the connections it
/// accepted and has open, and the requests it answered (with its name).
struct Counted {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

async fn counted_upstream(name: &'static str, keep_alive: bool) -> Counted {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = Counted {
        addr: listener.local_addr().unwrap(),
        accepted: Arc::default(),
        open: Arc::default(),
        requests: Arc::default(),
    };
    let (accepted, open, requests) = (c.accepted.clone(), c.open.clone(), c.requests.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            accepted.fetch_add(1, Ordering::SeqCst);
            open.fetch_add(1, Ordering::SeqCst);
            let (open, requests) = (open.clone(), requests.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    requests.fetch_add(1, Ordering::SeqCst);
                    async move {
                        Ok::<_, Infallible>(axum::http::Response::new(http_body_util::Full::new(
                            Bytes::from_static(name.as_bytes()),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(keep_alive)
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    c
}

/// One keep-alive client connection to the gateway.
async fn client_connection(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

async fn send_on(
    tx: &mut hyper::client::conn::http1::SendRequest<Body>,
    path: &str,
) -> (StatusCode, String) {
    tx.ready().await.unwrap();
    let req = axum::http::Request::get(path)
        .header("host", "gateway")
        .body(Body::empty())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_client_connection_reuses_its_upstream_connection() {
    let up = counted_upstream("a", true).await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    gw.set_service("m", ServiceRoute::new(vec![replica("a", up.addr)]));
    let mut tx = client_connection(addr).await;
    for _ in 0..5 {
        assert_eq!(
            send_on(&mut tx, "/s/m/x").await,
            (StatusCode::OK, "a".into())
        );
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 5);
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection"
    );
    // A second client connection gets an upstream connection of its own.
    let mut other = client_connection(addr).await;
    assert_eq!(send_on(&mut other, "/s/m/").await.0, StatusCode::OK);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    // The upstream connections close with their client connections.
    drop((tx, other));
    for _ in 0..100 {
        if up.open.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(up.open.load(Ordering::SeqCst), 0);
    assert_eq!(gw.stats("m").unwrap().in_flight, 0);
}

#[tokio::test]
async fn a_removed_replica_gets_nothing_more_on_reused_connections() {
    let a = counted_upstream("a", true).await;
    let b = counted_upstream("b", true).await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    gw.set_service("m", ServiceRoute::new(vec![replica("a", a.addr)]));
    let mut tx = client_connection(addr).await;
    for _ in 0..3 {
        assert_eq!(send_on(&mut tx, "/s/m/").await.1, "a");
    }
    gw.set_service("m", ServiceRoute::new(vec![replica("b", b.addr)]));
    for _ in 0..3 {
        assert_eq!(send_on(&mut tx, "/s/m/").await.1, "b");
    }
    assert_eq!(a.requests.load(Ordering::SeqCst), 3);
    assert_eq!(b.requests.load(Ordering::SeqCst), 3);
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    // The idle connection to the removed replica was closed.
    for _ in 0..100 {
        if a.open.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.open.load(Ordering::SeqCst), 0);

    // Back to both: requests alternate and each replica's connection is
    // reused.
    gw.set_service(
        "m",
        ServiceRoute::new(vec![replica("a", a.addr), replica("b", b.addr)]),
    );
    for _ in 0..6 {
        assert_eq!(send_on(&mut tx, "/s/m/").await.0, StatusCode::OK);
    }
    assert_eq!(a.requests.load(Ordering::SeqCst), 6);
    assert_eq!(b.requests.load(Ordering::SeqCst), 6);
    assert_eq!(a.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_upstream_that_closes_idle_connections_is_reconnected() {
    let up = counted_upstream("a", false).await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    // One replica: a closed idle connection is not a failed attempt.
    gw.set_service("m", ServiceRoute::new(vec![replica("a", up.addr)]));
    let mut tx = client_connection(addr).await;
    for _ in 0..5 {
        assert_eq!(
            send_on(&mut tx, "/s/m/").await,
            (StatusCode::OK, "a".into())
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn the_router_serves_the_same_routes_when_embedded() {
    let up = echo_upstream("a").await;
    let gw = Gateway::new(GatewayConfig::default());
    gw.set_service("echo", ServiceRoute::new(vec![replica("a", up)]));
    let app = Router::new()
        .route("/other", any(|| async { "api" }))
        .merge(gw.clone().router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    let (status, _, json) = send(
        Method::POST,
        format!("http://{addr}/s/echo/v1/x?q=1"),
        &[],
        Body::from("hi"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["uri"], "/v1/x?q=1");
    assert_eq!(json["body"], "hi");
    assert_eq!(json["host"], up.to_string());
    assert_eq!(json["x_forwarded_for"], "127.0.0.1");
    let (status, json) = get(format!("http://{addr}/s/nope/")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json["error"]["code"], "unknown_service");
    let resp = client()
        .get(format!("http://{addr}/other").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(gw.stats("echo").unwrap().requests_total, 1);
}

/// An upstream with a WebSocket endpoint that answers each text message
/// with the path it was reached at and the message in capitals.
async fn websocket_upstream() -> SocketAddr {
    use axum::extract::ws::{Message, WebSocketUpgrade};
    serve_upstream(Router::new().route(
        "/v1/realtime",
        any(
            |ws: WebSocketUpgrade, req_uri: axum::http::Uri| async move {
                ws.on_upgrade(move |mut socket| async move {
                    while let Some(Ok(msg)) = socket.recv().await {
                        if let Message::Text(t) = msg {
                            let reply = format!("{} {}", req_uri, t.to_uppercase());
                            if socket.send(Message::Text(reply.into())).await.is_err() {
                                break;
                            }
                        }
                    }
                })
            },
        ),
    ))
    .await
}

#[tokio::test]
async fn websockets_are_upgraded_and_relayed_both_ways() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let up = websocket_upstream().await;
    // Both ways into the gateway: its own server, and its router (as the
    // control plane embeds it).
    let (gw, served) = start_gateway(GatewayConfig::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let routed = listener.local_addr().unwrap();
    let app = gw.clone().router();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    let mut route = ServiceRoute::new(vec![replica("a", up)]);
    route.key_hashes = vec![hash_key("k1")];
    gw.set_service("rt", route);

    for addr in [served, routed] {
        // Without the key: refused before anything reaches the replica.
        let err = tokio_tungstenite::connect_async(format!("ws://{addr}/s/rt/v1/realtime"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("401"), "{err}");

        let mut req = format!("ws://{addr}/s/rt/v1/realtime?session=7")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", "Bearer k1".parse().unwrap());
        let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        for word in ["hello", "world"] {
            ws.send(Message::Text(word.into())).await.unwrap();
            let reply = ws.next().await.unwrap().unwrap();
            assert_eq!(
                reply.into_text().unwrap().as_str(),
                format!("/v1/realtime?session=7 {}", word.to_uppercase())
            );
        }
        // An open WebSocket is a request in flight (balancing, autoscaling).
        assert_eq!(gw.stats("rt").unwrap().in_flight, 1);
        ws.close(None).await.unwrap();
        // The replica's close comes back through the gateway.
        while let Some(Ok(m)) = ws.next().await {
            assert!(m.is_close(), "{m:?}");
        }
        drop(ws);
        let deadline = Instant::now() + Duration::from_secs(5);
        while gw.stats("rt").unwrap().in_flight != 0 {
            assert!(
                Instant::now() < deadline,
                "the closed WebSocket still counts"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn a_replica_that_declines_an_upgrade_answers_as_is() {
    let up = echo_upstream("a").await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    gw.set_service("plain", ServiceRoute::new(vec![replica("a", up)]));
    let err = tokio_tungstenite::connect_async(format!("ws://{addr}/s/plain/socket"))
        .await
        .unwrap_err();
    // The echo replica answers 200 with JSON instead of switching protocols.
    assert!(err.to_string().contains("200"), "{err}");
}

/// Reads one response from a raw client connection: its head (as text,
/// header names lowercased) and its `Content-Length` body (none for HEAD).
async fn read_raw_response(
    tcp: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    head_request: bool,
) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed mid-head: {}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf.drain(..end).collect()).unwrap();
    let head = head.to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
    let length = if head_request { 0 } else { length };
    while buf.len() < length {
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf.drain(..length).collect();
    (head, body)
}

async fn read_to_end(tcp: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(buf))
        .await
        .expect("the gateway did not close the connection")
        .unwrap();
}

#[tokio::test]
async fn pipelined_head_and_http_1_0_requests_share_one_connection() {
    use tokio::io::AsyncWriteExt;
    let up = echo_upstream("a").await;
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    gw.set_service("echo", ServiceRoute::new(vec![replica("a", up)]));
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Three requests in one write: the second with a body, the third HEAD.
    tcp.write_all(
        b"GET /s/echo/a?x=1 HTTP/1.1\r\nhost: gw\r\n\r\n\
          POST /s/echo/b HTTP/1.1\r\nhost: gw\r\ncontent-length: 3\r\n\r\nabc\
          HEAD /s/echo/c HTTP/1.1\r\nhost: gw\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let (head, body) = read_raw_response(&mut tcp, &mut buf, false).await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["uri"], "/a?x=1");
    assert_eq!(json["x_forwarded_host"], "gw");
    assert_eq!(json["x_forwarded_for"], "127.0.0.1");
    let (_, body) = read_raw_response(&mut tcp, &mut buf, false).await;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (json["uri"].as_str(), json["body"].as_str()),
        (Some("/b"), Some("abc"))
    );
    let (head, body) = read_raw_response(&mut tcp, &mut buf, true).await;
    assert!(
        head.starts_with("http/1.1 200 ok\r\n") && body.is_empty(),
        "{head}"
    );
    assert!(buf.is_empty(), "a HEAD response has no body");

    // An HTTP/1.0 request on the same connection: answered (by the general
    // path), then the connection closes, as HTTP/1.0 without keep-alive.
    tcp.write_all(b"GET /s/echo/d HTTP/1.0\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    read_to_end(&mut tcp, &mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
    assert!(text.contains("\"uri\":\"/d\""), "{text}");
    assert_eq!(gw.stats("echo").unwrap().requests_total, 4);
    assert_eq!(gw.stats("echo").unwrap().in_flight, 0);
}

#[tokio::test]
async fn connection_close_and_bodies_that_end_with_the_connection_close_the_client_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = echo_upstream("a").await;
    // A replica that sends its body without a length and closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    if tcp.read(&mut b).await.unwrap() == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
                    .await;
            });
        }
    });
    let (gw, addr) = start_gateway(GatewayConfig::default()).await;
    gw.set_service("echo", ServiceRoute::new(vec![replica("a", up)]));
    gw.set_service("raw", ServiceRoute::new(vec![replica("r", raw)]));

    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /s/echo/ HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    read_to_end(&mut tcp, &mut buf).await;
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200 ok\r\n"), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");

    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /s/raw/ HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    read_to_end(&mut tcp, &mut buf).await;
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200 ok\r\n"), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nuntil the end"), "{text}");
    assert_eq!(gw.stats("raw").unwrap().in_flight, 0);
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_serve_returns() {
    use tokio::io::AsyncWriteExt;
    let up = echo_upstream("a").await;
    let gw = Gateway::new(GatewayConfig::default());
    gw.set_service("echo", ServiceRoute::new(vec![replica("a", up)]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(gw.clone().serve(listener, async {
        let _ = stop_rx.await;
    }));
    // A keep-alive connection that has been served once and is now idle.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /s/echo/ HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (head, _) = read_raw_response(&mut tcp, &mut buf, false).await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("serve did not return")
        .unwrap()
        .unwrap();
    read_to_end(&mut tcp, &mut buf).await;
    assert!(buf.is_empty());
}

#[tokio::test]
async fn several_threads_serve_one_address_and_stop_together() {
    let up = echo_upstream("a").await;
    let gw = Gateway::new(GatewayConfig::default());
    gw.set_service("echo", ServiceRoute::new(vec![replica("a", up)]));
    let listeners =
        tessera_gateway::reuseport_listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap();
    assert_eq!(listeners.len(), 3);
    let addr = listeners[0].local_addr().unwrap();
    assert!(listeners.iter().all(|l| l.local_addr().unwrap() == addr));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(gw.clone().serve_threads(listeners, async {
        let _ = stop_rx.await;
    }));
    for _ in 0..20 {
        let (status, json) = get(format!("http://{addr}/s/echo/t")).await;
        assert_eq!((status, json["uri"].as_str()), (StatusCode::OK, Some("/t")));
    }
    assert_eq!(gw.stats("echo").unwrap().requests_total, 20);
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("serve_threads did not return")
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
