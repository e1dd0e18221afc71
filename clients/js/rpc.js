// A Node.js client for rpc: the authkey handshake both ways, the hello, calls with
// positional and keyword arguments, errors, deadlines and pipelining, over TCP or a
// Unix socket. Node's standard library only; msgpack by ./msgpack.js.
//
//   import { connect } from "./rpc.js";
//   const client = await connect({ host: "127.0.0.1", port: 7000 }, { authkey });
//   await client.call("add", [2, 3]);            // 5
//   await client.call("kwargs_echo", [1], { x: 2 }, { timeout: 5 });
//   await client.close();

import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import pathModule from "node:path";

import { DecodeError, EncodeError, decode, encode } from "./msgpack.js";

export * from "./msgpack.js";

export const PROTOCOL_VERSION = 1;
export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
export const VERSION = "0.1.0";

const REQUEST = 0;
const RESPONSE = 1;
const NOTIFICATION = 2;
const CANCEL = 3;
const HELLO = 4;
const STREAM_START = 5;

const CHALLENGE = Buffer.from("#CHALLENGE#");
const WELCOME = Buffer.from("#WELCOME#");
const FAILURE = Buffer.from("#FAILURE#");
const MAX_HANDSHAKE_FRAME = 256; // each handshake token is one frame of at most this
const MAX_HELLO_FRAME = 64 * 1024;
const CHALLENGE_BYTES = 40;
const MAX_ID = Number.MAX_SAFE_INTEGER; // ids are uint64 on the wire; this client stays exact in a Number

// Python's hashlib names (as a challenge names its digest) -> node:crypto's.
const DIGESTS = new Map([
  ["md5", "md5"],
  ["sha256", "sha256"],
  ["sha384", "sha384"],
  ["sha3_256", "sha3-256"],
  ["sha3_384", "sha3-384"],
]);
const LEGACY_LENGTHS = [16, 20]; // an unprefixed HMAC-MD5 answer, an unprefixed (Python <= 3.11) challenge

// Codes after which the connection is unusable (the others fail one call only).
const TRANSPORT_CODES = new Set([
  "transport_error",
  "authentication_error",
  "connection_closed",
  "connect_timeout",
  "protocol_error",
  "message_too_large",
]);

/**
 * Every failure of this client: `code` is rpc's wire code (remote_error, method_not_found,
 * call_timeout, ..., or connection_closed, authentication_error, connect_timeout on this side),
 * `type` the remote exception's type name, `traceback` the server's traceback text (if any),
 * `remoteArgs` the remote exception's args (if sent), `transport` whether the connection is unusable.
 */
export class RpcError extends Error {
  constructor(code, message, { type = "", traceback = "", remoteArgs = [], id = undefined, local = false, transport = undefined } = {}) {
    super(message);
    this.name = "RpcError";
    this.code = code;
    this.type = type;
    this.traceback = traceback;
    this.remoteArgs = remoteArgs;
    this.id = id;
    this.local = local; // raised by this client (its own timer, its own checks), not sent by the server
    this.transport = transport ?? TRANSPORT_CODES.has(code);
  }
}

/** An error map from the wire ({code, type, message, traceback?, args?}) as an RpcError. */
function errorOf(map, id) {
  const text = (value, fallback) => (typeof value === "string" ? value : fallback);
  return new RpcError(text(map.code, "rpc_error"), text(map.message, ""), {
    type: text(map.type, "Exception"),
    traceback: text(map.traceback, ""),
    remoteArgs: Array.isArray(map.args) ? map.args : [],
    id,
    transport: id === null, // with an id, only that call failed (even a protocol_error)
  });
}

function isMap(value) {
  return value !== null && typeof value === "object" && Object.getPrototypeOf(value) === Object.prototype;
}

function checkTimeout(value, name) {
  if (value === null || value === undefined) return null;
  if (typeof value !== "number" || !Number.isFinite(value) || value <= 0 || value > 365 * 86400) {
    throw new TypeError(`${name} must be a number of seconds > 0 and at most a year, or null`);
  }
  return value;
}

