//! Cell parsing shared by the JSON and CSV decoders, and per-column Arrow builders.
//!
//! Parsers return a short detail string naming the offending value; the decoders wrap it with
//! the line and column.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float32Array, Float64Array, Int8Array, Int16Array,
    Int32Array, Int64Array, StringBuilder, TimestampSecondArray, UInt8Array, UInt16Array,
    UInt32Array, UInt64Array,
};
use rtable_protocol::schema::{Column, ColumnType};
use serde_json::Value;

use super::{DATE_MAX_DAYS, DATETIME_MAX_SECONDS, DATETIME_TZ, EPOCH_DAYS_FROM_CE};

/// One non-null input cell.
#[derive(Clone, Copy)]
pub(crate) enum Raw<'a> {
    Json(&'a Value),
    Text(&'a str),
}

/// Shows a value in an error message, shortened when long.
pub(crate) fn show(raw: Raw<'_>) -> String {
    let s = match raw {
        Raw::Json(v) => v.to_string(),
        Raw::Text(t) => format!("\"{t}\""),
    };
    shorten(s)
}

pub(crate) fn shorten(s: String) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        return s;
    }
    let cut: String = s.chars().take(MAX).collect();
    format!("{cut}...")
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn is_unsigned(ty: &ColumnType) -> bool {
    matches!(
        ty,
        ColumnType::UInt8 | ColumnType::UInt16 | ColumnType::UInt32 | ColumnType::UInt64
    )
}

fn parse_int<T: TryFrom<i128>>(raw: Raw<'_>, ty: &ColumnType) -> Result<T, String> {
    let v: i128 = match raw {
        Raw::Json(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                i128::from(u)
            } else if let Some(i) = n.as_i64() {
                i128::from(i)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.is_finite() && f.fract() == 0.0 {
                    return Err(format!("{n} is out of range for {ty}"));
                }
                return Err(format!("{n} is not an integer ({ty} needs a whole number)"));
            }
        }
        Raw::Json(v) => {
            return Err(format!(
                "expected a JSON number for {ty}, got {} {}",
                json_kind(v),
                show(raw)
            ));
        }
        Raw::Text(t) => {
            let t = t.trim();
            match t.parse::<i128>() {
                Ok(v) => v,
                Err(_) => {
                    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
                    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(format!("{t} is out of range for {ty}"));
                    }
                    if t.parse::<f64>().is_ok() {
                        return Err(format!(
                            "\"{t}\" is not an integer ({ty} needs a whole number)"
                        ));
                    }
                    return Err(format!("\"{}\" is not a number ({ty})", shorten(t.into())));
                }
            }
        }
    };
    T::try_from(v).map_err(|_| {
        if v < 0 && is_unsigned(ty) {
            format!("negative value {v} for unsigned type {ty}")
        } else {
            format!("{v} is out of range for {ty}")
        }
    })
}

