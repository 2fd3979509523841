"""Fuzzing the live HTTP API: valid, invalid and malformed requests never get a 5xx, and 4xx bodies carry a detail."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


pytestmark = pytest.mark.slow

# Every case is a real HTTP round trip (520 in all); only the all-valid generations (about 40) wait
# for a batch and sample, so they set the run time.
FIELD_CASES = 200
BODY_CASES = 200
SCORE_CASES = 120
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                database=None, derandomize=True)

VALID, INVALID, EITHER = "valid", "invalid", "either"
NOT_FINITE = [math.nan, math.inf, -math.inf]
WRONG_TYPES = st.sampled_from([None, [], {}, [1], {"a": 1}, "", "x"])
LONG_PROMPT = "<a prompt one byte over the server's max_prompt_bytes>"  # replaced in the test


def tagged(kind: str, values: st.SearchStrategy) -> st.SearchStrategy:
    return values.map(lambda v: (kind, v))


def field(valid: st.SearchStrategy, invalid: st.SearchStrategy,
          either: st.SearchStrategy | None = None) -> dict[str, st.SearchStrategy]:
    """A field's values by whether the API must accept them, refuse them, or may do either (lax coercions)."""
    return {VALID: valid, INVALID: invalid, EITHER: either if either is not None else valid}


# Valid values keep generation cheap (a few bytes, few steps, at most one retry) but cover the edges
# the schema admits: huge top_k and seeds, temperatures near 0 and near the float limit, top_p near 0.
GENERATE_FIELDS: dict[str, st.SearchStrategy] = {
    "prompt": field(
        st.text(min_size=1, max_size=16),  # at most 64 bytes: within the test server's max_prompt_bytes
        st.one_of(st.just(""), st.just(LONG_PROMPT), st.just("ok \udc80 lone surrogate"), st.integers(),
                  st.floats(allow_nan=True), st.booleans(), WRONG_TYPES.filter(lambda v: v != "x" and v != ""))),
    "max_new_bytes": field(
        st.integers(1, 4),
        st.one_of(st.integers(max_value=0), st.integers(min_value=513), st.sampled_from([10**30, -(10**30), 1.5]),
                  st.sampled_from(NOT_FINITE), WRONG_TYPES),
        st.sampled_from(["3", 2.0, True])),
    # the valid mode is the model's own (a causal model refuses "diffusion" and vice versa): see generate_requests
    "mode": field(st.just("causal"),
                  st.one_of(st.text(max_size=12).filter(lambda s: s not in ("causal", "diffusion")),
                            st.sampled_from(["CAUSAL", 1, None, ["causal"]]))),
    "temperature": field(
        st.one_of(st.floats(0.05, 2.0), st.sampled_from([1e-300, 5e-324, 1e-6, 1e6, 1e308])),
        st.one_of(st.floats(max_value=0.0, allow_nan=False), st.sampled_from(NOT_FINITE), WRONG_TYPES,
                  st.just("hot")),
        st.sampled_from(["0.7", 1])),
    "top_k": field(st.one_of(st.none(), st.integers(1, 3), st.sampled_from([2**31, 10**6])),
                   st.one_of(st.integers(max_value=0), st.sampled_from([1.5, "x", [], math.nan]))),
    "top_p": field(
        st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([1e-300, 5e-324, 1.0])),
        st.one_of(st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0, exclude_min=True, allow_infinity=False),
                  st.sampled_from(NOT_FINITE), WRONG_TYPES)),
    "diffusion_steps": field(st.integers(1, 4),
                             st.one_of(st.integers(max_value=0), st.integers(min_value=65),
                                       st.sampled_from([10**20, 2.5, math.inf]), WRONG_TYPES)),
    "schedule": field(st.sampled_from(["linear", "cosine", "exp", "loglinear"]),
                      st.one_of(st.text(max_size=10).filter(lambda s: s not in ("linear", "cosine", "exp", "loglinear")),
                                st.sampled_from([0, None, ["linear"]]))),
    "seed": field(st.one_of(st.none(), st.integers(0, 2**63 - 1)),
                  st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63),
                            st.sampled_from([10**40, 1.5, math.nan, "seed", []]))),
    "c_floor": field(st.one_of(st.none(), st.floats(0.0, 1.0)),
                     st.one_of(st.floats(max_value=0.0, exclude_max=True, allow_nan=False),
                               st.floats(min_value=1.0, exclude_min=True), st.sampled_from([math.nan, "low", []]))),
    "s_floor": field(st.one_of(st.none(), st.floats(0.0, 1.0)),
                     st.one_of(st.floats(max_value=0.0, exclude_max=True, allow_nan=False),
                               st.floats(min_value=1.0, exclude_min=True), st.sampled_from([math.nan, "low", []]))),
    "strict": field(st.booleans(), st.sampled_from(["maybe", 2, None, [], {}, 0.5]), st.sampled_from(["true", 0, 1])),
    "max_retries": field(st.integers(0, 1),
                         st.one_of(st.integers(max_value=-1), st.integers(min_value=6),
                                   st.sampled_from([10**12, 1.5, "x", None]))),
}


