"""ServerHandshake and ClientHandshake, the two sides of the authkey handshake as state machines with no I/O.

Each is driven against the stdlib's own other side (ClientHandshake against
``deliver_challenge`` then ``answer_challenge``, as ``Listener.accept`` does).
ServerHandshake is driven against the stdlib's own client side (``multiprocessing.connection.answer_challenge``
then ``deliver_challenge``, as ``Client`` does) over a real socket pair, with a small
frame loop built on FrameDecoder standing in for the router; and fed frames directly
for the messages the stdlib of this Python never sends.
"""

from __future__ import annotations

import hmac
import multiprocessing
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

import pytest

from rpc.errors import AuthenticationError, MessageTooLarge
from rpc.framing import FrameDecoder, frame_header
from rpc.handshake import MAX_HANDSHAKE_FRAME, MAX_HELLO_FRAME, ClientHandshake, ServerHandshake

CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
KEY = b"the right key"
TIMEOUT = 10.0  # seconds a socket read may block before the test fails instead of hanging

# Python 3.12 moved multiprocessing.connection to prefixed digests ({sha256} by default).
STDLIB_PREFIXED = sys.version_info >= (3, 12)


# -- a frame loop standing in for the router -----------------------------------------


class Wire:
    """The server's end of a socket pair: whole frames in (through FrameDecoder) and out."""

    def __init__(self, sock: socket.socket, max_bytes: int = MAX_HANDSHAKE_FRAME) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(max_bytes)
        self.pending: list[bytes] = []
        self.received: list[bytes] = []  # every frame read, for the test to inspect

    def send(self, frames: list[bytes]) -> None:
        for frame in frames:
            self.sock.sendall(frame_header(len(frame)) + frame)

    def read(self) -> bytes:
        for _ in range(10_000):  # bounded; each recv is bounded by the socket timeout
            # A frame the fast path returned comes first: it only does so with nothing buffered.
            frame = self.pending.pop(0) if self.pending else self.decoder.next()
            if frame is not None:
                self.received.append(frame)
                return frame
            data = self.sock.recv(4096)
            if not data:
                raise EOFError("the client closed the connection")
            whole = self.decoder.feed(data)
            if whole is not None:
                self.pending.append(whole)
        raise AssertionError("no frame after 10000 reads")


def serve(wire: Wire, handshake: ServerHandshake) -> None:
    """Run ``handshake`` to its end as the router does: send what it says, farewell on failure."""
    wire.send(handshake.start())
    for _ in range(10):  # the exchange is three frames from the client
        frame = wire.read()
        try:
            replies = handshake.receive(frame)
        except AuthenticationError:
            if handshake.farewell is not None:
                wire.send([handshake.farewell])
            raise
        wire.send(replies)
        if handshake.done:
            return
    raise AssertionError("the handshake never ended")


class Peer(threading.Thread):
    """The client side in a thread: ``script`` runs on a stdlib Connection; ``error`` is what it raised."""

    def __init__(self, sock: socket.socket, script: Callable[[Connection], None]) -> None:
        super().__init__(daemon=True)
        # No timeout here: that would make the socket non-blocking under the stdlib's reads.
        # The test closes its end when it is done, which ends any read still waiting.
        self.connection = Connection(sock.detach())
        self.script = script
        self.error: BaseException | None = None
        self.finished = False

    def run(self) -> None:
        try:
            self.script(self.connection)
            self.finished = True
        except BaseException as exc:  # reported to the test
            self.error = exc


@contextmanager
def client(script: Callable[[Connection], None]) -> Iterator[tuple[Wire, Peer]]:
    """A server Wire and a running client Peer; the server end is closed on the way out,
    so a client still waiting for a frame ends (EOFError) and the thread is joined."""
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(TIMEOUT)
    peer = Peer(client_sock, script)
    peer.start()
    try:
        yield Wire(server_sock), peer
    finally:
        server_sock.close()
        peer.join(TIMEOUT)
        peer.connection.close()
        assert not peer.is_alive(), "the client thread did not end"


def stdlib_client(authkey: bytes) -> Callable[[Connection], None]:
    """What multiprocessing.connection.Client does after connecting."""

    def script(connection: Connection) -> None:
        answer_challenge(connection, authkey)
        deliver_challenge(connection, authkey)

    return script


# -- against the stdlib client -------------------------------------------------------


