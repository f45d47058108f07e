//! Output for people and for programs: aligned tables, key-value blocks,
//! ages, timestamps, resource summaries and JSON.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::ValueEnum;
use serde::Serialize;
use tessera_core::quantity::format_cpu;
use tessera_core::quantity::format_memory;
use tessera_core::spec::JobTemplate;

/// `--output`: a table for people or JSON for programs (CSV for
/// `tessera usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Csv,
}

/// Writes `text` to stdout, ending it with a newline.
pub fn print(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Writes a value as pretty JSON to stdout.
pub fn print_json(value: &(impl Serialize + ?Sized)) -> anyhow::Result<()> {
    print(&serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// A table with a header row and columns padded to line up.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are kept.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as lines, columns two spaces apart, no trailing spaces.
    pub fn render(&self) -> String {
        let ncols = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; ncols];
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map(String::as_str).unwrap_or("");
                text.push_str(cell);
                if i + 1 < ncols {
                    let pad = width - cell.chars().count() + 2;
                    text.push_str(&" ".repeat(pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `Key:   value` lines with the values lined up.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let key = format!("{k}:");
        out.push_str(format!("{key:<width$}  {v}").trim_end());
        out.push('\n');
    }
    out
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long ago `then_ms` was, compactly: `5s`, `3m`, `2h`, `4d`.
pub fn format_age(now_ms: u64, then_ms: u64) -> String {
    let secs = now_ms.saturating_sub(then_ms) / 1000;
    if secs < 60 {
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m", secs / 60)
    } else if secs < 86400 {
        format!("{}h", secs / 3600)
    } else {
        format!("{}d", secs / 86400)
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A UTC timestamp: `2023-11-14 22:13:20Z`, with `.123` milliseconds when
/// `millis` is set.
pub fn format_time(ms: u64, millis: bool) -> String {
    let secs = (ms / 1000) as i64;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86400));
    let rem = secs.rem_euclid(86400);
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if millis {
        format!(
            "{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{:03}Z",
            ms % 1000
        )
    } else {
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}Z")
    }
}

/// Resources of a whole job: `1 cpu, 256Mi`, or `2x(8 cpu, 64Gi, 1 gpu)` for
/// a gang.
pub fn job_resources(spec: &JobTemplate) -> String {
    let one = spec.resources.summary();
    if spec.replicas > 1 {
        format!("{}x({one})", spec.replicas)
    } else {
        one
    }
}

/// `allocated/total` CPU cores.
pub fn cpu_fraction(allocated_milli: u64, total_milli: u64) -> String {
    format!(
        "{}/{}",
        format_cpu(allocated_milli),
        format_cpu(total_milli)
    )
}

/// `allocated/total` memory.
pub fn memory_fraction(allocated: u64, total: u64) -> String {
    format!("{}/{}", format_memory(allocated), format_memory(total))
}

/// A short GPU model name for tables: `NVIDIA H100 80GB HBM3` → `H100`,
/// `NVIDIA GeForce RTX 4090` → `RTX 4090`.
pub fn short_gpu_model(model: &str) -> String {
    let mut words: Vec<&str> = model.split_whitespace().collect();
    while let Some(first) = words.first() {
        if ["NVIDIA", "Tesla", "GeForce"].contains(first) && words.len() > 1 {
            words.remove(0);
        } else {
            break;
        }
    }
    match words.as_slice() {
        [] => model.to_string(),
        [first, second, ..] if ["RTX", "GTX", "Quadro", "TITAN"].contains(first) => {
            format!("{first} {second}")
        }
        [first, ..] => first.to_string(),
    }
}

/// An argv as a person would type it, quoting what the shell would split.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A list of percentiles over samples (nearest rank). `samples` need not be
/// sorted; an empty list gives zeros.
pub fn percentiles(samples: &[f64], ps: &[f64]) -> Vec<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    ps.iter()
        .map(|p| {
            if sorted.is_empty() {
                return 0.0;
            }
            let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[rank.clamp(1, sorted.len()) - 1]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up() {
        let mut t = Table::new(&["ID", "NAME", "STATE"]);
        t.row(vec!["1".into(), "train-resnet".into(), "running".into()]);
        t.row(vec!["12345".into(), "x".into(), "".into()]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ID     NAME          STATE");
        assert_eq!(lines[1], "1      train-resnet  running");
        assert_eq!(lines[2], "12345  x");
        // Every column starts at the same offset on every line.
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(lines[1].find("running"), Some(col));
    }

    #[test]
    fn tables_count_characters_not_bytes() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["héé".into(), "x".into()]);
        assert_eq!(t.render(), "A    B\nhéé  x\n");
    }

    #[test]
    fn key_values_line_up() {
        let text = key_values(&[
            ("Team", "ml".into()),
            ("Max runtime", "2h".into()),
            ("Image", String::new()),
        ]);
        assert_eq!(text, "Team:         ml\nMax runtime:  2h\nImage:\n");
    }

    #[test]
    fn ages() {
        let now = 10_000_000_000;
        assert_eq!(format_age(now, now), "0s");
        assert_eq!(format_age(now, now - 5_400), "5s");
        assert_eq!(format_age(now, now - 59_999), "59s");
        assert_eq!(format_age(now, now - 60_000), "1m");
        assert_eq!(format_age(now, now - 3 * 60_000 - 1), "3m");
        assert_eq!(format_age(now, now - 2 * 3_600_000), "2h");
        assert_eq!(format_age(now, now - 50 * 3_600_000), "2d");
        // A clock a little ahead of ours is not an error.
        assert_eq!(format_age(now, now + 1_000), "0s");
    }

    #[test]
    fn timestamps() {
        assert_eq!(format_time(0, false), "1970-01-01 00:00:00Z");
        assert_eq!(
            format_time(1_700_000_000_123, true),
            "2023-11-14 22:13:20.123Z"
        );
        assert_eq!(format_time(951_782_400_000, false), "2000-02-29 00:00:00Z");
    }

    #[test]
    fn gpu_models_are_shortened() {
        assert_eq!(short_gpu_model("NVIDIA H100 80GB HBM3"), "H100");
        assert_eq!(short_gpu_model("NVIDIA A100-SXM4-80GB"), "A100-SXM4-80GB");
        assert_eq!(short_gpu_model("NVIDIA GeForce RTX 4090"), "RTX 4090");
        assert_eq!(short_gpu_model("Tesla V100-SXM2-16GB"), "V100-SXM2-16GB");
        assert_eq!(short_gpu_model("NVIDIA"), "NVIDIA");
    }

    #[test]
    fn shell_quoting() {
        let argv = ["python3", "-c", "print('hi')", ""].map(String::from);
        assert_eq!(shell_join(&argv), r#"python3 -c 'print('\''hi'\'')' ''"#);
    }

    #[test]
    fn percentile_ranks() {
        let xs: Vec<f64> = (1..=100).map(f64::from).rev().collect();
        assert_eq!(
            percentiles(&xs, &[50.0, 99.0, 100.0]),
            vec![50.0, 99.0, 100.0]
        );
        assert_eq!(percentiles(&[7.0], &[50.0, 99.0]), vec![7.0, 7.0]);
        assert_eq!(percentiles(&[], &[50.0]), vec![0.0]);
    }
}
