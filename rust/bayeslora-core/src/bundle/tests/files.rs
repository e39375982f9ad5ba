//! Special files (FIFOs, devices, directories, symlinks to them), reads capped by the bytes read,
//! and files truncated before or while a bundle is opened.

use std::path::Path;

use super::{Fixture, CONFIG_FILE, META_FILE, WEIGHTS_FILE};
use crate::bundle::Bundle;
use crate::error::Error;

/// `Bundle::open` of `dir` on another thread: its result, or a panic after 10 s (a hang).
fn open_within_10s(dir: &Path) -> crate::Result<Bundle> {
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(Bundle::open(&dir));
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("Bundle::open hung on a special file")
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

#[cfg(unix)]
#[test]
fn special_files_are_refused_without_blocking() {
    for name in [META_FILE, CONFIG_FILE, WEIGHTS_FILE] {
        // a FIFO (no writer: opening it for reading would block forever)
        let dir = tempfile::tempdir().expect("temp dir");
        Fixture::valid().write(dir.path());
        let path = dir.path().join(name);
        std::fs::remove_file(&path).expect("remove");
        mkfifo(&path);
        let e = open_within_10s(dir.path()).expect_err("a FIFO");
        assert!(
            matches!(&e, Error::NotRegularFile { path, what } if path.ends_with(name) && *what == "a FIFO"),
            "{name}: {e:?}"
        );
        assert!(e.to_string().contains("not a regular file"), "{e}");
        // a symlink to a FIFO, and a symlink to /dev/zero (endless)
        for (target, what) in [
            (dir.path().join(name), "a FIFO"),
            ("/dev/zero".into(), "a character device"),
        ] {
            let other = tempfile::tempdir().expect("temp dir");
            Fixture::valid().write(other.path());
            let link = other.path().join(name);
            std::fs::remove_file(&link).expect("remove");
            std::os::unix::fs::symlink(&target, &link).expect("symlink");
            let e = open_within_10s(other.path()).expect_err("a special file");
            assert!(
                matches!(&e, Error::NotRegularFile { what: w, .. } if *w == what),
                "{name} -> {}: {e:?}",
                target.display()
            );
        }
        // a Unix socket
        let other = tempfile::tempdir().expect("temp dir");
        Fixture::valid().write(other.path());
        std::fs::remove_file(other.path().join(name)).expect("remove");
        let _listener =
            std::os::unix::net::UnixListener::bind(other.path().join(name)).expect("bind");
        let e = open_within_10s(other.path()).expect_err("a socket");
        assert!(
            matches!(&e, Error::NotRegularFile { what, .. } if *what == "a socket"),
            "{name}: {e:?}"
        );
        // a directory
        let other = tempfile::tempdir().expect("temp dir");
        Fixture::valid().write(other.path());
        std::fs::remove_file(other.path().join(name)).expect("remove");
        std::fs::create_dir(other.path().join(name)).expect("mkdir");
        let e = open_within_10s(other.path()).expect_err("a directory");
        assert!(
            matches!(&e, Error::NotRegularFile { what, .. } if *what == "a directory"),
            "{name}: {e:?}"
        );
    }
}

#[cfg(target_os = "linux")]
#[test]
fn reads_are_capped_by_the_bytes_read_not_the_metadata() {
    // /proc files say 0 bytes in their metadata but have contents
    let status = Path::new("/proc/self/status");
    assert_eq!(std::fs::metadata(status).expect("proc").len(), 0);
    let e = crate::bundle::files::read_capped(status, 16).expect_err("over the cap");
    assert!(matches!(&e, Error::FileSize { .. }), "{e:?}");
    assert!(crate::bundle::files::read_capped(status, 1 << 20).is_ok_and(|b| b.len() > 16));
    // a file whose size changes while it is read (here: grows past its metadata's 0 bytes)
    let e = crate::bundle::files::read_exact(status, 1 << 20).expect_err("size changed");
    assert!(
        matches!(&e, Error::FileSize { detail, .. } if detail.contains("changed size")),
        "{e:?}"
    );
}

#[test]
fn truncated_or_oversized_files_are_bundle_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let f = Fixture::valid();
    f.write(dir.path());
    let weights = std::fs::read(dir.path().join(WEIGHTS_FILE)).expect("read");
    for keep in [0, 4, 8, 20, weights.len() / 2, weights.len() - 1] {
        std::fs::write(dir.path().join(WEIGHTS_FILE), &weights[..keep]).expect("write");
        let e = Bundle::open(dir.path()).expect_err("truncated");
        assert_eq!(e.kind(), crate::ErrorKind::Bundle, "{keep}: {e:?}");
    }
    f.write(dir.path());
    // a JSON file over 64 MiB is refused (sparse: no disk used)
    let file = std::fs::File::create(dir.path().join(CONFIG_FILE)).expect("create");
    file.set_len(crate::bundle::MAX_JSON_BYTES + 1)
        .expect("set_len");
    let e = Bundle::open(dir.path()).expect_err("too large");
    assert!(matches!(&e, Error::FileSize { .. }), "{e:?}");
}

#[test]
fn a_file_truncated_while_loading_is_an_error_not_a_signal() {
    let dir = tempfile::tempdir().expect("temp dir");
    Fixture::valid().write(dir.path());
    let path = dir.path().join(WEIGHTS_FILE);
    let weights = std::fs::read(&path).expect("read");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, path, weights) = (stop.clone(), path.clone(), weights.clone());
        std::thread::spawn(move || {
            use std::sync::atomic::Ordering;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // rewrite in place, then cut it short: readers see every size in between
                std::fs::write(&path, &weights).expect("write");
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open");
                f.set_len((i * 37 % weights.len()) as u64)
                    .expect("truncate");
                i += 1;
            }
        })
    };
    for _ in 0..300 {
        if let Err(e) = Bundle::open(dir.path()) {
            assert_eq!(e.kind(), crate::ErrorKind::Bundle, "{e:?}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("writer");
}
