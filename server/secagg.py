"""Secure sums: Flower's SecAgg+, so the coordinator learns only the sum over merchants of what each one sends.

Flower offers SecAgg+ only through its legacy workflow API (LegacyContext,
SecAggPlusWorkflow, a legacy Strategy); this module keeps all of that in one
place, behind `SecureSum`: set up once per run, then one call per sum. What a
sum asks of each merchant is a `SumSpec` in the fit config:

- `update` (silo mode): users × the merchant's update and its users, masked;
  the workflow unmasks only their sums and divides: users-weighted FedAvg.
  Fixed point: clipping range = max-update-norm (a merchant clips its update
  to it), max weight = twice the most users any merchant has reported,
  quantisation range = the largest power of two Q with 2·(n+1)·Q ≤ 2³², so
  nothing wraps; the mean is exact up to stochastic rounding of about
  2·bound/Q per merchant and coordinate, scaled by max weight/users.
- `gradient`, `popularity`, `cooccurrence` (federation mode): integer shares
  on the lattice of `common.distributed_dp`, each with weight 1 and SecAgg+'s
  clipping range at half its quantisation range, so that its quantiser is
  the identity on them; the coordinator recovers the exact integer sum.

No single update is ever seen, so none can be screened, and robust
aggregation is not available. A sum with fewer replies than the spec's
`min_replies` is abandoned, never applied (merchants also refuse to unmask
it: `client.secagg`). Each mask's seed is cut to 32 bits by Flower
(`pseudo_rand_gen` seeds NumPy's RandomState): with two merchants in a sum a
coordinator could search those seeds for one merchant's masked vector, so a
sum needs three merchants or more where that matters (docs/threat-model.md).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.common import FitIns, FitRes, Parameters, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from common import distributed_dp, seal
from common.arrays import pack, to_record
from common.errors import SilorecError
from common.logs import log
from common.messages import SEALED_GLOBAL_KEY, SumSpec
from server.sealing import Envelope
from server.settings import ServerSettings
from server.strategy import MerchantReport, RoundResult

NUM_SHARES = 1.0  # every sampled merchant holds a share of every other's secrets (full SecAgg graph)
RECONSTRUCTION_THRESHOLD = 2 / 3  # of the shares: a sum survives a third dropping out, fewer colluders unmask no one
DEFAULT_MAX_WEIGHT = 1000.0  # before any merchant has reported its users (Flower's default)
MODULUS = distributed_dp.MODULUS


def reconstruction_threshold(merchants: int, min_replies: int) -> int:
    """Shares needed to unmask: SecAgg+'s two thirds, and more than the n − m_min merchants that may collude.

    A coalition holding that many shares of an honest merchant's secrets
    could unmask its share alone, which carries only σ²C²/m_min of noise;
    below the threshold it can unmask only sums over m_min or more merchants.
    """
    return max(2, round(RECONSTRUCTION_THRESHOLD * merchants), merchants - min_replies + 1)


def quantization_range(merchants: int) -> int:
    """The largest power of two Q with 2·(merchants+1)·Q ≤ 2**32: sums of n values in [0, Q] never wrap."""
    return 1 << ((MODULUS // (2 * (merchants + 1))).bit_length() - 1)


class TimedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, timing each of its four stages (the merchants' own work is in collect).

    Two changes to how it treats merchants:

    - A merchant lost before it delivered its key shares is out of the sum.
      Every merchant masks only with those whose shares reached it, so no mask
      involves the lost one. Flower would still count it as a dropout to
      unmask and halt for want of its shares.
    - A reply whose masked vector is not the expected shapes is turned into an
      error reply before it is summed, as if that merchant had dropped out.
      Flower would add it to the sum and crash on the mismatch, or, worse,
      broadcast a short one silently.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds: dict[str, float] = {}
        self.shapes: list[tuple[int, ...]] | None = None  # of the masked vector; None: not screened
        self.screened: list[str] = []  # why replies were refused, one line each
        for stage in ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage"):
            setattr(self, stage, self._timed(stage, getattr(self, stage)))

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        super().share_keys_stage(grid, context, state)  # its verdict counts the lost merchants: judged again below
        state.sampled_node_ids = set(state.active_node_ids)  # U2 of SecAgg+: who delivered key shares
        return self._check_threshold(state)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        if self.shapes is None:
            return super().collect_masked_vectors_stage(grid, context, state)
        return super().collect_masked_vectors_stage(ScreenedGrid(grid, self.shapes, self.screened), context, state)

    def _timed(self, name: str, stage):
        def run(*args: Any) -> bool:
            t0 = time.perf_counter()
            try:
                return stage(*args)
            finally:
                self.seconds[name.removesuffix("_stage")] = round(time.perf_counter() - t0, 4)

        return run


class ScreenedGrid:
    """A Grid whose replies to SecAgg+'s collect stage carry exactly the expected masked shapes, or become errors."""

    def __init__(self, grid: Grid, shapes: list[tuple[int, ...]], refused: list[str]) -> None:
        self._grid, self._shapes, self._refused = grid, shapes, refused

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        return [self._screen(reply) for reply in self._grid.send_and_receive(messages, timeout=timeout)]

    def _screen(self, reply: Message) -> Message:
        if reply.has_error():
            return reply
        reason = masked_vector_fault(reply, self._shapes)
        if reason is None:
            return reply
        self._refused.append(f"node {reply.metadata.src_node_id}: {reason}")
        return Message(metadata=reply.metadata, error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason))


