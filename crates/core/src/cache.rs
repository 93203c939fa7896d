//! The per-backend key cache.
//!
//! A tenant's entry holds its unwrapped data keys (every non-revoked DEK version, so old rows
//! decrypt without another KMS call) and is valid for the TTL counted from the root-key unwrap
//! that produced it. Loading a tenant costs exactly one root-key unwrap (the tenant key); the DEKs
//! are unwrapped locally and the tenant key is wiped at once, never cached. Evicted, replaced and
//! cleared entries are dropped, which zeroizes their key schedules.

use indexmap::IndexMap;
use rustc_hash::FxHashMap as HashMap;
use std::time::{Duration, Instant};

use crate::search::{IndexKey, Normalization, SearchError, Term, TermKey, Value, ValueKind};
use crate::datakey::DataKey;
use crate::provider::{KeyContext, KeyProvider, ProviderError};
use crate::wrap::{self, WrapAad};

/// A wrapped DEK as stored in the extension's tables.
#[derive(Debug, Clone)]
pub struct WrappedDek {
    pub version: u32,
    pub wrapped: Vec<u8>,
}

/// Everything needed to load a tenant's keys, as read from the extension's tables.
#[derive(Debug, Clone)]
pub struct TenantRecord {
    pub tenant: String,
    pub tenant_key_id: u32,
    pub wrapped_tenant_key: Vec<u8>,
    /// [`wrap::tenant_key_check`] of the tenant key, when known (always, for tenants created by
    /// the extension).
    pub tenant_key_check: Option<[u8; 32]>,
    pub active_dek_version: u32,
    pub deks: Vec<WrappedDek>,
    /// Versions that exist but may not be used (their keys are not loaded), so that a value
    /// under one fails with a clear error rather than the opaque decryption failure.
    pub unusable: Vec<(u32, VersionState)>,
    /// The blind-index keys ([`crate::search`]) still live (active or retired, not destroyed),
    /// wrapped under the tenant key; empty for a tenant that has none yet.
    pub index_keys: Vec<WrappedDek>,
    /// The version new search terms are made with (0: none).
    pub active_index_version: u32,
}

/// Why a data key version that exists cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// `envelope.disable_data_key`: refused until enabled again.
    Disabled,
    /// `envelope.destroy_data_key`: the wrapped key is gone for good.
    Destroyed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    Provider(ProviderError),
    /// A DEK did not unwrap under the tenant key: the key tables were altered.
    CorruptDataKey { version: u32 },
    /// The record names an active DEK version that is not among its DEKs.
    NoActiveDataKey,
    /// A blind-index key did not unwrap under the tenant key: the key tables were altered.
    CorruptIndexKey { version: u32 },
    /// The provider returned a tenant key whose check value differs from the stored one: the
    /// KMS key behind the name changed. Fails closed.
    KeyCheckMismatch,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Provider(e) => e.fmt(f),
            LoadError::CorruptDataKey { version } => {
                write!(f, "data key version {version} does not unwrap under its tenant key")
            }
            LoadError::CorruptIndexKey { version } => {
                write!(f, "blind-index key version {version} does not unwrap under its tenant key")
            }
            LoadError::NoActiveDataKey => f.write_str("the tenant has no active data key"),
            LoadError::KeyCheckMismatch => f.write_str(
                "the key provider returned a different tenant key than the one stored (key check value mismatch)",
            ),
        }
    }
}
impl std::error::Error for LoadError {}

/// One tenant's unwrapped keys.
pub struct TenantKeys {
    tenant_key_id: u32,
    active_version: u32,
    deks: Vec<DataKey>,
    unusable: Vec<(u32, VersionState)>,
    index_keys: Vec<(u32, IndexKey)>,
    active_index_version: u32,
    /// Per-purpose term keys derived so far (HKDF once per purpose, version, normalisation and
    /// value kind; dropped, and wiped, with the tenant's other keys).
    term_keys: Vec<(u32, String, Normalization, ValueKind, TermKey)>,
    loaded_at: Instant,
    hits: u64,
}

/// Why a search term cannot be made with a tenant's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TermError {
    /// The tenant has no blind-index key of that version (none yet, or destroyed).
    NoIndexKey { version: u32 },
    /// The value or purpose is not acceptable ([`SearchError`]).
    Search(SearchError),
}

