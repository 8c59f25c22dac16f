//! Network namespaces as files, and running code inside one of them.
//!
//! Namespaces netd owns are nsfs bind mounts at `<run_dir>/netns/<name>` (the layout `ip netns`
//! uses under `/var/run/netns`). Namespaces are per thread (STYLE rule 6): code that must run
//! inside a namespace runs on a short-lived scoped thread that `setns`es first; the calling
//! thread's namespace never changes. Sockets created there stay bound to that namespace.
//!
//! Invariants: every mount made here goes into the mount namespace netd runs in (no private
//! mount namespace: the mounts must be visible to other runtimes and survive netd's threads);
//! a file under the directory that is not an nsfs mount (a leftover of a crash between
//! "create file" and "mount") is listed and can be deleted.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// Runs `f` on a fresh thread that has entered the network namespace `ns` first. The caller's
/// thread is untouched. A panic in `f` is propagated.
pub fn run_in<T: Send>(
    ns: impl AsFd + Send,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|s| {
        let handle = s.spawn(move || {
            nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            f()
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// The directory that holds namespace files.
pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("netns")
}

/// Whether `path` is an nsfs mount (a live namespace reference), not a plain file.
pub fn is_nsfs(path: &Path) -> io::Result<bool> {
    let st = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(st.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Creates an empty mount target, `mkdir -p` of its directory first. An existing plain file
/// (leftover of a crash) is reused; an existing nsfs mount is `EEXIST`.
fn prepare_target(path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if is_nsfs(path)? {
                Err(io::Error::from_raw_os_error(libc::EEXIST))
            } else {
                Ok(())
            }
        }
        Err(e) => Err(e),
    }
}

fn bind(from: &Path, to: &Path) -> io::Result<()> {
    nix::mount::mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(io::Error::from)
}

/// Creates a new network namespace and pins it at `path`.
pub fn create(path: &Path) -> io::Result<()> {
    prepare_target(path)?;
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            // unshare(CLONE_NEWNET) affects only this thread; the thread still shares the
            // process's mount namespace, so the bind mount below is visible to everyone.
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            // /proc/self would name the main thread's namespace; thread-self is this one.
            bind(Path::new("/proc/thread-self/ns/net"), path)
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    if result.is_err() {
        // Best effort: do not leave an empty target behind for a failed create.
        let _ignored = std::fs::remove_file(path);
    }
    result
}

/// Pins an existing namespace file (another runtime's) at `path`.
pub fn bind_existing(from: &Path, path: &Path) -> io::Result<()> {
    if !is_nsfs(from)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a network namespace file", from.display()),
        ));
    }
    prepare_target(path)?;
    let result = bind(from, path);
    if result.is_err() {
        let _ignored = std::fs::remove_file(path);
    }
    result
}

/// Unmounts (lazily) and removes the file at `path`. `ENOENT` when there is no file.
pub fn remove(path: &Path) -> io::Result<()> {
    std::fs::symlink_metadata(path)?;
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) => {}
        // EINVAL: not a mount point, i.e. a plain file left over by a crash.
        Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(e.into()),
    }
    std::fs::remove_file(path)
}

/// File names in the namespace directory (missing directory: none).
pub fn list(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str() {
            out.push(name.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// Opens a namespace file for `setns` or `IFLA_NET_NS_FD`.
pub fn open(path: &Path) -> io::Result<File> {
    let f = File::open(path)?;
    // An unmounted leftover is a plain file: setns on it would fail with EINVAL, which reads
    // as "bad request"; say what it is instead.
    if !is_nsfs(path)? {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    Ok(f)
}

/// Reads `/proc/sys/<key>` as seen from the namespace `ns`. Net sysctls resolve against the
/// network namespace of the thread that opens the file, so the open happens inside `ns`.
pub fn read_sysctl(ns: impl AsFd + Send, key: &str) -> io::Result<String> {
    let path = sysctl_path(key)?;
    run_in(ns, move || {
        std::fs::read_to_string(&path).map(|s| s.trim_end().to_string())
    })
}

/// Writes `/proc/sys/<key>` as seen from the namespace `ns`.
pub fn write_sysctl(ns: impl AsFd + Send, key: &str, value: &str) -> io::Result<()> {
    let path = sysctl_path(key)?;
    run_in(ns, move || {
        // Open without O_CREAT: a missing key must stay NotFound.
        let mut f = std::fs::OpenOptions::new().write(true).open(&path)?;
        io::Write::write_all(&mut f, value.as_bytes())
    })
}

fn sysctl_path(key: &str) -> io::Result<PathBuf> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("sysctl key {key:?} must look like net/ipv4/ip_forward"),
        ));
    }
    Ok(Path::new("/proc/sys").join(key))
}

/// Opens the namespace files behind an [`NsRef`](crate::port::NsRef): the node namespace is the
/// one netd was started in (opened once, at construction, on the constructing thread), owned
/// ones are files under `<run_dir>/netns/`. Shared by the ports that keep a socket per namespace.
#[derive(Debug)]
pub struct NsFiles {
    run_dir: PathBuf,
    node: File,
}

impl NsFiles {
    /// `NsRef::Node` will be the namespace of the calling thread.
    pub fn new(run_dir: impl Into<PathBuf>) -> crate::port::PortResult<Self> {
        let node = File::open("/proc/thread-self/ns/net").map_err(|e| {
            crate::port::PortError::io("open node netns", "/proc/thread-self/ns/net", e)
        })?;
        Ok(Self {
            run_dir: run_dir.into(),
            node,
        })
    }

    /// A new handle on the namespace `ns`.
    pub fn open(&self, ns: &crate::port::NsRef) -> crate::port::PortResult<File> {
        let file = match ns {
            crate::port::NsRef::Node => self.node.try_clone(),
            crate::port::NsRef::Owned(name) => open(&dir(&self.run_dir).join(name.as_str())),
        };
        file.map_err(|e| crate::port::PortError::io("open netns", ns.to_string(), e))
    }
}