def test_right_key_authenticates_both_ways() -> None:
    def script(connection: Connection) -> None:
        stdlib_client(KEY)(connection)
        connection.send_bytes(b"first request")  # the stream stays in step after the handshake

    with client(script) as (wire, peer):
        handshake = ServerHandshake(KEY)
        serve(wire, handshake)
        assert handshake.done
        assert handshake.farewell is None
        assert wire.read() == b"first request"
        peer.join(TIMEOUT)
        assert peer.error is None and peer.finished


def test_what_this_python_sends() -> None:
    """The answer and the challenge of this Python's stdlib, each understood by the server."""
    with client(stdlib_client(KEY)) as (wire, peer):
        handshake = ServerHandshake(KEY)
        serve(wire, handshake)
        peer.join(TIMEOUT)
        assert peer.error is None
    response, challenge, verdict = wire.received
    assert challenge.startswith(CHALLENGE)
    assert verdict == WELCOME
    if STDLIB_PREFIXED:
        assert response.startswith(b"{sha256}")
        assert challenge[len(CHALLENGE) :].startswith(b"{sha256}")
    else:
        # Python 3.11 and older: a bare 16-byte HMAC-MD5, then an unprefixed 20-byte challenge.
        assert len(response) == 16
        assert len(challenge) == len(CHALLENGE) + 20


def test_the_server_challenge_names_sha256_and_is_fresh_each_time() -> None:
    first = ServerHandshake(KEY).start()
    second = ServerHandshake(KEY).start()
    assert len(first) == len(second) == 1
    for frames in (first, second):
        assert frames[0].startswith(CHALLENGE + b"{sha256}")
        assert len(frames[0]) == len(CHALLENGE) + len(b"{sha256}") + 40
        assert len(frames[0]) <= MAX_HANDSHAKE_FRAME
    assert first != second


def test_wrong_key_gets_failure_and_authentication_error() -> None:
    with client(stdlib_client(b"a wrong key")) as (wire, peer):
        handshake = ServerHandshake(KEY)
        with pytest.raises(AuthenticationError, match="digest received was wrong"):
            serve(wire, handshake)
        assert handshake.farewell == FAILURE
        assert not handshake.done
        peer.join(TIMEOUT)
    # The stdlib client read #FAILURE# and said so.
    assert isinstance(peer.error, multiprocessing.AuthenticationError)
    assert "digest sent was rejected" in str(peer.error)


def test_client_that_rejects_the_server_answer() -> None:
    """The client answers with the right key but checks the server's answer against another."""

    def script(connection: Connection) -> None:
        answer_challenge(connection, KEY)
        deliver_challenge(connection, b"another key")

    with client(script) as (wire, peer):
        handshake = ServerHandshake(KEY)
        with pytest.raises(AuthenticationError, match="digest sent was rejected"):
            serve(wire, handshake)
        assert not handshake.done
        peer.join(TIMEOUT)
    assert isinstance(peer.error, multiprocessing.AuthenticationError)
    assert "digest received was wrong" in str(peer.error)
    assert wire.received[-1] == FAILURE


def test_client_that_skips_its_challenge_is_refused() -> None:
    def script(connection: Connection) -> None:
        answer_challenge(connection, KEY)
        connection.send_bytes(b"a request instead of a challenge")

    with client(script) as (wire, peer):
        handshake = ServerHandshake(KEY)
        with pytest.raises(AuthenticationError, match="expected challenge"):
            serve(wire, handshake)
        assert not handshake.done


def test_oversize_answer_is_refused_by_the_frame_limit() -> None:
    """The router reads handshake frames with a 256-byte limit: the header alone refuses it."""

    def script(connection: Connection) -> None:
        connection.recv_bytes(256)
        connection.send_bytes(b"x" * 1000)

    with client(script) as (wire, peer):
        handshake = ServerHandshake(KEY)
        with pytest.raises(MessageTooLarge) as caught:
            serve(wire, handshake)
        assert caught.value.size == 1000  # type: ignore[attr-defined]
        assert not handshake.done


def test_oversize_challenge_is_refused_by_the_frame_limit() -> None:
    def script(connection: Connection) -> None:
        answer_challenge(connection, KEY)
        connection.send_bytes(CHALLENGE + b"{sha256}" + b"z" * 300)

    with client(script) as (wire, peer):
        with pytest.raises(MessageTooLarge):
            serve(wire, ServerHandshake(KEY))


