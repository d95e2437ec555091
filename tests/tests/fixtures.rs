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

// ---- S3: a three-node Garage cluster, and moto for Object Lock ----

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use vma_tests::garage::Garage;
use vma_tests::moto::Moto;

fn runtime() -> tokio::runtime::Runtime {
    // object_store speaks plain HTTP here; its TLS stack still wants a
    // crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn store(g: &Garage, endpoint: &str) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_region(g.region())
        .with_bucket_name(g.bucket())
        .with_access_key_id(g.key_id())
        .with_secret_access_key(g.secret())
        .build()
        .expect("S3 client")
}

#[test]
fn garage_cluster_round_trips_and_survives_a_killed_node() {
    let t0 = Instant::now();
    let g = Garage::start();
    eprintln!(
        "garage: three nodes up and laid out in {:.2?} (script: {:.2?})",
        t0.elapsed(),
        g.start_time()
    );
    let ends = g.endpoints();
    assert_eq!(ends.len(), 3);
    let rt = runtime();
    let (s1, s2, s3) = (
        store(&g, &ends[0]),
        store(&g, &ends[1]),
        store(&g, &ends[2]),
    );
    let small = noise(1, 100_000);
    let big = noise(2, 11 << 20);
    let small_key = ObjectPath::from("dir/small.bin");
    let big_key = ObjectPath::from("dir/big.bin");
    rt.block_on(async {
        s1.put(&small_key, small.clone().into()).await.unwrap();
        // A range, and a suffix range (how an archive's footer is read).
        let r = s1.get_range(&small_key, 1000..5000).await.unwrap();
        assert_eq!(&r[..], &small[1000..5000]);
        let opts = GetOptions {
            range: Some(GetRange::Suffix(100)),
            ..Default::default()
        };
        let tail = s2
            .get_opts(&small_key, opts)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&tail[..], &small[small.len() - 100..]);

        // Multipart: two 5 MiB parts and a short last one.
        let mut up = s1.put_multipart(&big_key).await.unwrap();
        for part in big.chunks(5 << 20) {
            up.put_part(part.to_vec().into()).await.unwrap();
        }
        up.complete().await.unwrap();
        let all = s2.get(&big_key).await.unwrap().bytes().await.unwrap();
        assert!(all[..] == big[..], "multipart object read back differs");

        let listed = s3
            .list_with_delimiter(Some(&ObjectPath::from("dir")))
            .await
            .unwrap();
        let mut names: Vec<(String, u64)> = listed
            .objects
            .iter()
            .map(|o| (o.location.to_string(), o.size))
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                ("dir/big.bin".to_string(), big.len() as u64),
                ("dir/small.bin".to_string(), small.len() as u64)
            ]
        );
    });

    // One node down: reads and writes still reach a quorum (2 of 3).
    eprintln!("garage: round trips done after {:.2?}", t0.elapsed());
    let pid = g.node_pid(3).expect("node 3 runs");
    g.kill_node(3);
    assert!(!vma_tests::service::alive(pid), "node 3 still runs");
    // Garage sometimes takes ~8 s to answer the first read after a node
    // dies (it waits on the dead node before trying the next replica).
    rt.block_on(async {
        let r = s1.get_range(&big_key, (7 << 20)..(9 << 20)).await.unwrap();
        assert!(r[..] == big[7 << 20..9 << 20]);
        let all = s1.get(&big_key).await.unwrap().bytes().await.unwrap();
        assert!(all[..] == big[..]);
        s1.delete(&small_key).await.unwrap();
        let gone = s2.head(&small_key).await;
        assert!(
            matches!(gone, Err(object_store::Error::NotFound { .. })),
            "{gone:?}"
        );
    });

    eprintln!(
        "garage: reads with a node down done after {:.2?}",
        t0.elapsed()
    );
    // Back again: node 3 serves the object (and sees the delete).
    g.restart_node(3);
    eprintln!("garage: node 3 restarted after {:.2?}", t0.elapsed());
    rt.block_on(async {
        let s3 = store(&g, &ends[2]);
        let r = s3.get_range(&big_key, 0..4096).await.unwrap();
        assert_eq!(&r[..], &big[..4096]);
        let gone = s3.head(&small_key).await;
        assert!(
            matches!(gone, Err(object_store::Error::NotFound { .. })),
            "{gone:?}"
        );
    });

    // The raw signed client agrees with the store (its SigV4 is checked by
    // Garage): no multipart upload left behind, the object's size.
    let raw = g.s3(1);
    let r = raw
        .request(
            "GET",
            &format!("/{}", g.bucket()),
            &[("uploads", "")],
            &[],
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.text().contains("<UploadId>"), "{}", r.text());
    let r = raw
        .request(
            "HEAD",
            &format!("/{}/dir/big.bin", g.bucket()),
            &[],
            &[],
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(&*big.len().to_string()));
    let forged = vma_tests::s3::S3 {
        secret: "0".repeat(64),
        ..raw.clone()
    };
    let r = forged
        .request(
            "HEAD",
            &format!("/{}/dir/big.bin", g.bucket()),
            &[],
            &[],
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 403, "a wrong secret must be refused");
}

#[test]
fn moto_object_lock_refuses_deleting_a_locked_version_and_if_none_match_refuses_overwrite() {
    use md5::Digest;
    let t0 = Instant::now();
    let m = Moto::start();
    eprintln!("moto: listening after {:.2?}", t0.elapsed());
    let s = m.s3();
    let r = s
        .request(
            "PUT",
            "/locked",
            &[],
            &[("x-amz-bucket-object-lock-enabled", "true")],
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 200, "create bucket: {}", r.text());

    let body = b"an archive that must stay";
    let md5 = vma_tests::s3::base64(&md5::Md5::digest(body));
    let until = vma_tests::s3::iso8601(std::time::SystemTime::now() + Duration::from_secs(86400));
    let r = s
        .request(
            "PUT",
            "/locked/a.vma",
            &[],
            &[
                ("content-md5", &md5),
                ("x-amz-object-lock-mode", "COMPLIANCE"),
                ("x-amz-object-lock-retain-until-date", &until),
            ],
            body,
        )
        .unwrap();
    assert_eq!(r.status, 200, "PUT with retention: {}", r.text());
    let version = r
        .header("x-amz-version-id")
        .expect("a lock bucket is versioned")
        .to_string();

    // moto answers no GetObjectRetention; HEAD shows the lock.
    let r = s
        .request(
            "HEAD",
            "/locked/a.vma",
            &[("versionId", &version)],
            &[],
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-amz-object-lock-mode"), Some("COMPLIANCE"));

    let r = s
        .request(
            "DELETE",
            "/locked/a.vma",
            &[("versionId", &version)],
            &[],
            b"",
        )
        .unwrap();
    assert_eq!(
        r.status,
        403,
        "deleting a locked version must be refused: {}",
        r.text()
    );
    let r = s.request("GET", "/locked/a.vma", &[], &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body);

    // Conditional create: If-None-Match: * on an existing key fails.
    let new = s
        .request(
            "PUT",
            "/locked/b.vma",
            &[],
            &[("content-md5", &md5), ("if-none-match", "*")],
            body,
        )
        .unwrap();
    assert_eq!(new.status, 200, "{}", new.text());
    let again = s
        .request(
            "PUT",
            "/locked/b.vma",
            &[],
            &[("content-md5", &md5), ("if-none-match", "*")],
            body,
        )
        .unwrap();
    assert_eq!(
        again.status,
        412,
        "an existing key must not be replaced: {}",
        again.text()
    );
}
