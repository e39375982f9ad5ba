//! Reading a bundle's files: only regular files (symlinks followed), opened without blocking,
//! read with a cap on the bytes actually read, never memory-mapped.
//!
//! - A FIFO, a device (`/dev/zero`), a socket or a directory in place of a file is refused from
//!   its metadata before it is opened, and again from the opened file's metadata (the path may
//!   have been replaced in between); the open itself uses `O_NONBLOCK`, so even a FIFO swapped in
//!   at that moment cannot block it.
//! - The size in the metadata is not trusted: at most `cap + 1` bytes are read, and more than
//!   `cap` is an error ([`Error::FileSize`]).
//! - [`read_exact`] also compares the bytes read with the size the opened file had: a file
//!   truncated or grown while it is read is an error, not a `SIGBUS` as with a memory map.

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a non-regular file is, for messages.
fn describe(md: &Metadata) -> &'static str {
    let ft = md.file_type();
    if ft.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

fn check_regular(path: &Path, md: &Metadata) -> Result<()> {
    if md.is_file() {
        Ok(())
    } else {
        Err(Error::NotRegularFile {
            path: path.to_path_buf(),
            what: describe(md),
        })
    }
}

/// `path` opened for reading if it is a regular file, with its size when opened.
fn open_regular(path: &Path) -> Result<(File, u64)> {
    check_regular(path, &std::fs::metadata(path).map_err(io_err(path))?)?;
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // no effect on a regular file; a FIFO swapped in after the check opens without waiting
        // for a writer (and is then refused below)
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(io_err(path))?;
    let md = file.metadata().map_err(io_err(path))?;
    check_regular(path, &md)?;
    Ok((file, md.len()))
}

fn too_large(path: &Path, size: u64, cap: u64) -> Error {
    Error::FileSize {
        path: path.to_path_buf(),
        detail: format!("{size} bytes or more is too large (the limit is {cap} bytes)"),
    }
}

/// Read `file` (of `size` bytes by its metadata) to its end, at most `cap + 1` bytes.
fn read_capped_from(path: &Path, file: File, size: u64, cap: u64) -> Result<Vec<u8>> {
    if size > cap {
        return Err(too_large(path, size, cap));
    }
    let mut buf = Vec::new();
    let want = usize::try_from(size).map_err(|_| too_large(path, size, cap))?;
    buf.try_reserve_exact(want)
        .map_err(|_| too_large(path, size, cap))?;
    file.take(cap.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    let read = u64::try_from(buf.len()).unwrap_or(u64::MAX);
    if read > cap {
        return Err(too_large(path, read, cap));
    }
    Ok(buf)
}

/// The bytes of the regular file at `path`, at most `cap` of them (more is an error, whatever
/// its metadata says).
pub(super) fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    let (file, size) = open_regular(path)?;
    read_capped_from(path, file, size, cap)
}

/// The bytes of the regular file at `path`, exactly as many as its size when opened (at most
/// `cap`): a file that shrinks or grows while it is read is an error.
pub(super) fn read_exact(path: &Path, cap: u64) -> Result<Vec<u8>> {
    let (file, size) = open_regular(path)?;
    let buf = read_capped_from(path, file, size, cap)?;
    let read = u64::try_from(buf.len()).unwrap_or(u64::MAX);
    if read != size {
        return Err(Error::FileSize {
            path: path.to_path_buf(),
            detail: format!("changed size while being read: {size} bytes when opened, {read} read"),
        });
    }
    Ok(buf)
}
