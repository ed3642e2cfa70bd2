// Drives the real AI SDK `Chat` (AbstractChat + DefaultChatTransport, or ai 7's
// WebSocketChatTransport; no React) against a live turnline server, for
// tests/integration/test_aisdk.py and test_aisdk_ws.py.
//
//   node chat_driver.mjs <ai5|ai6|ai7>      (Node 20: with --experimental-websocket)
//
// Commands arrive as JSON lines on stdin; every command gets exactly one JSON
// line on stdout, {"re": <its id>, ...}. `connect` names the server (its URL
// and a token) for the chats made after it; `reset` stops and forgets them. Chat operations (send, resume,
// regenerate) start in the background and report {"re": …, "settled": …}
// when their promise settles, so a test can act while a turn streams.

import { createRequire } from "node:module";
import { createInterface } from "node:readline";
import { turnlineWebSocket } from "../../src/turnline/web/aisdk-websocket.js";

const [major] = process.argv.slice(2);
let server = null; // {base, token}
const ai = await import(major);
const { AbstractChat, DefaultChatTransport, WebSocketChatTransport } = ai;

// The state a UI framework would hold; every change is one "render".
class PlainState {
  #messages;
  #status = "ready";
  #error = undefined;
  #listeners = new Set();

  constructor(messages = []) {
    this.#messages = messages;
  }

