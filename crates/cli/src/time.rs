//! Time as the CLI shows and reads it: RFC 3339 timestamps parsed by hand,
//! kubectl-style ages (`45s`, `3m10s`, `2h`, `5d`) and durations given on
//! the command line (`30s`, `15m`, `24h`, `7d`, `1h30m`, `0`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

pub use yunbian_api::time::parse_rfc3339_signed as parse_rfc3339;

/// A duration in kubectl's `HumanDuration` style: `45s`, `3m10s`, `15m`,
/// `2h5m`, `20h`, `3d4h`, `12d`, `2y30d`.
pub fn format_age(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 120 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        return match seconds % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        return match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        return match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        };
    }
    if days < 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if days < 365 * 8 {
        return match days % 365 {
            0 => format!("{years}y"),
            d => format!("{years}y{d}d"),
        };
    }
    format!("{years}y")
}

/// The age of an RFC 3339 timestamp at `now`; `<unknown>` when absent or
/// unparsable.
pub fn age_since(timestamp: &str, now: i64) -> String {
    match parse_rfc3339(timestamp) {
        Some(t) => format_age(now - t),
        None => "<unknown>".into(),
    }
}

pub use yunbian_api::time::parse_duration_ms;

/// Parses a command-line duration into whole seconds (`0` means "never"
/// where a flag says so).
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let ms = parse_duration_ms(s)?;
    if ms % 1000 != 0 {
        return Err(format!("invalid duration {:?}: use whole seconds", s.trim()));
    }
    Ok(ms / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(parse_rfc3339("2024-02-29T12:34:56.789Z"), Some(1_709_210_096));
        assert_eq!(parse_rfc3339("2024-02-29T14:34:56+02:00"), Some(1_709_210_096));
        assert_eq!(parse_rfc3339("2024-02-29T10:04:56-02:30"), Some(1_709_210_096));
        for bad in [
            "",
            "2024-02-30T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00Zjunk",
            "2024-01-01T00:00:00+0200",
            "２０２４-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn ages_like_kubectl() {
        let cases = [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (45, "45s"),
            (119, "119s"),
            (120, "2m"),
            (190, "3m10s"),
            (600, "10m"),
            (179 * 60, "179m"),
            (3 * 3600, "3h"),
            (2 * 3600 + 5 * 60 + 3 * 3600, "5h5m"),
            (20 * 3600, "20h"),
            (47 * 3600, "47h"),
            (48 * 3600, "2d"),
            (3 * 86_400 + 4 * 3600, "3d4h"),
            (5 * 86_400, "5d"),
            (12 * 86_400, "12d"),
            (365 * 2 * 86_400 + 30 * 86_400, "2y30d"),
            (365 * 9 * 86_400, "9y"),
        ];
        for (secs, want) in cases {
            assert_eq!(format_age(secs), want, "{secs}");
        }
        assert_eq!(age_since("1970-01-01T00:00:00Z", 45), "45s");
        assert_eq!(age_since("", 45), "<unknown>");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(0));
        assert_eq!(parse_duration("30s"), Ok(30));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("24h"), Ok(86_400));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        for bad in ["", "10", "h", "1x", "-1h", "1.5h", "99999999999999999999d", "1h 30m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
