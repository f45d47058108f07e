//! The event loop: jobs arrive and complete in virtual time; at each
//! distinct event time the simulator applies completions, then arrivals,
//! then calls [`tessera_scheduler::schedule`] and applies its plan until a
//! pass neither places nor preempts anything.
//!
//! The simulator holds its state in a [`Snapshot`] it keeps up to date
//! (free capacity per node and GPU slot, the queue, what runs), so a pass
//! costs no copying: a placement takes capacity, a completion or
//! preemption gives it back. Every plan is checked against that state (a
//! replica per assignment, the right GPUs, capacity actually free); a plan
//! that over-commits is an error, not a silent fix.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use tessera_core::JobId;
use tessera_scheduler::{
    queue_key, ranks_before, schedule, schedule_and_settle, schedule_without_reasons, Assignment,
    NodeView, Packing, PendingJob, Policy, QueueKey, RunningJob, Snapshot, TeamView,
};

use crate::trace::SimJob;

/// Scheduling passes at one virtual time before the simulator gives up on
/// reaching a fixed point (counted in [`EventRun::pass_cap_hits`]).
pub const MAX_PASSES_PER_EVENT: u32 = 64;

const NOT_RUNNING: usize = usize::MAX;
/// Up to this many jobs leave the queue by one bulk move each
/// ([`World::dequeue_in_order`]).
const FEW_TAKEN: usize = 8;
/// No job (an empty queue).
const NOT_QUEUED: JobId = JobId::MAX;

/// What became of one job.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub id: JobId,
    pub submit_ms: u64,
    /// First start, and the start of its last attempt.
    pub first_start_ms: u64,
    pub last_start_ms: u64,
    pub finish_ms: u64,
    /// Run time it needed (and got, over all attempts).
    pub run_ms: u64,
    /// Sum of the run time of its attempts (equals `run_ms`; kept as a
    /// check of preemption accounting).
    pub ran_ms: u64,
    pub gpu_milli: u64,
    pub preemptions: u32,
}

/// The result of replaying a trace under one policy.
#[derive(Debug, Clone)]
pub struct EventRun {
    pub policy: String,
    /// Finished jobs, by id.
    pub outcomes: Vec<Outcome>,
    /// Jobs still queued when no event was left (a policy that never
    /// starts them).
    pub unfinished: usize,
    pub preemptions: u64,
    pub schedule_calls: u64,
    /// Event times at which only jobs arrived and none of them could start,
    /// so no pass was run ([`arrivals_can_be_skipped`]).
    pub skipped_passes: u64,
    /// Passes after one that only placed jobs that were not run because
    /// they were sure to change nothing ([`confirmations_can_be_skipped`]).
    pub skipped_confirmations: u64,
    pub schedule_time: Duration,
    /// Event times at which passes still changed things after
    /// [`MAX_PASSES_PER_EVENT`].
    pub pass_cap_hits: u64,
    /// Passes after the first at an event time that still changed
    /// something (preemptions are followed by such passes).
    pub changing_confirmations: u64,
    /// The largest queue a pass saw.
    pub max_queue: usize,
    /// Preempted jobs started again at the very time they were stopped.
    pub restarted_at_once: u64,
    /// Preemptions whose beneficiary had not started by the end of that
    /// event time (room made for nothing, at least for now).
    pub preemptions_without_start: u64,
}

#[derive(Debug, Clone)]
struct JobState {
    attempt: u32,
    running_pos: usize,
    queue_pos: usize,
    started_at: u64,
    first_start: Option<u64>,
    attained_ms: u64,
    preemptions: u32,
    preempted_at: Option<u64>,
}

/// Under fair share the queue's order decides one thing: teams are
/// numbered in the order their first job appears in it, and that number
/// breaks exact ties between teams' shares. The order the queue has always
/// had in the simulator (arrivals and requeued jobs appended, a job leaving
/// replaced by the last one) is kept here as a list of job ids, `arrival`
/// (each job's place in it is its `queue_pos`); the queue itself holds each
/// team's jobs together and in key order, the teams' blocks in the order of
/// their first job in `arrival`. The scheduler then numbers the teams as it
/// did and finds each team's jobs already sorted.
struct TeamBlocks {
    /// Per job, its team.
    team_of: Vec<u32>,
    arrival: Vec<JobId>,
    /// Per team, its block's rank in the queue (meaningful while it has
    /// jobs queued), and how many jobs it has queued.
    rank: Vec<u32>,
    queued: Vec<u32>,
    next_rank: u32,
    /// Whether a job left `arrival` since the blocks were last put in order
    /// (appending never changes which team's first job comes first).
    moved: bool,
}

impl TeamBlocks {
    /// Where job `id` (in team `t`, with `key`) sorts in the queue.
    fn sort_key(&self, id: JobId, key: QueueKey) -> (u32, QueueKey) {
        (self.rank[self.team_of[id as usize] as usize], key)
    }
}

