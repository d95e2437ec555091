//! A tiny S3 client for the tests: one signed (AWS Signature Version 4)
//! HTTP/1.1 request at a time over plain TCP, path-style addressing. It
//! reaches what client libraries hide (bucket creation with Object Lock,
//! versioned deletes, retention headers, listing leftover multipart uploads)
//! so tests can check a store's state independently of the code under test.
//!
//! Signing follows
//! <https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html>.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// Where a store is and the credentials to use.
#[derive(Debug, Clone)]
pub struct S3 {
    /// `http://HOST:PORT`.
    pub endpoint: String,
    /// Region used in the signature.
    pub region: String,
    /// Access key id.
    pub key_id: String,
    /// Secret access key.
    pub secret: String,
}

/// A store's answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Body (chunked encoding removed).
    pub body: Vec<u8>,
}

impl Response {
    /// The first header of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Percent-encoding as SigV4 wants it: everything but `A-Za-z0-9-._~`
/// (and `/` when `keep_slash`).
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&k, data).as_ref().to_vec()
}

/// `(YYYYMMDD, YYYYMMDDTHHMMSSZ)` for a time.
pub fn amz_dates(t: SystemTime) -> (String, String) {
    let secs = t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    let (y, m, d) = civil_from_days((secs / 86400) as i64);
    let s = secs % 86400;
    let date = format!("{y:04}{m:02}{d:02}");
    let stamp = format!("{date}T{:02}{:02}{:02}Z", s / 3600, s / 60 % 60, s % 60);
    (date, stamp)
}

/// ISO 8601 (`2030-01-02T03:04:05Z`), as retention dates are written.
pub fn iso8601(t: SystemTime) -> String {
    let (_, stamp) = amz_dates(t);
    format!(
        "{}-{}-{}T{}:{}:{}Z",
        &stamp[0..4],
        &stamp[4..6],
        &stamp[6..8],
        &stamp[9..11],
        &stamp[11..13],
        &stamp[13..15]
    )
}

/// Days since 1970-01-01 to (year, month, day); H. Hinnant's algorithm
/// (<https://howardhinnant.github.io/date_algorithms.html#civil_from_days>).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
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

impl S3 {
    /// A client for `endpoint` (`http://HOST:PORT`).
    pub fn new(endpoint: &str, region: &str, key_id: &str, secret: &str) -> S3 {
        S3 {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            region: region.to_string(),
            key_id: key_id.to_string(),
            secret: secret.to_string(),
        }
    }

    fn host(&self) -> &str {
        self.endpoint
            .strip_prefix("http://")
            .expect("plain http:// endpoints only")
    }

    /// Send one signed request. `path` is `/BUCKET` or `/BUCKET/KEY`
    /// (not encoded); `query` pairs are encoded here (a subresource such as
    /// `uploads` is `("uploads", "")`); `headers` are signed too.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let (date, stamp) = amz_dates(SystemTime::now());
        let payload_hash = hex::encode(Sha256::digest(body));
        let canonical_uri = uri_encode(path, true);
        let mut q: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
            .collect();
        q.sort();
        let canonical_query = q
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let mut hs: Vec<(String, String)> = vec![
            ("host".into(), self.host().to_string()),
            ("x-amz-content-sha256".into(), payload_hash.clone()),
            ("x-amz-date".into(), stamp.clone()),
        ];
        for (k, v) in headers {
            hs.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
        hs.sort();
        let canonical_headers: String = hs.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        let signed_headers = hs
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(";");
        let canonical_request = format!(
            "{method}\n{canonical_uri}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{payload_hash}"
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical_request.as_bytes()))
        );
        let mut key = hmac(format!("AWS4{}", self.secret).as_bytes(), date.as_bytes());
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let signature = hex::encode(hmac(&key, string_to_sign.as_bytes()));
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            self.key_id
        );

        // On the wire a subresource without value goes bare (`?uploads`),
        // as the SDKs send it; the signature uses `uploads=` as specified.
        let wire_query = q
            .iter()
            .map(|(k, v)| {
                if v.is_empty() {
                    k.clone()
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join("&");
        let target = if wire_query.is_empty() {
            canonical_uri
        } else {
            format!("{canonical_uri}?{wire_query}")
        };
        let mut req = format!("{method} {target} HTTP/1.1\r\n");
        for (k, v) in &hs {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!(
            "authorization: {authorization}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        ));
        let mut stream = TcpStream::connect(self.host())?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.write_all(req.as_bytes())?;
        stream.write_all(body)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        parse_response(&raw, method == "HEAD")
    }
}

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

fn parse_response(raw: &[u8], head: bool) -> std::io::Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("HTTP response without header end"))?;
    let head_text = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if head {
        Vec::new()
    } else if chunked {
        let mut body = Vec::new();
        let mut pos = 0;
        loop {
            let nl = rest[pos..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("truncated chunk size"))?;
            let size_text = String::from_utf8_lossy(&rest[pos..pos + nl]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            pos += nl + 2;
            if size == 0 {
                break;
            }
            let chunk = rest
                .get(pos..pos + size)
                .ok_or_else(|| bad("truncated chunk"))?;
            body.extend_from_slice(chunk);
            pos += size + 2;
        }
        body
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_440_938_160); // 2015-08-30T12:36:00Z
        assert_eq!(
            amz_dates(t),
            ("20150830".to_string(), "20150830T123600Z".to_string())
        );
        assert_eq!(iso8601(t), "2015-08-30T12:36:00Z");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn encodings() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(uri_encode("/b/a b+c~", true), "/b/a%20b%2Bc~");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
    }
}
