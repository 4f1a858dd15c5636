//! Weighted fair queueing between tenants, priorities within a tenant.
//!
//! Start-time fair queueing over a virtual clock: each tenant carries a finish tag. Dispatch
//! picks the eligible tenant (work ready, under its concurrency limit) with the smallest tag and
//! advances that tag by the task's expected cost divided by the tenant's weight; when the task
//! ends, the tag is corrected by what it really cost. A tenant that was idle re-enters at the
//! current virtual time, so idling earns no credit and a flood earns no more than its weight:
//! with weights 3 and 1 and both backlogged, capacity splits 3:1, whatever either submitted.
//!
//! Inside a tenant, higher priority first, then oldest first. Tasks not yet due (a retry's
//! backoff, a plugin whose circuit is open) wait in a timer heap and join their tenant's queue
//! when due.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

/// A task waiting to run, as the queue knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The task's id; ids sort by submission.
    pub task_id: Arc<str>,
    /// Its job.
    pub job_id: Arc<str>,
    /// Its tenant.
    pub tenant_id: Arc<str>,
    /// The plugin it calls (its circuit breaker's key, with the tenant).
    pub plugin: Arc<str>,
    /// Higher runs first within the tenant.
    pub priority: i32,
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap: higher priority first, then the older (smaller) id.
        self.priority.cmp(&other.priority).then_with(|| other.task_id.cmp(&self.task_id))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Cost is measured in milliseconds of a worker slot; a new tenant's tasks are assumed to cost
/// this much until some have run.
const INITIAL_COST_MS: f64 = 10.0;

#[derive(Debug)]
struct Tenant {
    ready: BinaryHeap<Entry>,
    weight: f64,
    max_running: usize,
    running: usize,
    finish: f64,
    /// Moving average of what this tenant's tasks cost.
    cost_ms: f64,
}

impl Tenant {
    fn active(&self) -> bool {
        !self.ready.is_empty() || self.running > 0
    }
}

/// A ticket for a dispatched task: hand it back to [`FairQueue::done`].
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    tenant_id: Arc<str>,
    estimate_ms: f64,
}

/// The per-node ready queue.
#[derive(Debug, Default)]
pub struct FairQueue {
    tenants: HashMap<Arc<str>, Tenant>,
    /// Tasks not due yet, by due time (unix ms).
    delayed: BinaryHeap<Reverse<(i64, DelayedEntry)>>,
    /// Every task id held (ready or delayed), so a task is never queued twice.
    held: HashSet<Arc<str>>,
    vtime: f64,
    default_weight: f64,
    default_max_running: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DelayedEntry(Entry);

impl Ord for DelayedEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.task_id.cmp(&other.0.task_id)
    }
}

impl PartialOrd for DelayedEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl FairQueue {
    /// A queue where tenants not configured otherwise get weight 1 and at most `max_running`
    /// tasks at once (0: no per-tenant limit).
    pub fn new(max_running: usize) -> Self {
        FairQueue { default_weight: 1.0, default_max_running: max_running, ..Default::default() }
    }

    /// Sets a tenant's weight (share of capacity relative to others; at least 0.01) and its own
    /// limit on running tasks (0: the default).
    pub fn configure(&mut self, tenant_id: &str, weight: f64, max_running: usize) {
        let default_max = self.default_max_running;
        let tenant = self.tenant(tenant_id);
        tenant.weight = weight.max(0.01);
        tenant.max_running = if max_running == 0 { default_max } else { max_running };
    }

    fn tenant(&mut self, tenant_id: &str) -> &mut Tenant {
        let (weight, max_running) = (self.default_weight, self.default_max_running);
        self.tenants.entry(Arc::from(tenant_id)).or_insert_with(|| Tenant {
            ready: BinaryHeap::new(),
            weight,
            max_running,
            running: 0,
            finish: 0.0,
            cost_ms: INITIAL_COST_MS,
        })
    }

    /// Whether the task is held (ready or delayed).
    pub fn holds(&self, task_id: &str) -> bool {
        self.held.contains(task_id)
    }