/// The mutable world: the snapshot the scheduler reads, kept current.
struct World<'a> {
    jobs: &'a [SimJob],
    snap: Snapshot,
    /// Keep the queue in the scheduler's order (see [`queue_order_matters`]).
    in_key_order: bool,
    /// Keep the queue in team blocks (see [`TeamBlocks`]).
    blocks: Option<TeamBlocks>,
    /// Per job, its key in the scheduler's order while it waits (`None`
    /// otherwise), in either of those modes.
    keys: Vec<Option<QueueKey>>,
    st: Vec<JobState>,
    /// (end time, job, attempt); stale entries are skipped.
    ends: BinaryHeap<Reverse<(u64, JobId, u32)>>,
    /// Per node, GPU index → slot; `None` where GPU `i` is slot `i` (the
    /// nodes we build).
    slot_of: Vec<Option<HashMap<u32, usize>>>,
    outcomes: Vec<Outcome>,
    preemptions: u64,
    restarted_at_once: u64,
    /// Jobs that preemptions at the current event time made room for.
    beneficiaries: Vec<JobId>,
}

impl<'a> World<'a> {
    fn pending(&self, j: &SimJob) -> PendingJob {
        let mut p = PendingJob::new(
            j.id,
            j.team.clone(),
            j.priority,
            j.submit_ms,
            j.resources.clone(),
            j.replicas,
        );
        p.expected_runtime_ms = Some(j.run_ms());
        p.max_runtime_ms = j.max_runtime_ms;
        // The simulation resumes a preempted job where it stopped.
        p.resumable = true;
        p
    }

    fn slot(&self, node: usize, gpu: u32) -> Result<usize> {
        let slot = match &self.slot_of[node] {
            Some(map) => map.get(&gpu).copied(),
            None => ((gpu as usize) < self.snap.nodes[node].gpus.len()).then_some(gpu as usize),
        };
        match slot {
            Some(s) => Ok(s),
            None => bail!("node {node} has no GPU {gpu}"),
        }
    }

    /// Takes (or with `give`, returns) one job's capacity on the nodes.
    fn account(&mut self, job: &PendingJob, assignments: &[Assignment], give: bool) -> Result<()> {
        let r = &job.resources;
        let per_gpu = if r.gpu > 0 { 1000 } else { r.gpu_milli };
        let want_gpus = if r.gpu > 0 {
            r.gpu as usize
        } else if r.gpu_milli > 0 {
            1
        } else {
            0
        };
        if !give {
            ensure!(
                assignments.len() == job.replicas as usize,
                "job {} has {} replicas but the plan places {}",
                job.id,
                job.replicas,
                assignments.len()
            );
        }
        for a in assignments {
            ensure!(
                a.node < self.snap.nodes.len(),
                "job {}: no node {}",
                job.id,
                a.node
            );
            ensure!(
                a.gpus.len() == want_gpus,
                "job {} replica {}: {} GPUs assigned, {} wanted",
                job.id,
                a.replica,
                a.gpus.len(),
                want_gpus
            );
            let slots: Vec<usize> = a
                .gpus
                .iter()
                .map(|g| self.slot(a.node, *g))
                .collect::<Result<_>>()?;
            let n = &mut self.snap.nodes[a.node];
            if give {
                n.free_cpu_milli += r.cpu_milli;
                n.free_memory_bytes += r.memory_bytes;
                for s in slots {
                    n.gpus[s].free_milli += per_gpu;
                    ensure!(
                        n.gpus[s].free_milli <= 1000,
                        "GPU {} on {} freed twice",
                        s,
                        n.name
                    );
                }
            } else {
                let (Some(cpu), Some(mem)) = (
                    n.free_cpu_milli.checked_sub(r.cpu_milli),
                    n.free_memory_bytes.checked_sub(r.memory_bytes),
                ) else {
                    bail!(
                        "job {}: the plan over-commits CPU or memory on {}",
                        job.id,
                        n.name
                    );
                };
                n.free_cpu_milli = cpu;
                n.free_memory_bytes = mem;
                for s in slots {
                    let g = &mut n.gpus[s];
                    ensure!(
                        g.healthy && g.free_milli >= per_gpu,
                        "job {}: the plan over-commits GPU {} on {} ({} free, {} wanted)",
                        job.id,
                        g.index,
                        n.name,
                        g.free_milli,
                        per_gpu
                    );
                    g.free_milli -= per_gpu;
                }
            }
        }
        Ok(())
    }

