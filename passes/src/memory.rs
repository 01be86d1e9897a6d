//! Placing activation buffers in one arena per stage by liveness: buffers whose lifetimes
//! overlap get disjoint byte ranges, others may share. Greedy best-fit over buffers taken
//! largest first — the usual heuristic (TFLite's and XLA's arena planners do the same); it
//! is not optimal, but the peak it gives is what the runtime allocates, so the prediction
//! in the report is exact for the plan.
use serde::{Deserialize, Serialize};

/// Planner settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryOptions {
    /// Every buffer starts at a multiple of this many bytes (256: what `cudaMalloc`
    /// guarantees and what vectorised kernels assume).
    pub alignment: u64,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions { alignment: 256 }
    }
}

/// A buffer's need: `size` bytes held from step `first` through step `last` (inclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveRange {
    pub first: usize,
    pub last: usize,
    pub size: u64,
}

impl LiveRange {
    pub fn overlaps(&self, other: &LiveRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// Rounds `size` up to a multiple of `alignment` (an alignment of 0 or 1 leaves it).
pub fn align_up(size: u64, alignment: u64) -> u64 {
    if alignment <= 1 {
        size
    } else {
        size.div_ceil(alignment) * alignment
    }
}

/// Offsets for each range (sizes already aligned by the caller) and the arena size.
/// Guarantees: two ranges that overlap in time never overlap in bytes; every offset is a
/// multiple of `alignment` when sizes are; the arena is at most the sum of the sizes.
pub fn assign_offsets(ranges: &[LiveRange], alignment: u64) -> (Vec<u64>, u64) {
    let mut idx: Vec<usize> = (0..ranges.len()).collect();
    // Largest first, then earliest: big buffers fix the arena's shape, small ones fill
    // the gaps between them.
    idx.sort_by_key(|&i| (std::cmp::Reverse(ranges[i].size), ranges[i].first, i));
    let mut offsets = vec![0u64; ranges.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(ranges.len());
    let mut peak = 0u64;
    for i in idx {
        let r = ranges[i];
        if r.size == 0 {
            continue;
        }
        let mut live: Vec<(u64, u64)> = placed
            .iter()
            .filter(|&&p| ranges[p].overlaps(&r))
            .map(|&p| (offsets[p], offsets[p] + ranges[p].size))
            .collect();
        live.sort_unstable();
        // Scan the free gaps between the live buffers; keep the smallest that fits.
        let mut cursor = 0u64;
        let mut best: Option<(u64, u64)> = None; // (gap size, offset)
        for (start, end) in live {
            if start > cursor {
                let gap = start - cursor;
                if gap >= r.size && best.is_none_or(|(g, _)| gap < g) {
                    best = Some((gap, cursor));
                }
            }
            cursor = cursor.max(end);
        }
        let offset = best.map_or(align_up(cursor, alignment), |(_, o)| o);
        offsets[i] = offset;
        peak = peak.max(offset + r.size);
        placed.push(i);
    }
    (offsets, peak)
}

/// The largest sum of the sizes of ranges live at one step: what a runtime holds at its
/// worst when it allocates each value as it is written and frees it after its last reader
/// (the executor's `RunStats::peak_activation_bytes`) — no alignment, no fragmentation,
/// so it is a lower bound of any arena `assign_offsets` can give.
pub fn live_peak(ranges: &[LiveRange]) -> u64 {
    let Some(end) = ranges.iter().map(|r| r.last.max(r.first)).max() else {
        return 0;
    };
    // Size enters at `first`, leaves after `last`.
    let mut delta = vec![0i128; end + 2];
    for r in ranges {
        delta[r.first] += r.size as i128;
        delta[r.last.max(r.first) + 1] -= r.size as i128;
    }
    let (mut live, mut peak) = (0i128, 0i128);
    for d in delta {
        live += d;
        peak = peak.max(live);
    }
    peak as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_peak_sums_only_what_overlaps() {
        let mk = |first, last, size| LiveRange { first, last, size };
        assert_eq!(live_peak(&[]), 0);
        // 100 and 10 overlap at step 1; 1000 starts after 100 died.
        let r = [mk(0, 1, 100), mk(1, 3, 10), mk(2, 2, 1000)];
        assert_eq!(live_peak(&r), 1010);
        assert_eq!(live_peak(&[mk(0, 0, 7), mk(0, 0, 5)]), 12);
    }

    fn xorshift(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn disjoint_lifetimes_share_one_buffer() {
        let r = [
            LiveRange {
                first: 0,
                last: 1,
                size: 512,
            },
            LiveRange {
                first: 2,
                last: 3,
                size: 512,
            },
        ];
        let (off, peak) = assign_offsets(&r, 256);
        assert_eq!(off, [0, 0]);
        assert_eq!(peak, 512);
    }

    #[test]
    fn freed_space_between_live_buffers_is_reused() {
        let mk = |first, last, size| LiveRange { first, last, size };
        let r = [
            mk(0, 10, 1024), // a: [0, 1024)
            mk(0, 2, 1024),  // b: [1024, 2048), dead after step 2
            mk(0, 10, 1024), // c: [2048, 3072)
            mk(3, 10, 768),  // d: into b's hole, [1024, 1792)
            mk(4, 4, 256),   // e: the 256 bytes left in that hole
        ];
        let (off, peak) = assign_offsets(&r, 256);
        assert_eq!(off, [0, 1024, 2048, 1024, 1792]);
        assert_eq!(peak, 3072);
    }

    #[test]
    fn random_ranges_never_collide_and_peak_is_at_most_the_sum() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            let n = 1 + (xorshift(&mut seed) % 40) as usize;
            let ranges: Vec<LiveRange> = (0..n)
                .map(|_| {
                    let first = (xorshift(&mut seed) % 30) as usize;
                    let len = (xorshift(&mut seed) % 10) as usize;
                    let size = align_up(xorshift(&mut seed) % 5000, 64);
                    LiveRange {
                        first,
                        last: first + len,
                        size,
                    }
                })
                .collect();
            let (off, peak) = assign_offsets(&ranges, 64);
            let sum: u64 = ranges.iter().map(|r| r.size).sum();
            assert!(peak <= sum);
            // The arena is at least the largest set of simultaneously live bytes.
            let max_live = (0..40)
                .map(|t| {
                    ranges
                        .iter()
                        .filter(|r| r.first <= t && t <= r.last)
                        .map(|r| r.size)
                        .sum::<u64>()
                })
                .max()
                .unwrap();
            assert!(peak >= max_live);
            for i in 0..n {
                assert_eq!(off[i] % 64, 0);
                assert!(off[i] + ranges[i].size <= peak);
                for j in i + 1..n {
                    let (a, b) = (ranges[i], ranges[j]);
                    if a.size == 0 || b.size == 0 || !a.overlaps(&b) {
                        continue;
                    }
                    let disjoint = off[i] + a.size <= off[j] || off[j] + b.size <= off[i];
                    assert!(disjoint, "{a:?}@{} and {b:?}@{}", off[i], off[j]);
                }
            }
        }
    }
}
