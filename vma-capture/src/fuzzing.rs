//! Body of the `qmp` fuzz target in `fuzz/`, kept in the library so that
//! its corpus is also replayed by an ordinary `cargo test`
//! (`tests/fuzz_corpus.rs`). It panics only where the library broke a
//! promise. (The `nbd` target's body is `vma_nbd::fuzzing::nbd`.)

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::qmp::{Qmp, QueryBlock, QueryJobs, QueryNamedBlockNodes, QueryStatus};

/// Separates what the QMP server sends at each step in [`qmp`]'s input.
pub const QMP_STEP: u8 = 0;

/// Server bytes to the QMP client, over a real socket pair. The input is
/// split at [`QMP_STEP`] bytes: the first part is sent at once (greeting,
/// early events), each later part after the client's next command line.
/// The client connects and then runs the queries capture uses, decoding
/// every reply and event it gets.
pub fn qmp(server_bytes: &[u8]) -> QmpOutcome {
    let mut outcome = QmpOutcome::default();
    let (client, server) = UnixStream::pair().expect("socketpair");
    let steps: Vec<Vec<u8>> = server_bytes
        .split(|&b| b == QMP_STEP)
        .map(<[u8]>::to_vec)
        .collect();
    let server_thread = std::thread::spawn(move || serve_qmp(server, steps));
    if let Ok(mut qmp) = Qmp::from_stream(client, Path::new("fuzz-qmp")) {
        outcome.connected = true;
        qmp.set_command_timeout(Duration::from_secs(5));
        let _ = qmp.version();
        let replies = [
            qmp.run(&QueryBlock).is_ok(),
            qmp.run(&QueryNamedBlockNodes { flat: true }).is_ok(),
            qmp.run(&QueryJobs).is_ok(),
            qmp.run(&QueryStatus).is_ok(),
        ];
        outcome.replies_decoded = replies.iter().filter(|&&ok| ok).count();
        for event in qmp.drain_events() {
            outcome.events += 1;
            let _ = event.job_status_change();
            let _ = event.block_job();
            let _ = event.data_as::<serde_json::Value>();
        }
        let _ = qmp.next_event(Duration::ZERO);
    }
    let _ = server_thread.join();
    outcome
}

/// What [`qmp`] got (for tests of the corpora).
#[derive(Debug, Default)]
pub struct QmpOutcome {
    /// The greeting and capabilities negotiation succeeded.
    pub connected: bool,
    /// Queries answered with a reply that decoded.
    pub replies_decoded: usize,
    /// Events received.
    pub events: usize,
}

/// How long the server of [`qmp`] waits for the client's next command
/// before it sends the rest at once (the client may be waiting itself, for
/// the end of a line or for a reply the input does not hold). A client
/// slower than this only sees replies early, which it must survive too.
const QMP_STEP_WAIT: Duration = Duration::from_millis(20);

/// The server side of [`qmp`]: one step per command line received.
fn serve_qmp(server: UnixStream, steps: Vec<Vec<u8>>) {
    let Ok(read_half) = server.try_clone() else {
        return;
    };
    if read_half.set_read_timeout(Some(QMP_STEP_WAIT)).is_err() {
        return;
    }
    let mut commands = BufReader::new(read_half);
    let mut out = &server;
    let mut line = Vec::new();
    let mut waiting = true;
    for (i, step) in steps.iter().enumerate() {
        if i > 0 && waiting {
            line.clear();
            match commands.read_until(b'\n', &mut line) {
                Ok(n) if n > 0 => {}
                Ok(_) => break,
                // No command in time: send everything else unasked.
                Err(_) => waiting = false,
            }
        }
        if out.write_all(step).is_err() {
            break;
        }
    }
    // End of what the server says: the client sees the connection close.
    let _ = server.shutdown(std::net::Shutdown::Both);
}
