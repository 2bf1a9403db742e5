"""Label-efficiency studies (docs/evaluation.md, "Studies"): the papers' tables, reproducibly.

`run_study(StudyConfig)` is what `python -m launch.study` calls:
1. checks everything before any run starts: method and dataset names, the preset and every
   `--set` override against each method's `Config` (`check_config`), and that run folders left
   by an earlier invocation were made with the same settings;
2. finds the dataset's records before it plans (`resolve_records`): a `python -m
   launch.preprocess` child with the settings launch.train uses (dataset and options, data
   folder, N4, records_root, workers), so the records land in the fingerprint folder launch.train
   would use, preprocessed now if they are missing;
3. plans every (number of labeled subjects N × repeat k × method) as one ordinary training run in
   `out_dir/runs/<method>/l<N>/r<k>/`. Repeat k draws its labeled subjects with split seed s_k
   and trains with the same seed, for every method: the methods see the same labeled,
   validation and test subjects in repeat k, so their per-subject results are paired. The test
   and validation subjects of a draw do not depend on N (`tfseg.data.splits.draw_split`).
   `draws="independent"`: s_k = seed + k, so two repeats can draw the same labeled subjects (a
   small pool makes that likely). `draws="distinct"` (default): s_0 = seed, and s_k is the first
   seed after s_{k-1} whose labeled subjects differ, at every budget, from those of the earlier
   repeats (`repeat_seeds`; the same seeds as "independent" when nothing repeats). The pools
   come from the manifest of the records of step 2, so every repeat's seed is known before the
   first run starts;
4. runs each unfinished run as a `python -m launch.train --records_dir=<the records>` subprocess
   (which isolates TensorFlow's state and memory per run and dies with the study). A run whose
   `summary.json` (test split) and `metrics.csv` are present is skipped; an unfinished one
   resumes through launch.train's own resume. A progress line with an ETA follows every run;
5. aggregates (`aggregate_study`) into `out_dir/study.json`, `out_dir/study.md` and PNG plots.
   study.md lists the labeled subjects of every repeat (from each run's config.json) and warns
   when two repeats drew the same ones (with `draws="independent"`, or with fewer possible
   draws than repeats) or when the arms of one repeat did not train on the same subjects (then
   they are not paired). Aggregating alone (`launch.study --aggregate_only`) does not preprocess:
   the seeds of runs that never started come from the records a finished run names.

Statistics. Per method × N × class (plus "mean", each subject's mean over the foreground
classes): mean, population std (ddof=0, as summary.json) and median of the per-subject Dice and
HD95 (mm) of the test subjects, pooled over repeats. Paired two-sided Wilcoxon signed-rank tests
(`scipy.stats.wilcoxon(a, b)`, its defaults: zero_method "wilcox", exact for small samples
without ties) of every method against the baseline (supervised) and of the pairs the user names,
per N, class and metric (Dice and HD95; for HD95 the lower value counts as the better one). The
pairing key is (repeat, test subject): the same subject evaluated in two repeats gives two pairs
(trained on different labeled draws). Values come from each run's `metrics.csv` (the per-subject
rows), so the tables can be recomputed from the run folders. A test is reported as "n/a" with the
reason when there are fewer than `min_pairs` pairs or every difference is zero.

Modules: `plan` (settings, checks, runs and seeds), `runner` (records, child processes, resume),
`runs` (reading run folders), `stats` (summary statistics, Wilcoxon test), `report` (study.json,
study.md, plots). Everything public is importable from `tfseg.study`.
"""
from tfseg.study.plan import (DRAWS, MAX_SEED_TRIES, RUNS_DIR, RunSpec, StudyConfig,
                              check_config, data_flags, manifest_pools, method_fields,
                              parse_arm, plan_runs, plan_study, records_pools, repeat_seeds,
                              split_overrides)
from tfseg.study.report import (METRIC_TITLES, PAIRING_KEY, PLOTS_DIR, STD_NOTE,
                                aggregate_study, comparison_pairs, format_duration,
                                labeled_draws, study_markdown, write_plots)
from tfseg.study.runner import (LOG_NAME, PREPROCESS_LOG_NAME, check_existing, preprocess_argv,
                                resolve_records, run_study, subprocess_runner)
from tfseg.study.runs import (MEAN_CLASS, METRICS, REQUEST_NAME, is_complete, mean_dice,
                              read_metrics, read_request, run_labeled_subjects, run_values)
from tfseg.study.stats import LOWER_IS_BETTER, describe, paired_wilcoxon

__all__ = [
    "DRAWS", "LOG_NAME", "LOWER_IS_BETTER", "MAX_SEED_TRIES", "MEAN_CLASS", "METRICS",
    "METRIC_TITLES", "PAIRING_KEY", "PLOTS_DIR", "PREPROCESS_LOG_NAME", "REQUEST_NAME",
    "RUNS_DIR", "RunSpec", "STD_NOTE", "StudyConfig", "aggregate_study", "check_config",
    "check_existing", "comparison_pairs", "data_flags", "describe", "format_duration",
    "is_complete", "labeled_draws", "manifest_pools", "mean_dice", "method_fields",
    "paired_wilcoxon", "parse_arm", "plan_runs", "plan_study", "preprocess_argv", "read_metrics",
    "read_request", "records_pools", "repeat_seeds", "resolve_records", "run_labeled_subjects",
    "run_study", "run_values", "split_overrides", "study_markdown", "subprocess_runner",
    "write_plots",
]
