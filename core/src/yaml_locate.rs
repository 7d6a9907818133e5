//! A first pass over a YAML document, before serde sees it: it finds where each field is, so
//! semantic errors found after parsing can still name a line and column, and it refuses what
//! serde would either build at any cost or lose without a word.
//!
//! serde's YAML deserializer reports positions only for its own syntax and type errors, and
//! some of those (a duplicate field) only at the start of the document. This walks the same text
//! with an event parser, which keeps a mark on every event, and records:
//! - the position of every mapping key and sequence item, under the dotted path
//!   serde_path_to_error would print;
//! - problems, each at its own line: a key given twice in one mapping, `.nan` and infinities
//!   (a JSON value has no NaN, so serde would silently turn them into `null`), and anything
//!   beyond the size limits of [`crate::limits`] (nesting, items, string and key lengths, and
//!   the node count after aliases are expanded, which stops an alias bomb before serde expands it).
//!
//! The walk stops at the first limit it hits, so its own cost is linear in the text whatever the
//! text is; the positions it records are capped in total, and a path past the cap falls back to
//! its nearest recorded ancestor.

use crate::limits::{MAX_DEPTH, MAX_ERRORS, MAX_ITEMS, MAX_KEY_BYTES, MAX_NODES, MAX_STRING_BYTES};
use std::collections::{HashMap, HashSet};
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Recorded paths longer than this are left out (their ancestors are still found).
const MAX_RECORDED_PATH: usize = 512;
/// Total bytes of recorded paths: what the index may cost, whatever the document.
const MAX_RECORDED_BYTES: usize = 8 << 20;

#[derive(Default)]
pub(crate) struct Locations {
    at: HashMap<String, (usize, usize)>,
    /// Problems found while walking: (path, position, message), in document order.
    pub(crate) problems: Vec<(String, (usize, usize), String)>,
}

/// One open collection.
struct Frame {
    /// Its path; `None` once paths are too long to record (its children are not recorded).
    prefix: Option<String>,
    map: Option<MapFrame>,
    items: usize,
    /// Nodes below it so far, aliases expanded, itself included.
    size: u64,
    /// Height of its deepest child so far (a scalar is 0).
    height: usize,
    anchor: usize,
}

struct MapFrame {
    /// The next node is a key.
    expect_key: bool,
    /// Path of the value to come, set by its key.
    key: Option<String>,
    /// Keys seen, with where they were first given.
    seen: HashMap<String, (usize, usize)>,
}

/// Where the next node sits in its parent.
enum Slot {
    Root,
    Key,
    Value(Option<String>),
}

struct Walker<'a> {
    /// Path prefix of the document (an override's dotted key), or empty.
    base: &'a str,
    stack: Vec<Frame>,
    /// Per anchor id: the expanded size and height of the node it names.
    anchors: HashMap<usize, (u64, usize)>,
    nodes: u64,
    documents: usize,
    at: HashMap<String, (usize, usize)>,
    recorded_bytes: usize,
    problems: Vec<(String, (usize, usize), String)>,
    /// A limit was hit: walking further could only cost more.
    stopped: bool,
}

fn pos(mark: Marker) -> (usize, usize) {
    (mark.line(), mark.col() + 1)
}

