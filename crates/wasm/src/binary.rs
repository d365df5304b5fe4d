//! What kind of WebAssembly binary a file holds, read from its header.
//!
//! Every WebAssembly binary opens with 8 bytes: the magic `\0asm`, then a
//! 2-byte version and a 2-byte layer, little-endian.
//!
//! | bytes 4..8    | kind                                             |
//! |---------------|--------------------------------------------------|
//! | `01 00 00 00` | core module, version 1 (a WASI preview 1 program) |
//! | `xx xx 01 00` | component, layer 1 (WASI preview 2); today's encoding version is `0d 00` |
//!
//! Only the header is read here; Wasmtime validates the rest when it
//! compiles the binary. The text format (`.wat`) is not accepted.

use std::fmt;

/// The two kinds of binaries the shim runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryKind {
    /// A core module: run as a WASI preview 1 command (`_start`).
    CoreModule,
    /// A component: run as a WASI preview 2 command (`wasi:cli/run`).
    Component,
}

impl fmt::Display for BinaryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BinaryKind::CoreModule => "core module (WASI preview 1)",
            BinaryKind::Component => "component (WASI preview 2)",
        })
    }
}

/// Why a file is not a WebAssembly binary the shim can run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Shorter than the 8-byte header.
    #[error("not a WebAssembly binary: {0} bytes, shorter than the 8-byte header")]
    TooShort(usize),
    /// The file does not start with `\0asm` (a text `.wat` file, a native
    /// executable, an archive…).
    #[error("not a WebAssembly binary: it does not start with \\0asm (found {0:02x?})")]
    NoMagic([u8; 4]),
    /// The magic is there but the version/layer is neither a core module's
    /// nor a component's.
    #[error("unsupported WebAssembly version/layer {0:02x?}: neither a core module (01 00 00 00) nor a component (.. .. 01 00)")]
    UnknownVersion([u8; 4]),
}

/// Reads the kind of binary from its first 8 bytes.
pub fn detect(bytes: &[u8]) -> Result<BinaryKind, HeaderError> {
    let header: &[u8; 8] = bytes.get(..8).and_then(|h| h.try_into().ok()).ok_or(HeaderError::TooShort(bytes.len()))?;
    let [m0, m1, m2, m3, v0, v1, l0, l1] = *header;
    if [m0, m1, m2, m3] != *b"\0asm" {
        return Err(HeaderError::NoMagic([m0, m1, m2, m3]));
    }
    match (u16::from_le_bytes([v0, v1]), u16::from_le_bytes([l0, l1])) {
        (1, 0) => Ok(BinaryKind::CoreModule),
        (_, 1) => Ok(BinaryKind::Component),
        _ => Err(HeaderError::UnknownVersion([v0, v1, l0, l1])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_module_and_component_headers() {
        assert_eq!(detect(b"\0asm\x01\0\0\0"), Ok(BinaryKind::CoreModule));
        assert_eq!(detect(b"\0asm\x0d\0\x01\0rest"), Ok(BinaryKind::Component));
    }

    #[test]
    fn garbage_is_refused_with_the_reason() {
        assert_eq!(detect(b""), Err(HeaderError::TooShort(0)));
        assert_eq!(detect(b"\0asm"), Err(HeaderError::TooShort(4)));
        assert_eq!(detect(b"(module)"), Err(HeaderError::NoMagic(*b"(mod")));
        assert_eq!(detect(b"\x7fELF\x02\x01\x01\0"), Err(HeaderError::NoMagic(*b"\x7fELF")));
        assert_eq!(detect(b"\0asm\x02\0\0\0"), Err(HeaderError::UnknownVersion([2, 0, 0, 0])));
    }

    #[test]
    fn every_short_prefix_is_an_error_not_a_panic() {
        let full = b"\0asm\x01\0\0\0";
        for n in 0..8 {
            assert_eq!(detect(&full[..n]), Err(HeaderError::TooShort(n)));
        }
    }
}
