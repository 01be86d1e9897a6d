//! The on-disk dataset cache (spec §4.7; the format is ours, §15): packed, split sequences as
//! flat little-endian arrays that are memory-mapped, not parsed, behind a small JSON header.
//!
//! ```text
//! "QPLCDATA" | version u32 | header length u32 | header JSON | pad to 64
//! input_ids u32 [N·T] | pad | labels i32 [N·T] | pad | classes i8 [N·T]
//! ```
//! The N sequences are the train split then the eval split, each in its permuted order.
//! The file is named after its [`CacheKey`]; it is written to a temporary name, synced, then
//! renamed, so a run killed mid-write leaves no file under the final name to be read.
use super::pack::Packed;
use super::split::Split;
use super::stats::DataStats;
use crate::tensor::HostTensor;
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"QPLCDATA";
/// Bumped whenever the layout, or anything the pipeline does to data, changes meaning.
pub const FORMAT_VERSION: u32 = 1;
const ALIGN: usize = 64;

/// A 256-bit hash of everything that determines a built dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The cache file for this key in `dir`.
    pub fn path_in(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.qpld", self.hex()))
    }
}

/// Builds a [`CacheKey`]: every input is written with its name and length, so two different
/// sequences of fields can never hash the same bytes.
pub struct KeyBuilder(blake3::Hasher);

impl Default for KeyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyBuilder {
    pub fn new() -> Self {
        let mut h = blake3::Hasher::new();
        h.update(MAGIC);
        h.update(&FORMAT_VERSION.to_le_bytes());
        KeyBuilder(h)
    }

