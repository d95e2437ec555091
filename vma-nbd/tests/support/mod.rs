//! What the NBD tests share (included by vma-nbd's and vma-capture's
//! test files): QEMU tools that must be installed, `qemu-nbd` serving an
//! image, and a qcow2 image of data, zero clusters and holes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vma_nbd::NbdClient;

/// 64 KiB, the cluster size of the images.
pub const K64: u64 = 65536;

/// Fail (not skip) when a QEMU tool is missing.
pub fn require(tool: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is not installed: these tests need QEMU's NBD tools (install qemu-utils)"
    );
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[path = "../../../tests/src/noise.rs"]
mod noise;
pub use noise::noise;

/// `qemu-nbd` serving one read-only export on a unix socket; killed on drop.
pub struct QemuNbd {
    pub child: Child,
    pub socket: PathBuf,
}

impl QemuNbd {
    /// Serve `image` (given to qemu-nbd as its file argument, after `args`)
    /// under the export name `name`.
    pub fn start(dir: &Path, name: &str, args: &[&str], image: &str) -> QemuNbd {
        require("qemu-nbd");
        let socket = dir.join(format!("{name}.sock"));
        let child = Command::new("qemu-nbd")
            .args([
                "--persistent",
                "--read-only",
                "--shared=4",
                "-x",
                name,
                "-k",
            ])
            .arg(&socket)
            .args(args)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting qemu-nbd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd { child, socket }
    }

    pub fn connect(&self, name: &str) -> NbdClient {
        NbdClient::connect_unix(&self.socket, name).unwrap()
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A qcow2 image of 8 MiB + 512 bytes: data, explicit zero clusters and
/// unallocated stretches; returns it and its contents.
pub fn mixed_qcow2(dir: &Path) -> (PathBuf, Vec<u8>) {
    require("qemu-img");
    require("qemu-io");
    let size = 128 * K64 + 512;
    let img = dir.join("mixed.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(size.to_string()));
    let mut want = vec![0u8; size as usize];
    let data = [
        (0u64, K64 as usize, 1u64),
        (3 * K64 + 4096, 5000, 2),
        (40 * K64, 20 * K64 as usize, 3),
        (size - 512, 512, 4),
    ];
    for &(at, len, seed) in &data {
        let bytes = noise(seed, len);
        want[at as usize..at as usize + len].copy_from_slice(&bytes);
        // qemu-io writes the pattern file's first `len` bytes.
        let piece = dir.join(format!("piece-{seed}"));
        std::fs::write(&piece, &bytes).unwrap();
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -s {} {at} {len}", piece.display()))
            .arg(&img));
    }
    // Zero clusters (allocated as zero) inside the data run.
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -z {} {}", 44 * K64, 4 * K64))
        .arg(&img));
    want[(44 * K64) as usize..(48 * K64) as usize].fill(0);
    (img, want)
}

/// [`mixed_qcow2`] in `dir`, served by `qemu-nbd` as export `disk`; the
/// server and the image's contents.
pub fn served_mixed_qcow2(dir: &Path) -> (QemuNbd, Vec<u8>) {
    let (img, want) = mixed_qcow2(dir);
    let server = QemuNbd::start(dir, "disk", &["-f", "qcow2"], img.to_str().unwrap());
    (server, want)
}
