// The call panel of the room page: whether a call is live and who is in it, joining and
// leaving, microphone / camera / screen / raised hand, participant tiles, moderation for
// coordinators, and the echo test. Mesh: one PeerLink (call-peer.js) per other
// participant. Frames come from room.js (call.*, echo.*, and errors of our messages).

import { createEchoTest } from "./call-echo.js";
import { PeerLink } from "./call-peer.js";
import { announce, fill, h } from "./dom.js";

const ID_PREFIX = "call-";
let idCount = 0;
const newId = () => `${ID_PREFIX}${Date.now().toString(36)}-${(idCount += 1)}`;

/** Errors of our own messages carry ids with this prefix. */
export const isCallError = (frame) => typeof frame.id === "string" && frame.id.startsWith(ID_PREFIX);

const ERROR_WORDS = {
  call_full: "The call is full, so you cannot join it now. Try again when someone leaves.",
  already_in_call: "You are already in this call (in this tab).",
  not_in_call: "You are not in the call any more.",
  forbidden: "Only coordinators can mute or remove people.",
  unknown_peer: "That person is no longer in the call.",
  rate_limited: "Too many call messages at once; slow down a little.",
  unavailable: "The server could not let you join just now. Please try again.",
};

/** getUserMedia / getDisplayMedia failures in plain words. */
export function mediaProblem(error, what) {
  const name = error && error.name;
  if (name === "NotAllowedError" || name === "SecurityError") {
    return what === "screen"
      ? "Screen sharing was not allowed."
      : `Coilroom is not allowed to use your ${what}. Allow it in the browser's site settings (the icon at the left of the address bar), then try again.`;
  }
  if (name === "NotFoundError" || name === "OverconstrainedError") return `No ${what} was found. Check that it is plugged in and switched on.`;
  if (name === "NotReadableError" || name === "AbortError") return `Your ${what} could not be started: another program may be using it.`;
  if (!navigator.mediaDevices) return "This browser cannot make calls here (calls need a secure https page).";
  return `Your ${what} could not be started (${(error && error.message) || "unknown problem"}).`;
}

function deviceWords(kinds) {
  if (kinds.audio && kinds.video) return "camera and microphone";
  return kinds.video ? "camera" : "microphone";
}

/** Ask for devices; throws the problem in plain words. */
async function getMedia(kinds) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) throw mediaProblem(null, deviceWords(kinds));
  try {
    return await navigator.mediaDevices.getUserMedia(kinds);
  } catch (error) {
    throw mediaProblem(error, deviceWords(kinds));
  }
}

/**
 * Build the call panel in ``box``. ``ctx``: {me, send(frame) -> bool, canModerate(),
 * onLayout(inCall)}. Returns {onWelcome, onFrame, onError, onDisconnected, destroy}.
 */
