//! A training run's directory, held by one process at a time.
//!
//! `RunDir::open` takes an advisory lock on `DIR/.lock` (holding the PID), so a
//! second `train` on the same directory is refused instead of interleaving its
//! checkpoints and metrics with the first; removes the temporary files that killed
//! atomic writes left behind (`checkpoint::temporary_sibling`); and,
//! when the run fails before writing anything, removes the directory again if it
//! created it, so a failed command leaves no empty run directory.
//!
//! The lock file itself is never deleted while in use: a process waiting on the
//! old file and one creating a new one could otherwise both hold "the" lock.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

const LOCK: &str = ".lock";

pub struct RunDir {
    pub path: PathBuf,
    /// Held open for the run: closing it releases the lock (None: `of_rank_0`).
    _lock: Option<File>,
    created: bool,
}

impl RunDir {
    /// Creates (if needed), locks and cleans `path`. Errors name the directory.
    pub fn open(path: &Path) -> Result<RunDir> {
        let shown = path.display();
        if path.exists() && !path.is_dir() {
            bail!("{shown}: exists and is not a directory (--out names the run directory)");
        }
        let created = !path.exists();
        std::fs::create_dir_all(path).with_context(|| format!("{shown}: cannot create the output directory"))?;
        let opened = (|| -> Result<File> {
            let lock_path = path.join(LOCK);
            let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&lock_path).with_context(|| format!("{shown}: output directory is not writable"))?;
            match f.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut pid = String::new();
                    f.read_to_string(&mut pid).ok();
                    let who = pid.trim().parse::<u32>().map(|p| format!(" (PID {p})")).unwrap_or_default();
                    bail!("{shown}: another training run{who} is using this directory; wait for it to end, or choose another --out");
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("{}: cannot lock", lock_path.display())),
            }
            f.set_len(0).and_then(|_| f.rewind()).and_then(|_| writeln!(f, "{}", std::process::id())).with_context(|| format!("{}: cannot write", lock_path.display()))?;
            Ok(f)
        })();
        let lock = match opened {
            Ok(f) => f,
            Err(e) => {
                if created {
                    std::fs::remove_dir_all(path).ok();
                }
                return Err(e);
            }
        };
        let removed = remove_stale_temporaries(path);
        if removed > 0 {
            eprintln!("note: {shown}: removed {removed} temporary file(s) left by an interrupted write");
        }
        Ok(RunDir { path: path.to_path_buf(), _lock: Some(lock), created })
    }

    /// The run directory as the other processes of a data-parallel run see
    /// it: rank 0's path (for messages), neither created, locked nor written
    /// (rank 0 alone writes; on another machine the path need not exist).
    pub fn of_rank_0(path: &Path) -> RunDir {
        RunDir { path: path.to_path_buf(), _lock: None, created: false }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // A directory this run created and never wrote into: remove it (and its lock).
        if !self.created {
            return;
        }
        let only_lock = std::fs::read_dir(&self.path).map(|d| d.filter_map(|e| e.ok()).all(|e| e.file_name() == LOCK)).unwrap_or(false);
        if only_lock {
            std::fs::remove_file(self.path.join(LOCK)).ok();
            std::fs::remove_dir(&self.path).ok();
        }
    }
}

/// Removes `write_atomic`'s leftovers in `dir` (the caller holds the directory's
/// lock, so no live write of this run is among them); returns how many.
fn remove_stale_temporaries(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.filter_map(|e| e.ok()).filter(|e| e.file_name().to_str().is_some_and(crate::checkpoint::is_temporary) && e.path().is_file()).filter(|e| std::fs::remove_file(e.path()).is_ok()).count()
}
