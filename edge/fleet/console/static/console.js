// edge-voice fleet console: follows /api/stream (server-sent events) and sends commands to /api/cmd.
// Everything from devices is put into the page as text (textContent), never as HTML.
'use strict';
(() => {
  const ACTIVITY = {
    idle: ['–', 'idle'], listening: ['◉', 'listening'], thinking: ['…', 'thinking'], speaking: ['▶', 'speaking'],
  };
  const FEED_MAX = 150;
  const CHART_WINDOW_S = 6 * 3600;
  // Updates are applied in batches, at most this often: a busy fleet sends tens of events a
  // second, and one layout per batch keeps the page light while staying well within a second.
  const FRAME_MS = 100;

  const $ = (sel, root = document) => root.querySelector(sel);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };
  const svg = (tag, attrs) => {
    const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  };

  const S = {
    devices: new Map(), tiles: new Map(), feed: new Map(), feedEls: new Map(), rollouts: new Map(),
    summaryEls: null, lastFlush: 0,
    offset: 0, selected: null, details: null, feedDevice: null, paused: false,
    dirty: new Set(), feedDirty: new Set(), rolloutsDirty: false, summaryDirty: true, orderDirty: true,
    user: null, actions: [], scheduled: false, pending: [],
  };

  // Measurement aid: when each event happened on the device (t), reached the console (r), reached
  // the page and was on the page. edgeConsole.take() hands them over (scripts that measure latency).
  const marks = [];
  window.edgeConsole = {
    take() { return marks.splice(0, marks.length); },
    get devices() { return S.devices.size; },
    lastTick: null,
  };

  const now = () => (Date.now() + S.offset) / 1000; // the console's clock, in seconds

  function age(seconds) {
    const s = Math.max(0, seconds);
    if (s < 60) return `${Math.floor(s)}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m`;
    if (s < 86400) return `${(s / 3600).toFixed(1)}h`;
    return `${(s / 86400).toFixed(1)}d`;
  }
  const clock = (t) => {
    if (typeof t !== 'number') return '--:--:--';
    const d = new Date(t * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  };
  const ms = (v) => (typeof v === 'number' ? `${Math.round(v)} ms` : '–');
  const short = (v) => {
    if (v === null || v === undefined) return '–';
    if (typeof v === 'string') return v;
    if (typeof v === 'object' && !Array.isArray(v)) {
      if (v.name || v.id) return `${v.name || v.id}${v.version ? '@' + v.version : ''}`;
      return Object.entries(v).map(([k, x]) => `${k}=${typeof x === 'object' ? JSON.stringify(x) : x}`).join(' ');
    }
    return JSON.stringify(v);
  };

  // -- what a device is -------------------------------------------------------------------
  function connection(d) {
    if (d.online === null || d.online === undefined) return { cls: 'unknown', text: '? unknown', since: null };
    if (d.state === 'unreadable') return { cls: 'warn', text: '⚠ unreadable status', since: null };
    if (!d.online) {
      const reason = d.reason ? ` (${d.reason})` : '';
      if (d.offline_seen) return { cls: 'offline', text: `○ offline${reason}`, since: d.offline_seen };
      if (d.lost) return { cls: 'offline', text: `○ offline${reason}`, since: null, before: d.connected_before };
      return { cls: 'offline', text: `○ offline${reason}`, since: d.since };
    }
    if (d.state && d.state !== 'online') {
      return { cls: 'warn', text: `⚠ ${d.state.replace(/_/g, ' ')}`, since: d.since };
    }
    return { cls: 'online', text: '● online', since: d.since };
  }
  function activity(d) {
    if (!d.online || !d.activity) return null;
    const [sym, word] = ACTIVITY[d.activity] || ['·', d.activity];
    return { cls: ACTIVITY[d.activity] ? d.activity : 'idle', text: `${sym} ${word}` };
  }
  function sinceText(conn) {
    if (conn.since) return age(now() - conn.since);
    if (conn.before) return `≤ ${age(now() - conn.before)}`;
    return '';
  }
  function busy(d) { return d.online && ['listening', 'thinking', 'speaking'].includes(d.activity); }
  function recentError(d) {
    const e = d.last_error;
    return e && typeof e === 'object' && typeof e.time === 'number' && now() - e.time < 3600;
  }
  function problem(d) { return !d.online || (d.state && d.state !== 'online') || recentError(d); }

  // -- the grid ---------------------------------------------------------------------------
  function makeTile(id) {
    const t = el('article', 'tile');
    t.setAttribute('role', 'listitem');
    t.tabIndex = 0;
    t.dataset.device = id;
    const top = el('div', 'row');
    t.idEl = el('span', 'id', id);
    t.sinceEl = el('span', 'since');
    top.append(t.idEl, t.sinceEl);
    const badges = el('div', 'row');
    t.connEl = el('span', 'badge conn');
    t.actEl = el('span', 'badge act');
    badges.append(t.connEl, t.actEl);
    t.liveEl = el('p', 'live');
    t.roEl = el('div', 'ro');
    t.metaEl = el('div', 'meta');
    t.errEl = el('p', 'err');
    t.append(top, badges, t.liveEl, t.roEl, t.metaEl, t.errEl);
    t.addEventListener('click', () => openDetails(id));
    t.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); openDetails(id); } });
    return t;
  }

  function renderTile(t, d) {
    const conn = connection(d);
    const act = activity(d);
    t.classList.toggle('offline', conn.cls === 'offline');
    t.classList.toggle('warn', conn.cls === 'warn');
    t.classList.toggle('selected', S.selected === d.device_id);
    t.dataset.online = d.online ? 'yes' : 'no';
    t.dataset.activity = act ? act.cls : 'none';
    t.connEl.className = `badge conn b-${conn.cls}`;
    t.connEl.textContent = conn.text;
    t.conn = conn;
    t.sinceEl.textContent = sinceText(conn);
    t.actEl.hidden = !act;
    if (act) { t.actEl.className = `badge act b-${act.cls}`; t.actEl.textContent = act.text; }
    t.liveEl.textContent = '';
    if (busy(d) && (d.hearing || d.saying)) {
      if (d.saying) t.liveEl.append(el('span', 'said', `“${d.saying}”`));
      else t.liveEl.append(el('span', 'heard', `“${d.hearing}”`));
    } else if (d.last_turn && typeof d.last_turn === 'object' && typeof d.last_turn.time === 'number') {
      const lt = d.last_turn;
      t.liveEl.textContent = `last turn ${age(now() - lt.time)} ago, ${lt.outcome || '?'}` +
        (typeof lt.first_audio_ms === 'number' ? `, ${Math.round(lt.first_audio_ms)} ms` : '');
    }
    const ro = d.rollout;
    t.roEl.textContent = ro ? `rollout ${ro.rollout_id}: ${ro.outcome || ro.phase}` +
      (typeof ro.percent === 'number' && !ro.outcome ? ` ${Math.round(ro.percent)} %` : '') : '';
    const meta = [d.version ? `v${d.version}` : null, d.knowledge ? `📚 ${short(d.knowledge)}` : null,
      (d.tags || []).join(' ')].filter(Boolean);
    t.metaEl.textContent = meta.join(' · ');
    t.metaEl.title = `${meta.join('\n')}\n${short(d.models)}`;
    const e = d.last_error;
    t.errEl.textContent = e && typeof e === 'object' && recentError(d)
      ? `✕ ${age(now() - e.time)} ago ${e.code || 'error'}: ${e.message || ''}` : '';
    t.hidden = !visible(d);
  }

  function visible(d) {
    const show = $('#show').value;
    if (show === 'online' && !d.online) return false;
    if (show === 'offline' && d.online) return false;
    if (show === 'busy' && !busy(d)) return false;
    if (show === 'problems' && !problem(d)) return false;
    const q = $('#filter').value.trim().toLowerCase();
    if (!q) return true;
    const hay = [d.device_id, d.version || '', ...(d.tags || []), short(d.knowledge)].join(' ').toLowerCase();
    return q.split(/\s+/).every((w) => hay.includes(w));
  }

  function renderSummary() {
    const box = $('#summary');
    const all = [...S.devices.values()];
    const count = (f) => all.filter(f).length;
    const items = [
      ['all', '▦', 'devices', all.length],
      ['online', '●', 'online', count((d) => d.online)],
      ['offline', '○', 'offline', count((d) => !d.online)],
      ['busy', '◉', 'listening', count((d) => d.online && d.activity === 'listening')],
      ['busy', '…', 'thinking', count((d) => d.online && d.activity === 'thinking')],
      ['busy', '▶', 'speaking', count((d) => d.online && d.activity === 'speaking')],
      ['problems', '⚠', 'need attention', count(problem)],
    ];
    if (!S.summaryEls) {
      S.summaryEls = [];
      for (const [show, sym, word] of items) {
        const b = el('button', `sum sum-${word.replace(/\s/g, '-')}`);
        b.type = 'button';
        b.dataset.show = show;
        const n = el('span', 'n');
        b.append(el('span', 'sym', sym), n, el('span', 'w', word));
        b.addEventListener('click', () => { $('#show').value = show; refilter(); });
        box.append(b);
        S.summaryEls.push(n);
      }
    }
    items.forEach(([, , , n], i) => { if (S.summaryEls[i].textContent !== String(n)) S.summaryEls[i].textContent = n; });
    $('#empty').hidden = all.length > 0;
  }

  function refilter() {
    for (const [id, t] of S.tiles) t.hidden = !visible(S.devices.get(id));
  }

  function placeTiles() {
    const grid = $('#grid');
    const ids = [...S.tiles.keys()].sort();
    ids.forEach((id, i) => {
      const t = S.tiles.get(id);
      if (grid.children[i] !== t) grid.insertBefore(t, grid.children[i] || null);
    });
  }

  // -- the feed ---------------------------------------------------------------------------
  function feedItem(item) {
    const li = el('li', item.kind === 'turn' ? 'turn' : `note ${item.kind}`);
    li.dataset.key = item.key;
    li.dataset.device = item.device_id || '';
    return li;
  }

  function renderFeedItem(li, item) {
    li.textContent = '';
    const line = el('div', 'line');
    line.append(el('time', '', clock(item.time)));
    if (item.device_id) {
      const b = el('button', 'dev quiet', item.device_id);
      b.type = 'button';
      b.addEventListener('click', () => openDetails(item.device_id));
      line.append(b);
    }
    if (item.kind === 'turn') {
      li.className = `turn outcome-${item.outcome || 'open'}`;
      const state = item.outcome ? item.outcome : 'in progress';
      line.append(el('span', `badge ${item.outcome === 'done' ? 'b-online' : item.outcome ? 'b-warn' : 'b-listening'}`, state));
      if (item.barge_in) line.append(el('span', 'badge b-warn', 'barge-in'));
      const lat = el('span', 'lat', typeof item.first_audio_ms === 'number' ? `first audio ${Math.round(item.first_audio_ms)} ms` : '');
      lat.title = 'end of speech to first audio';
      line.append(lat);
      li.append(line);
      if (item.question) li.append(el('p', 'heard q', item.question));
      else if (item.heard_partial) li.append(el('p', 'heard q partial', item.heard_partial));
      else if (item.wake_word) li.append(el('p', 'partial', `woken by ${item.wake_word}`));
      if (item.reply) li.append(el('p', 'said a', item.reply));
      if (item.error) li.append(el('p', 'err', `✕ ${item.error.code || 'error'}: ${item.error.message || ''}`));
    } else {
      li.append(line);
      li.append(el('p', '', item.text || item.kind));
    }
  }

  function feedShown(item) {
    return !S.feedDevice || item.device_id === S.feedDevice;
  }

  function upsertFeed(item) {
    const known = S.feed.get(item.key);
    if (known) Object.assign(known, item); else S.feed.set(item.key, item);
    while (S.feed.size > FEED_MAX * 2) S.feed.delete(S.feed.keys().next().value);
    S.feedDirty.add(item.key);
  }

  function renderFeed(all) {
    const list = $('#feed');
    if (all) {
      list.textContent = '';
      S.feedEls.clear();
      const items = [...S.feed.values()].filter(feedShown).sort((a, b) => a.time - b.time).slice(-FEED_MAX);
      for (const item of items) {
        const li = feedItem(item);
        renderFeedItem(li, item);
        list.prepend(li);
        S.feedEls.set(item.key, li);
      }
      S.feedDirty.clear();
      return;
    }
    if (S.paused) return;
    for (const key of S.feedDirty) {
      const item = S.feed.get(key);
      if (!item || !feedShown(item)) continue;
      let li = S.feedEls.get(key);
      if (!li) { li = feedItem(item); list.prepend(li); S.feedEls.set(key, li); }
      renderFeedItem(li, item);
    }
    S.feedDirty.clear();
    while (list.children.length > FEED_MAX) {
      const last = list.lastElementChild;
      S.feedEls.delete(last.dataset.key);
      last.remove();
    }
  }

  // -- rollouts ---------------------------------------------------------------------------
  function renderRollouts() {
    const box = $('#rollouts');
    const recent = [...S.rollouts.values()].filter((r) => r.running || now() - r.updated < 86400)
      .sort((a, b) => (b.running - a.running) || (b.updated - a.updated)).slice(0, 3);
    box.hidden = recent.length === 0;
    box.textContent = '';
    for (const r of recent) {
      const div = el('div', 'rollout');
      div.dataset.rollout = r.id;
      const head = el('div', 'head');
      head.append(el('strong', '', `Rollout ${r.id}${r.target ? ' → ' + r.target : ''}`),
        el('span', `badge ${r.running ? 'b-listening' : r.failed || r.rolled_back ? 'b-offline' : 'b-online'}`,
          r.running ? '▶ running' : '■ finished'),
        el('span', 'pct', `${r.percent} %`),
        el('span', '', `${r.succeeded} succeeded · ${r.failed} failed · ${r.rolled_back} rolled back · ` +
          `${r.working} working, of ${r.devices} device(s)`));
      const bar = el('progress');
      bar.max = 100;
      bar.value = r.percent;
      bar.setAttribute('aria-label', `rollout ${r.id} progress`);
      div.append(head, bar);
      const phases = Object.entries(r.phases || {}).map(([p, n]) => `${p}: ${n}`).join(' · ');
      if (phases) div.append(el('p', 'phases', `working: ${phases}`));
      if (r.trouble && r.trouble.length) {
        div.append(el('p', 'trouble', 'trouble: ' + r.trouble.map((s) =>
          `${s.device_id} ${s.outcome}${s.message ? ' (' + s.message + ')' : ''}`).join('; ')));
      }
      box.append(div);
    }
    S.rolloutsDirty = false;
  }

  // -- details ----------------------------------------------------------------------------
  async function openDetails(id) {
    const previous = S.selected;
    S.selected = id;
    S.feedDevice = id;
    if (previous && S.tiles.has(previous)) S.dirty.add(previous);
    S.dirty.add(id);
    $('#details').hidden = false;
    $('#d-title').textContent = id;
    $('#d-answer').hidden = true;
    $('#feed-scope').hidden = false;
    $('#feed-scope').textContent = `only ${id} ✕`;
    renderFeed(true);
    S.details = { device_id: id, turns: [], latency: [], events: [], status: null };
    renderDetails();
    schedule();
    try {
      const r = await fetch(`/api/device/${encodeURIComponent(id)}`, { credentials: 'same-origin' });
      if (r.status === 401) { location.href = '/login'; return; }
      if (!r.ok) return;
      const data = await r.json();
      if (S.selected !== id) return;
      S.offset = data.now * 1000 - Date.now();
      S.details = { device_id: id, turns: data.turns, latency: data.latency, events: data.events, status: data.status };
      renderDetails();
    } catch (err) {
      toast(`could not load ${id}: ${err}`);
    }
    $('#d-close').focus();
  }

  function closeDetails() {
    const id = S.selected;
    S.selected = null;
    S.details = null;
    S.feedDevice = null;
    $('#details').hidden = true;
    $('#feed-scope').hidden = true;
    renderFeed(true);
    if (id && S.tiles.has(id)) { S.dirty.add(id); schedule(); S.tiles.get(id).focus(); }
  }

  function fact(dl, name, value) {
    dl.append(el('dt', '', name), el('dd', '', value === null || value === undefined || value === '' ? '–' : value));
  }

  function renderDetails() {
    const det = S.details;
    if (!det) return;
    const d = S.devices.get(det.device_id) || { device_id: det.device_id };
    const conn = connection(d);
    const act = activity(d);
    const c = $('#d-conn');
    c.className = `badge b-${conn.cls}`;
    c.textContent = `${conn.text}${sinceText(conn) ? ' ' + sinceText(conn) : ''}`;
    const a = $('#d-act');
    a.hidden = !act;
    if (act) { a.className = `badge b-${act.cls}`; a.textContent = act.text; }
    const live = $('#d-live');
    live.textContent = '';
    if (busy(d)) {
      if (d.hearing) live.append(el('span', 'heard', `“${d.hearing}”`));
      if (d.saying) live.append(el('span', 'said', ` “${d.saying}”`));
    }
    const canCommand = S.user && S.user.role === 'operator';
    for (const b of document.querySelectorAll('#d-actions button')) b.disabled = !canCommand || !d.online;
    const dl = $('#d-status');
    dl.textContent = '';
    fact(dl, 'Connection', `${conn.text} ${sinceText(conn)}`);
    fact(dl, 'Status detail', d.detail);
    fact(dl, 'Version', d.version);
    fact(dl, 'Models', short(d.models));
    fact(dl, 'Knowledge', d.knowledge ? short(d.knowledge) : null);
    fact(dl, 'Tags', (d.tags || []).join(', '));
    const lt = d.last_turn;
    fact(dl, 'Last turn', lt && typeof lt === 'object'
      ? `${age(now() - (lt.time || 0))} ago, ${lt.outcome || '?'}, first audio ${ms(lt.first_audio_ms)}` : null);
    const le = d.last_error;
    fact(dl, 'Last error', le && typeof le === 'object'
      ? `${age(now() - (le.time || 0))} ago, ${le.code || '?'}: ${le.message || ''}` : null);
    if (d.rollout) fact(dl, 'Rollout', `${d.rollout.rollout_id}: ${d.rollout.phase}` +
      (d.rollout.outcome ? ` (${d.rollout.outcome})` : '') +
      (typeof d.rollout.percent === 'number' ? ` ${Math.round(d.rollout.percent)} %` : ''));
    if (det.status && typeof det.status.uptime_s === 'number') fact(dl, 'Uptime at last status', age(det.status.uptime_s));
    renderTurns(det);
    renderChart(det);
    const ev = $('#d-events');
    ev.textContent = '';
    for (const e of det.events.slice(0, 40)) {
      ev.append(el('li', '', `${clock(e.time)}  ${e.type}${e.text ? '  ' + e.text : ''}`));
    }
  }

  function renderTurns(det) {
    const body = $('#d-turns');
    body.textContent = '';
    for (const turn of det.turns) {
      const tr = el('tr');
      tr.dataset.turn = turn.turn_id;
      tr.append(el('td', 'num', clock(turn.time)), el('td', '', turn.question || turn.heard_partial || '–'),
        el('td', '', turn.reply || (turn.error ? `✕ ${turn.error.code}: ${turn.error.message}` : '–')),
        el('td', 'num', ms(turn.first_audio_ms)), el('td', '', turn.outcome || 'in progress'));
      const timings = Object.entries(turn.timings_ms || {}).filter(([k]) => k !== 'end_of_speech_to_first_audio')
        .map(([k, v]) => `${k.replace(/_/g, ' ')} ${Math.round(v)}`).join(' · ');
      tr.append(el('td', 'timings', timings || '–'));
      body.append(tr);
    }
    if (!det.turns.length) {
      const tr = el('tr');
      const td = el('td', '', 'No turn seen since the console started.');
      td.colSpan = 6;
      tr.append(td);
      body.append(tr);
    }
  }

  function renderChart(det) {
    const box = $('#d-chart');
    box.textContent = '';
    const W = 600; const H = 140; const L = 44; const R = 8; const T = 10; const B = 22;
    const end = now();
    const points = det.latency.filter(([t]) => end - t <= CHART_WINDOW_S);
    const start = points.length ? Math.max(end - CHART_WINDOW_S, Math.min(...points.map((p) => p[0])) - 60) : end - 3600;
    const top = Math.max(1500, ...points.map((p) => p[1])) * 1.05;
    const x = (t) => L + ((t - start) / Math.max(1, end - start)) * (W - L - R);
    const y = (v) => T + (1 - v / top) * (H - T - B);
    const g = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img',
      'aria-label': `first audio latency, ${points.length} turns` });
    g.append(svg('line', { x1: L, y1: H - B, x2: W - R, y2: H - B, class: 'axis' }),
      svg('line', { x1: L, y1: T, x2: L, y2: H - B, class: 'axis' }),
      svg('line', { x1: L, y1: y(1000), x2: W - R, y2: y(1000), class: 'target' }));
    for (const v of [0, 1000, Math.round(top / 500) * 500]) {
      const label = svg('text', { x: L - 4, y: y(v) + 4, 'text-anchor': 'end' });
      label.textContent = v >= 1000 ? `${(v / 1000).toFixed(1)} s` : `${v}`;
      g.append(label);
    }
    const left = svg('text', { x: L, y: H - 6 });
    left.textContent = clock(start);
    const right = svg('text', { x: W - R, y: H - 6, 'text-anchor': 'end' });
    right.textContent = 'now';
    g.append(left, right);
    if (points.length > 1) {
      g.append(svg('polyline', { class: 'line', points: points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(' ') }));
    }
    for (const [t, v] of points) {
      const dot = svg('circle', { cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 2.5, class: 'dot' });
      const title = svg('title');
      title.textContent = `${clock(t)}: ${Math.round(v)} ms`;
      dot.append(title);
      g.append(dot);
    }
    box.append(g);
    const sorted = points.map((p) => p[1]).sort((a, b) => a - b);
    const p50 = sorted.length ? sorted[Math.ceil(sorted.length / 2) - 1] : null;
    const p90 = sorted.length ? sorted[Math.ceil(sorted.length * 0.9) - 1] : null;
    box.append(el('p', 'chart-note', sorted.length
      ? `${sorted.length} turn(s) in the last ${age(end - start)}: p50 ${ms(p50)}, p90 ${ms(p90)}; dashed line: 1 s`
      : 'No timed turn since the console started.'));
  }

  function detailsTurn(item) {
    const det = S.details;
    if (!det || item.device_id !== det.device_id || item.kind !== 'turn') return;
    const i = det.turns.findIndex((t) => t.turn_id === item.turn_id);
    if (i >= 0) det.turns[i] = item; else det.turns.unshift(item);
    det.turns = det.turns.slice(0, 20);
    if (item.ended && typeof item.first_audio_ms === 'number' &&
        !det.latency.some(([t]) => t === item.ended)) det.latency.push([item.ended, item.first_audio_ms]);
  }

  // -- commands ---------------------------------------------------------------------------
  async function send(command, args) {
    const id = S.selected;
    if (!id) return;
    const box = $('#d-answer');
    box.hidden = false;
    box.className = 'answer';
    $('#d-answer-line').textContent = `${command} → ${id}: sent, waiting for the answer…`;
    $('#d-answer-json').textContent = '';
    let data;
    try {
      const r = await fetch('/api/cmd', {
        method: 'POST', credentials: 'same-origin', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ command, args, devices: [id] }),
      });
      if (r.status === 401) { location.href = '/login'; return; }
      data = await r.json();
    } catch (err) {
      box.className = 'answer bad';
      $('#d-answer-line').textContent = `${command} → ${id}: not sent (${err})`;
      return;
    }
    if (S.selected !== id) return;
    if (!data.devices) {
      box.className = 'answer bad';
      $('#d-answer-line').textContent = `${command}: refused by the console: ${data.error ? data.error.message : '?'}`;
      return;
    }
    const res = data.devices[0] || {};
    box.className = `answer ${res.outcome === 'answered' ? 'ok' : 'bad'}`;
    box.dataset.command = command;
    box.dataset.outcome = res.outcome || '';
    const rt = typeof res.round_trip_ms === 'number' ? ` in ${Math.round(res.round_trip_ms)} ms` : '';
    let line = `${command} → ${id}: ${res.outcome}${rt}`;
    if (res.answer && res.answer.ok === false && res.answer.error) {
      line += ` (${res.answer.error.code}: ${res.answer.error.message})`;
    }
    $('#d-answer-line').textContent = line;
    $('#d-answer-json').textContent = res.answer ? JSON.stringify(res.answer, null, 2) : '';
  }

  function wireActions() {
    $('#a-say').addEventListener('submit', (e) => {
      e.preventDefault();
      const text = $('#a-say-text').value.trim();
      if (text) send('say', { text });
    });
    $('#a-volume-value').addEventListener('input', () => {
      $('#a-volume-shown').textContent = Number($('#a-volume-value').value).toFixed(2);
    });
    $('#a-volume').addEventListener('submit', (e) => {
      e.preventDefault();
      send('volume', { volume: Number($('#a-volume-value').value) });
    });
    for (const b of document.querySelectorAll('#d-actions .buttons button')) {
      b.addEventListener('click', () => {
        if (b.dataset.confirm && b.dataset.armed !== 'yes') {
          b.dataset.armed = 'yes';
          b.dataset.label = b.textContent;
          b.textContent = b.dataset.confirm;
          setTimeout(() => { b.dataset.armed = ''; b.textContent = b.dataset.label; }, 4000);
          return;
        }
        b.dataset.armed = '';
        if (b.dataset.label) b.textContent = b.dataset.label;
        send(b.dataset.command, {});
      });
    }
    $('#d-close').addEventListener('click', closeDetails);
    $('#details').addEventListener('click', (e) => { if (e.target === $('#details')) closeDetails(); });
    document.addEventListener('keydown', (e) => { if (e.key === 'Escape' && S.selected) closeDetails(); });
    $('#filter').addEventListener('input', refilter);
    $('#show').addEventListener('change', refilter);
    $('#feed-pause').addEventListener('click', () => {
      S.paused = !S.paused;
      $('#feed-pause').setAttribute('aria-pressed', String(S.paused));
      $('#feed-pause').textContent = S.paused ? 'Resume' : 'Pause';
      if (!S.paused) renderFeed(true);
    });
    $('#feed-scope').addEventListener('click', () => {
      S.feedDevice = null;
      $('#feed-scope').hidden = true;
      renderFeed(true);
    });
  }

  // -- the stream -------------------------------------------------------------------------
  function mark(data) {
    if (typeof data.t === 'number') S.pending.push([data.t * 1000, (data.r || 0) * 1000, Date.now()]);
  }

  function schedule() {
    if (S.scheduled) return;
    S.scheduled = true;
    const wait = Math.max(0, S.lastFlush + FRAME_MS - performance.now());
    if (document.hidden) setTimeout(flush, Math.max(wait, 250));
    else if (wait > 0) setTimeout(() => requestAnimationFrame(flush), wait);
    else requestAnimationFrame(flush);
  }

  function flush() {
    S.scheduled = false;
    S.lastFlush = performance.now();
    if (S.orderDirty) {
      for (const id of S.devices.keys()) if (!S.tiles.has(id)) { S.tiles.set(id, makeTile(id)); S.dirty.add(id); }
      for (const [id, t] of S.tiles) if (!S.devices.has(id)) { t.remove(); S.tiles.delete(id); }
      placeTiles();
      S.orderDirty = false;
    }
    for (const id of S.dirty) {
      const t = S.tiles.get(id);
      const d = S.devices.get(id);
      if (t && d) { renderTile(t, d); t.dataset.updated = String(Date.now()); }
    }
    const detailsDirty = S.details && (S.dirty.has(S.details.device_id) || S.detailsDirty);
    S.dirty.clear();
    if (S.summaryDirty) { renderSummary(); S.summaryDirty = false; }
    renderFeed(false);
    if (S.rolloutsDirty) renderRollouts();
    if (detailsDirty) { renderDetails(); S.detailsDirty = false; }
    const shown = Date.now();
    for (const p of S.pending) marks.push([p[0], p[1], p[2], shown]);
    if (marks.length > 50000) marks.splice(0, marks.length - 50000);
    S.pending = [];
  }

  function setDevice(d) {
    if (!S.devices.has(d.device_id)) S.orderDirty = true;
    S.devices.set(d.device_id, d);
    S.dirty.add(d.device_id);
    S.summaryDirty = true;
  }

  function onSnapshot(snap) {
    S.offset = snap.now * 1000 - Date.now();
    if (snap.fleet) {
      $('#fleet-name').textContent = `${snap.fleet.prefix} on ${snap.fleet.broker}`;
      document.title = `${snap.fleet.prefix}: edge-voice fleet`;
      S.actions = snap.fleet.actions || [];
    }
    if (snap.user) {
      S.user = snap.user;
      $('#who').textContent = `${snap.user.name} (${snap.user.role})`;
    }
    S.devices.clear();
    S.orderDirty = true;
    for (const d of snap.devices) setDevice(d);
    S.feed.clear();
    for (const item of snap.feed) upsertFeed(item);
    S.rollouts.clear();
    for (const r of snap.rollouts) S.rollouts.set(r.id, r);
    S.rolloutsDirty = true;
    S.summaryDirty = true;
    renderFeed(true);
    S.detailsDirty = true;
    schedule();
  }

  function setLink(up, text) {
    const l = $('#link');
    l.className = `link ${up ? 'up' : 'down'}`;
    l.textContent = text;
  }

  function connect() {
    const es = new EventSource('/api/stream');
    es.addEventListener('open', () => setLink(true, 'live'));
    es.addEventListener('snapshot', (e) => { onSnapshot(JSON.parse(e.data)); setLink(true, 'live'); });
    es.addEventListener('device', (e) => { const d = JSON.parse(e.data); mark(d); setDevice(d); schedule(); });
    es.addEventListener('removed', (e) => {
      const d = JSON.parse(e.data);
      S.devices.delete(d.device_id);
      S.orderDirty = true;
      S.summaryDirty = true;
      schedule();
    });
    es.addEventListener('turn', (e) => {
      const item = JSON.parse(e.data);
      mark(item);
      upsertFeed(item);
      detailsTurn(item);
      if (S.details && item.device_id === S.details.device_id) S.detailsDirty = true;
      schedule();
    });
    es.addEventListener('note', (e) => { const item = JSON.parse(e.data); mark(item); upsertFeed(item); schedule(); });
    es.addEventListener('rollout', (e) => {
      const r = JSON.parse(e.data);
      mark(r);
      S.rollouts.set(r.id, r);
      S.rolloutsDirty = true;
      schedule();
    });
    es.addEventListener('tick', (e) => {
      const t = JSON.parse(e.data);
      window.edgeConsole.lastTick = t;
      S.offset = t.now * 1000 - Date.now();
      setLink(t.connected, t.connected ? `live · ${t.events_per_s} events/s` : 'broker lost, reconnecting');
    });
    es.addEventListener('logout', () => { location.href = '/login'; });
    es.addEventListener('error', () => {
      setLink(false, 'reconnecting…');
      if (es.readyState === EventSource.CLOSED) {
        fetch('/api/whoami', { credentials: 'same-origin' }).then((r) => {
          if (r.status === 401) location.href = '/login';
          else setTimeout(connect, 2000);
        }).catch(() => setTimeout(connect, 2000));
      }
    });
  }

  let toastTimer = null;
  function toast(text) {
    const t = $('#toast');
    t.textContent = text;
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
  }

  // Ages move on their own: the "since" of each tile every second, the rest every ten.
  let ticks = 0;
  setInterval(() => {
    ticks += 1;
    if (ticks % 10 === 0) {
      for (const id of S.devices.keys()) S.dirty.add(id);
      if (S.details) S.detailsDirty = true;
      S.summaryDirty = true;
      schedule();
      return;
    }
    for (const t of S.tiles.values()) if (t.conn && !t.hidden) t.sinceEl.textContent = sinceText(t.conn);
  }, 1000);

  wireActions();
  connect();
})();
