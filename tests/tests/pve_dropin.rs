//! `vma` as a drop-in for Proxmox VE's `/usr/bin/vma`: restores as
//! `qmrestore` drives them (a Perl emulation of qemu-server's
//! `restore_vma_archive`: `/bin/bash -c 'set -o pipefail && DECOMPRESSOR |
//! vma extract -v -r FIFO - TMPDIR'`, a 60-second alarm until the `CTIME:`
//! line, the `#qmdump#map:` lines of the extracted config, map lines
//! sorted by virtual device, then `done`) onto a loop block device, qcow2
//! images and raw files, byte for byte; vzdump's diskless `create`; `config`
//! with nothing on stderr; `list` and `verify -v` lines; map grammar and
//! size rules; and `extract --drive NAME --to PATH|-` onto every target kind.
//!
//! Needs root (loop devices, tmpfs), `zstd`, `gzip`, `lzop`, `perl`,
//! `losetup`, `qemu-img` and `qemu-storage-daemon`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use vma_tests::*;

const SCSI0_SIZE: u64 = 64 << 20;
const EFI_SIZE: u64 = 540672;
const CONF: &str = "boot: order=scsi0\nmemory: 512\nscsi0: local-lvm:vm-100-disk-0,size=64M\nefidisk0: local:100/vm-100-disk-1.qcow2,size=528K\n#qmdump#map:efidisk0:drive-efidisk0:local:qcow2:\n#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:\n";
const FW: &str = "[OPTIONS]\nenable: 1\n";

/// qemu-server's restore, emulated: arguments are the pipeline, the
/// temporary directory, the FIFO and a file of `devname prefix path`
/// lines (the map qemu-server would compute). Exits with vma's status;
/// prints `CTIME-AFTER <seconds>` on stderr when the header arrived.
const QMRESTORE: &str = r#"
use strict;
use warnings;
use IPC::Open3;
use IO::Select;
use Symbol qw(gensym);
use Time::HiRes qw(time);

my ($cmd, $tmpdir, $fifo, $mapfile, $stdin_archive) = @ARGV;
my $timeout = $ENV{EMU_TIMEOUT} // 60;
my %spec;
open(my $mf, '<', $mapfile) or die "map spec: $!\n";
while (<$mf>) { chomp; my ($dev, $prefix, $path) = split / /, $_, 3; $spec{$dev} = [$prefix, $path]; }
close $mf;

$ENV{LC_ALL} = 'C';
$ENV{LVM_SUPPRESS_FD_WARNINGS} = '1';
my $start = time();
my ($in, $out, $err) = (undef, undef, gensym);
my $pid;
eval {
    local $SIG{ALRM} = sub { die "got timeout reading VMA header - corrupted?\n" };
    alarm($timeout);
    if ($stdin_archive) {
        open(my $src, '<', $stdin_archive) or die "$stdin_archive: $!\n";
        open(STDIN, '<&', $src) or die;
        $pid = open3('<&STDIN', $out, $err, '/bin/bash', '-c', $cmd);
    } else {
        $pid = open3($in, $out, $err, '/bin/bash', '-c', $cmd);
        close $in;
    }
    my $fh;
    open($fh, '>', $fifo) or die "unable to open fifo $fifo - $!\n";
    my $sel = IO::Select->new($out, $err);
    my $buf = '';
    my %devinfo;
    my $mapped = 0;
    while ($sel->count) {
        for my $h ($sel->can_read) {
            my $n = sysread($h, my $chunk, 65536);
            if (!$n) { $sel->remove($h); next; }
            if ($h == $err) { print STDERR $chunk; next; }
            $buf .= $chunk;
            while ($buf =~ s/^(.*?)(?:\n|\r\n|\r|\x08+)//) {
                my $line = $1;
                print "$line\n";
                if ($line =~ m/^DEV:\sdev_id=(\d+)\ssize:\s(\d+)\sdevname:\s(\S+)$/) {
                    $devinfo{$3} = $2;
                } elsif ($line =~ m/^CTIME: / && !$mapped) {
                    alarm(0);
                    $mapped = 1;
                    printf STDERR "CTIME-AFTER %.3f\n", time() - $start;
                    open(my $cf, '<', "$tmpdir/qemu-server.conf")
                        or die "unable to read qemu-server.conf - $!\n";
                    my %map;
                    while (my $l = <$cf>) {
                        if ($l =~ m/^\#qmdump\#map:(\S+):(\S+):(\S*):(\S*):$/) {
                            die "archive does not contain data for drive '$1'\n" if !defined($devinfo{$2});
                            $map{$1} = $2;
                        }
                    }
                    close $cf;
                    my %have = map { $_ => 1 } values %map;
                    for my $d (sort keys %devinfo) {
                        die "found no device mapping information for device '$d'\n" if !$have{$d};
                    }
                    for my $virtdev (sort keys %map) {
                        my $d = $map{$virtdev};
                        my ($prefix, $path) = @{$spec{$d}};
                        print STDERR "map '$d' to '$path'\n";
                        print $fh "$prefix$d=$path\n";
                    }
                    print $fh "done\n";
                    close $fh;
                }
            }
        }
    }
};
my $e = $@;
if ($e) {
    print STDERR "restore failed: $e";
    kill 'KILL', $pid if $pid;
    waitpid($pid, 0) if $pid;
    exit 111;
}
waitpid($pid, 0);
exit($? >> 8) if ($? & 0x7f) == 0;
exit 1;
"#;

struct Loop(String);