    fn start(&mut self, job: PendingJob, assignments: Vec<Assignment>, now: u64) -> Result<()> {
        self.account(&job, &assignments, false)?;
        let id = job.id as usize;
        let remaining = self.jobs[id].run_ms().saturating_sub(job.attained_ms);
        let s = &mut self.st[id];
        if s.preempted_at == Some(now) {
            self.restarted_at_once += 1;
        }
        s.started_at = now;
        s.first_start.get_or_insert(now);
        s.running_pos = self.snap.running.len();
        self.ends
            .push(Reverse((now + remaining, job.id, s.attempt)));
        self.snap.running.push(RunningJob {
            job,
            started_at: now,
            assignments,
            preemptible: true,
        });
        Ok(())
    }

    /// Removes a running job, gives its capacity back and returns it.
    fn stop(&mut self, id: JobId) -> Result<RunningJob> {
        let pos = self.st[id as usize].running_pos;
        ensure!(pos != NOT_RUNNING, "job {id} is not running");
        let r = self.snap.running.swap_remove(pos);
        if let Some(moved) = self.snap.running.get(pos) {
            self.st[moved.job.id as usize].running_pos = pos;
        }
        let s = &mut self.st[id as usize];
        s.running_pos = NOT_RUNNING;
        s.attempt += 1;
        self.account(&r.job, &r.assignments, true)?;
        Ok(r)
    }

    fn complete(&mut self, id: JobId, now: u64) -> Result<()> {
        let r = self.stop(id)?;
        let s = &self.st[id as usize];
        let j = &self.jobs[id as usize];
        self.outcomes.push(Outcome {
            id,
            submit_ms: j.submit_ms,
            first_start_ms: s.first_start.unwrap_or(r.started_at),
            last_start_ms: r.started_at,
            finish_ms: now,
            run_ms: j.run_ms(),
            ran_ms: s.attained_ms + (now - r.started_at),
            gpu_milli: j.gpu_milli(),
            preemptions: s.preemptions,
        });
        Ok(())
    }

    fn preempt(&mut self, id: JobId, now: u64) -> Result<()> {
        let r = self.stop(id)?;
        let mut job = r.job;
        job.attained_ms += now - r.started_at;
        let s = &mut self.st[id as usize];
        s.attained_ms = job.attained_ms;
        s.preemptions += 1;
        s.preempted_at = Some(now);
        self.preemptions += 1;
        self.enqueue(job);
        Ok(())
    }

    /// Adds a job to the queue: at the end, or in the scheduler's order
    /// when the queue is kept so (a requeued job's key counts the service
    /// it has had).
    fn enqueue(&mut self, job: PendingJob) {
        let id = job.id as usize;
        let q = &mut self.snap.queue;
        if let Some(b) = &mut self.blocks {
            self.st[id].queue_pos = b.arrival.len();
            b.arrival.push(job.id);
            let t = b.team_of[id] as usize;
            if b.queued[t] == 0 {
                // Its first job is the last in arrival order: its block
                // comes last.
                b.rank[t] = b.next_rank;
                b.next_rank += 1;
            }
            b.queued[t] += 1;
            let key = queue_key(&self.snap.policy, &job);
            let keys = &self.keys;
            let me = b.sort_key(job.id, key);
            let at =
                q.partition_point(|j| b.sort_key(j.id, keys[j.id as usize].expect("queued")) < me);
            q.insert(at, job);
            self.keys[id] = Some(key);
        } else if self.in_key_order {
            let key = queue_key(&self.snap.policy, &job);
            let keys = &self.keys;
            let at = q.partition_point(|j| keys[j.id as usize] < Some(key));
            q.insert(at, job);
            self.keys[id] = Some(key);
        } else {
            // Kept in key order, a job's place is found by bisection
            // (`position`); otherwise it is recorded.
            q.push(job);
            self.st[id].queue_pos = q.len() - 1;
        }
    }

    /// Where job `id` is in the queue, if it is queued.
    fn position(&self, id: JobId) -> Option<usize> {
        let i = id as usize;
        let q = &self.snap.queue;
        if let Some(b) = &self.blocks {
            let me = b.sort_key(id, (*self.keys.get(i)?)?);
            let pos = q.partition_point(|j| {
                b.sort_key(j.id, self.keys[j.id as usize].expect("queued")) < me
            });
            return (q.get(pos).is_some_and(|j| j.id == id)).then_some(pos);
        }
        if !self.in_key_order {
            let pos = self.st.get(i)?.queue_pos;
            return (pos != NOT_RUNNING).then_some(pos);
        }
        let key = (*self.keys.get(i)?)?;
        let pos = q.partition_point(|j| self.keys[j.id as usize] < Some(key));
        (q.get(pos).is_some_and(|j| j.id == id)).then_some(pos)
    }

    /// Queued job `id` (which must be queued).
    fn queued(&self, id: usize) -> &PendingJob {
        &self.snap.queue[self.position(id as JobId).expect("queued")]
    }

