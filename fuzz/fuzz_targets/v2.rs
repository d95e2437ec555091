//! Native v2 archives: header, extents, index, footer; sequential pass and random access.
//! Seeds: `fuzz/corpus/v2/`; body: `vma_core::fuzzing::archive`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vma_core::fuzzing::archive(data);
});
