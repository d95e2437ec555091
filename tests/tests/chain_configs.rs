//! The VM config at every point in time of a chain: `vma diff` carries
//! the parent's configs forward (or takes new ones), and `extract`,
//! `mount`, `list`, `config`, `merge` and `prune` give each point the
//! configs stored in its archive or in the nearest ancestor that stores
//! them, also in chains whose incrementals store none (as they were
//! written before configs were carried forward).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vma_tests::*;

const SIZE: u64 = 3 * 1024 * 1024 + 512;
const CONF: &[u8] = b"cores: 2\nscsi0: local:vm-100-disk-0\n";
const FW: &[u8] = b"[OPTIONS]\nenable: 1\n";

/// Run `vma` and require success.
fn ok(args: &[&str]) -> String {
    let o = vma(args);
    assert_eq!(code(&o), 0, "vma {args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

fn list_json(args: &[&str]) -> Value {
    let mut all = vec!["list", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(&all)).unwrap()
}

/// Names and sources of the configs `list --json` shows.
fn sources(doc: &Value) -> Vec<(String, String, Value, Value)> {
    doc["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["source"].as_str().unwrap().to_string(),
                c["source_uuid"].clone(),
                c["source_path"].clone(),
            )
        })
        .collect()
}

/// `dir/work/disk0.raw` and its two configs, and `dir/full.vma` of them.
fn full(dir: &Path) -> (PathBuf, PathBuf) {
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let image = work.join("disk0.raw");
    sparse_image(&image, SIZE, &[(0, 200_000, 1), (SIZE - 5000, 5000, 2)]);
    std::fs::write(work.join("qemu-server.conf"), CONF).unwrap();
    std::fs::write(work.join("qemu-server.fw"), FW).unwrap();
    let full = dir.join("full.vma");
    ok(&[
        "create",
        "--quiet",
        p(&full),
        "--config",
        p(&work.join("qemu-server.conf")),
        "--config",
        p(&work.join("qemu-server.fw")),
        &format!("disk0={}", p(&image)),
    ]);
    (full, image)
}

/// Some new bytes in `image`.
fn touch(image: &Path, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.write_all_at(&noise(seed, 70_000), seed * 131_072 % (SIZE - 70_000))
        .unwrap();
}

/// A chain in `dir` whose `n` incrementals store no configs: `full.vma`
/// (with both configs) and `inc1.vma`..; returns the archives oldest
/// first with the image each holds.
fn old_style_chain(dir: &Path, n: usize) -> Vec<(PathBuf, Vec<u8>)> {
    let (full, image) = full(dir);
    let mut points = vec![(full, std::fs::read(&image).unwrap())];
    for i in 1..=n {
        touch(&image, i as u64);
        let made = dir.join("work/made.vma");
        diff_archive(&points.last().unwrap().0, &image, &made);
        let inc = dir.join(format!("inc{i}.vma"));
        without_configs(&made, &inc);
        std::fs::remove_file(&made).unwrap();
        assert!(list_json(&[p(&inc)])["parent"].is_object());
        points.push((inc, std::fs::read(&image).unwrap()));
    }
    points
}

/// `extract` of `archive` gives `want` and both configs of the full.
fn extracts_with_configs(archive: &Path, want: &[u8], out: &Path) {
    let _ = std::fs::remove_dir_all(out);
    ok(&["extract", "--quiet", p(archive), p(out)]);
    assert!(std::fs::read(out.join("disk0.raw")).unwrap() == want);
    assert_eq!(std::fs::read(out.join("qemu-server.conf")).unwrap(), CONF);
    assert_eq!(std::fs::read(out.join("qemu-server.fw")).unwrap(), FW);
}

#[test]
fn diff_carries_the_parents_configs_forward_or_takes_new_ones() {
    let t = tempfile::tempdir().unwrap();
    let (full, image) = full(t.path());
    touch(&image, 1);
    let inc1 = t.path().join("inc1.vma");
    diff_archive(&full, &image, &inc1);
    let doc = list_json(&[p(&inc1)]);
    let names: Vec<(String, String)> = sources(&doc)
        .into_iter()
        .map(|(n, s, _, _)| (n, s))
        .collect();
    assert_eq!(
        names,
        [
            ("qemu-server.conf".to_string(), "archive".to_string()),
            ("qemu-server.fw".to_string(), "archive".to_string())
        ],
        "the incremental stores the parent's configs itself"
    );
    assert_eq!(ok(&["config", p(&inc1)]).as_bytes(), CONF);
    // Moved away from its parent, it still has its configs.
    let alone = tempfile::tempdir().unwrap();
    let moved = alone.path().join("inc1.vma");
    std::fs::copy(&inc1, &moved).unwrap();
    assert_eq!(ok(&["config", p(&moved), "qemu-server.fw"]).as_bytes(), FW);

    // New configs replace the carried ones.
    let new = t.path().join("work/new.conf");
    std::fs::write(&new, b"cores: 8\n").unwrap();
    touch(&image, 2);
    let inc2 = t.path().join("inc2.vma");
    ok(&[
        "diff",
        "--quiet",
        "--against",
        p(&inc1),
        &format!("disk0={}", p(&image)),
        "--config",
        &format!("qemu-server.conf={}", p(&new)),
        "-o",
        p(&inc2),
    ]);
    assert_eq!(ok(&["config", "--list", p(&inc2)]), "qemu-server.conf\n");
    assert_eq!(ok(&["config", p(&inc2)]), "cores: 8\n");
    let out = t.path().join("x");
    ok(&["extract", "--quiet", p(&inc2), p(&out)]);
    assert_eq!(
        std::fs::read(out.join("qemu-server.conf")).unwrap(),
        b"cores: 8\n"
    );
    assert!(!out.join("qemu-server.fw").exists());
}

