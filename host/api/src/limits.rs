//! The gateway's limits and budgets through the API: operators set a tenant's, a tenant's admins
//! set its keys' (never above the tenant's). Each applies at once on this node and within the
//! model table's time (1 s) on the others; the gateway holds them exactly ([`qlayer_gateway::quota`]).

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use axum::extract::State;
use qlayer_db::QuotaLimits;
use serde::{Deserialize, Serialize};

/// The most a limit may be (requests or tokens per minute; a budget in currency units).
const MAX_LIMIT: i64 = 1_000_000_000;

/// `PUT /v1/tenants/{id}/limits` and `PUT /v1/keys/{id}/limits`: each field left out (or null)
/// is no limit of that kind; `{}` removes them all.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute (any 60 seconds), 1 to 1000000000.
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<i64>,
    /// Tokens (input plus output) per minute, 1 to 1000000000. A request reserves the most it
    /// can use (its prompt at a token a byte, plus its `max_tokens` or the server's `[gateway]
    /// reserve-tokens`) and settles to what it used.
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<i64>,
    /// Spend budgets, in the price table's currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// Spend budgets.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// The price table's currency (`[gateway] currency`, `USD` unless the operator set another);
    /// a budget in any other is refused.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    /// Spend per UTC day, from 0.000000001 to 1000000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.000000001, maximum = 1_000_000_000)]
    pub daily: Option<f64>,
    /// Spend per UTC month, from 0.000000001 to 1000000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.000000001, maximum = 1_000_000_000)]
    pub monthly: Option<f64>,
}

/// Limits as set.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LimitsView {
    /// The tenant.
    pub tenant_id: String,
    /// The key, for a key's limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Requests per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpm: Option<i64>,
    /// Tokens per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<i64>,
    /// Spend budgets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// Checks `body` (the message names the field) and turns it into the store's limits.
fn checked(body: &Limits, currency: &str) -> Result<QuotaLimits, ApiError> {
    for (field, value) in [("rpm", body.rpm), ("tpm", body.tpm)] {
        if let Some(v) = value
            && !(1..=MAX_LIMIT).contains(&v)
        {
            return Err(ApiError::invalid(format!(
                "{field} must be 1 to {MAX_LIMIT} (leave it out for no limit), not {v}"
            )));
        }
    }
    let mut limits = QuotaLimits { rpm: body.rpm, tpm: body.tpm, ..QuotaLimits::default() };
    if let Some(budget) = &body.budget {
        if budget.currency != currency {
            return Err(ApiError::invalid(format!(
                "budget.currency `{}`: prices here are in {currency}, so budgets are too",
                budget.currency.escape_debug()
            )));
        }
        for (field, value, slot) in
            [("daily", budget.daily, &mut limits.daily_nanos), ("monthly", budget.monthly, &mut limits.monthly_nanos)]
        {
            if let Some(v) = value {
                // Budgets are counted in billionths: less than one is no budget anyone can use.
                if !v.is_finite() || v < 1e-9 || v > MAX_LIMIT as f64 {
                    return Err(ApiError::invalid(format!(
                        "budget.{field} must be from 0.000000001 to {MAX_LIMIT} {currency} (leave it out for none), not {v}"
                    )));
                }
                *slot = Some((v * 1e9).round() as i64);
            }
        }
    }
    Ok(limits)
}

/// The store's limits as the API shows them.
fn view(tenant_id: &str, key_id: Option<&str>, limits: &QuotaLimits, currency: &str) -> LimitsView {
    let amount = |nanos: Option<i64>| nanos.map(|n| n as f64 / 1e9);
    let budget = (limits.daily_nanos.is_some() || limits.monthly_nanos.is_some()).then(|| Budget {
        currency: currency.to_string(),
        daily: amount(limits.daily_nanos),
        monthly: amount(limits.monthly_nanos),
    });
    LimitsView {
        tenant_id: tenant_id.to_string(),
        key_id: key_id.map(str::to_string),
        rpm: limits.rpm,
        tpm: limits.tpm,
        budget,
    }
}

fn currency(state: &AppState) -> String {
    state.gateway.as_ref().map(|g| g.currency().to_string()).unwrap_or_else(|| "USD".into())
}

fn applied(state: &AppState, tenant_id: &str) {
    if let Some(gateway) = &state.gateway {
        gateway.invalidate_limits(tenant_id);
    }
}

