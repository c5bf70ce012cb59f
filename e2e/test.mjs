// End-to-end test of the credit-ledger web pages in headless Chromium.
//
// Drives Debian's /usr/bin/chromium with playwright-core (no downloaded browser) against a
// running `credit-ledger serve` in demo mode: sign in, recharge through the modal, generate
// a video, generate a failing one and see it refunded, read the history, the balance chart
// and the auditor's view. Screenshots of each page go to target/e2e/.
//
// Environment:
//   BASE_URL        the service, e.g. http://127.0.0.1:18080 (required)
//   ADMIN_TOKEN     the service's admin token (default e2e-admin-token)
//   SCREENSHOT_DIR  where to write PNGs (default <repo>/target/e2e)
//   CHROMIUM        the browser (default /usr/bin/chromium)
//
// Prints one line per step and ends with `N passed, N failed`; exits non-zero on failure.
import { chromium } from 'playwright-core';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const BASE_URL = (process.env.BASE_URL || '').replace(/\/$/, '');
const ADMIN_TOKEN = process.env.ADMIN_TOKEN || 'e2e-admin-token';
const SHOTS = process.env.SCREENSHOT_DIR || path.resolve(here, '..', 'target', 'e2e');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const STEP_WAIT_MS = 30_000;

if (!BASE_URL) {
  console.error('BASE_URL is not set (run e2e/run.sh, which starts the service and sets it)');
  process.exit(2);
}
if (!fs.existsSync(CHROMIUM)) {
  console.error(`no browser at ${CHROMIUM}: install Debian's chromium (apt-get install -y chromium)`);
  process.exit(2);
}
fs.mkdirSync(SHOTS, { recursive: true });

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `probe` until `check` holds; fails with what was last seen after `timeout`. */
async function until(what, probe, check, timeout = STEP_WAIT_MS) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await probe();
    } catch (e) {
      last = `<${e.message.split('\n')[0]}>`;
    }
    let ok = false;
    try { ok = check(last); } catch (_) { ok = false; }
    if (ok) return last;
    if (Date.now() > deadline) {
      throw new Error(`${what}: still ${JSON.stringify(last)} after ${Math.round(timeout / 1000)} s`);
    }
    await sleep(250);
  }
}

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'credit-ledger-e2e-chromium-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM,
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--disable-dev-shm-usage',
  ],
  viewport: { width: 1280, height: 900 },
  locale: 'zh-CN',
});
context.setDefaultTimeout(STEP_WAIT_MS);
const page = context.pages()[0] || (await context.newPage());
const pageErrors = [];
page.on('pageerror', (e) => pageErrors.push(String(e && e.stack ? e.stack : e)));
page.on('console', (m) => {
  if (m.type() === 'error' && !/Failed to load resource|MEDIA_ERR|video/i.test(m.text())) {
    console.log(`  [browser console] ${m.text()}`);
  }
});

