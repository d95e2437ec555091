//! moto's S3 server on loopback (`scripts/moto.sh`), for the protocol paths
//! Garage does not implement: Object Lock and conditional PUT. A mock, used
//! only for those paths; it stops when the [`Moto`] is dropped or the test
//! process exits.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::s3::S3;
use crate::service::{parse_env, run_script, stop_pidfile};

/// A running moto server.
pub struct Moto {
    dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
}

impl Moto {
    /// Start a server, installing moto first when missing
    /// (`scripts/moto.sh install`, which `scripts/setup.sh` runs).
    pub fn start() -> Moto {
        if let Err(e) = run_script("moto.sh", &["install"]) {
            panic!("{e}");
        }
        let dir = tempfile::Builder::new()
            .prefix("vma-moto")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().to_string_lossy().into_owned();
        let out = run_script("moto.sh", &["start", &path]).unwrap_or_else(|e| panic!("{e}"));
        Moto {
            dir,
            env: parse_env(&out),
        }
    }

    fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .unwrap_or_else(|| panic!("scripts/moto.sh start did not print {name}"))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        self.var("AWS_ENDPOINT_URL")
    }

    /// How long the server took to accept connections.
    pub fn start_time(&self) -> Duration {
        Duration::from_millis(self.var("MOTO_START_MS").parse().unwrap_or(0))
    }

    /// The standard `AWS_*` variables for a command using this store.
    pub fn aws_env(&self) -> Vec<(String, String)> {
        [
            "AWS_ENDPOINT_URL",
            "AWS_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ]
        .iter()
        .map(|k| (k.to_string(), self.var(k).to_string()))
        .collect()
    }

    /// A signing client.
    pub fn s3(&self) -> S3 {
        S3::new(
            self.endpoint(),
            self.var("AWS_REGION"),
            self.var("AWS_ACCESS_KEY_ID"),
            self.var("AWS_SECRET_ACCESS_KEY"),
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        stop_pidfile(&self.dir.path().join("pid"), Duration::from_secs(5));
    }
}
