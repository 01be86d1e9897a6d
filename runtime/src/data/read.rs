//! Reading documents from files (spec §3.7, §4.1): `.txt` is one document per file;
//! `.json` / `.jsonl` / `.parquet` hold records whose `text` field is one document each (other
//! fields are ignored). Every error names the file, and the line or row when there is one.
use anyhow::{anyhow, bail, Context, Result};
use arrow_array::{Array, LargeStringArray, StringArray, StringViewArray};
use rayon::prelude::*;
use serde::Deserialize;
use std::borrow::Cow;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// A document source format, chosen by the file's suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Txt,
    Json,
    Jsonl,
    Parquet,
}

impl Format {
    pub fn of(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("txt") => Ok(Format::Txt),
            Some("json") => Ok(Format::Json),
            Some("jsonl") => Ok(Format::Jsonl),
            Some("parquet") => Ok(Format::Parquet),
            _ => bail!(
                "`{}`: unsupported dataset file type (use .txt, .json, .jsonl or .parquet)",
                path.display()
            ),
        }
    }
}

/// The files a `dataset_path` names: the path itself, or every match of a glob, sorted (so the
/// document order, and with it the class-0 assignment of §4.3, is reproducible).
pub fn expand(pattern: &Path) -> Result<Vec<PathBuf>> {
    let text = pattern.to_string_lossy();
    let is_glob = text.contains(['*', '?', '[']);
    let files: Vec<PathBuf> = if is_glob {
        let mut files = glob::glob(&text)
            .map_err(|e| anyhow!("`{text}`: bad glob pattern: {e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("`{text}`: {e}"))?;
        files.retain(|p| p.is_file());
        files.sort();
        if files.is_empty() {
            bail!("`{text}`: the glob matches no files");
        }
        files
    } else if pattern.is_dir() {
        bail!(
            "`{text}` is a folder; name a file or a glob such as `{}`",
            pattern.join("*.jsonl").display()
        );
    } else if !pattern.is_file() {
        bail!("`{text}`: no such file");
    } else {
        vec![pattern.to_path_buf()]
    };
    for f in &files {
        Format::of(f)?;
    }
    Ok(files)
}

/// Every document of one file, in file order.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    match Format::of(path)? {
        Format::Txt => Ok(vec![read_utf8(path)?]),
        Format::Json => {
            let text = read_utf8(path)?;
            // HF `datasets` reads a `.json` file either as one array of records or as JSON
            // lines; accept both, as the reference does.
            if text.trim_start().starts_with('[') {
                parse_json_array(path, &text)
            } else {
                parse_json_lines(path, &text)
            }
        }
        Format::Jsonl => parse_json_lines(path, &read_utf8(path)?),
        Format::Parquet => read_parquet(path),
    }
}

/// Every document of one file, in file order, handed to `f` in batches of about
/// `batch_bytes` of input: JSON lines stream (parsed on all cores), so a large `.jsonl` never
/// sits in memory whole; the other formats come as one batch.
pub fn read_batches(
    path: &Path,
    batch_bytes: usize,
    mut f: impl FnMut(Vec<String>) -> Result<()>,
) -> Result<()> {
    match Format::of(path)? {
        Format::Jsonl => stream_json_lines(path, batch_bytes, f),
        _ => f(read_documents(path)?),
    }
}

fn stream_json_lines(
    path: &Path,
    batch_bytes: usize,
    mut f: impl FnMut(Vec<String>) -> Result<()>,
) -> Result<()> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open `{}`", path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut block = Vec::with_capacity(batch_bytes + (1 << 16));
    // The first line of `block`, 1-based, and its byte offset in the file.
    let mut first_line = 1usize;
    let mut offset = 0usize;
    loop {
        block.clear();
        let mut lines = 0;
        while block.len() < batch_bytes {
            let n = reader
                .read_until(b'\n', &mut block)
                .with_context(|| format!("cannot read `{}`", path.display()))?;
            if n == 0 {
                break;
            }
            lines += 1;
        }
        if block.is_empty() {
            return Ok(());
        }
        // Blocks end at line ends, which never split a UTF-8 sequence.
        let text = std::str::from_utf8(&block).map_err(|e| {
            let at = e.valid_up_to();
            let line = first_line + block[..at].iter().filter(|&&b| b == b'\n').count();
            not_utf8(path, line, block[at], offset + at)
        })?;
        f(parse_json_lines_from(path, text, first_line)?)?;
        first_line += lines;
        offset += block.len();
    }
}

