"""Both sides of the authkey handshake, as state machines with no I/O.

The exchange is ``multiprocessing.connection``'s, so a stdlib ``Client`` with the
authkey can still connect: each message is one frame of at most 256 bytes.

1. The server sends ``#CHALLENGE#{sha256}`` and 40 random bytes; the client answers
   with ``{sha256}`` and the HMAC-SHA256 of everything after ``#CHALLENGE#``
   (clients on Python 3.11 and older answer with the bare 16-byte HMAC-MD5 of the
   same bytes, which is accepted too); the server replies ``#WELCOME#`` or
   ``#FAILURE#``.
2. Then the other way round: the client challenges, the server answers with the
   digest the challenge names (bare HMAC-MD5 for an unprefixed 20-byte challenge),
   and the client replies ``#WELCOME#``.

The router feeds each frame to :meth:`ServerHandshake.receive` and sends what it
returns; the asyncio client does the same with :class:`ClientHandshake`. Deadlines
are the caller's timers, not this module's.
"""

from __future__ import annotations

import hmac
import os

from .errors import AuthenticationError

__all__ = ["ServerHandshake", "ClientHandshake", "MAX_HANDSHAKE_FRAME", "MAX_HELLO_FRAME"]

CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
MAX_HANDSHAKE_FRAME = 256  # as multiprocessing.connection reads them
MAX_HELLO_FRAME = 64 * 1024  # the server's first frame may be its hello (no authkey); so is its last

_CHALLENGE_BYTES = 40
_DIGESTS = frozenset({"md5", "sha256", "sha384", "sha3_256", "sha3_384"})
_LEGACY_LENGTHS = (16, 20)  # an unprefixed HMAC-MD5 answer, an unprefixed old-style challenge


def _split_digest(message: bytes) -> tuple[str, bytes]:
    """The digest a message names and the rest; ("md5", message) for the old unprefixed form."""
    if len(message) in _LEGACY_LENGTHS:
        return "md5", message
    if message.startswith(b"{"):
        end = message.find(b"}", 1, 12)
        if end > 0:
            name = message[1:end].decode("ascii", "replace")
            if name in _DIGESTS:
                return name, message[end + 1 :]
    raise AuthenticationError("the handshake message names no digest this server accepts")


def answer(authkey: bytes, challenge: bytes) -> bytes:
    """The answer to a peer's challenge (what follows ``#CHALLENGE#``)."""
    name, _ = _split_digest(challenge)
    mac = hmac.new(authkey, challenge, name).digest()
    return mac if len(challenge) in _LEGACY_LENGTHS else b"{%s}%s" % (name.encode("ascii"), mac)


def verify(authkey: bytes, challenge: bytes, response: bytes) -> None:
    """Raise AuthenticationError unless ``response`` proves the peer holds ``authkey``."""
    name, mac = _split_digest(response)
    expected = hmac.new(authkey, challenge, name).digest()
    if not hmac.compare_digest(expected, mac):
        raise AuthenticationError("digest received was wrong")


class ServerHandshake:
    """One client's handshake, from the server's side.

    :meth:`start` gives the frames to send first; each frame received goes to
    :meth:`receive`, which gives the frames to send back. ``done`` turns True
    once both sides are authenticated. A failure raises AuthenticationError
    after :attr:`farewell` is set to the frame to send before closing (if any).
    """

    def __init__(self, authkey: bytes) -> None:
        self._authkey = authkey
        self._challenge = b"{sha256}" + os.urandom(_CHALLENGE_BYTES)
        self._step = 0
        self.done = False
        self.farewell: bytes | None = None

    def start(self) -> list[bytes]:
        return [CHALLENGE + self._challenge]

    def receive(self, frame: bytes) -> list[bytes]:
        if len(frame) > MAX_HANDSHAKE_FRAME:
            raise AuthenticationError(f"a handshake message of {len(frame)} bytes (at most {MAX_HANDSHAKE_FRAME})")
        if self._step == 0:  # the client's answer to our challenge
            try:
                verify(self._authkey, self._challenge, frame)
            except AuthenticationError:
                self.farewell = FAILURE
                raise
            self._step = 1
            return [WELCOME]
        if self._step == 1:  # the client's own challenge
            if not frame.startswith(CHALLENGE):
                raise AuthenticationError("Protocol error, expected challenge")
            challenge = frame[len(CHALLENGE) :]
            if len(challenge) < 20:
                raise AuthenticationError(f"challenge too short: {len(challenge)} bytes")
            self._step = 2
            return [answer(self._authkey, challenge)]
        if frame != WELCOME:  # the client's verdict on our answer
            raise AuthenticationError("digest sent was rejected")
        self.done = True
        return []



