//! `query` and `series`: the data edges shipped to the cloud
//! (store-and-forward), read through `/v1/data/query` and
//! `/v1/data/series` (docs/api.md; the routes of `yunbian-dataapi`).
//!
//! Arguments are checked here before anything is sent (durations, times,
//! the aggregation); the selector is the server's to parse, and its 400
//! names what is wrong. Output is a table (series, RFC 3339 time, value),
//! CSV (a header, one row per point or series) or the API's JSON as it
//! came. The renderings are pure functions of that JSON, tested here.

use std::collections::BTreeSet;

use anyhow::{anyhow, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::client::with_query;
use crate::commands::{emit, Session};
use crate::table::Table;
use crate::time::{parse_duration_ms, parse_rfc3339};

/// Arguments of `query`.
#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    /// Series selector: metric{tag="v", tag!="v", tag=~"re", tag!~"re"} (quote it for the shell).
    pub selector: String,
    /// How far back from --until: 30s, 15m, 1h, 7d (raw points: at most 24h; add --step for more).
    #[arg(long, default_value = "1h", value_parser = parse_span)]
    pub since: Span,
    /// End of the range: RFC 3339 (2026-11-21T09:00:00Z) or Unix milliseconds; default now.
    #[arg(long, value_parser = parse_until)]
    pub until: Option<i64>,
    /// One point per step (1m, 5m, 1h), aggregated with --agg.
    #[arg(long, value_parser = parse_span)]
    pub step: Option<Span>,
    /// How a step aggregates its points (default avg).
    #[arg(long, value_enum, requires = "step")]
    pub agg: Option<Agg>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = DataFormat::Table)]
    pub output: DataFormat,
}

/// Arguments of `series`.
#[derive(Debug, Clone, Args)]
pub struct SeriesArgs {
    /// Series selector: metric{tag="v", …} or {tag="v", …}.
    #[arg(short = 'm', long = "match", value_name = "SELECTOR")]
    pub matcher: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = DataFormat::Table)]
    pub output: DataFormat,
}

/// A positive duration in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub u64);

/// How `query --step` aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Agg {
    /// Mean.
    Avg,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// Sum.
    Sum,
    /// Number of points.
    Count,
    /// Newest value.
    Last,
}

impl Agg {
    fn as_str(self) -> &'static str {
        match self {
            Agg::Avg => "avg",
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::Sum => "sum",
            Agg::Count => "count",
            Agg::Last => "last",
        }
    }
}

/// How `query` and `series` print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DataFormat {
    /// Aligned columns.
    Table,
    /// The API's JSON.
    Json,
    /// A header, then one row per point (query) or series (series).
    Csv,
}

fn parse_span(s: &str) -> Result<Span, String> {
    match parse_duration_ms(s)? {
        0 => Err("must be above zero".into()),
        ms => Ok(Span(ms)),
    }
}

fn parse_until(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.trim().parse::<i64>() {
        return Ok(ms);
    }
    parse_rfc3339(s)
        .and_then(|secs| secs.checked_mul(1000))
        .ok_or_else(|| format!("{s:?} is neither RFC 3339 (2026-11-21T09:00:00Z) nor Unix milliseconds"))
}

impl QueryArgs {
    /// The request path with its query string.
    pub fn path(&self) -> String {
        let mut pairs = vec![("q", self.selector.clone()), ("since", format!("{}ms", self.since.0))];
        if let Some(t) = self.until {
            pairs.push(("until", t.to_string()));
        }
        if let Some(step) = self.step {
            pairs.push(("step", format!("{}ms", step.0)));
            pairs.push(("agg", self.agg.unwrap_or(Agg::Avg).as_str().to_string()));
        }
        with_query("/v1/data/query", &pairs)
    }
}

impl SeriesArgs {
    /// The request path with its query string.
    pub fn path(&self) -> String {
        with_query("/v1/data/series", &[("match", self.matcher.clone())])
    }
}

/// Runs `query`.
pub(crate) async fn query(session: &Session, a: QueryArgs) -> Result<()> {
    let client = session.client()?;
    let body = client.get(&a.path()).await?;
    let text = match a.output {
        DataFormat::Json => format!("{}\n", serde_json::to_string_pretty(&body)?),
        DataFormat::Csv => points_csv(&body)?,
        DataFormat::Table => {
            let t = points_table(&body)?;
            if t.is_empty() {
                eprintln!("No points.");
                return Ok(());
            }
            t.render()
        }
    };
    emit(text)?;
    Ok(())
}

