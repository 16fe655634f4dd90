// The codexlb operator dashboard: reads /admin/overview and /admin/requests every few
// seconds and updates the page in place (elements are kept and their text changed, so
// nothing moves on a refresh). No framework, nothing fetched from anywhere but codexlb.
"use strict";

const REFRESH_MS = 3000;
const OUTCOMES = ["ok", "client_error", "rate_limited", "server_error", "cancelled"];
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const state = { timer: null, lastGood: null, requestsText: "", refreshes: 0, minutes: null };

// --- formatting ---------------------------------------------------------------------------

function clock(iso) {
  if (!iso) return "";
  return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function dateTime(iso) {
  const when = new Date(iso);
  const sameDay = when.toDateString() === new Date().toDateString();
  const time = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return sameDay ? time : when.toLocaleDateString([], { weekday: "short", day: "numeric", month: "short" }) + " " + time;
}

function span(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return seconds + "s";
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return minutes + "m";
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return hours + "h " + (minutes % 60) + "m";
  return Math.floor(hours / 24) + "d " + (hours % 24) + "h";
}

function until(iso) {
  return iso ? dateTime(iso) + " (in " + span((new Date(iso) - Date.now()) / 1000) + ")" : "";
}

function count(n) {
  if (n === null || n === undefined) return "–";
  if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 0 : 1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(n >= 1e5 ? 0 : 1) + "k";
  return String(n);
}

function ms(n) {
  if (n === null || n === undefined) return "–";
  return n >= 1000 ? (n / 1000).toFixed(n >= 10000 ? 0 : 1) + " s" : Math.round(n) + " ms";
}

function plural(n, word) {
  return n + " " + word + (n === 1 ? "" : "s");
}

function level(pct) {
  return pct >= 90 ? "full" : pct >= 70 ? "warn" : "";
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

// --- talking to codexlb --------------------------------------------------------------------

class Unauthorized extends Error {}
class Unreachable extends Error {}

async function getJSON(path) {
  let response;
  try {
    response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  } catch (error) {
    throw new Unreachable("no answer");
  }
  if (response.status === 401) throw new Unauthorized();
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    throw new Unreachable("answer " + response.status + " is not JSON");
  }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : "status " + response.status;
    if (response.status === 403) throw new Error(message);
    throw new Unreachable(message);
  }
  return body;
}

