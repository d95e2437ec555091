//! Whole-stream zstd/gzip compressed archives (.vma.zst, .vma.gz), decompressed in-process.
//! Seeds: `fuzz/corpus/stream/`; body: `vma_core::fuzzing::archive`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vma_core::fuzzing::archive(data);
});
