"""Every example runs to completion against a real server (its own, in-process),
and says what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

EXPECTED = {
    "stop_button.py": ["history == screen: yes"],
    "double_texting.py": ["queue: ack", "interrupt: ack", "reject: ack", "rejected: busy", "rollback: ack"],
    "branching.py": ["‹ 2/2 ›", "back on the first branch:"],
    "steering.py": ["[switching to dogs, please]", "the steer started none"],
    "voice_cli.py": ["history == what was heard: yes", "agent then:   Mars"],
    "langgraph_agent.py": ["Hello from LangGraph!", "reason: complete"],  # LangChain's fake chat model
    "pydantic_ai_agent.py": ["[weather(", "14°C, light rain", "reason: complete"],  # PydanticAI's TestModel
    "otel_console.py": ["turn joined the app's trace: yes",
                        "second turn: cancelled | its span's events: turnline.first_chunk, turnline.cancel_received, "
                        "turnline.abort_fired"],
    "fastapi_mount.py": ["answer over /chat/v1/ws: 'Hello from turnline, mounted at /chat. '",
                         "history over /chat/v1/...: 2 messages", "mounted at /chat: yes", "app shutdown"],
}
# Run by test_providers.py, against the fake provider it needs.
NEEDS_PROVIDER = {"openai_agent.py"}


def test_every_example_is_covered() -> None:
    found = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
    assert found == sorted([*EXPECTED, *NEEDS_PROVIDER])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    env = {"PYTHONIOENCODING": "utf-8", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, name], cwd=EXAMPLES, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for expected in EXPECTED[name]:
        assert expected in done.stdout, done.stdout
