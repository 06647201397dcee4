//! The disk an image-info file names, read as EBS sees a volume: 512 KiB
//! blocks of its virtual (logical) contents. nixpkgs' amazon image is a
//! dynamic VHD by default (`qemu-img convert -O vpc`), raw on request; both
//! are read here without converting them first, and in both the blocks
//! known to be zero (unallocated VHD blocks) are not even read.
//!
//! Reads use `pread`, so many workers can share one open file.

pub mod vhd;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The EBS direct APIs' block size.
pub const BLOCK: usize = 512 * 1024;
pub const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    VhdFixed,
    VhdDynamic,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::VhdFixed => "VHD (fixed)",
            Format::VhdDynamic => "VHD (dynamic)",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct DiskError {
    pub path: PathBuf,
    pub reason: String,
}

pub struct Disk {
    file: File,
    path: PathBuf,
    format: Format,
    size: u64,
    dynamic: Option<vhd::Dynamic>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("size", &self.size)
            .finish()
    }
}

impl Disk {
    /// Opens the disk and works out its format (a VHD footer, else raw)
    /// and its virtual size.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let err = |reason: String| DiskError {
            path: path.to_owned(),
            reason,
        };
        let file = File::open(path).map_err(|e| err(format!("cannot be opened: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| err(format!("cannot be inspected: {e}")))?;
        if !meta.is_file() {
            return Err(err("is not a regular file".into()));
        }
        let len = meta.len();
        match vhd::probe(&file, len).map_err(|e| err(e.to_string()))? {
            Some(v) => Ok(Self {
                file,
                path: path.to_owned(),
                format: if v.dynamic.is_some() {
                    Format::VhdDynamic
                } else {
                    Format::VhdFixed
                },
                size: v.size,
                dynamic: v.dynamic,
            }),
            None => {
                if len == 0 {
                    return Err(err("is empty".into()));
                }
                Ok(Self {
                    file,
                    path: path.to_owned(),
                    format: Format::Raw,
                    size: len,
                    dynamic: None,
                })
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The virtual size: what the volume holds.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// 512 KiB blocks, the last one zero-padded.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(BLOCK as u64)
    }

    /// Reads block `index` into `buf` (`BLOCK` bytes; past the end of the
    /// disk it is zero-filled). Returns false when the block is all zeros,
    /// found without reading it (an unallocated VHD block) or by looking.
    pub fn read_block(&self, index: u64, buf: &mut [u8]) -> std::io::Result<bool> {
        assert_eq!(buf.len(), BLOCK);
        let start = index * BLOCK as u64;
        if start >= self.size {
            buf.fill(0);
            return Ok(false);
        }
        let len = (self.size - start).min(BLOCK as u64) as usize;
        buf[len..].fill(0);
        let data = match &self.dynamic {
            Some(d) => d.read(&self.file, start, &mut buf[..len])?,
            None => {
                self.file.read_exact_at(&mut buf[..len], start)?;
                true
            }
        };
        Ok(data && !is_zero(&buf[..len]))
    }

    /// Whole GiB for the volume: the size rounded up, unless everything
    /// past the last whole GiB is zero. nixpkgs' VHDs are rounded up to a
    /// CHS geometry (a 4096 MiB disk is 4 295 467 008 bytes), so without
    /// this the same disk would make a 5 GiB volume as a VHD and a 4 GiB
    /// one as raw.
    pub fn volume_gib(&self) -> std::io::Result<u64> {
        let whole = self.size / GIB;
        if self.size.is_multiple_of(GIB) {
            return Ok(whole.max(1));
        }
        let first = whole * GIB / BLOCK as u64;
        let mut buf = vec![0u8; BLOCK];
        for i in first..self.blocks() {
            if self.read_block(i, &mut buf)? {
                return Ok(whole + 1);
            }
        }
        Ok(whole.max(1))
    }
}

/// Eight bytes at a time (the compiler vectorises it): a 4 GiB disk is
/// 8192 of these checks.
pub fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(8);
    let tail = words.remainder();
    words
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .all(|w| w == 0)
        && tail.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_blocks_zero_detection_and_padding() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.raw");
        let mut data = vec![0u8; BLOCK * 2 + 100];
        data[BLOCK * 2 + 5] = 7;
        std::fs::File::create(&p).unwrap().write_all(&data).unwrap();
        let disk = Disk::open(&p).unwrap();
        assert_eq!(disk.format(), Format::Raw);
        assert_eq!(disk.blocks(), 3);
        let mut buf = vec![1u8; BLOCK];
        assert!(!disk.read_block(0, &mut buf).unwrap());
        assert!(disk.read_block(2, &mut buf).unwrap());
        assert_eq!(buf[5], 7);
        assert!(buf[100..].iter().all(|&b| b == 0), "padded with zeros");
        assert!(!disk.read_block(3, &mut buf).unwrap(), "past the end");
        assert_eq!(disk.volume_gib().unwrap(), 1);
    }

    #[test]
    fn is_zero_sees_every_byte() {
        let mut b = vec![0u8; 1001];
        assert!(is_zero(&b));
        for i in [0, 7, 8, 500, 999, 1000] {
            b[i] = 1;
            assert!(!is_zero(&b), "{i}");
            b[i] = 0;
        }
    }
}
