//! Tokenisation of documents (spec §4.2, §4.3) and the token-level settings of §3.6 resolved
//! against a tokenizer.
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use qplc_compiler::config::{LoadedConfig, MaskTokens, TokenSpec};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The §3.6 token options as concrete ids and strings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenSettings {
    /// Placed at the start of every sequence (class 0).
    pub sequence_prefix: Vec<u32>,
    /// String forms are concatenated to the text before tokenising ...
    pub document_prefix_text: String,
    pub document_suffix_text: String,
    /// ... id forms are added to the ids after.
    pub document_prefix_ids: Vec<u32>,
    pub document_suffix_ids: Vec<u32>,
    /// Ids whose positions get label −100 and class 0 (sorted, no duplicates).
    pub mask: Vec<u32>,
    /// A leading BOS of a document is stripped when packing (§4.6 step 1).
    pub bos_id: Option<u32>,
}

impl TokenSettings {
    /// Resolves the config's `sequence_prefix`, `document_prefix`, `document_suffix` and
    /// `mask_tokens` with their defaults (spec §3.6).
    pub fn resolve(cfg: &LoadedConfig, tok: &Tokenizer) -> Result<TokenSettings> {
        let c = &cfg.config;
        let vocab = tok.vocab_size();
        let ids = |key: &str, v: &[i64]| -> Result<Vec<u32>> {
            v.iter()
                .map(|&id| {
                    if id < 0 || id as usize >= vocab {
                        Err(cfg
                            .error(
                                key,
                                format!("token id {id} is outside the vocabulary (0..{vocab})"),
                            )
                            .into())
                    } else {
                        Ok(id as u32)
                    }
                })
                .collect()
        };
        let sequence_prefix = match &c.sequence_prefix {
            None => tok.bos_id.into_iter().collect(),
            Some(TokenSpec::Text(s)) if s.is_empty() => vec![],
            Some(TokenSpec::Text(s)) => tok.encode(s)?,
            Some(TokenSpec::Id(i)) => ids("sequence_prefix", &[*i])?,
            Some(TokenSpec::Ids(v)) => ids("sequence_prefix", v)?,
        };
        let split = |key: &str, spec: &Option<TokenSpec>, default: Option<u32>| {
            Ok::<_, anyhow::Error>(match spec {
                None => (String::new(), default.into_iter().collect()),
                Some(TokenSpec::Text(s)) => (s.clone(), vec![]),
                Some(TokenSpec::Id(i)) => (String::new(), ids(key, &[*i])?),
                Some(TokenSpec::Ids(v)) => (String::new(), ids(key, v)?),
            })
        };
        let (document_prefix_text, document_prefix_ids) =
            split("document_prefix", &c.document_prefix, None)?;
        // The default suffix is always appended, even after a text ending in EOS (§14.7).
        let (document_suffix_text, document_suffix_ids) =
            split("document_suffix", &c.document_suffix, tok.eos_id)?;
        let mut mask = match &c.mask_tokens {
            None | Some(MaskTokens::All(false)) => vec![],
            // The reference tests `if mask_tokens:`, so the id 0 means "no masking" (§14.9).
            Some(MaskTokens::Id(0)) => vec![],
            // HF's `all_special_ids` (BOS, EOS, UNK, PAD, … and the additional ones), as the
            // reference uses, not every added token flagged special.
            Some(MaskTokens::All(true)) => tok.all_special_ids().to_vec(),
            Some(MaskTokens::Id(i)) => ids("mask_tokens", &[*i])?,
            Some(MaskTokens::Ids(v)) => ids("mask_tokens", v)?,
        };
        mask.sort_unstable();
        mask.dedup();
        if sequence_prefix.len() >= cfg.sequence_len() {
            bail!(cfg.error(
                "sequence_prefix",
                format!(
                    "is {} tokens long, which leaves no room in a sequence of {} tokens",
                    sequence_prefix.len(),
                    cfg.sequence_len()
                )
            ));
        }
        Ok(TokenSettings {
            sequence_prefix,
            document_prefix_text,
            document_suffix_text,
            document_prefix_ids,
            document_suffix_ids,
            mask,
            bos_id: tok.bos_id,
        })
    }

    /// The ids of one document (spec §4.2 steps 1–3).
    pub fn encode_document(&self, tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        let body = if self.document_prefix_text.is_empty() && self.document_suffix_text.is_empty() {
            tok.encode(text)?
        } else {
            let composed = [
                self.document_prefix_text.as_str(),
                text,
                self.document_suffix_text.as_str(),
            ]
            .concat();
            tok.encode(&composed)?
        };
        if self.document_prefix_ids.is_empty() && self.document_suffix_ids.is_empty() {
            return Ok(body);
        }
        let mut ids = Vec::with_capacity(
            self.document_prefix_ids.len() + body.len() + self.document_suffix_ids.len(),
        );
        ids.extend_from_slice(&self.document_prefix_ids);
        ids.extend_from_slice(&body);
        ids.extend_from_slice(&self.document_suffix_ids);
        Ok(ids)
    }
}

/// Tokenised documents stored flat: document `i` is `tokens[offsets[i]..offsets[i+1]]`.
/// One allocation for all tokens instead of one per document.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Documents {
    pub tokens: Vec<u32>,
    pub offsets: Vec<usize>,
    pub classes: Vec<i8>,
}

impl Documents {
    pub fn new() -> Self {
        Documents {
            tokens: vec![],
            offsets: vec![0],
            classes: vec![],
        }
    }

    pub fn len(&self) -> usize {
        self.classes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    pub fn doc(&self, i: usize) -> &[u32] {
        &self.tokens[self.offsets[i]..self.offsets[i + 1]]
    }

    pub fn push(&mut self, ids: &[u32], class: i8) {
        self.tokens.extend_from_slice(ids);
        self.offsets.push(self.tokens.len());
        self.classes.push(class);
    }

    /// Appends documents, dropping those with no tokens (§4.2 step 4) and assigning the
    /// dataset's class; `control_class = 0` uses the index among the kept documents (§4.3),
    /// continuing from the documents already held.
    pub fn extend_tokenized(&mut self, docs: Vec<Vec<u32>>, control_class: i64) {
        for ids in docs {
            if ids.is_empty() {
                continue;
            }
            let class = document_class(control_class, self.len());
            self.push(&ids, class);
        }
    }
}

/// Tokenises texts in parallel, in order (spec §4.2).
pub fn tokenize_texts(
    tok: &Tokenizer,
    settings: &TokenSettings,
    texts: &[String],
) -> Result<Vec<Vec<u32>>> {
    texts
        .par_iter()
        .map(|t| settings.encode_document(tok, t))
        .collect()
}

/// A document's class: the dataset's `control_class`, or for class 0 the reference's
/// one-step LCG on the document index (spec §4.3, reproduced bit for bit, check 16).
pub fn document_class(control_class: i64, index: usize) -> i8 {
    if control_class == 0 {
        class0(index)
    } else {
        control_class as i8
    }
}

/// `+1` if `(i·1664525 + 1013904223) mod 2^32 ≥ 2^31`, else `−1` (spec §4.3). Note the long
/// constant runs (0–681 → −1, 682–1971 → +1, …): a faithful copy of reference defect §14.4.
pub fn class0(index: usize) -> i8 {
    let x = (index as u64)
        .wrapping_mul(1_664_525)
        .wrapping_add(1_013_904_223)
        & 0xFFFF_FFFF;
    if x >= 1 << 31 {
        1
    } else {
        -1
    }
}
