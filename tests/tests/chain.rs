//! Chains made with `vma create` and `vma diff` from raw images with random
//! writes, through the built binary: folding the oldest links into a
//! synthetic full (`vma merge`, which stands in for the archive it was
//! merged from), `vma prune`, and every remaining point in time restored
//! exactly through `vma extract` and through a real `vma mount`. Damaged
//! inputs, broken chains and interrupted merges change nothing.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vma_tests::*;

const SIZE: u64 = 24 * 1024 * 1024 + 4096 + 512;

/// Run `vma` and require success.
fn ok(args: &[&str]) -> String {
    let o = vma(args);
    assert_eq!(code(&o), 0, "vma {args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// Random 512-byte aligned writes (and a few zeroed stretches) into `image`.
fn scatter(image: &Path, seed: u64, writes: usize) {
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..writes {
        let len = (next() % 300 + 1) * 512;
        let off = (next() % (SIZE - len)) / 512 * 512;
        let data = if i % 7 == 3 {
            vec![0u8; len as usize]
        } else {
            noise(next(), len as usize)
        };
        f.write_all_at(&data, off).unwrap();
    }
}

/// A chain in `dir`: `full.vma` and `inc1.vma`..`incN.vma`, each made by
/// `vma diff` after random writes; returns the archives oldest first with
/// the image each holds.
fn make_chain(dir: &Path, incrementals: usize) -> Vec<(PathBuf, Vec<u8>)> {
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let image = work.join("disk0.raw");
    sparse_image(
        &image,
        SIZE,
        &[
            (0, 1 << 20, 1),
            (5 << 20, 3 << 20, 2),
            (SIZE - 9000, 9000, 3),
        ],
    );
    std::fs::write(work.join("vm.conf"), b"cores: 1\n").unwrap();
    let full = dir.join("full.vma");
    ok(&[
        "create",
        "--quiet",
        p(&full),
        "--config",
        p(&work.join("vm.conf")),
        &format!("disk0={}", p(&image)),
    ]);
    let mut points = vec![(full, std::fs::read(&image).unwrap())];
    for i in 1..=incrementals {
        scatter(&image, i as u64 * 7919, 12);
        std::fs::write(work.join("vm.conf"), format!("cores: {i}\n")).unwrap();
        let inc = dir.join(format!("inc{i}.vma"));
        let parent = points.last().unwrap().0.clone();
        ok(&[
            "diff",
            "--quiet",
            "--against",
            p(&parent),
            &format!("disk0={}", p(&image)),
            "--config",
            p(&work.join("vm.conf")),
            "-o",
            p(&inc),
        ]);
        points.push((inc, std::fs::read(&image).unwrap()));
    }
    points
}

/// The point in time `archive` presents restores exactly `want` through
/// `vma extract` and through `vma mount`, and the archive (with its chain)
/// verifies.
fn restores(archive: &Path, want: &[u8], scratch: &Path) {
    let x = scratch.join("x");
    let _ = std::fs::remove_dir_all(&x);
    ok(&["extract", "--quiet", p(archive), p(&x)]);
    assert!(
        std::fs::read(x.join("disk0.raw")).unwrap() == want,
        "{}: extract differs from its point in time",
        archive.display()
    );
    let m = Mounted::new(archive, &scratch.join("mnt"), &[]);
    let got = std::fs::read(m.path("disk0.raw")).unwrap();
    m.unmount();
    assert!(
        got == want,
        "{}: the mount differs from its point in time",
        archive.display()
    );
    ok(&["verify", "--quiet", p(archive)]);
}

/// Every file in `dir` with its SHA-256 (hidden files included).
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                sha256_file(&e.path()),
            )
        })
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    snapshot(dir).into_keys().collect()
}