impl TenantKeys {
    /// Unwraps the tenant key through `provider` (one root-key unwrap), then every DEK locally.
    pub fn load(provider: &mut dyn KeyProvider, rec: &TenantRecord, now: Instant) -> Result<Self, LoadError> {
        let ctx = KeyContext { tenant: &rec.tenant, tenant_key_id: rec.tenant_key_id };
        let kek = provider.unwrap_tenant_key(&ctx, &rec.wrapped_tenant_key).map_err(LoadError::Provider)?;
        if let Some(expected) = &rec.tenant_key_check {
            use subtle::ConstantTimeEq;
            if !bool::from(wrap::tenant_key_check(&kek).ct_eq(expected)) {
                return Err(LoadError::KeyCheckMismatch);
            }
        }
        let mut deks = Vec::with_capacity(rec.deks.len());
        for d in &rec.deks {
            let aad = WrapAad::DataKey { tenant: &rec.tenant, tenant_key_id: rec.tenant_key_id, version: d.version };
            let dek = wrap::unwrap_key(&kek, &aad, &d.wrapped)
                .map_err(|_| LoadError::CorruptDataKey { version: d.version })?;
            deks.push(DataKey::new(rec.tenant_key_id, d.version, &dek));
        }
        let mut index_keys = Vec::with_capacity(rec.index_keys.len());
        for k in &rec.index_keys {
            let aad = WrapAad::IndexKey { tenant: &rec.tenant, tenant_key_id: rec.tenant_key_id, version: k.version };
            let key = wrap::unwrap_key(&kek, &aad, &k.wrapped).map_err(|_| LoadError::CorruptIndexKey { version: k.version })?;
            index_keys.push((k.version, IndexKey::from_secret_key(key)));
        }
        drop(kek);
        if !deks.iter().any(|d| d.version() == rec.active_dek_version) {
            return Err(LoadError::NoActiveDataKey);
        }
        Ok(TenantKeys {
            tenant_key_id: rec.tenant_key_id,
            active_version: rec.active_dek_version,
            deks,
            unusable: rec.unusable.clone(),
            index_keys,
            active_index_version: rec.active_index_version,
            term_keys: Vec::new(),
            loaded_at: now,
            hits: 0,
        })
    }

    /// The blind-index key version new terms are made with (0: the tenant has none).
    pub fn active_index_version(&self) -> u32 {
        self.active_index_version
    }

    /// The live blind-index key versions (active first, then the retired ones, newest first):
    /// during a re-index a lookup matches terms of any of them.
    pub fn index_versions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.index_keys.iter().map(|(v, _)| *v).collect();
        v.sort_unstable_by(|a, b| (*b == self.active_index_version).cmp(&(*a == self.active_index_version)).then(b.cmp(a)));
        v
    }

    /// The search term of `value` for `purpose` (normalised with `n`) under index key `version`.
    /// The per-purpose term key is derived once and kept with the tenant's keys.
    pub fn term(&mut self, version: u32, purpose: &str, n: Normalization, value: &Value<'_>) -> Result<Term, TermError> {
        let mut t = Term { version: 0, tag: [0; crate::search::TAG_LEN] };
        self.term_into(version, purpose, n, value, &mut t)?;
        Ok(t)
    }

    /// [`TenantKeys::term`] written into `out` (see [`crate::search::TermKey::term_into`]).
    pub fn term_into(&mut self, version: u32, purpose: &str, n: Normalization, value: &Value<'_>, out: &mut Term) -> Result<(), TermError> {
        let kind = value.kind();
        let pos = match self.term_keys.iter().position(|(v, p, nn, k, _)| *v == version && *nn == n && *k == kind && crate::text::short_eq(p.as_bytes(), purpose.as_bytes())) {
            Some(i) => i,
            None => {
                let (_, key) = self.index_keys.iter().find(|(v, _)| *v == version).ok_or(TermError::NoIndexKey { version })?;
                let tk = key.term_key(purpose, n, kind).map_err(TermError::Search)?;
                // A bounded cache: an application has a handful of purposes.
                if self.term_keys.len() >= 64 {
                    self.term_keys.remove(0);
                }
                self.term_keys.push((version, purpose.to_string(), n, kind, tk));
                self.term_keys.len() - 1
            }
        };
        self.term_keys[pos].4.term_into(version, value, out).map_err(TermError::Search)
    }

    pub fn tenant_key_id(&self) -> u32 {
        self.tenant_key_id
    }
    pub fn active_version(&self) -> u32 {
        self.active_version
    }
    pub fn versions(&self) -> Vec<u32> {
        self.deks.iter().map(|d| d.version()).collect()
    }
    pub fn loaded_at(&self) -> Instant {
        self.loaded_at
    }
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// The DEK new values are encrypted with.
    pub fn active(&mut self) -> &mut DataKey {
        let v = self.active_version;
        self.deks.iter_mut().find(|d| d.version() == v).expect("checked at load")
    }

    /// The DEK of a given version, if this tenant has it (disabled and destroyed versions are
    /// never loaded).
    pub fn version(&mut self, version: u32) -> Option<&mut DataKey> {
        self.deks.iter_mut().find(|d| d.version() == version)
    }

    /// Why a version this tenant has is not loaded, if it is disabled or destroyed.
    pub fn version_state(&self, version: u32) -> Option<VersionState> {
        self.unusable.iter().find(|(v, _)| *v == version).map(|(_, s)| *s)
    }
}

