//! Limits that are never exceeded, on one node or many: requests and tokens per minute, spend per
//! day and per month, for a tenant, an API key or a deployment.
//!
//! **How.** The store (SQLite in the embedded default, PostgreSQL shared by every node) holds
//! each limit as *grants*: a node asks for a chunk of a limit (a sixteenth of it, or what the
//! request at hand needs if that is more), the store grants it only while all grants alive plus
//! this one fit in the limit ([`qlayer_db::Db::grant_quota`] decides the grants of one key one
//! after the other), and the node then admits requests from the chunk in memory, without asking
//! again, for its *lease time* (`[gateway] quota-lease-ms`, 2 s). What it has not used when the
//! lease ends goes back to the store; a node that dies returns nothing, and its grants stop
//! counting when they die.
//!
//! **Why it holds in any minute.** A grant made at the store's time `T` may be drawn on until
//! `T + lease` and counts until `T + lease + 60 s`. Take any minute `[s, s + 60 s]` and the
//! grants drawn on in it: all were made after `s - lease`, and the latest of them, at `T`, was
//! granted only if it fitted with every grant still counting at `T`, which includes every
//! earlier one of them. So what they admitted adds up to at most the limit. Days and months are
//! periods of the calendar (UTC), part of the limit's key.
//!
//! **What it costs.** A unit admitted counts for a minute plus the lease time, so a limit held
//! at full rate for long admits `60 / (60 + lease)` of it (97% with 2 s); quota leased to a node
//! and not used is out of the others' reach until that node's lease ends; and a node asks the
//! store once per chunk, off the lock but on the path of the request that found its chunk
//! empty. Nothing is asked when a tenant has no limits.
//!
//! **Reservations.** Tokens and spend are reserved before the call at the most the request
//! can use: its prompt's bound (every token covers at least a byte; allowances per message,
//! tool and image: [`crate::request::prompt_bound`]) plus its `max_tokens`, and spend at the
//! model's dearest deployment; each settles to what the call really used after it, and what was
//! reserved and not used is given back. So what limits admit never passes them, as long as the
//! upstream keeps to `max_tokens`. A request without `max_tokens` reserves `[gateway]
//! reserve-tokens`; an answer longer than that is charged in full when it settles (later
//! requests wait for it), so a limit that must hold exactly wants clients that name it.

use qlayer_db::{Db, GrantAsk, GrantOutcome};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Requests.
    Requests,
    /// Tokens, input plus output.
    Tokens,
    /// Spend, in billionths of the price table's currency unit.
    Spend,
}

/// Over what time a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// Any 60 seconds.
    Minute,
    /// A UTC day.
    Day,
    /// A UTC month.
    Month,
}

/// Whose limit it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// A tenant (by id).
    Tenant(String),
    /// An API key (by id).
    Key(String),
    /// One deployment of a tenant's model table (`plugin/model`): the upstream's own quota.
    Deployment {
        /// The tenant's id.
        tenant: String,
        /// `plugin/model`.
        deployment: String,
    },
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Tenant(_) => write!(f, "the tenant's"),
            Scope::Key(_) => write!(f, "this API key's"),
            Scope::Deployment { deployment, .. } => write!(f, "deployment `{deployment}`'s"),
        }
    }
}

/// One limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Whose.
    pub scope: Scope,
    /// Of what.
    pub unit: Unit,
    /// Over what time.
    pub window: Window,
    /// How much.
    pub max: u64,
}

impl Limit {
    /// The store's key of this limit at unix ms `now` (for a day or a month, the period's).
    fn key(&self, now: i64) -> String {
        let scope = match &self.scope {
            Scope::Tenant(id) => format!("t/{id}"),
            Scope::Key(id) => format!("k/{id}"),
            Scope::Deployment { tenant, deployment } => format!("d/{tenant}/{deployment}"),
        };
        let unit = match self.unit {
            Unit::Requests => "req",
            Unit::Tokens => "tok",
            Unit::Spend => "spend",
        };
        match self.window {
            Window::Minute => format!("{scope}/{unit}/min"),
            Window::Day => format!("{scope}/{unit}/day/{}", now.div_euclid(DAY_MS)),
            Window::Month => {
                let (y, m) = year_month(now);
                format!("{scope}/{unit}/month/{y:04}-{m:02}")
            }
        }
    }

