//! A runtime that runs nothing.
//!
//! [`FakeRuntime`] is used by the simulator (thousands of simulated nodes in
//! one process), so it is deliberately cheap: a map behind a mutex, no tasks,
//! no files. `ensure` records the instance and reports `Starting` then
//! `Running` with a made-up pid; `remove` forgets it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;
use yunbian_api::{AppInstance, AppInstanceStatus, InstancePhase};

use crate::{LimitsSupport, LogOptions, Runtime, RuntimeError, StatusUpdate};

/// First fake pid handed out.
const FIRST_FAKE_PID: u32 = 100_000;

/// One recorded instance.
#[derive(Debug)]
struct Entry {
    hash: String,
    status: AppInstanceStatus,
}

/// A runtime that records instances and pretends they run.
#[derive(Debug)]
pub struct FakeRuntime {
    updates: mpsc::UnboundedSender<StatusUpdate>,
    instances: Mutex<HashMap<String, Entry>>,
    next_pid: AtomicU32,
}

impl FakeRuntime {
    /// A fake runtime reporting status changes on `updates`.
    pub fn new(updates: mpsc::UnboundedSender<StatusUpdate>) -> Arc<FakeRuntime> {
        Arc::new(FakeRuntime {
            updates,
            instances: Mutex::new(HashMap::new()),
            next_pid: AtomicU32::new(FIRST_FAKE_PID),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.instances.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, instance: &str, status: &AppInstanceStatus) {
        // A closed channel only means nobody listens any more.
        let _ = self.updates.send(StatusUpdate { instance: instance.to_string(), status: status.clone() });
    }
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn recover(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.lock().keys().cloned().collect())
    }

    async fn ensure(&self, instance: &AppInstance) -> Result<(), RuntimeError> {
        let name = instance.metadata.name.as_str();
        if name.is_empty() {
            return Err(RuntimeError::Invalid { instance: String::new(), message: "instance has no name".into() });
        }
        let hash = if instance.spec.template_hash.is_empty() {
            instance.spec.template.hash()
        } else {
            instance.spec.template_hash.clone()
        };
        let mut status = {
            let mut map = self.lock();
            if map.get(name).is_some_and(|e| e.hash == hash) {
                return Ok(());
            }
            let pid = self.next_pid.fetch_add(1, Ordering::Relaxed);
            let status = AppInstanceStatus {
                phase: InstancePhase::Starting,
                pid: Some(pid),
                started_at: crate::clock::now_rfc3339(),
                ..Default::default()
            };
            let mut running = status.clone();
            running.phase = InstancePhase::Running;
            map.insert(name.to_string(), Entry { hash, status: running });
            status
        };
        self.send(name, &status);
        status.phase = InstancePhase::Running;
        self.send(name, &status);
        Ok(())
    }

    async fn remove(&self, instance: &str) -> Result<(), RuntimeError> {
        self.lock().remove(instance);
        Ok(())
    }

    async fn statuses(&self) -> Vec<StatusUpdate> {
        self.lock().iter().map(|(name, e)| StatusUpdate { instance: name.clone(), status: e.status.clone() }).collect()
    }

    async fn logs(&self, instance: &str, _opts: LogOptions, out: mpsc::Sender<Vec<u8>>) -> Result<(), RuntimeError> {
        if !self.lock().contains_key(instance) {
            return Err(RuntimeError::NotFound(instance.to_string()));
        }
        let _ = out.send(b"fake runtime: no output\n".to_vec()).await;
        Ok(())
    }

    fn limits_support(&self) -> LimitsSupport {
        LimitsSupport { enforced: false, note: "fake runtime: nothing runs, limits are not enforced".into() }
    }

    fn log_path(&self, _instance: &str) -> Option<PathBuf> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yunbian_api::AppInstanceSpec;

    fn instance(name: &str, hash: &str) -> AppInstance {
        let mut i = AppInstance::new(
            name,
            AppInstanceSpec { app: "a".into(), node: "n".into(), template_hash: hash.into(), ..Default::default() },
        );
        i.metadata.name = name.into();
        i
    }

    #[tokio::test]
    async fn ensure_reports_starting_then_running_and_is_idempotent() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let rt = FakeRuntime::new(tx);
        rt.ensure(&instance("x", "h1")).await.expect("ensure");
        let a = rx.recv().await.expect("starting");
        let b = rx.recv().await.expect("running");
        assert_eq!(a.status.phase, InstancePhase::Starting);
        assert_eq!(b.status.phase, InstancePhase::Running);
        assert!(b.status.pid.is_some());
        rt.ensure(&instance("x", "h1")).await.expect("ensure again");
        assert!(rx.try_recv().is_err(), "same hash must be a no-op");
        rt.ensure(&instance("x", "h2")).await.expect("replace");
        let c = rx.recv().await.expect("starting");
        assert_ne!(c.status.pid, b.status.pid);
        assert_eq!(rt.statuses().await.len(), 1);

        let (ltx, mut lrx) = mpsc::channel(4);
        rt.logs("x", LogOptions::default(), ltx).await.expect("logs");
        assert_eq!(lrx.recv().await.expect("chunk"), b"fake runtime: no output\n".to_vec());

        rt.remove("x").await.expect("remove");
        assert!(rt.statuses().await.is_empty());
        let (ltx, _lrx) = mpsc::channel(4);
        assert!(matches!(rt.logs("x", LogOptions::default(), ltx).await, Err(RuntimeError::NotFound(_))));
        assert!(!rt.limits_support().enforced);
    }
}
