"""Cache-argument spellings and the untested-release guard of `genaccel.pruning.compat`."""

from __future__ import annotations

import warnings

import pytest
import transformers

from genaccel import pruning
from genaccel.pruning import compat


def test_cache_argument_reads_both_spellings():
    cache = object()
    assert compat.cache_argument({"cache": cache}) is cache
    assert compat.cache_argument({"past_key_values": cache}) is cache
    assert compat.cache_argument({"past_key_values": None, "cache": None}) is None
    assert compat.MASK_CACHE_PARAMETER in compat.CACHE_ARGUMENTS


@pytest.mark.parametrize(
    "installed,outside",
    [("5.17.0", False), ("5.24.0", False), ("5.25.0", False), ("5.25.1", False), ("5.16.0", True), ("5.26.0.dev0", True), ("6.0.0", True)],
)
def test_untested_release_message(installed, outside):
    message = compat.untested_version_message(installed)
    assert (message is not None) == outside
    if outside:
        assert (
            installed in message
            and compat.TESTED_TRANSFORMERS[0] in message
            and compat.TESTED_TRANSFORMERS[1] in message
        )


def test_apply_warns_once_on_an_untested_release(llava, monkeypatch):
    model = llava
    monkeypatch.setattr(compat, "_warned", False)
    monkeypatch.setattr(transformers, "__version__", "99.0.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with pruning.apply(model, "uniform", keep=4):
                pass
    untested = [w for w in caught if "99.0.0" in str(w.message)]
    assert len(untested) == 1 and compat.TESTED_TRANSFORMERS[0] in str(untested[0].message)


def test_apply_is_silent_on_a_tested_release(llava, monkeypatch):
    model = llava
    monkeypatch.setattr(compat, "_warned", False)
    monkeypatch.setattr(transformers, "__version__", compat.TESTED_TRANSFORMERS[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pruning.apply(model, "uniform", keep=4):
            pass
    assert not [w for w in caught if "tested with transformers" in str(w.message)]
