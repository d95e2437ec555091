//! `vma serve` as a child process for the tests: started on a unix
//! socket, stopped with SIGTERM (or killed) and checked to exit cleanly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{p, vma_bin};

/// A running `vma serve`.
pub struct Served {
    child: Option<Child>,
    /// Its unix socket.
    pub socket: PathBuf,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Served {
    /// `vma serve ARCHIVE --socket SOCKET EXTRA...`, waited for until it
    /// says it is ready (panics with its messages if it does not).
    pub fn start(archive: &Path, socket: &Path, extra: &[&str]) -> Served {
        let log = socket.with_extension("log");
        let err = std::fs::File::create(&log).expect("create serve log");
        let mut cmd = Command::new(vma_bin());
        cmd.arg("serve")
            .arg(archive)
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        let child = cmd.spawn().expect("start vma serve");
        let mut s = Served {
            child: Some(child),
            socket: socket.to_path_buf(),
            log,
        };
        let start = Instant::now();
        loop {
            if s.messages().contains("ready;") {
                return s;
            }
            if let Some(status) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("vma serve exited with {status}: {}", s.messages());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "vma serve not ready after 60 s: {}",
                s.messages()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it wrote on stderr so far.
    pub fn messages(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The NBD URL of export `name`.
    pub fn url(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", p(&self.socket))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM, then its exit code (panics if it does not exit in 30 s).
    pub fn stop(mut self) -> i32 {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("vma serve did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (leaves its socket file behind).
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
