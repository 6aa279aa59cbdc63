//! The database: SQLite (a file in the state directory) by default, PostgreSQL by URL, opened
//! with the schema of `migrations/` applied. A SQLite file and its -wal/-shm are made 0600.
//!
//! One schema serves both (`migrations/`, portable SQL), applied at start-up. Queries use `$N`
//! placeholders, which both drivers accept, through sqlx's `Any` driver.

use std::{path::Path, str::FromStr as _, time::Duration};

use sqlx::{
    AnyPool, Executor as _,
    any::{AnyConnectOptions, AnyPoolOptions},
};
use tracing::info;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("bad database_url {url:?}: expected sqlite://PATH or postgres://USER@HOST/DB ({reason})")]
    BadUrl { url: String, reason: String },
    #[error("cannot open database {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("migrating database {url}: {source}")]
    Migrate { url: String, source: sqlx::migrate::MigrateError },
    #[error("cannot make {path} private (mode 0600): {source}")]
    Mode { path: std::path::PathBuf, source: std::io::Error },
    #[error("database: {0}")]
    Query(#[from] sqlx::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Database {
    pub pool: AnyPool,
    /// One connection, the ledger's flushes only (`ledger::store::BatchWriter`): the database
    /// takes one writer at a time anyway, and each connection that ran a flush keeps the
    /// flush's large prepared statements (a 500-row upsert is 0.75 MiB in SQLite), so one
    /// connection holds them instead of every pooled one.
    pub writer: AnyPool,
    pub backend: Backend,
    /// The URL without its password, for messages.
    pub shown_url: String,
}

/// The default URL: `tunmeter.db` in the state directory.
pub fn default_url(state_dir: &Path) -> String {
    format!("sqlite://{}/tunmeter.db?mode=rwc", state_dir.display())
}

/// Hide a password in `scheme://user:password@host/...`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

impl Database {
    /// Connect (creating a SQLite file if needed) and apply pending migrations.
    pub async fn open(url: &str) -> Result<Database, DbError> {
        sqlx::any::install_default_drivers();
        let shown_url = redact(url);
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(DbError::BadUrl { url: shown_url, reason: "unknown scheme".into() });
        };
        let sqlite_file = if backend == Backend::Sqlite { sqlite_path(url) } else { None };
        if let Some(path) = &sqlite_file {
            // Created here (0600) only where sqlx would create it (`mode=rwc`) and its directory
            // exists; otherwise sqlx reports the missing file or directory as before.
            let create =
                url.contains("mode=rwc") && path.parent().is_none_or(|d| d.as_os_str().is_empty() || d.is_dir());
            if path.exists() || create {
                private_file(path).map_err(|e| DbError::Mode { path: path.clone(), source: e })?;
            }
        }
        let opts = AnyConnectOptions::from_str(url)
            .map_err(|e| DbError::BadUrl { url: shown_url.clone(), reason: e.to_string() })?;
        let pool = pool_options(backend, if backend == Backend::Sqlite { 4 } else { 8 })
            .connect_with(opts.clone())
            .await
            .map_err(|source| DbError::Connect { url: shown_url.clone(), source })?;
        MIGRATOR.run(&pool).await.map_err(|source| DbError::Migrate { url: shown_url.clone(), source })?;
        let writer = pool_options(backend, 1)
            .connect_with(opts)
            .await
            .map_err(|source| DbError::Connect { url: shown_url.clone(), source })?;
        if let Some(path) = &sqlite_file {
            // SQLite gives -wal and -shm the database file's mode; older versions left 0644 ones.
            for suffix in ["-wal", "-shm"] {
                let mut side = path.clone().into_os_string();
                side.push(suffix);
                let side = std::path::PathBuf::from(side);
                if side.exists() {
                    private_file(&side).map_err(|e| DbError::Mode { path: side.clone(), source: e })?;
                }
            }
        }
        info!(url = %shown_url, ?backend, "database ready");
        Ok(Database { pool, writer, backend, shown_url })
    }
}

/// A pool of at most `max` connections, each set up for `backend`.
fn pool_options(backend: Backend, max: u32) -> AnyPoolOptions {
    AnyPoolOptions::new().max_connections(max).acquire_timeout(Duration::from_secs(5)).after_connect(move |conn, _| {
        Box::pin(async move {
            if backend == Backend::Sqlite {
                // WAL: readers (API, CLI) never block the writer; a busy writer waits
                // up to 5 s instead of failing at once.
                conn.execute("PRAGMA journal_mode = WAL").await?;
                conn.execute("PRAGMA synchronous = NORMAL").await?;
                conn.execute("PRAGMA busy_timeout = 5000").await?;
                conn.execute("PRAGMA foreign_keys = ON").await?;
            }
            Ok(())
        })
    })
}

/// The file of a `sqlite:` URL (`sqlite://PATH?...`, `sqlite:PATH`), unless in memory.
fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or("");
    (!path.is_empty() && !path.starts_with(":memory:")).then(|| path.into())
}

/// Create `path` with mode 0600, or take an existing file down to 0600 (it holds usernames,
/// real addresses and token hashes).
///
/// An existing file is changed by path (chmod), never opened: SQLite holds POSIX locks on the
/// database, -wal and -shm files, and closing any descriptor of one of them in this process
/// would drop every lock the process holds on it. Another process (a `sqlite3` shell, a second
/// daemon or CLI) could then take the -shm as its first user and truncate it under this
/// process's mapping (SIGBUS).
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    if path.exists() {
        return std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    match std::fs::File::options().write(true).create_new(true).mode(0o600).open(path) {
        Ok(f) => f.set_permissions(std::fs::Permissions::from_mode(0o600)),
        // Created meanwhile by someone else: chmod it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        }
        Err(e) => Err(e),
    }
}

/// Store a u64 counter in a BIGINT (saturating: 2^63 bytes is 8 EiB).
pub fn to_db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Read a BIGINT counter back (negative values cannot be written; treat as 0).
pub fn from_db(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:///var/lib/x.db"), "sqlite:///var/lib/x.db");
    }

    #[test]
    fn sqlite_paths() {
        assert_eq!(sqlite_path("sqlite:///var/lib/t.db?mode=rwc"), Some("/var/lib/t.db".into()));
        assert_eq!(sqlite_path("sqlite:rel.db"), Some("rel.db".into()));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://h/db"), None);
    }
}