    /// How many tasks are held, ready or delayed.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no task is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Queues a task, to run from `due` (unix ms) on. `false` if it was already held.
    pub fn push(&mut self, entry: Entry, due: i64, now: i64) -> bool {
        if !self.held.insert(entry.task_id.clone()) {
            return false;
        }
        if due > now {
            self.delayed.push(Reverse((due, DelayedEntry(entry))));
        } else {
            self.make_ready(entry);
        }
        true
    }

    fn make_ready(&mut self, entry: Entry) {
        let vtime = self.vtime;
        let tenant = self.tenant(&entry.tenant_id);
        if !tenant.active() {
            // Back from idle: start at the current virtual time, no credit for having waited.
            tenant.finish = tenant.finish.max(vtime);
        }
        tenant.ready.push(entry);
    }

    /// Moves tasks whose time has come into their tenants' queues; returns when the next
    /// delayed one is due.
    pub fn promote(&mut self, now: i64) -> Option<i64> {
        while let Some(Reverse((due, _))) = self.delayed.peek() {
            if *due > now {
                return Some(*due);
            }
            if let Some(Reverse((_, DelayedEntry(entry)))) = self.delayed.pop() {
                self.make_ready(entry);
            }
        }
        None
    }

    /// Takes the next task to run: the eligible tenant with the smallest finish tag, its best
    /// task. `blocked` says whether a task may not start now (its plugin's circuit is open); such
    /// a task is put back to wait until the time it returns.
    pub fn pop(&mut self, now: i64, mut blocked: impl FnMut(&Entry) -> Option<i64>) -> Option<(Entry, Charge)> {
        loop {
            let chosen = self
                .tenants
                .iter()
                .filter(|(_, t)| !t.ready.is_empty() && (t.max_running == 0 || t.running < t.max_running))
                .min_by(|a, b| a.1.finish.total_cmp(&b.1.finish).then_with(|| a.0.cmp(b.0)))
                .map(|(id, _)| id.clone())?;
            let tenant = self.tenants.get_mut(&chosen)?;
            let entry = tenant.ready.pop()?;
            if let Some(until) = blocked(&entry) {
                self.delayed.push(Reverse((until.max(now + 1), DelayedEntry(entry))));
                continue;
            }
            self.held.remove(&entry.task_id);
            let charge = self.charge(&chosen);
            return Some((entry, charge));
        }
    }

    /// Starts a task of `tenant_id`: the virtual clock is the start tag of the task entering
    /// service, and the tenant is charged its estimate.
    fn charge(&mut self, tenant_id: &Arc<str>) -> Charge {
        let tenant = self.tenant(tenant_id);
        let start = tenant.finish;
        let estimate_ms = tenant.cost_ms;
        tenant.finish += estimate_ms / tenant.weight;
        tenant.running += 1;
        self.vtime = self.vtime.max(start);
        Charge { tenant_id: tenant_id.clone(), estimate_ms }
    }

    /// Whether a ready task (due now) would start before a next task of `job_id` (of
    /// `tenant_id`, at `priority`): any other tenant's, or one of the same tenant's that ranks
    /// higher (a higher priority, or an older job at the same priority).
    pub fn ready_ahead_of(&mut self, tenant_id: &str, job_id: &str, priority: i32, now: i64) -> bool {
        self.promote(now);
        self.tenants.iter().any(|(id, t)| match t.ready.peek() {
            None => false,
            Some(_) if &**id != tenant_id => true,
            Some(best) => {
                best.priority > priority
                    || (best.priority == priority && *best.job_id != *job_id && *best.task_id < *job_id)
            }
        })
    }

    /// Starts `entry`, which never waited here: a task its predecessor's slot took over (see
    /// [`FairQueue::ready_ahead_of`]), charged as [`FairQueue::pop`] charges.
    pub fn start(&mut self, entry: &Entry) -> Charge {
        let vtime = self.vtime;
        let tenant = self.tenant(&entry.tenant_id);
        if !tenant.active() {
            // Back from idle, as in `make_ready`: no credit for having waited.
            tenant.finish = tenant.finish.max(vtime);
        }
        self.charge(&entry.tenant_id)
    }

