// The turnline voice page: talk with the agent, and talk over it.
//
// The microphone streams 20 ms PCM frames to the server (turnline serve
// --voice), whose voice activity detector pauses the agent's speech the
// moment the user speaks over it. The agent's speech plays through Web Audio;
// the page acknowledges what reached the speakers, and an interrupted answer
// is remembered as exactly the words that were heard. The session id is the
// URL hash, shared with the chat page (the same conversation, as text).

import { connect, messageText, newId } from "./turnline.js";
import { codePointPrefix, Microphone, spokenText, VoiceLink, VoicePlayer } from "./turnline-voice.js";
import {
  browserUser, escapeHtml, messageSig, reconcile, renderBanner, sessionFromHash, showToast, storage, tokenOptions, truncate,
} from "./ui.js";

const $ = (sel) => document.querySelector(sel);
const els = {
  app: $("#vapp"), title: $("#title"), sessionId: $("#session-id"), presence: $("#presence"), openChat: $("#open-chat"),
  newConversation: $("#new-conversation"), banner: $("#banner"), bannerText: $("#banner-text"), retry: $("#retry"),
  orb: $("#orb"), statusLine: $("#status-line"), statusSub: $("#status-sub"), bargein: $("#bargein"),
  bargeinText: $("#bargein-text"), facts: $("#facts"), factVad: $("#fact-vad"), factHistory: $("#fact-history"),
  factBargein: $("#fact-bargein"), transcript: $("#transcript"), inner: $("#transcript-inner"), empty: $("#vempty"),
  say: $("#say"), sayInput: $("#say-input"), saySend: $("#say-send"), mute: $("#mute"), muteLabel: $("#mute-label"),
  micLevel: $("#mic-level"), call: $("#call"), callLabel: $("#call-label"), stop: $("#stop"), toast: $("#toast"),
};

const PRESENCE_LABELS = { idle: "Ready", thinking: "Thinking…", streaming: "Answering…", offline: "Agent offline" };
const STATUS = {
  off: ["Ready when you are", "Press Start, then just talk. Talk over the assistant any time: it stops at once and remembers only what you heard."],
  starting: ["Starting…", "Allow the microphone when your browser asks."],
  listening: ["Listening…", "Say something, or type below."],
  thinking: ["Thinking…", "Talk to interrupt, or press Stop."],
  speaking: ["Speaking", "Talk over it to interrupt — it stops the moment you speak."],
  paused: ["You're talking — paused", "Keep going to interrupt; stay quiet and it carries on."],
};

// ------------------------------------------------------------------ identity and connection

const user = browserUser(); // the same person as on the chat page
const params = new URLSearchParams(location.search);
// Optional: ?history=keep-generated, ?voice-options={"speaking":{"min_speech_ms":500}} (barge-in
// settings, docs/voice.md), ?raw-mic=1 (no echo cancellation, noise suppression or gain control).
const startOptions = { history: params.get("history"), options: parseJson(params.get("voice-options")) };
const micConstraints = params.get("raw-mic") === "1"
  ? { echoCancellation: false, noiseSuppression: false, autoGainControl: false } : {};

function parseJson(text) {
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    console.warn("turnline voice: ignoring voice-options that are not JSON");
    return null;
  }
}

const ui = { tokenProblem: null, wasReconnecting: false, bannerTimer: null };

const link = new VoiceLink();
const conn = connect({ url: "v1/ws", WebSocket: link.WebSocket, ...tokenOptions(user, ui) });

const sessionId = sessionFromHash() ?? newId("chat");
if (!sessionFromHash()) history.replaceState(null, "", `#${sessionId}`);
const chat = conn.session(sessionId);
const channel = link.channel(sessionId);

// ------------------------------------------------------------------ the voice state

const voice = {
  ctx: null,
  player: null,
  mic: null,
  live: false, // the user started the conversation
  starting: false,
  muted: storage.get("turnline.voice.muted", false),
  paused: null, // turn id whose speech the server paused (the user is barging in)
  interruptedAt: -Infinity, // performance.now() of the last interruption shown
  capture: { loud: false, quietMs: 1e9, loudMs: 0 }, // raw microphone activity (markers)
  final: new Map(), // turn id → {ms, heardEnd, heardText}: where playback of it stopped for good
  typed: new Map(), // text typed on this page → how many times (the server sees every transcript alike)
  log: [], // what happened, with performance.now() times (tests and benchmarks read it)
};

