// turnline-voice.js — voice for turnline.js: audio frames, voice ops, a
// microphone and a speaker. One ES module, no build step.
//
//   import { connect } from "/turnline.js";
//   import { VoiceLink, Microphone, VoicePlayer } from "/turnline-voice.js";
//   const link = new VoiceLink();
//   const conn = connect({ url: "/v1/ws", getToken, WebSocket: link.WebSocket });  // one socket for both
//   const voice = link.channel("s-123");
//   const ctx = new AudioContext();                    // in a click handler (autoplay rules)
//   const player = new VoicePlayer(ctx).attach(voice);  // plays the agent, acknowledges `played`
//   await voice.start();                               // voice-start; again after every reconnect
//   const mic = new Microphone(ctx);
//   mic.on("frame", (f) => voice.sendAudio(f.pcm));     // 20 ms of PCM16 mono 16 kHz
//   await mic.start();
//
// The wire is docs/protocol.md, "Voice": binary frames with a small header,
// the ops voice-start, voice-stop, transcript, interrupt and played, and the
// server's `voice` signals (speaking, paused, resumed, interrupted, done).
//
// What the speaker acknowledges is what reached the speakers: a frame counts
// as played once the AudioContext's output clock has passed its end, and the
// acknowledged position is always the end of a whole frame. So the text the
// page calls heard (the `heard_end` label of the last frame played) is the
// text the server persists for that position, to the word.

import { Emitter, TurnlineError } from "./turnline.js";

export const SAMPLE_RATE = 16000;
export const FRAME_MS = 20;
export const FRAME_SAMPLES = (SAMPLE_RATE * FRAME_MS) / 1000;
export const AUDIO_VERSION = 1;
export const AUDIO_IN = 1;
export const AUDIO_OUT = 2;

const FIXED = 12; // version u8, kind u8, header length u16, seq u32, ms u32
const te = new TextEncoder();
const latin1 = new TextDecoder("latin1");

// ------------------------------------------------------------------ the codec

/** An audio-in frame: `pcm` (Int16Array, mono 16 kHz) for `session`. @returns {ArrayBuffer} */
export function encodeAudioIn(session, pcm, seq = 0, ms = 0) {
  const sid = te.encode(session);
  const header = FIXED + 1 + sid.length + 1;
  const buf = new ArrayBuffer(header + pcm.length * 2);
  const view = new DataView(buf);
  view.setUint8(0, AUDIO_VERSION);
  view.setUint8(1, AUDIO_IN);
  view.setUint16(2, header, true);
  view.setUint32(4, seq >>> 0, true);
  view.setUint32(8, ms >>> 0, true);
  view.setUint8(FIXED, sid.length);
  new Uint8Array(buf, FIXED + 1, sid.length).set(sid);
  view.setUint8(FIXED + 1 + sid.length, 0); // no turn id in audio-in
  for (let i = 0; i < pcm.length; i++) view.setInt16(header + 2 * i, pcm[i], true);
  return buf;
}

/**
 * A binary frame from the server.
 * @returns {{kind: number, session: string, seq: number, ms: number, turnId: string,
 *            spanStart: number, spanEnd: number, heardEnd: number, pcm: Int16Array}}
 */
