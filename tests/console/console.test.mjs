// herald's on-call console in headless Chromium, against a real herald and
// loopback mock partners that tests/console.rs starts (it passes their
// addresses in the environment). Run through `cargo nextest run -p herald
// --test console`, not by hand.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run this through tests/console.rs`);
  return value;
};
const HERALD = env('HERALD_URL');
const CONTROL = env('CONTROL_URL');
const OPERATOR = env('OPERATOR_TOKEN');
const INGEST = env('INGEST_TOKEN');
const SHOTS = env('SCREENSHOTS');
const CHROMIUM = env('CHROMIUM');

const WIDE = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };

let browser;
let page;
const problems = [];
const requestedUrls = [];

// ---- The world around herald --------------------------------------------

async function control(method, pathname) {
  const answer = await fetch(CONTROL + pathname, { method });
  const text = await answer.text();
  assert.equal(answer.status, 200, `control ${pathname}: ${text}`);
  return text ? JSON.parse(text) : null;
}

const received = (partner) => control('GET', `/partners/${partner}/requests`);

async function heraldApi(method, pathname, token, body) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const answer = await fetch(HERALD + pathname, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await answer.text();
  let parsed = text;
  try { parsed = JSON.parse(text); } catch (_) { /* not JSON */ }
  return { status: answer.status, body: parsed };
}

async function postEvent(event) {
  const answer = await heraldApi('POST', '/v1/events', INGEST, event);
  assert.equal(answer.status, 202, JSON.stringify(answer.body));
  return answer.body.id;
}

/** Polls `check` (real time, bounded) until it returns something truthy. */
async function waitFor(what, check, ms = 20000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) { last = e; }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function shot(name, viewport = WIDE) {
  await page.setViewportSize(viewport);
  const file = path.join(SHOTS, `${name}-${viewport.width}x${viewport.height}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`screenshot: ${file}`);
}

// The steps build on each other (the letters a step makes, the next one
// replays): after a failure the rest are skipped, so the first is the one read.
let failedStep = null;
function step(name, fn) {
  test(name, async (t) => {
    if (failedStep) return t.skip(`after the failure of "${failedStep}"`);
    try {
      await fn(t);
    } catch (e) {
      failedStep = name;
      throw e;
    }
  });
}

const row = (partner) => page.locator(`#partners-table tbody tr[data-partner="${partner}"]`);
const deadRows = () => page.locator('#dead-table tbody tr[data-id]');

before(async () => {
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-gpu'] });
  const context = await browser.newContext({ viewport: WIDE });
  page = await context.newPage();
  page.setDefaultTimeout(20000);
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') problems.push(`console error: ${m.text()}`);
  });
  page.on('request', (r) => requestedUrls.push(r.url()));
});

after(async () => {
  await browser?.close();
});

// ---- Sign-in ---------------------------------------------------------------

step('without a token only the sign-in shows, under a policy nothing breaks', async () => {
  const answer = await page.goto(HERALD + '/console');
  assert.match(answer.headers()['content-security-policy'], /default-src 'self'/);
  await page.locator('#view-signin').waitFor({ state: 'visible' });
  assert.equal(await page.locator('#nav').isVisible(), false, 'no views before signing in');
  assert.equal(await page.locator('#view-partners').isVisible(), false);
  await shot('sign-in');
  await shot('sign-in', PHONE);
  await page.setViewportSize(WIDE);
});

step('a wrong token is refused with a clear message', async () => {
  await page.fill('#token', 'not-a-token-herald-knows');
  await page.press('#token', 'Enter');
  await waitFor('the refusal', async () => (await page.textContent('#signin-message')).includes('does not know this token'));
  assert.equal(await page.locator('#nav').isVisible(), false);
  assert.equal(await page.evaluate(() => sessionStorage.length), 0, 'a refused token is not kept');
});