@st.composite
def generate_requests(draw) -> tuple[bool, dict[str, Any], list[str], bool]:
    """(diffusion app?, a /v1/generate body, the fields the API must refuse, whether some field is only maybe accepted).

    A fifth of the bodies are all valid, two fifths break exactly one field (so the error must name it),
    and two fifths mix valid, invalid and lax values freely.
    """
    diffusion = draw(st.booleans())
    own_mode, other_mode = ("diffusion", "causal") if diffusion else ("causal", "diffusion")
    strategies = dict(GENERATE_FIELDS)
    strategies["mode"] = field(st.just(own_mode), st.one_of(GENERATE_FIELDS["mode"][INVALID], st.just(other_mode)))
    shape = draw(st.sampled_from(["valid", "one", "one", "mixed", "mixed"]))
    names = list(strategies)
    broken = draw(st.sampled_from(names + ["<extra>"])) if shape == "one" else None
    body: dict[str, Any] = {}
    invalid: list[str] = []
    unsure = False
    for name in names:
        if name == broken:
            kind = INVALID
        elif shape == "mixed":
            kind = draw(st.sampled_from([VALID, INVALID, EITHER]))
        else:
            kind = VALID
        # any field may be left out: prompt is required, and mode defaults to causal
        required = name == "prompt" or (name == "mode" and diffusion)
        left_out = draw(st.integers(0, 3)) == 0 and (shape == "mixed" or not required)
        if name == broken and required and draw(st.booleans()):
            left_out = True
        if left_out:
            if required:
                invalid.append(name)
            continue
        body[name] = draw(strategies[name][kind])
        if kind == INVALID:
            invalid.append(name)
        unsure |= kind == EITHER
    if broken == "<extra>" or (shape == "mixed" and draw(st.integers(0, 7)) == 0):
        extra = draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in GENERATE_FIELDS))
        body[extra] = draw(st.integers())
        invalid.append(extra)
    return diffusion, body, invalid, unsure


def encode(body: Any) -> bytes:
    # allow_nan writes NaN/Infinity tokens (Python's json and Starlette accept them); ensure_ascii keeps
    # lone surrogates as \udXXX escapes, which is valid JSON but no UTF-8 text
    return json.dumps(body, allow_nan=True).encode("ascii")


def post(session: requests.Session, url: str, data: bytes, content_type: str = "application/json") -> requests.Response:
    return session.post(url, data=data, headers={"Content-Type": content_type}, timeout=120)


def assert_client_error_has_detail(response: requests.Response) -> Any:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    body = response.json()
    assert "detail" in body, body
    return body["detail"]


@pytest.fixture(scope="module")
def session(server):
    with server.client() as client:  # carries the server's bearer token
        yield client


def app_url(server, diffusion: bool) -> str:
    return server.diffusion_url if diffusion else server.url


@settings(FUZZ, max_examples=FIELD_CASES)
@given(case=generate_requests())
def test_generate_accepts_valid_and_refuses_invalid_fields(server, session, case):
    diffusion, body, invalid, unsure = case
    if body.get("prompt") == LONG_PROMPT:
        body["prompt"] = "a" * (server.limits["max_prompt_bytes"] + 1)
    response = post(session, f"{app_url(server, diffusion)}/v1/generate", encode(body))
    assert response.status_code < 500, (body, response.status_code, response.text[:500])
    if invalid:
        detail = assert_client_error_has_detail(response)
        if len(invalid) == 1:
            assert invalid[0] in (detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=False)), \
                (body, detail)
    elif not unsure:
        if response.status_code == 422:  # strict and blocked: the verdict comes back
            data = response.json()
            assert body.get("strict") is True and data["gate"]["passed"] is False, (body, data)
        else:
            assert response.status_code == 200, (body, response.status_code, response.text[:500])
            data = response.json()
            assert (data["text"] is None) == (not data["gate"]["passed"]), data
    elif response.status_code >= 400:
        assert_client_error_has_detail(response)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