/// Counters a backend reports in `envelope.status()`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Root-key unwraps (provider calls) made by this cache since the backend started.
    pub root_unwraps: u64,
    pub hits: u64,
    pub misses: u64,
    pub expirations: u64,
}

/// A cached tenant: its keys and whatever the caller keeps with them (the SQL layer keeps the
/// roles allowed to use the tenant and the provider name).
pub struct CacheEntry<M> {
    pub keys: TenantKeys,
    pub meta: M,
    /// Set while the keys are past their TTL and the provider could not be reached to refresh
    /// them: the entry keeps serving, up to the maximum key age.
    pub degraded: Option<Degraded>,
    /// A shorter TTL for this entry than the cache's (a provider's `key_cache_ttl`: a
    /// customer-managed key whose revocation must take effect sooner).
    pub ttl_cap: Option<Duration>,
    /// `loaded_at + ttl` under the cache's current TTL, computed at the first hit (a compare per
    /// value instead of a subtraction of two clock readings); cleared when the TTL changes.
    fresh_until: Option<Instant>,
}

impl<M> CacheEntry<M> {
    /// The entry's TTL: the cache's, or its own cap if shorter.
    pub fn ttl(&self, cache_ttl: Duration) -> Duration {
        self.ttl_cap.map_or(cache_ttl, |c| c.min(cache_ttl))
    }
}

/// A stale entry kept alive through a key-provider outage.
#[derive(Debug, Clone)]
pub struct Degraded {
    pub since: Instant,
    pub failures: u32,
    pub retry_at: Instant,
    pub last_error: String,
    /// Opaque marker of the last statement warned about it (the SQL layer passes its statement
    /// start time), so a degraded tenant warns once per statement, not once per row.
    pub warned: i64,
}

/// A cold tenant whose load failed because the provider was unreachable: not retried before
/// `retry_at`, so a dead KMS costs at most one timeout per backoff step, not one per row.
#[derive(Debug, Clone)]
pub struct ColdFailure {
    /// The provider that failed (its name in the caller's terms).
    pub provider: String,
    pub failures: u32,
    pub retry_at: Instant,
    pub error: ProviderError,
}

/// Exponential backoff for provider retries: 1 s, 2 s, 4 s ... capped at 60 s, each with
/// -25%..+25% jitter drawn from `random` (a uniform u32) so backends do not retry in lockstep.
pub fn retry_delay(failures: u32, random: u32) -> Duration {
    let base = Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60));
    let jitter = (random % 501) as f64 / 1000.0 - 0.25; // [-0.25, +0.25]
    base.mul_f64(1.0 + jitter)
}

/// Where a tenant stands in the cache at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Cached and younger than the TTL.
    Fresh,
    /// Cached, past the TTL: refresh it, or serve it degraded if the provider is down.
    Stale { age: Duration },
    Missing,
}

/// Tenant name -> unwrapped keys, with a TTL counted from the unwrap.
pub struct KeyCache<M = ()> {
    ttl: Duration,
    /// Insertion-ordered so that the last hit can be found again by index (`last`). Removals
    /// are `swap_remove`s, which move the last entry's bytes into the freed slot and leave the
    /// old copy unwiped in the map's storage: harmless because a `CacheEntry` holds no key
    /// bytes itself (every key lives in a wiped pool slot, `SecureBox`, reached by pointer).
    /// Keep it so.
    entries: IndexMap<String, CacheEntry<M>, rustc_hash::FxBuildHasher>,
    /// Index of the entry the last lookup found. A hint, checked against the name on every use
    /// (a removal that moved another entry there just means a miss on the hint): a backend uses
    /// one tenant for many values in a row, and comparing one short name is cheaper than hashing
    /// it and probing the table.
    last: usize,
    cold_failures: HashMap<String, ColdFailure>,
    stats: CacheStats,
}

