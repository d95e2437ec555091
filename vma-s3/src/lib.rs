//! vma-s3: archives as objects in S3-compatible stores, behind vma-core's
//! storage seam ([`vma_core::storage`]).
//!
//! - Locations are `s3://BUCKET/KEY`; a prefix is `s3://BUCKET/DIR`.
//! - Reading ([`read::ObjectSource`]): the tail by one suffix range, then
//!   1 MiB blocks by ranged GETs, coalesced and issued in parallel, read
//!   ahead when reads are sequential, kept in a bounded cache.
//! - Writing ([`write::Upload`]): a streamed multipart upload with bounded
//!   memory, visible only once completed, aborted on failure, drop or signal.
//! - Configuration as S3 tools do it ([`config`]): `AWS_*` variables,
//!   `~/.aws/credentials` and `~/.aws/config` profiles, an endpoint
//!   override, path-style addressing. Secrets are never printed.
//!
//! The crate owns a small tokio runtime; its API is blocking.

#![warn(missing_docs)]

pub mod config;
pub mod read;
pub mod write;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::aws::AmazonS3;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};

pub use config::Settings;

/// Errors of object storage, naming the object and what the store answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not an `s3://BUCKET/KEY` location.
    #[error("{0:?} is not an object location: write s3://BUCKET/KEY")]
    BadLocation(String),
    /// The client could not be configured.
    #[error("configuring access to {location}: {message}")]
    Config {
        /// The location asked for.
        location: String,
        /// What is wrong.
        message: String,
    },
    /// A request failed for good (after retries).
    #[error("{location}{range}: {what}: {answer}")]
    Store {
        /// The object.
        location: String,
        /// ` bytes A..B` when a byte range was asked for.
        range: String,
        /// The operation.
        what: String,
        /// The store's answer.
        answer: String,
    },
}

impl From<Error> for vma_core::Error {
    fn from(e: Error) -> Self {
        vma_core::Error::io("object storage", std::io::Error::other(e))
    }
}

/// A parsed `s3://BUCKET/KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Bucket name.
    pub bucket: String,
    /// Key (may be empty for the bucket's root as a prefix).
    pub key: String,
}

impl Location {
    /// Parse `s3://BUCKET/KEY`.
    pub fn parse(s: &str) -> Result<Location, Error> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| Error::BadLocation(s.into()))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() || key.starts_with('/') || key.contains("//") {
            return Err(Error::BadLocation(s.into()));
        }
        Ok(Location {
            bucket: bucket.into(),
            key: key.trim_end_matches('/').into(),
        })
    }

    /// Parse a location given as a path.
    pub fn from_path(p: &Path) -> Result<Location, Error> {
        Location::parse(&p.to_string_lossy())
    }

    /// The key as the client wants it.
    pub(crate) fn obj(&self) -> ObjPath {
        ObjPath::from(self.key.as_str())
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// True when `s` is an `s3://` location.
pub fn is_s3(s: &str) -> bool {
    s.starts_with("s3://")
}

pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        // reqwest is built without a default TLS provider: use ring's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .thread_name("vma-s3")
            .enable_all()
            .build()
            .expect("starting the object storage runtime")
    })
}