    pub fn field(&mut self, name: &str, bytes: &[u8]) -> &mut Self {
        for part in [name.as_bytes(), bytes] {
            self.0.update(&(part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    /// A file's contents, hashed on all cores. Read in blocks rather than memory-mapped: a
    /// mapping's pages count as the process's resident memory, and the inputs can be as
    /// large as the whole memory budget (issue 4).
    pub fn file(&mut self, path: &Path) -> Result<&mut Self> {
        use std::io::Read;
        let mut h = blake3::Hasher::new();
        let mut f = std::fs::File::open(path)
            .with_context(|| format!("cannot read `{}`", path.display()))?;
        let mut buf = vec![0u8; 4 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("cannot read `{}`", path.display()))?;
            if n == 0 {
                break;
            }
            h.update_rayon(&buf[..n]);
        }
        let digest = h.finalize();
        Ok(self.field("file", digest.as_bytes()))
    }

    pub fn finish(&self) -> CacheKey {
        CacheKey(*self.0.finalize().as_bytes())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Header {
    key: String,
    seq_len: usize,
    n_train: usize,
    n_eval: usize,
    ids_offset: usize,
    labels_offset: usize,
    classes_offset: usize,
    stats: DataStats,
}

fn align(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// The three per-token arrays of the cache, in file order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Array {
    /// `input_ids`, u32.
    Ids,
    /// `labels`, i32.
    Labels,
    /// `classes`, i8.
    Classes,
}

impl Array {
    /// Bytes per token.
    pub fn width(self) -> usize {
        match self {
            Array::Ids | Array::Labels => 4,
            Array::Classes => 1,
        }
    }
}

/// Writes `packed`, reordered into the two splits, as the cache file `path` (atomically).
pub fn write(
    path: &Path,
    key: &CacheKey,
    packed: &Packed,
    split: &Split,
    stats: &DataStats,
) -> Result<()> {
    let t = packed.seq_len;
    let seq = |i: usize| i * t..(i + 1) * t;
    write_with(path, key, t, split, stats, |array, i, out| {
        // The arrays are written in this machine's byte order, which `open` checks is
        // little-endian.
        out.extend_from_slice(match array {
            Array::Ids => bytemuck::cast_slice(&packed.input_ids[seq(i)]),
            Array::Labels => bytemuck::cast_slice(&packed.labels[seq(i)]),
            Array::Classes => bytemuck::cast_slice(&packed.classes[seq(i)]),
        });
        Ok(())
    })
}

/// Writes the cache file `path` (atomically) from sequences that `sequence(array, i, out)`
/// appends to `out` as little-endian bytes, one array at a time, in split order: the caller
/// may keep its sequences anywhere (a file, for the pipeline).
pub fn write_with(
    path: &Path,
    key: &CacheKey,
    seq_len: usize,
    split: &Split,
    stats: &DataStats,
    mut sequence: impl FnMut(Array, usize, &mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let t = seq_len;
    let n = split.train.len() + split.eval.len();
    let tokens = n * t;
    let mut header = Header {
        key: key.hex(),
        seq_len: t,
        n_train: split.train.len(),
        n_eval: split.eval.len(),
        ids_offset: 0,
        labels_offset: 0,
        classes_offset: 0,
        stats: stats.clone(),
    };
    // The offsets depend on the header's length, which depends on the offsets' digits: fix
    // the point by iterating (two rounds at most in practice).
    let mut json = serde_json::to_vec(&header)?;
    loop {
        let ids = align(16 + json.len());
        let labels = align(ids + 4 * tokens);
        let classes = align(labels + 4 * tokens);
        if (ids, labels, classes)
            == (
                header.ids_offset,
                header.labels_offset,
                header.classes_offset,
            )
        {
            break;
        }
        header.ids_offset = ids;
        header.labels_offset = labels;
        header.classes_offset = classes;
        json = serde_json::to_vec(&header)?;
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the cache folder `{}`", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("cache"),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        w.write_all(MAGIC)?;
        w.write_all(&FORMAT_VERSION.to_le_bytes())?;
        w.write_all(&(json.len() as u32).to_le_bytes())?;
        w.write_all(&json)?;
        let mut pos = 16 + json.len();
        let mut buf = Vec::with_capacity(4 * t);
        for (array, offset) in [
            (Array::Ids, header.ids_offset),
            (Array::Labels, header.labels_offset),
            (Array::Classes, header.classes_offset),
        ] {
            w.write_all(&vec![0u8; offset - pos])?;
            pos = offset;
            for &i in split.train.iter().chain(&split.eval) {
                buf.clear();
                sequence(array, i, &mut buf)?;
                if buf.len() != t * array.width() {
                    bail!(
                        "sequence {i} has {} bytes of {array:?}, expected {}",
                        buf.len(),
                        t * array.width()
                    );
                }
                w.write_all(&buf)?;
                pos += buf.len();
            }
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write the data cache `{}`", tmp.display())));
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move `{}` to `{}`", tmp.display(), path.display()))?;
    Ok(())
}

/// A cache file, memory-mapped.
pub struct Dataset {
    mmap: Mmap,
    header: Header,
    pub path: PathBuf,
}

impl Dataset {
    /// Opens a cache file; with `key`, also checks that the file was built for that key.
    /// Any inconsistency (wrong magic or version, short file) is an error, never a panic.
    pub fn open(path: &Path, key: Option<&CacheKey>) -> Result<Dataset> {
        if cfg!(target_endian = "big") {
            bail!("the data cache is little-endian; this machine is not");
        }
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open `{}`", path.display()))?;
        // SAFETY: cache files are written once under a temporary name and renamed; nothing
        // writes to a file under its final name, so the mapping does not change under us.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map `{}`", path.display()))?;
        let bad = |why: &str| anyhow!("`{}` is not a valid data cache: {why}", path.display());
        if mmap.len() < 16 || &mmap[..8] != MAGIC {
            return Err(bad("wrong magic"));
        }
        let version = u32::from_le_bytes(mmap[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(bad(&format!(
                "format version {version}, expected {FORMAT_VERSION}"
            )));
        }
        let hlen = u32::from_le_bytes(mmap[12..16].try_into().expect("4 bytes")) as usize;
        let json = mmap.get(16..16 + hlen).ok_or_else(|| bad("short header"))?;
        let header: Header =
            serde_json::from_slice(json).map_err(|e| bad(&format!("header: {e}")))?;
        let tokens = (header.n_train + header.n_eval) * header.seq_len;
        if mmap.len() != header.classes_offset + tokens
            || !header.ids_offset.is_multiple_of(ALIGN)
            || !header.labels_offset.is_multiple_of(ALIGN)
            || header.labels_offset < header.ids_offset + 4 * tokens
            || header.classes_offset < header.labels_offset + 4 * tokens
        {
            return Err(bad("its length does not match its header"));
        }
        if let Some(k) = key {
            if header.key != k.hex() {
                return Err(bad("built for other inputs or settings"));
            }
        }
        Ok(Dataset {
            mmap,
            header,
            path: path.to_path_buf(),
        })
    }

    pub fn seq_len(&self) -> usize {
        self.header.seq_len
    }

    pub fn key(&self) -> &str {
        &self.header.key
    }

    pub fn stats(&self) -> &DataStats {
        &self.header.stats
    }

    pub fn train(&self) -> SplitView<'_> {
        self.view(0, self.header.n_train)
    }

    pub fn eval(&self) -> SplitView<'_> {
        self.view(self.header.n_train, self.header.n_eval)
    }

    fn view(&self, first: usize, n: usize) -> SplitView<'_> {
        let t = self.header.seq_len;
        let total = (self.header.n_train + self.header.n_eval) * t;
        let range = |offset: usize, width: usize| {
            &self.mmap[offset + first * t * width..offset + (first + n) * t * width]
        };
        debug_assert!(first * t + n * t <= total);
        SplitView {
            seq_len: t,
            // Offsets are multiples of 64 in a page-aligned mapping: the casts cannot fail.
            input_ids: bytemuck::cast_slice(range(self.header.ids_offset, 4)),
            labels: bytemuck::cast_slice(range(self.header.labels_offset, 4)),
            classes: bytemuck::cast_slice(range(self.header.classes_offset, 1)),
        }
    }
}

/// One split's sequences, borrowed from the mapping.
#[derive(Clone, Copy, Debug)]
pub struct SplitView<'a> {
    pub seq_len: usize,
    pub input_ids: &'a [u32],
    pub labels: &'a [i32],
    pub classes: &'a [i8],
}

/// One sequence's three per-token arrays.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sequence<'a> {
    pub input_ids: &'a [u32],
    pub labels: &'a [i32],
    pub classes: &'a [i8],
}

/// The tensors of one micro-batch (spec §4.8): each `[b, T]`, i32 on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct MicroBatch {
    pub input_ids: HostTensor,
    /// All ones: packing never pads (§4.6).
    pub attention_mask: HostTensor,
    pub control_classes: HostTensor,
    pub labels: HostTensor,
}

impl<'a> SplitView<'a> {
    pub fn len(&self) -> usize {
        self.input_ids.len().checked_div(self.seq_len).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn sequence(&self, i: usize) -> Sequence<'a> {
        let r = i * self.seq_len..(i + 1) * self.seq_len;
        Sequence {
            input_ids: &self.input_ids[r.clone()],
            labels: &self.labels[r.clone()],
            classes: &self.classes[r],
        }
    }

    /// The sequences at `indices` stacked into `[indices.len(), T]` tensors.
    pub fn micro_batch(&self, indices: &[usize]) -> MicroBatch {
        let shape = [indices.len(), self.seq_len];
        let gather = |f: &dyn Fn(Sequence<'a>) -> Vec<i32>| {
            HostTensor::i32(
                shape,
                indices.iter().flat_map(|&i| f(self.sequence(i))).collect(),
            )
        };
        MicroBatch {
            input_ids: gather(&|s| s.input_ids.iter().map(|&x| x as i32).collect()),
            attention_mask: HostTensor::i32(shape, vec![1; indices.len() * self.seq_len]),
            control_classes: gather(&|s| s.classes.iter().map(|&x| x as i32).collect()),
            labels: gather(&|s| s.labels.to_vec()),
        }
    }
}
