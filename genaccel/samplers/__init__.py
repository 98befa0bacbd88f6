"""Samplers by name. ``build_sampler("ar", cfg_scale=4.0)`` -> object with ``generate(model, labels, generator)``.

Entries are ``"module:Class"`` strings imported on first use, so adding an algorithm means adding one
file and one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from genaccel.samplers.base import CompletedImages, SampleOutput, Sampler, SamplerStats, SamplingOptions

SAMPLERS: dict[str, str] = {
    "ar": "genaccel.samplers.ar:ARSampler",
    "sjd": "genaccel.samplers.sjd:SJDSampler",
    "mcsjd": "genaccel.samplers.mcsjd:MCSJDSampler",
    "gsd": "genaccel.samplers.gsd:GSDSampler",
    "lantern": "genaccel.samplers.lantern:LanternSampler",
    "sd": "genaccel.samplers.sd:SDSampler",
    "nar": "genaccel.samplers.nar:NARSampler",
    "zipar": "genaccel.samplers.zipar:ZipARSampler",
    "token-shuffle": "genaccel.samplers.token_shuffle:TokenShuffleSampler",
}


def available_samplers() -> list[str]:
    return sorted(SAMPLERS)


def sampler_class(name: str) -> type[Sampler]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(available_samplers())}")
    module, cls = SAMPLERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_sampler(name: str, **options: Any) -> Sampler:
    """Instantiate sampler ``name`` with validated options (unknown options raise with the known list)."""
    return sampler_class(name)(**options)


__all__ = ["SAMPLERS", "CompletedImages", "Sampler", "SampleOutput", "SamplerStats", "SamplingOptions", "available_samplers",
           "build_sampler", "sampler_class"]
