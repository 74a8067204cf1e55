// The links between the administration and dashboard pages (and back to the rooms).

import { h } from "./dom.js";

/** Navigation for admins and coordinators; `current` is the path of this page. */
export function subnav(me, current) {
  const links = [["/dashboard", "Dashboard"], ["/admin", "Partnerships and people"], ["/", "My rooms"]];
  return h("nav", { "aria-label": "Administration" },
    h("ul", { class: "subnav" }, links.map(([href, text]) =>
      h("li", {}, h("a", { href, "data-link": true, text, "aria-current": href === current ? "page" : null })))));
}
