//! `--extent-size KIB`: how much data one extent holds (what a random read
//! decodes), for every command that writes a native archive.

use vma_tests::*;

fn extents(archive: &std::path::Path) -> u64 {
    vma_core::Reader::open(archive).unwrap().extent_count()
}

#[test]
fn extent_size_sets_the_data_per_extent_and_convert_honours_it() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let disk = d.join("disk.raw");
    std::fs::write(&disk, noise(31, 2 << 20)).unwrap();
    let (big, small, converted) = (d.join("big.vma"), d.join("small.vma"), d.join("conv.vma"));
    let o = vma(&["create", "-q", p(&big), p(&disk)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = vma(&["create", "-q", "--extent-size", "64", p(&small), p(&disk)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // 2 MiB of data: 8 extents of 256 KiB, 32 of 64 KiB.
    assert_eq!((extents(&big), extents(&small)), (8, 32));
    // A convert with the same compression copies stored extents as they
    // are, unless another size is asked for.
    let o = vma(&[
        "convert",
        "-q",
        "--extent-size",
        "64",
        p(&big),
        p(&converted),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(extents(&converted), 32);
    for a in [&small, &converted] {
        let out = d.join(format!("out-{}", a.file_stem().unwrap().to_string_lossy()));
        let o = vma(&["extract", "-q", p(a), p(&out)]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        assert_eq!(sha256_file(&out.join("disk.raw")), sha256_file(&disk));
    }
    let o = vma(&[
        "create",
        "-q",
        "--extent-size",
        "2",
        p(&d.join("x.vma")),
        p(&disk),
    ]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("from 4 to 8192 KiB"), "{}", stderr(&o));
}
