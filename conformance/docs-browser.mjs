// Loads /docs in headless Chromium (Debian's `chromium`, driven by playwright-core) and checks
// that Swagger UI renders the Patient operations from /openapi.json, with every request the page
// makes going to the server itself (no CDN: it must work offline).
//
//   node conformance/docs-browser.mjs http://127.0.0.1:8080
//
// Exits non-zero, with the reason, when the page does not render them.
import { chromium } from 'playwright-core';

const base = (process.argv[2] || 'http://127.0.0.1:8080').replace(/\/$/, '');
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const browser = await chromium.launch({ executablePath, args: ['--no-sandbox', '--disable-gpu'] });
const external = [];
const failed = [];
try {
  const page = await browser.newPage();
  page.on('request', (r) => {
    if (!r.url().startsWith(base) && !r.url().startsWith('data:')) external.push(r.url());
  });
  page.on('requestfailed', (r) => failed.push(r.url()));
  page.on('pageerror', (e) => failed.push(`page error: ${e.message}`));
  await page.goto(`${base}/docs/`, { waitUntil: 'load' });
  // the tag of the Patient operations, then its operations (read, search, create …)
  await page.waitForSelector('#operations-tag-Patient', { timeout: 180_000 });
  const read = page.locator('#operations-Patient-read-Patient');
  await read.waitFor({ timeout: 60_000 });
  const count = await page.locator('[id^="operations-Patient-"]').count();
  const path = await read.locator('.opblock-summary-path').innerText();
  if (count < 8) throw new Error(`only ${count} Patient operations rendered`);
  if (!path.includes('/fhir/Patient/')) throw new Error(`unexpected path for read: ${path}`);
  if (external.length) throw new Error(`requests outside the server: ${external.join(', ')}`);
  if (failed.length) throw new Error(`failed requests: ${failed.join(', ')}`);
  console.log(`docs-browser: ${count} Patient operations rendered (read at ${path.trim()}), nothing fetched elsewhere`);
} catch (e) {
  console.error(`docs-browser: FAILED: ${e.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