/// Run a future on the crate's runtime, blocking the calling thread. A
/// caller inside another runtime's task (a file system or NBD handler) may
/// not start a runtime there, so the wait moves to a helper thread.
pub(crate) fn block_on<F>(f: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return runtime().block_on(f);
    }
    std::thread::scope(|s| {
        s.spawn(|| runtime().block_on(f))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A client for one bucket.
pub(crate) struct Bucket {
    pub(crate) store: Arc<AmazonS3>,
    pub(crate) settings: Settings,
    pub(crate) http: reqwest::Client,
}

/// The client of `bucket`, built once from the settings in force.
pub(crate) fn bucket(loc: &Location) -> Result<Arc<Bucket>, Error> {
    static BUCKETS: OnceLock<Mutex<HashMap<String, Arc<Bucket>>>> = OnceLock::new();
    let map = BUCKETS.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = map.get(&loc.bucket) {
        return Ok(b.clone());
    }
    // Before any client is built: the runtime installs the TLS provider.
    let _ = runtime();
    let settings = Settings::resolve().map_err(|message| Error::Config {
        location: loc.to_string(),
        message,
    })?;
    let store = settings
        .builder(&loc.bucket)
        .build()
        .map_err(|e| Error::Config {
            location: loc.to_string(),
            message: e.to_string(),
        })?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| Error::Config {
            location: loc.to_string(),
            message: e.without_url().to_string(),
        })?;
    let b = Arc::new(Bucket {
        store: Arc::new(store),
        settings,
        http,
    });
    map.insert(loc.bucket.clone(), b.clone());
    Ok(b)
}

pub(crate) fn store_error(
    loc: &Location,
    range: Option<std::ops::Range<u64>>,
    what: &str,
    e: impl std::fmt::Display,
) -> Error {
    Error::Store {
        location: loc.to_string(),
        range: range
            .map(|r| format!(" bytes {}..{}", r.start, r.end))
            .unwrap_or_default(),
        what: what.into(),
        answer: e.to_string(),
    }
}

/// Whether an object exists (HEAD).
pub fn exists(loc: &Location) -> Result<bool, Error> {
    let b = bucket(loc)?;
    match block_on(b.store.head(&loc.obj())) {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(store_error(loc, None, "HEAD", e)),
    }
}

/// Size of an object (HEAD).
pub fn size(loc: &Location) -> Result<u64, Error> {
    let b = bucket(loc)?;
    block_on(b.store.head(&loc.obj()))
        .map(|m| m.size)
        .map_err(|e| store_error(loc, None, "HEAD", e))
}

/// The objects directly under the prefix `dir` (not recursing).
pub fn list(dir: &Location) -> Result<Vec<Location>, Error> {
    let b = bucket(dir)?;
    let prefix = (!dir.key.is_empty()).then(|| dir.obj());
    let result = block_on(b.store.list_with_delimiter(prefix.as_ref()))
        .map_err(|e| store_error(dir, None, "listing", e))?;
    Ok(result
        .objects
        .into_iter()
        .map(|m| Location {
            bucket: dir.bucket.clone(),
            key: m.location.to_string(),
        })
        .collect())
}

/// Delete an object.
pub fn delete(loc: &Location) -> Result<(), Error> {
    let b = bucket(loc)?;
    block_on(b.store.delete(&loc.obj())).map_err(|e| store_error(loc, None, "DELETE", e))
}

/// Object Lock retention of an object, if it has one: `(mode, until)`,
/// until as the store wrote it (ISO 8601). Read from the HEAD answer's
/// `x-amz-object-lock-mode` and `x-amz-object-lock-retain-until-date`
/// (which every store with Object Lock sends; `GET ?retention` is not
/// implemented everywhere).
pub fn retention(loc: &Location) -> Result<Option<(String, String)>, Error> {
    let b = bucket(loc)?;
    let (status, headers, _) = write::signed(&b, loc, http::Method::HEAD, &[], &[], Vec::new())?;
    if !(200..300).contains(&status) {
        return Err(store_error(loc, None, "HEAD", format!("HTTP {status}")));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    Ok(
        match (
            header("x-amz-object-lock-mode"),
            header("x-amz-object-lock-retain-until-date"),
        ) {
            (Some(m), Some(u)) => Some((m, u)),
            _ => None,
        },
    )
}

/// Why `loc` may not be deleted now, if it is locked.
pub fn locked(loc: &Location) -> Result<Option<String>, Error> {
    let Some((mode, until)) = retention(loc)? else {
        return Ok(None);
    };
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(&until) else {
        return Ok(Some(format!(
            "it has an Object Lock retention ({mode}) until {until:?}, a date that could not be read"
        )));
    };
    if t > chrono::Utc::now() {
        Ok(Some(format!(
            "it is locked ({} mode) until {until}",
            mode.to_lowercase()
        )))
    } else {
        Ok(None)
    }
}

/// The store behind `s3://` locations, for vma-core's storage seam.
#[derive(Default)]
pub struct S3Remote {
    /// Object Lock retention of every object it writes.
    pub retention: Option<write::Retention>,
}

impl vma_core::storage::Remote for S3Remote {
    fn handles(&self, location: &Path) -> bool {
        location.to_str().is_some_and(is_s3)
    }

    fn open(&self, location: &Path) -> vma_core::Result<vma_core::storage::Source> {
        let loc = Location::from_path(location).map_err(vma_core::Error::from)?;
        Ok(Arc::new(read::ObjectSource::open(&loc)?))
    }

    fn list(&self, prefix: &Path) -> vma_core::Result<Vec<PathBuf>> {
        let loc = Location::from_path(prefix).map_err(vma_core::Error::from)?;
        Ok(list(&loc)?
            .into_iter()
            .map(|l| PathBuf::from(l.to_string()))
            .collect())
    }

    fn delete(&self, location: &Path) -> vma_core::Result<()> {
        let loc = Location::from_path(location).map_err(vma_core::Error::from)?;
        Ok(delete(&loc)?)
    }

    fn delete_blocked(&self, location: &Path) -> vma_core::Result<Option<String>> {
        let loc = Location::from_path(location).map_err(vma_core::Error::from)?;
        Ok(locked(&loc)?)
    }

    fn create(
        &self,
        location: &Path,
        replace: bool,
        expected_size: Option<u64>,
    ) -> vma_core::Result<Box<dyn vma_core::storage::Sink>> {
        let loc = Location::from_path(location).map_err(vma_core::Error::from)?;
        let options = write::UploadOptions {
            force: replace,
            expected_size,
            retention: self.retention.clone(),
        };
        Ok(Box::new(write::Upload::start(&loc, options)?))
    }
}

/// Plug `s3://` locations into vma-core's storage seam.
pub fn install() {
    install_with(None);
}

/// Plug `s3://` locations into vma-core's storage seam; every object
/// written through it gets `retention` (Object Lock), if given.
pub fn install_with(retention: Option<write::Retention>) {
    vma_core::storage::set_remote(Box::new(S3Remote { retention }));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file system or NBD handler running as a task of its own runtime
    /// reads an object through `block_on`: it must get the result, not the
    /// "runtime within a runtime" panic that left a FUSE read unanswered.
    #[test]
    fn block_on_from_inside_another_runtime() {
        let other = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let got =
            other.block_on(async { tokio::spawn(async { block_on(async { 7 }) }).await.unwrap() });
        assert_eq!(got, 7);
        // And from a blocking thread of that runtime.
        let got = other.block_on(async {
            tokio::task::spawn_blocking(|| block_on(async { 8 }))
                .await
                .unwrap()
        });
        assert_eq!(got, 8);
    }

    #[test]
    fn locations_parse() {
        let l = Location::parse("s3://b/dir/a.vma").unwrap();
        assert_eq!((l.bucket.as_str(), l.key.as_str()), ("b", "dir/a.vma"));
        assert_eq!(Location::parse("s3://b").unwrap().key, "");
        assert_eq!(Location::parse("s3://b/dir/").unwrap().key, "dir");
        assert!(Location::parse("/tmp/x").is_err());
        assert!(Location::parse("s3:///k").is_err());
        assert!(Location::parse("s3://b//k").is_err());
    }
}
