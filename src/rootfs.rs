//! Per-sandbox root disks: a private, writable copy of the base image.
//!
//! The copy is a reflink when the filesystem shares extents (XFS, Btrfs), which costs no data
//! I/O. Elsewhere (ext4) it is a sparse copy: only the extents that hold data are copied, with
//! `copy_file_range`, and holes stay holes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Errors of making a disk; each names the files involved.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The base image could not be read.
    #[error("cannot open base image {path}: {source}")]
    OpenBase {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The copy could not be made.
    #[error("cannot copy {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How a disk was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneMethod {
    Reflink,
    SparseCopy,
}

// Value from linux/fs.h: _IOW(0x94, 9, int).
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Makes `dest` a private copy of `base`. `dest` must not exist; if the copy fails after
/// `dest` was created, it is removed again.
pub fn clone_disk(base: &Path, dest: &Path) -> Result<CloneMethod, RootfsError> {
    let src = File::open(base).map_err(|source| RootfsError::OpenBase {
        path: base.to_path_buf(),
        source,
    })?;
    let copy_err = |source| RootfsError::Copy {
        from: base.to_path_buf(),
        to: dest.to_path_buf(),
        source,
    };
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(copy_err)?;

    let result = fill(&src, &dst);
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result.map_err(copy_err)
}

fn fill(src: &File, dst: &File) -> io::Result<CloneMethod> {
    // SAFETY: both fds are open for the duration of the call; FICLONE takes the source fd by
    // value and touches no user memory.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(CloneMethod::Reflink);
    }

    let len = src.metadata()?.len();
    dst.set_len(len)?;
    copy_data_extents(src, dst, len)?;
    Ok(CloneMethod::SparseCopy)
}

