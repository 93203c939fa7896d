//! pg_envelope's pure-Rust core: no PostgreSQL in here.
//!
//! * [`envelope`]: the self-describing ciphertext format (v1), parsing and AAD.
//! * [`DataKey`]: field encryption under one data key (XAES-256-GCM, key-committing).
//! * [`wrap`]: wrapping keys under keys (DEKs under tenant keys; `local` root wrapping).
//! * [`provider`]: the root-of-trust trait and the `local` provider.
//! * [`KeyCache`]: per-backend cache of unwrapped tenant keys with a TTL.
//! * [`lifecycle`]: new data key versions (rotation).
//! * [`audit`]: the audit chain (canonical records, hash chain, verification, checkpoints).
//! * [`audit_export`]: the audit trail's export lines (JSON, built here rather than in SQL).
//! * [`search`]: blind indexes (keyed deterministic terms for equality search on encrypted columns).
//! * [`stampede`]: the cluster-wide bound on concurrent key-provider calls (slots in shared memory).
//! * [`BackendRng`]: the per-process, fork-aware nonce generator.
//! * [`SecretKey`]: key bytes that zeroize on drop and cannot be printed.
//! * [`secure`]: the key pool (no core dumps, mlock, wiped slots) and the stack wipe.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod audit;
pub mod audit_blocks;
pub mod audit_export;
pub mod cache;
pub mod datakey;
pub mod envelope;
pub mod jsonb;
pub mod numeric;
pub mod fuzzing;
pub mod lifecycle;
pub mod provider;
pub mod ring;
pub mod rng;
pub mod search;
pub mod stampede;
pub mod secret;
pub mod secure;
pub mod text;
pub mod wrap;

pub use cache::{retry_delay, CacheEntry, CacheStats, ColdFailure, Degraded, Freshness, KeyCache, LoadError, TenantKeys, TenantRecord, VersionState, WrappedDek};
pub use datakey::{DataKey, DecryptError};
pub use envelope::{envelope_len, Envelope, MalformedEnvelope, OVERHEAD};
pub use provider::{local::LocalProvider, KeyContext, KeyProvider, ProviderError};
pub use rng::BackendRng;
pub use secret::{SecretKey, KEY_LEN};
