//! Circuit breakers, one per (tenant, plugin): after `failures` failures in a row that say the
//! plugin itself is in trouble (unavailable, rate-limited, timed out, trapped), the circuit
//! opens and the plugin's tasks wait instead of hammering it. When the cool-down ends one task
//! goes through as a probe (half-open): success closes the circuit, failure opens it again for
//! twice as long, up to a ceiling. Bad input is the caller's fault and does not count.

use std::collections::HashMap;
use std::sync::Arc;

/// When circuits open and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Failures in a row that open the circuit (0 turns breakers off).
    pub failures: u32,
    /// How long it first stays open, in ms.
    pub cooldown_ms: i64,
    /// The longest it stays open, in ms.
    pub max_cooldown_ms: i64,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy { failures: 5, cooldown_ms: 5_000, max_cooldown_ms: 60_000 }
    }
}

/// A circuit's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls flow; `failures` in a row so far.
    Closed {
        /// Consecutive failures.
        failures: u32,
    },
    /// No calls until `until` (unix ms).
    Open {
        /// When a probe may go.
        until: i64,
        /// The cool-down that was applied.
        cooldown_ms: i64,
    },
    /// One probe is out; others wait for its outcome.
    HalfOpen {
        /// The cool-down to apply if the probe fails.
        cooldown_ms: i64,
    },
}

/// What happened to a circuit, for events and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// It opened, until this time (unix ms).
    Opened(i64),
    /// A probe succeeded; it closed.
    Closed,
}

/// The breakers of one node.
#[derive(Debug, Default)]
pub struct Breakers {
    policy: BreakerPolicy,
    circuits: HashMap<(Arc<str>, Arc<str>), State>,
}

/// How long a task waits when a probe is already out for its plugin.
const PROBE_WAIT_MS: i64 = 200;

impl Breakers {
    /// Breakers under `policy`.
    pub fn new(policy: BreakerPolicy) -> Self {
        Breakers { policy, circuits: HashMap::new() }
    }

    /// The state of a plugin's circuit for a tenant.
    pub fn state(&self, tenant: &str, plugin: &str) -> State {
        self.circuits
            .iter()
            .find(|((t, p), _)| &**t == tenant && &**p == plugin)
            .map(|(_, s)| *s)
            .unwrap_or(State::Closed { failures: 0 })
    }

    /// Whether a task of this plugin may start now: `None` if so (and, at the end of a
    /// cool-down, it becomes the probe), or the time to try again.
    pub fn admit(&mut self, tenant: &Arc<str>, plugin: &Arc<str>, now: i64) -> Option<i64> {
        if self.policy.failures == 0 {
            return None;
        }
        let state = self.circuits.get_mut(&(tenant.clone(), plugin.clone()))?;
        match *state {
            State::Closed { .. } => None,
            State::Open { until, .. } if now < until => Some(until),
            State::Open { cooldown_ms, .. } => {
                *state = State::HalfOpen { cooldown_ms };
                None
            }
            State::HalfOpen { .. } => Some(now + PROBE_WAIT_MS),
        }
    }

    /// Records a call that worked.
    pub fn success(&mut self, tenant: &Arc<str>, plugin: &Arc<str>) -> Option<Transition> {
        let previous = self.circuits.remove(&(tenant.clone(), plugin.clone()))?;
        matches!(previous, State::HalfOpen { .. } | State::Open { .. }).then_some(Transition::Closed)
    }

    /// Records a failure that counts against the plugin.
    pub fn failure(&mut self, tenant: &Arc<str>, plugin: &Arc<str>, now: i64) -> Option<Transition> {
        if self.policy.failures == 0 {
            return None;
        }
        let policy = self.policy;
        let state = self.circuits.entry((tenant.clone(), plugin.clone())).or_insert(State::Closed { failures: 0 });
        let open = |cooldown_ms: i64| State::Open { until: now + cooldown_ms, cooldown_ms };
        let next = match *state {
            State::Closed { failures } if failures + 1 >= policy.failures => open(policy.cooldown_ms),
            State::Closed { failures } => State::Closed { failures: failures + 1 },
            State::HalfOpen { cooldown_ms } | State::Open { cooldown_ms, .. } => {
                open((cooldown_ms * 2).min(policy.max_cooldown_ms))
            }
        };
        *state = next;
        match next {
            State::Open { until, .. } => Some(Transition::Opened(until)),
            _ => None,
        }
    }

