//! Reading the audit trail back: `envelope.audit_verify()` (the chain and its checkpoints) and
//! `envelope.audit_prune()` (retention, itself a recorded and checkpointed event). The export is
//! SQL (sql/audit.sql: `envelope.audit_export`, `envelope.audit_events`).

use pg_envelope_core::audit::{Head, Record, Stored};
use pgrx::prelude::*;

use super::writer::{checkpoint_mac_valid, hex};
use super::{base_record, enabled, hooks, prime_session, push};
use crate::catalog::{as_extension_owner, spi_err};
use crate::error::{EnvelopeError, OrRaise, Result, OrRaiseAudited};

/// One stored checkpoint.
struct Checkpoint {
    head: Head,
    at_us: i64,
    provider: String,
    mac: Vec<u8>,
}

/// `envelope.audit_verify(all_checkpoints)`: walks the chain in sequence order and reports the
/// first broken record. The newest checkpoint's MAC is checked by its provider (inside the KMS);
/// with `all_checkpoints`, every checkpoint's is. Every checkpoint must match the chain, and the
/// chain must reach the newest one (a truncated tail). Reading the trail is itself recorded.
#[pg_extern(volatile, parallel_unsafe)]
fn audit_verify(
    all_checkpoints: default!(bool, false),
) -> TableIterator<
    'static,
    (
        name!(records_checked, i64),
        name!(head_seq, Option<i64>),
        name!(checkpoint_seq, Option<i64>),
        name!(ok, bool),
        name!(first_break, Option<String>),
    ),
> {
    TableIterator::once(verify_impl(all_checkpoints).or_raise())
}

fn load() -> Result<(Vec<Stored>, Vec<Checkpoint>)> {
    as_extension_owner(|| {
        hooks::without_read_records(|| {
            Spi::connect(|c| {
                let t = c
                    .select(
                        "SELECT seq, at_us, kind, database, session_user_name, role_name, client_addr, application_name, backend_pid,
                                statement_id, request_id, tenant, key_versions, operation, value_count, failure_count, outcome,
                                duration_us, detail, prev_hash, hash FROM envelope.audit_log ORDER BY seq",
                        None,
                        &[],
                    )
                    .map_err(spi_err)?;
                let mut rows = Vec::new();
                for r in t {
                    let s = |i: usize| r.get::<String>(i).map_err(spi_err).map(|v| v.unwrap_or_default());
                    let n = |i: usize| r.get::<i64>(i).map_err(spi_err).map(|v| v.unwrap_or(0));
                    let record = Record {
                        seq: n(1)?,
                        at_us: n(2)?,
                        kind: s(3)?,
                        database: s(4)?,
                        session_user: s(5)?,
                        current_role: s(6)?,
                        client_addr: s(7)?,
                        application_name: s(8)?,
                        backend_pid: n(9)?,
                        statement_id: n(10)?,
                        request_id: s(11)?,
                        tenant: s(12)?,
                        key_versions: s(13)?,
                        operation: s(14)?,
                        value_count: n(15)?,
                        failure_count: n(16)?,
                        outcome: s(17)?,
                        duration_us: n(18)?,
                        detail: s(19)?,
                    };
                    let h = |i: usize| -> Result<[u8; 32]> {
                        Ok(r.get::<Vec<u8>>(i).map_err(spi_err)?.unwrap_or_default().try_into().unwrap_or([0xff; 32]))
                    };
                    rows.push(Stored { record, prev_hash: h(20)?, hash: h(21)? });
                }
                let t = c
                    .select("SELECT seq, hash, at_us, provider, mac FROM envelope.audit_checkpoints ORDER BY seq, at_us", None, &[])
                    .map_err(spi_err)?;
                let mut cps = Vec::new();
                for r in t {
                    cps.push(Checkpoint {
                        head: Head {
                            seq: r.get::<i64>(1).map_err(spi_err)?.unwrap_or(0),
                            hash: r.get::<Vec<u8>>(2).map_err(spi_err)?.unwrap_or_default().try_into().unwrap_or([0xff; 32]),
                        },
                        at_us: r.get::<i64>(3).map_err(spi_err)?.unwrap_or(0),
                        provider: r.get::<String>(4).map_err(spi_err)?.unwrap_or_default(),
                        mac: r.get::<Vec<u8>>(5).map_err(spi_err)?.unwrap_or_default(),
                    });
                }
                Ok::<_, EnvelopeError>((rows, cps))
            })
        })
    })
}

type Verdict = (i64, Option<i64>, Option<i64>, bool, Option<String>);

fn verify_impl(all_checkpoints: bool) -> Result<Verdict> {
    let (rows, cps) = load()?;
    let verdict = judge(rows, &cps, all_checkpoints)?;
    if enabled() {
        prime_session();
        let mut r = base_record("audit_read", crate::backend::role_name(crate::nothrow::current_user_id()));
        r.operation = "audit_verify".into();
        r.value_count = verdict.0;
        r.outcome = if verdict.3 { "ok".into() } else { "broken".into() };
        push(r);
    }
    Ok(verdict)
}

