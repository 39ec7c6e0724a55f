//! The DRS driver: automation levels, recommendations with ids, approvals, and the
//! [`Migrator`] trait that carries approved moves out.
//!
//! [`Drs`] holds what persists between passes (hysteresis history, power-management streaks,
//! pending recommendations). It reads no clock: the caller calls [`Drs::pass`] every few minutes.
//!
//! - [`Automation::Manual`]: a pass yields [`Recommendation`]s; a person approves or rejects
//!   each by id. Initial placement is a recommendation too ([`Drs::place`] does not apply it).
//! - [`Automation::Partial`]: initial placement is automatic; migrations wait for approval.
//! - [`Automation::Full`]: the pass executes its migrations wave by wave through the
//!   [`Migrator`] and applies power actions.
//!
//! Approving a recommendation re-checks it against the current cluster; one the cluster has
//! since made stale (VM moved, capacity or rules changed, host state changed) is refused with
//! [`DrsError::Stale`]. A new pass replaces all pending recommendations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::balance::{self, History, Move, PassPlan, Planner, Stale};
use crate::config::{BalanceConfig, ConfigError};
use crate::dpm::{self, DpmConfig, DpmError, DpmState, PowerAction, PowerRec};
use crate::ledger::Ledger;
use crate::model::{Cluster, HostId, HostState, VmId};
use crate::placement::{self, PlacementError};
use crate::rules::RuleIndex;

/// How much DRS does on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Automation {
    /// Everything is a recommendation.
    Manual,
    /// Initial placement is automatic; migrations are recommendations.
    Partial,
    /// Everything is automatic.
    #[default]
    Full,
}

/// Whole DRS configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrsConfig {
    /// Automation level.
    pub automation: Automation,
    /// Balancing.
    pub balance: BalanceConfig,
    /// Power management.
    pub dpm: DpmConfig,
}

/// The error a [`Migrator`] reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct MigrateError {
    /// What went wrong.
    pub message: String,
}

/// Carries moves and power actions out (examples wire it to vmigrate and host management).
pub trait Migrator {
    /// Live-migrates `vm` from `from` to `to`; on error the VM is still on `from`.
    fn migrate(&mut self, vm: VmId, from: HostId, to: HostId) -> Result<(), MigrateError>;
    /// Powers a host into standby or wakes it; the default does nothing.
    fn set_power(&mut self, host: HostId, state: HostState) -> Result<(), MigrateError> {
        let _ = (host, state);
        Ok(())
    }
}

/// A [`Migrator`] that only records what it was asked to do (tests, dry runs, simulations).
#[derive(Debug, Clone, Default)]
pub struct RecordingMigrator {
    /// Migrations, in order.
    pub migrations: Vec<(VmId, HostId, HostId)>,
    /// Power actions, in order.
    pub power: Vec<(HostId, HostState)>,
    /// VMs whose migration fails.
    pub fail: Vec<VmId>,
}

impl Migrator for RecordingMigrator {
    fn migrate(&mut self, vm: VmId, from: HostId, to: HostId) -> Result<(), MigrateError> {
        if self.fail.contains(&vm) {
            return Err(MigrateError { message: format!("injected failure migrating {vm}") });
        }
        self.migrations.push((vm, from, to));
        Ok(())
    }
    fn set_power(&mut self, host: HostId, state: HostState) -> Result<(), MigrateError> {
        self.power.push((host, state));
        Ok(())
    }
}

/// What a recommendation asks for.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A migration.
    Migrate(Move),
    /// Migrations approved and carried out together (a must-affinity group leaving a host).
    MigrateGroup(Vec<Move>),
    /// A power action.
    Power(PowerRec),
    /// Initial placement of an unplaced VM.
    Place {
        /// The VM.
        vm: VmId,
        /// The host.
        host: HostId,
    },
}

/// A recommendation awaiting approval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recommendation {
    /// Id to approve or reject it by.
    pub id: u64,
    /// Pass that produced it.
    pub pass: u64,
    /// What to do, why, and what it should achieve.
    pub action: Action,
}

