//! From desired instances to what the process runtime runs
//! (docs/design/012-artifacts.md, "Running artifacts").
//!
//! Every workload runs as a native process under the process runtime, which
//! owns logs, restarts, limits and re-adoption after an agent restart. The
//! launcher turns an instance into such a process:
//!
//! - `runtime: process` without an artifact: unchanged;
//! - `runtime: process` with an `executable` artifact: the pulled blob is
//!   the program (`process.args` are its arguments);
//! - `runtime: process` with a `bundle`: `process.command[0]` is a path in
//!   the unpacked bundle (or an absolute host path); the working directory
//!   defaults to the bundle's root, and `YUNBIAN_BUNDLE_DIR` names it;
//! - `runtime: wasm`: `yunbian shim wasm --module <blob> …` (wasmtime in a
//!   shim process, so a faulty module cannot take the agent down and the
//!   instance survives agent restarts like any process);
//! - `runtime: oci`: `yunbian shim oci --layout <unpacked layout> …`, which
//!   prepares the bundle and runs crun in the foreground.
//!
//! # Pulls
//!
//! An instance that needs an artifact is held back until the artifact is
//! resolved, allowed by the node's trust policy, and pulled. Pulls start as
//! soon as an instance is desired (pre-pull) and run in the background, one
//! per reference whatever the number of instances using it; while one runs,
//! its instances report `Pending` / `Pulling` with `Pulling 37 % of …`. A
//! failed pull is retried with back-off (5 s doubling to 5 min) and its
//! instances say why; a refusal by the trust policy is a `Failed` instance
//! with the reason (`SignatureRequired`, `UntrustedSigner`,
//! `BadSignature`), looked at again when the policy changes.
//!
//! The blob an instance runs is marked in use in the cache for as long as
//! the instance is desired, so the cache's collection never removes it.
//!
//! # Devices
//!
//! An instance whose template asks for extended resources
//! (`devices: {yunbian.io/gpu: 1}`) is first granted devices by the node's
//! [`DeviceRegistry`] (docs/design/017-device-plugins.md): the grant's
//! variables (`YUNBIAN_DEVICES_YUNBIAN_IO_GPU=0`, the plugin's own such as
//! `NVIDIA_VISIBLE_DEVICES=0`) are added to its environment. Without
//! enough healthy free devices it stays `Pending` / `InsufficientDevices`
//! with what is missing, and is looked at again when the devices change.
//! Grants are released once the instance is no longer desired
//! ([`Launcher::release_devices`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use yunbian_api::artifact::WASM_PLATFORM;
use yunbian_api::{
    signing_statement, AppInstance, AppInstanceStatus, ArtifactRef, BlobType, InstancePhase, NodeGroupSpec, NodeInfo,
    ProcessSpec, RuntimeKind, TrustedKey,
};
use yunbian_artifacts::Digest;
use yunbian_runtime::StatusUpdate;

use crate::artifacts::{ArtifactCache, LocalBlob, PullError, PullProgress, Resolved};
use crate::device_plugins::{grant_env, AllocateError, DeviceRegistry};

/// Memory the wasm shim itself needs beside the guest's linear memory
/// (wasmtime, the compiled code, WASI): added to the cgroup limit of the
/// shim's process, while the guest is held to the App's limit by wasmtime.
pub const WASM_SHIM_OVERHEAD: u64 = 128 << 20;

/// What the node can run, and where the shims keep their caches.
#[derive(Debug, Clone, Default)]
pub struct LauncherOptions {
    /// The `yunbian` executable that provides `yunbian shim …`.
    pub shim_exe: Option<PathBuf>,
    /// Whether that executable was built with the wasm runtime.
    pub wasm: bool,
    /// crun, as detected (`Ok(version text)`), or why the oci runtime is
    /// unavailable.
    pub oci: Option<Result<String, String>>,
    /// Compiled-module cache of the wasm shim.
    pub wasm_cache: PathBuf,
    /// Layer cache, bundles and crun state of the oci shim.
    pub oci_dir: PathBuf,
    /// Environment every workload gets from its node (broker, device API).
    pub node_env: Vec<(String, String)>,
    /// The node's name.
    pub node: String,
}

/// The runtimes a node may offer through the launcher, in the order they
/// are reported.
const RUNTIMES: [RuntimeKind; 3] = [RuntimeKind::Process, RuntimeKind::Wasm, RuntimeKind::Oci];

impl LauncherOptions {
    /// The runtimes this node offers, for scheduling.
    pub fn runtimes(&self) -> Vec<&'static str> {
        RUNTIMES.into_iter().filter(|r| self.unavailable(*r).is_none()).map(RuntimeKind::as_str).collect()
    }

    /// The runtimes this node does not offer, each with the reason (crun
    /// missing, wasm not built in): what `NodeInfo.unavailableRuntimes`
    /// reports and the agent logs at start. Together with
    /// [`runtimes`](Self::runtimes) it names every runtime once.
    pub fn unavailable_runtimes(&self) -> BTreeMap<String, String> {
        RUNTIMES.into_iter().filter_map(|r| Some((r.as_str().to_string(), self.unavailable(r)?))).collect()
    }

    /// Why this node cannot run `runtime`, or `None` when it can.
    pub fn unavailable(&self, runtime: RuntimeKind) -> Option<String> {
        match runtime {
            RuntimeKind::Process | RuntimeKind::Fake => None,
            _ if self.shim_exe.is_none() => Some("no shim executable is configured".into()),
            RuntimeKind::Wasm if !self.wasm => {
                Some("the wasm runtime is not built into this agent (build with --features wasm)".into())
            }
            RuntimeKind::Oci => match &self.oci {
                Some(Ok(_)) => None,
                Some(Err(why)) => Some(format!("the oci runtime is unavailable: {why}")),
                None => Some("the oci runtime is not enabled on this agent".into()),
            },
            _ => None,
        }
    }
}

