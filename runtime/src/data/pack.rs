//! Packing documents into fixed-length sequences: the exact algorithm of spec §4.6.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The label of a position the loss ignores.
pub const IGNORE: i32 = -100;

#[derive(Clone, Debug, PartialEq)]
pub struct PackSettings {
    /// `T`.
    pub seq_len: usize,
    /// Starts every sequence, class 0.
    pub prefix: Vec<u32>,
    /// A document starting with this id loses it (§4.6 step 1, reference quirk §14.10).
    pub bos_id: Option<u32>,
    pub drop_tails: bool,
    pub max_sequences: Option<usize>,
    /// Sorted ids whose positions get label −100 and class 0.
    pub mask: Vec<u32>,
}

/// Packed sequences, stored flat: sequence `i` is `[i·T, (i+1)·T)` of each array.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Packed {
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// `input_ids` with masked positions set to −100.
    pub labels: Vec<i32>,
    /// Per-token control class; prefix and masked positions are 0.
    pub classes: Vec<i8>,
}

impl Packed {
    pub fn len(&self) -> usize {
        self.input_ids.len().checked_div(self.seq_len).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the tokens of the documents went. Every document token is counted exactly once:
/// `document_tokens = bos_stripped + packed + dropped_tails + dropped_partial + dropped_by_limit`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackStats {
    pub documents: u64,
    pub document_tokens: u64,
    /// Leading BOS tokens removed from documents.
    pub bos_stripped: u64,
    /// Document tokens placed in emitted sequences (prefix tokens not included).
    pub packed: u64,
    /// Rest-of-document tokens abandoned by `drop_tails`.
    pub dropped_tails: u64,
    /// Tokens of the last, partially filled sequence (always discarded).
    pub dropped_partial: u64,
    /// Tokens never reached because `max_sequences` was hit.
    pub dropped_by_limit: u64,
}

/// Packs documents (in the given order) into sequences, spec §4.6:
/// a sequence starts with the prefix; document tokens fill it back to back; a full sequence is
/// emitted and the document continues in the next one (or, with `drop_tails`, its rest is
/// abandoned); the final partial sequence is discarded; packing stops at `max_sequences`.
pub fn pack<'a>(
    docs: impl IntoIterator<Item = (&'a [u32], i8)>,
    s: &PackSettings,
) -> Result<(Packed, PackStats)> {
    let mut out = Packed {
        seq_len: s.seq_len,
        ..Packed::default()
    };
    let stats = pack_into(docs.into_iter().map(Ok), s, |seq| {
        out.input_ids.extend_from_slice(seq.input_ids);
        out.labels.extend_from_slice(seq.labels);
        out.classes.extend_from_slice(seq.classes);
        Ok(())
    })?;
    Ok((out, stats))
}

/// One packed sequence, `T` tokens per array.
#[derive(Clone, Copy, Debug)]
pub struct PackedSequence<'a> {
    pub input_ids: &'a [u32],
    pub labels: &'a [i32],
    pub classes: &'a [i8],
}

/// [`pack`] that hands each finished sequence to `emit` instead of keeping them, so a large
/// dataset streams into the cache file (only one sequence is held at a time). Documents come
/// as any owned or borrowed token list; an error reading one stops packing.
pub fn pack_into<D: AsRef<[u32]>>(
    docs: impl IntoIterator<Item = Result<(D, i8)>>,
    s: &PackSettings,
    mut emit: impl FnMut(PackedSequence<'_>) -> Result<()>,
) -> Result<PackStats> {
    let t = s.seq_len;
    if s.prefix.len() >= t {
        bail!(
            "the sequence prefix ({} tokens) leaves no room in a sequence of {t} tokens",
            s.prefix.len()
        );
    }
    let max = s.max_sequences.unwrap_or(usize::MAX);
    let masked = MaskSet::new(&s.mask);
    // The sequence being filled.
    let mut cur = Packed {
        seq_len: t,
        input_ids: Vec::with_capacity(t),
        labels: Vec::with_capacity(t),
        classes: Vec::with_capacity(t),
    };
    let mut stats = PackStats::default();
    let mut count = 0usize;
    if max > 0 {
        begin_sequence(&mut cur, &masked, &s.prefix);
    }
    for item in docs {
        let (doc, class) = item?;
        let doc = doc.as_ref();
        stats.documents += 1;
        stats.document_tokens += doc.len() as u64;
        if count >= max {
            stats.dropped_by_limit += doc.len() as u64;
            continue;
        }
        let mut k = 0;
        if s.bos_id.is_some() && doc.first().copied() == s.bos_id {
            k = 1;
            stats.bos_stripped += 1;
        }
        while k < doc.len() && count < max {
            let need = t - cur.input_ids.len();
            let take = need.min(doc.len() - k);
            for &id in &doc[k..k + take] {
                push_token(&mut cur, &masked, id, class);
            }
            k += take;
            if cur.input_ids.len() == t {
                count += 1;
                stats.packed += (t - s.prefix.len()) as u64;
                emit(PackedSequence {
                    input_ids: &cur.input_ids,
                    labels: &cur.labels,
                    classes: &cur.classes,
                })?;
                cur.input_ids.clear();
                cur.labels.clear();
                cur.classes.clear();
                if count < max {
                    begin_sequence(&mut cur, &masked, &s.prefix);
                }
                if s.drop_tails {
                    stats.dropped_tails += (doc.len() - k) as u64;
                    k = doc.len();
                }
            }
        }
        stats.dropped_by_limit += (doc.len() - k) as u64;
    }
    // §4.6 step 3: the partially filled sequence is discarded.
    let partial = cur.input_ids.len();
    if partial > 0 {
        stats.dropped_partial = (partial - s.prefix.len()) as u64;
    }
    Ok(stats)
}

fn begin_sequence(out: &mut Packed, masked: &MaskSet, prefix: &[u32]) {
    for &id in prefix {
        push_token(out, masked, id, 0);
    }
}

/// Appends one token; a masked id gets label −100 and class 0 (§4.6 table).
fn push_token(out: &mut Packed, masked: &MaskSet, id: u32, class: i8) {
    let is_masked = masked.contains(id);
    out.input_ids.push(id);
    out.labels.push(if is_masked { IGNORE } else { id as i32 });
    out.classes.push(if is_masked { 0 } else { class });
}

/// Membership test for masked ids: a bitmap over the ids up to the largest masked one.
struct MaskSet(Vec<bool>);

impl MaskSet {
    fn new(ids: &[u32]) -> Self {
        let len = ids.iter().max().map_or(0, |&m| m as usize + 1);
        let mut bits = vec![false; len];
        for &id in ids {
            bits[id as usize] = true;
        }
        MaskSet(bits)
    }

    fn contains(&self, id: u32) -> bool {
        self.0.get(id as usize).copied().unwrap_or(false)
    }
}
