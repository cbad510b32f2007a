"""Fuzzing the BentoML service (services/service.py) from its own OpenAPI spec with schemathesis: every
operation of ``/docs.json`` gets schema-conforming (positive) and, where it has a body, schema-violating
(negative) requests; none may be answered with a 5xx. Plus the regression tests of what fuzzing found.

The service runs on a free loopback port with the hand-set tiny model of tests/test_service.py
(tests/models.py), with no API key, so the requests reach the handlers. Bounded:
``AGREELENS_FUZZ_EXAMPLES`` examples per operation and mode (default 60; about 20-40 s in all with the
server's start on 2 cores), derandomized so that CI runs the same examples every time;
``AGREELENS_FUZZ_SEED=<int>`` explores other ones.

    pytest -m fuzz                                   # only these
    AGREELENS_FUZZ_EXAMPLES=1000 pytest -m fuzz      # a longer search
"""

from __future__ import annotations

import json
import os

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")
schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from tests.conftest import serve_agreelens  # noqa: E402
from tests.models import tiny_service_project  # noqa: E402

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("AGREELENS_FUZZ_EXAMPLES", "60"))
SEED = os.environ.get("AGREELENS_FUZZ_SEED")
POSTS = ["/check", "/check_batch", "/explain", "/score"]
GETS = ["/healthz", "/livez", "/readyz", "/metrics"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proj = tmp_path_factory.mktemp("fuzz")
    tiny_service_project(proj)
    with serve_agreelens(proj, "tiny") as srv:  # no API key
        yield srv


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(server["url"] + "/docs.json")


def _operations(schema) -> dict[str, object]:
    return {op.ok().label: op.ok() for op in schema.get_all_operations()}


def test_every_operation_of_the_spec_is_fuzzed(schema):
    assert set(_operations(schema)) == {f"POST {p}" for p in POSTS} | {f"GET {p}" for p in GETS}


@pytest.mark.parametrize("label, mode", [(f"POST {p}", m) for p in POSTS for m in ("positive", "negative")]
                         + [(f"GET {p}", "positive") for p in GETS])
def test_no_5xx(server, schema, label, mode):
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    op = _operations(schema)[label]
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED is None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink],
              print_blob=True)
    @given(op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def fuzz(case):
        r = case.call(base_url=server["url"], timeout=60)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, f"{case.as_curl_command()}\n-> {r.status_code} {r.text[:500]}"
        ctype = r.headers.get("content-type") or [""]  # schemathesis: header -> list of values
        if r.status_code >= 400 and (ctype[0] if isinstance(ctype, list) else ctype).startswith("application/json"):
            body = r.json()
            assert isinstance(body, dict) and ("error" in body or "detail" in body), body

    if SEED is not None:
        fuzz = hseed(int(SEED))(fuzz)
    fuzz()
    assert seen, "no request was sent"


# ---------------------------------------------------------------------------------------- regressions


def _batch(server, n: int) -> httpx.Response:
    return httpx.post(server["url"] + "/check_batch", json={"texts": ["He runs. She likes it."] * n}, timeout=60)


def test_check_batch_over_one_batch_is_413_not_503(server):
    """Found by fuzzing with large lists: a /check_batch of more texts than ``service.batch_max_size``
    was split by BentoML's dispatcher into chunks, and the chunks still queued after
    ``batch_max_latency_ms`` were cancelled: 503 "process is overloaded" for one request on an idle
    server. The Guard now answers 413 before the dispatcher."""
    limit = 32  # params.yaml service.batch_max_size
    ok = _batch(server, limit)
    assert ok.status_code == 200 and len(ok.json()) == limit
    over = _batch(server, limit + 1)
    assert over.status_code == 413 and "limit is 32" in over.json()["error"], over.text
    huge = httpx.post(server["url"] + "/check_batch", content=json.dumps({"texts": ["He runs."] * 150_000}),
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert huge.status_code == 413, huge.text[:300]
    assert _batch(server, 1).status_code == 200  # still serving