/// The artifact publishers a node accepts: the union of its groups' keys;
/// a signature is required if any of its groups requires one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustPolicy {
    /// Refuse unsigned artifacts and artifacts signed by unknown keys.
    pub require_signature: bool,
    /// Trusted keys.
    pub keys: Vec<TrustedKey>,
}

impl TrustPolicy {
    /// The policy of a node in these groups.
    pub fn of_groups<'a>(groups: impl IntoIterator<Item = &'a NodeGroupSpec>) -> TrustPolicy {
        let mut p = TrustPolicy::default();
        for g in groups {
            if let Some(t) = &g.trust {
                p.require_signature |= t.require_signature;
                for k in &t.keys {
                    if !p.keys.iter().any(|have| have.public_key.eq_ignore_ascii_case(&k.public_key)) {
                        p.keys.push(k.clone());
                    }
                }
            }
        }
        p
    }

    /// Whether the node may run this blob: `Ok(signer)` (the trusted key
    /// whose signature verified, if any), or the refusal as (reason,
    /// message).
    pub fn check(&self, r: &Resolved) -> Result<Option<String>, (&'static str, String)> {
        let b = &r.blob;
        let statement =
            signing_statement(&r.artifact.spec.name, &r.artifact.spec.version, &r.platform, b.kind, &b.sha256, b.size);
        let mut bad = None;
        for sig in &b.signatures {
            for k in &self.keys {
                if yunbian_artifacts::signing::key_id(&unhex(&k.public_key)) != sig.key_id {
                    continue;
                }
                match yunbian_artifacts::signing::verify_hex(&k.public_key, statement.as_bytes(), &sig.signature) {
                    Ok(()) => return Ok(Some(key_label(k))),
                    Err(_) => bad = Some(key_label(k)),
                }
            }
        }
        if !self.require_signature {
            return Ok(None);
        }
        let what = format!("{} ({})", r.label(), r.platform);
        let trusted = self.keys.iter().map(key_label).collect::<Vec<_>>().join(", ");
        if let Some(k) = bad {
            return Err((
                "BadSignature",
                format!(
                    "{what}: the signature by trusted key {k} does not verify (the blob or its statement was altered)"
                ),
            ));
        }
        if b.signatures.is_empty() {
            return Err((
                "SignatureRequired",
                format!("{what} is unsigned; this node requires a signature by one of: {trusted}"),
            ));
        }
        let ids = b.signatures.iter().map(|s| s.key_id.as_str()).collect::<Vec<_>>().join(", ");
        Err((
            "UntrustedSigner",
            format!("{what} is signed by key {ids}, which this node does not trust (trusted: {trusted})"),
        ))
    }
}

fn key_label(k: &TrustedKey) -> String {
    let id = yunbian_artifacts::signing::key_id(&unhex(&k.public_key));
    if k.name.is_empty() {
        id
    } else {
        format!("{} ({id})", k.name)
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| s.get(2 * i..2 * i + 2).and_then(|p| u8::from_str_radix(p, 16).ok())).collect()
}

/// The state of one reference's pull.
enum Pull {
    Running {
        progress: Arc<PullProgress>,
    },
    Ready {
        resolved: Box<Resolved>,
        blob: LocalBlob,
    },
    Failed {
        phase: InstancePhase,
        reason: &'static str,
        message: String,
        retry_at: Instant,
        attempts: u32,
        trust: bool,
    },
}

/// What a pull is for: the reference, and whether the wasm blob is wanted
/// (`runtime: wasm`) rather than this node's platform's.
type PullKey = (ArtifactRef, bool);

#[derive(Default)]
struct State {
    pulls: HashMap<PullKey, Pull>,
    /// Instances waiting for a reference.
    waiting: HashMap<String, PullKey>,
    /// Instances the runtime already runs (adopted after an agent restart,
    /// or an earlier version): no `Pending` status is sent over theirs.
    quiet: HashSet<String>,
    /// Instances the launcher sent a status for and then handed to the
    /// runtime: the runtime's own status is sent again after `ensure`.
    handed: HashSet<String>,
    /// The blob each launched instance holds in use.
    holding: HashMap<String, Digest>,
    /// The last status sent per waiting instance, not to repeat it.
    sent: HashMap<String, AppInstanceStatus>,
    trust: TrustPolicy,
}

/// Prepares instances for the process runtime (see the module docs).
pub struct Launcher {
    cache: Option<Arc<ArtifactCache>>,
    opts: LauncherOptions,
    state: Mutex<State>,
    status_tx: mpsc::UnboundedSender<StatusUpdate>,
    wake: Arc<Notify>,
    /// Tells the P2P tracker what this node holds, when it serves peers.
    announcer: Mutex<Option<Arc<crate::p2p::Announcer>>>,
    /// Grants devices of the node's device plugins, when it has any.
    devices: Mutex<Option<Arc<DeviceRegistry>>>,
}

/// First retry delay of a failed pull; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// Longest retry delay of a failed pull.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// When an artifact the trust policy refused is read again.
const TRUST_RETRY: Duration = Duration::from_secs(15);

