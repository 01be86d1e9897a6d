//! Tokenisation rules of spec §3.6/§4.2/§4.3 (checks 10, 11, 15, 16) with a real BPE tokenizer.
mod data_common;
use data_common::{config, tokenizer};
use qplc_runtime::data::pack::{pack, PackSettings, IGNORE};
use qplc_runtime::data::tokenize::{class0, document_class, Documents, TokenSettings};

fn settings(extra: &str) -> TokenSettings {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        extra,
        "[[datasets]]\ndataset_path = \"unused.jsonl\"\n",
    );
    TokenSettings::resolve(&cfg, &tokenizer()).unwrap()
}

fn encode(extra: &str, text: &str) -> Vec<u32> {
    settings(extra).encode_document(&tokenizer(), text).unwrap()
}

#[test]
fn default_suffix_appends_eos_after_the_text() {
    let tok = tokenizer();
    let mut expected = tok.encode("ab").unwrap();
    expected.push(tok.eos_id.unwrap());
    assert_eq!(encode("", "ab"), expected);
    // Always appended, even when the text already ends with EOS (spec §14.7).
    let with_eos = encode("", "ab</s>");
    assert_eq!(&with_eos[with_eos.len() - 2..], &[1, 1]);
}

#[test]
fn empty_string_suffix_adds_nothing() {
    assert_eq!(
        encode("document_suffix = \"\"", "ab"),
        tokenizer().encode("ab").unwrap()
    );
}

#[test]
fn string_suffix_is_tokenised_with_the_text() {
    let tok = tokenizer();
    let joined = tok.encode("abX").unwrap();
    assert_eq!(encode("document_suffix = \"X\"", "ab"), joined);
    // Tokenising the whole string can differ from concatenating the pieces: that is the point.
    assert_eq!(
        encode("document_suffix = \" world\"", "hello"),
        tok.encode("hello world").unwrap()
    );
}

#[test]
fn id_suffix_is_appended_after_tokenising() {
    let mut expected = tokenizer().encode("ab").unwrap();
    expected.extend([7, 8]);
    assert_eq!(encode("document_suffix = [7, 8]", "ab"), expected);
    let mut one = tokenizer().encode("ab").unwrap();
    one.push(7);
    assert_eq!(encode("document_suffix = 7", "ab"), one);
}

#[test]
fn document_prefix_follows_the_same_rules() {
    let tok = tokenizer();
    let ab = tok.encode("ab").unwrap();
    let eos = tok.eos_id.unwrap();
    let no_suffix = "document_suffix = \"\"\n";
    // Default: no prefix.
    assert_eq!(encode(no_suffix, "ab"), ab);
    assert_eq!(
        encode(&format!("{no_suffix}document_prefix = \"\""), "ab"),
        ab
    );
    assert_eq!(
        encode(&format!("{no_suffix}document_prefix = \"X\""), "ab"),
        tok.encode("Xab").unwrap()
    );
    let mut ids = vec![7, 8];
    ids.extend(&ab);
    assert_eq!(
        encode(&format!("{no_suffix}document_prefix = [7, 8]"), "ab"),
        ids
    );
    // Both together, string prefix and default suffix.
    let mut both = tok.encode("Xab").unwrap();
    both.push(eos);
    assert_eq!(encode("document_prefix = \"X\"", "ab"), both);
}

#[test]
fn sequence_prefix_defaults_to_bos_and_accepts_every_form() {
    assert_eq!(settings("").sequence_prefix, vec![0]);
    assert_eq!(
        settings("sequence_prefix = \"\"").sequence_prefix,
        Vec::<u32>::new()
    );
    assert_eq!(settings("sequence_prefix = 5").sequence_prefix, vec![5]);
    assert_eq!(
        settings("sequence_prefix = [5, 6]").sequence_prefix,
        vec![5, 6]
    );
    assert_eq!(
        settings("sequence_prefix = \"Title:\"").sequence_prefix,
        tokenizer().encode("Title:").unwrap()
    );
}

#[test]
fn out_of_vocabulary_ids_are_rejected_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for extra in [
        "document_suffix = [1, 99999]",
        "sequence_prefix = -1",
        "mask_tokens = [512]",
    ] {
        let cfg = config(
            dir.path(),
            extra,
            "[[datasets]]\ndataset_path = \"x.txt\"\n",
        );
        let e = TokenSettings::resolve(&cfg, &tokenizer())
            .unwrap_err()
            .to_string();
        let key = extra.split(' ').next().unwrap();
        assert!(
            e.contains(key) && e.contains("outside the vocabulary"),
            "{e}"
        );
    }
}

#[test]
fn mask_tokens_forms_resolve_to_id_sets() {
    assert!(settings("").mask.is_empty());
    assert!(settings("mask_tokens = false").mask.is_empty());
    // The reference's `if mask_tokens:` quirk: the id 0 means "no masking" (§14.9).
    assert!(settings("mask_tokens = 0").mask.is_empty());
    assert_eq!(settings("mask_tokens = true").mask, vec![0, 1]);
    assert_eq!(settings("mask_tokens = 1").mask, vec![1]);
    assert_eq!(settings("mask_tokens = [9, 3, 9]").mask, vec![3, 9]);
}