/// Runs `series`.
pub(crate) async fn series(session: &Session, a: SeriesArgs) -> Result<()> {
    let client = session.client()?;
    let body = client.get(&a.path()).await?;
    let text = match a.output {
        DataFormat::Json => format!("{}\n", serde_json::to_string_pretty(&body)?),
        DataFormat::Csv => series_csv(&body)?,
        DataFormat::Table => {
            let t = series_table(&body)?;
            if t.is_empty() {
                eprintln!("No series.");
                return Ok(());
            }
            t.render()
        }
    };
    emit(text)?;
    Ok(())
}

// ---------------------------------------------------------------- rendering

fn series_list(body: &Value) -> Result<&Vec<Value>> {
    body.get("series").and_then(Value::as_array).ok_or_else(|| anyhow!("unexpected answer: no \"series\" list"))
}

/// `metric{tag="v",…}`, in the selector syntax (values escaped), tags
/// sorted: the text to paste into `query`.
pub fn series_name(s: &Value) -> String {
    let metric = s.get("metric").and_then(Value::as_str).unwrap_or("");
    let tags: Vec<String> = s
        .get("tags")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = v.as_str().unwrap_or("").replace('\\', "\\\\").replace('"', "\\\"");
                    format!("{k}=\"{v}\"")
                })
                .collect()
        })
        .unwrap_or_default();
    if tags.is_empty() {
        metric.to_string()
    } else {
        format!("{metric}{{{}}}", tags.join(","))
    }
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds.
pub fn format_time(ms: i64) -> String {
    let secs = yunbian_api::time::format_rfc3339_signed(ms.div_euclid(1000));
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), ms.rem_euclid(1000))
}

/// A value as JSON gave it: a number as Rust prints it (`21.5`, `22`),
/// anything else (`null` for a value JSON cannot hold) as its JSON text.
fn format_value(v: &Value) -> String {
    match v.as_f64() {
        Some(f) => f.to_string(),
        None => v.to_string(),
    }
}

/// `(series, ms, value)` of every point of a `/query` answer, in order.
fn points(body: &Value) -> Result<Vec<(String, i64, String)>> {
    let mut out = Vec::new();
    for s in series_list(body)? {
        let name = series_name(s);
        let pts = s
            .get("points")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("unexpected answer: {name} has no points"))?;
        for p in pts {
            let ts =
                p.get(0).and_then(Value::as_i64).ok_or_else(|| anyhow!("unexpected answer: point {p} of {name}"))?;
            out.push((name.clone(), ts, format_value(p.get(1).unwrap_or(&Value::Null))));
        }
    }
    Ok(out)
}

/// SERIES, TIME, VALUE: one row per point.
pub fn points_table(body: &Value) -> Result<Table> {
    let mut t = Table::new(&["series", "time", "value"]);
    for (name, ts, v) in points(body)? {
        t.push(vec![name, format_time(ts), v]);
    }
    Ok(t)
}

/// `series,time,unix_ms,value`, then one row per point.
pub fn points_csv(body: &Value) -> Result<String> {
    let mut out = String::from("series,time,unix_ms,value\n");
    for (name, ts, v) in points(body)? {
        out.push_str(&csv_row(&[name, format_time(ts), ts.to_string(), v]));
    }
    Ok(out)
}

/// SERIES: one row per series, in the selector syntax.
pub fn series_table(body: &Value) -> Result<Table> {
    let mut t = Table::new(&["series"]);
    for s in series_list(body)? {
        t.push(vec![series_name(s)]);
    }
    Ok(t)
}

/// `series,metric,<tag>…` (every tag name of the answer, sorted), then one
/// row per series; a tag the series lacks is empty.
pub fn series_csv(body: &Value) -> Result<String> {
    let list = series_list(body)?;
    let tag_names: BTreeSet<&str> = list
        .iter()
        .filter_map(|s| s.get("tags").and_then(Value::as_object))
        .flat_map(|m| m.keys().map(String::as_str))
        .collect();
    let mut header = vec!["series".to_string(), "metric".to_string()];
    header.extend(tag_names.iter().map(|t| t.to_string()));
    let mut out = csv_row(&header);
    for s in list {
        let mut row = vec![series_name(s), s.get("metric").and_then(Value::as_str).unwrap_or("").to_string()];
        for t in &tag_names {
            row.push(
                s.pointer(&format!("/tags/{}", t.replace('~', "~0").replace('/', "~1")))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            );
        }
        out.push_str(&csv_row(&row));
    }
    Ok(out)
}

