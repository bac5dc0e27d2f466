"""`silorec-client serve`: a merchant's recommendations over HTTP, as JSON (FastAPI, served by uvicorn).

    GET  /health                      {"status": "ok", "users": …, "items": …}
    GET  /recommend?user=ID&k=10      a user of the silo, from their whole history
    POST /recommend {"items": [ids], "k": 10}   an anonymous live session's recent items, oldest first
    GET  /search?q=TEXT&k=10          the catalog ranked for a text query
    GET  /items/{id}/similar?k=10     the items nearest one item

Every list answer is {"items": [{"id", "title", "score"}, …]}; every error is
{"error": "…", "field": "…"} with a 4xx status. With an API key, every route
but /health needs it as `Authorization: Bearer KEY` or `X-API-Key: KEY`.

The model is loaded once. Requests are answered concurrently: the
recommendation requests that arrive together are scored in one pass of the
user tower (`Batcher`), and the silo is re-read in the background when its
files change, so new products are served without a restart.
"""

from __future__ import annotations

import hmac
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import SilorecError
from common.serve import Pick, SiloRecommender, UnknownError

MAX_K = 1000
log = logging.getLogger("silorec.serve")


class Session(BaseModel):
    items: list[str] = Field(description="The session's item ids, oldest first.", max_length=10_000)
    k: int = Field(10, ge=1, le=MAX_K)
    repeats: bool = False


@dataclass
class _Ask:
    history: np.ndarray
    k: int
    repeats: bool
    answer: Future


class Batcher:
    """Score the recommendation requests waiting at one moment in one pass (at most `max_batch` at once).

    One thread owns the scoring; a request waits on its future. Under load
    this turns many single-user passes into a few batched ones, which is
    where the throughput of concurrent clients comes from.
    """

    def __init__(
        self,
        score: Callable[[Sequence[np.ndarray], int, Sequence[bool]], list[list[Pick]]],
        *,
        max_batch: int = 32,
        timeout: float = 60.0,
    ) -> None:
        self._score = score
        self._max_batch = max_batch
        self._timeout = timeout
        self._queue: queue.Queue[_Ask | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="silorec-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def ask(self, history: np.ndarray, k: int, repeats: bool) -> list[Pick]:
        """The top-k for `history`; Unavailable if no answer comes within the timeout (stopped, or overloaded)."""
        if not self._thread.is_alive():
            raise Unavailable("the service is not scoring: it is starting or stopping")
        answer: Future = Future()
        self._queue.put(_Ask(history, k, repeats, answer))
        try:
            return answer.result(timeout=self._timeout)
        except TimeoutError:
            raise Unavailable(f"no answer within {self._timeout:g} s") from None

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    ask = self._queue.get_nowait()
                except queue.Empty:
                    break
                if ask is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(ask)
            try:
                picks = self._score([a.history for a in batch], max(a.k for a in batch), [a.repeats for a in batch])
            except Exception as e:  # every waiting request gets the error, none hangs
                for a in batch:
                    a.answer.set_exception(e)
                continue
            for a, p in zip(batch, picks):
                a.answer.set_result(p[: a.k])


def score_mixed(
    recommender: SiloRecommender,
) -> Callable[[Sequence[np.ndarray], int, Sequence[bool]], list[list[Pick]]]:
    """Scoring for a batch whose requests differ in `repeats`: one pass for each kind present."""

    def score(histories: Sequence[np.ndarray], k: int, repeats: Sequence[bool]) -> list[list[Pick]]:
        out: list[list[Pick] | None] = [None] * len(histories)
        for kind in set(repeats):
            rows = [i for i, r in enumerate(repeats) if r == kind]
            for i, picks in zip(rows, recommender.recommend_histories([histories[i] for i in rows], k, repeats=kind)):
                out[i] = picks
        return out  # type: ignore[return-value]

    return score


def listing(picks: list[Pick]) -> dict:
    return {"items": [{"id": p.item_id, "title": p.title, "score": round(p.score, 6)} for p in picks]}


def error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


def create_app(recommender: SiloRecommender, *, api_key: str | None = None, refresh_seconds: float = 5.0) -> FastAPI:
    """The service over `recommender`; `api_key` None serves without one. `refresh_seconds` 0: never re-read."""
    batcher = Batcher(score_mixed(recommender))
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(refresh_seconds):
            try:
                changed = recommender.refresh()
            except SilorecError as e:  # a half-edited silo: keep serving the last good one
                log.warning("silo not reloaded, still serving the previous one: %s", e)
                continue
            except Exception:  # never let the watcher die: new products would silently stop being served
                log.exception("silo not reloaded, still serving the previous one")
                continue
            if changed:
                log.warning("silo reloaded: %d new or edited item(s) now served", changed)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        if refresh_seconds > 0:
            threading.Thread(target=watch, name="silorec-refresh", daemon=True).start()
        yield
        stop.set()
        batcher.close()

    app = FastAPI(title="silorec", summary="A merchant's recommendations", lifespan=lifespan)

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise _Unauthorised()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p not in ("query", "body", "path")]
        return error(422, first.get("msg", "invalid request"), ".".join(where) or None)

    @app.exception_handler(UnknownError)
    async def unknown(_request: Request, exc: UnknownError) -> JSONResponse:
        return error(404, str(exc), exc.field)

    @app.exception_handler(_Unauthorised)
    async def unauthorised(_request: Request, _exc: _Unauthorised) -> JSONResponse:
        answer = error(401, "a valid API key is needed (Authorization: Bearer KEY, or X-API-Key: KEY)")
        answer.headers["WWW-Authenticate"] = "Bearer"
        return answer

    @app.exception_handler(Unavailable)
    async def unavailable(_request: Request, exc: Unavailable) -> JSONResponse:
        return error(503, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        answer = error(exc.status_code, str(exc.detail))  # unknown route, wrong method, …
        answer.headers.update(exc.headers or {})
        return answer

    @app.exception_handler(Exception)
    async def failed(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed", exc_info=exc)
        return error(500, "internal error (see the service's log)")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "users": len(recommender.users), "items": recommender.n_items}

    @app.get("/recommend", dependencies=[Depends(authorised)])
    def recommend_user(
        user: str = Query(min_length=1), k: int = Query(10, ge=1, le=MAX_K), repeats: bool = False
    ) -> dict:
        return listing(batcher.ask(recommender.history(user), k, repeats))

    @app.post("/recommend", dependencies=[Depends(authorised)])
    def recommend_session(session: Session) -> dict:
        return listing(batcher.ask(recommender.session(session.items), session.k, session.repeats))

    @app.get("/search", dependencies=[Depends(authorised)])
    def search(q: str = Query(min_length=1, max_length=2000), k: int = Query(10, ge=1, le=MAX_K)) -> dict:
        if not q.strip():
            return error(422, "a search needs some text", "q")
        return listing(recommender.search(q, k))

    @app.get("/items/{item_id:path}/similar", dependencies=[Depends(authorised)])
    def similar(item_id: str, k: int = Query(10, ge=1, le=MAX_K)) -> dict:
        return listing(recommender.similar(item_id, k))

    return app


class _Unauthorised(Exception):
    pass


class Unavailable(Exception):
    """No answer can be given now (503)."""


def read_api_key(path: Path | None) -> str | None:
    """The API key in `path` (stripped), else $SILOREC_API_KEY, else None; an empty file is an error."""
    if path is not None:
        key = path.read_text().strip()
        if not key:
            raise SilorecError(f"{path}: the API key file is empty")
        return key
    return os.environ.get("SILOREC_API_KEY") or None