impl<M> KeyCache<M> {
    pub fn new(ttl: Duration) -> Self {
        KeyCache { ttl, entries: IndexMap::default(), last: 0, cold_failures: HashMap::default(), stats: CacheStats::default() }
    }

    pub fn set_ttl(&mut self, ttl: Duration) {
        if ttl != self.ttl {
            for e in self.entries.values_mut() {
                e.fresh_until = None;
            }
        }
        self.ttl = ttl;
    }
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
    pub fn stats(&self) -> CacheStats {
        self.stats
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tenant's keys if cached and younger than the TTL. An expired entry is evicted
    /// (zeroized) and `None` returned.
    pub fn get(&mut self, tenant: &str, now: Instant) -> Option<&mut CacheEntry<M>> {
        if self.contains_fresh(tenant, now) {
            self.hit(tenant)
        } else {
            None
        }
    }

    /// Whether a fresh entry exists. Evicts (zeroizes) an expired one and counts the miss; counts
    /// nothing on success (the caller follows up with [`KeyCache::hit`]).
    pub fn contains_fresh(&mut self, tenant: &str, now: Instant) -> bool {
        let expired = match self.entries.get(tenant) {
            None => {
                self.stats.misses += 1;
                return false;
            }
            Some(e) => now.saturating_duration_since(e.keys.loaded_at) >= e.ttl(self.ttl),
        };
        if expired {
            self.entries.swap_remove(tenant);
            self.stats.expirations += 1;
            self.stats.misses += 1;
            return false;
        }
        true
    }

    /// Where `tenant` stands, without changing anything.
    pub fn freshness(&self, tenant: &str, now: Instant) -> Freshness {
        match self.entries.get(tenant) {
            None => Freshness::Missing,
            Some(e) => {
                let age = now.saturating_duration_since(e.keys.loaded_at);
                if age < e.ttl(self.ttl) {
                    Freshness::Fresh
                } else {
                    Freshness::Stale { age }
                }
            }
        }
    }

    /// The entry without counting a hit (for degraded-mode bookkeeping).
    pub fn peek_mut(&mut self, tenant: &str) -> Option<&mut CacheEntry<M>> {
        self.entries.get_mut(tenant)
    }

    /// Records that refreshing a stale entry failed with a transient error: it keeps serving,
    /// degraded, and is not retried before the returned instant.
    pub fn mark_degraded(&mut self, tenant: &str, now: Instant, error: String, random: u32) -> Option<&mut CacheEntry<M>> {
        let e = self.entries.get_mut(tenant)?;
        let failures = e.degraded.as_ref().map_or(0, |d| d.failures) + 1;
        let since = e.degraded.as_ref().map_or(now, |d| d.since);
        let warned = e.degraded.as_ref().map_or(0, |d| d.warned);
        e.degraded = Some(Degraded { since, failures, retry_at: now + retry_delay(failures, random), last_error: error, warned });
        Some(e)
    }

    /// A recorded cold-load failure that is still in its backoff window.
    pub fn cold_failure(&self, tenant: &str, now: Instant) -> Option<&ColdFailure> {
        self.cold_failures.get(tenant).filter(|f| now < f.retry_at)
    }

    /// Records a cold load that failed because the provider was unreachable.
    pub fn record_cold_failure(&mut self, tenant: &str, provider: &str, now: Instant, error: ProviderError, random: u32) {
        let failures = self.cold_failures.get(tenant).map_or(0, |f| f.failures) + 1;
        self.cold_failures.insert(
            tenant.to_string(),
            ColdFailure { provider: provider.to_string(), failures, retry_at: now + retry_delay(failures, random), error },
        );
    }

    /// Tenants currently served in degraded mode.
    pub fn degraded_count(&self) -> usize {
        self.entries.values().filter(|e| e.degraded.is_some()).count()
    }

    /// The entry if it is fresh at `now`, counting a hit: the hot path. The last hit's entry is
    /// tried first (one name compare), then one hash lookup.
    #[inline(always)]
    pub fn fresh_hit(&mut self, tenant: &str, now: Instant) -> Option<&mut CacheEntry<M>> {
        let hinted = self.entries.get_index(self.last).is_some_and(|(k, _)| crate::text::short_eq(k.as_bytes(), tenant.as_bytes()));
        if !hinted {
            self.last = self.entries.get_index_of(tenant)?;
        }
        let (_, e) = self.entries.get_index_mut(self.last)?;
        let until = match e.fresh_until {
            Some(u) => u,
            None => {
                let ttl = e.ttl(self.ttl);
                match e.keys.loaded_at.checked_add(ttl) {
                    // A zero TTL (nothing cached) is never fresh, whatever the clock says.
                    Some(u) if !ttl.is_zero() => {
                        e.fresh_until = Some(u);
                        u
                    }
                    _ => {
                        if now.saturating_duration_since(e.keys.loaded_at) >= ttl {
                            return None;
                        }
                        now + Duration::from_nanos(1)
                    }
                }
            }
        };
        if now >= until {
            return None;
        }
        self.stats.hits += 1;
        e.keys.hits += 1;
        Some(e)
    }

    /// The entry, counted as a hit. Use after [`KeyCache::contains_fresh`] returned true.
    pub fn hit(&mut self, tenant: &str) -> Option<&mut CacheEntry<M>> {
        let e = self.entries.get_mut(tenant)?;
        self.stats.hits += 1;
        e.keys.hits += 1;
        Some(e)
    }

    /// Loads a tenant (one root-key unwrap) and caches it, replacing any older entry.
    pub fn load(
        &mut self,
        provider: &mut dyn KeyProvider,
        rec: &TenantRecord,
        meta: M,
        now: Instant,
    ) -> Result<&mut CacheEntry<M>, LoadError> {
        match TenantKeys::load(provider, rec, now) {
            Ok(keys) => Ok(self.insert_loaded(&rec.tenant, keys, meta)),
            Err(e) => {
                self.record_failed_unwrap();
                Err(e)
            }
        }
    }

    /// Caches keys loaded elsewhere (for example on a helper thread that can be abandoned when
    /// the query is cancelled), counting the root-key unwrap that produced them.
    pub fn insert_loaded(&mut self, tenant: &str, keys: TenantKeys, meta: M) -> &mut CacheEntry<M> {
        self.insert_loaded_capped(tenant, keys, meta, None)
    }

    /// [`KeyCache::insert_loaded`] with the entry's own TTL cap (see [`CacheEntry::ttl_cap`]).
    pub fn insert_loaded_capped(&mut self, tenant: &str, mut keys: TenantKeys, meta: M, ttl_cap: Option<Duration>) -> &mut CacheEntry<M> {
        self.stats.root_unwraps += 1;
        keys.hits = 1;
        self.cold_failures.remove(tenant);
        self.entries.insert(tenant.to_string(), CacheEntry { keys, meta, degraded: None, ttl_cap, fresh_until: None });
        self.entries.get_mut(tenant).expect("just inserted")
    }

    /// Counts a root-key unwrap that failed (it still cost a provider call).
    pub fn record_failed_unwrap(&mut self) {
        self.stats.root_unwraps += 1;
    }

    /// Drops one tenant's keys (zeroizing them).
    pub fn evict(&mut self, tenant: &str) -> bool {
        self.entries.swap_remove(tenant).is_some()
    }

    /// Drops every entry (zeroizing them): backend exit, revocation, configuration change.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.cold_failures.clear();
    }

