//! SQLite for the store tests: a fresh database file per test, and SQLite "down" (another
//! process, the sqlite3 CLI, holds the write lock, as a stuck backup or a full disk would stop
//! writes; released on drop).

use std::io::{BufRead as _, Write as _};

/// A fresh SQLite database `<tmp>/tmtest-<tag>-<pid>/t.db`, its directory removed on drop.
pub struct SqliteFile {
    dir: std::path::PathBuf,
    pub path: std::path::PathBuf,
    /// `sqlite://<path>?mode=rwc`
    pub url: String,
}

impl SqliteFile {
    pub fn new(tag: &str) -> SqliteFile {
        let dir = std::env::temp_dir().join(format!("tmtest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let path = dir.join("t.db");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        SqliteFile { dir, path, url }
    }
}

impl Drop for SqliteFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct SqliteLock(std::process::Child);

impl SqliteLock {
    /// Take the exclusive lock of the database file `db` (waits until it has it).
    pub fn take(db: &std::path::Path) -> SqliteLock {
        let mut child = std::process::Command::new("sqlite3")
            .arg(db)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sqlite3 CLI (cargo xtask setup installs it)");
        let stdin = child.stdin.as_mut().unwrap();
        writeln!(stdin, "PRAGMA busy_timeout = 10000; BEGIN EXCLUSIVE; SELECT 'locked';").unwrap();
        stdin.flush().unwrap();
        // (The PRAGMA echoes its value first.)
        let mut out = std::io::BufReader::new(child.stdout.as_mut().unwrap());
        let mut line = String::new();
        for _ in 0..3 {
            line.clear();
            out.read_line(&mut line).unwrap();
            if line.trim() == "locked" {
                break;
            }
        }
        assert_eq!(line.trim(), "locked", "sqlite3 did not take the lock");
        SqliteLock(child)
    }
}

impl Drop for SqliteLock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
