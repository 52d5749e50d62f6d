// The compliance console (/console) in headless Chromium (Debian's `chromium`, driven by
// playwright-core), with JavaScript turned off: every page and action must work without script.
// A screenshot of each page is saved.
//
//   node conformance/console-browser.mjs BINARY DATA_DIR http://127.0.0.1:PORT [SCREENSHOT_DIR]
//
// It adds an auditor, an admin, a user with neither role and a client with `fhirvault admin`,
// creates a patient, and issues a break-glass token with `fhirvault token` whose one request
// reads the patient. Then: the auditor signs in with the keyboard and enrols TOTP (the code
// computed from the key the page shows), searches the audit log by patient and type, marks the
// break-glass use reviewed, is refused the admin page, and downloads the compliance report (JSON,
// checked: the use's reason and its review are in it); the admin signs in and disables the
// client; the user without a role gets 403 pages. Exits non-zero with the reason on any failure.
import { chromium } from 'playwright-core';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { base32Decode, setup, totp } from './browser-support.mjs';

const { root, fhir, shots, cli } = setup(process.argv);

const suffix = randomBytes(3).toString('hex');
const password = `console password ${randomBytes(6).toString('hex')}`;
const auditor = `auditor-${suffix}`;
const admin = `admin-${suffix}`;
const clerk = `clerk-${suffix}`;
const clientId = `console-app-${suffix}`;
const reason = `mass casualty incident ${suffix}`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});

// Signs in to the console with the keyboard alone and enrols a second factor; the page is on
// whatever the console answers next.
async function signIn(username) {
  const context = await browser.newContext({ javaScriptEnabled: false, acceptDownloads: true });
  const page = await context.newPage();
  const elsewhere = [];
  page.on('request', (r) => {
    if (!r.url().startsWith(root)) elsewhere.push(r.url());
  });
  await page.goto(`${root}/console`);
  await page.getByLabel('Username').waitFor();
  if (username === auditor) await page.screenshot({ path: `${shots}/5-console-sign-in.png`, fullPage: true });
  await page.keyboard.type(username);
  await page.keyboard.press('Tab');
  await page.keyboard.type(password);
  await page.keyboard.press('Enter');
  const key = page.locator('code.secret');
  await key.waitFor();
  const secret = base32Decode(await key.innerText());
  await page.getByLabel('Code from the app').fill(totp(secret, Date.now() / 1000));
  await page.keyboard.press('Enter');
  await page.waitForLoadState();
  return { page, elsewhere };
}

async function expectText(page, text) {
  const body = await page.locator('body').innerText();
  if (!body.includes(text)) throw new Error(`${page.url()}: "${text}" not on the page`);
}

