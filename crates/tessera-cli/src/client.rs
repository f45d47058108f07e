//! Where the server is and how to talk to it: client configuration
//! (flags, environment, `$TESSERA_HOME/config`, `$TESSERA_HOME/admin.token`),
//! the HTTP client for the REST API and the API error type.

use std::collections::BTreeMap;
use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tessera_agent::tls::Trust;

/// Where `tessera up` listens unless told otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7700";

/// Time limit for one ordinary (non-streaming) request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// `$HOME/.tessera`, the home used when neither `--home` nor `TESSERA_HOME`
/// is given.
pub fn default_home() -> Result<PathBuf> {
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => Ok(PathBuf::from(h).join(".tessera")),
        _ => Err(anyhow!(
            "cannot tell where Tessera's home is: $HOME is not set; pass --home or set TESSERA_HOME"
        )),
    }
}

/// Parses the `key = value` lines of `$TESSERA_HOME/config`. Blank lines and
/// lines starting with `#` are ignored; values may be quoted.
pub fn parse_config(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        out.insert(key.trim().to_string(), value.to_string());
    }
    out
}

/// The server URL and API token a command uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    pub url: String,
    pub token: String,
}

/// Reads a file that may be absent; other read errors are reported.
fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!(e).context(format!("cannot read {}", path.display()))),
    }
}

/// Adds `http://` when no scheme is given and drops trailing slashes.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

impl ClientConfig {
    /// url: the flag (or `TESSERA_URL`), else `url` in `$home/config`, else
    /// [`DEFAULT_URL`]. token: the flag (or `TESSERA_TOKEN`), else the
    /// contents of `$home/admin.token`.
    pub fn resolve(url: Option<&str>, token: Option<&str>, home: &Path) -> Result<ClientConfig> {
        let url = match url.filter(|u| !u.trim().is_empty()) {
            Some(u) => u.to_string(),
            None => read_optional(&home.join("config"))?
                .and_then(|text| parse_config(&text).remove("url"))
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| DEFAULT_URL.to_string()),
        };
        let token = match token.map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => t.to_string(),
            None => {
                let path = home.join("admin.token");
                match read_optional(&path)?.map(|t| t.trim().to_string()) {
                    Some(t) if !t.is_empty() => t,
                    _ => {
                        return Err(anyhow!(
                            "no API token: run `tessera up` on this machine (it writes {}), \
                             or set TESSERA_TOKEN (or pass --token)",
                            path.display()
                        ))
                    }
                }
            }
        };
        Ok(ClientConfig {
            url: normalize_url(&url),
            token,
        })
    }
}

/// Which certificate an `https://` server must present: `TESSERA_PIN` or
/// `TESSERA_CA`, else `tls_fingerprint` or `ca` in `$home/config` when that
/// file names the same server.
pub fn resolve_trust(url: &str, home: &Path) -> Result<Trust> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let from_env = Trust {
        pin: env("TESSERA_PIN"),
        ca: env("TESSERA_CA").map(PathBuf::from),
    };
    if !from_env.is_empty() {
        return Ok(from_env);
    }
    let Some(text) = read_optional(&home.join("config"))? else {
        return Ok(Trust::default());
    };
    let mut config = parse_config(&text);
    if config.get("url").map(|u| normalize_url(u)).as_deref() != Some(url) {
        return Ok(Trust::default());
    }
    Ok(Trust {
        pin: config.remove("tls_fingerprint").filter(|v| !v.is_empty()),
        ca: config
            .remove("ca")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
    })
}

/// An error the server answered with: `{"error": {"code", "message", "field"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub field: Option<String>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        match &self.field {
            Some(field) if !field.is_empty() => write!(f, " (field: {field})"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for ApiError {}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: String,
    message: String,
    #[serde(default)]
    field: Option<String>,
}