function note(type, fields = {}) {
  const entry = { type, at: performance.now(), ...fields };
  voice.log.push(entry);
  if (voice.log.length > 5000) voice.log.splice(0, 1000);
  return entry;
}

function turnMessage(turnId) {
  const turn = chat.view.core.turns.get(turnId);
  return turn ? chat.view.message(turn.messageId) : null;
}

channel.on("signal", (s) => {
  note("signal", { state: s.state, turnId: s.turn_id, ms: s.ms });
  if (s.state === "paused") {
    voice.paused = s.turn_id;
  } else if (s.state === "resumed") {
    if (voice.paused === s.turn_id) voice.paused = null;
  } else if (s.state === "interrupted") {
    if (voice.paused === s.turn_id) voice.paused = null;
    voice.interruptedAt = performance.now();
    setTimeout(schedule, 2100);
  }
  schedule();
});
channel.on("audio", (f) => {
  const t = voice.player?.turns.get(f.turnId);
  if (t && t.state === "stopped") note("late-frame", { turnId: f.turnId, seq: f.seq });
});
channel.on("transcript", (t) => {
  voice.caption = t.final ? null : t.text;
  schedule();
});
channel.on("state", (s) => {
  note("channel", { state: s });
  schedule();
});
channel.on("started", (ack) => {
  els.factVad.textContent = `${ack.vad} · ${ack.vad_frame_ms} ms frames`;
  els.factHistory.textContent = ack.history === "keep-heard" ? "what you heard" : "everything generated";
  els.facts.hidden = false;
});
channel.on("reset", () => {
  voice.paused = null;
  schedule();
});
channel.on("error", (err) => toast(err.detail || err.message));

function wirePlayer(player) {
  player.on("playing", ({ turnId }) => { note("playing", { turnId }); schedule(); });
  player.on("drop", (d) => { note("drop", d); schedule(); });
  player.on("idle", schedule);
  player.on("ack", (a) => {
    if (!a.final) return;
    const message = turnMessage(a.turnId);
    const spoken = spokenText(message);
    const heardText = codePointPrefix(spoken, a.heardEnd);
    voice.final.set(a.turnId, { ms: a.ms, heardEnd: a.heardEnd, heardText });
    note("final", { turnId: a.turnId, ms: a.ms, heardEnd: a.heardEnd, lastSeq: a.lastSeq, heardText });
  });
}

// ------------------------------------------------------------------ start, end, mute, stop, say

async function startConversation() {
  if (voice.live || voice.starting) return;
  voice.starting = true;
  render();
  try {
    if (!voice.ctx) {
      voice.ctx = new AudioContext({ latencyHint: "interactive" });
      voice.player = new VoicePlayer(voice.ctx);
      wirePlayer(voice.player);
      voice.mic = new Microphone(voice.ctx, { constraints: micConstraints });
      voice.mic.on("frame", onMicFrame);
      voice.mic.on("ended", () => toast("The microphone stopped."));
    }
    await voice.ctx.resume();
    voice.player.attach(channel);
    voice.mic.setMuted(voice.muted);
    await channel.start(startOptions);
    voice.live = true;
    try {
      await voice.mic.start();
    } catch (err) {
      toast(err.name === "NotAllowedError"
        ? "The microphone is blocked: you can still type, and hear the answers."
        : `No microphone: ${err.message}`);
    }
    note("started");
  } catch (err) {
    voice.player?.detach();
    const why = err.code === "conflict" && /no voice pipeline/.test(err.detail)
      ? "This server runs without voice: start it with `turnline serve --voice`."
      : err.code === "conflict" ? "Voice is already on for this conversation in another tab."
        : err.detail || err.message;
    toast(`Could not start: ${why}`);
  } finally {
    voice.starting = false;
    render();
  }
}

