// The dashboard page (/dashboard): per partnership and across them, from the persisted
// activity data (GET /api/dashboard/...; docs/api.md "Dashboards").
//
// Each card shows one table of the API: a chart (Chart.js, bundled) and, beneath it,
// the same figures as an HTML table. The table is the accessible alternative (the
// canvas is an image with a summary label) and the CSV link downloads exactly it.
// Live numbers: who is online is polled every 5 s, the rest every minute, while the tab
// is visible (the API docs say why polling and not a stream).

import {
  BarController,
  BarElement,
  CategoryScale,
  Chart,
  Legend,
  LinearScale,
  LineController,
  LineElement,
  PointElement,
  Tooltip,
} from "chart.js";
import { api, ApiError } from "./api.js";
import { announce, countryName, fill, h } from "./dom.js";
import { subnav } from "./admin-nav.js";

Chart.register(BarController, BarElement, CategoryScale, LinearScale, LineController, LineElement, PointElement, Legend, Tooltip);

const ONLINE_EVERY_MS = 5000;
const TABLES_EVERY_MS = 60000;
const MAX_RANGE_DAYS = 366;
// Colour-blind-safe (Okabe–Ito); lines also differ by dash and point shape.
const COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"];

const LABELS = {
  day: "Day", messages: "Messages", edits: "Edits", call_minutes: "Call minutes",
  institution: "Institution", country: "Country", members: "Members", active_members: "Active members",
  status: "Status", activities: "Activities", overdue: "Overdue",
  partnership: "Partnership", activity_id: "Activity id", title: "Title", ends_on: "Ends on",
  days_overdue: "Days overdue", owner: "Owner", name: "Name", email: "E-mail", role: "Role",
  member_since: "Member since", last_active_at: "Last active", days_silent: "Days silent",
  kind: "Kind", valid_to: "Valid to", days_left: "Days left", stage: "Stage",
  silent_members: "Silent members", room: "Room", online: "Online", away: "Away", people: "Who",
};
const HIDDEN_COLUMNS = /(^|_)id$/; // ids stay in the CSV; people read names

const CARDS = [
  { table: "timeline", title: "Messages, edits and call minutes per day", span: true, chart: "timeline", folded: true,
    about: "Chat messages sent, document updates made and minutes spent in calls, per day." },
  { table: "institutions", title: "Participants by institution", chart: "institutions",
    about: "Members and active members (who joined, wrote, edited or called in the period) of each institution." },
  { table: "activities", title: "Activities by status", chart: "activities",
    about: "The agreement's activities now, by status; overdue ones ended before today and are not done or cancelled." },
  { table: "partnerships", title: "Partnerships side by side", span: true, chart: "partnerships", across: true, folded: true,
    about: "Messages, edits and call minutes in the period, and the state of each partnership today." },
  { table: "overdue", title: "Overdue activities", span: true,
    about: "Activities that ended before today and are still planned or in progress." },
  { table: "silent", title: "Members silent for 7 days", span: true,
    about: "Members for a week or more with no join, message, edit or call in the last 7 days." },
  { table: "agreements", title: "Agreements nearing expiry", span: true,
    about: "Agreements that end within the next 90 days." },
  { table: "online", title: "Online now", span: true, live: true,
    about: "Who has the room open right now; updates every few seconds." },
];

function browserZone() {
  try {
    return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  } catch {
    return "UTC";
  }
}

function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

function addDays(iso, days) {
  const d = new Date(`${iso}T00:00:00Z`);
  d.setUTCDate(d.getUTCDate() + days);
  return isoDay(d);
}

function daysBetween(from, to) {
  return Math.round((Date.parse(`${to}T00:00:00Z`) - Date.parse(`${from}T00:00:00Z`)) / 86400000);
}

const numberFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
const dayFormat = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short", timeZone: "UTC" });
const dateTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

function cellText(column, value) {
  if (value === null || value === undefined || value === "") return "—";
  if (typeof value === "number") return numberFormat.format(value);
  if (column === "country") return `${countryName(value)} (${value})`;
  if (column === "member_since" || column === "last_active_at") return dateTimeFormat.format(new Date(value));
  if (column === "status" || column === "stage" || column === "role") return String(value).replace(/_/g, " ");
  return String(value);
}