fn parse_float(raw: Raw<'_>, ty: &ColumnType) -> Result<f64, String> {
    let special = |s: &str| match s.to_ascii_lowercase().as_str() {
        "nan" | "+nan" | "-nan" => Some(f64::NAN),
        "inf" | "+inf" | "infinity" | "+infinity" => Some(f64::INFINITY),
        "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    };
    match raw {
        Raw::Json(Value::Number(n)) => n.as_f64().ok_or_else(|| format!("{n} is not a valid {ty}")),
        Raw::Json(Value::String(s)) => special(s).ok_or_else(|| {
            format!(
                "expected a JSON number for {ty}, got a string {}",
                show(raw)
            )
        }),
        Raw::Json(v) => Err(format!(
            "expected a JSON number for {ty}, got {} {}",
            json_kind(v),
            show(raw)
        )),
        Raw::Text(t) => {
            let t = t.trim();
            special(t)
                .or_else(|| t.parse::<f64>().ok())
                .ok_or_else(|| format!("\"{}\" is not a number ({ty})", shorten(t.into())))
        }
    }
}

fn parse_bool(raw: Raw<'_>) -> Result<bool, String> {
    match raw {
        Raw::Json(Value::Bool(b)) => Ok(*b),
        Raw::Json(Value::Number(n)) if n.as_u64() == Some(0) => Ok(false),
        Raw::Json(Value::Number(n)) if n.as_u64() == Some(1) => Ok(true),
        Raw::Json(v) => Err(format!(
            "expected true, false, 0 or 1 for Bool, got {} {}",
            json_kind(v),
            show(raw)
        )),
        Raw::Text(t) => match t.trim() {
            "1" => Ok(true),
            "0" => Ok(false),
            s if s.eq_ignore_ascii_case("true") => Ok(true),
            s if s.eq_ignore_ascii_case("false") => Ok(false),
            _ => Err(format!(
                "{} is not a Bool: use true, false, 1 or 0",
                show(raw)
            )),
        },
    }
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `YYYY-MM-DD` -> days since 1970-01-01, any valid calendar date.
pub(crate) fn parse_date_text(s: &str) -> Option<i32> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y = i32::try_from(digits(&s[0..4])?).ok()?;
    let d = chrono::NaiveDate::from_ymd_opt(y, digits(&s[5..7])?, digits(&s[8..10])?)?;
    use chrono::Datelike;
    Some(d.num_days_from_ce() - EPOCH_DAYS_FROM_CE)
}

/// `YYYY-MM-DD hh:mm:ss` (or `T` as separator, optional trailing `Z`) -> unix seconds, UTC.
pub(crate) fn parse_datetime_text(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z').unwrap_or(s);
    let b = s.as_bytes();
    if b.len() != 19 || !(b[10] == b' ' || b[10] == b'T') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let days = i64::from(parse_date_text(&s[0..10])?);
    let (h, m, sec) = (
        digits(&s[11..13])?,
        digits(&s[14..16])?,
        digits(&s[17..19])?,
    );
    if h > 23 || m > 59 || sec > 59 {
        return None;
    }
    Some(days * 86_400 + i64::from(h * 3600 + m * 60 + sec))
}

fn date_range_error(shown: &str) -> String {
    format!("{shown} is not a valid Date: use YYYY-MM-DD between 1970-01-01 and 2149-06-06")
}

fn datetime_range_error(shown: &str) -> String {
    format!(
        "{shown} is not a valid DateTime: use \"YYYY-MM-DD hh:mm:ss\" (UTC) or unix seconds, between 1970-01-01 00:00:00 and 2106-02-07 06:28:15"
    )
}

pub(crate) fn check_date(days: i32) -> bool {
    (0..=DATE_MAX_DAYS).contains(&days)
}

pub(crate) fn check_datetime(seconds: i64) -> bool {
    (0..=DATETIME_MAX_SECONDS).contains(&seconds)
}

fn parse_date(raw: Raw<'_>) -> Result<i32, String> {
    let text = match raw {
        Raw::Json(Value::String(s)) => s.as_str(),
        Raw::Json(v) => {
            return Err(format!(
                "expected a \"YYYY-MM-DD\" string for Date, got {} {}",
                json_kind(v),
                show(raw)
            ));
        }
        Raw::Text(t) => t.trim(),
    };
    match parse_date_text(text) {
        Some(d) if check_date(d) => Ok(d),
        _ => Err(date_range_error(&show(raw))),
    }
}

fn parse_datetime(raw: Raw<'_>) -> Result<i64, String> {
    let secs = match raw {
        Raw::Json(Value::String(s)) => parse_datetime_text(s),
        Raw::Json(Value::Number(n)) => n.as_i64(),
        Raw::Json(v) => {
            return Err(format!(
                "expected a \"YYYY-MM-DD hh:mm:ss\" string or unix seconds for DateTime, got {} {}",
                json_kind(v),
                show(raw)
            ));
        }
        Raw::Text(t) => {
            let t = t.trim();
            if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                t.parse::<i64>().ok()
            } else {
                parse_datetime_text(t)
            }
        }
    };
    match secs {
        Some(s) if check_datetime(s) => Ok(s),
        _ => Err(datetime_range_error(&show(raw))),
    }
}

