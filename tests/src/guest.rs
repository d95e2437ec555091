//! A real guest for the tests: the tiny kernel + busybox initramfs that
//! `scripts/guest.sh build` caches, booted in `qemu-system-x86_64` on the
//! drives a test gives it (image files or NBD URLs).
//!
//! The guest's init mounts its root disk (`/dev/vda`, ext4), runs a script
//! (from the kernel command line or from the disk), prints `VMATEST ...`
//! lines on the serial console and powers off; see `scripts/guest.sh` for
//! the command-line switches. The serial console goes to a file that
//! [`Guest::wait_for`] watches. QEMU runs with KVM when `/dev/kvm` can boot
//! a stock kernel and with TCG otherwise (`VMA_TEST_ACCEL=kvm|tcg`
//! overrides), without network or display, and is killed when the
//! [`Guest`] is dropped or the test process dies.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Repository root (the parent of the tests crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent")
        .to_path_buf()
}

/// The cached guest: kernel and initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// `~/.cache/vma-test/guest-<key>/`.
    pub dir: PathBuf,
}

impl GuestImage {
    /// The kernel QEMU boots: the uncompressed `vmlinux` (PVH entry, no
    /// decompression) when the build found one, else the bzImage.
    pub fn kernel(&self) -> PathBuf {
        let vmlinux = self.dir.join("vmlinux");
        if vmlinux.exists() {
            vmlinux
        } else {
            self.dir.join("vmlinuz")
        }
    }

    /// The busybox initramfs.
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }
}

/// Build the guest if missing (`scripts/guest.sh build`, once per process)
/// and return it. Panics with what to install when it cannot be built.
pub fn guest_image() -> GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let script = repo_root().join("scripts/guest.sh");
            let o = Command::new("bash")
                .arg(&script)
                .arg("build")
                .stdin(Stdio::null())
                .output()
                .expect("running scripts/guest.sh");
            assert!(
                o.status.success(),
                "scripts/guest.sh build failed (scripts/setup.sh installs what it needs): {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            GuestImage { dir }
        })
        .clone()
}

/// How QEMU runs the guest's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's own emulator: slower, runs everywhere.
    Tcg,
}

/// KVM when `/dev/kvm` opens read-write and is not PVM (a paravirtual KVM
/// found on nested hosts that boots only PVM-enabled kernels, not
/// Debian's); TCG otherwise. `VMA_TEST_ACCEL=kvm|tcg` overrides.
pub fn accel() -> Accel {
    static ACCEL: OnceLock<Accel> = OnceLock::new();
    *ACCEL.get_or_init(|| {
        let (accel, why) = match std::env::var("VMA_TEST_ACCEL").as_deref() {
            Ok("kvm") => (Accel::Kvm, "VMA_TEST_ACCEL=kvm"),
            Ok("tcg") => (Accel::Tcg, "VMA_TEST_ACCEL=tcg"),
            _ => {
                if std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_err()
                {
                    (Accel::Tcg, "/dev/kvm is missing or not usable")
                } else if Path::new("/sys/module/kvm_pvm").exists() {
                    (
                        Accel::Tcg,
                        "/dev/kvm is PVM, which cannot boot a stock kernel",
                    )
                } else {
                    (Accel::Kvm, "/dev/kvm is usable")
                }
            }
        };
        eprintln!("guest: {accel:?} ({why})");
        accel
    })
}

/// A disk attached to the guest as a virtio-blk device (`/dev/vda`,
/// `/dev/vdb`, ... in the order given).
#[derive(Debug, Clone)]
pub struct Drive {
    /// What QEMU opens: a file name or a URL such as
    /// `nbd+unix:///drive?socket=/path/to.sock`.
    pub target: String,
    /// Image format: `raw`, `qcow2`, ...
    pub format: String,
    /// Attach read-only.
    pub read_only: bool,
}

impl Drive {
    /// A raw image file.
    pub fn raw(path: &Path) -> Drive {
        Drive {
            target: path.to_string_lossy().into_owned(),
            format: "raw".into(),
            read_only: false,
        }
    }

    /// A qcow2 image file (its backing file, if any, is opened too).
    pub fn qcow2(path: &Path) -> Drive {
        Drive {
            format: "qcow2".into(),
            ..Drive::raw(path)
        }
    }

    /// A URL QEMU understands (`nbd+unix:///EXPORT?socket=PATH`,
    /// `nbd://HOST:PORT/EXPORT`), raw format.
    pub fn url(url: &str) -> Drive {
        Drive {
            target: url.to_string(),
            format: "raw".into(),
            read_only: false,
        }
    }

    /// The same drive, attached read-only.
    pub fn read_only(mut self) -> Drive {
        self.read_only = true;
        self
    }
}