export function showCall(box, ctx) {
  const { me, send } = ctx;
  const st = {
    myConn: null, // this tab's connection id (welcome)
    call: null, // {callId, participants: Map(conn -> {user, media})} or null
    joined: false, // this tab is in the call
    joining: false,
    known: false, // welcomed: st.call is the server's word
    links: new Map(), // conn -> PeerLink
    remote: new Map(), // conn -> {audio, camera, screen} receiving tracks
    linkState: new Map(), // conn -> connection state
    local: { audio: null, camera: null, screen: null }, // tracks
    hand: false,
    iceServers: [],
    alive: true,
  };

  // -- skeleton ----------------------------------------------------------------------

  const heading = h("h2", { id: "call-heading", tabindex: "-1", text: "Call" });
  const summary = h("p", { class: "call-summary", role: "status" });
  const problem = h("p", { class: "call-problem", role: "alert", hidden: true });
  const joinButton = h("button", { type: "button", class: "button", onclick: () => join() });
  const echoButton = h("button", { type: "button", class: "button secondary", text: "Test camera and microphone", onclick: () => echo.start() });
  const toggle = (label, onclick) => h("button", { type: "button", class: "button secondary toggle", "aria-pressed": "false", text: label, onclick });
  const micButton = toggle("Microphone", () => setMic(!st.local.audio));
  const camButton = toggle("Camera", () => setCamera(!st.local.camera));
  const screenButton = toggle("Share screen", () => setScreen(!st.local.screen));
  const handButton = toggle("Raise hand", () => setHand(!st.hand));
  const leaveButton = h("button", { type: "button", class: "button danger", text: "Leave call", onclick: () => leave("You left the call.") });
  const outside = h("div", { class: "call-actions" }, joinButton, echoButton);
  const inside = h("div", { class: "call-actions", role: "group", "aria-label": "Your call controls", hidden: true },
    micButton, camButton, screenButton, handButton, leaveButton);
  const tiles = h("ul", { class: "call-tiles", "aria-label": "People in the call" });
  const echo = createEchoTest({ send, newId, getMedia, onChange: render });
  fill(box, heading, summary, problem, outside, inside, tiles, echo.el);

  // -- helpers -----------------------------------------------------------------------

  function tell(text) {
    problem.hidden = !text;
    problem.textContent = text || "";
  }

  function sendCall(frame) {
    return send({ ...frame, id: newId() });
  }

  function names(list) {
    if (list.length <= 2) return list.join(" and ");
    return `${list.slice(0, -1).join(", ")} and ${list[list.length - 1]}`;
  }

  function participant(conn) {
    return st.call && st.call.participants.get(conn);
  }

  function nameOf(conn) {
    const p = participant(conn);
    if (!p) return "Someone";
    return p.user.id === me.id && conn !== st.myConn ? `${p.user.name} (your other tab)` : p.user.name;
  }

  // -- rendering ---------------------------------------------------------------------

  function render() {
    const people = st.call ? [...st.call.participants.entries()] : [];
    const others = people.filter(([conn]) => conn !== st.myConn);
    if (!st.known) {
      summary.textContent = "Waiting for the room's connection…";
    } else if (!st.call) {
      summary.textContent = "No call right now.";
    } else if (st.joined) {
      summary.textContent = others.length
        ? `You are in the call with ${names(others.map(([c]) => nameOf(c)))}.`
        : "You are in the call. Nobody else is here yet.";
    } else {
      summary.textContent = `A call is on with ${names(people.map(([c]) => nameOf(c)))}.`;
    }
    joinButton.textContent = st.joining ? "Joining…" : st.call ? "Join call" : "Start a call";
    joinButton.disabled = st.joining || !st.known;
    outside.hidden = st.joined;
    inside.hidden = !st.joined;
    echoButton.disabled = echo.running || !st.known;
    micButton.setAttribute("aria-pressed", String(!!st.local.audio));
    camButton.setAttribute("aria-pressed", String(!!st.local.camera));
    screenButton.setAttribute("aria-pressed", String(!!st.local.screen));
    screenButton.hidden = !(navigator.mediaDevices && navigator.mediaDevices.getDisplayMedia);
    handButton.setAttribute("aria-pressed", String(st.hand));
    renderTiles(people);
    box.classList.toggle("in-call", st.joined);
    ctx.onLayout(st.joined);
  }

  const tileEls = new Map(); // key -> {li, video, audio, caption, actions}

  function renderTiles(people) {
    const wanted = new Set();
    if (st.joined) {
      for (const [conn, p] of people) {
        wanted.add(`${conn}:cam`);
        renderTile(`${conn}:cam`, conn, p, false);
        if (p.media.screen) {
          wanted.add(`${conn}:screen`);
          renderTile(`${conn}:screen`, conn, p, true);
        }
      }
    }
    for (const [key, tile] of tileEls) {
      if (!wanted.has(key)) {
        tile.li.remove();
        tileEls.delete(key);
      }
    }
  }

  function renderTile(key, conn, p, isScreen) {
    let tile = tileEls.get(key);
    const mine = conn === st.myConn;
    if (!tile) {
      const video = h("video", { autoplay: true, playsinline: true });
      video.muted = true; // sound plays through the audio element
      const audio = mine || isScreen ? null : h("audio", { autoplay: true });
      const caption = h("p", { class: "tile-caption" });
      const placeholder = h("p", { class: "tile-placeholder", "aria-hidden": "true" });
      const state = h("p", { class: "tile-state" });
      const actions = h("div", { class: "tile-actions" });
      const li = h("li", { class: `tile${isScreen ? " screen" : ""}${mine ? " mine" : ""}`, dataset: { conn, kind: isScreen ? "screen" : "camera" } },
        video, placeholder, audio, caption, state, actions);
      tile = { li, video, audio, caption, placeholder, state, actions, stream: null };
      tileEls.set(key, tile);
    }
    tiles.append(tile.li); // keeps the order of the participants
    const name = mine ? `${me.name} (you)` : nameOf(conn);
    tile.caption.textContent = isScreen ? `${name}: screen` : name;
    const m = p.media;
    const showVideo = isScreen ? m.screen : m.video;
    let track = null;
    if (mine) track = isScreen ? st.local.screen : st.local.camera;
    else if (st.remote.get(conn)) track = st.remote.get(conn)[isScreen ? "screen" : "camera"];
    setStream(tile, tile.video, track);
    tile.video.hidden = !showVideo || !track;
    tile.placeholder.hidden = !tile.video.hidden;
    tile.placeholder.textContent = initials(p.user.name);
    if (tile.audio && st.remote.get(conn)) setStream(tile, tile.audio, st.remote.get(conn).audio, "sound");
    if (!isScreen) {
      const bits = [m.audio ? "microphone on" : "microphone off"];
      if (!m.video) bits.push("camera off");
      if (m.hand) bits.push("✋ hand raised");
      const link = st.linkState.get(conn);
      if (!mine && link === "failed") bits.push("could not connect");
      else if (!mine && link === "disconnected") bits.push("connection unstable");
      else if (!mine && link && link !== "connected") bits.push("connecting…");
      tile.state.textContent = bits.join(" · ");
      tile.li.classList.toggle("hand", !!m.hand);
      tile.li.classList.toggle("failed", link === "failed");
    } else {
      tile.state.textContent = "";
    }
    fill(tile.actions, !mine && !isScreen && ctx.canModerate() ? [
      m.audio ? h("button", { type: "button", class: "link-button", text: "Mute", "aria-label": `Mute ${name}`, onclick: () => moderate(conn, "mute") }) : null,
      h("button", { type: "button", class: "link-button danger", text: "Remove", "aria-label": `Remove ${name} from the call`, onclick: () => moderate(conn, "remove") }),
    ] : null);
  }

  function setStream(tile, el, track, which = "picture") {
    const key = `${which}Track`;
    if (tile[key] === track) return;
    tile[key] = track;
    el.srcObject = track ? new MediaStream([track]) : null;
    if (track) el.play().catch(() => {});
  }

  function initials(name) {
    return name.split(/\s+/).filter(Boolean).slice(0, 2).map((w) => w[0].toUpperCase()).join("");
  }

  // -- the call's state from the server ------------------------------------------------

  function setCall(call) {
    st.call = call
      ? {
          callId: call.call_id,
          participants: new Map((call.participants || []).map((p) => [p.connection_id, { user: p.user, media: p.media }])),
        }
      : null;
  }

  function onWelcome(frame) {
    st.myConn = frame.connection_id;
    if (st.joined) endLocally(); // a new connection is not in the call
    setCall(frame.call);
    st.known = true;
    render();
  }

  function onFrame(frame) {
    if (!st.alive) return;
    switch (frame.type) {
      case "call.joined": return onJoined(frame);
      case "call.started":
        if (!st.call) setCall({ call_id: frame.call_id, participants: [] });
        if (frame.by.id !== me.id) announce(`${frame.by.name} started a call.`);
        break;
      case "call.participant_joined": return onParticipantJoined(frame);
      case "call.participant_left": return onParticipantLeft(frame);
      case "call.ended":
        // With several server processes a late "ended" of an earlier call can
        // arrive after the next call started: only the call it names ends.
        if (st.call && frame.call_id && st.call.callId !== frame.call_id) break;
        if (st.joined) endLocally();
        st.call = null;
        break;
      case "call.media": return onMedia(frame);
      case "call.signal": return onSignal(frame);
      case "call.moderated": return onModerated(frame);
      case "call.ice_servers":
        st.iceServers = frame.ice_servers || [];
        for (const link of st.links.values()) link.updateIceServers(st.iceServers);
        return undefined;
      case "echo.answer":
      case "echo.ended":
        echo.onFrame(frame);
        break;
      default:
        return undefined;
    }
    render();
    return undefined;
  }

  function onJoined(frame) {
    st.joining = false;
    if (!st.alive) return;
    st.joined = true;
    st.myConn = frame.connection_id;
    st.iceServers = frame.ice_servers || [];
    if (!st.call || st.call.callId !== frame.call_id) setCall({ call_id: frame.call_id, participants: [] });
    st.call.participants.set(st.myConn, { user: me, media: currentMedia() });
    for (const p of frame.participants) {
      st.call.participants.set(p.connection_id, { user: p.user, media: p.media });
      // The newcomer offers to each one already there.
      openLink(p.connection_id, p.polite, true);
    }
    render();
    heading.focus({ preventScroll: true });
    announce(frame.participants.length ? "You joined the call." : "You started a call.");
  }

  function onParticipantJoined(frame) {
    if (!st.call || st.call.callId !== frame.call_id) setCall({ call_id: frame.call_id, participants: [] });
    const p = frame.participant;
    const conn = p.connection_id;
    const known = st.call.participants.has(conn);
    st.call.participants.set(conn, { user: p.user, media: p.media });
    if (conn === st.myConn) return render();
    if (st.joined) {
      const role = frame.roles && frame.roles[st.myConn];
      const link = st.links.get(conn);
      if (link) link.polite = role === "polite";
      else openLink(conn, role === "polite", false); // wait for the newcomer's offer
      if (!known) announce(`${p.user.name} joined the call.`);
    }
    return render();
  }

  function onParticipantLeft(frame) {
    const conn = frame.connection_id;
    const name = nameOf(conn);
    if (st.call) st.call.participants.delete(conn);
    if (conn === st.myConn) {
      if (st.joined) {
        endLocally();
        if (frame.reason !== "removed") announce("You left the call.");
      }
      return render();
    }
    closeLink(conn);
    if (st.joined) announce(`${name} left the call.`);
    return render();
  }

  function onMedia(frame) {
    const p = participant(frame.connection_id);
    if (!p) return render();
    const before = p.media;
    p.media = frame.media;
    if (frame.connection_id !== st.myConn && st.joined) {
      const name = nameOf(frame.connection_id);
      if (frame.media.hand && !before.hand) announce(`${name} raised their hand.`);
      if (frame.media.screen && !before.screen) announce(`${name} is sharing their screen.`);
    }
    return render();
  }

  function onSignal(frame) {
    if (!st.joined) return;
    let link = st.links.get(frame.from);
    if (!link) {
      // An offer from a newcomer whose participant_joined has not come yet: the
      // newcomer is polite toward browsers, so this side is impolite until told.
      if (!frame.description || frame.description.type !== "offer") return;
      link = openLink(frame.from, false, false);
    }
    link.receive({ description: frame.description, candidate: frame.candidate });
  }

  function onModerated(frame) {
    const by = (frame.by && frame.by.name) || "A coordinator";
    if (frame.action === "mute") {
      stopLocal("audio");
      tell(`${by} muted your microphone. You can turn it on again when you need to speak.`);
      announce(`${by} muted your microphone.`);
    } else if (frame.action === "remove") {
      endLocally();
      tell(`${by} removed you from the call. You can still use the room.`);
    }
    render();
  }

  function onError(frame) {
    if (echoCodes.has(frame.code)) {
      echo.onError(frame);
      return render();
    }
    // A signal to someone who just left; or a signal over the rate limit (the peer
    // link offers again when no answer comes).
    if (frame.code === "unknown_peer") return undefined;
    if (frame.code === "rate_limited" && st.joined) return undefined;
    if (st.joining) st.joining = false;
    if (frame.code === "call_full" || frame.code === "unavailable") {
      releaseAll();
    }
    tell(ERROR_WORDS[frame.code] || frame.message || "Something went wrong with the call.");
    return render();
  }
  const echoCodes = new Set(["echo_busy", "echo_running", "echo_unavailable", "bad_offer", "echo_cancelled"]);

  // -- peer links --------------------------------------------------------------------

  function openLink(conn, polite, offerer) {
    closeLink(conn);
    const link = new PeerLink({
      remote: conn,
      polite,
      offerer,
      iceServers: st.iceServers,
      tracks: st.local,
      send: (signal) => sendCall({ type: "call.signal", to: conn, ...signal }),
      onMedia: (tracks) => {
        st.remote.set(conn, tracks);
        render();
      },
      onState: (state) => {
        const before = st.linkState.get(conn);
        st.linkState.set(conn, state);
        if (state === "failed" && before !== "failed") {
          tell(`Could not connect to ${nameOf(conn)}. A firewall may block calls between your networks; trying once more.`);
        } else if (state === "connected" && before === "failed") {
          tell("");
        }
        render();
      },
    });
    st.links.set(conn, link);
    st.linkState.set(conn, "new");
    return link;
  }

  function closeLink(conn) {
    const link = st.links.get(conn);
    if (link) link.close();
    st.links.delete(conn);
    st.remote.delete(conn);
    st.linkState.delete(conn);
  }

  // -- local media ---------------------------------------------------------------------

  function currentMedia() {
    return { audio: !!st.local.audio, video: !!st.local.camera, screen: !!st.local.screen, hand: st.hand };
  }

  function useTrack(slot, track) {
    st.local[slot] = track;
    for (const link of st.links.values()) link.setTrack(slot, track);
  }

  function stopLocal(slot) {
    const track = st.local[slot];
    if (!track) return;
    useTrack(slot, null);
    track.stop();
  }

  function releaseAll() {
    for (const slot of ["audio", "camera", "screen"]) stopLocal(slot);
    st.hand = false;
  }

  async function setMic(on) {
    if (!on) {
      stopLocal("audio");
    } else {
      try {
        const stream = await getMedia({ audio: true });
        if (!st.joined) return stream.getTracks().forEach((t) => t.stop());
        useTrack("audio", stream.getAudioTracks()[0]);
        tell("");
      } catch (words) {
        tell(String(words));
      }
    }
    sendCall({ type: "call.media", audio: !!st.local.audio });
    return render();
  }

  async function setCamera(on) {
    if (!on) {
      stopLocal("camera");
    } else {
      try {
        const stream = await getMedia({ video: true });
        if (!st.joined) return stream.getTracks().forEach((t) => t.stop());
        useTrack("camera", stream.getVideoTracks()[0]);
        tell("");
      } catch (words) {
        tell(String(words));
      }
    }
    sendCall({ type: "call.media", video: !!st.local.camera });
    return render();
  }

  async function setScreen(on) {
    if (!on) {
      stopLocal("screen");
    } else {
      try {
        const stream = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false });
        const track = stream.getVideoTracks()[0];
        if (!st.joined) return track.stop();
        // The browser's own "Stop sharing" button ends the track.
        track.addEventListener("ended", () => {
          if (st.local.screen === track) setScreen(false);
        });
        useTrack("screen", track);
        tell("");
      } catch (error) {
        tell(mediaProblem(error, "screen"));
      }
    }
    sendCall({ type: "call.media", screen: !!st.local.screen });
    return render();
  }

  function setHand(up) {
    st.hand = up;
    sendCall({ type: "call.media", hand: up });
    render();
  }

  function moderate(conn, action) {
    const name = nameOf(conn);
    if (action === "remove" && !window.confirm(`Remove ${name} from the call?`)) return;
    sendCall({ type: "call.moderate", target: conn, action });
    announce(action === "mute" ? `You muted ${name}.` : `You removed ${name} from the call.`);
  }

  // -- joining and leaving -------------------------------------------------------------

  async function join() {
    if (st.joined || st.joining) return;
    if (typeof RTCPeerConnection === "undefined") {
      tell("This browser cannot make calls.");
      return;
    }
    st.joining = true;
    tell("");
    render();
    if (echo.running) echo.stop();
    const problems = [];
    // Ask for both at once (one permission prompt); if a device is missing, each alone.
    try {
      const stream = await getMedia({ audio: true, video: true });
      st.local.audio = stream.getAudioTracks()[0] || null;
      st.local.camera = stream.getVideoTracks()[0] || null;
    } catch (words) {
      const both = String(words);
      if (/^No /.test(both)) {
        for (const kind of ["audio", "video"]) {
          try {
            const stream = await getMedia({ [kind]: true });
            st.local[kind === "audio" ? "audio" : "camera"] = stream.getTracks()[0];
          } catch (one) {
            problems.push(String(one));
          }
        }
      } else {
        problems.push(both);
      }
    }
    if (!st.alive || !st.joining) return releaseAll();
    if (problems.length) tell(`${problems.join(" ")} You can join without it, and others will still see and hear you if you turn it on later.`);
    if (!sendCall({ type: "call.join", media: currentMedia(), rollback: true })) {
      st.joining = false;
      releaseAll();
      tell("You are offline: you cannot join the call until the connection is back.");
    }
    return render();
  }

  /** Close every peer connection and stop every track (the server is told separately). */
  function endLocally() {
    for (const conn of [...st.links.keys()]) closeLink(conn);
    releaseAll();
    st.joined = false;
    st.joining = false;
    if (st.call && st.myConn) st.call.participants.delete(st.myConn);
  }

  function leave(words) {
    if (!st.joined) return;
    sendCall({ type: "call.leave" });
    endLocally();
    tell("");
    announce(words);
    render();
    joinButton.focus();
  }

  function onDisconnected() {
    if (st.joined || st.joining) {
      endLocally();
      tell("The connection to the room was lost, so you left the call. Join again when the connection is back.");
    }
    echo.drop("The connection to the room was lost, so the test ended.");
    st.call = null;
    st.known = false;
    render();
  }

  render();

  return {
    onWelcome,
    onFrame,
    onError,
    onDisconnected,
    destroy() {
      if (st.joined) sendCall({ type: "call.leave" });
      echo.stop();
      endLocally();
      st.alive = false;
    },
  };
}
