//! Replays the fuzz corpora of every target (every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`) through the
//! targets' bodies, on the stable toolchain without libFuzzer: no input may
//! panic or take longer than `PER_INPUT_LIMIT`.

use std::path::Path;
use std::time::{Duration, Instant};

/// Generous for debug builds; the fuzzer's own limit is 10 s on release builds.
const PER_INPUT_LIMIT: Duration = Duration::from_secs(20);

/// Run every corpus file through `body`; the seeds (`seed-*`, valid inputs
/// made by real writers) must also be accepted, as `body` says.
fn replay(target: &str, body: fn(&[u8]) -> bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            files.push(entry.expect("reading a corpus directory").path());
        }
    }
    files.sort();
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("/corpus/")),
        "no corpus for fuzz target {target} under {}",
        root.display()
    );
    let mut failures = Vec::new();
    let started = Instant::now();
    for file in &files {
        let data = std::fs::read(file).expect("reading a corpus file");
        let t = Instant::now();
        let seed = file
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("seed-"));
        match std::panic::catch_unwind(|| body(&data)) {
            Err(_) => failures.push(format!("{} panicked", file.display())),
            Ok(false) if seed => failures.push(format!("seed {} was not accepted", file.display())),
            Ok(_) => {}
        }
        let took = t.elapsed();
        if took > PER_INPUT_LIMIT {
            failures.push(format!("{} took {took:?}", file.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "fuzz target {target}:\n{}",
        failures.join("\n")
    );
    eprintln!(
        "{target}: {} inputs in {:?}",
        files.len(),
        started.elapsed()
    );
}

#[test]
fn v3_corpus() {
    replay("v3", |data| {
        let o = vma_core::fuzzing::archive(data);
        o.pass_clean && o.opened && o.clusters_compared > 0
    });
}

#[test]
fn v2_corpus() {
    replay("v2", |data| {
        let o = vma_core::fuzzing::archive(data);
        o.pass_clean && o.opened && o.clusters_compared > 0
    });
}

#[test]
fn vma1_corpus() {
    replay("vma1", |data| {
        let o = vma_core::fuzzing::archive(data);
        o.pass_clean && o.opened && o.clusters_compared > 0
    });
}

#[test]
fn stream_corpus() {
    // Whole-stream compressed archives: the pass reads them, random access refuses them.
    replay("stream", |data| {
        let o = vma_core::fuzzing::archive(data);
        o.pass_clean && !o.opened
    });
}

#[test]
fn qcow2_corpus() {
    replay("qcow2", |data| {
        let o = vma_core::fuzzing::qcow2(data);
        o.opened && o.data_bytes_read > 0
    });
}

#[test]
fn nbd_corpus() {
    replay("nbd", |data| {
        let o = vma_nbd::fuzzing::nbd(data);
        o.reply_bytes > 0 && (o.written > 0 || data.len() < 200)
    });
}

#[test]
fn qmp_corpus() {
    replay("qmp", |data| {
        let o = vma_capture::fuzzing::qmp(data);
        o.connected
    });
}
