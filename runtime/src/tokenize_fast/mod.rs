//! A fast path for byte-level BPE tokenizers (GPT-2 and Llama-3 style), producing exactly
//! the ids of HF `tokenizers` several times faster: the pre-tokeniser regex is hand-written
//! ([`split`]), merges run over raw bytes with a hash of (left, right) ids ([`bpe`]), and no
//! offsets or `Encoding`s are built.
//!
//! Only `tokenizer.json` files whose every tokenisation-relevant part is recognised take the
//! fast path ([`FastBpe::recognise`]): no normaliser; the pre-tokeniser is GPT-2's `ByteLevel`
//! with its regex or Llama-3's `Split` + `ByteLevel`, without `add_prefix_space`; a plain BPE
//! model (no dropout, unknown token, subword prefix/suffix or byte fallback); no truncation or
//! padding; a post-processor that adds nothing when special tokens are not added. Text holding
//! any added token is left to HF (`encode` returns `None`). [`crate::tokenizer::Tokenizer`]
//! also compares both paths on a sample when it loads and drops the fast one on any mismatch.
pub mod bpe;
pub mod classes;
pub mod split;

use aho_corasick::AhoCorasick;
use serde::Deserialize;
use serde_json::{json, Value};
use split::{Pattern, Splitter, GPT2_PATTERN, LLAMA3_PATTERN};
use std::collections::HashMap;

pub struct FastBpe {
    splitter: Splitter,
    bpe: bpe::Bpe,
    /// Finds added tokens (HF splits them off before pre-tokenising).
    added: Option<AhoCorasick>,
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    added_tokens: Vec<Added>,
    #[serde(default)]
    normalizer: Value,
    #[serde(default)]
    pre_tokenizer: Value,
    #[serde(default)]
    post_processor: Value,
    #[serde(default)]
    truncation: Value,
    #[serde(default)]
    padding: Value,
    model: Model,
}

#[derive(Deserialize)]
struct Added {
    content: String,
}

#[derive(Deserialize)]
struct Model {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    dropout: Option<f64>,
    #[serde(default)]
    unk_token: Option<String>,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
    #[serde(default)]
    byte_fallback: bool,
    #[serde(default)]
    ignore_merges: bool,
    #[serde(default)]
    vocab: HashMap<String, u32>,
    #[serde(default)]
    merges: Vec<MergeEntry>,
}

/// HF writes merges as `"a b"` (older files) or `["a", "b"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum MergeEntry {
    Line(String),
    Pair(String, String),
}

impl FastBpe {
    /// The fast tokenizer for the `tokenizer.json` text `json`, or why it does not apply.
    pub fn recognise(json: &str) -> Result<FastBpe, String> {
        let f: File = serde_json::from_str(json).map_err(|e| format!("unreadable: {e}"))?;
        if !f.normalizer.is_null() {
            return Err("it has a normaliser".into());
        }
        if !f.truncation.is_null() || !f.padding.is_null() {
            return Err("it truncates or pads".into());
        }
        let pattern = pre_tokenizer_pattern(&f.pre_tokenizer)
            .ok_or("its pre-tokeniser is not GPT-2's or Llama-3's byte-level one")?;
        if !post_processor_adds_nothing(&f.post_processor) {
            return Err("its post-processor is not recognised".into());
        }
        let m = &f.model;
        if m.kind.as_deref().is_some_and(|k| k != "BPE")
            || m.dropout.is_some_and(|d| d > 0.0)
            || m.unk_token.is_some()
            || m.continuing_subword_prefix.is_some()
            || m.end_of_word_suffix.is_some()
            || m.byte_fallback
        {
            return Err("its model is not a plain byte-level BPE".into());
        }
        let merges: Vec<(String, String)> = m
            .merges
            .iter()
            .map(|e| match e {
                MergeEntry::Pair(a, b) => Some((a.clone(), b.clone())),
                MergeEntry::Line(l) => {
                    let (a, b) = l.split_once(' ')?;
                    (!b.contains(' ')).then(|| (a.to_string(), b.to_string()))
                }
            })
            .collect::<Option<_>>()
            .ok_or("a merge is not two tokens")?;
        let bpe = bpe::Bpe::new(&m.vocab, &merges, m.ignore_merges)
            .ok_or("its vocabulary is not a complete byte-level one")?;
        let contents: Vec<&str> = f
            .added_tokens
            .iter()
            .map(|a| a.content.as_str())
            .filter(|c| !c.is_empty())
            .collect();
        let added = if contents.is_empty() {
            None
        } else {
            Some(AhoCorasick::new(&contents).map_err(|e| e.to_string())?)
        };
        Ok(FastBpe {
            splitter: Splitter::new(pattern),
            bpe,
            added,
        })
    }

    /// The ids of `text`, or `None` when it holds an added token (HF must split those off).
    pub fn encode(&self, text: &str) -> Option<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, &mut out).then_some(out)
    }

    /// Appends the ids of `text` to `out`; false (and `out` untouched) when it holds an
    /// added token.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> bool {
        if self.added.as_ref().is_some_and(|a| a.is_match(text)) {
            return false;
        }
        self.splitter
            .split(text, |piece| self.bpe.encode_piece(piece.as_bytes(), out));
        true
    }
}

fn pre_tokenizer_pattern(p: &Value) -> Option<Pattern> {
    let byte_level = |v: &Value, use_regex: bool| {
        v.get("type") == Some(&json!("ByteLevel"))
            && v.get("add_prefix_space") == Some(&json!(false))
            && v.get("use_regex").unwrap_or(&json!(true)) == &json!(use_regex)
    };
    if byte_level(p, true) {
        return Some(Pattern::Gpt2);
    }
    let list = p
        .get("pretokenizers")
        .filter(|_| p.get("type") == Some(&json!("Sequence")))?
        .as_array()?;
    match list.as_slice() {
        [one] if byte_level(one, true) => Some(Pattern::Gpt2),
        [split, bl]
            if split.get("type") == Some(&json!("Split"))
                && split.get("behavior") == Some(&json!("Isolated"))
                && split.get("invert") == Some(&json!(false))
                && byte_level(bl, false) =>
        {
            match split.get("pattern")?.get("Regex")?.as_str()? {
                LLAMA3_PATTERN => Some(Pattern::Llama3),
                GPT2_PATTERN => Some(Pattern::Gpt2),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Post-processors that add no tokens when `add_special_tokens` is false (ours never is
/// true on this path): none, `ByteLevel` (offsets only), `TemplateProcessing`, or a
/// `Sequence` of these.
fn post_processor_adds_nothing(p: &Value) -> bool {
    match p.get("type").and_then(Value::as_str) {
        None => p.is_null(),
        Some("ByteLevel" | "TemplateProcessing") => true,
        Some("Sequence") => p
            .get("processors")
            .and_then(Value::as_array)
            .is_some_and(|l| l.iter().all(post_processor_adds_nothing)),
        Some(_) => false,
    }
}
