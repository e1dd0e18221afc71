// A minimal msgpack codec for rpc's wire format: nil, bool, int (64-bit as BigInt
// beyond 2**53), float64, str, bin, array, map and ext, with rpc's extension types
// (tuple, set, datetime, ...; see "Values" in the protocol specification).
//
// Decoding is bounded, as rpc's own decoders are: a length that the remaining bytes
// cannot hold is refused before anything is allocated, arrays and maps nest at most
// `maxDepth` deep (counted across extension values too, so a hostile frame cannot
// exhaust the JS stack), extension values at most `maxExtDepth` deep.

const textDecoder = new TextDecoder("utf-8", { fatal: true });
const textEncoder = new TextEncoder();

export const MAX_EXT_DEPTH = 32; // as rpc.protocol.MAX_EXT_DEPTH
export const MAX_DEPTH = 1024; // arrays and maps, in all (rpc allows 1024 per extension level)

export class DecodeError extends Error {}
export class EncodeError extends Error {}

// -- values that plain JS has no type for ------------------------------------------

/** An extension value this codec does not convert: a user type (64-127), or msgpack's own (negative). */
export class Ext {
  constructor(type, data) {
    this.type = type;
    this.data = data; // Uint8Array
  }
}

/** A Python tuple (ext 1): an Array that encodes as a tuple. */
export class Tuple extends Array {
  static of(...items) {
    return Tuple.from(items);
  }
}

/** A Python frozenset (ext 3); a plain Set is a Python set (ext 2). */
export class FrozenSet extends Set {}

/** A number that always encodes as float64 (a JS number with an integral value encodes as an int). */
export class Float {
  constructor(value) {
    this.value = Number(value);
  }
  valueOf() {
    return this.value;
  }
}

/** Python's datetime (ext 4), as its ISO 8601 text: keeps microseconds, and naive stays naive. */
export class PyDateTime {
  constructor(iso) {
    this.iso = String(iso);
  }
  /** A JS Date (milliseconds; a naive datetime is read as UTC). */
  toDate() {
    const hasOffset = /([+-]\d\d:\d\d(:\d\d(\.\d+)?)?|Z)$/.test(this.iso);
    return new Date(hasOffset ? this.iso : `${this.iso}Z`);
  }
  toString() {
    return this.iso;
  }
}

/** Python's date (ext 5), as "YYYY-MM-DD". */
export class PyDate {
  constructor(iso) {
    this.iso = String(iso);
  }
  toString() {
    return this.iso;
  }
}

/** Python's time (ext 11), as ISO 8601 text. */
export class PyTime {
  constructor(iso) {
    this.iso = String(iso);
  }
  toString() {
    return this.iso;
  }
}

/** Python's Decimal (ext 6), as its text. */
export class PyDecimal {
  constructor(text) {
    this.text = String(text);
  }
  toString() {
    return this.text;
  }
}

/** Python's UUID (ext 7): 16 bytes; `new PyUUID("12345678-1234-...")` or from bytes. */
export class PyUUID {
  constructor(value) {
    if (typeof value === "string") {
      const hex = value.replace(/[{}-]/g, "");
      if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new EncodeError(`not a UUID: ${value}`);
      this.bytes = Uint8Array.from(Buffer.from(hex, "hex"));
    } else {
      if (value.length !== 16) throw new DecodeError(`a UUID is 16 bytes, not ${value.length}`);
      this.bytes = Uint8Array.from(value);
    }
  }
  toString() {
    const hex = Buffer.from(this.bytes).toString("hex");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }
}

/** Python's complex (ext 8). */
export class PyComplex {
  constructor(real, imag) {
    this.real = Number(real);
    this.imag = Number(imag);
  }
}

/** Python's timedelta (ext 10), normalised as Python keeps it: days, seconds, microseconds. */
export class PyTimedelta {
  constructor(days, seconds, microseconds) {
    this.days = days;
    this.seconds = seconds;
    this.microseconds = microseconds;
  }
}

// -- encoding -----------------------------------------------------------------------