async function post(path, body) {
  const options = { method: "POST", credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  return fetch(path, options);
}

function requestsQuery() {
  const params = new URLSearchParams();
  for (const name of ["key", "account", "status"]) {
    const value = $("filter-" + name).value;
    if (value) params.set(name, value);
  }
  params.set("limit", "200");
  return "/admin/requests?" + params.toString();
}

async function refresh() {
  clearTimeout(state.timer);
  try {
    const [overview, recent] = await Promise.all([getJSON("/admin/overview"), getJSON(requestsQuery())]);
    show("board");
    renderOverview(overview);
    renderRequests(recent);
    state.lastGood = new Date();
    setStale(null);
    setText($("updated"), "updated " + state.lastGood.toLocaleTimeString());
    state.refreshes += 1;
    document.body.dataset.refreshes = String(state.refreshes);
  } catch (error) {
    if (error instanceof Unauthorized) {
      show("login");
      setStale(null);
      return; // no polling until logged in
    }
    if (error instanceof Unreachable) {
      setStale(error.message);
    } else {
      show("login");
      setText($("login-error"), error.message);
      return;
    }
  }
  state.timer = setTimeout(refresh, REFRESH_MS);
}

function show(view) {
  if (document.body.dataset.view !== view) document.body.dataset.view = view;
}

function setStale(problem) {
  const banner = $("unreachable");
  if (problem === null) {
    banner.hidden = true;
    document.body.dataset.stale = "false";
    return;
  }
  setText($("unreachable-detail"), problem);
  setText($("stale-since"), state.lastGood ? state.lastGood.toLocaleTimeString() : "before it went away");
  banner.hidden = false;
  document.body.dataset.stale = "true";
}

// --- accounts ------------------------------------------------------------------------------

const accountCards = new Map();

function accountCard(name) {
  let card = accountCards.get(name);
  if (card) return card;
  const root = el("article", "account");
  root.dataset.name = name;
  const head = el("div", "head");
  const parts = { root };
  parts.name = head.appendChild(el("span", "name", name));
  parts.kind = head.appendChild(el("span", "kind"));
  parts.state = head.appendChild(el("span", "state"));
  parts.state.dataset.field = "state";
  root.appendChild(head);
  for (const [key, label] of [["primary", "5 hours"], ["secondary", "weekly"]]) {
    const row = el("div", "window");
    row.dataset.window = key;
    row.appendChild(el("span", "label", label));
    const bar = row.appendChild(el("div", "bar"));
    bar.setAttribute("role", "meter");
    bar.setAttribute("aria-label", name + " " + label + " used");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    const fill = bar.appendChild(el("div", "fill"));
    const pct = row.appendChild(el("span", "pct"));
    const reset = row.appendChild(el("span", "reset"));
    parts[key] = { bar, fill, pct, reset };
    root.appendChild(row);
  }
  const facts = el("dl", "facts");
  for (const [key, label] of [
    ["cooldown", "Cooldown"],
    ["inflight", "In flight"],
    ["hour", "Last hour"],
    ["last_error", "Last error"],
  ]) {
    facts.appendChild(el("dt", "", label));
    const value = facts.appendChild(el("dd", ""));
    value.dataset.field = key;
    parts[key] = value;
  }
  root.appendChild(facts);
  parts.root = root;
  accountCards.set(name, parts);
  return parts;
}

function renderAccounts(accounts) {
  const container = $("accounts");
  const seen = new Set();
  accounts.forEach((account, index) => {
    seen.add(account.name);
    const card = accountCard(account.name);
    if (container.children[index] !== card.root) container.insertBefore(card.root, container.children[index] || null);
    setText(card.kind, account.kind + (account.removed ? ", removed" : ""));
    setText(card.state, account.state.replace("_", " "));
    card.state.className = "state " + account.state;
    card.root.dataset.state = account.state;
    for (const key of ["primary", "secondary"]) {
      const window = account.usage[key];
      const pct = Math.max(0, Math.min(100, window.used_percent || 0));
      const parts = card[key];
      parts.fill.style.width = pct + "%";
      parts.fill.className = "fill " + level(pct);
      parts.bar.setAttribute("aria-valuenow", String(pct));
      setText(parts.pct, Math.round(window.used_percent || 0) + "%");
      setText(parts.reset, window.resets_at ? "resets " + until(window.resets_at) : "reset time not known yet");
    }
    setText(card.cooldown, account.cooldown_until ? "until " + until(account.cooldown_until) : "none");
    setText(card.inflight, account.inflight + " of " + (account.max_inflight || "no limit"));
    setText(card.hour, plural(account.hour.requests, "attempt") + ", " + account.hour.errors + " failed");
    setText(card.last_error, account.last_error || "none");
    card.last_error.title = account.last_error || "";
  });
  for (const [name, card] of accountCards) {
    if (!seen.has(name)) {
      card.root.remove();
      accountCards.delete(name);
    }
  }
}

// --- the last hour -------------------------------------------------------------------------

function renderChart(minutes) {
  state.minutes = minutes;
  const chart = $("chart");
  // Drawn at the size it is shown (not scaled), so the labels keep their shape.
  const width = Math.max(240, chart.clientWidth || 600), height = Math.max(100, chart.clientHeight || 170);
  const left = 34, right = 50, top = 8, bottom = 20;
  const plotW = width - left - right, plotH = height - top - bottom;
  const totals = minutes.map((m) => OUTCOMES.reduce((sum, o) => sum + m[o], 0));
  const maxCount = Math.max(4, ...totals);
  const ttfbs = minutes.map((m) => m.ttfb_p50_ms).filter((v) => v !== null);
  const maxTtfb = Math.max(100, ...ttfbs);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "requests per minute by outcome over the last hour, and time to first byte p50");
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return svg.appendChild(node);
  };
  const slot = plotW / minutes.length;
  minutes.forEach((minute, i) => {
    let y = top + plotH;
    for (const outcome of OUTCOMES) {
      if (!minute[outcome]) continue;
      const h = (minute[outcome] / maxCount) * plotH;
      y -= h;
      const rect = add("rect", { x: left + i * slot + 1, y, width: Math.max(1, slot - 2), height: h, class: outcome });
      const title = document.createElementNS(SVG, "title");
      title.textContent = `${clock(minute.start)}: ${minute[outcome]} ${outcome.replace("_", " ")}`;
      rect.appendChild(title);
    }
  });
  const points = [];
  minutes.forEach((minute, i) => {
    if (minute.ttfb_p50_ms === null) return;
    const x = left + i * slot + slot / 2;
    const y = top + plotH - (minute.ttfb_p50_ms / maxTtfb) * plotH;
    points.push(`${x.toFixed(1)},${y.toFixed(1)}`);
  });
  if (points.length > 1) add("polyline", { points: points.join(" "), class: "ttfb" });
  for (const point of points) {
    const [cx, cy] = point.split(",");
    add("circle", { cx, cy, r: 2.5, class: "ttfb-dot" });
  }
  add("line", { x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH, class: "axis" });
  add("line", { x1: left, y1: top, x2: left + plotW, y2: top, class: "axis" });
  add("text", { x: left - 4, y: top + 10, "text-anchor": "end" }, count(maxCount));
  add("text", { x: left - 4, y: top + plotH, "text-anchor": "end" }, "0");
  add("text", { x: left + plotW + 4, y: top + 10 }, ms(maxTtfb));
  add("text", { x: left, y: height - 4 }, "−60 min");
  add("text", { x: left + plotW / 2, y: height - 4, "text-anchor": "middle" }, "−30 min");
  add("text", { x: left + plotW, y: height - 4, "text-anchor": "end" }, "now");
  chart.replaceChildren(svg);
  const total = totals.reduce((a, b) => a + b, 0);
  chart.dataset.total = String(total);
}

