"""The third-party APIs genaccel relies on, checked against whatever releases this environment resolved.

A fresh venv takes the newest release of every dependency, so an API change must fail here with the
package and version named, not deep inside another test.
"""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from genaccel.data.skimage_crops import PHOTO_NAMES
from genaccel.pruning import compat

ROOT = Path(__file__).resolve().parents[1]


def declared_requirements() -> dict[str, Requirement]:
    """genaccel's runtime requirements as installed (the package metadata built from pyproject.toml)."""
    parsed = [Requirement(text) for text in requires("genaccel") or []]
    return {r.name.lower(): r for r in parsed if r.marker is None or "extra" not in str(r.marker)}


def test_installed_releases_satisfy_the_declared_ranges():
    wrong = [
        f"{name} {version(name)} is installed but genaccel declares {requirement.specifier}"
        for name, requirement in declared_requirements().items()
        if Version(version(name)) not in requirement.specifier
    ]
    assert not wrong, "\n".join(wrong)


def test_transformers_lower_bound_is_the_lowest_tested_release():
    """pyproject.toml, the pruning module's tested range, `.ci/run` and docs/pruning.md name the same releases."""
    specifier = declared_requirements()["transformers"].specifier
    lower = [spec.version for spec in specifier if spec.operator == ">="]
    low, high = compat.TESTED_TRANSFORMERS
    assert lower == [low], f"pyproject.toml declares transformers {specifier} but the tested range starts at {low}"
    assert f"transformers=={low}" in (ROOT / ".ci/run").read_text(), ".ci/run must test the lowest release"
    assert re.search(rf"{re.escape(low)} to {re.escape(high)}", (ROOT / "docs/pruning.md").read_text())


def test_transformers_api_the_pruning_hooks_touch():
    problems = compat.api_problems()
    assert not problems, "\n".join(problems)


# (package, module, attribute, parameters the call sites pass by name)
CALLED_APIS = [
    (
        "torch-fidelity",
        "torch_fidelity.feature_extractor_inceptionv3",
        "FeatureExtractorInceptionV3",
        ("feature_extractor_weights_path",),
    ),
    ("torch-fidelity", "torch_fidelity.feature_extractor_inceptionv3", "load_state_dict_from_url", ()),
    ("torch-fidelity", "torch_fidelity.metric_isc", "isc_features_to_metric", ("splits",)),
    ("torchvision", "torchvision.utils", "make_grid", ("nrow", "padding", "pad_value")),
    ("safetensors", "safetensors.torch", "save_file", ("metadata",)),
    ("safetensors", "safetensors.torch", "load_file", ()),
    ("torch", "torch", "load", ("weights_only",)),
]


@pytest.mark.parametrize("package,module,attribute,parameters", CALLED_APIS, ids=lambda v: str(v))
def test_called_api_exists(package, module, attribute, parameters):
    where = f"{package} {version(package)}"
    target = getattr(importlib.import_module(module), attribute, None)
    assert target is not None, f"{where}: {module}.{attribute} is gone; genaccel calls it"
    declared = inspect.signature(target).parameters
    missing = [name for name in parameters if name not in declared]
    assert not missing, f"{where}: {module}.{attribute} no longer takes {missing}; genaccel passes them"


def test_bundled_dataset_photos_still_ship_with_scikit_image():
    import skimage.data

    gone = [name for name in PHOTO_NAMES if not callable(getattr(skimage.data, name, None))]
    assert not gone, f"scikit-image {version('scikit-image')}: skimage.data no longer has {gone} (the bundled dataset)"