#[test]
fn folding_the_oldest_links_keeps_every_later_point_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let chain_dir = dir.path().join("chain");
    std::fs::create_dir_all(&chain_dir).unwrap();
    let points = make_chain(&chain_dir, 5);
    // Every point restores before the fold.
    for (archive, want) in &points {
        restores(archive, want, dir.path());
    }
    // Fold full..inc3 into one synthetic full of inc3's point in time.
    let base = chain_dir.join("base.vma");
    let out = vma(&["merge", p(&points[3].0), "-o", p(&base)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("copied as stored"),
        "{}",
        stderr(&out)
    );
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&["list", "--json", p(&base)])).unwrap();
    assert_eq!(listed["parent"], serde_json::Value::Null);
    let inc3: serde_json::Value =
        serde_json::from_str(&ok(&["list", "--json", p(&points[3].0)])).unwrap();
    assert_eq!(listed["stands_for"][0]["uuid"], inc3["uuid"]);
    assert_eq!(listed["stands_for"][0]["digest"], inc3["archive_digest"]);
    // Configs of the newest archive folded in win.
    assert_eq!(ok(&["config", p(&base)]), "cores: 3\n");
    for (archive, _) in &points[..4] {
        std::fs::remove_file(archive).unwrap();
    }
    restores(&base, &points[3].1, dir.path());
    for (archive, want) in &points[4..] {
        restores(archive, want, dir.path());
    }
    // The chain of inc5 now ends at the synthetic full, standing in for inc3.
    let doc: serde_json::Value =
        serde_json::from_str(&ok(&["list", "--json", "--chain", p(&points[5].0)])).unwrap();
    let links = doc["chain"].as_array().unwrap();
    assert_eq!(links.len(), 3);
    assert_eq!(links[2]["path"], p(&base));
    assert_eq!(links[2]["incremental"], false);
    assert_eq!(links[2]["stands_in_for"], inc3["uuid"]);
    let text = ok(&["list", "--chain", p(&points[5].0)]);
    assert!(text.contains("stands in for"), "{text}");
    // A synthetic full of a synthetic full stands in for both.
    let again = chain_dir.join("again.vma");
    ok(&["merge", "--quiet", p(&base), "-o", p(&again)]);
    let doc: serde_json::Value = serde_json::from_str(&ok(&["list", "--json", p(&again)])).unwrap();
    assert_eq!(doc["stands_for"].as_array().unwrap().len(), 2);
    std::fs::remove_file(&base).unwrap();
    restores(&points[5].0, &points[5].1, dir.path());
}

#[test]
fn prune_keeps_the_newest_points_and_deletes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let chain_dir = dir.path().join("chain");
    std::fs::create_dir_all(&chain_dir).unwrap();
    let mut points = make_chain(&chain_dir, 6);
    std::fs::write(chain_dir.join("notes.txt"), b"not an archive").unwrap();
    let before = snapshot(&chain_dir);
    let out = ok(&["prune", p(&chain_dir), "--keep-last", "3", "--dry-run"]);
    assert!(out.contains("fold: ") && out.contains("inc4.vma"), "{out}");
    assert!(out.contains("dry run"), "{out}");
    assert_eq!(snapshot(&chain_dir), before, "a dry run changed files");
    let out = ok(&["prune", p(&chain_dir), "--keep-last", "3"]);
    assert!(out.contains("deleted"), "{out}");
    assert_eq!(
        names(&chain_dir),
        ["inc4.vma", "inc5.vma", "inc6.vma", "notes.txt"]
    );
    let inc4: serde_json::Value =
        serde_json::from_str(&ok(&["list", "--json", p(&points[4].0)])).unwrap();
    assert_eq!(
        inc4["parent"],
        serde_json::Value::Null,
        "inc4 is now a full"
    );
    for (archive, want) in &points[4..] {
        restores(archive, want, dir.path());
    }
    // Nothing left to do.
    let out = ok(&["prune", p(&chain_dir), "--keep-last", "3"]);
    assert!(out.contains("nothing to prune"), "{out}");
    // One more point on top: the next prune folds again, over the fold.
    let image = chain_dir.join("work/disk0.raw");
    scatter(&image, 99, 10);
    let inc7 = chain_dir.join("inc7.vma");
    ok(&[
        "diff",
        "--quiet",
        "--against",
        p(&points[6].0),
        &format!("disk0={}", p(&image)),
        "-o",
        p(&inc7),
    ]);
    points.push((inc7.clone(), std::fs::read(&image).unwrap()));
    ok(&[
        "prune",
        "--quiet",
        p(&points[5].0),
        p(&points[6].0),
        p(&inc7),
        p(&points[4].0),
        "--keep-last",
        "2",
    ]);
    assert_eq!(names(&chain_dir), ["inc6.vma", "inc7.vma", "notes.txt"]);
    for (archive, want) in &points[6..] {
        restores(archive, want, dir.path());
    }
}

