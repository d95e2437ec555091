//! What `vma mount` needs from the system, and `vma umount`: mounting as
//! root (the `mount` system call) or as any other user (the setuid helper
//! `fusermount3`), finding mounts in `/proc/self/mountinfo`, unmounting
//! only what `vma mount` mounted, and naming what keeps a mount busy.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

/// The FUSE device every mount talks through.
const FUSE_DEVICE: &str = "/dev/fuse";
/// The setuid helper that mounts and unmounts FUSE file systems for users
/// who are not root (Debian package `fuse3`).
const FUSERMOUNT: &str = "fusermount3";
/// The file system type `vma mount` mounts show in `/proc/self/mountinfo`
/// (`fuse` with the subtype `vma`).
const VMA_FSTYPE: &str = "fuse.vma";

/// True when mounts go through `fusermount3` rather than the `mount`
/// system call: for every user but root.
pub(crate) fn unprivileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() != 0 }
}

/// Check, before anything is mounted, that this user can mount on
/// `mountpoint`, saying what to do when not: the FUSE device, the helper
/// for users who are not root, access to the mount point, `--allow-other`.
pub(crate) fn preflight(mountpoint: &Path, allow_other: bool) -> Result<()> {
    if !Path::new(FUSE_DEVICE).exists() {
        bail!(
            "{FUSE_DEVICE} is missing, so nothing can be mounted with FUSE: load the module (`modprobe fuse`), or in a container pass the device in (`--device /dev/fuse`)"
        );
    }
    if !unprivileged() {
        return Ok(());
    }
    if find_in_path(FUSERMOUNT).is_none() {
        bail!(
            "{FUSERMOUNT} is not installed: a user other than root mounts through it (install the fuse3 package: `apt-get install fuse3`), or mount as root"
        );
    }
    // fusermount3 opens the device as the calling user.
    // SAFETY: a NUL-terminated literal path.
    if unsafe { libc::access(c"/dev/fuse".as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
        bail!(
            "{FUSE_DEVICE} is not open to users other than root here (distributions give it mode 0666; as root: `chmod 0666 {FUSE_DEVICE}`), so only root can mount"
        );
    }
    let c = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| anyhow!("mount point contains a NUL byte"))?;
    // SAFETY: c is a NUL-terminated path.
    if mountpoint.is_dir() && unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        bail!(
            "cannot mount on {}: {FUSERMOUNT} mounts only on a directory you can write to (make one of your own, e.g. `mkdir ~/mnt`)",
            mountpoint.display()
        );
    }
    if allow_other && !user_allow_other() {
        bail!(
            "--allow-other needs `user_allow_other` in /etc/fuse.conf for a user other than root (or leave out --allow-other: the mount is then yours alone)"
        );
    }
    Ok(())
}

/// Refuse, with the next step, an input a mount cannot read at random: a
/// whole-stream compressed archive (vzdump's `.vma.zst`, `.vma.lzo`,
/// `.vma.gz`), or something that is no archive at all.
pub(crate) fn check_mountable(archive: &Path) -> Result<()> {
    use vma_core::read::detect::{describe_other, detect, DetectedFormat, DESCRIBE_LEN};
    // Through the storage seam, so object locations are checked the same way.
    let source = vma_core::storage::open(archive)?;
    let mut prefix = vec![0u8; DESCRIBE_LEN];
    let n = source
        .read_some(&mut prefix, 0)
        .with_context(|| format!("reading {}", archive.display()))?;
    prefix.truncate(n);
    let a = archive.display();
    let kind = match detect(&prefix) {
        Some(DetectedFormat::Zstd) => "zstd",
        Some(DetectedFormat::Gzip) => "gzip",
        Some(DetectedFormat::Lzo) => "lzop",
        Some(_) => return Ok(()),
        None => {
            if let Some((what, hint)) = describe_other(&prefix) {
                return Err(
                    crate::Damage(format!("{a} is not an archive: it is {what}; {hint}")).into(),
                );
            }
            return Ok(());
        }
    };
    bail!(
        "{a} is compressed as a whole ({kind}), so it cannot be mounted: a mount reads at random, and such a stream only from start to end. Convert it once, `vma convert {a} NEW.vma` (a native archive, its extents compressed one by one, about the same size), and mount that; or extract the drives with `vma extract {a} DIR`"
    )
}

