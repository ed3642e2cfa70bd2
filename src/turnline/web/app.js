// The turnline demo chat: a plain page on top of turnline.js (no framework).
// The session id lives in the URL hash, so a second tab (or a reload) shows
// the same conversation, live. Tokens come from the dev-mode route
// /v1/dev/token; ?token=… in the URL uses a fixed token instead.

import { connect, isValidId, messageText, newId } from "./turnline.js";
import {
  browserUser, escapeHtml, messageSig, reconcile, renderBanner, sessionFromHash, showToast, storage, tokenOptions, truncate,
} from "./ui.js";

const $ = (sel) => document.querySelector(sel);
const els = {
  app: $("#app"), thread: $("#thread"), inner: $("#thread-inner"), empty: $("#empty"), input: $("#input"),
  composer: $("#composer"), send: $("#send"), stopSmall: $("#stop-small"), policy: $("#policy"),
  policyHint: $("#policy-hint"), presence: $("#presence"), banner: $("#banner"), bannerText: $("#banner-text"),
  retry: $("#retry"), title: $("#chat-title"), chatId: $("#chat-id"), chatList: $("#chat-list"),
  newChat: $("#new-chat"), openTab: $("#open-tab"), whoami: $("#whoami"), whoamiAvatar: $("#whoami-avatar"),
  toast: $("#toast"), menu: $("#menu"), sidebar: $("#sidebar"),
};

const SYSTEM_PROMPT = "You are a helpful assistant.";
const POLICY_HINTS = {
  concurrent: "a new message gets its own answer, side by side",
  queue: "a new message waits until the current answer ends",
  interrupt: "a new message stops the current answer",
  reject: "no new message while the assistant answers",
  rollback: "a new message replaces the one being answered",
};
const PRESENCE_LABELS = { idle: "Ready", thinking: "Thinking…", streaming: "Writing…", offline: "Agent offline" };

// One identity per browser profile: every tab of it is the same user, so a
// second tab may stop what the first one started.
const user = browserUser();

const ui = {
  editing: null, // id of the message being edited
  rejected: new Map(), // session → [{id, text, code}]
  open: new Map(), // reasoning part key → open?
  wasReconnecting: false,
  tokenProblem: null,
  forceScroll: true,
};
const conn = connect({ url: "v1/ws", ...tokenOptions(user, ui) });
let chat = null;

// ------------------------------------------------------------------ sessions and routing

function openChat(id) {
  if (chat?.id === id) return;
  chat?.close();
  ui.editing = null;
  els.inner.replaceChildren();
  chat = conn.session(id);
  chat.on("change", schedule);
  chat.on("state", schedule);
  chat.on("rejected", (r) => {
    const list = ui.rejected.get(chat.id) ?? [];
    list.push({ id: r.messageIds[r.messageIds.length - 1], text: messageText(r.messages[r.messages.length - 1]), code: r.code });
    ui.rejected.set(chat.id, list);
    schedule();
  });
  ui.forceScroll = true;
  els.chatId.textContent = id;
  els.openTab.href = location.href;
  renderChatList();
  schedule();
}

/** Chats are listed once they have a first question (its text is the title). */
function rememberChat(id, title) {
  const chats = storage.get("turnline.chats", []).filter((c) => c && isValidId(c.id));
  const existing = chats.find((c) => c.id === id);
  if (existing) existing.title = title;
  else chats.unshift({ id, title, ts: Date.now() });
  storage.set("turnline.chats", chats.slice(0, 30));
  renderChatList(chats);
}

function renderChatList(chats = storage.get("turnline.chats", [])) {
  if (chat && !chats.some((c) => c.id === chat.id)) chats = [{ id: chat.id, title: "New chat" }, ...chats];
  els.chatList.replaceChildren(...chats.slice(0, 30).map((c) => {
    const a = document.createElement("a");
    a.href = `#${c.id}`;
    a.className = "chat-link" + (c.id === chat?.id ? " active" : "");
    a.textContent = c.title || "New chat";
    a.title = c.title || c.id;
    return a;
  }));
}

window.addEventListener("hashchange", () => {
  const id = sessionFromHash();
  if (id) openChat(id);
  els.app.classList.remove("show-sidebar");
});

els.newChat.addEventListener("click", () => {
  location.hash = newId("chat");
  els.input.focus();
});

els.menu.addEventListener("click", () => els.app.classList.toggle("show-sidebar"));

