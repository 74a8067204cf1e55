// Administration pages over the admin API (docs/api.md): institutions, partnerships and
// their stages, members and invitations (create, resend, revoke).
//   /admin                       institutions (admins) and partnerships
//   /admin/partnerships/ID       one partnership: stage, members, invitations

import { api, ApiError } from "./api.js";
import { announce, countryName, fill, h } from "./dom.js";
import { subnav } from "./admin-nav.js";

const STAGES = [
  "planning", "partner_identified", "invited", "meeting", "negotiating", "agreement_signed",
  "active", "review", "renewed", "completed", "closed",
];
const MEMBER_ROLES = ["instructor", "coordinator", "observer"];
const words = (s) => String(s || "").replace(/_/g, " ");
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "—");

let uid = 0;

/** A labelled control; returns [wrapper, control]. */
function field(label, control, hint = "") {
  const id = `adm-${control.name || "f"}-${++uid}`;
  control.id = id;
  const hintEl = hint ? h("p", { class: "hint", id: `${id}-hint`, text: hint }) : null;
  if (hintEl) control.setAttribute("aria-describedby", hintEl.id);
  return [h("div", { class: "field" }, h("label", { for: id, text: label }), control, hintEl), control];
}

function errorBox() {
  return h("div", { class: "form-error", role: "alert", hidden: true });
}

function say(box, message) {
  box.hidden = !message;
  box.textContent = message || "";
}

function problemWords(error) {
  if (!(error instanceof ApiError)) return "Something went wrong. Please try again.";
  if (error.status === 0) return error.message;
  return error.message.charAt(0).toUpperCase() + error.message.slice(1);
}

function table(caption, columns, rows, render) {
  return h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": caption },
    h("table", { class: "data-table" },
      h("caption", { class: "visually-hidden", text: caption }),
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", text: c })))),
      h("tbody", {}, rows.length
        ? rows.map(render)
        : h("tr", {}, h("td", { class: "empty", colspan: String(columns.length), text: "None yet." })))));
}

/** Submit handler plumbing: disable, call, report errors in the form's alert box. */
function onSubmit(form, box, button, work) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    say(box, "");
    button.disabled = true;
    try {
      await work();
    } catch (error) {
      say(box, problemWords(error));
    } finally {
      button.disabled = false;
    }
  });
}

function inviteLink(url) {
  const input = h("input", { type: "text", readonly: true, value: url, "aria-label": "Invitation link" });
  const copy = h("button", {
    type: "button", class: "button secondary small", text: "Copy link",
    onclick: async () => {
      input.select();
      try {
        await navigator.clipboard.writeText(url);
        announce("Invitation link copied");
        copy.textContent = "Copied";
      } catch {
        copy.textContent = "Select and copy";
      }
    },
  });
  return h("div", { class: "notice invite-result", role: "status" },
    h("p", { text: "Send this link to the person invited. It is shown only now; resending makes a new one." }),
    h("div", { class: "invite-link" }, input, copy));
}

// -- /admin --------------------------------------------------------------------------------