def masked_vector_fault(reply: Message, shapes: list[tuple[int, ...]]) -> str | None:
    """Why a collect-stage reply is not a masked vector of `shapes` (int64 words below the modulus), or None."""
    configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    blobs = configs.get(SecAggKey.MASKED_PARAMETERS) if configs is not None else None
    if not isinstance(blobs, list) or len(blobs) != len(shapes):
        return f"its masked vector has {len(blobs) if isinstance(blobs, list) else 'no'} tensors, not {len(shapes)}"
    expected = sum(8 * int(np.prod(s)) for s in shapes)
    size = sum(len(b) for b in blobs if isinstance(b, bytes))
    if size > 2 * expected + 1024 * len(shapes):  # before parsing: a reply far past the bound is not even read
        return f"its masked vector is {size:,} bytes, past the bound of about {expected:,}"
    try:
        arrays = [bytes_to_ndarray(b) for b in blobs]
    except Exception as e:  # noqa: BLE001 - any unparsable bytes are the same fault
        return f"its masked vector does not parse ({type(e).__name__})"
    for i, (a, want) in enumerate(zip(arrays, shapes)):
        if tuple(a.shape) != tuple(want) or not np.issubdtype(a.dtype, np.integer):
            return f"masked tensor {i} is {a.dtype}{list(a.shape)}, not int{list(want)}"
    return None


