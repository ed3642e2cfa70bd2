"""``turnline serve --agent module:attr`` (the real CLI, a subprocess) takes a
compiled LangGraph graph and a PydanticAI agent as they are: the examples'
objects, running their frameworks' own test models."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx
import pytest

from servers import SECRET, free_port
from turnline.server.auth import mint
from wsraw import RawWS, text_of

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    # spec: (the framework, what the answer holds)
    "examples.langgraph_agent:graph": ("langgraph", "Hello from LangGraph!"),
    "examples.pydantic_ai_agent:agent": ("pydantic_ai", "light rain"),  # TestModel calls the weather tool
}


@pytest.mark.parametrize("spec", sorted(CASES))
async def test_serve_accepts_a_framework_agent_directly(tmp_path: Path, spec: str) -> None:
    framework, expected = CASES[spec]
    pytest.importorskip(framework)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "PYTHONUNBUFFERED": "1"}
    for key in ("TURNLINE_SECRET", "LANGGRAPH_MODEL", "PYDANTIC_AI_MODEL"):
        env.pop(key, None)
    log_path = tmp_path / "server.log"
    log = open(log_path, "wb")
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("turnline")), "serve", "--store", "memory://", "--port", str(port),
        "--secret", SECRET, "--no-dev", "--agent", spec, "--log-level", "warning",
        cwd=ROOT, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(timeout=1.0) as http, asyncio.timeout(30):
            while True:
                assert proc.returncode is None, log_path.read_text()
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)  # polls the server's start-up, asserts nothing on time
        token = mint(SECRET, "alice", {"*": ["subscribe", "publish", "cancel"]}, 600)
        ws = await RawWS.open(f"ws://127.0.0.1:{port}/v1/ws", token)
        await ws.subscribe("cli-framework")
        end = await ws.completes("cli-framework", "Weather in Paris?", timeout=20)
        assert expected in text_of(end["message"]), end["message"]
        streamed = [e["chunk"]["type"] for e in ws.find("cli-framework", "chunk", turn_id=end["turn_id"])]
        assert streamed.count("text-delta") > 1  # streamed, not written at once
        await ws.close()
    finally:
        proc.kill()
        await proc.wait()
        log.close()
