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
    /// Least attained run time: wall time run so far over all attempts,
    /// whatever the job's width, the least first. A job's level is the
    /// power of two of its seconds run (0 below one second, then one level
    /// per doubling); only a job at a higher level is preempted for the
    /// order (a job is not stopped for one that has run almost as long),
    /// and under [`Policy::level_before_share`] the teams' shares order the
    /// jobs of one level.
    AttainedTime,
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
    /// Under fair share, the policy's level (its criterion as preemption
    /// compares it) comes before the teams' shares: a job of a lower level
    /// goes first whatever its team's share, and the team with the
    /// smallest share goes first among jobs of the same level. A job then
    /// takes room from another team's job of a higher level whatever their
    /// shares (the next pass still ranks it first, so nothing is handed
    /// back); within a level, fair share's rule for preemption holds.
    pub level_before_share: bool,
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
            level_before_share: false,
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

    /// The server's default: priority classes, then least attained run
    /// time in levels that double (so nobody needs to know durations, and
    /// short jobs pass long ones), weighted fair share across teams (DRF)
    /// among the jobs of one level, least attained time within a team's;
    /// backfill behind a reservation so large and gang jobs are not
    /// starved, preemption by priority and by level (never within one),
    /// and fragmentation-aware GPU packing.
    ///
    /// Run time, not GPU-time: the average completion time counts each job
    /// once whatever its width, and the least attained service stands in
    /// for the shortest remaining time, which is time. Levels before
    /// shares: fair share decides among jobs that have run about as long
    /// (within a factor of two), and bounds what a team takes from another
    /// within a level, but does not hold a short job behind another team's
    /// long one.
    pub fn tessera() -> Policy {
        Policy {
            fair_share: true,
            backfill: true,
            preempt: true,
            min_run_before_preempt_ms: 60_000,
            reclaim_after_ms: 30_000,
            packing: Packing::Fragmentation,
            level_before_share: true,
            ..Policy::base("tessera", Within::AttainedTime)
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::tessera()
    }
}
