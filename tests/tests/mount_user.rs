//! `vma mount` for a user who is not root (through `fusermount3`) and
//! `vma umount`: only vma mounts are unmounted, and "not mounted", "busy"
//! (naming the process) and a missing FUSE device or helper are explained.
//! Runs as root (the tests need it to set up) and as user 65534 (`nobody`,
//! through `setpriv`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use vma_tests::*;

const NOBODY: &str = "65534";

/// `setpriv` arguments that run a command as `nobody`.
fn as_nobody() -> Command {
    // Found here, not through the PATH a test may give the command.
    let found = sh("command -v setpriv");
    let mut c = Command::new(stdout(&found).trim());
    c.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        "--",
    ]);
    c
}

/// Run `vma ARGS` as `nobody`.
fn vma_nobody(args: &[&str]) -> Output {
    as_nobody()
        .arg(vma_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running setpriv")
}

/// Root-only setup every test here shares: `setpriv`, a usable
/// `/dev/fuse` (mode 0666, the mode distributions give it; some
/// containers make it 0600), `fusermount3`.
fn setup() {
    require("setpriv");
    require("fusermount3");
    assert_eq!(
        unsafe_geteuid(),
        0,
        "these tests set up files and mounts for another user: run them as root"
    );
    let dev = Path::new("/dev/fuse");
    let mode = std::fs::metadata(dev)
        .expect("/dev/fuse is missing: the mount tests need FUSE")
        .permissions()
        .mode();
    if mode & 0o006 != 0o006 {
        std::fs::set_permissions(dev, std::fs::Permissions::from_mode(0o20666))
            .expect("chmod 0666 /dev/fuse");
    }
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// A directory `nobody` can read (tempdirs are 0700), with an archive of
/// one drive and a config, readable by all; returns (dir, archive, disk).
fn world_readable_archive() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = t.path();
    let disk = d.join("disk0.raw");
    sparse_image(
        &disk,
        20 * 1024 * 1024 + 333,
        &[(0, 200_000, 1), (9 << 20, 1 << 20, 2)],
    );
    std::fs::write(d.join("vm.conf"), b"cores: 1\n").unwrap();
    let archive = d.join("backup.vma");
    let o = vma(&[
        "create",
        "--quiet",
        p(&archive),
        "--config",
        p(&d.join("vm.conf")),
        p(&disk),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    for f in [&archive, &disk] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    (t, archive, disk)
}

/// A mount point owned by `nobody`.
fn nobody_dir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    let o = sh(&format!("chown {NOBODY}:{NOBODY} {}", p(path)));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    path.to_path_buf()
}

/// The mountinfo line of `dir`, if it is a mount point.
fn mountinfo(dir: &Path) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(p(&dir)))
        .map(str::to_string)
}

/// Unmounts whatever is left at `dir` when a test fails half-way.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if is_mount_point(&self.0) {
            let _ = sh(&format!("umount -l {}", p(&self.0)));
        }
    }
}

/// A process of `nobody` (or root) whose working directory, or an open
/// file, lies in the mount; killed when dropped.
struct Holder(Child);

impl Holder {
    fn start(mut cmd: Command, script: &str) -> Holder {
        let child = cmd
            .args(["sh", "-c", script])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting a holder");
        // Let it get there.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Holder(child)
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_user_who_is_not_root_mounts_reads_and_unmounts() {
    setup();
    let (t, archive, disk) = world_readable_archive();
    let mp = nobody_dir(&t.path().join("mnt"));
    let _cleanup = Cleanup(mp.clone());

    let o = vma_nobody(&["mount", p(&archive), p(&mp)]);
    assert_eq!(code(&o), 0, "mount as nobody: {}", stderr(&o));
    let line = mountinfo(&mp).expect("mounted");
    assert!(
        line.contains(" - fuse.vma vma ") && line.contains("user_id=65534"),
        "a vma mount of user 65534: {line}"
    );

    // The user reads the drive (a FUSE mount without allow_other is its
    // owner's alone) and gets the source's bytes.
    let o = as_nobody()
        .args(["cmp", p(&disk), p(&mp.join("disk0.raw"))])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "cmp as nobody: {}", stderr(&o));
    let o = as_nobody()
        .args(["cat", p(&mp.join("vm.conf"))])
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "cores: 1\n");