async function endConversation() {
  if (!voice.live) return;
  voice.live = false;
  voice.paused = null;
  voice.mic?.stop();
  await channel.stop();
  voice.player?.reset();
  voice.player?.detach();
  note("ended");
  render();
}

function setMuted(muted) {
  voice.muted = muted;
  storage.set("turnline.voice.muted", muted);
  voice.mic?.setMuted(muted);
  note(muted ? "muted" : "unmuted");
  render();
}

async function stopSpeaking() {
  try {
    if (channel.state === "on") {
      const ack = await channel.interrupt({ mode: "response", reason: "user_clicked_stop" });
      note("stop-clicked", { turnId: ack.turn_id });
    } else {
      await chat.cancel();
    }
  } catch (err) {
    toast(`Could not stop: ${err.detail || err.message}`);
  }
}

async function say(text) {
  text = text.trim();
  if (!text) return;
  els.sayInput.value = "";
  els.saySend.disabled = true;
  try {
    voice.typed.set(text, (voice.typed.get(text) ?? 0) + 1);
    if (channel.state === "on") await channel.transcript(text, true);
    else await chat.send(text, { policy: "interrupt" });
  } catch (err) {
    toast(`Not sent: ${err.detail || err.message}`);
    els.sayInput.value = text;
  }
}

/** A microphone frame: to the server (silence while muted), and the raw activity markers. */
function onMicFrame(f) {
  if (voice.live) channel.sendAudio(f.pcm);
  const c = voice.capture;
  const loud = f.onsetMs >= 0;
  if (loud) {
    if (!c.loud && c.quietMs >= 300) {
      // when the first loud sample reached the page (performance.now()) and entered the audio graph (context time)
      note("onset", { muted: f.muted, onset: f.at - (20 - f.onsetMs), onsetContext: f.end - (20 - f.onsetMs) / 1000 });
    }
    c.loud = true;
    c.quietMs = 0;
  } else {
    c.quietMs += 20;
    if (c.loud && c.quietMs >= 300) {
      c.loud = false;
      note("offset", { muted: f.muted });
    }
  }
  voice.micLevel = f.muted ? 0 : Math.min(1, f.rms * 6);
}

els.call.addEventListener("click", () => (voice.live ? endConversation() : startConversation()));
els.mute.addEventListener("click", () => setMuted(!voice.muted));
els.stop.addEventListener("click", stopSpeaking);
els.say.addEventListener("submit", (e) => {
  e.preventDefault();
  say(els.sayInput.value);
});
els.sayInput.addEventListener("input", () => { els.saySend.disabled = !els.sayInput.value.trim(); });
els.retry.addEventListener("click", () => conn.retryNow());
els.newConversation.addEventListener("click", async () => {
  await endConversation();
  location.hash = newId("chat");
  location.reload();
});
window.addEventListener("hashchange", () => location.reload());
document.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLInputElement || e.metaKey || e.ctrlKey || e.altKey) return;
  if (e.key === "m" || e.key === "M") setMuted(!voice.muted);
  else if (e.key === "Escape" && !els.stop.disabled) stopSpeaking();
});

// ------------------------------------------------------------------ rendering

let scheduled = false;
function schedule() {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => {
    scheduled = false;
    render();
  });
}

/** What the agent is doing, as the user perceives it. */
function agentState() {
  if (voice.starting || channel.state === "starting") return "starting";
  if (!voice.live) return "off";
  if (voice.paused) return "paused";
  if (voice.player?.queued()) return "speaking";
  if (chat.view.activeTurns().length) return "thinking";
  return "listening";
}

