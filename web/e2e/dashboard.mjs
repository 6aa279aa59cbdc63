// End-to-end test of the tunmeter dashboard in real headless Chromium (Debian's), driven by
// Playwright, against a real daemon with real traffic. Run by userspace/tests/dashboard.rs.
//
// Inputs (environment):
//   TUNMETER_URL             base URL of the daemon's API, e.g. http://127.0.0.1:9107
//   TUNMETER_ADMIN_TOKEN     an admin token
//   TUNMETER_READ_TOKEN      a read token
//   TUNMETER_SCREENSHOT      where to save the full-page PNG of the dashboard
//   TUNMETER_EXPECT_CLIENTS  comma-separated client IPs that carry traffic
//   TUNMETER_DEVICE_CLIENT   optional, the client made a device through the form (default: the 2nd)
//   TUNMETER_SESSION_CLIENT  optional, the client given a session through the API (default: the 3rd)
//   TUNMETER_CHROMIUM        optional, default /usr/bin/chromium
//   TUNMETER_E2E_TIMEOUT_MS  optional overall limit, default 110000
//
// Exit status 0 and a one-line JSON summary on stdout on success; 1 and the failed step on stderr
// otherwise (a screenshot of the failure is saved next to TUNMETER_SCREENSHOT as *-failure.png).

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';

const t0 = Date.now();
const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined || v === '') die(`missing environment variable ${name}`);
  return v;
};
function die(msg) {
  process.stderr.write(`dashboard e2e: FAILED: ${msg}\n`);
  process.exit(1);
}

const BASE = env('TUNMETER_URL').replace(/\/+$/, '');
const ADMIN = env('TUNMETER_ADMIN_TOKEN');
const READ = env('TUNMETER_READ_TOKEN');
const SHOT = env('TUNMETER_SCREENSHOT');
const EXPECT = env('TUNMETER_EXPECT_CLIENTS')
  .split(',')
  .map((s) => s.trim())
  .filter(Boolean);
const CHROMIUM = env('TUNMETER_CHROMIUM', '/usr/bin/chromium');
const TOTAL_MS = Number(env('TUNMETER_E2E_TIMEOUT_MS', '110000'));
if (!EXPECT.length) die('TUNMETER_EXPECT_CLIENTS names no client');
const DEVICE_IP = env('TUNMETER_DEVICE_CLIENT', EXPECT[1] ?? EXPECT[0]);
const SESSION_IP = env('TUNMETER_SESSION_CLIENT', EXPECT[2] ?? EXPECT[0]);
const DEVICE_NAME = 'e2e-phone';
const SESSION_USER = 'carol';

let browser = null;
let page = null;
let current = 'start';
const pageErrors = [];
const summary = { ok: true, url: BASE, expected_clients: EXPECT.length, steps: [] };

function log(msg) {
  process.stderr.write(`dashboard e2e [${((Date.now() - t0) / 1000).toFixed(1)}s]: ${msg}\n`);
}

async function fail(msg) {
  let extra = '';
  try {
    if (page) {
      const st = await page.evaluate(() => {
        const s = document.getElementById('status');
        return s && !s.hidden ? s.textContent : '';
      });
      if (st) extra += `\n  status area: ${st}`;
      const failShot = SHOT.replace(/(\.png)?$/i, '-failure.png');
      await page.screenshot({ path: failShot, fullPage: true, timeout: 5000 });
      extra += `\n  failure screenshot: ${failShot}`;
    }
  } catch {
    // the page may be gone; the message below is what matters
  }
  if (pageErrors.length) extra += `\n  page errors: ${pageErrors.slice(0, 5).join(' | ')}`;
  process.stderr.write(`dashboard e2e: FAILED at step "${current}": ${msg}${extra}\n`);
  try {
    if (browser) await Promise.race([browser.close(), sleep(5000)]);
  } catch {
    // exiting anyway
  }
  process.exit(1);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Poll `fn` until it returns a truthy value; fail with `what` and the last value otherwise.
async function waitFor(what, fn, timeoutMs = 15000, everyMs = 200) {
  const until = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await fn();
    if (last && last.ok !== false) return last;
    if (Date.now() > until) throw new Error(`${what} (waited ${timeoutMs / 1000} s; last seen: ${JSON.stringify(last)})`);
    await sleep(everyMs);
  }
}

async function step(name, fn) {
  current = name;
  const s = Date.now();
  log(`step: ${name}`);
  try {
    const r = await fn();
    summary.steps.push({ step: name, ms: Date.now() - s });
    return r;
  } catch (e) {
    await fail(e && e.message ? e.message : String(e));
  }
}

function readRow(ip) {
  return page.evaluate((ip) => {
    const r = document.querySelector(`#viewport .row[data-ip="${CSS.escape(ip)}"]:not([hidden])`);
    if (!r) return null;
    const d = r.dataset;
    return {
      ip,
      upRate: Number(d.upRate),
      downRate: Number(d.downRate),
      upBytes: Number(d.upBytes),
      downBytes: Number(d.downBytes),
      online: d.online === 'true',
      username: d.username,
      device: d.device,
      sessionId: d.sessionId,
      cells: [...r.querySelectorAll('[role=cell]')].map((c) => c.textContent),
      frame: Number(document.getElementById('table').dataset.frameUnixMs || 0),
    };
  }, ip);
}

