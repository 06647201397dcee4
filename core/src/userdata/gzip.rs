//! Transparent gunzipping of user data (EC2 caps user data at 16 KiB, so
//! operators compress it), with a cap so a small bomb cannot exhaust memory.

use std::io::Read;

/// Far above anything legitimate (16 KiB compressed is rarely more than a
/// few hundred KiB inflated), far below what would hurt a small instance.
/// One cap for the whole user data: every layer and every MIME part that
/// is inflated draws on the same [`Budget`].
pub const MAX_INFLATED: usize = 1 << 20;

pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// What is left of [`MAX_INFLATED`] for one piece of user data: 100 small
/// gzipped MIME parts must not inflate to 100 times the cap.
#[derive(Debug, Clone)]
pub struct Budget {
    cap: usize,
    remaining: usize,
}

impl Budget {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            remaining: cap,
        }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::new(MAX_INFLATED)
    }
}

/// Inflates `bytes`, drawing on `budget`; fails once the user data as a
/// whole would inflate to more than the budget's cap.
pub fn inflate(bytes: &[u8], budget: &mut Budget) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(budget.remaining as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("gzip data could not be inflated: {e}"))?;
    if out.len() > budget.remaining {
        return Err(format!(
            "gzip data inflates to more than {} KiB (the cap for the whole user data)",
            budget.cap / 1024
        ));
    }
    budget.remaining -= out.len();
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
        let mut budget = Budget::new(10);
        assert_eq!(inflate(&gz(b"hello"), &mut budget).unwrap(), b"hello");
        assert_eq!(inflate(&gz(b"hello"), &mut budget).unwrap(), b"hello");
        let e = inflate(&gz(b"x"), &mut budget).unwrap_err();
        assert!(e.contains("the whole user data"), "{e}");
    }

    #[test]
    fn bomb_is_capped() {
        let bomb = gz(&vec![0u8; 8 << 20]);
        assert!(bomb.len() < 16 * 1024, "a real bomb fits in user data");
        let e = inflate(&bomb, &mut Budget::default()).unwrap_err();
        assert!(e.contains("more than 1024 KiB"), "{e}");
    }

    #[test]
    fn corrupt_is_an_error() {
        let mut bad = gz(b"hello world");
        let n = bad.len();
        bad.truncate(n - 6);
        assert!(inflate(&bad, &mut Budget::default()).is_err());
    }
}
