// A standalone SMART launch through the built-in authorization server's pages in headless
// Chromium (Debian's `chromium`, driven by playwright-core), with JavaScript turned off: the
// pages must work without any script. The login form is filled with the keyboard alone; every
// visible field must be reachable by its label. A screenshot of each page is saved.
//
//   node conformance/auth-browser.mjs BINARY DATA_DIR http://127.0.0.1:PORT [SCREENSHOT_DIR]
//
// It registers a client and a user with `fhirvault admin`, creates a patient with a token from
// `fhirvault token`, then: login (keyboard) → TOTP enrolment (the code computed from the key the
// page shows) → consent with the patient picker (a name search) → the app's redirect with a code
// → the code exchanged with its PKCE verifier → the patient read with the access token; then a
// second sign-in that asks for the TOTP code. Exits non-zero with the reason on any failure.
import { chromium } from 'playwright-core';
import { createHash, randomBytes } from 'node:crypto';
import { base32Decode, setup, totp } from './browser-support.mjs';
import { createServer } from 'node:http';

const { root, fhir, shots, cli } = setup(process.argv);

const b64url = (buf) => buf.toString('base64').replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
// the app's redirect URI: a loopback listener that records the callback
const callbacks = [];
const app = createServer((req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (url.pathname === '/callback') callbacks.push(url); // not the browser's favicon request
  res.writeHead(200, { 'content-type': 'text/plain' }).end('app callback received');
});
await new Promise((r) => app.listen(0, '127.0.0.1', r));
const redirect = `http://127.0.0.1:${app.address().port}/callback`;

const suffix = randomBytes(3).toString('hex');
const clientId = `browser-app-${suffix}`;
const username = `browser-user-${suffix}`;
const password = `browser password ${randomBytes(6).toString('hex')}`;
const family = `Browserpatient${suffix}`;
const scope = 'launch/patient openid fhirUser patient/*.rs user/Patient.rs';

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  cli(['admin', 'client', 'add', clientId, '--name', 'Browser test app', '--redirect-uri', redirect, '--scope', scope]);
  cli(['admin', 'user', 'add', username, '--fhir-user', 'Practitioner/browser-1', '--password-stdin'], `${password}\n`);
  const admin = cli(['token', '--scope', 'system/*.cruds']).trim();
  const created = await fetch(`${fhir}/Patient`, {
    method: 'POST',
    headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/fhir+json' },
    body: JSON.stringify({ resourceType: 'Patient', name: [{ family, given: ['Grace'] }], birthDate: '1970-01-01' }),
  });
  const patientId = (await created.json()).id;
  if (!patientId) throw new Error(`creating the patient: ${created.status}`);

  const verifier = b64url(randomBytes(48));
  const challenge = b64url(createHash('sha256').update(verifier).digest());
  const authorize = new URL(`${root}/auth/authorize`);
  for (const [k, v] of Object.entries({
    response_type: 'code', client_id: clientId, redirect_uri: redirect, scope, state: 'browser-state',
    aud: fhir, code_challenge: challenge, code_challenge_method: 'S256',
  })) authorize.searchParams.set(k, v);

  const context = await browser.newContext({ javaScriptEnabled: false });
  const page = await context.newPage();
  const elsewhere = [];
  page.on('request', (r) => {
    if (!r.url().startsWith(root) && !r.url().startsWith(redirect)) elsewhere.push(r.url());
  });

  // 1. sign-in, with the keyboard only: the username field has focus, Tab to the password
  await page.goto(authorize.href);
  await page.getByLabel('Username').waitFor();
  await page.getByLabel('Password').waitFor();
  await page.screenshot({ path: `${shots}/1-login.png`, fullPage: true });
  await page.keyboard.type(username);
  await page.keyboard.press('Tab');
  await page.keyboard.type(password);
  await page.keyboard.press('Enter');

  // 2. TOTP enrolment: the key the page shows, then a code from it
  const key = page.locator('code.secret');
  await key.waitFor();
  await page.screenshot({ path: `${shots}/2-mfa-enrolment.png`, fullPage: true });
  const secret = base32Decode(await key.innerText());
  await page.getByLabel('Code from the app').fill(totp(secret, Date.now() / 1000));
  await page.getByRole('button', { name: 'Confirm' }).click();

  // 3. consent with the patient picker: search by name, choose, allow
  await page.getByRole('heading', { name: 'Allow access?' }).waitFor();
  await page.getByLabel('Find a patient by name').fill(family);
  await page.getByRole('button', { name: 'Search' }).click();
  const choice = page.getByLabel(new RegExp(`Grace ${family}`));
  await choice.waitFor();
  await page.screenshot({ path: `${shots}/3-consent-patient-picker.png`, fullPage: true });
  await choice.check();
  await page.getByRole('button', { name: 'Allow' }).click();
  await page.waitForURL((u) => u.href.startsWith(redirect));

  // 4. the app's side: the code for tokens, the patient read
  const cb = callbacks.at(-1);
  if (cb.searchParams.get('state') !== 'browser-state') throw new Error('the state did not come back');
  const tokenResp = await fetch(`${root}/auth/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({
      grant_type: 'authorization_code', code: cb.searchParams.get('code'), redirect_uri: redirect,
      client_id: clientId, code_verifier: verifier,
    }),
  });
  const tokens = await tokenResp.json();
  if (tokenResp.status !== 200) throw new Error(`token exchange: ${tokenResp.status} ${JSON.stringify(tokens)}`);
  if (tokens.patient !== patientId) throw new Error(`launch patient ${tokens.patient}, expected ${patientId}`);
  const read = await fetch(`${fhir}/Patient/${patientId}`, { headers: { authorization: `Bearer ${tokens.access_token}` } });
  if (read.status !== 200) throw new Error(`reading the patient: ${read.status}`);

  // 5. a second sign-in asks for the code (the next step's: a code is accepted once)
  const second = await browser.newContext({ javaScriptEnabled: false });
  const page2 = await second.newPage();
  await page2.goto(authorize.href);
  await page2.getByLabel('Username').fill(username);
  await page2.getByLabel('Password').fill(password);
  await page2.getByRole('button', { name: 'Sign in' }).click();
  await page2.getByLabel('Code').waitFor();
  await page2.screenshot({ path: `${shots}/4-mfa-code.png`, fullPage: true });
  await page2.getByLabel('Code').fill(totp(secret, Date.now() / 1000 + 30));
  await page2.keyboard.press('Enter');
  await page2.getByRole('heading', { name: 'Allow access?' }).waitFor();
  await page2.getByRole('button', { name: 'Deny' }).click();
  await page2.waitForURL((u) => u.href.startsWith(redirect));
  if (callbacks.at(-1).searchParams.get('error') !== 'access_denied') throw new Error('deny did not answer access_denied');

  if (elsewhere.length) throw new Error(`requests outside the server and the app: ${elsewhere.join(', ')}`);
  console.log(`auth-browser: standalone launch completed in Chromium without JavaScript (patient ${patientId}); screenshots in ${shots}`);
} catch (e) {
  console.error(`auth-browser: FAILED: ${e.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  app.close();
}
