//! What every list request shares: its query string read, or a problem
//! naming what is wrong with it, a page size within bounds, and the cursor
//! of the next page.

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use axum::http::StatusCode;
use uuid::Uuid;

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

/// A page of a list kept in id order: where it starts and how long it is.
pub struct IdPage {
    /// The previous page's `next`: this page starts after it.
    pub after: Option<Uuid>,
    pub limit: usize,
}

impl IdPage {
    /// The `after` cursor read as the id of a `what` (a malformed one is
    /// the caller's mistake, 400 naming `after`), and a page size of at
    /// most 1,000 (100 when none is asked).
    pub fn read(after: Option<&str>, limit: Option<usize>, what: &str) -> Result<Self, Problem> {
        let after = after
            .map(|text| {
                Uuid::parse_str(text).map_err(|e| {
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        "bad-query-parameter",
                        "A query parameter is malformed",
                        format!(
                            "the query parameter after ({text:?}) is not a {what} id, a UUID, as the previous page's next is: {e}"
                        ),
                    )
                    .with_field("/after")
                })
            })
            .transpose()?;
        Ok(IdPage {
            after,
            limit: page_limit(limit, 100, 1000)?,
        })
    }
}

/// The next page's cursor: the last item's, when the page came back full
/// (a shorter page is the last one).
pub fn next_cursor<T>(page: &[T], limit: usize, cursor: impl Fn(&T) -> String) -> Option<String> {
    match page.len() == limit {
        true => page.last().map(cursor),
        false => None,
    }
}
