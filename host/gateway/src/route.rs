//! Which deployment serves a request: the model's strategy orders its deployments, and each
//! deployment's health (the scheduler's circuit breaker, per tenant and deployment) skips the
//! ones cooling down, letting one probe through when the cool-down ends.

use crate::table::{Deployment, Strategy};
use qlayer_scheduler::breaker::{BreakerPolicy, Breakers};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One request in ten explores under `latency`, so a deployment that was slow once is measured
/// again.
const EXPLORE: f64 = 0.1;
/// Weight of the newest sample in the latency moving average.
const EWMA_ALPHA: f64 = 0.3;

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    in_flight: usize,
    latency_ms: Option<f64>,
}

/// (tenant id, deployment key).
type Key = (Arc<str>, Arc<str>);

/// Health and load of every (tenant, deployment) on this node.
#[derive(Debug)]
pub struct Health {
    breakers: Mutex<Breakers>,
    stats: Mutex<HashMap<Key, Stats>>,
}

/// The order to try a model's deployments in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Indexes into the model's deployments, first choice first.
    pub order: Vec<usize>,
    /// Deployments skipped because their circuit is open, with when each may be probed (unix ms).
    pub cooling: Vec<(usize, i64)>,
}

/// Marks a request in flight on a deployment until dropped.
#[derive(Debug)]
pub struct InFlight<'a> {
    health: &'a Health,
    key: Key,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut stats = self.health.lock_stats();
        if let Some(s) = stats.get_mut(&self.key) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }
}

/// How a finished attempt reflects on a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It answered.
    Success,
    /// It is in trouble (unavailable, rate-limited, timed out, trapped): counts toward opening.
    Failure,
    /// Says nothing about it (bad input, the client left).
    Neutral,
}

impl Health {
    /// Health under `policy`.
    pub fn new(policy: BreakerPolicy) -> Self {
        Health { breakers: Mutex::new(Breakers::new(policy)), stats: Mutex::new(HashMap::new()) }
    }

    fn lock_stats(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Stats>> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_breakers(&self) -> std::sync::MutexGuard<'_, Breakers> {
        self.breakers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The order to try `deployments` of a model under `strategy`, for `tenant`, at `now` (unix
    /// ms). A deployment whose circuit is open is left out (see [`Plan::cooling`]); one whose
    /// cool-down has ended becomes the probe.
    pub fn plan(&self, tenant: &str, strategy: Strategy, deployments: &[Deployment], now: i64) -> Plan {
        let tenant: Arc<str> = Arc::from(tenant);
        let keys: Vec<Arc<str>> = deployments.iter().map(|d| Arc::from(d.key().as_str())).collect();
        let stats: Vec<Stats> = {
            let map = self.lock_stats();
            keys.iter().map(|k| map.get(&(tenant.clone(), k.clone())).copied().unwrap_or_default()).collect()
        };
        let order = order(strategy, deployments, &stats, fastrand::f64);
        let mut plan = Plan { order: Vec::with_capacity(order.len()), cooling: Vec::new() };
        let mut breakers = self.lock_breakers();
        for i in order {
            match breakers.admit(&tenant, &keys[i], now) {
                None => plan.order.push(i),
                Some(until) => plan.cooling.push((i, until)),
            }
        }
        plan
    }

    /// Counts a request in flight on a deployment until the guard is dropped.
    pub fn start(&self, tenant: &str, deployment: &Deployment) -> InFlight<'_> {
        let key = (Arc::from(tenant), Arc::from(deployment.key().as_str()));
        self.lock_stats().entry(key.clone()).or_default().in_flight += 1;
        InFlight { health: self, key }
    }

    /// Records how an attempt ended, and its latency when it answered.
    pub fn finish(&self, tenant: &str, deployment: &Deployment, outcome: Outcome, latency_ms: f64, now: i64) {
        let (tenant, key): (Arc<str>, Arc<str>) = (Arc::from(tenant), Arc::from(deployment.key().as_str()));
        match outcome {
            Outcome::Success => {
                if let Some(transition) = self.lock_breakers().success(&tenant, &key) {
                    tracing::info!(tenant = %tenant, deployment = %key, ?transition, "deployment is healthy again");
                }
                let mut stats = self.lock_stats();
                let s = stats.entry((tenant, key)).or_default();
                s.latency_ms = Some(match s.latency_ms {
                    Some(avg) => avg * (1.0 - EWMA_ALPHA) + latency_ms * EWMA_ALPHA,
                    None => latency_ms,
                });
            }
            Outcome::Failure => {
                if let Some(transition) = self.lock_breakers().failure(&tenant, &key, now) {
                    tracing::warn!(tenant = %tenant, deployment = %key, ?transition, "deployment is cooling down");
                }
            }
            Outcome::Neutral => self.lock_breakers().release_probe(&tenant, &key, now),
        }
    }
}

/// Orders deployments by `strategy`; `random` gives numbers in [0, 1).
fn order(
    strategy: Strategy,
    deployments: &[Deployment],
    stats: &[Stats],
    mut random: impl FnMut() -> f64,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..deployments.len()).collect();
    match strategy {
        Strategy::Priority => {}
        Strategy::Weighted => {
            // Sampling without replacement by weight; weight 0 only as a last fallback.
            let mut left = order;
            order = Vec::with_capacity(left.len());
            while !left.is_empty() {
                let total: f64 = left.iter().map(|&i| f64::from(deployments[i].weight)).sum();
                if total <= 0.0 {
                    order.append(&mut left);
                    break;
                }
                let mut pick = random() * total;
                let mut chosen = left.len() - 1;
                for (n, &i) in left.iter().enumerate() {
                    let w = f64::from(deployments[i].weight);
                    if w > 0.0 && pick < w {
                        chosen = n;
                        break;
                    }
                    pick -= w;
                }
                order.push(left.remove(chosen));
            }
        }
        Strategy::LeastBusy => order.sort_by_key(|&i| stats[i].in_flight),
        Strategy::Latency => {
            // Unmeasured first (they need a measurement), then fastest; sometimes explore.
            order.sort_by(|&a, &b| {
                let (la, lb) = (stats[a].latency_ms.unwrap_or(-1.0), stats[b].latency_ms.unwrap_or(-1.0));
                la.total_cmp(&lb)
            });
            if order.len() > 1 && random() < EXPLORE {
                let n = 1 + ((random() * (order.len() - 1) as f64) as usize).min(order.len() - 2);
                let explored = order.remove(n);
                order.insert(0, explored);
            }
        }
        Strategy::Cost => order.sort_by(|&a, &b| {
            let price = |i: usize| deployments[i].input_price + deployments[i].output_price;
            price(a).total_cmp(&price(b))
        }),
    }
    order
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn deployment(plugin: &str, weight: u32, price: f64) -> Deployment {
        Deployment {
            plugin: plugin.into(),
            model: "m".into(),
            weight,
            input_price: price,
            output_price: price,
            rpm: None,
            tpm: None,
        }
    }

