//! ClickHouse's functions that users reach for first, under their ClickHouse names:
//! `toYYYYMM`, `toYYYYMMDD`, `toDate`, `toDateTime`, `toStartOfHour`, `toStartOfDay`
//! and `uniqExact`. `count()` is DataFusion's own (it takes no argument as well).
//!
//! Identifiers are lowercased by the planner, so each function is registered under its
//! ClickHouse spelling (which names the output column) with its lowercase as an alias.
//! Dates are days since 1970-01-01 and DateTime is UTC, as in the parts.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, UInt32Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Date32Type, FieldRef, TimeUnit, TimestampSecondType};
use chrono::Datelike;
use datafusion::common::{Result, plan_err};
use datafusion::functions_aggregate::count::Count;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, GroupsAccumulator,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// The time zone of DateTime values.
const UTC: &str = "UTC";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum DateFn {
    YyyyMm,
    YyyyMmDd,
    Date,
    DateTime,
    StartOfHour,
    StartOfDay,
}

impl DateFn {
    fn name(self) -> &'static str {
        match self {
            DateFn::YyyyMm => "toYYYYMM",
            DateFn::YyyyMmDd => "toYYYYMMDD",
            DateFn::Date => "toDate",
            DateFn::DateTime => "toDateTime",
            DateFn::StartOfHour => "toStartOfHour",
            DateFn::StartOfDay => "toStartOfDay",
        }
    }

    fn output(self) -> DataType {
        match self {
            DateFn::YyyyMm | DateFn::YyyyMmDd => DataType::UInt32,
            DateFn::Date => DataType::Date32,
            DateFn::DateTime | DateFn::StartOfHour | DateFn::StartOfDay => {
                DataType::Timestamp(TimeUnit::Second, Some(UTC.into()))
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct DateFunction {
    which: DateFn,
    aliases: Vec<String>,
    signature: Signature,
}

impl ScalarUDFImpl for DateFunction {
    fn name(&self) -> &str {
        self.which.name()
    }

    fn aliases(&self) -> &[String] {
        &self.aliases
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        match args {
            [DataType::Date32 | DataType::Timestamp(..) | DataType::Utf8 | DataType::Null] => {
                Ok(self.which.output())
            }
            other => plan_err!(
                "{}() takes one Date, DateTime or date string, not {other:?}",
                self.which.name()
            ),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let [input] = arrays.as_slice() else {
            return plan_err!("{}() takes one argument", self.which.name());
        };
        Ok(ColumnarValue::Array(apply(self.which, input)?))
    }
}

fn seconds(input: &ArrayRef) -> Result<ArrayRef> {
    Ok(cast(
        input,
        &DataType::Timestamp(TimeUnit::Second, Some(UTC.into())),
    )?)
}

fn truncated(input: &ArrayRef, step: i64) -> Result<ArrayRef> {
    let secs = seconds(input)?;
    let truncated = secs
        .as_primitive::<TimestampSecondType>()
        .unary::<_, TimestampSecondType>(|s| s - s.rem_euclid(step))
        .with_timezone(UTC);
    Ok(Arc::new(truncated))
}

fn apply(which: DateFn, input: &ArrayRef) -> Result<ArrayRef> {
    match which {
        DateFn::Date => Ok(cast(input, &DataType::Date32)?),
        DateFn::DateTime => seconds(input),
        DateFn::StartOfHour => truncated(input, 3600),
        DateFn::StartOfDay => truncated(input, 86_400),
        DateFn::YyyyMm | DateFn::YyyyMmDd => {
            let days = cast(input, &DataType::Date32)?;
            let days = days.as_primitive::<Date32Type>();
            let number = |d: i32| {
                let date = Date32Type::to_naive_date_opt(d)?;
                let month = date.year() as u32 * 100 + date.month();
                Some(match which {
                    DateFn::YyyyMmDd => month * 100 + date.day(),
                    _ => month,
                })
            };
            let out: UInt32Array = days
                .iter()
                .map(|d| d.and_then(number))
                .collect::<UInt32Array>();
            Ok(Arc::new(out) as ArrayRef)
        }
    }
}

/// `uniqExact(x)`: the exact number of distinct values, which is `count(DISTINCT x)`.
/// It is Count with every accumulator built as the distinct one; what Count answers from
/// statistics (row counts) is not delegated, because it is not a distinct count.
#[derive(Debug, PartialEq, Eq, Hash)]
struct UniqExact {
    count: Count,
    aliases: Vec<String>,
}

fn distinct(args: AccumulatorArgs<'_>) -> AccumulatorArgs<'_> {
    AccumulatorArgs {
        is_distinct: true,
        ..args
    }
}

impl AggregateUDFImpl for UniqExact {
    fn name(&self) -> &str {
        "uniqExact"
    }

    fn aliases(&self) -> &[String] {
        &self.aliases
    }

    fn signature(&self) -> &Signature {
        self.count.signature()
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        if args.is_empty() {
            return plan_err!("uniqExact() takes the column(s) whose distinct values to count");
        }
        self.count.return_type(args)
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        self.count.state_fields(StateFieldsArgs {
            is_distinct: true,
            ..args
        })
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        self.count.accumulator(distinct(args))
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        self.count.groups_accumulator_supported(distinct(args))
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        self.count.create_groups_accumulator(distinct(args))
    }

    fn default_value(&self, data_type: &DataType) -> Result<datafusion::common::ScalarValue> {
        self.count.default_value(data_type)
    }
}

/// The scalar functions, to register next to DataFusion's own.
pub(crate) fn scalar_functions() -> Vec<Arc<ScalarUDF>> {
    [
        DateFn::YyyyMm,
        DateFn::YyyyMmDd,
        DateFn::Date,
        DateFn::DateTime,
        DateFn::StartOfHour,
        DateFn::StartOfDay,
    ]
    .into_iter()
    .map(|which| {
        Arc::new(ScalarUDF::new_from_impl(DateFunction {
            which,
            aliases: vec![which.name().to_lowercase()],
            signature: Signature::any(1, Volatility::Immutable),
        }))
    })
    .collect()
}

/// The aggregate functions, to register next to DataFusion's own.
pub(crate) fn aggregate_functions() -> Vec<Arc<AggregateUDF>> {
    vec![Arc::new(AggregateUDF::new_from_impl(UniqExact {
        count: Count::new(),
        aliases: vec!["uniqexact".to_string()],
    }))]
}

#[cfg(test)]
mod tests {
    use arrow::array::{Date32Array, TimestampMillisecondArray};

    use super::*;

    #[test]
    fn dates_and_datetimes_give_clickhouse_numbers_and_truncations() {
        // 2025-01-15 12:34:56 UTC, and 1970-01-01.
        let ts: ArrayRef = Arc::new(
            TimestampMillisecondArray::from(vec![Some(1_736_944_496_000), None, Some(0)])
                .with_timezone(UTC),
        );
        let month = apply(DateFn::YyyyMm, &ts).expect("toYYYYMM");
        assert_eq!(
            month
                .as_primitive::<arrow::datatypes::UInt32Type>()
                .iter()
                .collect::<Vec<_>>(),
            vec![Some(202_501), None, Some(197_001)]
        );
        let day = apply(DateFn::YyyyMmDd, &ts).expect("toYYYYMMDD");
        assert_eq!(
            day.as_primitive::<arrow::datatypes::UInt32Type>().value(0),
            20_250_115
        );
        let hour = apply(DateFn::StartOfHour, &ts).expect("toStartOfHour");
        assert_eq!(
            hour.as_primitive::<TimestampSecondType>().value(0),
            1_736_942_400
        );
        let date = apply(DateFn::Date, &ts).expect("toDate");
        assert_eq!(date.as_primitive::<Date32Type>().value(0), 20_103);
        let from_date: ArrayRef = Arc::new(Date32Array::from(vec![20_103]));
        let month = apply(DateFn::YyyyMmDd, &from_date).expect("toYYYYMMDD of a Date");
        assert_eq!(
            month
                .as_primitive::<arrow::datatypes::UInt32Type>()
                .value(0),
            20_250_115
        );
    }
}
