"""BentoML service of the agreelens agreement checker (a thin shell over :mod:`agreelens.checker`).

    BENTOML_DO_NOT_TRACK=true BENTOML_HOME=.bentoml bentoml serve services.service:AgreeLens --port 3000

Endpoints:

- ``POST /check {"text": str, "activations": bool = false}``: per sentence the tokens and agreement
  sites with margin, verdict, suggestion and confidence (``activations``: the number units' c and h per
  token as well).
- ``POST /check_batch {"texts": [str]}``: the same for several texts, adaptively batched across requests;
  a bad text gives ``{"error", "status"}`` in its place.
- ``POST /explain {"text": str, "site": int | null}``: a site's number-unit trajectories, the readout of
  the subject's number, and the margin with each number unit ablated.
- ``POST /score {"pairs": [BLiMP-style objects], "method": "auto"}``: accuracy of minimal pairs.
- ``GET /``: the checker as a web page (self-contained: no external script or style); ``GET /docs``:
  BentoML's OpenAPI UI (``/docs.json``); ``/livez``, ``/readyz``, ``/metrics`` as BentoML serves them.

Settings: the ``service`` section of ``params.yaml``. Environment: ``AGREELENS_SERVICE_MODEL`` overrides
``service.model``; ``AGREELENS_PROJECT`` is the project folder (params.yaml, metrics/, models/; default
this file's parent's parent); ``AGREELENS_PROFILE`` picks a profile; when the variable named by
``service.api_key_env`` (``AGREELENS_API_KEY``) is set, every POST needs its value in an ``X-API-Key`` (or
``Authorization: Bearer``) header.

Startup: a worker that cannot load the model (unreadable or corrupt files, no fallback, unreadable
calibration) logs why, naming the file, and stops the whole server: ``bentoml serve`` exits with status 3
(:data:`EXIT_STARTUP_FAILED`) instead of restarting the worker forever behind a port that never answers.

Bad input never gives a 5xx: a body over ``max_body_bytes`` (413), not JSON (400) or not an object (400),
a wrong field type (400, BentoML's validation), empty or blank text, control characters (400), text over
``max_chars`` characters or ``max_sentences`` sentences (413), more than ``batch_max_size`` texts in one
/check_batch (413), a site out of range (422), a wrong or missing API key (401); each answer is a JSON
object ``{"error": message}``.
"""

from __future__ import annotations

import atexit
import hmac
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

ROOT = Path(os.environ.get("AGREELENS_PROJECT") or Path(__file__).resolve().parents[1]).resolve()
if str(ROOT) not in sys.path:  # the agreelens package, where it is not installed
    sys.path.insert(0, str(ROOT))

from agreelens.tracking import setup_env  # noqa: E402

setup_env(ROOT)  # telemetry off, MLflow state (the registry) inside the project

import bentoml  # noqa: E402
from pydantic import Field  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from agreelens.checker import InputError, load_checker, validate_text  # noqa: E402
from agreelens.scoring import Pair, pair_problem  # noqa: E402
from agreelens.config import load_params  # noqa: E402

log = logging.getLogger("bentoml.service.agreelens")
PARAMS = load_params(ROOT / "params.yaml")
CFG = PARAMS.service
PAGE = Path(__file__).with_name("page.html")
JSON_ROUTES = ("/check", "/check_batch", "/explain", "/score")


# ---------------------------------------------------------------------------------------- startup failure

EXIT_STARTUP_FAILED = 3
SERVER_PID_ENV = "AGREELENS_SERVER_PID"  # the `bentoml serve` process, as its workers see it
_startup_failed = False


def _is_worker() -> bool:
    from bentoml._internal.context import server_context

    return server_context.worker_index is not None


def _stop_on_worker_failure(signum, frame) -> None:
    """In the ``bentoml serve`` process: a worker could not start; stop every worker (circus' own SIGTERM
    handling) and exit with EXIT_STARTUP_FAILED."""
    global _startup_failed
    if not _startup_failed:
        _startup_failed = True
        log.error("agreelens: a worker could not load the service (its error is above); stopping the server, "
                  "exit status %d", EXIT_STARTUP_FAILED)
        signal.raise_signal(signal.SIGTERM)


