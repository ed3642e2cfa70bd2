"""Voice over a turnline session: VAD, STT, TTS, real-time playout, barge-in,
and history equal to what was heard. See docs/voice.md.

Pure parts (no I/O): :mod:`.text` (clauses), :mod:`.playout` (audio → text
heard), :mod:`.rules` (barge-in). I/O parts: :mod:`.vad`, :mod:`.stt`,
:mod:`.tts`, :mod:`.session` (the pipeline), :mod:`.gateway` (the WebSocket).
"""

from .gateway import VoiceGateway, install_voice
from .playout import Mark, PlayoutMap, Synthesis, heard_message, spoken_text
from .rules import BargeIn, BargeInRules, BargeInSettings
from .session import AudioSink, Interruption, VoiceClosed, VoiceConfig, VoiceOptions, VoiceSession
from .stt import ScriptedSTT, SpeechToText, Transcriber, TranscriptPassthrough
from .text import ClauseSplitter
from .tts import EspeakTTS, TextToSpeech
from .vad import VAD, SileroVad, WebRtcVad, make_vad, silero_available

UNINTERRUPTIBLE = {"type": "message-metadata", "messageMetadata": {"voice": {"interruptible": False}}}
"""Write this chunk in a turn to make its speech immune to automatic barge-in."""

__all__ = [
    "AudioSink", "BargeIn", "BargeInRules", "BargeInSettings", "ClauseSplitter", "EspeakTTS", "Interruption",
    "Mark", "PlayoutMap", "ScriptedSTT", "SileroVad", "SpeechToText", "Synthesis", "TextToSpeech", "Transcriber",
    "TranscriptPassthrough", "UNINTERRUPTIBLE", "VAD", "VoiceClosed", "VoiceConfig", "VoiceGateway",
    "VoiceOptions", "VoiceSession", "WebRtcVad", "heard_message", "install_voice", "make_vad",
    "silero_available", "spoken_text",
]
