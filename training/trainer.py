"""transformers Trainer with the paper's orthogonal regulariser added to the loss."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer

from adapters.functional import orthogonal_penalty
from adapters.injection import dcft_layers


def orthogonal_regulariser(model: nn.Module) -> torch.Tensor:
    """Paper eq. 4 averaged over the adapted layers (0 when there are none)."""
    layers = [layer for layer in dcft_layers(model).values() if layer.has_adapter]
    if not layers:
        return torch.zeros(())
    return torch.stack([orthogonal_penalty(layer.dcft_A, layer.dcft_B) for layer in layers]).mean()


class DCFTTrainer(Trainer):
    """Adds gamma * regulariser to the training loss and logs its running mean."""

    def __init__(self, *args, gamma: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma = gamma
        self._penalty_sum, self._penalty_steps = 0.0, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.gamma > 0 and model.training:
            penalty = orthogonal_regulariser(model)
            loss = loss + self.gamma * penalty.to(loss.device)
            self._penalty_sum = penalty.detach() + self._penalty_sum  # no per-step device sync
            self._penalty_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._penalty_steps and "loss" in logs:
            logs["orth_penalty"] = round(float(self._penalty_sum) / self._penalty_steps, 6)
            self._penalty_sum, self._penalty_steps = 0.0, 0
        super().log(logs, *args, **kwargs)
