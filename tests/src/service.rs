//! Servers the tests start through `scripts/garage.sh` and `scripts/moto.sh`:
//! running the script, reading the settings it writes, stopping by PID.
//! The scripts make each server stop by itself when the test process exits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `scripts/NAME` in the repository.
pub fn script(name: &str) -> PathBuf {
    crate::guest::repo_root().join("scripts").join(name)
}

/// Run `bash scripts/NAME ARGS...`, watched by this process; its standard
/// output, or Err with its standard error.
pub fn run_script(name: &str, args: &[&str]) -> Result<String, String> {
    let o = Command::new("bash")
        .arg(script(name))
        .args(args)
        .env("VMA_SERVICE_OWNER", std::process::id().to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running scripts/{name}: {e}"))?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(format!(
            "scripts/{name} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// `KEY=VALUE` lines.
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Whether the process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The PID in a pid file, if the file exists.
pub fn read_pid(pidfile: &Path) -> Option<i32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// Stop the process named by `pidfile` (SIGTERM, SIGKILL after `grace`)
/// and remove the file.
pub fn stop_pidfile(pidfile: &Path, grace: Duration) {
    if let Some(pid) = read_pid(pidfile) {
        // SAFETY: kill(2) with a PID read from our own pid file.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = std::fs::remove_file(pidfile);
}
