// herald's on-call console. Plain script, no build step, no library.
//
// Everything shown comes from herald's public API with the operator token
// the engineer signed in with. Every element is built with createElement
// and textContent: nothing read from the API is ever parsed as markup.
'use strict';

(() => {
  const TOKEN_KEY = 'herald.console.token';
  const REFRESH_KEY = 'herald.console.refresh';
  const PAGE_SIZE = 50;
  const CHART_MINUTES = 60;
  const RATE_WINDOW_MS = 10000;

  const $ = (id) => document.getElementById(id);

  // ---- DOM building: text only ------------------------------------------

  /** An element; string and number children become text nodes. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === 'class') node.className = value;
      else if (name === 'text') node.textContent = String(value);
      else node.setAttribute(name, String(value));
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function say(id, text, kind) {
    const node = $(id);
    node.textContent = text || '';
    node.className = 'message' + (kind ? ' ' + kind : '');
  }

  function badge(text, kind) {
    return el('span', { class: 'badge ' + (kind || text) }, text);
  }

  /** A table cell labelled for the phone layout (one card per row). */
  function td(label, attrs, ...children) {
    return el('td', Object.assign({ 'data-label': label }, attrs || {}), ...children);
  }

  function emptyRow(tbody, columns, text) {
    tbody.append(el('tr', { class: 'empty' }, el('td', { colspan: columns }, text)));
  }

  // ---- Times --------------------------------------------------------------

  function shortTime(iso) {
    if (!iso) return '—';
    const t = new Date(iso);
    if (Number.isNaN(t.getTime())) return String(iso);
    return t.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  }

  function ago(iso) {
    const t = new Date(iso).getTime();
    if (Number.isNaN(t)) return '';
    return relative(t - Date.now());
  }

  /** For what already happened: herald's clock a little ahead of the
   * browser's reads as now, not as the future. */
  function happened(iso) {
    const t = new Date(iso).getTime();
    if (Number.isNaN(t)) return '';
    const ms = t - Date.now();
    return ms > 0 && ms < 60000 ? 'just now' : relative(ms);
  }

  function relative(ms) {
    const abs = Math.abs(ms);
    const s = Math.round(abs / 1000);
    const text = s < 60 ? `${s} s` : s < 3600 ? `${Math.round(s / 60)} min` : s < 172800 ? `${Math.round(s / 3600)} h` : `${Math.round(s / 86400)} d`;
    return ms >= 0 ? `in ${text}` : `${text} ago`;
  }

  function timeCell(label, iso) {
    return td(label, { title: iso || '' }, shortTime(iso), iso ? el('div', { class: 'small' }, happened(iso)) : null);
  }

  function seconds(s) {
    if (s === undefined || s === null) return '—';
    return s < 120 ? `${Math.round(s)} s` : s < 7200 ? `${Math.round(s / 60)} min` : `${Math.round(s / 3600)} h`;
  }

  /** A datetime-local input's value as RFC 3339 (UTC), or undefined. */
  function inputTime(value) {
    if (!value) return undefined;
    const t = new Date(value);
    return Number.isNaN(t.getTime()) ? undefined : t.toISOString().replace(/\.\d+Z$/, 'Z');
  }

  // ---- The API -------------------------------------------------------------

  let token = sessionStorage.getItem(TOKEN_KEY);

  /** Calls herald: {status, body} with the body parsed when it is JSON. */
  async function api(method, path, body, withToken) {
    const headers = { Accept: 'application/json' };
    headers.Authorization = 'Bearer ' + (withToken || token || '');
    const init = { method, headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      return { status: 0, body: { detail: `herald could not be reached (${e.message})` } };
    }
    const text = await response.text();
    let parsed = text;
    try { parsed = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
    if (response.status === 401 && !withToken) {
      signOut('herald no longer accepts this token: ' + problemText({ status: 401, body: parsed }));
    }
    return { status: response.status, body: parsed };
  }

  function problemText(answer) {
    const b = answer.body;
    if (b && typeof b === 'object') {
      const parts = [b.title, b.detail].filter(Boolean);
      if (parts.length) return parts.join(': ');
    }
    if (typeof b === 'string' && b) return b.slice(0, 300);
    return `HTTP ${answer.status}`;
  }

  const query = (params) => {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== '') q.set(k, v);
    const s = q.toString();
    return s ? '?' + s : '';
  };

  // ---- Sign-in ----------------------------------------------------------------

  async function signIn(candidate) {
    say('signin-message', 'Checking the token…');
    const answer = await api('GET', '/v1/partners', undefined, candidate);
    if (answer.status === 200) {
      token = candidate;
      sessionStorage.setItem(TOKEN_KEY, candidate);
      $('token').value = '';
      say('signin-message', '');
      showSignedIn();
      return;
    }
    if (answer.status === 403) {
      say('signin-message', 'Refused: this is not an operator token (herald says: ' + problemText(answer) +
        '). The console needs a token with role = "operator"; an ingest token can only post events.', 'error');
    } else if (answer.status === 401) {
      say('signin-message', 'Refused: herald does not know this token (' + problemText(answer) + ').', 'error');
    } else {
      say('signin-message', 'Could not sign in: ' + problemText(answer), 'error');
    }
    $('token').focus();
  }

  function signOut(why) {
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    stopRefresh();
    $('nav').hidden = true;
    $('session').hidden = true;
    for (const view of document.querySelectorAll('.view')) view.hidden = view.id !== 'view-signin';
    say('signin-message', why || '', why ? 'error' : '');
    $('token').focus();
  }

  function showSignedIn() {
    $('nav').hidden = false;
    $('session').hidden = false;
    $('whoami').textContent = 'signed in with an operator token';
    startRefresh();
    if (!location.hash || location.hash === '#' || location.hash === '#/') location.hash = '#/partners';
    else route();
  }

  // ---- Views and routing --------------------------------------------------

  function show(viewId, navName) {
    for (const view of document.querySelectorAll('.view')) view.hidden = view.id !== viewId;
    for (const link of document.querySelectorAll('#nav a')) {
      if (link.dataset.view === navName) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
  }

  function route() {
    if (!token) return signOut();
    const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
    switch (parts[0]) {
      case 'dead-letters':
        if (parts[1]) { show('view-dead-letter', 'dead-letters'); openLetter(parts[1]); }
        else { show('view-dead-letters', 'dead-letters'); if (!deadState.loaded) loadDead(null); }
        break;
      case 'events':
        show('view-events', 'events');
        if (parts[1]) { $('event-id').value = parts[1]; lookUpEvent(parts[1]); }
        break;
      case 'audit':
        show('view-audit', 'audit');
        loadAudit(null);
        break;
      default:
        show('view-partners', 'partners');
        renderPartners();
    }
    document.title = 'herald console — ' + (document.querySelector('#nav a[aria-current]')?.textContent || '');
  }

  // ---- Partners -----------------------------------------------------------

  let refreshTimer = null;
  let partners = [];
  let parked = {};
  /** name -> [{t, sent}] over the last minutes: the rate sent. */
  const samples = {};

  function startRefresh() {
    stopRefresh();
    refreshPartners();
    const every = Number($('refresh-every').value);
    if (every > 0) refreshTimer = setInterval(refreshPartners, every * 1000);
  }

  function stopRefresh() {
    if (refreshTimer) clearInterval(refreshTimer);
    refreshTimer = null;
  }

  let refreshing = false;

  /** One refresh at a time: a slow herald is not asked again meanwhile. */
  async function refreshPartners() {
    if (!token || refreshing) return;
    refreshing = true;
    try {
      await readPartners();
    } finally {
      refreshing = false;
    }
  }

  async function readPartners() {
    const answer = await api('GET', '/v1/partners');
    if (answer.status !== 200) {
      say('partners-message', 'Could not read partners: ' + problemText(answer), 'error');
      return;
    }
    partners = (answer.body && answer.body.partners) || [];
    const now = Date.now();
    for (const p of partners) {
      const list = samples[p.name] || (samples[p.name] = []);
      list.push({ t: now, sent: p.sent || 0 });
      while (list.length && list[0].t < now - 2 * RATE_WINDOW_MS) list.shift();
    }
    fillPartnerFilter();
    const visible = !$('view-partners').hidden;
    if (visible) {
      const found = await Promise.all(partners.map((p) =>
        api('GET', '/v1/partners/' + encodeURIComponent(p.name) + '/parked')));
      parked = {};
      partners.forEach((p, i) => {
        if (found[i].status === 200) parked[p.name] = (found[i].body.parked || []);
      });
    }
    say('partners-message', '');
    $('partners-updated').textContent = new Date(now).toLocaleTimeString();
    if (visible) renderPartners();
  }

  /** The partner's queues by priority, critical first, as GET
   * /v1/partners reports them: {priority, depth, oldest} (oldest in
   * seconds, absent when the queue is empty). */
  function priorityQueues(p) {
    const queues = p.queues || {};
    return ['critical', 'normal'].filter((priority) => queues[priority]).map((priority) => {
      const q = queues[priority];
      return { priority, depth: q.depth, oldest: q.oldest_age_seconds ?? undefined };
    });
  }

  /** What makes a row stand out, in words (never colour alone). */
  function alarms(p, queues) {
    const out = [];
    if (p.breaker === 'open') out.push('breaker open');
    if (p.breaker === 'half_open') out.push('breaker probing');
    // A critical alert waiting while the partner cannot take it, or for
    // longer than ops/prometheus pages on-call for (60 s) by half.
    const critical = queues.find((q) => q.priority === 'critical');
    if (critical && critical.depth > 0 && (p.breaker !== 'closed' || (critical.oldest ?? 0) > 30)) {
      out.push('critical backlog');
    }
    if (p.alert) out.push('configuration error');
    return out;
  }

  /** Sends per second over the samples of the last RATE_WINDOW_MS. */
  function currentRate(name) {
    const list = samples[name] || [];
    if (list.length < 2) return undefined;
    const b = list[list.length - 1];
    const a = list.find((s) => s.t >= b.t - RATE_WINDOW_MS) || list[0];
    const dt = (b.t - a.t) / 1000;
    return dt > 0 && b.sent >= a.sent ? (b.sent - a.sent) / dt : undefined;
  }

  function renderPartners() {
    const tbody = clear($('partners-table').tBodies[0]);
    if (!partners.length) emptyRow(tbody, 8, 'No partners configured.');
    for (const p of partners) {
      const queues = priorityQueues(p);
      const alarm = alarms(p, queues);
      const breaker = td('Breaker', {}, badge(p.breaker || '?', p.breaker));
      if (p.next_probe_at) breaker.append(el('div', { class: 'small', title: p.next_probe_at }, 'next probe ' + ago(p.next_probe_at)));
      const queue = td('Queue', { class: 'nowrap' }, el('div', {}, `${p.queued ?? 0} queued`),
        el('div', { class: 'small' }, `${p.in_flight ?? 0} in flight`));
      for (const q of queues) {
        queue.append(el('div', { class: 'small' }, badge(q.priority, q.priority), ` ${q.depth}`,
          q.oldest !== undefined ? `, oldest ${seconds(q.oldest)}` : ''));
      }
      const rate = currentRate(p.name);
      const rateText = (rate === undefined ? '—' : rate.toFixed(1) + '/s') +
        (p.rate_per_second ? ` of ${p.rate_per_second}/s` : ' (no limit)');
      const parkedList = parked[p.name];
      const parkedCell = td('Parked', { class: 'num' },
        parkedList === undefined ? '—' : String(parkedList.length));
      if (parkedList && parkedList.length) {
        parkedCell.append(el('div', { class: 'small' }, parkedList.slice(0, 3).map((r) => r.device_id).join(', ') +
          (parkedList.length > 3 ? '…' : '')));
      }
      const config = td('Configuration', { class: 'snippet' }, p.alert
        ? el('div', {}, badge('alert', 'dead'), ' ', p.alert.reason,
          el('div', { class: 'small' }, `since ${shortTime(p.alert.since)}, ${p.alert.count} answer(s) like it`))
        : 'ok');
      const row = el('tr', { class: alarm.length ? 'alarm' : '', 'data-partner': p.name },
        td('Partner', {}, el('strong', {}, p.name), el('div', { class: 'small' }, p.adapter || ''),
          alarm.length ? el('div', { class: 'alarm-text' }, '⚠ ' + alarm.join(', ')) : null),
        breaker,
        queue,
        td('Sends/s (limit)', { class: 'nowrap' }, rateText),
        td('Concurrency', {}, `${p.in_flight ?? 0} of ${p.concurrency_limit ?? '?'}`,
          p.max_in_flight && p.max_in_flight !== p.concurrency_limit ? el('div', { class: 'small' }, `max ${p.max_in_flight}`) : null),
        td('Since start', { class: 'small nowrap' }, `sent ${p.sent ?? 0}`, el('br'), `delivered ${p.delivered ?? 0}`, el('br'),
          `retried ${p.retried ?? 0}, dead ${p.dead ?? 0}`),
        parkedCell,
        config);
      tbody.append(row);
    }
    drawChart();
  }

  // ---- The chart -----------------------------------------------------------

  const COLOURS = ['#1f77b4', '#9467bd', '#17becf', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#2ca02c'];

  /** name -> [{delivered, failed}] for each of the last 60 minutes, oldest
   * first, as herald counts them. */
  function perMinute() {
    const out = {};
    for (const p of partners) {
      const minutes = p.last_hour.slice(-CHART_MINUTES);
      out[p.name] = Array.from({ length: CHART_MINUTES - minutes.length }, () => ({ delivered: 0, failed: 0 }))
        .concat(minutes.map((m) => ({ delivered: m.delivered, failed: m.failed })));
    }
    return out;
  }

  function drawChart() {
    const holder = clear($('chart'));
    const legend = clear($('chart-legend'));
    const series = perMinute();
    const names = Object.keys(series).sort();
    if (!names.length) {
      holder.append(el('p', { class: 'muted' }, 'No partners configured.'));
      return;
    }
    // Drawn at the holder's own width, so text is the size the style says.
    const width = Math.max(300, Math.round(holder.clientWidth || 720));
    const band = 64;
    const left = width < 500 ? 70 : 110;
    const top = 6;
    const height = top + names.length * band + 20;
    const plot = width - left - 4;
    const step = plot / CHART_MINUTES;
    const chart = svg('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-labelledby': 'chart-title' });
    const total = names.map((n) => {
      const sum = series[n].reduce((acc, m) => ({ d: acc.d + m.delivered, f: acc.f + m.failed }), { d: 0, f: 0 });
      return `${n}: ${sum.d} delivered, ${sum.f} failed`;
    }).join('; ');
    chart.append(svg('title', { id: 'chart-title' }, `Per minute over the last hour: ${total}`));
    names.forEach((name, row) => {
      const colour = COLOURS[row % COLOURS.length];
      const mid = top + row * band + band / 2;
      const half = band / 2 - 6;
      // Each row to its own peak: a busy partner does not flatten a quiet
      // one's failures.
      const peak = series[name].reduce((most, m) => Math.max(most, m.delivered, m.failed), 1);
      chart.append(svg('text', { x: 4, y: mid - 4, class: 'label' }, name));
      chart.append(svg('text', { x: 4, y: mid + 10, class: 'label' }, `peak ${peak}/min`));
      chart.append(svg('line', { x1: left, x2: left + plot, y1: mid, y2: mid, class: 'axis' }));
      series[name].forEach((m, i) => {
        const x = left + i * step + 0.5;
        if (m.delivered) {
          const h = Math.max(1, (m.delivered / peak) * half);
          chart.append(svg('rect', { x, y: mid - h, width: Math.max(1, step - 1), height: h, fill: colour, 'data-kind': 'delivered' },
            svg('title', {}, `${name}: ${m.delivered} delivered, ${CHART_MINUTES - 1 - i} min ago`)));
        }
        if (m.failed) {
          const h = Math.max(1, (m.failed / peak) * half);
          chart.append(svg('rect', { x, y: mid, width: Math.max(1, step - 1), height: h, fill: '#b00020', 'data-kind': 'failed' },
            svg('title', {}, `${name}: ${m.failed} failed, ${CHART_MINUTES - 1 - i} min ago`)));
        }
      });
      legend.append(el('li', {}, el('span', { class: 'swatch', 'data-colour': colour }), `${name}: delivered above the line, failed (red) below`));
    });
    const base = top + names.length * band + 14;
    chart.append(svg('text', { x: left, y: base, class: 'label' }, '60 min ago'));
    chart.append(svg('text', { x: left + plot - 24, y: base, class: 'label' }, 'now'));
    holder.append(chart);
    // The swatch colours come from the chart's palette; set through CSSOM,
    // which the style policy allows (no inline style attribute).
    for (const s of legend.querySelectorAll('.swatch')) s.style.backgroundColor = s.dataset.colour;
  }

  // ---- Dead letters -----------------------------------------------------------

  const deadState = { loaded: false, next: null };

  function fillPartnerFilter() {
    const select = $('f-partner');
    const have = new Set(Array.from(select.options).map((o) => o.value));
    for (const p of partners) if (!have.has(p.name)) select.append(el('option', { value: p.name }, p.name));
  }

  function currentFilter() {
    const f = {
      partner: $('f-partner').value || undefined,
      type: $('f-type').value.trim() || undefined,
      priority: $('f-priority').value || undefined,
      device_id: $('f-device').value.trim() || undefined,
      reason: $('f-reason').value.trim() || undefined,
      since: inputTime($('f-since').value),
      until: inputTime($('f-until').value),
      replayed: { no: false, yes: true }[$('f-replayed').value],
    };
    for (const k of Object.keys(f)) if (f[k] === undefined) delete f[k];
    return f;
  }

  /** One page of the dead letters the filter selects, from `after`:
   * {items, next} or {error}. herald applies every filter itself. */
  async function deadPage(filter, after) {
    const params = Object.assign({}, filter, { limit: String(PAGE_SIZE) });
    if (after) params.after = after;
    const answer = await api('GET', '/v1/dead-letters' + query(params));
    if (answer.status !== 200) return { error: problemText(answer) };
    return { items: answer.body.items || [], next: answer.body.next || null };
  }

  async function loadDead(after) {
    deadState.loaded = true;
    const filter = currentFilter();
    say('dead-message', 'Loading…');
    const found = await deadPage(filter, after);
    if (found.error) {
      say('dead-message', 'Could not read dead letters: ' + found.error, 'error');
      return;
    }
    deadState.next = found.next;
    say('dead-message', '');
    const tbody = clear($('dead-table').tBodies[0]);
    if (!found.items.length) emptyRow(tbody, 7, 'No dead letters match.');
    for (const d of found.items) {
      tbody.append(el('tr', { 'data-id': d.id },
        td('Died', { title: d.died_at },
          el('a', { href: '#/dead-letters/' + encodeURIComponent(d.id), 'aria-label': `Open dead letter ${d.id}` }, shortTime(d.died_at)),
          el('div', { class: 'small' }, happened(d.died_at))),
        td('Partner', {}, d.partner),
        td('Type', {}, d.type),
        td('Priority', {}, badge(d.priority, d.priority)),
        td('Device', { class: 'mono' }, d.device_id),
        td('Attempts', { class: 'num' }, String(d.attempts)),
        td('Reason', { class: 'snippet' }, d.reason, d.replayed_as ? el('div', { class: 'small' }, 'replayed as ' + d.replayed_as) : null)));
    }
    $('dead-count').textContent = `${found.items.length} shown` + (found.next ? ', more on the next page' : '');
    $('dead-next').disabled = !found.next;
    $('dead-first').disabled = !after;
  }

  function describeFilter(filter) {
    const parts = Object.entries(filter).map(([k, v]) => `${k} = ${v}`);
    return parts.length ? parts.join(', ') : 'no filter: every dead letter';
  }

  function partnerLines(byPartner) {
    return Object.entries(byPartner || {}).map(([name, n]) => `${name}: ${n}`);
  }

  /** A modal confirmation; resolves true on Confirm. */
  function confirmAction(title, text, lines, okLabel, destructive) {
    const dialog = $('confirm');
    $('confirm-title').textContent = title;
    $('confirm-text').textContent = text;
    const list = clear($('confirm-detail'));
    for (const line of lines || []) list.append(el('li', {}, line));
    $('confirm-ok').textContent = okLabel || 'Confirm';
    $('confirm-ok').className = destructive ? 'danger' : '';
    return new Promise((resolve) => {
      dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
      dialog.returnValue = '';
      dialog.showModal();
      $('confirm-cancel').focus();
    });
  }

  function jobShow(text, done, total) {
    $('job').hidden = false;
    $('job-status').textContent = text;
    const bar = $('job-progress');
    bar.max = Math.max(1, total || 1);
    bar.value = Math.min(done || 0, bar.max);
  }

  async function replayMatching() {
    const filter = currentFilter();
    const body = Object.assign({}, filter, { dry_run: true });
    say('dead-message', 'Counting what the filter matches (dry run)…');
    const dry = await api('POST', '/v1/replays', body);
    if (dry.status !== 200) return say('dead-message', 'The dry run was refused: ' + problemText(dry), 'error');
    say('dead-message', '');
    const matched = dry.body.matched || 0;
    if (!matched) return say('dead-message', 'Dry run: no dead letter matches this filter; nothing to replay.');
    const ok = await confirmAction('Replay matching dead letters?',
      `Dry run: ${matched} dead letter(s) match (${describeFilter(filter)}). Each is delivered again to its partner.`,
      partnerLines(dry.body.partners), `Replay ${matched}`);
    if (!ok) return say('dead-message', 'Replay cancelled; nothing was replayed.');
    const started = await api('POST', '/v1/replays', Object.assign({}, filter, { dry_run: false }));
    if (started.status !== 202 && started.status !== 200) return say('dead-message', 'The replay was refused: ' + problemText(started), 'error');
    followJob(started.body);
  }

  async function followJob(job) {
    const id = job.id;
    jobShow(`Replay job ${id}: ${job.state}, 0 of ${job.matched} replayed`, 0, job.matched);
    for (;;) {
      await new Promise((r) => setTimeout(r, 1000));
      if (!token) return;
      const answer = await api('GET', '/v1/replays/' + encodeURIComponent(id));
      if (answer.status !== 200) {
        jobShow(`Replay job ${id}: its progress could not be read (${problemText(answer)})`, 0, 1);
        return;
      }
      const j = answer.body;
      jobShow(`Replay job ${id}: ${j.state}, ${j.replayed} of ${j.matched} replayed` +
        (j.rate_per_second ? ` at ${j.rate_per_second}/s` : ''), j.replayed, j.matched);
      if (j.state !== 'running') {
        loadDead(null);
        return;
      }
    }
  }

  async function purgeMatching() {
    const filter = currentFilter();
    say('dead-message', 'Counting what the filter matches (dry run)…');
    const dry = await api('POST', '/v1/dead-letters/purge', Object.assign({}, filter, { dry_run: true }));
    if (dry.status !== 200) return say('dead-message', 'The dry run was refused: ' + problemText(dry), 'error');
    const count = dry.body.matched;
    say('dead-message', '');
    if (!count) return say('dead-message', 'Dry run: no dead letter matches this filter; nothing to purge.');
    const ok = await confirmAction('Purge matching dead letters for good?',
      `Dry run: ${count} dead letter(s) match (${describeFilter(filter)}). Purged letters cannot be replayed or read again.`, [], `Purge ${count}`, true);
    if (!ok) return say('dead-message', 'Purge cancelled; nothing was purged.');
    const done = await api('POST', '/v1/dead-letters/purge', Object.assign({}, filter, { dry_run: false }));
    if (done.status !== 200) return say('dead-message', 'The purge was refused: ' + problemText(done), 'error');
    await loadDead(null);
    say('dead-message', `Purged ${done.body.purged} dead letter(s).`, 'ok');
  }

  // ---- One dead letter --------------------------------------------------------

  function attemptsTable(attempts, omitted) {
    const table = el('table', { class: 'data attempts' },
      el('thead', {}, el('tr', {}, ['#', 'At', 'Status', 'Latency', 'Outcome', 'Answer'].map((h) => el('th', { scope: 'col' }, h)))));
    const tbody = el('tbody');
    if (!attempts || !attempts.length) emptyRow(tbody, 6, 'No attempt recorded.');
    for (const a of attempts || []) {
      tbody.append(el('tr', {},
        td('#', { class: 'num' }, String(a.number)),
        timeCell('At', a.at),
        td('Status', {}, a.status === undefined ? 'no answer' : String(a.status)),
        td('Latency', { class: 'num' }, `${a.latency_ms} ms`),
        td('Outcome', {}, String(a.outcome || '')),
        td('Answer', { class: 'snippet mono' }, a.detail || '')));
    }
    table.append(tbody);
    const wrap = el('div', { class: 'table-wrap' }, table);
    return omitted ? [el('p', { class: 'small' }, `${omitted} earlier attempt(s) not kept.`), wrap] : [wrap];
  }

  function facts(pairs) {
    const dl = el('dl', { class: 'facts' });
    for (const [k, v] of pairs) if (v !== undefined && v !== null) dl.append(el('dt', {}, k), el('dd', {}, v));
    return dl;
  }

  function eventLink(id) {
    return el('a', { href: '#/events/' + encodeURIComponent(id) }, id);
  }

  async function openLetter(id) {
    const body = clear($('letter-body'));
    say('letter-message', 'Loading…');
    const answer = await api('GET', '/v1/dead-letters/' + encodeURIComponent(id));
    if (answer.status !== 200) return say('letter-message', 'Could not read this dead letter: ' + problemText(answer), 'error');
    say('letter-message', '');
    const d = answer.body;
    const e = d.event || {};
    const replay = el('button', { type: 'button', id: 'replay-one', disabled: d.replayed_as ? 'disabled' : null }, 'Replay this letter');
    const purge = el('button', { type: 'button', id: 'purge-one', class: 'danger' }, 'Purge this letter…');
    replay.addEventListener('click', async () => {
      replay.disabled = true;
      const r = await api('POST', '/v1/dead-letters/' + encodeURIComponent(d.id) + '/replay');
      if (r.status === 202) {
        deadState.loaded = false;
        say('letter-message', `Replayed: a new delivery ${r.body.delivery_id} to ${r.body.partner} is on its way.`, 'ok');
        $('letter-message').append(' ', el('a', { href: '#/events/' + encodeURIComponent(r.body.event_id) }, 'Follow the event'));
      } else {
        replay.disabled = r.status === 409;
        say('letter-message', 'Not replayed: ' + problemText(r), 'error');
      }
    });
    purge.addEventListener('click', async () => {
      const ok = await confirmAction('Purge this dead letter for good?',
        `Dead letter ${d.id} (${e.type} for ${e.device_id} at ${d.partner}) cannot be replayed or read again.`, [], 'Purge', true);
      if (!ok) return;
      const r = await api('DELETE', '/v1/dead-letters/' + encodeURIComponent(d.id));
      if (r.status === 204) {
        deadState.loaded = false;
        clear(body);
        say('letter-message', `Dead letter ${d.id} purged.`, 'ok');
      } else say('letter-message', 'Not purged: ' + problemText(r), 'error');
    });
    body.append(
      el('div', { class: 'card' },
        facts([
          ['Partner', d.partner],
          ['Reason', d.reason],
          ['Died', `${shortTime(d.died_at)} (${happened(d.died_at)})`],
          ['Event', eventLink(e.id)],
          ['Type', e.type],
          ['Priority', e.priority],
          ['Device', e.device_id],
          ['Delivery', d.delivery_id],
          ['Replayed as', d.replayed_as ? `delivery ${d.replayed_as}, ${shortTime(d.replayed_at)}` : undefined],
        ]),
        el('div', { class: 'actions' }, replay, purge)),
      el('h3', {}, 'Attempts'),
      ...attemptsTable(d.attempts, d.attempts_omitted),
      el('h3', {}, 'Event'),
      el('pre', { class: 'json', id: 'letter-json', tabindex: '0', 'aria-label': 'Event JSON' }, JSON.stringify(e, null, 2)));
  }

  // ---- Event lookup ------------------------------------------------------------

  async function lookUpEvent(id) {
    const body = clear($('event-body'));
    id = id.trim();
    if (!id) return say('event-message', 'Enter an event id.', 'error');
    say('event-message', 'Loading…');
    const answer = await api('GET', '/v1/events/' + encodeURIComponent(id));
    if (answer.status !== 200) return say('event-message', 'Not found: ' + problemText(answer), 'error');
    say('event-message', '');
    const e = answer.body;
    const data = Object.assign({}, e);
    delete data.deliveries;
    body.append(el('div', { class: 'card' }, facts([
      ['Event', e.id], ['Type', e.type], ['Priority', e.priority], ['Device', e.device_id],
      ['Occurred', e.occurred_at], ['Received', `${shortTime(e.received_at)} (${happened(e.received_at)})`],
      ['Idempotency key', e.idempotency_key],
    ])));
    body.append(el('h3', {}, `Deliveries (${(e.deliveries || []).length})`));
    if (!(e.deliveries || []).length) body.append(el('p', { class: 'muted' }, 'No delivery: no partner took this event.'));
    for (const d of e.deliveries || []) {
      body.append(el('section', { class: 'card delivery', 'data-partner': d.partner },
        el('h4', {}, d.partner, ' ', badge(d.state, d.state)),
        facts([
          ['Delivery', d.id],
          ['Attempts', String(d.attempts)],
          ['Next attempt', d.next_attempt_at ? `${shortTime(d.next_attempt_at)} (${ago(d.next_attempt_at)})` : undefined],
          ['Dead letter', d.dead_letter ? el('a', { href: '#/dead-letters/' + encodeURIComponent(d.dead_letter) }, d.dead_letter) : undefined],
          ['Superseded by', d.superseded_by],
        ]),
        ...attemptsTable(d.history, d.history_omitted)));
    }
    body.append(el('h3', {}, 'Event JSON'),
      el('pre', { class: 'json', tabindex: '0', 'aria-label': 'Event JSON' }, JSON.stringify(data, null, 2)));
  }

  // ---- Audit -------------------------------------------------------------------------

  let auditNext = null;

  async function loadAudit(after) {
    const tbody = $('audit-table').tBodies[0];
    if (!after) clear(tbody);
    say('audit-message', 'Loading…');
    const answer = await api('GET', '/v1/audit' + query({ after: after || undefined, limit: '50' }));
    if (answer.status !== 200) return say('audit-message', 'Could not read the audit trail: ' + problemText(answer), 'error');
    say('audit-message', '');
    const entries = answer.body.entries || [];
    if (!after && !entries.length) emptyRow(tbody, 5, 'Nothing replayed or purged yet.');
    for (const a of entries) {
      const what = a.filter ? describeFilter(a.filter) : a.target ? String(a.target) : '—';
      tbody.append(el('tr', { 'data-action': a.action },
        timeCell('When', a.at),
        td('Token', {}, a.token),
        td('Action', {}, a.action),
        td('What', { class: 'snippet' }, what),
        td('Count', { class: 'num' }, String(a.count ?? ''))));
    }
    auditNext = answer.body.next || null;
    $('audit-more').hidden = !auditNext;
  }

  // ---- Wiring ------------------------------------------------------------------------

  function init() {
    const saved = sessionStorage.getItem(REFRESH_KEY);
    if (saved && Array.from($('refresh-every').options).some((o) => o.value === saved)) $('refresh-every').value = saved;
    $('signin-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const candidate = $('token').value.trim();
      if (!candidate) return say('signin-message', 'Paste a token first.', 'error');
      signIn(candidate);
    });
    $('sign-out').addEventListener('click', () => signOut());
    $('refresh-every').addEventListener('change', () => {
      sessionStorage.setItem(REFRESH_KEY, $('refresh-every').value);
      startRefresh();
    });
    $('dead-filter').addEventListener('submit', (ev) => {
      ev.preventDefault();
      loadDead(null);
    });
    $('dead-next').addEventListener('click', () => {
      if (!deadState.next) return;
      loadDead(deadState.next);
    });
    $('dead-first').addEventListener('click', () => loadDead(null));
    $('replay-matching').addEventListener('click', replayMatching);
    $('purge-matching').addEventListener('click', purgeMatching);
    $('event-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const id = $('event-id').value.trim();
      if (location.hash === '#/events/' + encodeURIComponent(id)) lookUpEvent(id);
      else location.hash = '#/events/' + encodeURIComponent(id);
    });
    $('audit-more').addEventListener('click', () => loadAudit(auditNext));
    window.addEventListener('hashchange', () => {
      route();
      $('main').focus({ preventScroll: true });
    });
    if (token) showSignedIn();
    else signOut();
  }

  init();
})();
