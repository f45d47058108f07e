//! Teams, roles and API tokens (stored as hashes only).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The team created on first start; its admins administer everything.
pub const ADMIN_TEAM: &str = "admin";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads its team's objects.
    Viewer,
    /// Reads, submits and cancels its team's jobs.
    Member,
    /// Manages its team's tokens; admins of the `admin` team manage everything.
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "member" => Some(Role::Member),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Member => "member",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Team {
    pub name: String,
    /// Fair-share weight (used by the fair-share policy).
    pub weight: f64,
    pub created_at: u64,
    /// Guaranteed amounts and borrowing limits; none: best effort, no limit.
    #[serde(default)]
    pub quota: Option<TeamQuota>,
}

/// Amounts of CPU, memory and GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResourceAmounts {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    /// Thousandths of a GPU.
    pub gpu_milli: u64,
}

/// A team's quota per resource: `guaranteed` is reserved for the team (others
/// may borrow it while idle, and give it back when the team needs it);
/// `limit` caps what the team may hold by borrowing (`u64::MAX`: no cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TeamQuota {
    pub guaranteed: ResourceAmounts,
    pub limit: ResourceAmounts,
}

/// A token as stored: the secret itself is never kept, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub team: String,
    pub role: Role,
    pub hash: String,
    pub created_at: u64,
    /// What the token is for; records written before kinds existed are API tokens.
    #[serde(default)]
    pub kind: TokenKind,
}

/// The three kinds of secrets the control plane hands out. Only API tokens
/// open the REST API; a join token only admits a new node; a node
/// credential only opens that node's agent connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TokenKind {
    #[default]
    Api,
    /// Lets an agent join the pool; `uses_left: None` means unlimited uses.
    Join {
        expires_at: Option<u64>,
        uses_left: Option<u32>,
    },
    /// The credential a joined node's agent connects with.
    Node { node: String },
    /// A key that may call one service through the gateway, nothing else.
    Service { service: String },
}

/// Who is calling, once a token has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token_id: String,
    pub team: String,
    pub role: Role,
}

impl Principal {
    /// Admins of the `admin` team see and manage every team.
    pub fn is_superuser(&self) -> bool {
        self.role == Role::Admin && self.team == ADMIN_TEAM
    }

    pub fn can_read_team(&self, team: &str) -> bool {
        self.is_superuser() || self.team == team
    }

    pub fn can_write_team(&self, team: &str) -> bool {
        self.role >= Role::Member && self.can_read_team(team)
    }
}
