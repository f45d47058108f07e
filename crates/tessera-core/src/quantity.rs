//! Parsing and formatting of the quantities users write: CPU (`1`, `0.5`,
//! `500m`), memory (`512Mi`, `1.5Gi`, `2G`, plain bytes) and durations
//! (`90s`, `2h`, `1h30m`, plain seconds).

use std::fmt;

/// Largest memory amount a spec may name (1 PiB): anything above is a typo.
pub const MAX_MEMORY_BYTES: u64 = 1 << 50;
/// Largest CPU amount per replica (100,000 cores), in millicores.
pub const MAX_CPU_MILLI: u64 = 100_000_000;
/// Longest `max_runtime` (365 days), in milliseconds.
pub const MAX_RUNTIME_MS: u64 = 365 * 24 * 3600 * 1000;

/// A problem with one quantity, phrased for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityError(pub String);

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, QuantityError> {
    Err(QuantityError(msg.into()))
}

fn parse_positive_number(num: &str, what: &str) -> Result<f64, QuantityError> {
    let v: f64 = match num.trim().parse() {
        Ok(v) => v,
        Err(_) => return err(format!("`{num}` is not a number")),
    };
    if !v.is_finite() {
        return err(format!("{what} must be a finite number"));
    }
    if v < 0.0 {
        return err(format!("{what} must not be negative"));
    }
    Ok(v)
}

/// Parses a memory amount into bytes. Accepts plain bytes (`1048576`),
/// binary suffixes (`Ki`, `Mi`, `Gi`, `Ti`, `Pi`), decimal suffixes (`k`/`K`,
/// `M`, `G`, `T`, `P`), an optional trailing `B` (`512MiB`, `2GB`) and
/// fractions (`1.5Gi`).
pub fn parse_memory(s: &str) -> Result<u64, QuantityError> {
    let t = s.trim();
    if t.is_empty() {
        return err("memory is empty; write e.g. `512Mi`, `1.5Gi`, `2G` or a number of bytes");
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let unit = unit.strip_suffix('B').unwrap_or(unit);
    let mult: f64 = match unit {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        other => {
            return err(format!(
                "unknown memory unit `{other}` in `{s}`; use Ki, Mi, Gi, Ti (binary) or K, M, G, T (decimal)"
            ))
        }
    };
    if num.is_empty() {
        return err(format!("`{s}` has no number; write e.g. `512Mi`"));
    }
    let v = parse_positive_number(num, "memory")? * mult;
    if v > MAX_MEMORY_BYTES as f64 {
        return err(format!("memory `{s}` is larger than 1 PiB"));
    }
    Ok(v.round() as u64)
}

/// Formats bytes the way a person reads them (`256Mi`, `1.5Gi`).
pub fn format_memory(bytes: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (name, size) in UNITS {
        if bytes >= size {
            if bytes.is_multiple_of(size) {
                return format!("{}{name}", bytes / size);
            }
            let v = bytes as f64 / size as f64;
            return format!("{}{name}", trim_float(v, 1));
        }
    }
    format!("{bytes}")
}

fn trim_float(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Parses a CPU amount into millicores: `2`, `0.5`, `500m`.
pub fn parse_cpu(s: &str) -> Result<u64, QuantityError> {
    let t = s.trim();
    let (num, milli) = match t.strip_suffix('m') {
        Some(n) => (n, true),
        None => (t, false),
    };
    if num.is_empty() {
        return err("cpu is empty; write e.g. `1`, `0.5` or `500m`");
    }
    let v = parse_positive_number(num, "cpu")?;
    cpu_from_f64(if milli { v / 1000.0 } else { v })
}

/// Converts a number of cores into millicores, checking range.
pub fn cpu_from_f64(cores: f64) -> Result<u64, QuantityError> {
    if !cores.is_finite() {
        return err("cpu must be a finite number");
    }
    if cores < 0.0 {
        return err("cpu must not be negative");
    }
    let milli = (cores * 1000.0).round();
    if milli > MAX_CPU_MILLI as f64 {
        return err(format!("cpu {cores} is more than 100000 cores"));
    }
    Ok(milli as u64)
}

/// Formats millicores as cores (`1`, `0.5`).
pub fn format_cpu(milli: u64) -> String {
    trim_float(milli as f64 / 1000.0, 3)
}

/// Parses a duration into milliseconds: `90s`, `2h`, `1h30m`, `500ms`, `1d`,
/// or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<u64, QuantityError> {
    let t = s.trim();
    if t.is_empty() {
        return err("duration is empty; write e.g. `90s`, `30m` or `2h`");
    }
    if let Ok(secs) = t.parse::<f64>() {
        return duration_from_secs(secs);
    }
    let mut total: f64 = 0.0;
    let mut rest = t;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if split == 0 {
            return err(format!(
                "`{s}` is not a duration; write e.g. `90s`, `30m`, `2h` or `1h30m`"
            ));
        }
        let (num, after) = rest.split_at(split);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let mult = match unit.trim() {
            "ms" => 0.001,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "" => {
                return err(format!(
                    "`{s}` needs a unit after `{num}` (ms, s, m, h or d)"
                ))
            }
            other => {
                return err(format!(
                    "unknown duration unit `{other}` in `{s}`; use ms, s, m, h or d"
                ))
            }
        };
        let v: f64 = num
            .parse()
            .map_err(|_| QuantityError(format!("`{num}` is not a number")))?;
        total += v * mult;
        rest = next;
    }
    duration_from_secs(total)
}