    /// Takes the jobs of `ids` out of the queue in one sweep that keeps the
    /// others in order (from the first one taken on); returns them in the
    /// order of `ids`.
    fn dequeue_in_order(&mut self, ids: &[JobId]) -> Result<Vec<PendingJob>> {
        let mut at: Vec<usize> = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(pos) = self.position(*id) else {
                bail!("the plan places job {id}, which is not queued");
            };
            at.push(pos);
        }
        at.sort_unstable();
        ensure!(
            at.windows(2).all(|w| w[0] < w[1]),
            "the plan places a job twice"
        );
        let Some(&first) = at.first() else {
            return Ok(Vec::new());
        };
        for id in ids {
            self.keys[*id as usize] = None;
        }
        let q = &mut self.snap.queue;
        if at.len() <= FEW_TAKEN {
            // A pass usually places a few jobs: remove each with one bulk
            // move of the jobs behind it (last first, so the positions of
            // the others hold), instead of moving the kept jobs one by one.
            let mut gone: Vec<PendingJob> = at.iter().rev().map(|p| q.remove(*p)).collect();
            return Ok(ids
                .iter()
                .map(|id| {
                    let k = gone.iter().position(|j| j.id == *id).expect("taken above");
                    gone.swap_remove(k)
                })
                .collect());
        }
        // Kept jobs move down over the taken ones, which end up at the back.
        let mut write = first;
        let mut taken = at.iter().peekable();
        for read in first..q.len() {
            if taken.next_if(|p| **p == read).is_some() {
                continue;
            }
            q.swap(read, write);
            write += 1;
        }
        let mut gone: HashMap<JobId, PendingJob> =
            q.split_off(write).into_iter().map(|j| (j.id, j)).collect();
        Ok(ids
            .iter()
            .map(|id| gone.remove(id).expect("taken above"))
            .collect())
    }

    /// Takes a job out of the queue in O(1).
    fn dequeue(&mut self, id: JobId) -> Result<PendingJob> {
        let pos = self
            .st
            .get(id as usize)
            .map(|s| s.queue_pos)
            .unwrap_or(NOT_RUNNING);
        ensure!(
            pos != NOT_RUNNING,
            "the plan places job {id}, which is not queued"
        );
        let job = self.snap.queue.swap_remove(pos);
        if let Some(moved) = self.snap.queue.get(pos) {
            self.st[moved.id as usize].queue_pos = pos;
        }
        self.st[id as usize].queue_pos = NOT_RUNNING;
        Ok(job)
    }

    /// Takes job `id` out of the arrival order of [`TeamBlocks`] as the
    /// queue used to lose it (the last job takes its place).
    fn leave_arrival_order(&mut self, id: JobId) -> Result<()> {
        let b = self.blocks.as_mut().expect("team blocks");
        let pos = self
            .st
            .get(id as usize)
            .map(|s| s.queue_pos)
            .unwrap_or(NOT_RUNNING);
        ensure!(
            pos != NOT_RUNNING,
            "the plan places job {id}, which is not queued"
        );
        b.arrival.swap_remove(pos);
        if let Some(moved) = b.arrival.get(pos) {
            self.st[*moved as usize].queue_pos = pos;
        }
        self.st[id as usize].queue_pos = NOT_RUNNING;
        b.queued[b.team_of[id as usize] as usize] -= 1;
        b.moved = true;
        Ok(())
    }

    /// Puts the teams' blocks in the order of their first jobs in the
    /// arrival order, where a job leaving it may have changed that.
    fn order_blocks(&mut self) {
        let Some(b) = &mut self.blocks else {
            return;
        };
        if !b.moved {
            return;
        }
        b.moved = false;
        let mut seen = vec![false; b.rank.len()];
        let mut order: Vec<u32> = Vec::new();
        for id in &b.arrival {
            let t = b.team_of[*id as usize];
            if !std::mem::replace(&mut seen[t as usize], true) {
                order.push(t);
            }
        }
        if order
            .windows(2)
            .all(|w| b.rank[w[0] as usize] < b.rank[w[1] as usize])
        {
            return;
        }
        for (r, t) in order.iter().enumerate() {
            b.rank[*t as usize] = r as u32;
        }
        b.next_rank = order.len() as u32;
        let keys = &self.keys;
        self.snap
            .queue
            .sort_unstable_by_key(|j| b.sort_key(j.id, keys[j.id as usize].expect("queued")));
    }

    /// Applies one plan; returns whether it changed anything.
    fn apply(&mut self, plan: tessera_scheduler::Plan, now: u64) -> Result<bool> {
        let changed = !plan.placements.is_empty() || !plan.preemptions.is_empty();
        if self.blocks.is_some() {
            // The arrival order loses them one by one, in the plan's order.
            for p in &plan.placements {
                self.leave_arrival_order(p.job_id)?;
            }
        }
        if self.in_key_order || self.blocks.is_some() {
            let ids: Vec<JobId> = plan.placements.iter().map(|p| p.job_id).collect();
            let jobs = self.dequeue_in_order(&ids)?;
            for (job, p) in jobs.into_iter().zip(plan.placements) {
                self.start(job, p.assignments, now)?;
            }
        } else {
            for p in plan.placements {
                let job = self.dequeue(p.job_id)?;
                self.start(job, p.assignments, now)?;
            }
        }
        for p in plan.preemptions {
            self.preempt(p.job_id, now)?;
            self.beneficiaries.push(p.for_job);
        }
        Ok(changed)
    }
}

