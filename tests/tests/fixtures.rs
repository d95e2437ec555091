//! The test fixtures themselves work: the tiny guest boots on an ext4 disk
//! (file or NBD) and reports back.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vma_tests::guest::{default_timeout, Drive, Guest, GuestConfig};
use vma_tests::{noise, p, require, sha256_file};

/// An ext4 image of `size` holding `files` (name, contents) and a
/// SHA256SUMS of them.
fn ext4_image(dir: &Path, img: &Path, size: &str, files: &[(&str, Vec<u8>)]) {
    require("mkfs.ext4");
    let root = dir.join("fs-root");
    std::fs::create_dir_all(&root).unwrap();
    let mut sums = String::new();
    for (name, data) in files {
        let path = root.join(name);
        std::fs::write(&path, data).unwrap();
        sums.push_str(&format!("{}  {name}\n", sha256_file(&path)));
    }
    std::fs::write(root.join("SHA256SUMS"), sums).unwrap();
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d", p(&root), p(img), size])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `debugfs -R 'cat PATH'` on an unmounted image.
fn debugfs_cat(img: &Path, path: &str) -> Vec<u8> {
    require("debugfs");
    let o = Command::new("debugfs")
        .args(["-R", &format!("cat {path}"), p(img)])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

fn e2fsck_clean(img: &Path) {
    require("e2fsck");
    let o = Command::new("e2fsck")
        .args(["-fn", p(img)])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "e2fsck -fn {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn known_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("hello.txt", b"hello from the host\n".to_vec()),
        ("data.bin", noise(17, 1 << 20)),
    ]
}

#[test]
fn guest_checks_known_files_and_writes_new_ones() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("disk.img");
    ext4_image(t.path(), &img, "32M", &known_files());

    let script = r#"set -e
sha256sum -c SHA256SUMS
echo "written by the guest" > guest-new.txt
dd if=/dev/urandom of=guest-random.bin bs=64k count=16 2>/dev/null
echo "VMATEST sum $(sha256sum guest-random.bin)"
"#;
    let mut g = Guest::boot(&GuestConfig::new(vec![Drive::raw(&img)]).script(script));
    let init = g.init_time(default_timeout());
    let code = g.wait_script(default_timeout());
    eprintln!(
        "guest ({:?}): init after {:.2?}, powered off after {:.2?}",
        g.accel,
        init,
        g.lines().last().map(|l| l.at).unwrap_or_default()
    );
    let serial = g.serial();
    assert_eq!(code, 0, "guest script failed:\n{serial}");
    assert!(
        serial.contains("hello.txt: OK") && serial.contains("data.bin: OK"),
        "{serial}"
    );
    let sum = g
        .lines()
        .iter()
        .find_map(|l| l.text.strip_prefix("VMATEST sum "))
        .and_then(|s| s.split_whitespace().next())
        .map(str::to_string)
        .expect("the guest printed the sum of the file it wrote");
    drop(g);

    e2fsck_clean(&img);
    assert_eq!(
        debugfs_cat(&img, "/guest-new.txt"),
        b"written by the guest\n"
    );
    assert_eq!(debugfs_cat(&img, "/hello.txt"), b"hello from the host\n");
    let random = debugfs_cat(&img, "/guest-random.bin");
    assert_eq!(random.len(), 1 << 20);
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&random)), sum);
}

/// `qemu-nbd` serving `img` read-only as export `drive` on a unix socket.
struct NbdServer(Child);

impl NbdServer {
    fn start(img: &Path, sock: &Path) -> NbdServer {
        require("qemu-nbd");
        let child = Command::new("qemu-nbd")
            .args([
                "--persistent",
                "--read-only",
                "--format=raw",
                "--export-name=drive",
            ])
            .arg(format!("--socket={}", sock.display()))
            .arg(img)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not create {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        NbdServer(child)
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn guest_runs_the_disk_script_over_nbd_read_only() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("disk.img");
    let mut files = known_files();
    files.push((
        "vmatest.sh",
        b"sha256sum -c SHA256SUMS || exit 3\n\
          if touch should-fail 2>/dev/null; then exit 4; fi\n\
          echo VMATEST read-only-ok\n"
            .to_vec(),
    ));
    ext4_image(t.path(), &img, "32M", &files);
    let before = sha256_file(&img);
    let sock = t.path().join("nbd.sock");
    let _nbd = NbdServer::start(&img, &sock);

    let url = format!("nbd+unix:///drive?socket={}", sock.display());
    let mut g = Guest::boot(&GuestConfig::new(vec![Drive::url(&url).read_only()]).root_read_only());
    g.wait_for("VMATEST mounted /dev/vda ro", default_timeout());
    g.wait_for("VMATEST read-only-ok", default_timeout());
    assert_eq!(g.wait_script(default_timeout()), 0, "{}", g.serial());
    assert_eq!(
        sha256_file(&img),
        before,
        "a read-only boot changed the image"
    );
}
