// The echo test: a call with the server itself, which sends back what it receives, so
// one sees one's own camera (and hears one's microphone) as others would.
// Non-trickle: the offer is sent once ICE gathering is complete (echo.start), and the
// server's echo.answer carries all of its candidates.

import { h } from "./dom.js";

const GATHER_LIMIT_MS = 5000;

const END_WORDS = {
  hangup: "The test has ended.",
  timeout: "The test ended: it reached its time limit, or the server could not reach your browser in time.",
  failed: "The connection to the server failed. A firewall may block calls from this network.",
  shutdown: "The test ended because the server is restarting. Try again in a moment.",
};

const ERROR_WORDS = {
  echo_busy: "The server is running as many tests as it can right now. Please try again in a minute.",
  echo_running: "A test is already running for you, perhaps in another tab. Stop it there, or wait for it to end.",
  echo_unavailable: "The camera and microphone test is switched off on this server.",
  bad_offer: "Your browser's call offer was not accepted by the server.",
  echo_cancelled: "The test was stopped before it started.",
};

/** Wait until the connection has gathered its candidates (or a time limit passes). */
function gathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, GATHER_LIMIT_MS);
    function done() {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    }
    function check() {
      if (pc.iceGatheringState === "complete") done();
    }
    pc.addEventListener("icegatheringstatechange", check);
  });
}

/**
 * The echo test's part of the call panel. ``getMedia(kinds)`` asks for devices and
 * returns a MediaStream or throws a message in plain words.
 */
export function createEchoTest({ send, newId, getMedia, onChange }) {
  const video = h("video", { class: "echo-video", autoplay: true, playsinline: true, "aria-label": "Your video, sent back by the server" });
  video.muted = false;
  const status = h("p", { class: "echo-status", role: "status" });
  const stopButton = h("button", { type: "button", class: "button secondary small", text: "Stop the test", onclick: () => stop() });
  const box = h("div", { class: "echo", hidden: true }, video, status, stopButton);

  let pc = null;
  let stream = null;
  let running = false;

  function say(text, kind = "") {
    status.textContent = text;
    status.className = `echo-status ${kind}`;
  }

  function cleanUp() {
    if (pc) {
      pc.onconnectionstatechange = null;
      pc.ontrack = null;
      pc.close();
    }
    pc = null;
    if (stream) for (const t of stream.getTracks()) t.stop();
    stream = null;
    video.srcObject = null;
    running = false;
    stopButton.hidden = true;
    onChange();
  }

  async function start() {
    if (running) return;
    running = true;
    box.hidden = false;
    stopButton.hidden = false;
    onChange();
    say("Starting your camera and microphone…");
    try {
      stream = await getMedia({ audio: true, video: true });
    } catch (words) {
      say(String(words), "error");
      cleanUp();
      return;
    }
    if (!running) return cleanUp();
    say("Connecting to the server…");
    pc = new RTCPeerConnection({ iceServers: [] });
    for (const track of stream.getTracks()) pc.addTrack(track, stream);
    pc.ontrack = (event) => {
      if (event.track.kind !== "video") return;
      video.srcObject = event.streams[0] || new MediaStream([event.track]);
      video.play().catch(() => {});
    };
    pc.onconnectionstatechange = () => {
      if (!pc) return;
      if (pc.connectionState === "connected") say("Connected: you should see yourself and hear your voice with a short delay.", "ok");
      if (pc.connectionState === "failed") say(END_WORDS.failed, "error");
    };
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await gathered(pc);
    } catch {
      say("Your browser could not prepare the test call.", "error");
      cleanUp();
      return;
    }
    if (!running || !pc) return undefined;
    if (!send({ type: "echo.start", id: newId(), description: pc.localDescription.toJSON() })) {
      say("You are offline: the test cannot start. Try again when the connection is back.", "error");
      cleanUp();
    }
    return undefined;
  }

  function stop() {
    if (!running) return;
    send({ type: "echo.stop", id: newId() });
    say(END_WORDS.hangup);
    cleanUp();
  }

  async function onFrame(frame) {
    if (frame.type === "echo.answer") {
      if (!pc) return;
      try {
        await pc.setRemoteDescription(frame.description);
      } catch {
        say("The server's answer could not be used.", "error");
        stop();
      }
    } else if (frame.type === "echo.ended") {
      if (frame.reason !== "hangup" || running) say(END_WORDS[frame.reason] || END_WORDS.hangup, frame.reason === "hangup" ? "" : "error");
      if (running) cleanUp();
    }
  }

  function onError(frame) {
    say(ERROR_WORDS[frame.code] || frame.message || "The test could not start.", "error");
    if (running) cleanUp();
  }

  return {
    el: box,
    start,
    stop,
    onFrame,
    onError,
    get running() { return running; },
    /** The socket dropped or the page is going: end locally (the server ends its side). */
    drop(words) {
      if (!running) return;
      if (words) say(words, "error");
      cleanUp();
    },
  };
}