/// Whether a pass that only placed jobs is sure to be followed by one that
/// does nothing. True without backfill and preemption (and without quotas,
/// which the simulator does not set): every job the pass left waiting
/// failed to fit on at least the capacity that is left now, and fits are
/// monotone in free capacity. With backfill the reservation can move once
/// the newly started jobs run, and preemptive policies may pick new
/// victims, so those confirm with another pass.
/// `confirmation_passes_are_no_ops` checks this on a Philly subset.
pub fn placements_reach_fixpoint(policy: &Policy) -> bool {
    !policy.backfill && !policy.preempt
}

/// Whether, under preemption, the pass after one that only placed jobs (no
/// preemption) at the same event time can be skipped when the placed jobs
/// are no victims for those still waiting ([`confirmation_is_a_no_op`]).
/// Sound for preemption without backfill, fair share, strict FIFO and
/// quotas, with the queue kept in the scheduler's order. Call the first pass
/// P1 and the next one P2, at the same time, with nothing in between but
/// P1's placements S:
///
/// - P2's walk places nothing. It walks the jobs P1 left waiting, in the
///   same order (keys of waiting jobs do not change, and the order is the
///   keys' order without fair share), on the capacity P1's walk ended with.
///   Each of them failed in P1's walk on at least that capacity (capacity
///   only shrinks during a walk; a job skipped for its shape had that shape
///   fail on more), and a job that does not fit some free capacity fits no
///   smaller one (whether a job fits is whether the nodes' slots for a
///   replica add up to its replicas, and slots only shrink with capacity).
///   Without backfill there is no reservation, without strict FIFO or
///   quotas nothing else decides.
/// - P2's preemption step then runs on the same capacity, the same waiting
///   jobs in the same order, and the same running jobs as P1's, plus S. A
///   job of S is a candidate victim only if it has run the policy's minimum
///   before preemption (not at all yet: never when that minimum is above
///   zero) and only for a waiting job it ranks after (priority class and
///   the policy's criterion; its key is still its queued one, having run
///   for no time). When it is no candidate for any waiting job, every
///   waiting job's victims, their order and the capacity they free are
///   those of P1, whose preemption step chose no victim; and the stop on
///   the worst victim left can only come earlier (P1 found nothing after
///   it). So P2 preempts nothing either: it changes nothing, and the event
///   time is settled.
///
/// `shortcuts_change_no_outcome` checks this on a Philly subset against
/// replays that run every pass.
pub fn confirmations_can_be_skipped(policy: &Policy) -> bool {
    policy.preempt && !policy.backfill && !policy.fair_share && !policy.strict
}

/// The state-dependent condition of [`confirmations_can_be_skipped`]: with
/// `worst_placed` the greatest key among the jobs the last pass placed and
/// `first_waiting` the smallest among those still queued, no placed job is
/// a victim for a waiting one in the next pass.
fn confirmation_is_a_no_op(
    policy: &Policy,
    worst_placed: &QueueKey,
    first_waiting: Option<&QueueKey>,
) -> bool {
    policy.min_run_before_preempt_ms > 0
        || first_waiting.is_none_or(|w| !worst_placed.ranks_after(w))
}

/// Whether the order of the snapshot's queue can change a plan: only fair
/// share's tie-break between teams of equal share reads it (the team seen
/// first in the queue goes first). Otherwise the simulator keeps the queue
/// sorted by [`queue_key`] (a job's key does not change while it waits, and
/// a requeued job is inserted by its new key), which the scheduler walks as
/// it stands instead of sorting it at every pass; under fair
/// share it keeps the order it always had (appended, and a job leaving is
/// replaced by the last), so plans stay exactly what they were.
pub fn queue_order_matters(policy: &Policy) -> bool {
    policy.fair_share
}

/// Whether, at an event time when jobs only arrived (nothing ended and no
/// capacity was freed since the last passes settled), a pass can be skipped
/// because it is sure to place nothing. Sound only for policies without
/// preemption, backfill and quotas: every job already queued has failed (or
/// was found not to fit) on at least the capacity free now, and fits are
/// monotone in free capacity, so only a newly arrived job could start — and
/// it cannot when no node has room for one replica of it, or, under strict
/// FIFO, when it ranks after a job already waiting.
pub fn arrivals_can_be_skipped(policy: &Policy) -> bool {
    !policy.preempt && !policy.backfill
}