    /// Hands back a dispatched task's ticket with what it really cost (slot milliseconds).
    pub fn done(&mut self, charge: &Charge, actual_ms: f64) {
        if let Some(tenant) = self.tenants.get_mut(&charge.tenant_id) {
            tenant.running = tenant.running.saturating_sub(1);
            let actual = actual_ms.max(0.01);
            tenant.finish += (actual - charge.estimate_ms) / tenant.weight;
            tenant.cost_ms = tenant.cost_ms * 0.8 + actual * 0.2;
            if !tenant.active() && tenant.finish < self.vtime {
                tenant.finish = self.vtime;
            }
        }
    }

    /// Drops every held task of `job_id` (cancelled or failed): they must not start.
    pub fn remove_job(&mut self, job_id: &str) -> usize {
        let mut removed = 0;
        for tenant in self.tenants.values_mut() {
            let before = tenant.ready.len();
            tenant.ready.retain(|e| &*e.job_id != job_id);
            removed += before - tenant.ready.len();
        }
        let before = self.delayed.len();
        self.delayed.retain(|Reverse((_, DelayedEntry(e)))| &*e.job_id != job_id);
        removed += before - self.delayed.len();
        let prefix = format!("{job_id}.");
        self.held.retain(|id| !id.starts_with(&prefix));
        removed
    }