class ClientHandshake:
    """The handshake from the client's side, ending with the server's hello.

    Each frame from the server goes to :meth:`receive`, which gives the frames to
    send back; read the next frame with at most :attr:`limit` bytes. ``done``
    turns True once the server's hello (its first frame after the handshake) is in
    :attr:`hello`. A server without an authkey sends its hello at once, so a
    first frame that is not a challenge is the hello: accepted only when
    ``authkey`` is None. A failure raises AuthenticationError, worded for the
    user with ``peer`` (how to name the server), after :attr:`farewell` is set
    to the frame to send before closing (if any).
    """

    def __init__(self, authkey: bytes | None, peer: str = "the server") -> None:
        self._authkey = authkey
        self._peer = peer
        self._challenge = b"{sha256}" + os.urandom(_CHALLENGE_BYTES)
        self._step = 0
        self.done = False
        self.hello: bytes | None = None
        self.farewell: bytes | None = None

    @property
    def limit(self) -> int:
        """The most bytes the next frame may hold."""
        return MAX_HELLO_FRAME if self._step in (0, 3) else MAX_HANDSHAKE_FRAME

    def receive(self, frame: bytes) -> list[bytes]:
        if len(frame) > self.limit:
            raise AuthenticationError(f"a handshake message of {len(frame)} bytes (at most {self.limit})")
        authkey = self._authkey
        if self._step == 0:  # the server's challenge, or its hello if it has no authkey
            if not frame.startswith(CHALLENGE):
                if authkey is not None:
                    raise AuthenticationError("the server did not ask for the authkey: it runs without one")
                return self._finish(frame)
            if authkey is None:
                raise AuthenticationError(
                    "the server requires an authkey and none was given: pass authkey=rpc.read_authkey() "
                    "to use the key file `rpc serve` made, or the server's key as bytes"
                )
            if len(frame) > MAX_HANDSHAKE_FRAME:
                raise AuthenticationError(f"a challenge of {len(frame)} bytes (at most {MAX_HANDSHAKE_FRAME})")
            challenge = frame[len(CHALLENGE) :]
            if len(challenge) < 20:
                raise AuthenticationError(f"challenge too short: {len(challenge)} bytes")
            try:
                response = answer(authkey, challenge)
            except AuthenticationError:
                raise AuthenticationError(f"{self._peer} sent a challenge naming no digest this client knows") from None
            self._step = 1
            return [response]
        assert authkey is not None
        if self._step == 1:  # the server's verdict on our answer
            if frame != WELCOME:
                raise AuthenticationError(
                    f"{self._peer} refused this authkey: it is not the key the server was started with"
                )
            self._step = 2
            return [CHALLENGE + self._challenge]
        if self._step == 2:  # the server's answer to our challenge
            try:
                verify(authkey, self._challenge, frame)
            except AuthenticationError:
                self.farewell = FAILURE
                raise AuthenticationError(
                    f"{self._peer} accepted this authkey but could not prove it holds it: is it the server you meant?"
                ) from None
            self._step = 3
            return [WELCOME]
        if self._step == 3:
            return self._finish(frame)
        raise AuthenticationError("the handshake is over")

    def _finish(self, hello: bytes) -> list[bytes]:
        self._step = 4
        self.hello = hello
        self.done = True
        return []
