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

/// Valid tokens by hash, refreshed from the database every `REFRESH_EVERY` and on an unknown
/// token. Whatever happens, the database is asked at most once per `MISS_REFRESH_MIN` (so
/// neither guessing nor a database outage turns every request into a query), and a revoked
/// token stops working within `REFRESH_EVERY` while the database answers, and within
/// `MAX_STALE` while it does not (after that, every request gets 503).
pub struct TokenCache {
    db: Database,
    node: String,
    inner: RwLock<Cached>,
    /// One refresh at a time: concurrent requests wait for it instead of each querying.
    refreshing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Cached {
    tokens: HashMap<String, TokenInfo>,
    /// The latest successful refresh.
    loaded: Option<Instant>,
    /// When the latest attempt ended, successful or not.
    tried: Option<Instant>,
    /// Attempts ended so far: a request that waited for a refresh sees it changed and does not
    /// query again.
    attempts: u64,
}

pub const REFRESH_EVERY: Duration = Duration::from_secs(10);
const MISS_REFRESH_MIN: Duration = Duration::from_secs(1);
/// How long cached tokens stay valid while the database cannot be read.
pub const MAX_STALE: Duration = Duration::from_secs(60);

/// Why a token could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("the token list could not be read for {stale_secs} s (database: {last})")]
    Stale { stale_secs: u64, last: String },
    #[error("{0}")]
    Db(#[from] sqlx::Error),
}

impl TokenCache {
    pub fn new(db: Database, node: String) -> TokenCache {
        TokenCache { db, node, inner: RwLock::new(Cached::default()), refreshing: tokio::sync::Mutex::new(()) }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cached> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    async fn refresh(&self) -> Result<(), sqlx::Error> {
        let read = all(&self.db, &self.node).await;
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        g.tried = Some(Instant::now());
        g.attempts += 1;
        let tokens = read?;
        g.tokens = tokens.into_iter().filter(|(_, i)| i.revoked_unix_ms.is_none()).collect();
        g.loaded = g.tried;
        Ok(())
    }

    /// The token's info if it is valid. Errors only if the database is needed and cannot be read.
    pub async fn check(&self, secret: &str) -> Result<Option<TokenInfo>, CheckError> {
        self.check_hash(&hash(secret)).await
    }

    /// `check` by the token's SHA-256 (a live stream re-checks the token it opened with).
    ///
    /// A hit in a list read within `REFRESH_EVERY` answers at once. Otherwise (an older list,
    /// or a token not in it) the list is read again, by one request at a time, and not within
    /// `MISS_REFRESH_MIN` of the end of the last attempt; requests that waited for that read
    /// use its result. The answer comes from a list at most `MAX_STALE` old, or is an error.
    pub async fn check_hash(&self, h: &str) -> Result<Option<TokenInfo>, CheckError> {
        let (hit, fresh, recently_tried, attempts) = {
            let g = self.read();
            (
                g.tokens.get(h).cloned(),
                g.loaded.is_some_and(|l| l.elapsed() <= REFRESH_EVERY),
                g.tried.is_some_and(|t| t.elapsed() <= MISS_REFRESH_MIN),
                g.attempts,
            )
        };
        if fresh && hit.is_some() {
            return Ok(hit);
        }
        let mut err = None;
        if !recently_tried {
            let _one = self.refreshing.lock().await;
            if self.read().attempts == attempts {
                err = self.refresh().await.err();
            }
        }
        let g = self.read();
        match g.loaded {
            Some(l) if l.elapsed() <= MAX_STALE => Ok(g.tokens.get(h).cloned()),
            loaded => Err(Self::stale(loaded, err)),
        }
    }

    fn stale(loaded: Option<Instant>, err: Option<sqlx::Error>) -> CheckError {
        match (loaded, err) {
            (None, Some(e)) => CheckError::Db(e),
            (loaded, e) => CheckError::Stale {
                stale_secs: loaded.map_or(0, |l| l.elapsed().as_secs()),
                last: e.map_or_else(|| "unreachable".to_string(), |e| e.to_string()),
            },
        }
    }

    /// Pretend the last successful refresh was `ago` ago (tests of the staleness bound).
    #[cfg(test)]
    fn age_for_test(&self, ago: Duration) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let t = Instant::now().checked_sub(ago);
        g.loaded = t;
        g.tried = t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn revocation_and_a_database_outage_are_bounded() {
        let path = std::env::temp_dir().join(format!("tm-tokens-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let db = Database::open(&format!("sqlite://{}?mode=rwc", path.display())).await.unwrap();
        let (_, keep) = create(&db, "n", Role::Read, "keep").await.unwrap();
        let (gone, gone_secret) = create(&db, "n", Role::Admin, "gone").await.unwrap();
        let cache = std::sync::Arc::new(TokenCache::new(db.clone(), "n".into()));
        // Requests at start-up, all at once: one reads the list, the others wait for it (none
        // is refused because another's read was under way).
        let many: Vec<_> = (0..8)
            .map(|_| {
                let (c, k) = (cache.clone(), keep.clone());
                tokio::spawn(async move { c.check(&k).await.map(|i| i.is_some()) })
            })
            .collect();
        for m in many {
            assert!(m.await.unwrap().unwrap(), "a concurrent first check");
        }
        assert_eq!(cache.read().attempts, 1, "one read for all of them");
        assert_eq!(cache.check(&gone_secret).await.unwrap().map(|i| i.role), Some(Role::Admin));
        assert!(cache.check("tm_guess").await.unwrap().is_none());
        // Revoked: refused at the next refresh.
        assert!(revoke(&db, "n", &gone.id).await.unwrap());
        cache.age_for_test(REFRESH_EVERY + Duration::from_secs(1));
        assert!(cache.check(&gone_secret).await.unwrap().is_none(), "a revoked token still works");
        // Database gone: cached tokens work up to MAX_STALE, then every request is refused.
        db.pool.close().await;
        cache.age_for_test(MAX_STALE - Duration::from_secs(5));
        assert!(cache.check(&keep).await.unwrap().is_some(), "a cached token during a short outage");
        cache.age_for_test(MAX_STALE + Duration::from_secs(1));
        let e = cache.check(&keep).await.unwrap_err();
        assert!(matches!(e, CheckError::Stale { .. }), "{e}");
        // ... and within the second after a failed attempt, without asking the database again.
        let e = cache.check(&keep).await.unwrap_err();
        assert!(matches!(e, CheckError::Stale { .. }), "{e}");
        let _ = std::fs::remove_file(&path);
    }
}
