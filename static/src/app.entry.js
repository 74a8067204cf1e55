// The page's entry point (see static/build.mjs): styles, then the router.
import "./app.css";
import { start } from "./app.js";

start();