    /// How long past the store's now a grant made now must count.
    fn alive_ms(&self, now: i64, lease: Duration, minute_ms: i64) -> i64 {
        let lease = lease.as_millis() as i64;
        match self.window {
            Window::Minute => minute_ms + lease,
            Window::Day | Window::Month => period_end(self.window, now) - now + lease,
        }
    }

    /// What a node asks for at once: a sixteenth of the limit, or `need` if that is more.
    fn chunk(&self, need: u64) -> u64 {
        need.max(self.max / 16).min(self.max.max(need))
    }

    /// For people: "the tenant's limit of 60 requests per minute".
    pub fn describe(&self, currency: &str) -> String {
        let what = match self.unit {
            Unit::Requests => format!("{} requests", self.max),
            Unit::Tokens => format!("{} tokens", self.max),
            Unit::Spend => format!("{} {currency}", money(self.max)),
        };
        let per = match self.window {
            Window::Minute => "per minute",
            Window::Day => "per day (UTC)",
            Window::Month => "per month (UTC)",
        };
        let kind = if self.unit == Unit::Spend { "budget" } else { "limit" };
        format!("{} {kind} of {what} {per}", self.scope)
    }
}

/// Billionths as a currency amount: `1.5`, `0.000123`.
pub fn money(nanos: u64) -> String {
    let whole = nanos / 1_000_000_000;
    let frac = nanos % 1_000_000_000;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:09}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;

/// The UTC year and month of unix ms `ms`.
fn year_month(ms: i64) -> (i64, u32) {
    let (y, m, _) = civil_from_days(ms.div_euclid(DAY_MS));
    (y, m)
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of (year, month, day): the inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix ms when the day or month holding `now` ends (a minute has no end: `now`).
pub fn period_end(window: Window, now: i64) -> i64 {
    match window {
        Window::Minute => now + MINUTE_MS,
        Window::Day => (now.div_euclid(DAY_MS) + 1) * DAY_MS,
        Window::Month => {
            let (y, m) = year_month(now);
            let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            days_from_civil(y, m, 1) * DAY_MS
        }
    }
}

/// Unix ms when the day or month holding `now` began (a minute: a minute ago).
pub fn period_start(window: Window, now: i64) -> i64 {
    match window {
        Window::Minute => now - MINUTE_MS,
        Window::Day => now.div_euclid(DAY_MS) * DAY_MS,
        Window::Month => {
            let (y, m) = year_month(now);
            days_from_civil(y, m, 1) * DAY_MS
        }
    }
}

/// Unix ms as `2026-12-07T00:00:00Z` (whole seconds).
pub fn rfc3339(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(DAY_MS));
    let s = ms.rem_euclid(DAY_MS) / 1000;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A limit that refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The limit.
    pub limit: Limit,
    /// What the request needed of it.
    pub needed: u64,
    /// When it may fit; `None` when it never can (it needs more than the whole limit).
    pub retry_after: Option<Duration>,
}

/// Part of a limit leased to this node.
#[derive(Debug)]
struct Lease {
    id: String,
    granted: u64,
    used: u64,
    until: Instant,
}

impl Lease {
    fn free(&self) -> u64 {
        self.granted.saturating_sub(self.used)
    }
}

/// This node's view of one limit key.
#[derive(Debug, Default)]
struct Ledger {
    leases: Vec<Lease>,
    /// What every grant alive in the store added up to after this node's last grant.
    store_used: u64,
    /// One request at a time asks the store for this key; the others wait and then find the
    /// chunk it brought.
    asking: Arc<tokio::sync::Mutex<()>>,
    touched: Option<Instant>,
}

impl Ledger {
    /// What the live leases have not used.
    fn free(&self, now: Instant) -> u64 {
        self.leases.iter().filter(|l| l.until > now).map(Lease::free).sum()
    }

