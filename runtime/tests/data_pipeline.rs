//! The whole pipeline on files (spec §4.1–§4.7): readers, the cache (check 20), pipeline-level
//! settings, and the errors bad inputs must give.
mod data_common;
use data_common::{config, dataset, inputs, tokenizer};
use qplc_runtime::data::cache::Dataset;
use qplc_runtime::data::pipeline::combine;
use qplc_runtime::data::read::read_documents;
use qplc_runtime::data::{prepare, Prepared};
use std::path::Path;

fn build(dir: &Path, extra: &str, datasets: &str) -> anyhow::Result<Prepared> {
    let cfg = config(dir, extra, datasets);
    prepare(&cfg, &tokenizer(), &dir.join("cache"), &|_| {})
}

/// Enough text for many 64-token sequences.
fn write_corpus(dir: &Path, name: &str, docs: usize) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut text = String::new();
    for i in 0..docs {
        text.push_str(&format!(
            "{{\"text\": \"Document number {i} says: the quick brown fox jumps over the lazy dog, {}\"}}\n",
            "and then it rests. ".repeat(i % 5)
        ));
    }
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn readers_return_each_records_text_in_file_order() {
    let d = inputs();
    assert_eq!(
        read_documents(&d.join("records.jsonl")).unwrap(),
        vec![
            "To be, or not to be, that is the question.",
            "Whether 'tis nobler in the mind to suffer",
            "The slings and arrows of outrageous fortune,",
            "",
        ]
    );
    assert_eq!(
        read_documents(&d.join("records.json")).unwrap(),
        vec![
            "Or to take arms against a sea of troubles",
            "And by opposing end them."
        ]
    );
    assert_eq!(
        read_documents(&d.join("txt/a.txt")).unwrap(),
        vec!["A first document in a text file.\nIt has two lines.\n"]
    );
}

#[test]
fn json_files_may_also_hold_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lines.json");
    std::fs::write(&p, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
    assert_eq!(read_documents(&p).unwrap(), vec!["a", "b"]);
}

fn write_parquet(path: &Path, large: bool, with_text: bool) {
    use arrow_array::{ArrayRef, Int64Array, LargeStringArray, RecordBatch, StringArray};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;
    use std::sync::Arc;
    let texts: Vec<String> = (0..7).map(|i| format!("parquet row {i}")).collect();
    let text: ArrayRef = if large {
        Arc::new(LargeStringArray::from_iter_values(&texts))
    } else {
        Arc::new(StringArray::from_iter_values(&texts))
    };
    let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..7));
    let name = if with_text { "text" } else { "body" };
    let batch = RecordBatch::try_from_iter([("id", ids), (name, text)]).unwrap();
    // Three row groups, so reading must walk them all in order.
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(3))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_text_column_is_read_across_row_groups_in_both_string_widths() {
    let dir = tempfile::tempdir().unwrap();
    for large in [false, true] {
        let p = dir.path().join(format!("rows-{large}.parquet"));
        write_parquet(&p, large, true);
        let docs = read_documents(&p).unwrap();
        let expected: Vec<String> = (0..7).map(|i| format!("parquet row {i}")).collect();
        assert_eq!(docs, expected);
    }
}

#[test]
fn parquet_without_text_column_names_the_columns() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("no-text.parquet");
    write_parquet(&p, false, false);
    let e = read_documents(&p).unwrap_err().to_string();
    assert!(
        e.contains("no-text.parquet") && e.contains("no `text` column"),
        "{e}"
    );
    assert!(e.contains("id, body"), "{e}");
}

