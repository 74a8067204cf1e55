// /dashboard: loaded by the router (app.js) for paths under /dashboard.
import "./dashboard.css";
import { mountDashboard } from "./dashboard.js";

export function mount(main, ctx) {
  return mountDashboard(main, ctx);
}
