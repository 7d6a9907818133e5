//! Reading a trial's stdout and stderr as lines.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

/// A program that prints megabytes without a newline must not make the worker hold them all.
pub(super) const MAX_LINE_BYTES: usize = 64 * 1024;

const TRUNCATED: &str = " [line truncated by chorus]";

/// Sends every line of `r` (lossy UTF-8, without its line ending, capped) until EOF or until
/// nobody listens.
pub(super) async fn forward_lines(r: impl AsyncRead + Unpin, tx: mpsc::Sender<String>) {
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut buf = Vec::with_capacity(1024);
    loop {
        match read_capped_line(&mut r, &mut buf, MAX_LINE_BYTES).await {
            Ok(Some(truncated)) => {
                let mut line = String::from_utf8_lossy(&buf).into_owned();
                if truncated {
                    line.push_str(TRUNCATED);
                }
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the trial's output");
                return;
            }
        }
    }
}

/// Reads one line into `line`, keeping at most `cap` bytes of it and discarding the rest up to
/// the newline. Returns `None` at EOF, else whether the line was cut.
async fn read_capped_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<Option<bool>> {
    line.clear();
    let mut truncated = false;
    let mut read_any = false;
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            if !read_any {
                return Ok(None);
            }
            break;
        }
        read_any = true;
        let (chunk, consumed, end) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], i + 1, true),
            None => (available, available.len(), false),
        };
        let room = cap.saturating_sub(line.len());
        if chunk.len() > room {
            truncated = true;
        }
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        r.consume(consumed);
        if end {
            break;
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(input: &[u8]) -> Vec<String> {
        let (tx, mut rx) = mpsc::channel(16);
        let input = input.to_vec();
        let reader = tokio::spawn(async move { forward_lines(&input[..], tx).await });
        let mut out = Vec::new();
        while let Some(l) = rx.recv().await {
            out.push(l);
        }
        reader.await.unwrap();
        out
    }

    #[tokio::test]
    async fn splits_lines_and_keeps_a_last_line_without_newline() {
        assert_eq!(lines_of(b"a\r\nb\n\nc").await, vec!["a", "b", "", "c"]);
        assert!(lines_of(b"").await.is_empty());
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_the_next_line_survives() {
        let mut input = vec![b'x'; MAX_LINE_BYTES * 3 + 17];
        input.extend_from_slice(b"\nnext\n");
        let lines = lines_of(&input).await;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES + TRUNCATED.len());
        assert!(lines[0].ends_with(TRUNCATED));
        assert_eq!(lines[1], "next");
    }

    #[tokio::test]
    async fn invalid_utf8_is_replaced_not_fatal() {
        assert_eq!(
            lines_of(b"ok \xff\xfe end\nmore\n").await,
            vec!["ok \u{fffd}\u{fffd} end", "more"]
        );
    }
}