export function decodeAudio(buffer) {
  const view = new DataView(buffer);
  if (buffer.byteLength < FIXED + 2) throw new TurnlineError("bad_frame", "binary frame too short");
  const version = view.getUint8(0);
  if (version !== AUDIO_VERSION) throw new TurnlineError("bad_frame", `binary frame version ${version}`);
  const kind = view.getUint8(1);
  const header = view.getUint16(2, true);
  let pos = FIXED;
  const sLen = view.getUint8(pos++);
  const session = latin1.decode(new Uint8Array(buffer, pos, sLen));
  pos += sLen;
  const tLen = view.getUint8(pos++);
  const turnId = latin1.decode(new Uint8Array(buffer, pos, tLen));
  pos += tLen;
  let spanStart = 0, spanEnd = 0, heardEnd = 0;
  if (kind === AUDIO_OUT) {
    spanStart = view.getUint32(pos, true);
    spanEnd = view.getUint32(pos + 4, true);
    heardEnd = view.getUint32(pos + 8, true);
  }
  if (header > buffer.byteLength || (buffer.byteLength - header) % 2) {
    throw new TurnlineError("bad_frame", "binary frame header does not fit");
  }
  const pcm = new Int16Array((buffer.byteLength - header) / 2);
  for (let i = 0; i < pcm.length; i++) pcm[i] = view.getInt16(header + 2 * i, true);
  return { kind, session, seq: view.getUint32(4, true), ms: view.getUint32(8, true), turnId, spanStart, spanEnd,
    heardEnd, pcm };
}

/** `str` cut at `n` Unicode code points (the protocol's text offsets count code points). */
export function codePointPrefix(str, n) {
  let i = 0;
  for (let cp = 0; cp < n && i < str.length; cp++) i += str.codePointAt(i) > 0xffff ? 2 : 1;
  return str.slice(0, i);
}

/** The text a turn speaks: its text parts in order, joined with a newline. */
export function spokenText(message) {
  return (message?.parts ?? []).filter((p) => p.type === "text").map((p) => p.text ?? "").join("\n");
}

// ------------------------------------------------------------------ the link

const OWN_ID = "tv-"; // ids of the link's own requests; turnline.js ignores answers it did not ask for

/**
 * Voice on the connection turnline.js opens: pass `link.WebSocket` to
 * `connect()`. The socket is the same one; the link sees its binary frames
 * and `voice`/`transcript` signals (which turnline.js leaves alone) and sends
 * the voice ops with ids of its own. Events: `open`, `close`.
 */
export class VoiceLink extends Emitter {
  constructor({ WebSocket: WS = globalThis.WebSocket } = {}) {
    super();
    /** the open socket, or null */
    this.socket = null;
    this._ids = 0;
    this._pending = new Map();
    /** @type {Map<string, VoiceChannel>} */
    this._channels = new Map();
    const link = this;
    // A constructor returning the real socket: `new link.WebSocket(url)` is a WebSocket.
    this.WebSocket = function VoiceWebSocket(url, protocols) {
      const ws = protocols === undefined ? new WS(url) : new WS(url, protocols);
      ws.binaryType = "arraybuffer";
      link._watch(ws);
      return ws;
    };
  }

  /** The voice channel of `session` (one per session and link). @returns {VoiceChannel} */
  channel(session) {
    let ch = this._channels.get(session);
    if (!ch) this._channels.set(session, (ch = new VoiceChannel(this, session)));
    return ch;
  }

  /** Send a JSON op and wait for its ack (rejects with the error frame's code). */
  request(frame) {
    return new Promise((resolve, reject) => {
      const ws = this.socket;
      if (!ws || ws.readyState !== 1) {
        reject(new TurnlineError("disconnected", "not connected"));
        return;
      }
      const id = `${OWN_ID}${++this._ids}`;
      this._pending.set(id, { resolve, reject });
      ws.send(JSON.stringify({ ...frame, id }));
    });
  }

  /** Send a binary frame now; false when there is no open socket or it is backed up. */
  sendBinary(buffer) {
    const ws = this.socket;
    if (!ws || ws.readyState !== 1 || ws.bufferedAmount > (1 << 20)) return false; // live audio: late is lost
    ws.send(buffer);
    return true;
  }

  _watch(ws) {
    ws.addEventListener("open", () => {
      if (this.socket && this.socket !== ws) this._closed(this.socket);
      this.socket = ws;
      this.emit("open");
      for (const ch of this._channels.values()) ch._onOpen();
    });
    ws.addEventListener("message", (e) => { if (ws === this.socket) this._onMessage(e.data); });
    ws.addEventListener("close", () => this._closed(ws));
  }