impl Loop {
    fn new(image: &Path) -> Loop {
        require("losetup");
        let o = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .expect("losetup");
        assert!(
            o.status.success(),
            "losetup needs root: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Loop(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// The test archive and its sources.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn new() -> Fixture {
        for t in [
            "zstd",
            "gzip",
            "lzop",
            "perl",
            "qemu-img",
            "qemu-storage-daemon",
        ] {
            require(t);
        }
        let dir = tempfile::tempdir().unwrap();
        let f = Fixture { dir };
        // scsi0: random clusters, all-zero clusters, clusters with some zero blocks.
        let mut scsi0 = vec![0u8; SCSI0_SIZE as usize];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for (i, c) in scsi0.chunks_mut(65536).enumerate() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            match rng % 4 {
                0 => c.copy_from_slice(&noise(i as u64 + 1, 65536)),
                1 => {
                    for (b, block) in c.chunks_mut(4096).enumerate() {
                        if (rng >> (b + 8)) & 1 == 1 {
                            block.copy_from_slice(&noise((i * 16 + b) as u64 + 7, 4096));
                        }
                    }
                }
                _ => {}
            }
        }
        std::fs::write(f.path("scsi0.raw"), &scsi0).unwrap();
        let mut efi = vec![0u8; EFI_SIZE as usize];
        efi[..8192].copy_from_slice(&noise(3, 8192));
        let n = efi.len();
        efi[n - 4096..].copy_from_slice(&noise(4, 4096));
        std::fs::write(f.path("efidisk0.raw"), &efi).unwrap();
        std::fs::create_dir(f.path("cfg")).unwrap();
        std::fs::write(f.path("cfg/qemu-server.conf"), CONF).unwrap();
        std::fs::write(f.path("cfg/qemu-server.fw"), FW).unwrap();
        // Proxmox's create command line.
        let o = vma(&[
            "create",
            "-v",
            p(&f.path("A.vma")),
            "-c",
            p(&f.path("cfg/qemu-server.conf")),
            "-c",
            p(&f.path("cfg/qemu-server.fw")),
            "-d",
            &format!("format=raw:drive-scsi0={}", p(&f.path("scsi0.raw"))),
            "-d",
            &format!("format=raw:drive-efidisk0={}", p(&f.path("efidisk0.raw"))),
        ]);
        assert_eq!(code(&o), 0, "create: {}", stderr(&o));
        let d = f.dir.path();
        let o = sh(&format!(
            "cd {} && zstd --threads=1 -q -c A.vma > vzdump-qemu-100-2025_01_01-00_00_00.vma.zst && gzip --rsyncable -c A.vma > vzdump-qemu-100-2025_01_01-00_00_00.vma.gz && lzop -c A.vma > vzdump-qemu-100-2025_01_01-00_00_00.vma.lzo",
            p(d)
        ));
        assert_eq!(code(&o), 0, "compress: {}", stderr(&o));
        // A directory whose `vma` is ours, first on qemu-server's PATH.
        std::fs::create_dir(f.path("bin")).unwrap();
        std::os::unix::fs::symlink(vma_bin(), f.path("bin/vma")).unwrap();
        std::fs::write(f.path("qmrestore.pl"), QMRESTORE).unwrap();
        f
    }

    /// Run the qmrestore emulation of `pipeline` (`{vma}` stands for
    /// `vma extract -v -r FIFO SRC TMPDIR` with SRC `-` when `src` is None).
    fn qmrestore(
        &self,
        tag: &str,
        pipeline: &str,
        src: Option<&str>,
        map: &[(&str, &str, &str)],
        stdin_archive: Option<&Path>,
        timeout: u32,
    ) -> (Output, PathBuf) {
        let tmp = self.path(&format!("vzdumptmp{tag}"));
        let fifo = self.path(&format!("vzdumptmp{tag}.fifo"));
        let _ = std::fs::remove_dir_all(&tmp);
        let _ = std::fs::remove_file(&fifo);
        let o = Command::new("mkfifo")
            .args(["-m", "0600"])
            .arg(&fifo)
            .output()
            .unwrap();
        assert!(o.status.success());
        let extract = format!(
            "vma extract -v -r {} {} {}",
            p(&fifo),
            src.unwrap_or("-"),
            p(&tmp)
        );
        let cmd = format!("set -o pipefail && {}", pipeline.replace("{vma}", &extract));
        let spec: String = map
            .iter()
            .map(|(d, pre, path)| format!("{d} {pre} {path}\n"))
            .collect();
        let specfile = self.path(&format!("map{tag}.txt"));
        std::fs::write(&specfile, spec).unwrap();
        let mut c = Command::new("perl");
        c.arg(self.path("qmrestore.pl"))
            .arg(&cmd)
            .arg(&tmp)
            .arg(&fifo)
            .arg(&specfile)
            .arg(stdin_archive.map(p).unwrap_or(""))
            .current_dir(self.dir.path())
            .env(
                "PATH",
                format!("{}:/sbin:/bin:/usr/sbin:/usr/bin", p(&self.path("bin"))),
            )
            .env("EMU_TIMEOUT", timeout.to_string())
            .env("TZ", "UTC")
            .stdin(Stdio::null());
        let out = c.output().expect("running perl");
        let _ = std::fs::remove_file(&fifo);
        (out, tmp)
    }
}

fn ctime_after(o: &Output) -> f64 {
    let err = stderr(o);
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("CTIME-AFTER "))
        .unwrap_or_else(|| panic!("no CTIME line reached the emulator: {err}"));
    line.parse().unwrap()
}

fn same_prefix(a: &Path, b: &Path, len: u64) -> bool {
    let o = Command::new("cmp")
        .arg("-n")
        .arg(len.to_string())
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    o.status.success()
}

fn qcow2_matches(image: &Path, raw: &Path) {
    let o = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
        .arg(image)
        .arg(raw)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img compare {}: {}",
        image.display(),
        String::from_utf8_lossy(&o.stdout)
    );
}

fn qcow2_create(path: &Path, size: &str, prealloc: bool) {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2"]);
    if prealloc {
        c.args(["-o", "preallocation=metadata"]);
    }
    let o = c.arg(path).arg(size).output().unwrap();
    assert!(o.status.success());
}

