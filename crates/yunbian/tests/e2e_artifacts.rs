//! Artifacts end to end, through the `yunbian` binary against a real cloud
//! process: push an ELF executable, a tar.gz bundle, a wasm module and an
//! OCI image layout; list and describe them; resume a push killed half-way;
//! sign; delete and collect the chunks.
//!
//! The registry side only: nothing here involves an agent. Edges pulling
//! and running artifacts (trust policy, bundles, wasm and OCI apps) are in
//! `e2e_artifact_apps.rs`; pulls, resumption and offline import against a
//! fake source in `crates/edge/tests/artifacts_pull.rs`; P2P in
//! `crates/edge/tests/p2p.rs`.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{Cluster, Guard};

fn chunk_files(c: &Cluster) -> usize {
    chunk_paths(c).len()
}

/// The stored chunk files, sorted.
fn chunk_paths(c: &Cluster) -> Vec<std::path::PathBuf> {
    let root = c.cloud_dir.join("blobs/sha256");
    let Ok(fans) = std::fs::read_dir(&root) else { return Vec::new() };
    let mut v: Vec<std::path::PathBuf> = fans
        .flatten()
        .flat_map(|f| std::fs::read_dir(f.path()).into_iter().flatten().flatten().map(|e| e.path()))
        .collect();
    v.sort();
    v
}

/// `(chunks, uploaded)` from the push summary line.
fn counts(out: &str) -> (usize, usize) {
    let after = |key: &str| -> usize {
        let i = out.find(key).unwrap_or_else(|| panic!("{key:?} in {out:?}"));
        out[..i].split_whitespace().last().and_then(|n| n.trim_start_matches('(').parse().ok()).expect("a number")
    };
    (after(" chunks"), after(" uploaded"))
}

fn sh(script: &str, dir: &Path) {
    let st = Command::new("sh").arg("-c").arg(script).current_dir(dir).status().expect("sh");
    assert!(st.success(), "{script}");
}