  get messages() { return this.#messages; }
  set messages(messages) { this.#messages = messages; this.#changed(); }
  get status() { return this.#status; }
  set status(status) { this.#status = status; this.#changed(); }
  get error() { return this.#error; }
  set error(error) { this.#error = error; this.#changed(); }
  #queued = [];
  get experimental_queuedMessages() { return this.#queued; }
  set experimental_queuedMessages(queued) { this.#queued = queued; this.#changed(); }
  pushMessage = (message) => { this.messages = this.#messages.concat(this.snapshot(message)); };
  popMessage = () => { this.messages = this.#messages.slice(0, -1); };
  replaceMessage = (index, message) => {
    this.messages = [...this.#messages.slice(0, index), this.snapshot(message), ...this.#messages.slice(index + 1)];
  };
  snapshot = (value) => structuredClone(value);
  onChange(listener) { this.#listeners.add(listener); return () => this.#listeners.delete(listener); }
  #changed() { for (const listener of [...this.#listeners]) listener(); }
}

class PlainChat extends AbstractChat {
  constructor({ messages, ...init }) {
    const state = new PlainState(messages);
    super({ ...init, state });
    this.plain = state;
  }
}

const chats = new Map();

function textOf(message) {
  return (message?.parts ?? []).filter((p) => p.type === "text").map((p) => p.text).join("");
}

function lastAssistant(chat) {
  return [...chat.messages].reverse().find((m) => m.role === "assistant");
}

function view(chat) {
  return {
    status: chat.status,
    error: chat.error ? String(chat.error.message ?? chat.error) : null,
    messages: chat.messages,
    finishes: chat.finishes,
    queued: chat.plain.experimental_queuedMessages,
  };
}

// The network under a WS transport's socket: while `held`, frames that arrive
// wait (as if still on the wire) and reach the socket's handler on release.
class Network extends (globalThis.WebSocket ?? class {}) {
  held = null;
  heldChanged = () => {};
  set onmessage(handler) {
    super.onmessage = handler == null ? handler : (event) => {
      if (!this.held) return handler.call(this, event);
      this.held.push(() => handler.call(this, event));
      this.heldChanged();
    };
  }
  get onmessage() { return super.onmessage; }
  hold() { this.held = []; }
  release() { const held = this.held ?? []; this.held = null; for (const deliver of held) deliver(); }
}

// The transport: `http` (DefaultChatTransport at /api/chat) or `ws`
// (WebSocketChatTransport at /api/chat/ws, the token as ?token= or a subprotocol;
// `exact`: with turnline's aisdk-websocket.js, whose abort says what was shown).
// Every socket the WS transport opens is kept, so a test can drop or hold one.
function makeTransport({ transport = "http", auth = "query", sdkMajor, body, exact = false }, sockets) {
  const { base, token } = server;
  if (transport === "http") {
    return new DefaultChatTransport({
      api: `${base}/api/chat`,
      headers: () => ({ Authorization: `Bearer ${token}`, ...(sdkMajor ? { "x-ai-sdk-major": sdkMajor } : {}) }),
      body,
    });
  }
  class TrackedWebSocket extends (exact ? turnlineWebSocket(Network) : Network) {
    constructor(url, protocols) {
      super(url, protocols);
      sockets.push(this);
    }
  }
  return new WebSocketChatTransport({
    url: `${base.replace(/^http/, "ws")}/api/chat/ws`,
    ...(auth === "query" ? { params: { token } } : { protocols: ["turnline", `turnline.bearer.${token}`] }),
    webSocket: TrackedWebSocket,
    body,
  });
}

function makeChat({ name, chatId, messages = [], queue = false, ...options }) {
  const errors = [];
  const finishes = [];
  const sockets = [];
  const chat = new PlainChat({
    id: chatId,
    messages,
    transport: makeTransport(options, sockets),
    onError: (error) => errors.push(String(error.message ?? error)),
    onFinish: ({ finishReason, isAbort, isError, isDisconnect, message }) =>
      finishes.push({ finishReason: finishReason ?? null, isAbort, isError, isDisconnect: isDisconnect ?? null,
                      messageId: message?.id ?? null }),
    experimental_queue: queue,
  });
  chat.errors = errors;
  chat.finishes = finishes;
  chat.sockets = sockets;
  chat.server = server;
  chats.set(name, chat);
  return chat;
}

function background(id, promise, chat) {
  promise.then(
    () => reply(id, { settled: "ok", ...view(chat), errors: chat.errors }),
    (error) => reply(id, { settled: "threw", thrown: String(error?.message ?? error), ...view(chat) }),
  );
}

// Resolves once `ready(chat)` holds (checked at every change of the state).
function waitFor(chat, ready) {
  return new Promise((resolve) => {
    const check = () => {
      if (ready(chat)) {
        stop();
        resolve();
      }
    };
    const stop = chat.plain.onChange(check);
    check();
  });
}

const sameJson = (a, b) => JSON.stringify(a) === JSON.stringify(b);

const handlers = {
  version: async () => ({
    version: createRequire(import.meta.url)(`${major}/package.json`).version,
    headers: ai.UI_MESSAGE_STREAM_HEADERS,
  }),
  connect: async (cmd) => { server = { base: cmd.base, token: cmd.token }; return {}; },
  reset: async () => {
    await Promise.all([...chats.values()].map((chat) => chat.stop().catch(() => {})));
    chats.clear();
    return {};
  },
  new: async (cmd) => { makeChat(cmd); return {}; },
  send: async (cmd) => {
    const chat = chats.get(cmd.name);
    const message = cmd.message ?? { text: cmd.text };
    background(cmd.id, chat.sendMessage(message, cmd.options), chat);
    return null; // answered when it settles
  },
  regenerate: async (cmd) => {
    const chat = chats.get(cmd.name);
    background(cmd.id, chat.regenerate(cmd.messageId ? { messageId: cmd.messageId } : {}), chat);
    return null;
  },
  resume: async (cmd) => {
    const chat = chats.get(cmd.name);
    background(cmd.id, chat.resumeStream(), chat);
    return null;
  },
  // until the last assistant message shows `text`
  "wait-text": async (cmd) => {
    const chat = chats.get(cmd.name);
    await waitFor(chat, () => textOf(lastAssistant(chat)).includes(cmd.text));
    return view(chat);
  },
  // until part `index` of the last assistant message has the fields of `match`
  "wait-part": async (cmd) => {
    const chat = chats.get(cmd.name);
    await waitFor(chat, () => {
      const part = lastAssistant(chat)?.parts[cmd.index];
      return part != null && Object.entries(cmd.match).every(([k, v]) => sameJson(part[k], v));
    });
    return view(chat);
  },
  "wait-status": async (cmd) => {
    const chat = chats.get(cmd.name);
    await waitFor(chat, () => chat.status === cmd.status);
    return view(chat);
  },
  // The AI SDK's own stop(): aborts the fetch, keeps what was shown.
  stop: async (cmd) => {
    const chat = chats.get(cmd.name);
    await chat.stop();
    return view(chat);
  },
  // What a stop button does against turnline: stop(), then tell the server
  // what this client showed, so that is what it saves.
  "post-stop": async (cmd) => {
    const chat = chats.get(cmd.name);
    const shown = lastAssistant(chat);
    const body = cmd.body ?? { messageId: shown.id, parts: shown.parts };
    const { base, token } = chat.server;
    const response = await fetch(`${base}/api/chat/${encodeURIComponent(chat.id)}/stop`, {
      method: "POST",
      headers: { "content-type": "application/json", Authorization: `Bearer ${token}` },
      body: JSON.stringify(body),
    });
    return { status: response.status, body: await response.json(), sent: body };
  },
  // drop the last assistant message (ai 5's workaround before resuming mid tool input)
  "forget-partial": async (cmd) => {
    const chat = chats.get(cmd.name);
    const partial = lastAssistant(chat);
    chat.messages = chat.messages.filter((m) => m.id !== partial.id);
    return view(chat);
  },
  state: async (cmd) => view(chats.get(cmd.name)),
  // until onFinish has been called `count` times
  "wait-finish": async (cmd) => {
    const chat = chats.get(cmd.name);
    await waitFor(chat, () => chat.finishes.length >= cmd.count);
    return view(chat);
  },
  // until the client-side queue (experimental_queue) holds `count` messages
  "wait-queued": async (cmd) => {
    const chat = chats.get(cmd.name);
    await waitFor(chat, () => chat.plain.experimental_queuedMessages.length === cmd.count);
    return view(chat);
  },
  // experimental_sendQueuedMessageNow: stop the running request, send the queued message
  "send-queued-now": async (cmd) => {
    const chat = chats.get(cmd.name);
    const [first] = chat.plain.experimental_queuedMessages;
    background(cmd.id, chat.experimental_sendQueuedMessageNow(first.id), chat);
    return null;
  },
  // the WS transport's socket goes away under it (as a network drop does)
  drop: async (cmd) => {
    const chat = chats.get(cmd.name);
    const socket = chat.sockets.at(-1);
    const closed = new Promise((resolve) => socket.addEventListener("close", resolve, { once: true }));
    socket.close(4000, "dropped by the test");
    await closed;
    await waitFor(chat, () => chat.status === "error");
    return view(chat);
  },
  // frames for the chat's socket stay on the wire until `release`
  hold: async (cmd) => { chats.get(cmd.name).sockets.at(-1).hold(); return {}; },
  "wait-held": async (cmd) => {
    const socket = chats.get(cmd.name).sockets.at(-1);
    await new Promise((resolve) => {
      socket.heldChanged = () => { if (socket.held.length >= cmd.count) resolve(); };
      socket.heldChanged();
    });
    return { held: socket.held.length };
  },
  release: async (cmd) => {
    const chat = chats.get(cmd.name);
    const socket = chat.sockets.at(-1);
    const count = socket.held?.length ?? 0;
    socket.release();
    return { released: count, ...view(chat) };
  },
  // a raw frame exchange on a new socket of the chat's server (no transport): the frames it
  // answers until the first end, error or no-active (or until `chunks` chunk frames came)
  "raw-ws": async (cmd) => {
    const { base, token } = server;
    const socket = new globalThis.WebSocket(`${base.replace(/^http/, "ws")}/api/chat/ws?token=${cmd.token ?? token}`);
    const frames = [];
    const done = new Promise((resolve) => {
      socket.addEventListener("message", (event) => {
        const frame = JSON.parse(event.data);
        frames.push(frame);
        const chunks = frames.filter((f) => f.type === "chunk").length;
        if (cmd.chunks !== undefined ? chunks >= cmd.chunks : ["end", "error", "no-active"].includes(frame.type)) resolve();
      });
      socket.addEventListener("close", (event) => { frames.push({ closed: event.code, reason: event.reason }); resolve(); });
    });
    await new Promise((resolve) => socket.addEventListener("open", resolve, { once: true }));
    for (const frame of cmd.frames) socket.send(typeof frame === "string" ? frame : JSON.stringify(frame));
    await done;
    socket.close();
    return { frames };
  },
};

function reply(id, payload) {
  process.stdout.write(JSON.stringify({ re: id, ...payload }) + "\n");
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const cmd = JSON.parse(line);
  if (cmd.cmd === "exit") break;
  const handler = handlers[cmd.cmd];
  if (!handler) {
    reply(cmd.id, { failed: `unknown command ${cmd.cmd}` });
    continue;
  }
  handler(cmd).then(
    (payload) => { if (payload !== null) reply(cmd.id, payload); },
    (error) => reply(cmd.id, { failed: String(error?.stack ?? error) }),
  );
}
for (const chat of chats.values()) await chat.stop().catch(() => {});
process.exit(0);
