"""Chromium-like session descriptions and ICE candidates for the signaling benchmark.

What Chromium (M120-ish) puts in ``RTCPeerConnection.createOffer()`` with a
microphone, a camera and a data channel, default codecs, ``bundlePolicy``
balanced, trickle ICE (no candidates in the SDP): audio (Opus, RED, G722, PCMU/A,
CN, DTMF), video (VP8, VP9 x2 profiles, H264 x several profiles, AV1, each with
RTX, plus RED/ULPFEC) and SCTP. About 5-6 KB, like the real thing. Candidates are
the four a browser typically trickles (mDNS host UDP and TCP, server-reflexive,
TURN relay), then the end-of-candidates marker (empty ``candidate``).

The send time (``time.monotonic_ns()``) rides in fields that carry a number
anyway: the SDP's ``o=`` session version and the candidate's foundation, so the
relays pass it through untouched and the receiver reads it back without keeping
any table.
"""

from __future__ import annotations

import random

_EXTMAP_AUDIO = (
    "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    "urn:ietf:params:rtp-hdrext:sdes:mid",
)
_EXTMAP_VIDEO = (
    "urn:ietf:params:rtp-hdrext:toffset",
    "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
    "urn:3gpp:video-orientation",
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay",
    "http://www.webrtc.org/experiments/rtp-hdrext/video-content-type",
    "http://www.webrtc.org/experiments/rtp-hdrext/video-timing",
    "http://www.webrtc.org/experiments/rtp-hdrext/color-space",
    "urn:ietf:params:rtp-hdrext:sdes:mid",
    "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
    "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
)
_VIDEO_FB = ("goog-remb", "transport-cc", "ccm fir", "nack", "nack pli")
# (payload type, codec, fmtp or "", rtx payload type)
_VIDEO_CODECS = (
    (96, "VP8", "", 97),
    (98, "VP9", "profile-id=0", 99),
    (100, "VP9", "profile-id=2", 101),
    (
        102,
        "H264",
        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
        103,
    ),
    (
        104,
        "H264",
        "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f",
        105,
    ),
    (
        106,
        "H264",
        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
        107,
    ),
    (
        108,
        "H264",
        "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f",
        109,
    ),
    (
        127,
        "H264",
        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d001f",
        125,
    ),
    (
        39,
        "H264",
        "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=4d001f",
        40,
    ),
    (
        112,
        "H264",
        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=64001f",
        113,
    ),
    (45, "AV1", "", 46),
)


def _hex_fingerprint(rng: random.Random) -> str:
    return ":".join(f"{rng.randrange(256):02X}" for _ in range(32))