  _closed(ws) {
    if (ws !== this.socket) return;
    this.socket = null;
    const lost = new TurnlineError("disconnected", "the connection was lost");
    for (const p of this._pending.values()) p.reject(lost);
    this._pending.clear();
    for (const ch of this._channels.values()) ch._onClose();
    this.emit("close");
  }

  _onMessage(data) {
    if (typeof data !== "string") {
      let frame;
      try {
        frame = decodeAudio(data);
      } catch (err) {
        console.warn("turnline-voice: unreadable audio frame", err);
        return;
      }
      if (frame.kind === AUDIO_OUT) this._channels.get(frame.session)?._onAudio(frame);
      return;
    }
    // Cheap prefix tests: every other text frame is turnline.js's business.
    if (data.startsWith('{"op":"voice"') || data.startsWith('{"op":"transcript"')) {
      const frame = JSON.parse(data);
      this._channels.get(frame.session)?._onSignal(frame);
    } else if (data.startsWith(`{"op":"ack","id":"${OWN_ID}`) || data.startsWith(`{"op":"error","id":"${OWN_ID}`)) {
      const frame = JSON.parse(data);
      const p = this._pending.get(frame.id);
      if (!p) return;
      this._pending.delete(frame.id);
      if (frame.op === "ack") p.resolve(frame);
      else p.reject(new TurnlineError(frame.code ?? "internal", String(frame.message ?? "")));
    } else if (data.startsWith('{"op":"error","id":null')) {
      const frame = JSON.parse(data); // a refused audio frame
      this._channels.get(frame.session)?.emit("error", new TurnlineError(frame.code, frame.message));
    }
  }
}

/**
 * Voice on one session. State: `off` → `starting` → `on` (→ `off` at stop or
 * when the socket drops; after a reconnect it starts again by itself).
 * Events: `state`, `started` (the voice-start ack), `audio` (a decoded
 * audio-out frame), `signal` ({state, turn_id, ms}), `transcript`
 * ({text, final}), `reset` (the socket dropped: the server has stopped this
 * voice and its speech), `error`.
 */
export class VoiceChannel extends Emitter {
  constructor(link, session) {
    super();
    this.link = link;
    this.session = session;
    /** @type {"off"|"starting"|"on"} */
    this.state = "off";
    /** the voice-start ack: sample_rate, frame_ms, vad, vad_frame_ms, history */
    this.info = null;
    this._wanted = null; // voice-start fields, while the page wants voice
    this._seq = 0;
    this._starting = null;
  }

  /** voice-start. `history`: keep-heard | keep-generated; `options`: barge-in settings (docs/voice.md). */
  start({ history = null, options = null } = {}) {
    this._wanted = { history, options };
    return this._start();
  }

  /** voice-stop: the agent's speech stops, nothing more is spoken. */
  async stop() {
    this._wanted = null;
    const was = this.state;
    this._setState("off");
    if (was !== "off" && this.link.socket) {
      await this.link.request({ op: "voice-stop", session: this.session }).catch(() => {});
    }
  }

  /** 20 ms (any length up to 1 s) of PCM16 mono 16 kHz from the microphone; false if not sent. */
  sendAudio(pcm) {
    if (this.state !== "on") return false;
    const seq = this._seq++;
    return this.link.sendBinary(encodeAudioIn(this.session, pcm, seq, seq * FRAME_MS));
  }

  /** The speaker played `ms` of the turn's audio; `final` once playback of it stopped for good. */
  played(turnId, ms, final = false) {
    if (this.state !== "on") return Promise.resolve(null);
    return this.link.request({ op: "played", session: this.session, turn_id: turnId, ms, final });
  }

  /** Stop the agent: `speech` (it falls silent, its answer goes on) or `response` (cancelled too). */
  interrupt({ mode = "speech", reason = "client_request" } = {}) {
    return this.link.request({ op: "interrupt", session: this.session, mode, reason });
  }