/// Sets a tenant's gateway limits and budgets (operators only).
#[utoipa::path(put, path = "/v1/tenants/{id}/limits", tag = "tenants", request_body = Limits,
    params(("id" = String, Path, description = "tenant id")),
    responses((status = 200, body = LimitsView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn set_tenant_limits(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    ApiJson(body): ApiJson<Limits>,
) -> Result<axum::Json<LimitsView>, ApiError> {
    set_tenant_limits_op(&state, &caller, &id, &body).await.map(axum::Json)
}

/// Sets a tenant's limits (REST and gRPC).
pub async fn set_tenant_limits_op(
    state: &AppState,
    caller: &Caller,
    id: &str,
    body: &Limits,
) -> Result<LimitsView, ApiError> {
    if !caller.is_operator() {
        return Err(ApiError::forbidden("a tenant's limits are set with an admin key of the `system` tenant"));
    }
    let currency = currency(state);
    let outcome = async {
        let limits = checked(body, &currency)?;
        if state.db.tenant(id).await?.is_none() {
            return Err(ApiError::not_found(format!("tenant `{id}` not found")));
        }
        state.db.set_quota_limits(id, "", &limits).await?;
        applied(state, id);
        Ok(view(id, None, &limits, &currency))
    }
    .await;
    state.audit(caller, "tenant.limits", id, &outcome).await;
    outcome
}

/// Sets the gateway limits and budgets of one of the tenant's API keys (admins; an operator, of
/// any tenant's key); none may be above the tenant's own.
#[utoipa::path(put, path = "/v1/keys/{id}/limits", tag = "keys", request_body = Limits,
    params(("id" = String, Path, description = "key id")),
    responses((status = 200, body = LimitsView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn set_key_limits(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    ApiJson(body): ApiJson<Limits>,
) -> Result<axum::Json<LimitsView>, ApiError> {
    set_key_limits_op(&state, &caller, &id, &body).await.map(axum::Json)
}

/// Sets a key's limits (REST and gRPC).
pub async fn set_key_limits_op(
    state: &AppState,
    caller: &Caller,
    id: &str,
    body: &Limits,
) -> Result<LimitsView, ApiError> {
    caller.require_admin()?;
    let tenant_id = &crate::resources::key_scope(state, caller, id).await?;
    let currency = currency(state);
    let outcome = async {
        let limits = checked(body, &currency)?;
        if !state.db.keys(tenant_id).await?.iter().any(|k| k.id == id) {
            return Err(ApiError::not_found(format!("key `{id}` not found")));
        }
        let tenant = state
            .db
            .quota_limits(tenant_id)
            .await?
            .into_iter()
            .find(|(key, _)| key.is_empty())
            .map(|(_, l)| l)
            .unwrap_or_default();
        for (field, key, of_tenant, money) in [
            ("rpm", limits.rpm, tenant.rpm, false),
            ("tpm", limits.tpm, tenant.tpm, false),
            ("budget.daily", limits.daily_nanos, tenant.daily_nanos, true),
            ("budget.monthly", limits.monthly_nanos, tenant.monthly_nanos, true),
        ] {
            if let (Some(key), Some(tenant)) = (key, of_tenant)
                && key > tenant
            {
                let shown = if money {
                    format!("{} {currency}", qlayer_gateway::quota::money(tenant.max(0) as u64))
                } else {
                    tenant.to_string()
                };
                return Err(ApiError::invalid(format!(
                    "{field} is above the tenant's own limit of {shown}: a key's limits are within its tenant's"
                )));
            }
        }
        state.db.set_quota_limits(tenant_id, id, &limits).await?;
        applied(state, tenant_id);
        Ok(view(tenant_id, Some(id), &limits, &currency))
    }
    .await;
    state.audit(caller, "key.limits", id, &outcome).await;
    outcome
}

/// How full one limit is, in `GET /v1/usage`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LimitStanding {
    /// `tenant` or `key`.
    pub scope: String,
    /// The key, for a key's limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// `rpm`, `tpm`, `daily_budget` or `monthly_budget`.
    pub limit: String,
    /// The limit: requests, tokens, or an amount of the currency.
    pub max: f64,
    /// What was used in the window so far (answered requests, their tokens, their cost).
    pub used: f64,
    /// What is left.
    pub remaining: f64,
    /// For a budget, the currency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// When the window began (unix ms): a minute ago, or the UTC day's or month's start.
    pub window_start: i64,
    /// When a budget's period ends (unix ms); a minute slides, so none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<i64>,
}

/// The limits of the tenant and of `key_id` (when it has some), with what the usage records
/// say was used of each.
pub async fn standings(
    state: &AppState,
    tenant_id: &str,
    key_id: Option<&str>,
) -> Result<Vec<LimitStanding>, ApiError> {
    use qlayer_gateway::quota::{Window, period_end, period_start};
    let rows = state.db.quota_limits(tenant_id).await?;
    let currency = currency(state);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let (day_start, month_start) = (period_start(Window::Day, now), period_start(Window::Month, now));
    let mut out = Vec::new();
    for (key, limits) in rows {
        if !(key.is_empty() || Some(key.as_str()) == key_id) {
            continue;
        }
        let scope_key = (!key.is_empty()).then(|| key.clone());
        let usage = |from: i64| {
            let filter = qlayer_db::UsageFilter { from: Some(from), to: None, key_id: scope_key.clone(), model: None };
            async move {
                let sums = state.db.usage(tenant_id, &filter, qlayer_db::UsageGroup::All).await?;
                Ok::<_, ApiError>(sums.into_iter().next())
            }
        };
        let minute = if limits.rpm.is_some() || limits.tpm.is_some() { usage(now - 60_000).await? } else { None };
        let day = if limits.daily_nanos.is_some() { usage(day_start).await? } else { None };
        let month = if limits.monthly_nanos.is_some() { usage(month_start).await? } else { None };
        let cost = |s: &Option<qlayer_db::UsageSum>| s.as_ref().map(|s| s.cost_nanos as f64 / 1e9).unwrap_or(0.0);
        for (name, max, used, start, resets, money) in [
            (
                "rpm",
                limits.rpm.map(|v| v as f64),
                minute.as_ref().map(|s| s.requests as f64).unwrap_or(0.0),
                now - 60_000,
                None,
                false,
            ),
            (
                "tpm",
                limits.tpm.map(|v| v as f64),
                minute.as_ref().map(|s| (s.prompt_tokens + s.completion_tokens) as f64).unwrap_or(0.0),
                now - 60_000,
                None,
                false,
            ),
            (
                "daily_budget",
                limits.daily_nanos.map(|v| v as f64 / 1e9),
                cost(&day),
                day_start,
                Some(period_end(Window::Day, now)),
                true,
            ),
            (
                "monthly_budget",
                limits.monthly_nanos.map(|v| v as f64 / 1e9),
                cost(&month),
                month_start,
                Some(period_end(Window::Month, now)),
                true,
            ),
        ] {
            let Some(max) = max else { continue };
            out.push(LimitStanding {
                scope: if key.is_empty() { "tenant" } else { "key" }.into(),
                key_id: scope_key.clone(),
                limit: name.into(),
                max,
                used,
                remaining: (max - used).max(0.0),
                currency: money.then(|| currency.clone()),
                window_start: start,
                resets_at: resets,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn limits_are_checked_naming_the_field() {
        let parse = |json: &str| serde_json::from_str::<Limits>(json).map_err(|e| e.to_string());
        let ok =
            checked(&parse(r#"{"rpm": 60, "budget": {"currency": "USD", "daily": 2.5}}"#).unwrap(), "USD").unwrap();
        assert_eq!((ok.rpm, ok.daily_nanos, ok.monthly_nanos), (Some(60), Some(2_500_000_000), None));
        for (json, says) in [
            (r#"{"rpm": 0}"#, "rpm must be 1 to"),
            (r#"{"tpm": -5}"#, "tpm must be 1 to"),
            (r#"{"rpm": 100000000000}"#, "rpm must be 1 to"),
            (r#"{"budget": {"currency": "EUR", "daily": 1}}"#, "budget.currency `EUR`"),
            (r#"{"budget": {"currency": "USD", "monthly": -1}}"#, "budget.monthly must be from 0.000000001"),
            (r#"{"budget": {"currency": "USD", "monthly": 1e-12}}"#, "budget.monthly must be from 0.000000001"),
            (r#"{"budget": {"currency": "USD", "daily": 1e300}}"#, "budget.daily must be from 0.000000001"),
        ] {
            let e = checked(&parse(json).unwrap(), "USD").unwrap_err();
            assert!(e.message().contains(says), "{json}: {}", e.message());
        }
        let e = parse(r#"{"rpm": 1, "burst": 5}"#).unwrap_err();
        assert!(e.contains("unknown field `burst`"), "{e}");
    }
}