/// What to boot: drives and what the guest runs.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Disks, in order (`/dev/vda` first).
    pub drives: Vec<Drive>,
    /// A shell script for the guest to run (passed on the kernel command
    /// line, so at most about 1500 bytes); `None` runs the disk's
    /// `/vmatest.sh`.
    pub script: Option<String>,
    /// The device the guest mounts on `/mnt` (`/dev/vda` by default;
    /// `none` mounts nothing).
    pub root: String,
    /// Mount the root read-only (and do not replay its journal).
    pub root_read_only: bool,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Print the kernel's boot messages on the console too.
    pub verbose: bool,
    /// Further QEMU arguments.
    pub extra_args: Vec<String>,
}

impl GuestConfig {
    /// Boot on these drives and run the disk's `/vmatest.sh`.
    pub fn new(drives: Vec<Drive>) -> GuestConfig {
        GuestConfig {
            drives,
            script: None,
            root: "/dev/vda".into(),
            root_read_only: false,
            memory_mib: 256,
            verbose: false,
            extra_args: Vec::new(),
        }
    }

    /// Run `script` (shell) instead of the disk's `/vmatest.sh`.
    pub fn script(mut self, script: &str) -> GuestConfig {
        self.script = Some(script.to_string());
        self
    }

    /// Mount the root read-only.
    pub fn root_read_only(mut self) -> GuestConfig {
        self.root_read_only = true;
        self
    }
}

/// A line the guest printed, and when (since QEMU started).
#[derive(Debug, Clone)]
pub struct Line {
    /// The line, without its end.
    pub text: String,
    /// Time since QEMU was started.
    pub at: Duration,
}

/// A running guest; QEMU is killed when it is dropped.
pub struct Guest {
    child: Option<Child>,
    dir: tempfile::TempDir,
    started: Instant,
    /// Lines seen so far with their arrival times.
    lines: Vec<Line>,
    partial: String,
    read_pos: u64,
    cursor: usize,
    status: Option<ExitStatus>,
    /// The accelerator used.
    pub accel: Accel,
}

/// A generous bound for a boot and a short script: TCG on a loaded
/// machine is slow.
pub fn default_timeout() -> Duration {
    match accel() {
        Accel::Kvm => Duration::from_secs(60),
        Accel::Tcg => Duration::from_secs(180),
    }
}

/// Double the commas QEMU's option syntax treats as separators.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

