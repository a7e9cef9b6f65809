"""The gateway's OpenAI request parsing, error mapping and chat template (no broker)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from services.cli.client import Client, NoFeasiblePlan
from services.cli.gateway_up import check_http
from services.gateway.app import Backend, build_app
from services.gateway.chat import CHATML, ChatTemplate
from services.gateway.openai_api import (
    ApiError,
    error_for,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from shared.config import parse_host_port
from shared.errors import (
    BrokerUnavailable,
    Busy,
    ConfigError,
    ContextTooLong,
    NoAnswer,
    Overloaded,
    ServingError,
    StageTimedOut,
)


def _status(body: object, parse=parse_completion) -> tuple[int, str | None]:  # type: ignore[no-untyped-def]
    with pytest.raises(ApiError) as raised:
        parse(body)
    return raised.value.status, raised.value.param


def test_completion_takes_text_or_token_ids() -> None:
    call = parse_completion({"model": "m", "prompt": "hi", "temperature": 0, "max_tokens": 5, "stream": True})
    assert call.prompt == "hi" and call.sampling.max_tokens == 5 and call.sampling.temperature == 0.0
    assert call.sampling.stream
    assert parse_completion({"model": "m", "prompt": [1, 2, 3]}).prompt == (1, 2, 3)
    assert parse_completion({"model": "m", "prompt": [[4, 5]]}).prompt == (4, 5)  # a batch of one
    assert parse_completion({"model": "m", "prompt": ["x"]}).prompt == "x"
    defaults = parse_completion({"model": "m", "prompt": "x"}).sampling
    assert (defaults.max_tokens, defaults.temperature, defaults.top_p) == (16, 1.0, 1.0)  # OpenAI's


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x"}, "model"),
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": ""}, "prompt"),
    ({"model": "m", "prompt": [1, -2]}, "prompt"),
    ({"model": "m", "prompt": [1, True]}, "prompt"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "m", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"model": "m", "prompt": "x", "seed": -1}, "seed"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "prompt": "x", "n": 2}, "n"),
    ({"model": "m", "prompt": "x", "stop": ["\n"]}, "stop"),
    ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs"),
])  # fmt: skip
def test_bad_completion_parameters_are_400_naming_the_parameter(body: dict[str, object], param: str) -> None:
    assert _status(body) == (400, param)


def test_chat_messages_and_their_errors() -> None:
    call = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
    ], "max_completion_tokens": 7})  # fmt: skip
    assert call.messages == (("system", "be brief"), ("user", "hi there"))
    assert call.sampling.max_tokens == 7
    assert _status({"model": "m", "messages": []}, parse_chat) == (400, "messages")
    assert _status({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, parse_chat) == (
        400, "messages[0].role")  # fmt: skip
    assert _status({"model": "m", "messages": [{"role": "user"}]}, parse_chat) == (400, "messages[0].content")
    assert _status(["not", "an", "object"], parse_chat) == (400, None)


def test_embedding_inputs() -> None:
    assert parse_embedding({"model": "m", "input": "a"}).texts == ("a",)
    call = parse_embedding({"model": "m", "input": ["a", "b"], "encoding_format": "base64"})
    assert call.texts == ("a", "b") and call.base64
    assert _status({"model": "m", "input": [1, 2]}, parse_embedding) == (400, "input")
    assert _status({"model": "m", "input": "a", "encoding_format": "int8"}, parse_embedding) == (
        400, "encoding_format")  # fmt: skip


@pytest.mark.parametrize(("error", "status", "kind"), [
    (ContextTooLong("prompt of 900 tokens exceeds 512"), 400, "invalid_request_error"),
    (ConfigError("max_new_tokens: too big"), 400, "invalid_request_error"),
    (ServingError("invalid_request: not a generation model"), 400, "invalid_request_error"),
    (Busy("busy: queue full"), 429, "rate_limit_exceeded"),
    (Overloaded("overloaded: 200 waiting"), 429, "rate_limit_exceeded"),
    (NoFeasiblePlan("no_plan: entry down"), 503, "service_unavailable"),
    (BrokerUnavailable("no broker"), 503, "service_unavailable"),
    (StageTimedOut("timeout: stage 2"), 504, "timeout"),
    (NoAnswer("no answer within 5 s"), 504, "timeout"),
    (ServingError("internal: boom"), 500, "server_error"),
    (RuntimeError("secret detail"), 500, "server_error"),
])  # fmt: skip
def test_client_errors_map_to_openai_statuses(error: Exception, status: int, kind: str) -> None:
    mapped = error_for(error)
    assert (mapped.status, mapped.type) == (status, kind)
    body = mapped.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert "secret detail" not in body["message"]


def test_chat_template_from_the_checkpoint_or_chatml(tmp_path: Path) -> None:
    plain = ChatTemplate.for_model(tmp_path)
    assert plain.render([("user", "hi")]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]"
                                             "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"}))  # fmt: skip
    assert ChatTemplate.for_model(tmp_path).render([("user", "a"), ("assistant", "b")]) == "<s>[user]a[assistant]b>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate.for_model(tmp_path)
    refusing = ChatTemplate("{{ raise_exception('no system role') }}", "test")
    with pytest.raises(ConfigError, match="no system role"):
        refusing.render([("system", "x")])
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}", "test")
    with pytest.raises(ConfigError):
        sandboxed.render([("user", "x")])
    assert CHATML.startswith("{% for message in messages %}")


def test_http_option_forms() -> None:
    assert parse_host_port("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_host_port("[::1]:9000") == ("::1", 9000)
    assert check_http(None) == ("127.0.0.1", 8000)
    assert check_http("off") is None
    for text in ("8000", "host:", "host:99999", ":80"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            check_http(text)


def _app(api_key: str | None = None) -> TestClient:
    client = Client("mqtt://127.0.0.1:1")  # never connected: no plan
    backend = Backend(client, client.current_plan, ChatTemplate(CHATML, "test"), api_key)
    return TestClient(build_app(backend))


def test_http_errors_come_in_openai_shape() -> None:
    http = _app()
    answer = http.get("/v1/models")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "no_plan"
    answer = http.post("/v1/completions", content=b"{not json")
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
    answer = http.post("/v1/completions", json={"model": "m", "prompt": "x", "temperature": -1})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "temperature"


def test_api_key_is_checked() -> None:
    http = _app(api_key="sk-test")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sk-test"}):
        answer = http.get("/v1/models", headers=headers)
        assert answer.status_code == 401, headers
        assert answer.json()["error"]["code"] == "invalid_api_key"
    assert http.get("/v1/models", headers={"Authorization": "Bearer sk-test"}).status_code == 503  # past the key


def test_a_bad_http_option_is_one_line_and_exit_2() -> None:
    command = ["services.gateway", "--http", "1.2.3:x"]  # `up --http` parses with check_http (above)
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "HOST:PORT" in done.stderr


def test_a_taken_default_port_moves_the_gateway_and_an_explicit_one_stays(capsys: pytest.CaptureFixture[str]) -> None:
    """`up` with no --http must still run when 8000 is taken (another server, another up)."""
    import socket

    from services.cli.gateway_up import check_http, port_free

    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            holder.bind(("127.0.0.1", 8000))
            holder.listen()
        except OSError:
            pass  # something else holds 8000 already: the same case
        host, port = check_http(None) or ("", 0)
        assert host == "127.0.0.1" and port != 8000 and port_free(host, port)
        assert "port 8000 is taken" in capsys.readouterr().err
        assert check_http("127.0.0.1:8000") == ("127.0.0.1", 8000)  # as given: the gateway says if it cannot
    finally:
        holder.close()


def test_health_needs_no_key_and_says_whether_the_broker_connection_is_up() -> None:
    http = _app(api_key="sk-test")
    answer = http.get("/health")  # no Authorization: a container's health check has no key
    assert answer.status_code == 503 and answer.json() == {"status": "unavailable", "broker": False, "plan": False}


def test_health_gateway_reads_the_http_answer() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from services.cli.health import gateway_health

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            code = 200 if self.path == "/health" and self.server.up else 503  # type: ignore[attr-defined]
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}' if code == 200 else b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    server.up = True  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert gateway_health(url, 5.0)[0] is True
        server.up = False  # type: ignore[attr-defined]
        healthy, why = gateway_health(url + "/", 5.0)
        assert not healthy and "503" in why
    finally:
        server.shutdown()
        server.server_close()
    done = subprocess.run([sys.executable, "-m", "services.cli", "health", "--gateway", url], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert done.returncode == 1 and "unhealthy" in done.stderr  # nothing listens there any more
    done = subprocess.run([sys.executable, "-m", "services.cli", "health", "--gateway", "ftp://x"],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
