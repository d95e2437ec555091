//! A streamed multipart upload: parts of a size chosen from the expected
//! size, at most [`IN_FLIGHT`] uploading while the next fills, so memory is
//! about `part size x (IN_FLIGHT + 1)`. Nothing is visible under the key
//! until the upload is completed; on failure, drop, or [`abort_all`] (a
//! signal) it is aborted, and the store discards its parts.
//!
//! An existing key is refused unless forced: a HEAD before starting, and
//! the completion sent with `If-None-Match: *`, which stores that support
//! conditional writes (AWS S3, moto, MinIO, Ceph) answer with 412 when the
//! key appeared meanwhile. Stores that ignore it (Garage) leave a race
//! between the HEAD and the completion.
//!
//! Parts carry `x-amz-checksum-sha256` (Object Lock buckets refuse PUTs
//! without a checksum); a retention (`--retain-until`, `--lock-mode`) is
//! set by `PUT ?retention` with `Content-MD5` as soon as the upload is
//! complete.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use md5::Digest;
use object_store::multipart::{MultipartStore, PartId};
use object_store::signer::{SignedUrlOptions, Signer};
use object_store::{MultipartId, ObjectStore, PutPayload};

use crate::{block_on, bucket, runtime, store_error, Bucket, Error, Location};

/// S3's most parts in one upload.
pub const MAX_PARTS: u64 = 10_000;
/// Smallest part (S3 refuses smaller ones but the last).
pub const MIN_PART: u64 = 8 << 20;
/// Largest part S3 takes.
pub const MAX_PART: u64 = 5 << 30;
/// Bytes read back from the end of a completed upload and compared.
pub const TAIL_CHECK: u64 = 1 << 20;
/// Parts uploading at once while the next one fills.
pub const IN_FLIGHT: usize = 4;

/// Object Lock retention mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` may shorten or remove it.
    Governance,
    /// Nobody can shorten or remove it, not even the root account.
    Compliance,
}

/// A retention to set on the uploaded object.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Mode.
    pub mode: LockMode,
    /// Until when (UTC).
    pub until: chrono::DateTime<chrono::Utc>,
}

/// How to upload.
#[derive(Debug, Clone, Default)]
pub struct UploadOptions {
    /// Replace an existing object.
    pub force: bool,
    /// Bytes expected (an upper bound), to size the parts.
    pub expected_size: Option<u64>,
    /// Object Lock retention.
    pub retention: Option<Retention>,
}

/// Part size for `expected` bytes: at least [`MIN_PART`], a whole number of
/// MiB, with the expected size fitting in 9,000 parts (1,000 spare for
/// growth; see [`Upload`]).
pub fn part_size_for(expected: Option<u64>) -> u64 {
    let want = expected.unwrap_or(0).div_ceil(MAX_PARTS - 1_000);
    want.div_ceil(1 << 20)
        .saturating_mul(1 << 20)
        .clamp(MIN_PART, MAX_PART)
}

/// The largest archive an upload of parts of `part` bytes takes: 9,000
/// parts of `part`, then parts doubling every 250 (up to [`MAX_PART`]).
pub fn capacity(part: u64) -> u64 {
    let mut total = part * (MAX_PARTS - 1_000);
    let mut p = part;
    for _ in 0..4 {
        p = (p * 2).min(MAX_PART);
        total += p * 250;
    }
    total
}

/// Uploads being started: created in the store, perhaps not yet in
/// [`active`]. [`abort_all`] waits for them so a signal that arrives in
/// between cannot leave an upload behind.
static STARTING: AtomicU64 = AtomicU64::new(0);

fn active() -> &'static Mutex<HashMap<u64, (Location, MultipartId)>> {
    static ACTIVE: OnceLock<Mutex<HashMap<u64, (Location, MultipartId)>>> = OnceLock::new();
    ACTIVE.get_or_init(Default::default)
}

/// Abort every upload under way (for a signal handler thread); returns
/// the objects whose uploads were aborted.
pub fn abort_all() -> Vec<String> {
    // The main thread goes on while this one waits: a start under way
    // registers its upload within a request's time.
    let t0 = std::time::Instant::now();
    while STARTING.load(Ordering::SeqCst) > 0 && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let all: Vec<(Location, MultipartId)> = active()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .map(|(_, v)| v)
        .collect();
    let mut done = Vec::new();
    for (loc, id) in all {
        if let Ok(b) = bucket(&loc) {
            let _ = block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(20),
                    b.store.abort_multipart(&loc.obj(), &id),
                )
                .await
            });
        }
        done.push(loc.to_string());
    }
    done
}

type PartTask = tokio::task::JoinHandle<Result<(usize, PartId), Error>>;