def test_sha384_answer_over_the_wire() -> None:
    """A client of a newer Python may answer with another digest than the one it was asked for."""

    def script(connection: Connection) -> None:
        message = connection.recv_bytes(256)[len(CHALLENGE) :]
        connection.send_bytes(b"{sha384}" + hmac.new(KEY, message, "sha384").digest())
        assert connection.recv_bytes(256) == WELCOME
        deliver_challenge(connection, KEY)

    with client(script) as (wire, peer):
        handshake = ServerHandshake(KEY)
        serve(wire, handshake)
        assert handshake.done
        peer.join(TIMEOUT)
        assert peer.error is None and peer.finished


# -- frames fed directly -------------------------------------------------------------


def server_challenge(handshake: ServerHandshake) -> bytes:
    """What follows #CHALLENGE# in the server's first frame: the bytes a client signs."""
    (frame,) = handshake.start()
    return frame[len(CHALLENGE) :]


def authenticated_client_side(handshake: ServerHandshake) -> None:
    """Step past the client's answer (bare HMAC-MD5) so the next frame is the client's challenge."""
    message = server_challenge(handshake)
    assert handshake.receive(hmac.new(KEY, message, "md5").digest()) == [WELCOME]


@pytest.mark.parametrize("digest", ["md5", "sha256", "sha384", "sha3_256", "sha3_384"])
def test_prefixed_answers_of_every_accepted_digest(digest: str) -> None:
    handshake = ServerHandshake(KEY)
    message = server_challenge(handshake)
    response = b"{%s}" % digest.encode() + hmac.new(KEY, message, digest).digest()
    assert handshake.receive(response) == [WELCOME]
    assert handshake.farewell is None


def test_bare_md5_answer_is_accepted() -> None:
    handshake = ServerHandshake(KEY)
    message = server_challenge(handshake)
    assert handshake.receive(hmac.new(KEY, message, "md5").digest()) == [WELCOME]


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(lambda m: b"{sha1}" + hmac.new(KEY, m, "sha1").digest(), id="sha1"),
        pytest.param(lambda m: b"{sha512}" + hmac.new(KEY, m, "sha512").digest(), id="sha512"),
        pytest.param(lambda m: b"{blake2b}" + hmac.new(KEY, m, "blake2b").digest(), id="blake2b"),
        pytest.param(lambda m: b"{nonsense}" + b"\x00" * 32, id="nonsense"),
        pytest.param(lambda m: hmac.new(KEY, m, "sha256").digest(), id="unprefixed-sha256"),
        pytest.param(lambda m: b"{sha256" + hmac.new(KEY, m, "sha256").digest(), id="unclosed-brace"),
        pytest.param(lambda m: b"", id="empty"),
    ],
)
def test_unknown_or_malformed_digest_is_refused(response: Callable[[bytes], bytes]) -> None:
    handshake = ServerHandshake(KEY)
    message = server_challenge(handshake)
    with pytest.raises(AuthenticationError):
        handshake.receive(response(message))
    assert handshake.farewell == FAILURE
    assert not handshake.done


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(lambda m: b"{sha256}" + hmac.new(b"wrong", m, "sha256").digest(), id="wrong-key"),
        pytest.param(lambda m: b"{sha256}" + hmac.new(KEY, CHALLENGE + m, "sha256").digest(), id="signed-header"),
        pytest.param(lambda m: b"{sha384}" + hmac.new(KEY, m, "sha256").digest(), id="digest-mismatch"),
        pytest.param(lambda m: hmac.new(KEY, m, "md5").digest()[:-1] + b"\x00", id="bare-md5-altered"),
        pytest.param(lambda m: hmac.new(KEY, m, "md5").digest() + b"\x00" * 4, id="twenty-bytes"),
    ],
)
def test_wrong_mac_is_refused(response: Callable[[bytes], bytes]) -> None:
    handshake = ServerHandshake(KEY)
    message = server_challenge(handshake)
    with pytest.raises(AuthenticationError, match="digest received was wrong"):
        handshake.receive(response(message))
    assert handshake.farewell == FAILURE


def test_legacy_unprefixed_challenge_is_answered_with_bare_md5() -> None:
    """As Python 3.11's deliver_challenge expects: 20 random bytes, answered with 16 bare bytes."""
    handshake = ServerHandshake(KEY)
    authenticated_client_side(handshake)
    message = os.urandom(20)
    assert handshake.receive(CHALLENGE + message) == [hmac.new(KEY, message, "md5").digest()]
    assert handshake.receive(WELCOME) == []
    assert handshake.done