/// One RFC 4180 line: fields with a comma, quote or line break are quoted,
/// quotes doubled.
fn csv_row(fields: &[String]) -> String {
    let cells: Vec<String> = fields
        .iter()
        .map(|f| if f.contains([',', '"', '\n', '\r']) { format!("\"{}\"", f.replace('"', "\"\"")) } else { f.clone() })
        .collect();
    format!("{}\n", cells.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer() -> Value {
        json!({"series": [
            {"metric": "temperature", "tags": {"device": "boiler-1", "node": "edge-1"},
             "points": [[1_700_000_000_000i64, 20.5], [1_700_000_010_250i64, 22.0]]},
            {"metric": "up", "tags": {}, "points": [[-1, null]]},
        ]})
    }

    #[test]
    fn points_as_a_table() {
        let t = points_table(&answer()).expect("valid");
        assert_eq!(
            t.render(),
            "SERIES                                         TIME                       VALUE\n\
             temperature{device=\"boiler-1\",node=\"edge-1\"}   2023-11-14T22:13:20.000Z   20.5\n\
             temperature{device=\"boiler-1\",node=\"edge-1\"}   2023-11-14T22:13:30.250Z   22\n\
             up                                             1969-12-31T23:59:59.999Z   null\n"
        );
    }

    #[test]
    fn points_as_csv() {
        assert_eq!(
            points_csv(&answer()).expect("valid"),
            "series,time,unix_ms,value\n\
             \"temperature{device=\"\"boiler-1\"\",node=\"\"edge-1\"\"}\",2023-11-14T22:13:20.000Z,1700000000000,20.5\n\
             \"temperature{device=\"\"boiler-1\"\",node=\"\"edge-1\"\"}\",2023-11-14T22:13:30.250Z,1700000010250,22\n\
             up,1969-12-31T23:59:59.999Z,-1,null\n"
        );
        assert_eq!(points_csv(&json!({"series": []})).expect("valid"), "series,time,unix_ms,value\n");
    }

    #[test]
    fn series_as_table_and_csv() {
        let body = json!({"series": [
            {"metric": "temperature", "tags": {"device": "boiler-1", "node": "edge-1"}},
            {"metric": "pressure", "tags": {"node": "edge-2", "note": "a \"b\", c\\d"}},
        ]});
        assert_eq!(
            series_table(&body).expect("valid").render(),
            "SERIES\n\
             temperature{device=\"boiler-1\",node=\"edge-1\"}\n\
             pressure{node=\"edge-2\",note=\"a \\\"b\\\", c\\\\d\"}\n"
        );
        assert_eq!(
            series_csv(&body).expect("valid"),
            "series,metric,device,node,note\n\
             \"temperature{device=\"\"boiler-1\"\",node=\"\"edge-1\"\"}\",temperature,boiler-1,edge-1,\n\
             \"pressure{node=\"\"edge-2\"\",note=\"\"a \\\"\"b\\\"\", c\\\\d\"\"}\",pressure,,edge-2,\"a \"\"b\"\", c\\d\"\n"
        );
    }

    #[test]
    fn answers_without_series_are_errors() {
        assert!(points_table(&json!({"items": []})).is_err());
        assert!(points_csv(&json!({"series": [{"metric": "m"}]})).is_err());
        assert!(series_csv(&json!(null)).is_err());
    }

    #[test]
    fn request_paths() {
        let a = QueryArgs {
            selector: r#"temperature{device=~"boiler-.*"}"#.into(),
            since: Span(3_600_000),
            until: Some(1_700_000_000_000),
            step: Some(Span(60_000)),
            agg: Some(Agg::Max),
            output: DataFormat::Table,
        };
        assert_eq!(
            a.path(),
            "/v1/data/query?q=temperature%7Bdevice=~%22boiler-.%2A%22%7D&since=3600000ms&until=1700000000000&step=60000ms&agg=max"
        );
        let raw = QueryArgs { step: None, agg: None, until: None, ..a };
        assert_eq!(raw.path(), "/v1/data/query?q=temperature%7Bdevice=~%22boiler-.%2A%22%7D&since=3600000ms");
        let s = SeriesArgs { matcher: r#"{node="edge-1"}"#.into(), output: DataFormat::Csv };
        assert_eq!(s.path(), "/v1/data/series?match=%7Bnode=%22edge-1%22%7D");
    }

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(parse_until("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(parse_until("1700000000123"), Ok(1_700_000_000_123));
        assert!(parse_until("yesterday").is_err());
        assert_eq!(parse_span("1h30m"), Ok(Span(5_400_000)));
        assert!(parse_span("0").is_err());
    }
}