fn parse_string(raw: Raw<'_>) -> Result<&str, String> {
    match raw {
        Raw::Json(Value::String(s)) => Ok(s),
        Raw::Json(v) => Err(format!(
            "expected a JSON string for String, got {} {}",
            json_kind(v),
            show(raw)
        )),
        Raw::Text(t) => Ok(t),
    }
}

enum Data {
    U8(Vec<Option<u8>>),
    U16(Vec<Option<u16>>),
    U32(Vec<Option<u32>>),
    U64(Vec<Option<u64>>),
    I8(Vec<Option<i8>>),
    I16(Vec<Option<i16>>),
    I32(Vec<Option<i32>>),
    I64(Vec<Option<i64>>),
    F32(Vec<Option<f32>>),
    F64(Vec<Option<f64>>),
    Str(StringBuilder),
    Bool(Vec<Option<bool>>),
    Date(Vec<Option<i32>>),
    DateTime(Vec<Option<i64>>),
}

/// Accumulates one column's values.
pub(crate) struct ColumnBuilder {
    ty: ColumnType,
    data: Data,
}

impl ColumnBuilder {
    pub(crate) fn new(column: &Column) -> Self {
        let ty = column.ty.inner().clone();
        let data = match ty {
            ColumnType::UInt8 => Data::U8(Vec::new()),
            ColumnType::UInt16 => Data::U16(Vec::new()),
            ColumnType::UInt32 => Data::U32(Vec::new()),
            ColumnType::UInt64 => Data::U64(Vec::new()),
            ColumnType::Int8 => Data::I8(Vec::new()),
            ColumnType::Int16 => Data::I16(Vec::new()),
            ColumnType::Int32 => Data::I32(Vec::new()),
            ColumnType::Int64 => Data::I64(Vec::new()),
            ColumnType::Float32 => Data::F32(Vec::new()),
            ColumnType::Float64 => Data::F64(Vec::new()),
            ColumnType::String => Data::Str(StringBuilder::new()),
            ColumnType::Bool => Data::Bool(Vec::new()),
            ColumnType::Date => Data::Date(Vec::new()),
            // Nullable is stripped by `inner()`; DateTime is the only type left.
            ColumnType::DateTime | ColumnType::Nullable(_) => Data::DateTime(Vec::new()),
        };
        ColumnBuilder { ty, data }
    }

    pub(crate) fn push_null(&mut self) {
        match &mut self.data {
            Data::U8(v) => v.push(None),
            Data::U16(v) => v.push(None),
            Data::U32(v) => v.push(None),
            Data::U64(v) => v.push(None),
            Data::I8(v) => v.push(None),
            Data::I16(v) => v.push(None),
            Data::I32(v) => v.push(None),
            Data::I64(v) => v.push(None),
            Data::F32(v) => v.push(None),
            Data::F64(v) => v.push(None),
            Data::Str(b) => b.append_null(),
            Data::Bool(v) => v.push(None),
            Data::Date(v) => v.push(None),
            Data::DateTime(v) => v.push(None),
        }
    }

