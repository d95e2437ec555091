//! qcow2 images as `create` reads them: header, extensions, L1/L2 tables,
//! compressed clusters, backing chains (resolved to memory).
//! Seeds: `fuzz/corpus/qcow2/`; body: `vma_core::fuzzing::qcow2`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vma_core::fuzzing::qcow2(data);
});