/// Whether, under backfill, a pass at an event time when jobs only arrived
/// (nothing ended since the last passes settled, placing nothing) can be
/// decided by a pass over the first job already waiting and the arrivals
/// alone. Sound for backfill without preemption, fair share, strict FIFO,
/// quotas and fragmentation-aware packing (whose scoring reads the whole
/// queue), provided every arrival ranks after that first job and no running
/// job's bound has passed ([`backfill_arrivals_decide_alone`]). Then the
/// first job fails again on the same free capacity and gets the same
/// reservation (it depends on the time only through running jobs' end
/// times, which are later than now). Every other job waiting failed after
/// it on that capacity with that reservation at an earlier time, so it
/// fails again: capacity can only shrink within the pass, and a job in time
/// to run before the reservation now was in time then. What the full pass
/// places is what the arrivals place after the first job, in order: exactly
/// the small pass. When the small pass places nothing, no pass is needed;
/// otherwise the full passes run as usual. `shortcuts_change_no_outcome`
/// checks this on a Philly subset.
pub fn backfill_arrivals_can_be_decided_alone(policy: &Policy) -> bool {
    policy.backfill
        && !policy.preempt
        && !policy.fair_share
        && !policy.strict
        && policy.packing == Packing::BestFit
}

/// The conditions of [`backfill_arrivals_can_be_decided_alone`] that
/// depend on the state: every arrival ranks after `head`, and every running
/// job's run-time bound (as reservations read it) ends at `now` or later.
fn backfill_arrivals_decide_alone(
    w: &World,
    head: JobId,
    arrived: std::ops::Range<usize>,
    now: u64,
) -> bool {
    let policy = &w.snap.policy;
    let queued = |id: usize| w.queued(id);
    let h = queued(head as usize);
    arrived
        .into_iter()
        .all(|id| ranks_before(policy, h, queued(id)))
        && w.snap.running.iter().all(|r| {
            let bound = r.job.max_runtime_ms.or(if policy.oracle_bounds {
                r.job
                    .expected_runtime_ms
                    .map(|e| e.saturating_sub(r.job.attained_ms))
            } else {
                None
            });
            bound.is_none_or(|b| r.started_at.saturating_add(b) >= now)
        })
}

/// Whether one replica of `job` fits some node's free capacity now (GPU
/// models aside): a placement needs at least that.
fn might_fit(job: &PendingJob, nodes: &[NodeView]) -> bool {
    let r = &job.resources;
    nodes.iter().any(|n| {
        n.schedulable
            && n.free_cpu_milli >= r.cpu_milli
            && n.free_memory_bytes >= r.memory_bytes
            && (r.gpu == 0
                || n.gpus
                    .iter()
                    .filter(|g| g.healthy && g.free_milli >= 1000)
                    .count()
                    >= r.gpu as usize)
            && (r.gpu > 0
                || r.gpu_milli == 0
                || n.gpus
                    .iter()
                    .any(|g| g.healthy && g.free_milli >= r.gpu_milli))
    })
}

/// Replays `jobs` (sorted by submit time and numbered 0.. by
/// [`crate::trace::prepare`]) on `nodes` under `policy`. Every running job
/// is preemptible and resumable; every team weighs 1, without quota.
pub fn simulate(jobs: &[SimJob], nodes: &[NodeView], policy: Policy) -> Result<EventRun> {
    simulate_with(jobs, nodes, policy, false)
}

