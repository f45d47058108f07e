//! Gateway overhead on loopback: a trivial upstream, the gateway in front of
//! it, and a paced load generator, as separate processes so that `wrk` and
//! nginx can be measured against the same upstream (bench/gateway.sh).
//!
//! ```text
//! proxy_bench upstream --listen 127.0.0.1:18080
//! proxy_bench gateway  --listen 127.0.0.1:18081 --upstream 127.0.0.1:18080
//!     (serves the upstream as service "bench": GET /s/bench/)
//! proxy_bench load --url http://127.0.0.1:18081/s/bench/ --rate 5000 --secs 10 --conns 32
//!     (p50/p90/p99/p99.9 of each request's latency at a steady rate)
//! ```
//!
//! `PROXY_BENCH_WORKERS=1` runs any of them on a current-thread runtime,
//! `PROXY_BENCH_WORKERS=N` on N worker threads (default: one per core).
//! The gateway serves as `tessera gateway` does, on one thread per core
//! (`Gateway::serve_threads`); `PROXY_BENCH_THREADS=N` sets the number, and
//! `PROXY_BENCH_THREADS=0` serves on the runtime above (`Gateway::serve`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::http::{Request, Response, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tessera_gateway::{Gateway, GatewayConfig, ServiceRoute, Upstream};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn need(args: &[String], name: &str) -> String {
    arg(args, name).unwrap_or_else(|| panic!("{name} is required"))
}

fn main() {
    // PROXY_BENCH_WORKERS: unset, tokio's default multi-thread runtime (one
    // worker per core); 1, a current-thread runtime; N, N workers.
    let workers: Option<usize> = std::env::var("PROXY_BENCH_WORKERS")
        .ok()
        .map(|w| w.parse().expect("PROXY_BENCH_WORKERS is a number"));
    let rt = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    rt.unwrap().block_on(run());
}

async fn run() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("upstream") => upstream(need(&args, "--listen").parse().unwrap()).await,
        Some("gateway") => {
            gateway(
                need(&args, "--listen").parse().unwrap(),
                need(&args, "--upstream").parse().unwrap(),
            )
            .await
        }
        Some("load") => {
            load(
                need(&args, "--url").parse().unwrap(),
                arg(&args, "--rate").map_or(5000.0, |r| r.parse().unwrap()),
                arg(&args, "--secs").map_or(10.0, |s| s.parse().unwrap()),
                arg(&args, "--conns").map_or(32, |c| c.parse().unwrap()),
            )
            .await
        }
        _ => eprintln!("usage: proxy_bench upstream|gateway|load (see the source)"),
    }
}

/// Answers every request with a small fixed body.
async fn upstream(listen: SocketAddr) {
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    eprintln!("upstream on {listen}");
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|_req: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                    b"hello world\n",
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn gateway(listen: SocketAddr, upstream: SocketAddr) {
    let gw = Gateway::new(GatewayConfig::default());
    gw.set_service(
        "bench",
        ServiceRoute::new(vec![Upstream {
            id: "u0".into(),
            addr: upstream,
        }]),
    );
    // As `tessera gateway`: one thread per core, each with a listener of
    // its own (`serve_threads`); PROXY_BENCH_THREADS=N for N threads, 0 for
    // `serve` on the runtime above.
    let threads = std::env::var("PROXY_BENCH_THREADS").ok().map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| t.parse().expect("PROXY_BENCH_THREADS is a number"),
    );
    eprintln!("gateway on {listen} -> {upstream} ({threads} threads)");
    if threads == 0 {
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        gw.serve(listener, std::future::pending()).await.unwrap();
    } else {
        let listeners = tessera_gateway::reuseport_listeners(listen, threads).unwrap();
        gw.serve_threads(listeners, std::future::pending())
            .await
            .unwrap();
    }
}

/// `conns` keep-alive connections, each sending one request at a time on a
/// steady schedule so that together they offer `rate` requests per second.
/// A request's latency is from its send to the end of its response body.
async fn load(url: Uri, rate: f64, secs: f64, conns: usize) {
    let addr = url.authority().unwrap().as_str().to_string();
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            let addr = addr.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let (mut send, conn) =
                    hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let mut lat = Vec::with_capacity((secs * rate / conns as f64) as usize + 16);
                let mut next = start + interval.mul_f64(c as f64 / conns as f64);
                let mut errors = 0u64;
                while next < end {
                    tokio::time::sleep_until(next.into()).await;
                    let req = Request::get(url.path())
                        .header("host", addr.as_str())
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let sent = Instant::now();
                    match send.send_request(req).await {
                        Ok(resp) if resp.status().is_success() => {
                            resp.into_body().collect().await.unwrap();
                            lat.push(sent.elapsed().as_nanos() as u64);
                        }
                        _ => errors += 1,
                    }
                    next += interval;
                    let now = Instant::now();
                    if next < now {
                        next = now;
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.unwrap();
        all.extend(lat);
        errors += e;
    }
    all.sort_unstable();
    let q = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1e6;
    println!(
        "requests {} errors {} rate {:.0}/s p50 {:.3} ms p90 {:.3} ms p99 {:.3} ms p99.9 {:.3} ms",
        all.len(),
        errors,
        all.len() as f64 / secs,
        q(0.50),
        q(0.90),
        q(0.99),
        q(0.999)
    );
}
