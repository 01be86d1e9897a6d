//! Minimum s–t cut by Edmonds–Karp max-flow (BFS augmenting paths). The `recompute` pass
//! cuts one decoder layer at a time (tens of nodes), so the O(V·E²) bound never matters
//! and the simplest correct algorithm is the right one.
use std::collections::VecDeque;

/// A capacity no cut can pay: edges that must never be cut.
pub const INFINITE: u64 = u64::MAX / 4;

struct Edge {
    to: usize,
    cap: u64,
}

/// A directed flow network over nodes `0..n`.
pub struct FlowNetwork {
    /// `edges[2i]` is an edge, `edges[2i + 1]` its residual twin.
    edges: Vec<Edge>,
    out: Vec<Vec<usize>>,
}

impl FlowNetwork {
    pub fn new(n: usize) -> Self {
        FlowNetwork {
            edges: Vec::new(),
            out: vec![Vec::new(); n],
        }
    }

    pub fn add_edge(&mut self, from: usize, to: usize, cap: u64) {
        self.out[from].push(self.edges.len());
        self.edges.push(Edge { to, cap });
        self.out[to].push(self.edges.len());
        self.edges.push(Edge { to: from, cap: 0 });
    }

    /// Saturates the network from `s` to `t`; returns the flow (= the cut's capacity) and
    /// the source side of a minimum cut (nodes reachable from `s` in the residual graph).
    pub fn min_cut(&mut self, s: usize, t: usize) -> (u64, Vec<bool>) {
        let n = self.out.len();
        let mut flow = 0u64;
        loop {
            // BFS for a shortest augmenting path; `via[v]` is the edge that reached v.
            let mut via: Vec<Option<usize>> = vec![None; n];
            let mut seen = vec![false; n];
            seen[s] = true;
            let mut queue = VecDeque::from([s]);
            while let Some(u) = queue.pop_front() {
                for &e in &self.out[u] {
                    let v = self.edges[e].to;
                    if !seen[v] && self.edges[e].cap > 0 {
                        seen[v] = true;
                        via[v] = Some(e);
                        queue.push_back(v);
                    }
                }
            }
            if !seen[t] {
                return (flow, seen);
            }
            let mut push = INFINITE;
            let mut v = t;
            while let Some(e) = via[v] {
                push = push.min(self.edges[e].cap);
                v = self.edges[e ^ 1].to;
            }
            let mut v = t;
            while let Some(e) = via[v] {
                self.edges[e].cap -= push;
                self.edges[e ^ 1].cap += push;
                v = self.edges[e ^ 1].to;
            }
            flow = flow.saturating_add(push);
            if flow >= INFINITE {
                // Only uncuttable paths join s and t; every node counts as source side.
                return (flow, vec![true; n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_takes_the_cheaper_of_two_bottlenecks() {
        // s → a (10) → b (3) → t, and s → c (4) → t: the cut is {a→b, c→t} = 7.
        let mut g = FlowNetwork::new(5);
        let (s, a, b, c, t) = (0, 1, 2, 3, 4);
        g.add_edge(s, a, INFINITE);
        g.add_edge(a, b, 3);
        g.add_edge(b, t, INFINITE);
        g.add_edge(s, c, 4);
        g.add_edge(c, t, INFINITE);
        let (flow, side) = g.min_cut(s, t);
        assert_eq!(flow, 7);
        assert_eq!(side, [true, true, false, false, false]);
    }

    #[test]
    fn shared_downstream_node_is_cut_once() {
        // Two sources of flow meet in m; cutting m (5) beats cutting both inputs (4 + 4).
        let mut g = FlowNetwork::new(6);
        let (s, x, y, m_in, m_out, t) = (0, 1, 2, 3, 4, 5);
        g.add_edge(s, x, INFINITE);
        g.add_edge(s, y, INFINITE);
        g.add_edge(x, m_in, 4);
        g.add_edge(y, m_in, 4);
        g.add_edge(m_in, m_out, 5);
        g.add_edge(m_out, t, INFINITE);
        let (flow, side) = g.min_cut(s, t);
        assert_eq!(flow, 5);
        assert!(side[m_in] && !side[m_out]);
    }
}
