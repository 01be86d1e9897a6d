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

/// A model folder holding the fixture's tokenizer.json plus the given config files.
fn folder_with(tokenizer_config: Option<&str>, config: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    if let Some(c) = tokenizer_config {
        std::fs::write(dir.path().join("tokenizer_config.json"), c).unwrap();
    }
    if let Some(c) = config {
        std::fs::write(dir.path().join("config.json"), c).unwrap();
    }
    dir
}

#[test]
fn token_objects_with_content_resolve_like_strings() {
    let dir = folder_with(
        Some(
            r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": {"content": "</s>"}}"#,
        ),
        None,
    );
    let t = Tokenizer::open(dir.path()).unwrap();
    assert_eq!((t.bos_id, t.eos_id), (Some(0), Some(1)));
    assert_eq!(t.eos_token.as_deref(), Some("</s>"));
}

#[test]
fn ids_fall_back_to_config_json_and_take_the_first_of_a_list() {
    let dir = folder_with(
        Some(r#"{"bos_token": null}"#),
        Some(r#"{"bos_token_id": 1, "eos_token_id": [0, 1]}"#),
    );
    let t = Tokenizer::open(dir.path()).unwrap();
    assert_eq!((t.bos_id, t.eos_id), (Some(1), Some(0)));
}

#[test]
fn no_config_files_means_no_bos_eos_and_no_template() {
    let dir = folder_with(None, None);
    let t = Tokenizer::open(dir.path()).unwrap();
    assert_eq!((t.bos_id, t.eos_id), (None, None));
    assert!(t.chat_template.is_none());
}

#[test]
fn a_list_of_chat_templates_uses_the_one_named_default() {
    let dir = folder_with(
        Some(
            r#"{"chat_template": [{"name": "tool_use", "template": "T"},
                                   {"name": "default", "template": "D"}]}"#,
        ),
        None,
    );
    let t = Tokenizer::open(dir.path()).unwrap();
    assert_eq!(t.chat_template.as_deref(), Some("D"));
}

#[test]
fn a_chat_template_jinja_file_is_used_when_the_config_has_none() {
    let dir = folder_with(Some("{}"), None);
    std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
    let t = Tokenizer::open(dir.path()).unwrap();
    assert_eq!(t.chat_template.as_deref(), Some("J"));
}
