//! Archives on S3-compatible object storage, end to end through the `vma`
//! binary.
//!
//! Which store covers which path:
//! - Garage (a three-node cluster on loopback, replication 3): every
//!   command reading and writing `s3://` (create, list, config, verify,
//!   checksum, extract, mount, convert both ways, diff, merge, prune),
//!   chains found by listing, a node killed during extract and create,
//!   an interrupted upload leaving nothing, an existing key refused.
//! - moto: Object Lock (`--retain-until`/`--lock-mode`, checksummed parts,
//!   prune keeping locked archives) and the conditional completion
//!   (`If-None-Match: *`), which Garage does not implement.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vma_tests::garage::Garage;
use vma_tests::moto::Moto;
use vma_tests::s3::S3;
use vma_tests::{code, sha256_file, sparse_image, stderr, stdout, vma_bin};

fn run(env: &[(String, String)], args: &[&str]) -> Output {
    Command::new(vma_bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .expect("running vma")
}

fn ok(env: &[(String, String)], args: &[&str]) -> Output {
    let o = run(env, args);
    assert_eq!(code(&o), 0, "vma {args:?}: {}", stderr(&o));
    o
}

fn spawn(env: &[(String, String)], args: &[&str]) -> std::process::Child {
    Command::new(vma_bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running vma")
}

/// Keys in `bucket` under `prefix` (a listing by the tests' own client).
fn keys(s3: &S3, bucket: &str, prefix: &str) -> Vec<String> {
    let r = s3
        .request(
            "GET",
            &format!("/{bucket}"),
            &[("list-type", "2"), ("prefix", prefix)],
            &[],
            b"",
        )
        .expect("listing");
    assert_eq!(r.status, 200, "{}", r.text());
    tags(&r.text(), "Key")
}

/// Multipart uploads under way in `bucket`.
fn uploads(s3: &S3, bucket: &str) -> Vec<String> {
    let r = s3
        .request("GET", &format!("/{bucket}"), &[("uploads", "")], &[], b"")
        .expect("listing uploads");
    assert_eq!(r.status, 200, "{}", r.text());
    tags(&r.text(), "UploadId")
}

/// True once no multipart upload is listed in `bucket`; Garage drops a
/// completed or aborted upload from its listing a moment later (it is
/// polled for up to 15 s).
fn no_uploads(s3: &S3, bucket: &str) -> bool {
    let t0 = Instant::now();
    loop {
        if uploads(s3, bucket).is_empty() {
            return true;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tags(text: &str, name: &str) -> Vec<String> {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    text.split(&open)
        .skip(1)
        .filter_map(|s| s.split(&close).next())
        .map(str::to_string)
        .collect()
}

fn drive_digests(env: &[(String, String)], archive: &str) -> Vec<String> {
    let o = ok(env, &["list", "--json", archive]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    v["drives"]
        .as_array()
        .expect("drives")
        .iter()
        .map(|d| d["digest"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A 48 MiB sparse image with data spread over it.
fn image(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let p = dir.join(name);
    sparse_image(
        &p,
        48 << 20,
        &[
            (0, 3 << 20, seed),
            (9 << 20, 5 << 20, seed + 1),
            (30 << 20, 7 << 20, seed + 2),
            ((48 << 20) - 4096, 4096, seed + 3),
        ],
    );
    p
}

#[test]
fn every_command_reads_and_writes_s3_on_garage() {
    let g = Garage::start();
    let env = g.aws_env();
    let b = g.bucket().to_string();
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path(), "disk.raw", 10);
    let conf = t.path().join("qemu-server.conf");
    std::fs::write(&conf, "memory: 2048\n").unwrap();
    let full = format!("s3://{b}/vm-100/full.vma");

    // create, and the same archive locally for comparison
    let t0 = Instant::now();
    ok(
        &env,
        &[
            "create",
            "-q",
            &full,
            "--config",
            conf.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    eprintln!("create to s3: {:.2?}", t0.elapsed());
    assert!(no_uploads(&g.s3(1), &b), "no upload left");
    let local = t.path().join("local.vma");
    ok(
        &env,
        &[
            "create",
            "-q",
            local.to_str().unwrap(),
            "--config",
            conf.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    assert_eq!(
        drive_digests(&env, &full),
        drive_digests(&env, local.to_str().unwrap())
    );

    // an existing key is refused without --force, replaced with it
    let o = run(&env, &["create", "-q", &full, img.to_str().unwrap()]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    ok(
        &env,
        &[
            "create",
            "-q",
            "--force",
            &full,
            "--config",
            conf.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );

    // list, config, verify, checksum
    let o = ok(&env, &["list", &full]);
    assert!(stdout(&o).contains("disk"), "{}", stdout(&o));
    let o = ok(&env, &["config", &full]);
    assert_eq!(stdout(&o), "memory: 2048\n");
    ok(&env, &["verify", &full]);
    let o = ok(&env, &["checksum", &full]);
    let o2 = ok(&env, &["checksum", img.to_str().unwrap()]);
    assert_eq!(
        stdout(&o).split_whitespace().next(),
        stdout(&o2).split_whitespace().next()
    );

    // extract: the exact bytes
    let out = t.path().join("restore");
    ok(&env, &["extract", "-q", &full, out.to_str().unwrap()]);
    assert_eq!(sha256_file(&out.join("disk.raw")), sha256_file(&img));

    // mount: the drive file reads back exactly
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    ok(&env, &["mount", &full, mnt.to_str().unwrap()]);
    let same = sha256_file(&mnt.join("disk.raw")) == sha256_file(&img);
    ok(&env, &["umount", mnt.to_str().unwrap()]);
    assert!(same, "the mounted drive differs");

    // convert: s3 -> local -> s3 (VMA v1 and back)
    let v1 = t.path().join("v1.vma");
    ok(
        &env,
        &[
            "convert",
            "-q",
            "--format",
            "vma1",
            &full,
            v1.to_str().unwrap(),
        ],
    );
    let back = format!("s3://{b}/other/back.vma");
    ok(&env, &["convert", "-q", v1.to_str().unwrap(), &back]);
    assert_eq!(drive_digests(&env, &back), drive_digests(&env, &full));

    // diff against an archive on s3, to s3; the chain is found by listing
    let img2 = t.path().join("disk2.raw");
    std::fs::copy(&img, &img2).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img2).unwrap();
        f.write_all_at(&vma_tests::noise(99, 2 << 20), 20 << 20)
            .unwrap();
    }
    std::fs::rename(&img2, t.path().join("disk.raw.new")).unwrap();
    let dir2 = t.path().join("v2");
    std::fs::create_dir(&dir2).unwrap();
    let img2 = dir2.join("disk.raw");
    std::fs::rename(t.path().join("disk.raw.new"), &img2).unwrap();
    let inc1 = format!("s3://{b}/vm-100/inc1.vma");
    ok(
        &env,
        &[
            "diff",
            "-q",
            "--against",
            &full,
            img2.to_str().unwrap(),
            "-o",
            &inc1,
        ],
    );
    let o = ok(&env, &["list", "--chain", &inc1]);
    assert!(stdout(&o).contains("full.vma"), "{}", stdout(&o));
    let out2 = t.path().join("restore2");
    ok(&env, &["extract", "-q", &inc1, out2.to_str().unwrap()]);
    assert_eq!(sha256_file(&out2.join("disk.raw")), sha256_file(&img2));
    ok(&env, &["verify", &inc1]);

    // an incremental without its full beside it: found with --parent s3://
    let lone = format!("s3://{b}/elsewhere/inc1.vma");
    ok(&env, &["convert", "-q", &inc1, &lone, "--parent", &full]);
    let o = run(
        &env,
        &[
            "extract",
            "-q",
            &lone,
            t.path().join("r3").to_str().unwrap(),
        ],
    );
    assert_ne!(code(&o), 0, "no parent beside it");
    ok(
        &env,
        &[
            "extract",
            "-q",
            &lone,
            t.path().join("r4").to_str().unwrap(),
            "--parent",
            &full,
        ],
    );
    assert_eq!(
        sha256_file(&t.path().join("r4/disk.raw")),
        sha256_file(&img2)
    );

    // merge to s3
    let merged = format!("s3://{b}/merged/synthetic.vma");
    ok(&env, &["merge", "-q", &inc1, "-o", &merged]);
    let out5 = t.path().join("restore5");
    ok(&env, &["extract", "-q", &merged, out5.to_str().unwrap()]);
    assert_eq!(sha256_file(&out5.join("disk.raw")), sha256_file(&img2));

    // prune the prefix down to the newest point: inc1 becomes a full,
    // full.vma goes; nothing of another prefix is touched
    let inc2 = format!("s3://{b}/vm-100/inc2.vma");
    ok(
        &env,
        &[
            "diff",
            "-q",
            "--against",
            &inc1,
            img2.to_str().unwrap(),
            "-o",
            &inc2,
        ],
    );
    let o = ok(
        &env,
        &["prune", &format!("s3://{b}/vm-100"), "--keep-last", "1"],
    );
    eprintln!("{}", stdout(&o));
    let left = keys(&g.s3(1), &b, "vm-100/");
    assert_eq!(left, vec!["vm-100/inc2.vma".to_string()], "{}", stdout(&o));
    let out6 = t.path().join("restore6");
    ok(&env, &["extract", "-q", &inc2, out6.to_str().unwrap()]);
    assert_eq!(sha256_file(&out6.join("disk.raw")), sha256_file(&img2));
    assert!(keys(&g.s3(1), &b, "other/").len() == 1);
    assert!(no_uploads(&g.s3(1), &b), "no upload left");

    // a missing object: the error names it
    let o = run(&env, &["list", &format!("s3://{b}/vm-100/nope.vma")]);
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("s3://vma-test/vm-100/nope.vma"),
        "{}",
        stderr(&o)
    );
    // secrets never appear
    assert!(!stderr(&o).contains(g.secret()));
}

/// A 96 MiB image of incompressible data (uploads of many parts).
fn big_image(dir: &Path) -> PathBuf {
    let p = dir.join("big.raw");
    sparse_image(&p, 96 << 20, &[(0, 96 << 20, 7)]);
    p
}

#[test]
fn a_node_killed_mid_extract_and_mid_create_gives_exact_bytes_or_a_clear_error() {
    let g = Garage::start();
    let env = g.aws_env();
    let b = g.bucket().to_string();
    let t = tempfile::tempdir().unwrap();
    let img = big_image(t.path());
    let arch = format!("s3://{b}/kill/a.vma");
    ok(
        &env,
        &[
            "create",
            "-q",
            "--compress",
            "none",
            &arch,
            img.to_str().unwrap(),
        ],
    );

    // extract while node 2 dies (the endpoint is node 1)
    let out = t.path().join("restore");
    let child = spawn(&env, &["extract", "-q", &arch, out.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(300));
    g.kill_node(2);
    let o = child.wait_with_output().unwrap();
    if code(&o) == 0 {
        assert_eq!(sha256_file(&out.join("big.raw")), sha256_file(&img));
        eprintln!("extract with node 2 killed: succeeded, bytes exact");
    } else {
        assert!(
            !out.join("big.raw").exists(),
            "nothing committed on failure"
        );
        assert!(stderr(&o).contains("s3://"), "{}", stderr(&o));
        eprintln!("extract with node 2 killed: failed clearly: {}", stderr(&o));
    }
    g.restart_node(2);

    // create while node 3 dies
    let arch2 = format!("s3://{b}/kill/b.vma");
    let child = spawn(
        &env,
        &[
            "create",
            "-q",
            "--compress",
            "none",
            &arch2,
            img.to_str().unwrap(),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    g.kill_node(3);
    let o = child.wait_with_output().unwrap();
    if code(&o) == 0 {
        let out2 = t.path().join("restore2");
        ok(&env, &["extract", "-q", &arch2, out2.to_str().unwrap()]);
        assert_eq!(sha256_file(&out2.join("big.raw")), sha256_file(&img));
        eprintln!("create with node 3 killed: succeeded, bytes exact");
    } else {
        assert!(stderr(&o).contains("s3://"), "{}", stderr(&o));
        assert!(!keys(&g.s3(1), &b, "kill/").contains(&"kill/b.vma".to_string()));
        eprintln!("create with node 3 killed: failed clearly: {}", stderr(&o));
    }
    assert!(no_uploads(&g.s3(1), &b), "no upload left");
    g.restart_node(3);
}

#[test]
fn an_interrupted_upload_leaves_no_object_and_no_upload() {
    let g = Garage::start();
    let env = g.aws_env();
    let b = g.bucket().to_string();
    let t = tempfile::tempdir().unwrap();
    let img = big_image(t.path());
    let arch = format!("s3://{b}/int/a.vma");
    let child = spawn(
        &env,
        &[
            "create",
            "-q",
            "--compress",
            "none",
            &arch,
            img.to_str().unwrap(),
        ],
    );
    // Wait until the upload is under way.
    let s = g.s3(1);
    let t0 = Instant::now();
    while uploads(&s, &b).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the upload never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 130, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("aborted the upload of s3://"),
        "{}",
        stderr(&o)
    );
    assert!(keys(&s, &b, "int/").is_empty(), "no object");
    assert!(no_uploads(&s, &b), "no multipart upload left");

    // A failing source aborts the upload too (an image that shrinks is not
    // available here; a missing image fails before the upload starts).
    let o = run(&env, &["create", "-q", &arch, "/nonexistent.raw"]);
    assert_ne!(code(&o), 0);
    assert!(no_uploads(&s, &b));
}

#[test]
fn object_lock_and_conditional_completion_on_moto() {
    let m = Moto::start();
    let env = m.aws_env();
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
    assert_eq!(r.status, 200, "{}", r.text());
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path(), "disk.raw", 3);
    let full = "s3://locked/vm/full.vma";
    ok(
        &env,
        &[
            "create",
            "-q",
            "--retain-until",
            "2099-01-01",
            "--lock-mode",
            "governance",
            full,
            img.to_str().unwrap(),
        ],
    );
    // moto 5.2.5 has no GET ?retention; HEAD states the lock, as on AWS.
    let r = s
        .request("HEAD", "/locked/vm/full.vma", &[], &[], b"")
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-amz-object-lock-mode"), Some("GOVERNANCE"));
    assert!(
        r.header("x-amz-object-lock-retain-until-date")
            .is_some_and(|d| d.starts_with("2099-01-01")),
        "{:?}",
        r.headers
    );

    // flags go together, dates are in the future
    let o = run(
        &env,
        &[
            "create",
            "-q",
            "--retain-until",
            "2099-01-01",
            "s3://locked/x.vma",
            img.to_str().unwrap(),
        ],
    );
    assert_ne!(code(&o), 0);
    let o = run(
        &env,
        &[
            "create",
            "-q",
            "--retain-until",
            "2000-01-01",
            "--lock-mode",
            "compliance",
            "s3://locked/x.vma",
            img.to_str().unwrap(),
        ],
    );
    assert!(stderr(&o).contains("past"), "{}", stderr(&o));

    // a chain of locked archives: prune keeps what is locked
    let dir2 = t.path().join("v2");
    std::fs::create_dir(&dir2).unwrap();
    let img2 = dir2.join("disk.raw");
    std::fs::copy(&img, &img2).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img2).unwrap();
        f.write_all_at(&vma_tests::noise(5, 1 << 20), 1 << 20)
            .unwrap();
    }
    let inc = "s3://locked/vm/inc1.vma";
    ok(
        &env,
        &[
            "diff",
            "-q",
            "--against",
            full,
            img2.to_str().unwrap(),
            "-o",
            inc,
        ],
    );
    let o = ok(&env, &["prune", "s3://locked/vm", "--keep-last", "1"]);
    let text = stdout(&o);
    assert!(
        text.contains("kept s3://locked/vm/full.vma: it is locked"),
        "{text}"
    );
    assert!(!text.contains("deleted s3://locked/vm/full.vma"), "{text}");
    let left = keys(&s, "locked", "vm/");
    assert!(
        left.contains(&"vm/full.vma".to_string()) && left.contains(&"vm/inc1.vma".to_string()),
        "{left:?}"
    );
    let out = t.path().join("restore");
    ok(&env, &["extract", "-q", inc, out.to_str().unwrap()]);
    assert_eq!(sha256_file(&out.join("disk.raw")), sha256_file(&img2));

    // the conditional completion: a key that appears while the upload runs
    // is not replaced (If-None-Match: *)
    let r = s.request("PUT", "/plain", &[], &[], b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    std::env::set_var("AWS_ENDPOINT_URL", m.endpoint());
    for (k, v) in &env {
        std::env::set_var(k, v);
    }
    let loc = vma_s3::Location::parse("s3://plain/race.vma").unwrap();
    let mut up = vma_s3::write::Upload::start(&loc, Default::default()).unwrap();
    std::io::Write::write_all(&mut up, b"the archive").unwrap();
    let r = s
        .request("PUT", "/plain/race.vma", &[], &[], b"someone else's")
        .unwrap();
    assert_eq!(r.status, 200);
    let e = up.complete().unwrap_err();
    assert!(matches!(e, vma_core::Error::Exists { .. }), "{e}");
    let r = s.request("GET", "/plain/race.vma", &[], &[], b"").unwrap();
    assert_eq!(r.body, b"someone else's");
    assert!(no_uploads(&s, "plain"), "the upload was aborted");
}

/// A qemu-storage-daemon serving the raw image `img` as node `disk0`, with
/// a QMP socket for `vma capture` and an NBD export for guest writes;
/// killed on drop.
struct Qsd(std::process::Child, PathBuf);

impl Qsd {
    fn start(dir: &Path, img: &Path) -> Qsd {
        vma_tests::require("qemu-storage-daemon");
        vma_tests::require("qemu-io");
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                dir.join("qmp.sock").display()
            ))
            .args(["--monitor", "chardev=qmp0", "--nbd-server"])
            .arg(format!(
                "addr.type=unix,addr.path={}",
                dir.join("guest.sock").display()
            ))
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk0-file,filename={}",
                img.display()
            ))
            .args([
                "--blockdev",
                "driver=raw,node-name=disk0,file=disk0-file",
                "--export",
                "type=nbd,id=disk0-exp,node-name=disk0,name=disk0,writable=on",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting qemu-storage-daemon");
        let t0 = Instant::now();
        while !dir.join("qmp.sock").exists() || !dir.join("guest.sock").exists() {
            assert!(t0.elapsed() < Duration::from_secs(10), "qsd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd(child, dir.to_path_buf())
    }

    fn qmp(&self) -> String {
        self.1.join("qmp.sock").to_str().unwrap().to_string()
    }

    /// A guest write of `len` bytes of `pattern` at `offset`.
    fn write(&self, offset: u64, len: u64, pattern: u8) {
        let uri = format!(
            "nbd+unix:///disk0?socket={}",
            self.1.join("guest.sock").display()
        );
        let o = Command::new("qemu-io")
            .args(["-f", "raw", &uri, "-c"])
            .arg(format!("write -P {pattern} {offset} {len}"))
            .output()
            .expect("qemu-io");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn capture_streams_to_s3_and_an_incremental_starts_from_an_s3_parent() {
    let g = Garage::start();
    let env = g.aws_env();
    let b = g.bucket().to_string();
    let s = g.s3(1);
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("disk0.raw");
    sparse_image(
        &img,
        24 << 20,
        &[
            (0, 3 << 20, 31),
            (10 << 20, 9 << 20, 32),
            ((24 << 20) - 4096, 4096, 33),
        ],
    );
    let before = sha256_file(&img);
    let d = Qsd::start(t.path(), &img);
    let full = format!("s3://{b}/cap/full.vma");
    let o = ok(
        &env,
        &["capture", "--qmp", &d.qmp(), "--drive", "disk0", &full],
    );
    assert!(stderr(&o).contains("full backup"), "{}", stderr(&o));
    assert!(no_uploads(&s, &b), "no upload left");
    let r1 = t.path().join("r1");
    ok(&env, &["extract", "-q", &full, r1.to_str().unwrap()]);
    assert_eq!(sha256_file(&r1.join("disk0.raw")), before);

    // Guest writes, then an incremental whose parent is the object.
    d.write(1 << 20, 256 << 10, 0x5a);
    d.write(20 << 20, 64 << 10, 0xa5);
    let inc = format!("s3://{b}/cap/inc.vma");
    let o = ok(
        &env,
        &[
            "capture",
            "--qmp",
            &d.qmp(),
            "--drive",
            "disk0",
            "--incremental-from",
            &full,
            &inc,
        ],
    );
    assert!(stderr(&o).contains("incremental backup"), "{}", stderr(&o));
    assert!(stderr(&o).contains(" 5 clusters"), "{}", stderr(&o));
    let r2 = t.path().join("r2");
    ok(&env, &["extract", "-q", &inc, r2.to_str().unwrap()]);
    assert_eq!(sha256_file(&r2.join("disk0.raw")), sha256_file(&img));
    ok(&env, &["verify", &inc]);

    // --diff-against an object, into an object (scratch images go to the
    // temporary directory, as there is no directory beside the archive).
    d.write(5 << 20, 128 << 10, 0x3c);
    let diff = format!("s3://{b}/cap/diff.vma");
    let guest = t.path().join("guest.sock");
    let o = ok(
        &env,
        &[
            "capture",
            "--qmp",
            &d.qmp(),
            "--drive",
            "disk0",
            "--diff-against",
            &inc,
            "--qemu-nbd-socket",
            guest.to_str().unwrap(),
            &diff,
        ],
    );
    assert!(stderr(&o).contains("2 clusters"), "{}", stderr(&o));
    let r3 = t.path().join("r3");
    ok(&env, &["extract", "-q", &diff, r3.to_str().unwrap()]);
    assert_eq!(sha256_file(&r3.join("disk0.raw")), sha256_file(&img));

    // An existing key is not replaced without --force; nothing is left.
    let o = run(
        &env,
        &["capture", "--qmp", &d.qmp(), "--drive", "disk0", &full],
    );
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    let o = run(
        &env,
        &[
            "capture",
            "--qmp",
            &d.qmp(),
            "--drive",
            "disk0",
            "--bitmap-mode",
            "always",
            "--incremental-from",
            &inc,
            &format!("s3://{b}/cap/x.vma"),
        ],
    );
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("local file"), "{}", stderr(&o));

    // Ctrl-C during a slow capture: the upload is aborted, no object.
    let cancelled = format!("s3://{b}/cap/cancelled.vma");
    let child = spawn(
        &env,
        &[
            "capture",
            "--qmp",
            &d.qmp(),
            "--drive",
            "disk0",
            "--speed",
            "1048576",
            &cancelled,
        ],
    );
    let t0 = Instant::now();
    while uploads(&s, &b).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no upload started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child's pid touches no memory.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("cancelled"), "{}", stderr(&o));
    assert_eq!(
        keys(&s, &b, "cap/"),
        vec![
            "cap/diff.vma".to_string(),
            "cap/full.vma".to_string(),
            "cap/inc.vma".to_string()
        ]
    );
    assert!(no_uploads(&s, &b), "no multipart upload left");
}

/// `vma serve ARCHIVE --socket SOCKET EXTRA...` with the store's
/// settings, waited for until it is ready (its stderr goes to `log`).
fn serve(
    env: &[(String, String)],
    archive: &str,
    socket: &Path,
    log: &Path,
    extra: &[&str],
) -> std::process::Child {
    let mut child = Command::new(vma_bin())
        .args(["serve", archive, "--socket", socket.to_str().unwrap()])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("running vma serve");
    let t0 = Instant::now();
    loop {
        let msgs = std::fs::read_to_string(log).unwrap_or_default();
        if msgs.contains("ready") {
            return child;
        }
        if let Some(status) = child.try_wait().unwrap() {
            if status.success() && msgs.contains("serving in process") {
                return child;
            }
            panic!("vma serve exited with {status}: {msgs}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "not ready: {msgs}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemu_img_compare(url: &str, image: &Path) {
    vma_tests::require("qemu-img");
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", url])
        .arg(image)
        .output()
        .expect("qemu-img");
    assert_eq!(
        code(&o),
        0,
        "qemu-img compare {url}: {}{}",
        stdout(&o),
        stderr(&o)
    );
}

#[test]
fn serve_exports_an_s3_archive_and_its_s3_chain() {
    let g = Garage::start();
    let env = g.aws_env();
    let b = g.bucket().to_string();
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path(), "disk.raw", 40);
    let full = format!("s3://{b}/srv/full.vma");
    ok(&env, &["create", "-q", &full, img.to_str().unwrap()]);
    let dir2 = t.path().join("v2");
    std::fs::create_dir(&dir2).unwrap();
    let img2 = dir2.join("disk.raw");
    std::fs::copy(&img, &img2).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img2).unwrap();
        f.write_all_at(&vma_tests::noise(41, 3 << 20), 12 << 20)
            .unwrap();
    }
    let inc = format!("s3://{b}/srv/inc.vma");
    ok(
        &env,
        &[
            "diff",
            "-q",
            "--against",
            &full,
            img2.to_str().unwrap(),
            "-o",
            &inc,
        ],
    );

    // In the foreground: the full, then the incremental (its parent found
    // beside it by listing).
    let sock = t.path().join("full.sock");
    let log = t.path().join("full.log");
    let mut child = serve(&env, &full, &sock, &log, &[]);
    let url = format!("nbd+unix:///disk?socket={}", sock.display());
    qemu_img_compare(&url, &img);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());

    // Detached (the serving process opens the objects itself).
    let sock = t.path().join("inc.sock");
    let log = t.path().join("inc.log");
    let pid_file = t.path().join("inc.pid");
    let mut child = serve(
        &env,
        &inc,
        &sock,
        &log,
        &["--detach", "--pid-file", pid_file.to_str().unwrap()],
    );
    assert!(child.wait().unwrap().success());
    let url = format!("nbd+unix:///disk?socket={}", sock.display());
    qemu_img_compare(&url, &img2);
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t0 = Instant::now();
    while pid_file.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}
