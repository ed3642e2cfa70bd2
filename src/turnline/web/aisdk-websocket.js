// A WebSocket for the AI SDK's WebSocketChatTransport (`ai` 7) that makes its
// stop exact against turnline's /api/chat/ws.
//
//   import { WebSocketChatTransport } from "ai";
//   import { turnlineWebSocket } from "/aisdk-websocket.js";   // served by turnline
//
//   new WebSocketChatTransport({ url, params: { token }, webSocket: turnlineWebSocket() });
//
// The transport's `abort` frame names only the request. The server knows what
// it sent, not what the screen showed: chunk frames still on the way when the
// user pressed stop are dropped by the transport but were sent. This socket
// counts the chunk frames it handed to the transport, per request, and adds
// that count to `abort` as `lastSequence`; turnline then saves exactly those
// chunks. (Every frame is handed over in its own event and the transport
// finishes with it before the next event, so handed over = shown.) Other
// servers ignore the extra field.
//
// `Base` is the WebSocket class to extend: the platform's by default (browsers,
// Node 22+), or e.g. the `ws` package's.

export function turnlineWebSocket(Base = globalThis.WebSocket) {
  return class TurnlineWebSocket extends Base {
    #shown = new Map(); // requestId -> the sequence of the last chunk handed to the transport

    set onmessage(handler) {
      super.onmessage = handler == null ? handler : (event) => {
        this.#track(event.data);
        return handler.call(this, event);
      };
    }

    get onmessage() {
      return super.onmessage;
    }

    send(data) {
      if (typeof data === "string" && data.startsWith('{"type":"abort"')) {
        const frame = JSON.parse(data);
        frame.lastSequence = this.#shown.get(frame.requestId) ?? -1;
        this.#shown.delete(frame.requestId);
        data = JSON.stringify(frame);
      }
      return super.send(data);
    }

    #track(data) {
      if (typeof data !== "string") return;
      let frame;
      try {
        frame = JSON.parse(data);
      } catch {
        return; // the transport reports it
      }
      if (frame?.type === "chunk" && Number.isSafeInteger(frame.sequence)) {
        this.#shown.set(frame.requestId, Math.max(frame.sequence, this.#shown.get(frame.requestId) ?? -1));
      } else if (frame?.type === "end" || frame?.type === "error" || frame?.type === "no-active") {
        this.#shown.delete(frame.requestId);
      }
    }
  };
}