/// A multipart upload under way (a [`vma_core::storage::Sink`]).
pub struct Upload {
    loc: Location,
    bucket: Arc<Bucket>,
    id: MultipartId,
    key: u64,
    part_size: usize,
    buf: Vec<u8>,
    next: usize,
    inflight: VecDeque<PartTask>,
    parts: Vec<(usize, PartId)>,
    options: UploadOptions,
    done: bool,
    written: u64,
    /// The last parts submitted (shared with their uploads), for the
    /// read-back of the tail.
    recent: VecDeque<bytes::Bytes>,
}

impl Upload {
    /// Start uploading to `loc` (refused if it exists, unless forced).
    pub fn start(loc: &Location, options: UploadOptions) -> vma_core::Result<Upload> {
        if loc.key.is_empty() {
            return Err(Error::BadLocation(loc.to_string()).into());
        }
        if !options.force && crate::exists(loc)? {
            return Err(vma_core::Error::Exists {
                path: loc.to_string(),
            });
        }
        let b = bucket(loc)?;
        STARTING.fetch_add(1, Ordering::SeqCst);
        let created = block_on(b.store.create_multipart(&loc.obj()))
            .map_err(|e| store_error(loc, None, "starting a multipart upload", e));
        static KEYS: AtomicU64 = AtomicU64::new(0);
        let key = KEYS.fetch_add(1, Ordering::Relaxed);
        if let Ok(id) = &created {
            active()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, (loc.clone(), id.clone()));
        }
        STARTING.fetch_sub(1, Ordering::SeqCst);
        let id = created?;
        let part_size = part_size_for(options.expected_size) as usize;
        Ok(Upload {
            loc: loc.clone(),
            bucket: b,
            id,
            key,
            part_size,
            buf: Vec::with_capacity(part_size),
            next: 0,
            inflight: VecDeque::new(),
            parts: Vec::new(),
            options,
            done: false,
            written: 0,
            recent: VecDeque::new(),
        })
    }

    /// The part size in use.
    pub fn part_size(&self) -> usize {
        self.part_size
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn wait_one(&mut self) -> Result<(), Error> {
        if let Some(t) = self.inflight.pop_front() {
            let r = block_on(t).map_err(|e| store_error(&self.loc, None, "uploading a part", e))?;
            self.parts.push(r?);
        }
        Ok(())
    }

    fn submit(&mut self) -> Result<(), Error> {
        while self.inflight.len() >= IN_FLIGHT {
            self.wait_one()?;
        }
        if self.next as u64 >= MAX_PARTS {
            return Err(store_error(
                &self.loc,
                None,
                "uploading",
                format!(
                    "more than {MAX_PARTS} parts of up to {} bytes",
                    self.part_size
                ),
            ));
        }
        let idx = self.next;
        self.next += 1;
        // Beyond the planned 9,000 parts, parts double every 250.
        let grow =
            idx as u64 >= MAX_PARTS - 1_000 && (idx as u64 - (MAX_PARTS - 1_000)) % 250 == 249;
        let next_size = if grow {
            (self.part_size as u64 * 2).min(MAX_PART) as usize
        } else {
            self.part_size
        };
        let data = bytes::Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(next_size),
        ));
        self.recent.push_back(data.clone());
        if self.recent.len() > 2 {
            self.recent.pop_front();
        }
        self.part_size = next_size;
        let start = self.written - data.len() as u64;
        let range = start..self.written;
        let store = self.bucket.store.clone();
        let (loc, id) = (self.loc.clone(), self.id.clone());
        self.inflight.push_back(runtime().spawn(async move {
            let payload = PutPayload::from(data);
            let p = store
                .put_part(&loc.obj(), &id, idx, payload)
                .await
                .map_err(|e| {
                    store_error(&loc, Some(range), &format!("uploading part {}", idx + 1), e)
                })?;
            Ok((idx, p))
        }));
        Ok(())
    }

    /// Upload what remains, complete the upload (conditionally unless
    /// forced) and set the retention asked for.
    pub fn complete(mut self) -> vma_core::Result<()> {
        let r = self.complete_inner();
        if r.is_err() && !self.done {
            self.abort_now();
        }
        r
    }

    fn complete_inner(&mut self) -> vma_core::Result<()> {
        if !self.buf.is_empty() || self.next == 0 {
            self.submit()?;
        }
        while !self.inflight.is_empty() {
            self.wait_one()?;
        }
        self.parts.sort_by_key(|(i, _)| *i);
        let parts: Vec<PartId> = self.parts.iter().map(|(_, p)| p.clone()).collect();
        if self.options.force {
            block_on(
                self.bucket
                    .store
                    .complete_multipart(&self.loc.obj(), &self.id, parts),
            )
            .map_err(|e| store_error(&self.loc, None, "completing the upload", e))?;
        } else {
            self.complete_if_absent(&parts)?;
        }
        self.done = true;
        active()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        self.check_tail()?;
        if let Some(r) = self.options.retention.clone() {
            set_retention(&self.bucket, &self.loc, &r).map_err(|e| {
                vma_core::Error::Invalid(format!(
                    "{e}; the archive was uploaded but is NOT locked: set the retention with the store's tools, or delete it and try again"
                ))
            })?;
        }
        Ok(())
    }

    /// Read back the last [`TAIL_CHECK`] bytes (an archive's footer and
    /// index, or their end) by one suffix GET and compare them, and the
    /// object's size, with what was uploaded. A full read-back is
    /// `vma verify`.
    fn check_tail(&mut self) -> vma_core::Result<()> {
        let want = TAIL_CHECK.min(self.written);
        let mut tail = Vec::with_capacity(want as usize);
        let mut need = want as usize;
        for part in self.recent.iter().rev() {
            let take = need.min(part.len());
            tail.splice(0..0, part[part.len() - take..].iter().copied());
            need -= take;
            if need == 0 {
                break;
            }
        }
        self.recent.clear();
        if want == 0 || need > 0 {
            return Ok(());
        }
        let opts = object_store::GetOptions {
            range: Some(object_store::GetRange::Suffix(want)),
            ..Default::default()
        };
        let (size, got) = block_on(async {
            let r = self.bucket.store.get_opts(&self.loc.obj(), opts).await?;
            let size = r.meta.size;
            Ok::<_, object_store::Error>((size, r.bytes().await?))
        })
        .map_err(|e| store_error(&self.loc, None, "reading back the end of the upload", e))?;
        let range = self.written - want..self.written;
        if size != self.written || got[..] != tail[..] {
            return Err(vma_core::Error::Invalid(format!(
                "{}: the store holds {size} bytes, {} written, and bytes {}..{} read back {}: the upload is not what was sent; delete it and write it again",
                self.loc,
                self.written,
                range.start,
                range.end,
                if got[..] == tail[..] { "match" } else { "differ" }
            )));
        }
        Ok(())
    }

    fn complete_if_absent(&self, parts: &[PartId]) -> vma_core::Result<()> {
        let mut body = String::from("<CompleteMultipartUpload>");
        for (i, p) in parts.iter().enumerate() {
            let (etag, sha) = part_fields(&p.content_id);
            body.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag>",
                i + 1,
                xml_escape(&etag)
            ));
            if let Some(s) = sha {
                body.push_str(&format!("<ChecksumSHA256>{s}</ChecksumSHA256>"));
            }
            body.push_str("</Part>");
        }
        body.push_str("</CompleteMultipartUpload>");
        let (status, _, answer) = signed(
            &self.bucket,
            &self.loc,
            Method::POST,
            &[("uploadId", self.id.as_str())],
            &[("if-none-match", "*")],
            body.into_bytes(),
        )?;
        let text = String::from_utf8_lossy(&answer);
        if status == 412 || text.contains("<Code>PreconditionFailed</Code>") {
            return Err(vma_core::Error::Exists {
                path: self.loc.to_string(),
            });
        }
        // S3 may answer 200 with an error document.
        if !(200..300).contains(&status) || text.contains("<Error>") {
            return Err(store_error(
                &self.loc,
                None,
                "completing the upload",
                format!("HTTP {status}: {}", text.trim()),
            )
            .into());
        }
        Ok(())
    }

    fn abort_now(&mut self) {
        for t in self.inflight.drain(..) {
            t.abort();
        }
        let store = self.bucket.store.clone();
        let (loc, id) = (self.loc.clone(), self.id.clone());
        let _ = block_on(async {
            tokio::time::timeout(
                Duration::from_secs(30),
                store.abort_multipart(&loc.obj(), &id),
            )
            .await
        });
        active()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        self.done = true;
    }
}

