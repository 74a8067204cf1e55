// One RTCPeerConnection with one other participant of the call, and the "perfect
// negotiation" pattern (https://w3c.github.io/webrtc-pc/#perfect-negotiation-example)
// with the side the server assigned to this pair. No DOM here.
//
// Every link has the same three transceivers, in this order on both sides: microphone
// (audio), camera (video), screen (video). The newcomer creates them and offers; the one
// already in the call takes them from that offer. Turning the microphone or camera on or
// off only swaps the sender's track (no renegotiation); a screen share also flips the
// screen transceiver's direction between sendrecv and recvonly, which renegotiates, and
// that is where glare happens when both sides start sharing at once.

const SLOTS = ["audio", "camera", "screen"];

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
    pc.onsignalingstatechange = () => {
      if (pc.signalingState === "stable") this.scheduleCheck();
    };
    if (o.offerer) {
      const slots = {};
      for (const slot of SLOTS) {
        slots[slot] = pc.addTransceiver(slot === "audio" ? "audio" : "video", {
          direction: this.directionFor(slot),
        });
      }
      this.attach(slots);
    }
  }

  directionFor(slot) {
    // Microphone and camera are always offered both ways (a null track sends nothing);
    // the screen only while it is shared.
    return slot !== "screen" || this.tracks.screen ? "sendrecv" : "recvonly";
  }

  attach(slots) {
    this.slots = slots;
    for (const slot of SLOTS) {
      const t = slots[slot];
      t.direction = this.directionFor(slot);
      t.sender.replaceTrack(this.tracks[slot] || null).catch(() => {});
    }
    this.onMedia({
      audio: slots.audio.receiver.track,
      camera: slots.camera.receiver.track,
      screen: slots.screen.receiver.track,
    });
  }

  /** Send this local track (or none) in a slot: "audio", "camera" or "screen". */
  setTrack(slot, track) {
    this.tracks[slot] = track || null;
    if (!this.slots || this.closed) return;
    const t = this.slots[slot];
    t.sender.replaceTrack(track || null).catch(() => {});
    const direction = this.directionFor(slot);
    if (t.direction !== direction) t.direction = direction; // renegotiates (screen)
  }

  async negotiate() {
    if (this.closed || !this.slots) return;
    try {
      this.makingOffer = true;
      await this.pc.setLocalDescription();
      this.send({ description: this.pc.localDescription.toJSON() });
    } catch {
      // A signal came in between; negotiationneeded fires again when it is stable.
    } finally {
      this.makingOffer = false;
    }
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
          const [audio, camera, screen] = pc.getTransceivers();
          this.attach({ audio, camera, screen });
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
      const sends = (d) => d === "sendrecv" || d === "sendonly";
      const stale = Object.values(this.slots).some(
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
    this.pc.onnegotiationneeded = this.pc.onicecandidate = null;
    this.pc.onconnectionstatechange = this.pc.onsignalingstatechange = null;
    this.pc.close();
  }
}
