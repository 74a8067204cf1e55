// /admin: loaded by the router (app.js) for paths under /admin.
import "./dashboard.css";
import { mountAdmin } from "./admin.js";

export function mount(main, ctx) {
  return mountAdmin(main, ctx);
}
