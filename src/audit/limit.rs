//! The limit on failure-only audit records, per role across all its sessions.
//!
//! Each statement's failed key uses are one record, and a statement is cheap: a role with no
//! grant made 50,000 failure records a second from one session (a DO block committing in a loop,
//! one made-up tenant per failure: insider review 27), and 40 sessions of it 4,000 a second past
//! a per-session limit (review 28). Past [`PER_SECOND`] failure-only records a second for one
//! role, further ones are counted in shared memory, per database, role, operation, SQLSTATE and
//! tenant, and written as one summary record per such key once a second has passed since its
//! first count, by the audit writer (every drain, 200 ms apart: also while the sessions that
//! made them keep flooding, sit idle or are gone), or, on a hot standby that has no writer, by
//! the next backend that ends a transaction there (into its server log).
//!
//! A summary names the tenant when it exists (a probe of a real tenant, including a granted
//! role's tampering with its own tenant's values, must not turn anonymous behind junk: review
//! 28); failures under names that are no tenant share the tenant `*`, with the number of
//! distinct names in the detail. Records with any success are never limited (a success needs a
//! grant, and what a granted role decrypts must be recorded whatever the rate).

use pg_envelope_core::audit::Record;
use pgrx::prelude::*;
use pgrx::PgLwLock;

/// Failure-only records a second per role, before the rest are summarised.
pub const PER_SECOND: u32 = 100;
/// Roles whose one-second windows are tracked at once (more: they share one window).
const ROLES: usize = 32;
/// Summaries held at once (more: counted in one overflow summary).
const HELD: usize = 64;
const NAME: usize = 64;
const TENANT: usize = 255;
const PIDS: usize = 8;
const NAMES: usize = 32;
const SECOND_US: i64 = 1_000_000;

#[derive(Clone, Copy)]
struct Window {
    role: u32,
    start: i64,
    count: u32,
}

#[derive(Clone, Copy)]
struct Held {
    /// When the first failure of this summary was held (PostgreSQL µs); 0: a free entry.
    since: i64,
    last: i64,
    op: u8,
    outcome: [u8; 5],
    role: [u8; NAME],
    role_len: u8,
    database: [u8; NAME],
    database_len: u8,
    tenant: [u8; TENANT],
    tenant_len: u8,
    statements: i64,
    values: i64,
    pids: [i32; PIDS],
    more_pids: bool,
    /// For `*`: hashes of the distinct names tried (up to NAMES).
    names: [u64; NAMES],
    more_names: bool,
}

#[derive(Clone, Copy)]
pub struct Limiter {
    windows: [Window; ROLES],
    held: [Held; HELD],
    /// Failures that found no free summary (all HELD in use): statements, values, since.
    overflow: (i64, i64, i64),
}

impl Default for Limiter {
    fn default() -> Self {
        // SAFETY: plain integers, byte arrays and bools, for which all-zero is valid.
        unsafe { std::mem::zeroed() }
    }
}

unsafe impl pgrx::shmem::PGRXSharedMemory for Limiter {}

pub static LIMITER: PgLwLock<Limiter> = unsafe { PgLwLock::new(c"pg_envelope_audit_limit") };

pub fn register() {
    pgrx::pg_shmem_init!(LIMITER);
}

fn now() -> i64 {
    super::now_ts()
}

/// Whether `role` may have one more failure-only record now.
pub fn allowed(role: pg_sys::Oid) -> bool {
    let role = role.to_u32();
    let now = now();
    let mut l = LIMITER.exclusive();
    let i = match l.windows.iter().position(|w| w.role == role && w.start != 0) {
        Some(i) => i,
        None => {
            // A free or stale window (older than a second); with every one in use, the oldest
            // window is shared (its role's count carries on: never more lenient).
            let i = l.windows.iter().position(|w| w.start == 0 || now - w.start >= SECOND_US).unwrap_or_else(|| {
                (0..ROLES).min_by_key(|&i| l.windows[i].start).unwrap_or(0)
            });
            if l.windows[i].start == 0 || now - l.windows[i].start >= SECOND_US {
                l.windows[i] = Window { role, start: now, count: 0 };
            }
            i
        }
    };
    let w = &mut l.windows[i];
    if now - w.start >= SECOND_US {
        w.start = now;
        w.count = 0;
    }
    w.count += 1;
    w.count <= PER_SECOND
}

fn copy<const N: usize>(dst: &mut [u8; N], src: &str) -> u8 {
    let n = pg_envelope_core::audit::cut_str(src, N.min(255)).len();
    dst[..n].copy_from_slice(&src.as_bytes()[..n]);
    n as u8
}

