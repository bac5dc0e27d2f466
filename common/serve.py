"""Scoring with a trained recommender: for evaluation, and what a merchant serves (`SiloRecommender`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from common.errors import SilorecError
from common.metrics import ScoreFn, target_ranks
from common.recommender import Recommender, build_recommender
from common.score import PRIOR_WEIGHT
from common.silo import STATE_DIR, Silo, load_silo
from common.split import EvalCase, user_sequences
from common.storage import load_model_config, local_file
from common.text import item_texts


@torch.no_grad()
def score_histories(model: Recommender, histories: Sequence[np.ndarray]) -> torch.Tensor:
    """Scores over the whole catalog (users × items, float32 on CPU) for each history."""
    was_training = model.training
    model.eval()
    inputs = model.history_inputs(histories)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
        scores = model(**inputs)
    model.train(was_training)
    return scores.float().cpu()


def scorer(model: Recommender) -> ScoreFn:
    """A ScoreFn for `common.metrics.evaluate`."""

    def score(batch: list[EvalCase]) -> torch.Tensor:
        return score_histories(model, [c.history for c in batch])

    return score


# --- the weight of the popularity prior, chosen on validation users -----------------------
#
# Training learns the prior's weight w by next-items cross-entropy from cut points anywhere in a
# user's history, but a user is tested on what came last, when popularity has moved on, so the
# learned weight can be off by a factor. It is scaled by the factor, of a few, that scores best
# on validation users: one scalar, chosen like an early-stopping epoch, never on test users.

PRIOR_SCALES = "1,0.5,0.25,0.75,1.5"  # the factors tried by default; 1 first, so a tie keeps the learned weight


def parse_scales(text: str) -> tuple[float, ...]:
    """ "1,0.5" → (1.0, 0.5); "" → () (keep the learned weight). ValueError on anything else."""
    try:
        scales = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"prior scales must be comma-separated numbers, not {text!r}") from None
    if any(not np.isfinite(k) or k < 0 for k in scales):
        raise ValueError(f"prior scales must be finite and ≥ 0, not {text!r}")
    return scales


@torch.no_grad()
def prior_scale_ranks(
    model: Recommender, cases: Sequence[EvalCase], scales: Sequence[float], *, batch_size: int = 256
) -> dict[float, np.ndarray]:
    """Each case's target rank with the prior's weight scaled by each of `scales` (one pass of the user tower)."""
    scales = tuple(dict.fromkeys(scales))  # each factor once, in the order given
    shift = float(model.calibration.prior_weight.weight) * model.prior.float().cpu()
    ranks: dict[float, list[torch.Tensor]] = {k: [] for k in scales}
    for start in range(0, len(cases), batch_size):
        batch = list(cases[start : start + batch_size])
        scores = score_histories(model, [c.history for c in batch])
        for k in scales:
            ranks[k].append(target_ranks(scores + (k - 1.0) * shift, batch).cpu())
    return {k: torch.cat(r).numpy() if r else np.zeros(0, dtype=np.int64) for k, r in ranks.items()}


def scaled_key(scale: float) -> str:
    """The evaluate metric that holds NDCG@10 with the prior's weight scaled by `scale`."""
    return f"ndcg@10 prior×{scale:g}"


def best_scale(ndcg: Mapping[float, float]) -> float:
    """The factor with the highest validation NDCG@10; the first listed among equals."""
    return max(ndcg, key=lambda k: ndcg[k])


