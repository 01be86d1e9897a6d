//! The packing algorithm of spec §4.6 (checks 12–14) and its invariants on random inputs.
use qplc_runtime::data::pack::{pack, PackSettings, IGNORE};
use qplc_runtime::data::pipeline::prune_to_max_tokens;
use qplc_runtime::data::rng::SplitMix64;
use qplc_runtime::data::tokenize::Documents;

const BOS: u32 = 0;
const EOS: u32 = 1;

fn settings(t: usize, drop_tails: bool, max_sequences: Option<usize>) -> PackSettings {
    PackSettings {
        seq_len: t,
        prefix: vec![BOS],
        bos_id: Some(BOS),
        drop_tails,
        max_sequences,
        mask: vec![],
    }
}

/// Check 12's documents: A = a1…a5 E (class +1), B = b1…b9 E (class −1).
fn check12_docs() -> (Vec<u32>, Vec<u32>) {
    let a: Vec<u32> = (101..=105).chain([EOS]).collect();
    let b: Vec<u32> = (201..=209).chain([EOS]).collect();
    (a, b)
}

#[test]
fn packing_continues_a_document_into_the_next_sequence() {
    let (a, b) = check12_docs();
    let (p, stats) = pack([(&a[..], 1), (&b[..], -1)], &settings(8, false, None)).unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!(&p.input_ids[..8], &[BOS, 101, 102, 103, 104, 105, EOS, 201]);
    assert_eq!(&p.input_ids[8..], &[BOS, 202, 203, 204, 205, 206, 207, 208]);
    assert_eq!(&p.classes[..8], &[0, 1, 1, 1, 1, 1, 1, -1]);
    assert_eq!(&p.classes[8..], &[0, -1, -1, -1, -1, -1, -1, -1]);
    // No masking: labels are the ids, the BOS prefix included.
    let ids: Vec<i32> = p.input_ids.iter().map(|&x| x as i32).collect();
    assert_eq!(p.labels, ids);
    // b9 E are left in the partial third sequence, which is discarded.
    assert_eq!(stats.dropped_partial, 2);
    assert_eq!(stats.packed, 14);
}

#[test]
fn drop_tails_abandons_the_rest_of_an_overflowing_document() {
    let (a, b) = check12_docs();
    let (p, stats) = pack([(&a[..], 1), (&b[..], -1)], &settings(8, true, None)).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(&p.input_ids[..], &[BOS, 101, 102, 103, 104, 105, EOS, 201]);
    assert_eq!(stats.dropped_tails, 9);
}

#[test]
fn max_sequences_one_yields_exactly_one_sequence() {
    let (a, b) = check12_docs();
    let docs = [(&a[..], 1), (&b[..], -1), (&a[..], 1), (&b[..], -1)];
    let (p, stats) = pack(docs, &settings(8, false, Some(1))).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(stats.dropped_by_limit, 9 + 6 + 10);
    let (none, _) = pack(docs, &settings(8, false, Some(0))).unwrap();
    assert!(none.is_empty());
}

#[test]
fn max_tokens_keeps_documents_until_the_first_that_would_exceed() {
    let mut docs = Documents::new();
    for len in [4, 5, 3] {
        docs.push(&vec![7; len], 1);
    }
    assert_eq!(
        prune_to_max_tokens(|i| docs.doc(i).len() as u64, &[0, 1, 2], 10),
        2
    );
    // It stops at the first that would exceed, even if a later one would fit.
    assert_eq!(
        prune_to_max_tokens(|i| docs.doc(i).len() as u64, &[1, 0, 2], 8),
        1
    );
    assert_eq!(
        prune_to_max_tokens(|i| docs.doc(i).len() as u64, &[0, 1, 2], 12),
        3
    );
    assert_eq!(
        prune_to_max_tokens(|i| docs.doc(i).len() as u64, &[0, 1, 2], 3),
        0
    );
}

#[test]
fn a_prefix_as_long_as_the_sequence_is_an_error() {
    let mut s = settings(4, false, None);
    s.prefix = vec![BOS; 4];
    assert!(pack([(&[5u32][..], 1)], &s).is_err());
}