    /// Every cached entry's caller metadata, mutably (keys stay untouched).
    pub fn metas_mut(&mut self) -> impl Iterator<Item = &mut M> {
        self.entries.values_mut().map(|e| &mut e.meta)
    }

    /// Cached tenants, for status output: (tenant, keys). Never exposes key bytes.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &CacheEntry<M>)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::testing::InsecureTestProvider;
    use crate::rng::BackendRng;
    use crate::secret::SecretKey;

    pub(crate) fn make_tenant(p: &mut dyn KeyProvider, name: &str, id: u32, versions: &[u32]) -> TenantRecord {
        let kek = SecretKey::generate().unwrap();
        let wrapped_tenant_key = p.wrap_tenant_key(&KeyContext { tenant: name, tenant_key_id: id }, &kek).unwrap();
        let deks = versions
            .iter()
            .map(|&v| {
                let dek = SecretKey::generate().unwrap();
                let aad = WrapAad::DataKey { tenant: name, tenant_key_id: id, version: v };
                WrappedDek { version: v, wrapped: wrap::wrap_key(&kek, &aad, &dek).unwrap() }
            })
            .collect();
        TenantRecord {
            tenant: name.into(),
            tenant_key_id: id,
            tenant_key_check: Some(wrap::tenant_key_check(&kek)),
            wrapped_tenant_key,
            active_dek_version: *versions.last().unwrap(),
            deks,
            unusable: vec![],
            index_keys: vec![WrappedDek {
                version: 1,
                wrapped: wrap::wrap_key(&kek, &WrapAad::IndexKey { tenant: name, tenant_key_id: id, version: 1 }, &SecretKey::generate().unwrap())
                    .unwrap(),
            }],
            active_index_version: 1,
        }
    }

