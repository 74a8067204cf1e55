// The room page: who is here, and the chat (history, live messages, pending sends,
// edits, the unread marker, typing and away), over one RoomConnection.

import { showAgreement } from "./agreement.js";
import { isCallError, showCall } from "./call.js";
import { ApiError, listInstitutions, listRooms, roomHistory } from "./api.js";
import { announce, countryName, fill, h, newId, timeElement, waitWords } from "./dom.js";
import { CLOSE_WORDS, RoomConnection } from "./socket.js";
import { showVersions } from "./versions.js";

const PAGE_SIZE = 50;
const TYPING_EVERY = 3000; // send typing:true at most this often while typing
const RETRYABLE = new Set(["busy", "unavailable", "rate_limited"]);

const ERROR_WORDS = {
  too_long: "The message is too long.",
  invalid_message: "The server did not accept this message.",
  forbidden: "Only the author can change a message.",
  gone: "That message was already deleted.",
  not_found: "That message no longer exists.",
  busy: "The room is busy; trying again shortly.",
  unavailable: "The server could not store it; trying again shortly.",
  rate_limited: "You are sending very fast; trying again shortly.",
};

/**
 * Show room ``roomId`` in ``main``. Returns the teardown function.
 * ``ctx``: {me, navigate, sessionEnded, page}.
 */