try {
  cli(['admin', 'user', 'add', auditor, '--role', 'auditor', '--password-stdin'], `${password}\n`);
  cli(['admin', 'user', 'add', admin, '--role', 'admin', '--password-stdin'], `${password}\n`);
  cli(['admin', 'user', 'add', clerk, '--password-stdin'], `${password}\n`);
  cli(['admin', 'client', 'add', clientId, '--name', 'Console test app', '--redirect-uri', 'http://127.0.0.1:9/cb',
    '--scope', 'patient/*.rs']);
  const system = cli(['token', '--scope', 'system/*.cruds']).trim();
  const created = await fetch(`${fhir}/Patient`, {
    method: 'POST',
    headers: { authorization: `Bearer ${system}`, 'content-type': 'application/fhir+json' },
    body: JSON.stringify({ resourceType: 'Patient', name: [{ family: `Console${suffix}` }] }),
  });
  const patientId = (await created.json()).id;
  if (!patientId) throw new Error(`creating the patient: ${created.status}`);
  const btg = cli(['token', '--scope', 'user/*.rs', '--user', 'Practitioner/er-doc', '--purpose-of-use', 'BTG',
    '--reason', reason]).trim();
  const read = await fetch(`${fhir}/Patient/${patientId}`, { headers: { authorization: `Bearer ${btg}` } });
  if (read.status !== 200) throw new Error(`the break-glass read: ${read.status}`);

  // the auditor: overview, a filtered audit search, the break-glass review, the report
  const { page, elsewhere } = await signIn(auditor);
  await page.getByRole('heading', { name: 'Overview' }).waitFor();
  await expectText(page, 'not yet reviewed');
  await page.screenshot({ path: `${shots}/6-console-overview.png`, fullPage: true });
  await page.getByRole('navigation').getByRole('link', { name: 'Audit log', exact: true }).click();
  await page.getByLabel('Patient', { exact: true }).fill(patientId);
  await page.getByLabel('Type', { exact: true }).selectOption('rest');
  await page.getByLabel('Patient', { exact: true }).press('Enter');
  await page.getByRole('table', { name: 'Audit events' }).waitFor();
  await expectText(page, `Patient/${patientId}`);
  await expectText(page, 'Practitioner/er-doc');
  await page.screenshot({ path: `${shots}/7-console-audit-log.png`, fullPage: true });

  await page.getByRole('navigation').getByRole('link', { name: 'Break-glass uses', exact: true }).click();
  await expectText(page, reason);
  await page.screenshot({ path: `${shots}/8-console-break-glass.png`, fullPage: true });
  await page.getByRole('button', { name: 'Mark reviewed' }).first().click();
  await page.getByRole('status').first().waitFor();
  await expectText(page, `Reviewed by ${auditor}`);

  const refused = await page.goto(`${root}/console/accounts`);
  if (refused.status() !== 403) throw new Error(`an auditor reached the admin page: ${refused.status()}`);

  await page.goto(`${root}/console/report`);
  await page.getByRole('heading', { name: 'Compliance report' }).waitFor();
  await page.screenshot({ path: `${shots}/9-console-report.png`, fullPage: true });
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.getByRole('link', { name: 'Download as JSON' }).click(),
  ]);
  const report = JSON.parse(readFileSync(await download.path(), 'utf8'));
  const emergency = report.sections.find((s) => s.citation === '164.312(a)(2)(ii)');
  const use = emergency?.checks?.[1]?.evidence?.uses?.find((u) => u.reason === reason);
  if (!use) throw new Error('the downloaded report does not list the break-glass use with its reason');
  if (use.reviewed_by !== auditor) throw new Error(`the report shows reviewed_by ${use.reviewed_by}`);
  if (elsewhere.length) throw new Error(`requests outside the server: ${elsewhere.join(', ')}`);

  // the admin disables the client
  const adm = await signIn(admin);
  await adm.page.getByRole('navigation').getByRole('link', { name: 'Users and clients', exact: true }).click();
  await adm.page.getByRole('table', { name: 'Clients' }).waitFor();
  await adm.page.getByRole('button', { name: `Disable ${clientId}` }).click();
  await adm.page.getByRole('status').first().waitFor();
  await expectText(adm.page, 'The client is disabled');
  const row = adm.page.getByRole('row', { name: new RegExp(clientId) });
  if (!(await row.innerText()).includes('disabled')) throw new Error('the client is not shown disabled');
  await adm.page.screenshot({ path: `${shots}/10-console-accounts.png`, fullPage: true });
  const listed = cli(['admin', 'client', 'list']);
  if (!listed.split('\n').some((l) => l.includes(clientId) && l.includes('disabled'))) {
    throw new Error('the client is not disabled in the database');
  }

  // a user with neither role
  const plain = await signIn(clerk);
  await plain.page.getByRole('heading', { name: 'Not allowed' }).waitFor();
  await plain.page.screenshot({ path: `${shots}/11-console-forbidden.png`, fullPage: true });
  const audit = await plain.page.goto(`${root}/console/audit`);
  if (audit.status() !== 403) throw new Error(`a user without a role reached the audit log: ${audit.status()}`);

  console.log(`console-browser: sign-in with TOTP, audit search, break-glass review, report download, client disabled and 403s, in Chromium without JavaScript; screenshots in ${shots}`);
} catch (e) {
  console.error(`console-browser: FAILED: ${e.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