fn name_hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish() | 1
}

/// One failure-only statement's entry held back: counted into its summary.
#[allow(clippy::too_many_arguments)]
pub fn hold(op: u8, database: &str, role_name: &str, outcome: &str, tenant: &str, tenant_exists: bool, values: i64) {
    let now = now();
    let pid = unsafe { pg_sys::MyProcPid };
    let key_tenant = if tenant_exists { tenant } else { "*" };
    let mut l = LIMITER.exclusive();
    let mut want = Held { since: now, last: now, op, ..unsafe { std::mem::zeroed() } };
    copy(&mut want.outcome, outcome);
    want.role_len = copy(&mut want.role, role_name);
    want.database_len = copy(&mut want.database, database);
    want.tenant_len = copy(&mut want.tenant, key_tenant);
    let same = |h: &Held| {
        h.since != 0
            && h.op == want.op
            && h.outcome == want.outcome
            && h.role[..h.role_len as usize] == want.role[..want.role_len as usize]
            && h.database[..h.database_len as usize] == want.database[..want.database_len as usize]
            && h.tenant[..h.tenant_len as usize] == want.tenant[..want.tenant_len as usize]
    };
    let i = match l.held.iter().position(same) {
        Some(i) => i,
        None => match l.held.iter().position(|h| h.since == 0) {
            Some(i) => {
                l.held[i] = want;
                i
            }
            None => {
                let o = &mut l.overflow;
                if o.2 == 0 {
                    o.2 = now;
                }
                o.0 += 1;
                o.1 += values;
                return;
            }
        },
    };
    let h = &mut l.held[i];
    h.statements += 1;
    h.values += values;
    h.last = now;
    if !h.pids.contains(&pid) {
        match h.pids.iter().position(|&p| p == 0) {
            Some(j) => h.pids[j] = pid,
            None => h.more_pids = true,
        }
    }
    if !tenant_exists {
        let x = name_hash(tenant);
        if !h.names.contains(&x) {
            match h.names.iter().position(|&n| n == 0) {
                Some(j) => h.names[j] = x,
                None => h.more_names = true,
            }
        }
    }
}

fn kind(op: u8) -> &'static str {
    match op {
        1 => "encrypt",
        2 => "decrypt",
        _ => "search",
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Takes the summaries whose first count is a second old (`all`: every one) as records.
pub fn take_due(all: bool) -> Vec<Record> {
    let now = now();
    let due = |since: i64| since != 0 && (all || now - since >= SECOND_US);
    let mut l = LIMITER.exclusive();
    if !l.held.iter().any(|h| due(h.since)) && !due(l.overflow.2) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for h in l.held.iter_mut().filter(|h| due(h.since)) {
        let k = kind(h.op);
        let pids = h.pids.iter().filter(|&&p| p != 0).count();
        let tenant = text(&h.tenant[..h.tenant_len as usize]);
        let names = if tenant == "*" {
            format!(
                ", under {}{} distinct names that are no tenant",
                if h.more_names { "more than " } else { "" },
                h.names.iter().filter(|&&n| n != 0).count()
            )
        } else {
            String::new()
        };
        out.push(Record {
            at_us: super::pg_to_unix_us(h.since),
            kind: k.into(),
            database: text(&h.database[..h.database_len as usize]),
            current_role: text(&h.role[..h.role_len as usize]),
            backend_pid: if pids == 1 && !h.more_pids { h.pids[0] as i64 } else { 0 },
            tenant,
            operation: k.into(),
            value_count: h.values,
            failure_count: h.values,
            outcome: text(&h.outcome),
            duration_us: h.last - h.since,
            detail: format!(
                "{} statements' failure records recorded as one (over the limit of {PER_SECOND} a second per role), from {}{} sessions{names}",
                h.statements,
                if h.more_pids { "more than " } else { "" },
                pids
            ),
            ..Record::default()
        });
        *h = unsafe { std::mem::zeroed() };
    }
    if due(l.overflow.2) {
        let (statements, values, since) = l.overflow;
        out.push(Record {
            at_us: super::pg_to_unix_us(since),
            kind: "dropped".into(),
            current_role: "*".into(),
            tenant: "*".into(),
            operation: "failure_summary".into(),
            value_count: values,
            failure_count: values,
            outcome: "dropped".into(),
            duration_us: now - since,
            detail: format!("{statements} statements' failure records over the limit found no summary entry (more than {HELD} held at once): counted here without their roles and tenants"),
            ..Record::default()
        });
        l.overflow = (0, 0, 0);
    }
    out
}