/// Errors of the DRS driver.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DrsError {
    /// Bad balancing configuration.
    #[error("balance config")]
    Config(#[from] ConfigError),
    /// Bad power management configuration.
    #[error("power management config")]
    Dpm(#[from] DpmError),
    /// No pending recommendation has this id (never issued, already decided, or superseded
    /// by a newer pass).
    #[error("no pending recommendation {0}")]
    UnknownRecommendation(u64),
    /// The recommendation no longer holds.
    #[error("recommendation {id} is stale: {why}")]
    Stale {
        /// Its id.
        id: u64,
        /// What changed.
        why: String,
    },
    /// The migrator failed.
    #[error("migrating {vm} from {from} to {to}")]
    Migrate {
        /// The VM.
        vm: VmId,
        /// Source.
        from: HostId,
        /// Destination.
        to: HostId,
        /// The migrator's error.
        #[source]
        source: MigrateError,
    },
    /// A power action failed.
    #[error("power action on {host}")]
    Power {
        /// The host.
        host: HostId,
        /// The migrator's error.
        #[source]
        source: MigrateError,
    },
    /// The cluster description is invalid.
    #[error("invalid cluster")]
    Model(#[from] crate::model::ModelError),
    /// Placement failed.
    #[error("placement")]
    Placement(#[from] PlacementError),
}

/// What one pass did or proposes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PassReport {
    /// Pass number.
    pub pass: u64,
    /// The plan (moves, waves, blocked VMs, imbalance before/after).
    pub plan: PassPlan,
    /// Power recommendation, if any.
    pub power: Option<PowerRec>,
    /// Moves executed (full automation).
    pub executed: Vec<Move>,
    /// Moves that failed or were skipped when executing, with the reason.
    pub failed: Vec<(Move, String)>,
    /// Ids of recommendations now pending (manual / partial automation).
    pub pending: Vec<u64>,
}

/// The DRS state machine.
#[derive(Debug, Clone)]
pub struct Drs {
    cfg: DrsConfig,
    history: History,
    dpm: DpmState,
    pending: BTreeMap<u64, Recommendation>,
    next_id: u64,
}

impl Drs {
    /// A DRS instance; validates the configuration.
    pub fn new(cfg: DrsConfig) -> Result<Self, DrsError> {
        cfg.balance.validate()?;
        cfg.dpm.validate()?;
        Ok(Drs {
            history: History::new(cfg.balance.no_return_passes),
            cfg,
            dpm: DpmState::default(),
            pending: BTreeMap::new(),
            next_id: 1,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DrsConfig {
        &self.cfg
    }

    /// The hysteresis history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Pending recommendations, by id.
    pub fn pending(&self) -> impl Iterator<Item = &Recommendation> {
        self.pending.values()
    }

    fn plan(&self, cluster: &Cluster, dpm_state: &mut DpmState) -> (PassPlan, Option<PowerRec>) {
        let mut p = Planner::new(cluster, &self.cfg.balance);
        p.use_stability(&self.history.demand);
        let plan_before = p.ledger.imbalance();
        p.evacuate_maintenance();
        p.fix_rules(true);
        p.fix_rules(false);
        let after_mandatory = p.ledger.imbalance();
        p.balance(&self.history);
        let power = dpm::plan_power(&mut p, &self.cfg.dpm, dpm_state);
        (p.finish(plan_before, after_mandatory), power)
    }

    /// Simulates a whole pass with capacity accounting without changing anything: what would
    /// move, where, and the imbalance after.
    pub fn dry_run(&self, cluster: &Cluster) -> Result<(PassPlan, Option<PowerRec>), DrsError> {
        cluster.validate()?;
        let mut s = self.dpm;
        let mut me = self.clone_for_dry_run();
        me.history.demand.observe(cluster);
        Ok(me.plan(cluster, &mut s))
    }

    fn clone_for_dry_run(&self) -> Drs {
        Drs {
            cfg: self.cfg.clone(),
            history: self.history.clone(),
            dpm: self.dpm,
            pending: BTreeMap::new(),
            next_id: self.next_id,
        }
    }

    /// Runs one pass. Full automation executes the moves wave by wave through `migrator`,
    /// updates `cluster`, and applies the power action; manual and partial automation replace
    /// the pending recommendations with this pass's.
    pub fn pass(
        &mut self,
        cluster: &mut Cluster,
        migrator: &mut dyn Migrator,
    ) -> Result<PassReport, DrsError> {
        cluster.validate()?;
        self.history.demand.observe(cluster);
        let mut dpm_state = self.dpm;
        let (plan, power) = self.plan(cluster, &mut dpm_state);
        self.dpm = dpm_state;
        let pass = self.history.pass;
        let mut report =
            PassReport { pass, plan, power, executed: Vec::new(), failed: Vec::new(), pending: Vec::new() };
        self.pending.clear();
        if self.cfg.automation == Automation::Full {
            self.execute(cluster, migrator, &mut report)?;
            self.history.record(&report.executed);
        } else {
            let moves = &report.plan.moves;
            let mut i = 0;
            while i < moves.len() {
                let mut j = i + 1;
                while j < moves.len() && moves[j].with_previous {
                    j += 1;
                }
                let action = if j - i == 1 {
                    Action::Migrate(moves[i].clone())
                } else {
                    Action::MigrateGroup(moves[i..j].to_vec())
                };
                let id = self.issue(action);
                report.pending.push(id);
                i = j;
            }
            if let Some(p) = &report.power {
                let id = self.issue(Action::Power(p.clone()));
                report.pending.push(id);
            }
            self.history.record(&[]);
        }
        Ok(report)
    }

    fn issue(&mut self, action: Action) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, Recommendation { id, pass: self.history.pass, action });
        id
    }

    fn execute(
        &mut self,
        cluster: &mut Cluster,
        migrator: &mut dyn Migrator,
        report: &mut PassReport,
    ) -> Result<(), DrsError> {
        let ent = crate::entitlement::compute(cluster);
        let mut ledger = Ledger::new(cluster, &ent);
        let rules = RuleIndex::new(cluster);
        let moves = &report.plan.moves;
        // Start index of the group (moves tied by `with_previous`) each move belongs to.
        let mut group_start = vec![0usize; moves.len()];
        for i in 0..moves.len() {
            group_start[i] = if moves[i].with_previous && i > 0 { group_start[i - 1] } else { i };
        }
        let mut group_ok: BTreeMap<usize, bool> = BTreeMap::new();
        for wave in &report.plan.waves {
            for &i in wave {
                let m = &moves[i];
                let g = group_start[i];
                let in_group = moves.get(g + 1).is_some_and(|n| n.with_previous);
                if in_group {
                    // A group is checked once, as a whole, when its first member comes up.
                    let ok = *group_ok.entry(g).or_insert_with(|| {
                        let end =
                            (g + 1..moves.len()).find(|&j| !moves[j].with_previous).unwrap_or(moves.len());
                        balance::check_group(cluster, &moves[g..end]).is_ok()
                    });
                    if !ok {
                        report.failed.push((m.clone(), "skipped: group no longer valid".into()));
                        continue;
                    }
                    migrate_and_record(
                        migrator,
                        &mut ledger,
                        cluster,
                        &mut report.executed,
                        &mut report.failed,
                        m,
                    );
                    continue;
                }
                // Re-check against what actually happened (an earlier failure changes things).
                let ok = ledger.where_is[m.vm.idx()] == Some(m.from)
                    && still_valid(ledger.check_move(cluster, &rules, m.vm, m.to, false), m, cluster);
                if !ok {
                    report.failed.push((m.clone(), "skipped: no longer valid".into()));
                    continue;
                }
                migrate_and_record(
                    migrator,
                    &mut ledger,
                    cluster,
                    &mut report.executed,
                    &mut report.failed,
                    m,
                );
            }
        }
        if let Some(p) = &report.power {
            self.apply_power(cluster, migrator, p)?;
        }
        Ok(())
    }

    fn apply_power(
        &self,
        cluster: &mut Cluster,
        migrator: &mut dyn Migrator,
        p: &PowerRec,
    ) -> Result<(), DrsError> {
        let state = match p.action {
            PowerAction::Standby => {
                if cluster.vms.iter().any(|v| v.host == Some(p.host)) {
                    return Ok(()); // evacuation incomplete: stay on
                }
                HostState::Standby
            }
            PowerAction::Wake => HostState::On,
        };
        migrator.set_power(p.host, state).map_err(|source| DrsError::Power { host: p.host, source })?;
        cluster.hosts[p.host.idx()].state = state;
        Ok(())
    }

    /// Approves and carries out a pending recommendation, after re-checking it against the
    /// current cluster.
    pub fn approve(
        &mut self,
        id: u64,
        cluster: &mut Cluster,
        migrator: &mut dyn Migrator,
    ) -> Result<(), DrsError> {
        if !self.pending.contains_key(&id) {
            return Err(DrsError::UnknownRecommendation(id));
        }
        cluster.validate()?;
        let rec = self.pending.remove(&id).ok_or(DrsError::UnknownRecommendation(id))?;
        let stale = |why: String| DrsError::Stale { id, why };
        match &rec.action {
            Action::Migrate(m) => {
                check_now(cluster, m).map_err(|e| stale(e.to_string()))?;
                self.carry_out(cluster, migrator, m, rec.pass)?;
            }
            Action::MigrateGroup(ms) => {
                // All or nothing: the group is checked as a whole.
                balance::check_group(cluster, ms).map_err(|e| stale(e.to_string()))?;
                for m in ms {
                    self.carry_out(cluster, migrator, m, rec.pass)?;
                }
            }
            Action::Power(p) => {
                let host =
                    cluster.hosts.get(p.host.idx()).ok_or_else(|| stale("host no longer exists".into()))?;
                match p.action {
                    PowerAction::Standby if host.state != HostState::On => {
                        return Err(stale(format!("{} is no longer powered on", p.host)));
                    }
                    PowerAction::Standby if cluster.vms.iter().any(|v| v.host == Some(p.host)) => {
                        return Err(stale(format!("{} still runs VMs", p.host)));
                    }
                    PowerAction::Wake if host.state != HostState::Standby => {
                        return Err(stale(format!("{} is no longer in standby", p.host)));
                    }
                    _ => {}
                }
                self.apply_power(cluster, migrator, p)?;
            }
            Action::Place { vm, host } => {
                let spec = cluster.vms.get(vm.idx()).ok_or_else(|| stale("VM no longer exists".into()))?;
                if spec.host.is_some() {
                    return Err(stale(format!("{vm} is already placed")));
                }
                let ent = crate::entitlement::compute(cluster);
                let ledger = Ledger::new(cluster, &ent);
                let rules = RuleIndex::new(cluster);
                ledger.fits(*vm, spec.wanted(), *host).map_err(|e| stale(e.to_string()))?;
                if let Some(r) = rules.first_broken(cluster, *vm, *host, &ledger.where_is, &ledger.on, false)
                {
                    return Err(stale(format!("would break must-rule '{}'", cluster.rules[r].name)));
                }
                cluster.vms[vm.idx()].host = Some(*host);
            }
        }
        Ok(())
    }

    fn carry_out(
        &mut self,
        cluster: &mut Cluster,
        migrator: &mut dyn Migrator,
        m: &Move,
        pass: u64,
    ) -> Result<(), DrsError> {
        migrator.migrate(m.vm, m.from, m.to).map_err(|source| DrsError::Migrate {
            vm: m.vm,
            from: m.from,
            to: m.to,
            source,
        })?;
        cluster.vms[m.vm.idx()].host = Some(m.to);
        self.history.note(pass, m.vm, m.from);
        Ok(())
    }

    /// Rejects a pending recommendation.
    pub fn reject(&mut self, id: u64) -> Result<Recommendation, DrsError> {
        self.pending.remove(&id).ok_or(DrsError::UnknownRecommendation(id))
    }

    /// Initial placement of an unplaced VM: applied in partial and full automation; in manual
    /// automation it becomes a pending recommendation and the cluster is unchanged. Returns the
    /// host and, in manual mode, the recommendation id.
    pub fn place(&mut self, cluster: &mut Cluster, vm: VmId) -> Result<(HostId, Option<u64>), DrsError> {
        let host = placement::place_one(cluster, vm)?;
        if self.cfg.automation == Automation::Manual {
            let id = self.issue(Action::Place { vm, host });
            return Ok((host, Some(id)));
        }
        cluster.vms[vm.idx()].host = Some(host);
        Ok((host, None))
    }
}

/// Re-checks a planned move against the cluster as it is now; a must-rule fix may "break"
/// the rule it fixes while its group is half moved.
fn check_now(cluster: &Cluster, m: &Move) -> Result<(), Stale> {
    match (balance::check_move(cluster, m.vm, m.from, m.to), &m.reason) {
        (Err(Stale::Rule(name)), balance::Reason::MustRule { rule, name: n })
            if *n == name && balance::fix_still_needed(cluster, *rule, m.vm, m.to) =>
        {
            Ok(())
        }
        (other, _) => other,
    }
}

/// Is a move still valid, given the result of re-checking it? A must-rule fix may "break" the
/// rule it fixes while its group is half moved.
fn still_valid(check: Result<(), crate::ledger::Constraint>, m: &Move, cluster: &Cluster) -> bool {
    match check {
        Ok(()) => true,
        Err(crate::ledger::Constraint::Rule(r)) => {
            matches!(&m.reason, balance::Reason::MustRule { rule, .. } if *rule == r)
                && balance::fix_still_needed(cluster, r, m.vm, m.to)
        }
        Err(_) => false,
    }
}

/// Carries out one planned move and records the outcome: on success the ledger and the cluster
/// follow the VM; on failure the migrator's message is kept.
fn migrate_and_record(
    migrator: &mut dyn Migrator,
    ledger: &mut Ledger,
    cluster: &mut Cluster,
    executed: &mut Vec<Move>,
    failed: &mut Vec<(Move, String)>,
    m: &Move,
) {
    match migrator.migrate(m.vm, m.from, m.to) {
        Ok(()) => {
            ledger.apply(m.vm, m.to);
            cluster.vms[m.vm.idx()].host = Some(m.to);
            executed.push(m.clone());
        }
        Err(e) => failed.push((m.clone(), e.message)),
    }
}
