// turnline.js — the turnline browser client.
//
// One ES module, no build step, no dependencies. It speaks the turnline wire
// protocol (docs/protocol.md) over one WebSocket and keeps, per session, a
// View: the conversation tree folded from the session's log, exactly as the
// server and the Python client (turnline.client) fold it.
//
//   import { connect } from "/turnline.js";
//   const conn = connect({ url: "/v1/ws", getToken: fetchToken });
//   const chat = conn.session("s-123");          // subscribes, resumes after drops
//   chat.on("change", () => render(chat.view));  // any UI framework
//   await chat.send("Hello");                    // shown at once (optimistic)
//   await chat.cancel();                         // saved = what was shown
//
// Guarantees (the same as the Python client's):
// - events are applied in seq order, with no gap and no duplicate, across any
//   number of reconnects (exponential backoff with jitter, resume from last_seq);
// - requests in flight when the connection drops are sent again once the view
//   has caught up; a send the server had already applied is not applied twice;
// - cancel() carries `seen`, the highest seq this page has rendered, and the
//   stopped turns are displayed frozen at it from that moment: the screen never
//   shows more than what the server persists.

export const PROTOCOL_VERSION = 1;
export const CANCELLED_TOOL_TEXT = "cancelled";

const ID_RE = /^[A-Za-z0-9._:-]{1,128}$/;
const POLICIES = ["concurrent", "queue", "interrupt", "reject", "rollback"];

/**
 * @typedef {{type: string, [key: string]: any}} Part  An AI SDK UIMessage part.
 * @typedef {{id: string, role: "user"|"assistant"|"system", parts: Part[], parent_id: string|null,
 *            metadata?: Record<string, any>}} Message  A message as on the wire.
 * @typedef {{seq: number, ts: number, type: string, client_id: string, [key: string]: any}} TurnlineEvent
 * @typedef {"connecting"|"connected"|"reconnecting"|"closed"} ConnectionState
 * @typedef {"concurrent"|"queue"|"interrupt"|"reject"|"rollback"} Policy
 * @typedef {{turnId: string, owner: string, inputId: string, messageId: string,
 *            state: "thinking"|"streaming"|"stopping"}} ActiveTurn
 * @typedef {{turnId: string|null, messageId: string, owner: string, messages: Message[], pending: boolean}} QueuedItem
 */

/** An `error` frame from the server (`code` is a stable protocol error code),
 * or a local failure with code `closed`. */
export class TurnlineError extends Error {
  /** @param {string} code @param {string} [message] */
  constructor(code, message = "") {
    super(message ? `${code}: ${message}` : code);
    this.name = "TurnlineError";
    this.code = code;
    this.detail = message;
  }
}

/** The log breaks an invariant (a gap, a turn ended twice…). */
export class InvariantError extends Error {}

/** An event arrived past lastSeq + 1: resubscribe from lastSeq. */
export class GapError extends InvariantError {
  constructor(lastSeq, seq) {
    super(`gap: got seq ${seq} after ${lastSeq}`);
    this.lastSeq = lastSeq;
    this.seq = seq;
  }
}

export function isValidId(value) {
  return typeof value === "string" && ID_RE.test(value);
}