    fn three() -> Vec<Deployment> {
        vec![deployment("a", 1, 3.0), deployment("b", 3, 1.0), deployment("c", 0, 2.0)]
    }

    #[test]
    fn each_strategy_orders_as_it_says() {
        let d = three();
        let idle = vec![Stats::default(); 3];
        assert_eq!(order(Strategy::Priority, &d, &idle, || 0.5), [0, 1, 2]);
        assert_eq!(order(Strategy::Cost, &d, &idle, || 0.5), [1, 2, 0]);
        let busy = vec![
            Stats { in_flight: 5, latency_ms: Some(30.0) },
            Stats { in_flight: 0, latency_ms: Some(90.0) },
            Stats { in_flight: 2, latency_ms: Some(10.0) },
        ];
        assert_eq!(order(Strategy::LeastBusy, &d, &busy, || 0.5), [1, 2, 0]);
        assert_eq!(order(Strategy::Latency, &d, &busy, || 0.5), [2, 0, 1], "no exploration at 0.5");
        assert_eq!(order(Strategy::Latency, &d, &busy, || 0.05)[0], 0, "exploring picks another first");
        let unmeasured = vec![busy[0], busy[1], Stats::default()];
        assert_eq!(order(Strategy::Latency, &d, &unmeasured, || 0.5)[0], 2, "an unmeasured one is measured first");
        // Weighted: a weight-0 deployment only ever comes last.
        let mut firsts = [0usize; 3];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..4_000 {
            let o = order(Strategy::Weighted, &d, &idle, || rng.f64());
            assert_eq!(o.len(), 3);
            assert_eq!(o[2], 2, "{o:?}");
            firsts[o[0]] += 1;
        }
        let share = firsts[1] as f64 / 4_000.0;
        assert!((share - 0.75).abs() < 0.03, "b has 3 of 4 weight parts and went first {share:.3} of the time");
    }

    #[test]
    fn a_failing_deployment_cools_down_is_probed_half_open_and_comes_back() {
        let health = Health::new(BreakerPolicy { failures: 2, cooldown_ms: 1_000, max_cooldown_ms: 4_000 });
        let d = three();
        health.finish("t", &d[0], Outcome::Failure, 0.0, 0);
        assert_eq!(health.plan("t", Strategy::Priority, &d, 1).order, [0, 1, 2], "one failure is not enough");
        health.finish("t", &d[0], Outcome::Failure, 0.0, 10);
        let plan = health.plan("t", Strategy::Priority, &d, 20);
        assert_eq!((plan.order, plan.cooling), (vec![1, 2], vec![(0, 1_010)]), "open: skipped, says until when");
        assert_eq!(health.plan("other", Strategy::Priority, &d, 20).order, [0, 1, 2], "per tenant");
        // The cool-down ends: one probe goes; while it is out, others skip it.
        assert_eq!(health.plan("t", Strategy::Priority, &d, 1_010).order, [0, 1, 2]);
        assert_eq!(health.plan("t", Strategy::Priority, &d, 1_011).order, [1, 2]);
        health.finish("t", &d[0], Outcome::Success, 12.0, 1_020);
        assert_eq!(health.plan("t", Strategy::Priority, &d, 1_021).order, [0, 1, 2], "closed again");
    }

    #[test]
    fn in_flight_counts_follow_the_guards() {
        let health = Health::new(BreakerPolicy::default());
        let d = three();
        let g1 = health.start("t", &d[0]);
        let _g2 = health.start("t", &d[0]);
        let _g3 = health.start("t", &d[2]);
        assert_eq!(health.plan("t", Strategy::LeastBusy, &d, 0).order, [1, 2, 0]);
        drop(g1);
        let stats = health.lock_stats();
        assert_eq!(stats[&(Arc::from("t"), Arc::from("a/m"))].in_flight, 1);
    }
}
