// Tiny DOM helpers. User text always goes in as text nodes (never as HTML).

/**
 * h("button", {class: "x", type: "button", onclick: fn}, "Label", child…)
 * Attributes: class, text, dataset, on<event>; true → empty attribute; null/false → skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value == null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

let announceTimer = null;

/** Say something to screen readers through the polite live region. */
export function announce(text) {
  const region = document.getElementById("announcer");
  if (!region) return;
  region.append(h("p", { text }));
  // Keep the region short; old lines have been read by now.
  while (region.childElementCount > 5) region.firstElementChild.remove();
  clearTimeout(announceTimer);
  announceTimer = setTimeout(() => region.replaceChildren(), 15000);
}

let regionNames = null;

/** "MX" → "Mexico" in the reader's language (falls back to the code). */
export function countryName(code) {
  if (!code) return "";
  try {
    regionNames ??= new Intl.DisplayNames([navigator.language, "en"], { type: "region" });
    return regionNames.of(code) || code;
  } catch {
    return code;
  }
}

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dateTimeFormat = new Intl.DateTimeFormat(undefined, {
  day: "numeric", month: "short", hour: "2-digit", minute: "2-digit",
});
const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "short" });

/** A <time> element: "14:05" today, "3 Mar, 14:05" otherwise; full date as a tooltip. */
export function timeElement(iso) {
  const date = iso ? new Date(iso) : new Date();
  const today = new Date().toDateString() === date.toDateString();
  return h("time", {
    datetime: date.toISOString(),
    title: fullFormat.format(date),
    text: (today ? timeFormat : dateTimeFormat).format(date),
  });
}

/** "in 40 seconds" / "in 5 minutes" for a wait given in seconds. */
export function waitWords(seconds) {
  const s = Math.max(1, Math.ceil(seconds));
  if (s < 60) return `${s} second${s === 1 ? "" : "s"}`;
  const m = Math.ceil(s / 60);
  return `${m} minute${m === 1 ? "" : "s"}`;
}

/** A random client id for chat messages (crypto.randomUUID needs a secure context). */
export function newId() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