// --- client keys ---------------------------------------------------------------------------

function renderKeys(keys) {
  const body = $("keys").tBodies[0];
  const rows = keys.map((key) => {
    const row = el("tr");
    row.dataset.key = key.name;
    row.appendChild(el("td", "", key.name || "(open access)"));
    row.appendChild(el("td", "num", count(key.today.requests)));
    row.appendChild(el("td", "num", count(key.today.tokens)));
    row.appendChild(el("td", "num", count(key.week.requests)));
    row.appendChild(el("td", "num", count(key.week.tokens)));
    const limits = row.appendChild(el("td"));
    if (!key.limits.length) limits.appendChild(el("span", "muted", "none"));
    for (const limit of key.limits) {
      const pct = limit.limit ? Math.min(100, (100 * limit.used) / limit.limit) : 0;
      const line = limits.appendChild(el("div", "limit"));
      line.appendChild(el("span", "", limit.name));
      const bar = line.appendChild(el("div", "bar"));
      const fill = bar.appendChild(el("div", "fill " + level(pct)));
      fill.style.width = pct + "%";
      line.appendChild(el("span", "", `${count(limit.used)} / ${count(limit.limit)}` + (limit.resets_at ? ", resets " + until(limit.resets_at) : "")));
    }
    return row;
  });
  if (!rows.length) {
    const row = el("tr");
    const cell = row.appendChild(el("td", "muted", "no client keys"));
    cell.colSpan = 6;
    rows.push(row);
  }
  body.replaceChildren(...rows);
}

function renderOverview(overview) {
  setText($("strategy"), "· " + overview.strategy.replace("_", " "));
  renderAccounts(overview.accounts);
  renderChart(overview.minutes);
  renderKeys(overview.keys);
}