def _exit_status() -> None:
    if _startup_failed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_STARTUP_FAILED)


def _watch_workers() -> None:
    """Run in the ``bentoml serve`` process (which imports this module before it spawns the workers)."""
    os.environ[SERVER_PID_ENV] = str(os.getpid())
    try:
        signal.signal(signal.SIGUSR2, _stop_on_worker_failure)
    except ValueError:  # imported outside the main thread: not a server process
        return
    atexit.register(_exit_status)


def _stop_server() -> None:
    """In a worker whose service failed to start: tell the ``bentoml serve`` process that started it."""
    pid = os.environ.get(SERVER_PID_ENV, "")
    if pid.isdigit() and int(pid) == os.getppid():
        os.kill(int(pid), signal.SIGUSR2)


if not _is_worker():
    _watch_workers()


def registry_available() -> bool:
    """A registry to load ``models:/...`` from: a tracking server the user named, or the project's own
    ``mlflow.db`` (the default URI that :func:`setup_env` sets must not create an empty one, e.g. in a
    Bento)."""
    db = ROOT / "mlflow.db"
    return os.environ.get("MLFLOW_TRACKING_URI", "") != f"sqlite:///{db}" or db.is_file()


def _error(err: InputError) -> JSONResponse:
    return JSONResponse({"error": str(err)}, status_code=err.status)


# ---------------------------------------------------------------------------------------- guard


