//! A three-node Garage cluster on loopback (`scripts/garage.sh`):
//! replication factor 3, one zone per node, LMDB metadata, each node's data
//! under the cluster's temporary directory, an access key and the bucket
//! `vma-test`. Nodes can be killed and restarted; all stop when the
//! [`Garage`] is dropped or the test process exits.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::s3::S3;
use crate::service::{parse_env, read_pid, run_script, stop_pidfile};

/// A running cluster.
pub struct Garage {
    dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
}

impl Garage {
    /// Start a cluster. Panics with what to run when the Garage binary is
    /// not built (`scripts/garage.sh build`, which `scripts/setup.sh` runs).
    pub fn start() -> Garage {
        if let Err(e) = run_script("garage.sh", &["bin"]) {
            panic!("{e}");
        }
        let dir = tempfile::Builder::new()
            .prefix("vma-garage")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().to_string_lossy().into_owned();
        let out = match run_script("garage.sh", &["start", &path]) {
            Ok(out) => out,
            Err(e) => {
                let _ = run_script("garage.sh", &["stop", &path]);
                panic!("starting the Garage cluster: {e}");
            }
        };
        Garage {
            dir,
            env: parse_env(&out),
        }
    }

    fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .unwrap_or_else(|| panic!("scripts/garage.sh start did not print {name}"))
    }

    /// S3 endpoint of node 1 (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> &str {
        self.var("AWS_ENDPOINT_URL")
    }

    /// S3 endpoints of nodes 1, 2 and 3; any node answers for the cluster.
    pub fn endpoints(&self) -> Vec<String> {
        self.var("GARAGE_S3_ENDPOINTS")
            .split(',')
            .map(str::to_string)
            .collect()
    }

    /// The region to sign with.
    pub fn region(&self) -> &str {
        self.var("AWS_REGION")
    }

    /// Access key id (owner of the bucket).
    pub fn key_id(&self) -> &str {
        self.var("AWS_ACCESS_KEY_ID")
    }

    /// Secret access key.
    pub fn secret(&self) -> &str {
        self.var("AWS_SECRET_ACCESS_KEY")
    }

    /// The bucket created for the tests.
    pub fn bucket(&self) -> &str {
        self.var("VMA_TEST_BUCKET")
    }

    /// How long the cluster took to start and be laid out.
    pub fn start_time(&self) -> Duration {
        Duration::from_millis(self.var("GARAGE_START_MS").parse().unwrap_or(0))
    }

    /// The standard `AWS_*` variables for a command using this store
    /// (endpoint of node 1).
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

    /// A signing client for node `n` (1-3).
    pub fn s3(&self, n: usize) -> S3 {
        S3::new(
            &self.endpoints()[n - 1],
            self.region(),
            self.key_id(),
            self.secret(),
        )
    }

    /// SIGKILL node `n` (1-3).
    pub fn kill_node(&self, n: usize) {
        let path = self.dir.path().to_string_lossy();
        if let Err(e) = run_script("garage.sh", &["kill", &path, &n.to_string()]) {
            panic!("{e}");
        }
    }

    /// Start node `n` again (its data kept) and wait until it answers.
    pub fn restart_node(&self, n: usize) {
        let path = self.dir.path().to_string_lossy();
        if let Err(e) = run_script("garage.sh", &["restart", &path, &n.to_string()]) {
            panic!("{e}");
        }
    }

    /// PID of node `n`'s server, while it runs.
    pub fn node_pid(&self, n: usize) -> Option<i32> {
        read_pid(&self.pidfile(n))
    }

    fn pidfile(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("node{n}/pid"))
    }

    /// A node's log file.
    pub fn log(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("node{n}/log"))
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for n in 1..=3 {
            stop_pidfile(&self.pidfile(n), Duration::from_secs(5));
        }
    }
}
