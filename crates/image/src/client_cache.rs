//! Registry clients kept between pulls.
//!
//! Building an oci-client `Client` loads and parses the system's CA certificates: several
//! milliseconds and a burst of heap per pull, which is most of a warm pull (the image is
//! there; only its manifest is checked). So clients are reused, but only for the same
//! endpoint (host and scheme) and the same credentials: a client keeps the tokens it got,
//! and one identity's tokens must never serve another's pull. Unused clients are dropped
//! after [`IDLE`], so an idle berthd does not keep them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use oci_client::Client;
use oci_client::secrets::RegistryAuth;
use sha2::{Digest as _, Sha256};

/// How long a client may go unused before it is dropped.
pub(crate) const IDLE: Duration = Duration::from_secs(60);

/// Which pulls may share a client: the endpoint, and a digest of the credentials (the
/// secrets themselves stay in the client only).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    host: String,
    plain_http: bool,
    credentials: [u8; 32],
}

struct Entry {
    client: Client,
    used: Instant,
}

type Entries = Mutex<HashMap<Key, Entry>>;

/// Clients by endpoint and credentials. Clones share the cache.
#[derive(Clone, Default)]
pub(crate) struct ClientCache {
    entries: Arc<Entries>,
}

impl std::fmt::Debug for ClientCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.lock().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("ClientCache").field("clients", &n).finish()
    }
}

/// A digest of `auth` that tells identities apart (each field length-prefixed, so no two
/// different credentials encode alike).
fn credentials_digest(auth: &RegistryAuth) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    match auth {
        RegistryAuth::Anonymous => field(b"anonymous"),
        RegistryAuth::Basic(user, password) => {
            field(b"basic");
            field(user.as_bytes());
            field(password.as_bytes());
        }
        RegistryAuth::Bearer(token) => {
            field(b"bearer");
            field(token.as_bytes());
        }
    }
    h.finalize().into()
}

impl ClientCache {
    /// The cached client for `host`/`plain_http`/`auth`, or a new one from `build` (kept
    /// for the next pull).
    pub(crate) fn get_or_build<E>(
        &self,
        host: &str,
        plain_http: bool,
        auth: &RegistryAuth,
        build: impl FnOnce() -> Result<Client, E>,
    ) -> Result<Client, E> {
        let key = Key { host: host.to_owned(), plain_http, credentials: credentials_digest(auth) };
        let now = Instant::now();
        {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            entries.retain(|_, e| now.duration_since(e.used) < IDLE);
            if let Some(e) = entries.get_mut(&key) {
                e.used = now;
                return Ok(e.client.clone());
            }
        }
        // Built outside the lock: it reads files. Two pulls racing here both build; the
        // second one's client is the one kept, which is as good.
        let client = build()?;
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let first = entries.is_empty();
        entries.insert(key, Entry { client: client.clone(), used: now });
        drop(entries);
        if first {
            spawn_sweeper(Arc::downgrade(&self.entries));
        }
        Ok(client)
    }
}

/// Drops idle clients every [`IDLE`] until none is left (the next insert starts another).
/// Outside a tokio runtime there is none: idle clients then go at the next lookup.
fn spawn_sweeper(entries: Weak<Entries>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
    handle.spawn(async move {
        loop {
            tokio::time::sleep(IDLE).await;
            let Some(entries) = entries.upgrade() else { return };
            let mut map = entries.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            map.retain(|_, e| now.duration_since(e.used) < IDLE);
            if map.is_empty() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Result<Client, std::convert::Infallible> {
        Ok(Client::default())
    }

    #[test]
    fn identities_and_endpoints_do_not_share_clients() {
        let anon = RegistryAuth::Anonymous;
        let alice = RegistryAuth::Basic("alice".into(), "pw".into());
        let bob = RegistryAuth::Basic("bob".into(), "pw".into());
        let digests =
            [&anon, &alice, &bob, &RegistryAuth::Bearer("pw".into())].map(credentials_digest);
        for (i, a) in digests.iter().enumerate() {
            for b in &digests[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // "a" + "b\0c" must not collide with "a\0b" + "c".
        assert_ne!(
            credentials_digest(&RegistryAuth::Basic("a".into(), "b\0c".into())),
            credentials_digest(&RegistryAuth::Basic("a\0b".into(), "c".into()))
        );

        let cache = ClientCache::default();
        let mut builds = 0;
        let mut get = |host: &str, plain: bool, auth: &RegistryAuth| {
            cache
                .get_or_build(host, plain, auth, || {
                    builds += 1;
                    client()
                })
                .expect("client")
        };
        get("r.example", false, &alice);
        get("r.example", false, &alice);
        get("r.example", false, &bob);
        get("r.example", true, &alice);
        get("m.example", false, &alice);
        assert_eq!(builds, 4);
    }
}