  /** A transcript from the page's own speech recognition (a final one becomes a user message). */
  transcript(text, final = true) {
    return this.link.request({ op: "transcript", session: this.session, text, final });
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.emit("state", state);
  }

  _start(attempt = 0) {
    if (this._starting) return this._starting;
    if (!this.link.socket) {
      // started when the socket opens (_onOpen)
      return new Promise((resolve, reject) => {
        const off = this.on("state", (s) => {
          if (s === "on") { off(); offErr(); resolve(this.info); }
        });
        const offErr = this.on("start-failed", (err) => { off(); offErr(); reject(err); });
      });
    }
    this._setState("starting");
    const { history, options } = this._wanted;
    const frame = { op: "voice-start", session: this.session };
    if (history) frame.history = history;
    if (options) frame.options = options;
    this._starting = this.link.request(frame).then((ack) => {
      this._starting = null;
      if (!this._wanted) return ack; // stopped meanwhile
      this.info = ack;
      this._seq = 0;
      this._setState("on");
      this.emit("started", ack);
      return ack;
    }, (err) => {
      this._starting = null;
      if (err.code === "conflict" && attempt > 0 && attempt < 10 && this._wanted) {
        // a restart after a reconnect: the server may not have closed the old connection's voice yet
        return new Promise((resolve) => setTimeout(resolve, 300)).then(() => this._start(attempt + 1));
      }
      if (err.code !== "disconnected") {
        this._wanted = null; // refused (conflict, forbidden, bad options): do not retry by itself
        this._setState("off");
        this.emit("start-failed", err);
        this.emit("error", err);
      }
      throw err;
    });
    return this._starting;
  }

  _onOpen() {
    if (this._wanted && this.state === "off") this._start(this.info ? 1 : 0).catch(() => {});
  }

  _onClose() {
    if (this.state === "off" && !this._wanted) return;
    this._setState("off");
    this.emit("reset", { reason: "disconnected" });
  }

  _onAudio(frame) {
    this.emit("audio", frame);
  }

  _onSignal(frame) {
    if (frame.op === "transcript") this.emit("transcript", { text: frame.text, final: frame.final });
    else this.emit("signal", frame);
  }
}

// ------------------------------------------------------------------ the speaker

/**
 * Plays audio-out frames through Web Audio on a scheduled queue (one buffer
 * per 20 ms frame, back to back on the context's clock) and acknowledges
 * what reached the speakers. `attach(channel)` wires it to a VoiceChannel:
 * frames in, signals obeyed (`paused`/`interrupted`: stop at once and drop
 * the turn's queue; `resumed`: play again), `played` sent every `ackEveryMs`
 * and on every stop.
 *
 * Events: `ack` ({turnId, ms, heardEnd, lastSeq (the last frame played), final}),
 * `drop` ({turnId, state, dropped, left (still queued: 0), received (frames of
 * the turn so far), playedMs, at, atContext}), `playing` ({turnId}) when a turn's first frame
 * has reached the speakers, `idle` when the queue has run dry.
 */
export class VoicePlayer extends Emitter {
  constructor(context, { destination = null, ackEveryMs = 100, startLeadMs = 40 } = {}) {
    super();
    this.ctx = context;
    this.output = context.createGain();
    this.analyser = context.createAnalyser();
    this.analyser.fftSize = 512;
    this.output.connect(this.analyser);
    this.output.connect(destination ?? context.destination);
    this.startLead = startLeadMs / 1000;
    this.ackEveryMs = ackEveryMs;
    this.rate = context.sampleRate;
    this.queue = []; // {turnId, frame, start, end (context seconds), src}, in play order
    this.cursor = 0; // where the next frame starts, in context samples
    /** per turn: {state: playing|paused|stopped, playedMs, heardEnd, lastSeq, received, lateFrames, done, lastAck} */
    this.turns = new Map();
    this.framesPlayed = 0;
    this._phase = 0; // the resampler's position in the next input frame
    this._timer = null;
    this._channel = null;
    this._off = [];
  }