function overview(ctx, guard) {
  const { me, page, navigate } = ctx;
  const heading = page("Partnerships and people");
  const wrap = heading.parentElement;
  wrap.classList.add("wide");
  const grid = h("div", { class: "admin-grid" });
  wrap.append(subnav(me, "/admin"), grid);
  const isAdmin = me.role === "admin";
  let institutions = [];

  const instCard = h("section", { class: "card", "aria-labelledby": "inst-h" }, h("h2", { id: "inst-h", text: "Institutions" }));
  const partCard = h("section", { class: "card span-2", "aria-labelledby": "part-h" }, h("h2", { id: "part-h", text: "Partnerships" }));
  const newPartCard = h("section", { class: "card", "aria-labelledby": "newpart-h" }, h("h2", { id: "newpart-h", text: "New partnership" }));
  grid.append(partCard, newPartCard, isAdmin ? instCard : null);

  async function load() {
    try {
      const [inst, parts] = await Promise.all([api("GET", "/api/institutions"), api("GET", "/api/partnerships")]);
      if (!guard.alive) return;
      institutions = inst.institutions;
      renderPartnerships(parts.partnerships);
      renderNewPartnership();
      if (isAdmin) renderInstitutions();
    } catch (error) {
      guard.failed(error);
    }
  }

  function renderPartnerships(list) {
    fill(partCard, h("h2", { id: "part-h", text: "Partnerships" }),
      h("p", { class: "muted small", text: isAdmin ? "Every partnership." : "The partnerships you coordinate." }),
      table("Partnerships", ["Title", "Stage", "Institutions", "Room", "Dashboard"], list, (p) => h("tr", {},
        h("th", { scope: "row" }, h("a", { href: `/admin/partnerships/${p.id}`, "data-link": true, text: p.title })),
        h("td", { text: words(p.stage) }),
        h("td", { text: p.institutions.map((i) => `${i.name} (${i.country})`).join(", ") }),
        h("td", {}, p.room_id ? h("a", { href: `/room/${p.room_id}`, "data-link": true, text: "Enter" }) : "—"),
        h("td", {}, h("a", { href: `/dashboard?partnership=${p.id}`, "data-link": true, text: "Figures" })))));
  }

  function renderNewPartnership() {
    const box = errorBox();
    const [titleField, title] = field("Title", h("input", { name: "title", type: "text", required: true, maxlength: "300" }));
    const [goalsField, goals] = field("Goals", h("textarea", { name: "goals", rows: "3", maxlength: "20000" }));
    const checks = h("fieldset", { class: "checks" }, h("legend", { text: "Institutions (at least two)" }),
      institutions.map((i) => h("label", {}, h("input", { type: "checkbox", name: "institution", value: String(i.id) }), `${i.name} (${countryName(i.country)})`)));
    const button = h("button", { type: "submit", class: "button", text: "Create partnership" });
    const form = h("form", { class: "form", novalidate: true }, box, titleField, checks, goalsField, button);
    onSubmit(form, box, button, async () => {
      const ids = [...checks.querySelectorAll("input:checked")].map((c) => Number(c.value));
      if (!title.value.trim()) throw new ApiError(422, "invalid", "please give the partnership a title");
      if (ids.length < 2) throw new ApiError(422, "invalid", "please choose at least two institutions");
      const created = await api("POST", "/api/partnerships", { title: title.value.trim(), institution_ids: ids, goals: goals.value });
      announce("Partnership created");
      navigate(`/admin/partnerships/${created.id}`);
    });
    fill(newPartCard, h("h2", { id: "newpart-h", text: "New partnership" }),
      institutions.length < 2 ? h("p", { class: "muted", text: "A partnership needs two institutions; add them first." }) : form);
  }

  function renderInstitutions() {
    const box = errorBox();
    const [nameField, name] = field("Name", h("input", { name: "name", type: "text", required: true, maxlength: "200" }));
    const [countryField, country] = field("Country code", h("input", { name: "country", type: "text", required: true, maxlength: "2", pattern: "[A-Za-z]{2}", autocomplete: "off" }), "Two letters, ISO 3166: MX, DK, KE…");
    const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
    const [tzField, tz] = field("Time zone", h("input", { name: "timezone", type: "text", value: zone, maxlength: "64" }), "An IANA name such as Europe/Copenhagen.");
    const button = h("button", { type: "submit", class: "button", text: "Add institution" });
    const form = h("form", { class: "form", novalidate: true }, box, nameField, countryField, tzField, button);
    onSubmit(form, box, button, async () => {
      await api("POST", "/api/institutions", { name: name.value.trim(), country: country.value.trim(), timezone: tz.value.trim() || "UTC" });
      announce(`Institution ${name.value.trim()} added`);
      await load();
      grid.querySelector("#inst-h")?.focus?.();
    });
    fill(instCard, h("h2", { id: "inst-h", text: "Institutions" }),
      table("Institutions", ["Name", "Country", "Time zone"], institutions, (i) => h("tr", {},
        h("th", { scope: "row", text: i.name }), h("td", { text: `${countryName(i.country)} (${i.country})` }), h("td", { text: i.timezone }))),
      h("h3", { text: "Add an institution" }), form);
  }

  load();
}

// -- /admin/partnerships/ID -------------------------------------------------------------------

