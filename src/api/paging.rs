//! What every list request shares: its query string read, or a problem
//! naming what is wrong with it, and a page size within bounds.

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;

use super::problem::Problem;

/// The request's query, or a 422 saying why it does not read.
pub fn read_query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, Problem> {
    query
        .map(|Query(q)| q)
        .map_err(|e| Problem::invalid("", format!("bad query: {}", e.body_text())))
}

/// The page size asked for (`default` when none), refused outside 1..=`max`.
pub fn page_limit(asked: Option<usize>, default: usize, max: usize) -> Result<usize, Problem> {
    let limit = asked.unwrap_or(default);
    if limit == 0 || limit > max {
        return Err(Problem::invalid(
            "/limit",
            format!("must be between 1 and {max}"),
        ));
    }
    Ok(limit)
}
