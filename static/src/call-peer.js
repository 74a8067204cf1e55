// One RTCPeerConnection with one other participant of the call, and the "perfect
// negotiation" pattern (https://w3c.github.io/webrtc-pc/#perfect-negotiation-example)
// with the side the server assigned to this pair. No DOM here.
//
// Every link starts with two transceivers, in this order on both sides: microphone
// (audio) and camera (video). The newcomer creates them and offers; the one already in
// the call takes them from that offer. Turning the microphone or camera on or off only
// swaps the sender's track (no renegotiation). A screen share adds a track (a new
// transceiver) and stopping it removes the track: both renegotiate, and that is where
// glare happens when both sides start sharing at once. In that glare the polite side
// rolls back, and its screen transceiver is matched to the other side's new m-line, so
// both screens travel on it. (Flipping one fixed screen transceiver's direction instead
// wedged Chromium now and then: after the rollback the polite side decoded the other's
// screen but its track stayed muted, with the same SSRC as before.)

const SLOTS = ["audio", "camera"];
const ANSWER_WAIT_MS = 4000;

export class PeerLink {
  /**
   * @param {object} o
   * @param {string} o.remote the other participant's connection id
   * @param {boolean} o.polite this side's role toward the other
   * @param {boolean} o.offerer true for the newcomer, which makes the first offer
   * @param {RTCIceServer[]} o.iceServers
   * @param {{audio, camera, screen}} o.tracks local tracks to send (null: nothing)
   * @param {(signal) => void} o.send sends {description} or {candidate} to the remote
   * @param {(slots) => void} o.onMedia the receiving tracks, once the transceivers exist
   * @param {(state) => void} o.onState connection state changes
   */
  constructor(o) {
    this.remote = o.remote;
    this.polite = o.polite;
    this.send = o.send;
    this.onMedia = o.onMedia;
    this.onState = o.onState;
    this.tracks = { ...o.tracks };
    this.slots = null; // {audio, camera, screen}: RTCRtpTransceiver each
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.settingAnswer = false;
    this.closed = false;
    this.restarted = false;
    this.screenSender = null; // our screen share's RTCRtpSender while sharing
    this.screens = []; // receiving tracks of the other transceivers (the remote's screens)
    this.chain = Promise.resolve(); // incoming signals, one at a time
    this.checkTimer = null;
    const pc = (this.pc = new RTCPeerConnection({ iceServers: o.iceServers || [] }));
    pc.onnegotiationneeded = () => this.negotiate();
    pc.onicecandidate = ({ candidate }) => {
      if (candidate && candidate.candidate) this.send({ candidate: candidate.toJSON() });
    };
    pc.onconnectionstatechange = () => {
      if (this.closed) return;
      const state = pc.connectionState;
      if (state === "failed" && !this.restarted) {
        // One ICE restart (a renegotiation like any other), then give up and say so.
        this.restarted = true;
        pc.restartIce();
      }
      this.onState(state);
    };
    pc.ontrack = ({ transceiver, track }) => {
      if (this.slots && SLOTS.some((slot) => this.slots[slot] === transceiver)) return;
      if (!this.screens.includes(track)) {
        this.screens.push(track);
        track.addEventListener("unmute", () => this.mediaChanged());
        track.addEventListener("mute", () => this.mediaChanged());
      }
      this.mediaChanged();
    };
    pc.onsignalingstatechange = () => {
      if (pc.signalingState === "stable") this.scheduleCheck();
    };
    if (o.offerer) {
      const slots = {};
      for (const slot of SLOTS) {
        slots[slot] = pc.addTransceiver(slot === "audio" ? "audio" : "video", { direction: "sendrecv" });
      }
      this.attach(slots);
    }
  }

  attach(slots) {
    this.slots = slots;
    for (const slot of SLOTS) {
      // Always both ways: a null track sends nothing.
      slots[slot].direction = "sendrecv";
      slots[slot].sender.replaceTrack(this.tracks[slot] || null).catch(() => {});
    }
    if (this.tracks.screen) this.setTrack("screen", this.tracks.screen);
    this.mediaChanged();
  }

  /** The remote's screen: the receiving track of an extra transceiver that gets frames
   * (the latest one if none does yet). */
  remoteScreen() {
    this.screens = this.screens.filter((t) => t.readyState === "live");
    const live = this.screens;
    return [...live].reverse().find((t) => !t.muted) || live[live.length - 1] || null;
  }

  mediaChanged() {
    if (this.closed || !this.slots) return;
    this.onMedia({
      audio: this.slots.audio.receiver.track,
      camera: this.slots.camera.receiver.track,
      screen: this.remoteScreen(),
    });
  }

