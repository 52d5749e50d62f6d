// What the browser tests share: their command line (BINARY DATA_DIR BASE [SCREENSHOT_DIR]), the
// `fhirvault` CLI on the server's data directory, and TOTP as an authenticator app computes it
// (RFC 6238: SHA-1, 6 digits, 30 s) from the base32 key a fhirvault enrolment page shows.
import { execFileSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdirSync } from 'node:fs';

// The server under test and where screenshots go, from the command line.
export function setup(argv) {
  const [binary, dataDir, baseArg, shotsArg] = argv.slice(2);
  const root = (baseArg || 'http://127.0.0.1:8080').replace(/\/$/, '');
  const shots = shotsArg || 'conformance/screenshots';
  mkdirSync(shots, { recursive: true });
  const cli = (args, input) =>
    execFileSync(binary, ['--data-dir', dataDir, ...args], { input, encoding: 'utf8', stdio: ['pipe', 'pipe', 'pipe'] });
  return { root, fhir: `${root}/fhir`, shots, cli };
}

export function base32Decode(text) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = '';
  for (const c of text.replace(/\s+/g, '')) bits += alphabet.indexOf(c).toString(2).padStart(5, '0');
  const bytes = [];
  for (let i = 0; i + 8 <= bits.length; i += 8) bytes.push(parseInt(bits.slice(i, i + 8), 2));
  return Buffer.from(bytes);
}
// RFC 6238 (SHA-1, 6 digits, 30 s), at time `t` seconds
export function totp(secret, t) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(t / 30)));
  const h = createHmac('sha1', secret).update(counter).digest();
  const o = h[h.length - 1] & 15;
  return String((h.readUInt32BE(o) & 0x7fffffff) % 1_000_000).padStart(6, '0');
}
