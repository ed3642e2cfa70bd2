"""The voice page in a real browser: a fake microphone talks over the agent.

Chromium's fake microphone plays a WAV made at test time with espeak-ng: the
user saying "wait, stop please" between stretches of silence. Chromium loops
the file, so the user says it again every few seconds. The order of events is
controlled with what the page and the server report, never with sleeps:

- the page starts muted (muted, it streams silence), so the looping voice
  reaches the server only once the test unmutes;
- the test unmutes once the page reports that the agent's first audio frame
  reached the speakers (by the AudioContext's output clock), and after a whole
  utterance of the fake voice went by while muted: a ping from the page is a
  barrier (a connection's frames are decided in order), after which the
  server's detector must have heard no voice at all;
- the next utterance of the loop is the barge-in. The agent's answer is about
  a minute of speech and its turn stays open until it is aborted, so the
  barge-in lands while it speaks and while its turn runs.

Failures save each page's screenshot and console log (tests/e2e/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from browserkit import WAIT_MS, ChatPage, ChatServer, new_session, text_of
from turnline.voice import VoiceConfig, install_voice
from turnline.voice.audio import espeak_available, espeak_wav, silence, write_wav
from turnline.voice.playout import spoken_text

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")]

USER_SAYS = "wait, stop please"
STORY = ("Once upon a time there was a small robot who lived in a lighthouse by the sea. "
         "Every night it climbed the stairs, polished the great lamp, and counted the ships as they passed. ") * 6
BARGE_IN_MS = 30_000  # bounded wait for the next utterance of the looping voice (one loop is about 4 s)


# ---------------------------------------------------------------- the browser, with a fake microphone


@pytest.fixture(scope="module")
def user_voice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user, as chromium's microphone will play it (in a loop)."""
    path = tmp_path_factory.mktemp("voice") / "user.wav"
    write_wav(path, silence(1000) + espeak_wav(USER_SAYS, voice="en-us", pitch=70) + silence(1500))
    return path