impl Launcher {
    /// A launcher pulling through `cache` (none: artifacts are refused),
    /// reporting pull states on `status_tx`.
    pub fn new(
        cache: Option<Arc<ArtifactCache>>,
        opts: LauncherOptions,
        status_tx: mpsc::UnboundedSender<StatusUpdate>,
    ) -> Arc<Launcher> {
        Arc::new(Launcher {
            cache,
            opts,
            state: Mutex::new(State::default()),
            status_tx,
            wake: Arc::new(Notify::new()),
            announcer: Mutex::new(None),
            devices: Mutex::new(None),
        })
    }

    /// Notified when a pull ends: the reconciler should call
    /// [`prepare`](Self::prepare) again.
    pub fn woken(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// The options.
    pub fn options(&self) -> &LauncherOptions {
        &self.opts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The announcer to poke after each pull (the node serves peers).
    pub fn set_announcer(&self, a: Arc<crate::p2p::Announcer>) {
        *self.announcer.lock().unwrap_or_else(|e| e.into_inner()) = Some(a);
    }

    /// The registry that grants instances their devices; instances asking
    /// for devices wait until one is set.
    pub fn set_devices(&self, registry: Arc<DeviceRegistry>) {
        *self.devices.lock().unwrap_or_else(|e| e.into_inner()) = Some(registry);
    }

    fn registry(&self) -> Option<Arc<DeviceRegistry>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `info` with the devices the node's plugins registered now (unchanged
    /// without a registry).
    pub fn node_info(&self, info: &NodeInfo) -> NodeInfo {
        let mut out = info.clone();
        if let Some(r) = self.registry() {
            out.devices = r.devices();
        }
        out
    }

    /// Frees the devices granted to instances `keep` refuses (no longer
    /// desired, once the node knows what it should run).
    pub fn release_devices(&self, keep: impl Fn(&str) -> bool) {
        if let Some(r) = self.registry() {
            r.release_unless(keep);
        }
    }

    /// The node's groups changed: their trust policy and the site the node
    /// announces to the P2P tracker.
    pub fn set_groups(&self, groups: &[(String, NodeGroupSpec)]) {
        self.set_trust(TrustPolicy::of_groups(groups.iter().map(|(_, g)| g)));
        if let Some(a) = self.announcer.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            a.set_site(crate::p2p::site_of_groups(groups));
        }
    }

    /// Replaces the trust policy. Refusals and launched artifacts are looked
    /// at again under the new one.
    pub fn set_trust(&self, policy: TrustPolicy) {
        let mut st = self.lock();
        if st.trust == policy {
            return;
        }
        tracing::info!(require = policy.require_signature, keys = policy.keys.len(), "artifact trust policy changed");
        st.trust = policy;
        st.pulls.retain(|_, p| !matches!(p, Pull::Failed { trust: true, .. }));
        drop(st);
        self.wake.notify_one();
    }

    /// Forgets instances no longer desired: their pulls' waiting entries
    /// and their blobs' in-use marks.
    pub fn retain(&self, desired: &HashSet<&str>) {
        let mut st = self.lock();
        st.waiting.retain(|i, _| desired.contains(i.as_str()));
        st.sent.retain(|i, _| desired.contains(i.as_str()));
        let gone: Vec<String> = st.holding.keys().filter(|i| !desired.contains(i.as_str())).cloned().collect();
        for i in gone {
            if let (Some(d), Some(c)) = (st.holding.remove(&i), &self.cache) {
                c.unmark_in_use(&d);
            }
        }
        st.quiet.retain(|i| desired.contains(i.as_str()));
        st.handed.retain(|i| desired.contains(i.as_str()));
        let used: HashSet<PullKey> = st.waiting.values().cloned().collect();
        // Finished pulls nobody waits for are dropped; running ones finish.
        let unused: Vec<PullKey> = st
            .pulls
            .iter()
            .filter(|(r, p)| !used.contains(*r) && !matches!(p, Pull::Running { .. }))
            .map(|(r, _)| r.clone())
            .collect();
        for r in unused {
            if let (Some(p), Some(c)) = (st.pulls.remove(&r), &self.cache) {
                release(c, &p);
            }
        }
    }

    /// The instance to hand to the process runtime, or `None` while it is
    /// being prepared or cannot run (its status says why).
    ///
    /// `running`: the runtime already runs an instance of this name (after
    /// an agent restart, or a previous template), so waiting for a pull is
    /// not reported over its status.
    pub fn prepare(self: &Arc<Self>, inst: &AppInstance, running: bool) -> Option<AppInstance> {
        let name = inst.metadata.name.clone();
        if !inst.spec.template.devices.is_empty() {
            self.set_quiet(&name, running);
        }
        let inst = self.with_devices(inst)?;
        let inst = inst.as_ref();
        let t = &inst.spec.template;
        if matches!(t.runtime, RuntimeKind::Process | RuntimeKind::Fake) && t.artifact.is_none() {
            let mut st = self.lock();
            // It waited for devices: the runtime's status replaces that.
            if st.sent.remove(&name).is_some() {
                st.handed.insert(name);
            }
            return Some(inst.clone());
        }
        self.set_quiet(&name, running);
        if let Some(why) = self.opts.unavailable(t.runtime) {
            self.report(&name, InstancePhase::Failed, "RuntimeUnavailable", why);
            return None;
        }
        let Some(r) = t.artifact.clone() else {
            self.report(
                &name,
                InstancePhase::Failed,
                "NoArtifact",
                format!("runtime {} needs an artifact", t.runtime.as_str()),
            );
            return None;
        };
        let Some(cache) = self.cache.clone() else {
            self.report(&name, InstancePhase::Failed, "NoArtifactCache", "this agent cannot pull artifacts".into());
            return None;
        };
        let r: PullKey = (r, t.runtime == RuntimeKind::Wasm);
        let mut st = self.lock();
        st.waiting.insert(name.clone(), r.clone());
        let now = Instant::now();
        let start = match st.pulls.get(&r) {
            None => true,
            Some(Pull::Failed { retry_at, .. }) => now >= *retry_at,
            _ => false,
        };
        if start {
            let attempts = match st.pulls.get(&r) {
                Some(Pull::Failed { attempts, .. }) => *attempts,
                _ => 0,
            };
            let progress = Arc::new(PullProgress::default());
            st.pulls.insert(r.clone(), Pull::Running { progress: progress.clone() });
            let trust = st.trust.clone();
            drop(st);
            self.report(&name, InstancePhase::Pending, "Pulling", format!("Pulling {}: resolving", r.0));
            let me = self.clone();
            tokio::spawn(async move { me.run_pull(cache, r, trust, progress, attempts).await });
            return None;
        }
        match st.pulls.get(&r) {
            Some(Pull::Ready { blob, .. })
                if !blob.path.exists() || blob.unpacked.as_ref().is_some_and(|u| !u.is_dir()) =>
            {
                // Removed behind our back (by hand, or a full disk): pull again.
                tracing::warn!(artifact = %r.0, path = %blob.path.display(), "a pulled artifact is gone from the cache; pulling it again");
                if let Some(p) = st.pulls.remove(&r) {
                    release(&cache, &p);
                }
                drop(st);
                self.wake.notify_one();
                None
            }
            Some(Pull::Ready { resolved, blob }) => {
                // The policy may have changed since the pull.
                if let Err((reason, message)) = st.trust.check(resolved) {
                    let old = st.pulls.insert(
                        r.clone(),
                        Pull::Failed {
                            phase: InstancePhase::Failed,
                            reason,
                            message: message.clone(),
                            retry_at: now + TRUST_RETRY,
                            attempts: 0,
                            trust: true,
                        },
                    );
                    if let Some(p) = old {
                        release(&cache, &p);
                    }
                    drop(st);
                    self.report(&name, InstancePhase::Failed, reason, message);
                    return None;
                }
                let blob = blob.clone();
                match self.process_instance(inst, &blob) {
                    Ok(p) => {
                        if st.holding.get(&name) != Some(&blob.sha256) {
                            cache.mark_in_use(&blob.sha256);
                            if let Some(old) = st.holding.insert(name.clone(), blob.sha256) {
                                cache.unmark_in_use(&old);
                            }
                        }
                        if st.sent.remove(&name).is_some() {
                            st.handed.insert(name.clone());
                        }
                        Some(p)
                    }
                    Err((reason, message)) => {
                        drop(st);
                        self.report(&name, InstancePhase::Failed, reason, message);
                        None
                    }
                }
            }
            Some(Pull::Failed { phase, reason, message, attempts, .. }) => {
                // No countdown in the text: a status that changes every
                // pass would be written and sent every pass.
                let (phase, reason) = (*phase, *reason);
                let message = if phase == InstancePhase::Failed {
                    message.clone()
                } else {
                    format!("{message} (attempt {attempts}; retrying with back-off)")
                };
                drop(st);
                self.report(&name, phase, reason, message);
                None
            }
            Some(Pull::Running { progress }) => {
                // The pull task reports progress to every waiting instance;
                // one that joins a running pull hears at once.
                let (known, pct) = (st.sent.get(&name).is_some_and(|s| s.reason == "Pulling"), progress.percent());
                drop(st);
                if !known {
                    self.report(&name, InstancePhase::Pending, "Pulling", format!("Pulling {pct} % of {}", r.0));
                }
                None
            }
            None => None,
        }
    }

    /// Whether the runtime runs `name` already (its waits are not reported).
    fn set_quiet(&self, name: &str, running: bool) {
        let mut st = self.lock();
        if running {
            st.quiet.insert(name.to_string());
        } else {
            st.quiet.remove(name);
        }
    }

    /// The instance with its devices' variables, or `None` (and a status
    /// saying why) while the node cannot grant what it asks for.
    fn with_devices<'a>(&self, inst: &'a AppInstance) -> Option<Cow<'a, AppInstance>> {
        let wants = &inst.spec.template.devices;
        if wants.is_empty() {
            return Some(Cow::Borrowed(inst));
        }
        let name = &inst.metadata.name;
        let Some(registry) = self.registry() else {
            let what = wants.keys().cloned().collect::<Vec<_>>().join(", ");
            let message = format!("needs {what}; this agent has no device-plugin interface");
            self.report(name, InstancePhase::Pending, "InsufficientDevices", message);
            return None;
        };
        match registry.allocate(name, wants) {
            Ok(grants) => {
                let mut out = inst.clone();
                let env = &mut out.spec.template.process.get_or_insert_with(ProcessSpec::default).env;
                env.extend(grant_env(&grants));
                Some(Cow::Owned(out))
            }
            Err(e @ AllocateError::Insufficient(_)) => {
                self.report(name, InstancePhase::Pending, "InsufficientDevices", e.to_string());
                None
            }
            Err(e) => {
                self.report(name, InstancePhase::Pending, "DeviceAllocationFailed", e.to_string());
                None
            }
        }
    }

    /// Whether the instance cannot run here as it stands (a trust refusal,
    /// an unavailable runtime, an artifact that does not fit the spec), as
    /// opposed to waiting for a pull. A refused instance that still runs
    /// (the policy tightened after it started) is stopped by the reconciler.
    pub fn refused(&self, instance: &str) -> bool {
        self.lock().sent.get(instance).is_some_and(|s| TRUST_REASONS.contains(&s.reason.as_str()))
    }

    /// After a successful `ensure`: whether the launcher had reported a
    /// status of its own for the instance, which the runtime's must now
    /// replace (see [`forward`](Self::forward)).
    pub fn take_handed(&self, instance: &str) -> bool {
        self.lock().handed.remove(instance)
    }

    /// Sends a status on the runtime's behalf.
    pub fn forward(&self, update: StatusUpdate) {
        let _ = self.status_tx.send(update);
    }

    /// `ensure` failed: the instance says so.
    pub fn start_failed(&self, instance: &str, message: String) {
        self.lock().quiet.remove(instance);
        self.report(instance, InstancePhase::Failed, "StartFailed", message);
    }

    /// Sends the instance's last status again (after the runtime reported
    /// the instance stopped over it).
    pub fn resend(&self, instance: &str) {
        let Some(status) = self.lock().sent.get(instance).cloned() else { return };
        let _ = self.status_tx.send(StatusUpdate { instance: instance.to_string(), status });
    }

    /// Sends a status for a waiting instance unless it is the last one sent
    /// (or the runtime runs the instance and this is only a wait).
    fn report(&self, instance: &str, phase: InstancePhase, reason: &str, message: String) {
        let status = AppInstanceStatus { phase, reason: reason.into(), message, ..Default::default() };
        let mut st = self.lock();
        if st.sent.get(instance) == Some(&status) || (phase == InstancePhase::Pending && st.quiet.contains(instance)) {
            return;
        }
        st.sent.insert(instance.to_string(), status.clone());
        // Sent under the lock: two reporters (the pull task, the
        // reconciler) cannot reorder their statuses.
        let _ = self.status_tx.send(StatusUpdate { instance: instance.to_string(), status });
    }

    fn report_waiting(&self, r: &PullKey, phase: InstancePhase, reason: &str, message: &str) {
        let names: Vec<String> = self.lock().waiting.iter().filter(|(_, w)| *w == r).map(|(i, _)| i.clone()).collect();
        for n in names {
            self.report(&n, phase, reason, message.to_string());
        }
    }

    async fn run_pull(
        self: Arc<Self>,
        cache: Arc<ArtifactCache>,
        r: PullKey,
        trust: TrustPolicy,
        progress: Arc<PullProgress>,
        attempts: u32,
    ) {
        let mut held: Option<Digest> = None;
        let outcome = async {
            let platform = r.1.then_some(WASM_PLATFORM);
            let resolved = cache.resolve_for(&r.0, platform).await.map_err(|e| pull_failure(&e))?;
            trust.check(&resolved).map_err(|(reason, message)| (InstancePhase::Failed, reason, message, true))?;
            // Held from before the pull until the entry is dropped, so the
            // cache never collects it in between (other pulls collect).
            if let Ok(d) = resolved.blob.sha256.parse::<Digest>() {
                cache.mark_in_use(&d);
                held = Some(d);
            }
            let label = resolved.label();
            let pull = cache.pull(&resolved, &progress);
            tokio::pin!(pull);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut last = None;
            let mut ticks = 0u32;
            loop {
                tokio::select! {
                    res = &mut pull => {
                        let blob = res.map_err(|e| pull_failure(&e))?;
                        return Ok::<_, (InstancePhase, &'static str, String, bool)>((resolved.clone(), blob));
                    }
                    _ = tick.tick() => {
                        let pct = progress.percent();
                        if last != Some(pct) && progress.total() > 0 {
                            last = Some(pct);
                            let msg = format!(
                                "Pulling {pct} % of {label} ({} of {})",
                                mib(progress.done()),
                                mib(progress.total())
                            );
                            self.report_waiting(&r, InstancePhase::Pending, "Pulling", &msg);
                        }
                        // Peers learn of the chunks already here while the
                        // pull goes on, so a group pulls in a pipeline
                        // rather than each node from the cloud.
                        ticks += 1;
                        if ticks.is_multiple_of(4) {
                            if let Some(a) = self.announcer.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                                a.poke();
                            }
                        }
                    }
                }
            }
        }
        .await;
        let mut st = self.lock();
        match outcome {
            Ok((resolved, blob)) => {
                tracing::info!(artifact = %r.0, blob = %blob.sha256, platform = %blob.platform, offline = resolved.offline, "artifact ready");
                if let Some(p) = st.pulls.insert(r.clone(), Pull::Ready { resolved: Box::new(resolved), blob }) {
                    release(&cache, &p);
                }
                if let Some(a) = self.announcer.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    a.poke();
                }
            }
            Err((phase, reason, message, trust)) => {
                if let Some(d) = held {
                    cache.unmark_in_use(&d);
                }
                let attempts = attempts + 1;
                // A refusal is looked at again soon: the publisher may sign
                // the artifact, which changes nothing on this node.
                let delay = if trust {
                    TRUST_RETRY
                } else {
                    (FIRST_BACKOFF * 2u32.saturating_pow(attempts - 1)).min(MAX_BACKOFF)
                };
                tracing::warn!(artifact = %r.0, reason, error = %message, retry_in_s = delay.as_secs(), "artifact not ready");
                st.pulls.insert(
                    r.clone(),
                    Pull::Failed { phase, reason, message, retry_at: Instant::now() + delay, attempts, trust },
                );
            }
        }
        drop(st);
        self.wake.notify_one();
    }

    /// The process-runtime instance for `inst` running `blob`.
    fn process_instance(&self, inst: &AppInstance, blob: &LocalBlob) -> Result<AppInstance, (&'static str, String)> {
        let t = &inst.spec.template;
        let mismatch =
            |need: &str| ("ArtifactMismatch", format!("the artifact is a {} blob; {need}", blob.kind.as_str()));
        let mut out = inst.clone();
        let mut spec = t.process.clone().unwrap_or_default();
        match (t.runtime, blob.kind) {
            (RuntimeKind::Process, BlobType::Executable) => {
                if !spec.command.is_empty() {
                    return Err((
                        "InvalidSpec",
                        "an executable artifact is the program: give its arguments in process.args, not process.command".into(),
                    ));
                }
                spec.command = vec![blob.path.display().to_string()];
            }
            (RuntimeKind::Process, BlobType::Bundle) => {
                let root = blob.unpacked.clone().ok_or(("InvalidSpec", "the bundle was not unpacked".to_string()))?;
                let Some(first) = spec.command.first().cloned() else {
                    return Err(("InvalidSpec", "process.command[0] must name the program inside the bundle".into()));
                };
                spec.command[0] = in_bundle(&root, &first)?.display().to_string();
                if spec.working_dir.is_empty() {
                    spec.working_dir = root.display().to_string();
                }
                spec.env.insert("YUNBIAN_BUNDLE_DIR".into(), root.display().to_string());
            }
            (RuntimeKind::Process, _) => {
                return Err(mismatch(&format!(
                    "set runtime: {}",
                    if blob.kind == BlobType::Wasm { "wasm" } else { "oci" }
                )))
            }
            (RuntimeKind::Wasm, BlobType::Wasm) => {
                spec = self.wasm_command(inst, &spec, blob);
                if let Some(limit) = t.resources.limits.memory.as_ref().map(|_| t.resources.limits.memory_bytes()) {
                    out.spec.template.resources.limits.memory = Some((limit + WASM_SHIM_OVERHEAD).to_string());
                }
            }
            (RuntimeKind::Wasm, _) => return Err(mismatch("runtime wasm runs wasm modules")),
            (RuntimeKind::Oci, BlobType::Oci) => spec = self.oci_command(inst, &spec, blob)?,
            (RuntimeKind::Oci, _) => return Err(mismatch("runtime oci runs OCI image layouts")),
            (RuntimeKind::Fake, _) => return Ok(out),
        }
        out.spec.template.runtime = RuntimeKind::Process;
        out.spec.template.process = Some(spec);
        Ok(out)
    }

    /// Environment of a guest (wasm module, container): the instance's own
    /// variables, then what a process would get from its node.
    fn guest_env(&self, inst: &AppInstance, spec: &ProcessSpec) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.push(("NODE_NAME".into(), self.opts.node.clone()));
        env.push(("APP_NAME".into(), inst.spec.app.clone()));
        env.push(("INSTANCE_NAME".into(), inst.metadata.name.clone()));
        env.extend(self.opts.node_env.iter().cloned());
        env
    }

    fn shim(&self) -> String {
        self.opts.shim_exe.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
    }

    fn wasm_command(&self, inst: &AppInstance, spec: &ProcessSpec, blob: &LocalBlob) -> ProcessSpec {
        let limits = &inst.spec.template.resources.limits;
        let mut cmd =
            vec![self.shim(), "shim".into(), "wasm".into(), "--module".into(), blob.path.display().to_string()];
        // The process runtime starts the shim in the instance's own
        // directory: that is the guest's /data.
        cmd.extend(["--dir".into(), ".".into(), "--cache-dir".into(), self.opts.wasm_cache.display().to_string()]);
        cmd.push("--inherit-network".into());
        if limits.memory.is_some() {
            cmd.extend(["--memory-bytes".into(), limits.memory_bytes().to_string()]);
        }
        if limits.cpu.is_some() {
            cmd.extend(["--cpu-millis".into(), limits.cpu_millis().to_string()]);
        }
        // Validated by the cloud; an unreadable value is not acted on.
        let stop_after = inst.spec.template.wasm.as_ref().map(|w| w.cpu_stop_after.as_str()).filter(|s| !s.is_empty());
        if let Some(ms) = stop_after.and_then(|s| yunbian_api::time::parse_duration_ms(s).ok()) {
            cmd.extend(["--cpu-stop-after".into(), format!("{ms}ms")]);
        }
        for (k, v) in self.guest_env(inst, spec) {
            cmd.extend(["--env".into(), format!("{k}={v}")]);
        }
        cmd.push("--".into());
        cmd.extend(spec.command.iter().cloned());
        cmd.extend(spec.args.iter().cloned());
        ProcessSpec { command: cmd, args: Vec::new(), env: Default::default(), working_dir: String::new() }
    }

    fn oci_command(
        &self,
        inst: &AppInstance,
        spec: &ProcessSpec,
        blob: &LocalBlob,
    ) -> Result<ProcessSpec, (&'static str, String)> {
        let layout = blob.unpacked.clone().ok_or(("InvalidSpec", "the image layout was not unpacked".to_string()))?;
        let limits = &inst.spec.template.resources.limits;
        let name = &inst.metadata.name;
        let mut cmd = vec![self.shim(), "shim".into(), "oci".into(), "--layout".into(), layout.display().to_string()];
        cmd.extend(["--oci-dir".into(), self.opts.oci_dir.display().to_string()]);
        // The bundle (a copy of the image's rootfs) lives in the instance's
        // directory, beside its work directory: removed with the instance.
        cmd.extend(["--id".into(), format!("yunbian-{name}"), "--volume".into(), ".".into()]);
        cmd.extend(["--bundle".into(), "../bundle".into()]);
        if limits.memory.is_some() {
            cmd.extend(["--memory-bytes".into(), limits.memory_bytes().to_string()]);
        }
        if limits.cpu.is_some() {
            cmd.extend(["--cpu-millis".into(), limits.cpu_millis().to_string()]);
        }
        if !spec.working_dir.is_empty() {
            cmd.extend(["--workdir".into(), spec.working_dir.clone()]);
        }
        for c in &spec.command {
            cmd.extend(["--entrypoint".into(), c.clone()]);
        }
        for (k, v) in self.guest_env(inst, spec) {
            cmd.extend(["--env".into(), format!("{k}={v}")]);
        }
        cmd.push("--".into());
        cmd.extend(spec.args.iter().cloned());
        Ok(ProcessSpec { command: cmd, args: Vec::new(), env: Default::default(), working_dir: String::new() })
    }
}

