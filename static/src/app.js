// Coilroom browser client: router, account bar, login, "my rooms", invitations.
// The room page lives in room.js.

import { ApiError, getMe, listRooms, login, logout, previewInvitation, acceptInvitation } from "./api.js";
import { countryName, fill, h, waitWords } from "./dom.js";
import { showRoom } from "./room.js";

const main = document.getElementById("main");
const account = document.getElementById("account");

let me = null; // the logged-in user, or null
let teardown = null; // cleanup of the current page
let renderedPath = null;

// -- routing ---------------------------------------------------------------------------

export function navigate(path, { replace = false } = {}) {
  if (replace) history.replaceState(null, "", path);
  else history.pushState(null, "", path);
  route();
}

async function route() {
  const path = location.pathname;
  renderedPath = path;
  if (teardown) {
    const done = teardown;
    teardown = null;
    done();
  }
  const invite = path.match(/^\/invite\/([^/]+)\/?$/);
  if (invite) {
    await loadMe();
    if (renderedPath === path) showInvite(decodeURIComponent(invite[1]));
    return;
  }
  if (!(await loadMe())) {
    if (renderedPath === path) showLogin();
    return;
  }
  if (renderedPath !== path) return;
  const room = path.match(/^\/room\/(\d+)\/?$/);
  if (room) {
    teardown = showRoom(main, Number(room[1]), { me, navigate, sessionEnded, page });
    return;
  }
  const section = path.match(/^\/([a-z0-9][a-z0-9-]*)(?:\/|$)/);
  if (section && section[1] !== "app" && entries()[section[1]]) {
    await showEntry(section[1], path);
    return;
  }
  if (path !== "/") history.replaceState(null, "", "/");
  showRooms();
}

// -- other entry points ----------------------------------------------------------------
//
// Every static/src/NAME.entry.js is built on its own (static/build.mjs); the page lists
// them in a JSON block. A path /NAME or /NAME/... loads that entry and calls its
//   export function mount(main, ctx)  ->  teardown function (optional)
// with ctx = {me, navigate, sessionEnded, page, path}. Its CSS (if it imports any) is
// linked before it mounts.

let entryMap = null;

function entries() {
  if (!entryMap) {
    try {
      entryMap = JSON.parse(document.getElementById("coilroom-entries")?.textContent || "{}");
    } catch {
      entryMap = {};
    }
  }
  return entryMap;
}

function loadStyle(href) {
  if (document.querySelector(`link[rel="stylesheet"][href="${href}"]`)) return Promise.resolve();
  return new Promise((resolve) => {
    const link = h("link", { rel: "stylesheet", href });
    link.addEventListener("load", resolve);
    link.addEventListener("error", resolve);
    document.head.append(link);
  });
}

async function showEntry(name, path) {
  const entry = entries()[name];
  let module;
  try {
    if (entry.css) await loadStyle(entry.css);
    module = await import(entry.js);
  } catch (error) {
    if (renderedPath !== path) return;
    page("Cannot load this page", h("p", { text: `The page could not be loaded (${error.message}). Reload to try again.` }));
    return;
  }
  if (renderedPath !== path || typeof module.mount !== "function") return;
  const done = module.mount(main, { me, navigate, sessionEnded, page, path });
  if (typeof done === "function") teardown = done;
}

async function loadMe() {
  try {
    me = await getMe();
  } catch (error) {
    me = null;
    if (!(error instanceof ApiError && error.status === 401)) {
      // The server is unreachable: say so, and offer to try again.
      page("Cannot reach Coilroom", h("p", { text: error.message }),
        h("button", { type: "button", class: "button", onclick: () => route(), text: "Try again" }));
      renderedPath = null;
    }
  }
  renderAccount();
  return me;
}

