//! Microsoft's Virtual Hard Disk format (VHD, qemu's `vpc`), fixed and
//! dynamic, as the "Virtual Hard Disk Image Format Specification" (2006)
//! lays it out and as `qemu-img convert -O vpc` (nixpkgs'
//! `make-disk-image.nix`) writes it:
//!
//! - a 512-byte footer at the end of the file (for a dynamic disk, a copy
//!   at offset 0 too): cookie `conectix`, the data offset (the dynamic
//!   header) at 16, the current (virtual) size at 48, the disk type at 60
//!   (2 fixed, 3 dynamic, 4 differencing), a checksum at 64, all
//!   big-endian;
//! - fixed: the data, then the footer;
//! - dynamic: a 1024-byte header (cookie `cxsparse`, the block allocation
//!   table's offset at 16, its entries at 28, the block size at 32), the
//!   table (one big-endian sector offset per block, `0xFFFFFFFF` for a
//!   block never written, which reads as zeros), and each allocated block
//!   as a sector bitmap (a clear bit: the sector reads as zeros) followed
//!   by the block's data.
//!
//! No crate on crates.io reads VHDs as a stream (the one there reads the
//! whole file into memory and takes the size from the wrong field).

use std::fs::File;
use std::os::unix::fs::FileExt;

const FOOTER: usize = 512;
const HEADER: usize = 1024;
const SECTOR: u64 = 512;
const UNALLOCATED: u32 = 0xFFFF_FFFF;

#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    #[error("is a VHD, but {0}")]
    Invalid(String),
    #[error("cannot be read: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid(s: impl Into<String>) -> VhdError {
    VhdError::Invalid(s.into())
}

pub struct Probed {
    pub size: u64,
    pub dynamic: Option<Dynamic>,
}

/// A dynamic disk's block allocation table.
#[derive(Debug)]
pub struct Dynamic {
    block_size: u64,
    bitmap_bytes: u64,
    bat: Vec<u32>,
    file_len: u64,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// One's complement of the byte sum, with the checksum field counted as
/// zeros.
fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    !sum
}

/// `None` when the file is not a VHD (no footer cookie at its end, nor a
/// dynamic disk's copy at its start): a raw disk.
pub fn probe(file: &File, len: u64) -> Result<Option<Probed>, VhdError> {
    if len < FOOTER as u64 {
        return Ok(None);
    }
    let mut footer = [0u8; FOOTER];
    file.read_exact_at(&mut footer, len - FOOTER as u64)?;
    if &footer[..8] != b"conectix" {
        let mut head = [0u8; FOOTER];
        file.read_exact_at(&mut head, 0)?;
        if &head[..8] == b"conectix" {
            return Err(invalid(
                "its footer is missing at the end (a truncated download or copy?)",
            ));
        }
        return Ok(None);
    }
    if checksum(&footer, 64) != be32(&footer, 64) {
        return Err(invalid("its footer's checksum is wrong (a damaged file)"));
    }
    let size = be64(&footer, 48);
    if size == 0 || !size.is_multiple_of(SECTOR) {
        return Err(invalid(format!(
            "its virtual size {size} is not a whole number of sectors"
        )));
    }
    match be32(&footer, 60) {
        2 => {
            if len != size + FOOTER as u64 {
                return Err(invalid(format!(
                    "it is a fixed disk of {size} bytes, but the file has {len} bytes"
                )));
            }
            Ok(Some(Probed {
                size,
                dynamic: None,
            }))
        }
        3 => {
            let offset = be64(&footer, 16);
            let dynamic = Dynamic::open(file, len, offset, size)?;
            Ok(Some(Probed {
                size,
                dynamic: Some(dynamic),
            }))
        }
        4 => Err(invalid(
            "a differencing disk needs its parent; convert it to raw or a dynamic VHD",
        )),
        t => Err(invalid(format!("its disk type {t} is unknown"))),
    }
}

