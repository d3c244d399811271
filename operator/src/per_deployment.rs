//! Memory the controller keeps per NeoXDeployment, by uid: a deployment re-created under the
//! same name starts afresh, and what deleted ones leave is pruned.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use kube::ResourceExt;

use crate::crd::NeoXDeployment;

/// A value per NeoXDeployment uid. A poisoned lock reads as empty and writes nothing: this is
/// memory for pacing (back-off, autoscaling periods), never for correctness.
#[derive(Debug)]
pub struct PerDeployment<T>(Mutex<HashMap<String, T>>);

impl<T> Default for PerDeployment<T> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<T: Clone> PerDeployment<T> {
    pub fn get(&self, d: &NeoXDeployment) -> Option<T> {
        let uid = d.uid()?;
        self.0.lock().ok()?.get(&uid).cloned()
    }

    pub fn set(&self, d: &NeoXDeployment, value: T) {
        if let (Some(uid), Ok(mut m)) = (d.uid(), self.0.lock()) {
            m.insert(uid, value);
        }
    }

    /// Changes the value (`T::default()` if none) and returns the new one; `None` when `d` has
    /// no uid or the lock is poisoned.
    pub fn update(&self, d: &NeoXDeployment, change: impl FnOnce(&mut T)) -> Option<T>
    where
        T: Default,
    {
        let uid = d.uid()?;
        let mut m = self.0.lock().ok()?;
        let v = m.entry(uid).or_default();
        change(v);
        Some(v.clone())
    }

    pub fn remove(&self, d: &NeoXDeployment) {
        if let (Some(uid), Ok(mut m)) = (d.uid(), self.0.lock()) {
            m.remove(&uid);
        }
    }

    /// Forgets every deployment whose uid is not in `live`.
    pub fn retain(&self, live: &HashSet<String>) {
        if let Ok(mut m) = self.0.lock() {
            m.retain(|uid, _| live.contains(uid));
        }
    }

    /// Another map holding the same values (tests: a second operator pass that remembers).
    pub fn snapshot(&self) -> Self {
        Self(Mutex::new(self.0.lock().map(|m| m.clone()).unwrap_or_default()))
    }
}
