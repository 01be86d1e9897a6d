//! The fixture tokenizer (a real byte-level BPE, tests/fixtures) through our wrapper.
use qplc_runtime::tokenizer::Tokenizer;
use std::path::Path;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-gqa")
}

#[test]
fn bos_and_eos_come_from_tokenizer_config() {
    let t = Tokenizer::open(&fixture()).unwrap();
    assert_eq!(t.bos_id, Some(0));
    assert_eq!(t.eos_id, Some(1));
    assert!(t.special_ids().contains(&0) && t.special_ids().contains(&1));
}

#[test]
fn encode_adds_no_special_tokens_and_round_trips() {
    let t = Tokenizer::open(&fixture()).unwrap();
    let text = "To be, or not to be";
    let ids = t.encode(text).unwrap();
    assert!(!ids.is_empty() && ids[0] != 0);
    assert_eq!(t.decode(&ids, false).unwrap(), text);
}

#[test]
fn the_fixture_token_ids_match_transformers() {
    let t = Tokenizer::open(&fixture()).unwrap();
    let text = std::fs::read_to_string(fixture().join("../text.txt")).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("../tokens.json")).unwrap())
            .unwrap();
    let ids = t.encode(&text).unwrap();
    let want_ids: Vec<u32> = want["all_ids"]
        .as_array()
        .expect("tokens.json holds `all_ids`")
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want_ids);
}

#[test]
fn missing_tokenizer_json_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = Tokenizer::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("no tokenizer.json"), "{e}");
}