impl Write for Upload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.part_size - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        self.written += n as u64;
        if self.buf.len() == self.part_size {
            self.submit().map_err(io::Error::other)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.done {
            self.abort_now();
        }
    }
}

impl vma_core::storage::Sink for Upload {
    fn finish(self: Box<Self>) -> vma_core::Result<()> {
        (*self).complete()
    }
    fn abort(mut self: Box<Self>) {
        self.abort_now();
    }
}

/// `(etag, sha256)` of a part id (an ETag, or the client's XML record).
fn part_fields(content_id: &str) -> (String, Option<String>) {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        let s = content_id.find(&open)? + open.len();
        let e = content_id[s..].find(&close)? + s;
        Some(xml_unescape(&content_id[s..e]))
    };
    if content_id.starts_with('<') {
        (tag("e_tag").unwrap_or_default(), tag("checksum_sha256"))
    } else {
        (content_id.to_string(), None)
    }
}

fn xml_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `PUT ?retention` with `Content-MD5`, as Object Lock requires.
fn set_retention(b: &Bucket, loc: &Location, r: &Retention) -> Result<(), Error> {
    let mode = match r.mode {
        LockMode::Governance => "GOVERNANCE",
        LockMode::Compliance => "COMPLIANCE",
    };
    let body = format!(
        "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{mode}</Mode><RetainUntilDate>{}</RetainUntilDate></Retention>",
        r.until.format("%Y-%m-%dT%H:%M:%SZ")
    );
    let md5 = base64(&md5::Md5::digest(body.as_bytes()));
    let (status, _, answer) = signed(
        b,
        loc,
        Method::PUT,
        &[("retention", "")],
        &[("content-md5", md5.as_str())],
        body.into_bytes(),
    )?;
    if !(200..300).contains(&status) {
        return Err(store_error(
            loc,
            None,
            "setting the retention",
            format!("HTTP {status}: {}", String::from_utf8_lossy(&answer).trim()),
        ));
    }
    Ok(())
}

