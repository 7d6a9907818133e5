//! Reading a trial's stored log chunks as pages that always fit one gRPC message.
//!
//! A worker caps each chunk it writes, but chunks written by older workers (or by any process
//! with access to the bucket) may be of any size: the reader never holds more than one page of
//! one chunk, and a cursor can point into the middle of a chunk, so a follower that reconnects
//! resumes exactly after the last page it printed.

use crate::error::CoordError;
use chorus_core::storage::Storage;
use chorus_proto::pb;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange};
use tokio::sync::mpsc;
use tonic::Status;

/// The most log bytes one `LogChunk` message carries: far below the message limit.
pub const LOG_PAGE_BYTES: usize = 1024 * 1024;

/// Where a reader stands: after chunk `name` entirely, or within it before byte `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor {
    pub name: String,
    pub offset: Option<u64>,
}

impl Cursor {
    /// `""` (the start), `NAME` (after the whole chunk) or `NAME@OFFSET`.
    pub fn parse(s: &str) -> Cursor {
        match s.rsplit_once('@') {
            Some((name, off)) if off.parse::<u64>().is_ok() => Cursor {
                name: name.to_string(),
                offset: off.parse().ok(),
            },
            _ => Cursor {
                name: s.to_string(),
                offset: None,
            },
        }
    }

    /// Where to start reading chunk `name`, or `None` when the cursor is past it. Names of one
    /// rank sort in log order.
    pub fn start_in(&self, name: &str) -> Option<u64> {
        if self.name.is_empty() || name > self.name.as_str() {
            return Some(0);
        }
        if name == self.name { self.offset } else { None }
    }
}

/// Sends chunk `name` from byte `start` as pages of at most [`LOG_PAGE_BYTES`], each cut after
/// its last newline when it has one. Returns `false` once nobody listens any more.
pub async fn send_chunk(
    uri: &str,
    storage: &Storage,
    location: &Path,
    name: &str,
    attempt: u32,
    start: u64,
    tx: &mpsc::Sender<Result<pb::LogChunk, Status>>,
) -> Result<bool, Status> {
    let opts = GetOptions {
        range: (start > 0).then_some(GetRange::Offset(start)),
        ..Default::default()
    };
    let result = storage
        .store
        .get_opts(location, opts)
        .await
        .map_err(|e| Status::from(CoordError::storage(uri, &format!("read {location}"), &e)))?;
    let total = result.meta.size;
    let mut stream = result.into_stream();
    let mut page: Vec<u8> = Vec::with_capacity(LOG_PAGE_BYTES.min(total as usize));
    let mut offset = start;
    let mut eof = false;
    while !eof {
        match stream.next().await {
            Some(Ok(bytes)) => page.extend_from_slice(&bytes),
            Some(Err(e)) => return Err(CoordError::storage(uri, &format!("read {location}"), &e).into()),
            None => eof = true,
        }
        while page.len() >= LOG_PAGE_BYTES || (eof && !page.is_empty()) {
            let mut cut = page.len().min(LOG_PAGE_BYTES);
            if cut < page.len()
                && let Some(nl) = page[..cut].iter().rposition(|&b| b == b'\n')
            {
                cut = nl + 1;
            }
            let data: Vec<u8> = page.drain(..cut).collect();
            offset += data.len() as u64;
            let cursor = if offset >= total {
                name.to_string()
            } else {
                format!("{name}@{offset}")
            };
            if tx.send(Ok(pb::LogChunk { attempt, data, cursor })).await.is_err() {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_core::storage::{StorageUri, open};
    use object_store::ObjectStoreExt;

    #[test]
    fn cursors_point_between_and_into_chunks() {
        let start = Cursor::parse("");
        assert_eq!(start.start_in("0001-000000.log"), Some(0));
        let after = Cursor::parse("0001-000001.log");
        assert_eq!(after.start_in("0001-000000.log"), None);
        assert_eq!(after.start_in("0001-000001.log"), None);
        assert_eq!(after.start_in("0001-000002.log"), Some(0));
        let within = Cursor::parse("0001-000001.log@4096");
        assert_eq!(within.start_in("0001-000001.log"), Some(4096));
        assert_eq!(within.start_in("0002-000000.log"), Some(0));
    }

    #[tokio::test]
    async fn a_huge_chunk_goes_out_in_pages_that_resume_from_their_cursor() {
        let s = open(&StorageUri::parse("memory://log-pages").unwrap(), &Default::default()).unwrap();
        let key = Path::from("logs/0001-000000.log");
        let line = "x".repeat(999) + "\n";
        let body = line.repeat(3 * LOG_PAGE_BYTES / 1000 + 7);
        s.store.put(&key, body.clone().into()).await.unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        assert!(
            send_chunk("memory://log-pages", &s, &key, "0001-000000.log", 1, 0, &tx)
                .await
                .unwrap()
        );
        drop(tx);
        let mut pages = Vec::new();
        while let Some(p) = rx.recv().await {
            pages.push(p.unwrap());
        }
        assert!(pages.len() >= 4, "{} pages", pages.len());
        assert!(
            pages
                .iter()
                .all(|p| p.data.len() <= LOG_PAGE_BYTES && p.data.ends_with(b"\n"))
        );
        let joined: Vec<u8> = pages.iter().flat_map(|p| p.data.clone()).collect();
        assert!(joined == body.as_bytes());
        assert_eq!(pages.last().unwrap().cursor, "0001-000000.log");

        // Resuming from the second page's cursor sends the rest, once.
        let c = Cursor::parse(&pages[1].cursor);
        let (tx, mut rx) = mpsc::channel(1024);
        send_chunk(
            "memory://log-pages",
            &s,
            &key,
            "0001-000000.log",
            1,
            c.start_in("0001-000000.log").unwrap(),
            &tx,
        )
        .await
        .unwrap();
        drop(tx);
        let mut rest = Vec::new();
        while let Some(p) = rx.recv().await {
            rest.extend(p.unwrap().data);
        }
        let expected: Vec<u8> = pages[2..].iter().flat_map(|p| p.data.clone()).collect();
        assert!(rest == expected);
    }
}
