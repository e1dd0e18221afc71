// Conformance scenarios of the JS client against a real rpc server, run by the Python
// suite (tests/test_js_client.py), which asserts on what this prints.
//
//   RPC_ADDRESS=HOST:PORT|PATH RPC_AUTHKEY_HEX=<the key in hex> node test/conformance.js SCENARIO [ARG]
//
// (RPC_AUTHKEY_FILE=<a key file> instead of RPC_AUTHKEY_HEX reads a key as `rpc serve` does.)
// Prints one line of JSON (values tagged so that Python can tell a tuple from a list,
// a BigInt from a float: see `plain`), or exits 1 with the reason on stderr.

import {
  Float,
  FrozenSet,
  PyComplex,
  PyDate,
  PyDateTime,
  PyDecimal,
  PyTime,
  PyTimedelta,
  PyUUID,
  Tuple,
  Ext,
  DecodeError,
  connect,
  decode,
  encode,
  readAuthkey,
} from "../rpc.js";

const address = process.env.RPC_ADDRESS;
const { RPC_AUTHKEY_HEX, RPC_AUTHKEY_FILE } = process.env;
const authkey = RPC_AUTHKEY_HEX ? Buffer.from(RPC_AUTHKEY_HEX, "hex") : RPC_AUTHKEY_FILE ? readAuthkey(RPC_AUTHKEY_FILE) : null;
const [scenario, arg] = process.argv.slice(2);

/** A value as JSON, tagged where JSON has no type of its own. */
function plain(v) {
  if (typeof v === "bigint") return { $bigint: v.toString() };
  if (typeof v === "number" && !Number.isFinite(v)) return { $float: String(v) };
  if (v === null || typeof v !== "object") return v;
  if (v instanceof Tuple) return { $tuple: Array.from(v, plain) };
  if (Array.isArray(v)) return v.map(plain);
  if (v instanceof FrozenSet) return { $frozenset: Array.from(v, plain) };
  if (v instanceof Set) return { $set: Array.from(v, plain) };
  if (v instanceof Map) return { $map: Array.from(v, ([k, x]) => [plain(k), plain(x)]) };
  if (v instanceof Uint8Array) return { $bytes: Buffer.from(v).toString("hex") };
  if (v instanceof PyDateTime) return { $datetime: v.iso };
  if (v instanceof PyDate) return { $date: v.iso };
  if (v instanceof PyTime) return { $time: v.iso };
  if (v instanceof PyDecimal) return { $decimal: v.text };
  if (v instanceof PyUUID) return { $uuid: v.toString() };
  if (v instanceof PyComplex) return { $complex: [v.real, v.imag] };
  if (v instanceof PyTimedelta) return { $timedelta: [v.days, v.seconds, v.microseconds] };
  if (v instanceof Ext) return { $ext: [v.type, Buffer.from(v.data).toString("hex")] };
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
}

/** What a failed call gives: its error's fields. */
function failure(err) {
  if (err?.code === undefined) throw err; // not an RpcError: a bug here, not an outcome
  return { code: err.code, type: err.type, message: err.message, traceback: err.traceback, local: err.local, id: err.id ?? null, transport: err.transport };
}

/** The outcome of a call: {result} or {error}. */
async function outcome(promise) {
  try {
    return { result: plain(await promise) };
  } catch (err) {
    return { error: failure(err) };
  }
}

