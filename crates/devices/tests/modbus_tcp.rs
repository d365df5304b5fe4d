//! The Modbus TCP driver against real peers: a pymodbus server
//! (`tests/peers/modbus_server.py`, someone else's Modbus implementation)
//! for values, batching, writes, exceptions, restarts and slowness; and a
//! fake device written here for answers no honest server gives (garbage,
//! truncated frames, wrong transaction id or function code, absurd lengths).
//!
//! Without python3 + pymodbus the pymodbus tests print `SKIP:` and pass,
//! unless `CI` is set, where they fail.

mod common_modbus;

use std::time::{Duration, Instant};

use common_modbus::{config, peers_available, prop, tcp, Prop, PyServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use yunbian_api::{ModbusDataType as Dt, PropertyType as Ty, RegisterType as Rt};
use yunbian_devices::driver::{Driver, DriverError, PropertyRead, WriteError};
use yunbian_devices::modbus::ModbusDriver;

/// A hang guard for calls that must end by their own timeout: far beyond
/// any timeout used here, so it never decides a passing run.
const HANG_GUARD: Duration = Duration::from_secs(20);

fn values(reads: &[PropertyRead]) -> Vec<(String, Result<Value, String>)> {
    reads
        .iter()
        .map(|r| {
            let v = match &r.result {
                Ok(Some(reading)) => Ok(reading.value.clone()),
                Ok(None) => Err("no value".to_string()),
                Err(e) => Err(e.clone()),
            };
            (r.property.clone(), v)
        })
        .collect()
}

fn value_of(reads: &[PropertyRead], name: &str) -> Result<Value, String> {
    values(reads)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {name} in {reads:?}"))
}

async fn read_all(d: &mut ModbusDriver) -> Vec<PropertyRead> {
    tokio::time::timeout(HANG_GUARD, d.read(&[])).await.expect("read ends").expect("read succeeds")
}

/// Every table and data type of the server's datastore.
fn catalogue() -> Vec<Prop> {
    vec![
        prop("u16", Ty::Int, Rt::Holding, 0, Dt::Uint16),
        prop("i16", Ty::Int, Rt::Holding, 1, Dt::Int16),
        prop("i32", Ty::Int, Rt::Holding, 2, Dt::Int32),
        prop("u32", Ty::Int, Rt::Holding, 4, Dt::Uint32),
        prop("f32_big", Ty::Float, Rt::Holding, 6, Dt::Float32),
        prop("f32_big_scaled", Ty::Float, Rt::Holding, 6, Dt::Float32).scaled(2.0, 1.0),
        prop("f32_little", Ty::Float, Rt::Holding, 8, Dt::Float32).little_words(),
        prop("f32_little_scaled", Ty::Float, Rt::Holding, 8, Dt::Float32).little_words().scaled(2.0, 1.0),
        prop("f64", Ty::Float, Rt::Holding, 13, Dt::Float64),
        prop("text", Ty::String, Rt::Holding, 17, Dt::String).count(4),
        prop("scaled", Ty::Float, Rt::Holding, 21, Dt::Uint16).scaled(0.1, -5.0),
        prop("f32_swapped", Ty::Float, Rt::Holding, 22, Dt::Float32).little_words().little_bytes(),
        prop("u32_max", Ty::Float, Rt::Holding, 30, Dt::Uint32),
        prop("nan", Ty::Float, Rt::Holding, 32, Dt::Float32),
        prop("bad_text", Ty::String, Rt::Holding, 34, Dt::String).count(2),
        prop("temp", Ty::Float, Rt::Input, 0, Dt::Uint16).scaled(0.1, 0.0),
        prop("in_f32", Ty::Float, Rt::Input, 1, Dt::Float32),
        prop("coil0", Ty::Bool, Rt::Coil, 0, Dt::Bool),
        prop("coil1", Ty::Bool, Rt::Coil, 1, Dt::Bool),
        prop("coil15", Ty::Bool, Rt::Coil, 15, Dt::Bool),
        prop("di1", Ty::Bool, Rt::DiscreteInput, 1, Dt::Bool),
    ]
}

#[tokio::test]
async fn reads_every_table_and_type_in_batched_requests() {
    if !peers_available("reads_every_table_and_type_in_batched_requests", false) {
        return;
    }
    let mut server = PyServer::tcp(&[]);
    let cfg = config("plc", tcp(server.port(), 1, "2s"), &catalogue());
    let mut d = ModbusDriver::new(&cfg).expect("driver");
    d.connect().await.expect("connect");
    let reads = read_all(&mut d).await;
    let got = values(&reads);
    let ok = |v: Value| Ok::<Value, String>(v);
    let want = vec![
        ("u16", ok(json!(1234))),
        ("i16", ok(json!(-5))),
        ("i32", ok(json!(-100_000))),
        ("u32", ok(json!(3_000_000_000u32))),
        ("f32_big", ok(json!(10.0))),
        ("f32_big_scaled", ok(json!(21.0))),
        ("f32_little", ok(json!(10.0))),
        ("f32_little_scaled", ok(json!(21.0))),
        ("f64", ok(json!(123.456))),
        ("text", ok(json!("HELLO"))),
        ("scaled", ok(json!(16.5))),
        ("f32_swapped", ok(json!(12.5))),
        ("u32_max", ok(json!(4_294_967_295.0))),
        ("temp", ok(json!(25.0))),
        ("in_f32", ok(json!(21.5))),
        ("coil0", ok(json!(true))),
        ("coil1", ok(json!(false))),
        ("coil15", ok(json!(true))),
        ("di1", ok(json!(true))),
    ];
    for (name, v) in &want {
        assert_eq!(&value_of(&reads, name), v, "{name}");
    }
    // Per-property decode errors; the rest of their request is fine.
    assert!(value_of(&reads, "nan").is_err_and(|e| e.contains("not a finite number")), "{got:?}");
    assert!(value_of(&reads, "bad_text").is_err_and(|e| e.contains("UTF-8")), "{got:?}");
    // One entry per property, in spec order, all with a timestamp.
    let names: Vec<String> = catalogue().into_iter().map(|p| p.name).collect();
    assert_eq!(reads.iter().map(|r| r.property.clone()).collect::<Vec<_>>(), names);

    // Adjacent and overlapping properties share requests: holding 0..10,
    // 13..24, 30..36; input 0..3; coils 0..2 and 15; discrete input 1.
    let reqs = server.requests();
    assert_eq!(d.requests_sent(), 7, "{reqs:#?}");
    let mut shapes: Vec<String> = reqs
        .iter()
        .map(|r| r.split_whitespace().filter(|w| !w.starts_with("unit=")).collect::<Vec<_>>().join(" "))
        .collect();
    shapes.sort();
    assert_eq!(
        shapes,
        [
            "REQ fc=1 addr=0 count=2",
            "REQ fc=1 addr=15 count=1",
            "REQ fc=2 addr=1 count=1",
            "REQ fc=3 addr=0 count=10",
            "REQ fc=3 addr=13 count=11",
            "REQ fc=3 addr=30 count=6",
            "REQ fc=4 addr=0 count=3",
        ]
    );
    assert!(reqs.iter().all(|r| r.contains("unit=1")), "unit id on every request: {reqs:?}");

    // Reading one property sends one request for just its registers.
    let one = d.read(&["f64".to_string()]).await.expect("read f64");
    assert_eq!(values(&one), vec![("f64".to_string(), Ok(json!(123.456)))]);
    let reqs = server.requests();
    assert_eq!(reqs.last().map(String::as_str), Some("REQ fc=3 unit=1 addr=13 count=4"));
    assert_eq!(d.requests_sent(), 8);

    // Unknown names are per-property errors.
    let ghost = d.read(&["ghost".to_string(), "u16".to_string()]).await.expect("read");
    assert!(value_of(&ghost, "ghost").is_err());
    assert_eq!(value_of(&ghost, "u16"), Ok(json!(1234)));
    d.disconnect().await;
}

#[tokio::test]
async fn unit_id_is_sent() {
    if !peers_available("unit_id_is_sent", false) {
        return;
    }
    let mut server = PyServer::tcp(&[]);
    let cfg = config("plc", tcp(server.port(), 17, "2s"), &[prop("u16", Ty::Int, Rt::Holding, 0, Dt::Uint16)]);
    let mut d = ModbusDriver::new(&cfg).expect("driver");
    d.connect().await.expect("connect");
    assert_eq!(value_of(&read_all(&mut d).await, "u16"), Ok(json!(1234)));
    assert_eq!(server.requests(), ["REQ fc=3 unit=17 addr=0 count=1"]);
}

#[tokio::test]
async fn writes_reach_the_datastore_and_read_back() {
    if !peers_available("writes_reach_the_datastore_and_read_back", false) {
        return;
    }
    let mut server = PyServer::tcp(&[]);
    let props = vec![
        prop("setpoint", Ty::Int, Rt::Holding, 10, Dt::Uint16).rw(),
        prop("level", Ty::Float, Rt::Holding, 11, Dt::Float32).rw().little_words().scaled(0.5, 0.0),
        prop("offset", Ty::Int, Rt::Holding, 24, Dt::Int32).rw(),
        prop("precise", Ty::Float, Rt::Holding, 26, Dt::Float64).rw(),
        prop("pump", Ty::Bool, Rt::Coil, 4, Dt::Bool).rw(),
        prop("temp", Ty::Float, Rt::Input, 0, Dt::Uint16),
        prop("beyond", Ty::Int, Rt::Holding, 150, Dt::Uint16).rw(),
    ];
    let mut d = ModbusDriver::new(&config("plc", tcp(server.port(), 1, "2s"), &props)).expect("driver");
    d.connect().await.expect("connect");
    let writes = [
        ("setpoint", json!(77)),
        ("level", json!(3.5)),
        ("offset", json!(-123_456)),
        ("precise", json!(-0.000123)),
        ("pump", json!(true)),
    ];
    for (name, v) in &writes {
        d.write(name, v).await.unwrap_or_else(|e| panic!("write {name}: {e}"));
        let back = d.read(&[name.to_string()]).await.expect("read back");
        assert_eq!(values(&back), vec![(name.to_string(), Ok(v.clone()))], "{name} read back");
    }
    // In the server's datastore: 77; 3.5/0.5 = 7.0 = 0x40E00000 in little
    // word order; -123456 = 0xFFFE1DC0; the coil set.
    assert_eq!(server.get("hr", 10, 3), [77, 0x0000, 0x40E0]);
    assert_eq!(server.get("hr", 24, 2), [0xFFFE, 0x1DC0]);
    assert_eq!(server.get("co", 4, 1), [1]);
    let reqs = server.requests();
    let fcs: Vec<&str> =
        reqs.iter().filter_map(|r| r.split_whitespace().nth(1)).filter(|f| *f != "fc=3" && *f != "fc=1").collect();
    assert_eq!(fcs, ["fc=6", "fc=16", "fc=16", "fc=16", "fc=5"], "single register, multiple registers, single coil");

    // Refusals: out of range, read-only table, illegal address. The device stays usable.
    let refused = |r: Result<(), WriteError>| match r {
        Err(WriteError::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(refused(d.write("setpoint", &json!(70_000)).await).contains("outside the range of uint16"));
    assert!(refused(d.write("setpoint", &json!(-1)).await).contains("outside the range"));
    assert!(refused(d.write("temp", &json!(1.0)).await).contains("read-only"));
    assert!(refused(d.write("beyond", &json!(1)).await).contains("Illegal data address"));
    assert!(refused(d.write("ghost", &json!(1)).await).contains("no property"));
    assert_eq!(server.get("hr", 10, 1), [77], "a refused write changes nothing");
    assert_eq!(value_of(&d.read(&["setpoint".into()]).await.expect("read"), "setpoint"), Ok(json!(77)));
}

#[tokio::test]
async fn an_exception_fails_only_the_bad_address() {
    if !peers_available("an_exception_fails_only_the_bad_address", false) {
        return;
    }
    let mut server = PyServer::tcp(&[]);
    // Holding registers end at 99: 98 and 99 are good, 100 is illegal, and
    // the three are adjacent, so the planned request covers all of them.
    let props = vec![
        prop("a", Ty::Int, Rt::Holding, 98, Dt::Uint16),
        prop("b", Ty::Int, Rt::Holding, 99, Dt::Uint16),
        prop("bad", Ty::Int, Rt::Holding, 100, Dt::Uint16),
        prop("elsewhere", Ty::Int, Rt::Holding, 0, Dt::Uint16),
        prop("coil_bad", Ty::Bool, Rt::Coil, 200, Dt::Bool),
    ];
    let mut d = ModbusDriver::new(&config("plc", tcp(server.port(), 1, "2s"), &props)).expect("driver");
    assert_eq!(d.plan().requests.len(), 3);
    d.connect().await.expect("connect");
    let reads = read_all(&mut d).await;
    assert_eq!(value_of(&reads, "a"), Ok(json!(0)));
    assert_eq!(value_of(&reads, "b"), Ok(json!(0)));
    assert_eq!(value_of(&reads, "elsewhere"), Ok(json!(1234)));
    let bad = value_of(&reads, "bad").expect_err("bad fails");
    assert!(bad.contains("0x02") && bad.contains("Illegal data address"), "{bad}");
    assert!(value_of(&reads, "coil_bad").is_err_and(|e| e.contains("Illegal data address")));
    // The batched request, then each of its properties alone.
    let reqs = server.requests();
    let holding_98: Vec<&String> = reqs.iter().filter(|r| r.contains("fc=3") && !r.contains("addr=0 ")).collect();
    assert_eq!(
        holding_98,
        [
            "REQ fc=3 unit=1 addr=98 count=3",
            "REQ fc=3 unit=1 addr=98 count=1",
            "REQ fc=3 unit=1 addr=99 count=1",
            "REQ fc=3 unit=1 addr=100 count=1"
        ]
    );
    // The connection survives exceptions.
    assert!(d.is_connected());
    assert_eq!(value_of(&read_all(&mut d).await, "a"), Ok(json!(0)));
}

#[tokio::test]
async fn a_killed_server_is_a_device_error_and_a_restarted_one_is_reached_again() {
    if !peers_available("a_killed_server_is_a_device_error_and_a_restarted_one_is_reached_again", false) {
        return;
    }
    // A port outside the ephemeral range: the server is restarted on it.
    let port_arg = yunbian_faults::ports::free_port().to_string();
    let mut server = PyServer::tcp(&["--port", &port_arg]);
    let port = server.port();
    let props = [prop("u16", Ty::Int, Rt::Holding, 0, Dt::Uint16), prop("coil0", Ty::Bool, Rt::Coil, 0, Dt::Bool)];
    let mut d = ModbusDriver::new(&config("plc", tcp(port, 1, "1s"), &props)).expect("driver");
    d.connect().await.expect("connect");
    assert_eq!(value_of(&read_all(&mut d).await, "u16"), Ok(json!(1234)));

    server.kill();
    let err = tokio::time::timeout(HANG_GUARD, d.read(&[])).await.expect("read ends").expect_err("server is gone");
    assert!(matches!(err, DriverError::Io(_) | DriverError::Protocol(_)), "{err:?}");
    assert!(!d.is_connected(), "a device-level error drops the connection");
    let again = d.read(&[]).await.expect_err("not connected");
    assert_eq!(again, DriverError::Io("not connected".into()));
    let refused = d.connect().await.expect_err("nobody listens");
    assert!(matches!(refused, DriverError::Connect(_)), "{refused:?}");

    let mut restarted = PyServer::tcp(&["--port", &port_arg]);
    assert_eq!(restarted.port(), port);
    d.connect().await.expect("connect to the restarted server");
    let reads = read_all(&mut d).await;
    assert_eq!(value_of(&reads, "u16"), Ok(json!(1234)));
    assert_eq!(value_of(&reads, "coil0"), Ok(json!(true)));
    assert_eq!(restarted.requests().len(), 2);
}

#[tokio::test]
async fn a_slow_server_times_out() {
    if !peers_available("a_slow_server_times_out", false) {
        return;
    }
    let mut server = PyServer::tcp(&[]);
    let props = [prop("u16", Ty::Int, Rt::Holding, 0, Dt::Uint16)];
    let mut d = ModbusDriver::new(&config("plc", tcp(server.port(), 1, "200ms"), &props)).expect("driver");
    d.connect().await.expect("connect");
    assert_eq!(value_of(&read_all(&mut d).await, "u16"), Ok(json!(1234)));
    // Every answer now takes 5 s, far beyond the 200 ms timeout.
    server.set_delay(5_000);
    let started = Instant::now();
    let err = tokio::time::timeout(HANG_GUARD, d.read(&[])).await.expect("read ends").expect_err("times out");
    assert_eq!(err, DriverError::Timeout(200));
    // It gave up on its own timeout, not when the late answer came.
    assert!(started.elapsed() < Duration::from_millis(5_000), "did not wait for the 5 s answer");
    assert!(!d.is_connected());
    let err = d.write("u16", &json!(1)).await;
    assert_eq!(err, Err(WriteError::Device(DriverError::Io("not connected".into()))));
    // Back to fast: a new connection works (the late answer went to the old one).
    server.set_delay(0);
    d.connect().await.expect("reconnect");
    assert_eq!(value_of(&read_all(&mut d).await, "u16"), Ok(json!(1234)));
}

// ---------------------------------------------------------------- bad devices

/// How the fake device answers a request (MBAP header fields and PDU).
type Answer = fn(tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8>;

/// A Modbus TCP device that answers every request with `answer`, and
/// closes the connection after answering when `close` is set.
async fn fake_device(answer: Answer, close: bool) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                loop {
                    let mut hdr = [0u8; 7];
                    if sock.read_exact(&mut hdr).await.is_err() {
                        return;
                    }
                    let len = usize::from(u16::from_be_bytes([hdr[4], hdr[5]])).saturating_sub(1);
                    let mut pdu = vec![0u8; len];
                    if sock.read_exact(&mut pdu).await.is_err() {
                        return;
                    }
                    let out = answer(u16::from_be_bytes([hdr[0], hdr[1]]), hdr[6], &pdu);
                    if sock.write_all(&out).await.is_err() {
                        return;
                    }
                    if close {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A well-formed MBAP frame around `pdu`.
fn frame(tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut out = tid.to_be_bytes().to_vec();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
    out.push(unit);
    out.extend_from_slice(pdu);
    out
}

#[tokio::test]
async fn bad_answers_are_device_errors_never_panics_or_hangs() {
    struct Case {
        what: &'static str,
        answer: Answer,
        close: bool,
        table: Rt,
    }
    let cases = [
        Case {
            what: "garbage",
            answer: |_, _, _| vec![0xDE, 0xAD, 0xBE, 0xEF, 0x00, 0x03, 0x01, 0xFF, 0xFF],
            close: false,
            table: Rt::Holding,
        },
        Case {
            what: "HTTP",
            answer: |_, _, _| b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
            close: true,
            table: Rt::Holding,
        },
        Case {
            what: "truncated frame, connection kept",
            answer: |tid, unit, _| frame(tid, unit, &[3, 4, 0x12, 0x34, 0x56, 0x78])[..9].to_vec(),
            close: false,
            table: Rt::Holding,
        },
        Case {
            what: "truncated frame, connection closed",
            answer: |tid, unit, _| frame(tid, unit, &[3, 4, 0x12, 0x34, 0x56, 0x78])[..9].to_vec(),
            close: true,
            table: Rt::Holding,
        },
        Case {
            what: "wrong transaction id",
            answer: |tid, unit, _| frame(tid.wrapping_add(1), unit, &[3, 4, 0x12, 0x34, 0x56, 0x78]),
            close: false,
            table: Rt::Holding,
        },
        Case {
            what: "wrong unit id",
            answer: |tid, unit, _| frame(tid, unit.wrapping_add(1), &[3, 4, 0x12, 0x34, 0x56, 0x78]),
            close: false,
            table: Rt::Holding,
        },
        Case {
            what: "wrong function code",
            answer: |tid, unit, _| frame(tid, unit, &[4, 4, 0x12, 0x34, 0x56, 0x78]),
            close: false,
            table: Rt::Holding,
        },
        Case {
            what: "unknown function code",
            answer: |tid, unit, _| frame(tid, unit, &[0x55, 1, 2, 3]),
            close: false,
            table: Rt::Holding,
        },
        Case {
            what: "absurd MBAP length",
            answer: |tid, unit, _| {
                let mut f = frame(tid, unit, &[3, 4, 0x12, 0x34, 0x56, 0x78]);
                f[4] = 0xFF;
                f[5] = 0xFF;
                f
            },
            close: false,
            table: Rt::Holding,
        },
        Case {
            what: "zero MBAP length",
            answer: |tid, _, _| vec![(tid >> 8) as u8, tid as u8, 0, 0, 0, 0, 1],
            close: false,
            table: Rt::Holding,
        },
        Case {
            what: "byte count beyond the frame",
            answer: |tid, unit, _| frame(tid, unit, &[3, 250, 0x12, 0x34]),
            close: false,
            table: Rt::Holding,
        },
        Case {
            what: "odd byte count",
            answer: |tid, unit, _| frame(tid, unit, &[3, 3, 0x12, 0x34, 0x56]),
            close: false,
            table: Rt::Holding,
        },
        Case {
            what: "fewer registers than asked",
            answer: |tid, unit, _| frame(tid, unit, &[3, 2, 0x12, 0x34]),
            close: false,
            table: Rt::Holding,
        },
        Case {
            what: "more registers than asked",
            answer: |tid, unit, _| frame(tid, unit, &[3, 6, 0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC]),
            close: false,
            table: Rt::Holding,
        },
        Case {
            what: "more coil bytes than asked",
            answer: |tid, unit, _| frame(tid, unit, &[1, 3, 0xFF, 0xFF, 0xFF]),
            close: false,
            table: Rt::Coil,
        },
        Case {
            what: "empty coil answer",
            answer: |tid, unit, _| frame(tid, unit, &[1, 0]),
            close: false,
            table: Rt::Coil,
        },
        Case { what: "silence, then close", answer: |_, _, _| Vec::new(), close: true, table: Rt::Holding },
        Case { what: "silence", answer: |_, _, _| Vec::new(), close: false, table: Rt::Holding },
    ];
    for case in cases {
        let port = fake_device(case.answer, case.close).await;
        let p: Prop = if case.table == Rt::Coil {
            prop("x", Ty::Bool, Rt::Coil, 0, Dt::Bool)
        } else {
            prop("x", Ty::Float, Rt::Holding, 0, Dt::Float32)
        };
        let mut d = ModbusDriver::new(&config("liar", tcp(port, 1, "300ms"), &[p])).expect("driver");
        d.connect().await.expect("connect");
        let outcome = tokio::time::timeout(HANG_GUARD, d.read(&[])).await;
        let err = match outcome {
            Err(_) => panic!("{}: read hung past its timeout", case.what),
            Ok(Ok(reads)) => panic!("{}: expected a device error, got {reads:?}", case.what),
            Ok(Err(e)) => e,
        };
        assert!(
            matches!(err, DriverError::Protocol(_) | DriverError::Io(_) | DriverError::Timeout(300)),
            "{}: {err:?}",
            case.what
        );
        assert!(!d.is_connected(), "{}: the connection is dropped", case.what);
        println!("{}: {err}", case.what);
    }
}

#[tokio::test]
async fn an_unknown_exception_code_is_a_property_error() {
    let port = fake_device(|tid, unit, pdu| frame(tid, unit, &[pdu[0] | 0x80, 0x99]), false).await;
    let p = prop("x", Ty::Int, Rt::Holding, 0, Dt::Uint16);
    let mut d = ModbusDriver::new(&config("odd", tcp(port, 1, "300ms"), &[p])).expect("driver");
    d.connect().await.expect("connect");
    let reads = d.read(&[]).await.expect("an exception is not a device error");
    assert!(value_of(&reads, "x").is_err_and(|e| e.contains("0x99")), "{reads:?}");
    assert!(d.is_connected());
}

#[tokio::test]
async fn configuration_errors() {
    let cfg = config("v", yunbian_api::Protocol::Virtual(Default::default()), &[]);
    assert!(matches!(ModbusDriver::new(&cfg), Err(DriverError::Config(_))));
    let cfg = config("h", tcp(502, 1, "1s"), &[prop("x", Ty::Int, Rt::Holding, 0, Dt::Uint16)]);
    let mut d = ModbusDriver::new(&cfg).expect("driver");
    assert_eq!(d.read(&[]).await, Err(DriverError::Io("not connected".into())));
}