impl Walker<'_> {
    fn problem(&mut self, path: &str, mark: Marker, message: String) {
        if self.problems.len() < MAX_ERRORS {
            self.problems.push((path.to_string(), pos(mark), message));
        }
    }

    fn stop(&mut self, path: &str, mark: Marker, message: String) {
        self.problem(path, mark, message);
        self.stopped = true;
    }

    fn record(&mut self, path: &str, mark: Marker) {
        if path.len() <= MAX_RECORDED_PATH
            && self.recorded_bytes + path.len() <= MAX_RECORDED_BYTES
            && !self.at.contains_key(path)
        {
            self.recorded_bytes += path.len();
            self.at.insert(path.to_string(), pos(mark));
        }
    }

    /// The path of the collection on top of the stack, for messages.
    fn here(&self) -> String {
        match self.stack.last() {
            Some(Frame { prefix: Some(p), .. }) => p.clone(),
            Some(_) => format!("{}...", self.base),
            None => self.base.to_string(),
        }
    }

    /// Called when a node starts: says what it is to its parent, counts it, and records the
    /// position of an item.
    fn begin(&mut self, mark: Marker) -> Slot {
        let Some(top) = self.stack.last_mut() else {
            return Slot::Root;
        };
        if let Some(m) = &mut top.map
            && m.expect_key
        {
            top.items += 1;
            if top.items > MAX_ITEMS {
                let msg = format!("has more than {MAX_ITEMS} entries; the limit is {MAX_ITEMS}");
                self.stop(&self.here(), mark, msg);
            }
            return Slot::Key;
        }
        if let Some(m) = &mut top.map {
            return Slot::Value(m.key.take());
        }
        let index = top.items;
        top.items += 1;
        if top.items > MAX_ITEMS {
            let msg = format!("has more than {MAX_ITEMS} items; the limit is {MAX_ITEMS}");
            self.stop(&self.here(), mark, msg);
            return Slot::Value(None);
        }
        let path = top.prefix.as_ref().map(|p| format!("{p}[{index}]"));
        if let Some(p) = &path {
            self.record(p, mark);
        }
        Slot::Value(path)
    }

    /// Called when a node has ended, with its expanded size and height.
    fn end(&mut self, size: u64, height: usize, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, (size, height));
        }
        if let Some(top) = self.stack.last_mut() {
            top.size = top.size.saturating_add(size);
            top.height = top.height.max(height);
            if let Some(m) = &mut top.map {
                m.expect_key = !m.expect_key;
            }
        }
    }

    /// Counts `n` more nodes against the limit; `path` names the node for the message.
    fn count(&mut self, n: u64, path: Option<&str>, mark: Marker) {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            let msg = format!(
                "the spec has more than {MAX_NODES} values once its aliases are expanded; the limit is {MAX_NODES}"
            );
            let path = path.map_or_else(|| self.here(), str::to_string);
            self.stop(&path, mark, msg);
        }
    }

    fn key(&mut self, text: &str, mark: Marker) {
        let here = self.here();
        let path_of_key = if here.is_empty() {
            text.to_string()
        } else {
            format!("{here}.{text}")
        };
        if text.len() > MAX_KEY_BYTES {
            let msg = format!("a key of {} bytes; keys are at most {MAX_KEY_BYTES} bytes", text.len());
            self.stop(&here, mark, msg);
            return;
        }
        let top = self.stack.last_mut().expect("a key is inside a mapping");
        let recorded = top.prefix.is_some().then(|| path_of_key.clone());
        let m = top.map.as_mut().expect("a key is inside a mapping");
        m.key = recorded.clone();
        if let Some(first) = m.seen.get(text).copied() {
            let msg = format!(
                "`{text}` is given twice in the same mapping (first at line {}, column {})",
                first.0, first.1
            );
            self.problem(&path_of_key, mark, msg);
        } else if m.seen.len() < MAX_ITEMS {
            m.seen.insert(text.to_string(), pos(mark));
        }
        if let Some(p) = recorded {
            self.record(&p, mark);
        }
    }

    fn open(&mut self, mark: Marker, anchor: usize, is_map: bool) {
        let slot = self.begin(mark);
        if self.stopped {
            return;
        }
        let prefix = match slot {
            Slot::Root => Some(self.base.to_string()),
            // A collection as a key: serde refuses it for every field of a spec; nothing below
            // it has a path.
            Slot::Key => None,
            Slot::Value(p) => p,
        };
        let path = prefix.clone().unwrap_or_else(|| self.here());
        if self.stack.len() + 1 > MAX_DEPTH {
            let msg = format!("is nested more than {MAX_DEPTH} levels deep; the limit is {MAX_DEPTH}");
            self.stop(&path, mark, msg);
            return;
        }
        self.count(1, Some(&path), mark);
        self.stack.push(Frame {
            prefix,
            map: is_map.then(|| MapFrame {
                expect_key: true,
                key: None,
                seen: HashMap::new(),
            }),
            items: 0,
            size: 1,
            height: 0,
            anchor,
        });
    }

    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => {
                self.documents += 1;
                // serde refuses a second document itself.
                if self.documents > 1 {
                    self.stopped = true;
                }
            }
            Event::Scalar(text, style, anchor, _tag) => {
                let slot = self.begin(mark);
                if self.stopped {
                    return;
                }
                match slot {
                    Slot::Key => self.key(&text, mark),
                    Slot::Root | Slot::Value(_) => {
                        let path = || match &slot {
                            Slot::Value(Some(p)) => p.clone(),
                            Slot::Root => self.base.to_string(),
                            _ => self.here(),
                        };
                        if text.len() > MAX_STRING_BYTES {
                            let msg = format!(
                                "a string of {} bytes; strings are at most {MAX_STRING_BYTES} bytes",
                                text.len()
                            );
                            self.stop(&path(), mark, msg);
                            return;
                        }
                        if style == TScalarStyle::Plain
                            && let Some(what) = non_finite(&text)
                        {
                            let msg = format!(
                                "`{text}` is {what}; a spec takes finite numbers only (quote it to mean a string)"
                            );
                            self.problem(&path(), mark, msg);
                        }
                    }
                }
                self.count(1, None, mark);
                self.end(1, 0, anchor);
            }
            Event::Alias(id) => {
                let slot = self.begin(mark);
                if self.stopped {
                    return;
                }
                let path = match slot {
                    Slot::Value(Some(p)) => p,
                    _ => self.here(),
                };
                let (size, height) = self.anchors.get(&id).copied().unwrap_or((1, 0));
                if self.stack.len() + height > MAX_DEPTH {
                    let msg = format!(
                        "this alias nests its value more than {MAX_DEPTH} levels deep; the limit is {MAX_DEPTH}"
                    );
                    self.stop(&path, mark, msg);
                    return;
                }
                self.count(size, Some(&path), mark);
                self.end(size, height, 0);
            }
            Event::SequenceStart(anchor, _) => self.open(mark, anchor, false),
            Event::MappingStart(anchor, _) => self.open(mark, anchor, true),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(f) = self.stack.pop() {
                    self.end(f.size, f.height + 1, f.anchor);
                }
            }
            _ => {}
        }
    }
}