class SumCollector(LegacyFedAvg):
    """The legacy strategy SecAgg+ drives: samples merchants, gives each the sum's config (and the global adapter,
    sealed to it), and keeps what the workflow unmasks."""

    def __init__(self, settings: ServerSettings, envelope: Envelope) -> None:
        super().__init__(
            fraction_fit=settings.fraction_train,
            fraction_evaluate=0.0,
            min_fit_clients=2,
            min_available_clients=settings.min_available_clients,
            on_fit_config_fn=lambda _: self.fit_config,
        )
        self.envelope = envelope
        self.fit_config: dict[str, Any] = {}
        self.spec: SumSpec | None = None
        self.payload: bytes | None = None  # the packed global adapter, sealed to each merchant in its fit config
        self.nodes: set[int] | None = None  # only these merchants, if set
        self.result: RoundResult | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        # FedAvg would wait until min_available_clients are online, for ever if a merchant was lost mid-run: a sum
        # needs only the merchants online now, at least the spec's min_replies (else it is abandoned at once)
        online = [p for p in client_manager.all().values() if self.nodes is None or p.node_id in self.nodes]
        self.min_available_clients = max(2, self.spec.min_replies if self.spec else 2)
        if len(online) < self.min_available_clients:
            log(
                WARNING,
                "round %d: %d merchant(s) online, fewer than the %d this sum needs",
                server_round,
                len(online),
                self.min_available_clients,
            )
            return []
        pairs = [
            (p, ins)
            for p, ins in super().configure_fit(server_round, parameters, client_manager)
            if self.nodes is None or p.node_id in self.nodes
        ]
        if self.payload is None:
            return pairs
        sealed = []
        for proxy, ins in pairs:
            public = self.envelope.merchant_keys.get(proxy.node_id)
            if public is None:
                log(
                    WARNING,
                    "round %d: node %d gave no sealing key; it is left out (nothing is sent in the clear)",
                    server_round,
                    proxy.node_id,
                )
                continue
            context = seal.update_context(self.envelope.run_id, server_round, proxy.node_id, kind="global-secagg")
            config = dict(ins.config) | {SEALED_GLOBAL_KEY: seal.seal(self.payload, public, context)}
            sealed.append((proxy, FitIns(ndarrays_to_parameters([]), config)))
        return sealed

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
    ) -> tuple[Parameters | None, dict]:
        """Every result carries the unmasked mean; the metrics are each merchant's own."""
        assert self.spec is not None
        result = RoundResult(total=None)
        for proxy, res in results:
            metrics = {
                k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            merchant = MerchantReport(
                proxy.node_id,
                str(res.metrics.get("silo", "?")),
                metrics,
                "accepted" if res.num_examples > 0 else "no-update",
                str(res.metrics.get("reason", "")),
            )
            merchant.update_bytes = sum(a.size for a in parameters_to_ndarrays(res.parameters)) * 8  # masked int64
            result.merchants.append(merchant)
        for reason in dict.fromkeys(failure_reason(str(f)) for f in failures):  # Flower may list one failure twice
            result.merchants.append(MerchantReport(-1, "?", {}, "error", reason))
        result.contributors = len(result.accepted)
        need = max(2, self.spec.min_replies)
        mean = parameters_to_ndarrays(results[0][1].parameters) if results else []
        if result.contributors < need:
            result.reason = f"{result.contributors} merchant(s) in the sum, fewer than the {need} it needs"
        elif not all(np.isfinite(a).all() for a in mean):
            result.reason = "the unmasked sum is not finite"
        elif self.spec.lattice is None:
            result.total = dict(zip(self.spec.names, mean, strict=True))
        else:
            result.total = distributed_dp.decode(
                dict(zip(self.spec.names, mean, strict=True)), result.contributors, self.spec.lattice
            )
        self.result = result
        return None, {}


class SecureSum:
    """SecAgg+ for a run: the legacy machinery set up once; each call sums one `SumSpec` over the merchants."""

    def __init__(self, grid: Grid, context: Context, settings: ServerSettings, envelope: Envelope) -> None:
        self.grid = grid
        self.settings = settings
        self.envelope = envelope
        self.collector = SumCollector(settings, envelope)
        self.legacy = LegacyContext(
            context,
            ServerConfig(num_rounds=max(1, settings.rounds), round_timeout=settings.round_timeout),
            self.collector,
            SimpleClientManager(),
        )
        self.users_seen: list[float] = []  # merchants' user counts, for `update` sums' max weight
        _, self._stop, ready = start_update_client_manager_thread(grid, self.legacy.client_manager)
        ready.wait()

    def close(self) -> None:
        self._stop.set()

    def __call__(
        self,
        rnd: int,
        config: ConfigRecord | Mapping[str, Any],
        spec: SumSpec,
        *,
        sealed: Mapping[str, np.ndarray] | None = None,
        nodes: set[int] | None = None,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> RoundResult:
        """Run one SecAgg+ sum of `spec` over the merchants (all, or `nodes`) and return what it unmasked.

        `sealed` travels to each merchant sealed to its key: the global
        adapter, or the item keys a release counts over. `shapes` are the
        tensors each merchant must send, by name; a reply of other shapes or
        past their size is refused before it is summed.
        """
        c = self.collector
        c.spec, c.nodes, c.result = spec, nodes, None
        c.fit_config = dict(config) | spec.to_config()
        c.payload = None
        params: dict[str, np.ndarray] = {}
        if sealed is not None and self.envelope.key is not None:
            self.envelope.ensure_keys(self.grid, sorted(self.grid.get_node_ids()), ConfigRecord(dict(config)))
            c.payload = pack(dict(sealed))
        elif sealed is not None:  # a run without sealing (debugging only): in the clear, as legacy parameters
            params = {k: np.asarray(sealed[k]) for k in sorted(sealed)}
            c.fit_config["sum-global-names"] = ",".join(params)
        self.legacy.state.array_records[MAIN_PARAMS_RECORD] = to_record(params)
        self.legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
        workflow = self._workflow(spec, merchants=len(nodes) if nodes is not None else len(self.grid.get_node_ids()))
        if shapes is not None:
            workflow.shapes = [(1,), *(tuple(shapes[n]) for n in spec.names)]  # Flower prepends the weight factor
        workflow(self.grid, self.legacy)
        result = c.result or RoundResult(
            total=None, reason="SecAgg+ halted before it could unmask the sum (too few merchants answered)"
        )
        for reason in workflow.screened:  # the training logs each refused merchant, as it does every rejection
            result.merchants.append(MerchantReport(-1, "?", {}, "rejected", f"refused before the sum: {reason}"))
        result.workflow = {
            "clipping_range": workflow.clipping_range,
            "quantization_range": workflow.quantization_range,
            "max_weight": workflow.max_weight,
            "modulus": workflow.modulus_range,
            "seconds": workflow.seconds,
        }
        self.users_seen += [m.metrics["users"] for m in result.merchants if m.metrics.get("users")]
        return result

    def _workflow(self, spec: SumSpec, *, merchants: int) -> TimedSecAggPlus:
        common = {
            "num_shares": NUM_SHARES,
            "reconstruction_threshold": RECONSTRUCTION_THRESHOLD,
            "timeout": self.settings.round_timeout,
        }
        if spec.lattice is not None:
            return TimedSecAggPlus(
                max_weight=1.0,
                clipping_range=float(spec.lattice.half),
                quantization_range=spec.lattice.range,
                modulus_range=spec.lattice.modulus,
                **common,
            )
        return TimedSecAggPlus(
            max_weight=2.0 * max(self.users_seen) if self.users_seen else DEFAULT_MAX_WEIGHT,
            clipping_range=float(spec.clip),
            quantization_range=quantization_range(max(merchants, 2)),
            modulus_range=MODULUS,
            **common,
        )


_RELAYED = re.compile(r"Error\(code=\d+, reason=['\"](.+)['\"]\)", re.S)
_RAISED = re.compile(r"(?:client|common|server)\.\w+\.\w+: (.+?)(?:\\n|\n|'>|$)")


def failure_reason(text: str) -> str:
    """What a merchant's ClientApp raised, from the error Flower relays (a repr of a remote traceback), in one line."""
    raised = _RAISED.findall(text)
    if raised:
        return raised[-1].strip().rstrip("\\")
    relayed = _RELAYED.fullmatch(text.strip())  # Flower's own Error(code=…, reason='…'): a lost node, say
    if relayed:
        return relayed.group(1).removeprefix("Error: ")
    lines = [line.strip() for line in text.replace("\\n", "\n").splitlines() if line.strip()]
    return lines[-1][:500] if lines else "no reason given"


def check(settings: ServerSettings) -> None:
    """Raise SilorecError if `settings` ask for something that SecAgg+ cannot give."""
    if settings.aggregation != "fedavg":
        raise SilorecError(
            f"aggregation {settings.aggregation!r} needs each update in the clear; with secure aggregation "
            "(federation mode, or secure-aggregation = true) only fedavg is possible: choose one of the two"
        )
    if settings.min_fit_clients < 2:
        raise SilorecError(
            "secure aggregation over one merchant reveals that merchant's update: set min-fit-clients to 2 or more"
        )
