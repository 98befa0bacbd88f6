"""Baseline autoregressive sampling: one token per forward, raster order (LlamaGen ``generate``)."""

from __future__ import annotations

import torch

from genaccel.samplers.base import Sampler, draw, target_probs


class ARSampler(Sampler):
    """Plain next-token sampling; the reference every faster sampler is measured against."""

    name = "ar"

    def _generate(self, model, labels, generator, stats) -> torch.Tensor:
        B, N, T = labels.shape[0], model.num_image_tokens, model.cls_token_num
        batch_labels = self.batch_labels(model, labels)
        model.setup_cache(batch_labels.shape[0], T + N)
        out = stats.target_forward(model.prefill, batch_labels)
        tokens = torch.empty(B, N, dtype=torch.long, device=labels.device)
        tokens[:, 0] = draw(target_probs(out.logits[:, -1:], self.options, 0), generator)[:, 0]
        for t in range(1, N):
            pos = torch.tensor([T + t - 1], device=labels.device)
            out = stats.target_forward(model.forward_tokens, self.duplicate_for_cfg(tokens[:, t - 1 : t]), pos)
            tokens[:, t] = draw(target_probs(out.logits, self.options, t), generator)[:, 0]
        return tokens
