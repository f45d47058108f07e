//! Cleaning: operations on one version of a table, planned as one
//! DataFrame whose result becomes a new version.

use deltalake::arrow::datatypes::{DataType, TimeUnit};
use deltalake::datafusion::dataframe::DataFrame;
use deltalake::datafusion::prelude::{cast, ident};
use tessera_core::lake::{CleanRequest, Dataset, LakeError};
use tessera_core::FieldError;

use crate::storage::{internal, Storage};
use crate::table;

fn invalid(field: &str, msg: impl Into<String>) -> LakeError {
    LakeError::Invalid(FieldError::new(field, msg))
}

/// A type named in `cast`.
pub(crate) fn parse_type(field: &str, text: &str) -> Result<DataType, LakeError> {
    Ok(match text.trim().to_ascii_lowercase().as_str() {
        "bigint" | "int64" | "long" => DataType::Int64,
        "int" | "integer" | "int32" => DataType::Int32,
        "smallint" | "int16" => DataType::Int16,
        "double" | "float64" => DataType::Float64,
        "float" | "real" | "float32" => DataType::Float32,
        "string" | "varchar" | "text" | "utf8" => DataType::Utf8,
        "boolean" | "bool" => DataType::Boolean,
        "date" => DataType::Date32,
        "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        other => {
            return Err(invalid(
                field,
                format!("unknown type {other:?}: use bigint, int, smallint, double, float, string, boolean, date or timestamp"),
            ))
        }
    })
}

fn pair<'a>(field: &str, text: &'a str, what: &str) -> Result<(&'a str, &'a str), LakeError> {
    text.split_once(':')
        .map(|(a, b)| (a.trim(), b.trim()))
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| invalid(field, format!("{text:?}: write {what}")))
}

fn has(df: &DataFrame, name: &str) -> bool {
    df.schema().as_arrow().field_with_name(name).is_ok()
}

/// Plans `req` over `version` of `source`.
pub(crate) async fn plan(
    storage: &Storage,
    source: &Dataset,
    version: u64,
    req: &CleanRequest,
) -> Result<DataFrame, LakeError> {
    let t = table::load(storage, &source.team, &source.name, Some(version))
        .await?
        .ok_or_else(|| internal("loading the table", "no commit"))?;
    let provider = t
        .table_provider()
        .await
        .map_err(|e| internal("opening the table", e))?;
    let ctx = table::session();
    ctx.register_table("input", provider)
        .map_err(|e| internal("opening the table", e))?;
    let mut df = match &req.sql {
        Some(sql) => ctx.sql(sql).await.map_err(|e| {
            invalid(
                "sql",
                format!("the transform cannot run: {e} (read from the table `input`)"),
            )
        })?,
        None => ctx
            .table("input")
            .await
            .map_err(|e| internal("opening the table", e))?,
    };
    if !req.select.is_empty() {
        for (i, c) in req.select.iter().enumerate() {
            if !has(&df, c) {
                return Err(table::no_column(
                    &format!("select[{i}]"),
                    c,
                    df.schema().as_arrow(),
                ));
            }
        }
        let cols: Vec<&str> = req.select.iter().map(String::as_str).collect();
        df = df
            .select_columns(&cols)
            .map_err(|e| invalid("select", e.to_string()))?;
    }
    for (i, r) in req.rename.iter().enumerate() {
        let field = format!("rename[{i}]");
        let (from, to) = pair(&field, r, "old:new")?;
        if !has(&df, from) {
            return Err(table::no_column(&field, from, df.schema().as_arrow()));
        }
        df = df
            .with_column_renamed(from, to)
            .map_err(|e| invalid(&field, e.to_string()))?;
    }
    for (i, c) in req.cast.iter().enumerate() {
        let field = format!("cast[{i}]");
        let (name, ty) = pair(&field, c, "column:type")?;
        if !has(&df, name) {
            return Err(table::no_column(&field, name, df.schema().as_arrow()));
        }
        let ty = parse_type(&field, ty)?;
        let exprs: Vec<_> = df
            .schema()
            .as_arrow()
            .fields()
            .iter()
            .map(|f| {
                if f.name() == name {
                    cast(ident(name), ty.clone()).alias(name)
                } else {
                    ident(f.name())
                }
            })
            .collect();
        df = df
            .select(exprs)
            .map_err(|e| invalid(&field, e.to_string()))?;
    }
    for (i, c) in req.drop_nulls.iter().enumerate() {
        let field = format!("drop_nulls[{i}]");
        if !has(&df, c) {
            return Err(table::no_column(&field, c, df.schema().as_arrow()));
        }
        df = df
            .filter(ident(c).is_not_null())
            .map_err(|e| invalid(&field, e.to_string()))?;
    }
    if let Some(f) = &req.filter {
        let expr = df
            .parse_sql_expr(f)
            .map_err(|e| invalid("filter", format!("{f:?} is not a condition here: {e}")))?;
        df = df
            .filter(expr)
            .map_err(|e| invalid("filter", format!("{f:?} is not a condition here: {e}")))?;
    }
    if req.dedupe {
        df = df
            .distinct()
            .map_err(|e| invalid("dedupe", e.to_string()))?;
    }
    Ok(df)
}