fn pack_texts(extra: &str, texts: &[&str]) -> qplc_runtime::data::Packed {
    let tok = tokenizer();
    let s = settings(&format!("sequence_len = 64\n{extra}"));
    let mut docs = Documents::new();
    let ids = texts
        .iter()
        .map(|t| s.encode_document(&tok, t).unwrap())
        .collect();
    docs.extend_tokenized(ids, 1);
    let p = PackSettings {
        seq_len: 16,
        prefix: s.sequence_prefix.clone(),
        bos_id: s.bos_id,
        drop_tails: false,
        max_sequences: None,
        mask: s.mask.clone(),
    };
    pack((0..docs.len()).map(|i| (docs.doc(i), docs.classes[i])), &p)
        .unwrap()
        .0
}

#[test]
fn mask_tokens_true_masks_every_special_position_and_nothing_else() {
    let text = "Some words </s> and <s> more words to fill the sequences up";
    let packed = pack_texts("mask_tokens = true", &[text, text, text]);
    assert!(packed.len() >= 2);
    let special = tokenizer().all_special_ids().to_vec();
    let mut masked = 0;
    for i in 0..packed.input_ids.len() {
        let id = packed.input_ids[i];
        if special.contains(&id) {
            masked += 1;
            assert_eq!(packed.labels[i], IGNORE, "position {i}");
            assert_eq!(packed.classes[i], 0, "position {i}");
        } else {
            assert_eq!(packed.labels[i], id as i32, "position {i}");
            assert_eq!(packed.classes[i], 1, "position {i}");
        }
    }
    // Every sequence's BOS prefix plus the in-text and suffix specials.
    assert!(masked > packed.len());
}

#[test]
fn masking_one_id_leaves_the_bos_prefix_label_unmasked() {
    let packed = pack_texts("mask_tokens = 1", &["one two three four five six seven"; 4]);
    for s in 0..packed.len() {
        let r = s * 16..(s + 1) * 16;
        // The prefix keeps its label (only mask_tokens masks) and has class 0.
        assert_eq!(packed.labels[r.start], 0);
        assert_eq!(packed.classes[r.start], 0);
        for i in r.clone().skip(1) {
            let id = packed.input_ids[i];
            let (label, class) = if id == 1 { (IGNORE, 0) } else { (id as i32, 1) };
            assert_eq!((packed.labels[i], packed.classes[i]), (label, class));
        }
    }
}

#[test]
fn a_leading_bos_is_stripped_even_from_document_prefix() {
    // §4.6 step 1 / §14.10: `document_prefix = [BOS]` puts BOS first, and packing removes it.
    let plain = pack_texts("", &["alpha beta gamma delta epsilon zeta eta theta"; 3]);
    let with_bos = pack_texts(
        "document_prefix = 0",
        &["alpha beta gamma delta epsilon zeta eta theta"; 3],
    );
    assert_eq!(plain, with_bos);
    // A BOS that is not first stays.
    let inner = pack_texts("document_prefix = [5, 0]", &["alpha beta gamma"; 8]);
    assert!(inner
        .input_ids
        .chunks(16)
        .any(|s| s[1..].windows(2).any(|w| w == [5, 0])));
}

#[test]
fn class0_mapping_reproduces_the_reference_lcg() {
    assert_eq!(class0(0), -1);
    assert_eq!(class0(681), -1);
    assert_eq!(class0(682), 1);
    assert_eq!(class0(1971), 1);
    assert_eq!(class0(1972), -1);
    assert_eq!(class0(3262), 1);
    let plus = (0..1000).filter(|&i| class0(i) == 1).count();
    // 318 of 1000 (spec §4.3: "1 000 docs → 31.8 % +1").
    assert_eq!(plus, 318);
    // Other classes pass through.
    assert_eq!(document_class(1, 5), 1);
    assert_eq!(document_class(-1, 700), -1);
    assert_eq!(document_class(0, 700), 1);
}

#[test]
fn class0_index_counts_only_kept_documents() {
    // §4.3: the index is the position after empty-document removal.
    let mut docs = Documents::new();
    let mut ids: Vec<Vec<u32>> = vec![vec![]; 10];
    ids.extend((0..700).map(|i| vec![i as u32 + 2]));
    docs.extend_tokenized(ids, 0);
    assert_eq!(docs.len(), 700);
    assert_eq!(docs.classes[681], -1);
    assert_eq!(docs.classes[682], 1);
}

#[test]
fn add_prefix_space_changes_the_first_word() {
    let plain = tokenizer();
    let mut spaced = tokenizer();
    spaced.set_add_prefix_space().unwrap();
    assert_eq!(
        spaced.encode("hello").unwrap(),
        plain.encode(" hello").unwrap()
    );
    assert_ne!(spaced.fingerprint().unwrap(), plain.fingerprint().unwrap());
}

/// HF's `all_special_ids` lists only the named special tokens (Llama-3 flags 256 reserved
/// added tokens special, yet `all_special_ids` is [BOS, EOS] in transformers 5.24), and that is
/// what `mask_tokens = true` masks in the reference.
#[test]
fn mask_tokens_true_uses_the_named_special_tokens_only() {
    let dir = tempfile::tempdir().unwrap();
    let src = data_common::model_dir();
    let mut tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    for (id, content) in [(512, "<|reserved|>"), (513, "<|turn|>")] {
        tj["added_tokens"].as_array_mut().unwrap().push(
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
        );
    }
    std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["<|turn|>"]}"#,
    )
    .unwrap();
    let tok = qplc_runtime::tokenizer::Tokenizer::open(dir.path()).unwrap();
    assert_eq!(tok.special_ids(), vec![0, 1, 512, 513]);
    assert_eq!(tok.all_special_ids(), &[0, 1, 513]);
}
