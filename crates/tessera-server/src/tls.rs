//! The control plane's certificate: a given PEM certificate and key, or a
//! self-signed one made on first start under `$TESSERA_HOME/tls/` and reused
//! after; and the rustls acceptor that presents it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tessera_agent::tls::{fingerprint, host_name, provider};

/// Where the certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// Made on first start into `$TESSERA_HOME/tls/{cert,key}.pem`, with
    /// these names besides localhost, 127.0.0.1 and the host name.
    SelfSigned { extra_names: Vec<String> },
    /// Given PEM files: the certificate (chain, leaf first) and its key.
    Files { cert: PathBuf, key: PathBuf },
}

/// What the server presents.
pub struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// `sha256:<hex>` of the leaf certificate.
    pub fingerprint: String,
    /// The self-signed certificate's file, which clients can trust as a CA.
    pub self_signed: Option<PathBuf>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// Loads (or first makes) the certificate and builds the acceptor.
pub fn load(home: &Path, source: &TlsSource) -> anyhow::Result<ServerTls> {
    let (cert_path, key_path, self_signed) = match source {
        TlsSource::Files { cert, key } => (cert.clone(), key.clone(), None),
        TlsSource::SelfSigned { extra_names } => {
            let dir = home.join("tls");
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            if !cert.exists() || !key.exists() {
                generate(&dir, &cert, &key, extra_names)?;
            }
            (cert.clone(), key, Some(cert))
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect())
        .with_context(|| format!("reading the certificate {}", cert_path.display()))?;
    let Some(leaf) = certs.first() else {
        bail!("{} holds no certificate", cert_path.display());
    };
    let fingerprint = fingerprint(leaf.as_ref());
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading the private key {}", key_path.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "the key {} does not fit the certificate {}",
                key_path.display(),
                cert_path.display()
            )
        })?;
    Ok(ServerTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        fingerprint,
        self_signed,
    })
}

/// Makes a self-signed certificate for localhost, 127.0.0.1, the host name
/// and `extra_names`; the key is written with mode 0600.
fn generate(dir: &Path, cert: &Path, key: &Path, extra_names: &[String]) -> anyhow::Result<()> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        host_name(),
    ];
    for n in extra_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let mut params = rcgen::CertificateParams::new(names.clone())
        .with_context(|| format!("bad certificate names {names:?}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Tessera control plane");
    // Valid for a long time: it is pinned, not renewed.
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 12, 31);
    let key_pair = rcgen::KeyPair::generate().context("generating a TLS key")?;
    let certificate = params
        .self_signed(&key_pair)
        .context("making a self-signed certificate")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // The key first: a crash in between leaves no certificate, so the next
    // start makes both again.
    crate::write_private(key, &key_pair.serialize_pem())?;
    std::fs::write(cert, certificate.pem())
        .with_context(|| format!("writing {}", cert.display()))?;
    tracing::info!(cert = %cert.display(), ?names, "made a self-signed TLS certificate");
    Ok(())
}

/// Serves `app` over TLS until `on_signal`, then waits for open HTTP
/// connections to finish (as `axum::serve`'s graceful shutdown does).
/// WebSocket upgrades work; TCP_NODELAY is set on every connection.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    acceptor: tokio_rustls::TlsAcceptor,
    on_signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Connections hold a receiver: all dropped means all finished.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(on_signal);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut on_signal => break,
        };
        // Small streamed writes (log lines) must not wait for delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let (acceptor, app, builder) = (acceptor.clone(), app.clone(), builder.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
            let stream = match handshake.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = stop.changed() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
            drop(stop);
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
    Ok(())
}
