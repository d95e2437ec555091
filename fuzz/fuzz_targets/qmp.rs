//! What QEMU's monitor sends to the QMP client: greeting, replies, events.
//! Seeds: `fuzz/corpus/qmp/`; body: `vma_capture::fuzzing::qmp`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vma_capture::fuzzing::qmp(data);
});
