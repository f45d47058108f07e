//! Bearer tokens: minting, hashing (SHA-256; only hashes are stored) and the
//! extractor that turns an `Authorization` header into a [`Principal`].

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tessera_core::auth::{Principal, Role, TokenKind, TokenRecord};

use crate::error::ApiError;
use crate::Shared;

/// Prefix of every secret, so leaked tokens are easy to spot.
pub const TOKEN_PREFIX: &str = "tsr_";

pub fn hash_token(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new secret and its stored record (the secret itself is not in it).
pub fn mint(name: &str, team: &str, role: Role, now: u64) -> (String, TokenRecord) {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    let secret = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
    let mut id_bytes = [0u8; 6];
    rand::thread_rng().fill_bytes(&mut id_bytes);
    let record = TokenRecord {
        id: format!("tok-{}", hex::encode(id_bytes)),
        name: name.to_string(),
        team: team.to_string(),
        role,
        hash: hash_token(&secret),
        created_at: now,
        kind: Default::default(),
    };
    (secret, record)
}

/// A new secret of another kind than an API token (join token, node
/// credential, service key): its own secret prefix (`tsj_`, `tsn_`, `tss_`)
/// and id prefix, so leaked secrets say what they open. Role `viewer`; the
/// kind, not the role, says what it may do.
pub fn mint_kind(name: &str, team: &str, kind: TokenKind, now: u64) -> (String, TokenRecord) {
    let (secret_prefix, id_prefix) = match &kind {
        TokenKind::Api => (TOKEN_PREFIX, "tok-"),
        TokenKind::Join { .. } => ("tsj_", "join-"),
        TokenKind::Node { .. } => ("tsn_", "node-"),
        TokenKind::Service { .. } => ("tss_", "key-"),
    };
    let (secret, mut record) = mint(name, team, Role::Viewer, now);
    let secret = secret.replacen(TOKEN_PREFIX, secret_prefix, 1);
    record.hash = hash_token(&secret);
    record.id = record.id.replacen("tok-", id_prefix, 1);
    record.kind = kind;
    (secret, record)
}

/// The authenticated caller of a `/v1` or seed API request, or of a
/// dashboard page (`/ui`, where the session cookie counts too).
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl FromRequestParts<Arc<Shared>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        shared: &Arc<Shared>,
    ) -> Result<Caller, ApiError> {
        // The dashboard (`/ui`) signs in with a cookie holding the token;
        // every other route takes only the `Authorization` header, so a
        // cookie never authorises an API call a page did not make.
        let header = parts.headers.get(axum::http::header::AUTHORIZATION);
        if header.is_none() && crate::ui::is_ui_path(parts.uri.path()) {
            if let Some(secret) = crate::ui::session_token(&parts.headers) {
                return principal_for(shared, &secret).map(Caller);
            }
        }
        let header = header.ok_or_else(|| {
            ApiError::unauthorized(
                "missing token: send `Authorization: Bearer <token>` (see $TESSERA_HOME/admin.token)",
            )
        })?;
        let value = header
            .to_str()
            .map_err(|_| ApiError::unauthorized("the Authorization header is not valid text"))?;
        let secret = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
            })?
            .trim();
        principal_for(shared, secret).map(Caller)
    }
}

/// The principal an API token's secret stands for.
pub(crate) fn principal_for(shared: &Shared, secret: &str) -> Result<Principal, ApiError> {
    let hash = hash_token(secret);
    let state = shared.state.lock().expect("state lock");
    let record = state
        .tokens
        .get(&hash)
        .ok_or_else(|| ApiError::unauthorized("unknown or revoked token"))?;
    if record.kind != TokenKind::Api {
        return Err(ApiError::unauthorized(
            "this is a join token or a node credential, not an API token",
        ));
    }
    Ok(Principal {
        token_id: record.id.clone(),
        team: record.team.clone(),
        role: record.role,
    })
}

impl Caller {
    pub fn require_read(&self, team: &str) -> Result<(), ApiError> {
        if self.0.can_read_team(team) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this token belongs to team `{}` and cannot see team `{team}`",
                self.0.team
            )))
        }
    }

    pub fn require_write(&self, team: &str) -> Result<(), ApiError> {
        self.require_read(team)?;
        if self.0.role >= Role::Member {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this token has role `{}`, which can only read; submitting and cancelling need `member` or `admin`",
                self.0.role.as_str()
            )))
        }
    }

    pub fn require_superuser(&self, what: &str) -> Result<(), ApiError> {
        if self.0.is_superuser() {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "{what} needs an admin token of the `admin` team"
            )))
        }
    }
}
