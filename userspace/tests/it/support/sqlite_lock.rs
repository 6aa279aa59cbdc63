//! SQLite "down": another process (the sqlite3 CLI) holds the write lock, as a stuck backup or
//! a full disk would stop writes. Released on drop.

use std::io::{BufRead as _, Write as _};

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