// ------------------------------------------------------------------ rendering

let scheduled = false;
function schedule() {
  if (scheduled) return;
  scheduled = true;
  let done = false;
  const run = () => {
    if (done) return;
    done = true;
    scheduled = false;
    render();
  };
  requestAnimationFrame(run);
  setTimeout(run, 100); // frames are throttled in background tabs
}

function render() {
  if (!chat) return;
  const view = chat.view;
  const seq = view.lastSeq;
  const thread = els.thread;
  const nearBottom = thread.scrollHeight - thread.scrollTop - thread.clientHeight < 120;
  renderThread(view);
  renderHeader(view);
  renderComposer(view);
  if (ui.forceScroll || nearBottom) thread.scrollTop = thread.scrollHeight;
  ui.forceScroll = false;
  // Everything up to `seq` is on screen now: a stop saves exactly this.
  chat.markRendered(seq);
}

function renderHeader(view) {
  // The chat's first question in log order (stable whichever branch is shown).
  let first = null;
  for (const m of view.core.messages.values()) if (m.role === "user" && !view.isHidden(m.id)) { first = m; break; }
  first ??= view.messages().find((m) => m.role === "user");
  const title = first ? truncate(messageText(first).replace(/[*_`#>]/g, ""), 48) : "New chat";
  if (els.title.textContent !== title) {
    els.title.textContent = title;
    document.title = `${title} · turnline`;
    if (first) rememberChat(chat.id, title);
  }
  const state = view.presence;
  const stale = conn.state !== "connected"; // last known, until the connection is back
  els.presence.dataset.state = state;
  els.presence.classList.toggle("stale", stale);
  els.presence.title = stale ? "Last known state: reconnecting…" : "";
  els.presence.querySelector(".label").textContent = PRESENCE_LABELS[state] ?? state;
  renderConnection();
}

function renderConnection() {
  renderBanner(conn, els, ui, {
    recovered: () => "Back online — you're all caught up.",
    reconnecting: (why, secs) =>
      `${why} Reconnecting${secs > 0 ? ` in ${secs}s` : "…"} — nothing is lost: answers keep going on the server.`,
  });
}

function renderComposer(view) {
  const own = view.ownActiveTurns(chat.clientId);
  const hasText = els.input.value.trim().length > 0;
  const mode = own.length && !hasText ? "stop" : "send";
  els.send.dataset.mode = mode;
  els.send.setAttribute("aria-label", mode === "stop" ? "Stop" : "Send");
  els.send.title = mode === "stop" ? "Stop the answer" : "Send";
  els.send.disabled = mode === "send" && !hasText;
  els.stopSmall.hidden = !(own.length && hasText);
  els.policyHint.textContent = POLICY_HINTS[els.policy.value];
}

// A thread is a list of blocks, each keyed; the DOM is patched per block so
// open reasoning, text selection and an edit in progress survive re-renders.
function threadBlocks(view) {
  const blocks = [];
  const path = view.messages();
  for (let i = 0; i < path.length; i++) {
    const m = path[i];
    if (m.role === "system") continue;
    const lanes = m.role === "user" ? view.lanes(m.id) : [];
    if (lanes.length) {
      const columns = lanes.map((id) => {
        const branch = view.messages(view.leafUnder(id));
        return branch.slice(branch.findIndex((x) => x.id === id)).map((msg) => messageBlock(view, msg, true));
      });
      blocks.push({ kind: "lanes", key: `lanes:${m.parent_id}`, columns });
      break;
    }
    blocks.push(messageBlock(view, m, false, path[i + 1]));
  }
  for (const q of view.queued()) {
    for (const m of q.messages) blocks.push({ ...messageBlock(view, m, false), queued: q });
  }
  for (const r of ui.rejected.get(chat.id) ?? []) blocks.push({ kind: "rejected", key: `rejected:${r.id}`, rejected: r });
  return blocks;
}

function messageBlock(view, m, inLane, next = null) {
  const sibs = inLane && m.role === "user" ? [m.id] : siblingsOf(view, m); // a lane shows its siblings beside it
  return {
    kind: "message", key: m.id, message: m, status: view.status(m.id), inLane,
    sibIndex: sibs.indexOf(m.id), sibCount: sibs.length, hidden: view.isHidden(m.id),
    followedByUser: next?.role === "user", error: view.errorOf(m.id), editing: ui.editing === m.id,
    mine: m.role === "user" && view.isOptimistic(m.id),
  };
}

function renderThread(view) {
  const blocks = threadBlocks(view);
  els.empty.hidden = blocks.length > 0;
  reconcile(els.inner, blocks, patch);
}

function patch(el, b) {
  if (b.kind === "lanes") {
    el.className = "lanes";
    el.dataset.testid = "lanes";
    el.style.setProperty("--lanes", b.columns.length);
    while (el.children.length < b.columns.length) {
      const col = document.createElement("div");
      col.className = "lane";
      col.dataset.testid = "lane";
      el.append(col);
    }
    while (el.children.length > b.columns.length) el.lastChild.remove();
    b.columns.forEach((blocks, i) => reconcile(el.children[i], blocks, patch));
    return;
  }
  if (b.kind === "rejected") {
    if (el._sig === "rejected") return;
    el._sig = "rejected";
    el.className = "row user rejected";
    el.dataset.testid = "rejected";
    const reason = b.rejected.code === "queue_full" ? "the queue is full" : "the assistant is still answering";
    el.innerHTML = `<div class="bubble">${escapeHtml(b.rejected.text)}</div>
      <div class="meta"><span class="chip danger" data-testid="rejected-chip">Not sent — ${escapeHtml(reason)}</span>
      <button class="link" data-action="retry-rejected" data-id="${attr(b.rejected.id)}">Try again</button>
      <button class="link" data-action="dismiss-rejected" data-id="${attr(b.rejected.id)}">Dismiss</button></div>`;
    return;
  }
  const m = b.message;
  const sig = [messageSig(m), b.status, b.sibIndex, b.sibCount, b.hidden, b.followedByUser, b.editing,
    b.queued ? b.queued.turnId ?? "pending" : "", b.inLane].join("|");
  if (el._sig === sig) return;
  el._sig = sig;
  el.className = `row ${m.role}${b.status === "streaming" ? " streaming" : ""}${b.hidden ? " rolled-back" : ""}`
    + `${b.queued ? " queued" : ""}`;
  el.dataset.testid = "message";
  el.dataset.id = m.id;
  el.dataset.role = m.role;
  el.dataset.status = b.queued ? "queued" : b.status;
  el.innerHTML = m.role === "user" ? userHtml(b) : assistantHtml(b);
  if (b.editing) {
    const ta = el.querySelector("textarea");
    ta.value = messageText(m);
    autosize(ta);
    ta.focus();
  }
}

function branchNav(b) {
  if (b.sibCount < 2) return "";
  return `<span class="branch" data-testid="branch" data-index="${b.sibIndex + 1}" data-count="${b.sibCount}">
    <button class="nav" data-action="prev" data-id="${attr(b.message.id)}" ${b.sibIndex === 0 ? "disabled" : ""} aria-label="Previous version">‹</button>
    <span class="branch-pos">${b.sibIndex + 1}/${b.sibCount}</span>
    <button class="nav" data-action="next" data-id="${attr(b.message.id)}" ${b.sibIndex === b.sibCount - 1 ? "disabled" : ""} aria-label="Next version">›</button>
  </span>`;
}

function userHtml(b) {
  const m = b.message;
  if (b.editing) {
    return `<div class="bubble editing"><textarea data-testid="edit-input" rows="1"></textarea>
      <div class="edit-actions"><button class="btn ghost" data-action="edit-cancel">Cancel</button>
      <button class="btn primary" data-action="edit-save" data-id="${attr(m.id)}" data-testid="edit-save">Send</button></div></div>`;
  }
  const chips = [];
  if (b.queued) {
    chips.push(`<span class="chip queued" data-testid="queued-chip">Queued</span>`);
    if (b.queued.turnId) chips.push(`<button class="link" data-action="cancel-queued" data-turn="${attr(b.queued.turnId)}">Remove</button>`);
  }
  if (b.status === "sending") chips.push(`<span class="chip muted" data-testid="sending-chip">Sending…</span>`);
  if (b.hidden) chips.push(`<span class="chip muted" data-testid="rolled-back-chip">Rolled back</span>`);
  const actions = b.queued || b.status === "sending" ? "" : `
    <button class="icon-action" data-action="copy" data-id="${attr(m.id)}" title="Copy">${ICON.copy}</button>
    <button class="icon-action" data-action="edit" data-id="${attr(m.id)}" data-testid="edit" title="Edit">${ICON.edit}</button>`;
  return `<div class="bubble">${partsHtml(m, b)}</div>
    <div class="meta">${chips.join("")}${branchNav(b)}<span class="actions">${actions}</span></div>`;
}

function assistantHtml(b) {
  const m = b.message;
  const chips = [];
  const interrupted = m.metadata?.interrupted;
  if (b.status === "thinking") chips.push(`<span class="chip muted">Thinking…</span>`);
  if (b.status === "stopping") chips.push(`<span class="chip muted">Stopping…</span>`);
  if (b.status === "cancelled" || (interrupted && b.status !== "stopping")) {
    chips.push(`<span class="chip warn" data-testid="interrupted-chip">${b.followedByUser ? "Interrupted" : "Stopped"}</span>`);
  }
  if (b.status === "error") {
    chips.push(`<span class="chip danger" data-testid="error-chip">Error${b.error ? `: ${escapeHtml(b.error.message)}` : ""}</span>`);
  }
  if (b.hidden) chips.push(`<span class="chip muted">Rolled back</span>`);
  const ended = ["complete", "cancelled", "error"].includes(b.status);
  const actions = ended ? `
    <button class="icon-action" data-action="copy" data-id="${attr(m.id)}" title="Copy">${ICON.copy}</button>
    <button class="icon-action" data-action="regenerate" data-id="${attr(m.id)}" data-testid="regenerate" title="Regenerate">${ICON.regen}</button>` : "";
  const body = b.status === "thinking" && !m.parts.some(visiblePart)
    ? `<div class="typing" aria-label="Thinking"><i></i><i></i><i></i></div>` : partsHtml(m, b);
  return `<div class="avatar" aria-hidden="true"></div>
    <div class="content"><div class="body">${body}</div>
    <div class="meta">${branchNav(b)}${chips.join("")}<span class="actions">${actions}</span></div></div>`;
}

const visiblePart = (p) => p.type !== "step-start";

/** Versions of a message: its siblings of the same role, rolled-back ones included. */
function siblingsOf(view, m) {
  return view.siblings(m.id, { includeHidden: true }).filter((id) => view.message(id)?.role === m.role);
}

function partsHtml(m, b) {
  const out = [];
  m.parts.forEach((p, i) => {
    if (p.type === "text") {
      out.push(`<div class="md" data-testid="text">${renderMarkdown(p.text ?? "")}</div>`);
    } else if (p.type === "reasoning") {
      const key = `${m.id}:${i}`;
      const streaming = p.state === "streaming" && b.status === "streaming";
      const open = ui.open.has(key) ? ui.open.get(key) : streaming;
      out.push(`<details class="reasoning" data-rkey="${attr(key)}" ${open ? "open" : ""}>
        <summary>${streaming ? `<span class="shimmer">Thinking…</span>` : "Thought process"}</summary>
        <div class="reasoning-text">${escapeHtml(p.text ?? "")}</div></details>`);
    } else if (p.type.startsWith("tool-") || p.type === "dynamic-tool") {
      out.push(toolHtml(p));
    } else if (p.type === "source-url") {
      out.push(`<a class="source" href="${attr(p.url)}" target="_blank" rel="noopener noreferrer">${escapeHtml(p.title || p.url)}</a>`);
    } else if (p.type === "file" && typeof p.mediaType === "string" && p.mediaType.startsWith("image/")) {
      out.push(`<img class="file" alt="" src="${attr(p.url)}">`);
    }
  });
  return out.join("");
}

function toolHtml(p) {
  const name = p.type === "dynamic-tool" ? p.toolName : p.type.slice(5);
  const states = {
    "input-streaming": ["running", "Preparing…"], "input-available": ["running", "Running…"],
    "output-available": ["done", "Done"], "output-error": ["error", p.errorText === "cancelled" ? "Cancelled" : "Failed"],
  };
  const [cls, label] = states[p.state] ?? ["running", p.state];
  const io = (k, v) => (v === undefined || v === null ? "" :
    `<div class="tool-io"><span class="tool-k">${k}</span><pre>${escapeHtml(typeof v === "string" ? v : JSON.stringify(v, null, 2))}</pre></div>`);
  return `<div class="tool" data-testid="tool" data-state="${attr(p.state)}">
    <div class="tool-head"><span class="tool-icon">${ICON.tool}</span><span class="tool-name">${escapeHtml(name)}</span>
    <span class="tool-state ${cls}">${cls === "running" ? `<span class="spinner sm"></span>` : ""}${escapeHtml(label)}</span></div>
    ${io("Input", p.input)}${p.state === "output-available" ? io("Result", p.output) : ""}
    ${p.state === "output-error" && p.errorText !== "cancelled" ? io("Error", p.errorText) : ""}</div>`;
}

// ------------------------------------------------------------------ markdown, just enough

const attr = escapeHtml;

function inlineMd(text) {
  return text.split(/(`[^`\n]+`)/g).map((seg, i) => {
    if (i % 2) return `<code>${escapeHtml(seg.slice(1, -1))}</code>`;
    return escapeHtml(seg)
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^)\s]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  }).join("");
}