// -- framing: a 4-byte big-endian signed length, or -1 and an 8-byte length ---------------

function frameHeader(length) {
  if (length <= 0x7fffffff) {
    const head = Buffer.allocUnsafe(4);
    head.writeInt32BE(length);
    return head;
  }
  const head = Buffer.allocUnsafe(12);
  head.writeInt32BE(-1);
  head.writeBigUInt64BE(BigInt(length), 4);
  return head;
}

/** Splits the byte stream into frames, refusing any over `limit` before it is buffered. */
class FrameReader {
  constructor(limit) {
    this.limit = limit;
    this.chunks = [];
    this.size = 0;
    this.expect = -1; // the length of the frame whose header was read
    this.headerBytes = 0;
  }

  feed(chunk) {
    this.chunks.push(chunk);
    this.size += chunk.length;
  }

  joined() {
    if (this.chunks.length > 1) this.chunks = [Buffer.concat(this.chunks, this.size)];
    return this.chunks[0];
  }

  /** The next whole frame, or null; throws RpcError for a frame over the limit. */
  next() {
    if (this.expect < 0) {
      if (this.size < 4) return null;
      const head = this.joined();
      let length = head.readInt32BE(0);
      let headerBytes = 4;
      if (length === -1) {
        if (this.size < 12) return null;
        const big = head.readBigUInt64BE(4);
        length = big > BigInt(this.limit) ? Infinity : Number(big);
        headerBytes = 12;
      } else if (length < 0) {
        throw new RpcError("protocol_error", `a frame header gives the length ${length}`, { local: true });
      }
      if (length > this.limit) {
        if (length >>> 16 === 0x1503 || length >>> 16 === 0x1603) {
          // The start of a TLS record (an alert or a handshake), not a frame: a TLS server's.
          throw new RpcError("protocol_error", "the server speaks TLS, and this client has none: connect to a server without TLS", {
            local: true,
          });
        }
        throw new RpcError("message_too_large", `the server sent a frame over this client's limit of ${this.limit} bytes`, {
          local: true,
        });
      }
      this.expect = length;
      this.headerBytes = headerBytes;
    }
    const end = this.headerBytes + this.expect;
    if (this.size < end) return null;
    const all = this.joined();
    const frame = all.subarray(this.headerBytes, end);
    const rest = all.subarray(end);
    this.chunks = rest.length ? [rest] : [];
    this.size = rest.length;
    this.expect = -1;
    return frame;
  }
}

// -- the authkey handshake (as rpc/handshake.py), no I/O ----------------------------------

function hmac(digest, key, data) {
  return crypto.createHmac(digest, key).update(data).digest();
}

/** The answer to the server's challenge (the bytes after "#CHALLENGE#"). */
export function answerChallenge(authkey, challenge) {
  if (LEGACY_LENGTHS.includes(challenge.length)) return hmac("md5", authkey, challenge); // Python <= 3.11
  const close = challenge.indexOf(0x7d); // "}"
  if (challenge[0] === 0x7b && close > 1 && close < 12) {
    const digest = DIGESTS.get(challenge.subarray(1, close).toString("latin1"));
    if (digest) {
      // The HMAC covers the whole challenge, its "{name}" prefix included.
      return Buffer.concat([challenge.subarray(0, close + 1), hmac(digest, authkey, challenge)]);
    }
  }
  throw new RpcError("authentication_error", "the server's challenge names no digest this client knows", { local: true });
}

/**
 * The client's side of the handshake: feed each frame from the server to receive(), send
 * what it returns. It ends with the server's hello in `hello`. Throws RpcError
 * (authentication_error) after setting `farewell` to the frame to send before closing.
 */
class ClientHandshake {
  constructor(authkey, peer) {
    this.authkey = authkey;
    this.peer = peer;
    this.challenge = Buffer.concat([Buffer.from("{sha256}"), crypto.randomBytes(CHALLENGE_BYTES)]);
    this.step = 0;
    this.hello = null;
    this.farewell = null;
  }