function partnershipPage(ctx, guard, id) {
  const { me, page } = ctx;
  const heading = page("Partnership");
  const wrap = heading.parentElement;
  wrap.classList.add("wide");
  const intro = h("div", {});
  const grid = h("div", { class: "admin-grid" });
  wrap.append(subnav(me, null), intro, grid);
  const stageCard = h("section", { class: "card", "aria-labelledby": "stage-h" });
  const inviteCard = h("section", { class: "card", "aria-labelledby": "invite-h" });
  const membersCard = h("section", { class: "card span-2", "aria-labelledby": "members-h" });
  const invitationsCard = h("section", { class: "card span-2", "aria-labelledby": "invs-h" });
  grid.append(stageCard, inviteCard, membersCard, invitationsCard);
  let partnership = null;
  let lastLink = null; // the link of the invitation just made or resent (shown once)

  async function load() {
    try {
      const base = `/api/partnerships/${id}`;
      const [p, stages, members, invitations, users] = await Promise.all([
        api("GET", base), api("GET", `${base}/stages`), api("GET", `${base}/members`), api("GET", `${base}/invitations`),
        me.role === "admin" ? api("GET", "/api/users") : { users: [] },
      ]);
      if (!guard.alive) return;
      partnership = p;
      heading.textContent = p.title;
      document.title = `${p.title} · Coilroom`;
      fill(intro,
        h("p", { class: "meta" },
          h("span", { class: "badge", text: `Stage: ${words(p.stage)}` }), " ",
          p.institutions.map((i) => h("span", { class: "badge", text: `${i.name} (${i.country})` }))),
        h("p", {},
          p.room_id ? h("a", { href: `/room/${p.room_id}`, "data-link": true, text: "Enter the room" }) : null, " · ",
          h("a", { href: `/dashboard?partnership=${p.id}`, "data-link": true, text: "See its dashboard" }), " · ",
          h("a", { href: "/admin", "data-link": true, text: "All partnerships" })));
      renderStages(stages.stages);
      renderInvite();
      renderMembers(members.members, users.users);
      renderInvitations(invitations.invitations);
    } catch (error) {
      guard.failed(error);
    }
  }

  function renderStages(history) {
    const box = errorBox();
    const select = h("select", { name: "stage" }, STAGES.map((s) => h("option", { value: s, text: words(s), selected: s === partnership.stage })));
    const [stageField] = field("Move to stage", select);
    const [noteField, note] = field("Note (optional)", h("input", { name: "note", type: "text", maxlength: "2000" }));
    const button = h("button", { type: "submit", class: "button", text: "Move" });
    const form = h("form", { class: "form", novalidate: true }, box, stageField, noteField, button);
    onSubmit(form, box, button, async () => {
      await api("POST", `/api/partnerships/${id}/stages`, { stage: select.value, note: note.value });
      announce(`Moved to ${words(select.value)}`);
      await load();
    });
    fill(stageCard, h("h2", { id: "stage-h", text: "Stage" }), form,
      h("h3", { text: "History" }),
      table("Stage history", ["When", "From", "To", "Note"], [...history].reverse(), (c) => h("tr", {},
        h("td", { text: when(c.changed_at) }), h("td", { text: c.from ? words(c.from) : "—" }),
        h("th", { scope: "row", text: words(c.to) }), h("td", { text: c.note || "" }))));
  }

  function renderInvite() {
    const box = errorBox();
    const [emailField, email] = field("E-mail", h("input", { name: "email", type: "email", required: true, autocomplete: "off", spellcheck: "false" }));
    const role = h("select", { name: "role" }, MEMBER_ROLES.map((r) => h("option", { value: r, text: r })));
    const [roleField] = field("Role", role);
    const inst = h("select", { name: "institution" }, h("option", { value: "", text: "—" }),
      partnership.institutions.map((i) => h("option", { value: String(i.id), text: i.name })));
    const [instField] = field("Institution", inst, "A new account gets this institution.");
    const button = h("button", { type: "submit", class: "button", text: "Invite" });
    const form = h("form", { class: "form", novalidate: true }, box, emailField, roleField, instField, button);
    onSubmit(form, box, button, async () => {
      const body = { email: email.value.trim(), role: role.value };
      if (inst.value) body.institution_id = Number(inst.value);
      const inv = await api("POST", `/api/partnerships/${id}/invitations`, body);
      lastLink = { id: inv.id, url: inv.accept_url };
      announce(`Invitation for ${inv.email} created`);
      await load();
    });
    fill(inviteCard, h("h2", { id: "invite-h", text: "Invite someone" }), form);
  }

  /** Administrators may add someone who already has an account. */
  function addExisting(members, users) {
    const present = new Set(members.map((m) => m.user_id));
    const candidates = users.filter((u) => !u.disabled && !present.has(u.id));
    if (!candidates.length) return null;
    const box = errorBox();
    const user = h("select", { name: "user" }, candidates.map((u) => h("option", { value: String(u.id), text: `${u.name} (${u.email})` })));
    const [userField] = field("Person", user);
    const role = h("select", { name: "member-role" }, MEMBER_ROLES.map((r) => h("option", { value: r, text: r })));
    const [roleField] = field("Role in the partnership", role);
    const button = h("button", { type: "submit", class: "button secondary", text: "Add member" });
    const form = h("form", { class: "inline-form", novalidate: true, "aria-label": "Add an existing account" }, box, userField, roleField, button);
    onSubmit(form, box, button, async () => {
      await api("POST", `/api/partnerships/${id}/members`, { user_id: Number(user.value), role: role.value });
      announce(`${user.selectedOptions[0].textContent} added`);
      await load();
    });
    return [h("h3", { text: "Add someone who has an account" }), form];
  }

  function renderMembers(members, users) {
    fill(membersCard, h("h2", { id: "members-h", text: `Members (${members.length})` }),
      table("Members", ["Name", "E-mail", "Institution", "Role", "Member since", ""], members, (m) => {
        const role = h("select", { "aria-label": `Role of ${m.name}` }, MEMBER_ROLES.map((r) => h("option", { value: r, text: r, selected: r === m.role })));
        role.addEventListener("change", async () => {
          try {
            await api("PATCH", `/api/partnerships/${id}/members/${m.user_id}`, { role: role.value });
            announce(`${m.name} is now ${role.value}`);
          } catch (error) {
            role.value = m.role;
            guard.failed(error, true);
          }
        });
        const remove = h("button", {
          type: "button", class: "link-button danger", text: "Remove", "aria-label": `Remove ${m.name}`,
          onclick: async () => {
            if (!window.confirm(`Remove ${m.name} from this partnership? Their open room pages close at once.`)) return;
            try {
              await api("DELETE", `/api/partnerships/${id}/members/${m.user_id}`);
              announce(`${m.name} removed`);
              await load();
            } catch (error) {
              guard.failed(error, true);
            }
          },
        });
        return h("tr", {},
          h("th", { scope: "row", text: m.name }), h("td", { text: m.email }),
          h("td", { text: m.institution ? m.institution.name : "—" }), h("td", {}, role),
          h("td", { text: when(m.since) }), h("td", {}, remove));
      }),
      addExisting(members, users));
  }

  function renderInvitations(invitations) {
    const rows = [...invitations].reverse();
    fill(invitationsCard, h("h2", { id: "invs-h", text: "Invitations" }),
      lastLink ? inviteLink(lastLink.url) : null,
      table("Invitations", ["E-mail", "Role", "State", "Expires", "Actions"], rows, (inv) => {
        const actions = [];
        if (inv.state !== "accepted") {
          actions.push(h("button", {
            type: "button", class: "button secondary small", text: "Resend", "aria-label": `Resend the invitation for ${inv.email}`,
            onclick: async () => {
              try {
                const renewed = await api("POST", `/api/partnerships/${id}/invitations/${inv.id}/resend`);
                lastLink = { id: inv.id, url: renewed.accept_url };
                announce(`New invitation link for ${inv.email}`);
                await load();
              } catch (error) {
                guard.failed(error, true);
              }
            },
          }));
        }
        if (inv.state === "pending" || inv.state === "expired") {
          actions.push(h("button", {
            type: "button", class: "button secondary small", text: "Revoke", "aria-label": `Revoke the invitation for ${inv.email}`,
            onclick: async () => {
              try {
                await api("DELETE", `/api/partnerships/${id}/invitations/${inv.id}`);
                if (lastLink && lastLink.id === inv.id) lastLink = null;
                announce(`Invitation for ${inv.email} revoked`);
                await load();
              } catch (error) {
                guard.failed(error, true);
              }
            },
          }));
        }
        return h("tr", { dataset: { invitation: String(inv.id) } },
          h("th", { scope: "row", text: inv.email }), h("td", { text: inv.role }),
          h("td", { class: `state-${inv.state}`, text: inv.state }),
          h("td", { text: inv.state === "accepted" ? `accepted ${when(inv.accepted_at)}` : when(inv.expires_at) }),
          h("td", {}, h("div", { class: "row-actions" }, actions)));
      }));
  }

  load();
}

