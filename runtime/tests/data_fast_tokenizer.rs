//! The byte-level BPE fast path (runtime/src/tokenize_fast) gives exactly HF `tokenizers`'
//! ids: property tests on random Unicode / white-space / digit / punctuation strings for a
//! GPT-2-style tokenizer (the fixture) and a Llama-3-style one (the fixture's vocabulary with
//! Llama-3's `Split` pre-tokeniser and `ignore_merges`), plus the cases it must leave to HF.
mod data_common;
use data_common::model_dir;
use qplc_runtime::data::rng::SplitMix64;
use qplc_runtime::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::path::Path;

const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn fixture_json() -> Value {
    let text = std::fs::read_to_string(model_dir().join("tokenizer.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A model folder holding `json` as its tokenizer.json (with the fixture's other files).
fn tokenizer_with(dir: &Path, json: &Value) -> Tokenizer {
    for f in ["tokenizer_config.json", "config.json"] {
        let src = model_dir().join(f);
        if src.is_file() {
            std::fs::copy(src, dir.join(f)).unwrap();
        }
    }
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    Tokenizer::open(dir).unwrap()
}

fn llama3_style(dir: &Path) -> Tokenizer {
    let mut j = fixture_json();
    j["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
    ]});
    j["model"]["ignore_merges"] = json!(true);
    tokenizer_with(dir, &j)
}

/// Pieces random text is built from: each class the pre-tokenisers tell apart, the
/// contractions in both cases (and `ſ`, which `(?i:s)` matches), line breaks, Unicode
/// spaces, numbers and letters outside ASCII, combining marks, emoji.
const PIECES: &[&str] = &[
    "a", "b", "e", "s", "t", "the", " the", "And", "HELLO", " ", " ", "  ", "\t", "\n", "\r",
    "\r\n", "\n\n", "'", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'RE", "'Ll", "'ſ",
    "0", "1", "42", "2026", "12345", ".", ",", "!", "?", "--", "...", "\"", "(", ")", "#", "é",
    "naïve", "中文", "日本", "Ω", "ß", "²", "٣", "Ⅻ", "\u{a0}", "\u{3000}", "\u{85}", "\u{2028}",
    "\u{200b}", "\u{301}", "😀", "👍🏽", "\u{feff}",
];

fn random_text(rng: &mut SplitMix64) -> String {
    let n = rng.below(24) as usize;
    let mut s = String::new();
    for _ in 0..n {
        if rng.below(8) == 0 {
            // Any scalar value, weighted towards the BMP.
            let max = if rng.below(4) == 0 {
                0x11_0000
            } else {
                0x1_0000
            };
            if let Some(c) = char::from_u32(rng.below(max) as u32) {
                s.push(c);
            }
        } else {
            s.push_str(PIECES[rng.below(PIECES.len() as u64) as usize]);
        }
    }
    s
}

fn assert_same_as_hf(tok: &Tokenizer, seed: u64, cases: usize) {
    assert!(tok.has_fast_path());
    let mut rng = SplitMix64::new(seed);
    for _ in 0..cases {
        let text = random_text(&mut rng);
        let fast = tok.fast_path().unwrap().encode(&text);
        let hf = tok.encode_hf(&text).unwrap();
        if let Some(fast) = fast {
            assert_eq!(fast, hf, "text {text:?}");
        }
    }
}

#[test]
fn gpt2_style_fast_path_matches_hf_on_random_text() {
    assert_same_as_hf(&data_common::tokenizer(), 1, 20_000);
}

#[test]
fn llama3_style_fast_path_matches_hf_on_random_text() {
    let dir = tempfile::tempdir().unwrap();
    assert_same_as_hf(&llama3_style(dir.path()), 2, 20_000);
}

#[test]
fn fast_path_matches_hf_on_english_prose() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(data_common::inputs().join("txt/a.txt")).unwrap();
    for tok in [data_common::tokenizer(), llama3_style(dir.path())] {
        assert_eq!(
            tok.fast_path().unwrap().encode(&text).unwrap(),
            tok.encode_hf(&text).unwrap()
        );
    }
}

#[test]
fn text_with_an_added_token_is_left_to_hf() {
    let tok = data_common::tokenizer();
    let text = "before<s>after </s>";
    assert_eq!(tok.fast_path().unwrap().encode(text), None);
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids, tok.encode_hf(text).unwrap());
    assert!(
        ids.contains(&0) && ids.contains(&1),
        "special tokens kept: {ids:?}"
    );
}

#[test]
fn unrecognised_tokenizers_take_no_fast_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut with_normaliser = fixture_json();
    with_normaliser["normalizer"] = json!({"type": "NFC"});
    assert!(!tokenizer_with(dir.path(), &with_normaliser).has_fast_path());
    let mut other_regex = fixture_json();
    other_regex["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}|\s+"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
    ]});
    assert!(!tokenizer_with(dir.path(), &other_regex).has_fast_path());
    let mut with_dropout = fixture_json();
    with_dropout["model"]["dropout"] = json!(0.1);
    assert!(!tokenizer_with(dir.path(), &with_dropout).has_fast_path());
    let mut prefix_space = data_common::tokenizer();
    prefix_space.set_add_prefix_space().unwrap();
    assert!(!prefix_space.has_fast_path());
    assert_eq!(
        prefix_space.encode("x").unwrap(),
        prefix_space.encode_hf("x").unwrap()
    );
}

/// The whole benchmark corpus with the real Llama-3 tokenizer (`python scripts/bench_data.py`
/// fetches both): `QPLC_FAST_TOKENIZER_CORPUS=<jsonl> QPLC_FAST_TOKENIZER_MODEL=<dir> cargo test
/// --release -p qplc-runtime --test data_fast_tokenizer -- --ignored`.
#[test]
#[ignore = "needs the benchmark corpus and the Llama-3 tokenizer"]
fn fast_path_matches_hf_on_the_benchmark_corpus() {
    use rayon::prelude::*;
    let corpus = std::env::var("QPLC_FAST_TOKENIZER_CORPUS").expect("corpus path");
    let model = std::env::var("QPLC_FAST_TOKENIZER_MODEL").expect("tokenizer folder");
    let tok = Tokenizer::open(Path::new(&model)).unwrap();
    assert!(tok.has_fast_path());
    let mut docs = 0usize;
    let mut tokens = 0usize;
    qplc_runtime::data::read::read_batches(Path::new(&corpus), 8 << 20, |texts| {
        let counts: Vec<usize> = texts
            .par_iter()
            .map(|t| {
                let fast = tok.fast_path().unwrap().encode(t).unwrap();
                assert_eq!(fast, tok.encode_hf(t).unwrap(), "document {t:?}");
                fast.len()
            })
            .collect();
        docs += counts.len();
        tokens += counts.iter().sum::<usize>();
        Ok(())
    })
    .unwrap();
    eprintln!("{docs} documents, {tokens} tokens: identical");
}