class Writer {
  constructor() {
    this.buf = Buffer.allocUnsafe(256);
    this.pos = 0;
  }
  ensure(n) {
    if (this.pos + n <= this.buf.length) return;
    const bigger = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.pos + n));
    this.buf.copy(bigger, 0, 0, this.pos);
    this.buf = bigger;
  }
  byte(b) {
    this.ensure(1);
    this.buf[this.pos++] = b;
  }
  bytes(data) {
    this.ensure(data.length);
    this.buf.set(data, this.pos);
    this.pos += data.length;
  }
  head(b, width, n) {
    // a marker byte and a big-endian unsigned length/value of `width` bytes
    this.ensure(1 + width);
    this.buf[this.pos++] = b;
    if (width === 1) this.buf.writeUInt8(n, this.pos);
    else if (width === 2) this.buf.writeUInt16BE(n, this.pos);
    else if (width === 4) this.buf.writeUInt32BE(n, this.pos);
    this.pos += width;
  }
  result() {
    return this.buf.subarray(0, this.pos);
  }
}

const INT64_MIN = -(2n ** 63n);
const UINT64_END = 2n ** 64n;

function writeInt(w, n) {
  // n: a safe-integer Number
  if (n >= 0) {
    if (n < 0x80) w.byte(n);
    else if (n < 0x100) w.head(0xcc, 1, n);
    else if (n < 0x10000) w.head(0xcd, 2, n);
    else if (n < 0x100000000) w.head(0xce, 4, n);
    else writeBig(w, BigInt(n));
  } else {
    if (n >= -32) w.byte(n & 0xff);
    else if (n >= -0x80) {
      w.ensure(2);
      w.buf[w.pos++] = 0xd0;
      w.buf.writeInt8(n, w.pos++);
    } else if (n >= -0x8000) {
      w.ensure(3);
      w.buf[w.pos++] = 0xd1;
      w.buf.writeInt16BE(n, w.pos);
      w.pos += 2;
    } else if (n >= -0x80000000) {
      w.ensure(5);
      w.buf[w.pos++] = 0xd2;
      w.buf.writeInt32BE(n, w.pos);
      w.pos += 4;
    } else writeBig(w, BigInt(n));
  }
}

function writeBig(w, n) {
  if (n >= INT64_MIN && n < UINT64_END) {
    if (n >= -(2n ** 31n) && n < 2n ** 32n) return writeInt(w, Number(n));
    w.ensure(9);
    if (n >= 0n) {
      w.buf[w.pos++] = 0xcf;
      w.buf.writeBigUInt64BE(n, w.pos);
    } else {
      w.buf[w.pos++] = 0xd3;
      w.buf.writeBigInt64BE(n, w.pos);
    }
    w.pos += 8;
    return;
  }
  writeExt(w, 9, bigIntBytes(n));
}

/** Big-endian two's complement, as Python's int.to_bytes(bit_length // 8 + 1, signed=True). */
export function bigIntBytes(n) {
  const magnitude = n < 0n ? -n : n;
  const length = Math.floor(magnitude.toString(2).length / 8) + 1;
  let u = n < 0n ? (1n << BigInt(8 * length)) + n : n;
  const out = new Uint8Array(length);
  for (let i = length - 1; i >= 0; i--) {
    out[i] = Number(u & 0xffn);
    u >>= 8n;
  }
  return out;
}

function bigIntFromBytes(data) {
  if (data.length === 0) return 0n; // as int.from_bytes(b"")
  let u = 0n;
  for (const b of data) u = (u << 8n) | BigInt(b);
  return data[0] & 0x80 ? u - (1n << BigInt(8 * data.length)) : u;
}

function writeFloat(w, x) {
  w.ensure(9);
  w.buf[w.pos++] = 0xcb;
  w.buf.writeDoubleBE(x, w.pos);
  w.pos += 8;
}

function writeStr(w, s) {
  const data = textEncoder.encode(s);
  const n = data.length;
  if (n < 32) w.byte(0xa0 | n);
  else if (n < 0x100) w.head(0xd9, 1, n);
  else if (n < 0x10000) w.head(0xda, 2, n);
  else w.head(0xdb, 4, n);
  w.bytes(data);
}

function writeBin(w, data) {
  const n = data.length;
  if (n < 0x100) w.head(0xc4, 1, n);
  else if (n < 0x10000) w.head(0xc5, 2, n);
  else w.head(0xc6, 4, n);
  w.bytes(data);
}

