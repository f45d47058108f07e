//! Scheduling policies: how the queue is ordered, whether a blocked job
//! holds back the ones behind it, backfill, preemption and GPU packing.
//!
//! Every named policy is one [`Policy`] value; the server uses
//! [`Policy::tessera`], the simulator any of [`Policy::NAMES`].

/// How jobs of the same priority class (and team, under fair share) are
/// ordered.
#[derive(Debug, Clone, PartialEq)]
pub enum Within {
    /// Submit order.
    Fifo,
    /// Shortest expected run time first (an oracle: needs `expected_runtime_ms`).
    ShortestJob,
    /// Shortest remaining expected run time first (oracle).
    ShortestRemaining,
    /// Least attained service first: GPU-time received so far (GPUs × time,
    /// one CPU-only replica counting as one GPU), the smallest first.
    LeastAttained,
    /// Multi-level feedback on attained service (Tiresias' discretised
    /// 2D-LAS): a job's level is the number of thresholds (GPU-seconds) its
    /// attained service has passed; lower levels first, submit order within
    /// a level.
    Levels(Vec<u64>),
}

/// How a replica's node is chosen among those it fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// The node left with the least free capacity.
    BestFit,
    /// The node whose leftover GPU capacity stays most usable for the jobs
    /// that typically arrive (fragmentation gradient descent, counting GPUs
    /// the node's free CPU and memory cannot feed as lost), best fit on
    /// ties; a share goes to the device that leaves its node least
    /// fragmented.
    Fragmentation,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    /// Higher-priority jobs always come first.
    pub priority_first: bool,
    /// Across teams, the team with the smallest weighted dominant share goes
    /// next (DRF over CPU, memory and GPUs).
    pub fair_share: bool,
    pub within: Within,
    /// Classic FIFO: once a job cannot start, none behind it may.
    pub strict: bool,
    /// The first job that cannot start gets a reservation; others may start
    /// only where they do not delay it.
    pub backfill: bool,
    /// Use `expected_runtime_ms` as the run-time bound of jobs without
    /// `max_runtime` (simulations with known durations).
    pub oracle_bounds: bool,
    /// Preempt running jobs that come later in the order than a waiting one
    /// (and are preemptible) to make room for it.
    pub preempt: bool,
    /// A running job is not preempted before it has run this long.
    pub min_run_before_preempt_ms: u64,
    /// A job within its team's guaranteed quota that has waited this long
    /// reclaims the capacity other teams borrow.
    pub reclaim_after_ms: u64,
    pub packing: Packing,
}

impl Policy {
    pub const NAMES: [&'static str; 8] = [
        "fifo",
        "fifo-backfill",
        "sjf-oracle",
        "srtf-oracle",
        "las",
        "tiresias",
        "drf",
        "tessera",
    ];

    fn base(name: &str, within: Within) -> Policy {
        Policy {
            name: name.to_string(),
            priority_first: true,
            fair_share: false,
            within,
            strict: false,
            backfill: false,
            oracle_bounds: false,
            preempt: false,
            min_run_before_preempt_ms: 0,
            reclaim_after_ms: 0,
            packing: Packing::BestFit,
        }
    }

    /// A policy by name, or `None`.
    pub fn named(name: &str) -> Option<Policy> {
        Some(match name {
            "fifo" => Policy {
                strict: true,
                ..Policy::base(name, Within::Fifo)
            },
            "fifo-backfill" => Policy {
                backfill: true,
                oracle_bounds: true,
                ..Policy::base(name, Within::Fifo)
            },
            "sjf-oracle" => Policy::base(name, Within::ShortestJob),
            "srtf-oracle" => Policy {
                preempt: true,
                ..Policy::base(name, Within::ShortestRemaining)
            },
            "las" => Policy {
                preempt: true,
                ..Policy::base(name, Within::LeastAttained)
            },
            "tiresias" => Policy {
                preempt: true,
                ..Policy::base(name, Within::Levels(vec![3_600]))
            },
            "drf" => Policy {
                fair_share: true,
                ..Policy::base(name, Within::Fifo)
            },
            "tessera" => Policy::tessera(),
            _ => return None,
        })
    }

    /// The server's default: priority classes, then weighted fair share
    /// across teams (DRF), then within a team least attained service
    /// in geometric levels (so nobody needs to know durations, and short
    /// jobs pass long ones), backfill behind a reservation so large and gang
    /// jobs are not starved, preemption by priority and level, and
    /// fragmentation-aware GPU packing.
    pub fn tessera() -> Policy {
        Policy {
            fair_share: true,
            backfill: true,
            preempt: true,
            min_run_before_preempt_ms: 60_000,
            reclaim_after_ms: 30_000,
            packing: Packing::Fragmentation,
            ..Policy::base(
                "tessera",
                // 10 GPU-minutes, then each level 4x the one before (~1.8 GPU-days).
                Within::Levels((0..8).map(|i| 600 * 4u64.pow(i)).collect()),
            )
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::tessera()
    }
}
