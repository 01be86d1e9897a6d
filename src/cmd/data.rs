use anyhow::Result;
use qplc_compiler::config::LoadedConfig;
use qplc_runtime::data::cache::{Dataset, Sequence};
use qplc_runtime::data::pipeline::default_cache_dir;
use qplc_runtime::data::{prepare, Progress};
use qplc_runtime::tokenizer::Tokenizer;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

/// Build (or reuse) the tokenised, packed and split dataset of a training config.
#[derive(clap::Args)]
#[command(
    after_help = "Reads every [[datasets]] entry, tokenises with the model folder's \
tokenizer.json, packs into sequences of sequence_len tokens and splits off eval_fraction for \
evaluation (spec §4). The result is cached under --cache-dir, keyed by the input files' \
contents and every setting that affects it: a second run with the same inputs reuses it.\n\n\
Examples:\n  qplc data examples/tiny-lora.toml\n  qplc data config.toml --dump 2"
)]
pub struct Args {
    /// Training config (TOML).
    config: PathBuf,
    /// Print the first N training sequences: token ids and decoded text, with masked
    /// positions and control classes marked.
    #[arg(long, value_name = "N")]
    dump: Option<usize>,
    /// Put a space before each text when tokenising (HF `add_prefix_space`).
    #[arg(long = "add-prefix-space")]
    add_prefix_space: bool,
    /// Cache folder [default: <output_dir>/data_cache].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = LoadedConfig::from_file(&a.config)?;
    let mut tok = Tokenizer::open(&cfg.model_dir()?)?;
    if a.add_prefix_space {
        tok.set_add_prefix_space()?;
    }
    let cache_dir = match a.cache_dir {
        Some(d) => d,
        None => default_cache_dir(&cfg)?,
    };
    let show = std::io::stderr().is_terminal();
    let total = std::cell::Cell::new(0u64);
    let progress = |p: Progress| {
        if !show {
            return;
        }
        let mb = |b: u64| b as f64 / 1e6;
        match p {
            Progress::Start { bytes } => total.set(bytes),
            Progress::Tokenized { bytes } => {
                let pct = 100.0 * bytes as f64 / total.get().max(1) as f64;
                eprint!(
                    "\rtokenising: {pct:5.1}% ({:.1} / {:.1} MB)",
                    mb(bytes),
                    mb(total.get())
                );
                let _ = std::io::stderr().flush();
            }
            Progress::Packing => eprintln!("\npacking and writing the cache…"),
        }
    };
    let prepared = prepare(&cfg, &tok, &cache_dir, &progress)?;
    print_summary(&prepared.dataset, prepared.from_cache);
    if let Some(n) = a.dump {
        let train = prepared.dataset.train();
        for i in 0..n.min(train.len()) {
            print_sequence(&tok, i, train.sequence(i))?;
        }
    }
    Ok(())
}

fn print_summary(ds: &Dataset, from_cache: bool) {
    let s = ds.stats();
    let t = ds.seq_len() as u64;
    println!(
        "data cache: {} ({})",
        ds.path.display(),
        if from_cache {
            "reused, nothing tokenised"
        } else {
            "built"
        }
    );
    for d in &s.datasets {
        println!(
            "  {}: {} files, {} records, {} empty; kept {} documents ({} tokens)",
            d.path, d.files, d.records, d.empty, d.documents, d.tokens
        );
        if d.pruned_documents > 0 {
            println!(
                "    max_tokens cut {} documents ({} tokens)",
                d.pruned_documents, d.pruned_tokens
            );
        }
    }
    let p = &s.pack;
    println!("documents: {}, tokens: {}", p.documents, p.document_tokens);
    println!(
        "sequences: {} of {t} tokens (train {} = {} tokens, eval {} = {} tokens)",
        s.sequences,
        s.train_sequences,
        s.train_sequences * t,
        s.eval_sequences,
        s.eval_sequences * t
    );
    println!(
        "tokens dropped: {} (leading BOS {}, drop_tails {}, final partial sequence {}, after max_sequences {})",
        p.bos_stripped + p.dropped_tails + p.dropped_partial + p.dropped_by_limit,
        p.bos_stripped,
        p.dropped_tails,
        p.dropped_partial,
        p.dropped_by_limit
    );
    let positions = (s.sequences * t).max(1);
    println!(
        "masked: {} of {} positions ({:.2}%)",
        s.masked_positions,
        s.sequences * t,
        100.0 * s.masked_positions as f64 / positions as f64
    );
    let [neg, zero, pos] = s.class_counts;
    println!("classes (positions): -1: {neg}, 0: {zero}, +1: {pos}");
}

/// One sequence: ids with masked ones in parentheses and `[c=…]` where the class changes, then
/// the decoded text in runs of equal class/mask, each run opened by its marker.
fn print_sequence(tok: &Tokenizer, index: usize, s: Sequence<'_>) -> Result<()> {
    let marker = |i: usize| -> String {
        if s.labels[i] == -100 {
            "masked".into()
        } else {
            format!("{:+}", s.classes[i]).replace("+0", "0")
        }
    };
    let mut ids = String::new();
    let mut last = String::new();
    for (i, &id) in s.input_ids.iter().enumerate() {
        let m = marker(i);
        if m != "masked" && m != last {
            ids.push_str(&format!("[c={m}] "));
            last = m.clone();
        }
        if m == "masked" {
            ids.push_str(&format!("({id}) "));
        } else {
            ids.push_str(&format!("{id} "));
        }
    }
    let mut text = String::new();
    let mut start = 0;
    for i in 1..=s.input_ids.len() {
        if i == s.input_ids.len() || marker(i) != marker(start) {
            let piece = tok.decode(&s.input_ids[start..i], false)?;
            text.push_str(&format!("[{}]{piece}", marker(start)));
            start = i;
        }
    }
    println!("\n#{index} ids: {}", ids.trim_end());
    println!("#{index} text: {text}");
    Ok(())
}