    #[test]
    fn terms_come_from_the_tenants_index_key_and_differ_across_tenants() {
        let mut p = InsecureTestProvider::new();
        let a = make_tenant(&mut p, "acme", 1, &[1]);
        let b = make_tenant(&mut p, "globex", 2, &[1]);
        let mut ka = TenantKeys::load(&mut p, &a, Instant::now()).unwrap();
        let mut ka2 = TenantKeys::load(&mut p, &a, Instant::now()).unwrap();
        let mut kb = TenantKeys::load(&mut p, &b, Instant::now()).unwrap();
        let v = Value::Text("a@example.com");
        let t1 = ka.term(1, "users.email", Normalization::NfkcCasefold, &v).unwrap();
        assert_eq!(t1, ka2.term(1, "users.email", Normalization::NfkcCasefold, &Value::Text("A@Example.COM")).unwrap());
        assert_ne!(t1, kb.term(1, "users.email", Normalization::NfkcCasefold, &v).unwrap(), "another tenant");
        assert_ne!(t1, ka.term(1, "users.login", Normalization::NfkcCasefold, &v).unwrap(), "another purpose");
        assert_eq!(ka.term(2, "users.email", Normalization::None, &v), Err(TermError::NoIndexKey { version: 2 }));
        assert_eq!(ka.index_versions(), vec![1]);
        assert_eq!(ka.active_index_version(), 1);
        // A data key's wrapping is not accepted as an index key.
        let mut bad = a.clone();
        bad.index_keys[0].wrapped = bad.deks[0].wrapped.clone();
        assert_eq!(TenantKeys::load(&mut p, &bad, Instant::now()).err(), Some(LoadError::CorruptIndexKey { version: 1 }));
    }

    #[test]
    fn the_last_hit_hint_never_returns_another_tenants_keys() {
        let mut p = InsecureTestProvider::new();
        let tenants: Vec<_> = ["acme", "acmf", "globex", "initech-0001", "initech-0002"]
            .iter()
            .enumerate()
            .map(|(i, n)| make_tenant(&mut p, n, i as u32 + 1, &[1]))
            .collect();
        let mut cache: KeyCache = KeyCache::new(Duration::from_secs(3600));
        let now = Instant::now();
        for rec in &tenants {
            cache.load(&mut p, rec, (), now).unwrap();
        }
        let id = |c: &mut KeyCache, t: &str| c.fresh_hit(t, now).map(|e| e.keys.tenant_key_id());
        // The hint points at the first tenant; removing it moves the last one into its slot.
        assert_eq!(id(&mut cache, "acme"), Some(1));
        assert!(cache.evict("acme"));
        assert_eq!(id(&mut cache, "acme"), None);
        assert_eq!(id(&mut cache, "initech-0002"), Some(5));
        // Names of the same length, sharing a prefix, and the hint past the end after removals.
        assert_eq!(id(&mut cache, "acmf"), Some(2));
        assert_eq!(id(&mut cache, "initech-0001"), Some(4));
        assert!(cache.evict("initech-0001"));
        assert_eq!(id(&mut cache, "initech-0001"), None);
        assert_eq!(id(&mut cache, "initech-0002"), Some(5));
        assert_eq!(id(&mut cache, "globex"), Some(3));
        cache.clear();
        assert_eq!(id(&mut cache, "globex"), None);
    }

    #[test]
    fn one_unwrap_per_tenant_per_ttl() {
        let mut p = InsecureTestProvider::new();
        let unwraps = p.unwraps.clone();
        let tenants: Vec<_> = (0..100).map(|i| make_tenant(&mut p, &format!("t{i}"), i + 1, &[1])).collect();
        let mut cache: KeyCache = KeyCache::new(Duration::from_secs(3600));
        let mut rng = BackendRng::new();
        let start = Instant::now();
        for row in 0..100_000u32 {
            let rec = &tenants[(row % 100) as usize];
            let now = start + Duration::from_millis(row as u64 / 100);
            let entry = match cache.get(&rec.tenant, now) {
                Some(e) => e,
                None => cache.load(&mut p, rec, (), now).unwrap(),
            };
            let _ = entry.keys.active().encrypt(&mut rng, &rec.tenant, None, b"v");
        }
        assert_eq!(unwraps.load(std::sync::atomic::Ordering::Relaxed), 100);
        assert_eq!(cache.stats().root_unwraps, 100);
        // After the TTL every tenant costs one more unwrap, and only one.
        let later = start + Duration::from_secs(3600);
        for rec in &tenants {
            for _ in 0..3 {
                if cache.get(&rec.tenant, later).is_none() {
                    cache.load(&mut p, rec, (), later).unwrap();
                }
            }
        }
        assert_eq!(unwraps.load(std::sync::atomic::Ordering::Relaxed), 200);
        assert_eq!(cache.stats().expirations, 100);
    }

