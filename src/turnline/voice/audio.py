"""PCM helpers: WAV in and out, resampling to 16 kHz, and espeak-ng's CLI for
making test and demo audio (the "user" of the examples)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000


def to_mono16k(samples: np.ndarray, rate: int) -> bytes:
    """int16 samples at ``rate`` → PCM16 LE mono 16 kHz (linear interpolation)."""
    if rate == SAMPLE_RATE or samples.size == 0:
        return samples.astype("<i2").tobytes()
    n = int(round(samples.size * SAMPLE_RATE / rate))
    x = np.arange(n, dtype=np.float64) * (rate / SAMPLE_RATE)
    out = np.interp(x, np.arange(samples.size, dtype=np.float64), samples.astype(np.float64))
    return np.clip(np.round(out), -32768, 32767).astype("<i2").tobytes()


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """int16 mono samples and the rate of a PCM16 WAV. Tolerates the bogus sizes
    a streamed WAV (``espeak-ng --stdout``) writes: the data runs to the end."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    pos = 12
    rate = channels = bits = None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"fmt ":
            fmt, channels, rate = struct.unpack_from("<HHI", data, body)
            bits = struct.unpack_from("<H", data, body + 14)[0]
            if fmt not in (1, 0xFFFE) or bits != 16:
                raise ValueError("only PCM16 WAV is supported")
        elif cid == b"data":
            if rate is None or channels is None:
                raise ValueError("WAV data before its fmt chunk")
            end = len(data) if size > len(data) - body else body + size
            raw = data[body:end]
            samples = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<i2")
            if channels > 1:
                samples = samples[: samples.size // channels * channels].reshape(-1, channels).mean(axis=1)
                samples = samples.astype("<i2")
            return samples, rate
        pos = body + size + (size & 1)
    raise ValueError("WAV without a data chunk")


def read_wav(path: str | Path) -> bytes:
    """A WAV file as PCM16 LE mono 16 kHz."""
    samples, rate = parse_wav(Path(path).read_bytes())
    return to_mono16k(samples, rate)


def write_wav(path: str | Path, pcm: bytes, rate: int = SAMPLE_RATE) -> None:
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    header += b"data" + struct.pack("<I", len(pcm))
    Path(path).write_bytes(header + pcm)


def silence(ms: int) -> bytes:
    return bytes(SAMPLE_RATE * ms // 1000 * 2)


def frames(pcm: bytes, ms: int = 20) -> list[bytes]:
    """Cut PCM into ``ms`` frames (the last one padded with silence)."""
    size = SAMPLE_RATE * ms // 1000 * 2
    out = [pcm[i:i + size] for i in range(0, len(pcm), size)]
    if out and len(out[-1]) < size:
        out[-1] = out[-1] + bytes(size - len(out[-1]))
    return out


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak_wav(text: str, path: str | Path | None = None, *, voice: str = "en", wpm: int = 175,
               pitch: int = 50) -> bytes:
    """Speak ``text`` with the espeak-ng command (``--stdout``) and return it as
    PCM16 mono 16 kHz; also write it to ``path`` as a 16 kHz WAV if given."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    out = subprocess.run([exe, "--stdout", "-v", voice, "-s", str(wpm), "-p", str(pitch), text],
                         capture_output=True, check=True, timeout=60).stdout
    samples, rate = parse_wav(out)
    pcm = to_mono16k(samples, rate)
    if path is not None:
        write_wav(path, pcm)
    return pcm
