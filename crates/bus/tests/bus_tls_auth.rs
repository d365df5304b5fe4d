//! TLS listeners and authentication against real peers: paho-mqtt and
//! mosquitto clients verifying our server certificate against a test CA
//! (made with rcgen), user name/password accepted and wrong passwords
//! refused (v3.1.1 CONNACK 5, which paho reports as 135, v5 0x86), and a listener that requires client
//! certificates (a client without one cannot connect).
//!
//! Missing peers: the test panics when `CI` is set, else prints `SKIP:`.

mod support;

use serde_json::Value;
use support::*;
use yunbian_bus::{Auth, DropReason, Limits, ListenerConfig, TlsConfig, Users};

async fn paho(test: &str, port: u16, args: &[&str]) -> Option<Value> {
    let py = require_paho(test)?;
    let script = peers_dir().join("paho_peer.py");
    let port = port.to_string();
    let mut full = vec![script.to_str().expect("utf-8 path"), args[0], "--port", &port];
    full.extend(&args[1..]);
    let (ok, out, err) = run(&py, &full).await;
    assert!(ok, "paho {args:?} failed: {err}\n{out}");
    Some(serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("paho printed {out:?}: {e}")))
}

fn tls_listener(files: &TlsFiles, client_ca: bool) -> ListenerConfig {
    let mut l = plain_listener();
    l.tls = Some(TlsConfig {
        cert_chain_pem: files.server_cert_pem.clone(),
        key_pem: files.server_key_pem.clone(),
        client_ca_pem: client_ca.then(|| files.ca_pem.clone()),
    });
    l
}

#[tokio::test]
async fn tls_listener_is_verified_by_clients() {
    let files = TlsFiles::generate("device-1");
    let broker = start_with(vec![plain_listener(), tls_listener(&files, false)], Limits::default()).await;
    let tls_port = broker.local_addrs()[1].port();
    let ca = files.path("ca.pem");
    let Some(v) = paho("tls_listener", tls_port, &["tls-roundtrip", "--tls-ca", &ca]).await else { return };
    assert_eq!(v["payload"], "secure");
    // mosquitto clients with --cafile, across both listeners: TLS in, plain out.
    let (Some(publ), Some(sub)) =
        (require_bin("mosquitto_pub", "tls_listener"), require_bin("mosquitto_sub", "tls_listener"))
    else {
        return;
    };
    let plain_port = broker.local_addrs()[0].port().to_string();
    let before = broker.stats().subscriptions;
    let h = tokio::spawn(async move {
        run(&sub, &["-h", "127.0.0.1", "-p", &plain_port, "-t", "tls/x", "-C", "1", "-W", "15", "-F", "%p"]).await
    });
    wait_until("subscribed", || broker.stats().subscriptions > before).await;
    let port = tls_port.to_string();
    let (ok, _, err) =
        run(&publ, &["-h", "127.0.0.1", "-p", &port, "--cafile", &ca, "-t", "tls/x", "-m", "via-tls"]).await;
    assert!(ok, "mosquitto_pub over TLS: {err}");
    assert_eq!(h.await.expect("sub").1.trim(), "via-tls");
    // A client that does not trust our CA refuses the server.
    let other = TlsFiles::generate("x");
    let (ok, _, _) =
        run(&publ, &["-h", "127.0.0.1", "-p", &port, "--cafile", &other.path("ca.pem"), "-t", "tls/x", "-m", "no"])
            .await;
    assert!(!ok, "a client with another CA must not connect");
    broker.shutdown().await;
}

#[tokio::test]
async fn passwords_accepted_and_refused() {
    let users = Users::new().with_password("alice", "s3cret").expect("hash");
    let mut l = plain_listener();
    l.auth = Auth::Password(users);
    let broker = start_with(vec![l], Limits::default()).await;
    let port = broker.local_addrs()[0].port();
    let cases = [
        ("3", "s3cret", 0),
        ("5", "s3cret", 0),
        // paho 2.x reports the v3.1.1 return code 5 as reason code 135.
        ("3", "wrong", 135),
        ("5", "wrong", 0x86),
    ];
    for (version, password, want) in cases {
        let Some(v) =
            paho("passwords", port, &["connect", "--version", version, "--username", "alice", "--password", password])
                .await
        else {
            return;
        };
        assert_eq!(v["code"], want, "v{version} password {password}: {v}");
    }
    // No credentials at all.
    let Some(v) = paho("passwords", port, &["connect", "--version", "5"]).await else { return };
    assert_eq!(v["code"], 0x86, "{v}");
    assert_eq!(broker.stats().dropped(DropReason::AuthFailed), 3);
    if let Some(publ) = require_bin("mosquitto_pub", "passwords") {
        let p = port.to_string();
        let ok = |pw: &'static str| {
            let publ = publ.clone();
            let p = p.clone();
            async move { run(&publ, &["-h", "127.0.0.1", "-p", &p, "-u", "alice", "-P", pw, "-t", "a", "-m", "x"]).await }
        };
        assert!(ok("s3cret").await.0, "right password refused");
        let (success, _, err) = ok("nope").await;
        assert!(!success, "wrong password accepted");
        assert!(err.to_lowercase().contains("not authori"), "mosquitto_pub said: {err}");
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn client_certificate_required() {
    let files = TlsFiles::generate("device-7");
    // Password auth on the listener: a verified certificate is enough.
    let mut l = tls_listener(&files, true);
    l.auth = Auth::Password(Users::new());
    let broker = start_with(vec![l], Limits::default()).await;
    let port = broker.local_addrs()[0].port();
    let (ca, cert, key) = (files.path("ca.pem"), files.path("client.pem"), files.path("client.key"));
    let Some(v) = paho("client_cert", port, &["tls-roundtrip", "--tls-ca", &ca, "--cert", &cert, "--key", &key]).await
    else {
        return;
    };
    assert_eq!(v["payload"], "secure");
    let Some(v) = paho("client_cert", port, &["connect", "--tls-ca", &ca]).await else { return };
    assert!(v.get("error").is_some() || v["code"] != 0, "connected without a client certificate: {v}");
    if let Some(publ) = require_bin("mosquitto_pub", "client_cert") {
        let p = port.to_string();
        let base = ["-h", "127.0.0.1", "-p", p.as_str(), "--cafile", ca.as_str(), "-t", "c", "-m", "x"];
        let mut with_cert = base.to_vec();
        with_cert.extend(["--cert", cert.as_str(), "--key", key.as_str()]);
        let (ok, _, err) = run(&publ, &with_cert).await;
        assert!(ok, "mosquitto_pub with a client certificate: {err}");
        assert!(!run(&publ, &base).await.0, "mosquitto_pub without a client certificate connected");
    }
    broker.shutdown().await;
}
