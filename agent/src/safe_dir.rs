//! A directory the agent keeps root-only data in (the state directory and
//! its `scripts/`): opened once without following links, checked to be a
//! directory owned by the running user with mode 0700 (repaired when it
//! can be, refused when it cannot), and every file in it opened relative
//! to that open directory, never through a link, with its type and size
//! checked before it is read.
//!
//! The agent runs as root: a state directory that others can write, or a
//! planted link (`.state.json.tmp -> /etc/shadow`), would let them make
//! root overwrite any file, or hand it a FIFO or /dev/zero to hang on.

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

const DIR_MODE: u32 = 0o700;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SafeDirError {
    #[error("{}: {reason}", path.display())]
    Unusable { path: PathBuf, reason: String },
}

fn unusable(path: &Path, reason: impl Into<String>) -> SafeDirError {
    SafeDirError::Unusable {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Why a file in the directory could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    #[error("is a symbolic link")]
    Link,
    #[error("is not a regular file (a {0})")]
    NotRegular(&'static str),
    #[error("is larger than {} KiB", .0 / 1024)]
    TooLarge(usize),
    /// Left by another user (a directory taken over from them): its
    /// content is not trusted.
    #[error("is owned by uid {0}, not by the agent's user")]
    Foreign(u32),
    #[error("cannot be read: {0}")]
    Io(String),
}

fn kind(st: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => "regular file",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFLNK => "symbolic link",
        _ => "special file",
    }
}

fn is(st: &FileStat, what: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == what
}

#[derive(Debug)]
pub struct SafeDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl SafeDir {
    /// Creates the directory (0700, and any missing parents) or takes the
    /// existing one, repairing its mode and owner; refuses a link or
    /// anything that is not a directory, and an owner it cannot take over.
    pub fn create_or_repair(path: &Path) -> Result<Self, SafeDirError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| unusable(parent, format!("cannot be created: {e}")))?;
        }
        match std::fs::DirBuilder::new().create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(unusable(path, format!("cannot be created: {e}"))),
        }
        let dir = Self::open(path)?;
        dir.repair()?;
        Ok(dir)
    }

    /// The existing directory, as it is (for readers such as `status`,
    /// which change nothing); `None` when there is none.
    pub fn existing(path: &Path) -> Result<Option<Self>, SafeDirError> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            _ => Self::open(path).map(Some),
        }
    }

    fn open(path: &Path) -> Result<Self, SafeDirError> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(unusable(
                path,
                "is a symbolic link; refusing to follow it (remove it, and the agent creates the directory)",
            ));
        }
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ENOTDIR => unusable(path, "is not a directory"),
            Errno::ELOOP => unusable(path, "is a symbolic link; refusing to follow it"),
            e => unusable(path, format!("cannot be opened: {e}")),
        })?;
        Ok(Self {
            fd,
            path: path.to_owned(),
        })
    }

    /// Mode 0700 and owned by the running user, or an error saying why it
    /// cannot be made so.
    fn repair(&self) -> Result<(), SafeDirError> {
        let st = fstat(&self.fd).map_err(|e| unusable(&self.path, e.to_string()))?;
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        if st.st_uid != uid.as_raw() {
            std::os::unix::fs::fchown(&self.fd, Some(uid.as_raw()), Some(gid.as_raw())).map_err(
                |e| {
                    unusable(
                        &self.path,
                        format!(
                            "is owned by uid {}, not by the agent's user (uid {uid}), and cannot be taken over: {e}",
                            st.st_uid
                        ),
                    )
                },
            )?;
            tracing::warn!(
                "{} was owned by uid {}; now owned by uid {uid}",
                self.path.display(),
                st.st_uid
            );
        }
        if st.st_mode & 0o7777 != DIR_MODE {
            fchmod(&self.fd, Mode::from_bits_truncate(DIR_MODE)).map_err(|e| {
                unusable(&self.path, format!("its mode cannot be set to 0700: {e}"))
            })?;
            tracing::warn!(
                "{} had mode {:04o}; now 0700",
                self.path.display(),
                st.st_mode & 0o7777
            );
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A subdirectory, created 0700 if missing, held to the same rules.
    pub fn subdir(&self, name: &str) -> Result<SafeDir, SafeDirError> {
        let path = self.path.join(name);
        match nix::sys::stat::mkdirat(&self.fd, name, Mode::from_bits_truncate(DIR_MODE)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(unusable(&path, format!("cannot be created: {e}"))),
        }
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ENOTDIR => unusable(&path, "is not a directory"),
            Errno::ELOOP => unusable(&path, "is a symbolic link; refusing to follow it"),
            e => unusable(&path, format!("cannot be opened: {e}")),
        })?;
        let dir = SafeDir { fd, path };
        dir.repair()?;
        Ok(dir)
    }

    fn open_at(&self, name: &str, flags: OFlag, mode: u32) -> nix::Result<File> {
        openat(
            &self.fd,
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map(File::from)
    }

    /// Reads a regular file of at most `max` bytes; `None` when it does
    /// not exist. Never follows a link, never blocks on a FIFO, never
    /// reads more than `max + 1` bytes whatever the file claims.
    pub fn read(&self, name: &str, max: usize) -> Result<Option<Vec<u8>>, ReadError> {
        let mut f = match self.open_at(name, OFlag::O_RDONLY | OFlag::O_NONBLOCK, 0) {
            Ok(f) => f,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => return Err(ReadError::Link),
            Err(e) => return Err(ReadError::Io(e.to_string())),
        };
        let st = fstat(f.as_fd()).map_err(|e| ReadError::Io(e.to_string()))?;
        if !is(&st, SFlag::S_IFREG) {
            return Err(ReadError::NotRegular(kind(&st)));
        }
        if st.st_uid != nix::unistd::geteuid().as_raw() {
            return Err(ReadError::Foreign(st.st_uid));
        }
        if st.st_size as u64 > max as u64 {
            return Err(ReadError::TooLarge(max));
        }
        let mut bytes = Vec::new();
        (&mut f)
            .take(max as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ReadError::Io(e.to_string()))?;
        if bytes.len() > max {
            return Err(ReadError::TooLarge(max));
        }
        Ok(Some(bytes))
    }

    /// Replaces `name` whole: a fresh temporary file (created exclusively,
    /// so a planted link or file in its place is removed, never written
    /// through), fsync, rename, fsync of the directory.
    pub fn write_atomic(&self, name: &str, tmp: &str, bytes: &[u8]) -> std::io::Result<()> {
        self.replace(name, tmp, bytes, true)
    }

    /// As [`SafeDir::write_atomic`], without the fsyncs: readers see the
    /// old file or the new one, never a mix, but a power loss may lose
    /// the write. For what is advisory (the run history), not for state.
    pub fn write_atomic_unsynced(
        &self,
        name: &str,
        tmp: &str,
        bytes: &[u8],
    ) -> std::io::Result<()> {
        self.replace(name, tmp, bytes, false)
    }

    fn replace(&self, name: &str, tmp: &str, bytes: &[u8], sync: bool) -> std::io::Result<()> {
        self.remove(tmp)?;
        let mut f = self
            .open_at(tmp, OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL, 0o600)
            .map_err(std::io::Error::from)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        drop(f);
        nix::fcntl::renameat(&self.fd, tmp, &self.fd, name).map_err(std::io::Error::from)?;
        if sync {
            nix::unistd::fsync(&self.fd).map_err(std::io::Error::from)?;
        }
        Ok(())
    }

    /// Writes a new file `name` with `mode` (any old one is removed
    /// first); the file is created exclusively in this checked directory.
    pub fn create_new(&self, name: &str, mode: u32, bytes: &[u8]) -> std::io::Result<PathBuf> {
        self.remove(name)?;
        let mut f = self
            .open_at(name, OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL, mode)
            .map_err(std::io::Error::from)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(self.path.join(name))
    }

    /// Removes `name` (the entry itself, never what a link points at);
    /// nothing there is fine.
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        match nix::unistd::unlinkat(&self.fd, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens (creating 0600) a lock file; refuses anything that is not a
    /// regular file, which a lock wait could hang on. One left by another
    /// user (who may hold a lock on it forever) is replaced by a new file.
    pub fn lock_file(&self, name: &str) -> Result<File, ReadError> {
        if let Ok(st) =
            nix::sys::stat::fstatat(&self.fd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            && is(&st, SFlag::S_IFREG)
            && st.st_uid != nix::unistd::geteuid().as_raw()
        {
            tracing::warn!(
                "{}: the lock file was left by uid {}; replacing it",
                self.path.display(),
                st.st_uid
            );
            self.remove(name)
                .map_err(|e| ReadError::Io(e.to_string()))?;
        }
        let f = self
            .open_at(
                name,
                OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NONBLOCK,
                0o600,
            )
            .map_err(|e| match e {
                Errno::ELOOP => ReadError::Link,
                e => ReadError::Io(e.to_string()),
            })?;
        let st = fstat(f.as_fd()).map_err(|e| ReadError::Io(e.to_string()))?;
        if !is(&st, SFlag::S_IFREG) {
            return Err(ReadError::NotRegular(kind(&st)));
        }
        Ok(f)
    }

    /// Moves `name` aside to `<name>.<suffix>`, or `<name>.<suffix>-2`,
    /// `-3`, …: never over an earlier one.
    pub fn set_aside(&self, name: &str, suffix: &str) -> std::io::Result<PathBuf> {
        for n in 1..=1000u32 {
            let to = if n == 1 {
                format!("{name}.{suffix}")
            } else {
                format!("{name}.{suffix}-{n}")
            };
            match rename_noreplace(&self.fd, name, &to) {
                Ok(()) => return Ok(self.path.join(to)),
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(std::io::Error::other("1000 set-aside copies exist already"))
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rename_noreplace(dir: &OwnedFd, from: &str, to: &str) -> nix::Result<()> {
    nix::fcntl::renameat2(
        dir,
        from,
        dir,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
}

/// Without renameat2: check, then rename (a race only with ourselves; the
/// lock is held).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn rename_noreplace(dir: &OwnedFd, from: &str, to: &str) -> nix::Result<()> {
    match nix::sys::stat::fstatat(dir, to, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(_) => Err(Errno::EEXIST),
        Err(Errno::ENOENT) => nix::fcntl::renameat(dir, from, dir, to),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_and_repairs_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/state");
        let dir = SafeDir::create_or_repair(&p).unwrap();
        assert_eq!(mode(&p), 0o700);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        drop(dir);
        SafeDir::create_or_repair(&p).unwrap();
        assert_eq!(mode(&p), 0o700, "repaired");
    }

    #[test]
    fn refuses_links_and_files() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        let link = d.path().join("state");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = SafeDir::create_or_repair(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let file = d.path().join("file");
        std::fs::write(&file, "").unwrap();
        let e = SafeDir::create_or_repair(&file).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    #[test]
    fn reads_only_bounded_regular_files() {
        let d = tempfile::tempdir().unwrap();
        let dir = SafeDir::create_or_repair(&d.path().join("s")).unwrap();
        assert_eq!(dir.read("missing", 10), Ok(None));
        std::fs::write(dir.path().join("small"), "12345").unwrap();
        assert_eq!(dir.read("small", 10), Ok(Some(b"12345".to_vec())));
        assert_eq!(dir.read("small", 4), Err(ReadError::TooLarge(4)));
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero")).unwrap();
        assert_eq!(dir.read("zero", 10), Err(ReadError::Link));
        nix::unistd::mkfifo(&dir.path().join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(dir.read("fifo", 10), Err(ReadError::NotRegular("FIFO")));
        assert!(matches!(
            dir.lock_file("fifo"),
            Err(ReadError::NotRegular("FIFO"))
        ));
    }

    #[test]
    fn writes_never_through_a_planted_link() {
        let d = tempfile::tempdir().unwrap();
        let dir = SafeDir::create_or_repair(&d.path().join("s")).unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(".tmp")).unwrap();
        dir.write_atomic("state.json", ".tmp", b"{}").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read(dir.path().join("state.json")).unwrap(), b"{}");
        assert!(!dir.path().join(".tmp").exists());
    }

    #[test]
    fn set_aside_never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let dir = SafeDir::create_or_repair(&d.path().join("s")).unwrap();
        for body in ["one", "two", "three"] {
            std::fs::write(dir.path().join("state.json"), body).unwrap();
            dir.set_aside("state.json", "unusable-1").unwrap();
        }
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
        assert_eq!(read("state.json.unusable-1"), "one");
        assert_eq!(read("state.json.unusable-1-2"), "two");
        assert_eq!(read("state.json.unusable-1-3"), "three");
    }
}
