//! HTML building blocks: escaping, the page layout (navigation, sign-out,
//! the inline style and script), and small formatters shared by the pages.
//!
//! Everything that comes from users or agents (names, commands, messages,
//! labels) goes through [`Esc`]; nothing is written raw except constant
//! markup and numbers.

use std::fmt::{self, Write};
use std::sync::LazyLock;

use sha2::{Digest, Sha256};
use tessera_core::auth::Principal;

/// The dashboard's pages in the navigation, in order. A new page (pools,
/// datasets) is one more line here and one route in `ui::routes`.
pub const NAV: &[(&str, &str)] = &[
    ("/ui", "Overview"),
    ("/ui/jobs", "Jobs"),
    ("/ui/nodes", "Nodes"),
    ("/ui/teams", "Teams"),
    ("/ui/services", "Services"),
    ("/ui/pools", "Pools"),
    ("/ui/datasets", "Datasets"),
];

pub const STYLE: &str = include_str!("style.css");
pub const SCRIPT: &str = include_str!("app.js");

/// `Content-Security-Policy` for every page: nothing from elsewhere, the
/// one inline script allowed by its hash, no framing, forms post only here.
pub static CSP: LazyLock<String> = LazyLock::new(|| {
    use std::fmt::Write as _;
    let digest = Sha256::digest(SCRIPT.as_bytes());
    let mut b64 = String::new();
    base64(&digest, &mut b64);
    let mut s = String::new();
    let _ = write!(
        s,
        "default-src 'none'; script-src 'sha256-{b64}'; style-src 'unsafe-inline'; \
         img-src 'self' data:; connect-src 'self'; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'"
    );
    s
});

fn base64(bytes: &[u8], out: &mut String) {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
}

/// Text escaped for HTML content and attribute values.
pub struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = 0;
        for (i, c) in self.0.char_indices() {
            let rep = match c {
                '&' => "&amp;",
                '<' => "&lt;",
                '>' => "&gt;",
                '"' => "&quot;",
                '\'' => "&#39;",
                _ => continue,
            };
            f.write_str(&self.0[last..i])?;
            f.write_str(rep)?;
            last = i + 1;
        }
        f.write_str(&self.0[last..])
    }
}

/// Percent-encodes a query value.
pub fn url_enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// What the layout needs to know about the signed-in caller.
#[derive(Debug, Clone)]
pub struct Session {
    pub principal: Principal,
    /// The form token that every POST from a page must carry.
    pub csrf: String,
}

/// Opens a page: head, style, the top bar with navigation and sign-out,
/// and `<main>`. Close it with [`end`].
pub fn begin(out: &mut String, title: &str, active: &str, session: Option<&Session>) {
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Tessera</title><style>{STYLE}</style></head><body>\
         <header class=\"top\"><a class=\"brand\" href=\"/ui\">{LOGO}<span>Tessera</span></a>",
        Esc(title)
    );
    if let Some(s) = session {
        out.push_str("<nav>");
        for (href, label) in NAV {
            let cls = if *href == active { " class=\"on\"" } else { "" };
            let _ = write!(out, "<a href=\"{href}\"{cls}>{label}</a>");
        }
        let _ = write!(
            out,
            "</nav><div class=\"who\"><span class=\"team\">{}</span><span class=\"role\">{}</span>\
             <form method=\"post\" action=\"/ui/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button class=\"link\" id=\"signout\">Sign out</button></form></div>",
            Esc(&s.principal.team),
            s.principal.role.as_str(),
            Esc(&s.csrf)
        );
    }
    out.push_str("</header><main>");
}

pub fn end(out: &mut String) {
    let _ = write!(out, "</main><script>{SCRIPT}</script></body></html>");
}

