//! Token ids for `KEY.txt`, shared by everyone who reads a dataset through its manifest.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Id of padding; a sequence shorter than `max_len` is filled with it.
pub const PAD: i64 = 0;
/// Id of every token the vocabulary does not hold.
pub const UNK: i64 = 1;
const PAD_TOKEN: &str = "<pad>";
const UNK_TOKEN: &str = "<unk>";

/// A list of tokens whose position is the id. Serialised as the plain list, so the manifest
/// stays readable by anything that reads JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<String>", into = "Vec<String>")]
pub struct Vocabulary {
    tokens: Vec<String>,
    ids: HashMap<String, i64>,
}

impl From<Vec<String>> for Vocabulary {
    fn from(tokens: Vec<String>) -> Self {
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as i64);
        }
        Vocabulary { tokens, ids }
    }
}

impl From<Vocabulary> for Vec<String> {
    fn from(v: Vocabulary) -> Self {
        v.tokens
    }
}

impl Vocabulary {
    /// `<pad>`, `<unk>`, then `words` in order (duplicates and the reserved tokens skipped).
    pub fn new<S: Into<String>>(words: impl IntoIterator<Item = S>) -> Self {
        let mut tokens = vec![PAD_TOKEN.to_string(), UNK_TOKEN.to_string()];
        let mut seen: std::collections::HashSet<String> = tokens.iter().cloned().collect();
        for w in words {
            let w = w.into();
            if seen.insert(w.clone()) {
                tokens.push(w);
            }
        }
        Vocabulary::from(tokens)
    }

    /// The `max_size - 2` most frequent tokens of `texts` (ties in alphabetical order, so the
    /// result does not depend on hash order), after the two reserved ones.
    pub fn build<'a>(texts: impl IntoIterator<Item = &'a str>, max_size: usize) -> Self {
        let mut counts: HashMap<String, u64> = HashMap::new();
        for text in texts {
            for t in tokenize(text) {
                *counts.entry(t.to_string()).or_default() += 1;
            }
        }
        let mut by_count: Vec<(String, u64)> = counts.into_iter().collect();
        by_count.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        by_count.truncate(max_size.saturating_sub(2));
        Vocabulary::new(by_count.into_iter().map(|(t, _)| t))
    }

    /// Tokens, id = index.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Never true for a valid vocabulary, which holds at least the two reserved tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn id(&self, token: &str) -> Option<i64> {
        self.ids.get(token).copied()
    }

    /// Exactly `max_len` ids: the tokens of `text` (see [`tokenize`]), unknown ones as [`UNK`],
    /// truncated or padded with [`PAD`] at the end.
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<i64> {
        let mut out: Vec<i64> = tokenize(text)
            .take(max_len)
            .map(|t| self.id(&t).unwrap_or(UNK))
            .collect();
        out.resize(max_len, PAD);
        out
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.tokens.first().map(String::as_str) != Some(PAD_TOKEN)
            || self.tokens.get(1).map(String::as_str) != Some(UNK_TOKEN)
        {
            return Err(format!("vocabulary must start with {PAD_TOKEN:?}, {UNK_TOKEN:?}"));
        }
        if self.ids.len() != self.tokens.len() {
            return Err("vocabulary lists a token twice".into());
        }
        Ok(())
    }
}

/// Lowercased runs of alphanumeric characters: `"Furious, annoyed!"` gives `furious`, `annoyed`.
/// Unicode-aware, so accented words stay whole.
pub fn tokenize(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_lowercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_lowercases_splits_maps_unknowns_and_pads() {
        let v = Vocabulary::new(["i", "am", "furious"]);
        assert_eq!(v.tokens()[..2], ["<pad>", "<unk>"]);
        assert_eq!(v.encode("I am FURIOUS, really!", 6), [2, 3, 4, UNK, PAD, PAD]);
        assert_eq!(v.encode("furious-furious_i x", 8), [4, 4, 2, UNK, PAD, PAD, PAD, PAD]);
        assert_eq!(v.encode("i am i am i am", 3), [2, 3, 2]);
        assert_eq!(v.encode("", 2), [PAD, PAD]);
        assert_eq!(v.encode("  ,,, ", 0), Vec::<i64>::new());
        assert_eq!(v.encode("Été", 1), [UNK]);
        assert_eq!(tokenize("Été 42x").collect::<Vec<_>>(), ["été", "42x"]);
    }

    #[test]
    fn build_keeps_the_most_frequent_in_a_stable_order() {
        let v = Vocabulary::build(["b a c", "a b", "a", "d"], 4);
        assert_eq!(v.tokens(), ["<pad>", "<unk>", "a", "b"]);
        let v = Vocabulary::build(["z y x"], 100);
        assert_eq!(v.tokens(), ["<pad>", "<unk>", "x", "y", "z"]);
    }

    #[test]
    fn the_reserved_tokens_are_required() {
        assert!(Vocabulary::new(["x"]).validate().is_ok());
        assert!(Vocabulary::from(vec!["x".to_string()]).validate().is_err());
        let dup = Vocabulary::from(vec!["<pad>".into(), "<unk>".into(), "a".into(), "a".into()]);
        assert!(dup.validate().unwrap_err().contains("twice"));
    }
}
