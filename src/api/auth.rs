//! Bearer tokens and their roles.
//!
//! Tokens are kept as SHA-256 digests and looked up by digest, so comparing
//! them leaks nothing through timing and the secrets do not linger in memory
//! beyond start-up.

use std::collections::HashMap;

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
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "This token may not do that",
                format!(
                    "token {:?} has the ingest role; this needs operator",
                    caller.name
                ),
            ));
        }
        Ok(caller.clone())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}
