//! The run log: each line goes to stderr and is appended, time-stamped, to a file
//! in the run directory (`<logdir>/<name>/<file>`), as the original's `train.log`.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// An append-only log file that echoes to stderr.
pub struct RunLog {
    path: PathBuf,
    /// `None`: a silent log (the non-zero ranks of a data-parallel run).
    file: Option<Mutex<File>>,
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a Unix time.
pub fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl RunLog {
    /// Opens (creating the directory and file) `dir/file` for appending.
    pub fn open(dir: &Path, file: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create run directory {}", dir.display()))?;
        let path = dir.join(file);
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open log {}", path.display()))?;
        Ok(RunLog {
            path,
            file: Some(Mutex::new(f)),
        })
    }

    /// A log that writes nothing, neither to a file nor to stderr.
    pub fn silent() -> Self {
        RunLog {
            path: PathBuf::new(),
            file: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one line to stderr and to the file.
    pub fn line(&self, msg: impl AsRef<str>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Some(file) = &self.file else {
            return;
        };
        let msg = msg.as_ref();
        eprintln!("{msg}");
        if let Ok(mut f) = file.lock() {
            let _ = writeln!(f, "[{}] {msg}", utc_timestamp(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01 00:00:00");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_timestamp(1_795_745_722), "2026-11-27 02:15:22");
    }

    #[test]
    fn appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = RunLog::open(&dir.path().join("run"), "x.log").unwrap();
        log.line("first");
        let log = RunLog::open(&dir.path().join("run"), "x.log").unwrap();
        log.line("second");
        let text = std::fs::read_to_string(log.path()).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains("] first") && text.contains("] second"));
    }
}
