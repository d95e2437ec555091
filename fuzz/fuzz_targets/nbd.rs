//! What an NBD client sends to the NBD server of `vma-nbd`: handshake
//! options and transmission requests, to write-only targets and to
//! read-only views. Seeds: `fuzz/corpus/nbd/`; body:
//! `vma_nbd::fuzzing::nbd`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vma_nbd::fuzzing::nbd(data);
});
