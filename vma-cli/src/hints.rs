//! The next step after an error: what an operator can do about it, said
//! on a line of its own after the error (`vma: next step: ...`).

use crate::Command;

/// What was asked for, as far as the next step depends on it.
pub(crate) struct Invocation {
    /// The command's name.
    command: &'static str,
    /// The archive argument, when the command reads one.
    archive: Option<String>,
    /// The output argument (extract's directory, convert's output).
    output: Option<String>,
    /// Whether `--salvage` was given already.
    salvage: bool,
}

impl Invocation {
    /// The parts of `command` the next steps name.
    pub(crate) fn of(command: &Command) -> Invocation {
        let (name, archive, output, salvage) = match command {
            Command::Extract {
                archive,
                target_dir,
                salvage,
                ..
            } => (
                "extract",
                Some(archive.clone()),
                target_dir.as_ref().map(|d| d.display().to_string()),
                *salvage,
            ),
            Command::Convert {
                input,
                output,
                salvage,
                ..
            } => (
                "convert",
                Some(input.clone()),
                Some(output.clone()),
                *salvage,
            ),
            Command::Mount(args) => (
                "mount",
                Some(args.archive.display().to_string()),
                Some(args.mountpoint.display().to_string()),
                args.salvage,
            ),
            Command::Verify { archive, .. } => ("verify", Some(archive.clone()), None, false),
            Command::List { archive, .. } => ("list", Some(archive.clone()), None, false),
            Command::Config { archive, .. } => ("config", Some(archive.clone()), None, false),
            _ => ("", None, None, false),
        };
        Invocation {
            command: name,
            archive,
            output,
            salvage,
        }
    }
}

/// True when `e` is damage of an archive that salvage can work around (not
/// an input that is no archive at all, or a version this build lacks).
fn salvageable(e: &anyhow::Error) -> bool {
    if e.downcast_ref::<crate::DamageFound>()
        .is_some_and(|d| d.0.contains(crate::output::VERIFY_FAILED))
    {
        return true;
    }
    e.chain().any(|c| {
        c.downcast_ref::<vma_core::Error>()
            .is_some_and(salvageable_core)
    })
}

fn salvageable_core(e: &vma_core::Error) -> bool {
    use vma_core::Error as E;
    match e {
        E::InArchive { source, .. } | E::Step { source, .. } => salvageable_core(source),
        E::Corrupt { .. }
        | E::Truncated { .. }
        | E::ExtentDamaged { .. }
        | E::Incomplete { .. }
        | E::DriveDigestMismatch { .. }
        | E::Duplicate { .. }
        | E::Conflicting { .. } => true,
        _ => false,
    }
}

/// The next step after `e`, if there is one to name.
pub(crate) fn next_step(e: &anyhow::Error, inv: &Invocation) -> Option<String> {
    if inv.salvage || !salvageable(e) {
        return None;
    }
    let archive = inv.archive.as_deref().unwrap_or("ARCHIVE");
    let archive = if archive == "-" { "-" } else { archive };
    let out = inv.output.as_deref();
    let extract = format!(
        "`vma extract --salvage {archive} {}`",
        if inv.command == "extract" {
            out.unwrap_or("DIR")
        } else {
            "DIR"
        }
    );
    Some(match inv.command {
        "extract" => format!(
            "{extract} writes everything that is intact, leaves what is lost as zeros and lists every lost byte range"
        ),
        "convert" => format!(
            "`vma convert --salvage {archive} {}` converts everything that is intact, with what is lost as zeros, and lists every lost byte range",
            out.unwrap_or("OUTPUT")
        ),
        "mount" => format!(
            "`vma mount --salvage {archive} {}` mounts what is intact (what is lost reads as zeros and is listed)",
            out.unwrap_or("MOUNTPOINT")
        ),
        "verify" | "list" | "config" => format!(
            "to recover what is intact: {extract}, `vma mount --salvage {archive} MOUNTPOINT` or `vma convert --salvage {archive} NEW.vma` (what is lost becomes zeros and is listed)"
        ),
        _ => return None,
    })
}
