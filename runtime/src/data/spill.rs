//! Temporary files that hold the pipeline's bulk data (tokenised documents, packed
//! sequences) outside the process's memory: written once, then read back piece by piece. The
//! page cache keeps them fast, but they do not count towards the process's resident memory,
//! which stays about the size of one input batch plus the tokenizer (issue 4's memory target).
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// An append-then-read temporary file in a given folder, removed when dropped (and, on
/// Unix, unlinked at once, so not even a killed process leaves it behind).
pub struct Spill {
    file: BufWriter<File>,
    path: PathBuf,
    len: u64,
    reading: bool,
}

impl Spill {
    pub fn new(dir: &Path, what: &str) -> Result<Spill> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the cache folder `{}`", dir.display()))?;
        let path = dir.join(format!(
            ".{what}.tmp-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create `{}`", path.display()))?;
        // Unix keeps the open file readable after unlinking it; elsewhere `Drop` removes it.
        if cfg!(unix) {
            let _ = std::fs::remove_file(&path);
        }
        Ok(Spill {
            file: BufWriter::with_capacity(1 << 20, file),
            path,
            len: 0,
            reading: false,
        })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn append(&mut self, bytes: &[u8]) -> Result<()> {
        if self.reading {
            bail!(
                "internal error: appending to `{}` after reading",
                self.path.display()
            );
        }
        self.file
            .write_all(bytes)
            .with_context(|| format!("cannot write `{}`", self.path.display()))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Fills `out` from byte `offset` (everything must have been appended by now).
    pub fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<()> {
        let path = &self.path;
        if !self.reading {
            self.file
                .flush()
                .with_context(|| format!("cannot write `{}`", path.display()))?;
            self.reading = true;
        }
        let f = self.file.get_mut();
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(out))
            .with_context(|| format!("cannot read back `{}`", path.display()))
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        if !cfg!(unix) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Tokenised documents in a [`Spill`]: document `i` is tokens `offsets[i]..offsets[i+1]`.
pub struct DocStore {
    tokens: Spill,
    offsets: Vec<u64>,
    classes: Vec<i8>,
}

impl DocStore {
    pub fn new(dir: &Path) -> Result<DocStore> {
        Ok(DocStore {
            tokens: Spill::new(dir, "tokens")?,
            offsets: vec![0],
            classes: vec![],
        })
    }

    pub fn len(&self) -> usize {
        self.classes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    pub fn push(&mut self, ids: &[u32], class: i8) -> Result<()> {
        // Little-endian on disk whatever the machine.
        let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
        self.tokens.append(&bytes)?;
        self.offsets
            .push(self.offsets.last().copied().unwrap_or(0) + ids.len() as u64);
        self.classes.push(class);
        Ok(())
    }

    /// Tokens of document `i`.
    pub fn doc_len(&self, i: usize) -> u64 {
        self.offsets[i + 1] - self.offsets[i]
    }

    pub fn class(&self, i: usize) -> i8 {
        self.classes[i]
    }

    /// The tokens of document `i`.
    pub fn read(&mut self, i: usize) -> Result<Vec<u32>> {
        let mut bytes = vec![0u8; 4 * self.doc_len(i) as usize];
        self.tokens.read_at(4 * self.offsets[i], &mut bytes)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
}
