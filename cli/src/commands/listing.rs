//! Whole listings from the coordinator's paged calls: every page, asked for in turn, each one
//! call under the `--timeout` deadline.

use super::Ctx;
use crate::client::Coordinator;
use crate::error::CliError;
use chorus_proto::pb;

/// Follows `next_page_token` until it comes back empty. A coordinator that hands the same
/// token back would keep a client asking forever: that is refused.
/// `enough` says when the pages so far hold all the caller needs.
async fn follow_pages<T, F, Fut>(mut ask: F, enough: impl Fn(&[T]) -> bool) -> Result<Vec<T>, CliError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(T, String), CliError>>,
{
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = ask(token.clone()).await?;
        pages.push(page);
        if next.is_empty() || enough(&pages) {
            return Ok(pages);
        }
        if next == token {
            return Err(CliError::BadResponse(format!(
                "the coordinator handed back the page token {next:?} it was given"
            )));
        }
        token = next;
    }
}

/// The trials of an experiment in creation order, with the ranking fields of the first page:
/// every one, or with `first` at least the first that many.
pub async fn trials(
    coord: &Coordinator,
    ctx: &Ctx,
    experiment: u64,
    first: Option<usize>,
) -> Result<pb::ListTrialsResponse, CliError> {
    let page_size = ctx.page_size();
    let enough = |pages: &[pb::ListTrialsResponse]| {
        first.is_some_and(|n| pages.iter().map(|p| p.trials.len()).sum::<usize>() >= n)
    };
    let pages = follow_pages(
        |page_token| async move {
            let req = pb::ListTrialsRequest {
                experiment_id: experiment,
                page_size,
                page_token,
            };
            let mut resp = coord.api().list_trials(coord.unary(req)).await?.into_inner();
            let next = std::mem::take(&mut resp.next_page_token);
            Ok((resp, next))
        },
        enough,
    )
    .await?;
    let mut pages = pages.into_iter();
    let mut all = pages.next().unwrap_or_default();
    for p in pages {
        all.trials.extend(p.trials);
    }
    Ok(all)
}

/// Every experiment `filter` selects (its labels and archival; its paging fields are set here),
/// by id.
pub async fn experiments(
    coord: &Coordinator,
    ctx: &Ctx,
    filter: pb::ListExperimentsRequest,
) -> Result<Vec<pb::Experiment>, CliError> {
    let page_size = ctx.page_size();
    let filter = &filter;
    let pages = follow_pages(
        |page_token| async move {
            let req = pb::ListExperimentsRequest {
                page_size,
                page_token,
                ..filter.clone()
            };
            let resp = coord.api().list_experiments(coord.unary(req)).await?.into_inner();
            Ok((resp.experiments, resp.next_page_token))
        },
        |_| false,
    )
    .await?;
    Ok(pages.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pages_are_followed_to_the_empty_token() {
        let ask = |t: String| async move {
            Ok(match t.as_str() {
                "" => (1, "a".to_string()),
                "a" => (2, "b".to_string()),
                _ => (3, String::new()),
            })
        };
        assert_eq!(follow_pages(ask, |_| false).await.unwrap(), [1, 2, 3]);
        // Stops as soon as the caller has what it needs.
        assert_eq!(follow_pages(ask, |p| p.len() >= 2).await.unwrap(), [1, 2]);
    }

    #[tokio::test]
    async fn a_token_handed_back_is_refused_not_followed_forever() {
        let err = follow_pages(|_| async { Ok((0, "same".to_string())) }, |_| false)
            .await
            .unwrap_err();
        assert!(matches!(&err, CliError::BadResponse(m) if m.contains("same")), "{err}");
    }
}
