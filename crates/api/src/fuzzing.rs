//! Per-input checks shared by the fuzz targets (`fuzz/fuzz_targets/`) and
//! the corpus replay tests (`tests/fuzz_corpus_manifest.rs`), plus a small
//! deterministic input mutator so the test suite exercises the parsers
//! without libFuzzer.
//!
//! The `check_*` functions accept any bytes. They return normally for every
//! input the code handles correctly (accepted or refused) and panic only
//! when a property is violated: that panic is the bug a fuzzer reports.

use crate::manifest::{parse_manifests, parse_one, Resource};
use crate::quantity::{format_bytes, parse_cpu_millis, parse_memory_bytes};
use crate::time::{format_rfc3339, parse_rfc3339};

/// Parses `data` (lossily decoded as UTF-8) with [`parse_one`] and
/// [`parse_manifests`] and checks, for every resource accepted, that its
/// JSON form ([`Resource::to_value`]) decodes with [`Resource::from_value`]
/// into an equal, still valid resource; and that a document accepted by
/// `parse_one` is accepted by `parse_manifests` as exactly that resource.
///
/// Returns how many resources `parse_manifests` accepted (`None` when it
/// refused the input).
pub fn check_manifest(data: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(data);
    let one = parse_one(&text);
    if let Ok(r) = &one {
        check_resource(r);
    }
    let many = parse_manifests(&text);
    if let Ok(rs) = &many {
        for r in rs {
            check_resource(r);
        }
    }
    if let Ok(r) = one {
        match &many {
            Ok(rs) => assert_eq!(rs.as_slice(), [r], "parse_manifests disagrees with parse_one"),
            Err(e) => panic!("parse_one accepted {r:?} but parse_manifests refused: {e}"),
        }
    }
    many.ok().map(|rs| rs.len())
}

/// Re-serializes one accepted resource and parses it again.
fn check_resource(r: &Resource) {
    let v = r.to_value();
    match Resource::from_value(v.clone()) {
        Ok(again) => assert_eq!(&again, r, "to_value/from_value changed the resource; JSON: {v}"),
        Err(e) => panic!("re-serialized resource no longer parses or validates: {e}; JSON: {v}"),
    }
}

/// Parses `data` (lossily decoded as UTF-8) as an RFC 3339 time, a CPU and
/// a memory quantity, and checks that every accepted value survives
/// formatting and parsing again.
pub fn check_quantities(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let s = text.as_ref();
    if let Some(t) = parse_rfc3339(s) {
        let f = format_rfc3339(t);
        // Years past 9999 do not fit the four-digit form parse_rfc3339 reads
        // (`9999-12-31T23:59:60Z` is already year 10000).
        if f.len() == 20 {
            assert_eq!(parse_rfc3339(&f), Some(t), "{s:?} -> {t} -> {f:?}");
        }
    }
    if let Ok(m) = parse_cpu_millis(s) {
        assert_eq!(parse_cpu_millis(&format!("{m}m")), Ok(m), "{s:?} -> {m}m");
    }
    if let Ok(b) = parse_memory_bytes(s) {
        assert_eq!(parse_memory_bytes(&b.to_string()), Ok(b), "{s:?} -> {b}");
        let shown = format_bytes(b);
        match parse_memory_bytes(&shown) {
            Ok(back) => assert!(back <= b, "format_bytes({b}) = {shown:?} reads back as more ({back})"),
            Err(e) => panic!("format_bytes({b}) = {shown:?} does not parse: {e}"),
        }
    }
}

/// A deterministic generator of test inputs: random bytes, and mutations
/// (bit flips, byte edits, truncations, splices, dictionary insertions) of
/// seed inputs. xorshift64*, so a given seed always yields the same inputs.
#[derive(Debug, Clone)]
pub struct Mutator {
    state: u64,
}

impl Mutator {
    /// A generator seeded with `seed` (0 is replaced by a fixed constant).
    pub fn new(seed: u64) -> Self {
        Mutator { state: if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed } }
    }

    /// The next pseudo-random number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// One input: a mutation (1–4 rounds, usually 1) of a random seed, or, now and
    /// then or when there are no seeds, random bytes. `dict` holds tokens of
    /// the format (keys, punctuation, edge-case values) to insert.
    pub fn input(&mut self, seeds: &[Vec<u8>], dict: &[&[u8]]) -> Vec<u8> {
        if seeds.is_empty() || self.below(10) == 0 {
            let len = self.below(64);
            return (0..len).map(|_| self.next_u64() as u8).collect();
        }
        let mut data = seeds[self.below(seeds.len())].clone();
        // Mostly a single mutation, so that a fair share of inputs stays valid.
        let rounds = if self.below(3) == 0 { 2 + self.below(3) } else { 1 };
        for _ in 0..rounds {
            self.mutate(&mut data, seeds, dict);
        }
        data
    }

    fn mutate(&mut self, data: &mut Vec<u8>, seeds: &[Vec<u8>], dict: &[&[u8]]) {
        let pos = |m: &mut Self, len: usize| m.below(len + 1);
        match self.below(8) {
            0 if !data.is_empty() => {
                let i = self.below(data.len());
                data[i] ^= 1 << self.below(8);
            }
            1 if !data.is_empty() => {
                let i = self.below(data.len());
                data[i] = self.next_u64() as u8;
            }
            2 => {
                let at = pos(self, data.len());
                data.truncate(at);
            }
            3 if !data.is_empty() => {
                let (a, b) = (self.below(data.len()), self.below(data.len()));
                data.drain(a.min(b)..a.max(b));
            }
            4 if !seeds.is_empty() => {
                // Splice: our head, another seed's tail.
                let other = &seeds[self.below(seeds.len())];
                let at = pos(self, data.len());
                let from = pos(self, other.len());
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            5 if !data.is_empty() => {
                // Duplicate a chunk in place (deep nesting, repeated keys).
                let (a, b) = (self.below(data.len()), self.below(data.len()));
                let chunk = data[a.min(b)..a.max(b)].to_vec();
                let at = pos(self, data.len());
                data.splice(at..at, chunk);
            }
            6 | 7 if !dict.is_empty() => {
                let tok = dict[self.below(dict.len())];
                let at = pos(self, data.len());
                if self.below(2) == 0 || data.is_empty() {
                    data.splice(at..at, tok.iter().copied());
                } else {
                    // Overwrite instead of insert.
                    let end = (at + tok.len()).min(data.len());
                    data.splice(at..end, tok.iter().copied());
                }
            }
            _ => data.push(self.next_u64() as u8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutator_is_deterministic() {
        let seeds = vec![b"kind: App".to_vec(), b"{}".to_vec()];
        let (mut a, mut b) = (Mutator::new(7), Mutator::new(7));
        for _ in 0..100 {
            assert_eq!(a.input(&seeds, &[b"---"]), b.input(&seeds, &[b"---"]));
        }
    }

    #[test]
    fn quantity_edges() {
        for s in ["9999-12-31T23:59:60Z", "0000-01-01T00:00:00Z", "1e300", "18446744073709551615", "16Ti", ""] {
            check_quantities(s.as_bytes());
        }
    }
}
