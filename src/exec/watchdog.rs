//! The stall watchdog: progress per rank from the engine's state files (relayed by the node
//! agents), a budget per phase, and the diagnosis when progress stops.
//!
//! ```text
//! agent Ranks frames ─► update(): a rank's `ticks` changed? ─► last progress = now
//! tick ─► check(now): quiet ≥ notice  ─► Notice  (console: "no progress for 12 s; waiting in …")
//!                     quiet ≥ budget  ─► Stall   (the dispatcher stops the job with it as the cause)
//!                     progress again  ─► Resumed (after a notice)
//! ```
//!
//! Budgets come from the phase the ranks are in (the most lenient one when they differ): a
//! first step (of this attempt: a resumed run warms up too) may compile and allocate for
//! minutes, a steady step is judged by the recent step times, loading and checkpoints get a
//! flat 30 minutes (their reads and writes hold no collective to count by). `--hang-timeout`
//! (cluster `hang_timeout`) replaces them all; zero turns the watchdog off. Ranks that write no
//! state file (MindSpeed-MM under torchrun, an old engine) are not watched: with no state from
//! any rank the watchdog stays silent, and so it does once every watched rank is done.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use mm_spec::flight::{diagnose, Diagnosis, Phase, RankView};
use tokio::time::Instant;

use crate::events::HostInfo;
use crate::exec::proto::RankReport;

/// How many recent step times the steady-step budget is judged by.
const STEP_WINDOW: usize = 16;

