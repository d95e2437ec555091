//! Where the store is and who we are, found as S3 tools find it:
//!
//! 1. `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//!    `AWS_REGION` (or `AWS_DEFAULT_REGION`), `AWS_ENDPOINT_URL_S3` or
//!    `AWS_ENDPOINT_URL`;
//! 2. else the profile `AWS_PROFILE` (default `default`) of
//!    `~/.aws/credentials` (`AWS_SHARED_CREDENTIALS_FILE`) and
//!    `~/.aws/config` (`AWS_CONFIG_FILE`): `aws_access_key_id`,
//!    `aws_secret_access_key`, `aws_session_token`, `region`, `endpoint_url`;
//! 3. an endpoint given with [`set_endpoint`] (`--s3-endpoint`) wins over both.
//!
//! Requests use path-style addressing (`ENDPOINT/BUCKET/KEY`), which every
//! S3-compatible store answers; `AWS_S3_ADDRESSING_STYLE=virtual` asks for
//! virtual-hosted style. Secrets are kept out of `Debug` and every message.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

static ENDPOINT: OnceLock<String> = OnceLock::new();

/// Use `url` as the S3 endpoint (the `--s3-endpoint` flag); before any request.
pub fn set_endpoint(url: &str) {
    let _ = ENDPOINT.set(url.to_string());
}

/// Resolved settings.
#[derive(Clone)]
pub struct Settings {
    /// Access key id.
    pub key_id: Option<String>,
    secret: Option<String>,
    token: Option<String>,
    /// Region to sign for.
    pub region: String,
    /// Endpoint URL, when not AWS.
    pub endpoint: Option<String>,
    /// Virtual-hosted-style requests.
    pub virtual_hosted: bool,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("key_id", &self.key_id)
            .field("secret", &self.secret.as_ref().map(|_| "<hidden>"))
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("virtual_hosted", &self.virtual_hosted)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Sections of an INI file (`[name]` / `[profile name]` both as `name`).
fn ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            section = name.strip_prefix("profile ").unwrap_or(name).trim().into();
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(section.clone())
                .or_default()
                .insert(k.trim().to_lowercase(), v.trim().to_string());
        }
    }
    out
}

fn home_file(var: &str, name: &str) -> Option<PathBuf> {
    env(var)
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws").join(name)))
}

impl Settings {
    /// Settings from the environment, the profile files and the endpoint flag.
    pub fn resolve() -> Result<Settings, String> {
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let read = |var: &str, name: &str| -> HashMap<String, String> {
            home_file(var, name)
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(|t| ini(&t).remove(&profile).unwrap_or_default())
                .unwrap_or_default()
        };
        let creds = read("AWS_SHARED_CREDENTIALS_FILE", "credentials");
        let conf = read("AWS_CONFIG_FILE", "config");
        let from_files = |k: &str| creds.get(k).or_else(|| conf.get(k)).cloned();
        let (key_id, secret, token) = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
        {
            (Some(k), Some(s)) => (Some(k), Some(s), env("AWS_SESSION_TOKEN")),
            _ => (
                from_files("aws_access_key_id"),
                from_files("aws_secret_access_key"),
                from_files("aws_session_token"),
            ),
        };
        if key_id.is_some() != secret.is_some() {
            return Err(format!(
                "profile {profile:?} has an access key id without a secret key, or the reverse"
            ));
        }
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| conf.get("region").cloned())
            .unwrap_or_else(|| "us-east-1".into());
        let endpoint = ENDPOINT
            .get()
            .cloned()
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| conf.get("endpoint_url").cloned());
        let virtual_hosted = env("AWS_S3_ADDRESSING_STYLE").as_deref() == Some("virtual");
        Ok(Settings {
            key_id,
            secret,
            token,
            region,
            endpoint,
            virtual_hosted,
        })
    }

    /// A client builder for `bucket`.
    pub(crate) fn builder(&self, bucket: &str) -> AmazonS3Builder {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&self.region)
            .with_virtual_hosted_style_request(self.virtual_hosted)
            // Object Lock buckets refuse PUTs without a checksum.
            .with_checksum_algorithm(object_store::aws::Checksum::SHA256)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(200),
                    max_backoff: Duration::from_secs(10),
                    base: 2.0,
                },
                max_retries: 8,
                retry_timeout: Duration::from_secs(120),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs(60))
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_allow_http(true),
            );
        if let (Some(k), Some(s)) = (&self.key_id, &self.secret) {
            b = b.with_access_key_id(k).with_secret_access_key(s);
            if let Some(t) = &self.token {
                b = b.with_token(t);
            }
        } else {
            b = b.with_skip_signature(true);
        }
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse() {
        let t = "[default]\naws_access_key_id = A\n\n[profile backup]\nregion=garage\n# c\nendpoint_url = http://x:3900\n";
        let m = ini(t);
        assert_eq!(m["default"]["aws_access_key_id"], "A");
        assert_eq!(m["backup"]["region"], "garage");
        assert_eq!(m["backup"]["endpoint_url"], "http://x:3900");
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let s = Settings {
            key_id: Some("KEY".into()),
            secret: Some("VERYSECRET".into()),
            token: Some("TOKEN".into()),
            region: "r".into(),
            endpoint: None,
            virtual_hosted: false,
        };
        let d = format!("{s:?}");
        assert!(!d.contains("VERYSECRET") && !d.contains("TOKEN"), "{d}");
    }
}