  /** Play `channel`'s audio and acknowledge it there. @returns {VoicePlayer} */
  attach(channel) {
    this.detach();
    this._channel = channel;
    this._off = [
      channel.on("audio", (f) => this.enqueue(f)),
      channel.on("signal", (s) => this.signal(s)),
      channel.on("reset", () => this.reset()),
      this.on("ack", (a) => channel.played(a.turnId, a.ms, a.final).catch(() => {})),
    ];
    this._timer = setInterval(() => this.tick(), this.ackEveryMs);
    return this;
  }

  detach() {
    for (const off of this._off) off();
    this._off = [];
    clearInterval(this._timer);
    this._timer = null;
    this._channel = null;
  }

  turn(turnId) {
    let t = this.turns.get(turnId);
    if (!t) {
      t = { turnId, state: "playing", playedMs: 0, heardEnd: 0, lastSeq: -1, received: 0, lateFrames: 0, done: false,
        lastAck: 0, started: false };
      this.turns.set(turnId, t);
    }
    return t;
  }

  /** The context time of the audio leaving the speakers now. */
  outputTime() {
    const ts = this.ctx.getOutputTimestamp?.();
    if (ts && ts.contextTime > 0) return ts.contextTime;
    return Math.max(0, this.ctx.currentTime - (this.ctx.outputLatency || 0) - (this.ctx.baseLatency || 0));
  }

  /** Queue a decoded audio-out frame. */
  enqueue(frame) {
    const t = this.turn(frame.turnId);
    t.received += 1;
    if (t.state !== "playing") {
      t.lateFrames += 1; // sent before the signal reached us, or a server bug: never played
      return;
    }
    const now = Math.ceil((this.ctx.currentTime + this.startLead) * this.rate);
    if (this.cursor < now) { // (re)starting after silence: a small lead, a fresh resampler
      this.cursor = now;
      this._phase = 0;
    }
    const samples = this._resample(frame.pcm);
    const buffer = this.ctx.createBuffer(1, samples.length, this.rate);
    buffer.copyToChannel(samples, 0);
    const src = this.ctx.createBufferSource();
    src.buffer = buffer;
    src.connect(this.output);
    const start = this.cursor / this.rate;
    src.start(start);
    this.cursor += samples.length;
    this.queue.push({ turnId: frame.turnId, frame, start, end: this.cursor / this.rate, src });
  }

  /** Linear interpolation from 16 kHz to the context's rate; the sample clock carries across frames. */
  _resample(pcm) {
    const step = SAMPLE_RATE / this.rate;
    const n = pcm.length;
    const out = new Float32Array(Math.ceil((n - this._phase) / step) + 1);
    let pos = this._phase;
    let j = 0;
    for (; pos < n; pos += step) {
      const i = Math.floor(pos);
      const a = pcm[i] / 32768;
      const b = (i + 1 < n ? pcm[i + 1] : pcm[n - 1]) / 32768; // the last sample is held into the next frame
      out[j++] = a + (b - a) * (pos - i);
    }
    this._phase = pos - n; // where the next frame's first output sample falls
    return out.subarray(0, j);
  }

  /** Count the frames whose end has left the speakers; send acks that advanced. */
  tick() {
    const out = this.outputTime();
    let played = 0;
    while (this.queue.length && this.queue[0].end <= out) {
      const e = this.queue.shift();
      const t = this.turn(e.turnId);
      t.playedMs = Math.max(t.playedMs, e.frame.ms + FRAME_MS);
      t.heardEnd = Math.max(t.heardEnd, e.frame.heardEnd);
      t.lastSeq = Math.max(t.lastSeq, e.frame.seq);
      played += 1;
      if (!t.started) {
        t.started = true;
        this.emit("playing", { turnId: t.turnId });
      }
    }
    this.framesPlayed += played;
    for (const t of this.turns.values()) {
      if (t.playedMs > t.lastAck && t.state !== "stopped") {
        t.lastAck = t.playedMs;
        this.emit("ack", { turnId: t.turnId, ms: t.playedMs, heardEnd: t.heardEnd, lastSeq: t.lastSeq, final: false });
      }
    }
    if (played && !this.queue.length) this.emit("idle");
  }