function writeExt(w, type, data) {
  const n = data.length;
  const fixed = { 1: 0xd4, 2: 0xd5, 4: 0xd6, 8: 0xd7, 16: 0xd8 }[n];
  if (fixed !== undefined) w.byte(fixed);
  else if (n < 0x100) w.head(0xc7, 1, n);
  else if (n < 0x10000) w.head(0xc8, 2, n);
  else w.head(0xc9, 4, n);
  w.byte(type & 0xff);
  w.bytes(data);
}

function arrayHead(w, n) {
  if (n < 16) w.byte(0x90 | n);
  else if (n < 0x10000) w.head(0xdc, 2, n);
  else w.head(0xdd, 4, n);
}

function mapHead(w, n) {
  if (n < 16) w.byte(0x80 | n);
  else if (n < 0x10000) w.head(0xde, 2, n);
  else w.head(0xdf, 4, n);
}

/** A JS Date as Python's datetime.isoformat() of an aware UTC datetime. */
function dateIso(d) {
  if (Number.isNaN(d.getTime())) throw new EncodeError("cannot encode an invalid Date");
  return d.toISOString().replace(/\.(\d{3})Z$/, ".$1000+00:00");
}

function isPlainObject(v) {
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

function extPayload(value, state) {
  // The payload of an extension value is a msgpack value of its own: one level deeper.
  if (state.ext >= MAX_EXT_DEPTH) throw new EncodeError(`values nest extension types more than ${MAX_EXT_DEPTH} deep`);
  const inner = new Writer();
  write(inner, value, { depth: state.depth, ext: state.ext + 1 });
  return inner.result();
}

function write(w, v, state) {
  switch (typeof v) {
    case "undefined":
      return w.byte(0xc0);
    case "boolean":
      return w.byte(v ? 0xc3 : 0xc2);
    case "number":
      if (Number.isSafeInteger(v) && !Object.is(v, -0)) return writeInt(w, v);
      return writeFloat(w, v);
    case "bigint":
      return writeBig(w, v);
    case "string":
      return writeStr(w, v);
    case "object":
      break;
    default:
      throw new EncodeError(`cannot encode a value of type ${typeof v}`);
  }
  if (v === null) return w.byte(0xc0);
  if (state.depth >= MAX_DEPTH) throw new EncodeError(`values nest more than ${MAX_DEPTH} deep (or hold a cycle)`);
  const deeper = { depth: state.depth + 1, ext: state.ext };
  if (v instanceof Float) return writeFloat(w, v.value);
  if (v instanceof Uint8Array) return writeBin(w, v);
  if (v instanceof ArrayBuffer) return writeBin(w, new Uint8Array(v));
  if (v instanceof Tuple) return writeExt(w, 1, extPayload(Array.from(v), deeper));
  if (Array.isArray(v)) {
    arrayHead(w, v.length);
    for (const item of v) write(w, item, deeper);
    return;
  }
  if (v instanceof FrozenSet) return writeExt(w, 3, extPayload(Array.from(v), deeper));
  if (v instanceof Set) return writeExt(w, 2, extPayload(Array.from(v), deeper));
  if (v instanceof Map) {
    mapHead(w, v.size);
    for (const [key, item] of v) {
      write(w, key, deeper);
      write(w, item, deeper);
    }
    return;
  }
  if (v instanceof Ext) return writeExt(w, v.type, v.data);
  if (v instanceof Date) return writeExt(w, 4, textEncoder.encode(dateIso(v)));
  if (v instanceof PyDateTime) return writeExt(w, 4, textEncoder.encode(v.iso));
  if (v instanceof PyDate) return writeExt(w, 5, textEncoder.encode(v.iso));
  if (v instanceof PyDecimal) return writeExt(w, 6, textEncoder.encode(v.text));
  if (v instanceof PyUUID) return writeExt(w, 7, v.bytes);
  if (v instanceof PyComplex) {
    const data = Buffer.allocUnsafe(16);
    data.writeDoubleBE(v.real, 0);
    data.writeDoubleBE(v.imag, 8);
    return writeExt(w, 8, data);
  }
  if (v instanceof PyTimedelta) {
    return writeExt(w, 10, extPayload([v.days, v.seconds, v.microseconds], deeper));
  }
  if (v instanceof PyTime) return writeExt(w, 11, textEncoder.encode(v.iso));
  if (isPlainObject(v)) {
    const keys = Object.keys(v);
    mapHead(w, keys.length);
    for (const key of keys) {
      writeStr(w, key);
      write(w, v[key], deeper);
    }
    return;
  }
  throw new EncodeError(`cannot encode a value of class ${v.constructor?.name ?? "?"}`);
}

/** Encode one value as msgpack bytes (a Buffer). */
export function encode(value) {
  const w = new Writer();
  write(w, value, { depth: 0, ext: 0 });
  return Buffer.from(w.result()); // a copy the size of the message
}

// -- decoding -----------------------------------------------------------------------

class Reader {
  constructor(data, options, depth, ext) {
    this.data = data;
    this.view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    this.pos = 0;
    this.options = options;
    this.depth = depth;
    this.ext = ext;
  }

  need(n) {
    // Every length is checked against what is left before anything is allocated.
    const left = this.data.length - this.pos;
    if (n > left) throw new DecodeError(`truncated message: ${n} bytes wanted, ${left} left`);
  }

  u8() {
    this.need(1);
    return this.data[this.pos++];
  }
  u16() {
    this.need(2);
    const v = this.view.getUint16(this.pos);
    this.pos += 2;
    return v;
  }
  u32() {
    this.need(4);
    const v = this.view.getUint32(this.pos);
    this.pos += 4;
    return v;
  }
  take(n) {
    this.need(n);
    const out = this.data.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  int64(signed) {
    this.need(8);
    const v = signed ? this.view.getBigInt64(this.pos) : this.view.getBigUint64(this.pos);
    this.pos += 8;
    // A Number where it is exact, a BigInt beyond 2**53.
    return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  }

  str(n) {
    try {
      return textDecoder.decode(this.take(n));
    } catch (err) {
      if (err instanceof DecodeError) throw err;
      throw new DecodeError("a string is not valid UTF-8");
    }
  }

  enter() {
    if (this.depth >= this.options.maxDepth) throw new DecodeError(`values nest more than ${this.options.maxDepth} deep`);
    this.depth++;
  }

  array(n) {
    this.need(n); // each item is at least one byte
    this.enter();
    const out = new Array(n);
    for (let i = 0; i < n; i++) out[i] = this.value();
    this.depth--;
    return out;
  }

  map(n) {
    this.need(2 * n); // each entry is at least two bytes
    this.enter();
    const keys = new Array(n);
    const values = new Array(n);
    let allStrings = true;
    for (let i = 0; i < n; i++) {
      keys[i] = this.value();
      values[i] = this.value();
      if (typeof keys[i] !== "string") allStrings = false;
    }
    this.depth--;
    if (!allStrings) return new Map(keys.map((key, i) => [key, values[i]]));
    const out = {};
    for (let i = 0; i < n; i++) {
      // "__proto__" must become a key, not the object's prototype
      if (keys[i] === "__proto__") Object.defineProperty(out, keys[i], { value: values[i], enumerable: true, writable: true, configurable: true });
      else out[keys[i]] = values[i];
    }
    return out;
  }

  extValue(n) {
    this.need(1 + n);
    const type = this.view.getInt8(this.pos++);
    const data = this.take(n);
    return decodeExt(type, data, this);
  }

  value() {
    const b = this.u8();
    if (b < 0x80) return b;
    if (b >= 0xe0) return b - 0x100;
    if (b < 0x90) return this.map(b & 0x0f);
    if (b < 0xa0) return this.array(b & 0x0f);
    if (b < 0xc0) return this.str(b & 0x1f);
    switch (b) {
      case 0xc0:
        return null;
      case 0xc2:
        return false;
      case 0xc3:
        return true;
      case 0xc4:
        return Uint8Array.from(this.take(this.u8()));
      case 0xc5:
        return Uint8Array.from(this.take(this.u16()));
      case 0xc6:
        return Uint8Array.from(this.take(this.u32()));
      case 0xc7:
        return this.extValue(this.u8());
      case 0xc8:
        return this.extValue(this.u16());
      case 0xc9:
        return this.extValue(this.u32());
      case 0xca: {
        this.need(4);
        const v = this.view.getFloat32(this.pos);
        this.pos += 4;
        return v;
      }
      case 0xcb: {
        this.need(8);
        const v = this.view.getFloat64(this.pos);
        this.pos += 8;
        return v;
      }
      case 0xcc:
        return this.u8();
      case 0xcd:
        return this.u16();
      case 0xce:
        return this.u32();
      case 0xcf:
        return this.int64(false);
      case 0xd0:
        return (this.u8() << 24) >> 24;
      case 0xd1:
        return (this.u16() << 16) >> 16;
      case 0xd2:
        return this.u32() | 0;
      case 0xd3:
        return this.int64(true);
      case 0xd4:
        return this.extValue(1);
      case 0xd5:
        return this.extValue(2);
      case 0xd6:
        return this.extValue(4);
      case 0xd7:
        return this.extValue(8);
      case 0xd8:
        return this.extValue(16);
      case 0xd9:
        return this.str(this.u8());
      case 0xda:
        return this.str(this.u16());
      case 0xdb:
        return this.str(this.u32());
      case 0xdc:
        return this.array(this.u16());
      case 0xdd:
        return this.array(this.u32());
      case 0xde:
        return this.map(this.u16());
      case 0xdf:
        return this.map(this.u32());
      default:
        throw new DecodeError(`byte 0x${b.toString(16)} is not a msgpack value`);
    }
  }
}

function nested(data, parent) {
  // The payload of an extension value: a whole msgpack value, one extension level deeper.
  if (parent.ext >= MAX_EXT_DEPTH) throw new DecodeError(`values nest extension types more than ${MAX_EXT_DEPTH} deep`);
  return decodeWith(data, parent.options, parent.depth, parent.ext + 1);
}

function text(data) {
  try {
    return textDecoder.decode(data);
  } catch {
    throw new DecodeError("an extension value's text is not valid UTF-8");
  }
}

function itemsOf(data, parent, what) {
  const items = nested(data, parent);
  if (!Array.isArray(items)) throw new DecodeError(`a ${what} must hold an array`);
  return items;
}

function decodeExt(type, data, parent) {
  if (!parent.options.ext) throw new DecodeError(`extension type ${type} is not allowed here`);
  switch (type) {
    case 1:
      return Tuple.from(itemsOf(data, parent, "tuple"));
    case 2:
      return new Set(itemsOf(data, parent, "set"));
    case 3:
      return new FrozenSet(itemsOf(data, parent, "frozenset"));
    case 4:
      return new PyDateTime(text(data));
    case 5:
      return new PyDate(text(data));
    case 6:
      return new PyDecimal(text(data));
    case 7:
      return new PyUUID(data);
    case 8: {
      if (data.length !== 16) throw new DecodeError("a complex is 16 bytes");
      const view = new DataView(data.buffer, data.byteOffset, 16);
      return new PyComplex(view.getFloat64(0), view.getFloat64(8));
    }
    case 9:
      return bigIntFromBytes(data);
    case 10: {
      const parts = itemsOf(data, parent, "timedelta");
      if (parts.length !== 3) throw new DecodeError("a timedelta is [days, seconds, microseconds]");
      return new PyTimedelta(...parts);
    }
    case 11:
      return new PyTime(text(data));
    default:
      // Users' types (64-127) and msgpack's own (negative, such as the timestamp) stay
      // opaque; rpc's codes that it has not assigned (0, 12-63) are malformed.
      if (type >= 0 && type < 64) throw new DecodeError(`unknown extension type ${type}`);
      return new Ext(type, Uint8Array.from(data));
  }
}

function decodeWith(data, options, depth, ext) {
  const reader = new Reader(data, options, depth, ext);
  const value = reader.value();
  if (reader.pos !== data.length) throw new DecodeError("trailing bytes after the message");
  return value;
}

/**
 * Decode one msgpack value that fills `data` exactly; DecodeError if it is not one.
 * Options: maxDepth (arrays and maps, default 1024), ext (false: refuse extension values).
 */
export function decode(data, { maxDepth = MAX_DEPTH, ext = true } = {}) {
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
  try {
    return decodeWith(bytes, { maxDepth, ext }, 0, 0);
  } catch (err) {
    if (err instanceof DecodeError) throw err;
    if (err instanceof RangeError) throw new DecodeError("values nest too deep for the JS stack");
    throw new DecodeError(String(err?.message ?? err));
  }
}
