// Named versions of the agreement document (docs/api.md "Documents"): list, save the
// current state under a name, view one, restore one (a new edit that reaches everyone).

import { ApiError, createVersion, getVersion, listVersions, restoreVersion } from "./api.js";
import { fill, h, timeElement, announce } from "./dom.js";
import { STATUSES } from "./agreement.js";

const STATUS_WORDS = Object.fromEntries(STATUSES);

/** ctx: {readOnly, onSessionEnded()}. Returns {destroy()}. */
export function showVersions(container, roomId, ctx) {
  const { readOnly } = ctx;
  let alive = true;
  const list = h("ul", { class: "versions" });
  const message = h("p", { class: "small", role: "status" });
  const viewer = h("div", { class: "version-view", tabindex: "-1", hidden: true, "aria-live": "polite" });

  let form = null;
  if (!readOnly) {
    const input = h("input", { id: "version-name", name: "name", type: "text", maxlength: "200", required: true, autocomplete: "off" });
    form = h("form", { class: "version-form", novalidate: true },
      h("label", { for: "version-name", text: "Name for the current state" }),
      h("div", { class: "row" }, input, h("button", { type: "submit", class: "button small", text: "Save version" })));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const name = input.value.trim();
      if (!name) {
        say("Please give the version a name.", true);
        input.focus();
        return;
      }
      try {
        await createVersion(roomId, "agreement", name);
        input.value = "";
        say(`Saved version “${name}”.`);
        await refresh();
      } catch (error) {
        problem(error, "Could not save the version");
      }
    });
  }

  const details = h("details", { class: "versions-panel" },
    h("summary", {}, h("h3", { class: "inline", text: "Named versions" })),
    form, message, list, viewer);
  details.addEventListener("toggle", () => { if (details.open) refresh(); });
  fill(container, details);

  function say(text, isError = false) {
    message.textContent = text;
    message.className = `small ${isError ? "error-text" : "muted"}`;
  }

  function problem(error, what) {
    if (error instanceof ApiError && error.status === 401) return ctx.onSessionEnded();
    say(`${what}: ${error.message}`, true);
    return undefined;
  }

  async function refresh() {
    let versions;
    try {
      ({ versions } = await listVersions(roomId, "agreement"));
    } catch (error) {
      problem(error, "Could not load the versions");
      return;
    }
    if (!alive) return;
    if (!versions.length) {
      fill(list, h("li", { class: "muted", text: "No named versions yet." }));
      return;
    }
    fill(list, [...versions].reverse().map((v) => h("li", { class: "version" },
      h("span", { class: "version-name", text: v.name }),
      h("span", { class: "muted small" }, " · ", v.created_by?.name || "someone", " · ", timeElement(v.created_at)),
      h("span", { class: "version-actions" },
        h("button", { type: "button", class: "link-button", text: "View", "aria-label": `View version ${v.name}`, onclick: () => view(v) }),
        readOnly ? null : h("button", { type: "button", class: "link-button", text: "Restore", "aria-label": `Restore version ${v.name}`, onclick: () => restore(v) })))));
  }

  async function view(v) {
    let data;
    try {
      data = await getVersion(roomId, "agreement", v.id);
    } catch (error) {
      problem(error, "Could not open the version");
      return;
    }
    const acts = Array.isArray(data.content?.activities) ? data.content.activities : [];
    fill(viewer,
      h("h4", { text: `Version “${v.name}”` }),
      acts.length
        ? h("ol", {}, acts.map((a) => h("li", {}, a.title || "Untitled activity", h("span", { class: "muted", text: ` — ${STATUS_WORDS[a.status] || a.status || ""}` }))))
        : h("p", { class: "muted", text: "No activities in this version." }),
      h("button", { type: "button", class: "button secondary small", text: "Close", onclick: () => { viewer.hidden = true; } }));
    viewer.hidden = false;
    viewer.focus();
  }

  async function restore(v) {
    if (!window.confirm(`Make the activity list read like version “${v.name}” again, for everyone?`)) return;
    try {
      await restoreVersion(roomId, "agreement", v.id);
      say(`Restored version “${v.name}”.`);
      announce(`Restored version ${v.name}.`);
      await refresh();
    } catch (error) {
      problem(error, "Could not restore the version");
    }
  }

  return {
    destroy() {
      alive = false;
    },
  };
}