  /** The frame leaving the speakers now: {turnId, spanStart, spanEnd, heardEnd}, or null. */
  nowPlaying() {
    const out = this.outputTime();
    const e = this.queue.find((x) => x.start <= out && out < x.end);
    return e ? { turnId: e.turnId, spanStart: e.frame.spanStart, spanEnd: e.frame.spanEnd, heardEnd: e.frame.heardEnd } : null;
  }

  /** Obey a `voice` signal from the server. */
  signal(s) {
    const t = this.turn(s.turn_id);
    if (s.state === "paused") this.stop(s.turn_id, "paused");
    else if (s.state === "interrupted") this.stop(s.turn_id, "interrupted");
    else if (s.state === "resumed" && t.state === "paused") t.state = "playing";
    else if (s.state === "done") t.done = true;
  }

  /**
   * Stop a turn's audio now and drop its queue. `paused` may resume;
   * `interrupted` is for good (its position is acknowledged as final).
   */
  stop(turnId, state = "interrupted") {
    const at = performance.now();
    const atContext = this.ctx.currentTime;
    this.tick(); // what already left the speakers counts
    const t = this.turn(turnId);
    let dropped = 0;
    this.queue = this.queue.filter((e) => {
      if (e.turnId !== turnId) return true;
      try { e.src.stop(); } catch { /* not started */ }
      e.src.disconnect();
      dropped += 1;
      return false;
    });
    if (!this.queue.length) this.cursor = 0;
    const final = state === "interrupted";
    if (t.state !== "stopped") t.state = final ? "stopped" : "paused";
    this.emit("drop", { turnId, state, dropped, left: this.queued(turnId), received: t.received, playedMs: t.playedMs,
      at, atContext });
    t.lastAck = t.playedMs;
    this.emit("ack", { turnId, ms: t.playedMs, heardEnd: t.heardEnd, lastSeq: t.lastSeq, final });
  }

  /** Drop everything (the connection dropped: the server has stopped the speech). */
  reset() {
    for (const e of this.queue) {
      try { e.src.stop(); } catch { /* not started */ }
      e.src.disconnect();
    }
    this.queue = [];
    this.cursor = 0;
    for (const t of this.turns.values()) t.state = "stopped";
  }

  /** Output level 0..1 (for a visualiser). */
  level() {
    const data = new Float32Array(this.analyser.fftSize);
    this.analyser.getFloatTimeDomainData(data);
    let sum = 0;
    for (const v of data) sum += v * v;
    return Math.min(1, Math.sqrt(sum / data.length) * 4);
  }

  /** Is audio of `turnId` (or any turn) scheduled? */
  queued(turnId = null) {
    return this.queue.filter((e) => turnId === null || e.turnId === turnId).length;
  }
}

// ------------------------------------------------------------------ the microphone