/// Reasons of a trust refusal: an instance refused for one of them is
/// stopped if it runs (other failures leave a running instance alone).
const TRUST_REASONS: [&str; 3] = ["SignatureRequired", "UntrustedSigner", "BadSignature"];

/// Drops the in-use mark a finished pull holds on its blob.
fn release(cache: &ArtifactCache, p: &Pull) {
    if let Pull::Ready { blob, .. } = p {
        cache.unmark_in_use(&blob.sha256);
    }
}

/// A command path in a bundle: relative paths resolve against its root and
/// may not leave it; absolute paths are host paths.
fn in_bundle(root: &Path, p: &str) -> Result<PathBuf, (&'static str, String)> {
    let path = Path::new(p);
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(("InvalidSpec", format!("process.command[0] {p:?} leaves the bundle")));
    }
    let full = root.join(path);
    if !full.is_file() {
        return Err(("InvalidSpec", format!("process.command[0] {p:?} is not a file in the bundle")));
    }
    Ok(full)
}

/// How a pull error shows in the instance's status: (phase, reason,
/// message, is a trust refusal).
fn pull_failure(e: &PullError) -> (InstancePhase, &'static str, String, bool) {
    let reason = match e {
        PullError::NotFound { .. } | PullError::NoSuchBlob(_) => "ArtifactNotFound",
        PullError::NoBlob { .. } => "NoBlobForPlatform",
        PullError::Pinned { .. } => "DigestMismatch",
        PullError::Source { .. } => "PullFailed",
        PullError::CorruptChunk { .. } | PullError::BlobMismatch { .. } => "CorruptArtifact",
        PullError::UnsafeEntry { .. } | PullError::Bundle { .. } | PullError::Manifest { .. } => "InvalidArtifact",
        PullError::Io { .. } => "PullFailed",
    };
    (InstancePhase::Pending, reason, e.to_string(), false)
}

