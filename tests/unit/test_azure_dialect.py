"""The Azure OpenAI dialect: its paths, where keys travel, and which model a call is for; and
the providers section of quotas.yaml that makes it (deployments, keyless providers); the
mock's Azure paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy.http import Headers
from tokengate_core import notes
from tokengate_core.config import load_config
from tokengate_core.dialects import DIALECTS, InvalidSetting
from tokengate_core.dialects.azure import Azure
from tokengate_core.dialects.openai import OPENAI
from tokengate_core.intake import Reader
from tokengate_core.keys import ConflictingKeys
from tokengate_core.limiter import Usage
from tokengate_core.routing import classify
from tokengate_core.tools import mock
from tokengate_core.usage import Metered, StreamMeter

AZURE = Azure({"gpt4o-prod": "gpt-4o", "mini": "gpt-4o-mini"})
CHAT = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 7, "stream": True}


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        # deployments, as `AzureOpenAI(azure_endpoint=...)` sends them and below a base URL
        # that ends in /openai
        ("POST", "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
         ("chat/completions", True, "gpt4o-prod")),
        ("POST", "/deployments/mini/completions?api-version=2024-10-21",
         ("completions", True, "mini")),
        ("POST", "/openai/deployments/emb/embeddings", ("embeddings", True, "emb")),
        ("POST", "/openai/deployments/my%20dep/chat/completions",
         ("chat/completions", True, "my dep")),
        # the v1 API: the model (a deployment name) is in the body
        ("POST", "/openai/v1/chat/completions", ("chat/completions", True, None)),
        ("POST", "/openai/v1/responses", ("responses", True, None)),
        ("POST", "/openai/responses?api-version=2025-04-01-preview", ("responses", True, None)),
        ("GET", "/openai/v1/models", (None, True, None)),
        ("GET", "/openai/models?api-version=2024-10-21", (None, True, None)),
        # what it cannot meter is refused
        ("POST", "/openai/deployments/gpt4o-prod/images/generations", (None, False, None)),
        ("POST", "/openai/deployments/gpt4o-prod/audio/speech", (None, False, None)),
        ("POST", "/openai/deployments/gpt4o-prod/responses", (None, False, None)),
        ("POST", "/openai/deployments/chat/completions", ("completions", True, "chat")),
        ("POST", "/openai/deployments", (None, False, None)),
        ("GET", "/openai/deployments/gpt4o-prod/chat/completions", (None, False, None)),
        ("POST", "/openai/v1/files", (None, False, None)),
        ("POST", "/openai/deployments/x%2Fy/chat/completions", (None, False, None)),
        ("POST", "/openai/deployments/../v1/files", (None, False, None)),
    ],
)  # fmt: skip
def test_azure_paths(method, path, expected):
    assert classify(method, path, AZURE) == expected


def test_openai_paths_name_no_deployment():
    assert classify("POST", "/deployments/x/chat/completions", OPENAI) == (None, False, None)


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"api-key": "tg-k"}, "tg-k"),  # what AzureOpenAI sends
        ({"Authorization": "Bearer tg-k"}, "tg-k"),  # the v1 API with the OpenAI client
        ({"API-Key": "tg-k", "authorization": "Bearer tg-k"}, "tg-k"),
        ({}, None),
    ],
)
def test_the_callers_key_in_api_key_or_bearer(headers, key):
    assert AZURE.caller_key(Headers([(k.encode(), v.encode()) for k, v in headers.items()])) == key


def test_two_different_caller_keys_conflict():
    with pytest.raises(ConflictingKeys):
        AZURE.caller_key(Headers(api_key="tg-a", authorization="Bearer tg-b"))


def test_the_provider_key_goes_in_api_key_and_every_caller_header_is_stripped():
    assert AZURE.provider_auth("sk-azure") == {"api-key": "sk-azure"}
    assert {"authorization", "x-api-key", "api-key"} <= set(AZURE.credential_headers)


@pytest.mark.parametrize(
    ("deployment", "body", "model", "from_answer"),
    [
        ("gpt4o-prod", CHAT, "gpt-4o", False),  # named in deployments
        ("other-dep", CHAT, "other-dep", True),  # not named: its own name, then the answer's
        ("gpt4o-prod", {**CHAT, "model": "ignored"}, "gpt-4o", False),  # the path decides
        (None, {**CHAT, "model": "mini"}, "gpt-4o-mini", False),  # v1: the body names one
        (None, {**CHAT, "model": "gpt-4.1"}, "gpt-4.1", True),
        (None, CHAT, None, False),
    ],
)
def test_the_model_for_limits_and_prices(deployment, body, model, from_answer):
    terms = AZURE.terms("chat/completions", body, 256, deployment)
    assert (terms.model, terms.model_from_answer) == (model, from_answer)
    assert (terms.stream, terms.completion_reserve) == (True, 7)  # as OpenAI reads the body
    assert OPENAI.terms("chat/completions", body, 256, deployment).model_from_answer is False


@pytest.mark.parametrize(
    ("payload", "model"),
    [
        ({"model": "gpt-4o-2024-08-06", "choices": []}, "gpt-4o-2024-08-06"),  # JSON, chunks
        ({"type": "response.created", "response": {"model": "gpt-4o"}}, "gpt-4o"),  # Responses
        ({"model": ""}, None),
        ({"model": 4}, None),
        ({"choices": []}, None),
        ("[DONE]", None),
    ],
)
def test_the_model_an_answer_names(payload, model):
    assert AZURE.model(payload) == AZURE.stream.model(payload) == model


def test_an_unnamed_deployment_takes_the_answers_model_once_charged():
    note = notes.Notes(model="other-dep", model_from_answer=True)
    notes.note_usage(note, Metered(Usage(9, 2), "reported", "gpt-4o-2024-08-06"))
    assert note["model"] == "gpt-4o-2024-08-06"
    named = notes.Notes(model="gpt-4o")  # named in deployments (or OpenAI): it stays
    notes.note_usage(named, Metered(Usage(9, 2), "reported", "gpt-4o-2024-08-06"))
    assert named["model"] == "gpt-4o"
    meter = StreamMeter(AZURE.stream, 9, None)
    meter.feed(b'data: {"choices": []}\n\ndata: {"model": "m-1", "choices": []}\n\n')
    meter.feed(b'data: {"model": "m-2", "choices": []}\n\n')
    assert meter.result().model == "m-1"


def test_the_reader_takes_the_deployment_its_path_named():
    reader = Reader(AZURE, 1000, 256, "mini")
    assert reader.terms("chat/completions", CHAT).model == "gpt-4o-mini"
    assert Reader(OPENAI, 1000, 256, "mini").terms("chat/completions", CHAT).model is None


def test_the_prompt_is_counted_with_the_encoding_of_the_model_the_deployment_serves():
    reader = Reader(Azure({"old": "gpt-4"}), 1000, 256, "old")
    body = {"messages": [{"role": "user", "content": "Привет, как дела? " * 20}]}
    read = reader.parse_and_estimate(json.dumps(body).encode(), "chat/completions")
    as_gpt_4 = OPENAI.estimate_prompt("chat/completions", {**body, "model": "gpt-4"}, 1000)
    assert read.prompt == as_gpt_4 != OPENAI.estimate_prompt("chat/completions", body, 1000)
    assert "model" not in read.body  # what is sent is the caller's body


def test_bodies_and_answers_are_read_as_openai_reads_them():
    body = {**CHAT, "max_tokens": 500}
    notes = AZURE.adjust("chat/completions", body, Usage(10, 40))
    assert body["max_tokens"] == 40 and body["stream_options"] == {"include_usage": True}
    AZURE.as_requested(body, notes)
    assert body["max_tokens"] == 500
    answer = {"model": "gpt-4o-2024-08-06", "choices": [{"message": {"content": "Hi"}}]}
    answer["usage"] = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert AZURE.usage(answer) == OPENAI.usage(answer) == Usage(9, 2)
    assert AZURE.text(answer) == "Hi"
    assert AZURE.estimate_prompt("chat/completions", CHAT, 1000) == OPENAI.estimate_prompt(
        "chat/completions", CHAT, 1000
    )
    error = json.loads(AZURE.error_body("no", "tokens", "rate_limit_exceeded"))
    assert error["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize("bad", [["dep"], {"dep": 4}, {"": "gpt-4o"}, {"dep": ""}, "dep"])
def test_bad_deployments_are_refused(bad):
    with pytest.raises(InvalidSetting) as info:
        DIALECTS["azure"].make(deployments=bad)
    assert info.value.setting == "deployments"


def test_quotas_make_one_azure_dialect_per_provider_and_keyless_providers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TG_TEST_AZURE_KEY", "sk-azure")
    path = tmp_path / "quotas.yaml"
    path.write_text(
        "providers:\n"
        "  azure:\n"
        "    kind: azure\n"
        "    base_url: https://my-resource.openai.azure.com/openai\n"
        "    api_key_env: TG_TEST_AZURE_KEY\n"
        "    deployments: {gpt4o-prod: gpt-4o}\n"
        "  azure-eu:\n"
        "    kind: azure\n"
        "    base_url: https://eu.openai.azure.com\n"
        "    api_key_env: TG_TEST_AZURE_KEY\n"
        "  local:\n"
        "    base_url: http://127.0.0.1:11434/v1\n"
        "proxies: {}\n",
        encoding="utf-8",
    )
    providers = load_config(path).providers
    assert providers["azure"].dialect == Azure({"gpt4o-prod": "gpt-4o"})
    assert providers["azure-eu"].dialect == Azure({})
    assert providers["azure"].api_key == "sk-azure"
    assert providers["local"].dialect is OPENAI
    assert providers["local"].api_key is None  # keyless: nothing is set upstream


@pytest.mark.parametrize(
    ("path", "served"),
    [
        ("/openai/deployments/gpt4o-prod/chat/completions", ("chat/completions", "gpt4o-prod")),
        ("/deployments/emb/embeddings", ("embeddings", "emb")),
        ("/openai/v1/responses", ("responses", None)),
        ("/openai/responses", ("responses", None)),
        ("/v1/chat/completions", ("chat/completions", None)),
        ("/openai/deployments/x/images/generations", (None, "x")),
    ],
)
def test_the_mock_serves_azure_paths(path, served):
    assert mock.endpoint_of(path) == served


def test_the_mock_takes_deployment_models():
    assert mock.parse_args(["--deployment", "a=gpt-4o", "--deployment", "b=m"]).deployments == {
        "a": "gpt-4o",
        "b": "m",
    }
    with pytest.raises(SystemExit):
        mock.parse_args(["--deployment", "a"])