    // Busy: the message names the processes and what they hold.
    {
        let cwd = Holder::start(as_nobody(), &format!("cd {} && exec sleep 60", p(&mp)));
        let file = Holder::start(
            as_nobody(),
            &format!("exec 3<{} && exec sleep 60", p(&mp.join("disk0.raw"))),
        );
        let o = vma_nobody(&["umount", p(&mp)]);
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{err}");
        assert!(err.contains("is busy"), "{err}");
        assert!(
            err.contains(&format!("process {} (sleep: working directory)", cwd.pid())),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "process {} (sleep: open file {})",
                file.pid(),
                p(&mp.join("disk0.raw"))
            )),
            "{err}"
        );
        assert!(mountinfo(&mp).is_some(), "still mounted");
    }

    // The user unmounts it through fusermount3 (umount(2) is root's).
    let o = vma_nobody(&["umount", p(&mp)]);
    assert_eq!(code(&o), 0, "umount as nobody: {}", stderr(&o));
    assert!(mountinfo(&mp).is_none(), "unmounted");
    for _ in 0..100 {
        if serving_processes(&mp).is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(serving_processes(&mp).is_empty(), "the mount process ended");

    // Nothing mounted any more: said so.
    let o = vma_nobody(&["umount", p(&mp)]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("is not mounted (nothing to unmount)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_user_cannot_unmount_what_root_mounted_and_is_told_why() {
    setup();
    let (t, archive, _) = world_readable_archive();
    let mp = t.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    std::fs::set_permissions(&mp, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _cleanup = Cleanup(mp.clone());
    let o = vma(&["mount", p(&archive), p(&mp)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(mountinfo(&mp).unwrap().contains(" - fuse.vma vma "));
    let o = vma_nobody(&["umount", p(&mp)]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("was mounted by user 0: only that user or root can unmount it"),
        "{}",
        stderr(&o)
    );
    assert!(mountinfo(&mp).is_some());

    // Root: busy names the holder, then the unmount works.
    {
        let holder = Holder::start(
            Command::new("env"),
            &format!("cd {} && exec sleep 60", p(&mp)),
        );
        let o = vma(&["umount", p(&mp)]);
        assert_eq!(code(&o), 2);
        assert!(
            stderr(&o).contains(&format!(
                "process {} (sleep: working directory)",
                holder.pid()
            )),
            "{}",
            stderr(&o)
        );
    }
    let o = vma(&["umount", p(&mp)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(mountinfo(&mp).is_none());
}

#[test]
fn umount_leaves_other_file_systems_alone() {
    setup();
    let t = tempfile::tempdir().unwrap();
    // A tmpfs, and an ext4 loop mount (as the one reported gone with rc 0).
    let fs = SmallFs::new(&t.path().join("tmpfs"), "1m");
    std::fs::write(fs.path().join("keep"), b"x").unwrap();
    let o = vma(&["umount", p(fs.path())]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("is a tmpfs mount of vma-test, not one made by `vma mount`"),
        "{}",
        stderr(&o)
    );
    assert!(fs.path().join("keep").exists(), "still mounted");

    require("mkfs.ext4");
    let img = t.path().join("ext4.img");
    let ext4 = t.path().join("ext4");
    std::fs::create_dir_all(&ext4).unwrap();
    let o = sh(&format!(
        "truncate -s 8M {img} && mkfs.ext4 -q {img} && mount -o loop {img} {mp}",
        img = p(&img),
        mp = p(&ext4)
    ));
    assert_eq!(code(&o), 0, "loop mount: {}", stderr(&o));
    let _cleanup = Cleanup(ext4.clone());
    let o = vma(&["umount", p(&ext4)]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("is a ext4 mount of /dev/loop"),
        "{}",
        stderr(&o)
    );
    assert!(is_mount_point(&ext4), "the ext4 mount is still there");
    assert_eq!(code(&sh(&format!("umount {}", p(&ext4)))), 0);

    // A directory nothing is mounted on, and a path that does not exist.
    let o = vma(&["umount", p(t.path())]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("is not mounted (nothing to unmount)"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("os error"), "{}", stderr(&o));
    let o = vma(&["umount", p(&t.path().join("nowhere"))]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
}

#[test]
fn mount_says_what_is_missing() {
    setup();
    require("unshare");
    let (t, archive, _) = world_readable_archive();
    let mp = nobody_dir(&t.path().join("mnt"));
    let _cleanup = Cleanup(mp.clone());

    // No fusermount3 on PATH, as a user.
    let o = as_nobody()
        .env("PATH", "/nonexistent")
        .arg(vma_bin())
        .args(["mount", p(&archive), p(&mp)])
        .output()
        .unwrap();
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("fusermount3 is not installed")
            && stderr(&o).contains("apt-get install fuse3"),
        "{}",
        stderr(&o)
    );

    // A mount point the user cannot write to.
    let root_dir = t.path().join("root-only");
    std::fs::create_dir_all(&root_dir).unwrap();
    let o = vma_nobody(&["mount", p(&archive), p(&root_dir)]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("mounts only on a directory you can write to"),
        "{}",
        stderr(&o)
    );

    // /dev/fuse missing (a private mount namespace with an empty /dev),
    // for root and for a user.
    let script = |user: &str| {
        format!(
            "mount -t tmpfs none /dev && exec {user} {vma} mount {a} {m}",
            vma = p(&vma_bin()),
            a = p(&archive),
            m = p(&mp)
        )
    };
    let setpriv = format!("setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --");
    for user in ["", setpriv.as_str()] {
        let o = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script(user)])
            .output()
            .unwrap();
        assert_eq!(code(&o), 2, "{}", stderr(&o));
        assert!(
            stderr(&o).contains("/dev/fuse is missing") && stderr(&o).contains("modprobe fuse"),
            "{}",
            stderr(&o)
        );
    }

    // /dev/fuse that only root may open (mode 0600, as some containers
    // have it): a user is told, root mounts.
    let o = Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &format!(
                "mknod -m 0600 {d}/fuse c 10 229 && mount --bind {d}/fuse /dev/fuse && exec {setpriv} {vma} mount {a} {m}",
                d = p(t.path()),
                vma = p(&vma_bin()),
                a = p(&archive),
                m = p(&mp)
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/dev/fuse is not open to users other than root")
            && stderr(&o).contains("chmod 0666 /dev/fuse"),
        "{}",
        stderr(&o)
    );
    assert!(mountinfo(&mp).is_none());
}

#[test]
fn a_mount_whose_server_died_is_unmounted_by_its_user() {
    setup();
    let (t, archive, _) = world_readable_archive();
    let mp = nobody_dir(&t.path().join("mnt"));
    let _cleanup = Cleanup(mp.clone());
    let o = vma_nobody(&["mount", p(&archive), p(&mp)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let pids = serving_processes(&mp);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let o = sh(&format!("kill -KILL {}", pids[0]));
    assert_eq!(code(&o), 0);
    for _ in 0..100 {
        if serving_processes(&mp).is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The mount is still there, dead ("Transport endpoint is not connected").
    assert!(mountinfo(&mp).is_some());
    let o = vma_nobody(&["umount", p(&mp)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(mountinfo(&mp).is_none());
}