/// [`simulate`]; with `always_confirm`, none of the simulator's shortcuts
/// is taken: a pass that changed something is always followed by another,
/// even where [`placements_reach_fixpoint`] says it would do nothing; a pass
/// runs at every event time, even where [`arrivals_can_be_skipped`] says it
/// would place nothing; and the queue keeps its arrival order under every
/// policy ([`queue_order_matters`]); and every pass asks the scheduler for
/// the reasons of waiting jobs too ([`schedule_without_reasons`] is not
/// used). For testing that the shortcuts change no outcome.
pub fn simulate_with(
    jobs: &[SimJob],
    nodes: &[NodeView],
    policy: Policy,
    always_confirm: bool,
) -> Result<EventRun> {
    for (i, j) in jobs.iter().enumerate() {
        ensure!(
            j.id as usize == i,
            "jobs must be numbered in order (job {} at {i})",
            j.id
        );
        if i > 0 {
            ensure!(
                jobs[i - 1].submit_ms <= j.submit_ms,
                "jobs must be sorted by submit time"
            );
        }
    }
    let teams: BTreeSet<&str> = jobs.iter().map(|j| j.team.as_str()).collect();
    let name = policy.name.clone();
    let mut w = World {
        jobs,
        in_key_order: !queue_order_matters(&policy) && !always_confirm,
        blocks: (queue_order_matters(&policy) && !always_confirm).then(|| TeamBlocks {
            team_of: jobs
                .iter()
                .map(|j| {
                    teams
                        .iter()
                        .position(|t| *t == j.team.as_str())
                        .unwrap_or(0) as u32
                })
                .collect(),
            arrival: Vec::new(),
            rank: vec![0; teams.len()],
            queued: vec![0; teams.len()],
            next_rank: 0,
            moved: false,
        }),
        keys: vec![None; jobs.len()],
        snap: Snapshot {
            nodes: nodes.to_vec(),
            queue: Vec::new(),
            running: Vec::new(),
            teams: teams
                .iter()
                .map(|t| TeamView {
                    name: t.to_string(),
                    weight: 1.0,
                    quota: None,
                    recent_share: 0.0,
                })
                .collect(),
            policy,
        },
        st: vec![
            JobState {
                attempt: 0,
                running_pos: NOT_RUNNING,
                queue_pos: NOT_RUNNING,
                started_at: 0,
                first_start: None,
                attained_ms: 0,
                preemptions: 0,
                preempted_at: None,
            };
            jobs.len()
        ],
        ends: BinaryHeap::new(),
        slot_of: nodes
            .iter()
            .map(|n| {
                let identity = n
                    .gpus
                    .iter()
                    .enumerate()
                    .all(|(s, g)| g.index as usize == s);
                (!identity).then(|| {
                    n.gpus
                        .iter()
                        .enumerate()
                        .map(|(s, g)| (g.index, s))
                        .collect()
                })
            })
            .collect(),
        outcomes: Vec::with_capacity(jobs.len()),
        preemptions: 0,
        restarted_at_once: 0,
        beneficiaries: Vec::new(),
    };
    let mut next = 0usize;
    let mut calls = 0u64;
    let mut sched_time = Duration::ZERO;
    let mut cap_hits = 0u64;
    let mut max_queue = 0usize;
    let mut changing_confirmations = 0u64;
    let mut preemptions_without_start = 0u64;
    let fixpoint = placements_reach_fixpoint(&w.snap.policy);
    let skip_arrivals = arrivals_can_be_skipped(&w.snap.policy)
        && w.snap.teams.iter().all(|t| t.quota.is_none())
        && !always_confirm;
    // Whether the last passes reached a fixed point (nothing more to place),
    // and (under strict FIFO) the first job waiting since then, once known.
    let mut settled = true;
    let mut first_waiting: Option<JobId> = None;
    let skip_backfill = backfill_arrivals_can_be_decided_alone(&w.snap.policy)
        && w.snap.teams.iter().all(|t| t.quota.is_none())
        && !always_confirm;
    let mut head_waiting: Option<JobId> = None;
    let mut skipped_passes = 0u64;
    // Requires the queue in key order (`in_key_order`), as the keys of the
    // jobs placed and waiting are read from it.
    let skip_confirmations = confirmations_can_be_skipped(&w.snap.policy)
        && w.snap.teams.iter().all(|t| t.quota.is_none())
        && w.in_key_order;
    let mut skipped_confirmations = 0u64;
    loop {
        // Skip ends of attempts that were preempted.
        while let Some(Reverse((_, id, attempt))) = w.ends.peek() {
            let s = &w.st[*id as usize];
            if s.attempt == *attempt && s.running_pos != NOT_RUNNING {
                break;
            }
            w.ends.pop();
        }
        let t_arrival = jobs.get(next).map(|j| j.submit_ms);
        let t_end = w.ends.peek().map(|Reverse((t, _, _))| *t);
        let now = match (t_arrival, t_end) {
            (None, None) => break,
            (Some(a), None) => a,
            (None, Some(e)) => e,
            (Some(a), Some(e)) => a.min(e),
        };
        let mut freed = false;
        while let Some(&Reverse((t, id, attempt))) = w.ends.peek() {
            if t != now {
                break;
            }
            w.ends.pop();
            let s = &w.st[id as usize];
            if s.attempt == attempt && s.running_pos != NOT_RUNNING {
                w.complete(id, now)?;
                freed = true;
            }
        }
        let first_arrival = next;
        while next < jobs.len() && jobs[next].submit_ms == now {
            let p = w.pending(&jobs[next]);
            w.enqueue(p);
            next += 1;
        }
        if skip_arrivals && settled && !freed && !w.snap.queue.is_empty() {
            let queued = |id: usize| w.queued(id);
            let arrived = first_arrival..next;
            let mut may_start = arrived
                .clone()
                .any(|id| might_fit(queued(id), &w.snap.nodes));
            let policy = &w.snap.policy;
            if may_start && policy.strict {
                // The first job already waiting cannot start, and under
                // strict FIFO nothing ranked after it may.
                let first = *first_waiting.get_or_insert_with(|| {
                    w.snap
                        .queue
                        .iter()
                        .filter(|j| !arrived.contains(&(j.id as usize)))
                        .reduce(|a, b| if ranks_before(policy, b, a) { b } else { a })
                        .map_or(NOT_QUEUED, |j| j.id)
                });
                if first != NOT_QUEUED {
                    may_start = arrived
                        .clone()
                        .any(|id| ranks_before(policy, queued(id), queued(first as usize)));
                }
            }
            if !may_start {
                skipped_passes += 1;
                if let Some(mut first) = first_waiting {
                    // The arrivals join those waiting.
                    for id in arrived {
                        if first == NOT_QUEUED
                            || ranks_before(policy, queued(id), queued(first as usize))
                        {
                            first = id as JobId;
                        }
                    }
                    first_waiting = Some(first);
                }
                continue;
            }
        }
        if skip_backfill && settled && !freed && next > first_arrival {
            let arrived = first_arrival..next;
            // The first job already waiting, once known (arrivals that rank
            // after it leave it first).
            let head = *head_waiting.get_or_insert_with(|| {
                let policy = &w.snap.policy;
                w.snap
                    .queue
                    .iter()
                    .filter(|j| !arrived.contains(&(j.id as usize)))
                    .reduce(|a, b| if ranks_before(policy, b, a) { b } else { a })
                    .map_or(NOT_QUEUED, |j| j.id)
            });
            if head != NOT_QUEUED && backfill_arrivals_decide_alone(&w, head, arrived.clone(), now)
            {
                let mut trial: Vec<PendingJob> = Vec::with_capacity(arrived.len() + 1);
                trial.push(w.queued(head as usize).clone());
                for id in arrived.clone() {
                    trial.push(w.queued(id).clone());
                }
                let all = std::mem::replace(&mut w.snap.queue, trial);
                let t0 = Instant::now();
                let plan = schedule_without_reasons(&w.snap, now);
                sched_time += t0.elapsed();
                w.snap.queue = all;
                if plan.placements.is_empty() && plan.preemptions.is_empty() {
                    skipped_passes += 1;
                    continue;
                }
            }
        }
        settled = true;
        first_waiting = None;
        head_waiting = None;
        let mut passes = 0;
        while !w.snap.queue.is_empty() {
            if passes == MAX_PASSES_PER_EVENT {
                cap_hits += 1;
                settled = false;
                break;
            }
            passes += 1;
            max_queue = max_queue.max(w.snap.queue.len());
            let t0 = Instant::now();
            w.order_blocks();
            // The simulator reads no reasons for waiting jobs: the scheduler
            // writes none (and under strict FIFO stops at the blocked head),
            // with the same placements and preemptions.
            let (plan, settles) = if always_confirm {
                let mut plan = schedule(&w.snap, now);
                drop(std::mem::take(&mut plan.waiting));
                (plan, false)
            } else {
                schedule_and_settle(&w.snap, now)
            };
            sched_time += t0.elapsed();
            calls += 1;
            let preempted = !plan.preemptions.is_empty();
            // The greatest key among the jobs placed (read before they leave
            // the queue), when the next pass might be skipped.
            let worst_placed = if skip_confirmations && !preempted {
                plan.placements
                    .iter()
                    .filter_map(|p| w.keys.get(p.job_id as usize).copied().flatten())
                    .max()
            } else {
                None
            };
            if !w.apply(plan, now)? {
                break;
            }
            if passes > 1 {
                changing_confirmations += 1;
            }
            if !always_confirm && !preempted && fixpoint {
                break;
            }
            // The next pass is skipped where it is sure to change nothing:
            // the scheduler proved it, or no placed job is a victim for one
            // waiting. (At the pass cap the loop stops at its top, counting
            // the hit, as it would without the shortcuts.)
            if passes < MAX_PASSES_PER_EVENT {
                if settles {
                    if !w.snap.queue.is_empty() {
                        skipped_confirmations += 1;
                    }
                    break;
                }
                if let Some(worst) = worst_placed {
                    let first = w
                        .snap
                        .queue
                        .first()
                        .and_then(|j| w.keys[j.id as usize].as_ref());
                    if confirmation_is_a_no_op(&w.snap.policy, &worst, first) {
                        skipped_confirmations += 1;
                        break;
                    }
                }
            }
        }
        for b in std::mem::take(&mut w.beneficiaries) {
            let s = &w.st[b as usize];
            if s.running_pos == NOT_RUNNING || s.started_at != now {
                preemptions_without_start += 1;
            }
        }
    }
    let unfinished = w.snap.queue.len();
    let mut outcomes = w.outcomes;
    outcomes.sort_by_key(|o| o.id);
    Ok(EventRun {
        policy: name,
        outcomes,
        unfinished,
        preemptions: w.preemptions,
        restarted_at_once: w.restarted_at_once,
        preemptions_without_start,
        schedule_calls: calls,
        skipped_passes,
        skipped_confirmations,
        schedule_time: sched_time,
        pass_cap_hits: cap_hits,
        changing_confirmations,
        max_queue,
    })
}