fn mib(b: u64) -> String {
    if b < 1 << 20 {
        format!("{:.0} KiB", b as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use yunbian_api::{Artifact, ArtifactBlob, ArtifactSpec, BlobSignature, Object, TrustSpec};
    use yunbian_artifacts::signing::PublisherKey;

    use super::*;

    fn resolved(sign: Option<&PublisherKey>, tamper: bool) -> Resolved {
        let mut blob =
            ArtifactBlob { kind: BlobType::Executable, size: 3, sha256: "ab".repeat(32), ..Default::default() };
        if let Some(k) = sign {
            let st = signing_statement("tool", "1.0", "linux/amd64", blob.kind, &blob.sha256, blob.size);
            blob.signatures.push(BlobSignature { key_id: k.key_id(), signature: k.sign_hex(st.as_bytes()) });
        }
        if tamper {
            blob.size = 4;
        }
        let spec = ArtifactSpec {
            name: "tool".into(),
            version: "1.0".into(),
            blobs: [("linux/amd64".to_string(), blob.clone())].into(),
        };
        let artifact: Artifact = Object::new("tool--1-0", spec);
        Resolved { artifact, platform: "linux/amd64".into(), blob, offline: false }
    }

    fn group(require: bool, keys: &[&PublisherKey]) -> NodeGroupSpec {
        NodeGroupSpec {
            trust: Some(TrustSpec {
                require_signature: require,
                keys: keys
                    .iter()
                    .map(|k| TrustedKey { name: "release".into(), public_key: k.public_key_hex() })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_trust_policy_accepts_trusted_signatures_and_says_why_it_refuses() {
        let (good, other) = (PublisherKey::generate().expect("key"), PublisherKey::generate().expect("key"));
        // No policy: anything runs.
        assert_eq!(TrustPolicy::default().check(&resolved(None, false)), Ok(None));
        // Groups combine: one requiring, another adding a key.
        let p = TrustPolicy::of_groups([&group(true, &[]), &group(false, &[&good])]);
        assert!(p.require_signature && p.keys.len() == 1);
        assert!(p.check(&resolved(Some(&good), false)).expect("trusted").is_some_and(|s| s.starts_with("release (")));
        let (reason, msg) = p.check(&resolved(None, false)).expect_err("unsigned");
        assert_eq!(reason, "SignatureRequired");
        assert!(msg.contains("tool 1.0 (linux/amd64) is unsigned") && msg.contains(&good.key_id()), "{msg}");
        let (reason, msg) = p.check(&resolved(Some(&other), false)).expect_err("untrusted");
        assert_eq!(reason, "UntrustedSigner");
        assert!(msg.contains(&other.key_id()), "{msg}");
        let (reason, _) = p.check(&resolved(Some(&good), true)).expect_err("tampered");
        assert_eq!(reason, "BadSignature");
        // Not required: an unsigned or untrusted blob still runs.
        let lax = TrustPolicy::of_groups([&group(false, &[&good])]);
        assert_eq!(lax.check(&resolved(Some(&other), false)), Ok(None));
    }

    #[tokio::test]
    async fn plain_and_fake_instances_pass_through_and_shims_need_their_runtime() {
        use yunbian_api::{AppInstanceSpec, WorkloadTemplate};
        let (tx, mut rx) = mpsc::unbounded_channel();
        let l = Launcher::new(None, LauncherOptions::default(), tx);
        let inst = |runtime: RuntimeKind| {
            let template = WorkloadTemplate { runtime, ..Default::default() };
            AppInstance::new(
                "a-1",
                AppInstanceSpec {
                    app: "a".into(),
                    node: "n".into(),
                    template,
                    template_hash: "h".into(),
                    ..Default::default()
                },
            )
        };
        assert_eq!(l.prepare(&inst(RuntimeKind::Fake), false), Some(inst(RuntimeKind::Fake)));
        assert_eq!(l.prepare(&inst(RuntimeKind::Process), true), Some(inst(RuntimeKind::Process)));
        assert!(rx.try_recv().is_err(), "no status for instances that pass through");
        // No shim executable: wasm is unavailable, and says so once.
        assert_eq!(l.prepare(&inst(RuntimeKind::Wasm), false), None);
        assert_eq!(l.prepare(&inst(RuntimeKind::Wasm), false), None);
        let u = rx.try_recv().expect("a status");
        assert_eq!((u.status.phase, u.status.reason.as_str()), (InstancePhase::Failed, "RuntimeUnavailable"));
        assert!(rx.try_recv().is_err(), "the same status is not sent twice");
        assert!(!l.refused("a-1"), "an unavailable runtime does not stop a running instance");
    }

    #[test]
    fn a_runtime_the_node_cannot_offer_is_left_out_with_its_reason() {
        let crun_missing = "crun not found in PATH (install crun: apt-get install crun)";
        let opts = |shim: bool, wasm: bool, oci: Option<Result<String, String>>| LauncherOptions {
            shim_exe: shim.then(|| PathBuf::from("/usr/bin/yunbian")),
            wasm,
            oci,
            ..Default::default()
        };
        let everything = opts(true, true, Some(Ok("crun version 1.8.1 (/usr/bin/crun)".into())));
        assert_eq!(everything.runtimes(), ["process", "wasm", "oci"]);
        assert!(everything.unavailable_runtimes().is_empty());

        // crun missing: no oci, and the reason detect_crun gave.
        let no_crun = opts(true, true, Some(Err(crun_missing.into())));
        assert_eq!(no_crun.runtimes(), ["process", "wasm"]);
        let why = no_crun.unavailable_runtimes();
        assert_eq!(why.keys().collect::<Vec<_>>(), ["oci"]);
        assert_eq!(why["oci"], format!("the oci runtime is unavailable: {crun_missing}"));
        assert_eq!(no_crun.unavailable(RuntimeKind::Oci).as_deref(), Some(why["oci"].as_str()));
        assert_eq!(no_crun.unavailable(RuntimeKind::Wasm), None);

        // Without wasm built in, or without a shim executable at all.
        let no_wasm = opts(true, false, Some(Err(crun_missing.into())));
        assert_eq!(no_wasm.runtimes(), ["process"]);
        assert!(no_wasm.unavailable_runtimes()["wasm"].contains("not built into this agent"));
        let no_shim = opts(false, true, Some(Ok("crun".into())));
        assert_eq!(no_shim.runtimes(), ["process"]);
        let why = no_shim.unavailable_runtimes();
        assert_eq!(
            (why["wasm"].as_str(), why["oci"].as_str()),
            ("no shim executable is configured", "no shim executable is configured")
        );

        // Every runtime is either offered or has a reason, never both.
        for o in [everything, no_crun, no_wasm, no_shim, LauncherOptions::default()] {
            let why = o.unavailable_runtimes();
            let mut all: Vec<&str> = o.runtimes().into_iter().chain(why.keys().map(String::as_str)).collect();
            all.sort_unstable();
            assert_eq!(all, ["oci", "process", "wasm"], "{o:?}");
        }
    }

    #[test]
    fn bundle_commands_stay_inside_the_bundle() {
        let dir = std::env::temp_dir().join(format!("yunbian-launch-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).expect("dir");
        std::fs::write(dir.join("bin/run"), b"#!/bin/sh\n").expect("file");
        assert_eq!(in_bundle(&dir, "bin/run").expect("inside"), dir.join("bin/run"));
        assert_eq!(in_bundle(&dir, "/bin/sh").expect("host"), PathBuf::from("/bin/sh"));
        assert!(in_bundle(&dir, "../etc/passwd").is_err());
        assert!(in_bundle(&dir, "bin/missing").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