/// qmrestore of a zstd vzdump file: scsi0 onto a loop device full of
/// garbage (LVM thick: write zeros 1, throttled, 4 MiB larger than the
/// drive), efidisk0 into a qcow2 image with metadata preallocation (dir
/// storage: write zeros 0).
#[test]
fn qmrestore_zstd_onto_loop_device_and_qcow2() {
    let f = Fixture::new();
    let lo_img = f.path("lo.img");
    std::fs::write(&lo_img, noise(99, (SCSI0_SIZE + (4 << 20)) as usize)).unwrap();
    let before_tail = std::fs::read(&lo_img).unwrap()[SCSI0_SIZE as usize..].to_vec();
    let lo = Loop::new(&lo_img);
    let efi = f.path("vm-100-disk-1.qcow2");
    qcow2_create(&efi, "528K", true);
    let (o, tmp) = f.qmrestore(
        "1",
        "zstd -q -d -c /ARCHIVE | {vma}"
            .replace(
                "/ARCHIVE",
                p(&f.path("vzdump-qemu-100-2025_01_01-00_00_00.vma.zst")),
            )
            .as_str(),
        None,
        &[
            ("drive-efidisk0", "format=qcow2:0:", p(&efi)),
            (
                "drive-scsi0",
                "throttling.bps=52428800:throttling.group=local-lvm:format=raw:1:",
                &lo.0,
            ),
        ],
        None,
        60,
    );
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(ctime_after(&o) < 60.0);
    let out = stdout(&o);
    assert!(out.starts_with(
        "CFG: size: 214 name: qemu-server.conf\nCFG: size: 20 name: qemu-server.fw\nDEV: dev_id=1 size: 67108864 devname: drive-scsi0\nDEV: dev_id=2 size: 540672 devname: drive-efidisk0\nCTIME: "
    ), "{out}");
    assert!(out.contains("\nprogress 100% (read "), "{out}");
    assert!(out.contains("\ntotal bytes read "), "{out}");
    assert_eq!(
        std::fs::read_to_string(tmp.join("qemu-server.conf")).unwrap(),
        CONF
    );
    assert_eq!(
        std::fs::read_to_string(tmp.join("qemu-server.fw")).unwrap(),
        FW
    );
    assert!(same_prefix(
        Path::new(&lo.0),
        &f.path("scsi0.raw"),
        SCSI0_SIZE
    ));
    drop(lo);
    assert_eq!(
        &std::fs::read(&lo_img).unwrap()[SCSI0_SIZE as usize..],
        &before_tail[..],
        "the 4 MiB past the drive were touched"
    );
    qcow2_matches(&efi, &f.path("efidisk0.raw"));
}

/// The other decompressors, the uncompressed form and `qmrestore -`
/// (the archive on vma's standard input), onto a sparse raw file (0),
/// a qcow2 image written with zeros (1) and a plain qcow2 (0).
#[test]
fn qmrestore_variants_onto_raw_and_qcow2() {
    let f = Fixture::new();
    let cases: [(&str, &str, Option<&str>, bool); 4] = [
        (
            "gz",
            "zcat vzdump-qemu-100-2025_01_01-00_00_00.vma.gz | {vma}",
            None,
            false,
        ),
        (
            "lzo",
            "lzop -d -c vzdump-qemu-100-2025_01_01-00_00_00.vma.lzo | {vma}",
            None,
            false,
        ),
        ("plain", "{vma}", Some("A.vma"), false),
        ("stdin", "{vma}", None, true),
    ];
    for (tag, pipeline, src, stdin) in cases {
        let raw = f.path(&format!("vm-100-disk-0-{tag}.raw"));
        let o = Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&raw)
            .arg("65536K")
            .output()
            .unwrap();
        assert!(o.status.success());
        let efi = f.path(&format!("efi-{tag}.qcow2"));
        // qcow2 on LVM is restored with write zeros 1.
        qcow2_create(&efi, "528K", false);
        let (o, _) = f.qmrestore(
            tag,
            pipeline,
            src,
            &[
                ("drive-efidisk0", "format=qcow2:1:", p(&efi)),
                ("drive-scsi0", "format=raw:0:", p(&raw)),
            ],
            stdin.then(|| f.path("A.vma")).as_deref(),
            60,
        );
        assert_eq!(code(&o), 0, "{tag}: {}{}", stdout(&o), stderr(&o));
        assert_eq!(
            std::fs::read(&raw).unwrap(),
            std::fs::read(f.path("scsi0.raw")).unwrap(),
            "{tag}"
        );
        assert!(
            allocated(&raw) < SCSI0_SIZE,
            "{tag}: the raw target is not sparse"
        );
        qcow2_matches(&efi, &f.path("efidisk0.raw"));
    }
}

/// The header is answered while the stream is still arriving: the
/// `CTIME:` line and the config files come out long before the 60 s
/// qemu-server allows, without the rest of the stream (here it stalls,
/// then ends early, and the restore fails).
#[test]
fn header_answered_before_the_stream_ends() {
    let f = Fixture::new();
    let raw = f.path("t.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(SCSI0_SIZE)
        .unwrap();
    let efi = f.path("t.qcow2");
    qcow2_create(&efi, "528K", false);
    let (o, _) = f.qmrestore(
        "slow",
        "{ head -c 1048576 A.vma; sleep 6; } | {vma}",
        None,
        &[
            ("drive-efidisk0", "format=qcow2:0:", p(&efi)),
            ("drive-scsi0", "format=raw:0:", p(&raw)),
        ],
        None,
        5,
    );
    assert!(ctime_after(&o) < 3.0, "{}", stderr(&o));
    assert_ne!(code(&o), 0, "a stream cut short must fail: {}", stderr(&o));
    assert!(
        stderr(&o).contains("vma: restore failed - "),
        "{}",
        stderr(&o)
    );
}

/// A bad header: vma dies before opening the FIFO, qemu-server's open
/// blocks until its alarm (shortened here) says the header timed out.
#[test]
fn bad_header_times_out_like_qemu_server_expects() {
    let f = Fixture::new();
    std::fs::write(f.path("junk.vma"), noise(5, 4096)).unwrap();
    let (o, tmp) = f.qmrestore("junk", "cat junk.vma | {vma}", None, &[], None, 3);
    assert_eq!(code(&o), 111, "{}", stderr(&o));
    assert!(stderr(&o).contains("got timeout reading VMA header - corrupted?"));
    assert!(!tmp.exists(), "nothing may be created for a bad header");
}

/// The real Proxmox backup of the fixtures is cut short: the restore
/// writes what is there, then fails with the real tool's message.
#[test]
fn truncated_fixture_fails_with_missing_cluster() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/proxmox/test.vma.gz");
    let f = Fixture::new();
    let raw = f.path("big.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(10 << 30)
        .unwrap();
    let (o, _) = f.qmrestore(
        "trunc",
        &format!("zcat {} | {{vma}}", p(&fixture)),
        None,
        &[("drive-scsi0", "format=raw:0:", p(&raw))],
        None,
        60,
    );
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o)
            .contains("vma: restore failed - detected missing cluster 23 for stream drive-scsi0"),
        "{}",
        stderr(&o)
    );
    // `list` and `verify -v` of the fixture through a pipe.
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "zcat {} | VMA_COMPAT=proxmox TZ=UTC $VMA list -",
            p(&fixture)
        ))
        .env("VMA", vma_bin())
        .output()
        .unwrap();
    assert_eq!(code(&o), 0);
    assert_eq!(
        stdout(&o),
        "CFG: size: 417 name: qemu-server.conf\nDEV: dev_id=1 size: 10737418240 devname: drive-scsi0\nCTIME: Sun Oct 31 11:43:42 2021\n"
    );
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!("zcat {} | TZ=UTC $VMA verify -v -", p(&fixture)))
        .env("VMA", vma_bin())
        .output()
        .unwrap();
    // Deliberately stricter than Proxmox (which passes it): missing
    // clusters fail verification.
    assert_eq!(code(&o), 1);
    assert_eq!(
        stdout(&o),
        "CFG: size: 417 name: qemu-server.conf\nDEV: dev_id=1 size: 10737418240 devname: drive-scsi0\nCTIME: Sun Oct 31 11:43:42 2021\n"
    );
    assert!(stderr(&o)
        .starts_with("vma: verify failed - detected missing cluster 23 for stream drive-scsi0\n"));
}

