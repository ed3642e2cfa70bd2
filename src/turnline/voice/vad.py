"""Voice activity detection on 16 kHz PCM16 frames.

- :class:`WebRtcVad` (default): ``webrtcvad-wheels``; 10, 20 or 30 ms frames;
  aggressiveness 0 (lenient) to 3 (strict).
- :class:`SileroVad` (option): the Silero model run with onnxruntime on the
  ONNX file shipped inside the ``silero-vad`` wheel, without torch:
  ``pip install onnxruntime && pip install --no-deps silero-vad``. 32 ms frames.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

from .playout import SAMPLE_RATE


class VAD(Protocol):
    frame_ms: int

    def is_speech(self, frame: bytes) -> bool:
        """``frame``: exactly ``frame_ms`` of PCM16 LE mono 16 kHz."""
        ...


class WebRtcVad:
    name = "webrtc"

    def __init__(self, aggressiveness: int = 3, frame_ms: int = 20):
        import webrtcvad

        if frame_ms not in (10, 20, 30):
            raise ValueError("webrtcvad takes 10, 20 or 30 ms frames")
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError("webrtcvad aggressiveness is 0 to 3")
        self.frame_ms = frame_ms
        self.aggressiveness = aggressiveness
        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: bytes) -> bool:
        return bool(self._vad.is_speech(frame, SAMPLE_RATE))


def silero_model() -> Path | None:
    """The ONNX file inside the installed ``silero-vad`` wheel, found without
    importing the package (its ``__init__`` imports torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.onnx"
    return path if path.is_file() else None


def silero_available() -> bool:
    return silero_model() is not None and importlib.util.find_spec("onnxruntime") is not None


class SileroVad:
    """Silero VAD v5 over onnxruntime: 512-sample (32 ms) frames, 64 samples of
    context carried between them, a recurrent state; speech above ``threshold``."""

    name = "silero"
    frame_ms = 32
    _CONTEXT = 64

    def __init__(self, threshold: float = 0.5):
        try:
            import numpy as np
            import onnxruntime
        except ImportError as exc:
            raise RuntimeError("Silero VAD needs onnxruntime and numpy: pip install onnxruntime && "
                               "pip install --no-deps silero-vad") from exc
        model = silero_model()
        if model is None:
            raise RuntimeError("the silero-vad wheel is not installed: pip install --no-deps silero-vad")
        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(str(model), sess_options=opts,
                                                     providers=["CPUExecutionProvider"])
        self._np = np
        self.threshold = threshold
        self._state: Any = np.zeros((2, 1, 128), dtype=np.float32)
        self._context: Any = np.zeros((1, self._CONTEXT), dtype=np.float32)
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def probability(self, frame: bytes) -> float:
        np = self._np
        x = np.frombuffer(frame, dtype="<i2").astype(np.float32)[None, :] / 32768.0
        if x.shape[1] != 512:
            raise ValueError("Silero VAD takes 512-sample (32 ms) frames at 16 kHz")
        x = np.concatenate([self._context, x], axis=1)
        out, self._state = self._session.run(None, {"input": x, "state": self._state, "sr": self._sr})
        self._context = x[:, -self._CONTEXT:]
        return float(out[0][0])

    def is_speech(self, frame: bytes) -> bool:
        return self.probability(frame) >= self.threshold


def make_vad(kind: str = "webrtc", *, aggressiveness: int = 3, frame_ms: int = 20,
             threshold: float = 0.5) -> VAD:
    if kind == "webrtc":
        return WebRtcVad(aggressiveness, frame_ms)
    if kind == "silero":
        return SileroVad(threshold)
    raise ValueError(f"vad is 'webrtc' or 'silero', not {kind!r}")