@pytest.mark.parametrize("digest", ["sha256", "sha384", "md5"])
def test_prefixed_challenge_is_answered_with_the_digest_it_names(digest: str) -> None:
    """As Python 3.12's deliver_challenge expects: the answer names its digest."""
    handshake = ServerHandshake(KEY)
    authenticated_client_side(handshake)
    message = b"{%s}" % digest.encode() + os.urandom(40)
    expected = b"{%s}" % digest.encode() + hmac.new(KEY, message, digest).digest()
    assert handshake.receive(CHALLENGE + message) == [expected]
    assert handshake.receive(WELCOME) == []
    assert handshake.done


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(b"{sha1}" + b"r" * 40, id="sha1"),
        pytest.param(b"{bogus}" + b"r" * 40, id="bogus"),
        pytest.param(b"r" * 40, id="unprefixed-40"),
        pytest.param(b"r" * 19, id="too-short"),
        pytest.param(b"", id="empty"),
    ],
)
def test_challenge_of_an_unknown_digest_or_too_short_is_refused(message: bytes) -> None:
    handshake = ServerHandshake(KEY)
    authenticated_client_side(handshake)
    with pytest.raises(AuthenticationError):
        handshake.receive(CHALLENGE + message)
    assert not handshake.done


@pytest.mark.parametrize("frame", [b"hello", WELCOME, b"#CHALLENGE", b"x" * 31])
def test_anything_but_a_challenge_after_welcome_is_refused(frame: bytes) -> None:
    handshake = ServerHandshake(KEY)
    authenticated_client_side(handshake)
    with pytest.raises(AuthenticationError, match="expected challenge"):
        handshake.receive(frame)


@pytest.mark.parametrize("verdict", [FAILURE, b"", b"#WELCOME", WELCOME + b"!"])
def test_anything_but_welcome_for_the_server_answer_is_refused(verdict: bytes) -> None:
    handshake = ServerHandshake(KEY)
    authenticated_client_side(handshake)
    handshake.receive(CHALLENGE + os.urandom(20))
    with pytest.raises(AuthenticationError, match="digest sent was rejected"):
        handshake.receive(verdict)
    assert not handshake.done


def test_frames_over_256_bytes_are_refused_at_every_step() -> None:
    big = b"b" * (MAX_HANDSHAKE_FRAME + 1)
    handshake = ServerHandshake(KEY)
    with pytest.raises(AuthenticationError, match="257 bytes"):
        handshake.receive(big)
    handshake = ServerHandshake(KEY)
    authenticated_client_side(handshake)
    with pytest.raises(AuthenticationError, match="257 bytes"):
        handshake.receive((CHALLENGE + b"{sha256}" + big)[: len(big)])
    handshake = ServerHandshake(KEY)
    authenticated_client_side(handshake)
    handshake.receive(CHALLENGE + os.urandom(20))
    with pytest.raises(AuthenticationError, match="257 bytes"):
        handshake.receive((WELCOME + big)[: len(big)])


def test_a_challenge_of_exactly_256_bytes_is_answered() -> None:
    handshake = ServerHandshake(KEY)
    authenticated_client_side(handshake)
    frame = CHALLENGE + b"{sha256}" + b"c" * (MAX_HANDSHAKE_FRAME - len(CHALLENGE) - len(b"{sha256}"))
    assert len(frame) == MAX_HANDSHAKE_FRAME
    (reply,) = handshake.receive(frame)
    assert reply.startswith(b"{sha256}")


def test_header_bytes_of_the_server_frames_are_stdlib_frames() -> None:
    """What the server sends decodes with the stdlib's recv_bytes (the Wire uses frame_header)."""
    left, right = socket.socketpair()
    with left, Connection(right.detach()) as connection:
        frames = ServerHandshake(KEY).start() + [WELCOME]
        left.sendall(b"".join(frame_header(len(f)) + f for f in frames))
        assert [connection.recv_bytes(256) for _ in frames] == frames
        assert struct.unpack("!i", frame_header(len(WELCOME)))[0] == len(WELCOME)


# -- ClientHandshake, the client's side ----------------------------------------------

HELLO = b"the server's hello"