export function showRoom(main, roomId, ctx) {
  const { me, sessionEnded } = ctx;

  const st = {
    name: "Room",
    messages: new Map(), // seq -> {data, el, editing, saving, error}
    seqs: [], // sorted seqs of the rendered messages
    pending: new Map(), // client id -> {id, text, created_at, state, error, el}
    changes: new Map(), // client id of an edit/delete -> seq
    lastSeq: 0, // every message up to here has been received (resume point)
    lastEdit: 0, // every edit up to here has been received
    everWelcomed: false,
    resuming: false,
    welcomeEdit: 0,
    liveEditMax: 0,
    hasMore: null, // more history before the oldest rendered message?
    loadingOlder: false,
    readSeq: 0, // the read marker as sent to the server
    seenSeq: 0, // the newest message the reader has had on screen
    readKnown: false,
    historyReady: false,
    markerSeq: null, // "New messages" goes before the first message after this seq
    readTimer: null,
    presence: new Map(), // user id -> {user, status, typing, connections}
    people: new Map(), // user id -> {id, name, institution}: everyone seen in this room
    typingSent: false,
    typingAt: 0,
    maxChars: 4000,
    unseenBelow: 0,
    waitingUntil: 0,
    stopped: false,
    alive: true,
  };

  // -- skeleton ----------------------------------------------------------------------

  const subtitle = h("p", { class: "room-subtitle muted" });
  const bannerText = h("p", { class: "banner-text", role: "status" });
  const bannerCountdown = h("span", { class: "banner-countdown" });
  const bannerAction = h("span", { class: "banner-action" });
  const banner = h("div", { class: "banner", hidden: true }, bannerText, bannerCountdown, bannerAction);

  const historyTop = h("div", { class: "history-top" });
  const messageList = h("ol", { class: "messages", "aria-label": "Messages" });
  const pendingList = h("ol", { class: "messages pending-list", "aria-label": "Messages not yet sent" });
  const log = h("div", { class: "log", tabindex: "0", role: "region", "aria-label": "Chat history" },
    historyTop, messageList, pendingList);
  const jump = h("button", { type: "button", class: "jump button small", hidden: true, onclick: () => scrollToBottom(true) });
  const typingLine = h("p", { class: "typing-line muted" });

  const textarea = h("textarea", {
    id: "composer-text", name: "text", rows: "2", maxlength: String(st.maxChars),
    "aria-describedby": "composer-hint", placeholder: "Write a message…", required: true,
  });
  const sendButton = h("button", { type: "submit", class: "button", text: "Send" });
  const composerError = h("p", { class: "form-error", role: "alert", hidden: true });
  const composer = h("form", { class: "composer", novalidate: true },
    h("label", { for: "composer-text", class: "visually-hidden", text: "Message" }),
    composerError,
    h("div", { class: "composer-row" }, textarea, sendButton),
    h("p", { id: "composer-hint", class: "hint", text: "Enter sends · Shift+Enter starts a new line" }),
  );

  const peopleHeading = h("h2", { id: "people-heading", text: "Who is here" });
  const peopleNote = h("p", { class: "muted small", hidden: true });
  const peopleList = h("ul", { class: "people", "aria-labelledby": "people-heading" });
  const people = h("aside", { class: "people-panel", "aria-labelledby": "people-heading" }, peopleHeading, peopleNote, peopleList);

  const chat = h("section", { class: "chat", "aria-labelledby": "chat-heading" },
    h("h2", { id: "chat-heading", class: "visually-hidden", text: "Chat" }),
    log, jump, typingLine, composer);

  const agreementBox = h("div", { class: "agreement-list" });
  const versionsBox = h("div", { class: "agreement-versions" });
  const agreement = h("section", { class: "agreement", "aria-labelledby": "activities-heading" },
    agreementBox, versionsBox);

  // The call panel comes after the activity list in the DOM (and so in the Tab order);
  // during a call, CSS shows it on top (focus moves to it on joining).
  const callBox = h("section", { class: "call-panel", "aria-labelledby": "call-heading" });
  const layout = h("div", { class: "room-layout" }, people, chat, agreement, callBox);
  const heading = ctx.page("Room", subtitle, banner, layout);
  heading.closest(".page").classList.add("room-page");

  const call = showCall(callBox, {
    me,
    send: (frame) => conn.send(frame),
    canModerate: () => st.role === "coordinator" || me.role === "admin",
    onLayout: (inCall) => layout.classList.toggle("in-call", inCall),
  });

  const conn = new RoomConnection(roomId, {
    onFrame,
    onState,
    resumePoint: () => (st.everWelcomed ? { after: st.lastSeq, editsAfter: st.lastEdit } : null),
  });

  // -- helpers -----------------------------------------------------------------------

  const storageKey = `coilroom:pending:${me.id}:${roomId}`;

  function savePending() {
    try {
      const keep = [...st.pending.values()]
        .filter((p) => p.state !== "failed")
        .map(({ id, text, created_at }) => ({ id, text, created_at }));
      if (keep.length) sessionStorage.setItem(storageKey, JSON.stringify(keep));
      else sessionStorage.removeItem(storageKey);
    } catch {
      // Storage full or disabled: pending messages live in memory only.
    }
  }

  function restorePending() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(storageKey) || "[]");
      for (const p of saved) {
        if (typeof p.id === "string" && typeof p.text === "string") {
          st.pending.set(p.id, { ...p, state: "waiting", error: null, el: null });
        }
      }
    } catch {
      // Ignore unreadable storage.
    }
  }

  function setTitle(name) {
    st.name = name;
    heading.textContent = name;
    updateTitle();
  }

  function updateTitle() {
    const unread = Math.max(0, st.lastSeq - st.seenSeq);
    document.title = `${unread ? `(${unread}) ` : ""}${st.name} · Coilroom`;
  }

  function nearBottom() {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 60;
  }

  function scrollToBottom(focusLast = false) {
    log.scrollTop = log.scrollHeight;
    st.unseenBelow = 0;
    jump.hidden = true;
    if (focusLast) textarea.focus();
    maybeMarkRead();
  }

  function errorWords(code, message) {
    return ERROR_WORDS[code] || message || "Something went wrong.";
  }

  // -- banner (connection state) ------------------------------------------------------

  let bannerTimer = null;
  let countdownTimer = null;

  function showBanner(text, { kind = "info", action = null, hideAfter = 0 } = {}) {
    clearTimeout(bannerTimer);
    banner.hidden = false;
    banner.className = `banner ${kind}`;
    bannerText.textContent = text;
    fill(bannerAction, action);
    if (hideAfter) bannerTimer = setTimeout(() => { banner.hidden = true; }, hideAfter);
  }

  function hideBanner() {
    clearTimeout(bannerTimer);
    clearInterval(countdownTimer);
    bannerCountdown.textContent = "";
    banner.hidden = true;
  }

  function tickCountdown() {
    const left = Math.max(0, Math.ceil((st.waitingUntil - Date.now()) / 1000));
    bannerCountdown.textContent = left ? ` Next try in ${waitWords(left)}.` : "";
  }

  function onState(state, info) {
    if (!st.alive) return;
    // A call cannot outlive its socket: the server has taken this connection out of it.
    if (state !== "open" && state !== "connecting") call.onDisconnected();
    clearInterval(countdownTimer);
    bannerCountdown.textContent = "";
    switch (state) {
      case "connecting":
        showBanner(st.everWelcomed ? "Reconnecting…" : "Connecting to the room…");
        break;
      case "open":
        people.classList.remove("stale");
        peopleNote.hidden = true;
        if (!st.resuming) hideBanner(); // a resume shows "Back online" on chat.resumed
        maybeMarkRead();
        break;
      case "offline":
        people.classList.add("stale");
        peopleNote.hidden = false;
        peopleNote.textContent = "Offline: this list may be out of date.";
        showBanner(
          `You are offline. ${st.pending.size ? "Your unsent messages are kept and will be sent" : "Coilroom reconnects"} when the connection is back.`,
          { kind: "warning" },
        );
        stopTypingState();
        renderAllPending();
        break;
      case "waiting": {
        people.classList.add("stale");
        peopleNote.hidden = false;
        peopleNote.textContent = "Offline: this list may be out of date.";
        const why = CLOSE_WORDS[info.code] || CLOSE_WORDS[1006];
        const unsent = st.pending.size ? " Your unsent messages will be sent when the connection is back." : "";
        showBanner(`${why} Reconnecting…${unsent}`, {
          kind: "warning",
          action: h("button", { type: "button", class: "button small", onclick: () => conn.reconnectNow(), text: "Reconnect now" }),
        });
        st.waitingUntil = info.at;
        tickCountdown();
        countdownTimer = setInterval(tickCountdown, 1000);
        stopTypingState();
        renderAllPending();
        break;
      }
      case "login":
        sessionEnded();
        break;
      case "stopped":
        st.stopped = true;
        people.classList.add("stale");
        textarea.disabled = true;
        sendButton.disabled = true;
        showBanner(
          info.code === 4404
            ? "This room does not exist (it may have been removed)."
            : "You are not a member of this room, so you cannot enter it. If you think you should be, ask the partnership's coordinator.",
          { kind: "error", action: h("a", { href: "/", "data-link": true, class: "button small", text: "Back to my rooms" }) },
        );
        break;
      default:
        break;
    }
  }

  // -- frames from the server ---------------------------------------------------------

  function onFrame(frame) {
    if (!st.alive) return;
    if (frame.type.startsWith("call.") || frame.type.startsWith("echo.")) {
      call.onFrame(frame);
      return;
    }
    if (frame.type === "error" && isCallError(frame)) {
      call.onError(frame);
      return;
    }
    switch (frame.type) {
      case "welcome": return onWelcome(frame);
      case "presence.join": return onPresence(frame, "join");
      case "presence.leave": return onPresence(frame, "leave");
      case "presence.update": return onPresence(frame, "update");
      case "presence.snapshot": return onPresenceSnapshot(frame);
      case "chat.message": return onChatMessage(frame);
      case "chat.ack": return onAck(frame);
      case "chat.edited":
      case "chat.deleted": return onChange(frame);
      case "chat.resumed": return onResumed(frame);
      case "error": return onError(frame);
      default: return undefined; // frames this client does not know yet (calls…)
    }
  }

  function onWelcome(frame) {
    const room = frame.room || {};
    setTitle(room.name || "Room");
    st.role = room.role;
    call.onWelcome(frame);
    const role = room.role ? ` · your role: ${room.role}` : "";
    const title = room.partnership && room.partnership.title !== room.name ? `Partnership: ${room.partnership.title}` : "Partnership room";
    subtitle.textContent = `${title}${role}`;
    if (frame.limits && frame.limits.max_text_chars) {
      st.maxChars = frame.limits.max_text_chars;
      textarea.maxLength = st.maxChars;
    }
    st.presence = new Map((frame.presence || []).map((p) => [p.user.id, p]));
    renderPeople();
    st.typingSent = false;
    if (document.hidden) conn.send({ type: "status", status: "away" });
    const first = !st.everWelcomed;
    st.everWelcomed = true;
    for (const p of st.presence.values()) rememberPerson(p.user);
    if (!docs) startDocuments(room.role === "observer");
    if (first) {
      st.lastSeq = frame.chat.last_seq;
      st.lastEdit = frame.chat.last_edit;
      st.resuming = false;
      loadInitialHistory();
    } else {
      // The replay (chat.message / chat.edited / chat.deleted) follows, then chat.resumed.
      st.resuming = true;
      st.nearAtWelcome = nearBottom();
      st.welcomeEdit = frame.chat.last_edit;
      st.liveEditMax = 0;
    }
    // Send what is still pending, with the same ids: the server drops duplicates.
    for (const p of st.pending.values()) if (p.state !== "failed") trySend(p);
  }

  // After the server resynchronised with its peers: the whole list, replacing ours.
  function onPresenceSnapshot(frame) {
    st.presence = new Map((frame.presence || []).map((p) => [p.user.id, p]));
    for (const p of st.presence.values()) rememberPerson(p.user);
    renderPeople();
    if (docs) docs.agreement.refresh();
  }

  function onPresence(frame, kind) {
    if (kind === "join") {
      rememberPerson(frame.user);
      const known = st.presence.has(frame.user.id);
      st.presence.set(frame.user.id, {
        user: frame.user, status: frame.status, typing: frame.typing, connections: frame.connections,
      });
      if (!known && frame.user.id !== me.id) announce(`${frame.user.name} joined the room.`);
    } else if (kind === "leave") {
      const gone = st.presence.get(frame.user_id);
      st.presence.delete(frame.user_id);
      if (gone && frame.user_id !== me.id) announce(`${gone.user.name} left the room.`);
    } else {
      const p = st.presence.get(frame.user_id);
      if (!p) return;
      Object.assign(p, { status: frame.status, typing: frame.typing, connections: frame.connections });
    }
    renderPeople();
    if (docs) docs.agreement.refresh();
  }

  // -- the agreement document and its versions -----------------------------------------

  let docs = null;
  const allInstitutions = listInstitutions().then(({ institutions }) => institutions, () => []);
  let institutionsKnown = [];
  allInstitutions.then((list) => {
    institutionsKnown = list;
    if (docs) docs.agreement.refresh();
  });

  function rememberPerson(user) {
    if (!user || user.id == null) return;
    st.people.set(user.id, { id: user.id, name: user.name, institution: user.institution });
  }

  /** The institutions to offer: those of the people seen in this room, one's own, and
   * any already chosen (the API has no "institutions of this partnership" for members). */
  function roomInstitutions(chosen = []) {
    const names = new Set([...st.people.values()].map((p) => p.institution).filter(Boolean));
    const ids = new Set(chosen.map(Number));
    if (me.institution) ids.add(me.institution.id);
    return institutionsKnown.filter((i) => ids.has(i.id) || names.has(i.name));
  }

  function startDocuments(readOnly) {
    const agreementView = showAgreement(agreementBox, roomId, {
      me,
      readOnly,
      people: () => [...st.people.values()],
      institutions: roomInstitutions,
      onSessionEnded: sessionEnded,
    });
    const versionsView = showVersions(versionsBox, roomId, { readOnly, onSessionEnded: sessionEnded });
    docs = { agreement: agreementView, versions: versionsView };
  }

  function onChatMessage(m) {
    const mine = m.author && m.author.id === me.id;
    if (mine && st.pending.has(m.id)) dropPending(m.id);
    const wasNear = nearBottom();
    const hadUnseen = st.seenSeq < st.lastSeq;
    upsertMessage(m);
    if (m.seq > st.lastSeq) st.lastSeq = m.seq;
    if (st.resuming) return; // counted in chat.resumed
    if (!mine) announce(`${m.author.name || "Someone"}: ${m.deleted ? "(deleted)" : truncate(m.text, 200)}`);
    afterNewMessages(wasNear || mine, hadUnseen, 1, !mine);
  }

  function afterNewMessages(stickToBottom, hadUnseen, count = 1, fromOthers = true) {
    if (stickToBottom) log.scrollTop = log.scrollHeight;
    const seenBefore = st.seenSeq;
    maybeMarkRead();
    if (st.seenSeq < st.lastSeq && fromOthers) {
      if (!hadUnseen && st.historyReady) {
        st.markerSeq = seenBefore; // unread starts here
        renderMarker();
      }
      if (!stickToBottom) {
        st.unseenBelow += count;
        jump.textContent = `${st.unseenBelow} new message${st.unseenBelow === 1 ? "" : "s"} below ↓`;
        jump.hidden = false;
      }
    }
    updateTitle();
  }

  function onAck(frame) {
    const p = st.pending.get(frame.id);
    if (!p) return;
    dropPending(frame.id);
    if (!st.messages.has(frame.seq)) {
      // The chat.message usually follows; show it in place already.
      const wasNear = nearBottom();
      upsertMessage({
        seq: frame.seq, id: p.id, author: { id: me.id, name: me.name }, text: p.text,
        created_at: p.created_at, edited_at: null, deleted: false,
      });
      if (wasNear) log.scrollTop = log.scrollHeight;
    }
  }

  function onChange(frame) {
    if (st.resuming) st.liveEditMax = Math.max(st.liveEditMax, frame.edit_seq);
    else st.lastEdit = Math.max(st.lastEdit, frame.edit_seq);
    const entry = st.messages.get(frame.seq);
    if (!entry) return; // not loaded; history will bring its current state
    entry.data = {
      ...entry.data,
      text: frame.text,
      edited_at: frame.edited_at,
      deleted: frame.type === "chat.deleted",
    };
    entry.saving = null;
    entry.error = null;
    if (entry.data.deleted) entry.editing = false;
    renderMessage(entry);
  }

  function onResumed(frame) {
    st.resuming = false;
    st.lastEdit = Math.max(st.lastEdit, st.welcomeEdit, st.liveEditMax);
    const n = frame.messages || 0;
    const edits = frame.edits || 0;
    let text = "Back online.";
    if (n) text = `Back online — ${n} message${n === 1 ? "" : "s"} you missed ${n === 1 ? "is" : "are"} shown.`;
    if (edits) text += ` ${edits} message${edits === 1 ? " was" : "s were"} changed meanwhile.`;
    showBanner(text, { kind: "success", hideAfter: 8000 });
    if (n) afterNewMessages(st.nearAtWelcome, st.seenSeq < frame.after, n);
  }

  function onError(frame) {
    if (frame.id && st.pending.has(frame.id)) {
      const p = st.pending.get(frame.id);
      if (RETRYABLE.has(frame.code)) {
        p.state = "retry";
        p.error = errorWords(frame.code, frame.message);
        renderPending(p);
        setTimeout(() => { if (st.alive && st.pending.get(p.id) === p) trySend(p); }, 2000 + Math.random() * 2000);
      } else {
        p.state = "failed";
        p.error = frame.code === "too_long"
          ? `Not sent: the message is longer than ${st.maxChars} characters.`
          : `Not sent: ${errorWords(frame.code, frame.message)}`;
        renderPending(p);
        savePending();
      }
      return;
    }
    if (frame.id && st.changes.has(frame.id)) {
      const entry = st.messages.get(st.changes.get(frame.id));
      st.changes.delete(frame.id);
      if (entry) {
        entry.saving = null;
        entry.error = `Could not change this message: ${errorWords(frame.code, frame.message)}`;
        renderMessage(entry);
      }
      return;
    }
    showBanner(errorWords(frame.code, frame.message), { kind: "warning", hideAfter: 6000 });
  }

  // -- messages ----------------------------------------------------------------------

  function insertIndex(seq) {
    let lo = 0;
    let hi = st.seqs.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (st.seqs[mid] < seq) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  function upsertMessage(data) {
    const existing = st.messages.get(data.seq);
    if (existing) {
      existing.data = { ...existing.data, ...data };
      renderMessage(existing);
      return existing;
    }
    const entry = { data, el: h("li", { class: "msg" }), editing: false, saving: null, error: null };
    st.messages.set(data.seq, entry);
    const index = insertIndex(data.seq);
    const next = st.seqs[index];
    st.seqs.splice(index, 0, data.seq);
    if (next === undefined) messageList.append(entry.el);
    else messageList.insertBefore(entry.el, st.messages.get(next).el);
    renderMessage(entry);
    renderMarker();
    return entry;
  }

  function renderMessage(entry) {
    const m = entry.data;
    const own = m.author && m.author.id === me.id;
    const li = entry.el;
    li.className = `msg${own ? " own" : ""}${m.deleted ? " deleted" : ""}`;
    li.dataset.seq = String(m.seq);
    const author = (m.author && m.author.name) || "Former member";
    const when = timeElement(m.created_at);
    const head = h("p", { class: "msg-head" },
      h("span", { class: "author", text: author }), " ", when,
      m.edited_at && !m.deleted ? h("span", { class: "muted", text: " · edited" }) : null);

    let body;
    if (m.deleted) {
      body = h("p", { class: "msg-text muted", text: "This message was deleted." });
    } else if (entry.editing) {
      body = editForm(entry);
    } else {
      body = h("p", { class: "msg-text", text: m.text });
    }
    const notes = [];
    if (entry.saving) notes.push(h("p", { class: "msg-note", text: "Saving…" }));
    if (entry.error) notes.push(h("p", { class: "msg-note error", role: "alert", text: entry.error }));
    let actions = null;
    if (own && !m.deleted && !entry.editing) {
      const label = when.textContent;
      actions = h("div", { class: "msg-actions" },
        h("button", { type: "button", class: "link-button", "aria-label": `Edit your message from ${label}`, text: "Edit",
          onclick: () => startEdit(entry) }),
        h("button", { type: "button", class: "link-button danger", "aria-label": `Delete your message from ${label}`, text: "Delete",
          onclick: () => deleteMessage(entry) }));
    }
    fill(li, head, body, notes, actions);
  }

  function startEdit(entry) {
    entry.editing = true;
    entry.error = null;
    renderMessage(entry);
    const area = entry.el.querySelector("textarea");
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
  }

  function finishEdit(entry) {
    entry.editing = false;
    renderMessage(entry);
    const button = entry.el.querySelector(".msg-actions button");
    (button || textarea).focus();
  }

  function editForm(entry) {
    const id = `edit-${entry.data.seq}`;
    const area = h("textarea", { id, rows: "3", maxlength: String(st.maxChars) });
    area.value = entry.data.text;
    const form = h("form", { class: "edit-form" },
      h("label", { for: id, class: "visually-hidden", text: "Edit your message" }),
      area,
      h("div", { class: "edit-actions" },
        h("button", { type: "submit", class: "button small", text: "Save" }),
        h("button", { type: "button", class: "button secondary small", text: "Cancel", onclick: () => finishEdit(entry) })));
    area.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        finishEdit(entry);
      } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = area.value.trim();
      if (!text) {
        entry.error = "A message cannot be empty. Use Delete to remove it.";
        finishEdit(entry);
        return;
      }
      if (text === entry.data.text) return finishEdit(entry);
      const changeId = newId();
      if (!conn.send({ type: "chat.edit", seq: entry.data.seq, text, id: changeId })) {
        entry.error = "You are offline: the change was not saved. Try again when the connection is back.";
        return finishEdit(entry);
      }
      st.changes.set(changeId, entry.data.seq);
      entry.saving = changeId;
      entry.error = null;
      entry.data = { ...entry.data, text }; // shown right away; chat.edited confirms
      finishEdit(entry);
    });
    return form;
  }

  function deleteMessage(entry) {
    // A native confirmation: keyboard and screen-reader friendly.
    if (!window.confirm("Delete this message for everyone?")) return;
    const changeId = newId();
    if (!conn.send({ type: "chat.delete", seq: entry.data.seq, id: changeId })) {
      entry.error = "You are offline: the message was not deleted. Try again when the connection is back.";
      renderMessage(entry);
      return;
    }
    st.changes.set(changeId, entry.data.seq);
    entry.saving = changeId;
    renderMessage(entry);
    textarea.focus();
  }

  // -- unread marker and read receipts -------------------------------------------------

  let markerEl = null;

  function renderMarker() {
    if (markerEl) markerEl.remove();
    markerEl = null;
    if (st.markerSeq == null) return;
    const index = insertIndex(st.markerSeq + 1);
    const seq = st.seqs[index];
    if (seq === undefined) return;
    markerEl = h("li", { class: "unread-marker" }, h("span", { text: "New messages" }));
    messageList.insertBefore(markerEl, st.messages.get(seq).el);
  }

  /** The reader sees the newest message: remember it, and tell the server (at most 1/s). */
  function maybeMarkRead() {
    if (!st.historyReady || document.hidden || !nearBottom()) return;
    if (st.lastSeq > st.seenSeq) {
      st.seenSeq = st.lastSeq;
      updateTitle();
    }
    sendRead();
  }

  function sendRead() {
    if (st.readTimer || st.seenSeq <= st.readSeq || !conn.ready) return;
    conn.send({ type: "chat.read", seq: st.seenSeq });
    st.readSeq = st.seenSeq;
    st.readTimer = setTimeout(() => {
      st.readTimer = null;
      if (st.alive) sendRead();
    }, 1000);
  }

  // -- history -----------------------------------------------------------------------

  const readPromise = listRooms().then(
    ({ rooms }) => {
      const room = rooms.find((r) => r.id === roomId);
      if (room) {
        st.readSeq = Math.max(st.readSeq, room.last_read_seq || 0);
        st.seenSeq = Math.max(st.seenSeq, st.readSeq);
        if (st.name === "Room") setTitle(room.name);
      }
      st.readKnown = true;
    },
    (error) => {
      if (error instanceof ApiError && error.status === 401) sessionEnded();
      st.readKnown = true;
    },
  );

  // One persistent button, so keyboard focus is not lost while pages load.
  const olderButton = h("button", { type: "button", class: "button secondary small", onclick: () => loadOlder() });
  const historyNote = h("p", { class: "muted small" });
  historyTop.append(historyNote, olderButton);

  function renderHistoryTop(problem = "") {
    const hadFocus = document.activeElement === olderButton;
    historyNote.className = problem ? "form-error" : "muted small";
    if (problem) {
      historyNote.textContent = problem;
      olderButton.textContent = "Try again";
    } else if (st.loadingOlder) {
      historyNote.textContent = "";
      olderButton.textContent = "Loading older messages…";
    } else if (st.hasMore === false) {
      historyNote.textContent = "This is the start of the conversation.";
    } else {
      historyNote.textContent = "";
      olderButton.textContent = "Load older messages";
    }
    historyNote.hidden = !historyNote.textContent;
    olderButton.setAttribute("aria-disabled", String(st.loadingOlder));
    olderButton.hidden = !problem && (st.hasMore === false || st.hasMore === null && !st.loadingOlder);
    if (hadFocus && olderButton.hidden) log.focus({ preventScroll: true });
  }

  async function fetchPage(before) {
    try {
      return await roomHistory(roomId, before, PAGE_SIZE);
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        sessionEnded();
      } else {
        st.loadingOlder = false;
        renderHistoryTop(`Could not load older messages: ${error.message}`);
      }
      return null;
    }
  }

  async function loadInitialHistory() {
    st.loadingOlder = true;
    renderHistoryTop();
    await readPromise;
    const page = st.lastSeq > 0 ? await fetchPage(st.lastSeq + 1) : { messages: [], has_more: false };
    if (!st.alive) return;
    st.historyReady = true; // from now on, what is on screen counts as read
    if (!page) return;
    st.loadingOlder = false;
    for (const m of page.messages) upsertMessage(m);
    st.hasMore = page.has_more;
    renderHistoryTop();
    if (st.lastSeq > st.seenSeq) {
      st.markerSeq = st.seenSeq;
      renderMarker();
    }
    if (markerEl) {
      markerEl.scrollIntoView({ block: "start" });
      log.scrollTop -= 8;
    } else {
      log.scrollTop = log.scrollHeight;
    }
    maybeMarkRead();
    updateTitle();
  }

  async function loadOlder() {
    if (st.loadingOlder || st.hasMore === false) return;
    st.loadingOlder = true;
    renderHistoryTop();
    const before = st.seqs.length ? st.seqs[0] : st.lastSeq + 1;
    const page = await fetchPage(before);
    if (!st.alive || !page) return;
    st.loadingOlder = false;
    const fromBottom = log.scrollHeight - log.scrollTop;
    for (const m of page.messages) upsertMessage(m);
    st.hasMore = page.has_more;
    renderHistoryTop();
    log.scrollTop = log.scrollHeight - fromBottom; // keep the reader's place
  }

  // -- pending messages --------------------------------------------------------------

  function trySend(p) {
    if (conn.send({ type: "chat.send", id: p.id, text: p.text })) {
      p.state = "sending";
    } else if (p.state !== "failed") {
      p.state = "waiting";
    }
    renderPending(p);
  }

  function dropPending(id) {
    const p = st.pending.get(id);
    if (!p) return;
    st.pending.delete(id);
    if (p.el) p.el.remove();
    savePending();
  }

  function renderAllPending() {
    for (const p of st.pending.values()) renderPending(p);
  }

  function renderPending(p) {
    if (!p.el) {
      p.el = h("li", { class: "msg own pending" });
      pendingList.append(p.el);
    }
    const state = {
      sending: "Sending…",
      waiting: "Waiting for the connection…",
      retry: p.error ? `${p.error}` : "Trying again shortly…",
      failed: p.error || "Not sent.",
    }[p.state] || "Sending…";
    const actions = [];
    if (p.state === "failed") {
      actions.push(
        h("button", { type: "button", class: "link-button", text: "Edit and resend", onclick: () => {
          textarea.value = p.text;
          dropPending(p.id);
          textarea.focus();
        } }),
        h("button", { type: "button", class: "link-button danger", text: "Remove", onclick: () => { dropPending(p.id); textarea.focus(); } }),
      );
    }
    p.el.classList.toggle("failed", p.state === "failed");
    fill(p.el,
      h("p", { class: "msg-head" }, h("span", { class: "author", text: me.name }), " ", timeElement(p.created_at)),
      h("p", { class: "msg-text", text: p.text }),
      h("p", { class: `msg-note${p.state === "failed" ? " error" : ""}`, text: state }),
      actions.length ? h("div", { class: "msg-actions" }, actions) : null);
  }

  function sendMessage(text) {
    const p = { id: newId(), text, created_at: new Date().toISOString(), state: "waiting", error: null, el: null };
    st.pending.set(p.id, p);
    savePending();
    trySend(p);
    scrollToBottom();
  }

  // -- composer and typing -----------------------------------------------------------

  function stopTypingState() {
    if (st.typingSent) conn.send({ type: "typing", typing: false });
    st.typingSent = false;
  }

  textarea.addEventListener("input", () => {
    composerError.hidden = true;
    if (!textarea.value.trim()) return stopTypingState();
    const now = Date.now();
    if (!st.typingSent || now - st.typingAt >= TYPING_EVERY) {
      if (conn.send({ type: "typing", typing: true })) {
        st.typingSent = true;
        st.typingAt = now;
      }
    }
    return undefined;
  });
  textarea.addEventListener("blur", stopTypingState);
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      composer.requestSubmit();
    }
  });
  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    if (st.stopped) return;
    const text = textarea.value.trim();
    if (!text) return;
    if (text.length > st.maxChars) {
      composerError.hidden = false;
      composerError.textContent = `The message is too long: at most ${st.maxChars} characters (now ${text.length}).`;
      return;
    }
    stopTypingState();
    textarea.value = "";
    sendMessage(text);
    textarea.focus();
  });

  // -- people ------------------------------------------------------------------------

  function renderPeople() {
    const list = [...st.presence.values()].sort((a, b) => {
      if (a.user.id === me.id) return -1;
      if (b.user.id === me.id) return 1;
      return a.user.name.localeCompare(b.user.name);
    });
    peopleHeading.textContent = `Who is here (${list.length})`;
    fill(peopleList, list.map((p) => {
      const where = [p.user.institution, countryName(p.user.country)].filter(Boolean).join(", ");
      const state = p.typing ? "typing…" : p.status === "away" ? "away" : "active";
      return h("li", { class: `person ${p.status === "away" ? "away" : "active"}${p.typing ? " typing" : ""}` },
        h("span", { class: "dot", "aria-hidden": "true" }),
        h("span", { class: "person-main" },
          h("span", { class: "person-name" }, p.user.name, p.user.id === me.id ? h("span", { class: "muted", text: " (you)" }) : null),
          where ? h("span", { class: "person-where", text: where }) : null),
        h("span", { class: "person-state", text: state }));
    }));
    const typing = list.filter((p) => p.typing && p.user.id !== me.id).map((p) => p.user.name);
    typingLine.textContent =
      typing.length === 0 ? "" :
      typing.length === 1 ? `${typing[0]} is typing…` :
      typing.length === 2 ? `${typing[0]} and ${typing[1]} are typing…` :
      `${typing.length} people are typing…`;
  }

  // -- page life ---------------------------------------------------------------------

  function onVisibility() {
    conn.send({ type: "status", status: document.hidden ? "away" : "active" });
    if (document.hidden) {
      stopTypingState();
    } else {
      conn.reconnectNow();
      maybeMarkRead();
    }
    updateTitle();
  }

  let scrollTimer = null;
  function onScroll() {
    if (nearBottom()) {
      st.unseenBelow = 0;
      jump.hidden = true;
    }
    if (log.scrollTop < 40 && st.hasMore) loadOlder();
    clearTimeout(scrollTimer);
    scrollTimer = setTimeout(maybeMarkRead, 200);
  }

  document.addEventListener("visibilitychange", onVisibility);
  log.addEventListener("scroll", onScroll, { passive: true });

  restorePending();
  renderAllPending();
  renderHistoryTop();
  conn.start();

  return function teardownRoom() {
    call.destroy(); // leaves the call, closes every peer connection, stops every track
    st.alive = false;
    if (docs) {
      docs.agreement.destroy();
      docs.versions.destroy();
    }
    stopTypingState();
    // What was read in the last moments (throttled or debounced) is not lost on leaving.
    clearTimeout(st.readTimer);
    st.readTimer = null;
    maybeMarkRead();
    conn.stop();
    clearTimeout(bannerTimer);
    clearInterval(countdownTimer);
    clearTimeout(st.readTimer);
    clearTimeout(scrollTimer);
    document.removeEventListener("visibilitychange", onVisibility);
  };
}

function truncate(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}