/** The HTML table of one API table: the accessible alternative to its chart. */
function dataTable(title, data) {
  const columns = data.columns.filter((c) => !HIDDEN_COLUMNS.test(c));
  const numeric = new Set(columns.filter((c) => data.rows.some((r) => typeof r[c] === "number")));
  const head = h("tr", {}, columns.map((c) => h("th", { scope: "col", class: numeric.has(c) ? "num" : null, dataset: { column: c }, text: LABELS[c] || c })));
  const body = data.rows.length
    ? data.rows.map((row) => h("tr", {}, columns.map((c, i) => {
      const attrs = { class: numeric.has(c) ? "num" : null, dataset: { column: c } };
      return i === 0 ? h("th", { scope: "row", ...attrs, text: cellText(c, row[c]) }) : h("td", { ...attrs, text: cellText(c, row[c]) });
    })))
    : h("tr", {}, h("td", { class: "empty", colspan: String(columns.length), text: "Nothing to show." }));
  return h("table", { class: "data-table", dataset: { table: data.table } },
    h("caption", { class: "visually-hidden", text: title }),
    h("thead", {}, head), h("tbody", {}, body));
}

// -- charts ------------------------------------------------------------------------------

function dataset(label, values, index, extra = {}) {
  const colour = COLOURS[index % COLOURS.length];
  return { label, data: values, backgroundColor: colour, borderColor: colour, borderWidth: 2, ...extra };
}

const LINE_STYLES = [
  { borderDash: [], pointStyle: "circle" },
  { borderDash: [6, 4], pointStyle: "rect" },
  { borderDash: [2, 3], pointStyle: "triangle" },
];

function chartConfig(kind, data) {
  const rows = data.rows;
  const sum = (c) => rows.reduce((n, r) => n + (r[c] || 0), 0);
  switch (kind) {
    case "timeline":
      return {
        type: "line",
        data: {
          labels: rows.map((r) => dayFormat.format(new Date(`${r.day}T00:00:00Z`))),
          datasets: [
            dataset("Messages", rows.map((r) => r.messages), 0, { yAxisID: "y", ...LINE_STYLES[0] }),
            dataset("Call minutes", rows.map((r) => r.call_minutes), 1, { yAxisID: "y", ...LINE_STYLES[1] }),
            dataset("Edits", rows.map((r) => r.edits), 2, { yAxisID: "y1", ...LINE_STYLES[2] }),
          ],
        },
        options: {
          scales: {
            y: { beginAtZero: true, ticks: { precision: 0 }, position: "left", title: { display: true, text: "Messages, call minutes" } },
            y1: { beginAtZero: true, ticks: { precision: 0 }, position: "right", grid: { drawOnChartArea: false }, title: { display: true, text: "Edits" } },
          },
        },
        summary: `${sum("messages")} messages, ${sum("edits")} edits and ${numberFormat.format(sum("call_minutes"))} call minutes over ${rows.length} days`,
      };
    case "institutions":
      return {
        type: "bar",
        data: {
          labels: rows.map((r) => r.institution),
          datasets: [
            dataset("Members", rows.map((r) => r.members), 0),
            dataset("Active members", rows.map((r) => r.active_members), 2),
            dataset("Messages", rows.map((r) => r.messages), 1),
          ],
        },
        options: { scales: { y: { beginAtZero: true, ticks: { precision: 0 } } } },
        summary: rows.map((r) => `${r.institution}: ${r.members} members, ${r.active_members} active, ${r.messages} messages`).join("; "),
      };
    case "activities":
      return {
        type: "bar",
        data: {
          labels: rows.map((r) => r.status.replace(/_/g, " ")),
          datasets: [dataset("Activities", rows.map((r) => r.activities), 0), dataset("Overdue", rows.map((r) => r.overdue), 1)],
        },
        options: { scales: { y: { beginAtZero: true, ticks: { precision: 0 } } } },
        summary: rows.map((r) => `${r.status.replace(/_/g, " ")}: ${r.activities}${r.overdue ? ` (${r.overdue} overdue)` : ""}`).join("; "),
      };
    case "partnerships":
      return {
        type: "bar",
        data: {
          labels: rows.map((r) => r.partnership),
          datasets: [
            dataset("Messages", rows.map((r) => r.messages), 0),
            dataset("Call minutes", rows.map((r) => r.call_minutes), 1),
            dataset("Active members", rows.map((r) => r.active_members), 2),
          ],
        },
        options: { indexAxis: "y", scales: { x: { beginAtZero: true, ticks: { precision: 0 } } } },
        summary: rows.map((r) => `${r.partnership}: ${r.messages} messages, ${r.active_members} active members`).join("; "),
      };
    default:
      return null;
  }
}

