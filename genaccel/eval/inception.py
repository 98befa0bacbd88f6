"""FID / sFID / IS / precision-recall with torch-fidelity's InceptionV3 from a local weights file (never a download).

The extractor is torch-fidelity's ``inception-v3-compat`` (TF1-compatible bilinear resize to 299, i.e. the
``antialias=False`` path of torchmetrics), so values follow the TTUR / ADM protocol when the real
``weights-inception-2015-12-05-6726825d.pth`` is supplied. Metric conventions follow the ADM evaluator
(openai/guided-diffusion ``evaluations/evaluator.py``; reference: eval.md §2-4):

* FID on the 2048-d pool features, float64 statistics, trace term from ``eigvals(S1 @ S2)``;
* sFID on ADM's spatial features: the first 7 channels of ``mixed_6/conv`` (torch-fidelity's
  ``Mixed_6d.branch1x1``, 17 x 17 x 7 = 2023 values in TF's NHWC order, so ADM's ``mu_s``/``sigma_s`` apply);
* IS on ``logits_unbiased`` (as the original code and ADM): ADM's in-order splits of 5000 (default) or
  torch-fidelity's 10 shuffled splits;
* improved precision/recall (Kynkäänniemi et al. 2019) on the pool features, k = 3, squared distances in row
  blocks (as ADM's ``ManifoldEstimator``), float32 or ADM's float16 with float32 fallback.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from genaccel.eval.fd import FeatureStats, RunningStats, fd_from_stats, feature_stats

WEIGHTS_ENV = "GENACCEL_INCEPTION_WEIGHTS"
WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
POOL, LOGITS = "2048", "logits_unbiased"
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7] of mixed_6/conv (17 x 17 x 192)
IS_PROTOCOLS = ("adm", "torch-fidelity")
ADM_IS_SPLIT = 5000
PRC_BLOCK = 10000  # ADM's row_batch_size / col_batch_size


class InceptionWeightsMissing(FileNotFoundError):
    """No local Inception weights: FID/IS/P&R cannot run offline."""


def resolve_weights(path: str | os.PathLike | None) -> Path:
    """The weights file from ``path`` or ``$GENACCEL_INCEPTION_WEIGHTS``; raises naming what is missing."""
    chosen = path or os.environ.get(WEIGHTS_ENV)
    if not chosen:
        raise InceptionWeightsMissing(
            f"FID/IS/precision-recall need local Inception weights ({WEIGHTS_NAME}): pass --inception-weights PATH "
            f"or set {WEIGHTS_ENV}. Nothing is downloaded. Without them, use FD-domain (the default metric)."
        )
    p = Path(chosen)
    if not p.is_file():
        raise InceptionWeightsMissing(
            f"Inception weights file not found: {p} (expected torch-fidelity's {WEIGHTS_NAME}; check the path)"
        )
    return p


_WRAPPER_KEYS = ("state_dict", "model", "module", "net")
_CONVERT_HINT = f"the supported file is torch-fidelity's {WEIGHTS_NAME}, a plain state dict"


def read_inception_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The InceptionV3 state dict in ``path``, unwrapped; one-line ValueError for every format it cannot use.

    Accepted: a bare state dict, one nested under a single ``state_dict`` / ``model`` / ``module`` / ``net`` key,
    with or without a ``module.`` (DataParallel/DDP) prefix on every key. Refused with a line saying what the
    file is: ADM's TensorFlow GraphDef (``classify_image_graph_def.pb``), a TorchScript archive (clean-fid's
    ``inception-2015-12-05.pt``), a file with pickled objects, or a dict with several candidate state dicts."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in names):
            raise ValueError(f"{path} is a TorchScript archive (e.g. clean-fid's inception-2015-12-05.pt), not a "
                             f"state dict; {_CONVERT_HINT}")
    elif not head.startswith(b"\x80"):
        kind = "ADM's TensorFlow GraphDef (classify_image_graph_def.pb)" if path.suffix == ".pb" else \
            "neither a torch checkpoint nor a pickle (a TensorFlow .pb graph?)"
        raise ValueError(f"{path} is {kind}, which PyTorch cannot load; {_CONVERT_HINT} (torch-fidelity's "
                         "conversion of that graph)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one line naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} cannot be read as a plain state dict ({type(e).__name__}: {first[:160]}); "
                         f"{_CONVERT_HINT}") from e
    return _unwrap_state_dict(obj, path)


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict; {_CONVERT_HINT}")
    if not _is_tensor_dict(obj):
        found = [k for k in _WRAPPER_KEYS if _is_tensor_dict(obj.get(k))]
        if len(found) != 1:
            what = f"several state dicts ({', '.join(found)})" if found else f"no state dict (keys: {list(obj)[:8]})"
            raise ValueError(f"{path} is a dict with {what}; save the InceptionV3 state dict alone "
                             f"(torch.save(obj['<key>'], path)); {_CONVERT_HINT}")
        obj = obj[found[0]]
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _key_summary(keys: list[str], limit: int = 3) -> str:
    more = f", +{len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} ({', '.join(keys[:limit])}{more})"


def load_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's InceptionV3 giving (pool 2048-d, unbiased logits) from a local file, in eval mode.

    The state dict is read by :func:`read_inception_state_dict` (wrappers and ``module.`` prefixes removed)
    and loaded strictly; a key mismatch is one line with the counts and the first keys of each kind."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = resolve_weights(weights)
    state = read_inception_state_dict(path)
    with _no_weight_loading():
        model = FeatureExtractorInceptionV3("inception-v3-compat", [POOL, LOGITS])
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path} is not an InceptionV3 state dict for torch-fidelity: missing keys "
                         f"{_key_summary(missing)}, unexpected keys {_key_summary(unexpected)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} is not an InceptionV3 state dict for torch-fidelity: "
                         f"{str(e).splitlines()[-1].strip()[:200]}") from e
    return model.to(device).eval()


@contextmanager
def _no_weight_loading() -> Iterator[None]:
    """Let torch-fidelity build its InceptionV3 with random init instead of loading (or downloading) weights."""
    from torch_fidelity import feature_extractor_inceptionv3 as mod

    saved_url, saved_load = mod.load_state_dict_from_url, mod.FeatureExtractorInceptionV3.load_state_dict
    mod.load_state_dict_from_url = lambda *a, **k: {}
    mod.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
    try:
        yield
    finally:
        mod.load_state_dict_from_url, mod.FeatureExtractorInceptionV3.load_state_dict = saved_url, saved_load


def make_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random-init InceptionV3 state dict (~96 MB) for offline plumbing tests. Its numbers mean nothing."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from genaccel.utils.io import save_torch

    torch.manual_seed(seed)
    with _no_weight_loading():
        model = FeatureExtractorInceptionV3("inception-v3-compat", [POOL])
    return save_torch(model.state_dict(), path)


@dataclass
class InceptionFeatures:
    """What the metrics need from one image set: pool features and unbiased logits per image (float32, on the
    CPU), and the running statistics of ADM's spatial features (only their mean/covariance are used, so the
    N x 2023 array is never kept)."""

    pool: torch.Tensor
    logits: torch.Tensor
    spatial: RunningStats

    def __len__(self) -> int:
        return len(self.pool)


def _image_batches(images, batch_size: int) -> tuple[Iterable, int]:
    from genaccel.eval.images import ImageSource

    if isinstance(images, ImageSource):
        return images.batches(batch_size), len(images)
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Inception metrics take uint8 NHWC images, got {images.dtype} {tuple(images.shape)}")
    return images.split(batch_size), len(images)


@torch.no_grad()
def inception_features(model: torch.nn.Module, images, batch_size: int = 32, progress: bool = True,
                       ) -> InceptionFeatures:
    """Pool features (N, 2048), unbiased logits (N, 1008) and spatial-feature statistics (2023-d) of uint8 NHWC
    images of any size: an array/tensor, or an :class:`~genaccel.eval.images.ImageSource` read in batches.

    Spatial features are ADM's ``mixed_6/conv[..., :7]``: the output of ``Mixed_6d.branch1x1`` (after its ReLU,
    as TF's node), first 7 channels, flattened in NHWC order so that ADM's ``mu_s``/``sigma_s`` line up."""
    batches, total = _image_batches(images, batch_size)
    device = next(model.parameters()).device
    pools, logits, spatial = [], [], RunningStats()
    captured: list[torch.Tensor] = []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(
        lambda mod, inp, out: captured.append(out[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()))
    try:
        for chunk in tqdm(batches, desc="inception features", total=-(-total // batch_size), disable=not progress):
            chunk = torch.as_tensor(np.asarray(chunk)) if not isinstance(chunk, torch.Tensor) else chunk
            if chunk.dtype != torch.uint8 or chunk.ndim != 4 or chunk.shape[-1] != 3:
                raise ValueError(f"Inception metrics take uint8 NHWC images, got {chunk.dtype} {tuple(chunk.shape)}")
            pool, logit = model(chunk.permute(0, 3, 1, 2).contiguous().to(device))
            pools.append(pool.cpu())
            logits.append(logit.cpu())
            spatial.update(captured.pop().cpu())
    finally:
        hook.remove()
    return InceptionFeatures(torch.cat(pools), torch.cat(logits), spatial)


def inception_score(logits: torch.Tensor, protocol: str = "adm", splits: int = 10,
                    split_size: int = ADM_IS_SPLIT) -> dict[str, float | str]:
    """Inception score of unbiased logits (N, 1008): mean and std over splits, and which rule made them.

    ``adm``: ADM's rule, consecutive splits of ``split_size`` images in file order (the last one shorter), the
    number papers with ADM-evaluator tables report; ``torch-fidelity``: ``splits`` shuffled splits with
    torch-fidelity's seed. Both agree at 50k images; at small N the split sizes differ, and so does IS."""
    if protocol not in IS_PROTOCOLS:
        raise ValueError(f"unknown IS protocol {protocol!r}; choose from {', '.join(IS_PROTOCOLS)}")
    if protocol == "torch-fidelity":
        from torch_fidelity.metric_isc import isc_features_to_metric

        if len(logits) < splits:
            raise ValueError(f"IS with {splits} splits needs at least {splits} images, got {len(logits)}")
        out = isc_features_to_metric(logits, splits=splits)
        return {"inception_score_mean": out["inception_score_mean"], "inception_score_std": out["inception_score_std"],
                "inception_score_protocol": f"torch-fidelity ({splits} shuffled splits)"}
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for part in log_p.split(split_size):
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))  # log of the split's mean p(y)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return {"inception_score_mean": float(np.mean(scores)), "inception_score_std": float(np.std(scores)),
            "inception_score_protocol": f"adm (in-order splits of {split_size})"}