step('an ingest token is refused: the console needs an operator', async () => {
  await page.fill('#token', INGEST);
  await page.click('#signin-form button[type=submit]');
  await waitFor('the refusal', async () => (await page.textContent('#signin-message')).includes('not an operator token'));
  assert.equal(await page.locator('#nav').isVisible(), false);
  await shot('sign-in-ingest-refused');
});

step('signing in by keyboard with the operator token shows the partners', async () => {
  await page.fill('#token', '');
  await page.focus('#token');
  await page.keyboard.type(OPERATOR);
  await page.keyboard.press('Enter');
  await row('acme').waitFor();
  await row('globex').waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem('herald.console.token')), OPERATOR);
  assert.ok(!page.url().includes(OPERATOR), 'the token is never in the URL');
  // Tab reaches the navigation, and the focused element is outlined.
  await page.focus('#home');
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.textContent), 'Partners');
  const outline = await page.evaluate(() => getComputedStyle(document.activeElement).outlineStyle);
  assert.notEqual(outline, 'none', 'focus is visible');
  await page.selectOption('#refresh-every', '1');
});

// ---- Partners ----------------------------------------------------------------

step('partners update as a mock partner goes down and comes back', async () => {
  await waitFor('acme closed', async () => (await row('acme').textContent()).includes('closed'));
  await control('POST', '/partners/acme/down');
  for (const n of [1, 2]) {
    await postEvent({ device_id: `lock-${n}`, type: 'door.opened', data: { n }, partners: ['acme'] });
  }
  await waitFor('acme\'s breaker open on the page', async () => {
    const text = await row('acme').textContent();
    return text.includes('open') && text.includes('breaker open') && text.includes('next probe');
  });
  assert.match(await row('acme').getAttribute('class'), /alarm/, 'an open breaker stands out');
  const alert = await postEvent({ device_id: 'door-9', type: 'door.forced_open', priority: 'critical', data: {}, partners: ['acme'] });
  await waitFor('acme\'s critical backlog on the page', async () => {
    const text = await row('acme').textContent();
    return /critical backlog/.test(text) && /critical 1, oldest/.test(text);
  });
  assert.doesNotMatch(await row('globex').textContent(), /critical backlog/);
  assert.doesNotMatch(await row('globex').getAttribute('class'), /alarm/);
  await shot('partners-breaker-open');

  await control('POST', '/partners/acme/up');
  await control('POST', '/clock/advance/11000');
  await waitFor('acme closed again on the page', async () => {
    const text = await row('acme').textContent();
    return text.includes('closed') && !text.includes('breaker open');
  });
  assert.doesNotMatch(await row('acme').getAttribute('class'), /alarm/);
  await waitFor('the held events delivered', async () =>
    (await received('acme')).filter((r) => r.answered === 200).length >= 3);
  assert.ok((await received('acme')).some((r) => r.id === alert && r.answered === 200), 'the critical alert delivered');
  await waitFor('no critical backlog once delivered', async () => !/critical backlog/.test(await row('acme').textContent()));
  assert.match(await row('acme').textContent(), /of 50\/s/, 'rate against its limit');
});

step('a partner whose platform refuses herald\'s setup shows its configuration alert until fixed', async () => {
  // Routed by the device's link to Alexa's mock, which answers 403
  // INSUFFICIENT_PERMISSION_EXCEPTION until its side is fixed.
  await postEvent({
    device_id: 'speaker-1', type: 'door.forced_open', priority: 'critical', partners: ['alexa'],
    data: { capability: 'lock', attribute: 'lock', value: 'forced_open', kind: 'forced_open' },
  });
  await waitFor('alexa\'s alert on the page', async () => {
    const text = await row('alexa').textContent();
    return text.includes('configuration error') && text.includes('alert');
  });
  assert.match(await row('alexa').getAttribute('class'), /alarm/, 'a configuration error stands out');
  await shot('partners-configuration-alert');
  await control('POST', '/partners/alexa/fixed');
  await waitFor('alexa\'s alert cleared on the page', async () => {
    await control('POST', '/clock/advance/2000');
    return !(await row('alexa').textContent()).includes('configuration error');
  });
  assert.doesNotMatch(await row('alexa').getAttribute('class'), /alarm/);
});

