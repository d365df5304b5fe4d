//! Cloud data queries end to end: a real cloud process serves what its
//! data store holds through `/v1/data/…` behind the admin token, and the
//! CLI prints it (`query`, `series`; table, CSV, JSON). The points are put
//! into the cloud's store while the cloud is down, through the store's own
//! `ingest` — the edge → cloud shipping path has its own test
//! (e2e_data.rs). A cloud whose store cannot open still serves the rest of
//! the API and answers data queries with a clear 503.

mod harness;

use harness::{unix_now, Cluster};
use serde_json::{json, Value};
use yunbian_cloud::data_store::{DataStore, Ingested, SeriesKey, SeriesPoints, TsdbDataOptions, TsdbDataStore};

/// RFC 3339 UTC with milliseconds, as the CLI prints times.
fn rfc3339_ms(ms: i64) -> String {
    let secs = yunbian_api::time::format_rfc3339_signed(ms.div_euclid(1000));
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), ms.rem_euclid(1000))
}

fn series(metric: &str, tags: &[(&str, &str)], points: Vec<(i64, f64)>) -> SeriesPoints {
    SeriesPoints { key: SeriesKey::new(metric, tags.iter().copied()).expect("valid key"), points }
}

#[test]
fn the_cloud_serves_its_data_to_the_cli() {
    let mut c = Cluster::start("cloud-query");
    // Recent points (retention keeps 30 days): ten minutes ago, on a minute.
    let base = (unix_now() as i64 / 60 - 10) * 60_000;
    c.kill_cloud();
    {
        let db =
            TsdbDataStore::open(c.cloud_dir.join("tsdb"), TsdbDataOptions::default()).expect("open the data store");
        let batch = vec![
            series(
                "temperature",
                &[("device", "boiler-1")],
                vec![(base, 20.5), (base + 10_000, 21.0), (base + 20_000, 21.5), (base + 30_000, 22.0)],
            ),
            series("temperature", &[("device", "boiler-2"), ("site", "b, north")], vec![(base, 7.0)]),
        ];
        assert_eq!(db.ingest("edge-1", 1, 1, batch).expect("ingest"), Ingested::Stored { accepted: 5, rejected: 0 });
    }
    c.restart_cloud();

    let sel = r#"temperature{device="boiler-1"}"#;
    let until = (base + 30_000).to_string();
    let q = |extra: &[&str]| {
        let mut args = vec!["query", sel, "--since", "1m", "--until", &until];
        args.extend_from_slice(extra);
        c.cli(&args)
    };

    // JSON: the API's answer, with the node tag the cloud set.
    let v = q(&["-o", "json"]).json();
    assert_eq!(
        v,
        json!({"series": [{"metric": "temperature", "tags": {"device": "boiler-1", "node": "edge-1"},
            "points": [[base, 20.5], [base + 10_000, 21.0], [base + 20_000, 21.5], [base + 30_000, 22.0]]}]})
    );

    // Table: series, RFC 3339 time, value.
    let name = r#"temperature{device="boiler-1",node="edge-1"}"#;
    let table = q(&[]).ok().to_string();
    let lines: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    let want: Vec<Vec<String>> = std::iter::once(vec!["SERIES".into(), "TIME".into(), "VALUE".into()])
        .chain(
            [(0, "20.5"), (10_000, "21"), (20_000, "21.5"), (30_000, "22")]
                .map(|(dt, v)| vec![name.to_string(), rfc3339_ms(base + dt), v.to_string()]),
        )
        .collect();
    assert_eq!(lines, want, "{table}");

    // CSV: a header, one row per point.
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    let csv = q(&["-o", "csv"]).ok().to_string();
    let mut want = String::from("series,time,unix_ms,value\n");
    for (dt, v) in [(0, "20.5"), (10_000, "21"), (20_000, "21.5"), (30_000, "22")] {
        want.push_str(&format!("{quoted},{},{},{v}\n", rfc3339_ms(base + dt), base + dt));
    }
    assert_eq!(csv, want);

    // A step: [base, base + 1 min) averaged.
    let stepped = c
        .cli(&[
            "query",
            sel,
            "--since",
            "1m",
            "--until",
            &(base + 59_999).to_string(),
            "--step",
            "1m",
            "--agg",
            "avg",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(stepped["series"][0]["points"], json!([[base, 21.25]]), "{stepped}");

    // Series: every format.
    let v = c.cli(&["series", "--match", r#"{node="edge-1"}"#, "-o", "json"]).json();
    assert_eq!(
        v,
        json!({"series": [
            {"metric": "temperature", "tags": {"device": "boiler-1", "node": "edge-1"}},
            {"metric": "temperature", "tags": {"device": "boiler-2", "node": "edge-1", "site": "b, north"}},
        ]})
    );
    let other = r#"temperature{device="boiler-2",node="edge-1",site="b, north"}"#;
    assert_eq!(c.cli(&["series", "--match", "temperature"]).ok(), format!("SERIES\n{name}\n{other}\n"));
    assert_eq!(
        c.cli(&["series", "-m", "temperature", "-o", "csv"]).ok(),
        format!(
            "series,metric,device,node,site\n{quoted},temperature,boiler-1,edge-1,\n\"{}\",temperature,boiler-2,edge-1,\"b, north\"\n",
            other.replace('"', "\"\"")
        )
    );
    // Batch markers stay out of listings unless asked for by name.
    let all = c.cli(&["series", "-m", r#"{node=~".+"}"#, "-o", "json"]).json();
    assert_eq!(all["series"].as_array().map(Vec::len), Some(2), "{all}");
    let markers = c.cli(&["series", "-m", "__yunbian_batch", "-o", "json"]).json();
    assert_eq!(markers["series"], json!([{"metric": "__yunbian_batch", "tags": {"node": "edge-1"}}]));

    // Nothing there: an empty answer, not an error.
    let none = c.cli(&["query", r#"temperature{device="boiler-9"}"#, "-o", "json"]).json();
    assert_eq!(none, json!({"series": []}));
    let o = c.cli(&["query", r#"temperature{device="boiler-9"}"#]);
    assert_eq!((o.ok(), o.stderr.trim()), ("", "No points."));

    // A bad selector: the server's 400, verbatim.
    let o = c.cli(&["query", "temperature{device="]);
    assert!(o.err().contains("selector"), "{o:?}");

    // The data routes want the admin token like the rest of the API.
    let admin = std::fs::read_to_string(&c.admin).expect("admin.yaml");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&admin).expect("admin.yaml is YAML");
    doc["token"] = serde_yaml::Value::from("yb-admin-wrong");
    let wrong = c.write_file("wrong-token.yaml", &serde_yaml::to_string(&doc).expect("YAML"));
    let mut cmd = std::process::Command::new(harness::BIN);
    cmd.arg("--config").arg(&wrong).args(["series", "-m", "temperature"]).env_remove("YUNBIAN_CONFIG");
    let o = harness::run(cmd, harness::CLI_TIMEOUT);
    assert!(o.err().contains("invalid bearer token"), "{o:?}");

    // A store that cannot open: the cloud serves the rest and says why.
    c.kill_cloud();
    std::fs::rename(c.cloud_dir.join("tsdb"), c.dir.join("tsdb.moved")).expect("move the store away");
    std::fs::write(c.cloud_dir.join("tsdb"), "not a directory").expect("write");
    c.restart_cloud(); // waits for `get nodes`
    let o = c.cli(&["query", sel]);
    let err = o.err();
    assert!(err.contains("the cloud data store is not available"), "{o:?}");
    let o = c.cli(&["series", "-m", "temperature", "-o", "json"]);
    assert!(o.err().contains("not available"), "{o:?}");
    assert!(c.cloud_log_current().contains("cannot open the cloud data store"), "{}", c.cloud_log_current());
    let _: Vec<Value> = c.nodes();
}