/// Copies every data extent of `src` into the same offsets of `dst`, skipping holes.
fn copy_data_extents(src: &File, dst: &File, len: u64) -> io::Result<()> {
    let mut offset: i64 = 0;
    let end = len as i64;
    while offset < end {
        // SAFETY: lseek on an open fd; no memory is passed.
        let data = unsafe { libc::lseek(src.as_raw_fd(), offset, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                return Ok(()); // Only a hole remains.
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }

        let mut from = data;
        let mut to = data;
        while from < hole {
            let want = (hole - from) as usize;
            // SAFETY: both offsets are valid i64 locations owned by this frame, and the fds
            // stay open for the call.
            let copied = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut from,
                    dst.as_raw_fd(),
                    &mut to,
                    want,
                    0,
                )
            };
            if copied < 0 {
                return Err(io::Error::last_os_error());
            }
            if copied == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "base image shrank while copying",
                ));
            }
        }
        offset = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("manta-rootfs-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = scratch_dir("sparse");
        let base = dir.join("base.img");
        let mut f = File::create(&base).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(b"first extent").unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(&[0xAB; 8192]).unwrap();
        drop(f);

        let dest = dir.join("copy.img");
        clone_disk(&base, &dest).unwrap();

        let mut a = Vec::new();
        let mut b = Vec::new();
        File::open(&base).unwrap().read_to_end(&mut a).unwrap();
        File::open(&dest).unwrap().read_to_end(&mut b).unwrap();
        assert_eq!(a.len(), b.len());
        assert!(a == b, "copy differs from base");
        let blocks_bytes = std::fs::metadata(&dest).unwrap().blocks() * 512;
        assert!(
            blocks_bytes < 4 << 20,
            "copy is not sparse: {blocks_bytes} bytes allocated"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn existing_destination_is_refused_and_kept() {
        let dir = scratch_dir("exists");
        let base = dir.join("base.img");
        std::fs::write(&base, b"base").unwrap();
        let dest = dir.join("copy.img");
        std::fs::write(&dest, b"someone else's").unwrap();
        let err = clone_disk(&base, &dest).unwrap_err();
        assert!(err.to_string().contains("copy.img"), "{err}");
        assert_eq!(std::fs::read(&dest).unwrap(), b"someone else's");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_base_names_the_path() {
        let dir = scratch_dir("missing");
        let err = clone_disk(&dir.join("nope.img"), &dir.join("copy.img")).unwrap_err();
        assert!(err.to_string().contains("nope.img"), "{err}");
        assert!(!dir.join("copy.img").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Copies of the base image made ahead of time, so that create only renames one into place.
///
/// On ext4 a copy costs hundreds of milliseconds, most of a sandbox's own create overhead;
/// keeping a few ready moves that cost off the request path. The pool lives in one directory
/// on the same filesystem as the sandboxes, so taking a copy is a `rename`.
///
/// Limitation: copies are made from the base image as it was when they were made; replacing
/// `rootfs.ext4` under a running server leaves up to `target` sandboxes on the old image.
#[derive(Debug)]
pub struct DiskPool {
    base: PathBuf,
    dir: PathBuf,
    target: usize,
    ready: std::sync::Mutex<Vec<PathBuf>>,
    refilling: std::sync::atomic::AtomicBool,
    serial: std::sync::atomic::AtomicU64,
}

/// How a sandbox got its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskSource {
    /// A ready copy from the pool.
    Pool,
    /// Copied on the spot (pool empty or disabled).
    Copied(CloneMethod),
}

impl DiskSource {
    pub fn name(self) -> &'static str {
        match self {
            DiskSource::Pool => "pool",
            DiskSource::Copied(CloneMethod::Reflink) => "reflink",
            DiskSource::Copied(CloneMethod::SparseCopy) => "sparse_copy",
        }
    }
}

impl DiskPool {
    /// A pool of `target` copies of `base` in `dir`. Anything already in `dir` is removed:
    /// a copy left by an earlier run may be half-written.
    pub fn new(base: &Path, dir: &Path, target: usize) -> io::Result<DiskPool> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        Ok(DiskPool {
            base: base.to_path_buf(),
            dir: dir.to_path_buf(),
            target,
            ready: std::sync::Mutex::new(Vec::new()),
            refilling: std::sync::atomic::AtomicBool::new(false),
            serial: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Puts a private copy of the base image at `dest`: a ready one if there is one (a rename),
    /// else a fresh copy. `dest` must be on the pool's filesystem and must not exist.
    pub fn take(&self, dest: &Path) -> Result<DiskSource, RootfsError> {
        let ready = self.ready.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(copy) = ready {
            if std::fs::rename(&copy, dest).is_ok() {
                return Ok(DiskSource::Pool);
            }
            let _ = std::fs::remove_file(&copy);
        }
        clone_disk(&self.base, dest).map(DiskSource::Copied)
    }

    /// Makes copies until `target` are ready. Only one refill runs at a time; a call while one
    /// runs returns at once. Blocking: run it on a blocking thread.
    pub fn refill(&self) -> Result<(), RootfsError> {
        use std::sync::atomic::Ordering;
        if self.refilling.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let result = (|| {
            while self.ready_count() < self.target {
                let n = self.serial.fetch_add(1, Ordering::SeqCst);
                let copy = self.dir.join(format!("disk-{n}.ext4"));
                clone_disk(&self.base, &copy)?;
                self.ready
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(copy);
            }
            Ok(())
        })();
        self.refilling.store(false, Ordering::SeqCst);
        result
    }

    pub fn ready_count(&self) -> usize {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Deletes every ready copy (at shutdown).
    pub fn drain(&self) {
        for copy in self
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = std::fs::remove_file(copy);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    #[test]
    fn pool_hands_out_private_copies_then_falls_back_to_copying() {
        let dir = std::env::temp_dir().join(format!("manta-diskpool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.img");
        std::fs::write(&base, b"pristine").unwrap();

        let pool = DiskPool::new(&base, &dir.join("pool"), 2).unwrap();
        pool.refill().unwrap();
        assert_eq!(pool.ready_count(), 2);

        let first = dir.join("a.img");
        assert_eq!(pool.take(&first).unwrap(), DiskSource::Pool);
        std::fs::write(&first, b"changed by guest").unwrap();
        let second = dir.join("b.img");
        assert_eq!(pool.take(&second).unwrap(), DiskSource::Pool);
        assert_eq!(std::fs::read(&second).unwrap(), b"pristine");
        let third = dir.join("c.img");
        assert!(matches!(pool.take(&third).unwrap(), DiskSource::Copied(_)));
        assert_eq!(std::fs::read(&third).unwrap(), b"pristine");

        pool.refill().unwrap();
        pool.drain();
        assert!(!dir.join("pool").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