/// What a plain scalar means when serde_yaml_ng would read it as a float that is not finite:
/// the YAML spellings of NaN and infinity, and a number too large for an f64 (which serde would
/// silently keep as a string).
fn non_finite(text: &str) -> Option<&'static str> {
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    if matches!(unsigned, ".nan" | ".NaN" | ".NAN") {
        return Some("NaN");
    }
    if matches!(unsigned, ".inf" | ".Inf" | ".INF") {
        return Some("an infinity");
    }
    // `inf` and `nan` spelled as words are strings to serde_yaml_ng; only digits count here.
    let numeric =
        unsigned.starts_with(|c: char| c.is_ascii_digit() || c == '.') && unsigned.bytes().any(|b| b.is_ascii_digit());
    if numeric && text.parse::<f64>().is_ok_and(f64::is_infinite) {
        return Some("too large for a number (beyond ±1.8e308)");
    }
    None
}

impl Locations {
    /// Walks `text`; `base` prefixes every path (an override's key, for a `--set` value). A syntax
    /// error simply ends the walk: serde reports it, with its position.
    pub(crate) fn scan(text: &str, base: &str) -> Self {
        let mut w = Walker {
            base,
            stack: Vec::new(),
            anchors: HashMap::new(),
            nodes: 0,
            documents: 0,
            at: HashMap::new(),
            recorded_bytes: 0,
            problems: Vec::new(),
            stopped: false,
        };
        let mut parser = Parser::new_from_str(text);
        while !w.stopped {
            match parser.next_token() {
                Ok((Event::StreamEnd, _)) | Err(_) => break,
                Ok((ev, mark)) => w.on_event(ev, mark),
            }
        }
        // Keep one problem per path and position (a key repeated many times says so once each).
        let mut seen = HashSet::new();
        w.problems.retain(|p| seen.insert((p.0.clone(), p.1)));
        Locations {
            at: w.at,
            problems: w.problems,
        }
    }