/** Wait for `promise`, failing the scenario after `seconds` (so no run hangs). */
function bounded(promise, seconds, what) {
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing within ${seconds} s`)), seconds * 1000);
  });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

const open = (options = {}) => connect(address, { authkey, timeout: 30, connectTimeout: 20, ...options });

// Values sent to `echo` and `type_name`: what Python receives, and what comes back.
const EXT_VALUES = {
  tuple: Tuple.of(1, "a", Tuple.of(2, Tuple.of())),
  set: new Set([1, 2, 3]),
  frozenset: new FrozenSet(["x"]),
  datetime_aware: new PyDateTime("2024-02-29T12:34:56.789012+05:30"),
  datetime_naive: new PyDateTime("2024-02-29T12:34:56"),
  js_date: new Date(Date.UTC(2024, 1, 29, 12, 34, 56, 789)),
  date: new PyDate("2024-02-29"),
  time: new PyTime("23:59:59.000001"),
  decimal: new PyDecimal("3.14159265358979323846264338327950288"),
  uuid: new PyUUID("12345678-1234-5678-1234-567812345678"),
  complex: new PyComplex(1.5, -2),
  timedelta: new PyTimedelta(1, 2, 3),
  int_2_70: 2n ** 70n,
  int_minus_2_70: -(2n ** 70n),
  int_2_64_minus_1: 2n ** 64n - 1n,
  int_minus_2_63: -(2n ** 63n),
  int_2_53: 2n ** 53n,
  int_small: -5,
  float_integral: new Float(2),
  float: 1.5,
  bytes: Uint8Array.from([0, 1, 255]),
  str: "héllo \u{1F600}",
  map_int_keys: new Map([[1, "a"], [2, "b"]]),
  nested: { list: [1, [2, [3]]], none: null, yes: true },
};

// Requests whose id the server can read, but which it cannot run: each fails alone.
const CALL_FAILURES = {
  method_not_a_string: [0, 7001, 42, [], {}, {}],
  args_not_an_array: [0, 7002, "add", { not: "a list" }, {}, {}],
  kwargs_key_not_a_string: [0, 7003, "add", [1, 2], new Map([[1, 2]]), {}],
  meta_nil: [0, 7004, "add", [1, 2], {}, null],
  timeout_not_a_number: [0, 7005, "add", [1, 2], {}, { timeout: "soon" }],
  timeout_negative: [0, 7006, "add", [1, 2], {}, { timeout: -1 }],
  method_too_long: [0, 7007, "m".repeat(1025), [], {}, {}],
};

const scenarios = {
  /** Handshake, hello, calls, keyword arguments, errors, deadlines, ext values, pipelining. */
  async calls() {
    const out = {};
    const client = await open();
    out.hello = plain(client.serverInfo);
    out.add = await outcome(client.call("add", [2, 3]));
    out.hypot = await outcome(client.call("math.hypot", [3, 4]));
    out.kwargs_only = await outcome(client.call("add", [], { x: 2, y: 40 }));
    out.kwargs_echo = await outcome(client.call("kwargs_echo", [1, 2], { a: 1, b: "x" }, { timeout: 10 }));
    out.remote_error = await outcome(client.call("fail", ["ValueError", "bad value"]));
    out.custom_error = await outcome(client.call("fail_custom"));
    out.wrong_arguments = await outcome(client.call("add", [1]));
    out.not_found = await outcome(client.call("no_such_method", [1]));
    // The server's deadline: its call_timeout answer comes before this client's timer.
    out.server_deadline = await outcome(client.call("sleep", [10], {}, { timeout: 0.3, clientTimeout: 30 }));
    // This client's timer alone (no deadline sent): call_timeout here, and a cancel to the server.
    out.client_deadline = await outcome(client.call("sleep", [10], {}, { timeout: null, clientTimeout: 0.3 }));
    out.after_deadlines = await outcome(client.call("add", [1, 1]));

    out.echo = {};
    out.python_type = {};
    for (const [name, value] of Object.entries(EXT_VALUES)) {
      out.echo[name] = await outcome(client.call("echo", [value]));
      out.python_type[name] = await outcome(client.call("type_name", [value]));
    }
    out.nested_tuple = await outcome(client.call("nested_tuple", [3]));

    // 100 calls in flight at once on one connection, answered in any order, matched by id.
    const calls = [];
    for (let i = 0; i < 100; i++) calls.push(client.call("identify", ["js", i]));
    out.in_flight = client.pending.size;
    out.pipelined = (await Promise.all(calls)).map((answer) => plain(answer).slice(0, 2));

    await client.close();
    out.closed = await bounded(client.closed, 10, "close");
    return out;
  },

  /** Connecting with the wrong authkey, or with none. */
  async "wrong-key"() {
    const out = {};
    for (const [name, key] of [["wrong", Buffer.from("not the key")], ["none", null]]) {
      try {
        const client = await open({ authkey: key });
        await client.close();
        out[name] = { connected: true };
      } catch (err) {
        out[name] = { error: failure(err) };
      }
    }
    return out;
  },

  /** Connect and close (against a peer the test runs itself); ARG is the connect timeout. */
  async "connect-only"() {
    try {
      const client = await open({ connectTimeout: Number(arg ?? 10) });
      await client.close();
      return { connected: true };
    } catch (err) {
      return { error: failure(err) };
    }
  },

  /** Requests the server fails alone, each the first of a new connection: the connection goes on. */
  async "malformed-call"() {
    const out = {};
    for (const [name, message] of Object.entries(CALL_FAILURES)) {
      const client = await open();
      const answer = await outcome(client.sendFrame(encode(message), { expectId: message[1] }));
      out[name] = { answer, then: await outcome(client.call("add", [2, 3])), ended: client.ended };
      await client.close();
    }
    return out;
  },

  /** The same, after a call on the connection (which the server may serve on a lent socket). */
  async "malformed-after-call"() {
    const client = await open();
    const out = { first: await outcome(client.call("add", [1, 1])) };
    const message = CALL_FAILURES[arg];
    out.answer = await outcome(client.sendFrame(encode(message), { expectId: message[1], clientTimeout: 5 }));
    out.then = await outcome(client.call("add", [2, 3]));
    await client.close();
    return out;
  },

  /** A frame the server cannot answer by id: it answers with a nil id and closes. */
  async "malformed-close"() {
    const frames = {
      "field-count": encode([0, 7, "add"]),
      "unknown-kind": encode([9, 7, "add", [], {}, {}]),
      "not-msgpack": Buffer.from("not msgpack at all"),
      "reserved-byte": Buffer.from([0xc1]),
      "id-not-an-int": encode([0, "seven", "add", [], {}, {}]),
      "not-an-array": encode({ kind: 0 }),
    };
    const client = await open();
    await client.sendFrame(frames[arg]);
    // Sent after the bad frame, so never served: it fails with what closed the connection.
    const after = outcome(client.call("add", [2, 3]));
    const closed = await bounded(client.closed, 20, "the server closing the connection");
    return { closed: closed && failure(closed), after: await after };
  },

  /** A bad hello from this side; the server's hello has already arrived. */
  async "bad-hello"() {
    const frames = {
      version: encode([4, 2, {}]),
      "nil-info": encode([4, 1, null]),
      "string-version": encode([4, "1", {}]),
      "request-first": encode([0, 1, "add", [2, 3], {}, {}]),
    };
    const client = await open({ _helloFrame: frames[arg] });
    const strays = [];
    client.onStray = (message) => strays.push(plain(message));
    const closed = await bounded(client.closed, 20, "the server closing the connection");
    return { hello: plain(client.serverInfo), closed: closed && failure(closed), strays };
  },

  /** Two requests with the same id in flight at once. */
  async "duplicate-id"() {
    const client = await open();
    const strays = [];
    let stray;
    const secondAnswer = new Promise((resolve) => (stray = resolve));
    client.onStray = (message) => {
      strays.push(plain(message));
      stray();
    };
    const first = outcome(client.sendFrame(encode([0, 9001, "sleep", [0.5, "first"], {}, {}]), { expectId: 9001 }));
    await client.sendFrame(encode([0, 9001, "sleep", [0.5, "second"], {}, {}]));
    const out = { first: await first };
    const closed = await bounded(Promise.race([secondAnswer.then(() => false), client.closed]), 20, "a second answer or the close");
    out.closed = closed ? failure(closed) : null;
    out.strays = strays;
    if (!client.ended) await client.close();
    return out;
  },

  /**
   * The codec against Python's: decode each hex value of stdin's `values` and encode it
   * again; try to decode each of `refuse` and say why it was refused.
   */
  async codec() {
    const chunks = [];
    for await (const chunk of process.stdin) chunks.push(chunk);
    const input = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    const out = { values: [], refused: {} };
    for (const hex of input.values) out.values.push(encode(decode(Buffer.from(hex, "hex"))).toString("hex"));
    for (const [name, hex] of Object.entries(input.refuse)) {
      try {
        decode(Buffer.from(hex, "hex"));
        out.refused[name] = null;
      } catch (err) {
        if (!(err instanceof DecodeError)) throw err;
        out.refused[name] = err.message;
      }
    }
    return out;
  },

  /** Frames over this client's read limit, requests over the server's. */
  async limits() {
    const client = await open({ maxMessageBytes: 4096 });
    const out = { server_limit: client.serverInfo.max_message_bytes };
    out.request_over_server_limit = await outcome(client.call("echo", [new Uint8Array(client.serverInfo.max_message_bytes + 1)]));
    out.still_open = await outcome(client.call("add", [2, 3]));
    out.answer_over_client_limit = await outcome(client.call("big", [100000]));
    out.closed = failure(await bounded(client.closed, 10, "close"));
    return out;
  },
};

const run = scenarios[scenario];
if (run === undefined) {
  process.stderr.write(`unknown scenario ${scenario}; one of: ${Object.keys(scenarios).join(", ")}\n`);
  process.exit(2);
}
// Exit once the output is written (a pipe may take it in several writes), whatever is left open.
try {
  const result = await bounded(run(), 120, scenario);
  process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0));
} catch (err) {
  process.stderr.write(`${err?.stack ?? err}\n`, () => process.exit(1));
}
