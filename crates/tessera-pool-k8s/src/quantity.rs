//! Kubernetes resource quantities (`3800m`, `16Gi`, `1.5`, `2e3`, `64k`) as
//! the numbers Tessera counts in: millicores, bytes, whole devices.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The value of a quantity as a plain number (`500m` → 0.5, `1Ki` → 1024).
pub fn value(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let num: f64 = num.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    let v = num * factor;
    (v.is_finite() && v >= 0.0).then_some(v)
}

/// CPU in millicores (rounded up, as Kubernetes does).
pub fn cpu_milli(q: &Quantity) -> Option<u64> {
    value(&q.0).map(|v| (v * 1000.0 - 1e-6).ceil().max(0.0) as u64)
}

/// Memory in bytes.
pub fn bytes(q: &Quantity) -> Option<u64> {
    value(&q.0).map(|v| v.ceil() as u64)
}

/// A count of devices (`nvidia.com/gpu`).
pub fn integer(q: &Quantity) -> Option<u64> {
    value(&q.0).map(|v| v.floor() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_as_kubernetes_writes_them() {
        let q = |s: &str| Quantity(s.to_string());
        assert_eq!(cpu_milli(&q("3800m")), Some(3800));
        assert_eq!(cpu_milli(&q("2")), Some(2000));
        assert_eq!(cpu_milli(&q("0.5")), Some(500));
        assert_eq!(cpu_milli(&q("250000u")), Some(250));
        assert_eq!(bytes(&q("16Gi")), Some(16 << 30));
        assert_eq!(bytes(&q("128974848")), Some(128_974_848));
        assert_eq!(bytes(&q("129e6")), Some(129_000_000));
        assert_eq!(bytes(&q("64k")), Some(64_000));
        assert_eq!(integer(&q("8")), Some(8));
        assert_eq!(value("12Zi"), None);
        assert_eq!(value("Gi"), None);
    }
}
