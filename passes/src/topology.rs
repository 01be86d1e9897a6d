//! The `PP × DP` rank grid of spec §5.7.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("pipeline_stages must be at least 1")]
    NoStages,
    #[error(
        "pipeline_stages = {stages} does not divide the world size {world} (the number of \
         processes/GPUs); use a divisor of {world} or change the number of GPUs"
    )]
    NotDivisible { stages: usize, world: usize },
    #[error("rank {rank} is outside a world of {world}")]
    RankOutOfRange { rank: usize, world: usize },
}

/// Which rank holds which (pipeline stage, data-parallel replica).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub world_size: usize,
    pub pipeline_stages: usize,
    /// `use_column_major_topology`: a whole pipeline on consecutive ranks.
    pub column_major: bool,
}

impl Topology {
    pub fn new(
        world_size: usize,
        pipeline_stages: usize,
        column_major: bool,
    ) -> Result<Self, TopologyError> {
        if pipeline_stages == 0 {
            return Err(TopologyError::NoStages);
        }
        if world_size == 0 || !world_size.is_multiple_of(pipeline_stages) {
            return Err(TopologyError::NotDivisible {
                stages: pipeline_stages,
                world: world_size,
            });
        }
        Ok(Topology {
            world_size,
            pipeline_stages,
            column_major,
        })
    }

    /// Number of data-parallel replicas.
    pub fn data_parallel(&self) -> usize {
        self.world_size / self.pipeline_stages
    }

    /// `(stage, replica)` of a rank. Default (pipe-major) `rank = stage·DP + replica`, so
    /// the gradient all-reduce stays on neighbouring ranks; column-major
    /// `rank = replica·PP + stage`, so activations stay on neighbouring ranks (spec §5.7).
    pub fn coords(&self, rank: usize) -> Result<(usize, usize), TopologyError> {
        if rank >= self.world_size {
            return Err(TopologyError::RankOutOfRange {
                rank,
                world: self.world_size,
            });
        }
        let (pp, dp) = (self.pipeline_stages, self.data_parallel());
        Ok(if self.column_major {
            (rank % pp, rank / pp)
        } else {
            (rank / dp, rank % dp)
        })
    }

    /// The rank of `(stage, replica)`; both must be in range.
    pub fn rank(&self, stage: usize, replica: usize) -> usize {
        debug_assert!(stage < self.pipeline_stages && replica < self.data_parallel());
        if self.column_major {
            replica * self.pipeline_stages + stage
        } else {
            stage * self.data_parallel() + replica
        }
    }

    /// The data-parallel group of a stage: every replica's rank for it (all-reduce group).
    pub fn stage_ranks(&self, stage: usize) -> Vec<usize> {
        (0..self.data_parallel())
            .map(|r| self.rank(stage, r))
            .collect()
    }

    /// The ranks of one pipeline, stage 0 first (point-to-point activation path).
    pub fn pipeline_ranks(&self, replica: usize) -> Vec<usize> {
        (0..self.pipeline_stages)
            .map(|s| self.rank(s, replica))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_5_of_8_with_4_stages_is_stage_2_replica_1_pipe_major_and_1_1_column_major() {
        // spec §16 check 23
        let t = Topology::new(8, 4, false).unwrap();
        assert_eq!(t.coords(5).unwrap(), (2, 1));
        let c = Topology::new(8, 4, true).unwrap();
        assert_eq!(c.coords(5).unwrap(), (1, 1));
    }

    #[test]
    fn coords_and_rank_are_inverse_in_both_layouts() {
        for column_major in [false, true] {
            let t = Topology::new(12, 3, column_major).unwrap();
            for r in 0..12 {
                let (s, d) = t.coords(r).unwrap();
                assert_eq!(t.rank(s, d), r);
            }
            assert_eq!(t.pipeline_ranks(0).len(), 3);
            assert_eq!(t.stage_ranks(0).len(), 4);
        }
        let t = Topology::new(8, 4, false).unwrap();
        assert_eq!(t.stage_ranks(1), [2, 3]);
        assert_eq!(t.pipeline_ranks(1), [1, 3, 5, 7]);
    }

    #[test]
    fn pipeline_stages_must_divide_world_size() {
        let e = Topology::new(6, 4, false).unwrap_err();
        assert_eq!(
            e,
            TopologyError::NotDivisible {
                stages: 4,
                world: 6
            }
        );
        assert!(e.to_string().contains("does not divide"));
        assert_eq!(Topology::new(4, 0, false), Err(TopologyError::NoStages));
        assert!(Topology::new(8, 4, false).unwrap().coords(8).is_err());
    }
}
