//! Single-use tokens: each URL the CRI hands out names one request, for a minute.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_cri::v1::{AttachRequest, ExecRequest, PortForwardRequest};

use crate::StreamError;

/// How long a URL stays valid (the kubelet's streaming server uses a minute too).
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Most URLs pending at once: a client that asks and never connects cannot grow the cache
/// without bound.
const MAX_PENDING: usize = 1000;
/// Random bytes per token (256 bits, URL-safe base64 without padding).
const TOKEN_BYTES: usize = 32;

/// The request a token was made for.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// A CRI Exec.
    Exec(ExecRequest),
    /// A CRI Attach.
    Attach(AttachRequest),
    /// A CRI PortForward.
    PortForward(PortForwardRequest),
}

impl Request {
    /// The URL path segment for this kind of request.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Exec(_) => "exec",
            Request::Attach(_) => "attach",
            Request::PortForward(_) => "portforward",
        }
    }
}

/// Pending requests by token.
#[derive(Debug, Default)]
pub struct Tokens {
    pending: Mutex<HashMap<String, (Request, Instant)>>,
}

impl Tokens {
    /// Remembers `request` and returns a fresh token for it.
    pub fn insert(&self, request: Request) -> Result<String, StreamError> {
        let token = random_token()?;
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, (_, at)| now.duration_since(*at) < TOKEN_TTL);
        if pending.len() >= MAX_PENDING {
            return Err(StreamError::TooManyPending(pending.len()));
        }
        pending.insert(token.clone(), (request, now));
        Ok(token)
    }

    /// Takes the request `token` was made for, if it is of `kind` and not expired; a token is
    /// good for one use only. A token of another kind stays (the URL was not its own).
    pub fn take(&self, kind: &str, token: &str) -> Option<Request> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (request, at) = pending.get(token)?;
        if request.kind() != kind {
            return None;
        }
        let fresh = at.elapsed() < TOKEN_TTL;
        let (request, _) = pending.remove(token)?;
        fresh.then_some(request)
    }
}

/// A token from the kernel's random source (`getrandom(2)`).
fn random_token() -> Result<String, StreamError> {
    let mut buf = [0u8; TOKEN_BYTES];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(StreamError::Random(e));
        }
        filled += n as usize;
    }
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> Request {
        Request::Exec(ExecRequest {
            container_id: "c".into(),
            cmd: vec!["true".into()],
            ..Default::default()
        })
    }

    #[test]
    fn a_token_is_good_once() {
        let t = Tokens::default();
        let tok = t.insert(exec()).unwrap();
        assert_eq!(t.take("exec", &tok), Some(exec()));
        assert_eq!(t.take("exec", &tok), None);
    }

    #[test]
    fn a_token_is_bound_to_its_kind() {
        let t = Tokens::default();
        let tok = t.insert(exec()).unwrap();
        assert_eq!(t.take("portforward", &tok), None);
        assert_eq!(t.take("attach", &tok), None);
        assert_eq!(t.take("exec", &tok), Some(exec()));
    }

    #[test]
    fn unknown_and_expired_tokens_are_refused() {
        let t = Tokens::default();
        assert_eq!(t.take("exec", "nope"), None);
        let tok = t.insert(exec()).unwrap();
        {
            let mut p = t.pending.lock().unwrap();
            let past = Instant::now().checked_sub(TOKEN_TTL + Duration::from_secs(1)).unwrap();
            p.get_mut(&tok).unwrap().1 = past;
        }
        assert_eq!(t.take("exec", &tok), None);
        // And it is gone, not kept for a later try.
        assert!(t.pending.lock().unwrap().is_empty());
    }

    #[test]
    fn tokens_are_random_and_url_safe() {
        let t = Tokens::default();
        let a = t.insert(exec()).unwrap();
        let b = t.insert(exec()).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    #[test]
    fn pending_requests_are_bounded() {
        let t = Tokens::default();
        for _ in 0..MAX_PENDING {
            t.insert(exec()).unwrap();
        }
        assert!(matches!(t.insert(exec()), Err(StreamError::TooManyPending(_))));
    }
}
