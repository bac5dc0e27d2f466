"""Throughput and memory of the training step as silorec runs it: without DP, with silorec's DP step, and with
Opacus's ghost clipping, at a few batch sizes.

Every (mode, batch size) runs in a fresh process, so its peak memory is its
own: the model is built, two steps warm up, then `steps` steps are timed on
fixed batches of `batch` user records (a DP run samples batches of that
expected size). Throughput is users (records) per second. The model is
silorec's DP model (common.presets.DP_MODEL) without releases, so the
prior and co-occurrence terms, constants in every step, are not timed.

- **non-DP**: the model's forward, backward and AdamW step.
- **DP**: `common.train`'s step: Opacus's per-sample gradients (hooks), per-group
  clipping and Gaussian noise (`dp_optimizer`), AdamW.
- **ghost**: Opacus's ghost clipping (`GradSampleModuleFastGradientClipping`):
  per-user gradient norms without per-user gradients, then a second backward
  with the clipping coefficients. Opacus implements it with one flat clipping
  bound, so it clips the whole gradient to max_grad_norm rather than by
  silorec's groups; its privacy is the same, its clipping split differs.

Figures hold for the machine they were taken on; the ratios of one run are
what compare.
"""

from __future__ import annotations

import multiprocessing
import queue
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

MODES = ("non-dp", "dp", "ghost")
WARMUP = 2  # untimed steps first
LABELS = {"non-dp": "non-DP", "dp": "DP (silorec)", "ghost": "DP (ghost clipping)"}


@dataclass(frozen=True)
class BenchSpec:
    data: Path
    base_model: str
    batch: int
    mode: str
    steps: int
    device: str
    max_tokens: int
    cache_dir: Path | None = None  # of item vectors, so each process need not encode the catalog


@dataclass(frozen=True)
class Measure:
    mode: str
    batch: int
    device: str
    users_per_second: float
    seconds_per_step: float
    peak_mb: float  # CPU: the process's peak RSS; CUDA: peak allocated device memory
    setup_mb: float  # CPU: resident memory once the model is built; CUDA: allocated then


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rss_mb() -> float:
    """The process's resident memory now (Linux), not its peak."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(spec: BenchSpec) -> Measure:
    """Build the model over the silo, warm up one step, time `spec.steps` steps."""
    import torch

    from common.model_config import ModelConfig
    from common.presets import DP_MODEL
    from common.recommender import build_recommender
    from common.records import UserRecords
    from common.silo import load_silo
    from common.split import leave_one_out
    from common.text import item_texts
    from common.train import TrainConfig, batch_loss, dp_optimizer, mask_history, next_items_loss, optimizer_for

    device = torch.device(spec.device)
    silo = load_silo(spec.data)
    split = leave_one_out(silo.interactions, silo.n_items)
    cfg = ModelConfig(**{**DP_MODEL, "base_model": spec.base_model, "max_tokens": spec.max_tokens})
    model = build_recommender(
        cfg, list(silo.items["item_id"]), item_texts(silo.items), device=device, cache_dir=spec.cache_dir
    )
    train_cfg = TrainConfig()
    records = UserRecords(split, seed=0, next_items=train_cfg.next_items)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, _ = optimizer_for(
        [p for n, p in trainable if model.kind_of(n) == "adapter"],
        [p for n, p in trainable if model.kind_of(n) != "adapter"],
        train_cfg,
        1000,
    )
    net: torch.nn.Module = model
    if spec.mode == "dp":
        from opacus import GradSampleModule

        net = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = dp_optimizer(model, optimizer, train_cfg, 1.0, expected_batch_size=spec.batch)
    elif spec.mode == "ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        net = GradSampleModuleFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction="mean",
            max_grad_norm=train_cfg.max_grad_norm,
            use_ghost_clipping=True,
        )
        optimizer = DPOptimizerFastGradientClipping(
            optimizer,
            noise_multiplier=1.0,
            max_grad_norm=train_cfg.max_grad_norm,
            expected_batch_size=spec.batch,
            loss_reduction="mean",
        )
    elif spec.mode != "non-dp":
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {spec.mode!r}")

    def step(batch: Sequence) -> None:
        optimizer.zero_grad(set_to_none=True)
        if spec.mode == "ghost":
            inputs = model.history_inputs([r.history for r in batch])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = net(**inputs)
            losses = next_items_loss(mask_history(logits.float(), batch), batch, per_record=True)
            DPTensorFastGradientClipping(net, optimizer, losses, "mean").backward()
        else:
            batch_loss(net, model, batch).backward()
        optimizer.step()

    n = len(records)
    batches = [[records[(i * spec.batch + j) % n] for j in range(spec.batch)] for i in range(spec.steps + WARMUP)]
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    setup = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb()
    for batch in batches[:WARMUP]:  # allocations, kernels, Opacus's hooks
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches[WARMUP:]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / spec.steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mb()
    return Measure(spec.mode, spec.batch, device.type, spec.batch / seconds, seconds, peak, setup)


def _worker(spec: BenchSpec, answers) -> None:
    from common.cli import quiet_libraries

    quiet_libraries()  # a spawned process starts with the libraries' defaults: load bars, warnings every step
    try:
        answers.put(asdict(measure(spec)))
    except Exception as e:  # the parent reports it; a worker's traceback alone is easy to miss
        answers.put({"error": f"{type(e).__name__}: {e}"})


def measure_apart(spec: BenchSpec) -> Measure:
    """`measure` in a fresh process, so that its peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    process = context.Process(target=_worker, args=(spec, answers))
    process.start()
    while True:
        try:
            answer = answers.get(timeout=5)
            break
        except queue.Empty:
            if not process.is_alive():  # killed (out of memory, say) before it could answer
                raise RuntimeError(
                    f"{LABELS.get(spec.mode, spec.mode)} at batch {spec.batch}: the process died "
                    f"(exit code {process.exitcode})"
                ) from None
    process.join()
    if "error" in answer:
        raise RuntimeError(f"{LABELS.get(spec.mode, spec.mode)} at batch {spec.batch}: {answer['error']}")
    return Measure(**answer)


def ratio(measures: Sequence[Measure], batch: int, mode: str = "dp") -> float:
    """Throughput of `mode` over non-DP's at `batch`, from the same run."""
    by = {(m.mode, m.batch): m for m in measures}
    return by[(mode, batch)].users_per_second / by[("non-dp", batch)].users_per_second


def table(measures: Sequence[Measure]) -> str:
    lines = [f"{'batch':>5}  {'step':<20}{'users/s':>9}{'s/step':>8}{'peak MB':>9}{'step MB':>9}{'vs non-DP':>10}"]
    base = {m.batch: m.users_per_second for m in measures if m.mode == "non-dp"}
    for m in measures:
        vs = f"{m.users_per_second / base[m.batch]:.2f}" if m.batch in base else ""
        lines.append(
            f"{m.batch:>5}  {LABELS[m.mode]:<20}{m.users_per_second:>9.1f}{m.seconds_per_step:>8.2f}{m.peak_mb:>9.0f}"
            f"{m.peak_mb - m.setup_mb:>9.0f}{vs:>10}"
        )
    return "\n".join(lines)
