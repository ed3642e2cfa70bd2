// The AI SDK's Chat (what `useChat` wraps) against turnline, without React:
// ask, stream the answer, then press stop mid-answer. The stop tells the
// server what this screen showed, so the saved answer equals it exactly.
//
//   npm install ai                 (major 5, 6 or 7)
//   turnline serve                 (dev mode when no secret or key is configured; prints a dev token)
//   node examples/ai_sdk_client.mjs
//
// TURNLINE_URL (default http://127.0.0.1:8787) and TURNLINE_TOKEN (default: a
// token from the dev-mode route) point it at your own server.

import { AbstractChat, DefaultChatTransport } from "ai";

const base = process.env.TURNLINE_URL ?? "http://127.0.0.1:8787";
const token = process.env.TURNLINE_TOKEN ?? (await devToken());
const auth = { Authorization: `Bearer ${token}` };

async function devToken() {
  const response = await fetch(`${base}/v1/dev/token?sub=ai-sdk-example`, { method: "POST" });
  if (!response.ok) throw new Error("set TURNLINE_TOKEN (the server is not in dev mode)");
  return (await response.json()).token;
}

// What a UI framework keeps: the messages and the status. Every change is a
// "render"; here it only wakes whoever waits for one.
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

// The chat id is the turnline session id.
const chat = new Chat({
  id: `ai-sdk-example-${Date.now()}`,
  transport: new DefaultChatTransport({ api: `${base}/api/chat`, headers: () => auth }),
});

const lastAnswer = () => chat.messages.findLast((m) => m.role === "assistant");
const textOf = (message) => message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
// What a person sees of a message: text, reasoning, tool calls with their input.
const seen = (message) => message.parts.map((p) =>
  p.type === "text" || p.type === "reasoning" ? `${p.type}: ${p.text}`
    : p.type.startsWith("tool-") ? `${p.type}: ${JSON.stringify(p.input)}` : p.type).join("\n");

// 1. Ask and wait for the whole answer.
await chat.sendMessage({ text: "What is the weather in Paris?" });
const first = lastAnswer();
console.log("answer:", textOf(first));

// 2. Ask again and press stop after a few words.
const asking = chat.sendMessage({ text: "Why does the stop button matter?" });
await chat.screen.until(() => lastAnswer() !== first && textOf(lastAnswer()).split(" ").length > 8);
await chat.stop(); // the AI SDK's stop(): aborts this fetch only; the agent still runs
await asking;
const shown = lastAnswer();
const stop = await fetch(`${base}/api/chat/${chat.id}/stop`, {
  method: "POST",
  headers: { ...auth, "content-type": "application/json" },
  body: JSON.stringify({ messageId: shown.id, parts: shown.parts }), // what this screen showed
});
console.log("stop:", JSON.stringify(await stop.json()));

// The stop is answered once stored; the turn ends as soon as the agent lets go.
let saved;
for (let tries = 0; saved?.id !== shown.id && tries < 100; tries++) {
  const history = await (await fetch(`${base}/v1/sessions/${chat.id}/messages`, { headers: auth })).json();
  saved = history.messages.at(-1);
  if (saved?.id !== shown.id) await new Promise((resolve) => setTimeout(resolve, 50));
}
console.log("on screen at stop:", JSON.stringify(textOf(shown)));
console.log("saved in history: ", JSON.stringify(textOf(saved)));
console.log(`history == screen: ${seen(saved) === seen(shown) ? "yes" : "no"}`);