RAW_BODIES = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(encode),
    st.dictionaries(st.sampled_from(list(GENERATE_FIELDS)), JSON_VALUES, max_size=6).map(encode),
    # a valid request cut short, or with bytes that are no UTF-8 spliced into the prompt
    st.integers(0, 30).map(lambda n: b'{"prompt": "hello", "max_new_bytes": 2}'[:n]),
    st.binary(min_size=1, max_size=8).filter(lambda b: not _is_utf8(b)).map(
        lambda b: b'{"prompt": "' + b + b'", "max_new_bytes": 2}'),
)
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""])


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@settings(FUZZ, max_examples=BODY_CASES)
@given(data=RAW_BODIES, content_type=CONTENT_TYPES, diffusion=st.booleans())
def test_malformed_generate_bodies_are_client_errors(server, session, data, content_type, diffusion):
    response = post(session, f"{app_url(server, diffusion)}/v1/generate", data, content_type)
    assert response.status_code < 500, (data, response.status_code, response.text[:500])
    if response.status_code != 200:
        assert_client_error_has_detail(response)


SCORE_BODIES = st.one_of(
    tagged(VALID, st.text(min_size=2, max_size=60).filter(lambda t: len(t.encode("utf-8")) >= 2).map(lambda t: {"text": t})),
    tagged(INVALID, st.one_of(
        st.sampled_from([{}, {"text": ""}, {"text": "\udc80\udc81 lone"}, {"text": None}, {"text": 12},
                         {"text": ["ab"]}, {"text": math.nan}, {"text": "ok", "extra": 1}, [], "text"]),
        st.dictionaries(st.text(max_size=6).filter(lambda k: k != "text"), JSON_VALUES, min_size=1, max_size=3))),
)


@settings(FUZZ, max_examples=SCORE_CASES)
@given(case=SCORE_BODIES, diffusion=st.booleans())
def test_score_accepts_text_and_refuses_the_rest(server, session, case, diffusion):
    kind, body = case
    response = post(session, f"{app_url(server, diffusion)}/v1/score", encode(body))
    assert response.status_code < 500, (body, response.status_code, response.text[:500])
    if kind == VALID:
        assert response.status_code == 200, (body, response.text[:500])
        assert math.isfinite(response.json()["bpb"])
    else:
        assert_client_error_has_detail(response)


# The ends of every numeric range the schema admits, each in a request that is otherwise plain: a
# random search can miss a single bad value, these are always sent.
SCHEMA_EDGES = [
    ("causal", {"temperature": 5e-324}), ("causal", {"temperature": 1e-300}), ("causal", {"temperature": 1e308}),
    ("causal", {"top_p": 5e-324}), ("causal", {"top_p": 1e-300}), ("causal", {"top_p": 1.0}),
    ("causal", {"top_k": 1}), ("causal", {"top_k": 2**31}), ("causal", {"top_k": 1, "top_p": 5e-324}),
    ("causal", {"seed": 0}), ("causal", {"seed": 2**63 - 1, "max_retries": 5, "s_floor": 1.0}),
    ("causal", {"max_new_bytes": "<limit>"}), ("causal", {"prompt": "<limit>"}),
    ("diffusion", {"temperature": 5e-324}), ("diffusion", {"temperature": 1e308}),
    ("diffusion", {"diffusion_steps": 1}), ("diffusion", {"diffusion_steps": 64, "schedule": "loglinear"}),
    ("diffusion", {"schedule": "exp", "seed": 2**63 - 1, "max_retries": 5, "s_floor": 1.0}),
    ("diffusion", {"max_new_bytes": "<limit>"}), ("diffusion", {"prompt": "<limit>"}),
]


@pytest.mark.parametrize("mode, fields", SCHEMA_EDGES, ids=[f"{m}-{json.dumps(f)}" for m, f in SCHEMA_EDGES])
def test_generate_answers_at_the_edges_of_the_schema(server, session, mode, fields):
    body = {"prompt": "edge", "max_new_bytes": 2, "mode": mode, "c_floor": 0.0, "s_floor": 0.0, **fields}
    if body["max_new_bytes"] == "<limit>":
        body["max_new_bytes"] = server.limits["max_new_bytes"]
    if body["prompt"] == "<limit>":
        body["prompt"] = "p" * server.limits["max_prompt_bytes"]
    response = post(session, f"{app_url(server, mode == 'diffusion')}/v1/generate", encode(body))
    assert response.status_code == 200, (body, response.status_code, response.text[:500])
    data = response.json()
    blocked = body["s_floor"] == 1.0  # no sample reaches S = 1 against the skewed conftest.REFERENCE
    assert data["gate"]["passed"] is not blocked and (data["text"] is None) is blocked, data
    assert len(data["gate"]["attempts"]) == (1 + body.get("max_retries", 2) if blocked else 1)