#[test]
fn push_describe_resume_sign_delete() {
    let c = Cluster::start("artifacts");
    let work = c.dir.join("work");
    std::fs::create_dir_all(work.join("bundle")).expect("mkdir");
    let exe = work.join("true");
    std::fs::copy("/bin/true", &exe).expect("copy /bin/true");
    std::fs::write(work.join("bundle/run.sh"), "#!/bin/sh\necho hi\n").expect("write");
    sh("tar czf app.tar.gz -C bundle run.sh", &work);
    std::fs::create_dir_all(work.join("oci/blobs/sha256")).expect("mkdir");
    std::fs::write(work.join("oci/oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("write");
    std::fs::write(work.join("oci/index.json"), r#"{"schemaVersion":2,"manifests":[]}"#).expect("write");
    sh("tar cf image.tar -C oci oci-layout index.json blobs", &work);
    let wasm = work.join("mod.wasm");
    std::fs::write(&wasm, b"\0asm\x01\0\0\0").expect("write");
    let p = |f: &str| work.join(f).display().to_string();

    // Types and platforms are inferred from the files.
    let out = c.cli(&["artifact", "push", &p("true"), "--name", "tool", "--version", "1.0"]);
    assert!(out.ok().contains("executable"), "{out:?}");
    let arch = if cfg!(target_arch = "aarch64") { "linux/arm64" } else { "linux/amd64" };
    assert!(out.stdout.contains(arch), "{out:?}");
    let out = c.cli(&["artifact", "push", &p("mod.wasm"), "--name", "tool", "--version", "1.0"]);
    assert!(out.ok().contains("(wasi/wasm32): wasm"), "{out:?}");
    let out = c.cli(&["artifact", "push", &p("app.tar.gz"), "--name", "bundle", "--version", "0.1"]);
    assert!(out.ok().contains("bundle"), "{out:?}");
    let out = c.cli(&["artifact", "push", &p("image.tar"), "--name", "image", "--version", "3"]);
    assert!(out.ok().contains(": oci "), "{out:?}");
    let out =
        c.cli(&["artifact", "push", &p("true"), "--name", "tool", "--version", "1.0", "--platform", "wasi/wasm32"]);
    assert!(out.err().contains("wasm"), "{out:?}");

    let list = c.cli(&["artifact", "list"]);
    for want in ["tool--1-0", "bundle--0-1", "image--3", "wasi/wasm32"] {
        assert!(list.ok().contains(want), "{want} in {list:?}");
    }
    let describe = c.cli(&["artifact", "describe", "tool", "--version", "1.0"]);
    let expected_sha = {
        let o = Command::new("sha256sum").arg(&exe).output().expect("sha256sum");
        String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or_default().to_string()
    };
    assert!(describe.ok().contains(&expected_sha), "{describe:?}");
    assert!(describe.stdout.contains("<unsigned>"), "{describe:?}");
    assert!(c.cli(&["get", "artifacts", "-o", "wide"]).ok().contains("wasi/wasm32=wasm"));

    // A 40 MiB push killed half-way resumes: the second run sends only
    // what the first did not.
    let big = work.join("big.bin");
    // Pseudo-random, so no two chunks are alike.
    let bytes = harness::noise(40 << 20, 0x9e37_79b9_7f4a_7c15);
    std::fs::write(&big, &bytes).expect("write big");
    let before = chunk_paths(&c);
    let mut cmd =
        c.cli_command(&["artifact", "push", &p("big.bin"), "--name", "big", "--version", "1", "--type", "bundle"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = Guard(cmd.spawn().expect("spawn push"));
    let t0 = Instant::now();
    while chunk_paths(&c) == before && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.0.kill();
    let _ = child.0.wait();
    // The killed push never got as far as the Artifact.
    assert!(!c.cli(&["artifact", "describe", "big", "--version", "1"]).success(), "the push was not complete yet");
    // Over loopback it may have sent every chunk before the kill landed:
    // make the interruption deterministic by losing the later half of
    // what it sent, if it sent more than one (as if the link had dropped).
    // Requests the cloud had already received finish after the kill (an
    // fsync can take a while on a loaded disk): wait until nothing is being
    // written and the stored set has not changed for 10 polls (2 s); give
    // up after 600 polls.
    let mut last = chunk_paths(&c);
    let mut quiet = 0;
    let tmp = c.cloud_dir.join("blobs/tmp");
    for poll in 0.. {
        let writing = std::fs::read_dir(&tmp).is_ok_and(|mut d| d.next().is_some());
        if quiet >= 10 && !writing {
            break;
        }
        assert!(poll < 600, "the cloud kept writing chunks after the push was killed");
        std::thread::sleep(Duration::from_millis(200));
        let now = chunk_paths(&c);
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
    let sent: Vec<_> = last.into_iter().filter(|p| !before.contains(p)).collect();
    assert!(!sent.is_empty(), "the first push sent something before it was killed");
    let lost = sent.len() / 2;
    for p in &sent[..lost] {
        std::fs::remove_file(p).expect("lose a chunk");
    }
    let out = c.cli(&["artifact", "push", &p("big.bin"), "--name", "big", "--version", "1", "--type", "bundle"]);
    let (chunks, uploaded) = counts(out.ok());
    assert_eq!(chunks, 10, "{out:?}");
    // Exactly what was missing is sent again: the chunks never sent and the lost ones.
    assert_eq!(uploaded, chunks - (sent.len() - lost), "{out:?}");
    assert!(uploaded < chunks, "the chunks still there were not sent again: {out:?}");
    let describe = c.cli(&["artifact", "describe", "big", "--version", "1"]);
    assert!(describe.ok().contains("Chunks:     10"), "{describe:?}");

    // Signing.
    let key: PathBuf = work.join("publisher.key");
    let out = c.cli(&["artifact", "keygen", "--out", &key.display().to_string()]);
    let key_id = out.ok().split_whitespace().nth(2).expect("key id").to_string();
    assert_eq!(key_id.len(), 16, "{out:?}");
    let out = c.cli(&["artifact", "sign", "tool", "--version", "1.0", "--key", &key.display().to_string()]);
    assert!(out.ok().contains(&key_id), "{out:?}");
    let describe = c.cli(&["artifact", "describe", "tool", "--version", "1.0"]);
    assert!(describe.ok().contains(&format!("Signed by:  {key_id}")), "{describe:?}");

    // Delete everything; an explicit sweep with no grace leaves no chunk.
    for (name, version) in [("tool", "1.0"), ("bundle", "0.1"), ("image", "3"), ("big", "1")] {
        c.cli(&["artifact", "delete", name, "--version", version]).ok();
    }
    let out = c.cli(&["artifact", "gc", "--grace", "0s"]);
    assert!(out.ok().contains("removed"), "{out:?}");
    assert_eq!(chunk_files(&c), 0);
    let out = c.cli(&["artifact", "describe", "tool", "--version", "1.0"]);
    assert!(out.err().contains("not found"), "{out:?}");
}