/** A fresh id for a message the client creates (`prefix-` + 64 random bits). */
export function newId(prefix = "msg") {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return `${prefix}-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/** The concatenated text parts of a message ("" for none). */
export function messageText(message) {
  if (!message) return "";
  return message.parts.filter((p) => p.type === "text").map((p) => p.text ?? "").join("");
}

// ------------------------------------------------------------------ events

/** A tiny event emitter; `on` returns the function that removes the listener. */
export class Emitter {
  #listeners = new Map();

  /** @param {string} type @param {(arg: any) => void} fn @returns {() => void} */
  on(type, fn) {
    let set = this.#listeners.get(type);
    if (!set) this.#listeners.set(type, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  off(type, fn) {
    this.#listeners.get(type)?.delete(fn);
  }

  emit(type, arg) {
    const set = this.#listeners.get(type);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(arg);
      } catch (err) {
        // a broken listener must not break the client
        (globalThis.reportError ?? console.error)(err);
      }
    }
  }
}

// ------------------------------------------------------------------ Python semantics
// The fold must give the same result as turnline.core.fold on any input, so a
// few Python rules are spelled out: dict.get, truthiness, ==, str().

const hasOwn = (o, k) => Object.prototype.hasOwnProperty.call(o, k);
// As the AI SDK does: a later chunk's metadata replaces the start's.
const takeProviderMetadata = (part, c) => {
  if (hasOwn(c, "providerMetadata")) part.providerMetadata = c.providerMetadata;
};
const get = (o, k) => (hasOwn(o, k) ? o[k] : null);
const isStr = (v) => typeof v === "string";
const isDict = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

function truthy(v) {
  if (v === null || v === undefined || v === false) return false;
  if (typeof v === "number") return v !== 0;
  if (typeof v === "string" || Array.isArray(v)) return v.length > 0;
  if (typeof v === "object") return Object.keys(v).length > 0;
  return Boolean(v);
}

function pyEq(a, b) {
  const num = (v) => typeof v === "number" || typeof v === "boolean";
  if (num(a) && num(b)) return Number(a) === Number(b);
  if (Array.isArray(a) || Array.isArray(b)) {
    return Array.isArray(a) && Array.isArray(b) && a.length === b.length && a.every((x, i) => pyEq(x, b[i]));
  }
  if (isDict(a) && isDict(b)) {
    const ka = Object.keys(a);
    return ka.length === Object.keys(b).length && ka.every((k) => hasOwn(b, k) && pyEq(a[k], b[k]));
  }
  return a === b;
}

const NON_PRINTABLE = /[\p{C}\p{Z}]/u;

function reprString(s) {
  const quote = s.includes("'") && !s.includes('"') ? '"' : "'";
  let out = quote;
  for (const ch of s) {
    if (ch === "\\") out += "\\\\";
    else if (ch === quote) out += "\\" + ch;
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (ch !== " " && NON_PRINTABLE.test(ch)) {
      const cp = ch.codePointAt(0);
      out += cp < 0x100 ? `\\x${cp.toString(16).padStart(2, "0")}`
        : cp < 0x10000 ? `\\u${cp.toString(16).padStart(4, "0")}` : `\\U${cp.toString(16).padStart(8, "0")}`;
    } else out += ch;
  }
  return out + quote;
}

function pyRepr(v) {
  if (v === null || v === undefined) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v === "number") return String(v); // floats print as repr() only for ints and short ones
  if (typeof v === "string") return reprString(v);
  if (Array.isArray(v)) return `[${v.map(pyRepr).join(", ")}]`;
  return `{${Object.keys(v).map((k) => `${reprString(k)}: ${pyRepr(v[k])}`).join(", ")}}`;
}

/** Python's str(): strings as they are, anything else as its repr. */
const pyStr = (v) => (isStr(v) ? v : pyRepr(v));

// ------------------------------------------------------------------ folding chunks

/**
 * Accumulates one assistant message from its AI SDK UI message stream chunks,
 * with the rules of turnline.core.fold (and the AI SDK's processUIMessageStream):
 * a delta needs its start; finish-step closes open text and reasoning; a data
 * part with the id of an earlier one of its type replaces it; transient data is
 * not kept; tool parts go input-streaming → input-available → output-available
 * or output-error.
 */
export class MessageFold {
  /** @param {string|null} [messageId] */
  constructor(messageId = null) {
    this.messageId = messageId;
    /** @type {Part[]} */
    this.parts = [];
    /** @type {Record<string, any>} */
    this.metadata = {};
    this._text = new Map();
    this._reasoning = new Map();
    this._tools = new Map();
    this._toolText = new Map();
    /** chunks that broke a rule (orphan deltas, unknown types) */
    this.ignored = 0;
  }

  /** @param {any} chunk */
  add(chunk) {
    const kind = isDict(chunk) ? get(chunk, "type") : null;
    const handler = isStr(kind) ? HANDLERS.get(kind) : undefined;
    if (handler) handler(this, chunk);
    else if (isStr(kind) && kind.startsWith("data-")) this._data(chunk);
    else this.ignored += 1;
  }

  _start(c) {
    if (isStr(get(c, "messageId"))) this.messageId = c.messageId;
    this._mergeMetadata(get(c, "messageMetadata"));
  }

  _mergeMetadata(meta) {
    if (isDict(meta)) this.metadata = { ...this.metadata, ...meta };
  }

  _open(table, kind, c) {
    const part = { type: kind, text: "", state: "streaming" };
    if (hasOwn(c, "providerMetadata")) part.providerMetadata = c.providerMetadata;
    table.set(pyStr(get(c, "id")), part);
    this.parts.push(part);
  }

  _delta(table, c) {
    const part = table.get(pyStr(get(c, "id")));
    const delta = get(c, "delta");
    if (!part || !isStr(delta)) {
      this.ignored += 1;
      return;
    }
    part.text += delta;
    takeProviderMetadata(part, c);
  }

  _close(table, c) {
    const key = pyStr(get(c, "id"));
    const part = table.get(key);
    if (!part) {
      this.ignored += 1;
      return;
    }
    table.delete(key);
    part.state = "done";
    takeProviderMetadata(part, c);
  }

  _finishStep() {
    // every streaming part: a second *-start with an open id leaves the first out of its table
    for (const part of this.parts) if (get(part, "state") === "streaming") part.state = "done";
    this._text.clear();
    this._reasoning.clear();
  }

  _toolPart(c) {
    const callId = get(c, "toolCallId");
    if (!isStr(callId)) {
      this.ignored += 1;
      return null;
    }
    let part = this._tools.get(callId);
    if (!part) {
      const name = get(c, "toolName");
      if (!isStr(name)) {
        this.ignored += 1;
        return null;
      }
      part = { type: `tool-${name}`, toolCallId: callId, state: "input-streaming", input: null };
      if (truthy(get(c, "dynamic"))) {
        part = { type: "dynamic-tool", toolName: name, toolCallId: callId, state: "input-streaming", input: null };
      }
      if (truthy(get(c, "providerExecuted"))) part.providerExecuted = true;
      this._tools.set(callId, part);
      this.parts.push(part);
    }
    return part;
  }

  _toolInputStart(c) {
    if (this._toolPart(c)) this._toolText.set(c.toolCallId, "");
  }

  _toolInputDelta(c) {
    const callId = get(c, "toolCallId");
    const part = isStr(callId) ? this._tools.get(callId) : undefined;
    const delta = get(c, "inputTextDelta");
    if (!part || !this._toolText.has(callId) || !isStr(delta)) {
      this.ignored += 1;
      return;
    }
    const text = this._toolText.get(callId) + delta;
    this._toolText.set(callId, text);
    part.input = parsePartialJson(text);
  }

  _toolInputAvailable(c) {
    const part = this._toolPart(c);
    if (part) {
      part.state = "input-available";
      part.input = get(c, "input");
      this._toolText.delete(c.toolCallId);
    }
  }

  _toolInputError(c) {
    const part = this._toolPart(c);
    if (part) {
      part.state = "output-error";
      part.input = get(c, "input");
      part.errorText = hasOwn(c, "errorText") ? pyStr(c.errorText) : "";
    }
  }

  _calledTool(c) {
    const callId = get(c, "toolCallId");
    return isStr(callId) ? this._tools.get(callId) : undefined;
  }

  _toolOutput(c) {
    const part = this._calledTool(c);
    if (!part) {
      this.ignored += 1;
      return;
    }
    part.state = "output-available";
    part.output = get(c, "output");
    if (truthy(get(c, "preliminary"))) part.preliminary = true;
    else delete part.preliminary;
  }

  _toolOutputError(c) {
    const part = this._calledTool(c);
    if (!part) {
      this.ignored += 1;
      return;
    }
    part.state = "output-error";
    part.errorText = hasOwn(c, "errorText") ? pyStr(c.errorText) : "";
  }

  _copyPart(c, keys) {
    const part = { type: c.type };
    for (const k of keys) if (hasOwn(c, k)) part[k] = c[k];
    this.parts.push(part);
  }

  _data(c) {
    if (truthy(get(c, "transient"))) return;
    let part = { type: c.type, data: get(c, "data") };
    if (hasOwn(c, "id")) {
      part = { type: c.type, id: c.id, data: get(c, "data") };
      for (let i = 0; i < this.parts.length; i++) {
        const existing = this.parts[i];
        if (get(existing, "type") === c.type && pyEq(get(existing, "id"), c.id)) {
          this.parts[i] = part;
          return;
        }
      }
    }
    this.parts.push(part);
  }

  /** Close what a cancel cut: text/reasoning become done; a tool call without
   * a result becomes output-error so the next model input is valid. */
  closeOpenParts(toolErrorText = CANCELLED_TOOL_TEXT) {
    this._finishStep();
    for (const part of this._tools.values()) {
      if (part.state === "input-streaming" || part.state === "input-available") {
        part.state = "output-error";
        part.errorText = toolErrorText;
      }
    }
    this._toolText.clear();
  }

  /** @returns {string[]} */
  openToolCalls() {
    return [...this._tools].filter(([, p]) => p.state === "input-streaming" || p.state === "input-available")
      .map(([id]) => id);
  }

  /** @returns {[Part[], Record<string, any>]} copies */
  snapshot() {
    return [this.parts.map((p) => ({ ...p })), { ...this.metadata }];
  }
}

const HANDLERS = new Map([
  ["start", (f, c) => f._start(c)],
  ["start-step", (f) => f.parts.push({ type: "step-start" })],
  ["finish-step", (f) => f._finishStep()],
  ["text-start", (f, c) => f._open(f._text, "text", c)],
  ["text-delta", (f, c) => f._delta(f._text, c)],
  ["text-end", (f, c) => f._close(f._text, c)],
  ["reasoning-start", (f, c) => f._open(f._reasoning, "reasoning", c)],
  ["reasoning-delta", (f, c) => f._delta(f._reasoning, c)],
  ["reasoning-end", (f, c) => f._close(f._reasoning, c)],
  ["tool-input-start", (f, c) => f._toolInputStart(c)],
  ["tool-input-delta", (f, c) => f._toolInputDelta(c)],
  ["tool-input-available", (f, c) => f._toolInputAvailable(c)],
  ["tool-input-error", (f, c) => f._toolInputError(c)],
  ["tool-output-available", (f, c) => f._toolOutput(c)],
  ["tool-output-error", (f, c) => f._toolOutputError(c)],
  ["source-url", (f, c) => f._copyPart(c, ["sourceId", "url", "title", "providerMetadata"])],
  ["source-document", (f, c) => f._copyPart(c, ["sourceId", "mediaType", "title", "filename", "providerMetadata"])],
  ["file", (f, c) => f._copyPart(c, ["url", "mediaType", "providerMetadata"])],
  ["steering-message", (f, c) => f._copyPart(c, ["id", "parts"])],
  ["message-metadata", (f, c) => f._mergeMetadata(get(c, "messageMetadata"))],
  ["finish", (f, c) => f._mergeMetadata(get(c, "messageMetadata"))],
  // stream-level signals, not parts: the turn-end event carries their meaning
  ["error", () => {}],
  ["abort", () => {}],
]);

/** Fold a list of chunks. @param {any[]} chunks @param {string|null} [messageId] */
export function fold(chunks, messageId = null) {
  const f = new MessageFold(messageId);
  for (const c of chunks) f.add(c);
  return f;
}

function tryParse(text) {
  try {
    return { ok: true, value: JSON.parse(text) };
  } catch {
    return { ok: false };
  }
}

const rstripChars = (s, chars) => {
  let end = s.length;
  while (end > 0 && chars.includes(s[end - 1])) end -= 1;
  return s.slice(0, end);
};

/**
 * Best-effort parse of a JSON prefix (a streaming tool input), like the AI
 * SDK's parsePartialJson: close the open string, arrays and objects, drop what
 * cannot be closed. Never throws; returns null when nothing can be made of it.
 * @param {string} text
 */
export function parsePartialJson(text) {
  const whole = tryParse(text);
  if (whole.ok) return whole.value;
  const stack = [];
  const cuts = [];
  let inString = false;
  let safe = 0;
  let i = 0;
  const n = text.length;
  while (i < n) {
    const ch = text[i];
    if (inString) {
      if (ch === "\\") {
        const step = escapeLength(text, i);
        if (step === 0) break;
        i += step;
      } else {
        inString = ch !== '"';
        i += 1;
      }
      safe = i;
      continue;
    }
    if (ch === '"') {
      inString = true;
      safe = i + 1;
    } else if (ch === "{" || ch === "[") {
      stack.push(ch === "{" ? "}" : "]");
      cuts.push([i + 1, [...stack].reverse().join("")]);
    } else if (ch === "}" || ch === "]") {
      stack.pop();
      cuts.push([i + 1, [...stack].reverse().join("")]);
    } else if (ch === ",") {
      cuts.push([i, [...stack].reverse().join("")]);
    }
    i += 1;
  }
  const closers = [...stack].reverse().join("");
  let candidates;
  if (inString) {
    candidates = [text.slice(0, safe) + '"' + closers];
  } else {
    const body = text.replace(/\s+$/u, "");
    candidates = [body + closers, rstripChars(body, ",:") + closers, rstripChars(body, "+-.eE") + closers];
  }
  for (const [end, closing] of cuts.slice(-4).reverse()) candidates.push(text.slice(0, end) + closing);
  for (const candidate of candidates) {
    const r = tryParse(candidate);
    if (r.ok) return r.value;
  }
  return null;
}

function escapeLength(text, i) {
  if (i + 1 >= text.length) return 0;
  if (text[i + 1] !== "u") return 2;
  const digits = text.slice(i + 2, i + 6);
  if (digits.length < 4) return 0;
  if ("dD".includes(digits[0]) && "89abAB".includes(digits[1])) {
    // a high surrogate is whole only with its low half
    const low = text.slice(i + 6, i + 8);
    if (low === "" || low === "\\" || (low === "\\u" && text.length < i + 12)) return 0;
    return low === "\\u" ? 12 : 6;
  }
  return 6;
}

// ------------------------------------------------------------------ the session log, folded
// A port of turnline.core.session: the state derived from a session's log.

/** Is `ev` the next event after `lastSeq`? A `compacted` event stands for the
 * run first..seq that retention removed (chunks of turns long ended, whose
 * turn-end holds the message), so it continues the log too. */
function continues(ev, lastSeq) {
  if (ev.type === "compacted") return ev.first === lastSeq + 1 && ev.seq >= ev.first;
  return ev.seq === lastSeq + 1;
}

class SessionState {
  constructor(sessionId, { toolCancelText = CANCELLED_TOOL_TEXT, keepEndedTurns = 64 } = {}) {
    this.sessionId = sessionId;
    this.lastSeq = 0;
    /** @type {Map<string, Message>} */
    this.messages = new Map();
    this.messageSeq = new Map();
    /** @type {Map<string|null, string[]>} */
    this.children = new Map();
    this.turns = new Map();
    this.active = new Map();
    this.turnOfMessage = new Map();
    this.head = null;
    this.queue = [];
    this.hidden = new Set();
    this.presence = null;
    this._cancelRequests = new Map();
    this._endedOrder = [];
    this._keepEnded = keepEndedTurns;
    this.toolCancelText = toolCancelText;
  }

  apply(ev) {
    if (!continues(ev, this.lastSeq)) throw new InvariantError(`seq ${ev.seq} after ${this.lastSeq}`);
    const handler = APPLY.get(ev.type);
    if (handler) handler(this, ev);
    this.lastSeq = ev.seq;
  }

  _addMessage(msg) {
    if (!this.messages.has(msg.id)) {
      const key = msg.parent_id ?? null;
      if (!this.children.has(key)) this.children.set(key, []);
      this.children.get(key).push(msg.id);
    }
    this.messages.set(msg.id, msg);
  }

  _onMessage(ev) {
    if (this.messages.has(ev.message.id)) throw new InvariantError(`message ${ev.message.id} appended twice`);
    this._addMessage(ev.message);
    this.messageSeq.set(ev.message.id, ev.seq);
  }

  _onTurnStart(ev) {
    if (this.turns.has(ev.turn_id)) throw new InvariantError(`turn ${ev.turn_id} started twice`);
    const turn = {
      turnId: ev.turn_id, owner: ev.owner, inputId: ev.input_id, messageId: ev.message_id, startSeq: ev.seq,
      inputSeq: this.messageSeq.get(ev.input_id) ?? ev.seq, chunks: [], fold: null, cancel: null,
      endSeq: null, reason: null, revised: false,
    };
    this.turns.set(ev.turn_id, turn);
    this.active.set(ev.turn_id, turn);
    this.turnOfMessage.set(ev.message_id, ev.turn_id);
    this.queue = this.queue.filter((q) => q.turnId !== ev.turn_id);
  }

  _onChunk(ev) {
    const turn = this.active.get(ev.turn_id);
    if (!turn) throw new InvariantError(`chunk for turn ${ev.turn_id}, which is not active`);
    turn.chunks.push(ev);
    (turn.fold ??= new MessageFold(turn.messageId)).add(ev.chunk);
  }

  _onTurnEnd(ev) {
    const turn = this.active.get(ev.turn_id);
    if (!turn) throw new InvariantError(`turn-end for turn ${ev.turn_id}, which is not active`);
    this.active.delete(ev.turn_id);
    turn.endSeq = ev.seq;
    turn.reason = ev.reason;
    turn.error = ev.error ?? null;
    this._addMessage(ev.message);
    if (!this.hidden.has(ev.message.parent_id)) this.head = ev.message.id;
    else this.hidden.add(ev.message.id);
    this._endedOrder.push(ev.turn_id);
    if (this._endedOrder.length > this._keepEnded) {
      const old = this.turns.get(this._endedOrder.shift());
      if (old) { // keep the record, drop the chunks
        old.chunks = [];
        old.fold = null;
      }
    }
  }

  _onTurnRevised(ev) {
    const turn = this.turns.get(ev.turn_id);
    if (!turn || turn.endSeq === null) throw new InvariantError(`turn-revised for ${ev.turn_id}, which has not ended`);
    turn.reason = ev.reason;
    turn.revised = true;
    this._addMessage(ev.message);
  }

  _onCancel(ev) {
    this._cancelRequests.set(ev.request_id, ev);
    if (this._cancelRequests.size > 256) this._cancelRequests.delete(this._cancelRequests.keys().next().value);
  }

  _onCancelResult(ev) {
    const request = this._cancelRequests.get(ev.request_id);
    this._cancelRequests.delete(ev.request_id);
    for (const turnId of ev.cancelled ?? []) {
      const turn = this.turns.get(turnId);
      if (turn && !turn.cancel) turn.cancel = { requestId: ev.request_id, seen: request?.seen ?? null, seq: ev.seq };
      this.queue = this.queue.filter((q) => q.turnId !== turnId);
    }
    if (ev.rolled_back?.length) {
      for (const id of ev.rolled_back) this.hidden.add(id);
      while (this.head !== null && this.hidden.has(this.head)) {
        this.head = this.messages.get(this.head)?.parent_id ?? null;
      }
    }
  }

  _onQueued(ev) {
    if (ev.turn_id != null) {
      this.queue.push({ messageId: ev.message_id, turnId: ev.turn_id, owner: ev.client_id,
        messages: ev.messages ?? [] });
    }
  }

  _onRejected(ev) {
    this.queue = this.queue.filter((q) => q.messageId !== ev.message_id);
  }

  presenceState() {
    if (!this.active.size) return "idle";
    for (const t of this.active.values()) if (t.chunks.length) return "streaming";
    return "thinking";
  }

  /** The turns a cancel would stop: running ones not yet cancelled, and those
   * that ended after `seen` (the stop raced the end: the server revises them). */
  matchCancel(filter, requester, seen) {
    const matches = (t) => filter.all ? true : filter.turn_id != null ? filter.turn_id === t.turnId
      : filter.client_id != null ? filter.client_id === t.owner : t.owner === requester;
    const out = [];
    for (const t of this.active.values()) if (!t.cancel && matches(t)) out.push(t.turnId);
    if (seen != null) {
      for (const t of this.turns.values()) {
        if (t.endSeq !== null && t.reason === "complete" && !t.revised && t.inputSeq <= seen && seen < t.endSeq
            && matches(t) && t.chunks.some((c) => c.seq > seen && !c.final)) out.push(t.turnId);
      }
    }
    return out;
  }

  /** The assistant message as the server saves it when the turn ends: with a
   * `seen` cursor, the fold of the chunks with seq <= seen (plus final ones),
   * open parts closed, marked interrupted. */
  persistedMessage(turnId, reason, seen = null) {
    const turn = this.turns.get(turnId);
    if (seen === null && turn.cancel && reason === "cancelled") seen = turn.cancel.seen;
    const f = new MessageFold(turn.messageId);
    for (const c of turn.chunks) if (seen === null || c.seq <= seen || c.final) f.add(c.chunk);
    f.closeOpenParts(this.toolCancelText);
    const [parts, metadata] = f.snapshot();
    if (reason === "cancelled") metadata.interrupted = { reason: "cancelled", seen };
    return withMetadata({ id: turn.messageId, role: "assistant", parts, parent_id: turn.inputId }, metadata);
  }
}

function withMetadata(message, metadata) {
  if (Object.keys(metadata).length) message.metadata = metadata;
  return message;
}

const APPLY = new Map([
  ["message", (s, e) => s._onMessage(e)],
  ["turn-start", (s, e) => s._onTurnStart(e)],
  ["chunk", (s, e) => s._onChunk(e)],
  ["turn-end", (s, e) => s._onTurnEnd(e)],
  ["turn-revised", (s, e) => s._onTurnRevised(e)],
  ["cancel", (s, e) => s._onCancel(e)],
  ["cancel-result", (s, e) => s._onCancelResult(e)],
  ["queued", (s, e) => s._onQueued(e)],
  ["rejected", (s, e) => s._onRejected(e)],
  ["presence", (s, e) => { s.presence = e; }],
]);

// ------------------------------------------------------------------ the view

/**
 * What a screen shows of one session: the folded log plus optimistic user
 * messages, live assistant messages, turns frozen by a stop, and branch
 * selection. Events: `change` (after anything that may change the display),
 * `event` (each applied event), `turn-end`.
 */
export class View extends Emitter {
  /** @param {string} sessionId @param {{clientId?: string|null}} [options] */
  constructor(sessionId = "", { clientId = null } = {}) {
    super();
    this.sessionId = sessionId;
    this.clientId = clientId;
    this.core = new SessionState(sessionId);
    /** incremented on every change; `snapshot()` is cached per version */
    this.version = 0;
    this.duplicates = 0;
    this.gaps = 0;
    /** events the core could not place (a view started mid-log, or a broken log) */
    this.anomalies = [];
    this._optimistic = new Map(); // id → {message, queued, group}
    this._order = new Map();
    this._counter = 0;
    this._selected = null;
    this._freezes = new Map(); // turnId → {seen, request, acked, confirmed}
    this._frozenCache = new Map();
    this._turnEnds = new Map();
    this._overlap = new Set(); // user messages that were answered concurrently with a sibling
    this._rejected = new Map(); // message id → {code, seq} of rejected events
    this._cache = null;
  }

  /** The highest seq applied. */
  get lastSeq() {
    return this.core.lastSeq;
  }

  /** Begin at `seq` instead of 0 (a live-only or resumed subscription). */
  startAt(seq) {
    if (this.core.lastSeq !== 0 || this.core.messages.size || this.core.turns.size) {
      throw new Error("startAt only applies to an empty view");
    }
    this.core.lastSeq = seq;
  }

  /** Apply one event. Returns false for a duplicate (ignored); throws
   * GapError (view unchanged) when events are missing. */
  apply(ev) {
    const last = this.core.lastSeq;
    if (ev.seq <= last) {
      this.duplicates += 1;
      return false;
    }
    if (!continues(ev, last)) {
      this.gaps += 1;
      throw new GapError(last, ev.seq);
    }
    try {
      this.core.apply(ev);
    } catch (err) {
      // The log is the truth; an event this view cannot place is recorded and passed.
      this.anomalies.push(`seq ${ev.seq}: ${err.message}`);
      this.core.lastSeq = ev.seq;
    }
    this._after(ev);
    return true;
  }

  _after(ev) {
    if (ev.type === "message") {
      this._optimistic.delete(ev.message.id); // the server's copy replaces ours, in place
      this._seenId(ev.message.id);
    } else if (ev.type === "turn-start") {
      this._seenId(ev.message_id);
      this._noteOverlap(ev.input_id);
    } else if (ev.type === "rejected") {
      this._rejected.set(ev.message_id, { code: ev.code, seq: ev.seq });
      if (this._rejected.size > 1024) this._rejected.delete(this._rejected.keys().next().value);
      this.dropOptimistic(this._groupOf(ev.message_id));
    } else if (ev.type === "turn-end") {
      this._seenId(ev.message.id);
      this._turnEnds.set(ev.turn_id, ev);
      if (this._turnEnds.size > 1024) this._turnEnds.delete(this._turnEnds.keys().next().value);
      const fr = this._freezes.get(ev.turn_id);
      if (fr && (ev.reason === "cancelled" || (fr.acked && !fr.confirmed))) this._release(ev.turn_id);
      // else: a stop of ours raced the end of the turn; hold the frozen display
      // until the server's answer (a turn-revised follows)
    } else if (ev.type === "turn-revised") {
      this._release(ev.turn_id);
    }
    this._touch();
    this.emit("event", ev);
    if (ev.type === "turn-end") this.emit("turn-end", ev);
  }

  _noteOverlap(inputId) {
    const parentOf = (id) => this.core.messages.get(id)?.parent_id ?? this._optimistic.get(id)?.message.parent_id;
    const parent = parentOf(inputId);
    for (const t of this.core.active.values()) {
      if (t.inputId !== inputId && parentOf(t.inputId) === parent) {
        this._overlap.add(t.inputId);
        this._overlap.add(inputId);
      }
    }
  }

  _touch() {
    this.version += 1;
    this._cache = null;
    this.emit("change", this);
  }

  _seenId(id) {
    if (!this._order.has(id)) this._order.set(id, this._counter++);
  }

  _rank(id) {
    this._seenId(id);
    return this._order.get(id);
  }

  // -------------------------------------------------------------- optimistic messages

  /** Show a user message at once under its client-made id, until the server's
   * `message` event replaces it. `queued`: shown among the queued items, not in the tree. */
  addOptimistic(message, { queued = false, group = [message.id] } = {}) {
    if (this.core.messages.has(message.id)) return;
    this._optimistic.set(message.id, { message: { parent_id: null, ...message }, queued, group });
    this._seenId(message.id);
    this._touch();
  }

  /** Withdraw optimistic messages the server did not take. */
  dropOptimistic(ids) {
    let changed = false;
    for (const id of ids) changed = this._optimistic.delete(id) || changed;
    if (changed) this._touch();
  }

  /** The code a `rejected` event after `since` gave message `id`, or null. */
  rejectedCode(id, since = 0) {
    const r = this._rejected.get(id);
    return r && r.seq > since ? r.code : null;
  }

  _groupOf(id) {
    return this._optimistic.get(id)?.group ?? [id];
  }

  /** Ids of messages shown but not yet confirmed by the server. */
  get optimistic() {
    return [...this._optimistic.keys()];
  }

  isOptimistic(id) {
    return this._optimistic.has(id);
  }

  /** True while any turn runs or messages wait in the queue. */
  get busy() {
    return this.core.active.size > 0 || this.core.queue.length > 0;
  }

  /** Where the server will most likely put a message sent without parent_id. */
  guessParent(policy = null, owner = this.clientId) {
    const own = [...this.core.active.values()].filter((t) => t.owner === owner && !t.cancel);
    if (own.length && policy === "interrupt") return own[own.length - 1].messageId;
    if (own.length && policy === "rollback") {
      const input = this.core.messages.get(own[0].inputId);
      if (input) return input.parent_id;
    }
    return this.core.head;
  }

  // -------------------------------------------------------------- what you saw is what is saved

  /** This client asked to stop `turnIds` having rendered up to `seen`:
   * display them as of `seen` from now on (a turn keeps its first cursor). */
  freeze(turnIds, seen, request = null) {
    for (const id of turnIds) {
      if (!this._freezes.has(id)) this._freezes.set(id, { seen, request, acked: false, confirmed: false });
    }
    this._touch();
  }

  /** The server answered cancel `request`: rejected turns stream on; turns it
   * cancelled stay frozen until their turn-end/turn-revised. */
  cancelAcked(request, { cancelled = [], rejected = [], pending = [], seen = null } = {}) {
    const confirmed = new Set([...cancelled, ...pending]);
    for (const [id, fr] of [...this._freezes]) {
      if (fr.request !== request) continue;
      seen ??= fr.seen;
      fr.acked = true;
      const turn = this.core.turns.get(id);
      if (rejected.includes(id)) this._release(id);
      else if (confirmed.has(id)) {
        fr.confirmed = true;
        if (turn && (turn.revised || (turn.endSeq !== null && turn.reason === "cancelled"))) this._release(id);
      } else if (turn && turn.endSeq !== null) {
        this._release(id); // not ours to stop after all: show what the server says
      }
    }
    if (seen !== null) {
      // turns the server matched that this view had not seen start yet
      for (const id of confirmed) {
        if (this._freezes.has(id)) continue;
        const turn = this.core.turns.get(id);
        if (!turn || turn.endSeq === null || (turn.reason === "complete" && !turn.revised)) {
          this._freezes.set(id, { seen, request, acked: true, confirmed: true });
        }
      }
    }
    this._touch();
  }

  /** Cancel `request` failed: its turns stream on. */
  cancelFailed(request) {
    for (const [id, fr] of [...this._freezes]) if (fr.request === request) this._release(id);
    this._touch();
  }

  /** The seen cursor a turn is displayed at, or null. */
  frozenAt(turnId) {
    return this._freezes.get(turnId)?.seen ?? null;
  }

  _release(turnId) {
    this._freezes.delete(turnId);
    this._frozenCache.delete(turnId);
  }

  /** Turns this client (or another device of the same session) asked to stop
   * with a cursor are shown as the server will save them. */
  _cursorOf(turn) {
    const fr = this._freezes.get(turn.turnId);
    if (fr && (turn.endSeq === null || turn.chunks.length)) return fr.seen;
    if (turn.endSeq === null && turn.cancel && turn.cancel.seen !== null) return turn.cancel.seen;
    return null;
  }

  _frozen(turn, seen) {
    const key = `${seen}:${turn.chunks.length}`;
    const cached = this._frozenCache.get(turn.turnId);
    if (cached && cached.key === key) return cached.message;
    const message = this.core.persistedMessage(turn.turnId, "cancelled", seen);
    this._frozenCache.set(turn.turnId, { key, message });
    return message;
  }

  // -------------------------------------------------------------- display

  /** The message as displayed: optimistic, live, frozen or persisted. @returns {Message|null} */
  message(id) {
    const opt = this._optimistic.get(id);
    if (opt) return opt.message;
    const turnId = this.core.turnOfMessage.get(id);
    const turn = turnId ? this.core.turns.get(turnId) : null;
    if (turn) {
      const seen = this._cursorOf(turn);
      if (seen !== null) return this._frozen(turn, seen);
      if (turn.endSeq === null) return this._live(turn);
    }
    return this.core.messages.get(id) ?? null;
  }

  _live(turn) {
    const [parts, metadata] = turn.fold ? turn.fold.snapshot() : [[], {}];
    return withMetadata({ id: turn.messageId, role: "assistant", parts, parent_id: turn.inputId }, metadata);
  }

  /** The turn id of an assistant message, or null. */
  turnOf(messageId) {
    return this.core.turnOfMessage.get(messageId) ?? null;
  }

  /** The turn-end event of a turn this view saw end. */
  turnEnd(turnId) {
    return this._turnEnds.get(turnId) ?? null;
  }

  /** True for the message of a running turn nobody has stopped. */
  isStreaming(id) {
    const turn = this.core.turns.get(this.core.turnOfMessage.get(id));
    return Boolean(turn && turn.endSeq === null && this._cursorOf(turn) === null);
  }

  /**
   * How a message stands: `sending` / `queued` (optimistic), `thinking`,
   * `streaming`, `stopping` (a running turn), `complete`, `cancelled`, `error`,
   * or `done` (a user or system message).
   */
  status(id) {
    const opt = this._optimistic.get(id);
    if (opt) return opt.queued ? "queued" : "sending";
    const turn = this.core.turns.get(this.core.turnOfMessage.get(id));
    if (!turn) return "done";
    if (turn.endSeq === null) {
      if (this._cursorOf(turn) !== null || turn.cancel) return "stopping";
      return turn.fold && turn.fold.parts.some((p) => p.type !== "step-start") ? "streaming" : "thinking";
    }
    return turn.reason;
  }

  /** The error of a turn that ended with `error`, if any. */
  errorOf(id) {
    const turn = this.core.turns.get(this.core.turnOfMessage.get(id));
    return turn?.error ?? null;
  }

  isHidden(id) {
    return this.core.hidden.has(id);
  }

  _nodes() {
    if (this._cache && this._cache.version === this.version) return this._cache;
    const nodes = new Map();
    for (const id of this.core.messages.keys()) nodes.set(id, this.message(id));
    for (const t of this.core.active.values()) nodes.set(t.messageId, this.message(t.messageId));
    for (const [id, opt] of this._optimistic) if (!opt.queued && !nodes.has(id)) nodes.set(id, opt.message);
    const children = new Map();
    for (const id of [...nodes.keys()].sort((a, b) => this._rank(a) - this._rank(b))) {
      const parent = nodes.get(id).parent_id ?? null;
      if (!children.has(parent)) children.set(parent, []);
      children.get(parent).push(id);
    }
    this._cache = { version: this.version, nodes, children, snapshot: null };
    return this._cache;
  }

  _isLive(id) {
    const opt = this._optimistic.get(id);
    if (opt) return !opt.queued;
    const turn = this.core.turns.get(this.core.turnOfMessage.get(id));
    return Boolean(turn && turn.endSeq === null);
  }

  /** The newest descendant of `id` (through newest children); a rolled-back
   * message leads down its rolled-back branch. */
  leafUnder(id) {
    const { children } = this._nodes();
    const hidden = this.core.hidden;
    const allowHidden = hidden.has(id);
    let node = id;
    for (;;) {
      const kids = (children.get(node) ?? []).filter((c) => allowHidden || !hidden.has(c));
      if (!kids.length) return node;
      node = kids[kids.length - 1];
    }
  }

  /** The leaf of the displayed branch: the selected one, else the newest live
   * message (a running turn, an unconfirmed message), else the head (where the
   * next message goes), else the newest message. */
  leaf() {
    const { nodes } = this._nodes();
    if (this._selected !== null && nodes.has(this._selected)) return this.leafUnder(this._selected);
    const hidden = this.core.hidden;
    let best = null;
    for (const id of nodes.keys()) {
      if (!hidden.has(id) && this._isLive(id) && (best === null || this._rank(id) > this._rank(best))) best = id;
    }
    if (best !== null) return best;
    if (this.core.head !== null && nodes.has(this.core.head)) return this.core.head;
    for (const id of nodes.keys()) if (!hidden.has(id) && (best === null || this._rank(id) > this._rank(best))) best = id;
    return best;
  }

  /** The displayed branch, root first (or the path to `leaf`). @returns {Message[]} */
  messages(leaf = undefined) {
    const { nodes } = this._nodes();
    let node = leaf === undefined ? this.leaf() : leaf;
    const path = [];
    while (node !== null && node !== undefined && nodes.has(node) && path.length <= nodes.size) {
      const msg = nodes.get(node);
      path.push(msg);
      node = msg.parent_id;
    }
    return path.reverse();
  }

  /** Ids of the message and its alternatives (same parent), oldest first.
   * Rolled-back alternatives only with `includeHidden`. */
  siblings(id, { includeHidden = false } = {}) {
    const { nodes, children } = this._nodes();
    const msg = nodes.get(id);
    if (!msg) return [];
    const hidden = this.core.hidden;
    return (children.get(msg.parent_id ?? null) ?? []).filter((m) => includeHidden || !hidden.has(m) || m === id);
  }

  /** Show the branch through `id` (down to its newest descendant); null
   * follows the newest activity again. */
  select(id) {
    if (id !== null && !this._nodes().nodes.has(id)) throw new Error(`no message ${id} in this view`);
    this._selected = id;
    this._touch();
  }

  get selected() {
    return this._selected;
  }

  /** User messages answered side by side with `id` (concurrent turns), oldest
   * first and including `id`; [] when there is nothing to show side by side. */
  lanes(id) {
    const { nodes, children } = this._nodes();
    const msg = nodes.get(id);
    if (!msg || msg.role !== "user") return [];
    const hidden = this.core.hidden;
    const sibs = (children.get(msg.parent_id ?? null) ?? [])
      .filter((m) => !hidden.has(m) && nodes.get(m).role === "user");
    if (sibs.length < 2) return [];
    const live = new Set(sibs.filter((m) => this._subtreeLive(m, children)));
    if (!live.size) return [];
    const cols = sibs.filter((m) => live.has(m) || this._overlap.has(m));
    return cols.length >= 2 && cols.includes(id) ? cols : [];
  }

  _subtreeLive(id, children) {
    const stack = [id];
    while (stack.length) {
      const node = stack.pop();
      if (this._isLive(node)) return true;
      stack.push(...(children.get(node) ?? []));
    }
    return false;
  }

  /** Running turns, in start order. @returns {ActiveTurn[]} */
  activeTurns() {
    return [...this.core.active.values()].map((t) => ({
      turnId: t.turnId, owner: t.owner, inputId: t.inputId, messageId: t.messageId,
      state: /** @type {any} */ (this.status(t.messageId)),
    }));
  }

  /** Running turns of one client (default: this one) that nobody has stopped yet. */
  ownActiveTurns(owner = this.clientId) {
    return this.activeTurns().filter((t) => t.owner === owner && t.state !== "stopping");
  }

  /** Messages waiting under the queue policy, in order. @returns {QueuedItem[]} */
  queued() {
    const out = [];
    const listed = new Set();
    for (const q of this.core.queue) {
      const messages = q.messages.filter((m) => !this.core.messages.has(m.id));
      for (const m of q.messages) listed.add(m.id);
      if (messages.length) out.push({ turnId: q.turnId, messageId: q.messageId, owner: q.owner, messages, pending: false });
    }
    for (const [id, opt] of this._optimistic) {
      if (opt.queued && !listed.has(id)) {
        out.push({ turnId: null, messageId: id, owner: this.clientId, messages: [opt.message], pending: true });
      }
    }
    return out;
  }

  /** The agent's presence: idle, thinking, streaming or offline. */
  get presence() {
    return this.core.presence?.state ?? this.core.presenceState();
  }

  /** An immutable picture for renderers (cached per version, so it suits
   * React's useSyncExternalStore). */
  snapshot() {
    const cache = this._nodes();
    if (!cache.snapshot) {
      cache.snapshot = Object.freeze({
        version: this.version, lastSeq: this.lastSeq, messages: this.messages(), activeTurns: this.activeTurns(),
        queued: this.queued(), presence: this.presence, selected: this._selected,
      });
    }
    return cache.snapshot;
  }
}

// ------------------------------------------------------------------ the connection

function wsUrl(url, params) {
  const base = globalThis.location?.href ?? "http://localhost/";
  const u = new URL(url, base);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) u.searchParams.set(k, v);
  return u.toString();
}

/** The `sub` claim of a JWT (the client id), or null. */
export function tokenSubject(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload.padEnd(payload.length + ((4 - (payload.length % 4)) % 4), "="))).sub ?? null;
  } catch {
    return null;
  }
}

/**
 * Open a connection (one WebSocket for any number of sessions) that
 * reconnects by itself.
 *
 * @param {object} options
 * @param {string} [options.url] WebSocket URL, absolute or relative to the page ("/v1/ws")
 * @param {string} [options.token] a fixed token (a refused one closes the connection for good)
 * @param {() => string|Promise<string>} [options.getToken] called for every connection attempt
 * @param {boolean} [options.reconnect] default true
 * @param {number} [options.initialBackoffMs] default 250
 * @param {number} [options.maxBackoffMs] default 10000
 * @param {number} [options.heartbeatMs] ping interval, default 15000 (0: off)
 * @param {number} [options.heartbeatTimeoutMs] default 10000: no pong by then → reconnect
 * @param {boolean} [options.cancelOnDisconnect] the server cancels this client's turns when it drops
 * @param {boolean} [options.watchNetwork] react to the browser's offline/online events, default true
 * @param {typeof WebSocket} [options.WebSocket]
 * @returns {Connection}
 */
export function connect(options = {}) {
  return new Connection(options);
}

/**
 * One WebSocket, multiplexing sessions. Events: `state` ({state, attempt,
 * retryInMs, error}), `error` (unsolicited error frames, TurnlineError).
 */
export class Connection extends Emitter {
  constructor({
    url = "/v1/ws", token = null, getToken = null, reconnect = true, initialBackoffMs = 250,
    maxBackoffMs = 10_000, heartbeatMs = 15_000, heartbeatTimeoutMs = 10_000, openTimeoutMs = 10_000,
    cancelOnDisconnect = false, watchNetwork = true, WebSocket: WS = globalThis.WebSocket,
  } = {}) {
    super();
    if (!token && !getToken) throw new TypeError("connect() needs a token or getToken");
    this.url = url;
    this.options = { reconnect, initialBackoffMs, maxBackoffMs, heartbeatMs, heartbeatTimeoutMs, openTimeoutMs,
      cancelOnDisconnect };
    this._token = token;
    this._getToken = getToken;
    this._WS = WS;
    /** @type {ConnectionState} */
    this.state = "connecting";
    /** failed attempts since the last good connection */
    this.attempt = 0;
    /** completed reconnects (not counting the first connection) */
    this.reconnects = 0;
    /** when the next attempt is due (ms since the epoch), while reconnecting */
    this.retryAt = null;
    /** the error that closed the connection for good, if any */
    this.error = null;
    this.clientId = token ? tokenSubject(token) : null;
    this._ws = null;
    this._gen = 0;
    this._everOpen = false;
    this._ids = 0;
    this._requests = new Map();
    this._internal = new Map();
    /** @type {Map<string, Session>} */
    this._sessions = new Map();
    this._timer = null;
    this._beat = null;
    this._pingDeadline = null;
    this._authFailed = false;
    if (watchNetwork && globalThis.addEventListener) {
      this._onOffline = () => this._drop("the browser went offline");
      this._onOnline = () => this.retryNow();
      globalThis.addEventListener("offline", this._onOffline);
      globalThis.addEventListener("online", this._onOnline);
    }
    this._open();
  }

  /** The session `id` on this connection (created and subscribed on first use).
   * `after`: 0 (default) replays the whole log; null follows live only.
   * @returns {Session} */
  session(id, { after = 0 } = {}) {
    if (!isValidId(id)) throw new TypeError(`invalid session id ${JSON.stringify(id)}`);
    let s = this._sessions.get(id);
    if (!s) {
      s = new Session(this, id, { after });
      this._sessions.set(id, s);
      if (this._ws && this._ws.readyState === 1) s._subscribe(this._gen);
    }
    return s;
  }

  /** Close for good. */
  close() {
    if (this.state === "closed") return;
    this._shutdown(new TurnlineError("closed", "the connection was closed"));
  }

  /** While reconnecting: try now instead of waiting out the backoff. */
  retryNow() {
    if (this.state !== "reconnecting" || (this._ws && this._ws.readyState === 0)) return;
    clearTimeout(this._timer);
    this._open();
  }

  _setState(state, extra = {}) {
    this.state = state;
    this.emit("state", { state, attempt: this.attempt, retryInMs: this.retryAt ? Math.max(0, this.retryAt - Date.now()) : 0,
      error: this.error, ...extra });
    for (const s of this._sessions.values()) s._touchState();
  }

  async _open() {
    if (this.state === "closed") return;
    const gen = ++this._gen;
    this.retryAt = null;
    let token;
    try {
      token = this._getToken ? await this._getToken() : this._token;
    } catch (err) {
      if (gen === this._gen) this._retry(err);
      return;
    }
    if (gen !== this._gen || this.state === "closed") return;
    this.clientId = tokenSubject(token) ?? this.clientId;
    for (const s of this._sessions.values()) s.view.clientId ??= this.clientId;
    let ws;
    try {
      ws = new this._WS(wsUrl(this.url, { token, cancel_on_disconnect: this.options.cancelOnDisconnect ? "1" : null }));
    } catch (err) {
      this._retry(err);
      return;
    }
    this._ws = ws;
    this._authFailed = false;
    const openTimer = setTimeout(() => { if (gen === this._gen) this._drop("open timeout"); }, this.options.openTimeoutMs);
    ws.onopen = () => {
      clearTimeout(openTimer);
      if (gen !== this._gen) return;
      if (this._everOpen) this.reconnects += 1;
      this._everOpen = true;
      this._setState("connected");
      this._startHeartbeat(gen);
      for (const s of this._sessions.values()) s._subscribe(gen);
      this._flush(null);
    };
    ws.onmessage = (e) => { if (gen === this._gen) this._onFrame(e.data); };
    ws.onerror = () => {};
    ws.onclose = (e) => {
      clearTimeout(openTimer);
      if (gen === this._gen) this._lost(e.code === 4401 || this._authFailed);
    };
  }

  /** Give up on the current socket now (offline, no pong, open timeout). */
  _drop(reason) {
    const ws = this._ws;
    if (!ws || this.state === "closed") return;
    this._gen += 1; // the old socket's late events are ignored from here on
    ws.onopen = ws.onmessage = ws.onclose = null;
    try {
      ws.close(4000, reason);
    } catch { /* already closing */ }
    this._lost(false);
  }

  _lost(unauthorized) {
    this._ws = null;
    this._stopHeartbeat();
    for (const [id, p] of this._internal) {
      this._internal.delete(id);
      p.reject(new TurnlineError("disconnected", "the connection was lost"));
    }
    for (const s of this._sessions.values()) s._onDisconnect();
    if (this.state === "closed") return;
    if (unauthorized && !this._getToken) {
      this._shutdown(new TurnlineError("unauthorized", "the server refused the token"));
      return;
    }
    this._retry(unauthorized ? new TurnlineError("unauthorized", "the server refused the token") : null);
  }

  _retry(err) {
    if (!this.options.reconnect) {
      this._shutdown(new TurnlineError("disconnected", String(err?.message ?? "the connection was lost")));
      return;
    }
    const { initialBackoffMs, maxBackoffMs } = this.options;
    const ceiling = Math.min(maxBackoffMs, initialBackoffMs * 2 ** Math.min(this.attempt, 30));
    const delay = ceiling * (0.5 + Math.random() * 0.5); // jitter: clients do not come back in lockstep
    this.attempt += 1;
    this.retryAt = Date.now() + delay;
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._open(), delay);
    this._setState("reconnecting", { lastError: err ?? null });
  }

  _shutdown(error) {
    this.error = error.code === "closed" ? null : error;
    clearTimeout(this._timer);
    this._stopHeartbeat();
    const ws = this._ws;
    this._ws = null;
    this._gen += 1;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      try { ws.close(1000); } catch { /* closing already */ }
    }
    for (const p of [...this._internal.values(), ...this._requests.values()]) p.reject(error);
    this._internal.clear();
    this._requests.clear();
    if (this._onOffline) {
      globalThis.removeEventListener("offline", this._onOffline);
      globalThis.removeEventListener("online", this._onOnline);
    }
    this.state = "closed";
    this._setState("closed");
  }

  _startHeartbeat(gen) {
    this._stopHeartbeat();
    const { heartbeatMs, heartbeatTimeoutMs } = this.options;
    if (!heartbeatMs) return;
    this._beat = setInterval(() => {
      if (gen !== this._gen || this._pingDeadline) return;
      this._pingDeadline = setTimeout(() => { if (gen === this._gen) this._drop("no pong"); }, heartbeatTimeoutMs);
      this._internalRequest({ op: "ping" }).catch(() => {}).finally(() => {
        clearTimeout(this._pingDeadline);
        this._pingDeadline = null;
      });
    }, heartbeatMs);
  }

  _stopHeartbeat() {
    clearInterval(this._beat);
    clearTimeout(this._pingDeadline);
    this._beat = null;
    this._pingDeadline = null;
  }

  /** Measure a round trip (ms). */
  async ping() {
    const start = performance.now();
    await this._internalRequest({ op: "ping" });
    return performance.now() - start;
  }

  _send(frame) {
    this._ws.send(JSON.stringify(frame));
  }

  /** A request bound to the current socket (subscribe, ping): never re-sent. */
  _internalRequest(frame) {
    return new Promise((resolve, reject) => {
      if (!this._ws || this._ws.readyState !== 1) {
        reject(new TurnlineError("disconnected", "not connected"));
        return;
      }
      const id = ++this._ids;
      this._internal.set(id, { resolve, reject });
      this._send({ ...frame, id });
    });
  }

  /** A request that survives reconnects: (re)sent once its session has caught up. */
  _request(session, kind, frame, meta = {}) {
    if (this.state === "closed") return Promise.reject(new TurnlineError("closed", `cannot ${kind}: closed`));
    return new Promise((resolve, reject) => {
      const id = ++this._ids;
      const req = { id, kind, session, frame: { ...frame, id }, meta, since: session?.view.lastSeq ?? 0,
        sentGen: null, resent: false, resolve, reject };
      this._requests.set(id, req);
      if (this._ready(session)) this._write(req);
    });
  }

  _ready(session) {
    return Boolean(this._ws && this._ws.readyState === 1 && (session === null || session._synced));
  }

  _write(req) {
    req.sentGen = this._gen;
    this._send(req.frame);
  }

  /** (Re)send, in order, every request of `session` not yet written to this socket. */
  _flush(session) {
    if (!this._ready(session)) return;
    const todo = [...this._requests.values()].filter((r) => r.session === session && r.sentGen !== this._gen)
      .sort((a, b) => a.id - b.id);
    for (const req of todo) {
      if (req.sentGen !== null) {
        req.resent = true;
        const recovered = session?._recover(req);
        if (recovered) {
          this._requests.delete(req.id);
          req.resolve({ ...recovered, resent: true });
          continue;
        }
      }
      this._write(req);
    }
  }

  _onFrame(data) {
    if (typeof data !== "string") return; // voice audio is not handled here
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      console.warn("turnline: unreadable frame", data.slice(0, 200));
      return;
    }
    const op = frame.op;
    if (op === "event" || op === "events") {
      this._sessions.get(frame.session)?._onEvents(op === "event" ? [frame.event] : frame.events);
    } else if (op === "ack" || op === "pong") {
      this.attempt = 0;
      this._answer(frame.id, frame, null);
    } else if (op === "error") {
      const err = new TurnlineError(frame.code ?? "internal", String(frame.message ?? ""));
      if (frame.id === null || frame.id === undefined) this._unsolicited(frame, err);
      else this._answer(frame.id, null, err);
    }
  }

  _unsolicited(frame, err) {
    if (err.code === "unauthorized") {
      this._authFailed = true; // the server closes the socket next
    } else if (frame.session && this._sessions.has(frame.session)) {
      this._sessions.get(frame.session)._resubscribe(); // its subscription failed on the server
    } else {
      this.emit("error", err);
    }
  }

  _answer(id, frame, error) {
    const internal = this._internal.get(id);
    if (internal) {
      this._internal.delete(id);
      if (error) internal.reject(error);
      else internal.resolve(frame);
      return;
    }
    const req = this._requests.get(id);
    if (!req) return;
    if (error && req.kind === "send" && req.resent && error.code === "conflict") {
      // the first copy was applied before the connection dropped
      req.session._recoverSendAfterConflict(req, error);
      return;
    }
    this._requests.delete(id);
    if (error) {
      req.reject(error);
      return;
    }
    const { op, id: _id, ...out } = frame;
    if (req.resent) out.resent = true;
    req.resolve(out);
  }
}

// ------------------------------------------------------------------ a session

function toMessages(content, role = "user") {
  const list = Array.isArray(content) ? content : [content];
  return list.map((m) => {
    if (typeof m === "string") return { id: newId(), role, parts: [{ type: "text", text: m }] };
    const msg = { id: m.id ?? newId(), role: m.role ?? role, parts: m.parts ?? [{ type: "text", text: m.text ?? "" }] };
    if (m.metadata) msg.metadata = m.metadata;
    if (!isValidId(msg.id)) throw new TypeError(`invalid message id ${JSON.stringify(msg.id)}`);
    return msg;
  });
}

function cancelFilter({ turnId, clientId, all } = {}) {
  const chosen = [turnId != null, clientId != null, Boolean(all)].filter(Boolean).length;
  if (chosen > 1) throw new TurnlineError("bad_frame", "a cancel names one of turnId, clientId, all");
  if (turnId != null) return { turn_id: turnId };
  if (clientId != null) return { client_id: clientId };
  if (all) return { all: true };
  return { own: true };
}

/**
 * One conversation. Subscribes on every (re)connection from its view's
 * lastSeq, so it never misses or repeats an event. Events: `change`, `event`,
 * `turn-end` (from its view), `state` (`connecting`/`syncing`/`live`/
 * `reconnecting`/`closed`), `rejected` ({messageIds, code, messages}: a send
 * the server refused under the reject policy or a full queue).
 */
export class Session extends Emitter {
  constructor(connection, id, { after = 0 } = {}) {
    super();
    this.connection = connection;
    this.id = id;
    this.view = new View(id, { clientId: connection.clientId });
    /** the highest seq the page has rendered (see markRendered) */
    this.rendered = null;
    this._after = after;
    this._first = true;
    this._synced = false;
    this._target = null;
    this._resubscribing = false;
    this._closed = false;
    this._lastState = null;
    this._claimed = new Set(); // turns already reported to a regenerate request
    this.view.on("change", () => this.emit("change", this));
    this.view.on("event", (ev) => this.emit("event", ev));
    this.view.on("turn-end", (ev) => this.emit("turn-end", ev));
  }

  /** This client's id (the token's sub). */
  get clientId() {
    return this.connection.clientId;
  }

  /** @returns {"connecting"|"syncing"|"live"|"reconnecting"|"closed"} */
  get state() {
    if (this._closed || this.connection.state === "closed") return "closed";
    if (this.connection.state === "reconnecting") return "reconnecting";
    if (this.connection.state !== "connected") return "connecting";
    return this._synced ? "live" : "syncing";
  }

  _touchState() {
    const state = this.state;
    if (state !== this._lastState) {
      this._lastState = state;
      this.emit("state", state);
    }
  }

  /** Tell the session the page now shows everything up to `seq` (default: all
   * applied). A stop then saves exactly that. Without calls, `seen` is lastSeq. */
  markRendered(seq = this.view.lastSeq) {
    this.rendered = seq;
  }

  /** The cursor sent with a stop: what this page has rendered. */
  get seen() {
    return Math.min(this.rendered ?? this.view.lastSeq, this.view.lastSeq);
  }

  async _subscribe(gen) {
    if (this._closed) return;
    const view = this.view;
    const after = this._first && view.lastSeq === 0 ? this._after : view.lastSeq;
    const frame = { op: "subscribe", session: this.id };
    if (after !== null) frame.after = after;
    this._synced = false;
    this._target = null;
    this._touchState();
    let ack;
    try {
      ack = await this.connection._internalRequest(frame);
    } catch (err) {
      if (err.code !== "disconnected" && gen === this.connection._gen) this.emit("error", err);
      return;
    }
    if (gen !== this.connection._gen || this._closed) return;
    this._first = false;
    const serverAfter = Number(ack.after ?? 0);
    if (view.lastSeq === 0 && serverAfter > 0 && !view.core.messages.size && !view.core.turns.size) {
      view.startAt(serverAfter); // live only, or a cursor kept elsewhere
    }
    this._target = Number(ack.last_seq ?? 0);
    this._checkSynced();
  }

  _checkSynced() {
    if (!this._synced && this._target !== null && this.view.lastSeq >= this._target) {
      this._synced = true;
      this._touchState();
      this.connection._flush(this);
    }
  }

  _onEvents(events) {
    for (const ev of events) {
      if (!ev || typeof ev.seq !== "number") continue;
      try {
        this.view.apply(ev);
      } catch (err) {
        if (!(err instanceof GapError)) throw err;
        console.warn(`turnline: ${err.message}; resubscribing from ${this.view.lastSeq}`);
        this._resubscribe();
        break; // the rest of this batch is past the gap as well
      }
    }
    this._checkSynced();
  }

  async _resubscribe() {
    if (this._resubscribing || !this.connection._ready(null)) return;
    this._resubscribing = true;
    try {
      await this.connection._internalRequest({ op: "subscribe", session: this.id, after: this.view.lastSeq });
    } catch { /* the connection dropped: the reconnect resubscribes */ }
    this._resubscribing = false;
  }

  _onDisconnect() {
    this._synced = false;
    this._target = null;
    this._resubscribing = false;
  }

  /** Stop following this session (its requests in flight fail with `closed`). */
  close() {
    if (this._closed) return;
    this._closed = true;
    const conn = this.connection;
    for (const [id, req] of conn._requests) {
      if (req.session === this) {
        conn._requests.delete(id);
        req.reject(new TurnlineError("closed", "the session was closed"));
      }
    }
    if (conn._sessions.get(this.id) === this) conn._sessions.delete(this.id);
    if (conn._ready(null)) conn._internalRequest({ op: "unsubscribe", session: this.id }).catch(() => {});
    this._touchState();
  }

  // -------------------------------------------------------------- recovery of re-sent requests

  /** A request about to be re-sent after a reconnect: if the log shows its
   * first copy took effect, answer it from the log instead. */
  _recover(req) {
    const core = this.view.core;
    if (req.kind === "send") {
      const ids = req.meta.ids;
      const last = ids[ids.length - 1];
      const inQueue = (id) => core.queue.some((q) => q.messages.some((m) => m.id === id));
      const rejected = this.view.rejectedCode(last, req.since);
      if (rejected) return { session: this.id, message_ids: ids, turn_ids: [], rejected };
      if (ids.every((id) => core.messages.has(id) || inQueue(id))) return this._sendOutcome(req);
      return null;
    }
    if (req.kind === "regenerate") {
      const inputId = req.meta.inputId;
      if (inputId == null) return null;
      for (const t of core.turns.values()) {
        if (t.inputId === inputId && t.startSeq > req.since && !this._claimed.has(t.turnId)
            && t.owner === this.clientId) {
          this._claimed.add(t.turnId);
          return { session: this.id, message_ids: [], turn_ids: [t.turnId] };
        }
      }
    }
    return null;
  }

  _sendOutcome(req) {
    const core = this.view.core;
    const ids = req.meta.ids;
    const last = ids[ids.length - 1];
    const out = { session: this.id, message_ids: ids,
      turn_ids: [...core.turns.values()].filter((t) => t.inputId === last && t.startSeq > req.since
        && t.owner === this.clientId).map((t) => t.turnId) };
    const queued = core.queue.filter((q) => q.messageId === last).map((q) => q.turnId);
    if (queued.length) out.queued = queued;
    return out;
  }

  _recoverSendAfterConflict(req, error) {
    const conn = this.connection;
    const ids = req.meta.ids;
    const core = this.view.core;
    const settle = () => {
      if (!conn._requests.has(req.id)) return true;
      if (ids.every((id) => core.messages.has(id) || core.queue.some((q) => q.messages.some((m) => m.id === id)))) {
        conn._requests.delete(req.id);
        req.resolve({ ...this._sendOutcome(req), resent: true });
        return true;
      }
      return false;
    };
    if (settle()) return;
    const stop = this.view.on("event", () => { if (settle()) stop(); });
    setTimeout(() => { // a genuine conflict after all
      stop();
      if (conn._requests.delete(req.id)) req.reject(error);
    }, 10_000);
  }

  // -------------------------------------------------------------- commands

  /**
   * Add user message(s). They show at once (optimistic) and the view follows
   * them. Resolves with the ack: {message_ids, turn_ids, queued?, rejected?, cancelled?}.
   * With `interrupt`/`rollback` the turns it stops are saved as this page shows them.
   * @param {string|object|Array<string|object>} content text, or {id?, role?, parts|text, metadata?}
   * @param {{policy?: Policy, parentId?: string, steer?: string, traceparent?: string}} [options]
   *   traceparent: a W3C trace context; with tracing on, the server's span of the turn joins that trace
   */
  async send(content, { policy, parentId, steer, traceparent } = {}) {
    if (policy !== undefined && !POLICIES.includes(policy)) throw new TypeError(`unknown policy ${policy}`);
    const messages = toMessages(content);
    const ids = messages.map((m) => m.id);
    const view = this.view;
    const queuedLocally = policy === "queue" && view.busy && steer === undefined && parentId === undefined;
    let parent;
    if (steer !== undefined) parent = view.core.turns.get(steer)?.inputId ?? null;
    else parent = parentId !== undefined ? parentId : view.guessParent(policy ?? null, this.clientId);
    for (const m of messages) {
      view.addOptimistic({ ...m, parent_id: parent }, { queued: queuedLocally, group: ids });
      parent = m.id;
    }
    if (steer === undefined) view.select(null);
    const frame = { op: "send", session: this.id, messages };
    if (policy !== undefined) frame.policy = policy;
    if (parentId !== undefined) frame.parent_id = parentId;
    if (steer !== undefined) frame.steer = steer;
    if (traceparent !== undefined) frame.traceparent = traceparent; // W3C: the turn's span joins this trace
    const interrupting = (policy === "interrupt" || policy === "rollback") && steer === undefined;
    const request = ids[ids.length - 1];
    if (interrupting) {
      frame.seen = this.seen;
      view.freeze(view.ownActiveTurns(this.clientId).map((t) => t.turnId), frame.seen, request);
    }
    let ack;
    try {
      ack = await this.connection._request(this, "send", frame, { ids });
    } catch (err) {
      view.dropOptimistic(ids.filter((id) => !view.core.messages.has(id)));
      if (interrupting) view.cancelFailed(request);
      throw err;
    }
    if (interrupting) view.cancelAcked(request, { cancelled: ack.cancelled ?? [], seen: frame.seen });
    if (ack.rejected) {
      view.dropOptimistic(ids);
      this.emit("rejected", { messageIds: ids, code: ack.rejected, messages });
    }
    return ack;
  }

  /** Send `content` as an alternative to message `messageId` (a new branch). */
  edit(messageId, content, options = {}) {
    const msg = this.view.message(messageId);
    if (!msg) throw new TurnlineError("not_found", `no message ${messageId}`);
    if (msg.parent_id === null) {
      throw new TurnlineError("conflict", "a first message cannot be edited: start the chat with a system message");
    }
    return this.send(content, { ...options, parentId: msg.parent_id });
  }

  /** A new assistant reply for the input of `messageId` (a sibling of that reply). */
  async regenerate(messageId) {
    const msg = this.view.core.messages.get(messageId);
    const inputId = msg ? (msg.role === "assistant" ? msg.parent_id : msg.id) : null;
    this.view.select(null);
    const ack = await this.connection._request(this, "regenerate",
      { op: "regenerate", session: this.id, message_id: messageId }, { inputId });
    for (const t of ack.turn_ids ?? []) this._claimed.add(t); // so a recovered twin does not take it
    return ack;
  }

  /**
   * Stop turns: this client's own (default), one turn, one client's, or all.
   * Sends `seen` (default: the highest seq rendered) and shows the stopped
   * turns as of it from now on — exactly what the server saves.
   * @param {{turnId?: string, clientId?: string, all?: boolean, seen?: number}} [options]
   */
  async cancel({ turnId, clientId, all, seen } = {}) {
    const filter = cancelFilter({ turnId, clientId, all });
    const view = this.view;
    seen ??= this.seen;
    const matched = view.core.matchCancel(filter, this.clientId, seen);
    const request = {};
    view.freeze(matched, seen, request);
    let ack;
    try {
      ack = await this.connection._request(this, "cancel", { op: "cancel", session: this.id, filter, seen },
        { matched });
    } catch (err) {
      view.cancelFailed(request);
      throw err;
    }
    let cancelled = ack.cancelled ?? [];
    if (ack.resent) {
      // the first copy may have done the work: count the turns it stopped
      cancelled = [...cancelled, ...matched.filter((t) => !cancelled.includes(t) && view.core.turns.get(t)?.cancel)];
      ack = { ...ack, cancelled };
    }
    view.cancelAcked(request, { cancelled, rejected: ack.rejected ?? [], pending: ack.pending ?? [], seen });
    return ack;
  }

  /** Show the branch through `messageId` (null: follow the newest activity). */
  select(messageId) {
    this.view.select(messageId);
  }

  /** Call `fn` on every change; returns the remover (store-style API). */
  subscribe(fn) {
    return this.on("change", fn);
  }

  /** The view's cached snapshot (for React's useSyncExternalStore). */
  getSnapshot() {
    return this.view.snapshot();
  }
}