impl Dynamic {
    fn open(file: &File, file_len: u64, offset: u64, size: u64) -> Result<Self, VhdError> {
        if offset
            .checked_add(HEADER as u64)
            .is_none_or(|end| end > file_len)
        {
            return Err(invalid("its dynamic header lies outside the file"));
        }
        let mut h = [0u8; HEADER];
        file.read_exact_at(&mut h, offset)?;
        if &h[..8] != b"cxsparse" {
            return Err(invalid("its dynamic header has no `cxsparse` cookie"));
        }
        if checksum(&h, 36) != be32(&h, 36) {
            return Err(invalid("its dynamic header's checksum is wrong"));
        }
        let table = be64(&h, 16);
        let entries = u64::from(be32(&h, 28));
        let block_size = u64::from(be32(&h, 32));
        if block_size < SECTOR || !block_size.is_power_of_two() || block_size > (256 << 20) {
            return Err(invalid(format!(
                "its block size {block_size} is not a power of two between 512 bytes and 256 MiB"
            )));
        }
        if entries.checked_mul(block_size).is_none_or(|cap| cap < size) {
            return Err(invalid(format!(
                "its {entries} blocks of {block_size} bytes cannot hold its {size} bytes"
            )));
        }
        let table_bytes = entries * 4;
        if table
            .checked_add(table_bytes)
            .is_none_or(|end| end > file_len)
        {
            return Err(invalid("its block allocation table lies outside the file"));
        }
        let mut raw = vec![0u8; table_bytes as usize];
        file.read_exact_at(&mut raw, table)?;
        let bat = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")))
            .collect();
        // One bit per sector, padded to whole sectors.
        let bitmap_bytes = (block_size / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR;
        Ok(Self {
            block_size,
            bitmap_bytes,
            bat,
            file_len,
        })
    }

    /// Fills `buf` with the virtual bytes from `start`; false when none of
    /// them lies in an allocated block (all zeros, nothing read).
    pub fn read(&self, file: &File, start: u64, buf: &mut [u8]) -> std::io::Result<bool> {
        let corrupt = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let mut any = false;
        let mut done = 0usize;
        let mut bitmap = Vec::new();
        while done < buf.len() {
            let pos = start + done as u64;
            let block = pos / self.block_size;
            let within = pos % self.block_size;
            let n = ((self.block_size - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            let entry = *self
                .bat
                .get(block as usize)
                .ok_or_else(|| corrupt(format!("block {block} is beyond the allocation table")))?;
            if entry == UNALLOCATED {
                out.fill(0);
            } else {
                let base = u64::from(entry) * SECTOR;
                let data = base + self.bitmap_bytes;
                if data + self.block_size > self.file_len {
                    return Err(corrupt(format!(
                        "block {block} points outside the file (sector {entry})"
                    )));
                }
                file.read_exact_at(out, data + within)?;
                // Sectors whose bit is clear were never written: zeros,
                // whatever the file holds there.
                bitmap.resize(self.bitmap_bytes as usize, 0);
                file.read_exact_at(&mut bitmap, base)?;
                let first = within / SECTOR;
                for (i, sector) in out.chunks_mut(SECTOR as usize).enumerate() {
                    let s = first + i as u64;
                    if bitmap[(s / 8) as usize] & (0x80 >> (s % 8)) == 0 {
                        sector.fill(0);
                    }
                }
                any = true;
            }
            done += n;
        }
        Ok(any)
    }
}

#[cfg(test)]
pub mod tests {
    //! VHDs written the way qemu's `block/vpc.c` writes them, by a writer
    //! of our own (so the reader is tested against the layout, not against
    //! itself): footer, dynamic header, allocation table, bitmaps.

    use super::*;
    use crate::disk::{BLOCK, Disk, Format};

    fn footer(size: u64, kind: u32, data_offset: u64) -> [u8; FOOTER] {
        let mut f = [0u8; FOOTER];
        f[..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        f[16..24].copy_from_slice(&data_offset.to_be_bytes());
        f[28..32].copy_from_slice(b"qemu");
        f[36..40].copy_from_slice(b"Wi2k");
        f[40..48].copy_from_slice(&size.to_be_bytes());
        f[48..56].copy_from_slice(&size.to_be_bytes());
        f[60..64].copy_from_slice(&kind.to_be_bytes());
        let c = checksum(&f, 64);
        f[64..68].copy_from_slice(&c.to_be_bytes());
        f
    }

    /// A dynamic VHD of `raw` with 2 MiB blocks, allocating only blocks
    /// that hold a non-zero byte, as qemu does; `size` may be larger than
    /// `raw` (qemu's CHS rounding).
    pub fn dynamic_vhd(raw: &[u8], size: u64) -> Vec<u8> {
        const BS: u64 = 2 << 20;
        let entries = size.div_ceil(BS);
        let table = 3 * 512u64;
        let mut out = Vec::new();
        out.extend_from_slice(&footer(size, 3, 512));
        let mut h = [0u8; HEADER];
        h[..8].copy_from_slice(b"cxsparse");
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&table.to_be_bytes());
        h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        h[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
        h[32..36].copy_from_slice(&(BS as u32).to_be_bytes());
        let c = checksum(&h, 36);
        h[36..40].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&h);
        let mut bat = vec![UNALLOCATED; entries as usize];
        let table_end = (table + entries * 4).div_ceil(512) * 512;
        out.resize(table_end as usize, 0xff);
        for (i, entry) in bat.iter_mut().enumerate() {
            let start = i as u64 * BS;
            let end = (start + BS).min(raw.len() as u64);
            if start >= raw.len() as u64
                || raw[start as usize..end as usize].iter().all(|&b| b == 0)
            {
                continue;
            }
            *entry = (out.len() as u64 / 512) as u32;
            out.extend_from_slice(&[0xff; 512]); // bitmap: all written
            let mut block = raw[start as usize..end as usize].to_vec();
            block.resize(BS as usize, 0);
            out.extend_from_slice(&block);
        }
        for (i, e) in bat.iter().enumerate() {
            let at = table as usize + i * 4;
            out[at..at + 4].copy_from_slice(&e.to_be_bytes());
        }
        out.extend_from_slice(&footer(size, 3, 512));
        out
    }

    fn sample() -> Vec<u8> {
        let mut raw = vec![0u8; 12 << 20];
        raw[3] = 1;
        raw[(5 << 20) + 17] = 2;
        raw[(12 << 20) - 1] = 3;
        raw
    }

    fn blocks(d: &Disk) -> Vec<(bool, Vec<u8>)> {
        let mut buf = vec![0u8; BLOCK];
        (0..d.blocks())
            .map(|i| {
                let data = d.read_block(i, &mut buf).unwrap();
                (data, buf.clone())
            })
            .collect()
    }

    #[test]
    fn dynamic_vhd_reads_as_its_raw_disk() {
        let dir = tempfile::tempdir().unwrap();
        let raw = sample();
        let rawp = dir.path().join("d.raw");
        std::fs::write(&rawp, &raw).unwrap();
        // qemu rounds 12 MiB up to its CHS geometry.
        let size = (12 << 20) + 3 * 512 * 16;
        let vhdp = dir.path().join("d.vhd");
        std::fs::write(&vhdp, dynamic_vhd(&raw, size)).unwrap();
        let (r, v) = (Disk::open(&rawp).unwrap(), Disk::open(&vhdp).unwrap());
        assert_eq!(v.format(), Format::VhdDynamic);
        assert_eq!(v.size(), size);
        let (rb, vb) = (blocks(&r), blocks(&v));
        assert_eq!(
            vb[..rb.len()],
            rb[..],
            "the same blocks, the same zero blocks"
        );
        assert!(
            vb[rb.len()..].iter().all(|(data, _)| !data),
            "the rounding is zeros"
        );
        assert_eq!(r.volume_gib().unwrap(), v.volume_gib().unwrap());
    }

    #[test]
    fn fixed_vhd_and_a_cleared_bitmap() {
        let dir = tempfile::tempdir().unwrap();
        let raw = sample();
        let mut fixed = raw.clone();
        fixed.extend_from_slice(&footer(raw.len() as u64, 2, u64::MAX));
        let p = dir.path().join("f.vhd");
        std::fs::write(&p, &fixed).unwrap();
        let d = Disk::open(&p).unwrap();
        assert_eq!((d.format(), d.size()), (Format::VhdFixed, raw.len() as u64));
        // A sector whose bitmap bit is clear reads as zeros.
        let mut v = dynamic_vhd(&raw, raw.len() as u64);
        let first_block_sector = u32::from_be_bytes(v[1536..1540].try_into().unwrap()) as usize;
        v[first_block_sector * 512] = 0x7f;
        let p = dir.path().join("b.vhd");
        std::fs::write(&p, &v).unwrap();
        let mut buf = vec![0u8; BLOCK];
        assert!(!Disk::open(&p).unwrap().read_block(0, &mut buf).unwrap());
    }

    #[test]
    fn damaged_vhds_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let good = dynamic_vhd(&sample(), 12 << 20);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("checksum", {
                let mut v = good.clone();
                let n = v.len();
                v[n - 100] ^= 1;
                v
            }),
            ("truncated", good[..good.len() - 512].to_vec()),
            ("differencing", {
                let mut v = good.clone();
                let n = v.len();
                v[n - 512..].copy_from_slice(&footer(12 << 20, 4, 512));
                v
            }),
            ("outside the file", {
                let mut v = good.clone();
                v[1536..1540].copy_from_slice(&0x00ff_ffffu32.to_be_bytes());
                v
            }),
        ];
        for (why, bytes) in cases {
            let p = dir.path().join("x.vhd");
            std::fs::write(&p, bytes).unwrap();
            let r = Disk::open(&p).and_then(|d| {
                let mut buf = vec![0u8; BLOCK];
                d.read_block(0, &mut buf)
                    .map_err(|e| crate::disk::DiskError {
                        path: p.clone(),
                        reason: e.to_string(),
                    })
            });
            let e = r.unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }
}