impl Guest {
    /// Start QEMU. Panics if it cannot be started (with what to install).
    pub fn boot(config: &GuestConfig) -> Guest {
        crate::require("qemu-system-x86_64");
        let image = guest_image();
        let accel = accel();
        let dir = tempfile::Builder::new()
            .prefix("vma-guest")
            .tempdir()
            .expect("temp dir");
        let serial = dir.path().join("serial.log");
        let qmp = dir.path().join("qmp.sock");
        let mut append = String::from("console=ttyS0 panic=-1 reboot=t");
        if !config.verbose {
            append.push_str(" quiet");
        }
        write!(append, " vmatest.root={}", config.root).unwrap();
        if config.root_read_only {
            append.push_str(" vmatest.ro");
        }
        if let Some(script) = &config.script {
            let b64 = crate::s3::base64(script.as_bytes());
            assert!(
                b64.len() <= 1800,
                "guest script too long for the kernel command line ({} bytes of base64); put it on the disk as /vmatest.sh",
                b64.len()
            );
            write!(append, " vmatest.cmd={b64}").unwrap();
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-nodefaults", "-no-reboot", "-display", "none"]);
        cmd.args(["-m", &config.memory_mib.to_string()]);
        match accel {
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => cmd.args(["-accel", "tcg", "-cpu", "max"]),
        };
        cmd.arg("-kernel").arg(image.kernel());
        cmd.arg("-initrd").arg(image.initrd());
        cmd.arg("-append").arg(&append);
        cmd.arg("-chardev").arg(format!(
            "file,id=console,path={}",
            qemu_escape(&serial.to_string_lossy())
        ));
        cmd.args(["-serial", "chardev:console"]);
        cmd.arg("-qmp").arg(format!(
            "unix:{},server=on,wait=off",
            qemu_escape(&qmp.to_string_lossy())
        ));
        for (i, d) in config.drives.iter().enumerate() {
            let mut spec = format!(
                "if=none,id=disk{i},file={},format={}",
                qemu_escape(&d.target),
                d.format
            );
            if d.read_only {
                spec.push_str(",readonly=on");
            }
            cmd.arg("-drive").arg(spec);
            cmd.arg("-device")
                .arg(format!("virtio-blk-pci,drive=disk{i},id=vd{i}"));
        }
        cmd.args(&config.extra_args);
        cmd.stdin(Stdio::null())
            .stdout(File::create(dir.path().join("qemu.out")).expect("qemu.out"))
            .stderr(File::create(dir.path().join("qemu.err")).expect("qemu.err"));
        // SAFETY: prctl is async-signal-safe; QEMU dies with the thread
        // that started it, so no guest outlives a killed test.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .expect("starting qemu-system-x86_64 (scripts/setup.sh installs it)");
        Guest {
            child: Some(child),
            dir,
            started,
            lines: Vec::new(),
            partial: String::new(),
            read_pos: 0,
            cursor: 0,
            status: None,
            accel,
        }
    }

    /// QEMU's QMP socket.
    pub fn qmp_path(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// Connect to QMP (retrying while QEMU creates the socket).
    pub fn qmp(&self) -> vma_capture::qmp::Qmp {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match vma_capture::qmp::Qmp::connect(&self.qmp_path()) {
                Ok(q) => return q,
                Err(e) if Instant::now() > deadline => panic!("QMP connect: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The serial console file.
    pub fn serial_path(&self) -> PathBuf {
        self.dir.path().join("serial.log")
    }

    /// Everything the guest printed so far.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.serial_path()).unwrap_or_default()).into_owned()
    }

    /// Lines seen so far (by [`Guest::wait_for`] and friends).
    pub fn lines(&self) -> &[Line] {
        &self.lines
    }

    fn poll(&mut self) {
        if let Ok(mut f) = File::open(self.serial_path()) {
            use std::io::Seek;
            if f.seek(std::io::SeekFrom::Start(self.read_pos)).is_ok() {
                let mut buf = Vec::new();
                if f.read_to_end(&mut buf).is_ok() {
                    self.read_pos += buf.len() as u64;
                    self.partial.push_str(&String::from_utf8_lossy(&buf));
                }
            }
        }
        let at = self.started.elapsed();
        while let Some(i) = self.partial.find('\n') {
            let text = self.partial[..i].trim_end_matches('\r').to_string();
            self.partial.drain(..=i);
            self.lines.push(Line { text, at });
        }
        if self.status.is_none() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.status = Some(st);
                }
            }
        }
    }

    /// What went wrong, with the console and QEMU's own messages.
    fn report(&self, what: &str) -> String {
        let serial = self.serial();
        let tail: String = serial
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        let err = std::fs::read_to_string(self.dir.path().join("qemu.err")).unwrap_or_default();
        format!(
            "{what} after {:.1?} ({:?}, qemu status {:?})\n--- console (last 40 lines) ---\n{tail}\n--- qemu stderr ---\n{err}",
            self.started.elapsed(),
            self.accel,
            self.status
        )
    }

    /// Wait for the first line (after those already returned) that
    /// contains `marker`; returns it. Err describes a timeout or an exit of
    /// QEMU before the marker, with the console's last lines.
    pub fn try_wait_for(&mut self, marker: &str, timeout: Duration) -> Result<Line, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.status.is_some();
            self.poll();
            if let Some(i) = self.lines[self.cursor..]
                .iter()
                .position(|l| l.text.contains(marker))
            {
                let line = self.lines[self.cursor + i].clone();
                self.cursor += i + 1;
                return Ok(line);
            }
            if exited {
                return Err(self.report(&format!("QEMU exited before {marker:?}")));
            }
            if Instant::now() > deadline {
                return Err(self.report(&format!("no {marker:?} within {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Guest::try_wait_for`], panicking on failure.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Line {
        self.try_wait_for(marker, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Wait for QEMU to exit (the guest powers off after its script);
    /// returns the script's exit code from `VMATEST script-exit N`.
    /// Panics on a timeout, a guest failure or a missing script result.
    pub fn wait_script(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        while self.status.is_none() {
            if Instant::now() > deadline {
                panic!(
                    "{}",
                    self.report(&format!("guest still running after {timeout:?}"))
                );
            }
            std::thread::sleep(Duration::from_millis(20));
            self.poll();
        }
        self.poll();
        if let Some(l) = self
            .lines
            .iter()
            .find(|l| l.text.starts_with("VMATEST fail"))
        {
            panic!("{}", self.report(&format!("guest init failed: {}", l.text)));
        }
        let code = self
            .lines
            .iter()
            .find_map(|l| l.text.strip_prefix("VMATEST script-exit "))
            .and_then(|c| c.trim().parse().ok());
        match code {
            Some(c) => c,
            None => panic!("{}", self.report("the guest's script did not finish")),
        }
    }

    /// Time from QEMU's start to the guest's init running.
    pub fn init_time(&mut self, timeout: Duration) -> Duration {
        self.wait_for("VMATEST init", timeout).at
    }

    /// Kill QEMU now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            self.status = c.wait().ok();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}
