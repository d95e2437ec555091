//! Native archives of version 2.0 (read, no longer written): header,
//! extents, index, footer through the legacy paths; sequential pass and
//! random access. Corpus: `fuzz/corpus/v2/` (2.0 archives, kept as they
//! were: no writer makes them any more); body: `vma_core::fuzzing::archive`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vma_core::fuzzing::archive(data);
});