#[test]
fn prune_and_merge_refuse_broken_or_damaged_chains_and_delete_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let chain_dir = dir.path().join("chain");
    std::fs::create_dir_all(&chain_dir).unwrap();
    let points = make_chain(&chain_dir, 5);
    std::fs::remove_dir_all(chain_dir.join("work")).unwrap();

    // A missing link: the chain is broken.
    let hidden = dir.path().join("inc2.vma");
    std::fs::rename(&points[2].0, &hidden).unwrap();
    let before = snapshot(&chain_dir);
    let out = vma(&["prune", p(&chain_dir), "--keep-last", "2"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("chain is broken"), "{}", stderr(&out));
    assert_eq!(snapshot(&chain_dir), before);
    let out = vma(&["merge", p(&points[5].0), "-o", p(&dir.path().join("m.vma"))]);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("needs its parent"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.path().join("m.vma").exists());
    std::fs::rename(&hidden, &points[2].0).unwrap();

    // A damaged extent that the fold needs: nothing is replaced or deleted.
    let full = &points[0].0;
    let saved = std::fs::read(full).unwrap();
    let mut bad = saved.clone();
    bad[200_000] ^= 0x01;
    std::fs::write(full, &bad).unwrap();
    let before = snapshot(&chain_dir);
    let out = vma(&["prune", p(&chain_dir), "--keep-last", "2"]);
    assert_eq!(code(&out), 1, "{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("damaged"), "{}", stderr(&out));
    assert_eq!(snapshot(&chain_dir), before, "a failed prune changed files");
    std::fs::write(full, &saved).unwrap();

    // A branch: an archive made on inc1 as well as inc2.
    let b = dir.path().join("b");
    ok(&["extract", "--quiet", p(&points[1].0), p(&b)]);
    scatter(&b.join("disk0.raw"), 5, 3);
    let branch = chain_dir.join("branch.vma");
    ok(&[
        "diff",
        "--quiet",
        "--against",
        p(&points[1].0),
        &format!("disk0={}", p(&b.join("disk0.raw"))),
        "-o",
        p(&branch),
    ]);
    let before = snapshot(&chain_dir);
    let out = vma(&["prune", p(&chain_dir), "--keep-last", "2"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("parent of both"), "{}", stderr(&out));
    assert_eq!(snapshot(&chain_dir), before);
    // Given only the main line, the branch beside it still needs inc1.
    let out = vma(&[
        "prune",
        p(&points[0].0),
        p(&points[1].0),
        p(&points[2].0),
        "--keep-last",
        "1",
    ]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("branch.vma needs"),
        "{}",
        stderr(&out)
    );
    assert_eq!(snapshot(&chain_dir), before);
}

#[test]
fn an_interrupted_merge_leaves_nothing_under_the_final_name() {
    let dir = tempfile::tempdir().unwrap();
    let chain_dir = dir.path().join("chain");
    std::fs::create_dir_all(&chain_dir).unwrap();
    let points = make_chain(&chain_dir, 5);
    let out = chain_dir.join("merged.vma");
    // zstd level 19 re-encodes every extent slowly: time enough to kill it.
    let mut child = std::process::Command::new(vma_bin())
        .args([
            "merge",
            "--quiet",
            "--compress",
            "zstd:19",
            "--threads",
            "1",
        ])
        .arg(&points[5].0)
        .arg("-o")
        .arg(&out)
        .spawn()
        .unwrap();
    // Wait until the temporary file has grown, then kill the merge.
    let started = std::time::Instant::now();
    loop {
        let growing = names(&chain_dir)
            .iter()
            .any(|n| n.starts_with(".merged.vma.partial-"));
        if growing || started.elapsed().as_secs() > 20 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the merge finished before it was killed");
    assert!(!out.exists(), "a killed merge left {}", out.display());
    // A merge that fails (here: a damaged link) removes its temporary file.
    for n in names(&chain_dir) {
        if n.starts_with('.') {
            std::fs::remove_file(chain_dir.join(n)).unwrap();
        }
    }
    let mut bad = std::fs::read(&points[0].0).unwrap();
    bad[300_000] ^= 0x80;
    std::fs::write(&points[0].0, &bad).unwrap();
    let o = vma(&["merge", p(&points[5].0), "-o", p(&out)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("full.vma"), "{}", stderr(&o));
    assert!(!out.exists());
    assert!(
        names(&chain_dir).iter().all(|n| !n.starts_with('.')),
        "{:?}",
        names(&chain_dir)
    );
}

#[test]
fn convert_copies_extents_already_encoded_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let chain_dir = dir.path().join("chain");
    std::fs::create_dir_all(&chain_dir).unwrap();
    let points = make_chain(&chain_dir, 2);
    let list = |a: &Path| -> serde_json::Value {
        serde_json::from_str(&ok(&["list", "--json", p(a)])).unwrap()
    };
    for (i, (archive, want)) in points.iter().enumerate() {
        // Same compression, through a pipe: every extent is copied as stored.
        let same = chain_dir.join(format!("same{i}.vma"));
        // From a pipe, an incremental archive's parent (whose leaves give
        // the drive digests of its unchanged clusters) is named.
        let parent = match i {
            0 => String::new(),
            _ => format!("--parent {}", p(&points[i - 1].0)),
        };
        let o = sh(&format!(
            "cat {} | \"$VMA\" convert -q {parent} - - > {}",
            p(archive),
            p(&same)
        ));
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let (a, b) = (list(archive), list(&same));
        assert_eq!(a["uuid"], b["uuid"]);
        assert_eq!(a["parent"], b["parent"]);
        assert_eq!(
            a["drives"][0]["stored_bytes"],
            b["drives"][0]["stored_bytes"]
        );
        assert_eq!(a["drives"][0]["digest"], b["drives"][0]["digest"]);
        assert_eq!(
            std::fs::metadata(archive).unwrap().len(),
            std::fs::metadata(&same).unwrap().len()
        );
        ok(&["verify", "--quiet", p(&same)]);
        // Other compression: encoded again, same contents.
        let raw = chain_dir.join(format!("raw{i}.vma"));
        ok(&[
            "convert",
            "--quiet",
            "--compress",
            "none",
            p(archive),
            p(&raw),
        ]);
        assert_eq!(list(&raw)["compression"], "none");
        for converted in [&same, &raw] {
            let x = dir.path().join("x");
            let _ = std::fs::remove_dir_all(&x);
            ok(&["extract", "--quiet", p(converted), p(&x)]);
            assert!(std::fs::read(x.join("disk0.raw")).unwrap() == *want);
        }
        std::fs::remove_file(&raw).unwrap();
        std::fs::remove_file(&same).unwrap();
    }
    // A damaged extent stops the copy (exit 1) and leaves no output.
    let mut bad = std::fs::read(&points[0].0).unwrap();
    bad[150_000] ^= 4;
    let damaged = dir.path().join("damaged.vma");
    std::fs::write(&damaged, &bad).unwrap();
    let out = dir.path().join("out.vma");
    let o = vma(&["convert", p(&damaged), p(&out)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("damaged"), "{}", stderr(&o));
    assert!(!out.exists());
}
