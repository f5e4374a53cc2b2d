//! Kubernetes quantities (`64Mi`, `1G`, `500m`, `1.5`) as numbers, for volume sizes, the
//! downward API's `resourceFieldRef` and the node's capacity.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a Kubernetes quantity (e.g. 64Mi, 1G, 500m)")]
pub struct QuantityError(pub String);

/// The quantity's value in thousandths (`500m` is 500, `2` is 2000, `1Ki` is 1_024_000),
/// so CPU millicores and bytes both come out exact.
pub fn milli_value(q: &str) -> Result<u128, QuantityError> {
    let err = || QuantityError(q.to_string());
    let s = q.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return Err(err());
    }
    // (multiplier, divisor) applied to the number, in thousandths.
    let (mul, div): (u128, u128) = match suffix {
        "" => (1000, 1),
        "m" => (1, 1),
        "k" => (1000 * 1000, 1),
        "M" => (1000 * 1000u128.pow(2), 1),
        "G" => (1000 * 1000u128.pow(3), 1),
        "T" => (1000 * 1000u128.pow(4), 1),
        "P" => (1000 * 1000u128.pow(5), 1),
        "Ki" => (1000 * 1024, 1),
        "Mi" => (1000 * 1024u128.pow(2), 1),
        "Gi" => (1000 * 1024u128.pow(3), 1),
        "Ti" => (1000 * 1024u128.pow(4), 1),
        "Pi" => (1000 * 1024u128.pow(5), 1),
        _ => return Err(err()),
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if frac.contains('.') || frac.len() > 9 {
        return Err(err());
    }
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| err())?
    };
    let frac_digits = frac.len() as u32;
    let frac: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| err())?
    };
    let scale = 10u128.pow(frac_digits);
    let total = (int * scale + frac) * mul / div;
    // Round up: a request of 1.5 bytes needs 2.
    Ok(total.div_ceil(scale))
}

/// The quantity in whole units, rounded up (bytes for sizes, cores for CPU).
pub fn value(q: &str) -> Result<u128, QuantityError> {
    Ok(milli_value(q)?.div_ceil(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_cpus() {
        assert_eq!(value("64Mi"), Ok(64 * 1024 * 1024));
        assert_eq!(value("1G"), Ok(1_000_000_000));
        assert_eq!(value("10Gi"), Ok(10 * 1024 * 1024 * 1024));
        assert_eq!(milli_value("500m"), Ok(500));
        assert_eq!(milli_value("2"), Ok(2000));
        assert_eq!(milli_value("1.5"), Ok(1500));
        assert_eq!(value("1.5Ki"), Ok(1536));
        assert_eq!(value("0.5"), Ok(1));
        assert!(value("ten").is_err());
        assert!(value("10 Gi").is_err());
        assert!(value("").is_err());
    }
}
