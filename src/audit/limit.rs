//! The limit on failure-only audit records, per role across all its sessions.
//!
//! Each statement's failed key uses are one record, and a statement is cheap: a role with no
//! grant made 50,000 failure records a second from one session (a DO block committing in a loop,
//! one made-up tenant per failure: insider review 27), and 40 sessions of it 4,000 a second past
//! a per-session limit (review 28). Past [`PER_SECOND`] failure-only records a second for one
//! role, further ones are counted in shared memory, per database, login, role, operation,
//! SQLSTATE and tenant, and written as one summary record per such key once a second has passed
//! since its first count, by the audit writer (every drain, 200 ms apart: also while the
//! sessions that made them keep flooding, sit idle or are gone), or, on a hot standby that has
//! no writer, by the next backend that ends a transaction there (into its server log).
//!
//! A summary names the tenant when it exists (a probe of a real tenant, including a granted
//! role's tampering with its own tenant's values, must not turn anonymous behind junk: review
//! 28); failures under names that are no tenant share the tenant `*`, with the number of
//! distinct names in the detail. Records with any success are never limited (a success needs a
//! grant, and what a granted role decrypts must be recorded whatever the rate).
//!
//! Fair shares (review 29: one role filled every summary entry and its next probes landed in an
//! overflow without role or tenant): a role holds at most [`PER_ROLE`] summaries; past that its
//! failures go to its own catch-all summary (per database, login, role and operation: tenant and
//! SQLSTATE `*`, with the number of distinct tenants and the first real tenant names in the
//! detail). Only when every entry is in use (more than `HELD / (PER_ROLE + 3)` roles flooding at
//! once) do failures go to the overflow record, which still names up to eight roles. Summaries
//! the writer took are freed only once its batch committed (a failed batch puts them back), as
//! the queue's slots are.

use pg_envelope_core::audit::Record;
use pgrx::prelude::*;
use pgrx::PgLwLock;

/// Failure-only records a second per role, before the rest are summarised.
pub const PER_SECOND: u32 = 100;
/// Roles whose one-second windows are tracked at once (past that, windows older than a second
/// are reused; if none is, the least recently started one).
const ROLES: usize = 256;
/// Summaries held at once, and per role (then its catch-all).
const HELD: usize = 256;
const PER_ROLE: usize = 16;
const NAME: usize = 64;
const TENANT: usize = 255;
const PIDS: usize = 8;
const NAMES: usize = 32;
const LISTED: usize = 3;
const OVERFLOW_ROLES: usize = 8;
const SECOND_US: i64 = 1_000_000;