// ---- Dead letters ---------------------------------------------------------------

const ids = {};
const SCRIPT = '<script>window.__heraldPwned = 1</script><img src=x onerror="window.__heraldPwned = 2">';

step('dead letters are listed and filtered', async () => {
  await control('POST', '/partners/acme/answer/400');
  await control('POST', '/partners/globex/answer/400');
  ids.script = await postEvent({ device_id: 'lock-9', type: 'door.forced_open', data: { note: SCRIPT }, partners: ['acme'] });
  ids.forced2 = await postEvent({ device_id: 'lock-2', type: 'door.forced_open', data: { v: 2 }, partners: ['acme'] });
  ids.forced3 = await postEvent({ device_id: 'lock-3', type: 'door.forced_open', data: { v: 3 }, partners: ['acme'] });
  ids.motion = await postEvent({ device_id: 'cam-1', type: 'motion.detected', data: {}, partners: ['acme'] });
  ids.globex = await postEvent({ device_id: 'lock-2', type: 'door.forced_open', data: {}, partners: ['globex'] });
  await waitFor('five dead letters', async () => {
    const list = await heraldApi('GET', '/v1/dead-letters', OPERATOR);
    return list.body.items.length === 5;
  });
  await control('POST', '/partners/acme/answer/200');
  await control('POST', '/partners/globex/answer/200');

  await page.click('#nav a[data-view="dead-letters"]');
  await waitFor('five rows', async () => (await deadRows().count()) === 5);
  await page.selectOption('#f-partner', 'acme');
  await page.fill('#f-type', 'door.forced_open');
  await page.click('#dead-filter button[type=submit]');
  await waitFor('three forced-open rows at acme', async () => (await deadRows().count()) === 3);
  for (const text of await deadRows().allTextContents()) {
    assert.match(text, /acme/);
    assert.match(text, /door\.forced_open/);
  }
  await page.fill('#f-device', 'lock-2');
  await page.press('#f-device', 'Enter');
  await waitFor('one row for lock-2', async () => (await deadRows().count()) === 1);
  assert.match(await deadRows().first().textContent(), /lock-2/);
  await page.fill('#f-device', '');
  await page.fill('#f-since', '2099-01-01T00:00:00');
  await page.click('#dead-filter button[type=submit]');
  await waitFor('none died since 2099', async () => (await page.textContent('#dead-table tbody')).includes('No dead letters match'));
  await page.fill('#f-since', '');
  await page.fill('#f-until', '2000-01-01T00:00:00');
  await page.click('#dead-filter button[type=submit]');
  await waitFor('none died until 2000', async () => (await page.textContent('#dead-table tbody')).includes('No dead letters match'));
  await page.fill('#f-until', '');
  await page.click('#dead-filter button[type=submit]');
  await waitFor('three rows again', async () => (await deadRows().count()) === 3);
  await shot('dead-letters');
});

step('a dead letter opens with its event, attempts and reason; a <script> payload is text', async () => {
  const letter = (await heraldApi('GET', '/v1/dead-letters?partner=acme', OPERATOR)).body.items
    .find((d) => d.event_id === ids.script);
  ids.scriptLetter = letter.id;
  await page.click(`#dead-table tr[data-id="${letter.id}"] a`);
  await page.locator('#letter-json').waitFor();
  const json = await page.textContent('#letter-json');
  assert.ok(json.includes(SCRIPT.replaceAll('"', '\\"')), `the payload shows as text: ${json}`);
  assert.equal(await page.evaluate(() => window.__heraldPwned), undefined, 'the payload did not run');
  assert.equal(await page.locator('#letter-body script, #letter-body img').count(), 0, 'no element made from it');
  const body = await page.textContent('#letter-body');
  assert.match(body, /400/, 'the attempt and its status');
  assert.match(body, new RegExp(letter.reason.replace(/[.*+?^${}()|[\]\\]/g, '\\$&').slice(0, 40)), 'the reason');
  assert.match(body, / ms/, 'the latency');
  await shot('dead-letter-detail');
  await shot('dead-letter-detail', PHONE);
  await page.setViewportSize(WIDE);
});