@pytest.fixture(scope="module")
def browser(browser: Browser, request: pytest.FixtureRequest, user_voice: Path) -> Iterator[Browser]:
    """Overrides conftest's ``browser`` for this module: another chromium from the
    same Playwright, with the same flags plus a fake microphone playing ``user_voice``."""
    e2e = _conftest(request.config)
    args = [*e2e.CHROMIUM_ARGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={user_voice}"]
    b = browser.browser_type.launch(executable_path=e2e.CHROMIUM, args=args)
    yield b
    b.close()


def _conftest(config: pytest.Config) -> Any:
    here = str(Path(__file__).with_name("conftest.py"))
    return next(p for p in config.pluginmanager.get_plugins() if getattr(p, "__file__", None) == here)


# ---------------------------------------------------------------- the server


async def storyteller(turn: Any) -> None:
    """Tells STORY, then keeps its turn open until it is aborted."""
    await turn.write(STORY)
    await turn.abort_signal


@pytest.fixture
def voice_server(serve: Any) -> tuple[Any, Any]:
    srv = serve(agent=storyteller, server_config={"dev": True})

    async def install() -> Any:
        return install_voice(srv.server.config.app, VoiceConfig())

    return srv, srv.call(install())


def server_event(srv: Any, session: str, type_: str, timeout: float = 10, **match: Any) -> dict[str, Any]:
    """The first event of ``type_`` (with fields ``match``) in the session's log, waiting for it if need be."""

    async def follow() -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            async for batch in srv.runtime.store.follow(session, 0):
                for record in batch:
                    ev = json.loads(record.data)
                    if ev["type"] == type_ and all(ev.get(k) == v for k, v in match.items()):
                        return ev
        raise AssertionError("unreachable")

    return srv.call(follow(), timeout + 5)


def heard_by_server(srv: Any, gw: Any, session: str) -> tuple[str, int]:
    """What the voice session does now, and the end of the last voiced input frame (0: never any voice)."""

    async def read() -> tuple[str, int]:
        voice = gw.session(session)
        return voice.state, voice.rules.last_voice_end

    return srv.call(read())


# ---------------------------------------------------------------- the page


class VoicePage:
    def __init__(self, chat: ChatPage):
        self.page: Page = chat.page

    def open(self, url: str) -> VoicePage:
        self.page.goto(url)
        expect(self.page.get_by_test_id("connection")).to_be_hidden()
        return self

    def start_muted(self) -> None:
        self.page.get_by_test_id("mute").click()
        expect(self.page.get_by_test_id("mute")).to_have_attribute("aria-pressed", "true")
        self.page.get_by_test_id("start").click()
        self.wait("() => window.voicePage.channel.state === 'on' && window.voicePage.voice.live")

    def say(self, text: str) -> None:
        self.page.get_by_test_id("say-input").fill(text)
        self.page.get_by_test_id("say-input").press("Enter")

    def wait(self, expression: str, arg: Any = None, timeout: int = WAIT_MS) -> Any:
        return self.page.wait_for_function(expression, arg=arg, timeout=timeout).json_value()

    def events(self, type_: str, turn_id: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.page.evaluate("(t) => window.voicePage.events(t)", type_)
                if turn_id is None or e.get("turnId") == turn_id]

    def turn(self, turn_id: str) -> dict[str, Any]:
        """The page's speaker, for one turn: state, received, playedMs, heardEnd, queued."""
        return self.page.evaluate("""(t) => {
            const p = window.voicePage.voice.player;
            const s = p.turns.get(t);
            return {state: s.state, received: s.received, playedMs: s.playedMs, heardEnd: s.heardEnd,
                    lateFrames: s.lateFrames, queued: p.queued(t)};
        }""", turn_id)

    def wait_playing(self) -> dict[str, Any]:
        """Until the agent's first audio frame has reached the speakers."""
        return self.wait("() => window.voicePage.playing()", timeout=20_000)

    def wait_dropped(self, turn_id: str, state: str, timeout: int = WAIT_MS) -> dict[str, Any]:
        return self.wait("([t, s]) => window.voicePage.events('drop').find((d) => d.turnId === t && d.state === s)",
                         [turn_id, state], timeout)


def assert_history_is_what_the_page_heard(srv: Any, session: str, vp: VoicePage, turn_id: str) -> str:
    """The persisted answer holds exactly the words the page played; the rest is in metadata. Returns it."""
    end = server_event(srv, session, "turn-end", turn_id=turn_id)
    assert end["reason"] == "cancelled"  # the answer itself was stopped, not only its speech
    revised = server_event(srv, session, "turn-revised", turn_id=turn_id)
    [final] = vp.events("final", turn_id)  # the page's last word on what it played
    assert final["ms"] == (final["lastSeq"] + 1) * 20  # the end of the last frame played, whose label is heardEnd
    spoken = spoken_text(end["message"]["parts"])
    heard = final["heardText"]
    assert 0 < len(heard) < len(spoken) and spoken.startswith(heard)
    assert spoken[len(heard)] in " \n"  # to the word
    [answer] = [m for m in ChatServer(srv, None).history(session) if m["role"] == "assistant"]  # type: ignore[arg-type]
    assert answer["id"] == end["message"]["id"] == revised["message"]["id"]
    assert text_of(answer) == heard
    assert answer["metadata"]["voice"] == {"history": "keep-heard", "heard_ms": final["ms"],
                                           "heard_chars": len(heard), "unspoken": spoken[len(heard):]}
    # and the page shows the same split: heard, then never spoken
    row = vp.page.locator(f'[data-testid=voice-message][data-id="{answer["id"]}"]')
    expect(row.get_by_test_id("heard-text")).to_have_text(re.compile(f"^{re.escape(heard)}$"))
    expect(row.get_by_test_id("unspoken-text")).to_have_text(re.compile(f"^{re.escape(spoken[len(heard):])}$"))
    expect(row.get_by_test_id("interrupted-chip")).to_be_visible()
    return heard


# ---------------------------------------------------------------- the tests


def test_talking_over_the_agent_stops_its_audio_and_history_keeps_the_words_played(
        voice_server: tuple[Any, Any], pages: Any) -> None:
    srv, gw = voice_server
    session = new_session()
    vp = VoicePage(pages()).open(f"{srv.http}/voice.html#{session}")
    vp.start_muted()
    vp.say("tell me a story")
    playing = vp.wait_playing()
    turn_id = playing["turnId"]

    # While muted, a whole utterance of the looping voice goes by: the server hears none of it.
    vp.wait("""(after) => {
        const onset = window.voicePage.events('onset').find((e) => e.muted && e.at > after);
        return onset && window.voicePage.events('offset').some((e) => e.at > onset.at);
    }""", playing["at"])
    vp.page.evaluate("() => window.voicePage.conn.ping()")  # every audio frame sent before it is decided
    assert heard_by_server(srv, gw, session) == ("speaking", 0)
    assert [s["state"] for s in vp.events("signal", turn_id)] == ["speaking"]

    # Unmuted, the next utterance talks over the agent: its speech pauses at once, then is interrupted.
    # (Unmuted in the middle of an utterance, too short a rest of it is a false interruption: paused,
    # resumed, then the next utterance; the checks below hold either way.)
    vp.page.get_by_test_id("mute").click()
    interrupted = vp.wait_dropped(turn_id, "interrupted", BARGE_IN_MS)
    states = [s["state"] for s in vp.events("signal", turn_id)]
    assert states[0] == "speaking" and states[-2:] == ["paused", "interrupted"]
    drops = vp.events("drop", turn_id)
    paused = [d for d in drops if d["state"] == "paused"][-1]
    assert all(d["left"] == 0 for d in drops)  # every stop dropped the page's whole playback queue…
    assert interrupted["playedMs"] == paused["playedMs"]  # …so nothing more played after the pause
    speaker = vp.turn(turn_id)
    assert speaker["received"] == paused["received"] and speaker["lateFrames"] == 0  # the server sent no more
    assert (speaker["queued"], speaker["state"]) == (0, "stopped")

    si = server_event(srv, session, "speech-interrupted", turn_id=turn_id)
    assert (si["reason"], si["mode"]) == ("user_speaking", "response")
    heard = assert_history_is_what_the_page_heard(srv, session, vp, turn_id)
    assert speaker["heardEnd"] == len(heard)
    expect(vp.page.get_by_test_id("last-bargein")).to_contain_text("user speaking")


def test_the_stop_button_silences_the_agent_and_history_keeps_the_words_played(
        voice_server: tuple[Any, Any], pages: Any) -> None:
    srv, _gw = voice_server
    session = new_session()
    vp = VoicePage(pages()).open(f"{srv.http}/voice.html#{session}")
    vp.start_muted()  # the fake voice stays out of it
    vp.say("tell me a story")
    turn_id = vp.wait_playing()["turnId"]
    vp.wait("(t) => window.voicePage.voice.player.turns.get(t).heardEnd > 0", turn_id)  # a word was heard

    vp.page.get_by_test_id("stop-speaking").click()
    stopped = vp.wait_dropped(turn_id, "interrupted")
    assert stopped["left"] == 0
    assert [s["state"] for s in vp.events("signal", turn_id)] == ["speaking", "interrupted"]
    speaker = vp.turn(turn_id)
    assert (speaker["queued"], speaker["lateFrames"], speaker["state"]) == (0, 0, "stopped")

    si = server_event(srv, session, "speech-interrupted", turn_id=turn_id)
    assert (si["reason"], si["mode"]) == ("user_clicked_stop", "response")
    assert_history_is_what_the_page_heard(srv, session, vp, turn_id)
    expect(vp.page.get_by_test_id("stop-speaking")).to_be_disabled()


def test_the_chat_page_opens_the_same_conversation_as_a_voice_conversation(
        voice_server: tuple[Any, Any], pages: Any) -> None:
    srv, _gw = voice_server
    session = new_session()
    chat = pages().open(f"{srv.http}/#{session}")
    chat.page.get_by_test_id("open-voice").click()
    expect(chat.page).to_have_url(f"{srv.http}/voice.html#{session}")
    expect(chat.page.get_by_test_id("open-chat")).to_have_attribute("href", f"/#{session}")
    assert chat.page.evaluate("() => window.voicePage.sessionId") == session
