"""NAR model: official key layout, the proximity mask, the training objective, cache == all-at-once."""

from __future__ import annotations

import pytest
import torch
from model_helpers import assert_official_layout, official_block_keys

from genaccel.models import CheckpointError, load_nar
from genaccel.models.nar import NAR_PRESETS, NARModel, build_nar, diagonal_cells, proximity_mask
from genaccel.utils.io import save_torch

# preset -> (FFN hidden, parameters in millions derived from the official gpt.py; shared/reference/parallel.md §2.1)
OFFICIAL = {"NAR-B": (2048, 130.6), "NAR-M": (2816, 295.5), "NAR-L": (2816, 372.5), "NAR-XL": (3584, 816.0),
            "NAR-XXL": (4096, 1464.0)}


def official_keys(dim: int, n_layer: int, hidden: int, vocab: int = 16384, classes: int = 1000) -> dict:
    """ThisisBillhe/NAR's Transformer state dict: LlamaGen's with n_layer + 1 blocks and the medusa head."""
    keys = {"cls_embedding.embedding_table.weight": (classes + 1, dim), "tok_embeddings.weight": (vocab, dim),
            "norm.weight": (dim,), "output.weight": (vocab, dim), "medusa_norm.weight": (dim,),
            "medusa_output.weight": (vocab, dim)}
    return {**keys, **official_block_keys(dim, n_layer + 1, hidden)}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_presets_have_the_official_keys_shapes_and_sizes(name):
    with torch.device("meta"):
        model = build_nar(name)
    hidden, params_m = OFFICIAL[name]
    preset = NAR_PRESETS[name]
    assert_official_layout(model, official_keys(preset["dim"], preset["n_layer"], hidden), params_m, 0.005)


def reference_proximity(grid: int, cls: int, length: int) -> torch.Tensor:
    """The definition, one pair at a time: lower-triangular, except that image token t sees image token s
    exactly when row(s) + col(s) <= row(t) + col(t)."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    for t in range(length):
        for s in range(length):
            image_t, image_s = cls <= t < cls + grid * grid, cls <= s < cls + grid * grid
            if image_t and image_s:
                dt, ds = divmod(t - cls, grid), divmod(s - cls, grid)
                mask[t, s] = sum(ds) <= sum(dt)
            else:
                mask[t, s] = s <= t
    return mask


@pytest.mark.parametrize("grid,cls,length", [(4, 1, 17), (4, 1, 24), (5, 2, 27), (3, 1, 10)])
def test_proximity_mask_equals_its_definition(grid, cls, length):
    assert torch.equal(proximity_mask(grid, cls, length), reference_proximity(grid, cls, length))


def test_diagonals_partition_the_grid_by_increasing_row():
    n = 5
    cells = torch.cat([diagonal_cells(n, d) for d in range(2 * n - 1)])
    assert sorted(cells.tolist()) == list(range(n * n))
    for d in range(2 * n - 1):
        rows, cols = diagonal_cells(n, d) // n, diagonal_cells(n, d) % n
        assert torch.all(rows + cols == d) and torch.all(rows[1:] > rows[:-1])


def tiny_nar(grid: int = 4, seed: int = 0, **kw) -> NARModel:
    gen = torch.Generator().manual_seed(seed)
    args = dict(dim=32, n_layer=2, n_head=2, vocab_size=40, num_classes=3, block_size=grid * grid, multiple_of=32)
    model = build_nar(None, **{**args, **kw})
    model.init_weights(gen)
    for head in (model.output, model.medusa_output):
        torch.nn.init.normal_(head.weight, 0.0, 0.5, generator=gen)
    return model.eval()


def reference_cell_logits(model: NARModel, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The objective cell by cell from both heads' raw outputs over [class, tokens] under the proximity mask."""
    n, T = model.grid_size, model.cls_token_num
    cond = model.cls_embedding(labels)[:, :T]
    h = torch.cat([cond, model.tok_embeddings(tokens)], dim=1)
    freqs = model.freqs_cis[: h.shape[1]][None]
    mask = reference_proximity(n, T, h.shape[1])[None, None]
    for layer in model.layers[: model.args.n_layer]:
        h = layer(h, freqs, mask=mask)
    right = model.output(model.norm(h)).float()
    below = model.medusa_output(model.medusa_norm(model.layers[model.args.n_layer](h, freqs, mask=mask))).float()
    slot = lambda r, c: T + r * n + c  # noqa: E731 - cache slot of cell (r, c)
    cells = []
    for r in range(n):
        for c in range(n):
            if r == 0 and c == 0:
                cells.append((right[:, T - 1] + below[:, T - 1]) / 2)
            elif r == 0:
                cells.append(right[:, slot(0, c - 1)])
            elif c == 0:
                cells.append(below[:, slot(r - 1, 0)])
            else:
                cells.append((right[:, slot(r, c - 1)] + below[:, slot(r - 1, c)]) / 2)
    return torch.stack(cells, dim=1)


@torch.no_grad()
def test_teacher_forced_is_the_training_objective_cell_by_cell():
    model = tiny_nar(grid=4)
    labels, tokens = torch.tensor([0, 2]), torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    got = model.teacher_forced(labels, tokens).logits
    torch.testing.assert_close(got, reference_cell_logits(model, labels, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", [3, 4, 5])
@torch.no_grad()
def test_diagonal_by_diagonal_through_the_cache_equals_all_at_once(grid):
    """Custom size: both heads' outputs per slot are the same fed diagonal by diagonal or in one masked forward."""
    model = tiny_nar(grid=grid, dim=48, n_head=3, seed=grid)
    N = grid * grid
    labels, tokens = torch.tensor([1, 0, 2]), torch.randint(0, 40, (3, N), generator=torch.Generator().manual_seed(2))
    model.setup_cache(3)
    out = model.prefill(labels)
    right, below = [torch.zeros(3, 1 + N, 40) for _ in range(2)]
    right[:, 0], below[:, 0] = out.logits[:, -1], out.extra["below"][:, -1]
    for d in range(2 * grid - 1):
        cells = diagonal_cells(grid, d)
        step = model.forward_tokens(tokens[:, cells], 1 + cells)
        right[:, 1 + cells], below[:, 1 + cells] = step.logits, step.extra["below"]
    cond = model.cls_embedding(labels)[:, :1]
    h = torch.cat([cond, model.tok_embeddings(tokens)], dim=1)
    whole = model._run_blocks(h, model.freqs_cis[: 1 + N][None], mask=proximity_mask(grid, 1)[None, None])
    torch.testing.assert_close(right, whole.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(below, whole.extra["below"], atol=1e-5, rtol=1e-5)


def test_official_checkpoint_layout_loads_strictly(tmp_path):
    model = tiny_nar(grid=4, dim=64, n_head=4)
    path = save_torch({"model": model.state_dict()}, tmp_path / "last_version.pt")
    loaded = load_nar(path, image_size=16, downsample=4, n_head=4, multiple_of=32)
    assert loaded.args.n_layer == 2 and loaded.grid_size == 4
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_plain_gpt_checkpoint_is_refused_with_the_fix(tmp_path):
    from genaccel.models.llamagen import build_gpt

    gpt = build_gpt(None, dim=32, n_layer=2, n_head=2, vocab_size=40, num_classes=3, block_size=16)
    path = save_torch({"model": gpt.state_dict()}, tmp_path / "gpt.pt")
    with pytest.raises(CheckpointError, match="not a NAR checkpoint.*--model llamagen"):
        load_nar(path, image_size=16, downsample=4)