step('replaying one: it leaves the list and arrives at the mock partner', async () => {
  const before = (await received('acme')).filter((r) => r.id === ids.script).length;
  await page.click('#replay-one');
  await waitFor('the replay confirmed', async () => (await page.textContent('#letter-message')).includes('Replayed'));
  const arrived = await waitFor('the replayed event at acme', async () => {
    const seen = (await received('acme')).filter((r) => r.id === ids.script);
    return seen.length > before && seen.at(-1).answered === 200 ? seen.at(-1) : null;
  });
  assert.equal(arrived.body.data.note, SCRIPT, 'the same event, payload intact');
  await page.click('#view-dead-letter a[href="#/dead-letters"]');
  await waitFor('two rows left', async () => (await deadRows().count()) === 2);
  assert.equal(await page.locator(`#dead-table tr[data-id="${ids.scriptLetter}"]`).count(), 0);
  assert.equal(await page.evaluate(() => window.__heraldPwned), undefined);
});

step('bulk replay shows the dry-run count, asks, and replays the filter', async () => {
  const countAt = async () => (await received('acme')).filter((r) => [ids.forced2, ids.forced3].includes(r.id) && r.answered === 200).length;
  assert.equal(await countAt(), 0);

  await page.click('#replay-matching');
  await page.locator('#confirm').waitFor({ state: 'visible' });
  assert.match(await page.textContent('#confirm-text'), /Dry run: 2 dead letter/);
  assert.match(await page.textContent('#confirm-detail'), /acme: 2/);
  await shot('bulk-replay-confirm');
  await page.keyboard.press('Escape');
  await waitFor('cancelled', async () => (await page.textContent('#dead-message')).includes('cancelled'));
  assert.equal(await countAt(), 0, 'cancelled: nothing replayed');

  await page.click('#replay-matching');
  await page.locator('#confirm').waitFor({ state: 'visible' });
  await page.click('#confirm-ok');
  await waitFor('the job done', async () => /done, 2 of 2 replayed/.test(await page.textContent('#job-status')), 20000);
  await waitFor('both arrived at acme', async () => (await countAt()) === 2);
  await waitFor('the list empty', async () => (await deadRows().count()) === 0);
  await shot('bulk-replay-done');
});

step('the replay job\'s progress is followed', async () => {
  assert.match(await page.textContent('#job-status'), /Replay job .*: done, 2 of 2 replayed/);
  assert.equal(await page.getAttribute('#job-progress', 'value'), '2');
});

step('purging the filter asks first, then the letters are gone', async () => {
  await page.selectOption('#f-partner', 'globex');
  await page.fill('#f-type', '');
  await page.click('#dead-filter button[type=submit]');
  await waitFor('globex\'s letter', async () => (await deadRows().count()) === 1);
  await page.click('#purge-matching');
  await page.locator('#confirm').waitFor({ state: 'visible' });
  assert.match(await page.textContent('#confirm-text'), /1 dead letter/);
  await page.click('#confirm-ok');
  await waitFor('purged', async () => /Purged 1 dead letter/.test(await page.textContent('#dead-message')));
  const left = await heraldApi('GET', '/v1/dead-letters?partner=globex', OPERATOR);
  assert.equal(left.body.items.length, 0);
  const acme = await heraldApi('GET', '/v1/dead-letters?partner=acme', OPERATOR);
  assert.equal(acme.body.items.length, 4, 'acme\'s letters (replayed ones included) are untouched');
});