  get limit() {
    // The first frame may be the hello of a server without an authkey; the last is its hello.
    return this.step === 0 || this.step === 3 ? MAX_HELLO_FRAME : MAX_HANDSHAKE_FRAME;
  }

  fail(message) {
    return new RpcError("authentication_error", message, { local: true });
  }

  receive(frame) {
    const authkey = this.authkey;
    if (this.step === 0) {
      // the server's challenge, or its hello if it has no authkey
      if (!frame.subarray(0, CHALLENGE.length).equals(CHALLENGE)) {
        if (authkey !== null) {
          throw this.fail(`${this.peer} did not ask for the authkey, so it cannot prove it holds it: refused`);
        }
        this.step = 4;
        this.hello = frame;
        return [];
      }
      if (authkey === null) throw this.fail(`${this.peer} requires an authkey and none was given`);
      if (frame.length > MAX_HANDSHAKE_FRAME) throw this.fail(`a challenge of ${frame.length} bytes (at most ${MAX_HANDSHAKE_FRAME})`);
      const challenge = frame.subarray(CHALLENGE.length);
      if (challenge.length < 20) throw this.fail(`challenge too short: ${challenge.length} bytes`);
      this.step = 1;
      return [answerChallenge(authkey, challenge)];
    }
    if (this.step === 1) {
      // the server's verdict on our answer
      if (!frame.equals(WELCOME)) {
        throw this.fail(`${this.peer} refused this authkey: it is not the key the server was started with`);
      }
      this.step = 2;
      return [Buffer.concat([CHALLENGE, this.challenge])];
    }
    if (this.step === 2) {
      // the server's answer to our challenge: it must hold the authkey too
      const expected = Buffer.concat([Buffer.from("{sha256}"), hmac("sha256", authkey, this.challenge)]);
      if (frame.length !== expected.length || !crypto.timingSafeEqual(frame, expected)) {
        this.farewell = FAILURE;
        throw this.fail(`${this.peer} accepted this authkey but could not prove it holds it: is it the server you meant?`);
      }
      this.step = 3;
      return [WELCOME];
    }
    if (this.step === 3) {
      this.step = 4;
      this.hello = frame;
      return [];
    }
    throw this.fail("the handshake is over");
  }
}

// -- the client ---------------------------------------------------------------------------

function describe(address) {
  return address.path !== undefined ? `the server at ${address.path}` : `the server at ${address.host}:${address.port}`;
}

/**
 * The key `rpc serve` made: the file's text without surrounding whitespace, as bytes
 * ($XDG_CONFIG_HOME/rpc/authkey, else ~/.config/rpc/authkey, or `path`).
 */
export function readAuthkey(path = undefined) {
  const folder = process.env.XDG_CONFIG_HOME || pathModule.join(os.homedir(), ".config");
  const data = fs.readFileSync(path ?? pathModule.join(folder, "rpc", "authkey"));
  return Buffer.from(data.toString("latin1").trim(), "latin1");
}

/** {host, port} or {path}; a string is "HOST:PORT", or a path when it has a "/" or no ":". */
function parseAddress(address) {
  if (typeof address === "string") {
    const colon = address.lastIndexOf(":");
    if (address.includes("/") || colon < 0) return { path: address };
    return { host: address.slice(0, colon).replace(/^\[|\]$/g, ""), port: Number(address.slice(colon + 1)) };
  }
  if (address?.path !== undefined || (address?.host !== undefined && address?.port !== undefined)) return address;
  throw new TypeError("address must be {host, port}, {path}, or a string");
}

function toBuffer(authkey) {
  if (authkey === null || authkey === undefined) return null;
  if (typeof authkey === "string") return Buffer.from(authkey, "utf8");
  if (authkey instanceof Uint8Array) return Buffer.from(authkey);
  throw new TypeError("authkey must be a Buffer, a Uint8Array, a string or null");
}

/**
 * Connect and authenticate: resolves to a Client once both hellos are exchanged.
 *
 * `address` is {host, port} (TCP) or {path} (a Unix socket). Options: `authkey`
 * (Buffer or string; the server's key), `timeout` (each call's default deadline in
 * seconds, null for none), `connectTimeout` (seconds for connecting, the handshake
 * and the hello; default 10), `maxMessageBytes` (the largest frame accepted from the
 * server; default 64 MiB), `helloInfo` (the map sent in this client's hello).
 */
