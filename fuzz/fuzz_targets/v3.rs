//! Native 3.0 archives: header, extents bound to their archive, the paged
//! index, footer; sequential pass and random access.
//! Seeds: `fuzz/corpus/v3/`; body: `vma_core::fuzzing::archive`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vma_core::fuzzing::archive(data);
});