    /// Records a probe that ended without saying anything about the plugin (cancelled, bad
    /// input): the next task may probe.
    pub fn release_probe(&mut self, tenant: &Arc<str>, plugin: &Arc<str>, now: i64) {
        if let Some(state) = self.circuits.get_mut(&(tenant.clone(), plugin.clone()))
            && let State::HalfOpen { cooldown_ms } = *state
        {
            *state = State::Open { until: now, cooldown_ms };
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn opens_after_failures_in_a_row_probes_half_open_and_closes() {
        let mut b = Breakers::new(BreakerPolicy { failures: 3, cooldown_ms: 1_000, max_cooldown_ms: 3_000 });
        let (t, p) = (Arc::from("acme"), Arc::from("flaky"));
        assert_eq!(b.failure(&t, &p, 0), None);
        assert_eq!(b.success(&t, &p), None, "a success resets the count");
        assert_eq!(b.failure(&t, &p, 0), None);
        assert_eq!(b.failure(&t, &p, 0), None);
        assert_eq!(b.failure(&t, &p, 10), Some(Transition::Opened(1_010)));
        assert_eq!(b.admit(&t, &p, 500), Some(1_010), "open: tasks wait");
        assert_eq!(b.admit(&t, &p, 1_010), None, "the probe goes");
        assert_eq!(b.admit(&t, &p, 1_011), Some(1_211), "one probe at a time");
        // The probe fails: open twice as long.
        assert_eq!(b.failure(&t, &p, 1_100), Some(Transition::Opened(3_100)));
        assert_eq!(b.admit(&t, &p, 3_100), None);
        assert_eq!(b.failure(&t, &p, 3_200), Some(Transition::Opened(6_200)), "capped at 3 s");
        assert_eq!(b.admit(&t, &p, 6_200), None);
        assert_eq!(b.success(&t, &p), Some(Transition::Closed));
        assert_eq!(b.admit(&t, &p, 6_201), None);
        assert_eq!(b.state("acme", "flaky"), State::Closed { failures: 0 });
    }

    #[test]
    fn circuits_are_per_tenant_and_plugin() {
        let mut b = Breakers::new(BreakerPolicy { failures: 1, cooldown_ms: 1_000, max_cooldown_ms: 1_000 });
        let (acme, other, p, q) = (Arc::from("acme"), Arc::from("other"), Arc::from("p"), Arc::from("q"));
        b.failure(&acme, &p, 0);
        assert!(b.admit(&acme, &p, 1).is_some());
        assert!(b.admit(&other, &p, 1).is_none(), "another tenant's install of it is unaffected");
        assert!(b.admit(&acme, &q, 1).is_none(), "another plugin is unaffected");
    }

    #[test]
    fn a_probe_that_says_nothing_lets_the_next_one_go() {
        let mut b = Breakers::new(BreakerPolicy { failures: 1, cooldown_ms: 100, max_cooldown_ms: 100 });
        let (t, p) = (Arc::from("t"), Arc::from("p"));
        b.failure(&t, &p, 0);
        assert_eq!(b.admit(&t, &p, 100), None);
        b.release_probe(&t, &p, 150);
        assert_eq!(b.admit(&t, &p, 150), None, "the next task probes");
    }

    #[test]
    fn zero_failures_turns_breakers_off() {
        let mut b = Breakers::new(BreakerPolicy { failures: 0, ..Default::default() });
        let (t, p) = (Arc::from("t"), Arc::from("p"));
        for _ in 0..100 {
            assert_eq!(b.failure(&t, &p, 0), None);
        }
        assert_eq!(b.admit(&t, &p, 0), None);
    }
}
