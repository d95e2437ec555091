//! Disk image arguments as commands take them: `[format=F:][NAME=]PATH`
//! (the format prefix is the one of Proxmox's `vma` device maps), parsed
//! and opened in one place for every command that reads images.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::source::{open_source, DiskImage, ImageFormat};
use crate::error::{Error, Result};
use crate::format::{check_name, limits, DriveInfo};
use crate::types::DriveId;

/// Split a `format=F:` prefix off `arg`: the format when given, and the
/// rest. An argument that names an existing file as a whole is a path.
pub fn split_format(arg: &str) -> Result<(Option<ImageFormat>, &str)> {
    if !Path::new(arg).exists() {
        if let Some((f, tail)) = arg
            .strip_prefix("format=")
            .and_then(|r| r.split_once(':'))
            .filter(|(f, _)| !f.contains('/'))
        {
            let format = ImageFormat::parse(f).ok_or_else(|| {
                Error::Invalid(format!(
                    "{arg:?}: unknown image format {f:?} (formats: raw, qcow2)"
                ))
            })?;
            return Ok((Some(format), tail));
        }
    }
    Ok((None, arg))
}

/// Split `[NAME=]PATH`; the name part must be non-empty and without `/`,
/// and an argument that names an existing file as a whole is a path.
pub fn split_named(arg: &str) -> (Option<String>, PathBuf) {
    if let Some((name, path)) = arg.split_once('=') {
        if !name.is_empty() && !name.contains('/') && !Path::new(arg).exists() {
            return (Some(name.to_string()), PathBuf::from(path));
        }
    }
    (None, PathBuf::from(arg))
}

/// A checked member name and path from `[NAME=]PATH`; without NAME,
/// `default` derives it from the path (file stem for drives, file name
/// for configs). `what` names the member in errors ("drive", "config").
pub fn named_arg(
    arg: &str,
    what: &str,
    default: fn(&Path) -> Option<&OsStr>,
) -> Result<(String, PathBuf)> {
    let (name, path) = split_named(arg);
    let name = match name {
        Some(n) => n,
        None => default(&path)
            .map(|s| s.to_string_lossy().into_owned())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "cannot derive a {what} name from {arg:?}; use NAME={arg}"
                ))
            })?,
    };
    check_name(&name)
        .map_err(|e| Error::Invalid(format!("{what} name for {}: {e}", path.display())))?;
    Ok((name, path))
}

/// A parsed disk image argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageArg {
    /// The format, when given (else found from the image, see
    /// [`open_source`]).
    pub format: Option<ImageFormat>,
    /// The drive's name (given, or the file stem).
    pub name: String,
    /// The image's path.
    pub path: PathBuf,
}

impl ImageArg {
    /// Parse `[format=F:][NAME=]PATH`.
    pub fn parse(arg: &str) -> Result<ImageArg> {
        let (format, rest) = split_format(arg)?;
        let (name, path) = named_arg(rest, "drive", Path::file_stem)?;
        Ok(ImageArg { format, name, path })
    }
}

/// Disk images opened as the drives of a new archive, ids 1, 2, ... in
/// argument order.
pub struct OpenedImages {
    /// One per image, in order.
    pub drives: Vec<DriveInfo>,
    /// The images, in the same order.
    pub images: Vec<Box<dyn DiskImage>>,
}

/// Parse and open every image argument (backing files only as
/// `allow_backing` permits), handing each warning an image comes with to
/// `warn`. Refuses more images than an archive holds drives.
pub fn open_images(
    args: &[String],
    allow_backing: &[PathBuf],
    warn: &mut dyn FnMut(&str),
) -> Result<OpenedImages> {
    if args.len() > limits::MAX_DRIVES {
        return Err(Error::Invalid(format!(
            "{} images given; an archive holds at most {} drives",
            args.len(),
            limits::MAX_DRIVES
        )));
    }
    let mut out = OpenedImages {
        drives: Vec::with_capacity(args.len()),
        images: Vec::with_capacity(args.len()),
    };
    for (i, arg) in args.iter().enumerate() {
        let a = ImageArg::parse(arg)?;
        let opened = open_source(&a.path, a.format, allow_backing)?;
        if let Some(w) = &opened.warning {
            warn(w);
        }
        out.drives.push(DriveInfo {
            id: DriveId(i as u8 + 1),
            name: a.name,
            size: opened.image.size(),
        });
        out.images.push(opened.image);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_arguments() {
        let a = ImageArg::parse("format=qcow2:scsi0=/nonexistent/disk.img").unwrap();
        assert_eq!(a.format, Some(ImageFormat::Qcow2));
        assert_eq!(a.name, "scsi0");
        assert_eq!(a.path, PathBuf::from("/nonexistent/disk.img"));
        let a = ImageArg::parse("/nonexistent/disk.img").unwrap();
        assert_eq!((a.format, a.name.as_str()), (None, "disk"));
        let e = ImageArg::parse("format=vdi:/x").unwrap_err().to_string();
        assert!(e.contains("unknown image format"), "{e}");
        let e = ImageArg::parse("..=/y").unwrap_err().to_string();
        assert!(e.contains("drive name for"), "{e}");
        assert!(split_named("a/b=c").0.is_none());
    }
}
