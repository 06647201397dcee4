//! Transparent gunzipping of user data (EC2 caps user data at 16 KiB, so
//! operators compress it), with a cap so a small bomb cannot exhaust memory.

use std::io::Read;

/// Far above anything legitimate (16 KiB compressed is rarely more than a
/// few hundred KiB inflated), far below what would hurt a small instance.
pub const MAX_INFLATED: usize = 1 << 20;

pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

pub fn inflate(bytes: &[u8], cap: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(cap as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("gzip data could not be inflated: {e}"))?;
    if out.len() > cap {
        return Err(format!(
            "gzip data inflates to more than {} KiB",
            cap / 1024
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;

    pub fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        assert!(is_gzip(&gz(b"hello")));
        assert_eq!(inflate(&gz(b"hello"), 10).unwrap(), b"hello");
    }

    #[test]
    fn bomb_is_capped() {
        let bomb = gz(&vec![0u8; 8 << 20]);
        assert!(bomb.len() < 16 * 1024, "a real bomb fits in user data");
        let e = inflate(&bomb, MAX_INFLATED).unwrap_err();
        assert!(e.contains("more than 1024 KiB"), "{e}");
    }

    #[test]
    fn corrupt_is_an_error() {
        let mut bad = gz(b"hello world");
        let n = bad.len();
        bad.truncate(n - 6);
        assert!(inflate(&bad, MAX_INFLATED).is_err());
    }
}