def drive(wire: Wire, handshake: ClientHandshake) -> list[bytes]:
    """Run the client's ``handshake`` to its end as rpc.aio does, each read bounded by its limit;
    returns the frames the client sent."""
    sent: list[bytes] = []
    for _ in range(10):  # the exchange is four frames from the server
        wire.decoder.max_bytes = handshake.limit
        frame = wire.read()
        try:
            replies = handshake.receive(frame)
        except AuthenticationError:
            if handshake.farewell is not None:
                wire.send([handshake.farewell])
            raise
        wire.send(replies)
        sent += replies
        if handshake.done:
            return sent
    raise AssertionError("the handshake never ended")


def stdlib_server(authkey: bytes, hello: bytes = HELLO) -> Callable[[Connection], None]:
    """What multiprocessing.connection.Listener.accept does, then a first message."""

    def script(connection: Connection) -> None:
        deliver_challenge(connection, authkey)
        answer_challenge(connection, authkey)
        connection.send_bytes(hello)

    return script


def test_client_authenticates_both_ways_with_the_stdlib_server() -> None:
    with client(stdlib_server(KEY)) as (wire, peer):
        handshake = ClientHandshake(KEY)
        sent = drive(wire, handshake)
        assert handshake.done and handshake.hello == HELLO
        assert handshake.farewell is None
        peer.join(TIMEOUT)
        assert peer.error is None and peer.finished
    answer_frame, challenge, verdict = sent
    assert challenge.startswith(CHALLENGE + b"{sha256}")
    assert verdict == WELCOME
    if STDLIB_PREFIXED:
        assert answer_frame.startswith(b"{sha256}")
    else:  # a 3.11 server challenges with 20 bare bytes: answered with a bare HMAC-MD5
        assert len(answer_frame) == 16


def test_client_with_a_wrong_key_is_refused_by_the_stdlib_server() -> None:
    with client(stdlib_server(KEY)) as (wire, peer):
        handshake = ClientHandshake(b"a wrong key", peer="127.0.0.1:1")
        with pytest.raises(AuthenticationError, match="127.0.0.1:1 refused this authkey"):
            drive(wire, handshake)
        assert not handshake.done
        peer.join(TIMEOUT)
    assert isinstance(peer.error, multiprocessing.AuthenticationError)
    assert "digest received was wrong" in str(peer.error)


def test_client_refuses_a_server_that_cannot_prove_it_holds_the_key() -> None:
    def script(connection: Connection) -> None:
        deliver_challenge(connection, KEY)
        answer_challenge(connection, b"another key")

    with client(script) as (wire, peer):
        handshake = ClientHandshake(KEY)
        with pytest.raises(AuthenticationError, match="could not prove it holds it"):
            drive(wire, handshake)
        assert handshake.farewell == FAILURE
        peer.join(TIMEOUT)
    assert isinstance(peer.error, multiprocessing.AuthenticationError)
    assert "digest sent was rejected" in str(peer.error)


def test_client_against_rpc_server_handshake() -> None:
    """The two state machines of this module, frame by frame: both end authenticated."""
    server, client_side = ServerHandshake(KEY), ClientHandshake(KEY)
    to_client = server.start()
    for _ in range(10):
        to_server = [reply for frame in to_client for reply in client_side.receive(frame)]
        if server.done:
            break
        to_client = [reply for frame in to_server for reply in server.receive(frame)]
        to_client += [HELLO] if server.done else []
    assert server.done and client_side.done and client_side.hello == HELLO


def test_a_server_without_authkey_sends_its_hello_first() -> None:
    handshake = ClientHandshake(None)
    assert handshake.limit == MAX_HELLO_FRAME
    assert handshake.receive(HELLO) == []
    assert handshake.done and handshake.hello == HELLO


def test_an_authkey_for_a_server_without_one_is_refused() -> None:
    with pytest.raises(AuthenticationError, match="did not ask for the authkey"):
        ClientHandshake(KEY).receive(HELLO)


def test_no_authkey_for_a_server_that_asks_for_one_is_refused() -> None:
    (challenge,) = ServerHandshake(KEY).start()
    with pytest.raises(AuthenticationError, match="requires an authkey and none was given"):
        ClientHandshake(None).receive(challenge)


@pytest.mark.parametrize("digest", ["sha256", "sha384", "md5"])
def test_client_answers_a_prefixed_challenge_with_the_digest_it_names(digest: str) -> None:
    message = b"{%s}" % digest.encode() + os.urandom(40)
    expected = b"{%s}" % digest.encode() + hmac.new(KEY, message, digest).digest()
    assert ClientHandshake(KEY).receive(CHALLENGE + message) == [expected]


