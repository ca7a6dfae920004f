//! Human sizes: `64K`, `16G`, `1.5T` (binary units, as `truncate -s` reads them).

/// Parse a size: a number with an optional binary suffix K, M, G, T, P (also
/// KiB/KB-style spellings, all powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        "P" | "PB" | "PIB" => 1 << 50,
        _ => {
            return Err(format!(
                "invalid size {s:?}: use a number with an optional K, M, G, T or P suffix"
            ))
        }
    };
    let invalid = || format!("invalid size {s:?}: use a number with an optional K, M, G, T or P suffix");
    let out_of_range = || format!("size {s:?} is out of range (at most 8 EiB - 1)");
    // Whole numbers exactly; a fraction (1.5G) only where it makes whole bytes.
    let bytes = if num.contains('.') {
        let value: f64 = num.parse().map_err(|_| invalid())?;
        let bytes = value * mult as f64;
        // (2^63 is exact in f64: anything below it converts.)
        if !bytes.is_finite() || bytes >= MAX_SIZE as f64 {
            return Err(out_of_range());
        }
        if bytes.fract() != 0.0 {
            return Err(format!("size {s:?} is not a whole number of bytes"));
        }
        bytes as u64
    } else {
        let value: u64 = num.parse().map_err(|e: std::num::ParseIntError| {
            if matches!(e.kind(), std::num::IntErrorKind::PosOverflow) {
                out_of_range()
            } else {
                invalid()
            }
        })?;
        value.checked_mul(mult).ok_or_else(out_of_range)?
    };
    if bytes > MAX_SIZE {
        return Err(out_of_range());
    }
    Ok(bytes)
}

/// The largest size: offsets and sizes are signed 64-bit in SQLite and in
/// the kernel (`off_t`).
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Format bytes with binary units: `1.50 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("16G").unwrap(), 16 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("0.3").is_err());
        // Past what off_t and SQLite hold: refused, not wrapped or rounded.
        assert_eq!(parse_size("8191P").unwrap(), 8191 << 50);
        for big in [
            "8192P",
            "16384P",
            "99999999999999999999",
            "9223372036854775808",
            "1e30",
            "8192.0P",
        ] {
            assert!(parse_size(big).is_err(), "{big}");
        }
        assert_eq!(parse_size("9223372036854775807").unwrap(), i64::MAX as u64);
        assert!(parse_size("-1").is_err());
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(3 << 29), "1.50 GiB");
    }
}