#[derive(Clone, Copy)]
struct Window {
    role: u32,
    start: i64,
    count: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum State {
    Free = 0,
    Counting = 1,
    /// Taken by the writer's batch in progress: freed when it commits, counting again if it fails.
    Taken = 2,
}

#[derive(Clone, Copy)]
struct Held {
    state: State,
    /// The role's catch-all (tenant and SQLSTATE `*`).
    catch_all: bool,
    /// When the first failure of this summary was held (PostgreSQL µs), and the last.
    since: i64,
    last: i64,
    op: u8,
    outcome: [u8; 5],
    role: [u8; NAME],
    role_len: u8,
    login: [u8; NAME],
    login_len: u8,
    database: [u8; NAME],
    database_len: u8,
    tenant: [u8; TENANT],
    tenant_len: u8,
    statements: i64,
    values: i64,
    pids: [i32; PIDS],
    more_pids: bool,
    /// Hashes of the distinct tenant names tried (`*` and catch-alls; up to NAMES).
    names: [u64; NAMES],
    more_names: bool,
    /// Catch-all: the first real tenant names (cut at NAME bytes).
    listed: [[u8; NAME]; LISTED],
    listed_len: [u8; LISTED],
    /// Catch-all: distinct SQLSTATEs (up to four).
    outcomes: [[u8; 5]; 4],
}

#[derive(Clone, Copy)]
struct Overflow {
    state: State,
    since: i64,
    statements: i64,
    values: i64,
    roles: [[u8; NAME]; OVERFLOW_ROLES],
    roles_len: [u8; OVERFLOW_ROLES],
    more_roles: bool,
}

#[derive(Clone, Copy)]
pub struct Limiter {
    windows: [Window; ROLES],
    held: [Held; HELD],
    /// Two, so that failures past every entry have somewhere to go while the writer's batch has
    /// taken one (review 30: the taken one was reset under the batch, which then failed: lost).
    /// At most one is taken at a time.
    overflow: [Overflow; 2],
}

impl Default for Limiter {
    fn default() -> Self {
        // SAFETY: integers, byte arrays, bools and `State::Free` (0), for which all-zero is valid.
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
            // A free or stale window (older than a second); with every one in use, the least
            // recently started one is taken over with a fresh count (review 29: sharing another
            // role's full count summarised a victim's first failure).
            let i = l
                .windows
                .iter()
                .position(|w| w.start == 0 || now - w.start >= SECOND_US)
                .unwrap_or_else(|| (0..ROLES).min_by_key(|&i| l.windows[i].start).unwrap_or(0));
            l.windows[i] = Window { role, start: now, count: 0 };
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

/// What a held failure-only entry is counted under.
pub struct Failure<'a> {
    pub op: u8,
    pub database: &'a str,
    pub login: &'a str,
    pub role: &'a str,
    pub outcome: &'a str,
    pub tenant: &'a str,
    pub tenant_exists: bool,
    pub values: i64,
}

/// One failure-only statement's entry held back: counted into its summary.
pub fn hold(f: &Failure<'_>) {
    let now = now();
    let pid = unsafe { pg_sys::MyProcPid };
    let mut want: Held = unsafe { std::mem::zeroed() };
    want.op = f.op;
    copy(&mut want.outcome, f.outcome);
    want.role_len = copy(&mut want.role, f.role);
    want.login_len = copy(&mut want.login, f.login);
    want.database_len = copy(&mut want.database, f.database);
    want.tenant_len = copy(&mut want.tenant, if f.tenant_exists { f.tenant } else { "*" });
    let same_owner = |h: &Held| {
        h.op == want.op
            && h.role[..h.role_len as usize] == want.role[..want.role_len as usize]
            && h.login[..h.login_len as usize] == want.login[..want.login_len as usize]
            && h.database[..h.database_len as usize] == want.database[..want.database_len as usize]
    };
    let mut l = LIMITER.exclusive();
    // One pass over the entries (the lock is shared by every role over its limit).
    let (mut exact, mut catch_all, mut free, mut owned) = (None, None, None, 0);
    for (i, h) in l.held.iter().enumerate() {
        if h.state == State::Free {
            free = free.or(Some(i));
            continue;
        }
        if h.role[..h.role_len as usize] != want.role[..want.role_len as usize] {
            continue;
        }
        owned += 1;
        if h.state != State::Counting || !same_owner(h) {
            continue;
        }
        if h.catch_all {
            catch_all = Some(i);
        } else if h.outcome == want.outcome && h.tenant[..h.tenant_len as usize] == want.tenant[..want.tenant_len as usize] {
            exact = Some(i);
            break;
        }
    }
    let i = match exact {
        Some(i) => i,
        None => {
            match (owned < PER_ROLE, catch_all, free) {
                (true, _, Some(i)) => {
                    l.held[i] = Held { state: State::Counting, since: now, last: now, ..want };
                    i
                }
                (_, Some(i), _) => i,
                (false, None, Some(i)) => {
                    l.held[i] = Held { state: State::Counting, catch_all: true, since: now, last: now, tenant_len: 1, ..want };
                    l.held[i].tenant[0] = b'*';
                    i
                }
                (_, None, None) => {
                    let j = l
                        .overflow
                        .iter()
                        .position(|o| o.state == State::Counting)
                        .or_else(|| l.overflow.iter().position(|o| o.state == State::Free))
                        .unwrap_or(0);
                    let o = &mut l.overflow[j];
                    if o.state == State::Free {
                        *o = Overflow { state: State::Counting, since: now, ..unsafe { std::mem::zeroed() } };
                    }
                    o.statements += 1;
                    o.values += f.values;
                    let known = o.roles.iter().zip(o.roles_len).any(|(r, n)| r[..n as usize] == want.role[..want.role_len as usize]);
                    if !known {
                        match o.roles_len.iter().position(|&n| n == 0) {
                            Some(j) => o.roles_len[j] = copy(&mut o.roles[j], f.role),
                            None => o.more_roles = true,
                        }
                    }
                    return;
                }
            }
        }
    };
    let h = &mut l.held[i];
    h.statements += 1;
    h.values += f.values;
    h.last = now;
    if !h.pids.contains(&pid) {
        match h.pids.iter().position(|&p| p == 0) {
            Some(j) => h.pids[j] = pid,
            None => h.more_pids = true,
        }
    }
    if h.catch_all || !f.tenant_exists {
        let x = name_hash(f.tenant);
        if !h.names.contains(&x) {
            match h.names.iter().position(|&n| n == 0) {
                Some(j) => h.names[j] = x,
                None => h.more_names = true,
            }
            if h.catch_all && f.tenant_exists {
                if let Some(j) = h.listed_len.iter().position(|&n| n == 0) {
                    h.listed_len[j] = copy(&mut h.listed[j], f.tenant);
                }
            }
        }
    }
    if h.catch_all && !h.outcomes.contains(&want.outcome) {
        if let Some(j) = h.outcomes.iter().position(|o| o[0] == 0) {
            h.outcomes[j] = want.outcome;
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

fn record(h: &Held) -> Record {
    let k = kind(h.op);
    let pids = h.pids.iter().filter(|&&p| p != 0).count();
    let tenant = text(&h.tenant[..h.tenant_len as usize]);
    let distinct = format!("{}{}", if h.more_names { "more than " } else { "" }, h.names.iter().filter(|&&n| n != 0).count());
    let names = if h.catch_all {
        let listed: Vec<String> = (0..LISTED).filter(|&j| h.listed_len[j] > 0).map(|j| text(&h.listed[j][..h.listed_len[j] as usize])).collect();
        let codes: Vec<String> = h.outcomes.iter().filter(|o| o[0] != 0).map(|o| text(o)).collect();
        format!(
            "; catch-all past {PER_ROLE} summaries: {distinct} distinct tenants (existing: {}), SQLSTATEs {}",
            if listed.is_empty() { "none".to_string() } else { listed.join(", ") },
            codes.join(",")
        )
    } else if tenant == "*" {
        format!("; {distinct} distinct names that are no tenant")
    } else {
        String::new()
    };
    let mut r = Record {
        at_us: super::pg_to_unix_us(h.since),
        kind: k.into(),
        database: text(&h.database[..h.database_len as usize]),
        session_user: text(&h.login[..h.login_len as usize]),
        current_role: text(&h.role[..h.role_len as usize]),
        backend_pid: if pids == 1 && !h.more_pids { h.pids[0] as i64 } else { 0 },
        tenant,
        operation: k.into(),
        value_count: h.values,
        failure_count: h.values,
        outcome: if h.catch_all { "*".into() } else { text(&h.outcome) },
        duration_us: h.last - h.since,
        detail: format!(
            "{} failure-only statements recorded as one (over {PER_SECOND}/s per role), {}{} sessions{names}",
            h.statements,
            if h.more_pids { "more than " } else { "" },
            pids
        ),
        ..Record::default()
    };
    r.truncate_fields(64, 200);
    r
}

/// The summaries whose first count is a second old, as records, marked as taken (see
/// [`release`]); and whether the overflow was taken.
pub fn take_due() -> (Vec<Record>, Vec<usize>, bool) {
    let now = now();
    let due = |since: i64| now - since >= SECOND_US;
    let mut l = LIMITER.exclusive();
    let mut out = Vec::new();
    let mut taken = Vec::new();
    for (i, h) in l.held.iter_mut().enumerate() {
        if h.state == State::Counting && due(h.since) {
            out.push(record(h));
            h.state = State::Taken;
            taken.push(i);
        }
    }
    // One overflow at a time (the other keeps counting meanwhile).
    let j = if l.overflow.iter().any(|o| o.state == State::Taken) {
        None
    } else {
        l.overflow.iter().position(|o| o.state == State::Counting && due(o.since))
    };
    let overflow = j.is_some();
    if let Some(j) = j {
        let o = &mut l.overflow[j];
        let roles: Vec<String> = (0..OVERFLOW_ROLES).filter(|&j| o.roles_len[j] > 0).map(|j| text(&o.roles[j][..o.roles_len[j] as usize])).collect();
        let mut r = Record {
            at_us: super::pg_to_unix_us(o.since),
            kind: "dropped".into(),
            current_role: "*".into(),
            tenant: "*".into(),
            operation: "failure_summary".into(),
            value_count: o.values,
            failure_count: o.values,
            outcome: "dropped".into(),
            duration_us: now - o.since,
            detail: format!(
                "{} statements' failure records over the limit found no summary entry ({HELD} in use), of roles {}{}",
                o.statements,
                roles.join(", "),
                if o.more_roles { " and more" } else { "" }
            ),
            ..Record::default()
        };
        r.truncate_fields(64, 200);
        out.push(r);
        o.state = State::Taken;
    }
    (out, taken, overflow)
}

/// After the batch with the taken summaries committed (`committed`: they are freed) or failed
/// (they count on, to be taken again).
pub fn release(taken: &[usize], overflow: bool, committed: bool) {
    if taken.is_empty() && !overflow {
        return;
    }
    let mut l = LIMITER.exclusive();
    for &i in taken {
        let h = &mut l.held[i];
        if h.state == State::Taken {
            if committed {
                *h = unsafe { std::mem::zeroed() };
            } else {
                h.state = State::Counting;
            }
        }
    }
    if overflow {
        for o in l.overflow.iter_mut().filter(|o| o.state == State::Taken) {
            if committed {
                *o = unsafe { std::mem::zeroed() };
            } else {
                o.state = State::Counting;
            }
        }
    }
}

/// At the writer's start: summaries a previous writer process took and never committed count
/// on (it exited inside a batch).
pub fn untake_all() {
    let mut l = LIMITER.exclusive();
    for h in l.held.iter_mut() {
        if h.state == State::Taken {
            h.state = State::Counting;
        }
    }
    for o in l.overflow.iter_mut().filter(|o| o.state == State::Taken) {
        o.state = State::Counting;
    }
}