export async function connect(address, options = {}) {
  address = parseAddress(address);
  const authkey = toBuffer(options.authkey);
  const timeout = checkTimeout(options.timeout, "timeout");
  const connectTimeout = checkTimeout(options.connectTimeout ?? 10, "connectTimeout");
  const maxMessageBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
  const peer = describe(address);
  const helloFrame = options._helloFrame ?? encode([HELLO, PROTOCOL_VERSION, options.helloInfo ?? { client: "rpc-js", version: VERSION }]);

  return new Promise((resolve, reject) => {
    const socket = address.path !== undefined ? net.connect({ path: address.path }) : net.connect({ host: address.host, port: address.port });
    const client = new Client(socket, { timeout, maxMessageBytes, peer });
    const handshake = new ClientHandshake(authkey, peer);
    client.reader.limit = handshake.limit;
    let settled = false;

    const fail = (error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (handshake.farewell) client.farewell(handshake.farewell, error);
      else client.abort(error);
      reject(error);
    };
    const timer = setTimeout(
      () => fail(new RpcError("connect_timeout", `${peer}: no connection within the connect timeout of ${connectTimeout} s`, { local: true })),
      connectTimeout * 1000,
    );

    // Until the hello, frames go to the handshake; then to the client.
    client.onFrame = (frame) => {
      let replies;
      try {
        replies = handshake.receive(frame);
      } catch (err) {
        return fail(err);
      }
      for (const reply of replies) client.writeFrame(reply);
      if (handshake.step === 3) client.writeFrame(helloFrame); // sent without waiting for the server's
      client.reader.limit = handshake.step === 4 ? maxMessageBytes : handshake.limit;
      if (handshake.hello === null) return;
      let hello;
      try {
        hello = decode(handshake.hello, { ext: false }); // a hello holds no extension values
      } catch (err) {
        return fail(new RpcError("protocol_error", `${peer} sent a malformed hello: ${err.message}`, { local: true }));
      }
      if (!Array.isArray(hello) || hello.length !== 3 || hello[0] !== HELLO || !isMap(hello[2])) {
        return fail(new RpcError("protocol_error", `${peer} sent no hello after the handshake`, { local: true }));
      }
      if (hello[1] !== PROTOCOL_VERSION) {
        return fail(new RpcError("protocol_error", `${peer} speaks protocol version ${hello[1]}; this client speaks ${PROTOCOL_VERSION}`, { local: true }));
      }
      if (authkey === null) client.writeFrame(helloFrame); // (a server without an authkey sends its hello first)
      settled = true;
      clearTimeout(timer);
      client.admit(hello[2]);
      resolve(client);
    };
    client.closed.then((error) => fail(error ?? new RpcError("connection_closed", `${peer} closed the connection during the handshake`, { local: true })));
  });
}

export class Client {
  constructor(socket, { timeout, maxMessageBytes, peer }) {
    this.socket = socket;
    this.timeout = timeout; // each call's default deadline in seconds, or null
    this.peer = peer;
    this.serverInfo = null; // the info map of the server's hello
    this.reader = new FrameReader(maxMessageBytes);
    this.pending = new Map(); // id -> {resolve, reject, timer, method}
    this.nextId = 1;
    this.error = null; // what ended the connection
    this.ended = false;
    this.serverLimit = Infinity; // the server's max_message_bytes, from its hello
    this.onFrame = (frame) => this.receive(frame);
    this.onStray = null; // called with each answer whose id no call waits for (late, or a duplicate)
    let endedWith;
    /** Resolves once the connection has ended: with the RpcError that ended it, or null after close(). */
    this.closed = new Promise((resolve) => (endedWith = resolve));
    this.endedWith = endedWith;

    socket.setNoDelay?.(true);
    socket.on("data", (chunk) => this.data(chunk));
    socket.on("error", (err) => {
      if (this.error === null) {
        const what = err.code === "ECONNREFUSED" || err.code === "ENOENT" ? "cannot connect to" : "lost the connection to";
        this.error = new RpcError("connection_closed", `${what} ${this.peer}: ${err.message}`, { local: true });
      }
    });
    socket.on("close", () => this.finish());
  }

