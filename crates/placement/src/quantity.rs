//! Formats quantities the way users write them in manifests: memory in
//! `Ki`/`Mi`/`Gi`, CPU in millicores (`500m`) or cores (`2`).

/// Bytes as `256Mi`, `1.5Gi`, `512Ki` or `100` (one decimal when not whole).
pub fn bytes(b: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(1 << 40, "Ti"), (1 << 30, "Gi"), (1 << 20, "Mi"), (1 << 10, "Ki")];
    for (size, unit) in UNITS {
        if b >= size {
            if b.is_multiple_of(size) {
                return format!("{}{unit}", b / size);
            }
            let v = b as f64 / size as f64;
            let s = format!("{v:.1}");
            return format!("{}{unit}", s.strip_suffix(".0").unwrap_or(&s));
        }
    }
    b.to_string()
}

/// Millicores as `500m`, or `2` for whole cores.
pub fn cpu(millis: u64) -> String {
    if millis >= 1000 && millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// A share as a whole percentage (`12%`); 0 of 0 is 0%.
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "0%".to_string();
    }
    format!("{}%", (part as u128 * 100 / whole as u128))
}

/// Seconds as `3d 4h`, `5h 10m`, `12m` or `40s`.
pub fn duration(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m")
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let table: [(u64, &str); 8] = [
            (0, "0"),
            (1000, "1000"),
            (1024, "1Ki"),
            (120 << 20, "120Mi"),
            (256 << 20, "256Mi"),
            (3 << 29, "1.5Gi"),
            ((1 << 30) + 1, "1Gi"),
            (5 << 40, "5Ti"),
        ];
        for (b, want) in table {
            assert_eq!(bytes(b), want, "{b}");
        }
        for (m, want) in [(0, "0m"), (200, "200m"), (1500, "1500m"), (2000, "2")] {
            assert_eq!(cpu(m), want, "{m}");
        }
        assert_eq!(percent(12, 100), "12%");
        assert_eq!(percent(1, 0), "0%");
        for (s, want) in [(40, "40s"), (720, "12m"), (18_600, "5h 10m"), (273_600, "3d 4h")] {
            assert_eq!(duration(s), want, "{s}");
        }
    }
}