/// What the watchdog wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchAction {
    /// Progress stopped `quiet` ago: say so.
    Notice { quiet: Duration, budget: Duration, phase: &'static str, diagnosis: Diagnosis },
    /// The budget ran out: stop the job with this as the cause.
    Stall { quiet: Duration, budget: Duration, phase: &'static str, diagnosis: Diagnosis },
    /// Progress resumed after a notice.
    Resumed { after: Duration },
}

struct Watched {
    report: RankReport,
}

pub struct Watchdog {
    hang_timeout: Option<Duration>,
    /// rank → host name, every rank of the plan.
    hosts: BTreeMap<usize, String>,
    ranks: BTreeMap<usize, Watched>,
    /// rank → (pid, /proc state) of single-rank units without a state file yet.
    units: BTreeMap<usize, (u32, char)>,
    last_progress: Instant,
    /// The last progress before the stall a notice was given for.
    noticed: Option<Instant>,
    steps: VecDeque<f64>,
    /// The lowest watched rank's (iteration, when it got there).
    pace: Option<(usize, u64, Instant)>,
    /// The iteration the ranks started this attempt from (the first one reported).
    start: Option<u64>,
}

/// Budgets when `--hang-timeout` is not set; `first`: the attempt's first step.
fn phase_budget(phase: Phase, first: bool, median_step: Option<f64>) -> Duration {
    let secs = match phase {
        Phase::Rendezvous => 600.0,
        Phase::Loading => 1800.0,
        Phase::Step if first => 900.0,
        Phase::Step => median_step.map_or(600.0, |m| (20.0 * m).max(180.0)),
        Phase::Eval => 900.0,
        Phase::Checkpoint => 1800.0,
        Phase::Stopping => 1800.0,
        Phase::Done => 300.0,
    };
    Duration::from_secs_f64(secs)
}

impl Watchdog {
    pub fn new(hosts: &[HostInfo], hang_timeout: Option<Duration>, now: Instant) -> Watchdog {
        let hosts = hosts.iter().flat_map(|h| h.ranks.iter().map(|r| (*r, h.name.clone()))).collect();
        Watchdog {
            hang_timeout,
            hosts,
            ranks: BTreeMap::new(),
            units: BTreeMap::new(),
            last_progress: now,
            noticed: None,
            steps: VecDeque::new(),
            pace: None,
            start: None,
        }
    }

    /// A host's latest rank states; `units`: (rank, pid, /proc state) of its single-rank units.
    pub fn update(&mut self, reports: Vec<RankReport>, units: &[(usize, u32, char)], now: Instant) {
        for &(rank, pid, state) in units {
            self.units.insert(rank, (pid, state));
        }
        for report in reports {
            let rank = report.state.rank;
            self.start = Some(self.start.map_or(report.state.iteration, |s| s.min(report.state.iteration)));
            let changed = self.ranks.get(&rank).is_none_or(|w| w.report.state.ticks != report.state.ticks);
            if changed {
                self.last_progress = now;
            }
            self.ranks.insert(rank, Watched { report });
        }
        self.track_pace(now);
    }

    /// The launcher itself did not run for a while: its silence is not the ranks'.
    pub fn reset(&mut self, now: Instant) {
        self.last_progress = now;
        self.noticed = None;
    }

    fn track_pace(&mut self, now: Instant) {
        let Some((&rank, w)) = self.ranks.iter().next() else { return };
        let it = w.report.state.iteration;
        match self.pace {
            Some((r, last, at)) if r == rank && it > last => {
                if Some(last) > self.start {
                    // The attempt's first step includes the warm-up; it would skew the median.
                    let per = now.duration_since(at).as_secs_f64() / (it - last) as f64;
                    self.steps.push_back(per);
                    if self.steps.len() > STEP_WINDOW {
                        self.steps.pop_front();
                    }
                }
                self.pace = Some((rank, it, now));
            }
            Some((r, _, _)) if r == rank => {}
            _ => self.pace = Some((rank, it, now)),
        }
    }

    fn median_step(&self) -> Option<f64> {
        if self.steps.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = self.steps.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }

    /// (stall budget, notice threshold, the phase that set them).
    pub fn budget(&self) -> (Duration, Duration, &'static str) {
        let median = self.median_step();
        let first = |it: u64| self.start.is_none_or(|s| it <= s);
        let (budget, phase, first_step) = self
            .ranks
            .values()
            .map(|w| {
                let s = &w.report.state;
                (phase_budget(s.phase, first(s.iteration), median), s.phase, first(s.iteration))
            })
            .max_by_key(|(b, _, _)| *b)
            .unwrap_or((Duration::from_secs(600), Phase::Rendezvous, true));
        let label = if phase == Phase::Step && first_step { "first step" } else { phase.label() };
        let steady = phase == Phase::Step && !first_step;
        let notice = match self.hang_timeout {
            Some(h) => Duration::from_secs_f64(median.map_or(10.0, |m| (5.0 * m).max(10.0))).min(h / 2),
            // Steady steps: a few step times; elsewhere a third of the phase's budget (a long
            // load or save is not news).
            None if steady => Duration::from_secs_f64(median.map_or(30.0, |m| (5.0 * m).max(30.0))).min(budget / 2),
            None => budget / 3,
        };
        (self.hang_timeout.unwrap_or(budget), notice, label)
    }

    /// Every rank of the plan as the diagnosis sees it.
    pub fn diagnosis(&self) -> Diagnosis {
        let views: Vec<RankView> = self
            .hosts
            .iter()
            .map(|(&rank, host)| match self.ranks.get(&rank) {
                Some(w) => RankView {
                    rank,
                    host,
                    pid: Some(w.report.state.pid),
                    proc_state: w.report.proc_state,
                    state: Some(&w.report.state),
                },
                None => {
                    let unit = self.units.get(&rank);
                    RankView { rank, host, pid: unit.map(|u| u.0), proc_state: unit.map(|u| u.1), state: None }
                }
            })
            .collect();
        diagnose(&views)
    }

    /// What to do now; None while progress is fresh or nothing is watched.
    pub fn check(&mut self, now: Instant) -> Option<WatchAction> {
        let all_done = self.ranks.values().all(|w| w.report.state.phase == Phase::Done);
        if all_done || self.hang_timeout == Some(Duration::ZERO) {
            return None;
        }
        if let Some(began) = self.noticed.filter(|b| self.last_progress > *b) {
            self.noticed = None;
            return Some(WatchAction::Resumed { after: self.last_progress.duration_since(began) });
        }
        let quiet = now.duration_since(self.last_progress);
        let (budget, notice, phase) = self.budget();
        if quiet >= budget {
            return Some(WatchAction::Stall { quiet, budget, phase, diagnosis: self.diagnosis() });
        }
        if quiet >= notice && self.noticed.is_none() {
            self.noticed = Some(self.last_progress);
            return Some(WatchAction::Notice { quiet, budget, phase, diagnosis: self.diagnosis() });
        }
        None
    }

    /// The last state of every watched rank, for the run folder.
    pub fn snapshots(&self) -> Vec<(usize, String, RankReport)> {
        self.ranks.iter().map(|(r, w)| (*r, self.hosts.get(r).cloned().unwrap_or_default(), w.report.clone())).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use mm_spec::flight::{Collective, RankState};

    use super::*;

    fn hosts() -> Vec<HostInfo> {
        (0..2)
            .map(|i| HostInfo { name: format!("h{i}"), address: format!("10.0.0.{i}"), ranks: vec![2 * i, 2 * i + 1] })
            .collect()
    }

    /// Rank `rank`'s report: in the step's first all-reduce (world #12, "step totals") when
    /// `in_flight`, else stopped (state T) outside any collective.
    pub(crate) fn report(rank: usize, iteration: u64, ticks: u64, in_flight: bool) -> RankReport {
        let collectives = if in_flight {
            vec![Collective {
                group: "world".into(),
                seq: 12,
                op: "all_reduce".into(),
                what: "step totals".into(),
                bytes: 8,
                start_ms: 1,
                end_ms: None,
            }]
        } else {
            Vec::new()
        };
        RankReport {
            proc_state: Some(if in_flight { 'S' } else { 'T' }),
            state: RankState {
                rank,
                pid: 500 + rank as u32,
                phase: Phase::Step,
                iteration,
                ticks,
                updated_ms: 0,
                groups: [("world".to_string(), vec![0, 1, 2, 3])].into(),
                collectives,
                stop: None,
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_is_noticed_then_stopped_with_the_stopped_rank_named() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(&hosts(), Some(Duration::from_secs(20)), t0);
        assert_eq!(w.check(t0), None, "nothing watched yet");
        for i in 1..=5u64 {
            let now = t0 + Duration::from_millis(300 * i);
            w.update((0..4).map(|r| report(r, i, i, false)).collect(), &[], now);
        }
        let last = t0 + Duration::from_millis(1500);
        // Ranks 0, 1, 2 enter the next collective; rank 3 stops.
        let mut rs: Vec<RankReport> = (0..3).map(|r| report(r, 5, 6, true)).collect();
        rs.push(report(3, 5, 5, false));
        w.update(rs, &[], last);
        assert_eq!(w.check(last + Duration::from_secs(9)), None);
        match w.check(last + Duration::from_secs(10)) {
            Some(WatchAction::Notice { diagnosis, budget, phase, .. }) => {
                assert_eq!(diagnosis.culprits, vec![3]);
                assert_eq!(budget, Duration::from_secs(20));
                assert_eq!(phase, "step");
                assert!(
                    diagnosis.summary.contains("not arrived: rank 3 on h1 (pid 503; state T stopped"),
                    "{}",
                    diagnosis.summary
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(w.check(last + Duration::from_secs(11)), None, "one notice per stall");
        assert!(matches!(w.check(last + Duration::from_secs(20)), Some(WatchAction::Stall { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn default_budgets_follow_the_phase_and_the_step_times() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(&hosts(), None, t0);
        w.update(vec![report(0, 0, 1, false)], &[], t0);
        assert_eq!(w.budget(), (Duration::from_secs(900), Duration::from_secs(300), "first step"));
        for i in 1..=10u64 {
            w.update(vec![report(0, i, i + 1, false)], &[], t0 + Duration::from_secs(20 * i));
        }
        // 20 s steps: 20 × 20 s = 400 s budget, notice at 5 × 20 s.
        assert_eq!(w.budget(), (Duration::from_secs(400), Duration::from_secs(100), "step"));
        let mut resumed = w.check(t0 + Duration::from_secs(200 + 100));
        assert!(matches!(resumed, Some(WatchAction::Notice { .. })), "{resumed:?}");
        w.update(vec![report(0, 11, 99, false)], &[], t0 + Duration::from_secs(301));
        resumed = w.check(t0 + Duration::from_secs(302));
        assert_eq!(resumed, Some(WatchAction::Resumed { after: Duration::from_secs(101) }));
        // Every rank done: nothing to watch (post-processing after the engine is not a stall).
        let mut done = report(0, 12, 100, false);
        done.state.phase = Phase::Done;
        w.update(vec![done], &[], t0 + Duration::from_secs(303));
        assert_eq!(w.check(t0 + Duration::from_secs(5000)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_turns_it_off_and_a_resumed_attempt_gets_a_first_step() {
        let t0 = Instant::now();
        let mut off = Watchdog::new(&hosts(), Some(Duration::ZERO), t0);
        off.update(vec![report(0, 5, 1, false)], &[], t0);
        assert_eq!(off.check(t0 + Duration::from_secs(3600)), None);
        // Resumed at iteration 20: its first step has the first-step budget.
        let mut w = Watchdog::new(&hosts(), None, t0);
        w.update(vec![report(0, 20, 1, false)], &[], t0);
        assert_eq!(w.budget().2, "first step");
        w.update(vec![report(0, 21, 2, false)], &[], t0 + Duration::from_secs(60));
        assert_eq!(w.budget().2, "step");
        assert!(w.steps.is_empty(), "the warm-up step is not a step time");
    }
}