def scale_prior_weight(arrays: Mapping[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """The shared arrays with the prior's weight multiplied by `scale`."""
    weight = np.asarray(arrays[PRIOR_WEIGHT])
    return {**arrays, PRIOR_WEIGHT: (weight * scale).astype(weight.dtype)}


def load_for_silo(
    adapter_dir: Path, silo: Silo, *, cache_dir: Path | None = None, state_dir: Path | None = None
) -> Recommender:
    """The recommender saved in `adapter_dir`, set up over `silo`'s catalog, with the merchant's local state.

    A federation's adapter is the shared part only: each merchant's releases
    and item head stay in its state folder. They are loaded from `state_dir`
    when it is given, else from SILO/.silorec-state when the adapter folder
    holds no local state of its own (a central run's does).
    """
    cfg = load_model_config(adapter_dir)
    model = build_recommender(
        cfg, list(silo.items["item_id"]), item_texts(silo.items), cache_dir=cache_dir, adapter_dir=adapter_dir
    )
    if state_dir is not None:
        model.restore_local(Path(state_dir))
    elif local_file(Path(adapter_dir)) is None:
        model.restore_local(silo.root / STATE_DIR)
    return model


# --- what a merchant serves -------------------------------------------------------------


class UnknownError(SilorecError, KeyError):
    """A user or item id the silo does not hold; `field` names the request field it came from."""

    def __init__(self, field: str, value: str, what: str) -> None:
        super().__init__(f"{what} {value!r} is not in this silo")
        self.field = field

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Pick:
    """One recommended or found item."""

    item_id: str
    title: str
    score: float


class SiloRecommender:
    """A trained recommender over one silo's catalog and users: what a merchant's shop calls.

    - `recommend_user(user)`: top-k from the user's whole history in the silo;
    - `recommend(items)`: top-k for a live session's recent item ids (the user tower runs on them);
    - `export(k)`: top-k for every user, batched;
    - `search(text)`: the catalog ranked for a text query by the item tower (cosine);
    - `similar(item)`: the items whose text the item tower places nearest;
    - `refresh()`: re-read the silo: new products are scorable at once (only their vectors are computed,
      through the item-vector cache), removed ones are no longer served, new events join the histories.

    Items a user already has are never recommended unless `repeats`. Every method holds one lock, so
    threads may share an instance.
    """

    def __init__(self, model: Recommender, silo: Silo, *, cache_dir: Path | None = None) -> None:
        self.model = model.eval()
        self._cache_dir = cache_dir
        self._lock = threading.RLock()
        reading = _Reading.of(silo, _stamp(silo.root))
        texts = dict(zip(reading.ids, reading.texts))
        self._texts = {item: texts[item] for item in model.item_ids if item in texts}  # what the model encoded
        self._use(reading)

    @classmethod
    def load(
        cls, adapter_dir: Path, data: Path, *, cache_dir: Path | None = None, state_dir: Path | None = None
    ) -> SiloRecommender:
        """The adapter saved in `adapter_dir`, over the silo in folder `data` (`load_for_silo`)."""
        silo = load_silo(data)
        model = load_for_silo(adapter_dir, silo, cache_dir=cache_dir, state_dir=state_dir)
        return cls(model, silo, cache_dir=cache_dir)

    @property
    def silo(self) -> Silo:
        return self._state.silo

    @property
    def users(self) -> list[str]:
        return list(self._state.histories)

    @property
    def n_items(self) -> int:
        """Items served now (the silo's catalog)."""
        return int(self._state.active.sum())

    def refresh(self) -> int:
        """Re-read the silo if one of its data files changed since: how many items were added or re-encoded.

        The files are read and validated before the lock is taken, so
        requests are answered meanwhile; a silo that does not validate raises
        and the last good one stays served.
        """
        root = self._state.silo.root
        stamp = _stamp(root)  # before reading: a write that lands during the read shows at the next look
        if stamp == self._state.stamp:
            return 0
        reading = _Reading.of(load_silo(root), stamp)
        with self._lock:
            return self._use(reading)

    def _use(self, reading: _Reading) -> int:
        """Serve `reading`: new items join the model, items whose text changed are re-encoded; then one swap."""
        silo, ids = reading.silo, reading.ids
        changed = [i for i, item in enumerate(ids) if self._texts.get(item) != reading.texts[i]]
        known = set(self.model.item_ids)
        new = [i for i in changed if ids[i] not in known]
        edited = [i for i in changed if ids[i] in known]
        if changed:
            texts = [reading.texts[i] for i in changed]
            vectors = dict(zip(changed, self.model.encode_texts(texts, cache_dir=self._cache_dir)))
            if new:
                self.model.add_items(
                    [ids[i] for i in new], [reading.texts[i] for i in new], torch.stack([vectors[i] for i in new])
                )
        where = {item: j for j, item in enumerate(self.model.item_ids)}
        if edited:
            self.model.update_items(
                [where[ids[i]] for i in edited],
                [reading.texts[i] for i in edited],
                torch.stack([vectors[i] for i in edited]),
            )
        self._texts |= {ids[i]: reading.texts[i] for i in changed}
        to_model = np.array([where[item] for item in ids], dtype=np.int64)
        active = torch.zeros(len(self.model.item_ids), dtype=torch.bool)
        active[torch.as_tensor(to_model)] = True
        self._state = _Catalog(
            silo=silo,
            stamp=reading.stamp,
            index={item: int(j) for item, j in zip(ids, to_model)},
            titles=dict(zip(ids, silo.items["title"])),
            active=active,
            histories={user: to_model[seq] for user, seq in zip(reading.users, reading.sequences)},
        )
        return len(changed)

    # --- recommendations ----------------------------------------------------------

    def title(self, item_id: str) -> str:
        return self._state.titles[item_id]

    def history(self, user_id: str, *, field: str = "user") -> np.ndarray:
        """The user's catalog indices (the model's), oldest first."""
        try:
            return self._state.histories[str(user_id)]
        except KeyError:
            raise UnknownError(field, str(user_id), "user") from None

    def session(self, item_ids: Sequence[str], *, field: str = "items") -> np.ndarray:
        """A live session's item ids (oldest first) as catalog indices."""
        index = self._state.index
        try:
            return np.array([index[str(i)] for i in item_ids], dtype=np.int64)
        except KeyError as e:
            raise UnknownError(field, str(e.args[0]), "item") from None

    def recommend_user(self, user_id: str, k: int = 10, *, repeats: bool = False) -> list[Pick]:
        return self.recommend_histories([self.history(user_id)], k, repeats=repeats)[0]

    def recommend(self, item_ids: Sequence[str], k: int = 10, *, repeats: bool = False) -> list[Pick]:
        return self.recommend_histories([self.session(item_ids)], k, repeats=repeats)[0]

    def recommend_histories(
        self, histories: Sequence[np.ndarray], k: int, *, repeats: bool = False
    ) -> list[list[Pick]]:
        """Top-k for each history (catalog indices), in one pass of the user tower."""
        with self._lock:
            scores = score_histories(self.model, histories)
            return self._picks(scores, [() if repeats else h for h in histories], k)

    def export(self, k: int, *, repeats: bool = False, batch_size: int = 256, progress: bool = True) -> pd.DataFrame:
        """Top-k for every user of the silo: user_id, rank (1…k), item_id, title, score."""
        rows: list[tuple[str, int, str, str, float]] = []
        with self._lock:  # one catalog and one set of histories throughout, even if the silo changes meanwhile
            users = self.users
            for user, picks in zip(users, self._batched(users, k, repeats, batch_size, progress)):
                rows += [(user, rank, p.item_id, p.title, p.score) for rank, p in enumerate(picks, start=1)]
        frame = pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "title", "score"])
        return frame.astype({"rank": "int32", "score": "float32"})

    def _batched(
        self, users: list[str], k: int, repeats: bool, batch_size: int, progress: bool
    ) -> Iterator[list[Pick]]:
        starts = range(0, len(users), batch_size)
        for start in tqdm(starts, desc="users", unit="batch", disable=not progress, leave=False):
            batch = [self.history(u) for u in users[start : start + batch_size]]
            yield from self.recommend_histories(batch, k, repeats=repeats)

    # --- the item tower: search and similar items ---------------------------------

    def search(self, text: str, k: int = 10) -> list[Pick]:
        """The catalog ranked for `text` by the item tower: cosine of the query's vector and each item's."""
        if not text.strip():
            raise ValueError("a search needs some text")
        with self._lock:
            query = self.model.encode_texts([text])[0]
            return self._picks((self.model.item_vectors @ query)[None], [()], k)[0]

    def similar(self, item_id: str, k: int = 10) -> list[Pick]:
        """The items nearest `item_id` in the item tower's space, the item itself left out."""
        with self._lock:
            index = self.session([item_id], field="item_id")
            vectors = self.model.item_vectors
            return self._picks((vectors @ vectors[int(index[0])])[None], [index], k)[0]

    def _picks(self, scores: torch.Tensor, excluded: Sequence[Sequence[int]], k: int) -> list[list[Pick]]:
        state = self._state
        scores = scores.float().cpu().masked_fill(~state.active, float("-inf"))
        for row, items in enumerate(excluded):
            if len(items):
                scores[row, torch.as_tensor(np.asarray(items, dtype=np.int64))] = float("-inf")
        values, idx = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        ids = self.model.item_ids
        return [
            [Pick(ids[i], state.titles[ids[i]], v) for i, v in zip(r.tolist(), s.tolist()) if v != float("-inf")]
            for r, s in zip(idx, values)
        ]