/// Random documents and settings: with every document token unique, the packed sequences
/// must hold each kept token exactly once, in document order, behind the prefix; labels and
/// classes must follow the tokens; and every dropped token must be accounted for.
#[test]
fn packing_keeps_every_token_once_and_in_order_for_random_inputs() {
    let mut rng = SplitMix64::new(7);
    for case in 0..400 {
        let t = 4 + rng.below(40) as usize;
        let prefix: Vec<u32> = (0..rng.below(3)).map(|_| BOS).collect();
        let drop_tails = rng.below(2) == 1;
        let max_sequences = match rng.below(3) {
            0 => Some(rng.below(6) as usize),
            _ => None,
        };
        // Unique ids from 1000 up; a document may start with BOS.
        let mut next = 1000u32;
        let mut docs: Vec<(Vec<u32>, i8)> = vec![];
        for _ in 0..rng.below(12) {
            let mut d: Vec<u32> = vec![];
            if rng.below(4) == 0 {
                d.push(BOS);
            }
            for _ in 0..rng.below(3 * t as u64) {
                d.push(next);
                next += 1;
            }
            let class = rng.below(3) as i8 - 1;
            docs.push((d, class));
        }
        // Mask a few random document ids, and sometimes the prefix BOS.
        let mut mask: Vec<u32> = (0..rng.below(4))
            .map(|_| 1000 + rng.below((next - 999) as u64) as u32)
            .collect();
        if rng.below(2) == 0 {
            mask.push(BOS);
        }
        mask.sort_unstable();
        mask.dedup();
        let s = PackSettings {
            seq_len: t,
            prefix: prefix.clone(),
            bos_id: Some(BOS),
            drop_tails,
            max_sequences,
            mask: mask.clone(),
        };
        let (p, stats) = pack(docs.iter().map(|(d, c)| (&d[..], *c)), &s).unwrap();
        let ctx = format!(
            "case {case}: T={t} prefix={prefix:?} drop_tails={drop_tails} max={max_sequences:?}"
        );

        assert_eq!(p.input_ids.len() % t, 0, "{ctx}");
        assert!(max_sequences.is_none_or(|m| p.len() <= m), "{ctx}");
        let class_of = |id: u32| {
            docs.iter()
                .find(|(d, _)| d.contains(&id))
                .map(|(_, c)| *c)
                .unwrap()
        };
        let mut body = vec![];
        for seq in 0..p.len() {
            let r = seq * t..(seq + 1) * t;
            assert_eq!(
                &p.input_ids[r.start..r.start + prefix.len()],
                &prefix[..],
                "{ctx}"
            );
            for i in r.clone() {
                let id = p.input_ids[i];
                let masked = mask.contains(&id);
                let in_prefix = i - r.start < prefix.len();
                let class = if masked || in_prefix { 0 } else { class_of(id) };
                assert_eq!(p.classes[i], class, "{ctx} position {i}");
                let label = if masked { IGNORE } else { id as i32 };
                assert_eq!(p.labels[i], label, "{ctx} position {i}");
            }
            // BOS never survives at the start of a document: only prefix tokens are BOS here.
            body.extend_from_slice(&p.input_ids[r.start + prefix.len()..r.end]);
            if drop_tails && seq > 0 {
                // Every sequence's first body token is the start of a document.
                let first = p.input_ids[r.start + prefix.len()];
                assert!(
                    docs.iter()
                        .any(|(d, _)| d.iter().find(|&&x| x != BOS) == Some(&first)),
                    "{ctx}"
                );
            }
        }
        assert!(!body.contains(&BOS), "{ctx}");
        // Unique, increasing ids: each token at most once, in order.
        assert!(body.windows(2).all(|w| w[0] < w[1]), "{ctx}");
        // What is kept of each document is a prefix of it (after its BOS).
        for (d, _) in &docs {
            let tokens: Vec<u32> = d.iter().copied().filter(|&x| x != BOS).collect();
            let kept: Vec<u32> = tokens
                .iter()
                .copied()
                .filter(|x| body.contains(x))
                .collect();
            assert_eq!(&tokens[..kept.len()], &kept[..], "{ctx}");
        }
        // Without drop_tails and without a limit, only the final partial sequence is lost.
        let stream: Vec<u32> = docs
            .iter()
            .flat_map(|(d, _)| d.iter().copied().filter(|&x| x != BOS))
            .collect();
        if !drop_tails && max_sequences.is_none() {
            assert_eq!(&stream[..body.len()], &body[..], "{ctx}");
            assert!(stream.len() - body.len() < t - prefix.len(), "{ctx}");
        }
        let total: usize = docs.iter().map(|(d, _)| d.len()).sum();
        assert_eq!(stats.document_tokens, total as u64, "{ctx}");
        assert_eq!(
            stats.bos_stripped
                + stats.packed
                + stats.dropped_tails
                + stats.dropped_partial
                + stats.dropped_by_limit,
            total as u64,
            "{ctx}"
        );
        assert_eq!(stats.packed, body.len() as u64, "{ctx}");
    }
}