function render() {
  const state = agentState();
  els.app.dataset.state = state;
  els.orb.dataset.state = state;
  const [line, sub] = STATUS[state] ?? STATUS.off;
  els.statusLine.textContent = voice.live && voice.muted && state === "listening" ? "Muted" : line;
  els.statusSub.textContent = voice.live && voice.muted && state === "listening"
    ? "Unmute to talk (M), or type below." : sub;

  const interruptedRecently = performance.now() - voice.interruptedAt < 2000;
  const barge = state === "paused" ? "paused" : interruptedRecently ? "interrupted" : "none";
  els.bargein.dataset.state = barge;
  els.bargein.hidden = barge === "none";
  els.bargeinText.textContent = barge === "paused" ? "Barge-in: speech paused" : "Barge-in: interrupted";

  els.call.dataset.mode = voice.live ? "end" : "start";
  els.call.disabled = voice.starting;
  els.callLabel.textContent = voice.live ? "End" : voice.starting ? "Starting…" : "Start conversation";
  els.mute.setAttribute("aria-pressed", String(voice.muted));
  els.mute.classList.toggle("on", voice.muted);
  els.muteLabel.textContent = voice.muted ? "Unmute" : "Mute";
  els.stop.disabled = !(state === "speaking" || state === "paused" || chat.view.ownActiveTurns(chat.clientId).length
    || (voice.live && chat.view.activeTurns().length));

  renderHeader();
  renderTranscript();
  chat.markRendered();
}

function renderHeader() {
  const view = chat.view;
  const presence = view.presence;
  els.presence.dataset.state = presence;
  els.presence.querySelector(".label").textContent = PRESENCE_LABELS[presence] ?? presence;
  els.presence.classList.toggle("stale", conn.state !== "connected");
  const first = view.messages().find((m) => m.role === "user");
  const title = first ? truncate(messageText(first), 60) : "Voice conversation";
  if (els.title.textContent !== title) {
    els.title.textContent = title;
    document.title = `${title} · turnline voice`;
  }
  renderConnection();
}

function renderConnection() {
  renderBanner(conn, els, ui, {
    recovered: () => (voice.live ? "Back online — voice restarted." : "Back online."),
    reconnecting: (why) => `${why} Reconnecting… the assistant stopped speaking; what you heard is kept.`,
  });
}

function renderTranscript() {
  const view = chat.view;
  const rows = view.messages().filter((m) => m.role !== "system");
  const blocks = rows.map((m) => (m.role === "user" ? userBlock(m) : agentBlock(view, m)));
  if (voice.caption) blocks.push({ key: "caption", kind: "caption", text: voice.caption, sig: voice.caption });
  els.empty.hidden = blocks.length > 0;
  const t = els.transcript;
  const nearBottom = t.scrollHeight - t.scrollTop - t.clientHeight < 120;
  reconcile(els.inner, blocks, patchChanged);
  if (nearBottom) t.scrollTop = t.scrollHeight;
}

function userBlock(m) {
  const spoken = Boolean(m.metadata?.voice?.transcript) && !voice.typed.has(messageText(m));
  const status = chat.view.status(m.id);
  return { key: m.id, kind: "user", sig: `${messageSig(m)}|${status}`, message: m, spoken, status };
}

/** An assistant message with its speech: heard, being spoken, not yet spoken, never spoken. */
function agentBlock(view, m) {
  const turnId = view.turnOf(m.id);
  const status = view.status(m.id);
  const meta = m.metadata?.voice;
  const pt = turnId ? voice.player?.turns.get(turnId) : null;
  let speech;
  if (meta && typeof meta.unspoken === "string") {
    // persisted as heard: the text is what was heard, the rest is kept aside
    speech = { kind: "revised", heardMs: meta.heard_ms, unspoken: meta.unspoken, history: meta.history };
  } else if (pt) {
    const now = voice.player.nowPlaying();
    const playing = now && now.turnId === turnId ? now : null;
    speech = { kind: pt.state === "playing" ? "live" : pt.state, heardEnd: pt.heardEnd,
      spanStart: playing ? playing.spanStart : -1, spanEnd: playing ? playing.spanEnd : -1, playedMs: pt.playedMs };
  } else {
    speech = { kind: "text" };
  }
  const sig = `${messageSig(m)}|${status}|${JSON.stringify(speech)}`;
  return { key: m.id, kind: "agent", sig, message: m, status, speech, turnId };
}

/** Re-renders a row only when its signature changed (updateSpokenWords patches the words in between). */
function patchChanged(el, b) {
  if (el._sig === b.sig) return;
  el._sig = b.sig;
  patch(el, b);
}

