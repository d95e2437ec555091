//! SIGINT, SIGTERM and SIGHUP for the commands that write files: a thread
//! of its own receives them (`sigwait`), so what it does on a signal is
//! ordinary code rather than a signal handler's few safe calls.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// What a signal does.
pub(crate) enum OnSignal {
    /// Remove every temporary file (waiting for a commit step under way to
    /// complete) and the empty directories `extract` made, say so, and
    /// exit with 128 + the signal's number.
    Exit,
    /// Set the flag: the command cancels what it does and cleans up itself.
    Cancel(&'static AtomicBool),
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// Route SIGINT, SIGTERM and SIGHUP to a thread that does `on`. Must be
/// called before any other thread is started: threads inherit the mask
/// that blocks these signals everywhere else.
pub(crate) fn install(on: OnSignal) {
    let set = signal_set();
    // SAFETY: blocks the signals in this thread (and the threads it starts).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let started = std::thread::Builder::new()
        .name("vma-signals".into())
        .spawn(move || loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: waits for one of the blocked signals of `set`.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                continue;
            }
            match on {
                OnSignal::Cancel(flag) => flag.store(true, Ordering::Relaxed),
                OnSignal::Exit => {
                    for object in crate::s3::abort_uploads() {
                        eprintln!(
                            "vma: interrupted by {}; aborted the upload of {object}",
                            name(signal)
                        );
                    }
                    let removed = vma_core::atomic::remove_temporaries();
                    // Then the directories `extract` made for them, if empty.
                    let dirs = crate::outdir::remove_made();
                    eprintln!(
                        "vma: interrupted by {}; removed {} temporary file(s){}",
                        name(signal),
                        removed.len(),
                        if removed.is_empty() {
                            String::new()
                        } else {
                            format!(
                                ": {}",
                                removed
                                    .iter()
                                    .map(|p| p.display().to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        }
                    );
                    for d in dirs {
                        eprintln!("vma: removed {}, which this run made", d.display());
                    }
                    // SAFETY: ends the process at once; every output that
                    // was not committed has just been removed.
                    unsafe { libc::_exit(128 + signal) };
                }
            }
        });
    if started.is_err() {
        // Without the thread, the signals would wait forever: unblock them.
        // SAFETY: as above.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}

/// Remove the temporary files in `dir` that processes which are gone left
/// behind, and say which (also with `--quiet`: files went away).
pub(crate) fn clear_stale(dir: &Path) -> anyhow::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    for s in vma_core::atomic::remove_stale_temporaries(dir)? {
        say_stale(&s);
    }
    Ok(())
}

/// Say that a temporary file a process which is gone left was removed.
pub(crate) fn say_stale(s: &vma_core::atomic::StaleTemporary) {
    eprintln!(
        "vma: removed {} ({}), a temporary file left by process {}, which is gone",
        s.path.display(),
        vma_core::util::human_bytes(s.size),
        s.pid
    );
}