fn run_sh(f: &Fixture, script: &str) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(f.dir.path())
        .env("VMA", vma_bin())
        .env("TZ", "UTC")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `vma config` as PVE calls it: stdout is the blob, stderr empty.
#[test]
fn config_prints_the_blob_and_nothing_else() {
    let f = Fixture::new();
    // extract_vzdump_config_vma, compressed: a pipeline, stderr checked.
    let o = run_sh(&f, "set -o pipefail && zstd -q -d -c vzdump-qemu-100-2025_01_01-00_00_00.vma.zst | $VMA config -");
    assert!(matches!(code(&o), 0 | 141), "{}", stderr(&o));
    assert_eq!(stdout(&o), CONF);
    for line in stderr(&o).lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.contains("zstd: error 70 : Write error") && line.contains("Broken pipe"),
            "PVE takes this stderr line as an error: {line}"
        );
    }
    // Uncompressed, and the firewall blob, and one that is not there.
    let o = vma(&["config", p(&f.path("A.vma"))]);
    assert_eq!(
        (code(&o), stdout(&o), stderr(&o)),
        (0, CONF.to_owned(), String::new())
    );
    let o = vma(&["config", p(&f.path("A.vma")), "-c", "qemu-server.fw"]);
    assert_eq!(
        (code(&o), stdout(&o), stderr(&o)),
        (0, FW.to_owned(), String::new())
    );
    let o = vma(&["config", p(&f.path("A.vma")), "-c", "nope"]);
    assert_eq!(code(&o), 255);
    assert_eq!(stderr(&o), "unable to find configuration data 'nope'\n");
    assert_eq!(stdout(&o), "");
}

/// vzdump's diskless backup: `vma create -v -c ... 'exec:CMD'`.
#[test]
fn vzdump_diskless_create_through_exec() {
    let f = Fixture::new();
    let o = run_sh(
        &f,
        "$VMA create -v -c cfg/qemu-server.conf -c cfg/qemu-server.fw 'exec:zstd --threads=1 > vzdump-qemu-101.vma.dat'",
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!((stdout(&o), stderr(&o)), (String::new(), String::new()));
    let o = run_sh(
        &f,
        "zstd -q -d -c vzdump-qemu-101.vma.dat | VMA_COMPAT=proxmox $VMA list -",
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "CFG: size: 214 name: qemu-server.conf");
    assert_eq!(lines[1], "CFG: size: 20 name: qemu-server.fw");
    assert!(lines[2].starts_with("CTIME: "));
    // An existing archive is never replaced.
    let o = run_sh(&f, "$VMA create -c cfg/qemu-server.conf A.vma");
    assert_ne!(code(&o), 0);
    // vzdump --stdout: the command inherits vma's standard output.
    let o = run_sh(
        &f,
        "$VMA create -c cfg/qemu-server.conf 'exec:cat' | VMA_COMPAT=proxmox $VMA list -",
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).starts_with("CFG: size: 214 name: qemu-server.conf\nCTIME: "));
}

/// `extract` without `-r`: DEVINFO lines, `disk-<dev>.raw`, `-d` selects.
#[test]
fn extract_without_fifo_writes_disk_files() {
    let f = Fixture::new();
    let o = run_sh(&f, "$VMA extract -v -d drive-scsi0 A.vma out");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("DEVINFO out/tmp-disk-drive-scsi0.raw 67108864\nprogress "),
        "{}",
        stdout(&o)
    );
    let mut names: Vec<String> = std::fs::read_dir(f.path("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["disk-drive-scsi0.raw", "qemu-server.conf", "qemu-server.fw"]
    );
    assert_eq!(
        std::fs::read(f.path("out/disk-drive-scsi0.raw")).unwrap(),
        std::fs::read(f.path("scsi0.raw")).unwrap()
    );
    // The target directory must not exist.
    let o = run_sh(&f, "$VMA extract -d drive-scsi0 A.vma out");
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).starts_with("vma: unable to create target directory out - File exists"),
        "{}",
        stderr(&o)
    );
}

