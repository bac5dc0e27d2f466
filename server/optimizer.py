"""The coordinator's optimiser in `federation` mode: each round's noisy gradient sum becomes one AdamW step.

The secure sum of the merchants' clipped per-user gradients and noise shares
is one DP-SGD step's noisy sum over every merchant's users. Divided by the
expected batch (sample rate × all trainable users) it is what Opacus's
DPOptimizer hands AdamW in central training, and the step is the same
`common.train.optimizer_for`: the adapter at `lr`, the calibration at
`head_lr`, cosine decay over the planned rounds. Taking it on the server is
post-processing of the DP sum. Its moments travel in the checkpoint, so a
resumed run continues the same descent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from common.score import CALIBRATION_PREFIX
from common.train import TrainConfig, optimizer_for


class GlobalOptimizer:
    """AdamW over the global adapter's trained tensors, fed one noisy gradient sum per round."""

    def __init__(
        self, arrays: Mapping[str, np.ndarray], trained: Sequence[str], cfg: TrainConfig, total_steps: int
    ) -> None:
        self.trained = list(trained)
        self.params = {n: torch.nn.Parameter(torch.from_numpy(np.array(arrays[n], np.float32))) for n in self.trained}
        self.optimizer, self.schedule = optimizer_for(
            [p for n, p in self.params.items() if not n.startswith(CALIBRATION_PREFIX)],
            [p for n, p in self.params.items() if n.startswith(CALIBRATION_PREFIX)],
            cfg,
            total_steps,
        )

    def step(
        self, arrays: Mapping[str, np.ndarray], total: Mapping[str, np.ndarray], expected_batch: float
    ) -> dict[str, np.ndarray]:
        """`arrays` after one AdamW step on the gradient `total / expected_batch` (the untrained tensors as they were)."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.from_numpy(np.asarray(arrays[name], np.float32)))
                p.grad = torch.from_numpy(np.asarray(total[name], np.float64) / expected_batch).float()
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**arrays, **{n: p.detach().numpy().copy() for n, p in self.params.items()}}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The optimiser's moments and step count as arrays (for the checkpoint)."""
        out = {"schedule.step": np.array([self.schedule.last_epoch], np.int64)}
        for name, p in self.params.items():
            for key, value in self.optimizer.state.get(p, {}).items():
                out[f"{key}/{name}"] = np.asarray(value.detach().numpy() if torch.is_tensor(value) else value)
        return out

    def load_state_arrays(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from `state_arrays` of an earlier process."""
        for name, p in self.params.items():
            moments = {k.split("/", 1)[0]: v for k, v in state.items() if k.endswith("/" + name) and "/" in k}
            if moments:
                self.optimizer.state[p] = {k: torch.from_numpy(np.array(v)) for k, v in moments.items()}
        if "schedule.step" in state:
            steps = int(np.asarray(state["schedule.step"]).ravel()[0])
            self.schedule.last_epoch = steps
            for group, decay, base in zip(
                self.optimizer.param_groups, self.schedule.lr_lambdas, self.schedule.base_lrs
            ):
                group["lr"] = base * decay(steps)
