"""Fuzzing every documented operation with schemathesis, from the live server's own /openapi.json:
requests valid by the schema, then (fewer) requests that break it.

The server runs a tiny random llama (with a real tokenizer) from a temporary store, with low limits
(num_predict <= 8, num_ctx <= 128), so that every generated request is small: it may be refused,
but it must never get a 5xx nor hang (no whole reply within HANG_S). Half of the generated bodies
of the operations that only read get the tiny model's name, so that generation, embedding and show
run for real rather than stopping at 404, and half of those lose the fields this server refuses
outright (images, logprobs, tools...), so that random prompts, messages, options and keep_alive
values reach the engine. Mutating operations (create, copy, delete, blobs) keep their random names:
they touch the temporary store only, and never the tiny model.

A failure lists every offending request (as curl), its status and the start of its body."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup

from tests.local_engine import LocalEngine
from tests.server.conftest import serving
from tests.tiny import make_hf_model, save_hf, save_tiny_tokenizer
from tests.waits import HANG_S
from tp_ollama import __version__
from tp_ollama.server.app import create_app
from tp_ollama.store.model_store import ModelStore

TINY = "tiny-fuzz:latest"
EXAMPLES_PER_OPERATION = 15  # valid requests (by the schema), per operation
NEGATIVE_EXAMPLES_PER_OPERATION = 8  # requests that break the schema (wrong types, missing fields...)
# Operations that only read (or fail without changing anything): their model is often the tiny one.
READ_ONLY = {
    "POST /api/generate",
    "POST /api/chat",
    "POST /api/embed",
    "POST /api/embeddings",
    "POST /api/show",
    "POST /api/pull",
    "POST /api/push",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "GET /v1/models/{model}",
}
# Fields refused with a 400 before anything runs (features tp-ollama does not have yet).
REFUSED = ("images", "logprobs", "top_logprobs", "template", "suffix", "format", "think", "tools", "response_format")


@dataclass
class Failure:
    curl: str
    status: int | str
    body: str
    reason: str

    def __str__(self) -> str:
        return f"{self.curl}\n    -> {self.status}: {self.body[:300]!r}\n    ({self.reason})"


@pytest.fixture(scope="module")
def fuzz_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz")
    checkpoint = save_hf(make_hf_model("llama", seed=3), root / "tiny")
    save_tiny_tokenizer(checkpoint)
    store = ModelStore(root / "models")
    store.create(TINY, checkpoint)
    app = create_app(
        LocalEngine(),
        store=store,
        version=__version__,
        max_body_bytes=256 * 1024,
        default_num_ctx=64,
        max_num_ctx=128,
        max_num_predict=8,
    )
    with serving(app) as url:
        yield url


def _with_tiny_model(case: schemathesis.Case, plain: bool) -> None:
    if case.operation.label == "GET /v1/models/{model}":
        case.path_parameters = {**(case.path_parameters or {}), "model": TINY}
    elif isinstance(case.body, dict):
        body = {k: v for k, v in case.body.items() if not (plain and k in REFUSED)}
        if plain and isinstance(body.get("messages"), list):
            body["messages"] = [
                {k: v for k, v in m.items() if k not in ("images", "tool_calls")} if isinstance(m, dict) else m
                for m in body["messages"]
            ]
        case.body = {**body, "model": TINY}


def _fuzz(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    examples: int,
    url: str,
    session: requests.Session,
    failures: list[Failure],
) -> None:
    read_only = operation.label in READ_ONLY

    @given(case=operation.as_strategy(generation_mode=mode), tiny=st.booleans(), plain=st.booleans())
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run: a failure here is reproducible
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report the request as it was sent
        suppress_health_check=list(HealthCheck),
    )
    def one(case: schemathesis.Case, tiny: bool, plain: bool) -> None:
        if read_only and tiny:
            _with_tiny_model(case, plain)
        started = time.monotonic()
        try:
            response = case.call(base_url=url, session=session, timeout=HANG_S)
        except requests.RequestException as e:
            failures.append(Failure(case.as_curl_command(), "no reply", "", f"{type(e).__name__}: {e}"))
            return
        elapsed = time.monotonic() - started
        if elapsed > HANG_S:  # each read had a byte in time, yet the whole reply did not: a stream that never ends
            failures.append(
                Failure(case.as_curl_command(), response.status_code, response.text, f"hung: took {elapsed:.1f} s")
            )
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except FailureGroup as e:  # a BaseExceptionGroup: one failure per check that did not hold
            reasons = "; ".join(f"{type(x).__name__}: {x}" for x in e.exceptions)
            failures.append(Failure(case.as_curl_command(), response.status_code, response.text, reasons))

    try:
        one()
    except Unsatisfiable:
        # Negative mode over inputs that cannot be wrong (a free-form string in the path): nothing
        # to send. In positive mode every operation has valid inputs, so this must not happen.
        if mode is not GenerationMode.NEGATIVE:
            raise


def test_the_tiny_model_really_generates(fuzz_url: str) -> None:
    """The fuzzing above is only worth something if requests naming the tiny model can succeed."""
    with httpx.Client(base_url=fuzz_url, timeout=HANG_S) as client:
        reply = client.post("/api/generate", json={"model": TINY, "prompt": "hello world", "stream": False})
    assert reply.status_code == 200, reply.text
    assert 0 < reply.json()["eval_count"] <= 8


def test_fuzz_every_operation_without_server_errors(fuzz_url: str) -> None:
    with httpx.Client(base_url=fuzz_url, timeout=HANG_S) as client:
        doc = client.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25, [op.label for op in operations]
    failures: list[Failure] = []
    with requests.Session() as session:
        for operation in operations:
            _fuzz(operation, GenerationMode.POSITIVE, EXAMPLES_PER_OPERATION, fuzz_url, session, failures)
            if operation.body or operation.path_parameters:  # else there is nothing to get wrong
                _fuzz(operation, GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES_PER_OPERATION, fuzz_url, session, failures)
    with httpx.Client(base_url=fuzz_url, timeout=HANG_S) as client:
        assert client.get("/").status_code == 200  # the server survived
        assert TINY in [m["model"] for m in client.get("/api/tags").json()["models"]]
    distinct = list(dict.fromkeys(map(str, failures)))  # hypothesis may send a request twice
    assert not distinct, f"{len(distinct)} failing request(s):\n" + "\n".join(distinct)
