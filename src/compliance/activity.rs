//! The report's checks of what happened in the period (as opposed to how the deployment is set
//! up): emergency access used and reviewed, bursts of failed sign-ins, and backups written and
//! restored. They read the audit log's events (decrypted: the report is for the officer) and the
//! break-glass uses.

use super::{check, instant, Check, Inputs, Section, Verdict};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The most events of one kind a check reads (named in its evidence when reached).
const EVENTS_MAX: i64 = 50_000;

/// When an AuditEvent was recorded.
fn recorded(ev: &Value) -> Option<chrono::NaiveDateTime> {
    let text = ev.get("recorded")?.as_str()?;
    Some(chrono::DateTime::parse_from_rfc3339(text).ok()?.naive_utc())
}

/// 164.312(a)(2)(ii): the emergency access procedure, and every use of it in the period.
pub fn emergency_access(inputs: &Inputs<'_>) -> anyhow::Result<Section> {
    let config = inputs.config;
    let mut checks = vec![check(
        "break-glass procedure",
        Verdict::Pass,
        format!(
            "a break-glass token names its user and a reason (refused without one), widens access for {} s \
             after issue, and marks every request it makes with purpose of use BTG in the audit log{}",
            config.break_glass_secs,
            if config.break_glass_webhook.is_some() {
                "; each request is also posted to the configured alert webhook"
            } else {
                ""
            }
        ),
        json!({
            "break_glass_secs": config.break_glass_secs,
            "alert_webhook_configured": config.break_glass_webhook.is_some(),
        }),
    )];
    let uses = inputs
        .store
        .break_glass_uses(inputs.since, inputs.now + chrono::Duration::seconds(1))?;
    let cipher = inputs.store.cipher();
    let mut listed = Vec::new();
    let mut unreviewed = 0;
    for u in &uses {
        let (requests, more) = inputs.store.break_glass_requests(u, 10_000)?;
        if u.reviewed_at.is_none() {
            unreviewed += 1;
        }
        listed.push(json!({
            "token_id": u.token_id,
            "user": u.fhir_user,
            "client": u.client_id,
            "issued": instant(&u.issued_at),
            "window_ends": instant(&u.expires_at),
            // shown to the officer; sealed at rest
            "reason": u.reason(cipher).unwrap_or_else(|| "(the sealed reason does not open)".into()),
            "requests": requests,
            "requests_more_than_counted": more,
            "reviewed_by": u.reviewed_by,
            "reviewed_at": u.reviewed_at.as_ref().map(instant),
        }));
    }
    checks.push(check(
        "break-glass uses in the period",
        if unreviewed == 0 {
            Verdict::Pass
        } else {
            Verdict::Attention
        },
        match (uses.len(), unreviewed) {
            (0, _) => "no break-glass use in the period".to_string(),
            (n, 0) => format!("{n} uses, every one reviewed"),
            (n, u) => format!("{n} uses, {u} not yet reviewed (review them in the console, /console/break-glass)"),
        },
        json!({"uses": listed}),
    ));
    Ok(Section {
        citation: "164.312(a)(2)(ii)".into(),
        title: "Emergency access procedure".into(),
        checks,
    })
}