function mdBlocks(text) {
  const out = [];
  let para = [];
  let list = null;
  const flushPara = () => {
    if (para.length) out.push(`<p>${para.map(inlineMd).join("<br>")}</p>`);
    para = [];
  };
  const flushList = () => {
    if (list) out.push(`<${list.tag}>${list.items.map((x) => `<li>${inlineMd(x)}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  for (const line of text.split("\n")) {
    let m;
    if (!line.trim()) {
      flushPara();
      flushList();
    } else if ((m = /^(#{1,4})\s+(.*)$/.exec(line))) {
      flushPara();
      flushList();
      out.push(`<h${m[1].length + 2}>${inlineMd(m[2])}</h${m[1].length + 2}>`);
    } else if ((m = /^\s*(?:[-*•]|(\d+)[.)])\s+(.*)$/.exec(line))) {
      flushPara();
      const tag = m[1] ? "ol" : "ul";
      if (list && list.tag !== tag) flushList();
      (list ??= { tag, items: [] }).items.push(m[2]);
    } else if ((m = /^>\s?(.*)$/.exec(line))) {
      flushPara();
      flushList();
      out.push(`<blockquote>${inlineMd(m[1])}</blockquote>`);
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara();
  flushList();
  return out.join("");
}

function renderMarkdown(src) {
  const out = [];
  const fence = /```([\w+#.-]*)[^\n]*\n?([\s\S]*?)(?:```|$)/g;
  let last = 0;
  let m;
  while ((m = fence.exec(src))) {
    if (m.index > last) out.push(mdBlocks(src.slice(last, m.index)));
    out.push(`<div class="code"><div class="code-head"><span>${escapeHtml(m[1] || "code")}</span>
      <button class="link" data-action="copy-code">Copy</button></div><pre><code>${escapeHtml(m[2].replace(/\n$/, ""))}</code></pre></div>`);
    last = fence.lastIndex;
  }
  if (last < src.length) out.push(mdBlocks(src.slice(last)));
  return out.join("");
}

const ICON = {
  copy: `<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="9" y="9" width="11" height="11" rx="2"/><path d="M5 15V5a1 1 0 0 1 1-1h10"/></svg>`,
  edit: `<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 20h4L19 9l-4-4L4 16v4zM14 6l4 4"/></svg>`,
  regen: `<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M20 11a8 8 0 1 0-2.3 5.7M20 4v7h-7"/></svg>`,
  tool: `<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M14.7 6.3a4 4 0 0 0-5.4 5.2L4 16.8 7.2 20l5.3-5.3a4 4 0 0 0 5.2-5.4l-2.5 2.5-2.5-.7-.7-2.5z"/></svg>`,
};

// ------------------------------------------------------------------ actions

function toast(text) {
  showToast(els.toast, text, 4000);
}

function autosize(ta = els.input) {
  ta.style.height = "auto";
  ta.style.height = `${Math.min(ta.scrollHeight, 220)}px`;
}

async function submit(text = els.input.value) {
  text = text.trim();
  if (!text || !chat) return;
  const view = chat.view;
  const options = { policy: els.policy.value };
  // After browsing to another branch, a new message continues that branch.
  if (view.selected !== null) {
    const leaf = view.leaf();
    if (view.core.messages.has(leaf) && !view.isHidden(leaf)) options.parentId = leaf;
  } else if (view.core.head === null && options.policy === "concurrent") {
    // Before the first answer ends the server has no head to hang a message
    // from: name the chat's system message, so both questions are answered side by side.
    const root = view.messages()[0];
    if (root?.role === "system") options.parentId = root.id;
  }
  // A new chat starts with a system message, so that even its first question can be edited.
  const fresh = chat.state === "live" && view.lastSeq === 0 && view.optimistic.length === 0;
  const content = fresh ? [{ role: "system", text: SYSTEM_PROMPT }, text] : text;
  if (text === els.input.value.trim()) {
    els.input.value = "";
    autosize();
  }
  ui.forceScroll = true;
  ui.rejected.delete(chat.id);
  try {
    await chat.send(content, options);
  } catch (err) {
    toast(`Not sent: ${err.detail || err.message}`);
    if (!els.input.value) els.input.value = text;
  }
  schedule();
}

async function stop(options = {}) {
  try {
    await chat.cancel(options);
  } catch (err) {
    toast(`Could not stop: ${err.detail || err.message}`);
  }
}

els.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  if (els.input.value.trim()) submit();
  else if (chat?.view.ownActiveTurns(chat.clientId).length) stop();
});

els.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    if (els.input.value.trim()) submit();
  }
});