#[test]
fn every_point_of_an_old_style_chain_has_the_configs_of_its_ancestor() {
    let t = tempfile::tempdir().unwrap();
    let points = old_style_chain(t.path(), 2);
    let (full, inc2) = (&points[0].0, &points[2].0);
    let full_uuid = list_json(&[p(full)])["uuid"].clone();

    // extract and config of the newest link give the full's configs.
    extracts_with_configs(inc2, &points[2].1, &t.path().join("x"));
    assert_eq!(ok(&["config", p(inc2)]).as_bytes(), CONF);
    assert_eq!(
        ok(&["config", "--list", p(inc2)]),
        "qemu-server.conf\nqemu-server.fw\n"
    );
    // list says where they come from, in JSON and in text.
    let doc = list_json(&[p(inc2)]);
    for (name, source, uuid, path) in sources(&doc) {
        assert!(name.starts_with("qemu-server."), "{name}");
        assert_eq!(source, "ancestor");
        assert_eq!(uuid, full_uuid);
        assert_eq!(path, p(full));
    }
    assert_eq!(doc["configs"][0]["size"], CONF.len());
    assert_eq!(doc["configs_problem"], Value::Null);
    let text = ok(&["list", p(inc2)]);
    assert!(
        text.contains(&format!("from ancestor {}", full_uuid.as_str().unwrap())),
        "{text}"
    );
    // From standard input, the ancestors are given with --parent; without them
    // list says what is missing and config refuses.
    let piped = sh(&format!(
        "\"$VMA\" list --json --parent {} --parent {} - < {}",
        p(&points[1].0),
        p(full),
        p(inc2)
    ));
    assert_eq!(code(&piped), 0, "{}", stderr(&piped));
    let doc: Value = serde_json::from_slice(&piped.stdout).unwrap();
    assert_eq!(sources(&doc).len(), 2);
    assert_eq!(doc["configs"][1]["source"], "ancestor");
    let piped = sh(&format!("\"$VMA\" list --json - < {}", p(inc2)));
    assert_eq!(code(&piped), 0, "{}", stderr(&piped));
    let doc: Value = serde_json::from_slice(&piped.stdout).unwrap();
    assert!(doc["configs"].as_array().unwrap().is_empty());
    assert!(
        doc["configs_problem"]
            .as_str()
            .unwrap()
            .contains("--parent"),
        "{doc}"
    );
    let o = sh(&format!("\"$VMA\" config - < {}", p(inc2)));
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("--parent"), "{}", stderr(&o));

    // The mount shows them too, and archive.json says where they are.
    let m = Mounted::new(inc2, &t.path().join("mnt"), &[]);
    let conf = std::fs::read(m.path("qemu-server.conf")).unwrap();
    let fw = std::fs::read(m.path("qemu-server.fw")).unwrap();
    let json: Value =
        serde_json::from_slice(&std::fs::read(m.path("archive.json")).unwrap()).unwrap();
    m.unmount();
    assert_eq!(conf, CONF);
    assert_eq!(fw, FW);
    assert_eq!(json["configs"][0]["source"], "ancestor");

    // A synthetic full of the newest point stores them.
    let merged = t.path().join("merged.vma");
    ok(&["merge", "--quiet", p(inc2), "-o", p(&merged)]);
    let doc = list_json(&[p(&merged)]);
    assert_eq!(
        sources(&doc)
            .iter()
            .map(|c| (c.0.as_str(), c.1.as_str()))
            .collect::<Vec<_>>(),
        [
            ("qemu-server.conf", "archive"),
            ("qemu-server.fw", "archive")
        ]
    );
    assert_eq!(ok(&["config", p(&merged), "qemu-server.fw"]).as_bytes(), FW);

    // A diff on top of it carries them into the new archive itself.
    let image = t.path().join("work/disk0.raw");
    touch(&image, 9);
    let inc3 = t.path().join("inc3.vma");
    diff_archive(inc2, &image, &inc3);
    let doc = list_json(&[p(&inc3)]);
    assert!(sources(&doc).iter().all(|c| c.1 == "archive"), "{doc}");
    assert_eq!(sources(&doc).len(), 2);
}

#[test]
fn prune_keeps_the_configs_of_an_old_style_chain_reachable() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("chain");
    std::fs::create_dir_all(&dir).unwrap();
    let points = old_style_chain(&dir, 3);
    let out = ok(&["prune", p(&dir), "--keep-last", "2"]);
    assert!(out.contains("deleted"), "{out}");
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(left, ["inc2.vma", "inc3.vma"]);
    // The fold (inc2, now a full) stores them; inc3 takes them from it.
    let inc2_doc = list_json(&[p(&points[2].0)]);
    assert!(sources(&inc2_doc).iter().all(|c| c.1 == "archive"));
    assert_eq!(sources(&inc2_doc).len(), 2);
    let inc3_doc = list_json(&[p(&points[3].0)]);
    for c in sources(&inc3_doc) {
        assert_eq!(c.1, "ancestor");
        assert_eq!(c.3, p(&points[2].0));
    }
    for (archive, want) in &points[2..] {
        extracts_with_configs(archive, want, &t.path().join("x"));
    }
}
