//! Messages that name the next step, and outputs that agree with the
//! README: what a non-archive is, `--salvage` for damaged and truncated
//! archives (`convert --salvage` included), one context per message,
//! mount's refusal of compressed streams, extract into a file, no empty
//! directories after a failed extract, JSON values and exit codes,
//! completions, the manual page, `-v` and environment defaults.

use std::path::{Path, PathBuf};

use vma_tests::*;

/// The real, truncated Proxmox VE backup (never copied into this repository).
fn proxmox_fixture() -> PathBuf {
    let path = std::env::var_os("VMA_PROXMOX_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/proxmox/test.vma.gz")
        });
    assert!(
        path.exists(),
        "the Proxmox fixture {} is missing: the repository must sit beside shared/ (or set VMA_PROXMOX_FIXTURE)",
        path.display()
    );
    path
}

/// A 3.0 archive of one 3 MiB drive, and its image.
fn archive(d: &Path) -> (PathBuf, PathBuf) {
    let img = d.join("disk.raw");
    std::fs::write(&img, noise(7, 3 << 20)).unwrap();
    let arc = d.join("backup.vma");
    let o = vma(&["create", "-q", p(&arc), p(&img)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    (arc, img)
}

/// The first `len` bytes of `src`, as a new file `dst`.
fn cut(src: &Path, dst: &Path, len: usize) -> PathBuf {
    let data = std::fs::read(src).unwrap();
    std::fs::write(dst, &data[..len.min(data.len())]).unwrap();
    dst.to_path_buf()
}

#[test]
fn inputs_that_are_not_archives_say_what_they_are() {
    require("qemu-img");
    require("tar");
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let qcow2 = d.join("vm.qcow2");
    let o = sh(&format!("qemu-img create -q -f qcow2 {} 10M", p(&qcow2)));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    std::fs::write(d.join("conf"), b"cores: 2\n").unwrap();
    let o = sh(&format!("cd {} && tar cf files.tar conf", p(d)));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    std::fs::write(d.join("notes.txt"), "a few words of text\n").unwrap();
    std::fs::write(d.join("empty"), b"").unwrap();
    let cases = [
        (
            "vm.qcow2",
            "it is a qcow2 image",
            "use it as a create source",
        ),
        ("files.tar", "it is a tar archive", "tar -xf"),
        ("notes.txt", "it is a text file", "--config"),
        ("empty", "it is empty", "copied completely"),
    ];
    for (name, what, next) in cases {
        let path = d.join(name);
        for cmd in ["list", "verify", "extract"] {
            let mut args = vec![cmd, p(&path)];
            let out = d.join("out");
            if cmd == "extract" {
                args.push(p(&out));
            }
            let o = vma(&args);
            let err = stderr(&o);
            assert_eq!(code(&o), 1, "{cmd} {name}: {err}");
            assert!(
                err.contains(&format!("{} is not an archive: {what}", p(&path)))
                    && err.contains(next),
                "{cmd} {name}: {err}"
            );
            assert!(!err.contains("truncated"), "{err}");
            assert!(!err.contains("magic bytes"), "{err}");
            assert!(!out.exists(), "a failed extract leaves no directory");
        }
    }
    // Through standard input, and to mount.
    let o = sh(&format!("$VMA list - < {}", p(&qcow2)));
    assert!(
        stderr(&o).contains("standard input is not an archive: it is a qcow2 image"),
        "{}",
        stderr(&o)
    );
    std::fs::create_dir_all(d.join("mnt")).unwrap();
    let o = vma(&["mount", p(&qcow2), p(&d.join("mnt"))]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("is not an archive: it is a qcow2 image"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("--salvage"), "{}", stderr(&o));
}

#[test]
fn damaged_and_truncated_archives_suggest_salvage() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (arc, _) = archive(d);
    let len = std::fs::metadata(&arc).unwrap().len() as usize;
    let short = cut(&arc, &d.join("short.vma"), len * 2 / 3);
    let out = d.join("restore");

    let o = vma(&["extract", p(&short), p(&out)]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains(&format!(
            "next step: `vma extract --salvage {} {}`",
            p(&short),
            p(&out)
        )),
        "{}",
        stderr(&o)
    );
    let o = vma(&["verify", p(&short)]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains(&format!("`vma extract --salvage {} DIR`", p(&short)))
            && stderr(&o).contains("`vma mount --salvage")
            && stderr(&o).contains("`vma convert --salvage"),
        "{}",
        stderr(&o)
    );
    let o = vma(&["convert", p(&short), p(&d.join("new.vma"))]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains(&format!(
            "next step: `vma convert --salvage {} {}`",
            p(&short),
            p(&d.join("new.vma"))
        )),
        "{}",
        stderr(&o)
    );
    let o = vma(&["list", p(&short)]);
    assert_eq!(code(&o), 0);
    assert!(
        stderr(&o).contains(&format!("`vma extract --salvage {} DIR`", p(&short))),
        "{}",
        stderr(&o)
    );
    // With --salvage there is no further step to suggest.
    let o = vma(&["extract", "--salvage", p(&short), p(&out)]);
    assert_eq!(code(&o), 1);
    assert!(!stderr(&o).contains("next step"), "{}", stderr(&o));

    // The truncated Proxmox backup: the message names each drive once and
    // says what the size is.
    let f = proxmox_fixture();
    // (A 10 GiB sparse drive in a gzip stream: no free-space bound but its size.)
    let o = vma(&["extract", "--no-space-check", p(&f), p(&d.join("pve"))]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(
        err.contains(
            "drive drive-scsi0 lacks 163724 of its 163840 clusters (10.0 GiB missing), at bytes 1507328..2097152, 3604480..4194304, 6815744..7340032 and 4 more ranges"
        ),
        "{err}"
    );
    assert!(!err.contains("drive drive-scsi0 (1)"), "{err}");
    assert!(err.contains("`vma extract --salvage"), "{err}");
    assert!(!d.join("pve").exists(), "no empty directory left");
}

#[test]
fn convert_salvage_keeps_what_is_there_and_reports_the_loss() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // The truncated vzdump file: converted, loss reported, exit 1.
    let f = proxmox_fixture();
    let conv = d.join("pve.vma");
    let o = vma(&["convert", "--salvage", p(&f), p(&conv)]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(
        err.contains("lost (written as zeros): drive drive-scsi0 (1) bytes 1507328..2097152"),
        "{err}"
    );
    assert!(
        err.contains("converted what was intact into") && err.contains("10.0 GiB in 7 range(s)"),
        "{err}"
    );
    // The converted archive is whole and holds what a salvage extraction
    // of the original writes.
    let o = vma(&["verify", p(&conv)]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let o = vma(&[
        "extract",
        "-q",
        "--salvage",
        "--no-space-check",
        p(&f),
        p(&d.join("a")),
    ]);
    assert_eq!(code(&o), 1);
    let o = vma(&["extract", "-q", p(&conv), p(&d.join("b"))]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // 10 GiB, nearly all holes: compared by drive digest (holes cost
    // nothing there), and by size.
    let digest = |f: &Path| {
        let o = vma(&["checksum", p(f)]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        stdout(&o).split_whitespace().next().unwrap().to_string()
    };
    let (a, b) = (d.join("a/drive-scsi0.raw"), d.join("b/drive-scsi0.raw"));
    assert_eq!(digest(&a), digest(&b));
    assert_eq!(
        std::fs::metadata(&a).unwrap().len(),
        std::fs::metadata(&b).unwrap().len()
    );
    assert_eq!(
        std::fs::read(d.join("a/qemu-server.conf")).unwrap(),
        std::fs::read(d.join("b/qemu-server.conf")).unwrap()
    );
    // Back to VMA v1 from a truncated native archive, too.
    let (arc, _) = archive(d);
    let len = std::fs::metadata(&arc).unwrap().len() as usize;
    let short = cut(&arc, &d.join("short.vma"), len / 2);
    let v1 = d.join("short-v1.vma");
    let o = vma(&[
        "convert",
        "--salvage",
        "--format",
        "vma1",
        p(&short),
        p(&v1),
    ]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let o = vma(&["extract", "-q", "--salvage", p(&short), p(&d.join("c"))]);
    assert_eq!(code(&o), 1);
    let o = vma(&["extract", "-q", p(&v1), p(&d.join("e"))]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        sha256_file(&d.join("c/disk.raw")),
        sha256_file(&d.join("e/disk.raw"))
    );
}

#[test]
fn one_context_per_message() {
    let t = tempfile::tempdir().unwrap();
    let nope = t.path().join("nope.vma");
    std::fs::create_dir_all(t.path().join("mnt")).unwrap();
    for args in [
        vec!["mount", p(&nope), p(&t.path().join("mnt"))],
        vec!["merge", p(&nope), "-o", "x.vma"],
        vec!["list", p(&nope)],
        vec!["extract", p(&nope), p(&t.path().join("out"))],
    ] {
        let o = vma(&args);
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{args:?}: {err}");
        assert_eq!(err.matches("opening").count(), 1, "{args:?}: {err}");
        assert!(err.contains("No such file"), "{err}");
    }
    assert!(!t.path().join("out").exists());
}

#[test]
fn mount_of_a_compressed_stream_suggests_convert_or_extract() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("mnt")).unwrap();
    let f = proxmox_fixture();
    let o = vma(&["mount", p(&f), p(&t.path().join("mnt"))]);
    let err = stderr(&o);
    assert_eq!(code(&o), 2, "{err}");
    assert!(
        err.contains(&format!("`vma convert {} NEW.vma`", p(&f)))
            && err.contains(&format!("`vma extract {} DIR`", p(&f))),
        "{err}"
    );
    assert!(
        !err.contains("pipe") && !err.contains("standard input"),
        "{err}"
    );
}

#[test]
fn extract_into_a_file_says_so_and_failures_leave_no_directories() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (arc, img) = archive(d);
    let o = vma(&["extract", p(&arc), p(&img)]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains(&format!("{} is a file, not a directory", p(&img))),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("os error"), "{}", stderr(&o));
    // A damaged archive: the directories this run made are gone again,
    // one that existed before stays.
    let len = std::fs::metadata(&arc).unwrap().len() as usize;
    let short = cut(&arc, &d.join("short.vma"), len / 2);
    let deep = d.join("new/deeper/restore");
    let o = vma(&["extract", p(&short), p(&deep)]);
    assert_eq!(code(&o), 1);
    assert!(
        !d.join("new").exists(),
        "left behind: {}",
        d.join("new").display()
    );
    std::fs::create_dir_all(d.join("kept")).unwrap();
    let o = vma(&["extract", p(&short), p(&d.join("kept"))]);
    assert_eq!(code(&o), 1);
    assert!(d.join("kept").is_dir());
}

#[test]
fn json_values_and_exit_codes_are_as_documented() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // list --json of a whole-stream compressed archive: its completeness is
    // not known from the header alone (null, with no problem), and VMA v1
    // has no creator (null; the text says so).
    let f = proxmox_fixture();
    let o = vma(&["list", "--json", p(&f)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(doc["complete"], serde_json::Value::Null);
    assert_eq!(doc["problem"], serde_json::Value::Null);
    assert_eq!(doc["creator"], serde_json::Value::Null);
    let o = vma(&["list", p(&f)]);
    assert!(
        stdout(&o).contains("creator:     (not recorded: VMA v1 has no creator field)"),
        "{}",
        stdout(&o)
    );
    // Uncompressed and truncated: complete false with the problem said.
    let o = sh(&format!("gzip -dc {} > {}/pve.vma", p(&f), p(d)));
    assert_eq!(code(&o), 0);
    let o = vma(&["list", "--json", p(&d.join("pve.vma"))]);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(doc["complete"], false);
    assert!(doc["problem"].as_str().unwrap().contains("incomplete"));

    // verify --json: sha256_check takes the words of digest_check.
    let words = [
        "match",
        "mismatch",
        "not-recorded",
        "out-of-order",
        "not-checked",
        "skipped",
    ];
    let (arc, img) = archive(d);
    let v2 = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/v2/full.vma");
    for (path, extra, sha_want) in [
        (arc.as_path(), None, "not-recorded"),
        (v2.as_path(), None, "match"),
        (v2.as_path(), Some("--no-drive-digest"), "skipped"),
        (d.join("pve.vma").as_path(), None, "not-recorded"),
    ] {
        let mut args = vec!["verify", "--json", p(path)];
        args.extend(extra);
        let o = vma(&args);
        let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        for drive in doc["drives"].as_array().unwrap() {
            let sha = drive["sha256_check"].as_str().unwrap();
            assert!(words.contains(&sha), "{sha}");
            assert!(words.contains(&drive["digest_check"].as_str().unwrap()));
            assert_eq!(sha, sha_want, "{}: {drive}", path.display());
        }
    }

    // verify of an incremental archive whose parent is missing fails
    // verification: exit 1, as the README says.
    std::fs::write(&img, noise(8, 3 << 20)).unwrap();
    diff_archive(&arc, &img, &d.join("inc.vma"));
    let lone = d.join("lone");
    std::fs::create_dir_all(&lone).unwrap();
    std::fs::copy(d.join("inc.vma"), lone.join("inc.vma")).unwrap();
    let o = vma(&["verify", p(&lone.join("inc.vma"))]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot be verified") && stderr(&o).contains("--parent"),
        "{}",
        stderr(&o)
    );

    // "1 drive", not "1 drives".
    let o = vma(&["create", p(&d.join("one.vma")), p(&img)]);
    assert!(stderr(&o).contains("(1 drive, "), "{}", stderr(&o));
}

#[test]
fn help_completions_man_page_verbose_and_environment() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // --threads: its default said once.
    let o = vma(&["verify", "--help"]);
    let help = stdout(&o);
    assert!(help.contains("default: one per core"), "{help}");
    assert!(!help.contains("[default: 0]"), "{help}");
    assert!(help.contains("[env: VMA_THREADS="), "{help}");

    // Completions for every shell clap knows; bash's loads in bash.
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = vma(&["completions", shell]);
        assert_eq!(code(&o), 0, "{shell}: {}", stderr(&o));
        assert!(stdout(&o).contains("extract"), "{shell}");
    }
    let o = sh("source <($VMA completions bash) && complete -p vma");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("vma"), "{}", stdout(&o));

    // The manual page: vma(1) on stdout, one page per command with --dir.
    let o = vma(&["man"]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).starts_with(".ie") || stdout(&o).contains(".TH vma 1"));
    assert!(stdout(&o).contains(".TH vma 1"), "{}", stdout(&o));
    let o = vma(&["man", "--dir", p(&d.join("man"))]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    for page in ["vma.1", "vma-create.1", "vma-extract.1", "vma-umount.1"] {
        let text = std::fs::read_to_string(d.join("man").join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
    let create = std::fs::read_to_string(d.join("man/vma-create.1")).unwrap();
    assert!(create.contains("allow\\-backing"), "{create}");
    if std::process::Command::new("man")
        .arg("--version")
        .output()
        .is_ok()
    {
        let o = sh(&format!(
            "MANWIDTH=80 man -l {} | head -5",
            p(&d.join("man/vma.1"))
        ));
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }

    // Environment defaults: VMA_COMPRESS for archives written, VMA_THREADS
    // checked like --threads.
    let img = d.join("disk.raw");
    std::fs::write(&img, noise(3, 1 << 20)).unwrap();
    let o = std::process::Command::new(vma_bin())
        .args(["create", "-q", p(&d.join("plain.vma")), p(&img)])
        .env("VMA_COMPRESS", "none")
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = vma(&["list", "--json", p(&d.join("plain.vma"))]);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(doc["compression"], "none");
    let o = std::process::Command::new(vma_bin())
        .args(["verify", p(&d.join("plain.vma"))])
        .env("VMA_THREADS", "many")
        .output()
        .unwrap();
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--threads"), "{}", stderr(&o));

    // -v: progress as lines when stderr is not a terminal.
    let big = d.join("big.raw");
    std::fs::write(&big, noise(5, 96 << 20)).unwrap();
    let o = vma(&[
        "-v",
        "create",
        "--compress",
        "none",
        p(&d.join("big.vma")),
        p(&big),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("vma: create "), "{}", stderr(&o));
    assert!(stderr(&o).contains("% ("), "{}", stderr(&o));
    let o = vma(&[
        "create",
        "--compress",
        "none",
        p(&d.join("big2.vma")),
        p(&big),
    ]);
    assert!(!stderr(&o).contains("% ("), "{}", stderr(&o));
}
