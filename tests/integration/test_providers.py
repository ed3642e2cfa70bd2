"""The LLM provider adapters against fake providers that speak each real wire
format over real HTTP (tests/fakes/providers.py), inside a real turnline server:

- a full stream (reasoning, text, a tool call with incremental JSON input,
  usage) folds to the right persisted message;
- a cancel closes the upstream HTTP response: the fake sees the client go and
  generates nothing more (invariant 9), through ``stream_response`` and through
  a hand-written loop given ``signal=turn.abort_signal``;
- every provider failure (401, 429 with Retry-After, 500, a dropped connection,
  malformed SSE, an in-stream error event, a stream cut before its end) ends
  the turn with ``error``, a ``provider_*`` code and a message naming the
  provider, and the server keeps serving;
- the history conversion round-trips: the next turn's request carries the
  previous answer (text, tool call and result) in the provider's own format.

Races are ordered with the fake's per-token gate and events seen on a raw
WebSocket; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from fakes.providers import FakeProviders, Script, running_fake
from turnline.agent import RuntimeConfig
from turnline.agent.providers import anthropic_messages, openai_chat, openai_responses
from wsraw import RawWS, text_of

ADAPTERS = ["openai_chat", "openai_responses", "anthropic"]
PROVIDER_NAME = {"openai_chat": "openai.chat", "openai_responses": "openai.responses", "anthropic": "anthropic"}
KEY = "sk-test-key"
WEATHER = {"forecast": "sunny"}


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeProviders]:
    with running_fake() as f:
        yield f


@pytest.fixture
def fake(fake_server: FakeProviders) -> FakeProviders:
    """The fake providers, with no records and the tests' scripts. (The
    previous test's turnline server is stopped by now, so nothing of it is
    still streaming.)"""
    fake_server.reset()
    fake_server.scripts.update({
        "full": Script(reasoning="Let me think.", text="Hello there, world.", tool=("get_weather", {"city": "Paris"})),
        "short": Script(text="Sure."),
        "gated": Script(tokens=1000, gated=True),
    })
    return fake_server


def model_call(adapter: str, fake: FakeProviders, model: str, history: Any, **kw: Any) -> Any:
    if adapter == "openai_chat":
        return openai_chat(model=model, history=history, base_url=fake.openai_url, api_key=KEY, **kw)
    if adapter == "openai_responses":
        return openai_responses(model=model, history=history, base_url=fake.openai_url, api_key=KEY, **kw)
    return anthropic_messages(model=model, history=history, base_url=fake.anthropic_url, api_key=KEY, **kw)


def make_agent(fake: FakeProviders) -> Any:
    """``<adapter> <model>`` calls that adapter with that script; ``manual``
    as a third word iterates the stream by hand with the abort signal."""

    async def respond(turn: Any) -> None:
        adapter, model, *mode = text_of({"parts": turn.input.parts}).split()
        if mode == ["manual"]:
            async for chunk in model_call(adapter, fake, model, turn.history, signal=turn.abort_signal):
                await turn.write(chunk)
            return
        step = model_call(adapter, fake, model, turn.history)
        if await turn.stream_response(step) == "complete":
            for call in step.result.tool_calls:  # run the "tool"
                await turn.write({"type": "tool-output-available", "toolCallId": call.id, "output": WEATHER})

    return respond


async def client(srv: Any) -> tuple[RawWS, str]:
    ws = await RawWS.open(srv.ws, srv.token())
    session = f"prov-{uuid.uuid4().hex[:8]}"
    await ws.subscribe(session)
    return ws, session


async def start_turn(ws: RawWS, session: str, text: str) -> str:
    ack = await ws.say(session, text)
    assert ack["op"] == "ack", ack
    (turn_id,) = ack["turn_ids"]
    return turn_id


def chunks(ws: RawWS, session: str, turn_id: str) -> list[dict[str, Any]]:
    return [e["chunk"] for e in ws.find(session, "chunk", turn_id=turn_id)]


# ---------------------------------------------------------------- a full stream


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_full_stream_folds_to_the_message(serve: Any, fake: FakeProviders, adapter: str) -> None:
    srv = serve(agent=make_agent(fake))
    ws, session = await client(srv)
    turn_id = await start_turn(ws, session, f"{adapter} full")
    end = await ws.turn_end(session, turn_id)
    assert end["reason"] == "complete", end
    streamed = chunks(ws, session, turn_id)
    kinds = [c["type"] for c in streamed]
    # incremental: one delta per token the fake generated
    assert kinds.count("reasoning-delta") == 3 and kinds.count("text-delta") == 3
    assert kinds.count("tool-input-delta") == 3  # '{"city": "Paris"}' in 8-character pieces
    assert kinds.index("tool-input-start") < kinds.index("tool-input-delta") < kinds.index("tool-input-available")
    (call_id,) = {c["toolCallId"] for c in streamed if c["type"] == "tool-input-start"}

    message = end["message"]
    step, reasoning, text, tool = message["parts"]
    assert step == {"type": "step-start"}
    assert (reasoning["type"], reasoning["text"], reasoning["state"]) == ("reasoning", "Let me think.", "done")
    assert text == {"type": "text", "text": "Hello there, world.", "state": "done"}
    assert tool == {"type": "tool-get_weather", "toolCallId": call_id, "state": "output-available",
                    "input": {"city": "Paris"}, "output": WEATHER}
    meta = message["metadata"]
    assert meta["finishReason"] == "tool-calls" and meta["model"] == "full"
    assert {k: meta["usage"][k] for k in ("inputTokens", "outputTokens", "totalTokens")} == \
        {"inputTokens": 11, "outputTokens": 9, "totalTokens": 20}

    (rec,) = fake.records
    assert rec.end == "complete" and rec.generated == 9
    assert rec.body["stream"] is True
    if adapter == "anthropic":
        assert rec.headers["x-api-key"] == KEY and rec.headers["anthropic-version"] == "2023-06-01"
        assert rec.body["max_tokens"] > 0
    else:
        assert rec.headers["authorization"] == f"Bearer {KEY}"
    if adapter == "openai_chat":
        assert rec.body["stream_options"] == {"include_usage": True}
    await ws.close()


# ---------------------------------------------------------------- cancel reaches the provider


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("mode", ["stream_response", "manual"])
async def test_cancel_closes_the_upstream(serve: Any, fake: FakeProviders, adapter: str, mode: str) -> None:
    # A long grace: only the adapter's own close may end the upstream in time.
    srv = serve(agent=make_agent(fake), config=RuntimeConfig(abort_grace_s=60))
    ws, session = await client(srv)
    turn_id = await start_turn(ws, session, f"{adapter} gated" + (" manual" if mode == "manual" else ""))
    rec = await fake.request(0)
    fake.allow(rec, 3)
    await ws.wait_until(lambda: sum(c["type"] == "text-delta" for c in chunks(ws, session, turn_id)) == 3,
                        what="three text deltas")
    cancel_ns = time.monotonic_ns()
    await ws.ok({"op": "cancel", "session": session})
    # The fake sees its client go (the HTTP response was closed, not merely ignored) ...
    await fake.until(lambda: rec.disconnect_ns is not None, "the client to disconnect")
    end = await ws.turn_end(session, turn_id)
    assert end["reason"] == "cancelled", end
    assert text_of(end["message"]) == "tok0 tok1 tok2 "
    # ... and generates nothing more, however many tokens it is allowed now.
    fake.allow(rec, 5)
    await fake.until(lambda: rec.finished_ns is not None, "the fake's stream to end")
    assert rec.end == "disconnected"
    assert rec.generated == 3
    assert rec.generated_after(cancel_ns) <= 1 and rec.after_disconnect == 0
    await ws.completes(session, f"{adapter} short")  # the session goes on
    await ws.close()


# ---------------------------------------------------------------- provider errors

ERRORS = {
    "auth": (Script(status=401), "provider_auth", "HTTP 401"),
    "rate-limited": (Script(status=429, retry_after="7"), "provider_rate_limited", "retry after 7 s"),
    "server-error": (Script(status=500), "provider_error", "HTTP 500"),
    "dropped": (Script(break_after=2), "provider_stream_broken", "broke mid-way"),
    "malformed": (Script(malformed_after=2), "provider_stream_broken", "malformed SSE data"),
    "error-event": (Script(error_after=2), "provider_error", "error event in the stream"),
    "cut-short": (Script(truncate_after=2), "provider_stream_broken", "the stream ended before"),
    "not-a-stream": (Script(status=200), "provider_stream_broken", "expected an event stream"),  # JSON, not SSE
}


@pytest.mark.parametrize("case", sorted(ERRORS))
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_provider_error_ends_the_turn(serve: Any, fake: FakeProviders, adapter: str, case: str) -> None:
    script, code, detail = ERRORS[case]
    fake.scripts[case] = script
    srv = serve(agent=make_agent(fake))
    ws, session = await client(srv)
    turn_id = await start_turn(ws, session, f"{adapter} {case}")
    end = await ws.turn_end(session, turn_id)
    assert end["reason"] == "error", end
    assert end["error"]["code"] == code, end["error"]
    message = end["error"]["message"]
    assert message.startswith(f"{PROVIDER_NAME[adapter]}: ") and detail in message, message
    if script.status is not None:
        assert f"HTTP {script.status}" in message
    assert chunks(ws, session, turn_id)[-1] == {"type": "error", "errorText": message}
    # what streamed before a mid-stream failure is kept
    assert text_of(end["message"]) == ("" if script.status is not None else "Hello there, ")
    await ws.completes(session, f"{adapter} short")  # the server and the session keep serving
    await ws.close()


async def test_unreachable_provider_ends_the_turn(serve: Any) -> None:
    async def respond(turn: Any) -> Any:
        return openai_chat(model="m", history=turn.history, base_url="http://127.0.0.1:9/v1")

    srv = serve(agent=respond)
    ws, session = await client(srv)
    turn_id = await start_turn(ws, session, "hello")
    end = await ws.turn_end(session, turn_id)
    assert (end["reason"], end["error"]["code"]) == ("error", "provider_unreachable"), end
    assert end["error"]["message"].startswith("openai.chat: cannot reach http://127.0.0.1:9/v1/chat/completions")
    await ws.close()


# ---------------------------------------------------------------- history round trip


def expected_request(adapter: str, answer: dict[str, Any], call_id: str) -> Any:
    """What the second turn must send: the first question, the first answer
    (its text, tool call and the tool's result) and the second question."""
    args = json.dumps({"city": "Paris"})
    output = json.dumps(WEATHER)
    if adapter == "openai_chat":
        return [{"role": "user", "content": "openai_chat full"},
                {"role": "assistant", "content": "Hello there, world.",
                 "tool_calls": [{"id": call_id, "type": "function",
                                 "function": {"name": "get_weather", "arguments": args}}]},
                {"role": "tool", "tool_call_id": call_id, "content": output},
                {"role": "user", "content": "openai_chat short"}]
    if adapter == "openai_responses":
        return [{"role": "user", "content": "openai_responses full"},
                {"role": "assistant", "content": "Hello there, world."},
                {"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": args},
                {"type": "function_call_output", "call_id": call_id, "output": output},
                {"role": "user", "content": "openai_responses short"}]
    reasoning = answer["parts"][1]
    signature = (reasoning.get("providerMetadata") or {}).get("anthropic", {}).get("signature")
    thinking = [{"type": "thinking", "thinking": "Let me think.", "signature": signature}] if signature else []
    return [{"role": "user", "content": [{"type": "text", "text": "anthropic full"}]},
            {"role": "assistant", "content": [*thinking, {"type": "text", "text": "Hello there, world."},
                                              {"type": "tool_use", "id": call_id, "name": "get_weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": output},
                                         {"type": "text", "text": "anthropic short"}]}]


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_history_round_trips(serve: Any, fake: FakeProviders, adapter: str) -> None:
    srv = serve(agent=make_agent(fake))
    ws, session = await client(srv)
    first = await ws.completes(session, f"{adapter} full")
    await ws.completes(session, f"{adapter} short")
    call_id = first["message"]["parts"][3]["toolCallId"]
    sent = fake.records[1].body
    key = "input" if adapter == "openai_responses" else "messages"
    assert sent[key] == expected_request(adapter, first["message"], call_id)
    await ws.close()


# ---------------------------------------------------------------- the example


def test_openai_example_runs_against_the_fake(fake: FakeProviders) -> None:
    fake.scripts["example-model"] = Script(text="Paris is the capital of France.")
    example = Path(__file__).resolve().parents[2] / "examples" / "openai_agent.py"
    env = {"PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8", "OPENAI_BASE_URL": fake.openai_url,
           "OPENAI_API_KEY": KEY, "OPENAI_MODEL": "example-model", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(example), "What is the capital of France?"], cwd=example.parent,
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Paris is the capital of France." in done.stdout
    assert "reason: complete" in done.stdout
    (rec,) = fake.records
    assert rec.body["messages"][-1] == {"role": "user", "content": "What is the capital of France?"}
