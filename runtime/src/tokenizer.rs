//! The model folder's `tokenizer.json` (HF `tokenizers`), with BOS/EOS resolved as HF does.
use crate::tokenize_fast::FastBpe;
use anyhow::{anyhow, Context, Result};
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The byte-level BPE fast path, when `tokenizer.json` is one it reproduces exactly
    /// (runtime/src/tokenize_fast).
    fast: Option<FastBpe>,
    /// HF's `all_special_ids`: the named special tokens only (see `all_special_ids`).
    named_special_ids: Vec<u32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// tokenizer_config.json's `chat_template` (or `chat_template.jinja`), if any.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl Tokenizer {
    pub fn open(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            anyhow::bail!(
                "`{}` has no tokenizer.json (qplc reads HF fast-tokenizer files)",
                dir.display()
            );
        }
        let json = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read `{}`", path.display()))?;
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| anyhow!("cannot load `{}`: {e}", path.display()))?;
        let fast = fast_path(&json, &inner);
        drop(json);
        let tk_config = read_json(&dir.join("tokenizer_config.json"))?;
        let model_config = read_json(&dir.join("config.json"))?;
        let token_str = |key: &str| -> Option<String> {
            let v = tk_config.as_ref()?.get(key)?;
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.get("content")?.as_str().map(str::to_string))
        };
        let id_from_config = |key: &str| -> Option<u32> {
            let v = model_config.as_ref()?.get(key)?;
            // Some configs list several EOS ids; the first is the canonical one.
            v.as_u64()
                .or_else(|| v.as_array()?.first()?.as_u64())
                .map(|x| x as u32)
        };
        let bos_token = token_str("bos_token");
        let eos_token = token_str("eos_token");
        let bos_id = bos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| id_from_config("bos_token_id"));
        let eos_id = eos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| id_from_config("eos_token_id"));
        // HF's `all_special_tokens`: the special-token attributes plus the additional/extra
        // lists of tokenizer_config.json — not every added token flagged special (Llama-3
        // flags 256 reserved tokens, yet `all_special_ids` is [BOS, EOS]).
        let mut named_special_ids: Vec<u32> = [
            "bos_token",
            "eos_token",
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
        ]
        .iter()
        .filter_map(|k| token_str(k))
        .filter_map(|t| inner.token_to_id(&t))
        .chain(bos_id)
        .chain(eos_id)
        .collect();
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            let entries: Vec<serde_json::Value> = match tk_config.as_ref().and_then(|c| c.get(key))
            {
                Some(serde_json::Value::Array(list)) => list.clone(),
                Some(serde_json::Value::Object(map)) => map.values().cloned().collect(),
                _ => vec![],
            };
            named_special_ids.extend(entries.iter().filter_map(|v| {
                let t = v.as_str().or_else(|| v.get("content")?.as_str())?;
                inner.token_to_id(t)
            }));
        }
        named_special_ids.sort_unstable();
        named_special_ids.dedup();
        let chat_template = match tk_config
            .as_ref()
            .and_then(|c| c.get("chat_template"))
            .cloned()
        {
            Some(serde_json::Value::String(s)) => Some(s),
            // A list of named templates: HF uses the one named "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        Ok(Tokenizer {
            inner,
            fast,
            named_special_ids,
            bos_id,
            eos_id,
            chat_template,
            bos_token,
            eos_token,
        })
    }

    /// Token ids of `text`, adding no special tokens (special-token text inside `text`,
    /// like `<|im_start|>`, still maps to its id).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if let Some(ids) = self.fast.as_ref().and_then(|f| f.encode(text)) {
            return Ok(ids);
        }
        self.encode_hf(text)
    }

    /// [`Tokenizer::encode`] by HF `tokenizers` alone, never the fast path (to test it).
    pub fn encode_hf(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenising failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// HF's `tokenizer.all_special_ids` (sorted): what the reference masks for
    /// `mask_tokens = true` (spec §3.6).
    pub fn all_special_ids(&self) -> &[u32] {
        &self.named_special_ids
    }

    /// The whole tokenizer (vocabulary, merges, normaliser, pre-tokeniser…) serialised, so a
    /// data cache key changes whenever tokenisation could (runtime/src/data/pipeline.rs).
    pub fn fingerprint(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| anyhow!("cannot serialise the tokenizer: {e}"))
    }

    /// `--add-prefix-space` (spec §2): a space is put before the text, as HF's
    /// `add_prefix_space=True` does — ByteLevel pre-tokenisers get `add_prefix_space`, Metaspace
    /// ones `prepend_scheme = "always"` (inside a Sequence too).
    pub fn set_add_prefix_space(&mut self) -> Result<()> {
        fn visit(v: &mut serde_json::Value) {
            match v.get("type").and_then(|t| t.as_str()) {
                Some("ByteLevel") => v["add_prefix_space"] = true.into(),
                Some("Metaspace") => v["prepend_scheme"] = "always".into(),
                Some("Sequence") => {
                    if let Some(list) = v.get_mut("pretokenizers").and_then(|l| l.as_array_mut()) {
                        list.iter_mut().for_each(visit);
                    }
                }
                _ => {}
            }
        }
        // The fast path knows no `add_prefix_space`: HF alone tokenises from here on.
        self.fast = None;
        let mut json: serde_json::Value = serde_json::from_str(&self.fingerprint()?)?;
        if let Some(pre) = json.get_mut("pre_tokenizer") {
            visit(pre);
        }
        self.inner = json
            .to_string()
            .parse()
            .map_err(|e| anyhow!("cannot rebuild the tokenizer with add_prefix_space: {e}"))?;
        Ok(())
    }

    /// Ids of every special added token (for `mask_tokens = true`).
    pub fn special_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// Text that exercises every branch of the pre-tokeniser regexes and the merge loop.
const SELF_CHECK: &[&str] = &[
    "Hello world's end: it'S 'RE 'Ve 'll 'd 'm 'ſ 'x ''s",
    "  leading spaces, trailing  \t\n\r\n  ",
    "digits 1 12 123 1234 12345 ²³ ٣٤٥ Ⅻ x1y22z333",
    "punctuation!!! ...\n\n--- \"quotes\" (parens) [brackets] {braces} \r\n",
    "unicode: café naïve 中文字符 日本語 한국어 Ελληνικά русский 😀👍🏽 e\u{301}",
    "\u{3000}ideographic space\u{a0}nbsp\u{85}nel\u{2028}ls x\u{200b}zwsp",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ==================== \n\n\n\n",
];

/// The fast path for `json`, if it recognises the file and agrees with HF on
/// [`SELF_CHECK`].
fn fast_path(json: &str, inner: &tokenizers::Tokenizer) -> Option<FastBpe> {
    let fast = match FastBpe::recognise(json) {
        Ok(f) => f,
        Err(why) => {
            tracing::debug!("tokenizer fast path off: {why}");
            return None;
        }
    };
    for text in SELF_CHECK {
        let hf = inner.encode(*text, false).ok()?;
        if fast.encode(text).as_deref() != Some(hf.get_ids()) {
            tracing::warn!("tokenizer fast path off: it disagrees with HF on {text:?}");
            return None;
        }
    }
    Some(fast)
}

impl Tokenizer {
    /// True when [`Tokenizer::encode`] takes the fast path for text without added tokens.
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// The fast path itself, for callers that batch their own buffers.
    pub fn fast_path(&self) -> Option<&FastBpe> {
        self.fast.as_ref()
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!("`{}` is not valid JSON", path.display())
    })?))
}
