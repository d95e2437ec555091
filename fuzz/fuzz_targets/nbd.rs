//! What an NBD client sends to the capture's NBD server: handshake options
//! and transmission requests. Seeds: `fuzz/corpus/nbd/`; body:
//! `vma_capture::fuzzing::nbd`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vma_capture::fuzzing::nbd(data);
});