def squared_distances(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pairwise squared Euclidean distances (len(u), len(v)) as float32, ``max(|u|^2 - 2 u.v + |v|^2, 0)``.

    ``dtype=float16`` follows ADM's ``DistanceBlock``: features cast to float16 and the block computed there,
    falling back to float32 for the whole block when any value is not finite (large features overflow)."""
    if dtype == torch.float16:
        u16, v16 = u.half(), v.half()
        block = _sq_dist(u16, v16)
        if torch.isfinite(block).all():
            return block.float()
    return _sq_dist(u.float(), v.float())


def _sq_dist(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    d = u @ v.T  # in place from here on: one block-sized buffer
    d.mul_(-2).add_((u * u).sum(1)[:, None]).add_((v * v).sum(1)[None, :])
    return d.clamp_(min=0)


def manifold_radii(features: torch.Tensor, k: int = 3, block: int = PRC_BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Squared distance of every feature to its k-th nearest neighbour (itself counted as the 0-th), float32.

    As ADM's ``manifold_radii`` (value at index k of each sorted distance row), but the k+1 smallest values
    are kept per column block, so memory is block x block instead of block x N."""
    n = len(features)
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per side, got {n}")
    radii = torch.empty(n)
    for r0 in range(0, n, block):
        rows = features[r0:r0 + block]
        best = None
        for c0 in range(0, n, block):
            d = squared_distances(rows, features[c0:c0 + block], dtype)
            small = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values
            best = small if best is None else torch.cat([best, small], dim=1)
            best = torch.topk(best, min(k + 1, best.shape[1]), dim=1, largest=False).values
            del d
        radii[r0:r0 + len(rows)] = best[:, k]
    return radii


def precision_recall(generated: torch.Tensor, real: torch.Tensor, k: int = 3, block: int = PRC_BLOCK,
                     dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> dict[str, float]:
    """Improved precision (generated inside the real manifold) and recall (real inside the generated one).

    ADM's ``evaluate_pr``: a point is inside a manifold when its squared distance to some point of it is at most
    that point's k-th-neighbour radius. Computed in ``block`` x ``block`` tiles (peak memory ~ a few tiles of
    float32, not N x N), on ``device`` (default: where the features are)."""
    device = torch.device(device) if device is not None else generated.device
    gen, ref = generated.to(device, torch.float32), real.to(device, torch.float32)
    r_ref, r_gen = manifold_radii(ref, k, block, dtype).to(device), manifold_radii(gen, k, block, dtype).to(device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)  # real covered by the generated manifold
    gen_in = torch.zeros(len(gen), dtype=torch.bool, device=device)  # generated inside the real manifold
    for r0 in range(0, len(ref), block):
        rows = ref[r0:r0 + block]
        for c0 in range(0, len(gen), block):
            d = squared_distances(rows, gen[c0:c0 + block], dtype)
            ref_in[r0:r0 + len(rows)] |= (d <= r_gen[None, c0:c0 + block]).any(dim=1)
            gen_in[c0:c0 + d.shape[1]] |= (d <= r_ref[r0:r0 + len(rows), None]).any(dim=0)
            del d
    return {"precision": float(gen_in.double().mean()), "recall": float(ref_in.double().mean())}


def inception_metrics(
    generated: InceptionFeatures,
    reference_stats: FeatureStats,
    reference_pool: torch.Tensor | None = None,
    reference_spatial: FeatureStats | None = None,
    is_protocol: str = "adm",
) -> dict[str, float | str]:
    """FID (and sFID) against reference statistics, IS of the generated set, P&R when reference features exist."""
    out: dict[str, float | str] = {"fid": fd_from_stats(feature_stats(generated.pool), reference_stats)}
    if reference_spatial is not None:
        out["sfid"] = fd_from_stats(generated.spatial.stats(), reference_spatial)
    out.update(inception_score(generated.logits, is_protocol, splits=min(10, len(generated))))
    if reference_pool is not None:
        out.update(precision_recall(generated.pool, reference_pool))
    return out


__all__ = [
    "WEIGHTS_ENV",
    "InceptionFeatures",
    "InceptionWeightsMissing",
    "inception_features",
    "inception_metrics",
    "inception_score",
    "load_inception",
    "make_random_inception_weights",
    "manifold_radii",
    "precision_recall",
    "read_inception_state_dict",
    "resolve_weights",
    "squared_distances",
]
