//! Bearer-token authentication for both services.
//!
//! The CLI presents a user token and workers a worker token. A request without a valid token
//! is UNAUTHENTICATED; a valid token of the wrong kind (a worker token on the experiment API,
//! or the reverse) is PERMISSION_DENIED, so operators can tell a typo from a misuse.

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
        let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        self.check(header)?;
        Ok(req)
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
        assert!(missing.message().contains("CHORUS_WORKER_TOKEN"), "{}", missing.message());
        assert_eq!(user.check(Some("u1")).unwrap_err().code(), Code::Unauthenticated);
        let open = AuthInterceptor::new(Arc::new(Tokens::default()), Role::User);
        assert!(open.check(None).is_ok());
    }
}
