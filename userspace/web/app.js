// tunmeter dashboard: token login, a live virtualised client table fed by the WebSocket stream
// (with who is behind each address, from GET /api/v1/clients), per-client history chart and
// reset, and the registry: devices, connections and active sessions. Plain JS, no dependencies,
// works offline.
'use strict';

(() => {
  const TOKEN_KEY = 'tunmeter.token';
  const ROW_H = 32; // px; must match --row-h in app.css
  const OVERSCAN = 8; // rows rendered above and below the visible window
  const USAGE_REFRESH_MS = 10000;
  // Identities come from GET /api/v1/clients, not the stream: every 3 s, slower for big lists
  // (1 ms per client, at most 15 s).
  const IDENTITY_REFRESH_MS = 3000;
  const IDENTITY_REFRESH_MAX_MS = 15000;
  const REGISTRY_REFRESH_MS = 5000;
  const BUCKET_MS = { minute: 60e3, hour: 3600e3, day: 86400e3 };
  const SPAN_MS = { minute: 3600e3, hour: 48 * 3600e3, day: 60 * 86400e3 };
  // Columns whose first click sorts descending (largest first); the others start ascending.
  const DESC_FIRST = new Set(['online', 'up_rate', 'down_rate', 'up_bytes', 'down_bytes', 'last_seen_unix_ms']);

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $('status'), conn: $('conn'), node: $('node'), selfcheck: $('selfcheck'), whoami: $('whoami'), logout: $('logout'),
    login: $('login'), loginForm: $('login-form'), token: $('token'), loginSubmit: $('login-submit'),
    dashboard: $('dashboard'), filter: $('filter'), count: $('count'), totals: $('totals'),
    table: $('table'), viewport: $('viewport'), spacer: $('spacer'), empty: $('empty'),
    detail: $('detail'), detailTitle: $('detail-title'), detailClose: $('detail-close'), facts: $('detail-facts'),
    chart: $('chart'), tooltip: $('tooltip'), legendStats: $('legend-stats'),
    reset: $('reset'), resetNote: $('reset-note'), resetResult: $('reset-result'),
    dialog: $('reset-dialog'), dialogText: $('reset-dialog-text'),
    registry: $('registry'),
    devicesBody: $('devices-body'), devicesEmpty: $('devices-empty'), devicesLoad: $('devices-load'), devicesCount: $('devices-count'),
    deviceForm: $('device-form'), deviceFields: $('device-fields'), deviceName: $('device-name'), deviceIp: $('device-ip'), deviceMsg: $('device-msg'),
    connectionsBody: $('connections-body'), connectionsEmpty: $('connections-empty'), connectionsLoad: $('connections-load'),
    connectionsCount: $('connections-count'),
    connForm: $('conn-form'), connFields: $('conn-fields'), connProtocol: $('conn-protocol'), connDevice: $('conn-device'),
    connPublicPort: $('conn-public-port'), connDevicePort: $('conn-device-port'), connUsername: $('conn-username'),
    connProxyPort: $('conn-proxy-port'), connMsg: $('conn-msg'),
    sessionsBody: $('sessions-body'), sessionsEmpty: $('sessions-empty'), sessionsLoad: $('sessions-load'),
    sessionsCount: $('sessions-count'), sessionsMsg: $('sessions-msg'),
    confirm: $('confirm-dialog'), confirmTitle: $('confirm-title'), confirmText: $('confirm-text'), confirmOk: $('confirm-ok'),
  };

  const state = {
    token: null,
    me: null,
    ws: null,
    wsGen: 0,
    wsWanted: false,
    wsTimer: 0,
    wsBackoff: 500,
    wsFailures: 0,
    watchdog: 0,
    lastFrameAt: 0,
    intervalMs: 1000,
    rows: [], // clients of the latest frame
    byIp: new Map(),
    view: [], // rows after filter and sort
    viewDirty: true,
    renderQueued: false,
    sortKey: 'ip',
    sortDir: 1,
    filter: '',
    shown: new Map(), // ip -> row element currently showing that client
    spare: [], // row elements not in use (hidden)
    selected: null,
    granularity: 'minute',
    usage: null,
    usageSeq: 0,
    usageTimer: 0,
    chart: null, // geometry of the last drawing, for the tooltip
    resetIp: null,
    statusTimer: 0,
    idents: new Map(), // ip -> identity of GET /api/v1/clients, prepared for display (see prepIdent)
    identTimer: 0,
    identSeq: 0,
    devices: [],
    connections: [],
    sessions: [],
    registryTimer: 0,
    registrySeq: 0,
    confirmAction: null, // what the confirmation dialog does on "confirm"
  };

  // ---------- formatting ----------

  const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];

  function fmtBytes(n) {
    if (n == null || !Number.isFinite(n)) return '—';
    if (Math.abs(n) < 1024) return `${Math.round(n)} B`;
    let i = 0;
    let v = n;
    while (Math.abs(v) >= 1024 && i < UNITS.length - 1) {
      v /= 1024;
      i++;
    }
    return `${v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${UNITS[i]}`;
  }

  const fmtRate = (r) => (r == null || !Number.isFinite(r) ? '—' : `${fmtBytes(r)}/s`);
  const fmtInt = (n) => (n == null ? '—' : Number(n).toLocaleString('en-US'));

  function fmtAgo(ms, now) {
    if (ms == null) return 'never';
    const s = Math.max(0, (now - ms) / 1000);
    if (s < 1) return 'just now';
    if (s < 60) return `${Math.floor(s)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return new Date(ms).toLocaleString();
  }

  // A length of time: "45 s", "12 min", "3 h 05 min", "2 d 4 h".
  function fmtDuration(ms) {
    if (ms == null || !Number.isFinite(ms)) return '—';
    const s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min`;
    const h = Math.floor(m / 60);
    if (h < 24) return `${h} h ${String(m % 60).padStart(2, '0')} min`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }

  const pad = (n) => String(n).padStart(2, '0');
  function fmtTime(ms, granularity) {
    const d = new Date(ms);
    const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    const md = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
    if (granularity === 'minute') return hm;
    if (granularity === 'hour') return `${md.slice(5)} ${hm}`;
    return md;
  }

  // Sort key of an address: IPv4 before IPv6, numeric order within each family.
  const ipKeys = new Map();
  function ipKey(ip) {
    let k = ipKeys.get(ip);
    if (k !== undefined) return k;
    if (ip.includes(':')) {
      let [head, tail] = ip.split('::');
      const h = head ? head.split(':') : [];
      const t = tail !== undefined && tail ? tail.split(':') : [];
      let groups = h;
      if (tail !== undefined) groups = h.concat(Array(Math.max(0, 8 - h.length - t.length)).fill('0'), t);
      k = '6' + groups.map((g) => g.padStart(4, '0')).join('');
    } else {
      k = '4' + ip.split('.').map((o) => o.padStart(3, '0')).join('');
    }
    if (ipKeys.size > 200000) ipKeys.clear();
    ipKeys.set(ip, k);
    return k;
  }

  // ---------- status area and API ----------

  function setStatus(kind, text, extra = {}) {
    clearTimeout(state.statusTimer);
    el.status.hidden = !text;
    el.status.textContent = text || '';
    el.status.dataset.kind = kind || '';
    el.status.dataset.code = extra.code || '';
    el.status.dataset.httpStatus = extra.status != null ? String(extra.status) : '';
    el.status.setAttribute('role', kind === 'error' ? 'alert' : 'status');
    if (text && kind === 'ok') state.statusTimer = setTimeout(() => setStatus('', ''), 8000);
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
    describe() {
      return this.status ? `${this.message} (${this.code}, HTTP ${this.status})` : this.message;
    }
  }

  // JSON request with the bearer token (and a JSON body if given). Errors become ApiError with the
  // server's code and message.
  async function api(path, { method = 'GET', token = state.token, body } = {}) {
    let res;
    const headers = { Authorization: `Bearer ${token}`, Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    try {
      res = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
      });
    } catch (e) {
      throw new ApiError(0, 'network', `cannot reach the tunmeter daemon: ${e.message}`);
    }
    let data = null;
    const text = await res.text();
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!res.ok) {
      const err = data && data.error;
      throw new ApiError(
        res.status,
        (err && err.code) || 'http_error',
        (err && err.message) || `${method} ${path} failed: HTTP ${res.status} ${res.statusText}`,
      );
    }
    return data;
  }

  const clientPath = (ip) => `/api/v1/clients/${encodeURIComponent(ip).replace(/%3A/gi, ':')}`;

  // ---------- login / logout ----------

  async function login(token, { fromStorage = false } = {}) {
    el.loginSubmit.disabled = true;
    try {
      const me = await api('/api/v1/me', { token });
      state.token = token;
      sessionStorage.setItem(TOKEN_KEY, token);
      enterDashboard(me);
      if (!fromStorage) setStatus('', '');
    } catch (e) {
      if (e.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        showLogin();
        setStatus('error', `Sign-in failed: ${e.describe()}`, e);
      } else {
        showLogin();
        setStatus('error', e.describe(), e);
      }
    } finally {
      el.loginSubmit.disabled = false;
    }
  }

  function showLogin() {
    el.login.hidden = false;
    el.dashboard.hidden = true;
    el.registry.hidden = true;
    el.logout.hidden = true;
    el.whoami.textContent = '';
    setConn('idle');
    el.token.focus();
  }

  function enterDashboard(me) {
    state.me = me;
    const isAdmin = me.role === 'admin';
    el.whoami.textContent = `${me.name || me.token_id || 'token'} · ${me.role}`;
    el.whoami.dataset.role = me.role;
    document.body.dataset.role = me.role;
    el.login.hidden = true;
    el.dashboard.hidden = false;
    el.logout.hidden = false;
    el.token.value = '';
    el.reset.disabled = !isAdmin;
    el.reset.title = isAdmin ? '' : 'Resetting needs an admin token';
    el.resetNote.textContent = isAdmin ? '' : 'Read-only token: resetting needs an admin token.';
    el.registry.hidden = false;
    applyRole();
    for (const m of [el.deviceMsg, el.connMsg, el.sessionsMsg]) showMsg(m, '', '');
    startRefresh();
    state.wsWanted = true;
    state.wsFailures = 0;
    state.wsBackoff = 500;
    connect();
    fetch('/healthz', { cache: 'no-store' })
      .then((r) => (r.ok ? r.json() : null))
      .then((h) => {
        if (h && h.node_id) {
          el.node.textContent = `node ${h.node_id}`;
          el.node.dataset.nodeId = h.node_id;
        }
      })
      .catch(() => {});
    scheduleRender();
  }

  function logout(message) {
    state.wsWanted = false;
    state.wsGen++;
    clearTimeout(state.wsTimer);
    clearInterval(state.watchdog);
    if (state.ws) {
      const ws = state.ws;
      state.ws = null;
      ws.close(1000, 'logout');
    }
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    el.selfcheck.hidden = true;
    state.me = null;
    delete document.body.dataset.role;
    stopRefresh();
    state.rows = [];
    state.byIp = new Map();
    state.viewDirty = true;
    closeDetail();
    el.table.removeAttribute('data-frame-unix-ms');
    showLogin();
    scheduleRender();
    setStatus(message ? 'error' : 'ok', message || 'Signed out.');
  }

  // ---------- live stream ----------

  function setConn(s, text) {
    el.conn.dataset.state = s;
    el.conn.textContent =
      text || { idle: '', connecting: 'connecting…', live: 'live', reconnecting: 'reconnecting…' }[s] || s;
  }

  // The token never goes into a URL: a single-use ticket (valid 30 s) opens the stream.
  async function connect() {
    clearTimeout(state.wsTimer);
    if (!state.wsWanted || !state.token) return;
    // Only the newest call may open a socket: a login, logout or reconnect meanwhile wins.
    const gen = ++state.wsGen;
    if (state.ws) {
      const old = state.ws;
      state.ws = null;
      old.close();
    }
    setConn(state.wsFailures ? 'reconnecting' : 'connecting');
    let ticket;
    try {
      ticket = (await api('/api/v1/stream/ticket', { method: 'POST' })).ticket;
    } catch (e) {
      if (gen !== state.wsGen || !state.wsWanted) return;
      if (e.status === 401) {
        logout(`Signed out: ${e.describe()}`);
        return;
      }
      state.wsFailures++;
      scheduleReconnect();
      return;
    }
    if (gen !== state.wsGen || !state.wsWanted || !state.token) return;
    const url = new URL('/api/v1/stream', location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    url.searchParams.set('ticket', ticket);
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    state.lastFrameAt = Date.now();
    ws.onmessage = (ev) => {
      if (ws !== state.ws) return;
      const t = performance.now();
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      state.wsFailures = 0;
      state.wsBackoff = 500;
      state.lastFrameAt = Date.now();
      setConn('live');
      if (msg.type === 'clients') {
        onFrame(msg);
        notePerf('Frame', performance.now() - t);
      }
    };
    ws.onclose = () => {
      if (ws !== state.ws) return;
      state.ws = null;
      if (!state.wsWanted) return;
      state.wsFailures++;
      scheduleReconnect();
    };
    ws.onerror = () => {}; // onclose follows and reconnects
    clearInterval(state.watchdog);
    // A stream that stays silent for several intervals is dead even if the socket is open.
    state.watchdog = setInterval(() => {
      if (state.ws === ws && Date.now() - state.lastFrameAt > Math.max(10000, 5 * state.intervalMs)) {
        state.ws = null;
        ws.close();
        state.wsFailures++;
        scheduleReconnect();
      }
    }, 2000);
  }

  function scheduleReconnect() {
    clearTimeout(state.wsTimer);
    const delay = Math.min(state.wsBackoff, 10000) * (0.8 + 0.4 * Math.random());
    state.wsBackoff = Math.min(state.wsBackoff * 2, 10000);
    setConn('reconnecting', `reconnecting in ${Math.ceil(delay / 1000)} s…`);
    // After repeated failures, find out whether the token was revoked (a WebSocket cannot tell).
    if (state.wsFailures >= 2) {
      api('/api/v1/me').then(
        () => {},
        (e) => {
          if (e.status === 401 && state.wsWanted) logout(`Signed out: ${e.describe()}`);
        },
      );
    }
    state.wsTimer = setTimeout(connect, delay);
  }

  function onFrame(msg) {
    const cols = msg.columns || [];
    const idx = Object.create(null);
    cols.forEach((c, i) => (idx[c] = i));
    // Column positions, -1 when absent (a later `name` column is picked up by name).
    const at = (c) => (idx[c] === undefined ? -1 : idx[c]);
    const [iIp, iName, iUr, iDr, iUb, iDb, iUp, iDp, iSeen, iOn] = [
      'ip', idx.name !== undefined ? 'name' : 'username', 'up_rate', 'down_rate', 'up_bytes', 'down_bytes',
      'up_packets', 'down_packets', 'last_seen_unix_ms', 'online',
    ].map(at);
    const num = (r, i) => (i < 0 ? 0 : +r[i] || 0);
    const src = msg.rows || [];
    const prev = state.byIp;
    const rows = [];
    const byIp = new Map();
    // Client objects are reused from frame to frame: 10,000 rows a second stay cheap.
    for (let k = 0; k < src.length; k++) {
      const r = src[k];
      if (iIp < 0 || r[iIp] == null) continue;
      const ip = String(r[iIp]);
      const name = iName < 0 ? null : r[iName] ?? null;
      let c = prev.get(ip);
      if (!c) c = { ip, key: ipKey(ip), name: undefined, ident: null, username: null, search: '' };
      const ident = state.idents.get(ip) || null;
      if (c.name !== name || c.ident !== ident) describe(c, name, ident);
      c.up_rate = num(r, iUr);
      c.down_rate = num(r, iDr);
      c.up_bytes = num(r, iUb);
      c.down_bytes = num(r, iDb);
      c.up_packets = num(r, iUp);
      c.down_packets = num(r, iDp);
      c.last_seen_unix_ms = iSeen < 0 ? null : r[iSeen] ?? null;
      c.online = iOn >= 0 && !!r[iOn];
      rows.push(c);
      byIp.set(ip, c);
    }
    state.rows = rows;
    state.byIp = byIp;
    if (msg.interval_ms) state.intervalMs = msg.interval_ms;
    el.table.dataset.frameUnixMs = String(msg.taken_unix_ms ?? Date.now());
    state.viewDirty = true;
    scheduleRender();
  }

  // Who a client is: the stream's name (if it ever sends one) and the identity from the API.
  function describe(c, name, ident) {
    c.name = name;
    c.ident = ident;
    c.username = (ident && ident.username) || name || null;
    c.search = `${c.ip} ${c.username || ''} ${name || ''} ${ident ? ident.deviceName : ''}`.toLowerCase();
  }

  // ---------- table ----------

  function compare(a, b) {
    const k = state.sortKey;
    let d = 0;
    if (k === 'ip') d = a.key < b.key ? -1 : a.key > b.key ? 1 : 0;
    else if (k === 'name') d = (a.name || '').localeCompare(b.name || '');
    else if (k === 'username') d = (a.username || '\uffff').localeCompare(b.username || '\uffff');
    else if (k === 'protocol' || k === 'device') {
      const p = k === 'device' ? 'deviceName' : 'protocol';
      d = ((a.ident && a.ident[p]) || '\uffff').localeCompare((b.ident && b.ident[p]) || '\uffff');
    } else if (k === 'session') {
      const x = (a.ident && a.ident.opened) || Infinity;
      const y = (b.ident && b.ident.opened) || Infinity;
      d = x < y ? -1 : x > y ? 1 : 0;
    } else if (k === 'online') d = (a.online ? 1 : 0) - (b.online ? 1 : 0);
    else {
      const x = a[k] ?? -Infinity;
      const y = b[k] ?? -Infinity;
      d = x < y ? -1 : x > y ? 1 : 0;
    }
    if (d === 0 && k !== 'ip') d = a.key < b.key ? -1 : a.key > b.key ? 1 : 0;
    return d * state.sortDir;
  }

  function recomputeView() {
    const f = state.filter;
    const v = f ? state.rows.filter((c) => c.search.includes(f)) : state.rows.slice();
    v.sort(compare);
    state.view = v;
    state.viewDirty = false;
  }

  function scheduleRender() {
    if (state.renderQueued) return;
    state.renderQueued = true;
    requestAnimationFrame(render);
  }

  function makeRow() {
    const row = document.createElement('div');
    row.className = 'row';
    row.setAttribute('role', 'row');
    row.tabIndex = -1;
    const cls = ['c-online', 'c-name', 'c-ip', 'c-num', 'c-num', 'c-num', 'c-num', 'c-seen', 'c-proto', 'c-device', 'c-session'];
    row.cells_ = cls.map((c) => {
      const d = document.createElement('div');
      d.className = `cell ${c}`;
      d.setAttribute('role', 'cell');
      row.appendChild(d);
      return d;
    });
    const dot = document.createElement('span');
    dot.className = 'dot';
    row.cells_[0].appendChild(dot);
    row.dot_ = dot;
    row.cache_ = [];
    return row;
  }

  // Write only what changed, so a frame costs a handful of DOM writes per visible row.
  function put(row, i, text) {
    if (row.cache_[i] !== text) {
      row.cache_[i] = text;
      row.cells_[i].textContent = text;
    }
  }

  // The cell's tooltip (the full text where the cell abbreviates).
  function putTitle(row, i, text) {
    const k = 100 + i;
    if (row.cache_[k] !== text) {
      row.cache_[k] = text;
      row.cells_[i].title = text;
    }
  }

  function setData(row, name, value) {
    const v = String(value);
    if (row.dataset[name] !== v) row.dataset[name] = v;
  }

  // The slowest frame handling and rendering so far, in data-max-frame-ms / data-max-render-ms on
  // the table (the end-to-end test reads them; writing 0 there starts a new measurement).
  function notePerf(what, ms) {
    const k = `max${what}Ms`;
    if (!(Number(el.table.dataset[k]) >= ms)) el.table.dataset[k] = ms.toFixed(1);
  }

  function render() {
    const t = performance.now();
    try {
      renderNow();
    } finally {
      notePerf('Render', performance.now() - t);
    }
  }

  function renderNow() {
    state.renderQueued = false;
    if (state.viewDirty) recomputeView();
    const view = state.view;
    const n = view.length;
    const now = Date.now();
    el.spacer.style.height = `${n * ROW_H}px`;
    el.table.setAttribute('aria-rowcount', String(n + 1));
    el.table.dataset.clients = String(state.rows.length);
    el.table.dataset.visible = String(n);
    el.empty.hidden = !(state.token && n === 0);
    el.empty.textContent = state.rows.length ? 'No client matches the filter.' : 'No clients yet.';
    el.count.textContent = state.filter ? `${n} of ${state.rows.length} clients` : `${state.rows.length} clients`;
    let up = 0;
    let down = 0;
    for (const c of state.rows) {
      up += c.up_rate;
      down += c.down_rate;
    }
    el.totals.textContent = state.rows.length ? `total ↑ ${fmtRate(up)} ↓ ${fmtRate(down)}` : '';

    const top = el.viewport.scrollTop;
    const h = el.viewport.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / ROW_H) - OVERSCAN);
    const last = Math.min(n, Math.ceil((top + h) / ROW_H) + OVERSCAN);
    // Row elements are keyed by client: a client keeps its element while it stays in the window
    // (it just moves when the order changes), so a click always lands on the row it was aimed at.
    const shown = new Map();
    for (let i = first; i < last; i++) {
      const row = state.shown.get(view[i].ip);
      if (row) {
        shown.set(view[i].ip, row);
        state.shown.delete(view[i].ip);
      }
    }
    for (const row of state.shown.values()) {
      row.hidden = true;
      state.spare.push(row);
    }
    state.shown = shown;
    for (let i = first; i < last; i++) {
      const c = view[i];
      let row = shown.get(c.ip);
      if (!row) {
        row = state.spare.pop();
        if (!row) {
          row = makeRow();
          el.viewport.appendChild(row);
        }
        row.hidden = false;
        shown.set(c.ip, row);
      }
      const y = `${i * ROW_H}px`;
      if (row.style.top !== y) row.style.top = y;
      row.setAttribute('aria-rowindex', String(i + 2));
      row.setAttribute('aria-selected', String(c.ip === state.selected));
      setData(row, 'ip', c.ip);
      setData(row, 'name', c.name || '');
      const id = c.ident;
      setData(row, 'username', c.username || '');
      setData(row, 'protocol', (id && id.protocol) || '');
      setData(row, 'device', (id && id.deviceName) || '');
      setData(row, 'sessionId', (id && id.sessionId) || '');
      setData(row, 'upRate', c.up_rate);
      setData(row, 'downRate', c.down_rate);
      setData(row, 'upBytes', c.up_bytes);
      setData(row, 'downBytes', c.down_bytes);
      setData(row, 'upPackets', c.up_packets);
      setData(row, 'downPackets', c.down_packets);
      setData(row, 'lastSeen', c.last_seen_unix_ms ?? '');
      setData(row, 'online', c.online);
      const dotCls = c.online ? 'dot on' : 'dot';
      if (row.dot_.className !== dotCls) {
        row.dot_.className = dotCls;
        row.cells_[0].title = c.online ? 'online' : 'offline';
        row.cells_[0].setAttribute('aria-label', c.online ? 'online' : 'offline');
      }
      put(row, 1, c.username || '—');
      put(row, 2, c.ip);
      put(row, 3, fmtRate(c.up_rate));
      put(row, 4, fmtRate(c.down_rate));
      put(row, 5, fmtBytes(c.up_bytes));
      put(row, 6, fmtBytes(c.down_bytes));
      put(row, 7, fmtAgo(c.last_seen_unix_ms, now));
      put(row, 8, (id && id.protocol) || '—');
      put(row, 9, (id && id.device) || '—');
      putTitle(row, 9, (id && id.deviceTitle) || '');
      put(row, 10, id && id.sessionId ? sessionText(id, now) : '—');
      putTitle(row, 10, id && id.sessionId ? id.sessionTitle : '');
    }
    renderFacts(now);
  }

  function setSort(key) {
    if (state.sortKey === key) state.sortDir = -state.sortDir;
    else {
      state.sortKey = key;
      state.sortDir = DESC_FIRST.has(key) ? -1 : 1;
    }
    for (const h of el.table.querySelectorAll('[role=columnheader]')) {
      if (h.dataset.key === key) h.setAttribute('aria-sort', state.sortDir > 0 ? 'ascending' : 'descending');
      else h.removeAttribute('aria-sort');
    }
    state.viewDirty = true;
    scheduleRender();
  }

  // ---------- detail panel ----------

  function select(ip) {
    const changed = state.selected !== ip;
    state.selected = ip;
    el.detail.hidden = false;
    el.detail.dataset.ip = ip;
    el.table.classList.add('narrow');
    el.detailTitle.textContent = ip;
    if (changed) {
      el.resetResult.hidden = true;
      el.resetResult.textContent = '';
      state.usage = null;
      clearChart();
    }
    loadUsage();
    clearInterval(state.usageTimer);
    state.usageTimer = setInterval(loadUsage, USAGE_REFRESH_MS);
    scheduleRender();
  }

  function closeDetail() {
    state.selected = null;
    clearInterval(state.usageTimer);
    el.detail.hidden = true;
    delete el.detail.dataset.ip;
    el.table.classList.remove('narrow');
    el.tooltip.hidden = true;
    scheduleRender();
  }

  function renderFacts(now) {
    if (!state.selected) return;
    const c = state.byIp.get(state.selected);
    const facts = c
      ? [
          ['Status', c.online ? 'online' : 'offline'],
          ['Username', c.username || '—'],
          ['Upload rate', fmtRate(c.up_rate)],
          ['Download rate', fmtRate(c.down_rate)],
          ['Uploaded', `${fmtBytes(c.up_bytes)} · ${fmtInt(c.up_packets)} packets`],
          ['Downloaded', `${fmtBytes(c.down_bytes)} · ${fmtInt(c.down_packets)} packets`],
          ['Last seen', fmtAgo(c.last_seen_unix_ms, now)],
        ]
      : [['Status', 'not in the latest update']];
    const id = c && c.ident;
    if (id) {
      const r = id.raw;
      const more = [
        ['Common name', r.common_name],
        ['Protocol', r.protocol],
        ['Instance', r.instance],
        ['Real address', r.real_address],
        ['WireGuard key', r.wg_public_key],
        ['Last handshake', r.latest_handshake_unix_ms != null ? fmtAgo(r.latest_handshake_unix_ms, now) : null],
        ['Session', id.sessionId ? `${id.sessionId} · ${fmtDuration(now - id.opened)} · ↑ ${fmtBytes(id.up)}, ↓ ${fmtBytes(id.down)}` : null],
        ['Device', r.device ? `${id.device} · ${r.device.status}` : null],
      ];
      for (const f of more) if (f[1] != null && f[1] !== '') facts.push(f);
    }
    const html = facts.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join('');
    if (el.facts.innerHTML !== html) el.facts.innerHTML = html;
    if (c) {
      el.detail.dataset.upBytes = String(c.up_bytes);
      el.detail.dataset.downBytes = String(c.down_bytes);
    }
  }

  function esc(s) {
    return String(s).replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
  }

  async function loadUsage() {
    const ip = state.selected;
    if (!ip || !state.token) return;
    const g = state.granularity;
    const seq = ++state.usageSeq;
    try {
      const u = await api(`${clientPath(ip)}/usage?granularity=${g}`);
      if (seq !== state.usageSeq || ip !== state.selected) return;
      state.usage = { ...u, granularity: u.granularity || g };
      drawChart();
    } catch (e) {
      if (seq !== state.usageSeq) return;
      setStatus('error', `History of ${ip}: ${e.describe()}`, e);
      if (e.status === 401) logout(`Signed out: ${e.describe()}`);
    }
  }

  function setGranularity(g) {
    state.granularity = g;
    for (const b of el.detail.querySelectorAll('[data-granularity]')) {
      b.setAttribute('aria-checked', String(b.dataset.granularity === g));
    }
    state.usage = null;
    clearChart();
    loadUsage();
  }

  function clearChart() {
    const cv = el.chart;
    const ctx = cv.getContext('2d');
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, cv.width, cv.height);
    cv.dataset.drawn = 'false';
    cv.dataset.points = '0';
    state.chart = null;
    el.legendStats.textContent = 'loading…';
    el.tooltip.hidden = true;
  }

  // Bars of upload and download bytes per bucket over the requested range, with a byte axis.
  function drawChart() {
    const u = state.usage;
    if (!u) return;
    const cv = el.chart;
    const css = getComputedStyle(document.documentElement);
    const color = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
    const colUp = color('--up', '#d97706');
    const colDown = color('--down', '#2563eb');
    const colLine = color('--line', '#dde2e8');
    const colMuted = color('--muted', '#5f6b7a');
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(200, Math.round(cv.clientWidth || 480));
    const h = Math.max(120, Math.round(cv.clientHeight || 220));
    if (cv.width !== Math.round(w * dpr) || cv.height !== Math.round(h * dpr)) {
      cv.width = Math.round(w * dpr);
      cv.height = Math.round(h * dpr);
    }
    const ctx = cv.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);

    const g = u.granularity;
    const bucket = BUCKET_MS[g] || 60e3;
    const points = (u.points || []).filter((p) => p && p.start_unix_ms != null);
    let to = u.to_unix_ms || Date.now();
    let from = u.from_unix_ms || to - (SPAN_MS[g] || 3600e3);
    for (const p of points) {
      from = Math.min(from, p.start_unix_ms);
      to = Math.max(to, p.start_unix_ms + bucket);
    }
    from = Math.floor(from / bucket) * bucket;
    const slots = Math.max(1, Math.ceil((to - from) / bucket));

    let max = 0;
    let sumUp = 0;
    let sumDown = 0;
    let peakUp = 0;
    let peakDown = 0;
    for (const p of points) {
      const ub = (p.upload && p.upload.bytes) || 0;
      const db = (p.download && p.download.bytes) || 0;
      max = Math.max(max, ub, db);
      sumUp += ub;
      sumDown += db;
      peakUp = Math.max(peakUp, (p.upload && p.upload.peak_rate) || 0);
      peakDown = Math.max(peakDown, (p.download && p.download.peak_rate) || 0);
    }
    const top = niceMax(max);

    ctx.font = '11px system-ui, sans-serif';
    const labelW = Math.max(ctx.measureText(fmtBytes(top)).width, 30) + 8;
    const plot = { x: labelW, y: 8, w: w - labelW - 8, h: h - 8 - 22 };

    // Grid and byte axis.
    ctx.strokeStyle = colLine;
    ctx.fillStyle = colMuted;
    ctx.lineWidth = 1;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (let i = 0; i <= 4; i++) {
      const y = Math.round(plot.y + plot.h - (plot.h * i) / 4) + 0.5;
      ctx.beginPath();
      ctx.moveTo(plot.x, y);
      ctx.lineTo(plot.x + plot.w, y);
      ctx.stroke();
      ctx.fillText(fmtBytes((top * i) / 4), plot.x - 4, y);
    }
    // Time axis.
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    const ticks = Math.min(6, slots);
    for (let i = 0; i <= ticks; i++) {
      const slot = Math.round((slots * i) / ticks);
      const x = plot.x + (plot.w * slot) / slots;
      ctx.fillText(fmtTime(from + slot * bucket, g), Math.min(Math.max(x, plot.x + 16), plot.x + plot.w - 16), plot.y + plot.h + 5);
    }

    // Bars.
    const slotW = plot.w / slots;
    const barW = Math.max(1, slotW / 2 - (slotW > 6 ? 1 : 0));
    const bySlot = new Map();
    for (const p of points) {
      const s = Math.floor((p.start_unix_ms - from) / bucket);
      if (s < 0 || s >= slots) continue;
      bySlot.set(s, p);
      const x = plot.x + s * slotW;
      const ub = (p.upload && p.upload.bytes) || 0;
      const db = (p.download && p.download.bytes) || 0;
      const hu = top ? Math.max(ub ? 1 : 0, (plot.h * ub) / top) : 0;
      const hd = top ? Math.max(db ? 1 : 0, (plot.h * db) / top) : 0;
      ctx.fillStyle = colUp;
      ctx.fillRect(x, plot.y + plot.h - hu, barW, hu);
      ctx.fillStyle = colDown;
      ctx.fillRect(x + slotW / 2, plot.y + plot.h - hd, barW, hd);
    }
    if (!points.length) {
      ctx.fillStyle = colMuted;
      ctx.textAlign = 'center';
      ctx.textBaseline = 'middle';
      ctx.font = '13px system-ui, sans-serif';
      ctx.fillText('No traffic in this period', plot.x + plot.w / 2, plot.y + plot.h / 2);
    }

    state.chart = { plot, from, bucket, slots, bySlot, g };
    cv.dataset.drawn = 'true';
    cv.dataset.points = String(bySlot.size);
    cv.dataset.granularity = g;
    cv.dataset.maxBytes = String(max);
    cv.setAttribute(
      'aria-label',
      `Usage history by ${g} for ${u.ip || state.selected}: ${points.length} buckets, uploaded ${fmtBytes(sumUp)}, downloaded ${fmtBytes(sumDown)}`,
    );
    el.legendStats.textContent = points.length
      ? `${fmtTime(from, g)} – now: ↑ ${fmtBytes(sumUp)}, ↓ ${fmtBytes(sumDown)} · peak ↑ ${fmtRate(peakUp)}, ↓ ${fmtRate(peakDown)}`
      : 'No traffic in this period';
  }

  // A round axis maximum above `v`: 1, 2 or 5 times a power of 1024 times a power of 10.
  function niceMax(v) {
    if (v <= 0) return 1024;
    let unit = 1;
    while (v / unit >= 1024) unit *= 1024;
    const x = v / unit;
    const pow = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * pow >= x) return m * pow * unit;
    return 10 * pow * unit;
  }

  function onChartHover(ev) {
    const ch = state.chart;
    if (!ch) return;
    const r = el.chart.getBoundingClientRect();
    const x = ev.clientX - r.left;
    const y = ev.clientY - r.top;
    const s = Math.floor(((x - ch.plot.x) / ch.plot.w) * ch.slots);
    const p = ch.bySlot.get(s);
    if (!p || y < ch.plot.y || y > ch.plot.y + ch.plot.h) {
      el.tooltip.hidden = true;
      return;
    }
    const d = (dir) => {
      const v = p[dir] || {};
      return `${fmtBytes(v.bytes || 0)} · ${fmtInt(v.packets || 0)} pkts · avg ${fmtRate(v.avg_rate || 0)} · peak ${fmtRate(v.peak_rate || 0)}`;
    };
    el.tooltip.textContent = `${new Date(p.start_unix_ms).toLocaleString()} (${ch.g})\n↑ ${d('upload')}\n↓ ${d('download')}`;
    el.tooltip.hidden = false;
    const tw = el.tooltip.offsetWidth;
    el.tooltip.style.left = `${Math.max(0, Math.min(x + 12, r.width - tw))}px`;
    el.tooltip.style.top = `${Math.max(0, y - 64)}px`;
  }

  // ---------- reset ----------

  function askReset() {
    const ip = state.selected;
    if (!ip) return;
    state.resetIp = ip;
    const c = state.byIp.get(ip);
    el.dialogText.textContent =
      `Reset the counters of ${ip}? This closes the current period` +
      (c ? ` (↑ ${fmtBytes(c.up_bytes)}, ↓ ${fmtBytes(c.down_bytes)})` : '') +
      ' and starts a new one from zero. Nothing is lost: the closed period stays in the history.';
    el.dialog.returnValue = '';
    el.dialog.showModal();
  }

  async function doReset(ip) {
    el.reset.disabled = true;
    try {
      const r = await api(`${clientPath(ip)}/reset`, { method: 'POST' });
      const up = (r.closed && r.closed.upload) || {};
      const down = (r.closed && r.closed.download) || {};
      const at = r.at_unix_ms ? new Date(r.at_unix_ms).toLocaleTimeString() : 'now';
      el.resetResult.textContent =
        `Reset at ${at}. Closed period: ↑ ${fmtBytes(up.bytes || 0)} (${fmtInt(up.packets || 0)} packets), ` +
        `↓ ${fmtBytes(down.bytes || 0)} (${fmtInt(down.packets || 0)} packets).`;
      Object.assign(el.resetResult.dataset, {
        ip,
        resetId: r.id || '',
        closedUpBytes: String(up.bytes || 0),
        closedDownBytes: String(down.bytes || 0),
        closedUpPackets: String(up.packets || 0),
        closedDownPackets: String(down.packets || 0),
      });
      el.resetResult.hidden = ip !== state.selected;
      setStatus('ok', `Counters of ${ip} were reset.`);
      if (ip === state.selected) loadUsage();
    } catch (e) {
      setStatus('error', `Reset of ${ip} failed: ${e.describe()}`, e);
      if (e.status === 401) logout(`Signed out: ${e.describe()}`);
    } finally {
      el.reset.disabled = !(state.me && state.me.role === 'admin');
    }
  }

  // ---------- identities (who is behind each address) ----------

  // Display form of a client's `identity` (GET /api/v1/clients). An unchanged identity keeps its
  // object, so rows only re-describe themselves when something changed.
  function prepIdent(raw, prev) {
    const sig = JSON.stringify(raw);
    if (prev && prev.sig === sig) return prev;
    const d = raw.device || null;
    const s = raw.session || null;
    const via = d && d.relation === 'via';
    const up = (s && s.upload_bytes) || 0;
    const down = (s && s.download_bytes) || 0;
    return {
      sig,
      raw,
      username: raw.username || raw.common_name || null,
      protocol: raw.protocol || null,
      deviceName: d ? d.name : '',
      device: d ? (via ? `→ ${d.name}` : `${d.name} (self)`) : null,
      deviceTitle: d
        ? via
          ? `Traffic goes to device ${d.name} (${d.status})`
          : `This client is device ${d.name} (${d.status})`
        : '',
      sessionId: s ? s.id : '',
      opened: s ? s.opened_unix_ms : null,
      up,
      down,
      sessionTitle: s
        ? `Session ${s.id}, opened ${new Date(s.opened_unix_ms).toLocaleString()}: ↑ ${fmtBytes(up)}, ↓ ${fmtBytes(down)}`
        : '',
    };
  }

  const sessionText = (id, now) =>
    `${id.sessionId.slice(0, 8)} · ${fmtDuration(now - id.opened)} · ${fmtBytes(id.up + id.down)}`;

  async function refreshIdents() {
    if (!state.token) return;
    // One chain of refreshes: a sign-out or a new sign-in makes an answer in flight stale.
    const seq = ++state.identSeq;
    let delay = IDENTITY_REFRESH_MS;
    try {
      const list = await api('/api/v1/clients');
      if (seq !== state.identSeq || !state.token) return;
      const n = ((list && list.clients) || []).length;
      delay = Math.min(IDENTITY_REFRESH_MAX_MS, Math.max(IDENTITY_REFRESH_MS, n));
      const next = new Map();
      for (const c of (list && list.clients) || []) {
        if (c && c.ip && c.identity) next.set(c.ip, prepIdent(c.identity, state.idents.get(c.ip)));
      }
      state.idents = next;
      let changed = false;
      for (const c of state.rows) {
        const ident = next.get(c.ip) || null;
        if (c.ident !== ident) {
          describe(c, c.name, ident);
          changed = true;
        }
      }
      el.table.dataset.identities = String(next.size);
      if (changed) {
        state.viewDirty = true;
        scheduleRender();
      }
    } catch (e) {
      // The table keeps the identities it has; the next refresh tries again.
      if (e.status === 401 && seq === state.identSeq) logout(`Signed out: ${e.describe()}`);
    } finally {
      // The next refresh, unless signed out (or signed in again: that started its own).
      if (seq === state.identSeq && state.token) state.identTimer = setTimeout(refreshIdents, delay);
    }
  }

  // ---------- registry: devices, connections, active sessions ----------

  const isAdmin = () => !!(state.me && state.me.role === 'admin');

  // A message next to a form or list: kind ok, error or busy; an error keeps the server's code
  // and HTTP status in data attributes.
  function showMsg(p, kind, text, err) {
    p.hidden = !text;
    p.textContent = text || '';
    p.dataset.kind = kind || '';
    p.dataset.code = (err && err.code) || '';
    p.dataset.httpStatus = err && err.status ? String(err.status) : '';
    p.setAttribute('role', kind === 'error' ? 'alert' : 'status');
  }

  // Forms and delete buttons need an admin token: a read token sees them disabled, with a note.
  function applyRole() {
    const admin = isAdmin();
    el.deviceFields.disabled = !admin;
    el.connFields.disabled = !admin;
    for (const n of el.registry.querySelectorAll('.ro-note')) n.hidden = admin;
    for (const b of el.registry.querySelectorAll('button[data-action]')) {
      b.disabled = !admin;
      b.title = admin ? '' : 'Needs an admin token';
    }
  }

  function startRefresh() {
    stopRefresh();
    refreshIdents();
    loadRegistry();
    loadSelfCheck();
    state.registryTimer = setInterval(() => {
      loadRegistry();
      loadSelfCheck();
    }, REGISTRY_REFRESH_MS);
  }

  // The node's self-check (device counters held against the programs'): one line in the top
  // bar, "drift" when a device counted packets the programs never saw.
  async function loadSelfCheck() {
    if (!state.token) return;
    let sc = null;
    try {
      const s = await api('/api/v1/stats');
      sc = s && s.self_check;
    } catch {
      sc = null;
    }
    if (!sc || !state.token) {
      el.selfcheck.hidden = true;
      return;
    }
    const drifting = [];
    const lines = [];
    for (const i of sc.interfaces) {
      lines.push(`${i.interface}: ${i.status}${i.reason ? ` (${i.reason})` : ''}`);
      for (const d of ['upload', 'download']) {
        if (i[d].alerting) drifting.push(`${i.interface} ${d}: ${i[d].missed_packets} packets missed`);
      }
    }
    let st = 'ok';
    let text = 'self-check ok';
    if (drifting.length) {
      st = 'drift';
      text = `ledger drift: ${drifting.join('; ')}`;
    } else if (!sc.interfaces.length || sc.interfaces.every((i) => i.status === 'starting')) {
      st = 'starting';
      text = 'self-check starting';
    } else if (sc.interfaces.some((i) => i.status === 'unchecked')) {
      text = 'self-check ok (some devices unchecked)';
    }
    el.selfcheck.textContent = text;
    el.selfcheck.dataset.state = st;
    el.selfcheck.title = lines.join('\n');
    el.selfcheck.hidden = false;
  }

  function stopRefresh() {
    clearTimeout(state.identTimer);
    clearInterval(state.registryTimer);
    state.identSeq++;
    state.registrySeq++;
    state.idents = new Map();
    state.devices = [];
    state.connections = [];
    state.sessions = [];
    renderRegistry();
    if (el.confirm.open) el.confirm.close('cancel');
  }

  async function loadRegistry() {
    if (!state.token) return;
    const seq = ++state.registrySeq;
    const [d, c, s] = await Promise.allSettled([
      api('/api/v1/devices'),
      api('/api/v1/connections'),
      api('/api/v1/sessions?active=true'),
    ]);
    if (seq !== state.registrySeq || !state.token) return;
    const take = (r, key, load, what) => {
      if (r.status === 'fulfilled') {
        state[key] = (r.value && r.value[key]) || [];
        showMsg(load, '', '');
        return;
      }
      const e = r.reason;
      if (e && e.status === 401) logout(`Signed out: ${e.describe()}`);
      else showMsg(load, 'error', `Cannot load ${what}: ${e && e.describe ? e.describe() : e}`, e);
    };
    take(d, 'devices', el.devicesLoad, 'devices');
    take(c, 'connections', el.connectionsLoad, 'connections');
    take(s, 'sessions', el.sessionsLoad, 'sessions');
    if (state.token) renderRegistry();
  }

  // Replace a list's rows only when they changed (a periodic refresh must not steal focus).
  function setRows(body, empty, count, html, n, noun) {
    if (body.dataset.html !== html) {
      body.innerHTML = html;
      body.dataset.html = html;
    }
    body.dataset.count = String(n);
    empty.hidden = n > 0 || !state.token;
    count.textContent = state.token ? `${n} ${noun}${n === 1 ? '' : 's'}` : '';
  }

  const delButton = (action, id, label, text) =>
    `<button type="button" class="small" data-action="${action}" data-id="${esc(id)}" aria-label="${esc(label)}"` +
    `${isAdmin() ? '' : ' disabled title="Needs an admin token"'}>${esc(text)}</button>`;

  function renderRegistry() {
    const now = Date.now();
    const devices = state.devices.map((d) => {
      const when = d.status_changed_unix_ms ? ` <span class="muted">${esc(fmtAgo(d.status_changed_unix_ms, now))}</span>` : '';
      return (
        `<tr data-id="${esc(d.id)}" data-name="${esc(d.name)}" data-vpn-ip="${esc(d.vpn_ip)}" data-online="${!!d.online}">` +
        `<td>${esc(d.name)}</td><td class="mono">${esc(d.vpn_ip)}</td>` +
        `<td><span class="dot${d.online ? ' on' : ''}"></span> ${d.online ? 'online' : 'offline'}</td>` +
        `<td>${esc(d.status || 'unknown')}${when}</td><td class="num">${fmtInt(d.connections ?? 0)}</td>` +
        `<td class="actions">${delButton('delete-device', d.id, `Delete device ${d.name}`, 'Delete')}</td></tr>`
      );
    });
    setRows(el.devicesBody, el.devicesEmpty, el.devicesCount, devices.join(''), devices.length, 'device');

    const conns = state.connections.map((c) => {
      const ovpn = c.protocol === 'openvpn';
      const first = ovpn ? `<span class="muted">user</span> ${esc(c.username ?? '—')}` : esc(c.public_port ?? '—');
      const second = ovpn ? `<span class="muted">proxy</span> ${esc(c.proxy_port ?? '—')}` : esc(c.device_port ?? '—');
      const dev = c.device_name
        ? `${esc(c.device_name)}${c.device_vpn_ip ? ` <span class="muted mono">${esc(c.device_vpn_ip)}</span>` : ''}`
        : esc(c.device_id);
      const label = ovpn ? `Delete the openvpn connection of ${c.username}` : `Delete the ${c.protocol} connection on port ${c.public_port}`;
      return (
        `<tr data-id="${esc(c.id)}" data-protocol="${esc(c.protocol)}" data-device="${esc(c.device_name || '')}"` +
        ` data-public-port="${esc(c.public_port ?? '')}" data-device-port="${esc(c.device_port ?? '')}"` +
        ` data-username="${esc(c.username ?? '')}" data-proxy-port="${esc(c.proxy_port ?? '')}" data-rule="${esc(c.rule ?? '')}">` +
        `<td>${esc(c.protocol)}</td><td>${dev}</td><td>${first}</td><td>${second}</td>` +
        `<td>${c.rule != null ? `#${esc(c.rule)}` : '<span class="muted">—</span>'}</td>` +
        `<td class="actions">${delButton('delete-connection', c.id, label, 'Delete')}</td></tr>`
      );
    });
    setRows(el.connectionsBody, el.connectionsEmpty, el.connectionsCount, conns.join(''), conns.length, 'connection');

    const sessions = state.sessions.map((s) => {
      const who = s.username || s.common_name || '';
      return (
        `<tr data-id="${esc(s.id)}" data-client-ip="${esc(s.client_ip)}" data-username="${esc(who)}">` +
        `<td class="mono">${esc(s.client_ip)}</td><td>${esc(who || '—')}</td><td>${esc(s.protocol || '—')}</td>` +
        `<td title="${esc(new Date(s.opened_unix_ms).toLocaleString())}">${esc(fmtDuration(now - s.opened_unix_ms))} ago</td>` +
        `<td class="num">${esc(fmtBytes(s.up_bytes))}</td><td class="num">${esc(fmtBytes(s.down_bytes))}</td>` +
        `<td class="actions">${delButton('close-session', s.id, `Close the session of ${s.client_ip}`, 'Close')}</td></tr>`
      );
    });
    setRows(el.sessionsBody, el.sessionsEmpty, el.sessionsCount, sessions.join(''), sessions.length, 'session');

    // The device choice of the connection form follows the device list.
    const opts = state.devices.length
      ? state.devices.map((d) => `<option value="${esc(d.id)}">${esc(d.name)} (${esc(d.vpn_ip)})</option>`).join('')
      : '<option value="">— add a device first —</option>';
    if (el.connDevice.dataset.html !== opts) {
      const cur = el.connDevice.value;
      el.connDevice.innerHTML = opts;
      el.connDevice.dataset.html = opts;
      if (cur && state.devices.some((d) => d.id === cur)) el.connDevice.value = cur;
    }
  }

  // Show the fields of the chosen protocol: ports for http/socks5, username and proxy port for openvpn.
  function syncProtocol() {
    const ovpn = el.connProtocol.value === 'openvpn';
    for (const l of el.connForm.querySelectorAll('.when-port')) l.hidden = ovpn;
    for (const l of el.connForm.querySelectorAll('.when-user')) l.hidden = !ovpn;
    el.connPublicPort.required = !ovpn;
    el.connDevicePort.required = !ovpn;
    el.connUsername.required = ovpn;
    el.connProxyPort.required = ovpn;
    el.connForm.dataset.protocol = el.connProtocol.value;
  }

  // POST a form's body; the API's answer (or its error, code and HTTP status) goes next to the form.
  async function submit(fields, msg, path, body, done) {
    fields.disabled = true;
    showMsg(msg, 'busy', 'Saving…');
    try {
      const r = await api(path, { method: 'POST', body });
      showMsg(msg, 'ok', done(r));
      loadRegistry();
      return true;
    } catch (e) {
      showMsg(msg, 'error', e.describe(), e);
      if (e.status === 401) logout(`Signed out: ${e.describe()}`);
      return false;
    } finally {
      fields.disabled = !isAdmin();
    }
  }

  async function submitDevice(ev) {
    ev.preventDefault();
    const body = { name: el.deviceName.value.trim(), vpn_ip: el.deviceIp.value.trim() };
    const ok = await submit(el.deviceFields, el.deviceMsg, '/api/v1/devices', body, (d) => `Device ${d.name} (${d.vpn_ip}) added.`);
    if (ok) el.deviceForm.reset();
  }

  async function submitConnection(ev) {
    ev.preventDefault();
    const port = (input) => (input.value.trim() === '' ? undefined : Number(input.value));
    const protocol = el.connProtocol.value;
    const body = { device_id: el.connDevice.value, protocol };
    if (protocol === 'openvpn') {
      body.username = el.connUsername.value.trim();
      body.proxy_port = port(el.connProxyPort);
    } else {
      body.public_port = port(el.connPublicPort);
      body.device_port = port(el.connDevicePort);
    }
    const ok = await submit(el.connFields, el.connMsg, '/api/v1/connections', body, (c) =>
      c.protocol === 'openvpn'
        ? `Connection added: user ${c.username} → proxy port ${c.proxy_port}.`
        : `Connection added: ${c.protocol} on public port ${c.public_port} → device port ${c.device_port}.`,
    );
    if (ok) for (const i of [el.connPublicPort, el.connDevicePort, el.connUsername, el.connProxyPort]) i.value = '';
  }

  function askConfirm(title, text, okLabel, action) {
    state.confirmAction = action;
    el.confirmTitle.textContent = title;
    el.confirmText.textContent = text;
    el.confirmOk.textContent = okLabel;
    el.confirm.returnValue = '';
    el.confirm.showModal();
  }

  // A confirmed delete (or close): `what` names it ("Delete device phone-1"), `done` says it worked.
  async function remove(method, path, msg, what, done) {
    showMsg(msg, 'busy', `${what}…`);
    try {
      await api(path, { method });
      showMsg(msg, 'ok', done);
      loadRegistry();
    } catch (e) {
      showMsg(msg, 'error', `${what} failed: ${e.describe()}`, e);
      if (e.status === 401) logout(`Signed out: ${e.describe()}`);
    }
  }

  function onRegistryAction(ev) {
    const b = ev.target.closest('button[data-action]');
    if (!b || b.disabled) return;
    const id = b.dataset.id;
    const enc = encodeURIComponent(id);
    if (b.dataset.action === 'delete-device') {
      const d = state.devices.find((x) => x.id === id);
      if (!d) return;
      askConfirm(
        'Delete device?',
        `Delete device ${d.name} (${d.vpn_ip})? A device that still has connections cannot be deleted.`,
        'Delete device',
        () => remove('DELETE', `/api/v1/devices/${enc}`, el.deviceMsg, `Delete device ${d.name}`, `Device ${d.name} deleted.`),
      );
    } else if (b.dataset.action === 'delete-connection') {
      const c = state.connections.find((x) => x.id === id);
      if (!c) return;
      const what =
        c.protocol === 'openvpn'
          ? `the openvpn connection of user ${c.username} (proxy port ${c.proxy_port})`
          : `the ${c.protocol} connection on public port ${c.public_port} (device ${c.device_name || c.device_id}, port ${c.device_port}); its forward rule is removed`;
      askConfirm('Delete connection?', `Delete ${what}?`, 'Delete connection', () =>
        remove('DELETE', `/api/v1/connections/${enc}`, el.connMsg, `Delete the ${c.protocol} connection`, `The ${c.protocol} connection was deleted.`),
      );
    } else if (b.dataset.action === 'close-session') {
      const s = state.sessions.find((x) => x.id === id);
      if (!s) return;
      askConfirm(
        'Close session?',
        `Close the session of ${s.client_ip}${s.username ? ` (${s.username})` : ''}? Its byte counts become final now.`,
        'Close session',
        () => remove('POST', `/api/v1/sessions/${enc}/close`, el.sessionsMsg, `Close the session of ${s.client_ip}`, `The session of ${s.client_ip} was closed.`),
      );
    }
  }

  // ---------- wiring ----------

  el.loginForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const t = el.token.value.trim();
    if (t) login(t);
  });
  el.logout.addEventListener('click', () => logout());
  el.filter.addEventListener('input', () => {
    state.filter = el.filter.value.trim().toLowerCase();
    state.viewDirty = true;
    el.viewport.scrollTop = 0;
    scheduleRender();
  });
  el.table.querySelector('.thead').addEventListener('click', (ev) => {
    const h = ev.target.closest('[role=columnheader]');
    if (h) setSort(h.dataset.key);
  });
  el.viewport.addEventListener('scroll', scheduleRender, { passive: true });
  el.viewport.addEventListener('click', (ev) => {
    const row = ev.target.closest('.row');
    if (row && row.dataset.ip) select(row.dataset.ip);
  });
  // Keyboard: arrows move the selection (and the detail panel) through the sorted, filtered rows.
  el.viewport.addEventListener('keydown', (ev) => {
    const step = { ArrowDown: 1, ArrowUp: -1, PageDown: 10, PageUp: -10, Home: -Infinity, End: Infinity }[ev.key];
    if (step === undefined || !state.view.length) return;
    ev.preventDefault();
    const cur = state.view.findIndex((c) => c.ip === state.selected);
    const base = cur < 0 ? (step > 0 ? -1 : state.view.length) : cur;
    const i = Math.max(0, Math.min(state.view.length - 1, base + (Number.isFinite(step) ? step : step * state.view.length)));
    const y = i * ROW_H;
    const vp = el.viewport;
    if (y < vp.scrollTop) vp.scrollTop = y;
    else if (y + ROW_H > vp.scrollTop + vp.clientHeight) vp.scrollTop = y + ROW_H - vp.clientHeight;
    select(state.view[i].ip);
  });
  el.detailClose.addEventListener('click', closeDetail);
  el.detail.querySelector('.granularity').addEventListener('click', (ev) => {
    const b = ev.target.closest('[data-granularity]');
    if (b) setGranularity(b.dataset.granularity);
  });
  el.chart.addEventListener('mousemove', onChartHover);
  el.chart.addEventListener('mouseleave', () => (el.tooltip.hidden = true));
  new ResizeObserver(() => {
    if (state.usage && !el.detail.hidden) drawChart();
  }).observe(el.chart);
  new ResizeObserver(scheduleRender).observe(el.viewport);
  window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => {
    if (state.usage && !el.detail.hidden) drawChart(); // the chart's colours come from the theme
  });
  el.reset.addEventListener('click', askReset);
  el.dialog.addEventListener('close', () => {
    const ip = state.resetIp;
    state.resetIp = null;
    if (el.dialog.returnValue === 'confirm' && ip) doReset(ip);
  });
  el.deviceForm.addEventListener('submit', submitDevice);
  el.connForm.addEventListener('submit', submitConnection);
  el.connProtocol.addEventListener('change', syncProtocol);
  el.registry.addEventListener('click', onRegistryAction);
  el.confirm.addEventListener('close', () => {
    const action = state.confirmAction;
    state.confirmAction = null;
    if (el.confirm.returnValue === 'confirm' && action) action();
  });
  document.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape' && !el.detail.hidden && !el.dialog.open && !el.confirm.open) closeDetail();
  });

  syncProtocol();
  renderRegistry();

  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) login(saved, { fromStorage: true });
  else showLogin();
})();