impl ApiError {
    /// Reads an error from a status and body, falling back to the raw text
    /// when the body is not the API's error shape.
    pub fn from_body(status: StatusCode, body: &str) -> ApiError {
        if let Ok(env) = serde_json::from_str::<ErrorEnvelope>(body) {
            return ApiError {
                status,
                code: env.error.code,
                message: env.error.message,
                field: env.error.field,
            };
        }
        let text = body.trim();
        let message = if text.is_empty() {
            format!("the server answered {status}")
        } else {
            let snippet: String = text.chars().take(300).collect();
            format!("the server answered {status}: {snippet}")
        };
        ApiError {
            status,
            code: "http".into(),
            message,
            field: None,
        }
    }
}

/// An HTTP client for one server with one token. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    trust: Trust,
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Client> {
        Client::with_trust(config, Trust::default())
    }

    /// A client that checks an `https://` server's certificate against `trust`.
    pub fn with_trust(config: ClientConfig, trust: Trust) -> Result<Client> {
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("tessera-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(tls) = trust.client_config(&config.url)? {
            http = http.use_preconfigured_tls((*tls).clone());
        }
        let http = http.build().context("cannot set up the HTTP client")?;
        Ok(Client {
            http,
            base: config.url,
            token: config.token,
            trust,
        })
    }

    /// The flags an agent needs to trust this server as this client does
    /// (`--pin` or `--ca`); empty for plain HTTP.
    pub fn agent_trust_flags(&self) -> String {
        if !self.base.starts_with("https://") {
            return String::new();
        }
        match (&self.trust.pin, &self.trust.ca) {
            (Some(pin), _) => format!(" --pin {pin}"),
            (None, Some(ca)) => format!(" --ca {}", ca.display()),
            (None, None) => String::new(),
        }
    }

    /// The server's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// Turns a transport failure into an error a person can act on.
    fn transport_error(&self, e: reqwest::Error) -> anyhow::Error {
        if tessera_agent::tls::is_tls_failure(&e) {
            anyhow!(
                "TLS with the Tessera server at {} failed: {} (check TESSERA_PIN, TESSERA_CA or the server's certificate)",
                self.base,
                tessera_agent::tls::error_chain(&e)
            )
        } else if e.is_connect() {
            anyhow!(
                "cannot reach the Tessera server at {}: is `tessera up` running?",
                self.base
            )
        } else if e.is_timeout() {
            anyhow!("the Tessera server at {} did not answer in time", self.base)
        } else {
            anyhow!(e).context(format!(
                "request to the Tessera server at {} failed",
                self.base
            ))
        }
    }

    /// A request to `path` with the token, for callers that build their own
    /// (streamed uploads and query results).
    pub fn builder(&self, method: Method, path: &str) -> RequestBuilder {
        self.request(method, path)
    }

    /// Sends a built request without a time limit; non-2xx answers become
    /// [`ApiError`]s.
    pub async fn send_stream(&self, rb: RequestBuilder) -> Result<Response> {
        self.send(rb).await
    }

    /// Sends a built request without a time limit, decoding a JSON answer.
    pub async fn send_json<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T> {
        let resp = self.send(rb).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport_error(e))?;
        serde_json::from_slice(&bytes).context("unexpected answer from the server")
    }

    /// Sends a request; non-2xx answers become [`ApiError`]s.
    async fn send(&self, rb: RequestBuilder) -> Result<Response> {
        let resp = rb.send().await.map_err(|e| self.transport_error(e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(ApiError::from_body(status, &body).into())
    }

    async fn json<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T> {
        let resp = self.send(rb.timeout(REQUEST_TIMEOUT)).await?;
        let url = resp.url().path().to_string();
        let bytes = resp.bytes().await.map_err(|e| self.transport_error(e))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("unexpected answer from the server for {url}"))
    }

    /// `GET path?query`, decoding a JSON answer.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T> {
        self.json(self.request(Method::GET, path).query(query))
            .await
    }

    /// `POST path` with a JSON body, decoding a JSON answer.
    pub async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<T> {
        self.json(self.request(Method::POST, path).json(body)).await
    }

    /// `PUT path` with a JSON body.
    pub async fn put_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<T> {
        self.json(self.request(Method::PUT, path).json(body)).await
    }

    /// `POST path` with a raw body of the given content type.
    pub async fn post_raw<T: DeserializeOwned>(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        content_type: &str,
    ) -> Result<T> {
        let rb = self
            .request(Method::POST, path)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        self.json(rb).await
    }

    /// `DELETE path`, expecting no body back.
    pub async fn delete(&self, path: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, path).timeout(REQUEST_TIMEOUT))
            .await?;
        Ok(())
    }

    /// `GET path?query` without a time limit, for streamed bodies (logs).
    pub async fn stream(&self, path: &str, query: &[(&str, String)]) -> Result<Response> {
        self.send(self.request(Method::GET, path).query(query))
            .await
    }

    /// Copies a streamed body to `out` chunk by chunk as it arrives,
    /// flushing after each chunk.
    pub async fn copy_body(&self, mut resp: Response, out: &mut impl std::io::Write) -> Result<()> {
        loop {
            let chunk = resp.chunk().await.map_err(|e| {
                anyhow!(e).context(format!(
                    "the stream from the Tessera server at {} broke off",
                    self.base
                ))
            })?;
            let Some(chunk) = chunk else {
                return Ok(());
            };
            out.write_all(&chunk)?;
            out.flush()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lines() {
        let c = parse_config(
            "# written by tessera up\n\nurl = http://10.0.0.5:7700\n  listen=0.0.0.0:7700 \nname = \"a b\"\nnonsense\n",
        );
        assert_eq!(
            c.get("url").map(String::as_str),
            Some("http://10.0.0.5:7700")
        );
        assert_eq!(c.get("listen").map(String::as_str), Some("0.0.0.0:7700"));
        assert_eq!(c.get("name").map(String::as_str), Some("a b"));
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn urls_are_normalized() {
        assert_eq!(normalize_url("127.0.0.1:7700/"), "http://127.0.0.1:7700");
        assert_eq!(normalize_url("https://x.example"), "https://x.example");
    }

    #[test]
    fn resolution_order() {
        let home = tempfile::tempdir().unwrap();
        // Nothing on disk: default url, and a missing token is a clear error.
        let e = ClientConfig::resolve(None, None, home.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tessera up") && e.contains("TESSERA_TOKEN"),
            "{e}"
        );
        let c = ClientConfig::resolve(None, Some("t0"), home.path()).unwrap();
        assert_eq!(
            c,
            ClientConfig {
                url: DEFAULT_URL.into(),
                token: "t0".into()
            }
        );

        std::fs::write(home.path().join("config"), "url = http://h:1\n").unwrap();
        std::fs::write(home.path().join("admin.token"), "  secret\n").unwrap();
        let c = ClientConfig::resolve(None, None, home.path()).unwrap();
        assert_eq!(
            c,
            ClientConfig {
                url: "http://h:1".into(),
                token: "secret".into()
            }
        );

        // Flags (and their environment variables) win.
        let c = ClientConfig::resolve(Some("http://f:2"), Some("flag"), home.path()).unwrap();
        assert_eq!(
            c,
            ClientConfig {
                url: "http://f:2".into(),
                token: "flag".into()
            }
        );

        // An empty token file is as good as none.
        std::fs::write(home.path().join("admin.token"), "\n").unwrap();
        assert!(ClientConfig::resolve(None, None, home.path()).is_err());
    }

    #[test]
    fn api_errors_read_the_envelope() {
        let e = ApiError::from_body(
            StatusCode::BAD_REQUEST,
            r#"{"error": {"code": "invalid", "message": "must be at least 1, got 0", "field": "replicas"}}"#,
        );
        assert_eq!(e.to_string(), "must be at least 1, got 0 (field: replicas)");
        let e = ApiError::from_body(
            StatusCode::NOT_FOUND,
            r#"{"error": {"code": "not_found", "message": "no job 7", "field": null}}"#,
        );
        assert_eq!(e.to_string(), "no job 7");
        let e = ApiError::from_body(StatusCode::BAD_GATEWAY, "upstream down");
        assert_eq!(
            e.to_string(),
            "the server answered 502 Bad Gateway: upstream down"
        );
    }
}
