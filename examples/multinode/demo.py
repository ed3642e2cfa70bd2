"""Two devices of one user, on two gateways: the phone asks, the laptop stops.

Run the cluster first (``./run.sh``, ``honcho start`` or ``foreman start`` in
this directory), then ``python demo.py``. The phone sends through gateway 1;
the answer streams from whichever worker took the turn; the laptop, connected
to gateway 2, presses stop. The stop reaches that worker, and the saved answer
is exactly what the laptop's screen showed.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from turnline.client import ClientTransport, message_text
from turnline.server.auth import mint

GATEWAY1 = os.environ.get("GATEWAY1_PORT", "8801")
GATEWAY2 = os.environ.get("GATEWAY2_PORT", "8802")


def shared_secret() -> str:
    """The gateways' TURNLINE_SECRET: from the environment, else from .env here."""
    if os.environ.get("TURNLINE_SECRET"):
        return os.environ["TURNLINE_SECRET"]
    for line in (Path(__file__).with_name(".env")).read_text().splitlines():
        if line.startswith("TURNLINE_SECRET="):
            return line.partition("=")[2]
    raise SystemExit("set TURNLINE_SECRET (the one the gateways use)")


async def main() -> None:
    # With a secret configured the gateways are not in dev mode: this script
    # plays your backend and mints the user's token with the secret every
    # gateway shares, so any gateway accepts it.
    session = f"multinode-{uuid.uuid4().hex[:8]}"
    token = mint(shared_secret(), "alice", {"multinode-*": ["subscribe", "publish", "cancel"]})
    async with ClientTransport(f"ws://127.0.0.1:{GATEWAY1}/v1/ws", token, session) as phone, \
            ClientTransport(f"ws://127.0.0.1:{GATEWAY2}/v1/ws", token, session) as laptop:
        ack = await phone.send("How do you stop a stream on another machine?")
        (turn_id,) = ack["turn_ids"]

        def screen() -> str:
            return message_text(next((m for m in laptop.view.messages() if m.role == "assistant"), None))

        await laptop.wait_for(lambda view: len(screen().split()) >= 8)
        await laptop.cancel()  # the user's own turns; seen = what the laptop's view shows
        shown = screen()
        end = await phone.wait_turn_end(turn_id)
        print("laptop screen at stop:", repr(shown))
        print("turn ended:", end.reason)
        print("persisted:", repr(message_text(end.message)))
        print("history == laptop screen:", "yes" if message_text(end.message) == shown else "NO")


if __name__ == "__main__":
    asyncio.run(main())
