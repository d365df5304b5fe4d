//! Content digests of OCI blobs (`sha256:<64 hex>`, the only algorithm
//! accepted) and a reader that hashes what passes through it.

use std::cell::RefCell;
use std::fmt;
use std::io::{self, Read};
use std::rc::Rc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A sha256 content digest, written `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Parses `sha256:<64 hex>`. Other algorithms are refused.
    pub fn parse(s: &str) -> Result<Digest, String> {
        let Some((algo, hex)) = s.split_once(':') else {
            return Err(format!("digest {s:?} has no algorithm prefix"));
        };
        if algo != "sha256" {
            return Err(format!("digest {s:?}: only sha256 is supported"));
        }
        if hex.len() != 64 {
            return Err(format!("digest {s:?}: expected 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let hi = hex_value(pair[0]).ok_or_else(|| format!("digest {s:?}: not lowercase hex"))?;
            let lo = hex_value(pair[1]).ok_or_else(|| format!("digest {s:?}: not lowercase hex"))?;
            out[i] = hi << 4 | lo;
        }
        Ok(Digest(out))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_ring(ring::digest::digest(&ring::digest::SHA256, bytes))
    }

    fn from_ring(d: ring::digest::Digest) -> Digest {
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Digest(out)
    }

    /// The 64 hex digits (the blob's file name under `blobs/sha256/`).
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a [`HashingReader`] has seen so far; shared so that it can be read
/// after the reader was moved into a decoder.
#[derive(Clone)]
pub(crate) struct Tap(Rc<RefCell<(ring::digest::Context, u64)>>);

impl Tap {
    fn new() -> Tap {
        Tap(Rc::new(RefCell::new((ring::digest::Context::new(&ring::digest::SHA256), 0))))
    }

    /// Digest and byte count of everything read so far.
    pub fn finish(&self) -> (Digest, u64) {
        let inner = self.0.borrow();
        (Digest::from_ring(inner.0.clone().finish()), inner.1)
    }
}

/// Hashes (sha256) and counts the bytes read through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    tap: Tap,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> (HashingReader<R>, Tap) {
        let tap = Tap::new();
        (HashingReader { inner, tap: tap.clone() }, tap)
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut t = self.tap.0.borrow_mut();
        t.0.update(&buf[..n]);
        t.1 += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let d = Digest::of(b"");
        let s = d.to_string();
        assert_eq!(s, "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(Digest::parse(&s), Ok(d));
        assert!(Digest::parse("sha512:00").is_err());
        assert!(Digest::parse("sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855").is_err());
        assert!(Digest::parse("sha256:e3b0").is_err());
        assert!(Digest::parse("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855").is_err());
    }

    #[test]
    fn reader_hashes_what_passes() {
        let (mut r, tap) = HashingReader::new(&b"hello"[..]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).expect("read");
        assert_eq!(tap.finish(), (Digest::of(b"hello"), 5));
    }
}