step('dead letters page by 50; replay and purge take exactly the filter shown', async () => {
  await control('POST', '/partners/globex/answer/400');
  const batch = Array.from({ length: 55 }, (_, n) => ({ device_id: `pager-${n}`, type: 'paging.check', data: { n }, partners: ['globex'] }));
  const posted = await heraldApi('POST', '/v1/events', INGEST, batch);
  assert.equal(posted.status, 202, JSON.stringify(posted.body));
  await waitFor('55 dead letters at globex', async () =>
    (await heraldApi('GET', '/v1/dead-letters?partner=globex&limit=100', OPERATOR)).body.items.length === 55);
  await control('POST', '/partners/globex/answer/200');

  await page.selectOption('#f-partner', 'globex');
  await page.fill('#f-type', 'paging.check');
  await page.click('#dead-filter button[type=submit]');
  await waitFor('a full first page', async () => (await deadRows().count()) === 50);
  assert.match(await page.textContent('#dead-count'), /more on the next page/);
  await page.click('#dead-next');
  await waitFor('the last five', async () => (await deadRows().count()) === 5);
  assert.equal(await page.isDisabled('#dead-next'), true);
  await page.click('#dead-first');
  await waitFor('the first page again', async () => (await deadRows().count()) === 50);

  const pager7 = posted.body[7].id;
  await page.fill('#f-device', 'pager-7');
  await page.click('#dead-filter button[type=submit]');
  await waitFor('pager-7 alone', async () => (await deadRows().count()) === 1);
  await page.click('#replay-matching');
  await page.locator('#confirm').waitFor({ state: 'visible' });
  assert.match(await page.textContent('#confirm-text'), /Dry run: 1 dead letter/);
  await page.click('#confirm-ok');
  await waitFor('pager-7 delivered', async () =>
    (await received('globex')).some((r) => r.id === pager7 && r.answered === 200));
  await waitFor('the list empty', async () => (await deadRows().count()) === 0);
  const delivered = (await received('globex')).filter((r) => r.answered === 200);
  assert.deepEqual(delivered.map((r) => r.id), [pager7], 'only the letter the filter showed was replayed');

  // The filter's "Replayed: not yet" leaves pager-7 out of the purge.
  const expected = 54;
  await page.fill('#f-device', '');
  await page.click('#purge-matching');
  await page.locator('#confirm').waitFor({ state: 'visible' });
  assert.match(await page.textContent('#confirm-text'), new RegExp(`${expected} dead letter`));
  await page.click('#confirm-ok');
  await waitFor('purged', async () => new RegExp(`Purged ${expected} dead letter`).test(await page.textContent('#dead-message')));
  const left = await heraldApi('GET', '/v1/dead-letters?partner=globex&limit=100', OPERATOR);
  assert.deepEqual(left.body.items.map((d) => d.device_id), ['pager-7'],
    'the purge keeps the replayed one (replayed: not yet)');
});

step('one dead letter is purged from its page, after a confirmation', async () => {
  await control('POST', '/partners/globex/answer/400');
  const id = await postEvent({ device_id: 'lock-5', type: 'door.forced_open', data: {}, partners: ['globex'] });
  const letter = await waitFor('its dead letter', async () =>
    (await heraldApi('GET', '/v1/dead-letters?partner=globex&limit=100', OPERATOR)).body.items.find((d) => d.event_id === id));
  await control('POST', '/partners/globex/answer/200');
  await page.evaluate((letterId) => { location.hash = `#/dead-letters/${letterId}`; }, letter.id);
  await page.locator('#purge-one').waitFor();
  await page.click('#purge-one');
  await page.locator('#confirm').waitFor({ state: 'visible' });
  await page.click('#confirm-cancel');
  assert.equal((await heraldApi('GET', `/v1/dead-letters/${letter.id}`, OPERATOR)).status, 200, 'cancelled: still there');
  await page.click('#purge-one');
  await page.locator('#confirm').waitFor({ state: 'visible' });
  await page.click('#confirm-ok');
  await waitFor('purged', async () => /purged/.test(await page.textContent('#letter-message')));
  assert.equal((await heraldApi('GET', `/v1/dead-letters/${letter.id}`, OPERATOR)).status, 404);
});

