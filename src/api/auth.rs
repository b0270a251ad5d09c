//! Bearer tokens and their roles.
//!
//! Tokens are kept as SHA-256 digests and looked up by digest, so comparing
//! them leaks nothing through timing and the secrets do not linger in memory
//! beyond start-up.
//!
//! [`super::guard`] checks the token before any handler runs and leaves the
//! [`Caller`] in the request; a handler states who may call it by taking
//! [`Operator`] or [`Ingest`], which refuse a caller without that role.

use std::collections::HashMap;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use super::problem::Problem;
use crate::config::{Role, TokenConfig};

#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

pub struct Tokens {
    by_digest: HashMap<[u8; 32], Caller>,
}

impl Tokens {
    pub fn new(tokens: &[TokenConfig]) -> Tokens {
        Tokens {
            by_digest: tokens
                .iter()
                .map(|t| {
                    (
                        digest(&t.secret),
                        Caller {
                            name: t.name.clone(),
                            role: t.role,
                        },
                    )
                })
                .collect(),
        }
    }

    /// The caller behind the request's bearer token, if it may act as `needed`.
    /// With no tokens configured (loopback only, enforced at start) everyone may.
    pub fn authorize(&self, headers: &HeaderMap, needed: Role) -> Result<Caller, Problem> {
        if self.by_digest.is_empty() {
            return Ok(Caller {
                name: "anonymous".into(),
                role: Role::Operator,
            });
        }
        let unauthorized = |detail: &str| {
            Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "A valid bearer token is needed",
                detail,
            )
        };
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("no Authorization header"))?
            .to_str()
            .map_err(|_| unauthorized("the Authorization header is not text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| unauthorized("the Authorization header is not 'Bearer <token>'"))?;
        let caller = self
            .by_digest
            .get(&digest(token.trim()))
            .ok_or_else(|| unauthorized("unknown token"))?;
        if needed == Role::Operator && caller.role != Role::Operator {
            return Err(forbidden(caller));
        }
        Ok(caller.clone())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A handler that takes this may be called by operators only.
pub struct Operator(pub Caller);

/// A handler that takes this may be called by ingest tokens (and operators).
pub struct Ingest(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for Operator {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Problem> {
        let caller = checked_caller(parts)?;
        if caller.role != Role::Operator {
            return Err(forbidden(&caller));
        }
        Ok(Operator(caller))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ingest {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Problem> {
        checked_caller(parts).map(Ingest)
    }
}

/// The caller the guard let through. Missing means the guard does not cover
/// the handler's route: refused, never served unchecked.
fn checked_caller(parts: &Parts) -> Result<Caller, Problem> {
    parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
        Problem::internal("this route is served without the guard's token check; it is refused")
    })
}

fn forbidden(caller: &Caller) -> Problem {
    Problem::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        "This token may not do that",
        format!(
            "token {:?} has the ingest role; this needs operator",
            caller.name
        ),
    )
}