/// Failed sign-ins grouped by the address they came from: a burst is at least
/// `login_max_failures` failures from one address within 15 minutes (someone guessing
/// passwords or codes, or spraying one password over many accounts, which the per-account
/// lockout alone does not show).
pub fn sign_in_bursts(inputs: &Inputs<'_>) -> anyhow::Result<Check> {
    let failures = inputs
        .store
        .audit_events_of_subtype("login-failure", inputs.since, EVENTS_MAX)?;
    let threshold = inputs.config.login_max_failures.max(1) as usize;
    let window = chrono::Duration::minutes(15);
    // address → (time, who was tried) in time order
    let mut by_address: BTreeMap<String, Vec<(chrono::NaiveDateTime, String)>> = BTreeMap::new();
    for ev in &failures {
        let Some(at) = recorded(ev) else {
            continue;
        };
        let address = ev
            .pointer("/agent/1/network/address")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string();
        let who = ev
            .pointer("/agent/0/who/reference")
            .or_else(|| ev.pointer("/agent/1/who/identifier/value"))
            .and_then(Value::as_str)
            .unwrap_or("unknown account")
            .to_string();
        by_address.entry(address).or_default().push((at, who));
    }
    let mut bursts = Vec::new();
    for (address, mut tries) in by_address {
        tries.sort();
        // the longest run within the window, from each start
        let mut start = 0;
        let mut best: Option<(usize, usize)> = None;
        for end in 0..tries.len() {
            while tries[end].0 - tries[start].0 > window {
                start += 1;
            }
            if end + 1 - start >= threshold && best.is_none_or(|(s, e)| end - start > e - s) {
                best = Some((start, end));
            }
        }
        if let Some((s, e)) = best {
            let mut accounts: Vec<&str> = tries[s..=e].iter().map(|(_, w)| w.as_str()).collect();
            accounts.sort_unstable();
            accounts.dedup();
            bursts.push(json!({
                "address": address,
                "failures_within_15_minutes": e + 1 - s,
                "failures_in_period": tries.len(),
                "first": instant(&tries[s].0),
                "last": instant(&tries[e].0),
                "accounts_or_clients": accounts,
            }));
        }
    }
    Ok(check(
        "failed sign-in bursts",
        if bursts.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Attention
        },
        if bursts.is_empty() {
            format!(
                "{} failed sign-ins in the period, none in a burst ({} or more from one address within 15 minutes)",
                failures.len(),
                threshold
            )
        } else {
            format!(
                "{} addresses failed {} or more times within 15 minutes: look at who they tried",
                bursts.len(),
                threshold
            )
        },
        json!({
            "failed_sign_ins": failures.len(),
            "events_read_at_most": EVENTS_MAX,
            "bursts": bursts,
        }),
    ))
}

/// Backups written (by `fhirvault backup`) and restore drills (`fhirvault restore --drill`), both
/// audited in this database: the most recent of each on record.
pub fn backups(inputs: &Inputs<'_>) -> anyhow::Result<Section> {
    let long_ago = inputs.now - chrono::Duration::days(365 * 7);
    let newest = |subtype: &str| -> anyhow::Result<Option<Value>> {
        Ok(inputs
            .store
            .audit_events_of_subtype(subtype, long_ago, EVENTS_MAX)?
            .into_iter()
            .next_back())
    };
    let summary = |ev: &Value| {
        json!({
            "recorded": ev.get("recorded"),
            "outcome": ev.get("outcomeDesc"),
            "by": ev.pointer("/agent/0/who/identifier/value"),
        })
    };
    let backup = newest("backup")?;
    let age_days = backup.as_ref().and_then(recorded).map(|t| (inputs.now - t).num_days());
    let backup_check = check(
        "backups written",
        match age_days {
            Some(d) if d <= 7 => Verdict::Pass,
            _ => Verdict::Attention,
        },
        match age_days {
            Some(d) => format!("the last backup on record was written {d} days ago (attention past 7)"),
            None => "no backup is on record in this database's audit log (`fhirvault backup --out FILE`)".into(),
        },
        json!({"last_backup": backup.as_ref().map(summary)}),
    );
    let drill = newest("restore-drill")?;
    let restored_here = newest("restore")?;
    let drill_age = drill.as_ref().and_then(recorded).map(|t| (inputs.now - t).num_days());
    let drill_failed = drill
        .as_ref()
        .is_some_and(|d| d.get("outcome").and_then(Value::as_str) != Some("0"));
    let drill_check = check(
        "last verified restore",
        match (drill_failed, drill_age) {
            (true, _) => Verdict::Fail,
            (false, Some(d)) if d <= 90 => Verdict::Pass,
            _ => Verdict::Attention,
        },
        match (drill_failed, drill_age) {
            (true, _) => {
                "the last restore drill failed: the backup did not restore or its audit log did not verify".into()
            }
            (false, Some(d)) => format!(
                "the last restore drill (a backup restored into a scratch database and its audit chains verified) \
                 passed {d} days ago (attention past 90)"
            ),
            (false, None) => {
                "no restore drill is on record: `fhirvault restore --drill FILE` restores a backup into a \
                              scratch database, verifies it and records the result here"
                    .into()
            }
        },
        json!({
            "last_drill": drill.as_ref().map(summary),
            "last_restore_into_this_database": restored_here.as_ref().map(summary),
        }),
    );
    Ok(Section {
        citation: "164.308(a)(7)(ii)(A)".into(),
        title: "Data backup (administrative safeguard, for completeness)".into(),
        checks: vec![backup_check, drill_check],
    })
}