// ---- Event lookup, audit, chart ------------------------------------------------

step('an event looked up by id shows every delivery and its attempts', async () => {
  await page.click('#nav a[data-view="events"]');
  await page.fill('#event-id', ids.script);
  await page.press('#event-id', 'Enter');
  await waitFor('two deliveries', async () => (await page.locator('#event-body section.delivery').count()) === 2);
  const text = await page.textContent('#event-body');
  assert.match(text, /dead/);
  assert.match(text, /delivered/);
  assert.match(text, /400/);
  assert.match(text, /200/);
  assert.equal(await page.evaluate(() => window.__heraldPwned), undefined);
  await shot('event-lookup');
  await page.fill('#event-id', 'not-an-id');
  await page.press('#event-id', 'Enter');
  await waitFor('a clear refusal', async () => /not a event id|UUID/.test(await page.textContent('#event-message')));
});

step('the audit view lists who replayed and purged what', async () => {
  await page.click('#nav a[data-view="audit"]');
  await waitFor('audit entries', async () => (await page.locator('#audit-table tbody tr[data-action]').count()) > 0);
  await shot('audit');
  const text = await page.textContent('#audit-table');
  assert.match(text, /on-call/, 'the operator token\'s name');
  assert.match(text, /replay/);
  assert.match(text, /purge/);
});

step('the chart draws delivered and failed per minute of the last hour as herald counts them', async () => {
  await page.click('#nav a[data-view="partners"]');
  await waitFor('bars for acme', async () =>
    (await page.locator('#chart rect[data-kind="delivered"]').count()) > 0
    && (await page.locator('#chart rect[data-kind="failed"]').count()) > 0);
  // The chart says what herald counted: GET /v1/partners' last_hour.
  await waitFor('the chart\'s sums to be herald\'s', async () => {
    const acme = (await heraldApi('GET', '/v1/partners', OPERATOR)).body.partners.find((p) => p.name === 'acme');
    const sum = (kind) => acme.last_hour.reduce((n, m) => n + m[kind], 0);
    assert.ok(sum('delivered') > 0 && sum('failed') > 0, JSON.stringify(acme.last_hour));
    const title = await page.textContent('#chart svg title');
    return title.includes(`acme: ${sum("delivered")} delivered, ${sum("failed")} failed`);
  });
  await shot('partners');
});

step('readable on a phone: no view scrolls sideways', async () => {
  await page.setViewportSize(PHONE);
  for (const view of ['partners', 'dead-letters', 'events', 'audit']) {
    await page.click(`#nav a[data-view="${view}"]`);
    await page.waitForTimeout(200);
    const wide = await page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(wide <= PHONE.width + 1, `${view} is ${wide}px wide on a ${PHONE.width}px screen`);
    await shot(view, PHONE);
  }
  await page.setViewportSize(WIDE);
});

step('signing out forgets the token; nothing broke the policy; no URL held the token', async () => {
  await page.click('#sign-out');
  await page.locator('#view-signin').waitFor({ state: 'visible' });
  assert.equal(await page.evaluate(() => sessionStorage.getItem('herald.console.token')), null);
  assert.equal(await page.locator('#nav').isVisible(), false);
  assert.deepEqual(requestedUrls.filter((u) => u.includes(OPERATOR) || u.includes(INGEST)), []);
  assert.deepEqual(requestedUrls.filter((u) => !u.startsWith(HERALD)), [], 'nothing fetched from elsewhere');
  // 4xx answers the console asked for on purpose show up as console errors;
  // a policy violation or a script error would too.
  const serious = problems.filter((p) => !/Failed to load resource: the server responded with a status of (400|401|403|404|405)/.test(p));
  assert.deepEqual(serious, []);
});