def test_client_answers_a_legacy_challenge_with_bare_md5() -> None:
    message = os.urandom(20)
    assert ClientHandshake(KEY).receive(CHALLENGE + message) == [hmac.new(KEY, message, "md5").digest()]


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(CHALLENGE + b"{sha1}" + b"r" * 40, id="sha1"),
        pytest.param(CHALLENGE + b"r" * 19, id="too-short"),
        pytest.param(CHALLENGE + b"{sha256}" + b"r" * 300, id="over-256-bytes"),
    ],
)
def test_client_refuses_a_bad_challenge(frame: bytes) -> None:
    with pytest.raises(AuthenticationError):
        ClientHandshake(KEY).receive(frame)


def test_client_holds_every_frame_after_the_challenge_to_256_bytes() -> None:
    handshake = ClientHandshake(KEY)
    handshake.receive(CHALLENGE + os.urandom(20))
    assert handshake.limit == MAX_HANDSHAKE_FRAME
    with pytest.raises(AuthenticationError, match="257 bytes"):
        handshake.receive(b"w" * (MAX_HANDSHAKE_FRAME + 1))


@pytest.mark.parametrize("verdict", [FAILURE, b"", WELCOME + b"!"])
def test_client_takes_anything_but_welcome_as_a_refusal(verdict: bytes) -> None:
    handshake = ClientHandshake(KEY)
    handshake.receive(CHALLENGE + os.urandom(20))
    with pytest.raises(AuthenticationError, match="refused this authkey"):
        handshake.receive(verdict)
    assert not handshake.done


def test_client_reads_a_hello_of_up_to_64_kib_after_the_handshake() -> None:
    server, handshake = ServerHandshake(KEY), ClientHandshake(KEY)
    (challenge,) = server.start()
    (response,) = handshake.receive(challenge)
    (welcome,) = server.receive(response)
    (mine,) = handshake.receive(welcome)
    (reply,) = server.receive(mine)
    assert handshake.receive(reply) == [WELCOME]
    assert handshake.limit == MAX_HELLO_FRAME
    big = b"h" * MAX_HELLO_FRAME
    assert handshake.receive(big) == [] and handshake.hello == big


# -- the sync client's handshake over a real socket -----------------------------------


def _run_client_under_optimize(address: object, authkey: bytes, code: str) -> str:
    """Run ``code`` in ``python -O`` (asserts stripped) with ``client`` connected; its stdout."""
    import subprocess

    script = (
        "import rpc, sys\n"
        f"client = rpc.connect({address!r}, authkey={authkey!r}, connect_timeout=10, reconnect=False)\n"
        f"{code}\n"
    )
    done = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_sync_client_authenticates_under_python_optimize(rpc_server) -> None:
    """The handshake is rpc's own code, so ``python -O`` (no asserts) changes nothing."""
    server = rpc_server("services:registry", workers=1, transport="tcp")
    assert _run_client_under_optimize(server.address, server.authkey, "print(client.add(2, 3))").strip() == "5"


def test_the_sync_client_refuses_a_server_without_the_key_under_python_optimize() -> None:
    """A server that accepts the client's answer but cannot answer the client's challenge is
    refused with a clear error and told ``#FAILURE#``, asserts or not."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    told: list[bytes] = []

    def impostor() -> None:
        sock, _ = listener.accept()
        sock.setblocking(True)  # Connection reads the file descriptor itself
        connection = Connection(sock.detach())
        try:
            deliver_challenge(connection, KEY)
            challenge = connection.recv_bytes(MAX_HANDSHAKE_FRAME)
            assert challenge.startswith(CHALLENGE)
            connection.send_bytes(b"{sha256}" + b"\0" * 32)  # no proof of the key
            told.append(connection.recv_bytes(MAX_HANDSHAKE_FRAME))
        finally:
            connection.close()

    peer = threading.Thread(target=impostor, daemon=True)
    peer.start()
    try:
        address = listener.getsockname()
        code = (
            "import rpc\n"
            "try:\n"
            f"    rpc.connect({address!r}, authkey={KEY!r}, connect_timeout=10, reconnect=False)\n"
            "except rpc.AuthenticationError as exc:\n"
            "    print(exc)\n"
        )
        import subprocess

        done = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60)
        peer.join(TIMEOUT)
    finally:
        listener.close()
    assert done.returncode == 0, done.stderr
    assert "could not prove it holds it" in done.stdout
    assert told == [FAILURE]
