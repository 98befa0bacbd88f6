"""Evaluation: FD-domain / FID / IS / precision-recall, throughput, sharded sampling jobs, reports.

Entry points (imported lazily, so ``import genaccel.eval`` stays light):

* ``cli_main(argv)`` — ``genaccel eval`` (same as ``python -m genaccel.eval``);
* ``report_main(argv)`` — ``genaccel report runs/*.json``;
* ``fd_domain``, ``class_accuracy`` (:mod:`genaccel.eval.fd`), ``load_feature_extractor``;
* ``measure_latency``, ``measure_throughput``, ``environment`` (:mod:`genaccel.eval.throughput`);
* ``kernel_distance`` (KID), ``density_coverage``, ``f_score``; ``build_feature_extractor`` and
  ``register_feature_extractor`` (the ``--feature-extractor`` registry, :mod:`genaccel.eval.extractors`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "fd_domain": "genaccel.eval.fd", "class_accuracy": "genaccel.eval.fd", "frechet_distance": "genaccel.eval.fd",
    "feature_stats": "genaccel.eval.fd", "load_feature_extractor": "genaccel.eval.feature_extractor",
    "measure_latency": "genaccel.eval.throughput", "measure_throughput": "genaccel.eval.throughput",
    "environment": "genaccel.eval.throughput", "compute_metrics": "genaccel.eval.metrics",
    "kernel_distance": "genaccel.eval.kid", "density_coverage": "genaccel.eval.density_coverage",
    "f_score": "genaccel.eval.density_coverage", "build_feature_extractor": "genaccel.eval.extractors",
    "register_feature_extractor": "genaccel.eval.extractors",
}


def cli_main(argv: list[str] | None = None):
    """``genaccel eval ...``."""
    from genaccel.eval.__main__ import main

    return main(argv)


def report_main(argv: list[str] | None = None):
    """``genaccel report runs/*.json ...``."""
    from genaccel.eval.report import main

    return main(argv)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'genaccel.eval' has no attribute {name!r}")


__all__ = ["build_feature_extractor", "class_accuracy", "cli_main", "compute_metrics", "density_coverage",
           "environment", "f_score", "fd_domain", "feature_stats", "frechet_distance", "kernel_distance",
           "load_feature_extractor", "measure_latency", "measure_throughput", "register_feature_extractor",
           "report_main"]