def _token(rng: random.Random, n: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/"
    return "".join(rng.choice(alphabet) for _ in range(n))


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class ChromiumPeer:
    """One browser's identity (ICE credentials, DTLS fingerprint, track ids, SSRCs),
    fixed for its life, so its descriptions differ only in the session version."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.session_id = rng.getrandbits(62)
        self.ufrag = _token(rng, 4)
        self.pwd = _token(rng, 24)
        self.fingerprint = _hex_fingerprint(rng)
        self.stream = _uuid(rng)
        self.audio_track, self.video_track = _uuid(rng), _uuid(rng)
        self.cname = _token(rng, 16)
        self.ssrcs = [rng.getrandbits(32) for _ in range(3)]
        self.mdns = _uuid(rng)
        self.foundations = [rng.getrandbits(31) for _ in range(4)]

    def description(self, kind: str, sent_ns: int) -> dict[str, str]:
        """An offer or answer (``kind``) stamped with ``sent_ns``."""
        setup = "actpass" if kind == "offer" else "active"
        common = (
            "c=IN IP4 0.0.0.0\r\n"
            "a=rtcp:9 IN IP4 0.0.0.0\r\n"
            f"a=ice-ufrag:{self.ufrag}\r\na=ice-pwd:{self.pwd}\r\n"
            "a=ice-options:trickle\r\n"
            f"a=fingerprint:sha-256 {self.fingerprint}\r\na=setup:{setup}\r\n"
        )
        lines = [
            "v=0",
            f"o=- {self.session_id} {sent_ns} IN IP4 127.0.0.1",
            "s=-",
            "t=0 0",
            "a=group:BUNDLE 0 1 2",
            "a=extmap-allow-mixed",
            f"a=msid-semantic: WMS {self.stream}",
        ]
        # audio
        lines.append("m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126")
        lines.append(common.rstrip("\r\n"))
        lines.append("a=mid:0")
        lines += [f"a=extmap:{i} {u}" for i, u in enumerate(_EXTMAP_AUDIO, 1)]
        lines += [
            "a=sendrecv",
            f"a=msid:{self.stream} {self.audio_track}",
            "a=rtcp-mux",
            "a=rtpmap:111 opus/48000/2",
            "a=rtcp-fb:111 transport-cc",
            "a=fmtp:111 minptime=10;useinbandfec=1",
            "a=rtpmap:63 red/48000/2",
            "a=fmtp:63 111/111",
            "a=rtpmap:9 G722/8000",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:13 CN/8000",
            "a=rtpmap:110 telephone-event/48000",
            "a=rtpmap:126 telephone-event/8000",
            f"a=ssrc:{self.ssrcs[0]} cname:{self.cname}",
            f"a=ssrc:{self.ssrcs[0]} msid:{self.stream} {self.audio_track}",
        ]
        # video
        pts = [str(p) for c in _VIDEO_CODECS for p in (c[0], c[3])]
        lines.append(
            "m=video 9 UDP/TLS/RTP/SAVPF " + " ".join([*pts, "116", "117", "118"])
        )
        lines.append(common.rstrip("\r\n"))
        lines.append("a=mid:1")
        lines += [f"a=extmap:{i} {u}" for i, u in enumerate(_EXTMAP_VIDEO, 14)]
        lines += ["a=sendrecv", f"a=msid:{self.stream} {self.video_track}"]
        lines += ["a=rtcp-mux", "a=rtcp-rsize"]
        for pt, codec, fmtp, rtx in _VIDEO_CODECS:
            lines.append(f"a=rtpmap:{pt} {codec}/90000")
            lines += [f"a=rtcp-fb:{pt} {fb}" for fb in _VIDEO_FB]
            if fmtp:
                lines.append(f"a=fmtp:{pt} {fmtp}")
            lines.append(f"a=rtpmap:{rtx} rtx/90000")
            lines.append(f"a=fmtp:{rtx} apt={pt}")
        lines += [
            "a=rtpmap:116 red/90000",
            "a=rtpmap:117 rtx/90000",
            "a=fmtp:117 apt=116",
            "a=rtpmap:118 ulpfec/90000",
            f"a=ssrc-group:FID {self.ssrcs[1]} {self.ssrcs[2]}",
        ]
        for ssrc in self.ssrcs[1:]:
            lines.append(f"a=ssrc:{ssrc} cname:{self.cname}")
            lines.append(f"a=ssrc:{ssrc} msid:{self.stream} {self.video_track}")
        # data channel
        lines.append("m=application 9 UDP/DTLS/SCTP webrtc-datachannel")
        lines.append(common.rstrip("\r\n"))
        lines += ["a=mid:2", "a=sctp-port:5000", "a=max-message-size:262144"]
        return {"type": kind, "sdp": "\r\n".join(lines) + "\r\n"}

    def candidates(self, sent_ns: int) -> list[dict[str, object]]:
        """What the browser trickles after setLocalDescription, then end-of-candidates;
        the four real ones carry ``sent_ns`` as their foundation."""
        ufrag, mdns = self.ufrag, f"{self.mdns}.local"
        port = 50000 + self.foundations[0] % 10000
        tail = f"generation 0 ufrag {ufrag} network-id 1"
        lines = [
            f"1 udp 2122260223 {mdns} {port} typ host {tail}",
            f"1 tcp 1518280447 {mdns} 9 typ host tcptype active {tail}",
            f"1 udp 1686052607 203.0.113.24 {port} typ srflx raddr 0.0.0.0 rport 0 "
            f"{tail} network-cost 10",
            f"1 udp 41885439 198.51.100.7 {port + 1} typ relay raddr 203.0.113.24 "
            f"rport {port} {tail} network-cost 10",
        ]
        out: list[dict[str, object]] = [
            {
                "candidate": f"candidate:{sent_ns} {line}",
                "sdpMid": "0",
                "sdpMLineIndex": 0,
                "usernameFragment": ufrag,
            }
            for line in lines
        ]
        out.append(
            {
                "candidate": "",
                "sdpMid": "0",
                "sdpMLineIndex": 0,
                "usernameFragment": ufrag,
            }
        )
        return out


def sent_ns_of_sdp(sdp: str) -> int:
    """The send time stamped by :meth:`ChromiumPeer.description`."""
    start = sdp.index("\no=") + 3
    return int(sdp[start : sdp.index("\r", start)].split()[2])


def sent_ns_of_candidate(line: str) -> int | None:
    """The send time stamped by :meth:`ChromiumPeer.candidates` (None: end marker)."""
    if not line:
        return None
    return int(line[10 : line.index(" ")])