function renderedRows() {
  return page.evaluate(() =>
    [...document.querySelectorAll('#viewport .row:not([hidden])')]
      .map((r) => ({ top: parseFloat(r.style.top), ip: r.dataset.ip, downBytes: Number(r.dataset.downBytes) }))
      .sort((a, b) => a.top - b.top),
  );
}

async function statusArea() {
  return page.evaluate(() => {
    const s = document.getElementById('status');
    return { visible: !s.hidden, text: s.textContent, kind: s.dataset.kind, code: s.dataset.code, http: s.dataset.httpStatus };
  });
}

// The API from the script itself (Node's fetch, same namespace): what the daemon really holds.
async function apiCall(method, path, token, body) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(`${BASE}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    // reported by the caller with the status
  }
  return { status: r.status, body: json, text };
}

async function apiOk(method, path, token, body, want = 200) {
  const r = await apiCall(method, path, token, body);
  if (r.status !== want) throw new Error(`${method} ${path} returned ${r.status}, expected ${want}: ${r.text.slice(0, 300)}`);
  return r.body;
}

// A message next to a form: its text, kind and the HTTP status/code of an API error.
function formMsg(id) {
  return page.evaluate((id) => {
    const p = document.getElementById(id);
    return { visible: !p.hidden, text: p.textContent, kind: p.dataset.kind, code: p.dataset.code, http: p.dataset.httpStatus };
  }, id);
}

async function waitMsg(id, kind, what) {
  return waitFor(what, async () => {
    const m = await formMsg(id);
    return m.visible && m.kind === kind ? m : { ok: false, ...m };
  });
}

function listRows(body) {
  return page.evaluate((body) => [...document.querySelectorAll(`#${body} tr`)].map((r) => ({ ...r.dataset, text: r.textContent })), body);
}

async function login(token, role) {
  await page.waitForSelector('#login:not([hidden])', { timeout: 10000 });
  await page.fill('#token', token);
  await page.click('#login-submit');
  await page.waitForSelector(`body[data-role="${role}"] #dashboard:not([hidden])`, { timeout: 10000 }).catch(async () => {
    const st = await statusArea();
    throw new Error(`login as ${role} did not reach the dashboard (status area: ${JSON.stringify(st.text)})`);
  });
  const who = await page.textContent('#whoami');
  if (!who.includes(role)) throw new Error(`header shows ${JSON.stringify(who)}, expected the role ${role}`);
}

async function openDetail(ip) {
  const row = `#viewport .row[data-ip="${ip}"]:not([hidden])`;
  await page.click(row, { timeout: 5000 });
  await page.waitForSelector(`#detail[data-ip="${ip}"]:not([hidden])`, { timeout: 5000 }).catch(async () => {
    const shown = await page.getAttribute('#detail', 'data-ip');
    throw new Error(`clicking the row of ${ip} opened the detail panel of ${shown}`);
  });
}

const watchdog = setTimeout(() => {
  fail(`the whole run took longer than ${TOTAL_MS / 1000} s`);
}, TOTAL_MS);
watchdog.unref();