#[test]
fn malformed_json_line_error_names_file_and_line() {
    let e = read_documents(&inputs().join("malformed.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("malformed.jsonl`:3:"), "{e}");
    assert!(e.contains("malformed JSON"), "{e}");
}

#[test]
fn record_without_text_error_names_file_and_line() {
    let e = read_documents(&inputs().join("no_text.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no_text.jsonl`:2:") && e.contains("no `text` field"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("array.json");
    std::fs::write(&p, "[{\"text\": \"a\"}, {\"title\": \"b\"}]").unwrap();
    let e = read_documents(&p).unwrap_err().to_string();
    assert!(
        e.contains("record 1") && e.contains("no `text` field"),
        "{e}"
    );
    std::fs::write(&p, "[{\"text\": 5}]").unwrap();
    assert!(read_documents(&p).is_err());
}

#[test]
fn non_utf8_text_file_is_an_error_with_the_offset() {
    let e = read_documents(&inputs().join("latin1.txt"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("latin1.txt`:1:") && e.contains("not UTF-8"),
        "{e}"
    );
    assert!(e.contains("0xe9") && e.contains("offset 3"), "{e}");
}

#[test]
fn unsupported_suffix_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data.csv");
    std::fs::write(&p, "text\nhello\n").unwrap();
    let e = read_documents(&p).unwrap_err().to_string();
    assert!(e.contains("data.csv") && e.contains("unsupported"), "{e}");
}

#[test]
fn empty_dataset_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let e = build(dir.path(), "", &dataset(&inputs().join("empty.jsonl"), ""))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("empty.jsonl") && e.contains("no documents"),
        "{e}"
    );
}

#[test]
fn a_glob_matching_nothing_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = build(dir.path(), "", &dataset(&dir.path().join("*.jsonl"), ""))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("matches no files"), "{e}");
}

#[test]
fn too_little_text_for_one_sequence_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = build(dir.path(), "", &dataset(&inputs().join("txt/*.txt"), ""))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not enough for one sequence"), "{e}");
}

#[test]
fn globbed_text_files_are_one_document_each_in_sorted_order() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let p = build(
        dir.path(),
        "sequence_len = 64\neval_fraction = 0.5\nsequence_prefix = \"\"",
        &dataset(&inputs().join("txt/*.txt"), "").replace("txt/*.txt", "txt/[ab].txt"),
    );
    // Two short files are not enough for two 64-token sequences; check the counts instead.
    let e = p.err().unwrap().to_string();
    assert!(e.contains("not enough"), "{e}");
    let a = tok
        .encode(&std::fs::read_to_string(inputs().join("txt/a.txt")).unwrap())
        .unwrap()
        .len();
    let b = tok
        .encode(&std::fs::read_to_string(inputs().join("txt/b.txt")).unwrap())
        .unwrap()
        .len();
    assert!(e.contains(&format!("{} tokens", a + b + 2)), "{e}");
}

#[test]
fn second_run_reuses_the_cache_without_tokenising() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path(), "corpus.jsonl", 300);
    let ds = dataset(&corpus, "");
    let first = build(dir.path(), "", &ds).unwrap();
    assert!(!first.from_cache);
    let calls = std::cell::Cell::new(0);
    let cfg = config(dir.path(), "", &ds);
    let second = prepare(&cfg, &tokenizer(), &dir.path().join("cache"), &|_| {
        calls.set(calls.get() + 1)
    })
    .unwrap();
    assert!(second.from_cache);
    assert_eq!(calls.get(), 0, "no progress events: nothing was tokenised");
    assert_eq!(first.key, second.key);
    let (a, b) = (first.dataset.train(), second.dataset.train());
    assert_eq!(a.input_ids, b.input_ids);
    assert_eq!(a.labels, b.labels);
    assert_eq!(a.classes, b.classes);
    assert_eq!(first.dataset.stats(), second.dataset.stats());
}

#[test]
fn any_change_to_inputs_or_settings_invalidates_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path(), "corpus.jsonl", 300);
    let ds = dataset(&corpus, "");
    let base = build(dir.path(), "", &ds).unwrap();
    for (extra, more) in [
        ("drop_tails = true", ""),
        ("mix_datasets = true", ""),
        ("max_sequences = 5", ""),
        ("eval_fraction = 0.2", ""),
        ("mask_tokens = true", ""),
        ("document_suffix = \"\"", ""),
        ("sequence_len = 128", ""),
        ("", "control_class = -1"),
        ("", "max_tokens = 1000"),
    ] {
        let p = build(dir.path(), extra, &dataset(&corpus, more)).unwrap();
        assert!(!p.from_cache, "{extra}{more}");
        assert_ne!(p.key, base.key, "{extra}{more}");
    }
    // Settings that do not affect the data keep the cache.
    let p = build(
        dir.path(),
        "epochs = 3\ngradient_accumulation_steps = 4",
        &ds,
    )
    .unwrap();
    assert!(p.from_cache);
    // So does a change of the file's contents.
    let mut text = std::fs::read_to_string(&corpus).unwrap();
    text.push_str("{\"text\": \"one more document\"}\n");
    std::fs::write(&corpus, text).unwrap();
    let p = build(dir.path(), "", &ds).unwrap();
    assert!(!p.from_cache);
    assert_ne!(p.key, base.key);
}

