"""The names of every file and folder of an experiment and of a model folder: the one place they are spelled.

```
EXP/                        = <storage>/<name>
  pipeline.json             the plan (experiment.plan.Plan); read by resume/retrain/status
  search_space.yaml         the space as run, for people to read (never read back)
  data_report.json          integrity report of the data used; environment.json: versions, devices, seeds
  optuna.journal            Optuna's study (optuna-dashboard opens it); ASHA-stopped trials are PRUNED
  trials.jsonl              the driver's record of trial events (start, complete, error), appended as they happen
  trial_<key>/              one model folder per trial (config.json, best-eNNNN.pt, resume.pt, history.jsonl,
                            preprocessing.json) plus Ray's own files (params.json, result.json, progress.csv, ...)
  predictions/<key>.npz|json  val/test probabilities and metrics of each finished trial's best weights
  results.parquet           one row per trial, written after the stage
  retrain/                  the retrain stage, laid out like the search (trial_<config>-s<seed>/, predictions/,
                            results.parquet), plus summary.csv and distribution.png
  ensemble/                 ensemble.json, metrics.csv, confusion_matrix.png
  explain/                  faithfulness.csv|json, contact sheets
  summary.md, report.html   what people read
```"""

from __future__ import annotations

PLAN_FILE = "pipeline.json"


SPACE_FILE = "search_space.yaml"


DATA_REPORT_FILE = "data_report.json"


ENVIRONMENT_FILE = "environment.json"


RESULTS_FILE = "results.parquet"


EVENTS_FILE = "trials.jsonl"  # not .json: Ray Tune copies .json files of a running experiment back and forth


JOURNAL_FILE = "optuna.journal"


PREDICTIONS_DIR = "predictions"


RETRAIN_DIR = "retrain"


ENSEMBLE_DIR = "ensemble"


SUMMARY_FILE = "summary.md"


TRIAL_PREFIX = "trial_"
