//! The `layers_to_transform` selector grammar (spec §3.2, check 8): comma-separated items,
//! each `N` or `A:B` with an inclusive range, whitespace ignored, empty items skipped.
use std::collections::BTreeSet;

/// Parses a selector. An empty result means "all layers", which callers express as `None`.
pub fn parse_layer_selector(s: &str) -> Result<Option<BTreeSet<usize>>, String> {
    let mut out = BTreeSet::new();
    for item in s.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let num = |t: &str| -> Result<usize, String> {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{}` is not a layer index (expected N or A:B)", t.trim()))
        };
        match item.split_once(':') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range `{item}` is empty (start {a} > end {b})"));
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(num(item)?);
            }
        }
    }
    Ok(if out.is_empty() { None } else { Some(out) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[usize]) -> Option<BTreeSet<usize>> {
        Some(v.iter().copied().collect())
    }

    #[test]
    fn mixed_items_and_inclusive_ranges() {
        assert_eq!(
            parse_layer_selector("0:2, 5, 7:8").unwrap(),
            set(&[0, 1, 2, 5, 7, 8])
        );
    }

    #[test]
    fn range_end_is_inclusive() {
        let s = parse_layer_selector("16:31").unwrap().unwrap();
        assert_eq!(s.len(), 16);
        assert!(s.contains(&31));
    }

    #[test]
    fn empty_string_means_all_layers() {
        assert_eq!(parse_layer_selector("").unwrap(), None);
        assert_eq!(parse_layer_selector(" , ,").unwrap(), None);
    }

    #[test]
    fn garbage_is_rejected_with_the_item() {
        let e = parse_layer_selector("1,x").unwrap_err();
        assert!(e.contains("`x`"), "{e}");
        assert!(parse_layer_selector("5:2").is_err());
    }
}