function drawChart(canvas, existing, kind, data) {
  const config = chartConfig(kind, data);
  canvas.setAttribute("aria-label", `Chart: ${config.summary || "no data"}. The figures are in the table below.`);
  if (existing) {
    existing.data = config.data;
    existing.update("none");
    return existing;
  }
  const reduced = window.matchMedia?.("(prefers-reduced-motion: reduce)").matches;
  return new Chart(canvas, {
    type: config.type,
    data: config.data,
    options: {
      responsive: true,
      maintainAspectRatio: false,
      animation: reduced ? false : { duration: 300 },
      interaction: { mode: "index", intersect: false },
      plugins: { legend: { position: "bottom", labels: { usePointStyle: true } } },
      ...config.options,
    },
  });
}

// -- the page ----------------------------------------------------------------------------------

export function mountDashboard(main, ctx) {
  const { me, page, sessionEnded } = ctx;
  if (!me) return undefined;
  const params = new URLSearchParams(location.search);
  const zone = browserZone();
  const state = {
    partnership: params.get("partnership") || "",
    from: params.get("from") || "",
    to: params.get("to") || "",
  };
  const charts = new Map();
  const cards = new Map();
  let alive = true;
  let onlineTimer = null;
  let tablesTimer = null;
  let lastOnline = null;

  const heading = page("Dashboard");
  const wrapper = heading.parentElement;
  wrapper.classList.add("wide");
  const status = h("p", { class: "muted small", role: "status" });
  const formError = h("div", { class: "form-error", role: "alert", hidden: true });
  const select = h("select", { id: "dash-partnership", name: "partnership" }, h("option", { value: "", text: "All my partnerships" }));
  const fromInput = h("input", { id: "dash-from", name: "from", type: "date", required: true });
  const toInput = h("input", { id: "dash-to", name: "to", type: "date", required: true });
  const form = h("form", { class: "card", novalidate: true, "aria-label": "What to show" },
    formError,
    h("fieldset", { class: "dash-filters" },
      h("legend", { class: "visually-hidden", text: "Partnership and dates" }),
      h("div", { class: "field" }, h("label", { for: "dash-partnership", text: "Partnership" }), select),
      h("div", { class: "field" }, h("label", { for: "dash-from", text: "From" }), fromInput),
      h("div", { class: "field" }, h("label", { for: "dash-to", text: "To" }), toInput),
      h("button", { type: "submit", class: "button", text: "Show" })),
    h("div", { class: "presets" },
      h("span", { class: "muted small", text: "Quick ranges:" }),
      [7, 30, 90, 365].map((n) => h("button", {
        type: "button", class: "button secondary small", text: n === 365 ? "12 months" : `${n} days`,
        "aria-label": n === 365 ? "Last 12 months" : `Last ${n} days`,
        onclick: () => {
          toInput.value = state.today || toInput.value;
          fromInput.value = addDays(toInput.value, -(n - 1));
          form.requestSubmit();
        },
      }))),
    h("p", { class: "muted small dash-note", text: `Days are counted in your time zone, ${zone}.` }));

  const tiles = {
    online: tile("Online now", true),
    messages: tile("Messages"),
    edits: tile("Edits"),
    call_minutes: tile("Call minutes"),
    overdue: tile("Overdue activities"),
    silent: tile("Silent members"),
  };
  const tileList = h("ul", { class: "tiles", "aria-label": "Figures at a glance" }, Object.values(tiles).map((t) => t.el));
  const grid = h("div", { class: "dash-grid" });
  wrapper.append(subnav(me, "/dashboard"), form, status, tileList, grid);

  function tile(label, live = false) {
    const value = h("span", { class: "tile-value", text: "…" });
    const el = h("li", { class: `tile${live ? " live" : ""}` }, value, h("span", { class: "tile-label", text: label }));
    return { el, set: (v, alert = false) => { value.textContent = v; el.classList.toggle("alert", alert); } };
  }

  function query(extra = {}) {
    const q = new URLSearchParams({ from: state.from, to: state.to, tz: zone, ...extra });
    if (state.partnership) q.set("partnership_id", state.partnership);
    return q;
  }

  function buildCards() {
    charts.forEach((chart) => chart.destroy());
    charts.clear();
    cards.clear();
    const shown = CARDS.filter((c) => !(c.across && state.partnership));
    fill(grid, shown.map((card) => {
      const id = `card-${card.table}`;
      const csv = h("a", { class: "button secondary small csv-link", download: "", dataset: { table: card.table } },
        "Download CSV", h("span", { class: "visually-hidden", text: ` of ${card.title}` }));
      const body = h("div", { class: "card-body" }, h("p", { class: "muted", text: "Loading…" }));
      const canvas = card.chart ? h("canvas", { role: "img", "aria-label": `Chart of ${card.title}` }) : null;
      const el = h("section", { class: `card dash-card${card.span ? " span-2" : ""}`, id, "aria-labelledby": `${id}-h` },
        h("div", { class: "dash-card-head" }, h("h2", { id: `${id}-h`, text: card.title }), csv),
        h("p", { class: "muted small", text: card.about }),
        card.table === "institutions" ? h("p", { class: "balance small" }) : null,
        canvas ? h("div", { class: "chart-box" }, canvas) : null,
        body);
      cards.set(card.table, { card, el, csv, body, canvas });
      return el;
    }));
  }

  function showTable(name, data) {
    const entry = cards.get(name);
    if (!entry) return;
    const { card, csv, body, canvas } = entry;
    csv.href = `/api/dashboard/${name}.csv?${query()}`;
    // Unchanged figures are left alone: redrawing would move the reader's focus and
    // make screen readers read the table again.
    const fingerprint = JSON.stringify([data.rows, data.balance]);
    if (entry.fingerprint === fingerprint) return;
    entry.fingerprint = fingerprint;
    const table = h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": `${card.title}: table` }, dataTable(card.title, data));
    if (card.folded) {
      const open = body.querySelector("details")?.open ?? false;
      fill(body, h("details", { class: "figures", open }, h("summary", { text: "The figures as a table" }), table));
    } else {
      fill(body, table);
    }
    if (canvas) charts.set(name, drawChart(canvas, charts.get(name), card.chart, data));
    if (name === "institutions") {
      const b = data.balance;
      const words = (v) => (v === null ? "not enough data" : `${numberFormat.format(v)} (1 is even)`);
      fill(entry.el.querySelector(".balance"), `Balance between the sides: active members ${words(b.active_members)}, messages ${words(b.messages)}.`);
    }
  }

  function summarise(name, data) {
    const total = (c) => data.rows.reduce((n, r) => n + (r[c] || 0), 0);
    if (name === "timeline") {
      tiles.messages.set(numberFormat.format(total("messages")));
      tiles.edits.set(numberFormat.format(total("edits")));
      tiles.call_minutes.set(numberFormat.format(total("call_minutes")));
    } else if (name === "overdue") {
      tiles.overdue.set(String(data.rows.length), data.rows.length > 0);
    } else if (name === "silent") {
      tiles.silent.set(String(data.rows.length), data.rows.length > 0);
    } else if (name === "online") {
      tiles.online.set(String(data.online_users));
      if (lastOnline !== null && lastOnline !== data.online_users) {
        announce(`${data.online_users} ${data.online_users === 1 ? "person" : "people"} online now`);
      }
      lastOnline = data.online_users;
    }
  }

  function failed(error) {
    if (!alive) return true;
    if (error instanceof ApiError && error.status === 401) {
      sessionEnded();
      return true;
    }
    if (error instanceof ApiError && error.status === 403) {
      page("Dashboard", h("p", { class: "notice error", text: "Dashboards are for administrators and coordinators. Ask your international office for access." }),
        h("p", {}, h("a", { href: "/", "data-link": true, text: "Back to my rooms" })));
      alive = false;
      return true;
    }
    if (error instanceof ApiError && error.status === 422) {
      formError.hidden = false;
      formError.textContent = error.message;
      return true;
    }
    status.textContent = `Could not load the figures: ${error.message}. Retrying…`;
    status.classList.add("stale-note");
    return false;
  }

  async function loadTable(name) {
    const data = await api("GET", `/api/dashboard/${name}?${query()}`);
    if (!alive) return;
    summarise(name, data);
    showTable(name, data);
  }

  async function loadOnline() {
    clearTimeout(onlineTimer);
    try {
      await loadTable("online");
    } catch (error) {
      if (failed(error)) return;
    }
    // A hidden tab asks nothing; showing it again reloads at once (onVisible).
    if (alive && !document.hidden) onlineTimer = setTimeout(loadOnline, ONLINE_EVERY_MS);
  }

  async function loadAll() {
    clearTimeout(tablesTimer);
    const names = [...cards.keys()].filter((n) => n !== "online");
    if (!cards.has("overdue")) names.push("overdue");
    try {
      await Promise.all(names.map(loadTable));
      if (!alive) return;
      status.classList.remove("stale-note");
      status.textContent = `Updated ${new Date().toLocaleTimeString()}.`;
    } catch (error) {
      if (failed(error)) return;
    }
    if (alive && !document.hidden) tablesTimer = setTimeout(loadAll, TABLES_EVERY_MS);
  }

  function apply() {
    formError.hidden = true;
    const next = new URLSearchParams();
    if (state.partnership) next.set("partnership", state.partnership);
    next.set("from", state.from);
    next.set("to", state.to);
    history.replaceState(null, "", `/dashboard?${next}`);
    buildCards();
    loadAll();
    loadOnline();
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const from = fromInput.value;
    const to = toInput.value;
    let problem = "";
    if (!from || !to) problem = "Please choose both dates.";
    else if (from > to) problem = "The first day is after the last day.";
    else if (daysBetween(from, to) + 1 > MAX_RANGE_DAYS) problem = `Please choose at most ${MAX_RANGE_DAYS} days.`;
    if (problem) {
      formError.hidden = false;
      formError.textContent = problem;
      (from ? toInput : fromInput).focus();
      return;
    }
    Object.assign(state, { partnership: select.value, from, to });
    apply();
  });
  select.addEventListener("change", () => form.requestSubmit());

  const onVisible = () => {
    if (!document.hidden && alive) {
      loadOnline();
      loadAll();
    }
  };
  document.addEventListener("visibilitychange", onVisible);

  (async () => {
    let overview;
    try {
      overview = await api("GET", `/api/dashboard?${new URLSearchParams({ tz: zone })}`);
    } catch (error) {
      failed(error);
      return;
    }
    if (!alive) return;
    state.today = overview.to;
    for (const p of overview.partnerships) select.append(h("option", { value: String(p.id), text: p.title }));
    if (!overview.partnerships.some((p) => String(p.id) === state.partnership)) state.partnership = "";
    select.value = state.partnership;
    state.from ||= overview.from;
    state.to ||= overview.to;
    fromInput.value = state.from;
    toInput.value = state.to;
    if (!overview.partnerships.length) {
      grid.before(h("p", { class: "notice", text: "You do not coordinate any partnership yet, so there is nothing to show." }));
    }
    apply();
  })();

  return () => {
    alive = false;
    clearTimeout(onlineTimer);
    clearTimeout(tablesTimer);
    document.removeEventListener("visibilitychange", onVisible);
    charts.forEach((chart) => chart.destroy());
  };
}