/** The session ended (401 from the API or 4401 from a socket): back to the login form. */
function sessionEnded() {
  if (teardown) {
    const done = teardown;
    teardown = null;
    done();
  }
  me = null;
  renderAccount();
  showLogin("Your session has ended. Please log in again.");
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-link]");
  if (!link || event.defaultPrevented || event.button !== 0) return;
  if (event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  event.preventDefault();
  navigate(link.getAttribute("href"));
});

window.addEventListener("popstate", () => {
  if (location.pathname !== renderedPath) route(); // a #fragment (skip link) is not a new page
});

// -- page frame ------------------------------------------------------------------------

/** Put a page in <main>: a heading (focused, so screen readers announce it) and content. */
function page(title, ...content) {
  document.title = `${title} · Coilroom`;
  const heading = h("h1", { tabindex: "-1", text: title });
  fill(main, h("div", { class: "page" }, heading, content));
  heading.focus({ preventScroll: true });
  return heading;
}

function renderAccount() {
  if (!me) {
    fill(account);
    return;
  }
  const where = me.institution ? `${me.institution.name}, ${countryName(me.institution.country)}` : me.role;
  fill(
    account,
    h("span", { class: "whoami" }, h("strong", { text: me.name }), h("span", { class: "muted", text: ` · ${where}` })),
    h("a", { href: "/", "data-link": true, class: "nav-link", text: "My rooms" }),
    // Administration and dashboards (admin.entry.js, dashboard.entry.js).
    ["admin", "coordinator"].includes(me.role) ? h("a", { href: "/dashboard", "data-link": true, class: "nav-link", text: "Dashboard" }) : null,
    h("button", { type: "button", class: "button secondary small", onclick: doLogout, text: "Log out" }),
  );
}

async function doLogout() {
  try {
    await logout();
  } catch {
    // Logged out on our side anyway; the cookie may linger until it expires.
  }
  me = null;
  navigate("/");
}

// -- forms -----------------------------------------------------------------------------

/** A labelled input; returns [wrapper, input]. */
function field(label, attrs) {
  const id = `f-${attrs.name}-${Math.random().toString(36).slice(2, 7)}`;
  const input = h("input", { id, ...attrs });
  const wrapper = h("div", { class: "field" }, h("label", { for: id, text: label }), input);
  return [wrapper, input];
}

/** An error box that screen readers hear when it changes. */
function errorBox() {
  return h("div", { class: "form-error", role: "alert", hidden: true });
}

function showError(box, message) {
  box.hidden = !message;
  box.textContent = message || "";
}

function loginErrorWords(error) {
  if (!(error instanceof ApiError)) return "Something went wrong. Please try again.";
  switch (error.status) {
    case 401: return "Wrong e-mail or password. Please check both and try again.";
    case 429:
      return error.retryAfter
        ? `Too many failed attempts. Please wait ${waitWords(error.retryAfter)} and try again.`
        : "Too many failed attempts. Please wait a few minutes and try again.";
    case 422: return "Please enter your e-mail address and password.";
    case 0: return error.message;
    default: return `Logging in failed (${error.message}). Please try again.`;
  }
}

// -- login -----------------------------------------------------------------------------

function showLogin(notice = "") {
  const [emailField, email] = field("E-mail", {
    name: "email", type: "email", autocomplete: "username", required: true, spellcheck: "false",
  });
  const [passwordField, password] = field("Password", {
    name: "password", type: "password", autocomplete: "current-password", required: true,
  });
  const error = errorBox();
  const submit = h("button", { type: "submit", class: "button", text: "Log in" });
  const form = h("form", { class: "card form", novalidate: true }, error, emailField, passwordField, submit);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!email.value.trim() || !password.value) {
      showError(error, "Please enter your e-mail address and password.");
      (email.value.trim() ? password : email).focus();
      return;
    }
    submit.disabled = true;
    submit.textContent = "Logging in…";
    showError(error, "");
    try {
      const result = await login(email.value.trim(), password.value);
      me = result.user;
      route(); // stay on the page that was asked for (a room link, say)
    } catch (failure) {
      showError(error, loginErrorWords(failure));
      password.value = "";
      password.focus();
      submit.disabled = false;
      submit.textContent = "Log in";
    }
  });
  page(
    "Log in",
    notice ? h("p", { class: "notice", role: "status", text: notice }) : null,
    h("p", { class: "lead", text: "Coilroom is where partner institutions meet: see who is here, chat, and plan the partnership together." }),
    form,
  );
  email.focus();
}