// --- recent requests -----------------------------------------------------------------------

function fillChoices(select, values, label) {
  const current = select.value;
  const fixed = Array.from(select.options).filter((o) => !o.dataset.dynamic);
  const wanted = values.filter((v) => !fixed.some((o) => o.value === String(v)));
  if (current && !wanted.includes(current) && !fixed.some((o) => o.value === current)) wanted.push(current);
  const dynamic = Array.from(select.options).filter((o) => o.dataset.dynamic);
  if (dynamic.map((o) => o.value).join("\n") === wanted.join("\n")) return;
  dynamic.forEach((o) => o.remove());
  for (const value of wanted) {
    const option = el("option", "", label(value));
    option.value = value;
    option.dataset.dynamic = "1";
    select.appendChild(option);
  }
  select.value = current;
}

function renderRequests(recent) {
  fillChoices($("filter-key"), recent.choices.keys, (v) => v || "(open access)");
  fillChoices($("filter-account"), recent.choices.accounts, (v) => v);
  fillChoices($("filter-status"), recent.choices.statuses, (v) => v);
  const text = JSON.stringify(recent.requests);
  setText($("requests-count"), "· " + recent.requests.length + " shown");
  if (text === state.requestsText) return;
  state.requestsText = text;
  const rows = recent.requests.map((r) => {
    const row = el("tr", r.outcome === "ok" ? "" : "failed");
    row.dataset.key = r.key;
    row.dataset.account = r.account || "";
    row.dataset.status = String(r.status);
    row.appendChild(el("td", "", clock(r.time)));
    row.appendChild(el("td", "", r.key || "–"));
    row.appendChild(el("td", "", r.account || "–"));
    row.appendChild(el("td", "", r.transport + (r.route === "responses" ? "" : " " + r.route)));
    row.appendChild(el("td", "num status", String(r.status || "–")));
    row.appendChild(el("td", "num", String(r.attempts)));
    row.appendChild(el("td", "num", ms(r.ttfb_ms)));
    row.appendChild(el("td", "num", ms(r.duration_ms)));
    row.appendChild(el("td", "num", count(r.input_tokens) + " / " + count(r.output_tokens)));
    return row;
  });
  if (!rows.length) {
    const row = el("tr");
    const cell = row.appendChild(el("td", "muted", "no requests match"));
    cell.colSpan = 9;
    rows.push(row);
  }
  $("requests").tBodies[0].replaceChildren(...rows);
}

// --- login and logout ----------------------------------------------------------------------

async function login(event) {
  event.preventDefault();
  const input = $("admin-key");
  const key = input.value;
  setText($("login-error"), "");
  let response;
  try {
    response = await post("/admin/login", { key });
  } catch (error) {
    setText($("login-error"), "codexlb is unreachable.");
    return;
  }
  input.value = "";
  if (response.ok) {
    await refresh();
    return;
  }
  let message = "Login failed (status " + response.status + ").";
  if (response.status === 401) message = "That is not the admin key.";
  if (response.status === 429) {
    message = "Too many wrong keys from this address: try again in " + (response.headers.get("Retry-After") || "a few") + " s.";
  } else if (response.status !== 401) {
    try {
      message = (await response.json()).error.message;
    } catch (error) {
      // keep the status line
    }
  }
  document.body.dataset.loginStatus = String(response.status);
  setText($("login-error"), message);
}

async function logout() {
  clearTimeout(state.timer);
  try {
    await post("/admin/logout");
  } catch (error) {
    // the session ends on its own; show the form anyway
  }
  state.requestsText = "";
  show("login");
}

function start() {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  for (const name of ["key", "account", "status"]) {
    $("filter-" + name).addEventListener("change", () => {
      state.requestsText = "";
      refresh();
    });
  }
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => state.minutes && renderChart(state.minutes), 100);
  });
  refresh();
}

document.addEventListener("DOMContentLoaded", start);
