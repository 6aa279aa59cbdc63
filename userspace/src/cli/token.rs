//! `tunmeter token create|list|revoke`: API bearer tokens, straight in the ledger database
//! (no daemon needed).

use anyhow::Context as _;
use clap::Subcommand;

use super::args::SettingsArgs;
use crate::{db, tokens};

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a token and print it (only this once: the database keeps its hash).
    Create {
        /// read: every GET; admin: also resets and changes.
        #[arg(long, value_enum)]
        role: tokens::Role,
        /// A label, e.g. who uses it.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Revoke a token by id.
    Revoke {
        id: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
}

pub async fn token(cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create { role, name, settings } => {
            let cfg = settings.load()?;
            if cfg.ledger.database_url.starts_with("sqlite:") {
                // Before the daemon's first start the state directory may not exist yet.
                crate::bpf::system::private_dir(&cfg.state_dir)
                    .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
            }
            let db = db::Database::open(&cfg.ledger.database_url).await?;
            let (info, secret) = tokens::create(&db, &cfg.node_id, role, &name).await?;
            eprintln!(
                "created {} token {} for node {} (shown once; store it now):",
                role.as_str(),
                info.id,
                cfg.node_id
            );
            println!("{secret}");
        }
        TokenCmd::List { settings } => {
            let cfg = settings.load()?;
            let db = db::Database::open(&cfg.ledger.database_url).await?;
            for t in tokens::list(&db, &cfg.node_id).await? {
                let state = if t.revoked_unix_ms.is_some() { "revoked" } else { "active" };
                println!("{}  {:<5}  {:<7}  {}", t.id, t.role.as_str(), state, t.name);
            }
        }
        TokenCmd::Revoke { id, settings } => {
            let cfg = settings.load()?;
            let db = db::Database::open(&cfg.ledger.database_url).await?;
            if !tokens::revoke(&db, &cfg.node_id, &id).await? {
                anyhow::bail!("no active token {id} on node {}", cfg.node_id);
            }
            eprintln!("revoked {id}");
        }
    }
    Ok(())
}