    /// Known tenants, the one owed most capacity first (smallest finish tag).
    pub fn tenant_order(&self) -> Vec<Arc<str>> {
        let mut tenants: Vec<(&Arc<str>, f64)> = self.tenants.iter().map(|(id, t)| (id, t.finish)).collect();
        tenants.sort_by(|a, b| a.1.total_cmp(&b.1));
        tenants.into_iter().map(|(id, _)| id.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(tenant: &str, n: u32, priority: i32) -> Entry {
        Entry {
            task_id: Arc::from(format!("job_{tenant}_{n:06}.0").as_str()),
            job_id: Arc::from(format!("job_{tenant}_{n:06}").as_str()),
            tenant_id: Arc::from(tenant),
            plugin: Arc::from("p"),
            priority,
        }
    }

    /// Runs `slots` workers over the queue for `steps` completions of `cost` ms each; returns
    /// completions per tenant.
    fn simulate(q: &mut FairQueue, slots: usize, steps: usize, cost: impl Fn(&str) -> f64) -> HashMap<String, usize> {
        let mut running: Vec<(Entry, Charge)> = Vec::new();
        let mut done: HashMap<String, usize> = HashMap::new();
        for _ in 0..steps {
            while running.len() < slots {
                match q.pop(0, |_| None) {
                    Some(x) => running.push(x),
                    None => break,
                }
            }
            if running.is_empty() {
                break;
            }
            let (e, c) = running.remove(0);
            q.done(&c, cost(&e.tenant_id));
            *done.entry(e.tenant_id.to_string()).or_default() += 1;
        }
        done
    }

    #[test]
    fn a_flooding_tenant_does_not_starve_another() {
        let mut q = FairQueue::new(0);
        for n in 0..10_000 {
            q.push(entry("a", n, 0), 0, 0);
        }
        for n in 0..20 {
            q.push(entry("b", n, 0), 0, 0);
        }
        let done = simulate(&mut q, 4, 44, |_| 10.0);
        // B's 20 tasks all ran within the first 44 completions: an equal share while it had work.
        assert_eq!(done["b"], 20, "{done:?}");
    }

    #[test]
    fn weights_split_capacity_even_when_costs_differ() {
        let mut q = FairQueue::new(0);
        q.configure("a", 3.0, 0);
        q.configure("b", 1.0, 0);
        for n in 0..5000 {
            q.push(entry("a", n, 0), 0, 0);
            q.push(entry("b", n, 0), 0, 0);
        }
        // B's tasks cost twice as much: by slot time, A still gets 3 parts to B's 1.
        let done = simulate(&mut q, 2, 3000, |t| if t == "b" { 20.0 } else { 10.0 });
        let (a_time, b_time) = (done["a"] as f64 * 10.0, done["b"] as f64 * 20.0);
        let share = a_time / (a_time + b_time);
        assert!((share - 0.75).abs() < 0.03, "A's share of slot time {share:.3} ({done:?})");
    }

    #[test]
    fn priority_orders_within_a_tenant_and_fifo_breaks_ties() {
        let mut q = FairQueue::new(0);
        q.push(entry("a", 1, 0), 0, 0);
        q.push(entry("a", 2, 5), 0, 0);
        q.push(entry("a", 3, 0), 0, 0);
        q.push(entry("a", 4, 5), 0, 0);
        let order: Vec<String> =
            std::iter::from_fn(|| q.pop(0, |_| None)).map(|(e, _)| e.task_id.to_string()).collect();
        assert_eq!(order, ["job_a_000002.0", "job_a_000004.0", "job_a_000001.0", "job_a_000003.0"]);
    }

    #[test]
    fn per_tenant_limit_holds_and_others_fill_the_slots() {
        let mut q = FairQueue::new(0);
        q.configure("a", 1.0, 1);
        for n in 0..5 {
            q.push(entry("a", n, 0), 0, 0);
        }
        let first = q.pop(0, |_| None).unwrap();
        assert!(q.pop(0, |_| None).is_none(), "a is at its limit of 1");
        q.push(entry("b", 0, 0), 0, 0);
        assert_eq!(&*q.pop(0, |_| None).unwrap().0.tenant_id, "b");
        q.done(&first.1, 5.0);
        assert_eq!(&*q.pop(0, |_| None).unwrap().0.tenant_id, "a");
    }

    #[test]
    fn what_waits_ahead_of_a_jobs_next_task() {
        let mut q = FairQueue::new(0);
        assert!(!q.ready_ahead_of("a", "job_a_000005", 0, 0), "nothing waits");
        // The same job's sibling, a newer job and a lower priority rank below it.
        q.push(entry("a", 5, 0), 0, 0);
        q.push(entry("a", 7, 0), 0, 0);
        q.push(entry("a", 8, -1), 0, 0);
        assert!(!q.ready_ahead_of("a", "job_a_000005", 0, 0));
        // An older job at the same priority, and a higher priority, rank above it.
        assert!(q.ready_ahead_of("a", "job_a_000006", 0, 0));
        q.push(entry("a", 9, 3), 0, 0);
        assert!(q.ready_ahead_of("a", "job_a_000005", 0, 0));
        // Another tenant's task always waits ahead; a delayed one not until it is due.
        let mut q = FairQueue::new(0);
        q.push(entry("b", 1, -5), 100, 0);
        assert!(!q.ready_ahead_of("a", "job_a_000001", 0, 0));
        assert!(q.ready_ahead_of("a", "job_a_000001", 0, 100));
    }

    #[test]
    fn delayed_tasks_wait_for_their_time_and_blocked_ones_go_back_to_wait() {
        let mut q = FairQueue::new(0);
        q.push(entry("a", 1, 0), 1_000, 0);
        assert!(q.pop(0, |_| None).is_none());
        assert_eq!(q.promote(500), Some(1_000));
        assert_eq!(q.promote(1_000), None);
        // Its plugin's circuit is open until 5000: it goes back to wait, not lost.
        assert!(q.pop(1_000, |_| Some(5_000)).is_none());
        assert!(q.holds("job_a_000001.0"));
        q.promote(5_000);
        assert!(q.pop(5_000, |_| None).is_some());
        assert!(q.is_empty());
    }

    #[test]
    fn an_idle_tenant_earns_no_credit() {
        let mut q = FairQueue::new(0);
        for n in 0..1000 {
            q.push(entry("a", n, 0), 0, 0);
        }
        simulate(&mut q, 1, 500, |_| 10.0);
        // B arrives late with a backlog: it shares equally from now on, not 500 tasks in a row.
        for n in 0..1000 {
            q.push(entry("b", n, 0), 0, 0);
        }
        let done = simulate(&mut q, 1, 100, |_| 10.0);
        assert!((45..=55).contains(&done["b"]), "{done:?}");
    }

    #[test]
    fn removing_a_job_drops_its_tasks_everywhere() {
        let mut q = FairQueue::new(0);
        q.push(entry("a", 1, 0), 0, 0);
        q.push(entry("a", 2, 0), 10, 0);
        q.push(entry("a", 3, 0), 0, 0);
        assert_eq!(q.remove_job("job_a_000001"), 1);
        assert_eq!(q.remove_job("job_a_000002"), 1);
        assert_eq!(q.len(), 1);
        assert_eq!(&*q.pop(20, |_| None).unwrap().0.task_id, "job_a_000003.0");
    }
}
