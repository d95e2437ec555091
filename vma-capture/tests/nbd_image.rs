//! An NBD export of `qemu-nbd` read as a source image.

#[path = "../../vma-nbd/tests/support/mod.rs"]
mod support;

use support::{served_mixed_qcow2, K64};
use vma_capture::nbd_image::NbdImage;
use vma_core::image::source::{data_runs, DiskImage, Stretch};

#[test]
fn data_runs_are_exactly_the_clusters_with_data() {
    let dir = tempfile::tempdir().unwrap();
    let (server, want) = served_mixed_qcow2(dir.path());
    let image = NbdImage::new(server.connect("disk"));
    let runs = data_runs(&image).unwrap();
    assert_eq!(runs, vec![0..1, 3..4, 40..44, 48..60, 128..129], "{runs:?}");
    assert!(matches!(image.status(44 * K64).unwrap(), Stretch::Zero(n) if n >= 4 * K64));
    let mut buf = vec![0u8; K64 as usize];
    image.read_at(&mut buf, 40 * K64).unwrap();
    assert!(buf == want[(40 * K64) as usize..(41 * K64) as usize]);
    image.disconnect();
}
