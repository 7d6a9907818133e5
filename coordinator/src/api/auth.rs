//! Bearer-token authentication for both services.
//!
//! The CLI presents a user token and workers a worker token. A request without a valid token
//! is UNAUTHENTICATED; a valid token of the wrong kind (a worker token on the experiment API,
//! or the reverse) is PERMISSION_DENIED, so operators can tell a typo from a misuse.
//!
//! Under mutual TLS a worker may instead present a client certificate that chains to the
//! client CA (the handshake checked that): the certificate is its identity, no token is needed,
//! and each call may act only for a worker id among the certificate's SAN DNS names.

use crate::tls::PeerInfo;
use std::sync::Arc;
use tonic::{Request, Status};

#[derive(Debug, Clone, Default)]
pub struct Tokens {
    pub user: Vec<String>,
    pub worker: Vec<String>,
}

impl Tokens {
    pub fn enabled(&self) -> bool {
        !self.user.is_empty() || !self.worker.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Worker,
}

/// Checks the `authorization` header against the tokens of one role.
#[derive(Debug, Clone)]
pub struct AuthInterceptor {
    tokens: Arc<Tokens>,
    role: Role,
}

impl AuthInterceptor {
    pub fn new(tokens: Arc<Tokens>, role: Role) -> Self {
        AuthInterceptor { tokens, role }
    }

    pub fn check(&self, header: Option<&str>) -> Result<(), Status> {
        if !self.tokens.enabled() {
            return Ok(());
        }
        let Some(header) = header else {
            return Err(Status::unauthenticated(match self.role {
                Role::User => "missing bearer token (set CHORUS_TOKEN)",
                Role::Worker => "missing bearer token (workers set CHORUS_WORKER_TOKEN)",
            }));
        };
        let Some(token) = header.strip_prefix("Bearer ").map(str::trim) else {
            return Err(Status::unauthenticated("authorization header must be `Bearer <token>`"));
        };
        let matches = |list: &[String]| list.iter().any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
        let (own, other) = match self.role {
            Role::User => (&self.tokens.user, &self.tokens.worker),
            Role::Worker => (&self.tokens.worker, &self.tokens.user),
        };
        if matches(own) {
            Ok(())
        } else if matches(other) {
            Err(Status::permission_denied(match self.role {
                Role::User => "a worker token cannot use the experiment API",
                Role::Worker => "a user token cannot act as a worker",
            }))
        } else {
            Err(Status::unauthenticated("invalid token"))
        }
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if self.role == Role::Worker && client_names(&req).is_some() {
            // Verified at the handshake; which worker ids it may act for is checked per call
            // ([`authorize_worker`]), where the request names one.
            return Ok(req);
        }
        let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        self.check(header)?;
        Ok(req)
    }
}

/// The SAN DNS names of the verified client certificate the connection presented, if any.
fn client_names<T>(req: &Request<T>) -> Option<&[String]> {
    req.extensions()
        .get::<PeerInfo>()?
        .client_names
        .as_deref()
        .map(Vec::as_slice)
}

/// A worker call made with a client certificate acts only for a worker id the certificate
/// names; a call authenticated by token (or on an open coordinator) may name any.
pub fn authorize_worker<T>(req: &Request<T>, worker_id: &str) -> Result<(), Status> {
    match client_names(req) {
        Some(names) if !names.iter().any(|n| n == worker_id) => Err(Status::permission_denied(format!(
            "the client certificate names {names:?}, not worker {worker_id:?}: a worker acts only under its \
             own name (give its certificate a SAN DNS name equal to its worker id)"
        ))),
        _ => Ok(()),
    }
}

/// Compares without an early exit, so response time does not reveal how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn roles_and_codes() {
        let t = Arc::new(Tokens {
            user: vec!["u1".into()],
            worker: vec!["w1".into()],
        });
        let user = AuthInterceptor::new(t.clone(), Role::User);
        let worker = AuthInterceptor::new(t, Role::Worker);
        assert!(user.check(Some("Bearer u1")).is_ok());
        assert!(worker.check(Some("Bearer w1")).is_ok());
        assert_eq!(
            user.check(Some("Bearer w1")).unwrap_err().code(),
            Code::PermissionDenied
        );
        assert_eq!(
            worker.check(Some("Bearer u1")).unwrap_err().code(),
            Code::PermissionDenied
        );
        assert_eq!(
            user.check(Some("Bearer nope")).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(user.check(None).unwrap_err().code(), Code::Unauthenticated);
        assert!(user.check(None).unwrap_err().message().contains("CHORUS_TOKEN"));
        let missing = worker.check(None).unwrap_err();
        assert!(
            missing.message().contains("CHORUS_WORKER_TOKEN"),
            "{}",
            missing.message()
        );
        assert_eq!(user.check(Some("u1")).unwrap_err().code(), Code::Unauthenticated);
        let open = AuthInterceptor::new(Arc::new(Tokens::default()), Role::User);
        assert!(open.check(None).is_ok());
    }

    fn with_cert(names: Option<&[&str]>) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut().insert(PeerInfo {
            remote: None,
            client_names: names.map(|n| Arc::new(n.iter().map(|s| s.to_string()).collect())),
        });
        req
    }

    /// A certificate replaces the worker token, never the user token, and binds the worker id.
    #[test]
    fn a_client_certificate_is_a_worker_identity() {
        use tonic::service::Interceptor;
        let t = Arc::new(Tokens {
            user: vec!["u1".into()],
            worker: vec!["w1".into()],
        });
        let mut worker = AuthInterceptor::new(t.clone(), Role::Worker);
        let mut user = AuthInterceptor::new(t, Role::User);
        assert!(worker.call(with_cert(Some(&["pod-a"]))).is_ok());
        assert_eq!(
            user.call(with_cert(Some(&["pod-a"]))).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(worker.call(with_cert(None)).unwrap_err().code(), Code::Unauthenticated);
        assert!(authorize_worker(&with_cert(Some(&["pod-a", "pod-b"])), "pod-b").is_ok());
        let denied = authorize_worker(&with_cert(Some(&["pod-a"])), "pod-c").unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert!(
            denied.message().contains("pod-a") && denied.message().contains("pod-c"),
            "{}",
            denied.message()
        );
        assert!(authorize_worker(&with_cert(None), "anyone").is_ok());
    }
}
