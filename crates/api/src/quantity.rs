//! Resource quantities: CPU in millicores (`100m`, `0.5`, `2`) and memory in
//! bytes (`32Mi`, `1Gi`, `500M`, `1048576`).

/// Parses a CPU quantity into millicores.
pub fn parse_cpu_millis(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Some(m) = s.strip_suffix('m') {
        return m.parse::<u64>().map_err(|_| format!("invalid cpu quantity {s:?}"));
    }
    let v: f64 = s.parse().map_err(|_| format!("invalid cpu quantity {s:?}"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("invalid cpu quantity {s:?}"));
    }
    Ok((v * 1000.0).round() as u64)
}

/// Parses a memory quantity into bytes.
pub fn parse_memory_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    const UNITS: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (num, mult) = UNITS.iter().find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m))).unwrap_or((s, 1));
    let v: u64 = num.parse().map_err(|_| format!("invalid memory quantity {s:?}"))?;
    v.checked_mul(mult).ok_or_else(|| format!("memory quantity {s:?} is too large"))
}

/// Formats bytes the way `kubectl` users read them (`64Mi`).
pub fn format_bytes(b: u64) -> String {
    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;
    const K: u64 = 1 << 10;
    if b >= G && b.is_multiple_of(G) || b >= 16 * G {
        format!("{}Gi", b / G)
    } else if b >= M {
        format!("{}Mi", b / M)
    } else if b >= K {
        format!("{}Ki", b / K)
    } else {
        format!("{b}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu() {
        assert_eq!(parse_cpu_millis("100m"), Ok(100));
        assert_eq!(parse_cpu_millis("0.5"), Ok(500));
        assert_eq!(parse_cpu_millis("2"), Ok(2000));
        assert!(parse_cpu_millis("-1").is_err());
        assert!(parse_cpu_millis("abc").is_err());
        assert!(parse_cpu_millis("1.5m").is_err());
    }

    #[test]
    fn memory() {
        assert_eq!(parse_memory_bytes("32Mi"), Ok(32 << 20));
        assert_eq!(parse_memory_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_memory_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_memory_bytes("1024"), Ok(1024));
        assert!(parse_memory_bytes("12Qi").is_err());
        assert!(parse_memory_bytes("99999999999999Ti").is_err());
        assert_eq!(format_bytes(64 << 20), "64Mi");
    }
}