/// Status, headers (lower-case names) and body of an answer.
pub(crate) type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// One request the client has no call for, signed (query string
/// signature, the given headers bound to it) and sent; transient failures
/// (connection errors, 5xx) are tried again with backoff. Returns the
/// status and body. Messages never include the signed URL.
pub(crate) fn signed(
    b: &Bucket,
    loc: &Location,
    method: Method,
    query: &[(&str, &str)],
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Answer, Error> {
    let what = format!(
        "{method} {}",
        query.iter().map(|(k, _)| *k).collect::<Vec<_>>().join("&")
    );
    let mut options = SignedUrlOptions::new().with_query(query.iter().map(|(k, v)| (*k, *v)));
    let mut header_map = http::HeaderMap::new();
    for (k, v) in headers {
        let name =
            HeaderName::from_bytes(k.as_bytes()).map_err(|e| store_error(loc, None, &what, e))?;
        let value = HeaderValue::from_str(v).map_err(|e| store_error(loc, None, &what, e))?;
        options = options.with_signed_header(name.clone(), value.clone());
        header_map.insert(name, value);
    }
    let _ = &b.settings;
    block_on(async {
        let mut last = String::new();
        for attempt in 0..4u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(300 << attempt)).await;
            }
            let url = b
                .store
                .signed_url_opts(
                    method.clone(),
                    &loc.obj(),
                    Duration::from_secs(600),
                    &options,
                )
                .await
                .map_err(|e| store_error(loc, None, &what, e))?;
            let resp = b
                .http
                .request(method.clone(), url)
                .headers(header_map.clone())
                .body(body.clone())
                .send()
                .await;
            match resp {
                Ok(r) if matches!(r.status().as_u16(), 500 | 502 | 503 | 504) => {
                    last = format!("HTTP {}", r.status().as_u16());
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    let headers = r
                        .headers()
                        .iter()
                        .map(|(k, v)| {
                            (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())
                        })
                        .collect();
                    let bytes = r
                        .bytes()
                        .await
                        .map_err(|e| store_error(loc, None, &what, e.without_url()))?;
                    return Ok((status, headers, bytes.to_vec()));
                }
                Err(e) => last = e.without_url().to_string(),
            }
        }
        Err(store_error(loc, None, &what, last))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_fit_the_limit() {
        assert_eq!(part_size_for(None), MIN_PART);
        assert_eq!(part_size_for(Some(1 << 30)), MIN_PART);
        for tib in [1u64, 2, 4, 5] {
            let size = tib << 40;
            let p = part_size_for(Some(size));
            assert!(p * (MAX_PARTS - 1_000) >= size, "{tib} TiB: {p}");
            assert!(capacity(p) > size);
        }
        // Unknown size: 8 MiB parts take about 70 GiB, then grow.
        assert!(capacity(MIN_PART) > 100 << 30);
    }

    #[test]
    fn part_ids_parse() {
        let id = "<PartMetadata><e_tag>&quot;abc&quot;</e_tag><checksum_sha256>Zm9v</checksum_sha256></PartMetadata>";
        assert_eq!(part_fields(id), ("\"abc\"".into(), Some("Zm9v".into())));
        assert_eq!(part_fields("\"e\""), ("\"e\"".into(), None));
    }
}