/// Map lines: grammar, skip, missing mappings, size rule, cache modes.
#[test]
fn map_grammar_and_size_rules() {
    let f = Fixture::new();
    let run = |tag: &str, map: &str, make_target: &str| -> Output {
        let script = format!(
            "set -e; rm -rf t{tag} t{tag}.fifo; mkfifo t{tag}.fifo; {make_target}
             ( $VMA extract -r t{tag}.fifo A.vma t{tag} > o{tag}.txt 2> e{tag}.txt; echo $? > rc{tag} ) &
             ( printf '{map}' > t{tag}.fifo ) || true; wait; cat o{tag}.txt; cat e{tag}.txt >&2; exit $(cat rc{tag})"
        );
        run_sh(&f, &script)
    };
    // skip= and options in another order, cache=none, a +4 MiB target.
    let o = run(
        "a",
        "skip=drive-efidisk0\\ncache=none:0:format=raw:drive-scsi0=a.raw\\ndone\\n",
        "truncate -s 71303168 a.raw;",
    );
    assert_eq!(
        code(&o),
        1,
        "options after 0: are part of the device name: {}",
        stderr(&o)
    );
    let o = run(
        "b",
        "skip=drive-efidisk0\\ncache=none:throttling.bps=0x100000:format=raw:0:drive-scsi0=b.raw\\n\\n",
        "truncate -s 71303168 b.raw;",
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(same_prefix(
        &f.path("b.raw"),
        &f.path("scsi0.raw"),
        SCSI0_SIZE
    ));
    // 4 MiB + 512 larger: refused, as Proxmox refuses it.
    let o = run(
        "c",
        "skip=drive-efidisk0\\nformat=raw:0:drive-scsi0=c.raw\\ndone\\n",
        "truncate -s 71303680 c.raw;",
    );
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("vma: vma_reader_register_bs for stream drive-scsi0 failed - unexpected size 71303680 != 67108864"), "{}", stderr(&o));
    // Smaller: refused.
    let o = run(
        "d",
        "skip=drive-efidisk0\\n0:drive-scsi0=d.raw\\ndone\\n",
        "truncate -s 1M d.raw;",
    );
    assert!(
        stderr(&o).contains("unexpected size 1048576 != 67108864"),
        "{}",
        stderr(&o)
    );
    // A device without a mapping.
    let o = run(
        "e",
        "0:drive-scsi0=e.raw\\ndone\\n",
        "truncate -s 64M e.raw;",
    );
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("vma: no device name mapping for drive-efidisk0"),
        "{}",
        stderr(&o)
    );
    for (tag, line, msg) in [
        (
            "f",
            "2:drive-scsi0=x",
            "vma: read map failed - parse error ('2:drive-scsi0=x')",
        ),
        (
            "g",
            "format=raw:format=raw:0:drive-scsi0=x",
            "vma: read map failed - duplicate value for option 'format'",
        ),
        (
            "h",
            "format=raw",
            "vma: read map failed - option 'format' not terminated ('format=raw')",
        ),
        (
            "i",
            "0:drive-scsi0",
            "vma: read map failed - no dev name specified ('0:drive-scsi0')",
        ),
        (
            "j",
            "skip=",
            "vma: read map failed - option 'skip' has no value ('skip=')",
        ),
        (
            "k",
            "throttling.bps=12a:0:drive-scsi0=x",
            "vma: read map failed - not a number: 12a",
        ),
        (
            "l",
            "cache=bogus:0:drive-scsi0=x\\nskip=drive-efidisk0",
            "vma: invalid cache option: bogus",
        ),
    ] {
        let o = run(tag, &format!("{line}\\ndone\\n"), "");
        assert_eq!(code(&o), 1, "{line}");
        assert!(stderr(&o).contains(msg), "{line}: {}", stderr(&o));
    }
}

/// Proxmox's getopt forms and usage.
#[test]
fn getopt_forms_and_usage() {
    let f = Fixture::new();
    let o = run_sh(&f, "$VMA verify A.vma -v");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("\nprogress 100% (read 67698688 bytes, duration "),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).ends_with("\nspace reduction due to 4K zero blocks 34.7%\n")
            || stdout(&o).contains("total bytes read 67698688, sparse bytes "),
        "{}",
        stdout(&o)
    );
    let o = run_sh(&f, "VMA_COMPAT=proxmox $VMA extract -x A.vma t");
    assert_eq!(code(&o), 1);
    assert_eq!(stderr(&o), "extract: invalid option -- 'x'\n");
    assert!(stdout(&o).starts_with("usage: vma command [command options]\n"));
    let o = run_sh(&f, "VMA_COMPAT=proxmox $VMA extract A.vma");
    assert_eq!(code(&o), 1);
    assert!(stdout(&o).starts_with("usage: vma command"));
    let o = run_sh(&f, "VMA_COMPAT=proxmox $VMA extract -v -r");
    assert_eq!(stderr(&o), "extract: option requires an argument -- 'r'\n");
    // Clustered and attached: -vrFIFO.
    let o = run_sh(
        &f,
        "mkfifo q.fifo; ( printf 'skip=drive-efidisk0\\nskip=drive-scsi0\\ndone\\n' > q.fifo ) & cat A.vma | $VMA extract -vrq.fifo - q; rc=$?; wait; exit $rc",
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("CTIME: "));
    // Our own syntax is untouched.
    let o = vma(&["list", "--json", p(&f.path("A.vma"))]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("\"proxmox-vma\""));
}

