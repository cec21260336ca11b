"""An exponential moving average (EMA) of a stage's trained parameters, for the stage option ``ema``.

After every optimizer step ``n`` (1, 2, ...) the average takes in the new weights ``w_n``:
``m_n = d * m_{n-1} + (1 - d) * w_n`` from ``m_0 = 0``, and the average is ``m_n / (1 - d^n)`` (bias-corrected, as
Adam does its moments): the weights after each step, the last ones weighted most, over about the last
``1 / (1 - d)`` steps, or all of a shorter stage. The weights the stage started from are not part of it. At the end
of the stage the average replaces the weights: the stage's final checkpoint, the later stages, the saved model
and the evaluation all see the averaged weights.
"""

from __future__ import annotations

from typing import Any

import torch


class ParamEMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.params = list(params)
        self.decay = float(decay)
        self.updates = 0
        self.shadow = [torch.zeros_like(p, memory_format=torch.preserve_format).detach() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        for avg, p in zip(self.shadow, self.params):
            avg.lerp_(p.detach().to(avg.dtype), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Put the (bias-corrected) average into the parameters; no-op before the first update."""
        if not self.updates:
            return
        correction = 1.0 - self.decay ** self.updates
        for avg, p in zip(self.shadow, self.params):
            p.copy_(avg / correction)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": [t.detach().cpu() for t in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"ema state holds {len(state['shadow'])} tensors, the stage trains {len(self.shadow)}")
        self.updates = int(state["updates"])
        for avg, saved in zip(self.shadow, state["shadow"]):
            avg.copy_(saved)