#[test]
fn a_partially_written_cache_is_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path(), "corpus.jsonl", 300);
    let ds = dataset(&corpus, "");
    let first = build(dir.path(), "", &ds).unwrap();
    let path = first.dataset.path.clone();
    let full = std::fs::read(&path).unwrap();
    drop(first);
    // A truncated file under the final name (a writer that skipped the rename would leave
    // this) is detected and rebuilt.
    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    assert!(Dataset::open(&path, None).is_err());
    let again = build(dir.path(), "", &ds).unwrap();
    assert!(!again.from_cache);
    assert_eq!(std::fs::read(&path).unwrap(), full);
    // Leftover temporary files from a killed writer are not mistaken for the cache.
    let cache_dir = path.parent().unwrap();
    let names: Vec<String> = std::fs::read_dir(cache_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn cached_splits_hold_every_packed_sequence_once() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path(), "corpus.jsonl", 300);
    let p = build(dir.path(), "eval_fraction = 0.1", &dataset(&corpus, "")).unwrap();
    let s = p.dataset.stats();
    let (train, eval) = (p.dataset.train(), p.dataset.eval());
    assert_eq!(train.len() + eval.len(), s.sequences as usize);
    assert_eq!(eval.len(), (s.sequences as f64 * 0.1).ceil() as usize);
    for split in [train, eval] {
        for i in 0..split.len() {
            let seq = split.sequence(i);
            assert_eq!(seq.input_ids[0], 0, "every sequence starts with BOS");
            assert_eq!(seq.input_ids.len(), 64);
        }
    }
    let mb = train.micro_batch(&[0, 1]);
    assert_eq!(mb.input_ids.shape().0, vec![2, 64]);
    assert!(mb.attention_mask.as_i32().iter().all(|&x| x == 1));
    assert_eq!(s.class_counts[0], 0);
    assert_eq!(
        s.class_counts[1], s.sequences,
        "one class-0 prefix per sequence"
    );
}

#[test]
fn max_sequences_and_max_tokens_apply_through_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path(), "corpus.jsonl", 300);
    let p = build(dir.path(), "max_sequences = 10", &dataset(&corpus, "")).unwrap();
    assert_eq!(p.dataset.stats().sequences, 10);
    let p = build(dir.path(), "", &dataset(&corpus, "max_tokens = 2000")).unwrap();
    let d = &p.dataset.stats().datasets[0];
    assert!(d.tokens <= 2000 && d.pruned_documents > 0, "{d:?}");
    assert_eq!(d.documents + d.pruned_documents, 300);
}

#[test]
fn without_mix_datasets_datasets_are_packed_one_after_another() {
    let orders = vec![vec![2, 0, 1], vec![1, 0], vec![3, 2, 1, 0]];
    let sequential = combine(&orders, false);
    assert_eq!(
        sequential,
        vec![
            (0, 2),
            (0, 0),
            (0, 1),
            (1, 1),
            (1, 0),
            (2, 3),
            (2, 2),
            (2, 1),
            (2, 0)
        ]
    );
    let mixed = combine(&orders, true);
    assert_ne!(mixed, sequential);
    assert_eq!(mixed, combine(&orders, true), "seeded: the same every run");
    let mut sorted = mixed.clone();
    sorted.sort_unstable();
    let mut expected = sequential.clone();
    expected.sort_unstable();
    assert_eq!(sorted, expected, "a permutation of the same documents");
}

#[test]
fn class_zero_dataset_gets_minus_one_for_small_datasets() {
    // §4.3: fewer than 683 documents are all −1 (the reference's blocky LCG).
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path(), "corpus.jsonl", 300);
    let p = build(dir.path(), "", &dataset(&corpus, "control_class = 0")).unwrap();
    assert_eq!(p.dataset.stats().class_counts[2], 0);
    assert!(p.dataset.stats().class_counts[0] > 0);
}

#[test]
fn max_sequences_zero_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path(), "corpus.jsonl", 50);
    let e = build(dir.path(), "max_sequences = 0", &dataset(&corpus, ""))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("max_sequences") && e.contains("at least 1"),
        "{e}"
    );
}
