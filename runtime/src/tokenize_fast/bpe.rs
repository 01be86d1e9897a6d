//! Byte-level BPE over raw bytes: the vocabulary and merges of a `tokenizer.json` with the
//! GPT-2 byte↔character mapping undone, and HF's merge order (lowest merge rank first, the
//! leftmost pair among equal ranks — `Word::merge_all`'s heap order).
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// FxHash (rustc's): a few multiply-rotates per word, plenty for short byte strings whose
/// adversary is English text.
#[derive(Default, Clone, Copy)]
pub struct Fx(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Fx {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(SEED);
    }
}

impl Hasher for Fx {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf));
        }
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

/// GPT-2's `bytes_to_unicode`: the printable character standing for each byte.
pub fn byte_chars() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut out = ['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).expect("a Latin-1 code point")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("a code point")
        };
    }
    out
}

pub struct Bpe {
    /// Token bytes → id.
    vocab: FxMap<Box<[u8]>, u32>,
    /// (left id, right id) → (rank, merged id), packed into u64s.
    merges: FxMap<u64, u64>,
    /// The id of each single byte.
    byte_ids: [u32; 256],
    /// HF `ignore_merges`: a piece that is itself a token is that token.
    ignore_merges: bool,
}

impl Bpe {
    /// `None` when the vocabulary cannot be read as byte-level tokens (a byte without a
    /// token, a merge whose parts or result are unknown).
    pub fn new(
        vocab: &HashMap<String, u32>,
        merges: &[(String, String)],
        ignore_merges: bool,
    ) -> Option<Bpe> {
        let chars = byte_chars();
        let mut byte_of: HashMap<char, u8> = HashMap::new();
        for (b, &c) in chars.iter().enumerate() {
            byte_of.insert(c, b as u8);
        }
        let to_bytes = |s: &str| -> Option<Box<[u8]>> {
            s.chars().map(|c| byte_of.get(&c).copied()).collect()
        };
        let mut bytes_vocab: FxMap<Box<[u8]>, u32> = FxMap::default();
        bytes_vocab.reserve(vocab.len());
        for (s, &id) in vocab {
            // Tokens outside the byte alphabet can never be produced from bytes.
            if let Some(b) = to_bytes(s) {
                bytes_vocab.insert(b, id);
            }
        }
        let mut byte_ids = [0u32; 256];
        for (b, c) in chars.iter().enumerate() {
            byte_ids[b] = *vocab.get(c.to_string().as_str())?;
        }
        let mut merge_map: FxMap<u64, u64> = FxMap::default();
        merge_map.reserve(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let ia = *vocab.get(a)?;
            let ib = *vocab.get(b)?;
            let merged = *vocab.get(format!("{a}{b}").as_str())?;
            // Later duplicates replace earlier ones, as in HF's map.
            merge_map.insert(pair(ia, ib), ((rank as u64) << 32) | merged as u64);
        }
        Some(Bpe {
            vocab: bytes_vocab,
            merges: merge_map,
            byte_ids,
            ignore_merges,
        })
    }

    /// Appends the ids of one pre-tokenised piece.
    pub fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        if piece.len() == 1 {
            out.push(self.byte_ids[piece[0] as usize]);
            return;
        }
        if self.ignore_merges {
            if let Some(&id) = self.vocab.get(piece) {
                out.push(id);
                return;
            }
        }
        let mut syms: Vec<u32> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
        // ranks[i]: the merge of syms[i] and syms[i+1] as (rank << 32 | id), or MAX.
        let lookup = |a: u32, b: u32| self.merges.get(&pair(a, b)).copied().unwrap_or(u64::MAX);
        let mut ranks: Vec<u64> = syms.windows(2).map(|w| lookup(w[0], w[1])).collect();
        // The lowest rank, leftmost on ties.
        while let Some((i, &best)) = ranks.iter().enumerate().min_by_key(|&(i, &r)| (r >> 32, i)) {
            if best == u64::MAX {
                break;
            }
            syms[i] = best as u32;
            syms.remove(i + 1);
            ranks.remove(i);
            if i > 0 {
                ranks[i - 1] = lookup(syms[i - 1], syms[i]);
            }
            if i < ranks.len() {
                ranks[i] = lookup(syms[i], syms[i + 1]);
            }
        }
        out.extend_from_slice(&syms);
    }
}

#[inline]
fn pair(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}
