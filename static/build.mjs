// Build the browser client: every static/src/*.entry.js is an entry point, bundled with
// esbuild into static/dist/ under content-hashed names (NAME.entry-HASH.js, and
// NAME.entry-HASH.css when the entry imports CSS). Code shared between entries goes
// into hashed chunks, so each page loads only what it needs.
//
// The page itself, static/index.html, is written from the template static/src/index.html:
// it links the "app" entry (the router), and carries the manifest of every entry so the
// router can load another entry (say dashboard.entry.js for /dashboard) by its hashed
// name. Nothing is inline: the manifest is a JSON data block, which CSP does not run.
//
//   node static/build.mjs            # one build
//   node static/build.mjs --watch    # rebuild on change (development)

import * as esbuild from "esbuild";
import { readFileSync, readdirSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const src = join(here, "src");
const dist = join(here, "dist");
const ENTRY = /^([a-z0-9][a-z0-9-]*)\.entry\.js$/;

function entryPoints() {
  return readdirSync(src)
    .filter((name) => ENTRY.test(name))
    .sort()
    .map((name) => join(src, name));
}

/** {name: {js, css}} from esbuild's metafile, with URLs under /static/dist/. */
function manifestOf(metafile) {
  const entries = {};
  for (const [out, info] of Object.entries(metafile.outputs)) {
    if (!info.entryPoint) continue;
    const match = info.entryPoint.split("/").pop().match(ENTRY);
    if (!match) continue;
    const url = (file) => `/static/${relative(here, file).split("\\").join("/")}`;
    entries[match[1]] = { js: url(join(process.cwd(), out)), css: info.cssBundle ? url(join(process.cwd(), info.cssBundle)) : null };
  }
  return entries;
}

function writePage(entries) {
  if (!entries.app) throw new Error("static/src/app.entry.js is missing: the page has nothing to run");
  const template = readFileSync(join(src, "index.html"), "utf8");
  // JSON in HTML: "<" escaped so no string can close the data block.
  const data = JSON.stringify(entries).replace(/</g, "\\u003c");
  const head = [
    entries.app.css ? `<link rel="stylesheet" href="${entries.app.css}">` : "",
    `<script type="application/json" id="coilroom-entries">${data}</script>`,
    `<script type="module" src="${entries.app.js}"></script>`,
  ].filter(Boolean).join("\n  ");
  if (!template.includes("<!-- build:head -->")) throw new Error("static/src/index.html lacks <!-- build:head -->");
  const page = template
    .replace("<!-- build:head -->", head)
    .replace("<!-- build:note -->", "<!-- Written by static/build.mjs from static/src/index.html: edit that one. -->");
  writeFileSync(join(here, "index.html"), page);
  writeFileSync(join(dist, "manifest.json"), `${JSON.stringify(entries, null, 2)}\n`);
}

const options = {
  entryPoints: entryPoints(),
  outdir: dist,
  bundle: true,
  splitting: true,
  format: "esm",
  platform: "browser",
  target: ["es2020", "chrome100", "firefox100", "safari15"],
  entryNames: "[name]-[hash]",
  chunkNames: "chunks/[name]-[hash]",
  assetNames: "assets/[name]-[hash]",
  minify: true,
  sourcemap: "linked",
  metafile: true,
  legalComments: "linked",
  logLevel: "warning",
  absWorkingDir: process.cwd(),
};

if (process.argv.includes("--watch")) {
  const ctx = await esbuild.context({
    ...options,
    plugins: [{
      name: "page",
      setup(build) {
        build.onEnd((result) => {
          if (result.errors.length === 0) writePage(manifestOf(result.metafile));
        });
      },
    }],
  });
  rmSync(dist, { recursive: true, force: true });
  await ctx.watch();
  console.log("watching static/src for changes");
} else {
  rmSync(dist, { recursive: true, force: true });
  mkdirSync(dist, { recursive: true });
  const result = await esbuild.build(options);
  writePage(manifestOf(result.metafile));
  const names = Object.keys(manifestOf(result.metafile)).join(", ");
  console.log(`static/dist: built ${names}`);
}