async function main() {
  await step('launch chromium', async () => {
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
      timeout: 30000,
    });
    summary.browser = browser.version();
    const ctx = await browser.newContext({ viewport: { width: 1480, height: 900 } });
    ctx.setDefaultTimeout(10000);
    page = await ctx.newPage();
    page.on('pageerror', (e) => pageErrors.push(`uncaught: ${e.message}`));
    // Everything comes from the daemon: no CDN, no fonts, nothing from the internet.
    page.on('request', (r) => {
      const u = r.url();
      if (!u.startsWith(`${BASE}/`) && !u.startsWith('data:')) pageErrors.push(`request to another origin: ${u}`);
    });
    page.on('websocket', (ws) => {
      if (new URL(ws.url()).host !== new URL(BASE).host) pageErrors.push(`WebSocket to another host: ${ws.url()}`);
    });
    page.on('console', (m) => {
      // A rejected WebSocket or 401/403 fetch logs a console error by design; only scripts
      // errors and CSP violations count.
      const t = m.text();
      if (m.type() === 'error' && /Content Security Policy|Uncaught|TypeError|ReferenceError|SyntaxError/.test(t))
        pageErrors.push(t);
    });
  });

  await step('open the dashboard (served by the daemon)', async () => {
    const res = await page.goto(`${BASE}/`, { waitUntil: 'load', timeout: 15000 });
    if (!res || res.status() !== 200) throw new Error(`GET / returned ${res && res.status()}`);
    const ct = res.headers()['content-type'] || '';
    if (!ct.startsWith('text/html')) throw new Error(`GET / has content type ${ct}`);
    await page.waitForSelector('#login:not([hidden]) #token', { timeout: 10000 });
  });

  await step('a bad token is refused with the server message', async () => {
    await page.fill('#token', 'tm_not_a_real_token');
    await page.click('#login-submit');
    const st = await waitFor('an error in the status area', async () => {
      const s = await statusArea();
      return s.visible && s.kind === 'error' ? s : { ok: false, ...s };
    });
    if (st.http !== '401') throw new Error(`expected HTTP 401 for a bad token, status area says ${JSON.stringify(st)}`);
    if (!(await page.isVisible('#login'))) throw new Error('the login form is gone after a bad token');
  });

  await step('log in with the read token', () => login(READ, 'read'));

  await step('the table shows the expected clients', async () => {
    for (const ip of EXPECT) {
      await waitFor(`row of client ${ip} in the table`, () => readRow(ip), 20000);
    }
    const live = await waitFor('stream connection marked live', () =>
      page.evaluate(() => document.getElementById('conn').dataset.state === 'live'),
    );
    summary.clients_in_table = Number(await page.getAttribute('#table', 'data-clients'));
    return live;
  });

  await step('the top bar shows the self-check', async () => {
    const sc = await waitFor('self-check reported ok', () =>
      page.evaluate(() => {
        const e = document.getElementById('selfcheck');
        return !e.hidden && e.dataset.state === 'ok' ? e.textContent : null;
      }),
      20000,
    );
    summary.self_check = sc;
    return sc;
  });

  const ip = EXPECT[0];
  await step('rates move and totals grow', async () => {
    const first = {};
    for (const c of EXPECT) first[c] = await readRow(c);
    const seenRate = new Set();
    const grew = new Set();
    const lastRows = {};
    await waitFor(
      'every expected client showing a rate > 0 and growing totals',
      async () => {
        for (const c of EXPECT) {
          const r = await readRow(c);
          if (!r) continue;
          lastRows[c] = r;
          if (r.upRate > 0 || r.downRate > 0) seenRate.add(c);
          if (r.upBytes + r.downBytes > first[c].upBytes + first[c].downBytes) grew.add(c);
        }
        const missing = EXPECT.filter((c) => !seenRate.has(c) || !grew.has(c));
        return missing.length ? { ok: false, missing, rate: [...seenRate], grew: [...grew] } : true;
      },
      30000,
      300,
    );
    const r = lastRows[ip];
    // Human-readable units in the cells, exact numbers in the data attributes.
    const [, , ipCell, upRate, downRate, upTot, downTot] = r.cells;
    if (ipCell !== ip) throw new Error(`IP cell shows ${ipCell}`);
    for (const [what, text] of [['upload rate', upRate], ['download rate', downRate]])
      if (!/^\d+(\.\d+)? (B|KiB|MiB|GiB|TiB)\/s$/.test(text)) throw new Error(`${what} cell ${JSON.stringify(text)}`);
    for (const [what, text] of [['upload total', upTot], ['download total', downTot]])
      if (!/^\d+(\.\d+)? (B|KiB|MiB|GiB|TiB)$/.test(text)) throw new Error(`${what} cell ${JSON.stringify(text)}`);
    summary.observed = { ip, first: pick(first[ip]), later: pick(r) };
  });

  await step('filter and sort', async () => {
    await page.fill('#filter', ip);
    await waitFor(`only rows matching ${ip}`, async () => {
      const rows = await renderedRows();
      return rows.length >= 1 && rows.every((r) => r.ip.includes(ip)) && rows.some((r) => r.ip === ip)
        ? true
        : { ok: false, rows: rows.map((r) => r.ip) };
    });
    await page.fill('#filter', '');
    await waitFor('all clients back after clearing the filter', async () => {
      const n = (await renderedRows()).length;
      return n >= EXPECT.length ? true : { ok: false, n };
    });
    const header = '#table [role=columnheader][data-key="down_bytes"]';
    for (const dir of ['descending', 'ascending']) {
      await page.click(`${header} button`);
      await waitFor(`sorted by download total, ${dir}`, async () => {
        const sort = await page.getAttribute(header, 'aria-sort');
        const v = (await renderedRows()).map((r) => r.downBytes);
        const sorted = v.every((x, i) => i === 0 || (dir === 'ascending' ? v[i - 1] <= x : v[i - 1] >= x));
        return sort === dir && sorted ? true : { ok: false, sort, v };
      });
    }
    await page.click('#table [role=columnheader][data-key="ip"] button');
  });

  await step('a read token cannot reset', async () => {
    await openDetail(ip);
    const btn = await page.$('#reset');
    const disabled = await btn.isDisabled();
    const hidden = !(await btn.isVisible());
    if (!disabled && !hidden) throw new Error('the reset button is enabled for a read token');
    // Forced attempt 1: the API itself, with the read token, from the page.
    const forced = await page.evaluate(
      async ([ip, token]) => {
        const r = await fetch(`/api/v1/clients/${ip}/reset`, { method: 'POST', headers: { Authorization: `Bearer ${token}` } });
        let body = null;
        try {
          body = await r.json();
        } catch {
          // reported below
        }
        return { status: r.status, body };
      },
      [ip, READ],
    );
    if (forced.status !== 403) throw new Error(`POST reset with the read token returned ${forced.status}, expected 403`);
    if (!forced.body || !forced.body.error || forced.body.error.code !== 'forbidden')
      throw new Error(`403 body is not {"error":{"code":"forbidden",...}}: ${JSON.stringify(forced.body)}`);
    // Forced attempt 2: re-enable the button as a tampered page would; the UI shows the server's 403.
    const before = await readRow(ip);
    await page.evaluate(() => {
      const b = document.getElementById('reset');
      b.disabled = false;
      b.hidden = false;
    });
    await page.click('#reset');
    await page.waitForSelector('#reset-dialog[open]', { timeout: 5000 });
    await page.click('#reset-confirm');
    const st = await waitFor('the 403 in the status area', async () => {
      const s = await statusArea();
      return s.visible && s.http === '403' ? s : { ok: false, ...s };
    });
    if (!st.text.includes(forced.body.error.message))
      throw new Error(`status area ${JSON.stringify(st.text)} lacks the server message ${JSON.stringify(forced.body.error.message)}`);
    if (!(await page.isDisabled('#reset'))) throw new Error('the reset button is enabled again after the 403');
    const after = await waitFor('a newer frame', async () => {
      const r = await readRow(ip);
      return r && r.frame > before.frame ? r : { ok: false };
    });
    if (after.upBytes < before.upBytes || after.downBytes < before.downBytes)
      throw new Error(`totals dropped after a refused reset: ${JSON.stringify([pick(before), pick(after)])}`);
    summary.read_reset = { status: forced.status, message: forced.body.error.message };
  });

  await step('registry panels are read-only for a read token', async () => {
    await page.waitForSelector('#registry:not([hidden])', { timeout: 5000 });
    // The lists load from the API (an error there would show in the panel instead).
    await waitFor('devices, connections and sessions loaded', async () => {
      const s = await page.evaluate(() =>
        ['devices', 'connections', 'sessions'].map((k) => ({
          k,
          count: document.getElementById(`${k}-body`).dataset.count,
          error: document.getElementById(`${k}-load`).hidden ? '' : document.getElementById(`${k}-load`).textContent,
        })),
      );
      return s.every((x) => x.count !== undefined && !x.error) ? s : { ok: false, s };
    });
    for (const f of ['#device-fields', '#conn-fields'])
      if (!(await page.isDisabled(`${f} button[type=submit]`))) throw new Error(`${f}: the submit button is enabled for a read token`);
    const notes = await page.evaluate(() => [...document.querySelectorAll('#registry .ro-note')].filter((n) => !n.hidden).length);
    if (notes < 2) throw new Error(`only ${notes} read-only notes are shown`);
  });

  await step('log out, log in with the admin token', async () => {
    await page.click('#logout');
    await page.waitForSelector('#login:not([hidden])', { timeout: 5000 });
    const kept = await page.evaluate(() => sessionStorage.getItem('tunmeter.token'));
    if (kept) throw new Error('the token is still in sessionStorage after logout');
    if (await page.isVisible('#dashboard')) throw new Error('the table is still shown after logout');
    await login(ADMIN, 'admin');
    await waitFor(`row of client ${ip} after the admin login`, () => readRow(ip), 15000);
  });

  await step('history chart', async () => {
    await openDetail(ip);
    if (await page.isDisabled('#reset')) throw new Error('the reset button is disabled for an admin token');
    for (const g of ['hour', 'day', 'minute']) {
      await page.click(`#detail [data-granularity="${g}"]`);
      await page.waitForSelector(`#chart[data-drawn="true"][data-granularity="${g}"]`, { timeout: 10000 });
    }
    // The ledger writes history as traffic flows: the minute chart must get bars (the panel
    // refreshes itself every 10 s).
    const points = await waitFor(
      'bars in the minute chart',
      async () => {
        const n = Number(await page.getAttribute('#chart', 'data-points'));
        return n > 0 ? n : { ok: false, points: n };
      },
      45000,
      500,
    );
    const pixels = await page.evaluate(() => {
      const c = document.getElementById('chart');
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let painted = 0;
      const colours = new Set();
      for (let i = 0; i < d.length; i += 4) {
        if (d[i + 3] > 0) {
          painted++;
          colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
        }
      }
      return { painted, colours: colours.size, total: d.length / 4 };
    });
    if (pixels.painted < 500 || pixels.colours < 3)
      throw new Error(`the chart canvas looks empty: ${JSON.stringify(pixels)}`);
    summary.chart = { points, painted_pixels: pixels.painted };
  });

  await step('reset: cancel does nothing, confirm zeroes the row', async () => {
    await page.click('#reset');
    await page.waitForSelector('#reset-dialog[open]', { timeout: 5000 });
    await page.click('#reset-cancel');
    await page.waitForSelector('#reset-dialog[open]', { state: 'detached', timeout: 5000 });
    const cancelled = await readRow(ip);
    await waitFor('a newer frame after cancel', async () => {
      const r = await readRow(ip);
      return r && r.frame > cancelled.frame ? r : { ok: false };
    });
    const afterCancel = await readRow(ip);
    if (afterCancel.upBytes + afterCancel.downBytes < cancelled.upBytes + cancelled.downBytes)
      throw new Error('totals dropped after Cancel');
    if (await page.isVisible('#reset-result')) throw new Error('a reset result is shown after Cancel');

    // Let the totals grow well above what a second of traffic adds, then reset.
    await waitFor('totals of a few seconds of traffic', async () => {
      const r = await readRow(ip);
      return r && r.upBytes > 0 && r.downBytes > 0 ? r : { ok: false, r };
    });
    const before = await readRow(ip);
    await page.click('#reset');
    await page.waitForSelector('#reset-dialog[open]', { timeout: 5000 });
    await page.click('#reset-confirm');
    await page.waitForSelector('#reset-result:not([hidden])', { timeout: 10000 }).catch(async () => {
      const st = await statusArea();
      throw new Error(`no reset result shown (status area: ${JSON.stringify(st.text)})`);
    });
    const closed = await page.evaluate(() => {
      const d = document.getElementById('reset-result').dataset;
      return { ip: d.ip, upBytes: Number(d.closedUpBytes), downBytes: Number(d.closedDownBytes), text: document.getElementById('reset-result').textContent };
    });
    if (closed.ip !== ip) throw new Error(`reset result is for ${closed.ip}`);
    if (closed.upBytes < before.upBytes || closed.downBytes < before.downBytes)
      throw new Error(`closed usage ${JSON.stringify(closed)} is less than the totals shown before the reset ${JSON.stringify(pick(before))}`);
    const after = await waitFor(
      'the row restarting from a small total',
      async () => {
        const r = await readRow(ip);
        return r && r.upBytes < before.upBytes && r.downBytes < before.downBytes ? r : { ok: false, r: r && pick(r) };
      },
      15000,
    );
    const st = await statusArea();
    if (st.kind === 'error') throw new Error(`status area shows an error after the reset: ${st.text}`);
    summary.reset = { ip, before: pick(before), closed: { upBytes: closed.upBytes, downBytes: closed.downBytes }, after: pick(after) };
  });

  let deviceId = null;
  await step('add a device through the form', async () => {
    await page.waitForSelector('#registry:not([hidden])', { timeout: 5000 });
    if (await page.isDisabled('#device-submit')) throw new Error('the Add device button is disabled for an admin token');
    await page.fill('#device-name', DEVICE_NAME);
    await page.fill('#device-ip', DEVICE_IP);
    await page.click('#device-submit');
    const m = await waitMsg('device-msg', 'ok', 'the device added message');
    await waitFor(`device ${DEVICE_NAME} in the list`, async () => {
      const rows = await listRows('devices-body');
      return rows.some((r) => r.name === DEVICE_NAME && r.vpnIp === DEVICE_IP) ? rows : { ok: false, rows };
    });
    const api = await apiOk('GET', '/api/v1/devices', ADMIN);
    const d = (api.devices || []).find((x) => x.name === DEVICE_NAME);
    if (!d || d.vpn_ip !== DEVICE_IP) throw new Error(`GET /api/v1/devices lacks ${DEVICE_NAME} at ${DEVICE_IP}: ${JSON.stringify(api)}`);
    deviceId = d.id;
    await waitFor('the device offered in the connection form', async () =>
      (await page.$$eval('#conn-device option', (o) => o.map((x) => x.value))).includes(deviceId),
    );
    summary.registry = { device: { id: d.id, name: d.name, vpn_ip: d.vpn_ip, message: m.text } };
  });

  const CONNS = [
    { protocol: 'http', public_port: 18080, device_port: 3128 },
    { protocol: 'socks5', public_port: 18081, device_port: 1080 },
    { protocol: 'openvpn', username: 'e2e-alice', proxy_port: 12345 },
  ];
  async function fillConnection(c) {
    await page.selectOption('#conn-protocol', c.protocol);
    await page.selectOption('#conn-device', deviceId);
    if (c.protocol === 'openvpn') {
      if (await page.isVisible('#conn-public-port')) throw new Error('the public port field is shown for openvpn');
      await page.fill('#conn-username', c.username);
      await page.fill('#conn-proxy-port', String(c.proxy_port));
    } else {
      if (await page.isVisible('#conn-username')) throw new Error(`the username field is shown for ${c.protocol}`);
      await page.fill('#conn-public-port', String(c.public_port));
      await page.fill('#conn-device-port', String(c.device_port));
    }
  }
  const sameConn = (a, c) =>
    a.protocol === c.protocol &&
    (c.protocol === 'openvpn' ? a.username === c.username && a.proxy_port === c.proxy_port : a.public_port === c.public_port && a.device_port === c.device_port);

  await step('add http, socks5 and openvpn connections through the form', async () => {
    for (const c of CONNS) {
      await fillConnection(c);
      await page.click('#conn-submit');
      const m = await waitFor(`the ${c.protocol} connection added`, async () => {
        const m = await formMsg('conn-msg');
        if (m.visible && m.kind === 'error') throw new Error(`adding the ${c.protocol} connection failed: ${m.text}`);
        return m.visible && m.kind === 'ok' ? m : { ok: false, ...m };
      });
      if (!m.text.includes(String(c.public_port ?? c.username))) throw new Error(`confirmation ${JSON.stringify(m.text)} does not name the connection`);
    }
    const rows = await waitFor('three connections in the list', async () => {
      const rows = await listRows('connections-body');
      const ok = CONNS.every((c) =>
        rows.some((r) =>
          r.protocol === c.protocol && r.device === DEVICE_NAME &&
          (c.protocol === 'openvpn' ? r.username === c.username && r.proxyPort === String(c.proxy_port) : r.publicPort === String(c.public_port) && r.devicePort === String(c.device_port)),
        ),
      );
      return ok ? rows : { ok: false, rows };
    });
    const api = (await apiOk('GET', '/api/v1/connections', ADMIN)).connections || [];
    for (const c of CONNS) {
      const a = api.find((x) => sameConn(x, c));
      if (!a) throw new Error(`GET /api/v1/connections lacks ${JSON.stringify(c)}: ${JSON.stringify(api)}`);
      if (a.device_id !== deviceId || a.device_name !== DEVICE_NAME) throw new Error(`connection ${a.id} is on ${a.device_name} (${a.device_id})`);
      // http and socks5 become forward rules; the list shows the rule id.
      if (c.protocol !== 'openvpn') {
        if (a.rule == null) throw new Error(`the ${c.protocol} connection has no forward rule: ${JSON.stringify(a)}`);
        const r = rows.find((x) => x.id === a.id);
        if (!r || r.rule !== String(a.rule)) throw new Error(`the list shows rule ${r && r.rule} for connection ${a.id}, the API ${a.rule}`);
      }
    }
    if (api.length !== CONNS.length) throw new Error(`the API holds ${api.length} connections, expected ${CONNS.length}`);
    const devRow = (await listRows('devices-body')).find((r) => r.name === DEVICE_NAME);
    summary.registry.connections = api.map((a) => ({ protocol: a.protocol, public_port: a.public_port, device_port: a.device_port, username: a.username, proxy_port: a.proxy_port, rule: a.rule }));
    summary.registry.device_row = devRow && devRow.text;
  });

  await step('a public port used twice: the 409 is shown next to the form', async () => {
    const dup = { protocol: 'http', public_port: 18080, device_port: 3129 };
    await fillConnection(dup);
    await page.click('#conn-submit');
    const m = await waitMsg('conn-msg', 'error', 'an error next to the connection form');
    // The same request straight to the API: the page shows the server's own message.
    const direct = await apiCall('POST', '/api/v1/connections', ADMIN, { device_id: deviceId, ...dup });
    if (direct.status !== 409 || !direct.body || direct.body.error.code !== 'conflict')
      throw new Error(`POST of a duplicate public port returned ${direct.status}: ${direct.text}`);
    if (m.http !== '409' || m.code !== 'conflict') throw new Error(`the form shows ${JSON.stringify(m)}, expected HTTP 409 conflict`);
    if (!m.text.includes(direct.body.error.message)) throw new Error(`the form shows ${JSON.stringify(m.text)}, not the server message ${JSON.stringify(direct.body.error.message)}`);
    const n = ((await apiOk('GET', '/api/v1/connections', ADMIN)).connections || []).length;
    if (n !== CONNS.length) throw new Error(`${n} connections after the refused duplicate`);
    summary.registry.conflict = { status: 409, message: m.text };
  });

  await step('delete a connection with confirmation', async () => {
    const api = (await apiOk('GET', '/api/v1/connections', ADMIN)).connections || [];
    const victim = api.find((a) => a.protocol === 'socks5');
    const btn = `#connections-body tr[data-id="${victim.id}"] button[data-action="delete-connection"]`;
    await page.click(btn);
    await page.waitForSelector('#confirm-dialog[open]', { timeout: 5000 });
    await page.click('#confirm-cancel');
    await page.waitForSelector('#confirm-dialog:not([open])', { state: 'attached', timeout: 5000 });
    await sleep(300);
    if (!((await apiOk('GET', '/api/v1/connections', ADMIN)).connections || []).some((a) => a.id === victim.id))
      throw new Error('Cancel deleted the connection');
    await page.click(btn);
    await page.waitForSelector('#confirm-dialog[open]', { timeout: 5000 });
    const text = await page.textContent('#confirm-text');
    if (!text.includes(String(victim.public_port))) throw new Error(`the confirmation ${JSON.stringify(text)} does not name port ${victim.public_port}`);
    await page.click('#confirm-ok');
    await waitFor('the connection gone from the list', async () => {
      const rows = await listRows('connections-body');
      return rows.length === CONNS.length - 1 && !rows.some((r) => r.id === victim.id) ? rows : { ok: false, rows };
    });
    const after = (await apiOk('GET', '/api/v1/connections', ADMIN)).connections || [];
    if (after.some((a) => a.id === victim.id) || after.length !== CONNS.length - 1)
      throw new Error(`GET /api/v1/connections after the delete: ${JSON.stringify(after)}`);
    const m = await formMsg('conn-msg');
    if (m.kind === 'error') throw new Error(`the delete shows an error: ${m.text}`);
    summary.registry.deleted = { protocol: victim.protocol, public_port: victim.public_port, remaining: after.length };
  });

  await step('deleting a device that has connections: the 409 is shown', async () => {
    await page.click(`#devices-body tr[data-id="${deviceId}"] button[data-action="delete-device"]`);
    await page.waitForSelector('#confirm-dialog[open]', { timeout: 5000 });
    const text = await page.textContent('#confirm-text');
    if (!text.includes(DEVICE_NAME)) throw new Error(`the confirmation ${JSON.stringify(text)} does not name the device`);
    await page.click('#confirm-ok');
    const m = await waitMsg('device-msg', 'error', 'an error next to the device form');
    if (m.http !== '409' || m.code !== 'conflict') throw new Error(`deleting a device with connections shows ${JSON.stringify(m)}`);
    const d = await apiCall('GET', `/api/v1/devices/${deviceId}`, ADMIN);
    if (d.status !== 200) throw new Error(`the device is gone after a refused delete: GET returned ${d.status}`);
    summary.registry.device_delete_refused = m.text;
  });

  await step('a session opened through the API appears in Active sessions', async () => {
    const s = await apiOk('POST', '/api/v1/sessions', ADMIN, { client_ip: SESSION_IP, username: SESSION_USER }, 201);
    if (!s || !s.id || s.username !== SESSION_USER || s.active !== true) throw new Error(`POST /api/v1/sessions returned ${JSON.stringify(s)}`);
    await waitFor(`the session of ${SESSION_IP} in Active sessions`, async () => {
      const rows = await listRows('sessions-body');
      return rows.some((r) => r.id === s.id && r.clientIp === SESSION_IP && r.username === SESSION_USER) ? rows : { ok: false, rows };
    }, 10000);
    summary.registry.session = { id: s.id, client_ip: SESSION_IP, username: SESSION_USER };
  });

  // These two come from the identity service (GET /api/v1/clients -> identity).
  await step(`the client table shows ${SESSION_USER} for ${SESSION_IP}`, async () => {
    const r = await waitFor(
      `username ${SESSION_USER} in the row of ${SESSION_IP}`,
      async () => {
        const r = await readRow(SESSION_IP);
        return r && r.cells[1] === SESSION_USER && r.username === SESSION_USER ? r : { ok: false, cells: r && r.cells };
      },
      12000,
      300,
    );
    const sid = summary.registry.session.id;
    if (r.sessionId !== sid) throw new Error(`the row's session is ${r.sessionId}, the API opened ${sid}`);
    if (!r.cells[10].startsWith(sid.slice(0, 8))) throw new Error(`the session cell shows ${JSON.stringify(r.cells[10])}`);
    summary.registry.session_row = r.cells;
  });

  await step(`the client row of ${DEVICE_IP} shows the device`, async () => {
    const r = await waitFor(
      `device ${DEVICE_NAME} in the row of ${DEVICE_IP}`,
      async () => {
        const r = await readRow(DEVICE_IP);
        return r && r.cells[9] === `${DEVICE_NAME} (self)` && r.device === DEVICE_NAME ? r : { ok: false, cells: r && r.cells };
      },
      12000,
      300,
    );
    summary.registry.device_client_row = r.cells;
  });

  await step('screenshot', async () => {
    // The whole table (the detail panel hides the protocol and session columns).
    if (await page.isVisible('#detail')) await page.click('#detail-close');
    await page.waitForSelector('#table:not(.narrow)', { timeout: 5000 });
    mkdirSync(dirname(SHOT), { recursive: true });
    await page.screenshot({ path: SHOT, fullPage: true, timeout: 10000 });
    summary.screenshot = SHOT;
  });

  await step('a read token: the forms are refused with the 403 message', async () => {
    await page.click('#logout');
    await page.waitForSelector('#login:not([hidden])', { timeout: 5000 });
    await login(READ, 'read');
    await waitFor('the registry lists loaded for the read token', async () => {
      const rows = await listRows('devices-body');
      return rows.some((r) => r.name === DEVICE_NAME) ? rows : { ok: false, rows };
    });
    for (const sel of ['#device-submit', '#conn-submit'])
      if (!(await page.isDisabled(sel))) throw new Error(`${sel} is enabled for a read token`);
    const deletes = await page.$$eval('#registry button[data-action]', (b) => b.map((x) => x.disabled));
    if (!deletes.length || deletes.some((d) => !d)) throw new Error(`delete buttons for a read token: disabled = ${JSON.stringify(deletes)}`);
    const before = {
      devices: ((await apiOk('GET', '/api/v1/devices', READ)).devices || []).length,
      connections: ((await apiOk('GET', '/api/v1/connections', READ)).connections || []).length,
    };
    // What the server says to a read token.
    const direct = await apiCall('POST', '/api/v1/devices', READ, { name: 'e2e-read', vpn_ip: '10.9.0.250' });
    if (direct.status !== 403 || !direct.body || direct.body.error.code !== 'forbidden')
      throw new Error(`POST /api/v1/devices with the read token returned ${direct.status}: ${direct.text}`);
    // A tampered page re-enables the forms: the UI shows the server's 403 next to each.
    await page.evaluate(() => {
      for (const f of ['device-fields', 'conn-fields']) document.getElementById(f).disabled = false;
    });
    await page.fill('#device-name', 'e2e-read');
    await page.fill('#device-ip', '10.9.0.250');
    await page.click('#device-submit');
    const dm = await waitMsg('device-msg', 'error', 'an error next to the device form');
    await page.selectOption('#conn-protocol', 'openvpn');
    await page.fill('#conn-username', 'e2e-read');
    await page.fill('#conn-proxy-port', '12346');
    await page.click('#conn-submit');
    const cm = await waitMsg('conn-msg', 'error', 'an error next to the connection form');
    for (const [what, m] of [['device', dm], ['connection', cm]]) {
      if (m.http !== '403' || m.code !== 'forbidden') throw new Error(`the ${what} form shows ${JSON.stringify(m)}, expected HTTP 403`);
      if (!m.text.includes(direct.body.error.message))
        throw new Error(`the ${what} form shows ${JSON.stringify(m.text)}, not the server message ${JSON.stringify(direct.body.error.message)}`);
    }
    for (const sel of ['#device-submit', '#conn-submit'])
      if (!(await page.isDisabled(sel))) throw new Error(`${sel} is enabled again after the 403`);
    const after = {
      devices: ((await apiOk('GET', '/api/v1/devices', READ)).devices || []).length,
      connections: ((await apiOk('GET', '/api/v1/connections', READ)).connections || []).length,
    };
    if (after.devices !== before.devices || after.connections !== before.connections)
      throw new Error(`a read token changed the registry: ${JSON.stringify({ before, after })}`);
    summary.read_forms = { device: dm.text, connection: cm.text, status: 403 };
  });

  await step('10,000 clients stay smooth (mocked stream, same browser)', async () => {
    const ctx = await browser.newContext({ viewport: { width: 1480, height: 900 } });
    const p = await ctx.newPage();
    p.on('pageerror', (e) => pageErrors.push(`uncaught (10k page): ${e.message}`));
    const N = 10000;
    let n = 0;
    await p.routeWebSocket(/\/api\/v1\/stream/, (ws) => {
      const send = () => {
        n++;
        const rows = [];
        for (let i = 0; i < N; i++) {
          const ip = `10.${100 + (i >> 16)}.${(i >> 8) & 255}.${i & 255}`;
          const r = ((i * 7919 + n * 104729) % 100000) + 1;
          rows.push([ip, r, 2 * r, i * 1000 + n * r, i * 3000 + n * 2 * r, i + n, 2 * i + n, Date.now() - (i % 300) * 1000, i % 300 < 120]);
        }
        ws.send(
          JSON.stringify({
            type: 'clients',
            taken_unix_ms: Date.now(),
            interval_ms: 250,
            columns: ['ip', 'up_rate', 'down_rate', 'up_bytes', 'down_bytes', 'up_packets', 'down_packets', 'last_seen_unix_ms', 'online'],
            rows,
          }),
        );
      };
      send();
      const t = setInterval(send, 250);
      ws.onClose(() => clearInterval(t));
    });
    await p.addInitScript(() => {
      window.__longTasks = [];
      new PerformanceObserver((l) => {
        for (const e of l.getEntries()) window.__longTasks.push(e.duration);
      }).observe({ type: 'longtask', buffered: true });
    });
    await p.goto(`${BASE}/`);
    await p.fill('#token', READ);
    await p.click('#login-submit');
    await p.waitForSelector('#table[data-clients="10000"]', { timeout: 15000 });
    // Measure from here on (ignore page load): the app's own slowest frame handling and render,
    // and any long main-thread task.
    await p.evaluate(() => {
      window.__longTasks.length = 0;
      const d = document.getElementById('table').dataset;
      d.maxFrameMs = '0';
      d.maxRenderMs = '0';
    });
    const framesAt = n;
    // Sort by download rate while frames of 10,000 rows keep arriving; scroll through the table.
    await p.click('#table [role=columnheader][data-key="down_rate"] button');
    for (const y of [5000, 150000, 319000, 0]) {
      await p.evaluate((y) => (document.getElementById('viewport').scrollTop = y), y);
      await sleep(300);
    }
    await p.fill('#filter', '10.100.7.');
    await p.waitForSelector('#table[data-visible="256"]', { timeout: 5000 });
    await p.fill('#filter', '');
    await sleep(500);
    const m = await p.evaluate(() => ({
      domRows: document.querySelectorAll('#viewport .row').length,
      longTasks: window.__longTasks.slice(),
      frameMs: Number(document.getElementById('table').dataset.maxFrameMs),
      renderMs: Number(document.getElementById('table').dataset.maxRenderMs),
    }));
    const frames = n - framesAt;
    await ctx.close();
    const worst = Math.max(0, ...m.longTasks);
    summary.ten_k = {
      frames,
      dom_rows: m.domRows,
      max_frame_ms: m.frameMs,
      max_render_ms: m.renderMs,
      long_tasks: m.longTasks.length,
      worst_task_ms: Math.round(worst),
    };
    if (m.domRows > 200) throw new Error(`${m.domRows} row elements for 10,000 clients: not virtualised`);
    if (frames < 4) throw new Error(`only ${frames} mocked frames were delivered`);
    // Budgets with a wide margin over what a laptop measures (about 15 ms and 20 ms): a frame
    // a second must leave the page responsive. Long tasks include the mock's own delivery of
    // 700 KB messages through the DevTools protocol, so only a freeze counts.
    if (!(m.frameMs < 250)) throw new Error(`handling one 10,000-client frame took ${m.frameMs} ms`);
    if (!(m.renderMs < 150)) throw new Error(`rendering the 10,000-client table took ${m.renderMs} ms`);
    if (worst > 1500) throw new Error(`a main-thread task took ${Math.round(worst)} ms with 10,000 clients`);
  });

  current = 'page errors';
  if (pageErrors.length) await fail(`the page logged errors: ${pageErrors.join(' | ')}`);
  await browser.close();
  summary.elapsed_ms = Date.now() - t0;
  process.stdout.write(JSON.stringify(summary) + '\n');
  process.exit(0);
}

function pick(r) {
  return r && { upRate: r.upRate, downRate: r.downRate, upBytes: r.upBytes, downBytes: r.downBytes };
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)));