/// Add the next step to an error of the mount itself.
pub(crate) fn explain_mount_error(e: std::io::Error, mountpoint: &Path) -> anyhow::Error {
    let mp = mountpoint.display();
    if unprivileged() && e.to_string().contains("fusermount") {
        return anyhow!(
            "mounting on {mp}: {FUSERMOUNT} refused the mount (run `vma mount --foreground` to see its message)"
        );
    }
    if e.raw_os_error() == Some(libc::EPERM) {
        return anyhow!("mounting on {mp}: {e} (the mount system call needs root; as another user, install fuse3 so that {FUSERMOUNT} mounts)");
    }
    anyhow::Error::new(e).context(format!("mounting on {mp}"))
}

/// Whether `/etc/fuse.conf` lets users mount with `allow_other`.
fn user_allow_other() -> bool {
    std::fs::read_to_string("/etc/fuse.conf").is_ok_and(|s| {
        s.lines()
            .any(|l| l.split('#').next().unwrap_or("").trim() == "user_allow_other")
    })
}

/// The first executable file `name` in `$PATH`.
fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
                return false;
            };
            // SAFETY: c is a NUL-terminated path.
            p.is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0
        })
}

/// One line of `/proc/self/mountinfo`: where, what type, from what.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    mountpoint: PathBuf,
    fstype: String,
    source: String,
    /// The user a FUSE mount belongs to (its `user_id=` option).
    owner: Option<u32>,
}

impl MountEntry {
    /// True for a mount made by `vma mount`.
    fn is_vma(&self) -> bool {
        self.fstype == VMA_FSTYPE
    }
}

/// The mounts of this process's namespace, in mount order.
fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text
        .split(|&b| b == b'\n')
        .filter_map(parse_mountinfo_line)
        .collect())
}

/// Parse a mountinfo line (proc(5)): `ID PARENT MAJ:MIN ROOT MOUNTPOINT
/// OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`.
fn parse_mountinfo_line(line: &[u8]) -> Option<MountEntry> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let dash = fields.iter().position(|f| *f == b"-")?;
    let mountpoint = fields.get(4)?;
    let fstype = fields.get(dash + 1)?;
    let source = fields.get(dash + 2)?;
    let owner = fields.get(dash + 3).and_then(|o| {
        o.split(|&b| b == b',')
            .find_map(|opt| opt.strip_prefix(b"user_id="))
            .and_then(|id| std::str::from_utf8(id).ok()?.parse().ok())
    });
    Some(MountEntry {
        owner,
        mountpoint: PathBuf::from(OsString::from_vec(unescape(mountpoint))),
        fstype: String::from_utf8_lossy(&unescape(fstype)).into_owned(),
        source: String::from_utf8_lossy(&unescape(source)).into_owned(),
    })
}

/// Undo the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 4 <= field.len() {
            let oct = &field[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// `path` made absolute with symbolic links resolved, without looking at
/// `path` itself (a FUSE mount whose server died cannot be looked at).
fn resolve(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Ok(abs);
    };
    let parent = parent
        .canonicalize()
        .with_context(|| format!("resolving {}", parent.display()))?;
    let joined = parent.join(name);
    // A symbolic link as the last step: follow it (it is no mount point).
    match std::fs::symlink_metadata(&joined) {
        Ok(m) if m.file_type().is_symlink() => joined
            .canonicalize()
            .with_context(|| format!("resolving {}", joined.display())),
        _ => Ok(joined),
    }
}

/// `vma umount MOUNTPOINT`: unmount a mount made by `vma mount` (and only
/// such a mount), as root with the `umount` system call, else through
/// `fusermount3 -u`. A mount point that is not mounted, another file
/// system, and a busy mount are each explained.
pub(crate) fn umount(mountpoint: &Path) -> Result<()> {
    let shown = mountpoint.display();
    if let Err(e) = std::fs::symlink_metadata(mountpoint) {
        if e.kind() == std::io::ErrorKind::NotFound {
            bail!("{shown} does not exist, so nothing is mounted there");
        }
    }
    let path = resolve(mountpoint)?;
    let all = mounts()?;
    let Some(entry) = all.iter().rev().find(|m| m.mountpoint == path) else {
        // Inside a vma mount, rather than its mount point?
        if let Some(outer) = all
            .iter()
            .rev()
            .find(|m| m.is_vma() && path.starts_with(&m.mountpoint))
        {
            bail!(
                "{shown} is not a mount point; it lies in the vma mount {} (`vma umount {}` unmounts that)",
                outer.mountpoint.display(),
                outer.mountpoint.display()
            );
        }
        bail!("{shown} is not mounted (nothing to unmount)");
    };
    if !entry.is_vma() {
        bail!(
            "{shown} is a {} mount of {}, not one made by `vma mount`: vma umount leaves it alone (use umount(8) if you mean it)",
            entry.fstype,
            entry.source
        );
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| anyhow!("mount point contains a NUL byte"))?;
    // SAFETY: c is a NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EBUSY) => Err(busy(mountpoint, &path)),
        Some(libc::EINVAL) => bail!("{shown} is not mounted (nothing to unmount)"),
        Some(libc::EPERM | libc::EACCES) => {
            // SAFETY: getuid has no preconditions.
            let me = unsafe { libc::getuid() };
            match entry.owner {
                Some(owner) if owner != me => bail!(
                    "{shown} was mounted by user {owner}: only that user or root can unmount it"
                ),
                _ => fusermount_unmount(mountpoint, &path),
            }
        }
        _ => Err(err).with_context(|| format!("unmounting {shown}")),
    }
}