// -- my rooms --------------------------------------------------------------------------

function stageWords(stage) {
  return (stage || "").replace(/_/g, " ");
}

function onlineLine(people) {
  if (!people.length) return h("p", { class: "muted", text: "Nobody is online right now." });
  return h(
    "ul",
    { class: "online-list", "aria-label": "Online now" },
    people.map((p) =>
      h("li", { class: `person-chip ${p.status === "away" ? "away" : "active"}` },
        h("span", { class: "dot", "aria-hidden": "true" }),
        p.name,
        p.status === "away" ? h("span", { class: "muted", text: " (away)" }) : null,
        me && p.id === me.id ? h("span", { class: "muted", text: " (you)" }) : null,
      )),
  );
}

function roomCard(room) {
  const unread = Math.max(0, (room.last_seq || 0) - (room.last_read_seq || 0));
  return h(
    "li",
    { class: "card room-card" },
    h("h2", {}, h("a", { href: `/room/${room.id}`, "data-link": true, text: room.name })),
    h("p", { class: "partnership", text: room.partnership.title }),
    h("p", { class: "meta" },
      h("span", { class: "badge", text: `Stage: ${stageWords(room.partnership.stage)}` }),
      h("span", { class: "badge", text: `Your role: ${room.role}` }),
      unread ? h("span", { class: "badge unread", text: `${unread} unread` }) : null,
    ),
    onlineLine(room.online || []),
  );
}

function showRooms() {
  const list = h("ul", { class: "room-list" }, h("li", { class: "muted", text: "Loading your rooms…" }));
  const status = h("p", { class: "muted small", role: "status" });
  page("My rooms", list, status);
  let timer = null;
  let alive = true;

  async function refresh() {
    clearTimeout(timer);
    try {
      const { rooms } = await listRooms();
      if (!alive) return;
      if (!rooms.length) {
        fill(list, h("li", { class: "card" },
          h("p", { text: "You are not in any partnership room yet." }),
          h("p", { class: "muted", text: "When a coordinator invites you, the invitation link brings you straight into the room." })));
      } else {
        fill(list, rooms.map(roomCard));
      }
      status.textContent = "";
    } catch (error) {
      if (!alive) return;
      if (error instanceof ApiError && error.status === 401) return sessionEnded();
      status.textContent = `Could not load your rooms: ${error.message}`;
    }
    if (alive) timer = setTimeout(refresh, document.hidden ? 60000 : 15000);
  }
  const onVisible = () => { if (!document.hidden) refresh(); };
  document.addEventListener("visibilitychange", onVisible);
  refresh();
  teardown = () => {
    alive = false;
    clearTimeout(timer);
    document.removeEventListener("visibilitychange", onVisible);
  };
}

// -- invitations -----------------------------------------------------------------------

function invitationProblem(error) {
  if (!(error instanceof ApiError)) return "Something went wrong. Please try again.";
  if (error.status === 404) return "This invitation link is not valid. Please check that you copied the whole link.";
  if (error.status === 410) {
    if (error.code === "accepted") return "This invitation has already been used. If it was you, just log in.";
    if (error.code === "revoked") return "This invitation was withdrawn. Please ask the coordinator for a new one.";
    if (error.code === "expired") return "This invitation has expired. Please ask the coordinator to send it again.";
    return "This invitation can no longer be used. Please ask the coordinator for a new one.";
  }
  return error.message;
}

