// AG-UI's HttpAgent (@ag-ui/client, what CopilotKit builds on) against turnline:
// ask, drop the connection mid-answer and re-attach with Last-Event-ID (no word
// lost or repeated), then stop an answer with the cancel route.
//
//   npm install @ag-ui/client      (1.0 or later)
//   turnline serve                 (dev mode on loopback; prints a dev token)
//   node examples/ag_ui_client.mjs
//
// TURNLINE_URL (default http://127.0.0.1:8787) and TURNLINE_TOKEN (default: a
// token from the dev-mode route) point it at your own server.

import { HttpAgent, runHttpRequest, transformHttpEventStream } from "@ag-ui/client";

const base = process.env.TURNLINE_URL ?? "http://127.0.0.1:8787";
const token = process.env.TURNLINE_TOKEN ?? (await devToken());
const auth = { Authorization: `Bearer ${token}` };

async function devToken() {
  const response = await fetch(`${base}/v1/dev/token?sub=ag-ui-example`, { method: "POST" });
  if (!response.ok) throw new Error("set TURNLINE_TOKEN (the server is not in dev mode)");
  return (await response.json()).token;
}

// HttpAgent plus turnline's extension (docs/ag-ui.md): remember the SSE id of
// the last event read (HttpAgent's parser drops ids), and re-attach through
// AG-UI's connect() seam with a GET carrying it as Last-Event-ID.
class TurnlineAgent extends HttpAgent {
  lastEventId = null;

  constructor(config) {
    super({ ...config, url: `${base}/ag-ui` });
    const plainFetch = this.fetch;
    this.fetch = async (url, init) => this.#remember(await plainFetch(url, init));
  }

  #remember(response) {
    if (!response.ok || !response.body) return response;
    const decoder = new TextDecoder();
    let pending = "";
    const ids = new TransformStream({
      transform: (chunk, controller) => {
        const blocks = (pending += decoder.decode(chunk, { stream: true })).split("\n\n");
        pending = blocks.pop();
        for (const line of blocks.flatMap((block) => block.split("\n"))) {
          if (line.startsWith("id:")) this.lastEventId = line.slice(3).trim();
        }
        controller.enqueue(chunk);
      },
    });
    return new Response(response.body.pipeThrough(ids), { status: response.status, headers: response.headers });
  }

  connect() {
    this.abortController = new AbortController();
    const headers = { ...this.headers, Accept: "text/event-stream" };
    if (this.lastEventId !== null) headers["Last-Event-ID"] = this.lastEventId;
    const url = `${base}/ag-ui/${encodeURIComponent(this.threadId)}/stream`;
    return transformHttpEventStream(runHttpRequest(() =>
      this.fetch(url, { method: "GET", headers, signal: this.abortController.signal })));
  }
}

// The thread id is the turnline session id.
const agent = new TurnlineAgent({ threadId: `ag-ui-example-${Date.now()}`, headers: auth });
// The answer on screen: the assistant's text since the last question (a
// tool call splits it into several AG-UI messages).
const answer = () => {
  const asked = agent.messages.findLastIndex((m) => m.role === "user");
  return agent.messages.slice(asked + 1).filter((m) => m.role === "assistant").map((m) => m.content ?? "").join("");
};
const words = () => answer().split(" ").length;
// Subscribed before any run: a run calls the subscribers it had when it began.
let waiters = [];
let outcome = null;
agent.subscribe({
  onMessagesChanged: () => { waiters = waiters.filter(({ ready, resolve }) => !(ready() && (resolve(), true))); },
  onRunFinishedEvent: ({ outcome: finished }) => { outcome = finished; },
});
const until = (ready) => new Promise((resolve) => waiters.push({ ready, resolve }));
const savedAnswer = async () => {
  const url = `${base}/v1/sessions/${agent.threadId}/messages`;
  const { messages } = await (await fetch(url, { headers: auth })).json();
  return messages.at(-1).parts.filter((p) => p.type === "text").map((p) => p.text).join("");
};

// 1. Ask; drop the connection after a few words (abortRun aborts the fetch;
//    the server goes on), then re-attach where this client left off.
agent.addMessage({ id: `q-${Date.now()}`, role: "user", content: "What is the weather in Paris?" });
const first = agent.runAgent();
await until(() => words() > 3);
agent.abortRun();
await first;
console.log(`dropped after event ${agent.lastEventId}: ${JSON.stringify(answer())}`);
await agent.connectAgent();
console.log(`resumed, run ${outcome}: ${JSON.stringify(answer())}`);
console.log(`no word lost or repeated: ${(await savedAnswer()) === answer() ? "yes" : "no"}`);

// 2. Ask again and stop mid-answer with the cancel route: the stream stays
//    open and ends with RUN_FINISHED, outcome cancelled.
agent.addMessage({ id: `q-${Date.now()}`, role: "user", content: "Why does the stop button matter?" });
const second = agent.runAgent();
await until(() => words() > 8);
const cancel = await fetch(`${base}/ag-ui/${agent.threadId}/cancel`, {
  method: "POST", headers: { ...auth, "content-type": "application/json" }, body: "{}",
});
console.log("cancel:", JSON.stringify(await cancel.json()));
await second;
const savedText = await savedAnswer();
console.log(`run ${outcome}; on screen: ${JSON.stringify(answer())}`);
console.log(`history == screen: ${savedText === answer() ? "yes" : "no"}`);