    /// Takes up to `amount` from the live leases; from which, how much.
    fn take(&mut self, mut amount: u64, now: Instant) -> Vec<(String, u64)> {
        let mut parts = Vec::new();
        for lease in self.leases.iter_mut().filter(|l| l.until > now) {
            if amount == 0 {
                break;
            }
            let part = lease.free().min(amount);
            if part > 0 {
                lease.used += part;
                amount -= part;
                parts.push((lease.id.clone(), part));
            }
        }
        parts
    }

    /// Puts `amount` of what `parts` took back (the last taken first): into its lease while
    /// that lives, else into the list to give back to the store.
    fn untake(&mut self, parts: &[(String, u64)], mut amount: u64, now: Instant, back: &mut Vec<(String, u64)>) {
        for (id, part) in parts.iter().rev() {
            if amount == 0 {
                return;
            }
            let x = (*part).min(amount);
            amount -= x;
            match self.leases.iter_mut().find(|l| &l.id == id && l.until > now) {
                Some(lease) => lease.used = lease.used.saturating_sub(x),
                None => back.push((id.clone(), x)),
            }
        }
    }

    /// Removes ended leases; what each had not used, to give back.
    fn expire(&mut self, now: Instant) -> Vec<(String, u64)> {
        let mut back = Vec::new();
        self.leases.retain(|l| {
            if l.until > now {
                return true;
            }
            if l.free() > 0 {
                back.push((l.id.clone(), l.free()));
            }
            false
        });
        back
    }
}

/// Part of a limit held by one request until it settles.
#[derive(Debug)]
struct Hold {
    limit: Limit,
    key: String,
    /// The leases it drew on, and how much of each.
    parts: Vec<(String, u64)>,
    amount: u64,
}

/// What a request really used, to settle its reservation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    /// Tokens, input plus output.
    pub tokens: u64,
    /// Spend, in billionths.
    pub spend: u64,
}

/// How full one limit is, as this node saw it at its last grant (for OpenAI's
/// `x-ratelimit-*` headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    /// The limit.
    pub limit: Limit,
    /// What is left of it.
    pub remaining: u64,
    /// When it is whole again if nothing more is admitted.
    pub reset: Duration,
}

/// The limits of one node over the store.
pub struct Quotas {
    db: Db,
    lease: Duration,
    /// A minute's length: 60 s but in tests.
    minute_ms: i64,
    ledgers: Mutex<HashMap<String, Ledger>>,
}

impl fmt::Debug for Quotas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quotas").field("lease", &self.lease).finish()
    }
}

impl Quotas {
    /// Limits over `db`, leasing quota for `lease` at a time; a task returns ended leases and
    /// prunes the store while the returned value lives.
    pub fn new(db: Db, lease: Duration) -> Arc<Quotas> {
        Self::with_minute(db, lease, MINUTE_MS)
    }

