//! Helpers for the end-to-end tests: locate the built `vma` binary, run it,
//! and make disk images with known contents.

pub mod forge;
pub mod scale;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub mod garage;
pub mod guest;
pub mod moto;
pub mod proxmox_vma;
pub mod s3;
pub mod served;
pub mod service;

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

// Also the NBD tests' (vma-nbd/tests/support).
mod noise;
pub use noise::noise;

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

/// A path as text (test paths are UTF-8).
pub fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// True when `dir` is a mount point (listed in /proc/self/mounts).
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(p(&dir)))
}

/// A mount that is undone when the test ends, whatever happens.
pub struct Mounted {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
}

impl Mounted {
    /// `vma mount ARCHIVE MOUNTPOINT EXTRA...`, which must succeed.
    pub fn new(archive: &Path, mountpoint: &Path, extra: &[&str]) -> Mounted {
        let (m, o) = Mounted::attempt(archive, mountpoint, extra, 0);
        assert!(m.is_some(), "mount failed: {}", stderr(&o));
        m.expect("mounted")
    }

    /// `vma mount ARCHIVE MOUNTPOINT EXTRA...`, which must exit with
    /// `want_code`; the mount (if one was made) and the command's output.
    pub fn attempt(
        archive: &Path,
        mountpoint: &Path,
        extra: &[&str],
        want_code: i32,
    ) -> (Option<Mounted>, Output) {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the mount tests need FUSE (run as root with /dev/fuse)"
        );
        std::fs::create_dir_all(mountpoint).expect("create mount point");
        let mut args = vec!["mount", p(archive), p(mountpoint)];
        args.extend_from_slice(extra);
        let o = vma(&args);
        let mounted = is_mount_point(mountpoint).then(|| Mounted {
            mountpoint: mountpoint.to_path_buf(),
        });
        assert_eq!(code(&o), want_code, "vma mount: {}", stderr(&o));
        (mounted, o)
    }

    /// A file of the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// Unmount and check that the serving process is gone.
    pub fn unmount(self) {
        let mp = self.mountpoint.clone();
        std::mem::forget(self);
        let o = vma(&["umount", p(&mp)]);
        if code(&o) != 0 {
            let _ = sh(&format!("umount -l {}", p(&mp)));
            panic!("vma umount failed: {}", stderr(&o));
        }
        for _ in 0..100 {
            if serving_processes(&mp).is_empty() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "mount process still running after umount: {:?}",
            serving_processes(&mp)
        );
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if code(&vma(&["umount", p(&self.mountpoint)])) != 0 {
            let _ = sh(&format!("umount -l {}", p(&self.mountpoint)));
        }
    }
}

/// Pids of `vma mount` processes serving `mountpoint`.
pub fn serving_processes(mountpoint: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.iter().any(|a| *a == b"mount")
            && args.contains(&mountpoint.as_os_str().as_encoded_bytes())
        {
            out.push(pid);
        }
    }
    out
}

/// `vma diff --against PARENT IMAGE -o OUT`: an incremental archive of
/// IMAGE (drive named after its file stem) against PARENT; must succeed.
pub fn diff_archive(parent: &Path, image: &Path, out: &Path) {
    let o = vma(&[
        "diff",
        "--quiet",
        "--against",
        p(parent),
        p(image),
        "-o",
        p(out),
    ]);
    assert_eq!(code(&o), 0, "vma diff: {}", stderr(&o));
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

/// A loop device over a file, detached when dropped. Needs root (or
/// access to `/dev/loop-control`).
pub struct LoopDevice(PathBuf);

impl LoopDevice {
    /// Attach `file` (read-only with `read_only`).
    pub fn attach(file: &Path, read_only: bool) -> LoopDevice {
        require("losetup");
        let mut args = vec!["-f", "--show"];
        if read_only {
            args.push("-r");
        }
        let o = Command::new("losetup")
            .args(&args)
            .arg(file)
            .output()
            .expect("running losetup");
        assert!(
            o.status.success(),
            "this test needs a loop device (run as root where /dev/loop-control works): \
             losetup: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        LoopDevice(PathBuf::from(
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
        ))
    }

    /// The device, `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A small tmpfs (`size`, e.g. `8m`) mounted on `dir` for the test's
/// lifetime: a file system that fills up. Needs root.
pub struct SmallFs(PathBuf);

impl SmallFs {
    /// Mount it (the directory is created).
    pub fn new(dir: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).expect("create mount point");
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "vma-test"])
            .arg(dir)
            .output()
            .expect("running mount");
        assert!(
            o.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        SmallFs(dir.to_path_buf())
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Names of the entries in its root, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .expect("read tmpfs")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Rewrite the native archive `src` as `dst` without its VM config blobs
/// (a capture record, `vma-capture.json`, stays), keeping its uuid, time,
/// drives, parent and stored extents (with valid digests throughout; the
/// parent chain, beside `src` or `dst`, gives the drive digests): an
/// incremental archive as `vma diff` and `vma capture` wrote them before
/// configs were carried forward.
pub fn without_configs(src: &Path, dst: &Path) {
    use vma_core::{ArchiveMeta, ArchiveStream, PassOptions, Writer, WriterOptions};
    let file = std::fs::File::open(src).unwrap();
    let stream = ArchiveStream::open(file, &src.display().to_string()).unwrap();
    let h = stream.header().clone();
    let meta = ArchiveMeta {
        uuid: h.uuid,
        ctime: h.ctime,
        creator: h.creator.clone(),
        drives: h.drives.clone(),
        configs: h
            .configs
            .iter()
            .filter(|c| c.name == "vma-capture.json")
            .cloned()
            .collect(),
        parent: h.parent,
        stands_for: h.stands_for.clone(),
    };
    let options = WriterOptions {
        compression: match h.compression.codec {
            vma_core::format::Codec::None => vma_core::Compression::None,
            vma_core::format::Codec::Zstd => {
                vma_core::Compression::Zstd(h.compression.level as i32)
            }
        },
        ..Default::default()
    };
    // The parent's chain gives the leaves of the unchanged clusters, so
    // the copy records (and is checked against) the same drive digests.
    // The ancestors are beside `src` or beside `dst`.
    let beside: Vec<PathBuf> = dst
        .parent()
        .and_then(|d| std::fs::read_dir(d).ok())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p != dst)
        .collect();
    let chain = vma_core::chain::Chain::open_parent(&h, Some(src), &beside)
        .unwrap()
        .map(std::sync::Arc::new);
    let out = std::fs::File::create(dst).unwrap();
    let mut w = Writer::new(out, meta, &options).unwrap();
    if let Some(chain) = &chain {
        w.set_leaf_source(chain.leaf_source());
    }
    let report = stream
        .pass_stored(&PassOptions::default(), |ext| w.append_stored(ext))
        .unwrap();
    for record in report.records.iter().flatten() {
        if let Some(digest) = record.digest {
            w.expect_drive_digest(record.drive, digest).unwrap();
        }
    }
    w.finish().unwrap();
}

/// Run the peer tool `cmd` (which must be installed: see [`require`]).
pub fn run_tool(cmd: &str, args: &[&str]) -> Output {
    require(cmd);
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

/// Run the peer tool `cmd`, which must succeed; its standard output.
pub fn tool_ok(cmd: &str, args: &[&str]) -> String {
    let o = run_tool(cmd, args);
    assert_eq!(code(&o), 0, "{cmd} {args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}
