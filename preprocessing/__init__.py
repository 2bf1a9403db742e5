"""The offline preprocessing stage: raw scans -> one TFRecord shard per subject + manifest.json.

Entry points: `preprocess_dataset` (used by `launch.train` to preprocess on first use),
`run_preprocessing` (the CLI `python -m launch.preprocess`), and the pure per-subject transforms
`preprocess_volume` / `restore_geometry` shared with evaluation and prediction.
"""
from preprocessing.config import PreprocessConfig, fingerprint, records_dir, resolve_config
from preprocessing.runner import (PreprocessSummary, SubjectsSkippedError, preprocess_dataset,
                                  run_preprocessing)
from preprocessing.transforms import ProcessedVolume, preprocess_volume, restore_geometry
from preprocessing.writer import merge_manifests

__all__ = ["PreprocessConfig", "PreprocessSummary", "ProcessedVolume", "SubjectsSkippedError",
           "fingerprint", "merge_manifests", "preprocess_dataset", "preprocess_volume",
           "records_dir", "resolve_config", "restore_geometry", "run_preprocessing"]