    #[test]
    fn an_entry_capped_below_the_cache_ttl_expires_first_and_never_later() {
        let mut p = InsecureTestProvider::new();
        let (byok, other) = (make_tenant(&mut p, "byok", 1, &[1]), make_tenant(&mut p, "other", 2, &[1]));
        let mut cache: KeyCache = KeyCache::new(Duration::from_secs(3600));
        let t0 = Instant::now();
        let keys = TenantKeys::load(&mut p, &byok, t0).unwrap();
        cache.insert_loaded_capped("byok", keys, (), Some(Duration::from_secs(5)));
        let keys = TenantKeys::load(&mut p, &other, t0).unwrap();
        cache.insert_loaded("other", keys, ());
        let t4 = t0 + Duration::from_secs(4);
        assert!(cache.fresh_hit("byok", t4).is_some());
        let t5 = t0 + Duration::from_secs(5);
        assert!(cache.fresh_hit("byok", t5).is_none(), "past its own TTL");
        assert_eq!(cache.freshness("byok", t5), Freshness::Stale { age: Duration::from_secs(5) });
        assert!(cache.get("byok", t5).is_none());
        assert!(cache.fresh_hit("other", t5).is_some(), "other tenants keep the cache's TTL");
        // A cap longer than the cache's TTL does not extend it.
        let keys = TenantKeys::load(&mut p, &byok, t0).unwrap();
        cache.insert_loaded_capped("byok", keys, (), Some(Duration::from_secs(7200)));
        assert!(cache.fresh_hit("byok", t0 + Duration::from_secs(3600)).is_none());
    }

    #[test]
    fn a_shorter_ttl_applies_to_entries_already_hit_and_a_zero_ttl_caches_nothing() {
        let mut p = InsecureTestProvider::new();
        let rec = make_tenant(&mut p, "acme", 1, &[1]);
        let mut cache: KeyCache = KeyCache::new(Duration::from_secs(3600));
        let t0 = Instant::now();
        cache.insert_loaded("acme", TenantKeys::load(&mut p, &rec, t0).unwrap(), ());
        // Hit once under the long TTL (its expiry is remembered), then shortened.
        assert!(cache.fresh_hit("acme", t0 + Duration::from_secs(10)).is_some());
        cache.set_ttl(Duration::from_secs(20));
        assert!(cache.fresh_hit("acme", t0 + Duration::from_secs(19)).is_some());
        assert!(cache.fresh_hit("acme", t0 + Duration::from_secs(20)).is_none(), "the new TTL, not the remembered expiry");
        cache.set_ttl(Duration::ZERO);
        assert!(cache.fresh_hit("acme", t0).is_none());
        // Lengthened again: fresh again (the entry was loaded at t0).
        cache.set_ttl(Duration::from_secs(3600));
        assert!(cache.fresh_hit("acme", t0 + Duration::from_secs(30)).is_some());
    }

