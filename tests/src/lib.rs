//! Helpers for the end-to-end tests: locate the built `vma` binary, run it,
//! and make disk images with known contents.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Path of the `vma` binary built by `cargo build` (or `$VMA_BIN`).
pub fn vma_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VMA_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>/vma
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join("vma");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p vma-cli` (scripts/test.sh does), or set VMA_BIN",
        bin.display()
    );
    bin
}

/// Run `vma` with `args`; returns its output.
pub fn vma(args: &[&str]) -> Output {
    Command::new(vma_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running vma")
}

/// Run a shell pipeline with `$VMA` set to the binary.
pub fn sh(script: &str) -> Output {
    Command::new("bash")
        .arg("-o")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .env("VMA", vma_bin())
        .stdin(Stdio::null())
        .output()
        .expect("running bash")
}

/// Exit code of an output (-1 when killed by a signal).
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A sparse image of `size` bytes with `(offset, len, seed)` noise regions;
/// everything else is a hole.
pub fn sparse_image(path: &Path, size: u64, regions: &[(u64, usize, u64)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    for &(off, len, seed) in regions {
        f.write_all_at(&noise(seed, len), off).expect("write image");
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let data = std::fs::read(path).expect("read file");
    hex::encode(Sha256::digest(&data))
}

/// Bytes allocated on disk for a file.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// Fail (never skip) when a peer tool the test needs is missing.
pub fn require(tool: &str) {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is not installed: the tests need it (scripts/setup.sh installs it)"
    );
}