class Guard:
    """ASGI middleware on every POST: the API key (when its variable is set), the body size limit, and
    for the JSON endpoints a body that parses as a JSON object (and for ``/score``, pairs that are
    :class:`agreelens.scoring.Pair`); answers 401 / 413 / 415 / 400 itself with ``{"error": ...}``, and passes
    the body it read on to BentoML unchanged.

    ``/check_batch`` takes at most ``max_batch_texts`` (``service.batch_max_size``) texts (else 413):
    BentoML's dispatcher splits a larger request into chunks of one batch, and cancels the chunks still
    queued once the request has waited ``batch_max_latency_ms``, which answered a single large request
    with a 503 ("process is overloaded")."""

    def __init__(self, app, api_key_env: str = "AGREELENS_API_KEY", max_body_bytes: int = 2_000_000,
                 json_routes: tuple[str, ...] = JSON_ROUTES, max_batch_texts: int = 32):
        self.app, self.api_key_env, self.max_body, self.json_routes = app, api_key_env, max_body_bytes, json_routes
        self.max_batch_texts = max_batch_texts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = os.environ.get(self.api_key_env, "")
        if key:
            given = headers.get("x-api-key", "")
            auth = headers.get("authorization", "")
            if not given and auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), key.encode()):
                return await self._answer(send, 401, "missing or wrong API key (send it in the X-API-Key header)")
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            return await self._answer(send, 400, "Content-Length is not a number")
        if declared > self.max_body:
            return await self._answer(send, 413, f"body of {declared:,} bytes; the limit is {self.max_body:,}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await self._answer(send, 413, f"body over the limit of {self.max_body:,} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        path = scope.get("path", "").rstrip("/")
        if path in self.json_routes:
            ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if ctype not in ("application/json", ""):
                return await self._answer(send, 415, f"send JSON (Content-Type: application/json), not {ctype}")
            try:
                data = json.loads(body.decode("utf-8"))
            except UnicodeDecodeError:
                return await self._answer(send, 400, "body is not UTF-8")
            except ValueError as err:
                return await self._answer(send, 400, f"body is not valid JSON: {err}")
            if not isinstance(data, dict):
                return await self._answer(send, 400, f"body must be a JSON object, got {type(data).__name__}")
            pairs = data.get("pairs") if path == "/score" else None
            for i, rec in enumerate(pairs if isinstance(pairs, list) else []):  # the Pair model's message
                problem = pair_problem(rec)
                if problem:
                    return await self._answer(send, 400, f"pairs[{i}]: {problem}")
            texts = data.get("texts") if path == "/check_batch" else None
            if isinstance(texts, list) and len(texts) > self.max_batch_texts:
                return await self._answer(send, 413, f"{len(texts):,} texts; the limit is {self.max_batch_texts} "
                                                     "per /check_batch request (send more in separate requests)")
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def _answer(send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------- web page


async def page(request: Request) -> Response:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


async def docs(request: Request) -> Response:
    """BentoML's own OpenAPI UI, which ``/`` (the checker page) replaces."""
    try:
        import _bentoml_impl.server as server

        index = Path(server.__file__).with_name("main-openapi.html")
        if index.is_file():
            return FileResponse(index)
    except ImportError:
        pass
    return JSONResponse({"error": "no OpenAPI UI in this BentoML; the spec is at /docs.json"}, status_code=404)


ui = Starlette(routes=[Route("/", page, methods=["GET"]), Route("/docs", docs, methods=["GET"])])


# ---------------------------------------------------------------------------------------- service


@bentoml.asgi_app(ui, path="/")
@bentoml.service(name="agreelens", workers=CFG.workers, traffic={"timeout": CFG.timeout})
class AgreeLens:
    """Loads the model once per worker: ``AGREELENS_SERVICE_MODEL`` or ``service.model`` (default the
    registry's champion), else ``service.fallback`` with a log line saying why."""

    def __init__(self) -> None:
        try:
            self._start()
        except Exception as err:
            log.error("agreelens: the service cannot start: %s: %s", type(err).__name__, err)
            _stop_server()
            raise

    def _start(self) -> None:
        import torch

        torch.set_num_threads(CFG.threads)
        spec = os.environ.get("AGREELENS_SERVICE_MODEL") or CFG.model
        if spec.startswith("models:/") and not registry_available():  # don't create an empty mlflow.db (e.g. in a Bento)
            log.warning("agreelens: no MLflow registry for %s (MLFLOW_TRACKING_URI unset, no %s); falling back to %s",
                        spec, ROOT / "mlflow.db", CFG.fallback)
            spec = CFG.fallback
        self.checker = load_checker(spec, PARAMS, root=ROOT, fallback=CFG.fallback)
        for note in self.checker.notes:
            log.warning("agreelens: %s", note)
        self.checker.readout()  # fit the explanation's readout now, not on the first /explain
        op = self.checker.op
        log.info("agreelens: serving %s (evidence %s, expected false alarms per 100 correct sentences %s%s, "
                 "%d verbs, units %s)", self.checker.name, op.evidence, op.expected.get("false_alarms_per_100", "-"),
                 "" if self.checker.calibrated else ", not calibrated", len(self.checker.lexicon.verbs),
                 self.checker.units)

    @bentoml.api
    def check(self, text: str, activations: bool = False) -> dict:
        """Agreement sites of the text with margin, verdict, suggestion and confidence."""
        try:
            return self.checker.check(text, activations)
        except InputError as err:
            return _error(err)

    @bentoml.api(batchable=True, max_batch_size=CFG.batch_max_size, max_latency_ms=CFG.batch_max_latency_ms)
    def check_batch(self, texts: list[str]) -> list[dict]:
        """``/check`` for several texts at once (adaptive batching merges concurrent requests)."""
        out: list[Any] = [None] * len(texts)
        good = []
        for i, t in enumerate(texts):
            try:
                validate_text(t, self.checker.max_chars, self.checker.max_sentences)
                good.append(i)
            except InputError as err:
                out[i] = {"error": str(err), "status": err.status}
        for i, r in zip(good, self.checker.check_many([texts[i] for i in good])):
            out[i] = r
        return out

    @bentoml.api
    def explain(self, text: str, site: Optional[Annotated[int, Field(ge=0)]] = None) -> dict:
        """Number units, subject-number readout and unit ablations for one site (default: first error)."""
        try:
            return self.checker.explain(text, site)
        except InputError as err:
            return _error(err)

    @bentoml.api
    def score(self, pairs: list[Pair], method: str = "auto") -> dict:
        """Minimal pairs (BLiMP fields, ``agreelens.scoring.Pair``) -> ``{"accuracy", "n", "oov", "groups",
        "method"}``."""
        try:
            return self.checker.score([p.model_dump(exclude_none=True) for p in pairs], method, CFG.max_pairs)
        except InputError as err:
            return _error(err)


AgreeLens.add_asgi_middleware(Guard, api_key_env=CFG.api_key_env, max_body_bytes=CFG.max_body_bytes,
                               max_batch_texts=CFG.batch_max_size)