const userId = crypto.randomUUID();
let shotNo = 0;
async function shot(name) {
  shotNo += 1;
  const file = path.join(SHOTS, `${String(shotNo).padStart(2, '0')}-${name}.png`);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

// ---- page probes (they never wait: `until` does the waiting) -----------------------------
const attr = (sel, name) => page.evaluate(([s, n]) => {
  const node = document.querySelector(s);
  return node ? node.getAttribute(n) : null;
}, [sel, name]);
const textOf = (sel) => page.evaluate((s) => {
  const node = document.querySelector(s);
  return node ? node.innerText : null;
}, sel);
const navCredits = () => attr('#balance-value', 'data-credits');
async function expectBalance(credits, why) {
  await until(`nav bar balance should be ${credits} (${why})`, navCredits, (v) => v === String(credits));
  const text = (await page.locator('#nav-balance').innerText()).replace(/[,\s]/g, '');
  assert(text.includes(String(credits)), `nav bar shows "${text}", expected it to show ${credits}`);
}
const visible = (sel) => page.locator(sel).first().isVisible();
async function expectVisible(sel, what) {
  await until(`${what} (${sel}) should be visible`, () => visible(sel), (v) => v === true);
}
async function go(navId, viewSel) {
  await page.click(navId);
  await expectVisible(viewSel, `view after clicking ${navId}`);
}
async function taskByPrompt(text) {
  return page.evaluate((needle) => {
    const item = Array.from(document.querySelectorAll('[data-testid="task-item"]'))
      .find((li) => (li.querySelector('[data-testid="task-prompt"]') || {}).textContent === needle);
    if (!item) return null;
    const mark = item.querySelector('[data-testid="task-refunded"]');
    return {
      status: item.getAttribute('data-status'),
      refunded: item.getAttribute('data-refunded'),
      refundedMarkVisible: !!mark && mark.offsetParent !== null && mark.textContent.trim() !== '',
      hasVideo: !!item.querySelector('video[data-testid="task-video"]'),
    };
  }, text);
}
const auditBalances = () => page.$$eval('[data-testid="audit-event-row"]',
  (rows) => rows.map((r) => r.getAttribute('data-balance-after')).filter((b) => b !== ''));

// ---- steps ------------------------------------------------------------------------------
const PROMPT_OK = `一只柯基在海边奔跑，日落，电影感 ${userId.slice(0, 8)}`;
const PROMPT_FAIL = `这个视频会失败 [fail] ${userId.slice(0, 8)}`;

const steps = [
  ['sign in as a fresh user (demo sign-in box)', async () => {
    await page.goto(`${BASE_URL}/`, { waitUntil: 'load' });
    await expectVisible('#view-signin', 'sign-in page');
    await expectVisible('#dev-signin', 'demo "sign in as" box (POST /api/dev/token must exist in demo mode)');
    await page.fill('#signin-user-id', userId);
    await shot('signin');
    await page.click('#signin-submit');
    await expectVisible('#view-home', 'home page after sign-in');
    await expectBalance(0, 'a new account opens with 0 credits');
    await until('price card: credits per video', () => textOf('#price-video-cost'), (v) => v.trim() === '10');
    await until('price card: credits per yuan', () => textOf('#price-rate'), (v) => v.trim() === '100');
    await shot('home');
  }],

  ['recharge 50 yuan through the modal → 5000 credits in the nav bar', async () => {
    await page.click('#btn-recharge');
    await expectVisible('#recharge-modal', 'recharge modal');
    await page.fill('#custom-amount', '12.345');
    await expectVisible('#recharge-error', 'validation message for 3 decimals');
    await page.fill('#custom-amount', '0');
    await expectVisible('#recharge-error', 'validation message for 0');
    await page.fill('#custom-amount', '3.5');
    await until('credits shown while typing 3.5 yuan', () => attr('#recharge-credits-preview', 'data-credits'), (v) => v === '350');
    await page.click('#quick-amount-50');
    await until('custom amount after clicking 50', () => page.inputValue('#custom-amount'), (v) => v === '50');
    await until('credits shown for 50 yuan', () => attr('#recharge-credits-preview', 'data-credits'), (v) => v === '5000');
    assert(!(await visible('#recharge-error')), `validation message shown for 50: ${await page.innerText('#recharge-error')}`);
    await shot('recharge-modal');
    await page.click('#pay-button');
    await until('recharge modal closes after paying (demo recharge completes at once)',
      async () => ((await visible('#recharge-modal')) ? `open: ${await textOf('#recharge-error')}` : 'closed'),
      (v) => v === 'closed');
    await expectBalance(5000, 'after recharging 50 yuan');
    await shot('balance-5000');
  }],

  ['generate a video → 4990 and the task succeeds', async () => {
    await go('#nav-video', '#view-video');
    await until('cost shown before submitting', () => textOf('#video-cost'), (v) => /10/.test(v));
    await page.fill('#video-prompt', PROMPT_OK);
    await page.selectOption('#video-aspect', '16:9');
    await page.selectOption('#video-duration', '15');
    await page.click('#generate-button');
    await expectBalance(4990, 'after one video');
    await until('the new task is listed', () => taskByPrompt(PROMPT_OK), (v) => v !== null);
    await shot('video-processing');
    const t = await until('the first video task succeeds (the demo provider calls back)',
      () => taskByPrompt(PROMPT_OK), (v) => v && (v.status === 'succeeded' || v.status === 'failed'));
    assert(t.status === 'succeeded', `the first video task ended ${t.status}, expected succeeded`);
    assert(t.hasVideo, 'the succeeded task shows no <video> element');
    assert(t.refunded === 'false', 'the succeeded task is marked refunded');
  }],

  ['generate a "[fail]" video → marked refunded and the balance back at 4990', async () => {
    await page.fill('#video-prompt', PROMPT_FAIL);
    await page.click('#generate-button');
    await until('the [fail] task is listed', () => taskByPrompt(PROMPT_FAIL), (v) => v !== null);
    const t = await until('the [fail] task is marked refunded',
      () => taskByPrompt(PROMPT_FAIL), (v) => v && v.refunded === 'true' && v.refundedMarkVisible);
    assert(t.status === 'failed', `the [fail] task has status ${t.status}, expected failed`);
    await expectBalance(4990, 'after the failed video was refunded');
    await shot('video-refunded');
  }],

  ['history shows the recharge and the consumption records', async () => {
    await go('#nav-history', '#view-history');
    await page.click('#history-tab-recharge');
    const recharge = await until('a recharge record',
      () => page.$$eval('[data-testid="history-row"][data-kind="recharge"]', (rs) => rs.map((r) => ({ status: r.getAttribute('data-status'), text: r.innerText }))),
      (rs) => Array.isArray(rs) && rs.length >= 1);
    assert(recharge.length === 1, `expected 1 recharge record, found ${recharge.length}`);
    assert(recharge[0].status === 'completed', `recharge record status is ${recharge[0].status}, expected completed`);
    assert(/50\.00/.test(recharge[0].text) && /5,?000/.test(recharge[0].text), `recharge record does not show ¥50.00 / 5000: ${recharge[0].text}`);
    await shot('history-recharge');
    await page.click('#history-tab-consumption');
    await until('consumption records',
      () => page.$$eval('[data-testid="history-row"][data-kind="consumption"]', (rs) => rs.length),
      (n) => n >= 1);
    await shot('history-consumption');
  }],

  ['balance chart is drawn from the events', async () => {
    await go('#nav-chart', '#view-chart');
    await until('balance chart points (GET /api/account/events)',
      () => attr('[data-testid="balance-chart-svg"]', 'data-points'), (v) => Number(v) >= 3);
    assert(await visible('[data-testid="balance-line"]'), 'the chart has no line');
    await shot('balance-chart');
    await page.click('#chart-mode-event');
    await until('chart by event order', () => attr('#chart-mode-event', 'aria-pressed'), (v) => v === 'true');
    await until('balance chart points by event', () => attr('[data-testid="balance-chart-svg"]', 'data-points'), (v) => Number(v) >= 3);
    await shot('balance-chart-by-event');
  }],

  ["auditor's view: the account's events with balances", async () => {
    await go('#nav-audit', '#view-audit');
    await page.fill('#admin-token', ADMIN_TOKEN);
    await page.click('#admin-token-save');
    await page.fill('#audit-user-id', userId);
    await page.click('#audit-load-events');
    const balances = await until('event rows with balances 5000 and 4990',
      async () => ((await visible('#audit-error')) ? `error: ${await textOf('#audit-error')}` : auditBalances()),
      (b) => Array.isArray(b) && b.includes('5000') && b.includes('4990') && b.length >= 4);
    assert(balances[0] === '4990', `the newest event's balance is ${balances[0]}, expected 4990`);
    const rows = await page.locator('[data-testid="audit-event-row"]').count();
    console.log(`  ${rows} events, balances newest first: ${balances.join(', ')}`);
    await shot('audit-events');
  }],

  ["auditor's view: balance now, then an adjustment with a reason", async () => {
    const latest = Number((await auditBalances())[0]);
    await page.click('#audit-balance-submit');
    await until(`balance at now (the newest event says ${latest})`, () => attr('#audit-balance-result', 'data-credits'), (v) => v === String(latest));
    await page.fill('#audit-adjust-credits', '25');
    await page.fill('#audit-adjust-reason', 'e2e: 客服补偿');
    await page.click('#audit-adjust-submit');
    await until('adjustment result', async () => {
      const cls = await attr('#audit-adjust-result', 'class');
      const text = (await textOf('#audit-adjust-result')) || '';
      return `${cls}|${text}`;
    }, (v) => v.startsWith('result success'));
    await until(`newest event balance after +25 to ${latest}`, async () => (await auditBalances())[0], (v) => v === String(latest + 25));
    await expectBalance(latest + 25, 'after the +25 adjustment');
  }],

  ["auditor's view: the audit report is ok", async () => {
    await page.click('#audit-run');
    const ok = await until('audit report',
      async () => ((await visible('#audit-error')) ? `error: ${await textOf('#audit-error')}` : attr('#audit-ok-badge', 'data-ok')),
      (v) => v === 'true' || v === 'false');
    const text = await page.innerText('#audit-report');
    assert(ok === 'true', `the audit report is not ok:\n${text}`);
    await shot('audit-report');
  }],

  ['insufficient credits: friendly message with a recharge button', async () => {
    const current = Number((await auditBalances())[0]);
    assert(current > 0, `the account's newest balance is ${current}; expected credits left to take away`);
    await page.fill('#audit-adjust-credits', String(-current));
    await page.fill('#audit-adjust-reason', 'e2e: 清空余额以测试积分不足');
    await page.click('#audit-adjust-submit');
    await until(`newest event balance after -${current}`, async () => (await auditBalances())[0], (v) => v === '0');
    await go('#nav-video', '#view-video');
    await page.fill('#video-prompt', 'no credits left');
    await page.click('#generate-button');
    await expectVisible('#insufficient-credits', 'insufficient credits message (402)');
    const text = await page.innerText('#insufficient-text');
    assert(/10/.test(text), `the message does not say how many credits are needed: ${text}`);
    await expectBalance(0, 'after a refused generate');
    await shot('insufficient-credits');
    await page.click('#insufficient-recharge');
    await expectVisible('#recharge-modal', 'recharge modal from the insufficient-credits message');
    await page.click('#recharge-close');
  }],

  ['recharge return pages say what happened', async () => {
    await page.goto(`${BASE_URL}/?recharge=cancel`, { waitUntil: 'load' });
    await until('cancel banner', () => attr('#recharge-result', 'data-status'), (v) => v === 'cancel');
    await expectVisible('#recharge-result', 'cancel banner');
    await shot('return-cancel');
    await page.goto(`${BASE_URL}/?recharge=success`, { waitUntil: 'load' });
    await until('success banner', () => attr('#recharge-result', 'data-status'), (v) => v === 'success');
    await expectVisible('#recharge-result', 'success banner');
    await until('nav bar balance after coming back from checkout', navCredits, (v) => /^-?\d+$/.test(v || ''));
  }],

  ['English switch and phone width', async () => {
    await page.click('#lang-toggle');
    await until('recharge button in English', () => textOf('#btn-recharge'), (v) => v.trim() === 'Recharge');
    await page.setViewportSize({ width: 375, height: 812 });
    const pages = [['#nav-home', '#view-home', 'home'], ['#nav-video', '#view-video', 'video'], ['#nav-history', '#view-history', 'history'],
      ['#nav-chart', '#view-chart', 'chart'], ['#nav-audit', '#view-audit', 'audit']];
    for (const lang of ['en', 'zh']) {
      for (const [nav, view, name] of pages) {
        await go(nav, view);
        await sleep(200);
        const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
        assert(overflow <= 1, `${name} (${lang}): the page is ${overflow}px wider than a 375px screen`);
        assert(await visible('#nav-balance') && await visible('#btn-recharge'), `${name} (${lang}): balance or recharge button hidden at phone width`);
        if (lang === 'zh' && name !== 'home') await shot(`phone-${name}`);
      }
      if (lang === 'en') {
        await page.click('#lang-toggle');
        await until('recharge button back in Chinese', () => textOf('#btn-recharge'), (v) => v.trim() === '充值');
      }
    }
    await page.click('#btn-recharge');
    await expectVisible('#recharge-modal', 'recharge modal at phone width');
    await shot('phone-recharge-modal');
    await page.click('#recharge-close');
    await page.setViewportSize({ width: 1280, height: 900 });
  }],

  ['no JavaScript errors on the page', async () => {
    assert(pageErrors.length === 0, `uncaught errors in the page:\n${pageErrors.join('\n')}`);
  }],
];

let passed = 0;
let failed = 0;
let skipped = 0;
for (const [i, [name, run]] of steps.entries()) {
  if (i > 0 && passed === 0) {
    // Nothing can work without signing in.
    skipped += 1;
    console.log(`SKIP ${name}`);
    continue;
  }
  const started = Date.now();
  try {
    await run();
    passed += 1;
    console.log(`ok   ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${name}\n     ${String(e.message).split('\n').join('\n     ')}`);
    try {
      const file = await shot(`FAILED-${name.replace(/[^a-z0-9]+/gi, '-').replace(/^-|-$/g, '').slice(0, 40)}`);
      console.log(`     screenshot: ${file}`);
    } catch (_) { /* the page may be gone */ }
  }
}

await context.close();
fs.rmSync(userDataDir, { recursive: true, force: true });
console.log(`screenshots in ${SHOTS}`);
console.log(`${passed} passed, ${failed + skipped} failed`);
process.exit(failed + skipped === 0 ? 0 : 1);
