//! API bearer tokens: created by `tunmeter token create`, stored as SHA-256 only, checked
//! through a short-lived cache in front of the database.

use std::{
    collections::HashMap,
    sync::RwLock,
    time::{Duration, Instant},
};

use serde::Serialize;
use sha2::{Digest as _, Sha256};
use sqlx::Row as _;

use crate::{
    db::{Database, from_db, to_db},
    ledger::store,
    time::unix_ms,
};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every GET.
    Read,
    /// Everything, resets included.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_unix_ms: u64,
    pub revoked_unix_ms: Option<u64>,
}

pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn new_secret() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the kernel's random source");
    format!("tm_{}", hex::encode(b))
}

/// Create a token; the secret is returned once and never stored.
pub async fn create(db: &Database, node: &str, role: Role, name: &str) -> Result<(TokenInfo, String), sqlx::Error> {
    store::ensure_node(db, node, unix_ms()).await?;
    let secret = new_secret();
    let info = TokenInfo {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.to_string(),
        role,
        created_unix_ms: unix_ms(),
        revoked_unix_ms: None,
    };
    sqlx::query(
        "INSERT INTO api_tokens (id, node_id, name, role, token_sha256, created_unix_ms) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(info.id.as_str())
    .bind(node)
    .bind(info.name.as_str())
    .bind(role.as_str())
    .bind(hash(&secret))
    .bind(to_db(info.created_unix_ms))
    .execute(&db.pool)
    .await?;
    Ok((info, secret))
}

fn info(row: &sqlx::any::AnyRow) -> Result<(String, TokenInfo), sqlx::Error> {
    let role: String = row.try_get("role")?;
    Ok((
        row.try_get("token_sha256")?,
        TokenInfo {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            role: Role::parse(&role).ok_or_else(|| sqlx::Error::Decode(format!("token role {role:?}").into()))?,
            created_unix_ms: from_db(row.try_get("created_unix_ms")?),
            revoked_unix_ms: row.try_get::<Option<i64>, _>("revoked_unix_ms")?.map(from_db),
        },
    ))
}

async fn all(db: &Database, node: &str) -> Result<Vec<(String, TokenInfo)>, sqlx::Error> {
    sqlx::query("SELECT * FROM api_tokens WHERE node_id = $1 ORDER BY created_unix_ms, id")
        .bind(node)
        .fetch_all(&db.pool)
        .await?
        .iter()
        .map(info)
        .collect()
}

pub async fn list(db: &Database, node: &str) -> Result<Vec<TokenInfo>, sqlx::Error> {
    Ok(all(db, node).await?.into_iter().map(|(_, i)| i).collect())
}

/// Revoke by id; false if no such token.
pub async fn revoke(db: &Database, node: &str, id: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE api_tokens SET revoked_unix_ms = $1 WHERE node_id = $2 AND id = $3 AND revoked_unix_ms IS NULL",
    )
    .bind(to_db(unix_ms()))
    .bind(node)
    .bind(id)
    .execute(&db.pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Valid tokens by hash, refreshed from the database every few seconds and on an unknown token
/// (at most once a second, so guessing cannot load the database).
pub struct TokenCache {
    db: Database,
    node: String,
    inner: RwLock<(HashMap<String, TokenInfo>, Option<Instant>)>,
}

const REFRESH_EVERY: Duration = Duration::from_secs(10);
const MISS_REFRESH_MIN: Duration = Duration::from_secs(1);

impl TokenCache {
    pub fn new(db: Database, node: String) -> TokenCache {
        TokenCache { db, node, inner: RwLock::new((HashMap::new(), None)) }
    }

    async fn refresh(&self) -> Result<(), sqlx::Error> {
        let tokens = all(&self.db, &self.node).await?;
        let map = tokens.into_iter().filter(|(_, i)| i.revoked_unix_ms.is_none()).collect();
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = (map, Some(Instant::now()));
        Ok(())
    }

    /// The token's info if it is valid. Errors only if the database is needed and down.
    pub async fn check(&self, secret: &str) -> Result<Option<TokenInfo>, sqlx::Error> {
        let h = hash(secret);
        let (hit, age) = {
            let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
            (g.0.get(&h).cloned(), g.1.map(|t| t.elapsed()))
        };
        let stale = age.is_none_or(|a| a > REFRESH_EVERY);
        let may_refresh_on_miss = age.is_none_or(|a| a > MISS_REFRESH_MIN);
        if stale || (hit.is_none() && may_refresh_on_miss) {
            match self.refresh().await {
                Ok(()) => {}
                // A known token keeps working while the database is down.
                Err(_) if hit.is_some() => return Ok(hit),
                Err(e) => return Err(e),
            }
            return Ok(self.inner.read().unwrap_or_else(|p| p.into_inner()).0.get(&h).cloned());
        }
        Ok(hit)
    }
}
