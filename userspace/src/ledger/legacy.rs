//! After an upgrade from a version with the per-CPU client map: one more reading of that map
//! under its own epoch (the cursors it stored continue), a flush, then the map is unpinned.

use std::{path::Path, sync::Arc};

use tracing::info;

use super::{Ledger, source::LegacySource};
use crate::bpf::loader::LoadError;

#[derive(Debug, thiserror::Error)]
pub enum CarryOverError {
    #[error("reading the earlier version's client map: {0}")]
    Read(#[from] LoadError),
    #[error("writing its counts (the map is kept and read again): {0}")]
    Write(#[from] sqlx::Error),
    #[error("unpinning it: {0}")]
    Unpin(#[from] std::io::Error),
}

impl Ledger {
    /// Carry the legacy map's counts over if it is still pinned under `pin_dir`; true if it
    /// was. Must run before the first poll of the new map: once the new epoch is written, a
    /// reading of the old map would start its cursors from zero and count it again. A failed
    /// attempt keeps the map, and repeating it is exact (its cursors have moved).
    pub async fn carry_over_legacy(&self, pin_dir: &Path) -> Result<bool, CarryOverError> {
        let Some(legacy) = LegacySource::find(pin_dir) else { return Ok(false) };
        let legacy = Arc::new(legacy);
        self.poll_from(legacy.clone()).await?;
        let rows = self.flush().await?;
        legacy.remove()?;
        info!(rows, "the earlier version's per-CPU client map was read, written and unpinned");
        Ok(true)
    }
}