els.input.addEventListener("input", () => {
  autosize();
  if (chat) renderComposer(chat.view);
});

els.stopSmall.addEventListener("click", () => stop());
els.retry.addEventListener("click", () => conn.retryNow());

els.policy.value = storage.get("turnline.policy", "concurrent");
if (!els.policy.value) els.policy.value = "concurrent";
els.policy.addEventListener("change", () => {
  storage.set("turnline.policy", els.policy.value);
  schedule();
});

document.querySelector(".suggestions").addEventListener("click", (e) => {
  const text = e.target.closest("[data-suggest]")?.dataset.suggest;
  if (text) submit(text);
});

els.inner.addEventListener("toggle", (e) => {
  const key = e.target.dataset?.rkey;
  if (key) ui.open.set(key, e.target.open);
}, true);

els.inner.addEventListener("click", async (e) => {
  const button = e.target.closest("[data-action]");
  if (!button || !chat) return;
  const { action, id } = button.dataset;
  const view = chat.view;
  try {
    if (action === "prev" || action === "next") {
      const sibs = siblingsOf(view, view.message(id));
      const target = sibs[sibs.indexOf(id) + (action === "prev" ? -1 : 1)];
      if (target) chat.select(target);
    } else if (action === "edit") {
      ui.editing = id;
      schedule();
    } else if (action === "edit-cancel") {
      ui.editing = null;
      schedule();
    } else if (action === "edit-save") {
      const text = button.closest(".row").querySelector("textarea").value.trim();
      ui.editing = null;
      ui.forceScroll = true;
      if (text) await chat.edit(id, text, { policy: els.policy.value });
      schedule();
    } else if (action === "regenerate") {
      ui.forceScroll = true;
      await chat.regenerate(id);
    } else if (action === "copy") {
      await navigator.clipboard?.writeText(messageText(view.message(id)));
      toast("Copied");
    } else if (action === "copy-code") {
      await navigator.clipboard?.writeText(button.closest(".code").querySelector("code").textContent);
      toast("Copied");
    } else if (action === "cancel-queued") {
      await chat.cancel({ turnId: button.dataset.turn });
    } else if (action === "dismiss-rejected" || action === "retry-rejected") {
      const list = ui.rejected.get(chat.id) ?? [];
      const item = list.find((r) => r.id === id);
      ui.rejected.set(chat.id, list.filter((r) => r.id !== id));
      if (action === "retry-rejected" && item) submit(item.text);
      schedule();
    }
  } catch (err) {
    toast(err.detail || err.message);
  }
});

els.inner.addEventListener("keydown", (e) => {
  if (e.target.matches("[data-testid=edit-input]")) {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      e.target.closest(".row").querySelector("[data-action=edit-save]").click();
    } else if (e.key === "Escape") {
      ui.editing = null;
      schedule();
    }
  }
});
els.inner.addEventListener("input", (e) => {
  if (e.target.matches("textarea")) autosize(e.target);
});

// ------------------------------------------------------------------ start

conn.on("state", () => {
  if (chat) renderHeader(chat.view);
  if (chat) renderComposer(chat.view);
});
setInterval(() => { if (conn.state === "reconnecting") renderConnection(); }, 500);

els.whoami.textContent = user;
els.whoamiAvatar.textContent = user.slice(5, 6).toUpperCase();
const initial = sessionFromHash() ?? newId("chat");
if (!sessionFromHash()) history.replaceState(null, "", `#${initial}`);
openChat(initial);
els.input.focus();

// For debugging in the console (and for the browser tests).
window.turnlineDemo = { conn, get chat() { return chat; }, user };
