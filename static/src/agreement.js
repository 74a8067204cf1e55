// The agreement's activity list, co-edited live: a stock Yjs document over the standard
// y-websocket protocol (/ws/docs/{room}/agreement, session cookie). Schema (DESIGN.md §3):
// Y.Array "activities" of Y.Map {id, title, description, owner, people, institutions,
// starts_on, ends_on, status, outcomes}. Others' focus and selection travel as awareness
// state {user: {id, name, color}, focus: {activity, field, anchor, head}}.
//
// Edits made while offline stay in the local Y.Doc and merge when the provider
// reconnects (CRDT updates commute). Observers get no edit controls at all; the server
// refuses their updates anyway.

import * as Y from "yjs";
import { WebsocketProvider } from "y-websocket";
import { announce, fill, h, newId } from "./dom.js";

export const STATUSES = [
  ["planned", "Planned"],
  ["in_progress", "In progress"],
  ["done", "Done"],
  ["cancelled", "Cancelled"],
];
const STATUS_WORDS = Object.fromEntries(STATUSES);

// Distinguishable on white with AA contrast for text; picked by user id.
const COLORS = ["#b3261e", "#1f6f43", "#6a3fb5", "#0b5cad", "#9a5b00", "#00727a", "#a3237d", "#4a5a00"];

export function colorOf(userId) {
  return COLORS[Math.abs(Number(userId) || 0) % COLORS.length];
}

const TEXT_FIELDS = [
  ["title", "Title", "input"],
  ["description", "Description", "textarea"],
  ["outcomes", "Predicted outcomes", "textarea"],
];

const CLOSE_STOP = new Set([4401, 4403, 4404]);

/**
 * Show the activity list of room ``roomId`` in ``container``.
 * ctx: {me, readOnly, people(): [{id, name}], institutions(chosenIds): [{id, name}] (the
 *       ones to offer), onSessionEnded()}. Returns {destroy(), refresh(), ydoc, provider}.
 */