async function showInvite(code) {
  page("Invitation", h("p", { class: "muted", text: "Checking your invitation…" }));
  let inv;
  try {
    inv = await previewInvitation(code);
  } catch (error) {
    page("Invitation", h("p", { class: "notice error", text: invitationProblem(error) }),
      h("p", {}, h("a", { href: "/", "data-link": true, text: me ? "Go to my rooms" : "Go to the login page" })));
    return;
  }
  const expires = new Date(inv.expires_at);
  const summary = h("div", { class: "card" },
    h("p", { class: "lead" }, "You are invited to join ", h("strong", { text: inv.partnership.title }), ` as ${inv.role}.`),
    h("p", { class: "muted" }, `Invitation for ${inv.email} · valid until ${expires.toLocaleString()}`));

  const error = errorBox();
  const submit = h("button", { type: "submit", class: "button" });
  const form = h("form", { class: "card form", novalidate: true }, error);
  let collect;
  const signedInAsInvitee = me && me.email.toLowerCase() === inv.email.toLowerCase();

  if (signedInAsInvitee) {
    submit.textContent = "Accept and enter the room";
    form.append(h("p", { text: `You are logged in as ${me.name} (${me.email}).` }), submit);
    collect = () => ({ code });
  } else if (inv.account_exists) {
    submit.textContent = "Log in and accept";
    const [pwField, pw] = field(`Password for ${inv.email}`, {
      name: "password", type: "password", autocomplete: "current-password", required: true,
    });
    form.append(
      h("p", { text: "You already have a Coilroom account with this e-mail. Log in to accept." }),
      me ? h("p", { class: "muted", text: `You are logged in as ${me.email}; accepting logs you in as ${inv.email}.` }) : null,
      h("input", { type: "email", name: "username", value: inv.email, autocomplete: "username", hidden: true }),
      pwField, submit);
    collect = () => {
      if (!pw.value) return "Please enter your password.";
      return { code, password: pw.value };
    };
  } else {
    submit.textContent = "Create my account and accept";
    const [nameField, name] = field("Your name (as partners will see it)", {
      name: "name", type: "text", autocomplete: "name", required: true, maxlength: "200",
    });
    const [pwField, pw] = field("Choose a password", {
      name: "password", type: "password", autocomplete: "new-password", required: true,
      minlength: "10", "aria-describedby": "pw-hint",
    });
    const [pw2Field, pw2] = field("Repeat the password", {
      name: "password2", type: "password", autocomplete: "new-password", required: true,
    });
    pwField.append(h("p", { id: "pw-hint", class: "hint", text: "At least 10 characters." }));
    form.append(
      h("p", { text: `Create your account for ${inv.email}.` }),
      h("input", { type: "email", name: "username", value: inv.email, autocomplete: "username", hidden: true }),
      nameField, pwField, pw2Field, submit);
    collect = () => {
      if (!name.value.trim()) return "Please enter your name.";
      if (pw.value.length < 10) return "The password needs at least 10 characters.";
      if (pw.value !== pw2.value) return "The two passwords are not the same.";
      return { code, name: name.value.trim(), password: pw.value };
    };
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = collect();
    if (typeof body === "string") {
      showError(error, body);
      return;
    }
    showError(error, "");
    submit.disabled = true;
    try {
      const result = await acceptInvitation(body);
      me = result.user;
      renderAccount();
      // Replace the invitation URL: the code should not stay in the history.
      navigate(result.room_id ? `/room/${result.room_id}` : "/", { replace: true });
    } catch (failure) {
      submit.disabled = false;
      let words = invitationProblem(failure);
      if (failure instanceof ApiError) {
        if (failure.status === 401) words = "Wrong password for this account. Please try again.";
        else if (failure.status === 409) words = "An account with this e-mail already exists. Please log in first, then open the invitation link again.";
        else if (failure.status === 422) words = "Please fill in your name and a password of at least 10 characters.";
        else if (failure.status === 0) words = failure.message;
      }
      showError(error, words);
    }
  });

  page("Invitation", summary, form);
}

// -- start -----------------------------------------------------------------------------

/** Start the client: called once by app.entry.js. */
export function start() {
  route();
}