  admit(info) {
    this.serverInfo = info;
    if (Number.isSafeInteger(info.max_message_bytes)) this.serverLimit = info.max_message_bytes;
    this.onFrame = (frame) => this.receive(frame);
  }

  data(chunk) {
    if (this.ended) return;
    this.reader.feed(chunk);
    try {
      let frame;
      while (!this.ended && (frame = this.reader.next()) !== null) this.onFrame(frame);
    } catch (err) {
      this.abort(err instanceof RpcError ? err : new RpcError("protocol_error", String(err?.message ?? err), { local: true }));
    }
  }

  writeFrame(payload) {
    if (this.socket.destroyed || this.socket.writableEnded) return false;
    const head = frameHeader(payload.length);
    if (payload.length < 65536) this.socket.write(Buffer.concat([head, payload]));
    else {
      this.socket.write(head);
      this.socket.write(payload);
    }
    return true;
  }

  /** End the connection with `error`: every call in flight fails with it. */
  abort(error) {
    if (this.error === null) this.error = error;
    this.socket.destroy();
    this.finish();
  }

  /** Send `frame` (the handshake's #FAILURE#), then end the connection with `error`. */
  farewell(frame, error) {
    if (this.error === null) this.error = error;
    this.socket.end(Buffer.concat([frameHeader(frame.length), frame]));
    setTimeout(() => this.socket.destroy(), 1000).unref();
    this.finish();
  }

  finish() {
    if (this.ended) return;
    this.ended = true;
    const error = this.error ?? new RpcError("connection_closed", `${this.peer} closed the connection`, { local: true });
    for (const [id, call] of this.pending) {
      this.pending.delete(id);
      clearTimeout(call.timer);
      call.reject(error);
    }
    this.endedWith(this.closedByUs ? null : error);
  }

  /** One message from the server (after the hello). */
  receive(frame) {
    let message;
    try {
      message = decode(frame);
    } catch (err) {
      throw new RpcError("protocol_error", `${this.peer} sent a message this client cannot decode: ${err.message}`, { local: true });
    }
    if (!Array.isArray(message) || message.length === 0 || typeof message[0] !== "number") {
      throw new RpcError("protocol_error", `${this.peer} sent a message that is not an array starting with its kind`, { local: true });
    }
    const kind = message[0];
    if (kind === RESPONSE) {
      const [, id, error, result] = message;
      if (message.length !== 4 || !(error === null || isMap(error))) {
        throw new RpcError("protocol_error", `${this.peer} sent a malformed response`, { local: true });
      }
      if (id === null) {
        // A connection-level error: the server closes the connection after it.
        const failure = error === null ? new RpcError("protocol_error", `${this.peer} sent a response with no id`) : errorOf(error, null);
        this.abort(failure);
        return;
      }
      const call = this.pending.get(id);
      if (call === undefined) {
        this.onStray?.(message); // a late answer to a call that timed out here
        return;
      }
      this.pending.delete(id);
      clearTimeout(call.timer);
      if (error === null) call.resolve(result);
      else call.reject(errorOf(error, id));
      return;
    }
    if (kind === STREAM_START) {
      // This client does not consume streams: fail the call and cancel the stream
      // (its items and end, already on their way, are dropped below as unknown ids).
      const call = this.pending.get(message[1]);
      if (call !== undefined) {
        this.settle(message[1], new RpcError("stream_unsupported", `${call.method} answered with a stream, which this client does not read`, { id: message[1], local: true }));
        this.writeFrame(encode([CANCEL, message[1]]));
      }
    }
    // Stream items and ends of cancelled streams, a second hello, and kinds this client
    // does not know (added by a later protocol version) are ignored.
  }