    /// Position of `path`, or of its nearest located ancestor.
    pub(crate) fn get(&self, path: &str) -> Option<(usize, usize)> {
        let mut p = path;
        loop {
            if let Some(l) = self.at.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_keys_and_items() {
        let l = Locations::scan("a: 1\nb:\n  c: {d: 2}\n  e: [x, y]\n", "");
        assert_eq!(l.get("a"), Some((1, 1)));
        assert_eq!(l.get("b.c"), Some((3, 3)));
        assert_eq!(l.get("b.c.d"), Some((3, 7)));
        assert_eq!(l.get("b.e[1]"), Some((4, 10)));
        assert_eq!(l.get("b.c.zzz"), Some((3, 3)));
        assert_eq!(l.get("nothing"), None);
        assert!(l.problems.is_empty());
    }

    #[test]
    fn a_duplicate_key_is_found_where_it_is_repeated() {
        let l = Locations::scan("a: 1\nb:\n  c: 2\n  d: 3\n  c: 4\n", "");
        assert_eq!(l.problems.len(), 1, "{:?}", l.problems);
        let (path, at, msg) = &l.problems[0];
        assert_eq!((path.as_str(), *at), ("b.c", (5, 3)));
        assert!(msg.contains("first at line 3, column 3"), "{msg}");
        // The same key in two mappings is fine.
        assert!(Locations::scan("a: {x: 1}\nb: {x: 1}\n", "").problems.is_empty());
    }

    #[test]
    fn non_finite_numbers_are_found_but_strings_are_not() {
        let l = Locations::scan("a: .nan\nb: [1, -.Inf]\nc: '.nan'\nd: nan\ne: 1e999\nf: inf\n", "");
        let got: Vec<(&str, (usize, usize))> = l.problems.iter().map(|p| (p.0.as_str(), p.1)).collect();
        assert_eq!(got, vec![("a", (1, 4)), ("b[1]", (2, 8)), ("e", (5, 4))]);
        let l = Locations::scan(".inf", "parameters.lr.max");
        assert_eq!(l.problems[0].0, "parameters.lr.max");
    }

    #[test]
    fn limits_stop_the_walk() {
        let deep = format!("a: {}1{}\n", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        let l = Locations::scan(&deep, "");
        assert!(l.problems[0].2.contains("nested more than"), "{:?}", l.problems);
        let long = format!("a: {}\n", "x".repeat(MAX_STRING_BYTES + 1));
        assert!(Locations::scan(&long, "").problems[0].2.contains("strings are at most"));
        let many = format!("a: [{}]\n", vec!["1"; MAX_ITEMS + 1].join(","));
        let l = Locations::scan(&many, "");
        assert_eq!(l.problems[0].0, "a");
        assert!(l.problems[0].2.contains("more than 10000 items"), "{:?}", l.problems);
    }

    #[test]
    fn an_alias_bomb_is_refused_before_anything_expands_it() {
        // Nine levels of ten aliases each: 10^9 values once expanded, in a few hundred bytes.
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            text.push_str(&format!("a{i}: &a{i} [{}]\n", [prev.as_str(); 10].join(", ")));
        }
        let l = Locations::scan(&text, "");
        assert_eq!(l.problems.len(), 1, "{:?}", l.problems);
        assert!(l.problems[0].2.contains("aliases are expanded"), "{:?}", l.problems);
        assert_eq!(l.problems[0].1.0, 6, "found at the first alias past the limit");
    }
}
