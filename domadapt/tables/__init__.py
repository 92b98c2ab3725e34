"""Result tables: the run directories of a sweep -> CSV tables plus a Markdown rendering.

Modules, one idea each (each imports only those before it): `records` (reading run
directories and sweep.json), `frames` (pandas tables of the runs), `comparisons` (paired
statistics), `render` (display tables, Markdown, atomic writers), `trials` (one trial per cell
of a hyper-parameter search, chosen by the `select` rule), `versus` (sweep against sweep),
`writer` (`write_tables`). The names other code uses are re-exported here.

A run counts once its `metrics.json` exists (train writes it last: the done marker); its
`config.json` says what it was. Which rows and columns a table has, and in which order, comes
from the sweep's record (`sweep.json`, a `Layout`), so a partial sweep shows empty cells, not
missing rows. Every file goes through `domadapt.io` (write a temp file, rename), so tables can
be rebuilt at any moment, also while sweeps are writing into the same directory.

Files written into the results directory:

- `runs.csv`: one row per finished run (accuracies in percent); of a hyper-parameter search
  every trial, with `hparams_trial`, and `trials.csv` (`domadapt.tables.trials`).
- `summary.csv`: the machine-readable numbers behind the display tables, one row per
  (setting, row, method, norm): `n_seeds`, `mean`, `std` in percent (sample std, ddof=1).
- `transfer_table.csv/.md`: rows = tasks (`Ar->Cl`, ...) in canonical order + `Avg`; one
  column per method/norm, "mean ± std" over seeds (the mean alone for one seed); a
  `<method> BIN - BN` column (difference of means) per method for every norm run beside the
  baseline norm (`bn` unless the sweep has none), and a footer row `>= BN` counting the tasks
  where that norm's mean is at least the baseline's.
- `multidomain_table.csv/.md`: rows = domains + `Avg`; one column per norm, likewise.
- `dg_table.csv/.md` (domain generalization, `sweep --dg`): rows = held-out domains + `Avg`;
  one column per norm (DG runs are source-only), likewise; the rows pair like transfer tasks.
- `comparison.csv/.md`: paired statistics over seeds (`domadapt.stats.all_comparisons`) for
  every norm vs the baseline norm (within each method) and every method vs `source-only`
  (within each norm): per task (row) n paired seeds, mean difference, 95% Student-t interval;
  per comparison (task = `all`) the number of pairs over tasks x seeds and a two-sided
  Wilcoxon signed-rank test (W, p, exact or normal approximation), and (task = `task means`)
  the same over the per-task mean differences with a t interval over tasks. The `>= BN`
  footer of the display tables carries the `task means` test's p and n beside its count.
- `stability.csv/.md`: per task and method/norm, the seed std of the reported accuracy and
  the swing of each run's target accuracy over its evaluations from mid-training on
  (`stability_frame`).
- `trajectory.csv/.md`: per setting, method/norm and evaluated iteration, the mean over runs
  (tasks x seeds) of the target accuracy and of the norm's diagnostics (e.g. `mean_gate`):
  whether accuracy and gates have settled by the last iteration (`trajectory_frame`).
- `gates_by_layer.csv` (when BIN runs wrote gates.csv): the gates per layer, pooled over
  tasks and seeds per setting/method/norm (`gates_frame`); `domadapt compare` draws it.
- `versus.csv/.md` (`write_versus`, `domadapt versus A B`, not part of a sweep's tables): one
  sweep against another, runs paired by task, method, norm and seed; with BIN gate records on
  both sides also `versus_gates.csv` (the paired runs' gates per layer and sweep,
  `versus_gates`), whose network-wide totals are a section of versus.md.
- `selection_table.csv/.md`: for every selection rule the runs recorded
  (`domadapt.selection`), the mean selected target accuracy per setting/method/norm and its
  regret (oracle - rule, percentage points); from log.csv, whatever `select` is.

`Avg` of a column is the mean over rows of each seed's accuracies, then mean ± std over those
seeds; only seeds with every row finished count, so a partial column has no average.

Model selection (`select`): which of a run's logged evaluations (log.csv) the tables report.
`last` (default) reports metrics.json's numbers and writes the file names above. Any other rule
writes `transfer_table_select-<rule>.csv/.md`, `multidomain_table_select-<rule>...`,
`dg_table_select-<rule>...`, `summary_select-<rule>.csv`, `comparison_select-<rule>.csv/.md`
and `runs_select-<rule>.csv` (the evaluation chosen per run) beside them, never over them: the
sweep rewrites the `last` tables after every cell, and the headline tables never silently
become target-label-selected. The Markdown heading names the rule; `oracle` is labelled as
using target labels. A multi-domain run's rule picks on `target_acc` (the domains' mean); its
per-domain numbers (`acc_<domain>`) are that row's. A dg run records no validator that reads
the target (val_entropy, val_snd, val_dev), so those rules leave the dg table out; `source`
is DomainBed's training-domain validation. A run without log.csv has no evaluations to choose
from: fine for `last`, a UserError for the other rules (and it is left out of the selection
table).
"""

from domadapt.tables.comparisons import COMPARISON_COLUMNS, stack_comparison
from domadapt.tables.frames import gates_frame, selected_scores
from domadapt.tables.records import Layout, dataset_layout, load_sweep, relative_path
from domadapt.tables.render import (
    comparison_sections,
    markdown_table,
    write_csv_atomic,
    write_markdown_parts,
)
from domadapt.tables.versus import VERSUS_GATES, versus_gates, write_versus
from domadapt.tables.writer import GATES_BY_LAYER, STAT_COLUMNS, write_tables

__all__ = [
    "COMPARISON_COLUMNS", "GATES_BY_LAYER", "STAT_COLUMNS", "VERSUS_GATES", "Layout",
    "comparison_sections", "dataset_layout", "gates_frame", "load_sweep", "markdown_table",
    "relative_path", "selected_scores", "stack_comparison", "versus_gates", "write_csv_atomic",
    "write_markdown_parts", "write_tables", "write_versus",
]