/// `vma extract --drive NAME --to PATH|-` onto every kind of target.
#[test]
fn extract_to_any_target() {
    let f = Fixture::new();
    let native = f.path("N.vma");
    let o = vma(&["convert", p(&f.path("A.vma")), p(&native)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let scsi0 = std::fs::read(f.path("scsi0.raw")).unwrap();
    // A raw file full of garbage: zeros established (holes punched).
    let raw = f.path("garbage.raw");
    std::fs::write(&raw, noise(11, SCSI0_SIZE as usize)).unwrap();
    let o = vma(&[
        "extract",
        p(&native),
        "--drive",
        "drive-scsi0",
        "--to",
        p(&raw),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(std::fs::read(&raw).unwrap() == scsi0);
    assert!(
        allocated(&raw) < SCSI0_SIZE,
        "zero regions were not punched"
    );
    // --target-zeroed on a fresh sparse file: nothing but data written.
    let fresh = f.path("fresh.raw");
    std::fs::File::create(&fresh)
        .unwrap()
        .set_len(SCSI0_SIZE)
        .unwrap();
    let o = vma(&[
        "extract",
        p(&native),
        "--drive",
        "drive-scsi0",
        "--to",
        p(&fresh),
        "--target-zeroed",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(std::fs::read(&fresh).unwrap() == scsi0);
    // A loop device full of garbage, larger than the drive: tail untouched.
    let lo_img = f.path("lo.img");
    std::fs::write(&lo_img, noise(12, (SCSI0_SIZE + (8 << 20)) as usize)).unwrap();
    let tail = std::fs::read(&lo_img).unwrap()[SCSI0_SIZE as usize..].to_vec();
    {
        let lo = Loop::new(&lo_img);
        let o = vma(&[
            "extract",
            p(&f.path("A.vma")),
            "--drive",
            "drive-scsi0",
            "--to",
            &lo.0,
        ]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        assert!(same_prefix(
            Path::new(&lo.0),
            &f.path("scsi0.raw"),
            SCSI0_SIZE
        ));
    }
    assert_eq!(
        &std::fs::read(&lo_img).unwrap()[SCSI0_SIZE as usize..],
        &tail[..]
    );
    // A qcow2 image that already holds data: zero clusters where needed.
    let q = f.path("old.qcow2");
    let old = f.path("old.raw");
    std::fs::write(&old, noise(13, SCSI0_SIZE as usize)).unwrap();
    let o = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&old)
        .arg(&q)
        .output()
        .unwrap();
    assert!(o.status.success());
    let o = vma(&[
        "extract",
        p(&native),
        "--drive",
        "drive-scsi0",
        "--to",
        p(&q),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    qcow2_matches(&q, &f.path("scsi0.raw"));
    // format=qcow2:PATH under another name.
    let q2 = f.path("efi.img");
    qcow2_create(&q2, "528K", false);
    let o = vma(&[
        "extract",
        p(&native),
        "--drive",
        "drive-efidisk0",
        "--to",
        &format!("format=qcow2:{}", p(&q2)),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    qcow2_matches(&q2, &f.path("efidisk0.raw"));
    // Standard output, from a file and from a compressed pipe.
    let o = vma(&[
        "extract",
        p(&native),
        "--drive",
        "drive-efidisk0",
        "--to",
        "-",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(o.stdout == std::fs::read(f.path("efidisk0.raw")).unwrap());
    let o = run_sh(&f, "zstd -q -d -c vzdump-qemu-100-2025_01_01-00_00_00.vma.zst | $VMA extract - --drive drive-scsi0 --to - | cmp - scsi0.raw");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Too small: refused, untouched.
    let small = f.path("small.raw");
    std::fs::write(&small, noise(14, 1 << 20)).unwrap();
    let o = vma(&[
        "extract",
        p(&native),
        "--drive",
        "drive-scsi0",
        "--to",
        p(&small),
    ]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("the target must be at least as large as the drive"),
        "{}",
        stderr(&o)
    );
    assert!(std::fs::read(&small).unwrap() == noise(14, 1 << 20));
    // Not enough free space for the data: refused before writing.
    let fs = SmallFs::new(&f.path("small-fs"), "8m");
    let t = fs.path().join("t.raw");
    std::fs::File::create(&t)
        .unwrap()
        .set_len(SCSI0_SIZE)
        .unwrap();
    let o = vma(&[
        "extract",
        p(&native),
        "--drive",
        "drive-scsi0",
        "--to",
        p(&t),
    ]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("not enough free space for drive drive-scsi0"),
        "{}",
        stderr(&o)
    );
    // Drive and target counts must pair up.
    let o = vma(&["extract", p(&native), "--to", p(&t)]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("name one drive per target"),
        "{}",
        stderr(&o)
    );
}

/// Proxmox's `create -v`: `progress P% DONE/TOTAL ZEROS` lines on stderr
/// whenever the percentage changes, then `image DEV: size=N zeros=N
/// saved=N` per drive, with the zero bytes of drives whose zero areas are
/// known (all-zero clusters, clusters with some zero 4 KiB blocks, a hole,
/// a last cluster cut short).
#[test]
fn create_verbose_prints_progress_and_image_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n);
    // a: 1 MiB; cluster 0 data, cluster 1 has 13 data blocks (3 zero), the rest zero.
    let mut a = vec![0u8; 1 << 20];
    a[..65536].copy_from_slice(&noise(1, 65536));
    a[65536..65536 + 13 * 4096].copy_from_slice(&noise(2, 13 * 4096));
    std::fs::write(path("a.raw"), &a).unwrap();
    let a_zeros = 3 * 4096 + 14 * 65536;
    // b: 100 KiB, sparse, one data block at 8 KiB.
    sparse_image(&path("b.raw"), 100 << 10, &[(8192, 4096, 5)]);
    let b_zeros = (100 << 10) - 4096;
    let total = (1u64 << 20) + (100 << 10);
    std::fs::write(path("c.conf"), "memory: 512\n").unwrap();
    for archive in ["A.vma", "exec:cat > E.vma"] {
        let o = Command::new(vma_bin())
            .args(["create", "-v", archive, "-c", "c.conf"])
            .arg("-d")
            .arg("format=raw:drive-scsi0=a.raw")
            .arg("-d")
            .arg("format=raw:drive-scsi1=b.raw")
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        assert_eq!(stdout(&o), "");
        let err = stderr(&o);
        let lines: Vec<&str> = err.lines().collect();
        let (progress, images) = lines.split_at(lines.len() - 2);
        assert_eq!(
            images,
            [
                format!(
                    "image drive-scsi0: size={} zeros={a_zeros} saved={}",
                    1 << 20,
                    (1 << 20) - a_zeros
                ),
                format!(
                    "image drive-scsi1: size={} zeros={b_zeros} saved=4096",
                    100 << 10
                ),
            ],
            "{err}"
        );
        assert_eq!(progress[0], format!("progress 0% 0/{total} 0"), "{err}");
        assert_eq!(
            *progress.last().unwrap(),
            format!("progress 100% {total}/{total} {}", a_zeros + b_zeros),
            "{err}"
        );
        let mut last = -1i64;
        for l in progress {
            let rest = l.strip_prefix("progress ").expect(l);
            let (pct, rest) = rest.split_once("% ").expect(l);
            let (done, rest) = rest.split_once('/').expect(l);
            let (t, zeros) = rest.split_once(' ').expect(l);
            let (pct, done, t, zeros): (i64, u64, u64, u64) = (
                pct.parse().unwrap(),
                done.parse().unwrap(),
                t.parse().unwrap(),
                zeros.parse().unwrap(),
            );
            assert_eq!(t, total, "{l}");
            assert_eq!(pct, (done * 100 / total) as i64, "{l}");
            assert!(pct > last && zeros <= done, "{l}");
            last = pct;
        }
    }
    assert_eq!(
        std::fs::read(path("A.vma")).unwrap().len(),
        std::fs::read(path("E.vma")).unwrap().len()
    );
    // Without -v: nothing on stderr.
    let o = Command::new(vma_bin())
        .args(["create", "Q.vma", "-d", "format=raw:drive-scsi0=a.raw"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!((code(&o), stderr(&o)), (0, String::new()));
}

/// A one-drive VMA v1 archive `A.vma` of `size` bytes of noise
/// (`drive-scsi0`, source `d.raw`) in a new directory.
fn small_v1(size: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.raw"), noise(11, size)).unwrap();
    let o = Command::new(vma_bin())
        .args(["create", "A.vma", "-d", "format=raw:drive-scsi0=d.raw"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    dir
}

/// Start `vma extract -r FIFO A.vma OUT` in `dir` and write `map` (a map
/// line, then `done`) to the FIFO once it reads it.
fn start_mapped_restore(dir: &Path, tag: &str, map: &str) -> std::process::Child {
    let fifo = dir.join(format!("{tag}.fifo"));
    let o = Command::new("mkfifo").arg(&fifo).output().unwrap();
    assert!(o.status.success());
    let child = Command::new(vma_bin())
        .args(["extract", "-r"])
        .arg(&fifo)
        .arg("A.vma")
        .arg(format!("out-{tag}"))
        .current_dir(dir)
        .env_remove("VMA_COMPAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::fs::write(&fifo, format!("{map}\ndone\n")).unwrap();
    child
}

/// The `flags:` of the descriptor of process `pid` open on `path`, once
/// it has one (None when the process ended first).
fn open_flags(pid: u32, path: &Path) -> Option<u32> {
    let want = std::fs::canonicalize(path).unwrap();
    for _ in 0..1000 {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return None;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).ok().as_deref() == Some(want.as_path()) {
                let info = std::fs::read_to_string(format!(
                    "/proc/{pid}/fdinfo/{}",
                    fd.file_name().to_string_lossy()
                ))
                .ok()?;
                let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
                return u32::from_str_radix(flags.trim(), 8).ok();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    None
}

/// `cache=` of a map line is applied to raw targets: writethrough, none
/// and directsync open the target with O_DSYNC, writeback (the default)
/// and unsafe do not; every mode restores the same bytes; an unknown mode
/// is refused before anything is written, naming the modes.
#[test]
fn map_cache_modes_are_applied() {
    const O_DSYNC: u32 = 0o10000;
    let size = 1 << 20;
    let dir = small_v1(size);
    let d = dir.path();
    let modes = [
        ("writeback", false),
        ("writethrough", true),
        ("none", true),
        ("off", true),
        ("directsync", true),
        ("unsafe", false),
        ("", false),
    ];
    let mut running = Vec::new();
    for (i, (mode, _)) in modes.iter().enumerate() {
        let target = d.join(format!("t{i}.raw"));
        std::fs::File::create(&target)
            .unwrap()
            .set_len(size as u64)
            .unwrap();
        let cache = if mode.is_empty() {
            String::new()
        } else {
            format!("cache={mode}:")
        };
        // Throttled to about a second, so the descriptor can be looked at.
        let line = format!(
            "{cache}throttling.bps=1048576:format=raw:0:drive-scsi0={}",
            p(&target)
        );
        let child = start_mapped_restore(d, &format!("m{i}"), &line);
        // Looked at while this restore runs (the others may have ended).
        let flags = open_flags(child.id(), &target)
            .unwrap_or_else(|| panic!("cache={mode}: the target was never open"));
        running.push((child, target, flags));
    }
    for ((mode, dsync), (child, target, flags)) in modes.iter().zip(running) {
        assert_eq!(
            flags & O_DSYNC != 0,
            *dsync,
            "cache={mode}: flags {flags:o}"
        );
        let o = child.wait_with_output().unwrap();
        assert_eq!(code(&o), 0, "cache={mode}: {}", stderr(&o));
        assert_eq!(
            std::fs::read(&target).unwrap(),
            std::fs::read(d.join("d.raw")).unwrap(),
            "cache={mode}"
        );
    }
    let target = d.join("bad.raw");
    std::fs::write(&target, vec![7u8; size]).unwrap();
    let child = start_mapped_restore(
        d,
        "bad",
        &format!("cache=fast:0:drive-scsi0={}", p(&target)),
    );
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 1);
    assert_eq!(
        stderr(&o),
        "vma: invalid cache option: fast\n(the cache modes are none, off, writeback, writethrough, directsync and unsafe)\n"
    );
    assert_eq!(std::fs::read(&target).unwrap(), vec![7u8; size]);
}

/// `throttling.bps=N`: a restore of S data bytes takes at least S/N
/// seconds (less a small burst allowance) and not much longer.
#[test]
fn map_throttling_limits_the_rate() {
    let size = 2 << 20;
    let dir = small_v1(size);
    let d = dir.path();
    let target = d.join("t.raw");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(size as u64)
        .unwrap();
    let bps = 1u64 << 20;
    let start = std::time::Instant::now();
    let child = start_mapped_restore(
        d,
        "thr",
        &format!(
            "throttling.bps={bps}:format=raw:1:drive-scsi0={}",
            p(&target)
        ),
    );
    let o = child.wait_with_output().unwrap();
    let took = start.elapsed().as_secs_f64();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let expected = size as f64 / bps as f64;
    assert!(
        took >= expected - 0.1 && took < expected * 1.5 + 1.0,
        "{size} bytes at {bps} B/s took {took:.2} s (expected about {expected:.2} s)"
    );
    assert_eq!(
        std::fs::read(&target).unwrap(),
        std::fs::read(d.join("d.raw")).unwrap()
    );
    eprintln!("{size} bytes at {bps} B/s: {took:.2} s");
}

/// VMA v1 archives and streams: `extract` into a directory, or `--to` a
/// file, on a file system too small for the data bound the header gives
/// (the drives' sizes, or an uncompressed archive file's size when
/// smaller) is refused up front, naming what is needed, what is free and
/// `--no-space-check`; with `--no-space-check`, or when the bound fits,
/// the restore runs.
#[test]
fn v1_free_space_preflight() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sparse = d.join("sparse.raw");
    sparse_image(&sparse, 16 << 20, &[(0, 1 << 20, 21)]);
    let full = d.join("full.raw");
    std::fs::write(&full, noise(22, 12 << 20)).unwrap();
    for (name, src) in [("S.vma", &sparse), ("F.vma", &full)] {
        let o = Command::new(vma_bin())
            .args(["create", name, "-d"])
            .arg(format!("format=raw:drive-scsi0={}", p(src)))
            .current_dir(d)
            .output()
            .unwrap();
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }
    let fs = SmallFs::new(&d.join("small"), "8m");
    let in_fs = |n: &str| fs.path().join(n);
    let extract = |args: &[&str], stdin: Option<&Path>| -> Output {
        let mut c = Command::new(vma_bin());
        c.arg("extract").args(args).current_dir(d);
        match stdin {
            Some(f) => c.stdin(std::fs::File::open(f).unwrap()),
            None => c.stdin(Stdio::null()),
        };
        c.output().unwrap()
    };
    // An archive file of 12 MiB of data: refused, nothing created.
    let o = extract(&["F.vma", p(&in_fs("f/out"))], None);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("not enough free space in")
            && err.contains("(12582912 bytes;")
            && err.contains("(8388608 bytes) free")
            && err.contains("--no-space-check"),
        "{err}"
    );
    assert!(fs.entries().is_empty(), "{:?}", fs.entries());
    // A 16 MiB sparse drive in a small archive file: the file's size bounds it.
    let o = extract(&["S.vma", p(&in_fs("s"))], None);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        std::fs::read(in_fs("s/drive-scsi0.raw")).unwrap(),
        std::fs::read(&sparse).unwrap()
    );
    std::fs::remove_dir_all(in_fs("s")).unwrap();
    // The same archive as a stream: only the drive's size bounds it, which
    // says nothing of a thin disk's data: a warning, and the restore runs.
    let o = extract(&["-", p(&in_fs("s"))], Some(&d.join("S.vma")));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning:") && stderr(&o).contains("may still fit"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(in_fs("s/drive-scsi0.raw")).unwrap(),
        std::fs::read(&sparse).unwrap()
    );
    std::fs::remove_dir_all(in_fs("s")).unwrap();
    // A stream whose data does not fit: it runs out of space, fails, and
    // leaves nothing behind.
    let o = extract(&["-", p(&in_fs("f/out"))], Some(&d.join("F.vma")));
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(fs.entries().is_empty(), "{:?}", fs.entries());
    // --to a file on the small file system, from the stream: no refusal.
    let t = in_fs("t.raw");
    std::fs::File::create(&t)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let o = extract(&["-", "--to", p(&t)], Some(&d.join("S.vma")));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::read(&t).unwrap(), std::fs::read(&sparse).unwrap());
    // --to from the archive file: its size bounds the data, and a file
    // system that cannot hold it is refused up front.
    std::fs::remove_file(&t).unwrap();
    std::fs::File::create(&t)
        .unwrap()
        .set_len(12 << 20)
        .unwrap();
    let o = extract(&["F.vma", "--to", p(&t)], None);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not enough free space for drive drive-scsi0")
            && stderr(&o).contains("--no-space-check"),
        "{}",
        stderr(&o)
    );
}

/// `extract --to` reports progress as plain `extract` does: with `-v` and
/// no terminal, `vma: extract P% (DONE of TOTAL)` lines on stderr; without
/// `-v` none (no terminal); with `-q`, nothing at all.
#[test]
fn extract_to_reports_progress() {
    // Many VMA v1 extents (59 clusters each), so half the stream holds some.
    let size = 16 << 20;
    let dir = small_v1(size);
    let d = dir.path();
    let bytes = std::fs::read(d.join("A.vma")).unwrap();
    let target = d.join("t.raw");
    let run = |flags: &[&str]| -> Output {
        std::fs::File::create(&target)
            .unwrap()
            .set_len(size as u64)
            .unwrap();
        let mut child = Command::new(vma_bin())
            .args(flags)
            .args(["extract", "-", "--to"])
            .arg(&target)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Half, a pause the progress thread sees, then the rest.
        let mut stdin = child.stdin.take().unwrap();
        use std::io::Write;
        stdin.write_all(&bytes[..bytes.len() / 2]).unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        stdin.write_all(&bytes[bytes.len() / 2..]).unwrap();
        drop(stdin);
        let o = child.wait_with_output().unwrap();
        assert_eq!(code(&o), 0, "{flags:?}: {}", stderr(&o));
        assert_eq!(
            std::fs::read(&target).unwrap(),
            std::fs::read(d.join("d.raw")).unwrap()
        );
        o
    };
    let o = run(&["-v"]);
    let err = stderr(&o);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("vma: extract "))
        .collect();
    assert!(!lines.is_empty(), "{err}");
    for l in &lines {
        assert!(l.ends_with(" of 16.0 MiB)") && l.contains("% ("), "{l}");
    }
    let o = run(&[]);
    assert!(!stderr(&o).contains("vma: extract "), "{}", stderr(&o));
    assert!(stderr(&o).contains("vma: restored 1 drive(s)"));
    let o = run(&["-q"]);
    assert_eq!(stderr(&o), "");
}