    #[test]
    fn old_versions_decrypt_without_another_unwrap() {
        let mut p = InsecureTestProvider::new();
        let rec = make_tenant(&mut p, "acme", 1, &[1, 2]);
        let mut cache: KeyCache = KeyCache::new(Duration::from_secs(60));
        let now = Instant::now();
        let mut rng = BackendRng::new();
        let keys = &mut cache.load(&mut p, &rec, (), now).unwrap().keys;
        assert_eq!(keys.active_version(), 2);
        let old = keys.version(1).unwrap().encrypt(&mut rng, "acme", None, b"old");
        let env = crate::envelope::Envelope::parse(&old).unwrap();
        let keys = &mut cache.get("acme", now).unwrap().keys;
        assert_eq!(keys.version(env.dek_version).unwrap().decrypt("acme", None, &old).unwrap(), b"old");
        assert_eq!(p.unwraps.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn retry_delay_grows_caps_and_jitters() {
        let mid = |f| retry_delay(f, 250);
        assert_eq!(mid(1), Duration::from_secs(1));
        assert_eq!(mid(2), Duration::from_secs(2));
        assert_eq!(mid(4), Duration::from_secs(8));
        assert_eq!(mid(30), Duration::from_secs(60));
        for r in [0u32, 1, 499, 500, u32::MAX] {
            let d = retry_delay(3, r);
            assert!(d >= Duration::from_secs(3) && d <= Duration::from_secs(5), "{d:?}");
        }
        assert_ne!(retry_delay(3, 0), retry_delay(3, 500));
    }

    #[test]
    fn stale_entries_are_kept_for_degraded_mode_and_cold_failures_back_off() {
        let mut p = InsecureTestProvider::new();
        let rec = make_tenant(&mut p, "acme", 1, &[1]);
        let mut cache: KeyCache = KeyCache::new(Duration::from_secs(10));
        let t0 = Instant::now();
        cache.load(&mut p, &rec, (), t0).unwrap();
        assert_eq!(cache.freshness("acme", t0 + Duration::from_secs(5)), Freshness::Fresh);
        assert_eq!(cache.freshness("acme", t0 + Duration::from_secs(11)), Freshness::Stale { age: Duration::from_secs(11) });
        let later = t0 + Duration::from_secs(11);
        let e = cache.mark_degraded("acme", later, "down".into(), 250).unwrap();
        assert_eq!(e.degraded.as_ref().unwrap().failures, 1);
        assert_eq!(cache.degraded_count(), 1);
        let e = cache.mark_degraded("acme", later, "down".into(), 250).unwrap();
        assert_eq!(e.degraded.as_ref().unwrap().retry_at, later + Duration::from_secs(2));
        // A successful reload clears degraded mode.
        cache.load(&mut p, &rec, (), later).unwrap();
        assert_eq!(cache.degraded_count(), 0);
        // Cold failures are remembered until their retry time, then forgotten by a success.
        cache.record_cold_failure("globex", "p", t0, ProviderError::Unavailable("down".into()), 250);
        assert!(cache.cold_failure("globex", t0 + Duration::from_millis(500)).is_some());
        assert!(cache.cold_failure("globex", t0 + Duration::from_millis(1500)).is_none());
    }

    #[test]
    fn provider_failure_and_corrupt_dek_fail_closed() {
        let mut p = InsecureTestProvider::new();
        let mut rec = make_tenant(&mut p, "acme", 1, &[1]);
        let mut cache: KeyCache = KeyCache::new(Duration::from_secs(60));
        p.fail_with = Some(ProviderError::Unavailable("down".into()));
        assert!(matches!(cache.load(&mut p, &rec, (), Instant::now()), Err(LoadError::Provider(_))));
        assert!(cache.is_empty());
        p.fail_with = None;
        rec.deks[0].wrapped[20] ^= 1;
        assert_eq!(cache.load(&mut p, &rec, (), Instant::now()).err(), Some(LoadError::CorruptDataKey { version: 1 }));
        assert!(cache.is_empty());
    }

    #[test]
    fn a_different_key_from_the_provider_fails_the_key_check() {
        let mut p = InsecureTestProvider::new();
        let mut rec = make_tenant(&mut p, "acme", 1, &[1]);
        // Same name, same wrapping, different key: what a KMS that swapped its key would return.
        let other = SecretKey::generate().unwrap();
        rec.wrapped_tenant_key = p.wrap_tenant_key(&KeyContext { tenant: "acme", tenant_key_id: 1 }, &other).unwrap();
        let mut cache: KeyCache = KeyCache::new(Duration::from_secs(60));
        assert_eq!(cache.load(&mut p, &rec, (), Instant::now()).err(), Some(LoadError::KeyCheckMismatch));
        assert_eq!(cache.stats().root_unwraps, 1);
    }

    #[test]
    fn wrapped_tenant_key_moved_between_tenants_does_not_load() {
        let mut p = InsecureTestProvider::new();
        let a = make_tenant(&mut p, "acme", 1, &[1]);
        let mut b = make_tenant(&mut p, "globex", 2, &[1]);
        b.wrapped_tenant_key = a.wrapped_tenant_key.clone();
        let mut cache: KeyCache = KeyCache::new(Duration::from_secs(60));
        assert_eq!(
            cache.load(&mut p, &b, (), Instant::now()).err(),
            Some(LoadError::Provider(ProviderError::UnwrapFailed))
        );
    }
}