// -- mount ----------------------------------------------------------------------------------

export function mountAdmin(main, ctx) {
  const { me, page, sessionEnded, path } = ctx;
  if (!me) return undefined;
  const status = h("p", { class: "notice error", role: "alert" });
  const guard = {
    alive: true,
    /** Handle an API failure; `inline` keeps the page and shows the problem on top. */
    failed(error, inline = false) {
      if (!guard.alive) return;
      if (error instanceof ApiError && error.status === 401) {
        sessionEnded();
        return;
      }
      if (!inline && error instanceof ApiError && (error.status === 403 || error.status === 404)) {
        page("Partnerships and people", h("p", { class: "notice error", text: error.status === 403
          ? "These pages are for administrators and the coordinators of a partnership."
          : "There is no such partnership." }),
        h("p", {}, h("a", { href: "/", "data-link": true, text: "Back to my rooms" })));
        return;
      }
      status.textContent = problemWords(error);
      main.querySelector(".page h1")?.after(status);
    },
  };
  const one = path.match(/^\/admin\/partnerships\/(\d+)\/?$/);
  if (one) partnershipPage(ctx, guard, Number(one[1]));
  else {
    if (path !== "/admin" && path !== "/admin/") history.replaceState(null, "", "/admin");
    overview(ctx, guard);
  }
  return () => {
    guard.alive = false;
  };
}