  /** Send this local track (or none) in a slot: "audio", "camera" or "screen". */
  setTrack(slot, track) {
    this.tracks[slot] = track || null;
    if (!this.slots || this.closed) return;
    if (slot !== "screen") {
      this.slots[slot].sender.replaceTrack(track || null).catch(() => {});
      return;
    }
    // Renegotiates: a new transceiver to share, or its direction back to recvonly.
    if (this.screenSender) {
      if (this.screenSender.track === track) return;
      this.pc.removeTrack(this.screenSender);
      this.screenSender = null;
    }
    if (track) this.screenSender = this.pc.addTrack(track, new MediaStream([track]));
  }

  async negotiate() {
    if (this.closed || !this.slots) return;
    try {
      this.makingOffer = true;
      await this.pc.setLocalDescription();
      const offer = this.pc.localDescription;
      this.send({ description: offer.toJSON() });
      this.awaitAnswer(offer.sdp);
    } catch {
      // A signal came in between; negotiationneeded fires again when it is stable.
    } finally {
      this.makingOffer = false;
    }
  }

  /** An offer or its answer can be lost (refused by the server's rate limit, say):
   * without an answer in time, take the offer back and offer again. */
  awaitAnswer(sdp) {
    clearTimeout(this.answerTimer);
    this.answerTimer = setTimeout(async () => {
      const pc = this.pc;
      if (this.closed || pc.signalingState !== "have-local-offer" || pc.localDescription.sdp !== sdp) return;
      try {
        await pc.setLocalDescription({ type: "rollback" });
      } catch {
        return;
      }
      this.negotiate();
    }, ANSWER_WAIT_MS + Math.random() * 1000);
  }

  /** A signal from the remote: {description} or {candidate}. Handled in arrival order. */
  receive(signal) {
    this.chain = this.chain.then(() => this.handle(signal)).catch(() => {});
    return this.chain;
  }

  async handle({ description, candidate }) {
    if (this.closed) return;
    const pc = this.pc;
    if (description) {
      const ready = !this.makingOffer && (pc.signalingState === "stable" || this.settingAnswer);
      const collision = description.type === "offer" && !ready;
      this.ignoreOffer = !this.polite && collision;
      if (this.ignoreOffer) return; // impolite: our offer wins
      this.settingAnswer = description.type === "answer";
      await pc.setRemoteDescription(description); // polite: rolls our offer back
      this.settingAnswer = false;
      if (description.type === "offer") {
        if (!this.slots) {
          const [audio, camera] = pc.getTransceivers();
          this.attach({ audio, camera });
        }
        await pc.setLocalDescription();
        this.send({ description: pc.localDescription.toJSON() });
      }
    } else if (candidate) {
      try {
        await pc.addIceCandidate(candidate);
      } catch (error) {
        if (!this.ignoreOffer) throw error;
      }
    }
  }

  /** After each negotiation: a send direction we want but did not get negotiated (the
   * side that backed down in a glare whose negotiationneeded never came) renegotiates. */
  scheduleCheck() {
    clearTimeout(this.checkTimer);
    this.checkTimer = setTimeout(() => {
      if (this.closed || !this.slots || this.pc.signalingState !== "stable" || this.makingOffer) return;
      // A screen transceiver nobody sends on any more is stopped, so its m-line is
      // rejected and recycled: otherwise each share adds one (some 3 KB of SDP), and
      // the offer outgrows the server's SDP limit after a few shares.
      let stopped = false;
      for (const t of this.pc.getTransceivers()) {
        if (SLOTS.some((slot) => this.slots[slot] === t) || t.currentDirection === "stopped") continue;
        if (t.mid !== null && t.currentDirection === "inactive" && t.direction === "recvonly") {
          t.stop(); // renegotiates
          stopped = true;
        }
      }
      if (stopped) return;
      const sends = (d) => d === "sendrecv" || d === "sendonly";
      const stale = this.pc.getTransceivers().some(
        (t) => t.mid !== null && sends(t.direction) !== sends(t.currentDirection),
      );
      if (stale) this.negotiate();
    }, 400);
  }

  updateIceServers(iceServers) {
    if (this.closed) return;
    try {
      this.pc.setConfiguration({ ...this.pc.getConfiguration(), iceServers });
    } catch {
      // Keep the old ones: they still work until they expire.
    }
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.checkTimer);
    clearTimeout(this.answerTimer);
    this.pc.onnegotiationneeded = this.pc.onicecandidate = null;
    this.pc.onconnectionstatechange = this.pc.onsignalingstatechange = this.pc.ontrack = null;
    this.pc.close();
  }
}