fn not_utf8(path: &Path, line: usize, byte: u8, at: usize) -> anyhow::Error {
    anyhow!(
        "`{}`:{line}: not UTF-8 text (invalid byte 0x{byte:02x} at byte offset {at}); \
         re-encode the file as UTF-8",
        path.display(),
    )
}

fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        not_utf8(path, line, bytes[at], at)
    })
}

/// One record; unknown fields are skipped without being materialised.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

fn parse_json_lines(path: &Path, text: &str) -> Result<Vec<String>> {
    parse_json_lines_from(path, text, 1)
}

/// The records of the JSON lines `text`, whose first line is line `first_line` of `path`;
/// parsed in parallel, the first bad line (in file order) is the error.
fn parse_json_lines_from(path: &Path, text: &str, first_line: usize) -> Result<Vec<String>> {
    let lines: Vec<&str> = text.lines().collect();
    let parsed: Vec<Result<Option<String>>> = lines
        .par_iter()
        .enumerate()
        .map(|(i, line)| {
            if line.trim().is_empty() {
                return Ok(None);
            }
            let n = first_line + i;
            let rec: Record = serde_json::from_str(line).map_err(|e| {
                anyhow!(
                    "`{}`:{n}:{}: malformed JSON record: {e}",
                    path.display(),
                    e.column()
                )
            })?;
            match rec.text {
                Some(t) => Ok(Some(t.into_owned())),
                None => bail!(
                    "`{}`:{n}: the record has no `text` field (each record's `text` is one document)",
                    path.display()
                ),
            }
        })
        .collect();
    parsed.into_iter().filter_map(Result::transpose).collect()
}

fn parse_json_array(path: &Path, text: &str) -> Result<Vec<String>> {
    let recs: Vec<Record> = serde_json::from_str(text).map_err(|e| {
        anyhow!(
            "`{}`:{}:{}: malformed JSON: {e}",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    recs.into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.text.map(Cow::into_owned).ok_or_else(|| {
                anyhow!(
                    "`{}`: record {i} (0-based) has no `text` field (each record's `text` is one document)",
                    path.display()
                )
            })
        })
        .collect()
}

fn read_parquet(path: &Path) -> Result<Vec<String>> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ProjectionMask;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open `{}`", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("`{}` is not a readable parquet file", path.display()))?;
    let fields = builder.schema().fields();
    let Some(index) = fields.iter().position(|f| f.name() == "text") else {
        let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
        bail!(
            "`{}`: no `text` column (columns: {})",
            path.display(),
            names.join(", ")
        );
    };
    // Read only the `text` column; the others may be large and are ignored (§3.7).
    let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
    let reader = builder
        .with_projection(mask)
        .build()
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    let mut docs = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("cannot read `{}`", path.display()))?;
        let col = batch.column(0);
        let first_row = docs.len();
        let null_error = |row: usize| {
            anyhow!(
                "`{}`: row {} has a null `text`",
                path.display(),
                first_row + row
            )
        };
        if col.null_count() > 0 {
            let row = (0..col.len()).find(|&r| col.is_null(r)).unwrap_or(0);
            return Err(null_error(row));
        }
        let any = col.as_any();
        if let Some(a) = any.downcast_ref::<StringArray>() {
            docs.extend(a.iter().map(|s| s.unwrap_or_default().to_string()));
        } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
            docs.extend(a.iter().map(|s| s.unwrap_or_default().to_string()));
        } else if let Some(a) = any.downcast_ref::<StringViewArray>() {
            docs.extend(a.iter().map(|s| s.unwrap_or_default().to_string()));
        } else {
            bail!(
                "`{}`: the `text` column holds {}, not strings",
                path.display(),
                col.data_type()
            );
        }
    }
    Ok(docs)
}