@dataclass(frozen=True)
class _Reading:
    """A silo as read from its files, and what serving it needs that takes no lock to compute."""

    silo: Silo
    stamp: tuple
    ids: list[str]
    texts: list[str]
    users: list[str]
    sequences: list[np.ndarray]

    @classmethod
    def of(cls, silo: Silo, stamp: tuple) -> _Reading:
        users, sequences = user_sequences(silo.interactions)
        return cls(silo, stamp, list(silo.items["item_id"]), item_texts(silo.items), users, sequences)


@dataclass(frozen=True)
class _Catalog:
    """What is served now, swapped whole on a refresh: a request reads one or the other, never half of each."""

    silo: Silo
    stamp: tuple
    index: dict[str, int]  # item id → the model's catalog index
    titles: dict[str, str]
    active: torch.Tensor  # the model's items that the silo holds now
    histories: dict[str, np.ndarray]  # user → the model's catalog indices, oldest first


_DATA_FILES = ("items", "interactions", "users")


def _stamp(root: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when a data file of the silo is written: names, sizes, modification times (others ignored)."""
    stamp = []
    for p in sorted(Path(root).iterdir()):
        if p.stem in _DATA_FILES or p.suffix in (".inter", ".item", ".user"):
            try:
                info = p.stat()
            except FileNotFoundError:  # replaced while we looked: the next look sees the new one
                continue
            stamp.append((p.name, info.st_size, info.st_mtime_ns))
    return tuple(stamp)
