"""Calls: WebRTC signaling, TURN credentials, call records and the echo test (to come)."""