  settle(id, error) {
    const call = this.pending.get(id);
    if (call === undefined) return;
    this.pending.delete(id);
    clearTimeout(call.timer);
    call.reject(error);
  }

  /**
   * Call `method` with positional `args` (an array) and keyword `kwargs` (an object or Map).
   * Options: `timeout` (seconds; default the client's) is sent to the server as the call's
   * deadline and also bounds the wait here; `clientTimeout` (seconds) bounds only the wait
   * here. When this client's timer fires first, the call fails with code call_timeout
   * (`local` true) and a cancel is sent, so the server stops the call.
   */
  call(method, args = [], kwargs = {}, options = {}) {
    let timeout, clientTimeout;
    try {
      timeout = options.timeout === undefined ? this.timeout : checkTimeout(options.timeout, "timeout");
      clientTimeout = options.clientTimeout === undefined ? timeout : checkTimeout(options.clientTimeout, "clientTimeout");
    } catch (err) {
      return Promise.reject(err);
    }
    if (typeof method !== "string") return Promise.reject(new TypeError("method must be a string"));
    if (!Array.isArray(args)) return Promise.reject(new TypeError("args must be an array"));
    if (this.nextId > MAX_ID) this.nextId = 1; // (after 2**53 calls: those ids are long answered)
    const id = this.nextId++;
    let payload;
    try {
      payload = encode([REQUEST, id, method, args, kwargs ?? {}, timeout === null ? {} : { timeout }]);
    } catch (err) {
      if (!(err instanceof EncodeError)) throw err;
      return Promise.reject(new RpcError("serialization_error", `cannot encode the arguments of ${method}: ${err.message}`, { local: true }));
    }
    return this.request(id, payload, method, clientTimeout);
  }

  /** Send `payload` (an encoded request of id `id`) and wait for its answer. */
  request(id, payload, method, clientTimeout) {
    if (this.ended) return Promise.reject(this.error ?? new RpcError("connection_closed", "the client is closed", { local: true }));
    if (payload.length > this.serverLimit) {
      return Promise.reject(
        new RpcError("message_too_large", `a request of ${payload.length} bytes is over the server's limit of ${this.serverLimit}`, {
          local: true,
          transport: false, // refused before sending: the connection goes on
        }),
      );
    }
    return new Promise((resolve, reject) => {
      const call = { resolve, reject, timer: null, method };
      if (clientTimeout !== null) {
        call.timer = setTimeout(() => {
          this.settle(id, new RpcError("call_timeout", `call ${method} got no answer within its timeout of ${clientTimeout} s`, { id, local: true }));
          this.writeFrame(encode([CANCEL, id])); // stop it on the server too (a late answer is dropped)
        }, clientTimeout * 1000);
      }
      this.pending.set(id, call);
      this.writeFrame(payload);
    });
  }

  /** Run `method` on the server with no answer (a notification). */
  notify(method, args = [], kwargs = {}) {
    if (this.ended) throw this.error ?? new RpcError("connection_closed", "the client is closed", { local: true });
    this.writeFrame(encode([NOTIFICATION, method, args, kwargs ?? {}]));
  }

  /**
   * Conformance testing: send `payload` as one frame, whatever it holds. With `expectId`,
   * resolves to the result of the answer of that id (or rejects with its error); the
   * connection-level outcome is in `closed`.
   */
  sendFrame(payload, { expectId = null, clientTimeout = 30 } = {}) {
    if (expectId === null) {
      this.writeFrame(Buffer.from(payload));
      return Promise.resolve(undefined);
    }
    return this.request(expectId, Buffer.from(payload), `the frame of id ${expectId}`, clientTimeout);
  }

  /** Close the connection: calls in flight fail with connection_closed; resolves once closed. */
  close() {
    if (!this.ended) {
      this.closedByUs = true;
      this.error ??= new RpcError("connection_closed", "the client was closed", { local: true });
      for (const id of [...this.pending.keys()]) this.settle(id, this.error);
      this.socket.end(); // what was written still goes out (a notification, say)
      setTimeout(() => this.socket.destroy(), 1000).unref();
    }
    return this.closed.then(() => undefined);
  }
}
