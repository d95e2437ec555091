//! VMA v1 exactly as Proxmox writes and reads it: every v1 archive `vma`
//! writes (`create --format vma1`, `convert --format vma1`, odd drive
//! sizes) passes a port of the acceptance rules of Proxmox's reader
//! (`vma_tests::proxmox_vma`), restores every byte there, has 58 clusters
//! to an extent and the header Proxmox's writer would write; config-only
//! archives (what Proxmox's `vma create` writes without drives) are read
//! by every reading command.

use std::path::{Path, PathBuf};

use vma_tests::proxmox_vma::{empty_extent, restore, writer_extents, writer_header, Restored};
use vma_tests::*;

const CONF: &[u8] = b"boot: order=scsi0\ncores: 2\nscsi0: local:vm-100-disk-0,size=4M\n";

/// Run `vma` and require success.
fn ok(args: &[&str]) -> String {
    let o = vma(args);
    assert_eq!(code(&o), 0, "vma {args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// What Proxmox's reader makes of `archive`, which it must accept.
fn accepted(archive: &Path) -> Restored {
    restore(&std::fs::read(archive).unwrap())
        .unwrap_or_else(|e| panic!("Proxmox's reader rejects {}: {e}", archive.display()))
}

/// `bytes` with a zero tail up to whole 512-byte sectors.
fn padded(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.resize(bytes.len().next_multiple_of(512), 0);
    bytes
}

/// Extents as vzdump writes them: 58 clusters each, the last one 1..=58.
fn check_extents(r: &Restored) {
    let (last, full) = r.extent_clusters.split_last().expect("an extent");
    assert!(full.iter().all(|&n| n == 58), "{:?}", r.extent_clusters);
    assert!((1..=58).contains(last), "{:?}", r.extent_clusters);
}

/// Drives of odd sizes: (name, path, contents).
fn odd_drives(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>| {
        let path = dir.join(format!("{name}.raw"));
        std::fs::write(&path, bytes).unwrap();
        out.push((name.to_string(), path));
    };
    // A tail of 100 bytes in a cluster of its own: Proxmox's reader took
    // it as a write beyond the end.
    add("drive-scsi0", noise(1, 65_536 + 100));
    // More than two extents' worth, zeros in the middle, an odd tail.
    let mut big = noise(2, 130 * 65_536 + 4096 + 100);
    big[20 * 65_536..90 * 65_536].fill(0);
    add("drive-scsi1", big);
    // Smaller than a sector.
    add("drive-efidisk0", noise(3, 1000));
    // Whole sectors but not whole blocks.
    add("drive-tpmstate0", noise(4, 7 * 512));
    out
}

fn drive_args(drives: &[(String, PathBuf)]) -> Vec<String> {
    drives
        .iter()
        .map(|(n, p)| format!("{n}={}", p.display()))
        .collect()
}

/// Proxmox restores `archive` to exactly the drives (with a zero tail to
/// whole sectors) and configs given.
fn restores_as_given(archive: &Path, drives: &[(String, PathBuf)], configs: &[(&str, &[u8])]) {
    let r = accepted(archive);
    check_extents(&r);
    assert_eq!(r.devices.len(), drives.len());
    for ((id, name, size), (want_name, path)) in r.devices.iter().zip(drives) {
        let want = padded(std::fs::read(path).unwrap());
        assert_eq!(name, want_name);
        assert_eq!(*size, want.len() as u64, "{name}");
        assert!(r.images[id] == want, "{name}: Proxmox restores other bytes");
    }
    let got: Vec<(&str, &[u8])> = r
        .configs
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    assert_eq!(got, configs);
}

#[test]
fn create_vma1_of_odd_sizes_is_accepted_and_restores_every_byte() {
    let t = tempfile::tempdir().unwrap();
    let drives = odd_drives(t.path());
    let conf = t.path().join("qemu-server.conf");
    std::fs::write(&conf, CONF).unwrap();
    let arc = t.path().join("vzdump.vma");
    let mut args = vec!["create", "--format", "vma1", p(&arc), "--config", p(&conf)];
    let names = drive_args(&drives);
    args.extend(names.iter().map(String::as_str));
    let o = vma(&args);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    restores_as_given(&arc, &drives, &[("qemu-server.conf", CONF)]);
    assert!(
        stderr(&o).contains("drive drive-scsi0 is 65636 bytes, not whole 512-byte sectors"),
        "{}",
        stderr(&o)
    );
    // vma reads back the sizes Proxmox restores, the data and a zero tail.
    ok(&["verify", "--quiet", p(&arc)]);
    let out = t.path().join("x");
    ok(&["extract", "--quiet", p(&arc), p(&out)]);
    for (name, path) in &drives {
        let got = std::fs::read(out.join(format!("{name}.raw"))).unwrap();
        assert!(got == padded(std::fs::read(path).unwrap()), "{name}");
    }
}

#[test]
fn convert_vma1_is_accepted_from_either_format() {
    let t = tempfile::tempdir().unwrap();
    let drives = odd_drives(t.path());
    let conf = t.path().join("qemu-server.conf");
    std::fs::write(&conf, CONF).unwrap();
    let v2 = t.path().join("a.vma2");
    let mut args = vec!["create", "--quiet", p(&v2), "--config", p(&conf)];
    let names = drive_args(&drives);
    args.extend(names.iter().map(String::as_str));
    ok(&args);
    let v1 = t.path().join("b.vma");
    let o = vma(&["convert", "--format", "vma1", p(&v2), p(&v1)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    restores_as_given(&v1, &drives, &[("qemu-server.conf", CONF)]);
    assert!(stderr(&o).contains("as QEMU presents it"), "{}", stderr(&o));
    // v1 to v1 and through a pipe: the same bytes.
    let again = t.path().join("c.vma");
    ok(&["convert", "--quiet", "--format", "vma1", p(&v1), p(&again)]);
    assert!(std::fs::read(&again).unwrap() == std::fs::read(&v1).unwrap());
    let piped = t.path().join("d.vma");
    let o = sh(&format!(
        "\"$VMA\" convert -q --format vma1 {} - > {}",
        p(&v2),
        p(&piped)
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let r = accepted(&piped);
    check_extents(&r);
}

/// Our header is the one Proxmox's writer writes for the same configs and
/// drives, also when a config does not fit in what is left of the blob
/// table and the table grows by the whole blob.
#[test]
fn the_header_is_sized_as_proxmox_writer_sizes_it() {
    let t = tempfile::tempdir().unwrap();
    let disk = t.path().join("disk.raw");
    std::fs::write(&disk, noise(5, 3 * 65_536)).unwrap();
    let small = b"cores: 1\n".to_vec();
    let fw = vec![b'f'; 1000];
    let big = vec![b'b'; 65_535];
    let cases: Vec<Vec<(&str, Vec<u8>)>> = vec![
        vec![("qemu-server.conf", small.clone())],
        vec![
            ("qemu-server.conf", small.clone()),
            ("qemu-server.fw", fw.clone()),
        ],
        vec![
            ("qemu-server.conf", small.clone()),
            ("big.conf", big.clone()),
            ("qemu-server.fw", fw.clone()),
        ],
        vec![],
    ];
    for (i, configs) in cases.iter().enumerate() {
        let mut args = vec![
            "create".to_string(),
            "--quiet".into(),
            "--format".into(),
            "vma1".into(),
            p(&t.path().join(format!("{i}.vma"))).into(),
        ];
        for (name, data) in configs {
            let path = t.path().join(format!("{i}-{name}"));
            std::fs::write(&path, data).unwrap();
            args.push("--config".into());
            args.push(format!("{name}={}", p(&path)));
        }
        args.push(format!("drive-scsi0={}", p(&disk)));
        args.push(format!("drive-efidisk0={}", p(&disk)));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&args);
        let ours = std::fs::read(t.path().join(format!("{i}.vma"))).unwrap();
        let uuid: [u8; 16] = ours[8..24].try_into().unwrap();
        let ctime = u64::from_be_bytes(ours[24..32].try_into().unwrap());
        let configs: Vec<(&str, &[u8])> = configs.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        let theirs = writer_header(
            &uuid,
            ctime,
            &configs,
            &[
                (1, "drive-scsi0", 3 * 65_536),
                (2, "drive-efidisk0", 3 * 65_536),
            ],
        )
        .unwrap();
        assert_eq!(
            ours[56..60],
            theirs[56..60],
            "case {i}: header size differs from Proxmox's writer"
        );
        assert!(
            ours[..theirs.len()] == theirs[..],
            "case {i}: header bytes differ"
        );
        let r = accepted(&t.path().join(format!("{i}.vma")));
        check_extents(&r);
    }
}

#[test]
fn what_proxmox_refuses_to_write_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let empty = t.path().join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    let disk = t.path().join("disk.raw");
    std::fs::write(&disk, noise(6, 70_000)).unwrap();
    let out = t.path().join("x.vma");
    // An empty drive: Proxmox's writer refuses it, its reader ignores it.
    let o = vma(&["create", "--format", "vma1", p(&out), p(&disk), p(&empty)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("empty"), "{}", stderr(&o));
    assert!(!out.exists());
    // The same through convert.
    let v2 = t.path().join("e.vma2");
    ok(&["create", "--quiet", p(&v2), p(&disk), p(&empty)]);
    let o = vma(&["convert", "--format", "vma1", p(&v2), p(&out)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("empty"), "{}", stderr(&o));
    assert!(!out.exists());
    // A header larger than Proxmox's writer's 512 KiB buffer.
    let mut args = vec![
        "create".to_string(),
        "--format".into(),
        "vma1".into(),
        p(&out).into(),
    ];
    for i in 0..9 {
        let c = t.path().join(format!("c{i}.conf"));
        std::fs::write(&c, vec![b'x'; 60_000]).unwrap();
        args.push("--config".into());
        args.push(p(&c).into());
    }
    args.push(p(&disk).into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = vma(&args);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("512 KiB"), "{}", stderr(&o));
    assert!(!out.exists());
}

/// A config-only archive as Proxmox's `vma create` writes it with no
/// drives (header, then one empty extent) is read by every command.
#[test]
fn config_only_archives_are_read_everywhere() {
    let t = tempfile::tempdir().unwrap();
    let uuid = [0x42u8; 16];
    let fw: &[u8] = b"[OPTIONS]\nenable: 1\n";
    let mut bytes = writer_header(
        &uuid,
        1_700_000_000,
        &[("qemu-server.conf", CONF), ("qemu-server.fw", fw)],
        &[],
    )
    .unwrap();
    bytes.extend(empty_extent(&uuid));
    let arc = t.path().join("vzdump-qemu-100.vma");
    std::fs::write(&arc, &bytes).unwrap();
    let r = accepted(&arc);
    assert_eq!(r.extent_clusters, [0]);
    assert!(r.devices.is_empty());

    let doc: serde_json::Value = serde_json::from_str(&ok(&["list", "--json", p(&arc)])).unwrap();
    assert_eq!(doc["format"], "proxmox-vma");
    assert_eq!(doc["drives"].as_array().unwrap().len(), 0);
    assert_eq!(doc["configs"][1]["name"], "qemu-server.fw");
    assert_eq!(doc["complete"], true);
    assert!(ok(&["list", p(&arc)]).contains("qemu-server.conf"));
    assert_eq!(ok(&["config", p(&arc)]).as_bytes(), CONF);
    assert_eq!(
        ok(&["config", "--list", p(&arc)]),
        "qemu-server.conf\nqemu-server.fw\n"
    );
    let v = ok(&["verify", p(&arc)]);
    assert!(v.contains("OK"), "{v}");
    let out = t.path().join("x");
    ok(&["extract", "--quiet", p(&arc), p(&out)]);
    assert_eq!(std::fs::read(out.join("qemu-server.conf")).unwrap(), CONF);
    assert_eq!(std::fs::read(out.join("qemu-server.fw")).unwrap(), fw);
    // From a pipe, compressed.
    let piped = t.path().join("y");
    let o = sh(&format!(
        "zstd -q -c {} | \"$VMA\" extract -q - {}",
        p(&arc),
        p(&piped)
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::read(piped.join("qemu-server.fw")).unwrap(), fw);
    let o = sh(&format!("gzip -c {} | \"$VMA\" verify -", p(&arc)));
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    // Converted as VMA v1: the same bytes; to the native format: refused,
    // saying why (a native archive holds at least one drive).
    let again = t.path().join("again.vma");
    ok(&["convert", "--quiet", "--format", "vma1", p(&arc), p(&again)]);
    assert!(std::fs::read(&again).unwrap() == bytes);
    let o = vma(&["convert", p(&arc), p(&t.path().join("n.vma2"))]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("configs only"), "{}", stderr(&o));
    // `vma create --format vma1` with configs alone writes the same layout.
    let conf = t.path().join("qemu-server.conf");
    std::fs::write(&conf, CONF).unwrap();
    let made = t.path().join("made.vma");
    ok(&[
        "create",
        "--quiet",
        "--format",
        "vma1",
        p(&made),
        "--config",
        p(&conf),
    ]);
    let ours = std::fs::read(&made).unwrap();
    let uuid: [u8; 16] = ours[8..24].try_into().unwrap();
    let ctime = u64::from_be_bytes(ours[24..32].try_into().unwrap());
    let mut theirs = writer_header(&uuid, ctime, &[("qemu-server.conf", CONF)], &[]).unwrap();
    theirs.extend(empty_extent(&uuid));
    assert!(
        ours == theirs,
        "config-only archive differs from Proxmox's layout"
    );
    // The mount shows the configs and archive.json.
    let m = Mounted::new(&arc, &t.path().join("mnt"), &[]);
    let listed: Vec<String> = std::fs::read_dir(t.path().join("mnt"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let conf_read = std::fs::read(m.path("qemu-server.conf")).unwrap();
    m.unmount();
    assert_eq!(conf_read, CONF);
    assert_eq!(listed.len(), 3, "{listed:?}");
}

/// A single drive archived by `create --format vma1` is, byte for byte,
/// what Proxmox's `vma create` writes for it (given the same uuid and
/// time): its header, 58 clusters to an extent, the same block masks and
/// a zeroed tail past the drive's end.
#[test]
fn one_drive_is_written_byte_for_byte_as_proxmox_writes_it() {
    let t = tempfile::tempdir().unwrap();
    // 150 clusters (three extents), and 300 bytes more (a partial last
    // block and an odd size); zero clusters and blocks.
    for (i, len) in [150 * 65_536, 150 * 65_536 + 300].into_iter().enumerate() {
        let mut bytes = noise(7, len);
        bytes[65_536..40 * 65_536].fill(0);
        bytes[45 * 65_536 + 4096..45 * 65_536 + 3 * 4096].fill(0);
        let disk = t.path().join(format!("disk{i}.raw"));
        std::fs::write(&disk, &bytes).unwrap();
        let conf = t.path().join("qemu-server.conf");
        std::fs::write(&conf, CONF).unwrap();
        let arc = t.path().join(format!("vzdump{i}.vma"));
        ok(&[
            "create",
            "--quiet",
            "--format",
            "vma1",
            p(&arc),
            "--config",
            p(&conf),
            &format!("drive-scsi0={}", p(&disk)),
        ]);
        let ours = std::fs::read(&arc).unwrap();
        let uuid: [u8; 16] = ours[8..24].try_into().unwrap();
        let ctime = u64::from_be_bytes(ours[24..32].try_into().unwrap());
        let size = (bytes.len() as u64).next_multiple_of(512);
        let mut theirs = writer_header(
            &uuid,
            ctime,
            &[("qemu-server.conf", CONF)],
            &[(1, "drive-scsi0", size)],
        )
        .unwrap();
        let header_len = theirs.len();
        theirs.extend(writer_extents(&uuid, 1, size, &bytes));
        assert!(
            ours[..header_len] == theirs[..header_len],
            "{len} bytes: headers differ"
        );
        let first = (header_len..ours.len().min(theirs.len())).find(|&i| ours[i] != theirs[i]);
        assert_eq!(
            first, None,
            "{len} bytes: extents differ from Proxmox's at byte {first:?}"
        );
        assert_eq!(ours.len(), theirs.len());
        let r = accepted(&arc);
        assert_eq!(r.extent_clusters, [58, 58, 34 + i]);
        assert!(r.images[&1] == padded(bytes));
    }
}