/// The brand mark: four tiles of a mosaic.
const LOGO: &str = "<svg width=\"22\" height=\"22\" viewBox=\"0 0 22 22\" aria-hidden=\"true\">\
<rect x=\"1\" y=\"1\" width=\"9\" height=\"9\" rx=\"2\" fill=\"#4f7cff\"/>\
<rect x=\"12\" y=\"1\" width=\"9\" height=\"9\" rx=\"2\" fill=\"#22b8a7\"/>\
<rect x=\"1\" y=\"12\" width=\"9\" height=\"9\" rx=\"2\" fill=\"#f2a93b\"/>\
<rect x=\"12\" y=\"12\" width=\"9\" height=\"9\" rx=\"2\" fill=\"#8a96ad\"/></svg>";

/// A percentage bar: `used` of `total`, with a label.
pub fn bar(out: &mut String, used: f64, total: f64, label: &str) {
    let pct = if total > 0.0 {
        (used / total * 100.0).clamp(0.0, 100.0)
    } else {
        0.0
    };
    let level = if pct >= 90.0 {
        " hi"
    } else if pct >= 70.0 {
        " mid"
    } else {
        ""
    };
    let _ = write!(
        out,
        "<div class=\"bar{level}\" title=\"{pct:.0}%\"><i style=\"width:{pct:.1}%\"></i><span>{}</span></div>",
        Esc(label)
    );
}

/// A state badge (`queued`, `running`, `ready`, ...): coloured by state.
pub fn badge(out: &mut String, state: &str) {
    let _ = write!(
        out,
        "<span class=\"badge s-{}\">{}</span>",
        Esc(state),
        Esc(state)
    );
}

/// `2026-11-27 08:30:12 UTC`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date (proleptic Gregorian), after H. Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `HH:MM` of a time, UTC (chart axes).
pub fn hhmm(ms: u64) -> String {
    let secs = ms / 1000 % 86_400;
    format!("{:02}:{:02}", secs / 3600, secs % 3600 / 60)
}

/// A short span: `45s`, `12m`, `3h 05m`, `2d 4h`.
pub fn span(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h {:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}d {}h", s / 86_400, s % 86_400 / 3600)
    }
}

/// `<time>` saying how long ago, with the exact time on hover.
pub fn ago(out: &mut String, at: u64, now: u64) {
    let _ = write!(
        out,
        "<time title=\"{}\">{} ago</time>",
        utc(at),
        span(now.saturating_sub(at))
    );
}

pub fn cores(milli: u64) -> String {
    let c = milli as f64 / 1000.0;
    if (c - c.round()).abs() < 1e-9 {
        format!("{c:.0}")
    } else {
        format!("{c:.1}")
    }
}

pub fn gib(bytes: u64) -> String {
    if bytes == 0 {
        return "0".into();
    }
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 100.0 {
        format!("{g:.0} GiB")
    } else if g >= 1.0 {
        format!("{g:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

pub fn gpus(milli: u64) -> String {
    cores(milli)
}

pub fn money(x: f64) -> String {
    if x == 0.0 {
        "0.00".into()
    } else if x < 0.01 {
        format!("{x:.4}")
    } else {
        format!("{x:.2}")
    }
}

pub fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// A hidden form field carrying the session's form token.
pub fn csrf_field(out: &mut String, session: &Session) {
    let _ = write!(
        out,
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        Esc(&session.csrf)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        let s = format!("{}", Esc("<script>alert('x')</script> & \"q\""));
        assert_eq!(
            s,
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(format!("{}", Esc("plain ünïcode")), "plain ünïcode");
    }

    #[test]
    fn dates_and_spans() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_709_210_096_000), "2024-02-29 12:34:56 UTC");
        assert_eq!(span(59_000), "59s");
        assert_eq!(span(3_725_000), "1h 02m");
        assert_eq!(url_enc("a b&c/é"), "a%20b%26c%2F%C3%A9");
    }

    #[test]
    fn base64_matches_known_values() {
        let mut s = String::new();
        base64(b"foobar", &mut s);
        assert_eq!(s, "Zm9vYmFy");
        s.clear();
        base64(b"fooba", &mut s);
        assert_eq!(s, "Zm9vYmE=");
        s.clear();
        base64(b"foob", &mut s);
        assert_eq!(s, "Zm9vYg==");
    }
}
