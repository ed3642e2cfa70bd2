// What the demo pages share: the chat page (app.js) and the voice page
// (voice.js) are one user on one conversation, seen two ways.

import { isValidId, newId } from "./turnline.js";

export const storage = {
  get(key, fallback = null) {
    try {
      const v = localStorage.getItem(key);
      return v === null ? fallback : JSON.parse(v);
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch { /* private mode: the demo works without it */ }
  },
};

/** One identity per browser profile: every tab of it, chat or voice, is the same user. */
export function browserUser() {
  let user = storage.get("turnline.user");
  if (!isValidId(user)) storage.set("turnline.user", (user = newId("user")));
  return user;
}

/**
 * How connect() gets a token: ?token=… in the URL, else the dev-mode route
 * /v1/dev/token for `user`. Why a dev token failed is left in
 * `ui.tokenProblem`, for the connection banner.
 */
export function tokenOptions(user, ui) {
  const fixedToken = new URLSearchParams(location.search).get("token");
  if (fixedToken) return { token: fixedToken };
  return {
    async getToken() {
      const r = await fetch(`v1/dev/token?sub=${encodeURIComponent(user)}`, { method: "POST" });
      if (!r.ok) {
        // 404/405: no such route (not in dev mode); 403: dev mode, but not for this
        // page (opened through a proxy or from another machine).
        const why = r.status === 403 ? await r.json().then((b) => b.error?.message, () => null) : null;
        ui.tokenProblem = r.status === 404 || r.status === 405
          ? "This server is not in dev mode: open the page with ?token=… (turnline token --sub NAME)."
          : r.status === 403
            ? `No dev token for this page (${why ?? "forbidden"}): open it with ?token=… (turnline token --sub NAME).`
            : `Could not get a token (HTTP ${r.status}).`;
        throw new Error(ui.tokenProblem);
      }
      ui.tokenProblem = null;
      return (await r.json()).token;
    },
  };
}

/** The session id in the URL hash, or null. */
export function sessionFromHash() {
  const id = decodeURIComponent(location.hash.slice(1));
  return isValidId(id) ? id : null;
}

/**
 * Makes `container`'s children match `blocks` (each with a unique `key`),
 * keeping the element of a key across renders; `patch(el, block)` updates one.
 */
export function reconcile(container, blocks, patch) {
  const existing = new Map();
  for (const el of container.children) existing.set(el.dataset.key, el);
  let prev = null;
  for (const b of blocks) {
    let el = existing.get(b.key);
    existing.delete(b.key);
    if (!el) {
      el = document.createElement("div");
      el.dataset.key = b.key;
    }
    patch(el, b);
    const next = prev ? prev.nextSibling : container.firstChild;
    if (el !== next) container.insertBefore(el, next);
    prev = el;
  }
  for (const el of existing.values()) el.remove();
}

const sigs = new WeakMap();
/** A message's content as a string, to see cheaply whether it changed (messages are replaced, not mutated). */
export function messageSig(message) {
  let s = sigs.get(message);
  if (s === undefined) sigs.set(message, (s = JSON.stringify([message.parts, message.metadata ?? null])));
  return s;
}

export function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

export function truncate(s, n) {
  s = s.replace(/\s+/g, " ").trim();
  return s.length > n ? `${s.slice(0, n - 1)}…` : s;
}

/** Shows `text` in `el` for `ms`; a newer toast replaces it. */
export function showToast(el, text, ms) {
  el.textContent = text;
  el.hidden = false;
  clearTimeout(el.toastTimer);
  el.toastTimer = setTimeout(() => { el.hidden = true; }, ms);
}

/** The connection banner of a page: hidden while connected, "recovered" for a
 * moment after a reconnect, otherwise the state and why. `ui` holds the page's
 * `wasReconnecting`, `bannerTimer` and `tokenProblem`; `texts.recovered()` and
 * `texts.reconnecting(why, secs)` are the page's own words. */
export function renderBanner(conn, els, ui, texts) {
  const state = conn.state;
  const banner = els.banner;
  if (state === "connected") {
    if (ui.wasReconnecting) {
      ui.wasReconnecting = false;
      banner.dataset.state = "recovered";
      els.bannerText.textContent = texts.recovered();
      banner.hidden = false;
      clearTimeout(ui.bannerTimer);
      ui.bannerTimer = setTimeout(() => {
        if (conn.state === "connected") banner.hidden = true;
      }, 2500);
    } else if (banner.dataset.state !== "recovered") {
      banner.hidden = true;
      banner.dataset.state = "connected";
    }
    return;
  }
  clearTimeout(ui.bannerTimer);
  banner.hidden = false;
  banner.dataset.state = state;
  if (state === "reconnecting") {
    ui.wasReconnecting = true;
    const secs = conn.retryAt ? Math.max(0, Math.ceil((conn.retryAt - Date.now()) / 1000)) : 0;
    const why = ui.tokenProblem ?? (navigator.onLine === false ? "You're offline." : "Connection lost.");
    els.bannerText.textContent = texts.reconnecting(why, secs);
  } else if (state === "closed") {
    els.bannerText.textContent = conn.error ? `Disconnected: ${conn.error.message}` : "Disconnected.";
  } else {
    els.bannerText.textContent = "Connecting…";
  }
  els.retry.hidden = state !== "reconnecting";
}