    fn with_minute(db: Db, lease: Duration, minute_ms: i64) -> Arc<Quotas> {
        let lease = lease.max(Duration::from_millis(1));
        let quotas = Arc::new(Quotas { db, lease, minute_ms, ledgers: Mutex::default() });
        tokio::spawn(sweep(Arc::downgrade(&quotas)));
        quotas
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Ledger>> {
        self.ledgers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives unused quota back to the store, off the request's path.
    fn give_back(&self, back: Vec<(String, u64)>) {
        if back.is_empty() {
            return;
        }
        let db = self.db.clone();
        tokio::spawn(async move {
            for (id, amount) in back {
                if let Err(e) = db.give_back_quota(&id, amount as i64).await {
                    // Not lost for good: the grant stops counting when it dies.
                    tracing::warn!(grant = %id, amount, "giving quota back failed: {e}");
                }
            }
        });
    }

    /// Reserves `amount` of each limit, all or none: a request is admitted only if every one of
    /// its limits has room for it.
    pub async fn reserve(self: &Arc<Self>, needs: Vec<(Limit, u64)>) -> Result<Reservation, Refusal> {
        let mut reservation = Reservation { quotas: self.clone(), holds: Vec::with_capacity(needs.len()) };
        for (limit, amount) in needs {
            if amount == 0 {
                continue;
            }
            match self.hold(limit, amount).await {
                Ok(hold) => reservation.holds.push(hold),
                Err(refusal) => {
                    reservation.release();
                    return Err(refusal);
                }
            }
        }
        Ok(reservation)
    }

    async fn hold(&self, limit: Limit, amount: u64) -> Result<Hold, Refusal> {
        let refuse = |retry_after| Refusal { limit: limit.clone(), needed: amount, retry_after };
        if amount > limit.max {
            return Err(refuse(None));
        }
        let key = limit.key(now_ms());
        let asking = {
            let mut ledgers = self.lock();
            let ledger = ledgers.entry(key.clone()).or_default();
            let now = Instant::now();
            ledger.touched = Some(now);
            if ledger.free(now) >= amount {
                let parts = ledger.take(amount, now);
                return Ok(Hold { limit, key, parts, amount });
            }
            ledger.asking.clone()
        };
        let _asking = asking.lock().await;
        // What the leases have (another request may have brought a chunk while this one
        // waited), and the rest from the store.
        let asked = Instant::now();
        let (parts, back) = {
            let mut ledgers = self.lock();
            let ledger = ledgers.entry(key.clone()).or_default();
            let back = ledger.expire(asked);
            (ledger.take(amount, asked), back)
        };
        self.give_back(back);
        let mut hold = Hold { limit, key, parts, amount };
        let taken: u64 = hold.parts.iter().map(|(_, n)| n).sum();
        if taken == amount {
            return Ok(hold);
        }
        let rest = amount - taken;
        let ask = GrantAsk {
            key: &hold.key,
            limit: hold.limit.max as i64,
            min: rest as i64,
            want: hold.limit.chunk(rest) as i64,
            alive_ms: hold.limit.alive_ms(now_ms(), self.lease, self.minute_ms),
            force: false,
        };
        let outcome = self.db.grant_quota(ask).await;
        let mut ledgers = self.lock();
        let ledger = ledgers.entry(hold.key.clone()).or_default();
        let retry_after = match outcome {
            Ok(GrantOutcome::Granted { id, amount: granted, used }) => {
                metrics::counter!("qlayer_gateway_quota_grants_total").increment(1);
                ledger.store_used = used.max(0) as u64;
                ledger.leases.push(Lease {
                    id: id.clone(),
                    granted: granted as u64,
                    used: rest,
                    until: asked + self.lease,
                });
                hold.parts.push((id, rest));
                return Ok(hold);
            }
            Ok(GrantOutcome::Refused { used, room_in_ms }) => {
                ledger.store_used = used.max(0) as u64;
                room_in_ms.map(|ms| Duration::from_millis(ms.max(1) as u64))
            }
            Err(e) => {
                // The store decides; without it nothing can be granted safely.
                tracing::error!(key = %hold.key, "asking the store for quota failed: {e}");
                metrics::counter!("qlayer_gateway_quota_store_errors_total").increment(1);
                Some(Duration::from_secs(1))
            }
        };
        let mut back = Vec::new();
        ledger.untake(&hold.parts, taken, Instant::now(), &mut back);
        drop(ledgers);
        self.give_back(back);
        Err(Refusal { limit: hold.limit, needed: amount, retry_after })
    }

    /// Settles `hold` to `actual`: what it reserved and did not use goes back; what it used
    /// beyond its reservation is charged (from the live leases, else granted by the store
    /// regardless of the limit: it was spent).
    fn settle_hold(&self, hold: Hold, actual: u64) {
        let now = Instant::now();
        if actual == hold.amount {
            return;
        }
        let mut ledgers = self.lock();
        let ledger = ledgers.entry(hold.key.clone()).or_default();
        if actual < hold.amount {
            let mut back = Vec::new();
            ledger.untake(&hold.parts, hold.amount - actual, now, &mut back);
            drop(ledgers);
            self.give_back(back);
            return;
        }
        let extra = actual - hold.amount;
        let taken: u64 = ledger.take(extra, now).iter().map(|(_, n)| n).sum();
        drop(ledgers);
        if taken == extra {
            return;
        }
        let extra = extra - taken;
        let db = self.db.clone();
        let alive_ms = hold.limit.alive_ms(now_ms(), self.lease, self.minute_ms);
        tokio::spawn(async move {
            let ask =
                GrantAsk { key: &hold.key, limit: 0, min: extra as i64, want: extra as i64, alive_ms, force: true };
            if let Err(e) = db.grant_quota(ask).await {
                tracing::warn!(key = %hold.key, extra, "charging usage beyond its reservation failed: {e}");
            }
        });
    }

    /// How full `limit` is, as this node last saw it.
    pub fn standing(&self, limit: &Limit) -> Standing {
        let key = limit.key(now_ms());
        let ledgers = self.lock();
        let now = Instant::now();
        let (store_used, unused) = ledgers
            .get(&key)
            .map(|l| (l.store_used, l.leases.iter().filter(|l| l.until > now).map(Lease::free).sum::<u64>()))
            .unwrap_or((0, 0));
        let remaining = limit.max.saturating_sub(store_used.saturating_sub(unused));
        let reset = if remaining >= limit.max {
            Duration::ZERO
        } else {
            Duration::from_millis(limit.alive_ms(now_ms(), self.lease, self.minute_ms) as u64)
        };
        Standing { limit: limit.clone(), remaining, reset }
    }

    /// Returns ended leases and forgets keys idle for two minutes.
    fn sweep_once(&self) {
        let now = Instant::now();
        let mut back = Vec::new();
        {
            let mut ledgers = self.lock();
            ledgers.retain(|_, ledger| {
                back.extend(ledger.expire(now));
                !ledger.leases.is_empty() || ledger.touched.is_some_and(|t| now.duration_since(t) < IDLE)
            });
        }
        self.give_back(back);
    }
}

/// How long a key nobody asked for stays in a node's memory.
const IDLE: Duration = Duration::from_secs(120);

async fn sweep(quotas: Weak<Quotas>) {
    let Some(lease) = quotas.upgrade().map(|q| q.lease) else { return };
    let mut tick = tokio::time::interval(lease.max(Duration::from_millis(100)));
    let mut last_prune = Instant::now();
    loop {
        tick.tick().await;
        let Some(quotas) = quotas.upgrade() else { return };
        quotas.sweep_once();
        if last_prune.elapsed() >= Duration::from_secs(60) {
            last_prune = Instant::now();
            if let Err(e) = quotas.db.prune_quota().await {
                tracing::warn!("pruning dead quota grants failed: {e}");
            }
        }
    }
}

/// What one request holds of its limits. Settle it with what the request used; dropped
/// unsettled, it keeps all it reserved (a request whose end is unknown is charged in full).
#[derive(Debug)]
pub struct Reservation {
    quotas: Arc<Quotas>,
    holds: Vec<Hold>,
}

impl Reservation {
    /// A reservation of nothing (no limit applies).
    pub fn none(quotas: &Arc<Quotas>) -> Reservation {
        Reservation { quotas: quotas.clone(), holds: Vec::new() }
    }

    /// The limits it holds.
    pub fn limits(&self) -> impl Iterator<Item = &Limit> {
        self.holds.iter().map(|h| &h.limit)
    }

    /// Settles to what the request used: requests stay counted, tokens and spend become
    /// `used`'s.
    pub fn settle(mut self, used: Used) {
        for hold in std::mem::take(&mut self.holds) {
            let actual = match hold.limit.unit {
                Unit::Requests => hold.amount,
                Unit::Tokens => used.tokens,
                Unit::Spend => used.spend,
            };
            self.quotas.settle_hold(hold, actual);
        }
    }

    /// Gives everything back: the request was not made.
    pub fn release(mut self) {
        for hold in std::mem::take(&mut self.holds) {
            self.quotas.settle_hold(hold, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn calendar_periods_are_utc_days_and_months() {
        // 2026-12-06T12:34:56Z.
        let now = days_from_civil(2026, 12, 6) * DAY_MS + (12 * 3600 + 34 * 60 + 56) * 1000;
        assert_eq!(rfc3339(now), "2026-12-06T12:34:56Z");
        assert_eq!(rfc3339(period_end(Window::Day, now)), "2026-12-07T00:00:00Z");
        assert_eq!(rfc3339(period_end(Window::Month, now)), "2027-01-01T00:00:00Z");
        assert_eq!(rfc3339(period_start(Window::Month, now)), "2026-12-01T00:00:00Z");
        assert_eq!(rfc3339(period_start(Window::Day, now)), "2026-12-06T00:00:00Z");
        let feb = days_from_civil(2028, 2, 29) * DAY_MS;
        assert_eq!(rfc3339(period_end(Window::Month, feb)), "2028-03-01T00:00:00Z");
        for days in [-1000, 0, 365, 20_000, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        let limit = Limit { scope: Scope::Tenant("t".into()), unit: Unit::Spend, window: Window::Month, max: 1 };
        assert_eq!(limit.key(now), "t/t/spend/month/2026-12");
    }

    #[test]
    fn limits_describe_themselves() {
        let limit = Limit { scope: Scope::Key("k".into()), unit: Unit::Spend, window: Window::Day, max: 2_500_000_000 };
        assert_eq!(limit.describe("USD"), "this API key's budget of 2.5 USD per day (UTC)");
        assert_eq!(money(123_000), "0.000123");
        let limit = Limit { scope: Scope::Tenant("t".into()), unit: Unit::Requests, window: Window::Minute, max: 60 };
        assert_eq!(limit.describe("USD"), "the tenant's limit of 60 requests per minute");
        assert_eq!(limit.chunk(1), 3);
        assert_eq!(limit.chunk(10), 10);
    }
}

#[cfg(test)]
mod store_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The store a test runs on: a SQLite file, or a fresh database on the machine's
    /// PostgreSQL (dropped with the guard).
    struct Store {
        _sqlite: Option<tempfile::TempDir>,
        _postgres: Option<qlayer_tests::PgDb>,
    }

    async fn store(postgres: bool) -> (Db, Store) {
        if postgres {
            let (url, guard) = qlayer_tests::fresh_postgres().await;
            (Db::open(&url).await.unwrap(), Store { _sqlite: None, _postgres: Some(guard) })
        } else {
            let dir = tempfile::tempdir().unwrap();
            (Db::open_sqlite(&dir.path().join("q.db")).await.unwrap(), Store { _sqlite: Some(dir), _postgres: None })
        }
    }

    fn rpm(max: u64) -> Limit {
        Limit { scope: Scope::Tenant("tn_a".into()), unit: Unit::Requests, window: Window::Minute, max }
    }

    /// Three nodes over one store, 40 requests each at once against a limit of 50 a minute:
    /// never more than 50 admitted; once the leases other nodes held have ended, exactly 50.
    async fn three_nodes_never_admit_more_than_the_limit(postgres: bool) {
        let (db, _store) = store(postgres).await;
        let nodes: Vec<Arc<Quotas>> = (0..3).map(|_| Quotas::new(db.clone(), Duration::from_millis(300))).collect();
        let mut calls = Vec::new();
        for node in &nodes {
            for _ in 0..40 {
                let node = node.clone();
                calls.push(tokio::spawn(async move { node.reserve(vec![(rpm(50), 1)]).await }));
            }
        }
        let mut admitted = Vec::new();
        let mut refusals = 0;
        for call in calls {
            match call.await.unwrap() {
                Ok(r) => admitted.push(r),
                Err(refusal) => {
                    assert!(refusal.retry_after.is_some_and(|d| d <= Duration::from_millis(60_300)), "{refusal:?}");
                    refusals += 1;
                }
            }
        }
        assert!(admitted.len() <= 50, "{} admitted over a limit of 50", admitted.len());
        assert_eq!(admitted.len() + refusals, 120);
        // Leases end and their unused quota goes back: then the rest of the 50 is admitted,
        // and not one more.
        tokio::time::sleep(Duration::from_millis(700)).await;
        for _ in 0..20 {
            for node in &nodes {
                if let Ok(r) = node.reserve(vec![(rpm(50), 1)]).await {
                    admitted.push(r);
                }
            }
        }
        assert_eq!(admitted.len(), 50);
        for r in admitted {
            r.settle(Used::default());
        }
        assert_eq!(db.quota_used(&rpm(50).key(now_ms())).await.unwrap(), 50);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_never_admit_more_than_the_limit_on_sqlite() {
        three_nodes_never_admit_more_than_the_limit(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_never_admit_more_than_the_limit_on_postgres() {
        three_nodes_never_admit_more_than_the_limit(true).await;
    }

    /// Quota is leased in chunks: 200 requests against 1,000 a minute ask the store for
    /// grants about once per sixteenth of the limit (62), not once per request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_draw_on_a_lease_in_memory_and_ask_the_store_once_a_chunk() {
        let (db, _store) = store(false).await;
        let quotas = Quotas::new(db.clone(), Duration::from_secs(60));
        for _ in 0..200 {
            quotas.reserve(vec![(rpm(1_000), 1)]).await.unwrap().settle(Used::default());
        }
        // The leases are 60 s long here: every grant made is still in the node's ledger.
        let grants = quotas.lock().get(&rpm(1_000).key(now_ms())).map(|l| l.leases.len());
        assert_eq!(grants, Some(4), "200 requests in chunks of 62");
        assert_eq!(db.quota_used(&rpm(1_000).key(now_ms())).await.unwrap(), 4 * 62);
    }

    /// A minute of 1 s: what was admitted counts for the minute and the lease, then frees; a
    /// node that dies holding a lease takes nothing with it for longer than that.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_window_frees_and_a_dead_nodes_lease_ends() {
        let (db, _store) = store(true).await;
        let lease = Duration::from_millis(200);
        let dead = Quotas::with_minute(db.clone(), lease, 1_000);
        let limit = rpm(32);
        // It takes a chunk of 2, uses 1, and dies.
        let held = dead.reserve(vec![(limit.clone(), 1)]).await.unwrap();
        drop(held);
        drop(dead);
        let node = Quotas::with_minute(db.clone(), lease, 1_000);
        let mut got = 0;
        let refusal = loop {
            match node.reserve(vec![(limit.clone(), 1)]).await {
                Ok(_) => got += 1,
                Err(refusal) => break refusal,
            }
        };
        assert_eq!(got, 30, "the dead node's chunk of 2 still counts");
        let wait = refusal.retry_after.unwrap();
        assert!(wait <= Duration::from_millis(1_200), "{wait:?}");
        tokio::time::sleep(wait + Duration::from_millis(300)).await;
        let mut again = 0;
        while node.reserve(vec![(limit.clone(), 1)]).await.is_ok() {
            again += 1;
        }
        assert!(again >= 2, "the dead node's grant died with its minute: {again} admitted after it");
    }

    /// Tokens are reserved, then settled to what was used: the unused part is admitted again;
    /// usage beyond a reservation is charged; a request over the whole limit is refused for good;
    /// and a request refused by one limit holds nothing of the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reservations_settle_to_what_was_used() {
        let (db, _store) = store(false).await;
        let quotas = Quotas::new(db.clone(), Duration::from_millis(100));
        let tpm = Limit { unit: Unit::Tokens, ..rpm(1_000) };
        for _ in 0..7 {
            let r = quotas.reserve(vec![(tpm.clone(), 400)]).await.unwrap();
            r.settle(Used { tokens: 100, spend: 0 });
        }
        // 700 used: 400 more would pass 1,000.
        let refused = quotas.reserve(vec![(tpm.clone(), 400)]).await.unwrap_err();
        assert_eq!((refused.needed, refused.limit.max), (400, 1_000));
        assert!(refused.retry_after.is_some());
        // One that used more than it reserved is charged in full: 950.
        let r = quotas.reserve(vec![(tpm.clone(), 100)]).await.unwrap();
        r.settle(Used { tokens: 250, spend: 0 });
        quotas.reserve(vec![(tpm.clone(), 100)]).await.unwrap_err();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(db.quota_used(&tpm.key(now_ms())).await.unwrap(), 950);
        // Over the whole limit: never.
        let never = quotas.reserve(vec![(tpm.clone(), 1_001)]).await.unwrap_err();
        assert_eq!(never.retry_after, None);
        // All or none: the request limit's hold is given back when the token limit refuses.
        let requests = rpm(5);
        let refused = quotas.reserve(vec![(requests.clone(), 1), (tpm.clone(), 60)]).await.unwrap_err();
        assert_eq!(refused.limit, tpm);
        let standing = quotas.standing(&requests);
        assert_eq!(standing.remaining, 5, "{standing:?}");
    }
}
