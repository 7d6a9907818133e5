//! Page sizes and page tokens of the listing calls (`ListExperiments`, `ListTrials`).
//!
//! A listing runs in id order, and its token is the last id of the page before, tagged with
//! what was listed, so a token of one listing is refused by another. Ids only grow, so a token
//! stays exact while records are created: a new experiment or trial comes after every page
//! already handed out, and nothing is skipped or repeated. A page costs a lookup in an ordered
//! index plus the page itself, never a walk over what came before, so the state lock is held
//! for one page's worth of work.

use crate::error::CoordError;
use chorus_core::ExperimentId;
use std::collections::BTreeMap;
use std::ops::Bound;

/// Records in a page when the request names no size.
pub const DEFAULT_PAGE_SIZE: u32 = 1_000;
/// Most records in a page; a larger request gets this many. A page of the largest trials
/// stays far below the message limit.
pub const MAX_PAGE_SIZE: u32 = 10_000;

/// The records a page holds: `requested`, or the default for 0, at most [`MAX_PAGE_SIZE`].
pub fn page_size(requested: u32) -> usize {
    match requested {
        0 => DEFAULT_PAGE_SIZE as usize,
        n => n.min(MAX_PAGE_SIZE) as usize,
    }
}

/// What a token pages through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Experiments,
    Trials(ExperimentId),
}

impl Listing {
    fn tag(self) -> String {
        match self {
            Listing::Experiments => "e".to_string(),
            Listing::Trials(exp) => format!("t{}", exp.0),
        }
    }

    fn describe(self) -> String {
        match self {
            Listing::Experiments => "the experiments".to_string(),
            Listing::Trials(exp) => format!("the trials of experiment {exp}"),
        }
    }

    /// The id a page starts after: `None` for the first page (an empty token), else what the
    /// token says; a token that this listing did not hand out is `INVALID_ARGUMENT`.
    pub fn parse_token(self, token: &str) -> Result<Option<u64>, CoordError> {
        if token.is_empty() {
            return Ok(None);
        }
        let tag = self.tag();
        token
            .strip_prefix(&tag)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|id| id.parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| {
                CoordError::InvalidArgument(format!(
                    "page_token {token:?} is not a page token of {}: pass the next_page_token of the previous \
                     page, or none for the first page",
                    self.describe()
                ))
            })
    }

    fn token(self, after: u64) -> String {
        format!("{}.{after}", self.tag())
    }
}

/// One page of ids, and the token of the next page (empty on the last one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<K> {
    pub ids: Vec<K>,
    pub next_page_token: String,
}

/// Takes a page of `size` ids from `ids` (in increasing order, starting after the token's id),
/// looking one further to tell whether another page follows.
pub fn page<K: Copy>(listing: Listing, ids: impl Iterator<Item = K>, size: usize, id: impl Fn(K) -> u64) -> Page<K> {
    let mut page: Vec<K> = ids.take(size + 1).collect();
    let next_page_token = if page.len() > size {
        page.truncate(size);
        page.last().map_or_else(String::new, |k| listing.token(id(*k)))
    } else {
        String::new()
    };
    Page {
        ids: page,
        next_page_token,
    }
}

/// The keys of `map` after `after` (all of them for `None`), in order, found by one lookup.
pub fn keys_after<K: Ord + Copy, V>(map: &BTreeMap<K, V>, after: Option<K>) -> impl Iterator<Item = K> + '_ {
    let from = after.map_or(Bound::Unbounded, Bound::Excluded);
    map.range((from, Bound::Unbounded)).map(|(k, _)| *k)
}

/// The ids of `sorted` (increasing) after `after`, found by binary search.
pub fn sorted_after<K: Ord + Copy>(sorted: &[K], after: Option<K>) -> impl Iterator<Item = K> + '_ {
    let start = after.map_or(0, |a| sorted.partition_point(|k| *k <= a));
    sorted[start..].iter().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn sizes_default_and_cap() {
        assert_eq!(page_size(0), 1_000);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(10_000), 10_000);
        assert_eq!(page_size(u32::MAX), 10_000);
    }

    /// Paging through a map that grows between pages yields every key once, in order.
    #[test]
    fn pages_cover_a_growing_listing_once_in_order() {
        let mut map: BTreeMap<u64, ()> = (1..=95).map(|k| (k * 2, ())).collect();
        let listing = Listing::Experiments;
        let mut seen: Vec<u64> = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let after = listing.parse_token(&token).unwrap();
            let p = page(listing, keys_after(&map, after), 10, |k| k);
            seen.extend(&p.ids);
            pages += 1;
            if pages == 3 {
                // Created while a client pages: after every page handed out.
                map.extend((1000..1007).map(|k| (k, ())));
            }
            if p.next_page_token.is_empty() {
                break;
            }
            token = p.next_page_token;
        }
        let all: Vec<u64> = map.keys().copied().collect();
        assert_eq!(seen, all);
        assert_eq!(pages, 11, "102 keys in pages of 10");
    }

    #[test]
    fn an_exactly_full_last_page_says_it_is_the_last() {
        let ids = [1u64, 2, 3, 4];
        let p = page(Listing::Experiments, sorted_after(&ids, None), 4, |k| k);
        assert_eq!((p.ids.len(), p.next_page_token.as_str()), (4, ""));
        let p = page(Listing::Experiments, sorted_after(&ids, Some(2)), 1, |k| k);
        assert_eq!(p.ids, [3]);
        assert_eq!(p.next_page_token, "e.3");
        // A token for an id that is gone (or never was) still resumes after it.
        let p = page(Listing::Experiments, sorted_after(&[1u64, 5, 9], Some(4)), 9, |k| k);
        assert_eq!(p.ids, [5, 9]);
    }

    #[test]
    fn foreign_and_malformed_tokens_are_invalid_arguments() {
        let trials = Listing::Trials(ExperimentId(3));
        assert_eq!(trials.parse_token("").unwrap(), None);
        assert_eq!(trials.parse_token(&trials.token(41)).unwrap(), Some(41));
        for bad in ["e.41", "t4.41", "t3.", "t3.x", "t3", "41", "t3.-1", "t3.41 "] {
            let s = tonic::Status::from(trials.parse_token(bad).unwrap_err());
            assert_eq!(s.code(), Code::InvalidArgument, "{bad}");
            assert!(s.message().contains("trials of experiment 3"), "{}", s.message());
            assert!(s.message().contains("next_page_token"), "{}", s.message());
        }
    }
}