function patch(el, b) {
  if (b.kind === "caption") {
    el.className = "vrow user caption";
    el.innerHTML = `<div class="vbubble">${escapeHtml(b.text)}<span class="dots">…</span></div>`;
    return;
  }
  const m = b.message;
  el.dataset.testid = "voice-message";
  el.dataset.id = m.id;
  el.dataset.role = m.role;
  if (b.kind === "user") {
    el.className = `vrow user${b.status === "sending" ? " sending" : ""}`;
    el.innerHTML = `<div class="vbubble">${escapeHtml(messageText(m))}</div>
      <div class="vmeta">${b.spoken ? `${ICON.mic} said` : `${ICON.keyboard} typed`}</div>`;
    return;
  }
  el.className = `vrow agent${b.status === "streaming" || b.status === "thinking" ? " live" : ""}`;
  el.dataset.status = b.status;
  el.dataset.speech = b.speech.kind;
  el.dataset.turn = b.turnId ?? "";
  const chips = [];
  const s = b.speech;
  if (s.kind === "revised" && s.unspoken) {
    chips.push(`<span class="chip warn" data-testid="interrupted-chip">Interrupted · you heard ${fmtSeconds(s.heardMs)}</span>`);
  } else if (s.kind === "stopped" || s.kind === "paused") {
    chips.push(`<span class="chip ${s.kind === "paused" ? "muted" : "warn"}">${s.kind === "paused" ? "Paused" : "Interrupted"}</span>`);
  } else if (b.status === "cancelled") {
    chips.push(`<span class="chip warn">Stopped</span>`);
  }
  if (b.status === "error") chips.push(`<span class="chip danger">Error</span>`);
  const thinking = b.status === "thinking" && !m.parts.some((p) => p.type === "text" && p.text);
  el.innerHTML = `<div class="avatar" aria-hidden="true"></div>
    <div class="vcontent"><div class="vtext" data-testid="agent-text">${thinking
      ? `<div class="typing" aria-label="Thinking"><i></i><i></i><i></i></div>` : speechHtml(m, s)}</div>
    ${toolsHtml(m)}<div class="vmeta">${chips.join("")}</div></div>`;
}

/** The message's text parts, each split where the speech reached. Offsets are code points of the spoken text. */
function speechHtml(m, s) {
  const texts = m.parts.filter((p) => p.type === "text").map((p) => p.text ?? "");
  if (s.kind === "revised") {
    const heard = `<span class="heard" data-testid="heard-text">${escapeHtml(texts.join("\n"))}</span>`;
    if (!s.unspoken) return heard;
    const rest = `<span class="unspoken" data-testid="unspoken-text" title="Never spoken: you interrupted">${
      escapeHtml(s.unspoken)}</span>`;
    if (s.unspoken.length <= 160) return heard + rest;
    const words = s.unspoken.trim().split(/\s+/).length;
    return `${heard}<span class="cut" aria-hidden="true">…</span><details class="unspoken-more">
      <summary>Not spoken · ${words} words</summary>${rest}</details>`;
  }
  if (s.kind === "text") return `<span class="plain">${escapeHtml(texts.join("\n"))}</span>`;
  const { heard, speaking, rest } = speechSplit(m, s);
  return `<span class="heard">${escapeHtml(heard)}</span><span class="speaking">${escapeHtml(speaking)}</span>`
    + `<span class="${s.kind === "stopped" ? "unspoken" : "ahead"}">${escapeHtml(rest)}</span>`;
}

/** A message being spoken, cut into heard / the words being spoken / the rest. */
function speechSplit(m, s) {
  const spoken = spokenText(m);
  const heard = codePointPrefix(spoken, s.heardEnd);
  let rest = spoken.slice(heard.length);
  let speaking = "";
  if (s.spanEnd > s.heardEnd) {
    speaking = codePointPrefix(spoken, s.spanEnd).slice(heard.length);
    rest = rest.slice(speaking.length);
  }
  return { heard, speaking, rest };
}

