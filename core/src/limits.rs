//! The bounds on an experiment spec, in one place so the README's "Limits" table, the CLI and the
//! coordinator all quote the same numbers.
//!
//! Every limit here bounds the work or memory that reading and validating one spec may cost,
//! whatever the spec says: a spec is text from a user, and the coordinator validates it while
//! serving everyone else. The budget limits ([`BudgetLimits`]) are different: they bound what an
//! accepted experiment may ask of the coordinator later, so each coordinator sets its own.

/// Largest experiment file, in bytes (1 MiB). The CLI checks it before parsing or sending; the
/// coordinator refuses larger `spec_yaml` with `INVALID_ARGUMENT`. A stored spec, normalised
/// and so often longer than the file it came from, is read back without this limit.
pub const MAX_SPEC_BYTES: usize = 1 << 20;

/// Largest total of the `--set` overrides of one submission, in bytes.
pub const MAX_OVERRIDE_BYTES: usize = 64 * 1024;

/// Most `--set` overrides of one submission.
pub const MAX_OVERRIDES: usize = 256;

/// Deepest nesting of YAML collections (a `trial.builtin` tree is the deepest a real spec goes).
pub const MAX_DEPTH: usize = 32;

/// Most YAML nodes in a spec once aliases are expanded: what a reader of the spec builds in
/// memory, so an alias "bomb" is refused before anything expands it.
pub const MAX_NODES: u64 = 200_000;

/// Most items in one YAML sequence or mapping (`values`, `command`, `env`, a `when` list...).
pub const MAX_ITEMS: usize = 10_000;

/// Longest string value, in bytes, after YAML unescaping.
pub const MAX_STRING_BYTES: usize = 64 * 1024;

/// Longest mapping key (parameter, variable, label or field name), in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Most parameters in `parameters`.
pub const MAX_PARAMETERS: usize = 1000;

/// Most points a grid search may have.
pub const MAX_GRID_POINTS: u64 = 10_000_000;

/// Most steps spent sizing a grid whose parameters have conditions. A real spec needs a few
/// hundred; only conditions tangled on purpose come near it.
pub const MAX_GRID_STEPS: u64 = 100_000;

/// Most candidates TPE may score per suggestion (`searcher.n_ei_candidates`): each costs a
/// density evaluation under the coordinator's lock.
pub const MAX_EI_CANDIDATES: u32 = 10_000;

/// Most errors reported for one spec; the rest are counted.
pub const MAX_ERRORS: usize = 100;

/// What one experiment may ask of a coordinator: set per coordinator (`--max-trials-per-experiment`,
/// `--max-parallel-trials`, `--max-restarts`), checked at submit and on `experiment update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLimits {
    /// Most trials one experiment may create (`max_trials`, or a grid's size without it).
    pub max_trials: u64,
    /// Most trials of one experiment running at once (`parallel_trials`).
    pub max_parallel_trials: u32,
    /// Most restarts of one trial (`max_restarts`).
    pub max_restarts: u32,
}

impl BudgetLimits {
    /// No budget limit at all: what the CLI validates with, since only the coordinator knows its own.
    pub const UNLIMITED: BudgetLimits = BudgetLimits {
        max_trials: u64::MAX,
        max_parallel_trials: u32::MAX,
        max_restarts: u32::MAX,
    };
}

impl Default for BudgetLimits {
    /// A coordinator's defaults. Trials are created `parallel_trials` at a time in one pass under
    /// the coordinator's lock, and every trial stays in its memory: these keep both small.
    fn default() -> Self {
        BudgetLimits {
            max_trials: 100_000,
            max_parallel_trials: 1_000,
            max_restarts: 100,
        }
    }
}