    /// Parses and appends one non-null cell; the error names the value.
    pub(crate) fn push(&mut self, raw: Raw<'_>) -> Result<(), String> {
        let ty = &self.ty;
        match &mut self.data {
            Data::U8(v) => v.push(Some(parse_int(raw, ty)?)),
            Data::U16(v) => v.push(Some(parse_int(raw, ty)?)),
            Data::U32(v) => v.push(Some(parse_int(raw, ty)?)),
            Data::U64(v) => v.push(Some(parse_int(raw, ty)?)),
            Data::I8(v) => v.push(Some(parse_int(raw, ty)?)),
            Data::I16(v) => v.push(Some(parse_int(raw, ty)?)),
            Data::I32(v) => v.push(Some(parse_int(raw, ty)?)),
            Data::I64(v) => v.push(Some(parse_int(raw, ty)?)),
            Data::F32(v) => {
                let f = parse_float(raw, ty)?;
                let narrowed = f as f32;
                if f.is_finite() && !narrowed.is_finite() {
                    return Err(format!("{} is out of range for Float32", show(raw)));
                }
                v.push(Some(narrowed));
            }
            Data::F64(v) => v.push(Some(parse_float(raw, ty)?)),
            Data::Str(b) => b.append_value(parse_string(raw)?),
            Data::Bool(v) => v.push(Some(parse_bool(raw)?)),
            Data::Date(v) => v.push(Some(parse_date(raw)?)),
            Data::DateTime(v) => v.push(Some(parse_datetime(raw)?)),
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> ArrayRef {
        match self.data {
            Data::U8(v) => Arc::new(UInt8Array::from(v)),
            Data::U16(v) => Arc::new(UInt16Array::from(v)),
            Data::U32(v) => Arc::new(UInt32Array::from(v)),
            Data::U64(v) => Arc::new(UInt64Array::from(v)),
            Data::I8(v) => Arc::new(Int8Array::from(v)),
            Data::I16(v) => Arc::new(Int16Array::from(v)),
            Data::I32(v) => Arc::new(Int32Array::from(v)),
            Data::I64(v) => Arc::new(Int64Array::from(v)),
            Data::F32(v) => Arc::new(Float32Array::from(v)),
            Data::F64(v) => Arc::new(Float64Array::from(v)),
            Data::Str(mut b) => Arc::new(b.finish()),
            Data::Bool(v) => Arc::new(BooleanArray::from(v)),
            Data::Date(v) => Arc::new(Date32Array::from(v)),
            Data::DateTime(v) => Arc::new(TimestampSecondArray::from(v).with_timezone(DATETIME_TZ)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_datetimes_parse_strictly() {
        assert_eq!(parse_date_text("1970-01-01"), Some(0));
        assert_eq!(parse_date_text("2149-06-06"), Some(DATE_MAX_DAYS));
        assert_eq!(parse_date_text("2024-02-30"), None);
        assert_eq!(parse_date_text("2024-2-3"), None);
        assert_eq!(parse_datetime_text("1970-01-02 00:00:01"), Some(86_401));
        assert_eq!(parse_datetime_text("1970-01-02T00:00:01Z"), Some(86_401));
        assert_eq!(parse_datetime_text("1970-01-02 24:00:00"), None);
        assert_eq!(
            parse_datetime_text("2106-02-07 06:28:15"),
            Some(DATETIME_MAX_SECONDS)
        );
    }

    #[test]
    fn integer_errors_say_what_is_wrong() {
        let n = |s: &str| serde_json::from_str::<Value>(s).expect("json");
        let e = parse_int::<u8>(Raw::Json(&n("300")), &ColumnType::UInt8).unwrap_err();
        assert!(e.contains("300") && e.contains("out of range"), "{e}");
        let e = parse_int::<u64>(Raw::Json(&n("-1")), &ColumnType::UInt64).unwrap_err();
        assert!(e.contains("negative"), "{e}");
        let e = parse_int::<i64>(Raw::Json(&n("1.5")), &ColumnType::Int64).unwrap_err();
        assert!(e.contains("not an integer"), "{e}");
        let e = parse_int::<u64>(Raw::Json(&n("1e30")), &ColumnType::UInt64).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = parse_int::<u64>(
            Raw::Text("99999999999999999999999999999999999999999"),
            &ColumnType::UInt64,
        )
        .unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = parse_int::<u64>(Raw::Text("2.5"), &ColumnType::UInt64).unwrap_err();
        assert!(e.contains("not an integer"), "{e}");
        let e = parse_int::<u64>(Raw::Text("abc"), &ColumnType::UInt64).unwrap_err();
        assert!(e.contains("not a number"), "{e}");
        assert_eq!(
            parse_int::<i8>(Raw::Text(" -128 "), &ColumnType::Int8),
            Ok(-128)
        );
        assert_eq!(
            parse_int::<u64>(Raw::Json(&n("18446744073709551615")), &ColumnType::UInt64),
            Ok(u64::MAX)
        );
    }
}
