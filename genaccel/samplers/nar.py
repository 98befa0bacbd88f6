"""NAR decoding (arXiv 2503.10696): one anti-diagonal of the token grid per target forward.

Step d feeds the cells of diagonal d - 1 (by increasing row, at their raster slots) and samples every cell
of diagonal d at once: cell (h, w) takes the mean of the right-neighbour head's logits at (h, w - 1) and the
vertical head's at (h - 1, w), or the one head it has on the first row / column; the prefill's class slot
gives cell (0, 0) the mean of both heads. CFG is applied to these averaged logits, then temperature,
top-k / top-p and sampling per position. An n x n grid takes exactly 2n - 1 target forwards (31 for 16x16).

As in the official code (`NAR-images/autoregressive/models/generate.py`), ``cfg_interval`` counts TOKENS:
a step is guided while the number of tokens generated before it is <= ``cfg_interval``.
"""

from __future__ import annotations

import torch

from genaccel.models.nar import diagonal_cells
from genaccel.samplers.base import Sampler, draw, require_grid, target_probs


def neighbour_logits(
    right: torch.Tensor, below: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, grid_size: int
) -> torch.Tensor:
    """Logits (B, len(targets), V) of the cells of one diagonal from both heads' outputs at the previous one.

    ``inputs`` / ``targets`` are raster cells by increasing row; the input on row r is at index
    r - first_row(inputs), so a target on row h finds its left neighbour at h - first and the one above at
    h - 1 - first.
    """
    first = int(inputs[0]) // grid_size
    rows, cols = targets // grid_size, targets % grid_size
    last = len(inputs) - 1
    from_left = right[:, (rows - first).clamp(0, last)]
    from_above = below[:, (rows - 1 - first).clamp(0, last)]
    both = ((from_above + from_left) / 2)
    has_left, has_above = (cols > 0)[None, :, None], (rows > 0)[None, :, None]
    return torch.where(has_left & has_above, both, torch.where(has_left, from_left, from_above))


class NARSampler(Sampler):
    """Next-neighbour decoding over anti-diagonals; every option of ``ar`` applies per position."""

    name = "nar"
    orders = ("diagonal",)

    def guided_probs(self, logits: torch.Tensor, generated: int) -> torch.Tensor:
        # NAR guides a step while generated <= cfg_interval; base's rule guides token t while
        # t <= cfg_interval + 1, so the step is passed as token index generated + 1.
        return target_probs(logits, self.options, generated + 1)

    def _generate(self, model, labels, generator, stats) -> torch.Tensor:
        n, T, N = require_grid(model, self.name), model.cls_token_num, model.num_image_tokens
        B, device = labels.shape[0], labels.device
        batch_labels = self.batch_labels(model, labels)
        model.setup_cache(batch_labels.shape[0], T + N)
        out = stats.target_forward(model.prefill, batch_labels)
        tokens = torch.empty(B, N, dtype=torch.long, device=device)
        first = (out.logits[:, -1:] + out.extra["below"][:, -1:]) / 2
        tokens[:, 0] = draw(self.guided_probs(first, 0), generator)[:, 0]
        generated = 1
        for diagonal in range(1, 2 * n - 1):
            inputs, targets = diagonal_cells(n, diagonal - 1).to(device), diagonal_cells(n, diagonal).to(device)
            out = stats.target_forward(model.forward_tokens, self.duplicate_for_cfg(tokens[:, inputs]), T + inputs)
            logits = neighbour_logits(out.logits, out.extra["below"], inputs, targets, n)
            tokens[:, targets] = draw(self.guided_probs(logits, generated), generator)
            generated += len(targets)
        return tokens
