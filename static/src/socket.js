// The room socket /ws/rooms/{id}: connect, reconnect with backoff and resume.
// No DOM here: the room page gives callbacks and reads state changes.

const BASE_DELAY = 1000;
const MAX_DELAY = 30000;
const HEARTBEAT_EVERY = 25000; // app-level ping; the server also pings at the protocol level
const SILENCE_LIMIT = 60000; // nothing heard for this long: the connection is dead
const STABLE_AFTER = 10000; // a connection that lived this long resets the backoff

/** Exponential backoff with "equal jitter": half fixed, half random. */
export function backoffDelay(attempt) {
  const ceiling = Math.min(MAX_DELAY, BASE_DELAY * 2 ** attempt);
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

/** What a close code means for the client. */
export function closeAction(code) {
  switch (code) {
    case 4401: return "login"; // not authenticated: back to the login form
    case 4403: // not a member (or membership revoked)
    case 4404: return "stop"; // no such room
    default: return "retry"; // 1006, 1011, 1012, 1013, 4429, 4400, 1009, 1000…
  }
}

export const CLOSE_WORDS = {
  1000: "The connection was closed.",
  1001: "The server went away.",
  1006: "The connection was lost.",
  1009: "A message was too large for the server.",
  1011: "The server ran into a problem.",
  1012: "The server is restarting.",
  1013: "The server is busy.",
  4400: "The server could not understand a message.",
  4401: "Your session has ended. Please log in again.",
  4403: "You are not a member of this room.",
  4404: "This room does not exist.",
  4429: "Too many connections or messages from you.",
};

export class RoomConnection {
  /**
   * @param {number} roomId
   * @param {{onFrame(frame), onState(state, info), resumePoint(): ({after, editsAfter}|null)}} handlers
   * States: "connecting", "open", "waiting" {code, reason, delay, at}, "login" {code, reason},
   * "stopped" {code, reason}.
   */
  constructor(roomId, handlers) {
    this.roomId = roomId;
    this.handlers = handlers;
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
    this.heartbeat = null;
    this.stopped = true;
    this.welcomed = false;
    this.welcomedAt = 0;
    this.heardAt = 0;
    this._online = () => this.reconnectNow();
    this._offline = () => this._goOffline();
  }

  start() {
    this.stopped = false;
    window.addEventListener("online", this._online);
    window.addEventListener("offline", this._offline);
    this._connect();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener("online", this._online);
    window.removeEventListener("offline", this._offline);
    clearTimeout(this.timer);
    clearInterval(this.heartbeat);
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = ws.onerror = null;
      try { ws.close(1000, "leaving"); } catch { /* already closed */ }
    }
  }

  get ready() {
    return !!this.ws && this.ws.readyState === WebSocket.OPEN && this.welcomed;
  }

  /** Send one frame; false when not connected (the caller keeps it for later). */
  send(frame) {
    if (!this.ready) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Skip the remaining backoff wait (the user asked, or the browser came back online). */
  reconnectNow() {
    if (this.stopped || this.ws) return;
    this._connect();
  }

  _url() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let url = `${scheme}//${location.host}/ws/rooms/${this.roomId}`;
    const point = this.handlers.resumePoint();
    if (point) url += `?after=${point.after}&edits_after=${point.editsAfter}`;
    return url;
  }

  /** The browser says it lost the network: drop the socket now rather than wait for
   * the heartbeat, and wait for "online" (a socket may survive a short outage, but its
   * frames would not get through). */
  _goOffline() {
    if (this.stopped) return;
    const ws = this.ws;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = ws.onerror = null;
      try { ws.close(4000, "offline"); } catch { /* ignore */ }
      this._closed(1006, "offline");
    }
  }

  _connect() {
    clearTimeout(this.timer);
    this.timer = null;
    if (navigator.onLine === false) {
      // No network: the "online" event reconnects; meanwhile say we are offline.
      this.handlers.onState("offline", {});
      return;
    }
    this.welcomed = false;
    this.handlers.onState("connecting", { attempt: this.attempt });
    let ws;
    try {
      ws = new WebSocket(this._url());
    } catch {
      this._closed(1006, "");
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      this.heardAt = Date.now();
      clearInterval(this.heartbeat);
      this.heartbeat = setInterval(() => this._beat(ws), HEARTBEAT_EVERY);
    };
    ws.onmessage = (event) => {
      if (ws !== this.ws) return;
      this.heardAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      // Under load the server sends what is queued for us as one "batch" frame.
      const frames = frame && frame.type === "batch" && Array.isArray(frame.frames) ? frame.frames : [frame];
      for (const one of frames) this._dispatch(one);
    };
    ws.onerror = () => {}; // a close event follows
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this._closed(event.code, event.reason);
    };
  }

  _dispatch(frame) {
    if (!frame || typeof frame.type !== "string" || frame.type === "pong") return;
    if (frame.type === "welcome") {
      this.welcomed = true;
      this.welcomedAt = Date.now();
    }
    this.handlers.onFrame(frame);
    if (frame.type === "welcome") this.handlers.onState("open", {});
  }

  _beat(ws) {
    if (ws !== this.ws) return;
    if (Date.now() - this.heardAt > SILENCE_LIMIT) {
      // Half-open connection: give up on it without waiting for a close handshake.
      ws.onclose = ws.onmessage = ws.onopen = ws.onerror = null;
      try { ws.close(4000, "no answer"); } catch { /* ignore */ }
      this._closed(1006, "no answer from the server");
      return;
    }
    if (this.welcomed) ws.send(JSON.stringify({ type: "ping" }));
  }

  _closed(code, reason) {
    clearInterval(this.heartbeat);
    this.ws = null;
    const wasWelcomed = this.welcomed;
    this.welcomed = false;
    if (this.stopped) return;
    if (navigator.onLine === false) {
      this.handlers.onState("offline", {});
      return;
    }
    const action = closeAction(code);
    if (action !== "retry") {
      this.stopped = true;
      window.removeEventListener("online", this._online);
      window.removeEventListener("offline", this._offline);
      this.handlers.onState(action === "login" ? "login" : "stopped", { code, reason });
      return;
    }
    if (wasWelcomed && Date.now() - this.welcomedAt > STABLE_AFTER) this.attempt = 0;
    let delay = backoffDelay(this.attempt);
    this.attempt = Math.min(this.attempt + 1, 10);
    if (code === 4429) delay = Math.max(delay, 5000 + Math.random() * 5000);
    this.handlers.onState("waiting", { code, reason, delay, at: Date.now() + delay });
    this.timer = setTimeout(() => this._connect(), delay);
  }
}