fn judge(rows: Vec<Stored>, cps: &[Checkpoint], all_checkpoints: bool) -> Result<Verdict> {
    let newest = cps.iter().max_by_key(|c| (c.head.seq, c.at_us));
    let cp_seq = newest.map(|c| c.head.seq);
    // The checkpoint the kept records start after (after a retention) is an anchor: its MAC is
    // always checked too, or a superuser could delete the oldest records and insert a made-up
    // checkpoint in front of the rest.
    let anchor_seq = rows.first().filter(|r| r.record.seq > 1).map(|r| r.record.seq);
    let anchor = anchor_seq.and_then(|first| cps.iter().filter(|c| c.head.seq < first).max_by_key(|c| (c.head.seq, c.at_us)));
    let mut to_check: Vec<&Checkpoint> = if all_checkpoints { cps.iter().collect() } else { newest.into_iter().collect() };
    if let Some(a) = anchor {
        if !all_checkpoints {
            to_check.push(a);
        }
    }
    for c in to_check {
        if !checkpoint_mac_valid(&c.provider, &c.head, c.at_us, c.mac.clone())? {
            let why = format!("the checkpoint at record {} has an invalid MAC (provider {}): forged or altered", c.head.seq, c.provider);
            return Ok((0, None, cp_seq, false, Some(why)));
        }
    }
    // After a retention the kept records start after a checkpointed record: that checkpoint
    // anchors them. Records missing at the start with no checkpoint there: deleted.
    // (The newest checkpoint before the first kept record: when it is not the record just before
    // it, the records in between were deleted, and the report names the first of them.)
    let start = match rows.first() {
        Some(r) if r.record.seq > 1 => cps.iter().filter(|c| c.head.seq < r.record.seq).max_by_key(|c| c.head.seq).map(|c| c.head),
        _ => None,
    };
    let heads: Vec<Head> = cps.iter().filter(|c| start.is_none_or(|s| c.head.seq >= s.seq)).map(|c| c.head).collect();
    let v = pg_envelope_core::audit::verify(rows, start, &heads);
    Ok((v.records as i64, v.head.map(|h| h.seq), cp_seq, v.first_break.is_none(), v.first_break.map(|b| b.to_string())))
}

thread_local! {
    static PRUNING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// For the append-only trigger: whether this backend is inside `audit_prune` (the one path that
/// deletes audit records).
#[pg_extern(volatile, parallel_unsafe)]
fn audit_prune_in_progress() -> bool {
    PRUNING.with(|p| p.get())
}

/// `envelope.audit_prune(older_than)`: retention. Removes the records older than `older_than`
/// up to the newest **checkpointed** record among them (so the kept chain starts at a signed
/// anchor), and records the removal as an event of its own, which the writer checkpoints at
/// once. Superusers only. Returns how many records were removed.
#[pg_extern(volatile, parallel_unsafe)]
fn audit_prune(older_than: pgrx::datum::Interval) -> i64 {
    prune_impl(older_than).or_raise_audited("audit_prune", "")
}

fn prune_impl(older_than: pgrx::datum::Interval) -> Result<i64> {
    if !unsafe { pg_sys::superuser() } {
        return Err(EnvelopeError::AuditRetentionDenied);
    }
    let anchor = Spi::connect(|c| {
        let t = c
            .select(
                "SELECT c.seq, c.hash, l.hash, (SELECT min(seq) FROM envelope.audit_log)
                   FROM envelope.audit_checkpoints c JOIN envelope.audit_log l USING (seq)
                  WHERE l.at < pg_catalog.now() - $1
                    -- Never the newest record: a prune always leaves the chain's head, so the
                    -- writer (after a restart) continues the chain instead of starting a new one
                    -- at 1, and audit_verify has a record to anchor at the checkpoint
                    -- (review 40: an emptied trail read as truncated, then as a broken chain).
                    AND c.seq < (SELECT max(seq) FROM envelope.audit_log)
                  ORDER BY c.seq DESC, c.at_us DESC LIMIT 1",
                None,
                &[older_than.into()],
            )
            .map_err(spi_err)?;
        if t.is_empty() {
            return Ok::<_, EnvelopeError>(None);
        }
        let r = t.first();
        Ok(Some((
            r.get::<i64>(1).map_err(spi_err)?.unwrap_or(0),
            r.get::<Vec<u8>>(2).map_err(spi_err)?.unwrap_or_default(),
            r.get::<Vec<u8>>(3).map_err(spi_err)?.unwrap_or_default(),
            r.get::<i64>(4).map_err(spi_err)?.unwrap_or(1),
        )))
    })?;
    let Some((seq, cp_hash, log_hash, first)) = anchor else { return Ok(0) };
    if cp_hash != log_hash {
        return Err(EnvelopeError::AuditChainBroken { seq });
    }
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            PRUNING.with(|p| p.set(false));
        }
    }
    PRUNING.with(|p| p.set(true));
    let _reset = Reset;
    let removed = Spi::connect_mut(|c| {
        c.update("DELETE FROM envelope.audit_log WHERE seq <= $1", None, &[seq.into()]).map(|t| t.len() as i64).map_err(spi_err)
    })?;
    drop(_reset);
    super::key_op(
        "audit_prune",
        "",
        &format!("removed records {first}..{seq} older than {older_than}; the kept chain starts after checkpoint {seq} (hash {})", hex(&cp_hash)),
        false,
    );
    Ok(removed)
}
