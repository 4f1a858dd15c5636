//! Admission of interactive work (the gateway's completions): not persisted, since the waiting
//! client is its durability, but shared between tenants by the same weighted fair queue and
//! per-tenant limits as durable tasks, so a tenant flooding the gateway waits behind its own
//! requests and cannot raise another tenant's latency.
//!
//! [`Admission::admit`] returns at once while a slot is free and the tenant is under its limit;
//! otherwise the request waits in the fair queue until a [`Permit`] is dropped. A request whose
//! client has gone (its `admit` future dropped) is skipped when its turn comes.

use crate::fair::{Charge, Entry, FairQueue};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;

/// Interactive slots of one node, shared fairly between tenants.
#[derive(Debug)]
pub struct Admission {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    queue: FairQueue,
    free: usize,
    slots: usize,
    waiting: HashMap<Arc<str>, oneshot::Sender<Charge>>,
    next: u64,
}

/// A slot held by one admitted request; dropping it frees the slot for the next in line.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    charge: Option<Charge>,
    started: Instant,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(charge) = self.charge.take() {
            let ms = self.started.elapsed().as_secs_f64() * 1000.0;
            self.admission.release(&charge, ms);
        }
    }
}

impl Admission {
    /// `slots` requests at once on this node; `tenant_limit` at once per tenant unless
    /// [`Admission::configure`] says otherwise (0: only the node's limit).
    pub fn new(slots: usize, tenant_limit: usize) -> Arc<Self> {
        let slots = slots.max(1);
        Arc::new(Admission {
            inner: Mutex::new(Inner {
                queue: FairQueue::new(tenant_limit),
                free: slots,
                slots,
                waiting: HashMap::new(),
                next: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A tenant's weight and its own limit of requests at once (0: the default).
    pub fn configure(&self, tenant: &str, weight: f64, max_running: usize) {
        self.lock().queue.configure(tenant, weight, max_running);
    }

    /// Waits for a slot for `tenant`, in fair order.
    pub async fn admit(self: &Arc<Self>, tenant: &str) -> Permit {
        let rx = {
            let mut inner = self.lock();
            inner.next += 1;
            // Ids sort by arrival (the queue is FIFO within a tenant by id).
            let id: Arc<str> = Arc::from(format!("i{:020}", inner.next).as_str());
            let (tx, rx) = oneshot::channel();
            inner.waiting.insert(id.clone(), tx);
            let entry = Entry {
                task_id: id.clone(),
                job_id: id,
                tenant_id: Arc::from(tenant),
                plugin: Arc::from(""),
                priority: 0,
            };
            inner.queue.push(entry, 0, 0);
            dispatch(&mut inner);
            rx
        };
        // The sender is only dropped after sending, so this waits until admitted.
        match rx.await {
            Ok(charge) => Permit { admission: self.clone(), charge: Some(charge), started: Instant::now() },
            Err(_) => Permit { admission: self.clone(), charge: None, started: Instant::now() },
        }
    }

    fn release(&self, charge: &Charge, actual_ms: f64) {
        let mut inner = self.lock();
        inner.queue.done(charge, actual_ms);
        inner.free = (inner.free + 1).min(inner.slots);
        dispatch(&mut inner);
    }

    /// Requests admitted now and requests waiting (whose clients are still there).
    pub fn load(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.slots - inner.free, inner.waiting.values().filter(|tx| !tx.is_closed()).count())
    }
}

/// Hands free slots to the requests the fair queue picks; one whose client has gone gives its
/// slot straight back.
fn dispatch(inner: &mut Inner) {
    while inner.free > 0 {
        let Some((entry, charge)) = inner.queue.pop(0, |_| None) else { return };
        let Some(tx) = inner.waiting.remove(&entry.task_id) else {
            inner.queue.done(&charge, 0.0);
            continue;
        };
        match tx.send(charge) {
            Ok(()) => inner.free -= 1,
            Err(charge) => inner.queue.done(&charge, 0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_flooding_tenant_waits_behind_its_own_requests() {
        let admission = Admission::new(2, 0);
        let held = vec![admission.admit("a").await, admission.admit("a").await];
        // A floods: 50 more wait. Then B asks once.
        let mut flood = Vec::new();
        for _ in 0..50 {
            let a = admission.clone();
            flood.push(tokio::spawn(async move { a.admit("a").await }));
        }
        tokio::task::yield_now().await;
        while admission.load().1 < 50 {
            tokio::task::yield_now().await;
        }
        let b = {
            let a = admission.clone();
            tokio::spawn(async move { a.admit("b").await })
        };
        while admission.load().1 < 51 {
            tokio::task::yield_now().await;
        }
        // One slot frees: B, not the 50 of A queued before it, gets it.
        drop(held);
        let permit = b.await.unwrap();
        assert!(permit.charge.is_some());
        let (running, waiting) = admission.load();
        assert_eq!((running, waiting), (2, 49), "B and one of A's run");
        drop(permit);
        for f in flood {
            drop(f.await.unwrap());
        }
        assert_eq!(admission.load(), (0, 0));
    }

    #[tokio::test]
    async fn a_request_whose_client_left_gives_its_turn_to_the_next() {
        let admission = Admission::new(1, 0);
        let first = admission.admit("a").await;
        let gone = {
            let a = admission.clone();
            tokio::spawn(async move { a.admit("a").await })
        };
        while admission.load().1 < 1 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        // The same tenant's next request is behind the abandoned one.
        let next = {
            let a = admission.clone();
            tokio::spawn(async move { a.admit("a").await })
        };
        while admission.load().1 < 1 {
            tokio::task::yield_now().await;
        }
        drop(first);
        let permit = next.await.unwrap();
        assert!(permit.charge.is_some());
        assert_eq!(admission.load(), (1, 0), "the slot went to the live request");
    }

    #[tokio::test]
    async fn a_tenant_limit_holds_while_others_use_the_slots() {
        let admission = Admission::new(4, 0);
        admission.configure("a", 1.0, 1);
        let a1 = admission.admit("a").await;
        let a2 = {
            let a = admission.clone();
            tokio::spawn(async move { a.admit("a").await })
        };
        while admission.load().1 < 1 {
            tokio::task::yield_now().await;
        }
        let b = admission.admit("b").await;
        assert_eq!(admission.load(), (2, 1), "a's second waits for its first, b runs");
        drop(a1);
        drop(a2.await.unwrap());
        drop(b);
        assert_eq!(admission.load(), (0, 0));
    }
}
