"""The elastic level knob over real HTTP: `elastic.level`, `vllm_xargs.elastic_level` and model
aliases choose the submodel, usage and /metrics report it, bad input is a 400 naming the field."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.api.conftest import MODEL_NAME, ServerProcess, metric, running_server, scrape

PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def elastic_server() -> Iterator[ServerProcess]:
    yield from running_server("--elastic", "on")


@pytest.fixture(scope="module")
def levels(elastic_server: ServerProcess) -> list[int]:
    models = httpx.get(f"{elastic_server.base_url}/v1/models", timeout=30).json()["data"]
    aliases = [m["id"] for m in models if m["id"].startswith(f"{MODEL_NAME}@")]
    assert models[0]["id"] == MODEL_NAME and all(m["root"] == MODEL_NAME for m in models)
    return [int(alias.rpartition("@")[2]) for alias in aliases]


def complete(server: ServerProcess, **fields) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **fields}
    return httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)


def test_every_way_of_naming_a_level(elastic_server: ServerProcess, levels: list[int]) -> None:
    assert levels[0] == 100 and len(levels) >= 4
    low = levels[-1]
    by_field = complete(elastic_server, elastic={"level": low}).json()
    by_xargs = complete(elastic_server, vllm_xargs={"elastic_level": low}).json()
    by_alias = complete(elastic_server, model=f"{MODEL_NAME}@{low}").json()
    full = complete(elastic_server).json()
    assert {r["usage"]["elastic_level"] for r in (by_field, by_xargs, by_alias)} == {low}
    assert full["usage"]["elastic_level"] == 100
    assert by_field["choices"][0]["text"] == by_xargs["choices"][0]["text"] == by_alias["choices"][0]["text"]
    chat = httpx.post(f"{elastic_server.base_url}/v1/chat/completions", timeout=120, json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "elastic": {"level": levels[1]}}).json()
    assert chat["usage"]["elastic_level"] == levels[1]
    samples = scrape(elastic_server.base_url)
    assert metric(samples, "engine:elastic_generation_tokens_total", level=str(low)) >= 18
    assert metric(samples, "engine:elastic_generation_tokens_total", level="100") >= 6


MISSING_LEVEL = 99  # no checkpoint has it: elastify's levels are 100 and below 99


@pytest.mark.parametrize(("fields", "param"), [
    ({"elastic": {"level": MISSING_LEVEL}}, "elastic.level"),
    ({"elastic": {"level": "big"}}, "elastic.level"),
    ({"elastic": "80"}, "elastic"),
    ({"elastic": {"levle": 80}}, "elastic"),
    ({"vllm_xargs": {"elastic_level": "80"}}, "vllm_xargs.elastic_level"),
    ({"model": f"{MODEL_NAME}@{MISSING_LEVEL}"}, "elastic.level"),
    ({"model": f"{MODEL_NAME}@big"}, "model"),
    ({"model": "other-model@80"}, "model"),
])
def test_bad_levels_get_a_400_naming_the_field(elastic_server: ServerProcess, levels: list[int],
                                               fields: dict, param: str) -> None:
    assert MISSING_LEVEL not in levels
    response = complete(elastic_server, **fields)
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] and error["message"]
    assert complete(elastic_server).status_code == 200  # nothing else broke


def test_conflicting_levels_are_refused(elastic_server: ServerProcess, levels: list[int]) -> None:
    response = complete(elastic_server, model=f"{MODEL_NAME}@{levels[1]}", elastic={"level": levels[2]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "elastic.level"


def test_auto_settings_and_their_floors(elastic_server: ServerProcess, levels: list[int]) -> None:
    """"auto" is accepted everywhere a level or keep is; under a policy that does not choose
    (fcfs here; the slo policy's choice is tests/llm_engine/test_elastic_auto.py) such a request
    runs the full model on its whole prompt, and usage says so."""
    for fields in ({"elastic": {"level": "auto", "prompt_keep": "auto", "min_level": levels[2]}},
                   {"vllm_xargs": {"elastic_level": "auto", "prompt_keep": "auto"}}):
        usage = complete(elastic_server, **fields).json()["usage"]
        assert usage["elastic_level"] == 100 and usage["prompt_keep"] == 1.0
    assert metric(scrape(elastic_server.base_url), "engine:elastic_prompt_keep_requests_total", keep="1") >= 2
    for fields, param in (({"elastic": {"level": "auto", "min_level": MISSING_LEVEL}}, "elastic.min_level"),
                          ({"elastic": {"prompt_keep": "auto", "min_prompt_keep": 1.5}}, "elastic.min_prompt_keep"),
                          ({"elastic": {"prompt_keep": "half"}}, "elastic.prompt_keep"),
                          ({"vllm_xargs": {"prompt_keep": "half"}}, "vllm_xargs.prompt_keep")):
        response = complete(elastic_server, **fields)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
