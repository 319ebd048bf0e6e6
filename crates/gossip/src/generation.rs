//! A node's process generation: each run of a node announces a generation larger than any
//! earlier run's, so peers drop the old run's entries and never the new run's.
//!
//! The generation is one more than the last one stored in a file the node keeps (its data dir),
//! written back before gossip starts. It is never below the wall clock in milliseconds, which
//! only matters when the file is new; a clock that steps back cannot make a later run look
//! older, since the stored value wins then.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The last generation handed out in this process, for runs without a file (tests, sims): a
/// restart within the process still moves forward.
static LAST: AtomicU64 = AtomicU64::new(0);

fn wall_clock_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The generation of a run that starts now, stored in `file` (mode 0600) when given. Fails only
/// when the file exists but cannot be read as a number, or cannot be written: starting with a
/// generation that a later run might repeat is worse than not starting.
pub fn next(file: Option<&Path>) -> io::Result<u64> {
    let floor = wall_clock_ms();
    let Some(path) = file else {
        let prev = LAST
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| Some(last.max(floor) + 1))
            .unwrap_or_else(|last| last);
        return Ok(prev.max(floor) + 1);
    };
    let stored = match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse::<u64>().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} does not hold a generation: {e}", path.display()),
            )
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let next = stored.saturating_add(1).max(floor);
    let tmp = path.with_extension("new");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{next}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_run_is_larger_even_when_the_stored_value_is_ahead_of_the_clock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gen");
        let first = next(Some(&path)).expect("new file");
        let second = next(Some(&path)).expect("existing file");
        assert!(second > first);
        // As if the clock had stepped back a day since the last run.
        let ahead = wall_clock_ms() + 86_400_000;
        std::fs::write(&path, format!("{ahead}\n")).expect("write");
        assert_eq!(next(Some(&path)).expect("ahead"), ahead + 1);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("stat").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_file_is_an_error_and_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gen");
        std::fs::write(&path, "not a number").expect("write");
        assert!(next(Some(&path)).is_err());
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "not a number");
    }

    #[test]
    fn without_a_file_runs_in_one_process_move_forward() {
        let a = next(None).expect("no file");
        let b = next(None).expect("no file");
        assert!(b > a);
    }
}