// Runs on the audio thread: the input mixed to mono, resampled to 16 kHz
// (each output sample the mean of the input samples it covers), cut into 20 ms
// PCM16 frames. Each frame says its peak and where its first sample at or
// above `marker` is (a sharp onset in the input can be timed to the sample).
const CAPTURE_WORKLET = `
class TurnlineCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.step = sampleRate / o.rate;
    this.size = o.frameSamples;
    this.marker = o.marker;
    this.next = this.step;
    this.pos = 0;
    this.acc = 0;
    this.count = 0;
    this.fresh();
  }
  fresh() {
    this.frame = new Int16Array(this.size);
    this.n = 0;
    this.peak = 0;
    this.sq = 0;
    this.firstLoud = -1;
  }
  process(inputs) {
    const input = inputs[0];
    if (!input || !input.length) return true;
    const channels = input.length;
    const len = input[0].length;
    for (let i = 0; i < len; i++) {
      let x = 0;
      for (let c = 0; c < channels; c++) x += input[c][i];
      this.acc += x / channels;
      this.count += 1;
      this.pos += 1;
      if (this.pos < this.next) continue;
      this.next += this.step;
      const y = this.acc / this.count;
      this.acc = 0;
      this.count = 0;
      const a = Math.abs(y);
      if (a > this.peak) this.peak = a;
      if (this.firstLoud < 0 && a >= this.marker) this.firstLoud = this.n;
      this.sq += y * y;
      this.frame[this.n++] = Math.max(-32768, Math.min(32767, Math.round(y * 32767)));
      if (this.n === this.size) {
        this.port.postMessage({ pcm: this.frame, peak: this.peak, rms: Math.sqrt(this.sq / this.size),
          firstLoud: this.firstLoud, end: currentTime + (i + 1) / sampleRate }, [this.frame.buffer]);
        this.fresh();
      }
    }
    return true;
  }
}
registerProcessor("turnline-capture", TurnlineCapture);
`;

const workletLoaded = new WeakMap();

function loadCaptureWorklet(ctx) {
  let p = workletLoaded.get(ctx);
  if (!p) {
    const url = URL.createObjectURL(new Blob([CAPTURE_WORKLET], { type: "text/javascript" }));
    p = ctx.audioWorklet.addModule(url).finally(() => URL.revokeObjectURL(url));
    workletLoaded.set(ctx, p);
  }
  return p;
}

/**
 * The microphone as 20 ms frames of PCM16 mono 16 kHz, from an AudioWorklet.
 * Event `frame`: {pcm (Int16Array; zeros while muted), peak, rms, muted,
 * onsetMs (ms from the frame's start to its first sample at or above the
 * marker level, or -1), at (performance.now() when the frame reached the page)}.
 * While `muted` the frames keep coming, as silence: the server's barge-in
 * clock is the audio itself.
 */
export class Microphone extends Emitter {
  constructor(context, { constraints = {}, marker = 0.01 } = {}) {
    super();
    this.ctx = context;
    this.constraints = { echoCancellation: true, noiseSuppression: true, autoGainControl: true, ...constraints };
    this.marker = marker;
    this.muted = false;
    this.stream = null;
    this.node = null;
    this.source = null;
  }

  get active() {
    return this.stream !== null;
  }

  async start() {
    if (this.stream) return;
    const stream = await navigator.mediaDevices.getUserMedia({ audio: this.constraints });
    try {
      await loadCaptureWorklet(this.ctx);
    } catch (err) {
      for (const track of stream.getTracks()) track.stop();
      throw err;
    }
    this.stream = stream;
    this.source = this.ctx.createMediaStreamSource(stream);
    this.node = new AudioWorkletNode(this.ctx, "turnline-capture", {
      processorOptions: { rate: SAMPLE_RATE, frameSamples: FRAME_SAMPLES, marker: this.marker },
    });
    this.node.port.onmessage = (e) => this._frame(e.data);
    this.source.connect(this.node);
    for (const track of stream.getAudioTracks()) track.addEventListener("ended", () => this.emit("ended"));
  }

  stop() {
    this.node?.port.close();
    this.source?.disconnect();
    this.node?.disconnect();
    for (const track of this.stream?.getTracks() ?? []) track.stop();
    this.stream = this.node = this.source = null;
  }

  setMuted(muted) {
    this.muted = Boolean(muted);
    this.emit("muted", this.muted);
  }

  _frame(d) {
    const pcm = this.muted ? new Int16Array(d.pcm.length) : d.pcm;
    this.emit("frame", { pcm, peak: d.peak, rms: d.rms, muted: this.muted, at: performance.now(),
      onsetMs: d.firstLoud < 0 ? -1 : (d.firstLoud * 1000) / SAMPLE_RATE, end: d.end });
  }
}