/** Light up the words as they are heard: only the three spans of the row being spoken change. */
function updateSpokenWords() {
  voice.player.tick();
  for (const el of els.inner.children) {
    if (el.dataset.speech !== "live") continue;
    const b = agentBlock(chat.view, chat.view.message(el.dataset.id));
    if (b.sig === el._sig) continue;
    if (b.speech.kind !== "live" || !el.querySelector(".speaking")) {
      el._sig = b.sig;
      patch(el, b);
      continue;
    }
    const split = speechSplit(b.message, b.speech);
    el.querySelector(".heard").textContent = split.heard;
    el.querySelector(".speaking").textContent = split.speaking;
    el.querySelector(".ahead").textContent = split.rest;
    el._sig = b.sig;
  }
}

function toolsHtml(m) {
  const tools = m.parts.filter((p) => p.type.startsWith("tool-") || p.type === "dynamic-tool");
  if (!tools.length) return "";
  const label = { "input-streaming": "preparing", "input-available": "running", "output-available": "done",
    "output-error": "stopped" };
  return `<div class="vtools">${tools.map((p) => {
    const name = p.type === "dynamic-tool" ? p.toolName : p.type.slice(5);
    return `<span class="vtool" data-state="${escapeHtml(p.state)}">${ICON.tool}${escapeHtml(name)} · ${
      escapeHtml(label[p.state] ?? p.state)}</span>`;
  }).join("")}</div>`;
}

function fmtSeconds(ms) {
  return ms >= 10_000 ? `${Math.round(ms / 1000)} s` : `${(ms / 1000).toFixed(1)} s`;
}

function toast(text) {
  showToast(els.toast, text, 5000);
}

const ICON = {
  mic: `<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="9" y="3" width="6" height="11" rx="3"/><path d="M5 11a7 7 0 0 0 14 0M12 18v3"/></svg>`,
  keyboard: `<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="3" y="6" width="18" height="12" rx="2"/><path d="M7 10h.01M11 10h.01M15 10h.01M7 14h10"/></svg>`,
  tool: `<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M14.7 6.3a4 4 0 0 0-5.4 5.2L4 16.8 7.2 20l5.3-5.3a4 4 0 0 0 5.2-5.4l-2.5 2.5-2.5-.7-.7-2.5z"/></svg>`,
};

// ------------------------------------------------------------------ the animation loop (levels, words)

// Kept light: the main thread is also where a barge-in's stop lands.
let lastLevels = 0;
let lastWords = 0;
function animate(now) {
  if (voice.live) {
    if (now - lastLevels >= 33) {
      lastLevels = now;
      const out = voice.player ? voice.player.level() : 0;
      els.orb.style.setProperty("--level", out.toFixed(2));
      els.micLevel.style.setProperty("--level", (voice.micLevel ?? 0).toFixed(2));
    }
    if (voice.player?.queued() && now - lastWords >= 80) {
      lastWords = now;
      updateSpokenWords();
    }
    if (els.orb.dataset.state !== agentState()) render();
  }
  requestAnimationFrame(animate);
}

// ------------------------------------------------------------------ start

chat.on("change", schedule);
chat.on("state", schedule);
chat.on("event", (ev) => {
  if (ev.type === "speech-interrupted") {
    note("speech-interrupted", { turnId: ev.turn_id, reason: ev.reason, mode: ev.mode, playedMs: ev.played_ms });
    els.factBargein.textContent = `${ev.reason.replace(/_/g, " ")} · after ${fmtSeconds(ev.played_ms)}`;
  }
});
conn.on("state", () => { render(); });

els.sessionId.textContent = sessionId;
els.openChat.href = `/#${sessionId}`;
render();
requestAnimationFrame(animate);

// For the console, the browser tests and the benchmarks.
window.voicePage = {
  conn, chat, link, channel, voice, user, sessionId,
  start: startConversation, end: endConversation, setMuted, stop: stopSpeaking, say,
  /** The first time a turn's audio reached the speakers. */
  playing(turnId = null) {
    return voice.log.find((e) => e.type === "playing" && (turnId === null || e.turnId === turnId)) ?? null;
  },
  events(type) {
    return voice.log.filter((e) => e.type === type);
  },
};
