//! Finds where each field of a YAML document is, so semantic errors found after parsing can
//! still name a line and column. serde's YAML deserializer reports positions only for its own
//! errors; this walks the same text with an event parser and records the position of every
//! mapping key and sequence item under the dotted path serde_path_to_error would print.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

#[derive(Default)]
pub(crate) struct Locations {
    at: HashMap<String, (usize, usize)>,
}

enum Frame {
    Map { prefix: String, key: Option<String> },
    Seq { prefix: String, index: usize },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    at: HashMap<String, (usize, usize)>,
}

impl Walker {
    /// Called before each value node: returns the path it lives at, recording item positions.
    fn value_path(&mut self, mark: Marker) -> Option<String> {
        match self.stack.last_mut()? {
            Frame::Map { key, .. } => key.take(),
            Frame::Seq { prefix, index } => {
                let p = format!("{prefix}[{index}]");
                *index += 1;
                self.at.entry(p.clone()).or_insert((mark.line(), mark.col() + 1));
                Some(p)
            }
        }
    }

    fn is_key_position(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { key: None, .. }))
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, ..) => {
                if self.is_key_position() {
                    if let Some(Frame::Map { prefix, key }) = self.stack.last_mut() {
                        let path = if prefix.is_empty() {
                            text
                        } else {
                            format!("{prefix}.{text}")
                        };
                        self.at.entry(path.clone()).or_insert((mark.line(), mark.col() + 1));
                        *key = Some(path);
                    }
                } else {
                    self.value_path(mark);
                }
            }
            Event::MappingStart(..) => {
                let prefix = if self.stack.is_empty() {
                    Some(String::new())
                } else {
                    self.value_path(mark)
                };
                self.stack.push(Frame::Map {
                    prefix: prefix.unwrap_or_default(),
                    key: None,
                });
            }
            Event::SequenceStart(..) => {
                let prefix = if self.stack.is_empty() {
                    Some(String::new())
                } else {
                    self.value_path(mark)
                };
                self.stack.push(Frame::Seq {
                    prefix: prefix.unwrap_or_default(),
                    index: 0,
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Alias(..) => {
                self.value_path(mark);
            }
            _ => {}
        }
    }
}

impl Locations {
    /// Records what it can; a syntax error simply leaves later fields unlocated (serde reports
    /// the syntax error itself, with its position).
    pub(crate) fn scan(text: &str) -> Self {
        let mut w = Walker::default();
        let mut parser = Parser::new_from_str(text);
        let _ = parser.load(&mut w, false);
        Locations { at: w.at }
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
        let l = Locations::scan("a: 1\nb:\n  c: {d: 2}\n  e: [x, y]\n");
        assert_eq!(l.get("a"), Some((1, 1)));
        assert_eq!(l.get("b.c"), Some((3, 3)));
        assert_eq!(l.get("b.c.d"), Some((3, 7)));
        assert_eq!(l.get("b.e[1]"), Some((4, 10)));
        assert_eq!(l.get("b.c.zzz"), Some((3, 3)));
        assert_eq!(l.get("nothing"), None);
    }
}