export function showAgreement(container, roomId, ctx) {
  const { me, readOnly } = ctx;
  const ydoc = new Y.Doc();
  const activities = ydoc.getArray("activities");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const provider = new WebsocketProvider(`${scheme}//${location.host}/ws/docs`, `${roomId}/agreement`, ydoc, {
    connect: navigator.onLine !== false,
  });
  const awareness = provider.awareness;
  const color = colorOf(me.id);
  awareness.setLocalStateField("user", { id: me.id, name: me.name, color });

  let alive = true;
  let everSynced = false;
  let stopped = false;
  const cards = new Map(); // activity id -> {el, fields: {name: element}, ymap}

  // -- skeleton ------------------------------------------------------------------------

  const status = h("p", { class: "doc-status muted small", role: "status" });
  const editors = h("ul", { class: "editors", "aria-label": "Editing now" });
  const list = h("ol", { class: "activities", "aria-labelledby": "activities-heading" });
  const empty = h("p", { class: "muted", text: readOnly ? "No activities yet." : "No activities yet. Add the first one." });
  const addButton = readOnly ? null : h("button", { type: "button", class: "button", text: "Add activity", onclick: addActivity });
  const note = readOnly
    ? h("p", { class: "notice small", text: "You are an observer in this room: you can read the activities but not change them." })
    : null;
  fill(container,
    h("div", { class: "section-head" },
      h("h2", { id: "activities-heading", text: "Agreement activities" }),
      addButton),
    note, status, editors, empty, list);

  // -- connection state ----------------------------------------------------------------

  function setStatus(text, kind = "") {
    status.textContent = text;
    status.className = `doc-status small ${kind || "muted"}`;
  }

  provider.on("status", ({ status: s }) => {
    if (!alive || stopped) return;
    if (s === "connected") return; // "sync" says when it is up to date
    if (s === "connecting") setStatus(everSynced ? "Reconnecting… your edits are kept and will merge." : "Connecting to the activity list…");
    else setStatus("Offline: your edits are kept here and merge when the connection is back.", "warning-text");
  });
  provider.on("sync", (synced) => {
    if (!alive || stopped || !synced) return;
    const again = everSynced;
    everSynced = true;
    setStatus(again ? "Back online: the activity list is up to date." : "Live: changes are saved and shared as you type.");
    render();
  });
  provider.on("connection-close", (event) => {
    if (!alive || !event || !CLOSE_STOP.has(event.code)) return;
    stopped = true;
    provider.disconnect();
    if (event.code === 4401) ctx.onSessionEnded();
    else setStatus("You cannot open this room's activity list.", "error-text");
  });

  function onOffline() {
    provider.disconnect();
    if (!stopped) setStatus("Offline: your edits are kept here and merge when the connection is back.", "warning-text");
  }
  function onOnline() {
    if (!stopped) provider.connect();
  }
  window.addEventListener("offline", onOffline);
  window.addEventListener("online", onOnline);

  // -- editing -------------------------------------------------------------------------

  function transact(fn) {
    if (readOnly) return;
    ydoc.transact(fn, "local");
  }

  function addActivity() {
    const id = newId();
    transact(() => {
      const m = new Y.Map();
      m.set("id", id);
      m.set("title", "");
      m.set("description", "");
      m.set("owner", me.id);
      m.set("people", [me.id]);
      m.set("institutions", me.institution ? [me.institution.id] : []);
      m.set("starts_on", "");
      m.set("ends_on", "");
      m.set("status", "planned");
      m.set("outcomes", "");
      activities.push([m]);
    });
    const card = cards.get(id);
    if (card) card.fields.title.focus();
    announce("Activity added.");
  }

  function indexOf(id) {
    const arr = activities.toArray();
    return arr.findIndex((m) => m.get("id") === id);
  }

  function moveActivity(id, delta) {
    const from = indexOf(id);
    const to = from + delta;
    if (from < 0 || to < 0 || to >= activities.length) return;
    // Yjs has no move: insert a copy at the new place and delete the old entry.
    transact(() => {
      const old = activities.get(from);
      const copy = new Y.Map();
      for (const [key, value] of old.entries()) copy.set(key, value instanceof Y.AbstractType ? value.clone() : value);
      activities.delete(from, 1);
      activities.insert(to, [copy]);
    });
    const card = cards.get(id);
    const button = card && card.el.querySelector(delta < 0 ? ".move-up" : ".move-down");
    if (button && !button.disabled) button.focus();
    else if (card) card.el.querySelector(".move-up, .move-down")?.focus();
    announce(`Moved to position ${to + 1} of ${activities.length}.`);
  }

  function removeActivity(id) {
    const card = cards.get(id);
    const title = card ? card.ymap.get("title") || "this activity" : "this activity";
    if (!window.confirm(`Delete “${title}” for everyone?`)) return;
    const index = indexOf(id);
    if (index >= 0) transact(() => activities.delete(index, 1));
    announce("Activity deleted.");
    (addButton || list).focus();
  }

  // -- rendering -----------------------------------------------------------------------

  function fieldId(activityId, name) {
    return `act-${activityId}-${name}`.replace(/[^A-Za-z0-9_-]/g, "");
  }

  function labelled(activityId, name, label, control) {
    const id = fieldId(activityId, name);
    control.id = id;
    control.dataset.field = name;
    const marks = h("span", { class: "remote-marks", "aria-live": "off" });
    return h("div", { class: `field act-field act-${name}` }, h("label", { for: id, text: label }), control, marks);
  }

  function bindText(ymap, control, name) {
    control.addEventListener("input", () => transact(() => ymap.set(name, control.value)));
  }

  function trackFocus(control, activityId) {
    const publish = () => {
      const focus = { activity: activityId, field: control.dataset.field };
      if (typeof control.selectionStart === "number") {
        focus.anchor = control.selectionStart;
        focus.head = control.selectionEnd;
      }
      awareness.setLocalStateField("focus", focus);
    };
    control.addEventListener("focus", publish);
    for (const type of ["select", "keyup", "mouseup", "input"]) control.addEventListener(type, publish);
    control.addEventListener("blur", () => awareness.setLocalStateField("focus", null));
  }

  function buildCard(ymap) {
    const id = ymap.get("id");
    const fields = {};
    const el = h("li", { class: "activity card", dataset: { id } });
    const heading = h("h3", { class: "activity-heading" });
    const parts = [heading];

    if (readOnly) {
      fields.meta = h("p", { class: "activity-meta" });
      fields.descriptionText = h("p", { class: "activity-text" });
      fields.outcomesText = h("p", { class: "activity-text" });
      parts.push(fields.meta, fields.descriptionText, fields.outcomesText);
      el.append(...parts);
      return { el, fields, ymap, heading };
    }

    const grid = h("div", { class: "activity-grid" });
    for (const [name, label, tag] of TEXT_FIELDS) {
      const control = h(tag, tag === "textarea" ? { rows: "2" } : { type: "text", maxlength: "300", autocomplete: "off" });
      fields[name] = control;
      bindText(ymap, control, name);
      trackFocus(control, id);
      grid.append(labelled(id, name, label, control));
    }

    const statusSelect = h("select", {}, STATUSES.map(([value, words]) => h("option", { value, text: words })));
    statusSelect.addEventListener("change", () => transact(() => ymap.set("status", statusSelect.value)));
    trackFocus(statusSelect, id);
    fields.status = statusSelect;

    const ownerSelect = h("select", {});
    ownerSelect.addEventListener("change", () => {
      const value = ownerSelect.value ? Number(ownerSelect.value) : null;
      transact(() => ymap.set("owner", value));
    });
    trackFocus(ownerSelect, id);
    fields.owner = ownerSelect;

    const starts = h("input", { type: "date" });
    const ends = h("input", { type: "date" });
    for (const [control, name] of [[starts, "starts_on"], [ends, "ends_on"]]) {
      control.addEventListener("change", () => transact(() => ymap.set(name, control.value)));
      trackFocus(control, id);
      fields[name] = control;
    }

    const instBox = h("fieldset", { class: "institutions" }, h("legend", { text: "Institutions" }));
    fields.institutions = instBox;

    grid.append(
      labelled(id, "status", "Status", statusSelect),
      labelled(id, "owner", "Owner", ownerSelect),
      labelled(id, "starts_on", "Starts on", starts),
      labelled(id, "ends_on", "Ends on", ends),
      instBox,
    );

    const actions = h("div", { class: "activity-actions" },
      h("button", { type: "button", class: "button secondary small move-up", text: "Move up", onclick: () => moveActivity(id, -1) }),
      h("button", { type: "button", class: "button secondary small move-down", text: "Move down", onclick: () => moveActivity(id, 1) }),
      h("button", { type: "button", class: "button secondary small danger remove", text: "Delete", onclick: () => removeActivity(id) }));
    fields.actions = actions;
    el.append(heading, grid, actions);
    return { el, fields, ymap, heading };
  }

  /** Set a control's value from the document without disturbing a caret in it. */
  function setValue(control, value) {
    const text = value == null ? "" : String(value);
    if (control.value === text) return;
    if (document.activeElement === control && typeof control.selectionStart === "number") {
      const { selectionStart: start, selectionEnd: end } = control;
      control.value = text;
      control.setSelectionRange(Math.min(start, text.length), Math.min(end, text.length));
    } else {
      control.value = text;
    }
  }

  function personName(userId) {
    if (userId == null || userId === "") return "nobody";
    const known = ctx.people().find((p) => p.id === Number(userId));
    return known ? known.name : `user #${userId}`;
  }

  function fillOwners(select, owner) {
    const people = new Map(ctx.people().map((p) => [p.id, p.name]));
    for (const state of awareness.getStates().values()) {
      if (state.user && state.user.id != null) people.set(state.user.id, state.user.name);
    }
    if (owner != null && owner !== "" && !people.has(Number(owner))) people.set(Number(owner), `user #${owner}`);
    const wanted = [["", "Nobody yet"], ...[...people.entries()].sort((a, b) => a[1].localeCompare(b[1])).map(([id, name]) => [String(id), name])];
    const current = [...select.options].map((o) => `${o.value}\u0000${o.text}`).join("\u0001");
    if (current !== wanted.map(([v, t]) => `${v}\u0000${t}`).join("\u0001")) {
      fill(select, wanted.map(([value, text]) => h("option", { value, text })));
    }
    select.value = owner == null ? "" : String(owner);
  }

  function fillInstitutions(box, chosen, activityId, ymap) {
    const ids = new Set((Array.isArray(chosen) ? chosen : []).map(Number));
    const institutions = ctx.institutions([...ids]);
    const key = institutions.map((i) => i.id).join(",");
    if (box.dataset.key !== key) {
      box.dataset.key = key;
      const legend = box.querySelector("legend");
      fill(box, legend, institutions.map((inst) => {
        const id = fieldId(activityId, `inst-${inst.id}`);
        const input = h("input", { type: "checkbox", id, value: String(inst.id) });
        input.addEventListener("change", () => {
          const now = new Set((ymap.get("institutions") || []).map(Number));
          if (input.checked) now.add(inst.id);
          else now.delete(inst.id);
          transact(() => ymap.set("institutions", [...now].sort((a, b) => a - b)));
        });
        return h("label", { class: "check", for: id }, input, ` ${inst.name}`);
      }));
      if (!institutions.length) box.append(h("p", { class: "muted small", text: "No institutions known yet." }));
    }
    for (const input of box.querySelectorAll("input[type=checkbox]")) input.checked = ids.has(Number(input.value));
  }

  function institutionNames(chosen) {
    const ids = (Array.isArray(chosen) ? chosen : []).map(Number);
    const byId = new Map(ctx.institutions(ids).map((i) => [i.id, i.name]));
    return ids.map((id) => byId.get(Number(id)) || `institution #${id}`);
  }

  function updateCard(card, position, total) {
    const m = card.ymap;
    const title = m.get("title") || "Untitled activity";
    const statusValue = m.get("status") || "planned";
    card.el.dataset.status = statusValue;
    fill(card.heading, h("span", { class: "position", text: `${position + 1}. ` }), title,
      h("span", { class: `status-badge status-${statusValue}`, text: STATUS_WORDS[statusValue] || statusValue }));
    if (readOnly) {
      const dates = [m.get("starts_on"), m.get("ends_on")].filter(Boolean).join(" – ");
      const insts = institutionNames(m.get("institutions"));
      card.fields.meta.textContent = [
        `Owner: ${personName(m.get("owner"))}`,
        dates ? `Dates: ${dates}` : "",
        insts.length ? `Institutions: ${insts.join(", ")}` : "",
      ].filter(Boolean).join(" · ");
      card.fields.descriptionText.textContent = m.get("description") || "";
      card.fields.outcomesText.textContent = m.get("outcomes") ? `Outcomes: ${m.get("outcomes")}` : "";
      return;
    }
    for (const [name] of TEXT_FIELDS) setValue(card.fields[name], m.get(name));
    card.fields.title.setAttribute("aria-label", `Title of activity ${position + 1}`);
    card.fields.status.value = STATUS_WORDS[statusValue] ? statusValue : "planned";
    fillOwners(card.fields.owner, m.get("owner"));
    setValue(card.fields.starts_on, m.get("starts_on"));
    setValue(card.fields.ends_on, m.get("ends_on"));
    fillInstitutions(card.fields.institutions, m.get("institutions"), m.get("id"), m);
    card.fields.actions.querySelector(".move-up").disabled = position === 0;
    card.fields.actions.querySelector(".move-down").disabled = position === total - 1;
  }

  function render() {
    if (!alive) return;
    const items = activities.toArray().filter((m) => m instanceof Y.Map);
    const seen = new Set();
    let previous = null;
    items.forEach((ymap, position) => {
      let id = ymap.get("id");
      if (typeof id !== "string" && typeof id !== "number") id = `item-${position}`;
      if (seen.has(id)) return; // a duplicate id (two clients' copies): show the first
      seen.add(id);
      let card = cards.get(id);
      if (!card || card.ymap !== ymap) {
        if (card) card.el.remove();
        card = buildCard(ymap);
        cards.set(id, card);
      }
      updateCard(card, position, items.length);
      // Move only what is out of place, so a focused field elsewhere keeps its focus.
      const wantedBefore = previous ? previous.nextSibling : list.firstChild;
      if (wantedBefore !== card.el) list.insertBefore(card.el, wantedBefore);
      previous = card.el;
    });
    for (const [id, card] of cards) {
      if (!seen.has(id)) {
        card.el.remove();
        cards.delete(id);
      }
    }
    empty.hidden = items.length > 0 || !everSynced;
    renderRemote();
  }

  // -- others' focus and selection (awareness) -----------------------------------------

  function renderRemote() {
    for (const mark of container.querySelectorAll(".remote-marks")) mark.replaceChildren();
    for (const el of container.querySelectorAll(".act-field.remote-focus")) {
      el.classList.remove("remote-focus");
      el.style.removeProperty("--who-color");
    }
    const here = [];
    for (const [clientId, state] of awareness.getStates()) {
      if (clientId === ydoc.clientID || !state || !state.user) continue;
      here.push(state.user);
      const focus = state.focus;
      if (!focus) continue;
      const card = cards.get(focus.activity);
      if (!card) continue;
      const wrapper = card.el.querySelector(`.act-${CSS.escape(String(focus.field))}`);
      if (!wrapper) continue;
      const who = state.user.color || colorOf(state.user.id);
      wrapper.classList.add("remote-focus");
      wrapper.style.setProperty("--who-color", who);
      let where = "";
      if (typeof focus.anchor === "number" && typeof focus.head === "number") {
        where = focus.anchor === focus.head ? ` (at ${focus.anchor})` : ` (selecting ${Math.min(focus.anchor, focus.head)}–${Math.max(focus.anchor, focus.head)})`;
      }
      const chip = h("span", { class: "remote-chip", text: `${state.user.name}${where}` });
      chip.style.setProperty("--who-color", who);
      wrapper.querySelector(".remote-marks").append(chip);
    }
    const unique = new Map(here.map((u) => [u.id, u]));
    fill(editors, [...unique.values()].map((u) => {
      const li = h("li", { class: "editor-chip", text: u.name });
      li.style.setProperty("--who-color", u.color || colorOf(u.id));
      return li;
    }));
    editors.hidden = unique.size === 0;
  }

  activities.observeDeep(render);
  awareness.on("change", renderRemote);

  setStatus(navigator.onLine === false ? "Offline: the activity list opens when the connection is back." : "Connecting to the activity list…");
  render();

  return {
    ydoc,
    provider,
    /** Re-render owner names when the people list changes. */
    refresh: render,
    destroy() {
      alive = false;
      window.removeEventListener("offline", onOffline);
      window.removeEventListener("online", onOnline);
      activities.unobserveDeep(render);
      awareness.off("change", renderRemote);
      provider.destroy();
      ydoc.destroy();
    },
  };
}
