//! Proxmox VMA v1 archives: header, extent headers; sequential pass and random access.
//! Seeds: `fuzz/corpus/vma1/`; body: `vma_core::fuzzing::archive`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vma_core::fuzzing::archive(data);
});
