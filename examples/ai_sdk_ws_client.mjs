// The AI SDK 7's Chat over its WebSocketChatTransport, against turnline's
// /api/chat/ws, without React: ask (onFinish reports finishReason "stop"), lose
// the socket mid-answer and resume it (no word lost or repeated), then press
// stop mid-answer: the saved answer equals the screen exactly.
//
//   npm install ai@7               (Node 22+; on Node 20: node --experimental-websocket)
//   turnline serve                 (dev mode on loopback; prints a dev token)
//   node examples/ai_sdk_ws_client.mjs
//
// TURNLINE_URL (default http://127.0.0.1:8787) and TURNLINE_TOKEN (default: a
// token from the dev-mode route) point it at your own server.

import { AbstractChat, WebSocketChatTransport } from "ai";
// In a page: import { turnlineWebSocket } from "https://YOUR-TURNLINE/aisdk-websocket.js"
import { turnlineWebSocket } from "../src/turnline/web/aisdk-websocket.js";

const base = process.env.TURNLINE_URL ?? "http://127.0.0.1:8787";
const token = process.env.TURNLINE_TOKEN ?? (await devToken());

async function devToken() {
  const response = await fetch(`${base}/v1/dev/token?sub=ai-sdk-ws-example`, { method: "POST" });
  if (!response.ok) throw new Error("set TURNLINE_TOKEN (the server is not in dev mode)");
  return (await response.json()).token;
}

async function history() {
  const response = await fetch(`${base}/v1/sessions/${chat.id}/messages`, { headers: { Authorization: `Bearer ${token}` } });
  return (await response.json()).messages;
}

// What a UI framework keeps; every change wakes whoever waits for one.
class ScreenState {
  messages = [];
  status = "ready";
  error = undefined;
  #waiters = [];
  pushMessage = (message) => this.#set([...this.messages, structuredClone(message)]);
  popMessage = () => this.#set(this.messages.slice(0, -1));
  replaceMessage = (index, message) =>
    this.#set(this.messages.map((m, i) => (i === index ? structuredClone(message) : m)));
  snapshot = (value) => structuredClone(value);
  #set(messages) {
    this.messages = messages;
    this.#waiters = this.#waiters.filter(({ ready, resolve }) => !(ready() && (resolve(), true)));
  }
  until(ready) {
    return ready() ? Promise.resolve() : new Promise((resolve) => this.#waiters.push({ ready, resolve }));
  }
}

class Chat extends AbstractChat {
  constructor(init) {
    const state = new ScreenState();
    super({ ...init, state });
    this.screen = state;
  }
}

const transport = new WebSocketChatTransport({
  url: `${base.replace(/^http/, "ws")}/api/chat/ws`,
  protocols: ["turnline", `turnline.bearer.${token}`], // or params: { token }
  webSocket: turnlineWebSocket(), // its abort says what the screen showed: the stop is exact
});
const finishes = [];
const chat = new Chat({
  id: `ai-sdk-ws-example-${Date.now()}`, // the chat id is the turnline session id
  transport,
  onFinish: ({ finishReason, isAbort }) => finishes.push(isAbort ? "abort" : finishReason),
});

const lastAnswer = () => chat.messages.findLast((m) => m.role === "assistant");
const textOf = (message) => message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
const words = (message) => textOf(message).split(" ").length;
const seen = (message) => message.parts.map((p) =>
  p.type === "text" || p.type === "reasoning" ? `${p.type}: ${p.text}`
    : p.type.startsWith("tool-") ? `${p.type}: ${JSON.stringify(p.input)}` : p.type).join("\n");

// 1. Ask and wait for the whole answer.
await chat.sendMessage({ text: "What is the weather in Paris?" });
console.log("answer:", textOf(lastAnswer()));
console.log("finishReason:", finishes.at(-1));

// 2. The socket goes away mid-answer; resume where the turn is (the server kept it running).
const before = lastAnswer();
const asking = chat.sendMessage({ text: "How does resume work?" });
await chat.screen.until(() => lastAnswer() !== before && words(lastAnswer()) > 5);
transport.close(); // as a dropped connection does: the request fails
await asking;
await chat.resumeStream(); // a new socket; the turn is replayed from its start, then live
const resumed = lastAnswer();
const stored = (await history()).find((m) => m.id === resumed.id);
console.log("resumed answer:", textOf(resumed));
console.log(`resumed == history: ${textOf(stored) === textOf(resumed) ? "yes" : "no"}`); // nothing lost or repeated

// 3. Ask again and press stop after a few words: the abort cancels the turn.
const third = lastAnswer();
const asked = chat.sendMessage({ text: "Why does the stop button matter?" });
await chat.screen.until(() => lastAnswer() !== third && words(lastAnswer()) > 8);
await chat.stop();
await asked;
const shown = lastAnswer();

// The abort is stored at once; the turn ends as soon as the agent lets go.
let saved;
for (let tries = 0; saved?.id !== shown.id && tries < 100; tries++) {
  saved = (await history()).at(-1);
  if (saved?.id !== shown.id) await new Promise((resolve) => setTimeout(resolve, 50));
}
console.log("on screen at stop:", JSON.stringify(textOf(shown)));
console.log("saved in history: ", JSON.stringify(textOf(saved)));
console.log(`history == screen: ${seen(saved) === seen(shown) ? "yes" : "no"}`);
transport.close();