/// Unmount through the setuid helper, as a user who is not root must.
fn fusermount_unmount(shown: &Path, path: &Path) -> Result<()> {
    if find_in_path(FUSERMOUNT).is_none() {
        bail!(
            "unmounting {}: only root may unmount it with the system call, and {FUSERMOUNT} (package fuse3), which lets its owner unmount it, is not installed",
            shown.display()
        );
    }
    let out = Command::new(FUSERMOUNT)
        .arg("-u")
        .arg("--")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {FUSERMOUNT} -u"))?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr);
    if msg.contains("busy") {
        return Err(busy(shown, path));
    }
    let msg = msg.trim();
    let msg = msg
        .strip_prefix(&format!("{FUSERMOUNT}: "))
        .unwrap_or(msg)
        .to_string();
    bail!(
        "unmounting {}: {FUSERMOUNT}: {msg} (a mount can be unmounted by the user who mounted it, or by root)",
        shown.display()
    )
}

/// The error for a busy mount, naming the processes that hold it.
fn busy(shown: &Path, path: &Path) -> anyhow::Error {
    let holders = holders(path);
    let shown = shown.display();
    if holders.is_empty() {
        let hint = if unprivileged() {
            "no process of yours holds it; another user's may (root sees them all)"
        } else {
            "no process holding it could be found: a mount inside it, or a process in another mount namespace, may hold it"
        };
        return anyhow!("{shown} is busy ({hint}); try again when it is no longer in use");
    }
    let list: Vec<String> = holders
        .iter()
        .map(|h| format!("process {} ({}: {})", h.pid, h.command, h.what))
        .collect();
    anyhow!(
        "{shown} is busy: in use by {}; end them (or leave the directory) and run `vma umount {shown}` again",
        list.join(", ")
    )
}

/// A process holding something under a mount point.
struct Holder {
    pid: u32,
    command: String,
    what: String,
}

/// Processes whose working directory, root, or open files lie under `path`
/// (those this user may look at).
fn holders(path: &Path) -> Vec<Holder> {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let under = |target: &Path| target == path || target.starts_with(path);
    let mut out = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let dir = entry.path();
        let mut what = Vec::new();
        for (link, name) in [("cwd", "working directory"), ("root", "root directory")] {
            if std::fs::read_link(dir.join(link)).is_ok_and(|t| under(&t)) {
                what.push(name.to_string());
            }
        }
        if let Ok(fds) = std::fs::read_dir(dir.join("fd")) {
            for fd in fds.flatten() {
                if let Ok(t) = std::fs::read_link(fd.path()) {
                    if under(&t) {
                        what.push(format!("open file {}", t.display()));
                    }
                }
            }
        }
        if what.is_empty() {
            continue;
        }
        let command = std::fs::read_to_string(dir.join("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into());
        out.push(Holder {
            pid,
            command,
            what: what.join(", "),
        });
    }
    out.sort_by_key(|h| h.pid);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let line =
            b"36 35 98:0 / /mnt/my\\040backup rw,noatime master:1 - fuse.vma vma ro,user_id=0";
        let e = parse_mountinfo_line(line).unwrap();
        assert_eq!(e.mountpoint, Path::new("/mnt/my backup"));
        assert_eq!(e.fstype, "fuse.vma");
        assert_eq!(e.source, "vma");
        assert_eq!(e.owner, Some(0));
        assert!(e.is_vma());
        let ext4 = b"40 1 7:0 / /mnt/loop rw,relatime shared:5 - ext4 /dev/loop0 rw";
        let e = parse_mountinfo_line(ext4).unwrap();
        assert_eq!(e.fstype, "ext4");
        assert!(!e.is_vma());
        assert_eq!(parse_mountinfo_line(b""), None);
        assert_eq!(unescape(b"a\\134b\\"), b"a\\b\\");
    }
}
