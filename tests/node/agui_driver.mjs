// Drives the real AG-UI client (@ag-ui/client's HttpAgent) against a live
// turnline server, for tests/integration/test_agui.py.
//
//   node agui_driver.mjs
//
// Commands arrive as JSON lines on stdin; every command gets exactly one JSON
// line on stdout, {"re": <its id>, ...}. `connect` names the server (its URL
// and a token) for the agents made after it. Runs (`run`, `resume`) start in
// the background and report {"re": …, "settled": …} when their promise
// settles, so a test can act while a run streams.

import { createRequire } from "node:module";
import { createInterface } from "node:readline";
import { HttpAgent, runHttpRequest, transformHttpEventStream } from "@ag-ui/client";

let server = null; // {base, token}

// HttpAgent plus turnline's documented extension: it keeps the SSE id of the
// last event its parser was handed (HttpAgent's parser drops ids), and
// implements AG-UI's re-attach seam, connect(), as a GET of the run's stream
// with Last-Event-ID, parsed by the client's own HTTP/SSE pipeline.
class TurnlineAgent extends HttpAgent {
  lastEventId = null;

  constructor({ base, ...config }) {
    super(config);
    this.base = base;
    const plainFetch = this.fetch;
    this.fetch = async (url, init) => this.#tracked(await plainFetch(url, init));
  }

  #tracked(response) {
    if (!response.body || !response.ok) return response;
    const decoder = new TextDecoder();
    let buffer = "";
    const track = new TransformStream({
      transform: (chunk, controller) => {
        buffer += decoder.decode(chunk, { stream: true });
        const blocks = buffer.split("\n\n");
        buffer = blocks.pop();
        for (const block of blocks) {
          for (const line of block.split("\n")) {
            if (line.startsWith("id:")) this.lastEventId = line.slice(3).trim();
          }
        }
        controller.enqueue(chunk);
      },
    });
    return new Response(response.body.pipeThrough(track), { status: response.status, headers: response.headers });
  }

  connect(_input) {
    this.abortController = new AbortController();
    const headers = { ...this.headers, Accept: "text/event-stream" };
    if (this.lastEventId !== null) headers["Last-Event-ID"] = this.lastEventId;
    const url = `${this.base}/ag-ui/${encodeURIComponent(this.threadId)}/stream`;
    const init = { method: "GET", headers, signal: this.abortController.signal };
    return transformHttpEventStream(runHttpRequest(() => this.fetch(url, init)));
  }
}

const agents = new Map();

function view(agent) {
  return {
    messages: agent.messages,
    events: agent.events,
    lastEventId: agent.lastEventId,
    isRunning: agent.isRunning,
  };
}

function textOf(agent) {
  return agent.messages.filter((m) => m.role === "assistant").map((m) => m.content ?? "").join("");
}

function makeAgent({ name, threadId, query = "" }) {
  const { base, token } = server;
  const agent = new TurnlineAgent({
    base,
    url: `${base}/ag-ui${query}`,
    threadId,
    headers: { Authorization: `Bearer ${token}` },
  });
  agent.events = [];
  agent.waiters = new Set();
  agent.subscribe({
    onEvent: ({ event }) => {
      agent.events.push(event);
      for (const check of [...agent.waiters]) check();
    },
    onMessagesChanged: () => {
      for (const check of [...agent.waiters]) check();
    },
  });
  agents.set(name, agent);
  return agent;
}

// Resolves once `ready(agent)` holds (checked at every event and message change).
function waitFor(agent, ready) {
  return new Promise((resolve) => {
    const check = () => {
      if (ready(agent)) {
        agent.waiters.delete(check);
        resolve();
      }
    };
    agent.waiters.add(check);
    check();
  });
}

function background(id, promise, agent) {
  promise.then(
    (result) => reply(id, { settled: "ok", result: result ?? null, ...view(agent) }),
    (error) => reply(id, { settled: "threw", thrown: String(error?.message ?? error), ...view(agent) }),
  );
}

let messageCounter = 0;

const handlers = {
  version: async () => ({ version: createRequire(import.meta.url)("@ag-ui/client/package.json").version }),
  connect: async (cmd) => { server = { base: cmd.base, token: cmd.token }; return {}; },
  new: async (cmd) => { makeAgent(cmd); return {}; },
  run: async (cmd) => {
    const agent = agents.get(cmd.name);
    const id = cmd.messageId ?? `m-${process.pid}-${++messageCounter}`;
    agent.addMessage({ id, role: "user", content: cmd.content ?? cmd.text });
    const parameters = {
      ...(cmd.runId && { runId: cmd.runId }),
      ...(cmd.forwardedProps && { forwardedProps: cmd.forwardedProps }),
    };
    background(cmd.id, agent.runAgent(parameters), agent);
    return null; // answered when it settles
  },
  // AG-UI's re-attach: connectAgent() → connect() above
  resume: async (cmd) => {
    const agent = agents.get(cmd.name);
    background(cmd.id, agent.connectAgent(), agent);
    return null;
  },
  "wait-text": async (cmd) => {
    const agent = agents.get(cmd.name);
    await waitFor(agent, () => textOf(agent).includes(cmd.text));
    return view(agent);
  },
  "wait-event": async (cmd) => {
    const agent = agents.get(cmd.name);
    await waitFor(agent, () => agent.events.some((e) => e.type === cmd.type));
    return view(agent);
  },
  // the client's own stop: HttpAgent.abortRun() aborts the fetch
  abort: async (cmd) => {
    const agent = agents.get(cmd.name);
    agent.abortRun();
    return view(agent);
  },
  // turnline's cancel route; `seen` sends the id of the last event this client rendered
  cancel: async (cmd) => {
    const agent = agents.get(cmd.name);
    const body = { ...(cmd.runId ? { runId: cmd.runId } : {}), ...(cmd.seen ? { seen: agent.lastEventId } : {}) };
    const response = await fetch(`${server.base}/ag-ui/${encodeURIComponent(agent.threadId)}/cancel`, {
      method: "POST",
      headers: { "content-type": "application/json", Authorization: `Bearer ${server.token}` },
      body: JSON.stringify(body),
    });
    return { status: response.status, body: await response.json(), sent: body };
  },
  state: async (cmd) => view(agents.get(cmd.name)),
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
for (const agent of agents.values()) agent.abortRun();
process.exit(0);