fn duration_from_secs(secs: f64) -> Result<u64, QuantityError> {
    if !secs.is_finite() || secs < 0.0 {
        return err("duration must be a non-negative number");
    }
    let ms = (secs * 1000.0).round();
    if ms > MAX_RUNTIME_MS as f64 {
        return err("duration is longer than 365 days");
    }
    Ok(ms as u64)
}

/// Formats milliseconds compactly (`1h30m`, `90s`, `250ms`).
pub fn format_duration(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let mut secs = ms / 1000;
    let d = secs / 86400;
    secs %= 86400;
    let h = secs / 3600;
    secs %= 3600;
    let m = secs / 60;
    let s = secs % 60;
    let mut out = String::new();
    for (v, u) in [(d, "d"), (h, "h"), (m, "m"), (s, "s")] {
        if v > 0 {
            out.push_str(&format!("{v}{u}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units() {
        assert_eq!(parse_memory("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_memory("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_memory("2G").unwrap(), 2_000_000_000);
        assert_eq!(parse_memory("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_memory("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_memory("100k").unwrap(), 100_000);
    }

    #[test]
    fn memory_errors_say_what_is_wrong() {
        assert!(parse_memory("12Qi")
            .unwrap_err()
            .0
            .contains("unknown memory unit"));
        assert!(parse_memory("-1Gi").unwrap_err().0.contains("negative"));
        assert!(parse_memory("Gi").unwrap_err().0.contains("no number"));
        assert!(parse_memory("").is_err());
        assert!(parse_memory("2000Pi").unwrap_err().0.contains("1 PiB"));
        assert!(parse_memory("1.2.3Gi").is_err());
    }

    #[test]
    fn cpu_forms() {
        assert_eq!(parse_cpu("2").unwrap(), 2000);
        assert_eq!(parse_cpu("0.5").unwrap(), 500);
        assert_eq!(parse_cpu("250m").unwrap(), 250);
        assert!(parse_cpu("-1").is_err());
        assert!(parse_cpu("lots").is_err());
        assert!(parse_cpu("1e9").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), 90_000);
        assert_eq!(parse_duration("2h").unwrap(), 7_200_000);
        assert_eq!(parse_duration("1h30m").unwrap(), 5_400_000);
        assert_eq!(parse_duration("500ms").unwrap(), 500);
        assert_eq!(parse_duration("45").unwrap(), 45_000);
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("1000d").is_err());
        assert_eq!(format_duration(5_400_000), "1h30m");
    }

    #[test]
    fn formatting_round_trips() {
        for s in ["256Mi", "1.5Gi", "3Ti"] {
            assert_eq!(format_memory(parse_memory(s).unwrap()), s);
        }
        assert_eq!(format_cpu(1500), "1.5");
        assert_eq!(format_cpu(2000), "2");
    }
}
